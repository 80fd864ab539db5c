"""The statistics every report uses: mean with its standard error, and paired differences."""

from __future__ import annotations

import numpy as np


def mean_se(x) -> tuple[float, float]:
    """(mean, standard error = sample std (ddof 1) / sqrt(n)); the error is NaN for fewer than 2 values."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if len(x) == 0:
        raise ValueError("mean_se of no values")
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def wins(a, b) -> np.ndarray:
    """Per matched item: 1 where a > b, 1/2 on a tie, 0 otherwise (the mean is the win rate of a over b)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"wins needs matched items, got shapes {a.shape} and {b.shape}")
    return (a > b).astype(np.float64) + 0.5 * (a == b)


def paired_mean_se(after, before) -> tuple[float, float]:
    """Mean change and its paired standard error, for matched items (same prompt, same noise)."""
    after, before = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if after.shape != before.shape:
        raise ValueError(f"paired values need the same shape, got {after.shape} and {before.shape}")
    return mean_se(after - before)
