"""The exact checker as a graded reward: `toy_geneval_graded` scores a toy-world image against its prompt's
GenEval metadata (the toy world's `toy_geneval`, in `diffalign.toyworld.rewards`, is the 0/1 verdict alone).

It plays the part a VQA reward (e.g. VQAScore: "does this image show <prompt>?") plays for real models,
but answers exactly: the toy detector finds the objects, the official GenEval rules judge them.

The score in [0, 1] is graded so that near misses rank above total failures (a binary verdict would tie
most of a group of k samples, and ties carry no preference):

    score = (verdict + fraction of the prompt's sub-questions answered yes) / 2

The sub-questions are the metadata clauses asked one at a time: "is there <count> <class>?", "is it
<colour>?", "is it <relation> the <target>?", and, for counting, "are there no more than <count>?".
A perfect image scores 1.0; an image that gets every clause but the full verdict wrong cannot happen
(all clauses yes = verdict yes), so a correct image always beats an incorrect one.

Prompts must come from the toy grammar (`diffalign.toyworld.scenes`); anything else is an error, since
the checker only knows toy-world metadata. Not differentiable: tensors are converted to PIL images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffalign.rewards.base import PreprocessConfig, RewardModel, register_reward
from diffalign.toyworld.rewards import _to_pil, parse_prompt

TOY_GENEVAL = "toy_geneval_graded"


def metadata_for_prompt(prompt: str) -> dict:
    """The GenEval metadata row of a toy-grammar prompt (ValueError for any other prompt)."""
    try:
        return parse_prompt(prompt)
    except ValueError:
        raise ValueError(
            f"{prompt!r} is not a toy-world prompt; the exact checker scores prompts of the toy grammar only "
            "(diffalign.toyworld.scenes, e.g. 'a photo of a red circle and a blue square')"
        ) from None


def sub_questions(metadata: dict) -> list[dict]:
    """The metadata split into one-clause questions (each a metadata dict the GenEval rules can judge)."""
    base = {"tag": metadata["tag"], "prompt": metadata["prompt"]}
    include = metadata.get("include", [])
    out = []
    for clause in include:
        plain = {k: v for k, v in clause.items() if k not in ("color", "position")}
        out.append({**base, "include": [plain]})  # is it there, as many times?
        if "color" in clause:
            out.append({**base, "include": [{k: v for k, v in clause.items() if k != "position"}]})
        if "position" in clause:
            target = clause["position"][1]
            out.append({**base, "include": [include[target], {**plain, "position": [clause["position"][0], 0]}]})
    for clause in metadata.get("exclude", []):
        out.append({**base, "include": [], "exclude": [clause]})
    return out


def graded_score(detections: dict, metadata: dict) -> tuple[float, bool]:
    """(score in [0, 1], official verdict) of one image's raw detections."""
    from diffalign.evaluation.geneval.rules import evaluate_clauses, filter_detections

    kept = filter_detections(detections, metadata["tag"])
    verdict = bool(evaluate_clauses(metadata, kept)[0])
    questions = sub_questions(metadata)
    yes = [bool(evaluate_clauses(q, kept)[0]) for q in questions]
    return 0.5 * float(verdict) + 0.5 * float(np.mean(yes)), verdict


class GradedToyGenEvalReward(RewardModel):
    """Exact-checker reward for toy-world prompts (see the module docstring)."""

    name = TOY_GENEVAL

    def __init__(self, device=None, dtype=None, batch_size: int = 64, min_area: int = 12):
        super().__init__(PreprocessConfig(size=64), device="cpu" if device is None else device, dtype=dtype, batch_size=batch_size)
        from diffalign.toyworld.detector import ToyWorldDetector

        self.detector = ToyWorldDetector(min_area=min_area)
        self._finish_init()

    def verdicts(self, images, prompts: Sequence[str]) -> list[bool]:
        return [v for _, v in self._judge(images, prompts)]

    def _judge(self, images, prompts: Sequence[str]) -> list[tuple[float, bool]]:
        prompts = list(prompts)
        pil = _to_pil(images)
        if len(pil) != len(prompts):
            raise ValueError(f"got {len(pil)} images but {len(prompts)} prompts; pass one prompt per image")
        out = []
        for image, prompt in zip(pil, prompts):
            meta = metadata_for_prompt(prompt)
            names = sorted({c["class"] for c in meta.get("include", []) + meta.get("exclude", [])})
            out.append(graded_score(self.detector.detect(image, names), meta))
        return out

    def score(self, images, prompts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        scores = [s for s, _ in self._judge(images, prompts)]
        return torch.tensor(scores, dtype=torch.float32, device=self.device_)


@register_reward(TOY_GENEVAL)
def _toy_geneval_graded(**kwargs) -> GradedToyGenEvalReward:
    return GradedToyGenEvalReward(**kwargs)
