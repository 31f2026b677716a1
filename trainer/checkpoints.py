"""What a run writes, and how a run resumes exactly where another stopped.

    files = run_files(args)                   # weights, metrics and resume-state paths of a run
    save_checkpoint(state, files, runtime)    # weights (half precision) + resume state, atomically
    load_resume_state(state, files, runtime)  # model, optimizer, position in the data, RNG

The resume state holds the fp32 model, the optimizer, the gradient scaler, the position (step,
epoch, samples into the epoch) and the random number generators: a resumed run computes what
the uninterrupted run would have.
"""
import contextlib
import json
import os
import random
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model.checkpoint import (REPO_ROOT, atomic_torch_save, atomic_write_text, read_state_dict, run_name,
                              save_weights, weight_path)
from trainer.processes import Runtime, log


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf; the message says what to try."""


@dataclass
class RunFiles:
    name: str         # `pretrain_512`, `full_sft_640_moe`, `lora_identity_512`: the stem of every file
    weights: str      # what the stage delivers
    metrics: str      # one JSON line per optimizer step
    run_info: str     # the run's flags and data file, for eval_model.py and for the record
    resume: str       # the resume state
    save_fn: object = save_weights  # (model, path) -> None: writes `weights`


def run_files(args, name: str | None = None, weights: str | None = None, save_fn=None) -> RunFiles:
    """The files of a stage's run, named as DESIGN.md says (the LoRA stage names its own)."""
    name = name or run_name(args.save_weight, args.hidden_size, args.use_moe)
    return RunFiles(name=name,
                    weights=weights or weight_path(args.out_dir, args.save_weight, args.hidden_size, args.use_moe),
                    metrics=os.path.join(args.out_dir, f"{name}_metrics.jsonl"),
                    run_info=os.path.join(args.out_dir, f"{name}_run.json"),
                    resume=os.path.join(args.checkpoint_dir, f"{name}_resume.pth"),
                    save_fn=save_fn or save_weights)


@dataclass
class TrainState:
    """Everything a resume state restores, and what the loop moves forward."""
    model: torch.nn.Module           # the bare model: saved, and its parameters optimized
    optimizer: object
    scaler: torch.amp.GradScaler
    weighting: object                # loss_weighting.StepLossWeighting: chosen by the flags, not saved
    engine: object = None            # the DeepSpeed engine, which saves its own shards
    zero_stage: int = 0
    step: int = 0                    # optimizer steps made in all (across resumes)
    epoch: int = 0
    samples_in_epoch: int = 0        # samples of this epoch's order already consumed (all ranks together)
    wandb_id: str | None = None
    last_good_save: tuple | None = field(default=None)  # (weights file, step) of the last save


def write_run_info(files: RunFiles, args, runtime: Runtime) -> None:
    """{name}_run.json: the flags of the run and whether it trained on the bundled demo data
    (eval_model.py then asks the demo questions), written atomically by rank 0."""
    if not runtime.is_main:
        return
    demo_folder = os.path.join(REPO_ROOT, "dataset", "demo") + os.sep
    info = {"name": files.name, "weights": files.weights, "data_path": args.data_path,
            "trained_on_demo_data": os.path.abspath(args.data_path).startswith(demo_folder),
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}}
    atomic_write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", files.run_info)


def save_checkpoint(state: TrainState, files: RunFiles, runtime: Runtime, samples_per_step: int) -> None:
    """Weights (half precision) and the resume state, both written atomically."""
    with gathered_parameters(state, runtime):
        if runtime.is_main:
            assert_finite(state.model, files.weights)
            files.save_fn(state.model, files.weights)
    save_resume_state(state, files.resume, runtime, samples_per_step)
    state.last_good_save = (files.weights, state.step)


def gathered_parameters(state: TrainState, runtime: Runtime):
    """ZeRO-3 shards every parameter across ranks; gather full ones for saving (collective)."""
    if runtime.use_deepspeed and state.zero_stage == 3:
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(state.model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def assert_finite(model: torch.nn.Module, path: str) -> None:
    """Never write NaN/inf weights."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(f"refusing to write {path}: {len(bad)} weight tensors hold NaN/inf, e.g. {bad[0]}")


def deepspeed_folder(resume_file: str) -> str:
    return resume_file[:-len(".pth")] + "_deepspeed"


def save_resume_state(state: TrainState, path: str, runtime: Runtime, samples_per_step: int) -> None:
    saved = {"step": state.step, "epoch": state.epoch, "samples_in_epoch": state.samples_in_epoch,
             "world_size": runtime.world_size, "samples_per_step": samples_per_step, "wandb_id": state.wandb_id,
             "rng": gather_rng_states(runtime)}
    if runtime.use_deepspeed:
        # ZeRO keeps optimizer shards on every rank: DeepSpeed writes its own folder (collective)
        state.engine.save_checkpoint(deepspeed_folder(path), tag="state")
    else:
        saved.update(model={k: v.detach().cpu() for k, v in state.model.state_dict().items()},
                     optimizer=state.optimizer.state_dict(), scaler=state.scaler.state_dict())
    if runtime.is_main:
        atomic_torch_save(saved, path)


def load_resume_state(state: TrainState, files: RunFiles, runtime: Runtime, samples_per_step: int) -> None:
    if not os.path.isfile(files.resume):
        log(f"--resume 1: no resume state at {files.resume}; starting from the beginning")
        return
    saved = read_state_dict(files.resume)
    if runtime.use_deepspeed:
        state.engine.load_checkpoint(deepspeed_folder(files.resume), tag="state")
    else:
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scaler.load_state_dict(saved["scaler"])
    state.step, state.epoch, state.samples_in_epoch = saved["step"], saved["epoch"], saved["samples_in_epoch"]
    state.wandb_id = saved.get("wandb_id")
    restore_rng_state(saved["rng"], runtime)
    if saved["samples_per_step"] != samples_per_step:
        log(f"resuming with {samples_per_step} samples per step instead of {saved['samples_per_step']} "
            f"(world size {saved['world_size']} -> {runtime.world_size}): the data position "
            f"{saved['samples_in_epoch']} samples into epoch {saved['epoch'] + 1} is kept")
    log(f"resumed {files.name} from {files.resume} at step {state.step}, "
        f"epoch {state.epoch + 1}, {state.samples_in_epoch} samples into the epoch")


def gather_rng_states(runtime: Runtime) -> list[dict]:
    """The random number generators of every rank, in rank order (collective under DDP/DeepSpeed).
    Each rank draws its own dropout masks, so each rank's stream is saved, and of the GPU only
    this rank's device (a resume on a machine with fewer GPUs must still work)."""
    mine = {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(runtime.device) if runtime.device.type == "cuda" else None}
    if not runtime.distributed:
        return [mine]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, mine)
    return states


def restore_rng_state(states, runtime: Runtime) -> None:
    """Continue this rank's own random streams. A rank the saved run did not have keeps the
    fresh seed it started with (--seed + rank)."""
    if isinstance(states, dict):
        states = [states]  # a resume state from before per-rank streams: rank 0's only
    if runtime.rank >= len(states):
        return
    mine = states[runtime.rank]
    random.setstate(mine["python"])
    torch.set_rng_state(mine["torch"])
    if torch.is_tensor(mine.get("cuda")) and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], runtime.device)
