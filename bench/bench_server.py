"""Latency and throughput of scripts/serve_openai_api.py, measured from the client side.

Starts the server in a subprocess on a free loopback port with a randomly initialised MiniMind of
the given size (random weights decode exactly as fast as trained ones; on the CPU with
--freeze_weights 1, the decode step compiled with pre-packed weights, compiled during the warm-up), then runs 1, 4, 8 and 16
concurrent streamed requests, the levels alternating over --rounds so that machine noise hits
all alike, and reports per level: aggregate completion tokens/s (all streams' tokens over the
wall time) and time to first token p50/p95. The server batches the running replies (continuous
batching), so more streams should mean more tokens/s in all.
Replies are sampled with a fixed seed; one that ends early at <|im_end|> simply has fewer tokens
(the token counts are in the results). For scale, the same model's matrix products alone are
timed with 1, 4, 8, 16 rows (the server stopped): their speedup bounds what batching can give.

    python bench/bench_server.py                       # 26M model, writes bench/results/server.json
    python bench/bench_server.py --hidden_size 64 --num_hidden_layers 2 --max_tokens 16   # quick
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

from bench.bench_model import matmul_floor_tokens_per_second  # noqa: E402
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
         "--device", args.device, "--port", str(port), "--max_batch_size", str(max(args.concurrency)),
         "--freeze_weights", str(args.freeze_weights)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited; see its log"
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start within 120 s")


def timed_stream(client: httpx.Client, question: str, max_tokens: int):
    """(seconds to the first text, total seconds, completion tokens) of one streamed reply.

    The SSE lines are read with httpx and json.loads, the least a client can do: the client
    shares this machine's cores with the server, and the openai SDK's parsing of every chunk
    into objects took 11% of the 2 cores at 16 streams, time a real (remote) client would not
    take from the server. tests/test_server.py checks the stream with the SDK itself."""
    start = time.perf_counter()
    first, usage = None, None
    body = {"model": "minimind", "messages": [{"role": "user", "content": question}], "stream": True,
            "temperature": 0.8, "top_p": 0.9, "seed": 0, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
    return first or 0.0, time.perf_counter() - start, usage["completion_tokens"]


def run_streams(client: httpx.Client, concurrency: int, max_tokens: int):
    """`concurrency` streams at once: (wall seconds, [(ttft, total, tokens), ...], CPU seconds
    this client process used, on the same cores as the server)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: timed_stream(client, f"第{i}个问题：请介绍一下你自己。", max_tokens),
                                range(concurrency)))
    return time.perf_counter() - start, results, time.process_time() - cpu_start


def matmul_floor_speedups(model, levels, threads, rounds: int = 5) -> dict:
    """Per concurrency level c: tokens/s of the model's matrix products alone with c rows over
    the same with one row (alternating rounds, the best of each, measured here with the server
    stopped). No server can batch better than its matrix products do: this is the ceiling of
    speedup_over_one_stream for the kernels this machine's PyTorch uses."""
    if threads:
        torch.set_num_threads(threads)
    rates = {c: [] for c in levels}
    for _ in range(rounds):
        for c in levels:
            rates[c].append(matmul_floor_tokens_per_second(model, repeats=20, rows=c))
    one = max(rates[levels[0]])
    return {str(c): max(r) / one for c, r in rates.items()}


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the concurrency levels")
    parser.add_argument("--freeze_weights", type=int, default=1 if not torch.cuda.is_available() else 0,
                        choices=(0, 1), help="the server's --freeze_weights (default: 1 on the CPU)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: torch's)")
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
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=600,
                                  limits=httpx.Limits(max_connections=max(args.concurrency)))
            run_streams(client, 1, 8)  # warm-up (with --freeze_weights 1: compiles the one-row step,
            run_streams(client, 4, 8)  # then the several-row one)
            runs = {c: [] for c in args.concurrency}
            for _ in range(args.rounds):
                for c in args.concurrency:
                    runs[c].append(run_streams(client, c, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=30)
    floor_speedups = matmul_floor_speedups(model, args.concurrency, args.threads)

    levels = {}
    for c, samples in runs.items():
        tokens = [sum(r[2] for r in results) / wall for wall, results, _ in samples]
        ttfts = [r[0] for _, results, _ in samples for r in results]
        levels[str(c)] = {"tokens_per_second_total": statistics.median(tokens), "tokens_per_second_runs": tokens,
                          "ttft_seconds_p50": percentile(ttfts, 0.5), "ttft_seconds_p95": percentile(ttfts, 0.95),
                          "client_cpu_share_of_all_cores": statistics.median(
                              cpu / (wall * os.cpu_count()) for wall, _, cpu in samples),
                          "completion_tokens": [[r[2] for r in results] for _, results, _ in samples]}
    one = levels[str(args.concurrency[0])]["tokens_per_second_total"]
    result = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "server_threads": args.threads or torch.get_num_threads(), "device": args.device,
                    "load_average_at_end": os.getloadavg()},
        "config": vars(args) | {"parameters": sum(p.numel() for p in model.parameters())},
        "concurrent_streams": levels,
        "speedup_over_one_stream": {c: v["tokens_per_second_total"] / one for c, v in levels.items()},
        "matmul_floor_speedup_over_one_row": floor_speedups,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
