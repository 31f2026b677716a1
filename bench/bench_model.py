"""MiniMind's decoder against transformers' LlamaForCausalLM of identical shapes, side by side.

Measures, in one run on the same machine:
  - training steps (forward + backward + AdamW step), fp32, default 26M config, batch 8 x 512;
  - greedy decoding tokens/s at batch 1: MiniMind's generation engine (model/engine.py) versus
    `LlamaForCausalLM.generate` (and MiniMind's `generate()` through transformers, for reference).
Both models hold the same weights (checked: equal logits), so they compute the same function.
Runs alternate between the two models so that machine noise hits both alike.

Decoding one sequence multiplies every weight matrix by one vector per token. When the weights
do not fit in the CPU caches (26M fp32 = 103 MB), those matrix-vector products take nearly all
of the step, whatever the code around them does; so the script also times them alone (the
ceiling for any decoder of the same weights, precision and kernels) and, for the engine with
freeze_weights=True (its step compiled with pre-packed weights), the same products with the
weights pre-packed as it has them (`_packed`). It repeats the decode comparison with a small
model that fits in the caches, where what is timed is the per-token overhead of each generation
loop (`--small_hidden_size/--small_layers`).

    python bench/bench_model.py                 # writes bench/results/model.json
    python bench/bench_model.py --steps 2 --batch_size 2 --seq_len 128 --new_tokens 32   # quick
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402


def llama_twin(config: MiniMindConfig) -> LlamaForCausalLM:
    """A LlamaForCausalLM with exactly MiniMind's shapes (and, once loaded, its weights)."""
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(llama_config)


def build_pair(hidden_size, num_hidden_layers, seed=0):
    torch.manual_seed(seed)
    minimind = MiniMindForCausalLM(MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers))
    llama = llama_twin(minimind.config)
    llama.load_state_dict(minimind.state_dict(), strict=True)
    return minimind, llama


def check_same_function(minimind, llama):
    ids = torch.randint(3, minimind.config.vocab_size, (1, 16))
    with torch.no_grad():
        diff = (minimind.eval()(ids).logits - llama.eval()(ids).logits).abs().max().item()
    assert diff < 1e-4, f"MiniMind and its Llama twin disagree (max |Δlogit| {diff})"
    return diff


def time_train_steps(model, batch_size, seq_len, steps, warmup=1):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def minimind_decode(model, prompt, new_tokens):
    """The project's generation engine (model/engine.py, one slot), greedy, never stopping early."""
    from model.engine import Engine, SamplingParams
    engine = Engine(model, None, max_batch_size=1, max_seq_len=prompt.shape[-1] + new_tokens)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    return engine.generate([prompt.view(-1).tolist()], params)[0].output_ids


def frozen_decoder(model, prompt_len: int, new_tokens: int):
    """The engine with freeze_weights=True (the server's --freeze_weights 1): its decode step
    compiled with the weights pre-packed. Built once; it compiles at its first call."""
    from model.engine import Engine, SamplingParams
    engine = Engine(model, None, max_batch_size=1, max_seq_len=prompt_len + new_tokens, freeze_weights=True)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    return lambda prompt: engine.generate([prompt.view(-1).tolist()], params)[0].output_ids


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class DecodeProducts(torch.nn.Module):
    """One decoding step's matrix products: every Linear weight of the model (the tied output
    matrix included), in order, each times its token vectors. A module, so that torch.compile's
    freezing can pre-pack its weights as it does the frozen decode step's."""

    def __init__(self, model):
        super().__init__()
        self.linears = torch.nn.ModuleList(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def step_inputs(self, rows: int) -> dict:
        """`rows` token vectors per input width (1 row: batch-1 decoding). They are passed in,
        not held: were they constants too, freezing would fold the products away."""
        return {m.in_features: torch.randn(rows, m.in_features) for m in self.linears}

    def forward(self, vectors: dict):
        return [torch.nn.functional.linear(vectors[m.in_features], m.weight) for m in self.linears]


def decode_matmuls(model, rows: int = 1):
    """A callable running one step of DecodeProducts for `rows` rows, the plain (eager) kernels."""
    products = DecodeProducts(model)
    vectors = products.step_inputs(rows)
    return lambda: products(vectors)


@torch.no_grad()
def matmuls_alone(model, steps: int, rows: int = 1) -> int:
    """The decoding ceiling run like a decoder: `steps` steps' matrix products for `rows` rows and
    nothing else; returns the tokens. A decoder with the same weights, precision and PyTorch
    kernels cannot be faster."""
    step = decode_matmuls(model, rows)
    for _ in range(steps):
        step()
    return steps * rows


def packed_matmuls(model, steps_per_call: int):
    """A callable running steps_per_call one-row steps of DecodeProducts compiled with freezing:
    the ceiling for the frozen engine, with its own pre-packed kernels."""
    products = DecodeProducts(model)
    vectors = products.step_inputs(1)
    compiled = torch.compile(products)

    @torch.no_grad()
    def run():
        with torch._inductor.config.patch(freezing=True):
            for _ in range(steps_per_call):
                compiled(vectors)
        return steps_per_call
    return run


def matmul_floor_tokens_per_second(model, repeats: int = 20, rows: int = 1) -> float:
    """Tokens/s of matmuls_alone (after one untimed step): the ceiling for `rows` rows."""
    matmuls_alone(model, 1, rows)
    start = time.perf_counter()
    tokens = matmuls_alone(model, repeats, rows)
    return tokens / (time.perf_counter() - start)


@torch.no_grad()
def time_decode(fn, new_tokens, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        produced = fn()
        elapsed = time.perf_counter() - start
        assert produced == new_tokens, f"expected {new_tokens} new tokens, got {produced}"
        times.append(new_tokens / elapsed)
    return times


def compare_decoding(minimind, llama, prompt_len, new_tokens, rounds) -> dict:
    """Greedy decode tokens/s at batch 1: our routine, Llama's generate(), MiniMind's generate(),
    and the ceiling (the matrix products of new_tokens steps alone), timed in alternation with
    the others and as often, so that a busy or quiet moment of the machine hits all alike."""
    minimind.eval(), llama.eval()
    prompt = torch.randint(3, minimind.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(2))
    greedy = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    frozen = frozen_decoder(minimind, prompt_len, new_tokens)
    runners = {
        "minimind_routine": lambda: len(minimind_decode(minimind, prompt, new_tokens)),
        "minimind_frozen": lambda: len(frozen(prompt)),
        "llama_generate": lambda: llama.generate(prompt, **greedy).shape[1] - prompt_len,
        "minimind_generate": lambda: minimind.generate(prompt, **greedy).shape[1] - prompt_len,
        "matmuls_alone": lambda: matmuls_alone(minimind, new_tokens),
        "matmuls_alone_packed": packed_matmuls(minimind, new_tokens),
    }
    for run in runners.values():  # warm-up
        time_decode(run, new_tokens, 1)
    decode = {name: [] for name in runners}
    for _ in range(rounds + 1):
        for name, run in runners.items():
            decode[name] += time_decode(run, new_tokens, 1)
    return decode


def medians(samples: dict) -> dict:
    return {k: statistics.median(v) for k, v in samples.items()}


def speedup(decode: dict) -> float:
    return statistics.median(decode["minimind_routine"]) / statistics.median(decode["llama_generate"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per model and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (MiniMind, Llama, ...)")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--small_hidden_size", type=int, default=128, help="the cache-resident decode comparison")
    parser.add_argument("--small_layers", type=int, default=4)
    parser.add_argument("--skip_training", action="store_true", help="only the decoding comparisons")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "model.json"))
    args = parser.parse_args()

    minimind, llama = build_pair(args.hidden_size, args.num_hidden_layers)
    max_diff = check_same_function(minimind, llama)

    train = {"minimind": [], "llama": []}
    for _ in range(0 if args.skip_training else args.rounds):
        train["minimind"] += time_train_steps(minimind, args.batch_size, args.seq_len, args.steps)
        train["llama"] += time_train_steps(llama, args.batch_size, args.seq_len, args.steps)

    decode = compare_decoding(minimind, llama, args.prompt_len, args.new_tokens, args.rounds)
    small_minimind, small_llama = build_pair(args.small_hidden_size, args.small_layers)
    check_same_function(small_minimind, small_llama)
    decode_small = compare_decoding(small_minimind, small_llama, args.prompt_len, args.new_tokens, args.rounds)
    ceiling_runs = decode.pop("matmuls_alone")
    packed_runs = decode.pop("matmuls_alone_packed")
    floor, packed_floor = statistics.median(ceiling_runs), statistics.median(packed_runs)
    for name in ("matmuls_alone", "matmuls_alone_packed"):
        decode_small.pop(name)  # the small model's ceilings are not reported

    tokens_per_step = args.batch_size * args.seq_len
    step_minimind = statistics.median(train["minimind"]) if train["minimind"] else None
    step_llama = statistics.median(train["llama"]) if train["llama"] else None
    result = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "load_average_at_end": os.getloadavg(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()},
        "config": vars(args) | {"parameters": sum(p.numel() for p in minimind.parameters()),
                                "max_abs_logit_diff_vs_llama": max_diff},
        "train_step_seconds_median": {"minimind": step_minimind, "llama": step_llama},
        "train_tokens_per_second": None if args.skip_training else {"minimind": tokens_per_step / step_minimind,
                                                                    "llama": tokens_per_step / step_llama},
        "train_speedup_minimind_over_llama": None if args.skip_training else step_llama / step_minimind,
        "decode_tokens_per_second_median": medians(decode),
        "decode_speedup_minimind_routine_over_llama_generate": speedup(decode),
        "decode_ceiling": {
            "weight_megabytes": weight_bytes(minimind) / 1e6,
            "matmuls_alone_tokens_per_second": floor,
            "matmuls_alone_tokens_per_second_runs": ceiling_runs,
            "minimind_routine_share_of_ceiling": statistics.median(decode["minimind_routine"]) / floor,
            "llama_generate_share_of_ceiling": statistics.median(decode["llama_generate"]) / floor,
            "minimind_frozen_share_of_ceiling": statistics.median(decode["minimind_frozen"]) / floor,
            "matmuls_alone_packed_tokens_per_second": packed_floor,
            "matmuls_alone_packed_tokens_per_second_runs": packed_runs,
            "minimind_frozen_share_of_packed_ceiling": statistics.median(decode["minimind_frozen"]) / packed_floor,
        },
        "decode_small_model": {
            "hidden_size": args.small_hidden_size, "num_hidden_layers": args.small_layers,
            "parameters": sum(p.numel() for p in small_minimind.parameters()),
            "tokens_per_second_median": medians(decode_small),
            "speedup_minimind_routine_over_llama_generate": speedup(decode_small),
        },
        "raw": {"train_step_seconds": train, "decode_tokens_per_second": decode,
                "decode_small_tokens_per_second": decode_small},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
