"""The Benchmark tab: read GenEval results folders (official `results.jsonl` rows), per-task accuracy, failures.

Reading and summarising are `diffalign.evaluation.geneval.summary`'s (the same numbers `diffalign geneval
summary` prints); this module adds the plot and the failure browser."""

from __future__ import annotations

import os
from dataclasses import dataclass

from diffalign.demo.paths import PathPolicy, image_file
from diffalign.demo.validation import DemoInputError
from diffalign.evaluation.geneval.rules import TAGS as TASK_ORDER  # GenEval's task order

RESULTS_FILE = "results.jsonl"


@dataclass
class Run:
    name: str
    folder: str
    rows: list[dict]
    errors: int = 0  # images/folders `evaluate` could not score (<results>.errors.jsonl)

    def summary(self) -> dict:
        from diffalign.evaluation.geneval.summary import summarize

        return summarize(self.rows, errors=self.errors)

    def accuracy(self) -> dict[str, float]:
        """Per-task accuracy and overall = the mean of the task means (GenEval's summary rule)."""
        summary = self.summary()
        out = {t: v["accuracy"] for t, v in summary["tasks"].items()}
        out["overall"] = summary["overall"]
        return out

    def failures(self) -> list[dict]:
        return [r for r in self.rows if not r["correct"]]


def _ordered(tags) -> list[str]:
    known = [t for t in TASK_ORDER if t in tags]
    return known + sorted(t for t in tags if t not in TASK_ORDER)


def load_run(folder: str, policy: PathPolicy) -> Run:
    """One results folder (or results file) named by a client; `policy` says which server folders it may name."""
    from diffalign.evaluation.geneval.summary import count_errors, read_results

    folder = folder.strip()
    if not folder:
        raise DemoInputError("the results folder is empty; give the folder `diffalign geneval evaluate` wrote")
    real = policy.resolve(folder)
    if os.path.isfile(real) and not real.endswith(".jsonl"):
        raise DemoInputError(f"{folder!r} is not a results folder or a .jsonl results file")
    path = real if real.endswith(".jsonl") else os.path.join(real, RESULTS_FILE)
    if not os.path.isfile(path):
        raise DemoInputError(
            f"no {RESULTS_FILE} at {folder!r}; point at a GenEval results folder (run `diffalign geneval` first)"
        )
    try:
        rows = read_results(path)
    except ValueError as e:
        raise DemoInputError(str(e)) from None
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(base.rstrip(os.sep)) or base
    return Run(name=name, folder=base, rows=rows, errors=count_errors(path))


def load_runs(text: str, policy: PathPolicy) -> list[Run]:
    folders = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not folders:
        raise DemoInputError("no results folder given; enter one folder per line")
    runs = [load_run(f, policy) for f in folders]
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
        ax.bar(xs, [acc.get(t, float("nan")) for t in tags], width, label=run.name)  # NaN: task not in this run
    ax.set_xticks(range(len(tags)))
    ax.set_xticklabels(tags, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def failure_path(run: Run, row: dict, policy: PathPolicy) -> tuple[str | None, bool]:
    """(the image of a result row, whether a named image was refused by `policy`).

    Tried in turn: `filename` as written (absolute, or relative to where evaluate ran), relative to the results
    folder, then `<NNNNN>/samples/<name>` under it (the official layout). A results file is client data, so
    only image files inside the policy's folders are ever opened."""
    name = row.get("filename")
    if not name or not isinstance(name, str):
        return None, False
    candidates = [name, os.path.join(run.folder, name)]
    parts = os.path.normpath(name).split(os.sep)
    if len(parts) >= 3:
        candidates.append(os.path.join(run.folder, *parts[-3:]))
    return image_file(policy, candidates)


def failure_caption(row: dict) -> str:
    reason = row.get("reason") or "(no reason recorded)"
    return f"[{row['tag']}] {row.get('prompt', '?')} -- {reason}"
