"""Training throughput and MFU on a CUDA GPU: MiniMind against transformers' Llama, side by side.

For MiniMind2-Small (26M), MiniMind2 (104M) and MiniMind2-MoE (145M), in the pretraining
setting (batch 32 x 512, MiniMind2's pretrain micro-batch) and the SFT one (batch 16 x 512,
its full-SFT micro-batch; rows padded to 512, the longest an sft_mini_512 row can be), with
bf16 autocast and torch.compile off and on, it times full training steps (forward, backward,
fused AdamW step) of MiniMind and of a transformers LlamaForCausalLM with identical shapes and
SDPA attention (no Llama twin for the MoE model: Llama has no shared-expert MoE), in this one
process. MFU counts model FLOPs as trainer/mfu.py does, against the GPU's datasheet peak.

It also estimates how long one epoch of pretrain_hq.jsonl + sft_mini_512.jsonl takes at the
measured MiniMind rates. Token counts: the dataset card (modelscope gongjy/minimind_dataset)
gives file sizes, 1.6 GB and 1.2 GB; at 3 bytes per Chinese character and the 1.3 characters
per token this tokenizer reaches on everyday Chinese (bench/results/tokenizer.json) that is
about 0.41 B and 0.31 B tokens (JSON syntax and chat markup not subtracted; pass
--pretrain_tokens / --sft_tokens with exact counts if you have them).

    python bench/bench_gpu.py                       # writes bench/results/gpu.json
    python bench/bench_gpu.py --quick               # MiniMind rows only, batch 8, a few steps
    python bench/bench_gpu.py --compile 0 && python bench/bench_gpu.py --compile 1 --merge   # in two parts
"""
import argparse
import json
import os
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

GB = 1e9
PRETRAIN_TOKENS = 1.6 * GB / 3 * 1.3  # see the docstring: dataset-card size, bytes per char, chars per token
SFT_TOKENS = 1.2 * GB / 3 * 1.3
MODELS = {  # name: (hidden_size, num_hidden_layers, use_moe)
    "MiniMind2-Small": (512, 8, False),
    "MiniMind2": (768, 16, False),
    "MiniMind2-MoE": (640, 8, True),
}
STAGES = {"pretrain": (32, 512), "sft": (16, 512)}  # (batch_size, seq_len)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "gpu.json"))
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated names from: " + ", ".join(MODELS))
    p.add_argument("--stages", default=",".join(STAGES), help="pretrain, sft")
    p.add_argument("--impls", default="minimind,llama-hf", help="minimind, llama-hf")
    p.add_argument("--compile", default="0,1", help="compile settings to run: 0, 1 or 0,1")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--pretrain_tokens", type=float, default=PRETRAIN_TOKENS)
    p.add_argument("--sft_tokens", type=float, default=SFT_TOKENS)
    p.add_argument("--quick", action="store_true", help="smoke run: MiniMind only, 3 timed steps, batch 8")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows already in --out (run the table in parts, e.g. --compile 0 then --compile 1)")
    return p.parse_args(argv)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here, nothing was measured")


def build(impl: str, model_name: str, device):
    from bench.bench_model import llama_twin
    from model.checkpoint import config_from_sizes
    from model.model_minimind import MiniMindForCausalLM
    hidden, layers, use_moe = MODELS[model_name]
    config = config_from_sizes(hidden, layers, use_moe)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config) if impl == "minimind" else llama_twin(config)
    return model.to(device).train(), config


def time_steps(model, batch_size, seq_len, dtype, steps, warmup, device, use_moe):
    """Seconds per training step (median of the timed steps) and peak memory."""
    from trainer.accelerator import TORCH_DTYPES, make_optimizer
    optimizer = make_optimizer(model.parameters(), 1e-4, device)
    ids = torch.randint(3, 6400, (batch_size, seq_len), device=device)
    autocast = torch.autocast("cuda", dtype=TORCH_DTYPES[dtype], enabled=dtype != "float32")
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    times = []
    torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with autocast:
            out = model(input_ids=ids, labels=ids)
            loss = out.loss + (out.aux_loss if use_moe else 0.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        if i >= warmup:
            times.append((start, end))
    torch.cuda.synchronize(device)
    seconds = sorted(s.elapsed_time(e) / 1e3 for s, e in times)
    return seconds[len(seconds) // 2], torch.cuda.max_memory_allocated(device) / GB


def run_row(model_name, stage, impl, compile_, args, device, peak):
    from trainer.accelerator import compile_model
    from trainer.mfu import flops_per_token, model_flops_utilisation
    batch_size, seq_len = STAGES[stage]
    if args.quick:
        batch_size = 8
    model, config = build(impl, model_name, device)
    engine = compile_model(model) if compile_ else model
    row = {"model": model_name, "stage": stage, "impl": impl, "dtype": args.dtype, "compile": bool(compile_),
           "batch_size": batch_size, "seq_len": seq_len}
    try:
        started = time.perf_counter()
        step_s, memory = time_steps(engine, batch_size, seq_len, args.dtype, args.steps, args.warmup, device,
                                    config.use_moe and impl == "minimind")
        tokens_per_s = batch_size * seq_len / step_s
        row.update(tokens_per_s=round(tokens_per_s), step_ms=round(step_s * 1e3, 2),
                   mfu=round(model_flops_utilisation(flops_per_token(config, seq_len), tokens_per_s, peak), 4),
                   peak_memory_gb=round(memory, 2), wall_s=round(time.perf_counter() - started, 1))
    except torch.OutOfMemoryError as error:
        row.update(tokens_per_s=None, mfu=None, error=f"out of memory: {str(error)[:200]}")
    del model, engine
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def epoch_estimates(rows, args) -> dict:
    """Hours for one epoch of each default data file at the fastest measured MiniMind rate."""
    estimates = {}
    for model_name in MODELS:
        for stage, tokens in (("pretrain", args.pretrain_tokens), ("sft", args.sft_tokens)):
            rates = [r["tokens_per_s"] for r in rows if r["model"] == model_name and r["stage"] == stage
                     and r["impl"] == "minimind" and r.get("tokens_per_s")]
            if rates:
                estimates[f"{model_name} {stage}"] = {"tokens": round(tokens), "tokens_per_s": max(rates),
                                                      "hours": round(tokens / max(rates) / 3600, 2)}
    return estimates


def main(argv=None):
    args = parse_args(argv)
    require_cuda()
    from trainer.accelerator import enable_fast_matmul
    from trainer.mfu import device_peak_flops
    device = torch.device("cuda")
    enable_fast_matmul(device)
    peak, peak_source = device_peak_flops(device, args.dtype)
    if args.quick:
        args.steps, args.warmup, args.impls = 3, 2, "minimind"
    rows = []
    if args.merge and os.path.isfile(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    for model_name in args.models.split(","):
        for stage in args.stages.split(","):
            for compile_ in (int(c) for c in args.compile.split(",")):
                for impl in args.impls.split(","):
                    if impl == "llama-hf" and MODELS[model_name][2]:
                        continue  # no Llama twin of a MoE model
                    row = run_row(model_name, stage, impl, compile_, args, device, peak)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "peak_flops": peak, "peak_source": peak_source,
              "flops_counting": "6 x matmul parameters per token + 12 x layers x hidden x seq_len (trainer/mfu.py)",
              "rows": rows, "epoch_estimates": epoch_estimates(rows, args),
              "epoch_token_counts": "estimated from the dataset card's file sizes, see bench_gpu.py's docstring"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'model':16} {'stage':8} {'impl':9} {'compile':7} {'tokens/s':>10} {'MFU':>6}")
    for r in rows:
        tps = f"{r['tokens_per_s']:,}" if r.get("tokens_per_s") else r.get("error", "-")[:20]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        print(f"{r['model']:16} {r['stage']:8} {r['impl']:9} {str(r['compile']):7} {tps:>10} {mfu:>6}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
