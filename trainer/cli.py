"""The command line every trainer shares (DESIGN.md's flags), in groups, with real defaults.

    parser = build_parser("MiniMind pretraining", batch_size=32, ...)   # stage defaults
    group = parser.add_argument_group("pretraining")                    # the stage's own flags
    args = finish_args(parser, stage="pretrain", data_file=..., demo_file=...)

Paths default to folders of the repository, so a script behaves the same from any working
directory. A value no run could use (a size no model has, a missing file) stops the script in
one line with exit code 2, before anything is built.
"""
import argparse
import os
import re

import torch

from model.checkpoint import REPO_ROOT, SCRIPT_OF_STAGE, weight_path
from model.command_line import ArgumentParser, check_size_flags, default_device
from model.model_minimind import WEIGHT_INITS
from trainer.evaluating import add_evaluation_args
from trainer.loss_weighting import MODES as LOSS_WEIGHTINGS
from trainer.processes import log

DOWNLOAD_HINT = ("get the full data with `hf download jingyaogong/minimind_dataset --repo-type dataset --local-dir dataset` "
                 "or `pip install -U modelscope && modelscope download gongjy/minimind_dataset --repo-type dataset "
                 "--local-dir dataset`")
LENGTH_GROUP_WINDOW = 256  # samples sorted by length together with --group_by_length 1 (off by default)


def build_parser(description: str, **stage_defaults) -> argparse.ArgumentParser:
    """The flags every trainer takes; `stage_defaults` sets the stage's own defaults."""
    p = ArgumentParser(description=description)
    files = p.add_argument_group("files")
    files.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "out"), help="where weights and metrics go")
    files.add_argument("--checkpoint_dir", default=os.path.join(REPO_ROOT, "checkpoints"),
                       help="where resume states go")
    files.add_argument("--data_path", default=None,
                       help="training jsonl (default: the stage's file under dataset/, else its bundled demo file)")
    files.add_argument("--cache_dir", default=None,
                       help="where the line index of the data is cached (default: .minimind_cache/ next to the data "
                            "file when that folder is writable, else ~/.cache/minimind/index or $XDG_CACHE_HOME)")
    files.add_argument("--from_weight", default="none",
                       help=f"stage whose weights to start from ({', '.join(SCRIPT_OF_STAGE)}), none = random init")
    files.add_argument("--save_weight", default=None,
                       help="name of the files this run writes (default: the stage: pretrain, full_sft, ...); "
                            "a later run loads them with --from_weight NAME")
    files.add_argument("--resume", type=int, default=0, choices=[0, 1], help="1: continue from the resume state")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=1, help="passes over the data")
    opt.add_argument("--batch_size", type=int, default=32, help="samples per micro-batch per process")
    opt.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate")
    opt.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--loss_weighting", default="token", choices=LOSS_WEIGHTINGS,
                     help="token: the loss of an optimizer step is the mean over all its trained tokens (all "
                          "micro-batches, all processes); micro_batch: the mean of the micro-batches' means "
                          "(MiniMind's way; always used with --deepspeed). See docs/training.md")
    opt.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    opt.add_argument("--warmup_iters", type=int, default=0, help="optimizer steps of linear warm-up")
    opt.add_argument("--max_steps", type=int, default=0,
                     help="stop after this many optimizer steps in all, counted across resumes (0 = all epochs)")
    opt.add_argument("--seed", type=int, default=42, help="seeds the init, the data order and dropout")

    model = p.add_argument_group("model")
    model.add_argument("--hidden_size", type=int, default=512, help="width (a multiple of 16)")
    model.add_argument("--num_hidden_layers", type=int, default=8, help="depth")
    model.add_argument("--use_moe", type=int, default=0, choices=[0, 1], help="1: mixture-of-experts FFN")
    model.add_argument("--max_seq_len", type=int, default=512, help="samples are truncated to this many tokens")
    model.add_argument("--weight_init", default="pytorch", choices=WEIGHT_INITS,
                       help="random init of a new model: pytorch = PyTorch's defaults, as MiniMind2 "
                            "(kaiming-uniform Linears, embedding tied to lm_head); normal = normal(0, 0.02)")

    run = p.add_argument_group("hardware and logging")
    run.add_argument("--device", default=default_device(), help="cuda, cuda:N or cpu (default: cuda if available)")
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="autocast precision (default on CUDA: bfloat16 from compute capability 8.0 (A100, RTX 30xx "
                          "and newer), else float16; float32 on CPU)")
    run.add_argument("--num_workers", type=int, default=None,
                     help="DataLoader worker processes (default: up to 4 per process on CUDA, 0 on CPU)")
    run.add_argument("--group_by_length", type=int, default=0, choices=[0, 1],
                     help=f"1: batch samples of similar length together (sorted inside shuffled windows of "
                          f"{LENGTH_GROUP_WINDOW} samples): less padding, but less varied batches, which hurt "
                          f"learning on the small templated demo sets")
    run.add_argument("--compile", type=int, default=0, choices=[0, 1], help="1: torch.compile the model")
    run.add_argument("--deepspeed", default=None, metavar="DS_CONFIG.json",
                     help="train through deepspeed.initialize with this config (ZeRO 1/2/3)")
    run.add_argument("--log_interval", type=int, default=100, help="steps between log lines")
    run.add_argument("--save_interval", type=int, default=100, help="steps between weight/resume saves")
    run.add_argument("--use_wandb", type=int, default=0, choices=[0, 1],
                     help="1: log to Weights & Biases (WANDB_MODE=offline works without a network)")
    run.add_argument("--wandb_project", default=None, help="default: MiniMind-<stage>")
    # Test hooks, hidden from --help: steps (e.g. "3,7-9") whose loss is made NaN, and a step during
    # which the process sends itself SIGINT (as Ctrl-C would)
    run.add_argument("--debug_nan_steps", default="", help=argparse.SUPPRESS)
    run.add_argument("--debug_interrupt_at_step", type=int, default=0, help=argparse.SUPPRESS)
    # The deepspeed launcher passes --local_rank=N to every process; LOCAL_RANK in the env says the same.
    run.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    add_evaluation_args(p)
    p.set_defaults(**stage_defaults)
    return p


def finish_args(parser: argparse.ArgumentParser, stage: str, data_file: str, demo_file: str,
                argv=None, args: argparse.Namespace | None = None) -> argparse.Namespace:
    """Parse (unless `args` is given), fill in what depends on the machine, and reject values no
    run could use with one line and exit code 2."""
    args = args if args is not None else parser.parse_args(argv)
    args.stage = stage
    if not args.device.startswith("cuda"):
        args.dtype = args.dtype or "float32"  # bf16 autocast works on CPU but is slower than fp32 on most CPUs
    # on CUDA, init_runtime asks the rank's own GPU (after set_device) for the default dtype
    args.wandb_project = args.wandb_project or f"MiniMind-{stage}"
    for flag in ("epochs", "batch_size", "accumulation_steps", "hidden_size", "num_hidden_layers", "max_seq_len",
                 "log_interval", "save_interval"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    check_size_flags(parser, args)
    args.save_weight = args.save_weight or stage
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.save_weight):
        parser.error(f"--save_weight {args.save_weight!r}: use letters, digits, '_', '-' or '.' (it names files)")
    if args.from_weight not in ("none", *SCRIPT_OF_STAGE) and not os.path.isfile(
            weight_path(args.out_dir, args.from_weight, args.hidden_size, args.use_moe)):
        parser.error(f"--from_weight {args.from_weight}: not a stage ({', '.join(SCRIPT_OF_STAGE)}), and no "
                     f"{weight_path(args.out_dir, args.from_weight, args.hidden_size, args.use_moe)} "
                     f"from a run with --save_weight {args.from_weight}; or use none")
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        parser.error("--dtype float16 needs a CUDA device (autocast on CPU supports bfloat16); "
                     "use --dtype bfloat16 or float32")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    if args.eval_interval < 0 or args.eval_documents < 0:
        parser.error("--eval_interval and --eval_documents must be >= 0")
    if args.eval_data and not os.path.isfile(args.eval_data):
        parser.error(f"--eval_data {args.eval_data}: no such file")
    if args.deepspeed and not os.path.isfile(args.deepspeed):
        parser.error(f"--deepspeed {args.deepspeed}: no such config file")
    try:
        args.debug_nan_steps = parse_step_list(args.debug_nan_steps)
    except ValueError:
        parser.error(f"--debug_nan_steps {args.debug_nan_steps!r}: expected steps like 3,7-9")
    args.data_path = resolve_data_path(parser, args.data_path, data_file, demo_file)
    return args


def resolve_data_path(parser, data_path: str | None, data_file: str, demo_file: str) -> str:
    """An explicit --data_path must exist; the default falls back to the bundled demo file."""
    if data_path is not None:
        if not os.path.isfile(data_path):
            parser.error(f"--data_path {data_path}: no such file")
        return data_path
    default = os.path.join(REPO_ROOT, "dataset", data_file)
    if os.path.isfile(default):
        return default
    log(f"dataset/{data_file} not found ({DOWNLOAD_HINT}); training on the bundled demo file dataset/demo/{demo_file}")
    return os.path.join(REPO_ROOT, "dataset", "demo", demo_file)


def parse_step_list(text: str) -> set[int]:
    """'3,7-9' -> {3, 7, 8, 9}."""
    steps = set()
    for part in filter(None, (s.strip() for s in text.split(","))):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps
