"""Preference objectives: pure tensor math on per-sample denoising errors of shape (B, k).

Every objective takes the policy's errors (and the frozen reference's, on the same noised inputs)
and returns `(loss, metrics)`; metrics are 0-dim detached float32 tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffalign.objectives._validation import check_scores
from diffalign.objectives.pairwise import LOSS_TYPES, dpo, dpo_logits
from diffalign.objectives.ranked import dcg_pair_weights, rank_dpo, ranks_from
from diffalign.objectives.sft import sft


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective. `fn(err_policy, err_ref, scores, **options) -> (loss, metrics)` on (B, k) errors;
    `options`: fn keyword -> the TrainConfig field it comes from; `loss`: the registered objective whose `fn`
    the trainer's `compute` runs (default: this one; PPD runs DPO under user conditioning)."""

    name: str
    help: str
    fn: Callable | None = None
    needs_reference: bool = True
    options: dict = field(default_factory=lambda: {"beta": "beta"})
    loss: str = ""

    def __post_init__(self):
        if not self.loss:
            object.__setattr__(self, "loss", self.name)
        if self.fn is None and self.loss == self.name:
            raise ValueError(f"objective {self.name!r} needs fn, or loss= naming the objective it runs")


# The one list of objectives: TrainConfig takes its `objective` choices from it; add one with register_objective.
REGISTRY: dict[str, ObjectiveSpec] = {}


def register_objective(spec: ObjectiveSpec) -> ObjectiveSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"objective {spec.name!r} is already registered; pick another name")
    if spec.loss != spec.name and spec.loss not in REGISTRY:
        raise ValueError(f"objective {spec.name!r} runs loss {spec.loss!r}, which is not registered")
    REGISTRY[spec.name] = spec
    return spec


def _pairwise(loss_type: str) -> Callable:
    name = "dpo" if loss_type == "sigmoid" else loss_type

    def run(err_policy, err_ref, scores, beta: float = 5000.0, **kwargs):
        """Column 0 preferred (the data layer's order); scores of [0.5, 0.5] mark a kept tie, a soft label
        for the sigmoid loss."""
        if err_policy.shape[1] != 2:
            raise ValueError(f"objective {name!r} is pairwise and needs k=2; use 'rankdpo' for k={err_policy.shape[1]}")
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

    return run


def _rank_dpo(err_policy, err_ref, scores, beta: float = 5000.0, **kwargs):
    return rank_dpo(err_policy, err_ref, scores, beta=beta, **kwargs)


def _sft(err_policy, err_ref, scores):
    return sft(err_policy, scores)


for _spec in (
    ObjectiveSpec("dpo", "pairwise Diffusion-DPO, sigmoid loss (kept ties become soft labels)", _pairwise("sigmoid")),
    ObjectiveSpec("ipo", "pairwise, IPO's squared loss", _pairwise("ipo")),
    ObjectiveSpec("hinge", "pairwise, hinge loss", _pairwise("hinge")),
    ObjectiveSpec("rankdpo", "listwise RankDPO with DCG weights", _rank_dpo,
                  options={"beta": "beta", "weighting": "rank_weighting", "discount_from": "discount_from"}),
    ObjectiveSpec("sft", "supervised fine-tuning on the best sample (no reference)", _sft, needs_reference=False,
                  options={}),
    ObjectiveSpec("ppd", "personalized DPO: pairwise DPO under user conditioning (docs/personalization.md)", loss="dpo"),
):
    register_objective(_spec)
OBJECTIVES = tuple(name for name, spec in REGISTRY.items() if spec.loss == name)  # the built-in `compute` names
NEEDS_REFERENCE = {name: spec.needs_reference for name, spec in REGISTRY.items()}


def objective_kwargs(name: str, config) -> dict:
    """`compute`'s keyword arguments for objective `name`, read from a config object's fields."""
    return {kw: getattr(config, attr) for kw, attr in REGISTRY[name].options.items()}


def compute(name: str, err_policy: torch.Tensor, err_ref: torch.Tensor | None, scores: torch.Tensor,
            **kwargs) -> tuple[torch.Tensor, dict]:
    """Run objective `name` (its `loss`: PPD computes DPO) on (B, k) errors."""
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; choose one of {tuple(REGISTRY)}")
    spec = REGISTRY[REGISTRY[name].loss]
    if spec.needs_reference and err_ref is None:
        raise ValueError(f"objective {name!r} needs the reference model's errors (err_ref)")
    return spec.fn(err_policy, err_ref, scores, **kwargs)


__all__ = [
    "LOSS_TYPES",
    "NEEDS_REFERENCE",
    "OBJECTIVES",
    "REGISTRY",
    "ObjectiveSpec",
    "objective_kwargs",
    "register_objective",
    "compute",
    "dcg_pair_weights",
    "dpo",
    "dpo_logits",
    "rank_dpo",
    "ranks_from",
    "sft",
]
