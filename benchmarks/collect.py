"""Render every JSON result in a folder as one markdown summary (tables where rows are uniform dicts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _render(name: str, data) -> str:
    out = [f"## {name}"]
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        out.append(_table(data))
    elif isinstance(data, dict):
        scalars = {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
        if scalars:
            out.append(_table([scalars]))
        for key, value in data.items():
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                out += [f"### {key}", _table(value)]
            elif isinstance(value, (list, dict)):
                out += [f"### {key}", "```json", json.dumps(value, indent=1)[:4000], "```"]
    else:
        out += ["```json", json.dumps(data, indent=1)[:4000], "```"]
    return "\n\n".join(out)


def main(folder: str) -> None:
    root = Path(folder)
    sections = ["# GPU suite summary"]
    steps = root / "steps.txt"
    if steps.exists():
        rows = [dict(zip(("step", "exit code", "seconds"), line.split())) for line in steps.read_text().splitlines() if line]
        sections.append(_table(rows))
    for path in sorted(p for p in root.glob("*.json") if p.is_file()):
        try:
            sections.append(_render(path.stem, json.loads(path.read_text())))
        except json.JSONDecodeError as exc:
            sections.append(f"## {path.stem}\n\nunreadable JSON: {exc}")
    print("\n\n".join(sections))


if __name__ == "__main__":
    main(sys.argv[1])
