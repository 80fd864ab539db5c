"""Pairwise preference objectives on per-sample denoising errors (Diffusion-DPO and relatives).

With s = err_policy - err_ref, the implicit reward of a sample is -beta * s. Diffusion-DPO
(Wallace et al. 2023) optimises logits = -0.5 * beta * ((e_w - e_l) - (r_w - r_l)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.objectives._validation import check_beta, check_errors, check_finite, upcast

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def dpo_logits(err_policy: torch.Tensor, err_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """-0.5 * beta * ((e_w - e_l) - (r_w - r_l)) in float32; column 0 is the preferred sample."""
    err_policy, err_ref = upcast(err_policy), upcast(err_ref)
    policy_diff = err_policy[:, 0] - err_policy[:, 1]
    ref_diff = err_ref[:, 0] - err_ref[:, 1]
    return -0.5 * beta * (policy_diff - ref_diff)


def pair_metrics(err_policy: torch.Tensor, err_ref: torch.Tensor, logits: torch.Tensor, beta: float) -> dict:
    """Implicit accuracy, rewards and the drift of each side from the reference."""
    with torch.no_grad():
        s = upcast(err_policy) - upcast(err_ref)
        reward = -beta * s
        return {
            "implicit_acc": (logits > 0).float().mean(),
            "rewards/chosen": reward[:, 0].mean(),
            "rewards/rejected": reward[:, 1].mean(),
            "rewards/margin": (reward[:, 0] - reward[:, 1]).mean(),
            # Policy-minus-reference error per side: both rising means the model drifts away from the
            # data (reward hacking) even while the margin improves.
            "drift/chosen": s[:, 0].mean(),
            "drift/rejected": s[:, 1].mean(),
            "err_policy/chosen": upcast(err_policy[:, 0]).mean(),
            "err_policy/rejected": upcast(err_policy[:, 1]).mean(),
            "err_ref/chosen": upcast(err_ref[:, 0]).mean(),
            "err_ref/rejected": upcast(err_ref[:, 1]).mean(),
            "logits": logits.mean(),
        }


def dpo(
    err_policy: torch.Tensor,
    err_ref: torch.Tensor,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO on errors of shape (B, 2); column 0 is the preferred sample.

    loss_type:
      - "sigmoid": mean of -logsigmoid(logits), the published Diffusion-DPO loss;
      - "hinge":   mean of relu(1 - logits) (SLiC-style);
      - "ipo":     mean of (logits / beta - 1 / (2 * beta))^2, with the log-ratio difference logits / beta (IPO).
    labels: optional (B,) probability that column 0 is preferred (1.0 by default; 0.5 for kept ties).
      With the sigmoid loss it gives the label-smoothed form -(p logsig(x) + (1 - p) logsig(-x)); the other
      losses accept only hard labels of 1.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    check_beta(beta)
    check_errors(err_policy, err_ref, exact_k=2)
    logits = dpo_logits(err_policy, err_ref, beta)

    if labels is not None:
        labels = _check_labels(labels, logits.shape[0]).to(logits.device)
        if loss_type != "sigmoid" and not bool((labels == 1).all()):
            raise ValueError(f"soft labels (ties) are only defined for loss_type='sigmoid', not {loss_type!r}")

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(logits)
        if labels is not None:
            losses = labels * losses + (1 - labels) * -F.logsigmoid(-logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    else:
        losses = (logits / beta - 1 / (2 * beta)) ** 2

    metrics = pair_metrics(err_policy, err_ref, logits, beta)
    return losses.mean(), metrics


def _check_labels(labels: torch.Tensor, batch: int) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.float32)
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    check_finite("labels", labels)
    if (labels < 0).any() or (labels > 1).any():
        raise ValueError("labels must be probabilities in [0, 1] that column 0 is preferred")
    return labels
