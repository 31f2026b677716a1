"""Plot the loss and learning-rate curves of one or several training runs into a PNG.

Every trainer writes one JSON object per optimizer step to {out_dir}/{stage}_{hidden}{_moe}_metrics.jsonl
(step, epoch, loss, lr, tokens_per_s, ...). This script needs no wandb and no display:

    python scripts/plot_metrics.py out/pretrain_512_metrics.jsonl out/full_sft_512_metrics.jsonl
    python scripts/plot_metrics.py out                      # every *_metrics.jsonl in the folder
    python scripts/plot_metrics.py out --out curves.png --smooth 20
"""
import argparse
import glob
import json
import math
import os
import sys

if __package__ in (None, ""):  # run as a file: import from the repository root, not from scripts/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from model.checkpoint import SCRIPT_OF_STAGE  # noqa: E402

STAGE_ORDER = list(SCRIPT_OF_STAGE)  # pretrain, full_sft, rlhf, reason, full_dist: the order a model goes through


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Plot loss and lr curves from *_metrics.jsonl files")
    p.add_argument("paths", nargs="+", help="metrics files, or folders holding *_metrics.jsonl files")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: next to the first file, <run>_metrics.png, or metrics.png for several)")
    p.add_argument("--smooth", type=int, default=0,
                   help="also draw a moving average of the loss over this many steps (0 = off)")
    return p.parse_args(argv)


def metrics_files(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "*_metrics.jsonl")))
            if not found:
                raise SystemExit(f"{path}: no *_metrics.jsonl files in this folder")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise SystemExit(f"{path}: no such file or folder")
    return files


def read_metrics(path: str) -> list[dict]:
    """One record per step; a step written twice (a run resumed from before it) keeps its last record."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                by_step[int(record["step"])] = record
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise SystemExit(f"{path}:{line_number}: not a metrics record ({error})")
    if not by_step:
        raise SystemExit(f"{path}: no metrics records")
    return [by_step[step] for step in sorted(by_step)]


def run_label(path: str) -> str:
    name = os.path.basename(path)
    return name[:-len("_metrics.jsonl")] if name.endswith("_metrics.jsonl") else name


def in_stage_order(files: list[str]) -> list[str]:
    """Runs of known stages in training order (pretrain first), then the others (LoRA adapters, ...)
    in the order given; the legend lists them so."""
    def stage_rank(path: str) -> int:
        label = run_label(path)
        return next((i for i, stage in enumerate(STAGE_ORDER) if label.startswith(stage + "_")), len(STAGE_ORDER))
    return sorted(files, key=stage_rank)  # stable: ties keep their order


def run_labels(files: list[str]) -> list[str]:
    """Run names from the file names; runs of the same name in different folders get the folder too."""
    labels = [run_label(path) for path in files]
    return [f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{label}" if labels.count(label) > 1
            else label for path, label in zip(files, labels)]


def moving_average(values: list[float], window: int) -> list[float]:
    out, total, queue = [], 0.0, []
    for v in values:
        queue.append(v)
        total += v
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


def plot(runs: dict[str, list[dict]], out_path: str, smooth: int = 0) -> None:
    fig = make_figure(runs, smooth)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def make_figure(runs: dict[str, list[dict]], smooth: int = 0):
    """Loss (top) and learning rate of every run, one colour per run, then the held-out bits per
    byte of the runs that measured it (--eval_interval) and the mean reward per step of the RL
    stages' runs (records with a reward), each panel only when some run has it."""
    evaluated = {label: [r for r in records if "eval_bpb" in r] for label, records in runs.items()}
    evaluated = {label: records for label, records in evaluated.items() if records}
    rl_runs = {label: records for label, records in runs.items() if any("reward" in r for r in records)}
    panels = 2 + bool(evaluated) + bool(rl_runs)
    fig, axes = plt.subplots(panels, 1, figsize=(11, 3.5 * panels), sharex=False)
    loss_ax, lr_ax = axes[0], axes[1]
    bpb_ax = axes[2] if evaluated else None
    colours = {}
    for label, records in runs.items():
        finite = [r for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        steps, losses = [r["step"] for r in finite], [r["loss"] for r in finite]
        line, = loss_ax.plot(steps, losses, alpha=0.35 if smooth else 1.0, linewidth=1, label=label)
        colours[label] = line.get_color()
        if smooth > 1:
            loss_ax.plot(steps, moving_average(losses, smooth), color=line.get_color(), linewidth=2,
                         label=f"{label} (mean of {smooth})")
        lr_ax.plot([r["step"] for r in records], [r["lr"] for r in records], label=label)
        if label in evaluated:
            bpb_ax.plot([r["step"] for r in evaluated[label]], [r["eval_bpb"] for r in evaluated[label]], marker="o",
                        markersize=3, color=line.get_color(), label=label)
    loss_ax.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    if all(v > 0 for line in loss_ax.get_lines() for v in line.get_ydata()):
        loss_ax.set_yscale("log")  # stages' losses differ by orders of magnitude (pretrain ~8, DPO ~0.7)
    lr_ax.set(title="learning rate", xlabel="optimizer step", ylabel="lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if evaluated:
        bpb_ax.set(title="held-out bits per byte (--eval_data)", xlabel="optimizer step", ylabel="bits per byte")
    if rl_runs:
        plot_rewards(axes[-1], rl_runs, colours, smooth)
    for ax in axes:
        ax.grid(alpha=0.3)
        # beside the plot, not on it: the curves' right ends are what a reader looks at
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_rewards(ax, runs: dict[str, list[dict]], colours: dict, smooth: int = 0) -> None:
    for label, records in runs.items():
        steps, rewards = zip(*[(r["step"], r["reward"]) for r in records if "reward" in r])
        ax.plot(steps, rewards, alpha=0.35 if smooth else 1.0, linewidth=1, label=label, color=colours[label])
        if smooth > 1:
            ax.plot(steps, moving_average(list(rewards), smooth), color=colours[label], linewidth=2,
                    label=f"{label} (mean of {smooth})")
    ax.set(title="mean reward of the rollouts (RL stages)", xlabel="optimizer step", ylabel="reward")


def default_out_path(files: list[str]) -> str:
    if len(files) == 1:
        return os.path.splitext(files[0])[0] + ".png"
    return os.path.join(os.path.dirname(files[0]), "metrics.png")


def main(argv=None):
    args = parse_args(argv)
    files = in_stage_order(metrics_files(args.paths))
    runs = {label: read_metrics(path) for label, path in zip(run_labels(files), files)}
    out_path = args.out or default_out_path(files)
    plot(runs, out_path, args.smooth)
    print(f"wrote {out_path} ({len(runs)} run(s): {', '.join(runs)})")
    return out_path


if __name__ == "__main__":
    sys.exit(main() and 0)
