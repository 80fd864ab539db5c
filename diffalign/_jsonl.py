"""JSON(L) file helpers: the one JSONL line reader behind GenEval's metadata and results files and synth's
prompt files, the repair of a JSONL file cut by a kill, and atomic JSON writes."""

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


def repair_cut_tail(path: str | os.PathLike) -> str | None:
    """Make an append-only JSONL file whole again after a kill mid-write; returns what was done, or None.

    Only the last line can be cut (it has no newline). When it is not JSON it is dropped, so that its record is
    redone; when it is, the missing newline is added, so the next record does not run into it.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data or data.endswith(b"\n"):
        return None
    head, _, tail = data.rpartition(b"\n")
    try:
        json.loads(tail)
    except (json.JSONDecodeError, UnicodeDecodeError):
        with open(path, "r+b") as f:
            f.truncate(len(head) + 1 if head or data.startswith(b"\n") else 0)
        return f"dropped a cut last line ({len(tail)} bytes) of {path}; its record is redone"
    with open(path, "ab") as f:
        f.write(b"\n")
    return None


def write_json_atomic(path: str | os.PathLike, value: Any, **dump_kwargs) -> None:
    """Write JSON to a temporary name, then rename it into place: a kill leaves the old file or the new one."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, **dump_kwargs)
    os.replace(tmp, path)
