"""The Benchmark tab: read GenEval results folders (official `results.jsonl` rows), per-task accuracy, failures."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from diffalign.demo.validation import DemoInputError

RESULTS_FILE = "results.jsonl"
TASK_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class Run:
    name: str
    folder: str
    rows: list[dict]

    def accuracy(self) -> dict[str, float]:
        """Per-task accuracy and overall = the mean of the task means (GenEval's summary rule)."""
        by_tag: dict[str, list[bool]] = {}
        for r in self.rows:
            by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
        acc = {t: sum(v) / len(v) for t, v in by_tag.items()}
        out = {t: acc[t] for t in _ordered(acc)}
        out["overall"] = sum(acc.values()) / len(acc)
        return out

    def failures(self) -> list[dict]:
        return [r for r in self.rows if not r["correct"]]


def _ordered(tags) -> list[str]:
    known = [t for t in TASK_ORDER if t in tags]
    return known + sorted(t for t in tags if t not in TASK_ORDER)


def load_run(folder: str) -> Run:
    folder = os.path.expanduser(folder.strip())
    if not folder:
        raise DemoInputError("the results folder is empty; give the folder `diffalign geneval evaluate` wrote")
    path = os.path.join(folder, RESULTS_FILE) if os.path.isdir(folder) else folder
    if not os.path.isfile(path):
        raise DemoInputError(
            f"no {RESULTS_FILE} at {folder!r}; point at a GenEval results folder (run `diffalign geneval` first)"
        )
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DemoInputError(f"{path}:{lineno} is not valid JSON ({e})") from None
            missing = [k for k in ("tag", "correct") if k not in row]
            if missing:
                raise DemoInputError(f"{path}:{lineno} lacks {missing}; expected GenEval results rows")
            rows.append(row)
    if not rows:
        raise DemoInputError(f"{path} holds no results")
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(base.rstrip(os.sep)) or base
    return Run(name=name, folder=base, rows=rows)


def load_runs(text: str) -> list[Run]:
    folders = [line.strip() for line in (text or "").replace(",", "\n").splitlines() if line.strip()]
    if not folders:
        raise DemoInputError("no results folder given; enter one folder per line")
    runs = [load_run(f) for f in folders]
    seen: dict[str, int] = {}
    for run in runs:  # two folders called "results" must stay apart in the plot
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"
    return runs


def table(runs: list[Run]) -> tuple[list[str], list[list]]:
    tags = _ordered({t for r in runs for t in r.accuracy() if t != "overall"})
    headers = ["run", *tags, "overall", "images"]
    rows = []
    for run in runs:
        acc = run.accuracy()
        rows.append([run.name, *[round(acc[t], 4) if t in acc else None for t in tags], round(acc["overall"], 4), len(run.rows)])
    return headers, rows


def bar_figure(runs: list[Run]):
    """Grouped bars: tasks on x, one bar per run, the same y range for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = _ordered({t for r in runs for t in r.accuracy() if t != "overall"}) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tags)), 3.6))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        acc = run.accuracy()
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(tags))]
        ax.bar(xs, [acc.get(t, 0.0) for t in tags], width, label=run.name)
    ax.set_xticks(range(len(tags)))
    ax.set_xticklabels(tags, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def failure_path(run: Run, row: dict) -> str | None:
    name = row.get("filename")
    if not name:
        return None
    path = name if os.path.isabs(name) else os.path.join(run.folder, name)
    return path if os.path.isfile(path) else None


def failure_caption(row: dict) -> str:
    reason = row.get("reason") or "(no reason recorded)"
    return f"[{row['tag']}] {row.get('prompt', '?')} -- {reason}"
