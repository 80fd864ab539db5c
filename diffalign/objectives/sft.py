"""Supervised fine-tuning on the best sample of each group: the baseline every preference method must beat."""

from __future__ import annotations

import torch

from diffalign.objectives._validation import check_errors, check_scores, upcast
from diffalign.objectives.ranked import ranks_from


def sft(err_policy: torch.Tensor, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Mean denoising error of the best sample per group: column 0, or the top of `scores` when given."""
    check_errors(err_policy, None)
    if scores is None:
        best_err = upcast(err_policy[:, 0])
    else:
        check_scores(scores, err_policy.shape)
        best = ranks_from(scores.to(err_policy.device).float()) == 1
        best_err = upcast(err_policy)[best]
    loss = best_err.mean()
    return loss, {"err_policy/best": loss.detach(), "err_policy/mean": err_policy.detach().float().mean()}
