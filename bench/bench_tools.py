"""Tool calling on held-out prompts: does the model call the right tool with the right arguments,
and is its final answer (after the tool results) right?

    python bench/bench_tools.py --hidden_size 256 --num_hidden_layers 4 --model_mode 1   # the quickstart model
    python bench/bench_tools.py --data_path my_prompts.jsonl --out my_results.json

Each prompt (dataset/demo/tools_eval.jsonl by default, written by scripts/make_demo_data.py; its
questions are not in the training file) goes through model/tools.py's loop with the built-in
tools, greedy, up to --max_rounds rounds of calls. Scores (model.tools.score_tool_prompts):
valid_call, right_tool, exact_arguments and answer_with_tools over the prompts that need a tool;
no_call_when_not_needed and answer_when_not_needed over the ones that do not; answer_without_tools:
the tool prompts asked with no tools offered. Writes JSON (default bench/results/tools.json) with
every prompt's calls and final answer.
"""
import argparse
import json
import os
import platform
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from model.inference import add_model_args, load_model_or_exit  # noqa: E402
from evaluation.data import EvalDataError  # noqa: E402
from model.tools import load_tool_prompts, score_tool_prompts  # noqa: E402

SUMMARY = ["valid_call", "right_tool", "exact_arguments", "answer_with_tools", "answer_without_tools",
           "no_call_when_not_needed", "answer_when_not_needed", "answer_all"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--data_path", default=os.path.join(REPO_ROOT, "dataset", "demo", "tools_eval.jsonl"))
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "tools.json"))
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--max_rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prompts = load_tool_prompts(args.data_path)
    except EvalDataError as e:
        raise SystemExit(f"error: {e}") from None
    model, tokenizer = load_model_or_exit(args)
    started = time.time()
    scores = score_tool_prompts(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                max_rounds=args.max_rounds, batch_size=args.batch_size)
    seconds = time.time() - started
    for name in SUMMARY:
        value = scores.get(name)
        print(f"{name:24s} {'-' if value is None else f'{100 * value:.1f}%'}")
    print(f"{scores['prompts']} prompts ({scores['tool_prompts']} need a tool) in {seconds:.0f} s")
    results = {"command": "python bench/bench_tools.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "data_path": os.path.relpath(args.data_path, REPO_ROOT), "seconds": round(seconds, 1),
               "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "torch": torch.__version__, "device": args.device},
               **scores}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
