"""Latency and throughput of scripts/serve_openai_api.py, measured from the client side.

Starts the server in a subprocess on a free loopback port with a randomly initialised MiniMind of
the given size (random weights decode exactly as fast as trained ones), then streams
  - sequential requests: time to first token (TTFT) and decode tokens/s of one client alone;
  - N concurrent requests: total throughput and how long the last one waits for its first
    token (the server runs one generation at a time).
Replies are sampled with a fixed seed; one that ends early at <|im_end|> simply has fewer tokens
(the token counts are in the results).

    python bench/bench_server.py                       # 26M model, writes bench/results/server.json
    python bench/bench_server.py --hidden_size 64 --num_hidden_layers 2 --max_tokens 64   # quick
"""
import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import httpx  # noqa: E402
from openai import OpenAI  # noqa: E402

from model.checkpoint import config_from_sizes, save_weights  # noqa: E402
from model.model_minimind import MiniMindForCausalLM  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(out_dir, args, port, log):
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "serve_openai_api.py"), "--out_dir", out_dir,
         "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
         "--device", args.device, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited; see its log"
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start within 120 s")


def timed_stream(client, question, max_tokens):
    """(seconds to the first text, total seconds, completion tokens) of one streamed reply."""
    start = time.perf_counter()
    first, usage = None, None
    stream = client.chat.completions.create(
        model="minimind", messages=[{"role": "user", "content": question}], stream=True, temperature=0.8,
        top_p=0.9, seed=0, max_tokens=max_tokens, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            usage = chunk.usage
    return first or 0.0, time.perf_counter() - start, usage.completion_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=5, help="sequential requests")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "server.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out_dir:
        torch.manual_seed(0)
        model = MiniMindForCausalLM(config_from_sizes(args.hidden_size, args.num_hidden_layers))
        save_weights(model, os.path.join(out_dir, f"full_sft_{args.hidden_size}.pth"))
        port = free_port()
        with open(os.path.join(out_dir, "server.log"), "w") as log:
            server = start_server(out_dir, args, port, log)
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
            timed_stream(client, "warm-up", 8)
            sequential = [timed_stream(client, f"第{i}个问题：请介绍一下你自己。", args.max_tokens)
                          for i in range(args.requests)]
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                concurrent = list(pool.map(lambda i: timed_stream(client, f"问题 {i}", args.max_tokens),
                                           range(args.concurrency)))
            concurrent_wall = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(timeout=30)

    decode_rates = [(tokens - 1) / (total - first) for first, total, tokens in sequential if tokens > 1]
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": args.device},
        "config": vars(args) | {"parameters": sum(p.numel() for p in model.parameters())},
        "sequential": {
            "ttft_seconds_median": statistics.median(r[0] for r in sequential),
            "decode_tokens_per_second_median": statistics.median(decode_rates),
            "completion_tokens": [r[2] for r in sequential],
        },
        "concurrent": {
            "requests": args.concurrency,
            "wall_seconds": concurrent_wall,
            "tokens_per_second_total": sum(r[2] for r in concurrent) / concurrent_wall,
            "ttft_seconds_max": max(r[0] for r in concurrent),
            "completion_tokens": [r[2] for r in concurrent],
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
