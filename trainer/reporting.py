"""What a run tells its user: the parameter count, the progress bar, an ETA once a step is timed,
MiniMind's log line (with MFU on a GPU), the metrics file ({out_dir}/{name}_metrics.jsonl, one
JSON line per optimizer step) and Weights & Biases.

    reporter = Reporter(args, runtime, files, state, steps_per_epoch, last_step)
    reporter.step(totals, lr, grad_norm, skipped, ...)   # after every optimizer step
    reporter.close()
"""
import json
import os
import threading
import time

from tqdm import tqdm

from trainer.mfu import device_peak_flops, flops_per_token, model_flops_utilisation
from trainer.processes import log

SLOW_FIRST_STEP_SECONDS = 10  # a first step slower than this says what it is doing
# metrics-file fields that are not stage extras (aux_loss, reward_margin, ce, kl, ...)
STANDARD_FIELDS = ("step", "epoch", "loss", "lr", "tokens_per_s", "padded_tokens_per_s", "mfu", "grad_norm",
                   "skipped", "time")
# step totals that are not stage extras either (the metrics file has its own names for them)
TOTALS_NOT_RECORDED = ("loss", "loss_terms", "tokens", "positions", "stop")


class Reporter:
    """Writes one record per optimizer step (rank 0 only) and prints a line every --log_interval."""

    def __init__(self, args, runtime, files, state, steps_per_epoch: int, last_step: int):
        self.args = args
        self.is_main = runtime.is_main
        self.files = files
        self.state = state
        self.steps_per_epoch = steps_per_epoch
        self.samples_per_step = args.batch_size * args.accumulation_steps * runtime.world_size
        self.last_step = last_step
        self.epoch_start, self.epoch_start_step = time.time(), state.step
        self.last_step_time = self.epoch_start
        self.world_size = runtime.world_size
        self.flops_per_token = flops_per_token(state.model.config, args.max_seq_len)
        self.peak_flops = device_peak_flops(runtime.device, args.dtype)  # None off CUDA: no MFU there
        self.wandb_run = None
        self.first_step_notice = threading.Timer(SLOW_FIRST_STEP_SECONDS, log, [slow_step_message(args, runtime)])
        self.first_step_notice.daemon = True
        self.first_step_notice.start()
        self.bar = tqdm(total=last_step, initial=state.step, desc=files.name, unit="step",
                        disable=not self.is_main, dynamic_ncols=True, mininterval=1.0)
        if self.is_main:
            self.metrics = open_metrics(files.metrics, resume=bool(args.resume), last_step=state.step)
            self.start_wandb()

    def start_epoch(self):
        self.epoch_start, self.epoch_start_step = time.time(), self.state.step

    def step(self, totals: dict, lr: float, grad_norm: float, skipped: bool, bad_steps_in_a_row: int,
             max_bad_steps: int, held_out: dict | None = None):
        """held_out: the step's held-out evaluation (trainer/evaluating.py), if it had one."""
        held_out = held_out or {}
        now = time.time()
        # the evaluation's time is not training time: tokens/s stays the training speed
        elapsed = max(now - self.last_step_time - held_out.get("eval_seconds", 0.0), 1e-9)
        self.last_step_time = now
        step = self.state.step
        if self.first_step_notice is not None:  # the run's first step: now an ETA can be given
            self.first_step_notice.cancel()
            self.first_step_notice = None
            log(f"step {step} took {format_duration(elapsed)}; about {format_duration(elapsed * (self.last_step - step))} "
                f"for the {self.last_step - step} steps left")
        if not self.is_main:
            return
        record = {"step": step, "epoch": self.state.epoch + 1, "loss": totals["loss"], "lr": lr,
                  "tokens_per_s": round(totals["tokens"] / elapsed, 1),
                  "padded_tokens_per_s": round(totals["positions"] / elapsed, 1),
                  "mfu": self.mfu(totals["tokens"] / elapsed), "grad_norm": grad_norm, "skipped": skipped,
                  "time": round(now, 3), **{k: v for k, v in totals.items() if k not in TOTALS_NOT_RECORDED},
                  **{k: v for k, v in held_out.items() if k != "eval_seconds"}}
        if "rollout_s" in totals:  # RL: the update's speed, without the time its rollouts took
            update_seconds = max(elapsed - totals["rollout_s"] * self.args.accumulation_steps, 1e-9)
            record["update_tokens_per_s"] = round(totals["tokens"] / update_seconds, 1)
        if skipped:
            log(f"warning: step {step}: non-finite loss ({totals['loss']}) or gradient norm "
                f"({grad_norm}); update skipped ({bad_steps_in_a_row}/{max_bad_steps} in a row)")
        self.metrics.write(json.dumps(record, allow_nan=True) + "\n")
        self.metrics.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=step)
        self.bar.set_postfix(loss=f"{totals['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}",
                             refresh=False)
        self.bar.update(1)
        if step % self.args.log_interval == 0:
            log(self.log_line(record))

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of one GPU (trainer/mfu.py), counted at --max_seq_len."""
        if self.peak_flops is None:
            return None
        per_device = tokens_per_s / self.world_size
        return round(model_flops_utilisation(self.flops_per_token, per_device, self.peak_flops[0]), 4)

    def mfu_reference(self) -> str:
        """For the start-up line: what MFU is measured against (nothing off CUDA)."""
        return f", MFU against {self.peak_flops[1]}" if self.peak_flops else ""

    def step_in_epoch(self) -> int:
        return self.state.samples_in_epoch // self.samples_per_step

    def log_line(self, record: dict) -> str:
        """MiniMind's log line, plus the stage's extra numbers."""
        done = self.state.step - self.epoch_start_step
        seconds_left = (time.time() - self.epoch_start) / max(done, 1) * (self.steps_per_epoch - self.step_in_epoch())
        extras = "".join(f" {k}:{v:.4f}" for k, v in record.items() if k not in STANDARD_FIELDS)
        mfu = f" mfu:{record['mfu']:.1%}" if record["mfu"] is not None else ""
        return (f"Epoch:[{record['epoch']}/{self.args.epochs}]({self.step_in_epoch()}/{self.steps_per_epoch}) "
                f"loss:{record['loss']:.6f} lr:{record['lr']:.12f} epoch_left:{format_duration(seconds_left)}"
                f" tokens/s:{record['tokens_per_s']:.0f}{mfu}{extras}")

    def start_wandb(self):
        if not self.args.use_wandb:
            return
        import wandb
        run_id = self.state.wandb_id
        self.wandb_run = wandb.init(project=self.args.wandb_project, name=self.files.name, id=run_id,
                                    resume="allow" if run_id else None, dir=self.args.out_dir,
                                    config={k: v for k, v in vars(self.args).items() if k != "debug_nan_steps"})
        self.state.wandb_id = self.wandb_run.id

    def close(self):
        if self.first_step_notice is not None:
            self.first_step_notice.cancel()
        self.bar.close()
        if self.is_main:
            self.metrics.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()


def open_metrics(path: str, resume: bool, last_step: int):
    """Append to the metrics file; lines past the resumed step (written after the last save
    of an interrupted run) are dropped so every step appears once. A fresh run starts a fresh file."""
    kept = []
    if resume and os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    metrics = open(path, "w")
    metrics.writelines(kept)
    return metrics


def describe_parameters(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total / 1e6:.3f}M parameters ({total:,}), {trainable / 1e6:.3f}M trainable"


def format_duration(seconds: float) -> str:
    """4.2 s, 3m20s, 2h05m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def slow_step_message(args, runtime) -> str:
    samples = args.batch_size * args.accumulation_steps * runtime.world_size
    return (f"the first step is still running after {SLOW_FIRST_STEP_SECONDS} s: each step is the forward and "
            f"backward pass of {samples} samples (--batch_size {args.batch_size} x --accumulation_steps "
            f"{args.accumulation_steps} x {runtime.world_size} process(es)) of up to {args.max_seq_len} tokens "
            f"on {runtime.device}. Smaller --batch_size, --accumulation_steps or --max_seq_len make steps shorter.")
