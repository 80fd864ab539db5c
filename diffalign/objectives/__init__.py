"""Preference objectives: pure tensor math on per-sample denoising errors of shape (B, k).

Every objective takes the policy's errors (and the frozen reference's, on the same noised inputs)
and returns `(loss, metrics)`; metrics are 0-dim detached float32 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffalign.objectives._validation import check_scores
from diffalign.objectives.pairwise import LOSS_TYPES, dpo, dpo_logits
from diffalign.objectives.ranked import dcg_pair_weights, rank_dpo, ranks_from
from diffalign.objectives.sft import sft


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective as the trainer sees it. `loss`: the `compute` name it runs (PPD runs DPO under user
    conditioning); `options`: `compute` keyword -> the TrainConfig field it comes from."""

    name: str
    help: str
    loss: str
    needs_reference: bool = True
    options: dict = field(default_factory=dict)


def _spec(name, help, loss=None, needs_reference=True, **options):
    return ObjectiveSpec(name, help, loss or name, needs_reference, {"beta": "beta", **options} if needs_reference else options)


# The one list of objectives: TrainConfig takes its `objective` choices from it.
REGISTRY: dict[str, ObjectiveSpec] = {s.name: s for s in (
    _spec("dpo", "pairwise Diffusion-DPO, sigmoid loss (kept ties become soft labels)"),
    _spec("ipo", "pairwise, IPO's squared loss"),
    _spec("hinge", "pairwise, hinge loss"),
    _spec("rankdpo", "listwise RankDPO with DCG weights", weighting="rank_weighting", discount_from="discount_from"),
    _spec("sft", "supervised fine-tuning on the best sample (no reference)", needs_reference=False),
    _spec("ppd", "personalized DPO: pairwise DPO under user conditioning (docs/personalization.md)", loss="dpo"),
)}
OBJECTIVES = tuple(name for name, spec in REGISTRY.items() if spec.loss == name)  # what `compute` runs
NEEDS_REFERENCE = {name: spec.needs_reference for name, spec in REGISTRY.items()}


def objective_kwargs(name: str, config) -> dict:
    """`compute`'s keyword arguments for objective `name`, read from a config object's fields."""
    return {kw: getattr(config, attr) for kw, attr in REGISTRY[name].options.items()}


def compute(
    name: str,
    err_policy: torch.Tensor,
    err_ref: torch.Tensor | None,
    scores: torch.Tensor,
    beta: float = 5000.0,
    **kwargs,
) -> tuple[torch.Tensor, dict]:
    """Dispatch by objective name. Pairwise objectives expect column 0 preferred (the data layer's order);
    `scores` of [0.5, 0.5] mark a kept tie and become a soft label for the sigmoid DPO loss."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
    if name == "sft":
        return sft(err_policy, scores)
    if err_ref is None:
        raise ValueError(f"objective {name!r} needs the reference model's errors (err_ref)")
    if name == "rankdpo":
        return rank_dpo(err_policy, err_ref, scores, beta=beta, **kwargs)
    if err_policy.shape[1] != 2:
        raise ValueError(f"objective {name!r} is pairwise and needs k=2; use 'rankdpo' for k={err_policy.shape[1]}")
    loss_type = "sigmoid" if name == "dpo" else name
    check_scores(scores, err_policy.shape)
    scores = scores.to(err_policy.device).float()
    if bool((scores[:, 0] < scores[:, 1]).any()):
        raise ValueError("pairwise batches must put the preferred sample in column 0 (scores[:, 0] >= scores[:, 1])")
    ties = scores[:, 0] == scores[:, 1]
    labels = None
    if bool(ties.any()):
        if loss_type != "sigmoid":
            raise ValueError(f"the batch holds tied pairs, which {name!r} cannot learn from; drop ties or use 'dpo'")
        labels = torch.where(ties, 0.5, 1.0)
    return dpo(err_policy, err_ref, beta=beta, loss_type=loss_type, labels=labels, **kwargs)


__all__ = [
    "LOSS_TYPES",
    "NEEDS_REFERENCE",
    "OBJECTIVES",
    "REGISTRY",
    "ObjectiveSpec",
    "objective_kwargs",
    "compute",
    "dcg_pair_weights",
    "dpo",
    "dpo_logits",
    "rank_dpo",
    "ranks_from",
    "sft",
]
