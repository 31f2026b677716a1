"""Evaluation speed: batched scoring (several questions and choices per forward pass, what
scripts/eval_bench.py does) against one sequence per forward pass, side by side in one run, on
the demo evaluation sets, with a check that both give the same numbers.

    mc    the 60 demo questions x 4 choices scored as continuations
    bpb   the first 100 held-out demo documents
    gen   the first 16 demo arithmetic questions, greedy, through the engine (32 rows vs 1)

Rounds alternate between the two ways, so machine noise hits both alike.

    python bench/bench_eval.py                       # 26M config (MiniMind2-Small), writes bench/results/eval.json
    python bench/bench_eval.py --hidden_size 256 --num_hidden_layers 4 --rounds 1   # the quickstart size (the figures in README)
    python bench/bench_eval.py --hidden_size 64 --num_hidden_layers 2 --rounds 1   # quick
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from evaluation.bpb import bits_per_byte  # noqa: E402
from evaluation.choice import Prompting, score_continuations  # noqa: E402
from evaluation.data import read_answer_questions, read_choice_questions, read_documents  # noqa: E402
from evaluation.generative import generate_answers  # noqa: E402
from model.checkpoint import config_from_sizes  # noqa: E402
from model.inference import build_prompt_ids, load_tokenizer  # noqa: E402
from model.model_minimind import MiniMindForCausalLM  # noqa: E402

DEMO = os.path.join(REPO_ROOT, "dataset", "demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per way and task")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "eval.json"))
    return p.parse_args(argv)


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config_from_sizes(args.hidden_size, args.num_hidden_layers, False)).eval()
    tokenizer = load_tokenizer(os.path.join(REPO_ROOT, "model"))
    questions = read_choice_questions(os.path.join(DEMO, "eval_mc.jsonl")).questions
    texts = read_documents(os.path.join(DEMO, "eval_text.jsonl"))[:100]
    arithmetic = read_answer_questions(os.path.join(DEMO, "eval_gen.jsonl"))[:16]
    prompts = [build_prompt_ids(tokenizer, [{"role": "user", "content": q["question"]}]) for q in arithmetic]
    prompting = Prompting(tokenizer)
    tasks = {  # task -> {way: function}
        "mc": {"batched": lambda: [s.predicted for s in score_continuations(model, questions, prompting, 8192)],
               "one_per_pass": lambda: [s.predicted for s in score_continuations(model, questions, prompting, 1)]},
        "bpb": {"batched": lambda: bits_per_byte(model, tokenizer, texts, 512, 8192).nats,
                "one_per_pass": lambda: bits_per_byte(model, tokenizer, texts, 512, 1).nats},
        "gen": {"batched": lambda: generate_answers(model, tokenizer, prompts, 24, batch_size=32),
                "one_per_pass": lambda: generate_answers(model, tokenizer, prompts, 24, batch_size=1)},
    }
    results = {}
    for task, ways in tasks.items():
        seconds = {way: [] for way in ways}
        outputs = {}
        for _ in range(args.rounds):
            for way, function in ways.items():
                elapsed, outputs[way] = timed(function)
                seconds[way].append(elapsed)
        same = outputs["batched"] == outputs["one_per_pass"] if task != "bpb" else \
            abs(outputs["batched"] - outputs["one_per_pass"]) <= 1e-4 * abs(outputs["one_per_pass"])
        best = {way: min(values) for way, values in seconds.items()}
        results[task] = {"seconds": seconds, "best_seconds": best, "speedup": best["one_per_pass"] / best["batched"],
                         "same_results": bool(same)}
        print(f"{task}: batched {best['batched']:.2f} s, one per pass {best['one_per_pass']:.2f} s: "
              f"{results[task]['speedup']:.1f}x; same results: {same}", flush=True)
    document = {"config": {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers,
                           "rounds": args.rounds, "mc_questions": len(questions), "bpb_documents": len(texts),
                           "gen_questions": len(prompts)},
                "machine": {"platform": platform.platform(), "processor": platform.processor(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "load_average": os.getloadavg()},
                "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(document, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
