"""Atomic checkpoints: write everything into a hidden temporary folder, then rename it into place.

A checkpoint counts only once `checkpoint-<step>/trainer_state.json` exists, and that folder
appears in one `os.rename`, so a kill during a save leaves at worst a `.tmp-checkpoint-*`
folder that `latest_checkpoint` ignores (and the next save removes).
"""

from __future__ import annotations

import json
import os
import re
import shutil

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints under `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """`latest` -> newest complete checkpoint (None when there is none yet); a path must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(
            f"{resume} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-<step> folder or 'latest'"
        )
    return resume


def read_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def temporary_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f".tmp-checkpoint-{step}")


def clean_temporary(output_dir: str) -> None:
    """Remove leftovers of interrupted saves."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(".tmp-checkpoint-") or name.startswith(".old-checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def finalize(tmp: str, output_dir: str, step: int, state: dict) -> str:
    """Write the marker file last, then move the folder into place in one rename."""
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if os.path.exists(final):  # a rerun of the same step after a resume: swap, never leave a gap
        old = os.path.join(output_dir, f".old-checkpoint-{step}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def prune(output_dir: str, keep: int | None) -> None:
    if keep is None or keep < 1:
        return
    for path in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
