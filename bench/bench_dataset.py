"""
Dataset benchmarks: memory and time to open a 1 GB SFT file, and the padding share of batches.

    python bench/bench_dataset.py                 # writes bench/results/dataset.json
    python bench/bench_dataset.py --size_gb 0.2   # quicker

1. A ~1 GB SFT jsonl is generated in a temp dir (deleted afterwards). A fresh Python process
   imports torch/transformers, loads the tokenizer, resets its peak-RSS counter (Linux
   /proc/self/clear_refs), then builds SFTDataset over the file; peak RSS during the build
   minus RSS before it is the figure (goal: < 300 MB).
   The first open builds the line index and then tokenizes every sample once to find those
   with nothing to train inside max_length 512 (skipped) and those that are cut; big files are
   tokenized by forked worker processes, whose peak RSS is reported too (most of it is the
   parent's pages, shared copy-on-write). The second open must reuse both cached indexes.
2. Padding share (padded positions / all positions) of batches of the demo sets:
   pad to max_seq_len (what MiniMind does) vs pad to the longest item vs packing (pretrain)
   vs length-grouped batches (SFT).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEASURE_BUILD = r"""
import json, random, resource, sys, time
sys.path.insert(0, {root!r})
from transformers import AutoTokenizer
from dataset.lm_dataset import SFTDataset

def status_mb(field):  # VmRSS = resident now, VmHWM = peak resident since the last reset
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

tok = AutoTokenizer.from_pretrained({root!r} + "/model")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter, so the peak below is the build's own
rss_before = status_mb("VmRSS")
t = time.perf_counter()
ds = SFTDataset({path!r}, tok, max_length=512, cache_dir={cache!r}, validate_max_bytes={validate_max_bytes})
build_s = time.perf_counter() - t
peak = status_mb("VmHWM")
t = time.perf_counter()
for i in random.Random(0).sample(range(len(ds)), 1000):
    ds[i]
ms_per_item = (time.perf_counter() - t)  # seconds for 1000 items = ms per item
print(json.dumps({{"lines": len(ds), "reused_index": ds.lines.reused_index, "build_s": round(build_s, 2),
    "rss_before_mb": round(rss_before, 1), "peak_rss_during_build_mb": round(peak, 1),
    "peak_rss_increase_mb": round(peak - rss_before, 1),
    "rss_after_mb": round(status_mb("VmRSS"), 1), "ms_per_item_random_access": round(ms_per_item, 3),
    "samples_kept": len(ds), "window": ds.window_report(),
    "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}}))
"""


def make_big_sft(path, size_bytes, seed=0):
    """An SFT jsonl of about size_bytes: demo conversations with longer, varied replies."""
    rng = random.Random(seed)
    with open(ROOT / "dataset/demo/sft.jsonl", encoding="utf-8") as f:
        demo = [json.loads(line)["conversations"] for line in f]
    with open(ROOT / "dataset/demo/pretrain.jsonl", encoding="utf-8") as f:
        filler = [json.loads(line)["text"] for line in f]
    lines = []
    for _ in range(20000):
        conv = [dict(m) for m in rng.choice(demo)]
        conv[-1]["content"] += rng.choice(filler)  # ~0.5-1.5 KB per line, like sft_512
        lines.append(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n")
    block = "".join(lines).encode()
    written = 0
    with open(path, "wb") as f:
        while written < size_bytes:
            f.write(block)
            written += len(block)
    return written


def measure_build(path, cache, validate_max_bytes):
    code = MEASURE_BUILD.format(root=str(ROOT), path=str(path), cache=str(cache), validate_max_bytes=validate_max_bytes)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def big_file_bench(size_gb):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sft_big.jsonl"
        t = time.perf_counter()
        size = make_big_sft(path, int(size_gb * 1024 ** 3))
        print(f"generated {size / 2**30:.2f} GB in {time.perf_counter() - t:.1f}s")
        results = {"file_gb": round(size / 2**30, 3)}
        results["first_open"] = measure_build(path, Path(tmp) / "cache", 256 * 2**20)
        print(results["first_open"])
        results["second_open"] = measure_build(path, Path(tmp) / "cache", 256 * 2**20)
        print(results["second_open"])
    worst = max(r["peak_rss_increase_mb"] for k, r in results.items() if isinstance(r, dict))
    results["goal_peak_rss_increase_mb"] = 300
    results["goal_met"] = worst < 300
    return results


# ---------------------------------------------------------------- padding share

def padding_shares(dataset, batch_size, max_len, collates, seed=0, sampler=None):
    """Padded share of positions for each way of batching, over the whole dataset."""
    order = list(sampler) if sampler is not None else random.Random(seed).sample(range(len(dataset)), len(dataset))
    items = [dataset[i] for i in order]
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    real = sum(len(item[0]) for item in items)
    shares = {"pad_to_max_len": 1 - real / (len(batches) * batch_size * (max_len - 1))}
    for name, collate in collates.items():
        total = sum(collate(b)["input_ids"].numel() for b in batches)
        shares[name] = 1 - real / total
    return {k: round(v, 4) for k, v in shares.items()}


def padding_bench(batch_size, max_len):
    from transformers import AutoTokenizer
    from dataset.lm_dataset import DPODataset, PretrainDataset, SFTDataset, dpo_collate, pack_collate, pad_collate
    from trainer.cli import LENGTH_GROUP_WINDOW
    from trainer.data_order import StepBatchSampler
    tok = AutoTokenizer.from_pretrained(str(ROOT / "model"))
    demo = ROOT / "dataset/demo"
    out = {"batch_size": batch_size, "max_seq_len": max_len}

    pretrain = PretrainDataset(demo / "pretrain.jsonl", tok, max_length=max_len)
    out["pretrain"] = padding_shares(pretrain, batch_size, max_len, {"pad_to_longest": pad_collate, "packing": pack_collate})

    for name in ("sft", "r1_mix"):
        ds = SFTDataset(demo / f"{name}.jsonl", tok, max_length=max_len)
        out[name] = padding_shares(ds, batch_size, max_len, {"pad_to_longest": pad_collate})
        # the order training uses with --group_by_length 1
        grouped = [i for batch in StepBatchSampler(len(ds), batch_size, 1, 0, 1, seed=0, epoch=0,
                                                   lengths=ds.lines.line_lengths(), group_size=LENGTH_GROUP_WINDOW)
                   for i in batch]
        out[name]["length_grouped_pad_to_longest"] = padding_shares(
            ds, batch_size, max_len, {"x": pad_collate}, sampler=grouped)["x"]

    dpo = DPODataset(demo / "dpo.jsonl", tok, max_length=max_len)
    items = [dpo[i] for i in random.Random(0).sample(range(len(dpo)), len(dpo))]
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    real = sum(len(it["x_chosen"]) + len(it["x_rejected"]) for it in items)
    total = sum(2 * dpo_collate(b)["x_chosen"].numel() for b in batches)
    out["dpo"] = {"pad_to_max_len": round(1 - real / (2 * len(batches) * batch_size * (max_len - 1)), 4),
                  "pad_to_longest": round(1 - real / total, 4)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_gb", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "bench/results/dataset.json"))
    args = parser.parse_args()

    results = {"big_sft_file": big_file_bench(args.size_gb)}
    results["padding_share"] = padding_bench(args.batch_size, args.max_seq_len)
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                          "command": "python bench/bench_dataset.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
