"""Evaluate one or several models on bits per byte, multiple choice, generative and judge tasks.

    python scripts/eval_bench.py --task bpb --data_path held_out.jsonl                     # full_sft_512.pth
    python scripts/eval_bench.py --task mc --data_path ceval-exam --num_fewshot 5 --load 1 --hf_path MiniMind2
    python scripts/eval_bench.py --task gen --data_path gsm8k_test.jsonl --model_mode 3
    python scripts/eval_bench.py --task bpb,mc,gen --model_modes 0,1,2,3 --out results.json --plot results.png
    python scripts/eval_bench.py --task mc --models "--model_mode 1" "--load 1 --hf_path MiniMind2 --label released"
    OPENAI_API_KEY=... python scripts/eval_bench.py --task judge --judge_base_url https://api.deepseek.com/v1 \\
        --judge_model deepseek-chat

Without --data_path each task runs on its bundled demo set (dataset/demo/eval_*.jsonl, held out
from the demo training files). Several tasks run in one go (--task bpb,mc,gen); several models
are given by --model_modes (stages of one size) or --models (each a string of model flags on
top of the ones given outside it). A table goes to stdout, --out writes everything as JSON,
--plot draws the models side by side.

Tasks: bpb (bits per byte of text, jsonl {"text"} or .txt), mc (jsonl {"question", "choices",
"answer"} or a C-Eval/CMMLU folder), gen ({"question", "answer"}; GSM8K's files as they are),
judge (an OpenAI-compatible endpoint scores each answer 0-10; key from --judge_api_key_env).
"""
import argparse
import os
import shlex
import sys

if __package__ in (None, ""):  # run as a file: import from the repository root, not from scripts/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from evaluation import report  # noqa: E402
from evaluation.data import EvalDataError  # noqa: E402
from evaluation.judge import DEFAULT_CRITERIA  # noqa: E402
from evaluation.tasks import TASKS, Subject, default_data_path  # noqa: E402
from model.checkpoint import STAGE_OF_MODEL_MODE  # noqa: E402
from model.command_line import ArgumentParser, check_size_flags  # noqa: E402
from model.inference import ModelLoadError, add_model_args, load_model, lora_name_of  # noqa: E402


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    which = p.add_argument_group("what to evaluate")
    which.add_argument("--task", default="mc", help=f"one or several of {', '.join(TASKS)}, comma-separated")
    which.add_argument("--data_path", nargs="+", default=None,
                       help="one file or folder per task, in --task order (default: the demo set of each task)")
    which.add_argument("--model_modes", default=None,
                       help="several stages of one size side by side, e.g. 0,1,2,3 (instead of --model_mode)")
    which.add_argument("--models", nargs="+", default=None, metavar="FLAGS",
                       help='several models, each a quoted string of model flags, e.g. "--model_mode 1" '
                            '"--load 1 --hf_path MiniMind2 --label released"')
    which.add_argument("--max_questions", type=int, default=0, help="evaluate only the first N items (0 = all)")

    scoring = p.add_argument_group("scoring")
    scoring.add_argument("--max_seq_len", type=int, default=512, help="window of bpb; longest mc prompt (cut at its start)")
    scoring.add_argument("--batch_tokens", type=int, default=8192, help="padded tokens per forward pass")
    scoring.add_argument("--num_fewshot", type=int, default=0, help="mc on C-Eval/CMMLU: solved examples from dev/")
    scoring.add_argument("--add_bos", type=int, default=1, choices=[0, 1],
                         help="mc: start the prompt with <|im_start|> as MiniMind's training lines do "
                              "(0 = as lm-evaluation-harness scores, for identical numbers)")
    scoring.add_argument("--chat_template", type=int, default=0, choices=[0, 1],
                         help="mc: the question as a user turn and the choice as the reply")
    scoring.add_argument("--target_delimiter", default="",
                         help="mc jsonl: text put between question and choice (lm-evaluation-harness puts ' '; "
                              "the demo set's English choices carry their own space)")
    scoring.add_argument("--max_new_tokens", type=int, default=256, help="gen, judge: answer length limit")
    scoring.add_argument("--gen_batch_size", type=int, default=32, help="gen, judge: answers decoded together")

    judging = p.add_argument_group("judge")
    judging.add_argument("--judge_base_url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8998/v1")
    judging.add_argument("--judge_model", default=None, help="model name the endpoint expects")
    judging.add_argument("--judge_api_key_env", default="OPENAI_API_KEY", help="environment variable holding the key")
    judging.add_argument("--judge_criteria", default=DEFAULT_CRITERIA, help="what the judge scores")
    judging.add_argument("--judge_max_tokens", type=int, default=64, help="length of the judge's reply")

    output = p.add_argument_group("output")
    output.add_argument("--out", default=None, help="write the results as JSON")
    output.add_argument("--plot", default=None, help="write a PNG comparing the models")
    output.add_argument("--progress", type=int, default=1, choices=[0, 1], help="progress bars on stderr")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        parser.error(f"--task {args.task}: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if args.data_path is not None and len(args.data_path) != len(args.tasks):
        parser.error(f"--data_path: {len(args.data_path)} path(s) for {len(args.tasks)} task(s); give one per task")
    args.data_paths = args.data_path or [default_data_path(t) for t in args.tasks]
    for task, path in zip(args.tasks, args.data_paths):
        if not os.path.exists(path):
            hint = " (write the demo sets with: python scripts/make_demo_data.py)" if args.data_path is None else ""
            parser.error(f"--data_path {path}: no such file or folder (task {task}){hint}")
        missing = [f"--{name}" for name in TASKS[task].needs if not getattr(args, name)]
        if missing:
            parser.error(f"--task {task} needs {' and '.join(missing)}")
    if args.max_seq_len < 2 or args.batch_tokens < 1 or args.num_fewshot < 0 or args.max_new_tokens < 1:
        parser.error("need --max_seq_len >= 2, --batch_tokens >= 1, --num_fewshot >= 0, --max_new_tokens >= 1")
    args.model_specs = model_specs(parser, args)
    return args


def spec_parser(defaults: argparse.Namespace) -> argparse.ArgumentParser:
    """The model flags again, defaulting to the values given outside --models."""
    p = ArgumentParser(prog="--models")
    add_model_args(p)
    p.add_argument("--label", default=None, help="the model's name in the table")
    model_flags = vars(add_model_args(argparse.ArgumentParser()).parse_args([]))
    p.set_defaults(**{name: getattr(defaults, name) for name in model_flags})
    return p


def model_specs(parser, args) -> list[argparse.Namespace]:
    """One namespace of model flags per model to evaluate, each with a unique label."""
    if args.models and args.model_modes:
        parser.error("give --models or --model_modes, not both")
    if args.model_modes:
        try:
            modes = [int(m) for m in args.model_modes.split(",")]
        except ValueError:
            parser.error(f"--model_modes {args.model_modes}: expected numbers like 0,1,2,3")
        strings = [f"--model_mode {m}" for m in modes]
    else:
        strings = args.models or [""]
    specs = [spec_parser(args).parse_args(shlex.split(s)) for s in strings]
    for spec in specs:
        if spec.load == 0:
            check_size_flags(parser, spec)
        spec.label = spec.label or default_label(spec)
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        parser.error(f"two models have the same label ({labels}); name them with --label inside --models")
    return specs


def default_label(spec) -> str:
    if spec.load == 1:
        return os.path.basename(os.path.normpath(spec.hf_path or "hf"))
    name = STAGE_OF_MODEL_MODE[spec.model_mode]
    return name + (f"+{lora_name_of(spec)}" if lora_name_of(spec) else "")


def evaluate(args) -> dict:
    """{task: {"data_path", "models": {label: results}}}, loading each model once for all tasks."""
    results = {task: {"data_path": path, "models": {}} for task, path in zip(args.tasks, args.data_paths)}
    for spec in args.model_specs:
        model, tokenizer = load_model(spec)
        subject = Subject(spec.label, chat=not (spec.load == 0 and spec.model_mode == 0))
        for task, path in zip(args.tasks, args.data_paths):
            results[task]["models"][spec.label] = TASKS[task].run(model, tokenizer, path, args, subject)
        del model
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = evaluate(args)
    except (ModelLoadError, EvalDataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for task in results:
        print(report.task_table(task, TASKS[task], results[task]) + "\n")
    if len(results) > 1:
        print(report.summary_table(TASKS, results))
    settings = {k: v for k, v in vars(args).items() if k not in ("model_specs", "data_path", "task")}
    settings["models"] = [vars(spec) for spec in args.model_specs]
    if args.out:
        report.write_json(args.out, results, settings)
        print(f"wrote {args.out}")
    if args.plot:
        report.plot(args.plot, TASKS, results)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
