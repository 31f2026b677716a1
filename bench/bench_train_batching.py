"""Training throughput: this project's default batching versus padding every row to max_seq_len
(what MiniMind does), on the demo SFT set, side by side in one run.

Modes (same model, same optimizer, steps alternating between modes so machine noise hits all alike):
  - default:             the trainers' default: plain seeded shuffle, each batch padded to its
                         longest sample
  - pad_to_max_seq_len:  the same batches, every row padded to max_seq_len (MiniMind)
  - group_by_length:     the trainers' --group_by_length 1: samples sorted by length inside
                         shuffled windows, then padded to the longest (other samples, same count)
Reported per mode:
  - tokens/s:            positions the model computes per second, padding included
  - effective tokens/s:  real (non-padding) tokens per second, the number that matters
  - padding share:       padded positions / all positions

    python bench/bench_train_batching.py                      # 26M config, writes bench/results/train_batching.json
    python bench/bench_train_batching.py --hidden_size 64 --num_hidden_layers 2 --steps 2   # quick
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from dataset.lm_dataset import SFTDataset, pad_collate  # noqa: E402
from trainer.cli import LENGTH_GROUP_WINDOW  # noqa: E402
from trainer.data_order import StepBatchSampler, count_real_tokens, sample_lengths  # noqa: E402
from trainer.losses import language_model_loss  # noqa: E402
from trainer.stage import build_model, load_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_path", default=os.path.join(REPO_ROOT, "dataset", "demo", "sft.jsonl"))
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (after one warm-up step each)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "train_batching.json"))
    return p.parse_args(argv)


def pad_to_max_collate(max_seq_len: int):
    """MiniMind's batching: every row padded to max_seq_len, whatever its length."""
    def collate(items):
        batch = pad_collate(items)
        return {k: F.pad(v, (0, max_seq_len - v.shape[1])) for k, v in batch.items()}
    return collate


def train_step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    loss, _ = language_model_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = SFTDataset(args.data_path, load_tokenizer(), max_length=args.max_seq_len)
    model_args = argparse.Namespace(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                    use_moe=0, seed=0, out_dir=None, weight_init="pytorch")
    model = build_model(model_args, "none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    plain = list(StepBatchSampler(len(dataset), args.batch_size, 1, 0, 1, seed=0, epoch=0))
    grouped = list(StepBatchSampler(len(dataset), args.batch_size, 1, 0, 1, seed=0, epoch=0,
                                    lengths=sample_lengths(dataset), group_size=LENGTH_GROUP_WINDOW))
    modes = {"default": (plain, pad_collate), "pad_to_max_seq_len": (plain, pad_to_max_collate(args.max_seq_len)),
             "group_by_length": (grouped, pad_collate)}
    if len(plain) < args.steps + 1:
        raise SystemExit(f"{args.data_path} gives {len(plain)} batches of {args.batch_size}; need {args.steps + 1}")
    totals = {mode: {"seconds": 0.0, "positions": 0, "real_tokens": 0} for mode in modes}
    model.train()
    for i in range(args.steps + 1):
        for mode, (batches, collate) in modes.items():  # alternate between the modes step by step
            items = [dataset[j] for j in batches[i]]
            batch = collate(items)
            seconds = train_step(model, optimizer, batch)
            if i == 0:
                continue  # warm-up step: allocator and kernel selection
            totals[mode]["seconds"] += seconds
            totals[mode]["positions"] += batch["input_ids"].numel()
            totals[mode]["real_tokens"] += count_real_tokens(items)
    results = {}
    for mode, t in totals.items():
        results[mode] = {
            "tokens_per_s": round(t["positions"] / t["seconds"], 1),
            "effective_tokens_per_s": round(t["real_tokens"] / t["seconds"], 1),
            "padding_share": round(1 - t["real_tokens"] / t["positions"], 4),
            "seconds_per_step": round(t["seconds"] / args.steps, 3),
        }
    speedup = results["default"]["effective_tokens_per_s"] / results["pad_to_max_seq_len"]["effective_tokens_per_s"]
    report = {
        "benchmark": "training throughput, pad-to-longest vs pad-to-max_seq_len",
        "command": "python bench/bench_train_batching.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": os.path.relpath(args.data_path, REPO_ROOT), "samples": len(dataset),
        "model": {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "max_seq_len": args.max_seq_len, "batch_size": args.batch_size, "timed_steps_per_mode": args.steps,
        "precision": "float32", "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                            "torch": torch.__version__},
        "results": results, "effective_speedup": round(speedup, 2),
        "effective_speedup_with_group_by_length": round(
            results["group_by_length"]["effective_tokens_per_s"] / results["pad_to_max_seq_len"]["effective_tokens_per_s"], 2),
        "goal": ">= 2x effective tokens/s (default vs pad_to_max_seq_len)",
        "goal_met": speedup >= 2.0,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for mode, r in results.items():
        print(f"{mode:>20}: {r['tokens_per_s']:>9,.0f} tokens/s  {r['effective_tokens_per_s']:>9,.0f} effective "
              f"tokens/s  padding {100 * r['padding_share']:.1f}%  {r['seconds_per_step']:.2f} s/step")
    print(f"effective speed-up of the default over pad-to-max: {speedup:.2f}x  (written to {args.out})")
    return report


if __name__ == "__main__":
    main()
