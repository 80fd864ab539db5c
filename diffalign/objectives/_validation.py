"""Input checks shared by the objectives: errors name the problem and the fix."""

from __future__ import annotations

import torch


def check_errors(err_policy: torch.Tensor, err_ref: torch.Tensor | None, *, exact_k: int | None = None) -> None:
    if not isinstance(err_policy, torch.Tensor):
        raise TypeError(f"err_policy must be a torch.Tensor, got {type(err_policy).__name__}")
    if err_policy.ndim != 2:
        raise ValueError(
            f"err_policy must have shape (B, k) (B groups of k samples), got shape {tuple(err_policy.shape)}"
        )
    batch, k = err_policy.shape
    if batch == 0:
        raise ValueError("err_policy is empty: the batch has no groups")
    if k < 2 and exact_k is None:
        raise ValueError(f"each group needs k >= 2 samples to compare, got k={k}")
    if exact_k is not None and k != exact_k:
        raise ValueError(f"expected k={exact_k} samples per group (column 0 preferred), got shape {tuple(err_policy.shape)}")
    if err_ref is not None:
        if err_ref.shape != err_policy.shape:
            raise ValueError(
                f"err_ref shape {tuple(err_ref.shape)} does not match err_policy shape {tuple(err_policy.shape)}"
            )
        check_finite("err_ref", err_ref)
    check_finite("err_policy", err_policy)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
        raise ValueError(f"{name} has non-finite values (first at index {bad}); check the model outputs and inputs")


def check_scores(scores: torch.Tensor, shape: torch.Size) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.shape != shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} does not match the errors' shape {tuple(shape)}")
    check_finite("scores", scores)
    if (scores < 0).any() or (scores > 1).any():
        raise ValueError(
            f"scores must lie in [0, 1] (e.g. win-count phi), got min {scores.min().item():.4g} "
            f"and max {scores.max().item():.4g}; rescale them first"
        )


def check_beta(beta: float) -> None:
    if not (beta > 0 and beta < float("inf")):
        raise ValueError(f"beta must be a positive finite number, got {beta}")


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32: losses are computed in fp32 whatever the model dtype (fp64 stays fp64 for gradcheck)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
