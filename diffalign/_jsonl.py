"""The one JSONL line reader behind GenEval's metadata and results files and synth's prompt files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any


def iter_jsonl(path: str | os.PathLike, bad_json: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of `path`, in file order.

    A line that is not JSON raises ValueError(bad_json.format(where="path:line", error=decoder message)):
    the template is the caller's, so each file type keeps its own hint on what a line should hold.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(bad_json.format(where=f"{path}:{lineno}", error=e)) from e
            yield lineno, value
