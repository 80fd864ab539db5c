"""GenEval summary: per-task accuracy, overall score, prompt-level accuracy; table, JSON, bar chart.

The arithmetic is the official `summary_scores.py`: image accuracy per task; the overall
score is the unweighted mean of the task means (tasks present in the results); a prompt is
correct when any of its images is (prompts are grouped by their metadata string).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from diffalign._jsonl import iter_jsonl
from diffalign.evaluation.geneval.rules import TAGS

REQUIRED = ("filename", "tag", "prompt", "correct", "reason", "metadata")


def read_results(path: str) -> list[dict]:
    """Rows of a results.jsonl, validated."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GenEval results not found: {path}; run `diffalign geneval evaluate` first.")
    rows = []
    for lineno, row in iter_jsonl(path, "{where} is not valid JSON ({error})."):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno} lacks {missing}; is this a GenEval results.jsonl?")
        if not isinstance(row["correct"], bool):
            raise ValueError(f"{path}:{lineno}: 'correct' must be true/false, got {row['correct']!r}.")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no results.")
    return rows


def count_errors(results_path: str) -> int:
    path = results_path + ".errors.jsonl"
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def summarize(rows: Sequence[Mapping], *, errors: int = 0) -> dict:
    """Scores of one run from its result rows. `errors`: images/folders that could not be evaluated."""
    if not rows:
        raise ValueError("No GenEval result rows to summarize.")
    tags_seen = [t for t in dict.fromkeys(r["tag"] for r in rows)]
    unknown = [t for t in tags_seen if t not in TAGS]
    # Known tags in the canonical order, then any custom tags in order of appearance.
    order = [t for t in TAGS if t in tags_seen] + unknown
    tasks = {}
    for tag in order:
        vals = [bool(r["correct"]) for r in rows if r["tag"] == tag]
        tasks[tag] = {"accuracy": sum(vals) / len(vals), "correct": sum(vals), "total": len(vals)}
    prompts: dict[str, bool] = {}
    for r in rows:
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or bool(r["correct"])
    return {
        "overall": sum(t["accuracy"] for t in tasks.values()) / len(tasks),
        "tasks": tasks,
        "images": len(rows),
        "correct_images": sum(bool(r["correct"]) for r in rows) / len(rows),
        "prompts": len(prompts),
        "correct_prompts": sum(prompts.values()) / len(prompts),
        "missing_tasks": [t for t in TAGS if t not in tasks],
        "errors": errors,
    }


def summarize_file(path: str, *, allow_errors: bool = False) -> dict:
    """`summarize` a results.jsonl; refuses if evaluate recorded errors, unless `allow_errors`."""
    n_errors = count_errors(path)
    if n_errors and not allow_errors:
        raise ValueError(
            f"{path} is incomplete: {n_errors} image(s)/folder(s) could not be evaluated (see {path}.errors.jsonl). "
            "Fix them and re-run evaluate, or pass --allow_errors to summarize what was evaluated (the count is reported)."
        )
    return summarize(read_results(path), errors=n_errors)


def format_table(summaries: Mapping[str, Mapping]) -> str:
    """A plain-text table, one column per run."""
    names = list(summaries)
    tags = [t for t in TAGS if any(t in s["tasks"] for s in summaries.values())]
    tags += [t for s in summaries.values() for t in s["tasks"] if t not in tags]
    width = max(18, *(len(n) for n in names))  # "0.1234 (100/100)" fits
    lines = [f"{'task':<16}" + "".join(f"{n:>{width + 2}}" for n in names)]
    lines.append("-" * len(lines[0]))

    def cell(s, tag):
        t = s["tasks"].get(tag)
        return f"{t['accuracy']:.4f} ({t['correct']}/{t['total']})" if t else "-"

    for tag in tags:
        lines.append(f"{tag:<16}" + "".join(f"{cell(summaries[n], tag):>{width + 2}}" for n in names))
    lines.append("-" * len(lines[0]))
    for key, label in (
        ("overall", "overall"),
        ("correct_images", "images correct"),
        ("correct_prompts", "prompts any"),
    ):
        lines.append(f"{label:<16}" + "".join(f"{summaries[n][key]:>{width + 2}.4f}" for n in names))
    for key, label in (("images", "# images"), ("prompts", "# prompts"), ("errors", "# errors")):
        lines.append(f"{label:<16}" + "".join(f"{summaries[n][key]:>{width + 2}d}" for n in names))
    for n in names:
        if summaries[n]["missing_tasks"]:
            lines.append(
                f"note: {n} has no results for {summaries[n]['missing_tasks']}; its overall averages the others."
            )
        if summaries[n]["errors"]:
            lines.append(
                f"note: {n} skipped {summaries[n]['errors']} image(s)/folder(s) that could not be evaluated."
            )
    return "\n".join(lines)


def plot_summaries(summaries: Mapping[str, Mapping], path: str) -> str:
    """Grouped bar chart (tasks + overall) comparing runs; PNG written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(summaries)
    tags = [t for t in TAGS if any(t in s["tasks"] for s in summaries.values())] + ["overall"]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.3 * len(tags) + 2, 4))
    for k, name in enumerate(names):
        s = summaries[name]
        vals = [s["overall"] if t == "overall" else s["tasks"].get(t, {}).get("accuracy", 0.0) for t in tags]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(tags))]
        bars = ax.bar(xs, vals, width=width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(tags)))
    ax.set_xticklabels(tags, rotation=20)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy")
    ax.set_title("GenEval")
    ax.legend(loc="upper center", ncol=max(1, len(names)), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
