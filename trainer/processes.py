"""Processes: one, several under torchrun (DDP), or DeepSpeed.

    with training_processes(args) as runtime:   # init_runtime ... shutdown
    runtime = init_runtime(args)          # join the process group, pick this rank's device
    log("...")                            # print on rank 0 only
    engine = wrap_model(model, args, runtime)            # torch.compile and/or DDP
    engine, optimizer, zero_stage = wrap_deepspeed(model, params, args)
    with StopRequest() as stop:           # Ctrl-C / SIGTERM: stop after the step, agreed by all ranks
    shutdown(runtime)                     # leave the process group
"""
import contextlib
import json
import os
import random
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from trainer.accelerator import compile_model, deepspeed_precision, default_dtype, enable_fast_matmul


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


def launched_by_a_launcher() -> bool:
    """torchrun and the deepspeed launcher set RANK / WORLD_SIZE for every process they start."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "RANK" in os.environ


def init_runtime(args) -> Runtime:
    """Join the process group when launched by torchrun/deepspeed, and pick this rank's device."""
    global _IS_MAIN_PROCESS
    on_cuda = args.device.startswith("cuda")
    backend = "nccl" if on_cuda else "gloo"
    if args.deepspeed:
        import deepspeed
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
            os.environ.setdefault(key, value)  # a plain `python train_x.py --deepspeed` is a world of one
        deepspeed.init_distributed(dist_backend=backend)
    elif launched_by_a_launcher():
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    device = torch.device(args.device)
    if not on_cuda and dist.is_initialized() and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one machine share its cores; oversubscribed threads slow everyone down
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes()))
    if on_cuda and dist.is_initialized():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    args.dtype = args.dtype or default_dtype(device)  # after set_device: this rank's own GPU decides
    enable_fast_matmul(device)
    _IS_MAIN_PROCESS = rank == 0
    return Runtime(rank, local_rank, world_size, device, bool(args.deepspeed))


def local_processes() -> int:
    """Training processes on this machine (they share its CPU cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def shutdown(runtime: Runtime) -> None:
    """Leave the process group so that no rank hangs at exit (also after an error on all ranks)."""
    if runtime.distributed:
        dist.destroy_process_group()


@contextlib.contextmanager
def training_processes(args):
    """`with training_processes(args) as runtime:` joins the process group and always leaves it."""
    runtime = init_runtime(args)
    try:
        yield runtime
    finally:
        shutdown(runtime)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------------------------
# Wrapping the model for training
# ----------------------------------------------------------------------------------------------

def wrap_model(model: torch.nn.Module, args, runtime: Runtime) -> torch.nn.Module:
    """torch.compile (with --compile 1), then DDP when there are several processes."""
    engine = model
    if args.compile:
        log("torch.compile: compiling the model (the first steps are slow)")
        engine = compile_model(engine)
    if runtime.distributed:
        device_ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        engine = DistributedDataParallel(engine, device_ids=device_ids)
    return engine


def deepspeed_config(args) -> dict:
    """The config file, where the command line's batch size, accumulation, clipping, learning rate
    and dtype win over the file's values (a grad_accum_dtype the file sets itself is kept)."""
    with open(args.deepspeed) as f:
        config = json.load(f)
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = args.batch_size
    config["gradient_accumulation_steps"] = args.accumulation_steps
    config["gradient_clipping"] = args.grad_clip
    config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    config["optimizer"].setdefault("params", {})["lr"] = args.learning_rate
    zero_stage = config.get("zero_optimization", {}).get("stage", 0)
    for section, values in deepspeed_precision(args.dtype, zero_stage).items():
        file_values = config.get(section, {})
        # the command line's dtype wins; an accumulation dtype the file names itself is kept
        config[section] = {**values, **file_values} if section == "data_types" else {**file_values, **values}
    config.setdefault("steps_per_print", 10 ** 9)  # our own log lines are enough
    return config


def wrap_deepspeed(model: torch.nn.Module, params: list, args):
    """(engine, optimizer, ZeRO stage) from deepspeed.initialize."""
    import deepspeed
    config = deepspeed_config(args)
    zero_stage = config.get("zero_optimization", {}).get("stage", 0)
    accumulate_in = config.get("data_types", {}).get("grad_accum_dtype", args.dtype)
    log(f"DeepSpeed: {args.deepspeed}, ZeRO stage {zero_stage}, {args.dtype}, "
        f"micro-batch {args.batch_size} x accumulation {args.accumulation_steps}, "
        f"gradients accumulated in {accumulate_in}")
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    if args.compile:  # the engine owns the forward pass, so it compiles the model (torch.compile inside)
        log("torch.compile through DeepSpeed: compiling the model (the first steps are slow)")
        engine.compile()
    return engine, optimizer, zero_stage


# ----------------------------------------------------------------------------------------------
# Stopping on Ctrl-C / SIGTERM
# ----------------------------------------------------------------------------------------------

class Interrupted(Exception):
    """The run stopped on a signal after saving its resume state at `step`."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}; continue with the same command plus --resume 1")
        self.step = step


class StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a request the loop reads between optimizer steps,
    so the run ends after a finished step with everything saved instead of dying mid-step.

    Under torchrun every process receives the signal (the terminal sends it to all, the launcher
    forwards it), and the loop agrees across ranks before stopping, so one rank's request stops
    them all at the same step. Run alone, a second Ctrl-C quits at once without saving."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested and not launched_by_a_launcher():
            raise KeyboardInterrupt  # the user insists
        if not self.requested:
            log(f"{signal.Signals(signum).name}: stopping after this step and saving"
                + ("" if launched_by_a_launcher() else " (Ctrl-C again quits without saving)"))
        self.requested = True


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader workers share the terminal's process group: let Ctrl-C reach only the main
    process, which stops the run cleanly (a worker killed mid-step would break the last step)."""
    for sig in StopRequest.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
