"""The training loop every stage shares: `train()`, read it top to bottom.

A stage script builds its model, dataset and loss, then calls

    train(args, runtime, model, dataset, collate_fn, loss_fn)

and gets one optimizer step after another: the learning rate of the step, forward and backward
over its micro-batches (gradient accumulation), the loss agreed across ranks, clipping and the
update (skipped when the loss or the gradients are not finite), a metrics record, and a save
every --save_interval steps. Ctrl-C or SIGTERM end the run after the current step with the
resume state saved (exit code 130).
"""
import contextlib
import math
import os
import signal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.accelerator import TORCH_DTYPES, make_optimizer
from trainer.checkpoints import (RunFiles, TrainingDiverged, TrainState, load_resume_state, run_files,
                                 save_checkpoint, write_run_info)
from trainer.data_order import count_steps_per_epoch, make_loader
from trainer.evaluating import HeldOutEvaluation
from trainer.loss_weighting import StepLossWeighting, step_loss_weighting
from trainer.processes import Interrupted, Runtime, StopRequest, log, seed_everything, wrap_deepspeed, wrap_model
from trainer.reporting import Reporter, describe_parameters
from trainer.stage import load_tokenizer

MAX_BAD_STEPS_IN_A_ROW = 5  # non-finite steps tolerated in a row before the run is stopped


def train(args, runtime: Runtime, model: torch.nn.Module, dataset, collate_fn, loss_fn,
          files: RunFiles | None = None) -> torch.nn.Module:
    """Train `model` on `dataset` by minimising `loss_fn(model, batch) -> (loss, extras)`."""
    files = files or run_files(args)
    samples_per_step = args.batch_size * args.accumulation_steps * runtime.world_size
    if hasattr(dataset, "window_report"):  # chat data: samples skipped (nothing to train) and cut
        log(f"{args.data_path}: {dataset.window_report('--max_seq_len')}")
    steps_per_epoch = count_steps_per_epoch(len(dataset), samples_per_step, args.data_path)
    total_steps = steps_per_epoch * args.epochs  # the learning-rate schedule spans all epochs
    last_step = min(args.max_steps, total_steps) if args.max_steps else total_steps

    state = prepare_training(model, args, runtime)
    if args.resume:
        load_resume_state(state, files, runtime, samples_per_step)
    write_run_info(files, args, runtime)
    reporter = Reporter(args, runtime, files, state, steps_per_epoch, last_step)
    evaluation = HeldOutEvaluation(args, load_tokenizer(), runtime) if args.eval_interval else None
    log(f"{files.name}: {describe_parameters(model)}; {len(dataset)} samples, {steps_per_epoch} steps per epoch "
        f"of {samples_per_step} samples, {args.epochs} epoch(s), {runtime.world_size} process(es), "
        f"device {runtime.device}, {args.dtype}, loss weighted by {state.weighting.mode}{reporter.mfu_reference()}")
    bad_steps_in_a_row = 0
    with StopRequest() as stop, contextlib.closing(reporter):  # Ctrl-C / SIGTERM: stop after a step, saved
        while state.epoch < args.epochs and state.step < last_step:
            loader = make_loader(dataset, collate_fn, args, runtime, state.epoch, state.samples_in_epoch)
            reporter.start_epoch()
            for micro_batches in optimizer_steps(loader, args.accumulation_steps):
                lr = learning_rate_at(state.step, total_steps, args.learning_rate, args.warmup_iters)
                totals = accumulate_gradients(state, micro_batches, loss_fn, lr, args, runtime, stop)
                grad_norm, skipped = optimizer_step(state, totals, args, runtime)
                state.step += 1
                state.samples_in_epoch += samples_per_step
                bad_steps_in_a_row = bad_steps_in_a_row + 1 if skipped else 0
                held_out = evaluation.maybe_run(state.model, state.step, last_step,
                                                forward_autocast(args, runtime)) if evaluation else {}
                reporter.step(totals, lr, grad_norm, skipped, bad_steps_in_a_row, MAX_BAD_STEPS_IN_A_ROW, held_out)
                stop_or_save(state, files, args, runtime, samples_per_step, skipped, bad_steps_in_a_row,
                             stop_requested=totals["stop"])  # a rank got Ctrl-C / SIGTERM: all stop here, saved
                if state.step >= last_step:
                    break
            else:  # the epoch ran to its end
                state.epoch += 1
                state.samples_in_epoch = 0
        save_checkpoint(state, files, runtime, samples_per_step)
    log(f"{files.name}: done after {state.step} steps; weights in {files.weights}")
    return state.model


def stop_or_save(state: TrainState, files: RunFiles, args, runtime: Runtime, samples_per_step: int, skipped: bool,
                 bad_steps_in_a_row: int, stop_requested: bool) -> None:
    """After an optimizer step: end the run when it diverged (nothing saved: the weights are the
    last good ones) or when a rank was asked to stop (saved first), else save every --save_interval."""
    if bad_steps_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
        raise TrainingDiverged(diverged_message(state, bad_steps_in_a_row, files, args))
    if stop_requested:
        save_checkpoint(state, files, runtime, samples_per_step)
        raise Interrupted(state.step)
    if not skipped and state.step % args.save_interval == 0:
        save_checkpoint(state, files, runtime, samples_per_step)


# ----------------------------------------------------------------------------------------------
# The pieces of one optimizer step
# ----------------------------------------------------------------------------------------------

def prepare_training(model: torch.nn.Module, args, runtime: Runtime) -> TrainState:
    """The model on its device in train mode, its optimizer, and the wrapper the forward pass
    goes through (torch.compile, DDP or DeepSpeed)."""
    model = model.to(runtime.device).train()
    seed_everything(args.seed + runtime.rank)  # dropout differs per rank; the init was shared
    params = [p for p in model.parameters() if p.requires_grad]
    # fp16 gradients underflow without loss scaling; DeepSpeed scales by itself
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=args.dtype == "float16" and not runtime.use_deepspeed)
    weighting = step_loss_weighting(args, runtime)
    if runtime.use_deepspeed:
        engine, optimizer, zero_stage = wrap_deepspeed(model, params, args)
        return TrainState(model, optimizer, scaler, weighting, engine, zero_stage)
    optimizer = make_optimizer(params, args.learning_rate, runtime.device)
    return TrainState(model, optimizer, scaler, weighting, wrap_model(model, args, runtime))


def optimizer_steps(loader, accumulation_steps: int):
    """The loader's micro-batches, grouped by the optimizer step they belong to."""
    micro_batches = []
    for batch in loader:
        micro_batches.append(batch)
        if len(micro_batches) == accumulation_steps:
            yield micro_batches
            micro_batches = []


def learning_rate_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0) -> float:
    """MiniMind2's curve, lr/10 + lr/2·(1 + cos(π·step/total)): a half cosine from 1.1·lr at
    step 0 down to lr/10 at the last step, so MiniMind2's recipes (its --learning_rate values)
    give the same run here. With warm-up, the first warmup_steps steps ramp linearly up to the
    curve (step s gets (s+1)/warmup_steps of it); after them the curve is unchanged."""
    progress = min(step / max(total_steps, 1), 1.0)
    lr = peak_lr / 10 + 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))
    if step < warmup_steps:
        lr *= (step + 1) / warmup_steps
    return lr


def forward_autocast(args, runtime: Runtime):
    """The autocast of the trained model's forward passes (DeepSpeed casts the model itself)."""
    return autocast_context(runtime.device, "float32" if runtime.use_deepspeed else args.dtype)


def autocast_context(device: torch.device, dtype: str):
    """Mixed precision for the forward pass; fp32 runs without autocast."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])


def accumulate_gradients(state: TrainState, micro_batches: list, loss_fn, lr: float, args, runtime: Runtime,
                         stop: StopRequest) -> dict:
    """Forward and backward over one step's micro-batches; returns the step's loss (weighted as
    --loss_weighting says) and mean extras over all ranks, its token counts, and whether any
    rank was asked to stop."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    stats = StepStats(state.weighting)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(runtime.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["optimizer_step"] = state.step + 1  # RL seeds the rollouts of this step with it
        is_last = i == len(micro_batches) - 1
        # DDP: all-reduce gradients only once per optimizer step, on its last micro-batch
        no_sync = isinstance(state.engine, DistributedDataParallel) and not is_last
        with state.engine.no_sync() if no_sync else contextlib.nullcontext():
            with forward_autocast(args, runtime):
                loss, extras = loss_fn(state.engine, batch)
            if state.step + 1 in args.debug_nan_steps:
                loss = loss * float("nan")  # test hook: a NaN that reaches the gradients too
            if state.step + 1 == args.debug_interrupt_at_step and is_last and runtime.rank == runtime.world_size - 1:
                os.kill(os.getpid(), signal.SIGINT)  # test hook: Ctrl-C on the last rank only, mid-step
            if runtime.use_deepspeed:
                state.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
                state.engine.step()          # ...and only updates on the accumulation boundary
            else:
                state.scaler.scale(state.weighting.micro_batch_loss(loss, batch["num_loss_terms"])).backward()
        stats.add(loss.detach().float(), batch, extras)
    return stats.reduce(runtime, stop_requested=stop.requested)


def optimizer_step(state: TrainState, totals: dict, args, runtime: Runtime) -> tuple[float, bool]:
    """Unscale, clip and step; a non-finite loss or gradient norm skips the update.
    Returns (gradient norm, skipped).

    With fp16 the GradScaler skips overflowing steps by itself (and lowers its scale); that
    is routine, so only a non-finite *loss* counts as a bad step there."""
    loss_ok = math.isfinite(totals["loss"])
    if runtime.use_deepspeed:
        grad_norm = state.engine.get_global_grad_norm()  # DeepSpeed already stepped (or skipped)
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        return grad_norm, not (loss_ok and math.isfinite(grad_norm))
    if not loss_ok:
        state.optimizer.zero_grad(set_to_none=True)
        return float("nan"), True
    state.scaler.unscale_(state.optimizer)
    state.weighting.rescale_gradients(state.model.parameters(), totals["loss_terms"])
    max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm))
    skipped = not math.isfinite(grad_norm)
    if state.scaler.is_enabled():
        state.scaler.step(state.optimizer)  # skips internally on inf/NaN gradients
        state.scaler.update()
        skipped = False
    elif not skipped:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


class StepStats:
    """Sums over the micro-batches of one optimizer step, reduced across ranks at its end."""

    def __init__(self, weighting: StepLossWeighting):
        self.weighting = weighting
        self.loss_sum = 0.0
        self.loss_terms = 0
        self.micro_batches = 0
        self.tokens = 0
        self.positions = 0
        self.extras = {}

    def add(self, loss: torch.Tensor, batch: dict, extras: dict):
        self.loss_sum = self.loss_sum + self.weighting.reported_part(loss, batch["num_loss_terms"])
        self.loss_terms += batch["num_loss_terms"]
        self.micro_batches += 1
        self.tokens += batch["num_tokens"]
        self.positions += batch["num_positions"]
        for key, value in extras.items():
            self.extras[key] = self.extras.get(key, 0.0) + value.detach().float()

    def reduce(self, runtime: Runtime, stop_requested: bool = False) -> dict:
        """The step's loss (as the weighting defines it), its loss terms and token counts summed
        and the extras averaged over all micro-batches of all ranks; "stop" when any rank was
        asked to stop (one all-reduce carries it all)."""
        keys = sorted(self.extras)
        values = [self.loss_sum, float(self.loss_terms), float(self.micro_batches), float(self.tokens),
                  float(self.positions), float(stop_requested)]
        values += [self.extras[k] for k in keys]
        vector = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(runtime.device) for v in values])
        if runtime.distributed:
            dist.all_reduce(vector)
        loss, loss_terms, micro, tokens, positions, stop, *extras = vector.tolist()
        totals = {"loss": self.weighting.step_loss(loss, micro, loss_terms), "loss_terms": loss_terms,
                  "tokens": tokens, "positions": positions, "stop": stop > 0}
        totals.update({k: v / micro for k, v in zip(keys, extras)})
        return totals


def diverged_message(state: TrainState, bad_steps: int, files: RunFiles, args) -> str:
    step = state.step
    last_good = (f"{state.last_good_save[0]} (step {state.last_good_save[1]}), resume state {files.resume}"
                 if state.last_good_save else "none yet (nothing was saved before the failures)")
    return (f"stopping at step {step}: the loss or gradient norm was NaN/inf for {bad_steps} steps in a row "
            f"(steps {step - bad_steps + 1}-{step}; each update was skipped, so no weights were changed or "
            f"written). Likely causes: a learning rate too high (--learning_rate {args.learning_rate}), fp16 "
            f"overflow (use --dtype bfloat16), a corrupt --from_weight file or bad data lines. "
            f"Last good checkpoint: {last_good}.")
