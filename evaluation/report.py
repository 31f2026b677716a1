"""What an evaluation run shows: a table per task (models side by side), per-subject accuracy,
a few examples, the JSON file and the chart.

    results = {"mc": {"data_path": ..., "models": {"pretrain": {...}, "full_sft": {...}}}, ...}
"""
import json
import math
import os


def cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def task_table(task_name: str, task, outcome: dict) -> str:
    models = outcome["models"]
    rows = [[label] + [result.get(column) for column in task.columns] for label, result in models.items()]
    parts = [f"{task_name} on {outcome['data_path']}", markdown_table(["model", *task.columns], rows)]
    subjects = sorted({s for result in models.values() for s in result.get("subjects", {})})
    if subjects:
        subject_rows = [[s] + [result.get("subjects", {}).get(s, {}).get("accuracy") for result in models.values()]
                        for s in subjects]
        parts.append(markdown_table(["subject (accuracy)", *models], subject_rows))
    for label, result in models.items():
        notes = {k: v for k, v in result.items() if k in ("truncated", "fewer_shots_than_asked") and v}
        notes.update(result.get("skipped") or {})
        if notes:
            parts.append(f"{label}: " + ", ".join(f"{k}: {v}" for k, v in notes.items()))
        for example in result.get("examples", []):
            parts.append(f"{label} example: {json.dumps(example, ensure_ascii=False)}")
        for example in result.get("unparsed_examples", []):
            parts.append(f"{label} judge reply without a score: {json.dumps(example, ensure_ascii=False)}")
    return "\n".join(parts)


def summary_table(tasks: dict, results: dict) -> str:
    """One row per model, one column per task's headline number (the quickstart's table)."""
    labels = list(next(iter(results.values()))["models"])
    header = ["model"] + [name if name == tasks[name].headline else f"{name} {tasks[name].headline}" for name in results]
    rows = [[label] + [results[name]["models"][label].get(tasks[name].headline) for name in results]
            for label in labels]
    return markdown_table(header, rows)


def write_json(path: str, results: dict, settings: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    document = {"tasks": [{"task": name, **outcome} for name, outcome in results.items()], "settings": settings}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(document, f, ensure_ascii=False, indent=2, allow_nan=True)
    os.replace(tmp, path)


def plot(path: str, tasks: dict, results: dict) -> None:
    """One panel per task, one bar per model (its headline number); chance level where known."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, (name, outcome) in zip(axes[0], results.items()):
        task = tasks[name]
        labels = list(outcome["models"])
        values = [outcome["models"][label].get(task.headline) for label in labels]
        values = [v if isinstance(v, (int, float)) else float("nan") for v in values]
        bars = ax.bar(range(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
        ax.bar_label(bars, labels=[cell(v) if not math.isnan(v) else "-" for v in values], fontsize=7)
        chances = [outcome["models"][label].get("chance") for label in labels]
        if chances and chances[0] is not None:
            ax.axhline(chances[0], color="grey", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        better = "lower is better" if task.lower_is_better else "higher is better"
        ax.set_title(f"{name}: {task.headline} ({better})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
