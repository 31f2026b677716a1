"""Does the GPU ever wait for the data? The real trainer against the same steps on ready batches.

Two measurements for the pretraining and SFT settings of MiniMind2-Small (26M, the size where
the model is fastest and the loader most likely to be the bottleneck):

1. loader: how many padded tokens/s the trainer's own DataLoader delivers (its workers, pinned
   memory, tokenisation, collate), with no model at all. Runs on the CPU too.
2. busy (CUDA only): trainer/train_{pretrain,full_sft}.py run for --steps optimizer steps
   (its loader, host syncs, logging and metrics file, one micro-batch per step so every step
   pays the per-step costs), against bench_gpu.py's compute-only steps of the same model, batch,
   dtype and compile setting on a batch already on the GPU. busy = the trainer's padded
   tokens/s ÷ the compute-only rate: the share of step time the GPU spends on the model.
   Goal ≥ 0.95.

The data file repeats the bundled demo lines until it has --samples rows (written to a
temporary folder), so any machine can run it; pass --pretrain_data / --sft_data for real files.

    python bench/bench_gpu_busy.py --loader_only          # any machine: the loader's ceiling
    python bench/bench_gpu_busy.py                        # on a GPU: writes bench/results/gpu_busy.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

HIDDEN, LAYERS = 512, 8  # MiniMind2-Small
STAGES = {  # stage: (trainer script, demo file, batch size as in bench_gpu.py)
    "pretrain": ("train_pretrain.py", "pretrain.jsonl", 32),
    "sft": ("train_full_sft.py", "sft.jsonl", 16),
}
SEQ_LEN = 512


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "gpu_busy.json"))
    p.add_argument("--stages", default=",".join(STAGES), help="pretrain, sft")
    p.add_argument("--loader_only", action="store_true", help="only the loader measurement (no GPU needed)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="loader workers (default: the trainer's default for the device)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--samples", type=int, default=20000, help="rows in the generated data file")
    p.add_argument("--pretrain_data", default=None)
    p.add_argument("--sft_data", default=None)
    p.add_argument("--loader_batches", type=int, default=100, help="batches the loader measurement reads")
    p.add_argument("--steps", type=int, default=60, help="trainer steps (the first 10 are not counted)")
    p.add_argument("--compile", type=int, default=0, choices=[0, 1])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return p.parse_args(argv)


def repeated_demo_file(demo_name: str, samples: int, folder: str) -> str:
    """The bundled demo file's lines repeated to `samples` rows (the cache index is built once)."""
    with open(os.path.join(REPO_ROOT, "dataset", "demo", demo_name), encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    path = os.path.join(folder, demo_name)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(samples):
            f.write(lines[i % len(lines)])
    return path


def trainer_args(stage: str, data_path: str, extra: list[str]):
    """The flags the stage's trainer would parse, so the loader is built exactly as in training."""
    import importlib
    script = STAGES[stage][0]
    module = importlib.import_module("trainer." + script[:-3])
    return module.parse_args(["--data_path", data_path, "--hidden_size", str(HIDDEN), "--num_hidden_layers",
                              str(LAYERS), "--max_seq_len", str(SEQ_LEN), "--batch_size", str(STAGES[stage][2]),
                              "--accumulation_steps", "1", *extra])


def measure_loader(stage: str, data_path: str, device: torch.device, num_workers, batches: int) -> dict:
    """Tokens/s out of the trainer's DataLoader, copied to the device as the loop does: padded
    (what the GPU computes) and real (what the tokenizer produced)."""
    from dataset.lm_dataset import PretrainDataset, SFTDataset, pad_collate
    from trainer.data_order import make_loader
    from trainer.processes import Runtime
    from trainer.stage import load_tokenizer
    extra = ["--num_workers", str(num_workers)] if num_workers is not None else []
    args = trainer_args(stage, data_path, extra)
    dataset_class = PretrainDataset if stage == "pretrain" else SFTDataset
    dataset = dataset_class(data_path, load_tokenizer(), max_length=SEQ_LEN, cache_dir=args.cache_dir)
    runtime = Runtime(rank=0, local_rank=0, world_size=1, device=device, use_deepspeed=False)
    loader = make_loader(dataset, pad_collate, args, runtime, epoch=0, skip_samples=0)
    positions, tokens, started, read = 0, 0, None, 0
    for batch in loader:
        ids = batch["input_ids"].to(device, non_blocking=True)
        if started is None:  # the first batch pays for starting the workers
            started = time.perf_counter()
            continue
        positions += ids.numel()
        tokens += batch["num_tokens"]
        read += 1
        if read == batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"stage": stage, "num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
            "batches": read, "padded_tokens_per_s": round(positions / elapsed),
            "real_tokens_per_s": round(tokens / elapsed)}


def measure_trainer(stage: str, data_path: str, args, folder: str) -> float:
    """Median padded tokens/s of the trainer's own steps (after the first 10), from its metrics file."""
    script, _, batch_size = STAGES[stage]
    out_dir = os.path.join(folder, f"out_{stage}")
    command = [sys.executable, os.path.join(REPO_ROOT, "trainer", script), "--data_path", data_path,
               "--hidden_size", str(HIDDEN), "--num_hidden_layers", str(LAYERS), "--max_seq_len", str(SEQ_LEN),
               "--batch_size", str(batch_size), "--accumulation_steps", "1", "--max_steps", str(args.steps),
               "--dtype", args.dtype, "--compile", str(args.compile), "--out_dir", out_dir,
               "--checkpoint_dir", os.path.join(folder, "checkpoints"), "--save_interval", str(10 ** 9),
               "--log_interval", "10", "--from_weight", "none"]
    if args.num_workers is not None:
        command += ["--num_workers", str(args.num_workers)]
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    name = "pretrain" if stage == "pretrain" else "full_sft"
    with open(os.path.join(out_dir, f"{name}_{HIDDEN}_metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return statistics.median(r["padded_tokens_per_s"] for r in records[10:])


def measure_compute_only(stage: str, args) -> float:
    """bench_gpu.py's timed steps of the same model on one batch already on the GPU."""
    from bench.bench_gpu import time_steps
    from model.checkpoint import config_from_sizes
    from model.model_minimind import MiniMindForCausalLM
    from trainer.accelerator import compile_model
    batch_size = STAGES[stage][2]
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config_from_sizes(HIDDEN, LAYERS, False)).cuda().train()
    engine = compile_model(model) if args.compile else model
    step_s, _ = time_steps(engine, batch_size, SEQ_LEN, args.dtype, 30, 5, torch.device("cuda"), False)
    return batch_size * SEQ_LEN / step_s


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.loader_only and device.type != "cuda":
        sys.exit("bench_gpu_busy.py needs a CUDA GPU for the busy measurement (torch.cuda.is_available() is "
                 "False here); run it with --loader_only to measure only the data loader")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "model": f"hidden {HIDDEN}, {LAYERS} layers",
              "seq_len": SEQ_LEN, "dtype": args.dtype, "compile": bool(args.compile), "rows": []}
    with tempfile.TemporaryDirectory() as folder:
        for stage in args.stages.split(","):
            given = args.pretrain_data if stage == "pretrain" else args.sft_data
            data_path = given or repeated_demo_file(STAGES[stage][1], args.samples, folder)
            row = measure_loader(stage, data_path, device, args.num_workers, args.loader_batches)
            row["data"] = given or f"demo {STAGES[stage][1]} repeated to {args.samples} rows"
            if not args.loader_only:
                row["trainer_padded_tokens_per_s"] = round(measure_trainer(stage, data_path, args, folder))
                row["compute_only_tokens_per_s"] = round(measure_compute_only(stage, args))
                row["busy"] = round(row["trainer_padded_tokens_per_s"] / row["compute_only_tokens_per_s"], 3)
                row["loader_headroom"] = round(row["padded_tokens_per_s"] / row["compute_only_tokens_per_s"], 2)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
