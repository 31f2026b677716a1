"""What every training stage shares.

A stage script (train_pretrain.py, train_full_sft.py, ...) says only what is particular to it:
its dataset, its loss, the weights it starts from and what it saves. Everything else is here,
in the order a run meets it:

  command line ..... build_parser, finish_args  (common flags, repo-root defaults, demo fallback)
  processes ........ init_runtime, shutdown     (torchrun / DeepSpeed, NCCL on CUDA, gloo on CPU)
  model ............ build_model, load_tokenizer
  data order ....... StepBatchSampler           (seeded shuffle, resumable at any sample count)
  optimisation ..... learning_rate_at, autocast_context
  losses ........... masked_cross_entropy, language_model_loss
  the loop ......... Trainer                    (accumulation, clipping, non-finite guard, progress
                                                 bar, metrics file, wandb, checkpoints, resume)
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model.checkpoint import (SCRIPT_OF_STAGE, atomic_torch_save, config_from_sizes, load_weights,  # noqa: E402
                              read_state_dict, save_weights, weight_path)
from model.model_minimind import MiniMindForCausalLM  # noqa: E402

DOWNLOAD_HINT = ("get the full data with `modelscope download --dataset gongjy/minimind_dataset --local_dir dataset` "
                 "or `huggingface-cli download --repo-type dataset jingyaogong/minimind_dataset --local-dir dataset`")
MAX_BAD_STEPS_IN_A_ROW = 5  # non-finite steps tolerated in a row before the run is stopped
LENGTH_GROUP_WINDOW = 256  # samples sorted by length together with --group_by_length 1 (off by default)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser(description: str, **stage_defaults) -> argparse.ArgumentParser:
    """The flags every trainer takes (DESIGN.md); `stage_defaults` sets the stage's own defaults.

    Paths default to None and are resolved against the repository root by finish_args, so a
    script behaves the same from any working directory."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    paths = p.add_argument_group("files")
    paths.add_argument("--out_dir", default=None, help="where weights and metrics go (default: <repo>/out)")
    paths.add_argument("--checkpoint_dir", default=None, help="where resume states go (default: <repo>/checkpoints)")
    paths.add_argument("--data_path", default=None,
                       help="training jsonl (default: the stage's file under <repo>/dataset, else the demo file)")
    paths.add_argument("--from_weight", default="none",
                       help="stage whose weights to start from (pretrain, full_sft, rlhf, ...), none = random init")
    paths.add_argument("--resume", type=int, default=0, choices=[0, 1], help="1: continue from the resume state")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=1)
    opt.add_argument("--batch_size", type=int, default=32, help="samples per micro-batch per process")
    opt.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate")
    opt.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    opt.add_argument("--warmup_iters", type=int, default=0, help="optimizer steps of linear warm-up")
    opt.add_argument("--max_steps", type=int, default=0,
                     help="stop after this many optimizer steps in all, counted across resumes (0 = all epochs)")
    opt.add_argument("--seed", type=int, default=42)

    model = p.add_argument_group("model")
    model.add_argument("--hidden_size", type=int, default=512)
    model.add_argument("--num_hidden_layers", type=int, default=8)
    model.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    model.add_argument("--max_seq_len", type=int, default=512, help="samples are truncated to this many tokens")

    run = p.add_argument_group("hardware and logging")
    run.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="autocast precision (default: bfloat16 on CUDA, float32 on CPU)")
    run.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
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
    run.add_argument("--debug_nan_steps", default="",
                     help="test hook: comma-separated optimizer steps (or ranges a-b) whose loss is made NaN")
    # The deepspeed launcher passes --local_rank=N to every process; LOCAL_RANK in the env says the same.
    run.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.set_defaults(**stage_defaults)
    return p


def finish_args(args: argparse.Namespace, stage: str, data_file: str, demo_file: str) -> argparse.Namespace:
    """Fill in what depends on the machine and the repository, and reject bad values early."""
    args.stage = stage
    args.out_dir = args.out_dir or os.path.join(REPO_ROOT, "out")
    args.checkpoint_dir = args.checkpoint_dir or os.path.join(REPO_ROOT, "checkpoints")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or default_dtype(args.device)
    args.wandb_project = args.wandb_project or f"MiniMind-{stage}"
    args.data_path = resolve_data_path(args.data_path, data_file, demo_file)
    args.debug_nan_steps = parse_step_list(args.debug_nan_steps)
    for flag in ("epochs", "batch_size", "accumulation_steps", "hidden_size", "num_hidden_layers", "max_seq_len",
                 "log_interval", "save_interval"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        raise SystemExit("--dtype float16 needs a CUDA device (autocast on CPU supports bfloat16); "
                         "use --dtype bfloat16 or float32")
    if args.deepspeed and not os.path.isfile(args.deepspeed):
        raise SystemExit(f"--deepspeed {args.deepspeed}: no such config file")
    return args


def default_dtype(device: str) -> str:
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"  # bf16 autocast works on CPU but is slower than fp32 on most CPUs


def resolve_data_path(data_path: str | None, data_file: str, demo_file: str) -> str:
    """An explicit --data_path must exist; the default falls back to the bundled demo file."""
    if data_path is not None:
        if not os.path.isfile(data_path):
            raise SystemExit(f"--data_path {data_path}: no such file")
        return data_path
    default = os.path.join(REPO_ROOT, "dataset", data_file)
    if os.path.isfile(default):
        return default
    demo = os.path.join(REPO_ROOT, "dataset", "demo", demo_file)
    log(f"dataset/{data_file} not found ({DOWNLOAD_HINT}); training on the bundled demo file dataset/demo/{demo_file}")
    return demo


def parse_step_list(text: str) -> set[int]:
    """'3,7-9' -> {3, 7, 8, 9}."""
    steps = set()
    for part in filter(None, (s.strip() for s in text.split(","))):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


def run_name(stage: str, hidden_size: int, use_moe: bool) -> str:
    """`pretrain_512`, `full_sft_640_moe`: the stem of every file a run writes."""
    return f"{stage}_{hidden_size}{'_moe' if use_moe else ''}"


# ----------------------------------------------------------------------------------------------
# Processes: single, torchrun (DDP) or DeepSpeed
# ----------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    use_deepspeed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


# log() prints on rank 0 only; launchers set RANK before the script starts, init_runtime confirms it
_IS_MAIN_PROCESS = os.environ.get("RANK", "0") == "0"


def log(message: str) -> None:
    if _IS_MAIN_PROCESS:
        tqdm.write(message)


def init_runtime(args: argparse.Namespace) -> Runtime:
    """Join the process group when launched by torchrun/deepspeed, and pick this rank's device."""
    global _IS_MAIN_PROCESS
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "RANK" in os.environ
    on_cuda = args.device.startswith("cuda")
    backend = "nccl" if on_cuda else "gloo"
    if args.deepspeed:
        import deepspeed
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
            os.environ.setdefault(key, value)  # a plain `python train_x.py --deepspeed` is a world of one
        deepspeed.init_distributed(dist_backend=backend)
    elif launched:
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    device = torch.device(args.device)
    if not on_cuda and dist.is_initialized() and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one machine share its cores; oversubscribed threads slow everyone down
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    if on_cuda and dist.is_initialized():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    _IS_MAIN_PROCESS = rank == 0
    return Runtime(rank, local_rank, world_size, device, bool(args.deepspeed))


def shutdown(runtime: Runtime) -> None:
    """Leave the process group so that no rank hangs at exit (also after an error on all ranks)."""
    if runtime.distributed:
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------------------------
# Model and tokenizer
# ----------------------------------------------------------------------------------------------

def load_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))


def build_model(args, from_weight: str, hidden_size: int | None = None, num_hidden_layers: int | None = None,
                use_moe: bool | None = None) -> MiniMindForCausalLM:
    """A MiniMind of the flags' sizes (or the ones given), from random init or a stage's weights.

    Every rank builds the same random init (seeded with --seed), so one process, DDP and
    DeepSpeed all start from identical weights."""
    hidden_size = hidden_size or args.hidden_size
    num_hidden_layers = num_hidden_layers or args.num_hidden_layers
    use_moe = bool(args.use_moe if use_moe is None else use_moe)
    seed_everything(args.seed)
    model = MiniMindForCausalLM(config_from_sizes(hidden_size, num_hidden_layers, use_moe))
    if from_weight != "none":
        path = weight_path(args.out_dir, from_weight, hidden_size, use_moe)
        require_weights(path, from_weight, hidden_size, num_hidden_layers, use_moe)
        load_weights(model, path)
        log(f"loaded {from_weight} weights from {path}")
    return model


def require_weights(path: str, stage: str, hidden_size: int, num_hidden_layers: int, use_moe: bool) -> None:
    if os.path.isfile(path):
        return
    script = SCRIPT_OF_STAGE.get(stage, f"the script that trains the '{stage}' stage")
    folder = os.path.dirname(path)
    others = sorted(f for f in os.listdir(folder) if f.startswith(stage + "_") and f.endswith(".pth")) \
        if os.path.isdir(folder) else []
    raise SystemExit(
        f"--from_weight {stage}: {path} not found. It is written by "
        f"`python {script} --hidden_size {hidden_size} --num_hidden_layers {num_hidden_layers} "
        f"--use_moe {int(use_moe)}` (run that stage first, with the same --out_dir), "
        f"or pass --from_weight none to start from random weights."
        + (f" Files of that stage in {folder}: {', '.join(others)}" if others else ""))


def count_parameters(model: torch.nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total / 1e6:.3f}M parameters, {trainable / 1e6:.3f}M trainable"


# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------

class StepBatchSampler:
    """This rank's micro-batches (lists of sample indices) for one epoch.

    The epoch's order (see epoch_order) is the same on every rank. It is cut into optimizer
    steps of batch_size x accumulation_steps x world_size samples; inside a step, micro-batch j
    goes to rank j % world_size. So one process with accumulation 2 and two processes with
    accumulation 1 see the same micro-batches in every step, and a run can resume at any sample
    count, even with another number of ranks. The tail that does not fill a whole step is left
    out of this epoch (the next epoch's shuffle covers it). This takes the place of
    DistributedSampler: sharding by rank, reseeded every epoch like its set_epoch."""

    def __init__(self, num_samples: int, batch_size: int, accumulation_steps: int, rank: int, world_size: int,
                 seed: int, epoch: int, skip_samples: int = 0, lengths=None, group_size: int = 0):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.accumulation_steps = accumulation_steps
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.skip_samples = skip_samples
        self.lengths = None if lengths is None else torch.from_numpy(np.array(lengths, dtype=np.int64))
        self.group_size = group_size
        self.samples_per_step = batch_size * accumulation_steps * world_size

    @property
    def steps(self) -> int:
        """Optimizer steps left in this epoch."""
        return max(self.num_samples - self.skip_samples, 0) // self.samples_per_step

    def __len__(self) -> int:
        return self.steps * self.accumulation_steps

    def epoch_order(self) -> torch.Tensor:
        """A seeded shuffle; with lengths, also sorted by length inside consecutive windows of
        group_size samples, so the samples of one micro-batch have similar lengths and padding
        each batch to its longest sample wastes little. The windows depend on neither the batch
        size nor the world size, so a resumed run finds its place in the same order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        if self.lengths is not None and self.group_size > 1:
            for start in range(0, self.num_samples, self.group_size):
                window = order[start:start + self.group_size]
                order[start:start + self.group_size] = window[torch.argsort(self.lengths[window], stable=True)]
        return order

    def __iter__(self):
        order = self.epoch_order()[self.skip_samples:]
        for step in range(self.steps):
            for micro in range(self.accumulation_steps):
                start = step * self.samples_per_step + (micro * self.world_size + self.rank) * self.batch_size
                yield order[start:start + self.batch_size].tolist()


def sample_lengths(dataset):
    """A cheap length per sample for length grouping: the byte length of its jsonl line
    (the datasets of dataset/lm_dataset.py index their lines), or None when unknown."""
    lines = getattr(dataset, "lines", None)
    return lines.line_lengths() if hasattr(lines, "line_lengths") else None


def steps_per_epoch(num_samples: int, samples_per_step: int, data_path: str) -> int:
    steps = num_samples // samples_per_step
    if steps == 0:
        raise SystemExit(f"{data_path} has {num_samples} samples, fewer than one optimizer step takes "
                         f"(--batch_size x --accumulation_steps x processes = {samples_per_step}); "
                         f"lower --batch_size or --accumulation_steps")
    return steps


def count_real_tokens(items) -> int:
    """Non-padding tokens in a list of dataset items: (X, Y, mask) tuples or DPO dicts."""
    total = 0
    for item in items:
        if isinstance(item, dict):
            total += sum(len(v) for k, v in item.items() if k.startswith("x_"))
        else:
            total += len(item[0])
    return total


class CountingCollate:
    """Wraps a collate function and records how many real (non-padding) tokens the batch holds,
    and how many positions the model computes (padding included)."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items):
        batch = self.collate_fn(items)
        batch["num_tokens"] = count_real_tokens(items)
        batch["num_positions"] = sum(batch[k].numel() for k in ("input_ids", "x_chosen", "x_rejected") if k in batch)
        return batch


# ----------------------------------------------------------------------------------------------
# Learning rate, precision
# ----------------------------------------------------------------------------------------------

def learning_rate_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up to peak_lr, then MiniMind's cosine decay down to a floor of peak_lr / 10.

    (MiniMind2 writes lr/10 + lr/2·(1 + cos): it starts at 1.1·lr; here the cosine runs from
    exactly peak_lr to peak_lr/10 over the steps after warm-up.)"""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    floor = peak_lr / 10
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_context(device: torch.device, dtype: str):
    """Mixed precision for the forward pass; fp32 runs without autocast."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])


# ----------------------------------------------------------------------------------------------
# Losses shared by several stages
# ----------------------------------------------------------------------------------------------

def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                         token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross entropy (in fp32) averaged over the positions where loss_mask is 1.

    token_weights, when given, scales each position's term (distill-reason weighs its tags);
    the denominator stays the number of masked positions, as in MiniMind."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    mask = loss_mask.float().reshape(-1)
    weights = mask if token_weights is None else token_weights.float().reshape(-1)
    return (ce * weights).sum() / mask.sum().clamp(min=1.0)


def forward_batch(model, batch: dict):
    """Run the model on a collated batch; packed batches bring their own positions and mask."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare MiniMind inside DDP (.module), DeepSpeed (.module) or torch.compile (._orig_mod)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def language_model_loss(model, batch: dict):
    """Next-token loss on the masked targets, plus the MoE load-balancing loss when use_moe."""
    out = forward_batch(model, batch)
    loss = masked_cross_entropy(out.logits, batch["labels"], batch["loss_mask"])
    return with_aux_loss(model, loss, out)


def with_aux_loss(model, loss: torch.Tensor, out):
    """Add the MoE load-balancing loss (and report it); dense models have none."""
    if not unwrap(model).config.use_moe:
        return loss, {}
    return loss + out.aux_loss, {"aux_loss": out.aux_loss.detach()}


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Progress:
    """Where the run is; saved in the resume state."""
    step: int = 0              # optimizer steps made in all (across resumes)
    epoch: int = 0
    samples_in_epoch: int = 0  # samples of this epoch's order already consumed (all ranks together)


class Trainer:
    """Trains `model` on `dataset` with `loss_fn(model, batch) -> (loss, extras)`.

    Holds what one stage needs around its loss: the optimizer and LR schedule, mixed precision,
    gradient accumulation and clipping, DDP or DeepSpeed, the non-finite guard, the progress bar,
    log lines, the metrics file, wandb, weight saving and exact resume."""

    def __init__(self, args, runtime: Runtime, model: torch.nn.Module, dataset, collate_fn, loss_fn,
                 name: str | None = None, weights_file: str | None = None, save_fn=None):
        self.args = args
        self.runtime = runtime
        self.dataset = dataset
        self.collate_fn = CountingCollate(collate_fn)
        self.loss_fn = loss_fn
        self.name = name or run_name(args.stage, args.hidden_size, args.use_moe)
        self.weights_file = weights_file or weight_path(args.out_dir, args.stage, args.hidden_size, args.use_moe)
        self.save_fn = save_fn or save_weights
        self.metrics_file = os.path.join(args.out_dir, f"{self.name}_metrics.jsonl")
        self.resume_file = os.path.join(args.checkpoint_dir, f"{self.name}_resume.pth")
        self.samples_per_step = args.batch_size * args.accumulation_steps * runtime.world_size
        self.steps_per_epoch = steps_per_epoch(len(dataset), self.samples_per_step, args.data_path)
        self.total_steps = self.steps_per_epoch * args.epochs  # the LR schedule spans all epochs
        self.lengths = sample_lengths(dataset) if args.group_by_length else None
        self.progress = Progress()
        self.last_good_save = None
        self.bad_steps_in_a_row = 0
        self.wandb_run = None

        self.model = model.to(runtime.device)  # the bare module: saved, and its parameters optimized
        self.model.train()
        seed_everything(args.seed + runtime.rank)  # dropout differs per rank; the init was shared
        params = [p for p in self.model.parameters() if p.requires_grad]
        if runtime.use_deepspeed:
            self.engine, self.optimizer = self.wrap_deepspeed(params)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
            self.engine = self.wrap_model()
        self.scaler = torch.amp.GradScaler(runtime.device.type,
                                           enabled=args.dtype == "float16" and not runtime.use_deepspeed)
        self.autocast = autocast_context(runtime.device, "float32" if runtime.use_deepspeed else args.dtype)

    # -- wrapping ------------------------------------------------------------------------------

    def wrap_model(self):
        engine = self.model
        if self.args.compile:
            log("torch.compile: compiling the model (the first steps are slow)")
            engine = torch.compile(engine)
        if self.runtime.distributed:
            device_ids = [self.runtime.local_rank] if self.runtime.device.type == "cuda" else None
            engine = DistributedDataParallel(engine, device_ids=device_ids)
        return engine

    def wrap_deepspeed(self, params):
        """deepspeed.initialize with the config file, where the command line's batch size,
        accumulation, clipping, learning rate and dtype win over the file's values."""
        import deepspeed
        with open(self.args.deepspeed) as f:
            config = json.load(f)
        config.pop("train_batch_size", None)
        config["train_micro_batch_size_per_gpu"] = self.args.batch_size
        config["gradient_accumulation_steps"] = self.args.accumulation_steps
        config["gradient_clipping"] = self.args.grad_clip
        config.setdefault("optimizer", {"type": "AdamW", "params": {}})
        config["optimizer"].setdefault("params", {})["lr"] = self.args.learning_rate
        config["bf16"] = {"enabled": self.args.dtype == "bfloat16"}
        config["fp16"] = {**config.get("fp16", {}), "enabled": self.args.dtype == "float16"}
        config.setdefault("steps_per_print", 10 ** 9)  # our own log lines are enough
        self.zero_stage = config.get("zero_optimization", {}).get("stage", 0)
        log(f"DeepSpeed: {self.args.deepspeed}, ZeRO stage {self.zero_stage}, {self.args.dtype}, "
            f"micro-batch {self.args.batch_size} x accumulation {self.args.accumulation_steps}")
        engine, optimizer, _, _ = deepspeed.initialize(model=self.model, model_parameters=params, config=config)
        return engine, optimizer

    # -- the loop ------------------------------------------------------------------------------

    def fit(self):
        args = self.args
        if args.resume:
            self.load_resume_state()
        os.makedirs(args.out_dir, exist_ok=True)
        self.open_metrics()
        self.start_wandb()
        last_step = min(args.max_steps, self.total_steps) if args.max_steps else self.total_steps
        self.bar = tqdm(total=last_step, initial=self.progress.step, desc=self.name, unit="step",
                        disable=not self.runtime.is_main, dynamic_ncols=True, mininterval=1.0)
        log(f"{self.name}: {len(self.dataset)} samples, {self.steps_per_epoch} steps per epoch of "
            f"{self.samples_per_step} samples, {args.epochs} epoch(s), {self.runtime.world_size} process(es), "
            f"device {self.runtime.device}, {args.dtype}")
        try:
            while self.progress.epoch < args.epochs and self.progress.step < last_step:
                self.train_epoch(last_step)
            self.save_checkpoint()
        finally:
            self.bar.close()
            self.close_metrics()
            if self.wandb_run is not None:
                self.wandb_run.finish()
        log(f"{self.name}: done after {self.progress.step} steps; weights in {self.weights_file}")
        return self.model

    def train_epoch(self, last_step: int):
        args, progress = self.args, self.progress
        sampler = StepBatchSampler(len(self.dataset), args.batch_size, args.accumulation_steps, self.runtime.rank,
                                   self.runtime.world_size, args.seed, progress.epoch, progress.samples_in_epoch,
                                   lengths=self.lengths, group_size=LENGTH_GROUP_WINDOW)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=args.num_workers, pin_memory=self.runtime.device.type == "cuda")
        self.epoch_start = time.time()
        self.epoch_start_step = progress.step
        step_stats = StepStats()
        for i, batch in enumerate(loader):
            micro = i % args.accumulation_steps
            if micro == 0:
                step_stats = StepStats()
                self.set_learning_rate(learning_rate_at(progress.step, self.total_steps, args.learning_rate,
                                                        args.warmup_iters))
            self.train_micro_batch(batch, step_stats, is_last=micro == args.accumulation_steps - 1)
            if micro == args.accumulation_steps - 1:
                self.finish_step(step_stats)
                if progress.step >= last_step:
                    return
        progress.epoch += 1
        progress.samples_in_epoch = 0

    def train_micro_batch(self, batch: dict, stats: "StepStats", is_last: bool):
        batch = {k: v.to(self.runtime.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        # DDP: all-reduce gradients only once per optimizer step, on its last micro-batch
        no_sync = isinstance(self.engine, DistributedDataParallel) and not is_last
        with self.engine.no_sync() if no_sync else contextlib.nullcontext():
            with self.autocast:
                loss, extras = self.loss_fn(self.engine, batch)
            if self.progress.step + 1 in self.args.debug_nan_steps:
                loss = loss * float("nan")  # test hook: a NaN that reaches the gradients too
            if self.runtime.use_deepspeed:
                self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
                self.engine.step()          # ...and only updates on the accumulation boundary
            else:
                self.scaler.scale(loss / self.args.accumulation_steps).backward()
        stats.add(loss.detach().float(), batch["num_tokens"], batch["num_positions"], extras)

    def finish_step(self, stats: "StepStats"):
        """Agree across ranks on the step's loss, then update (or skip a non-finite step)."""
        totals = stats.reduce(self.runtime)
        loss_ok = math.isfinite(totals["loss"])
        if self.runtime.use_deepspeed:
            grad_norm = self.engine.get_global_grad_norm()  # DeepSpeed already stepped (or skipped)
            grad_norm = float(grad_norm) if grad_norm is not None else 0.0
            skipped = not (loss_ok and math.isfinite(grad_norm))
        else:
            grad_norm, skipped = self.optimizer_step(loss_ok)
        self.progress.step += 1
        self.progress.samples_in_epoch += self.samples_per_step
        self.bad_steps_in_a_row = self.bad_steps_in_a_row + 1 if skipped else 0
        self.report(totals, grad_norm, skipped)
        if self.bad_steps_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
            self.stop_diverged()
        if not skipped and self.progress.step % self.args.save_interval == 0:
            self.save_checkpoint()

    def optimizer_step(self, loss_ok: bool) -> tuple[float, bool]:
        """Unscale, clip and step; a non-finite loss or gradient norm skips the update.

        With fp16 the GradScaler skips overflowing steps by itself (and lowers its scale); that
        is routine, so only a non-finite *loss* counts as a bad step there."""
        if not loss_ok:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan"), True
        self.scaler.unscale_(self.optimizer)
        max_norm = self.args.grad_clip if self.args.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        skipped = not math.isfinite(grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips internally on inf/NaN gradients
            self.scaler.update()
            skipped = False
        elif not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def set_learning_rate(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr

    def stop_diverged(self):
        step = self.progress.step
        last_good = (f"{self.last_good_save[0]} (step {self.last_good_save[1]}), resume state {self.resume_file}"
                     if self.last_good_save else "none yet (nothing was saved before the failures)")
        message = (f"stopping at step {step}: the loss or gradient norm was NaN/inf for {self.bad_steps_in_a_row} "
                   f"steps in a row (steps {step - self.bad_steps_in_a_row + 1}-{step}; each update was skipped, "
                   f"so no weights were changed or written). Likely causes: a learning rate too high "
                   f"(--learning_rate {self.args.learning_rate}), fp16 overflow (use --dtype bfloat16), a corrupt "
                   f"--from_weight file or bad data lines. Last good checkpoint: {last_good}.")
        raise TrainingDiverged(message)

    # -- reporting -----------------------------------------------------------------------------

    def report(self, totals: dict, grad_norm: float, skipped: bool):
        now = time.time()
        elapsed = now - getattr(self, "last_step_time", self.epoch_start)
        self.last_step_time = now
        tokens_per_s = totals["tokens"] / max(elapsed, 1e-9)
        record = {"step": self.progress.step, "epoch": self.progress.epoch + 1, "loss": totals["loss"],
                  "lr": self.lr, "tokens_per_s": round(tokens_per_s, 1),
                  "padded_tokens_per_s": round(totals["positions"] / max(elapsed, 1e-9), 1),
                  "grad_norm": grad_norm, "skipped": skipped, "time": round(now, 3),
                  **{k: v for k, v in totals.items() if k not in ("loss", "tokens", "positions")}}
        if not self.runtime.is_main:
            return
        if skipped:
            log(f"warning: step {self.progress.step}: non-finite loss ({totals['loss']}) or gradient norm "
                f"({grad_norm}); update skipped ({self.bad_steps_in_a_row}/{MAX_BAD_STEPS_IN_A_ROW} in a row)")
        self.metrics.write(json.dumps(record, allow_nan=True) + "\n")
        self.metrics.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=self.progress.step)
        self.bar.set_postfix(loss=f"{totals['loss']:.4f}", lr=f"{self.lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                             refresh=False)
        self.bar.update(1)
        if self.progress.step % self.args.log_interval == 0:
            log(self.log_line(record))

    def log_line(self, record: dict) -> str:
        """MiniMind's log line, plus the stage's extra numbers."""
        done = self.progress.step - self.epoch_start_step
        minutes_left = (time.time() - self.epoch_start) / 60 / max(done, 1) * (self.steps_per_epoch - self.step_in_epoch())
        extras = "".join(f" {k}:{v:.4f}" for k, v in record.items()
                         if k not in ("step", "epoch", "loss", "lr", "tokens_per_s", "padded_tokens_per_s",
                                      "grad_norm", "skipped", "time"))
        return (f"Epoch:[{record['epoch']}/{self.args.epochs}]({self.step_in_epoch()}/{self.steps_per_epoch}) "
                f"loss:{record['loss']:.6f} lr:{record['lr']:.12f} epoch_Time:{int(minutes_left)}min:"
                f" tokens/s:{record['tokens_per_s']:.0f}{extras}")

    def step_in_epoch(self) -> int:
        return self.progress.samples_in_epoch // self.samples_per_step

    def open_metrics(self):
        """Append to the metrics file; lines past the resumed step (written after the last save
        of an interrupted run) are dropped so every step appears once."""
        if not self.runtime.is_main:
            return
        kept = []
        if self.args.resume and os.path.isfile(self.metrics_file):
            with open(self.metrics_file) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= self.progress.step]
        elif os.path.isfile(self.metrics_file):
            os.remove(self.metrics_file)  # a fresh run starts a fresh file
        self.metrics = open(self.metrics_file, "w")
        self.metrics.writelines(kept)

    def close_metrics(self):
        if self.runtime.is_main and hasattr(self, "metrics"):
            self.metrics.close()

    def start_wandb(self):
        if not (self.args.use_wandb and self.runtime.is_main):
            return
        import wandb
        run_id = getattr(self, "wandb_id", None)
        self.wandb_run = wandb.init(project=self.args.wandb_project, name=self.name, id=run_id,
                                    resume="allow" if run_id else None, dir=self.args.out_dir,
                                    config={k: v for k, v in vars(self.args).items() if k != "debug_nan_steps"})
        self.wandb_id = self.wandb_run.id

    # -- saving and resuming -------------------------------------------------------------------

    def save_checkpoint(self):
        """Weights (half precision) and the resume state, both written atomically."""
        self.save_model_weights()
        self.save_resume_state()
        if self.runtime.is_main:
            self.last_good_save = (self.weights_file, self.progress.step)

    def save_model_weights(self):
        with self.gathered_parameters():
            if self.runtime.is_main:
                assert_finite(self.model, self.weights_file)
                self.save_fn(self.model, self.weights_file)

    def gathered_parameters(self):
        """ZeRO-3 shards every parameter across ranks; gather full ones for saving (collective)."""
        if self.runtime.use_deepspeed and self.zero_stage == 3:
            import deepspeed
            return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def trainer_state(self) -> dict:
        return {"step": self.progress.step, "epoch": self.progress.epoch,
                "samples_in_epoch": self.progress.samples_in_epoch, "world_size": self.runtime.world_size,
                "samples_per_step": self.samples_per_step, "wandb_id": getattr(self, "wandb_id", None),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def save_resume_state(self):
        state = self.trainer_state()
        if self.runtime.use_deepspeed:
            # ZeRO keeps optimizer shards on every rank: DeepSpeed writes its own folder (collective)
            self.engine.save_checkpoint(self.resume_file[:-len(".pth")] + "_deepspeed", tag="state")
        else:
            state.update(model={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                         optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict())
        if self.runtime.is_main:
            atomic_torch_save(state, self.resume_file)

    def load_resume_state(self):
        if not os.path.isfile(self.resume_file):
            log(f"--resume 1: no resume state at {self.resume_file}; starting from the beginning")
            return
        state = read_state_dict(self.resume_file)
        if self.runtime.use_deepspeed:
            self.engine.load_checkpoint(self.resume_file[:-len(".pth")] + "_deepspeed", tag="state")
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(state["step"], state["epoch"], state["samples_in_epoch"])
        self.wandb_id = state.get("wandb_id")
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if state["samples_per_step"] != self.samples_per_step:
            log(f"resuming with {self.samples_per_step} samples per step instead of {state['samples_per_step']} "
                f"(world size {state['world_size']} -> {self.runtime.world_size}): the data position "
                f"{state['samples_in_epoch']} samples into epoch {state['epoch'] + 1} is kept")
        log(f"resumed {self.name} from {self.resume_file} at step {self.progress.step}, "
            f"epoch {self.progress.epoch + 1}, {self.progress.samples_in_epoch} samples into the epoch")


class StepStats:
    """Sums over the micro-batches of one optimizer step, reduced across ranks at its end."""

    def __init__(self):
        self.loss_sum = 0.0
        self.micro_batches = 0
        self.tokens = 0
        self.positions = 0
        self.extras = {}

    def add(self, loss: torch.Tensor, tokens: int, positions: int, extras: dict):
        self.loss_sum = self.loss_sum + loss
        self.micro_batches += 1
        self.tokens += tokens
        self.positions += positions
        for key, value in extras.items():
            self.extras[key] = self.extras.get(key, 0.0) + value.detach().float()

    def reduce(self, runtime: Runtime) -> dict:
        """Mean loss and extras over all micro-batches of all ranks; token counts summed."""
        keys = sorted(self.extras)
        values = [self.loss_sum, float(self.micro_batches), float(self.tokens), float(self.positions)]
        values += [self.extras[k] for k in keys]
        vector = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(runtime.device) for v in values])
        if runtime.distributed:
            dist.all_reduce(vector)
        loss, micro, tokens, positions, *extras = vector.tolist()
        totals = {"loss": loss / micro, "tokens": tokens, "positions": positions}
        totals.update({k: v / micro for k, v in zip(keys, extras)})
        return totals


def assert_finite(model: torch.nn.Module, path: str) -> None:
    """Never write NaN/inf weights."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(f"refusing to write {path}: {len(bad)} weight tensors hold NaN/inf, e.g. {bad[0]}")


def run_stage(main_fn):
    """Run a stage's main() from the command line: errors a user can fix (bad data lines, a
    diverged run) end with their message and exit code 2 instead of a traceback."""
    from dataset.lm_dataset import DataFormatError
    try:
        main_fn()
    except (TrainingDiverged, DataFormatError) as error:
        tqdm.write(f"error: {error}", file=sys.stderr)
        sys.exit(2)
