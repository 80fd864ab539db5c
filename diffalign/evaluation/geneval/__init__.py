"""GenEval in-process (Ghosh et al. 2023, github.com/djghosh13/geneval; MIT).

- `load_metadata()`: the 553 official prompts shipped in `data/` (credit and licence in `data/`).
- `score_detections(metadata, detections)`: the official rules as a pure function (`rules.py`).
- `colors.ColorClassifier`: zero-shot CLIP colour classification of masked crops.
- `runner.generate / runner.evaluate`, `summary.summarize`: the three stages; `diffalign geneval`.
Detector back-ends live in `diffalign.evaluation.detectors`.
"""

from __future__ import annotations

import os
from importlib import resources

from diffalign._jsonl import iter_jsonl
from diffalign.evaluation.geneval.rules import (
    COLORS,
    RELATIONS,
    TAGS,
    compute_iou,
    evaluate_clauses,
    filter_detections,
    relative_position,
    score_detections,
    validate_metadata,
)

__all__ = [
    "COLORS",
    "RELATIONS",
    "TAGS",
    "compute_iou",
    "evaluate_clauses",
    "filter_detections",
    "load_metadata",
    "load_object_names",
    "read_metadata_file",
    "relative_position",
    "score_detections",
    "validate_metadata",
]


def _data_file(name: str):
    return resources.files("diffalign.evaluation.geneval").joinpath("data", name)


def read_metadata_file(path: str | os.PathLike) -> list[dict]:
    """Read a GenEval metadata JSONL file (one prompt record a line) and validate every record."""
    rows = []
    for lineno, row in iter_jsonl(path, "{where} is not valid JSON ({error}); each line must be one prompt record."):
        try:
            validate_metadata(row)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from e
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompt records.")
    return rows


def load_metadata(path: str | os.PathLike | None = None) -> list[dict]:
    """The official 553 GenEval prompts (or those of a custom JSONL file), in file order.

    Each record: {"tag", "prompt", "include": [{"class", "count", ["color"], ["position"]}], ["exclude"]}.
    """
    if path is not None:
        return read_metadata_file(path)
    with resources.as_file(_data_file("evaluation_metadata.jsonl")) as p:
        return read_metadata_file(p)


def load_object_names() -> list[str]:
    """The 80 COCO class names in the detector's label order (GenEval's object_names.txt)."""
    text = _data_file("object_names.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
