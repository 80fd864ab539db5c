"""Toy-world rewards, registered with `diffalign.rewards`:

- `toy_geneval`: the exact GenEval checker as a VQA-like reward: 1.0 if the detector and the official
  rules find the prompt satisfied, else 0.0. The prompt must be one of the grammar's prompts.
- taste rewards, the synthetic users for PPD (they ignore the prompt):
  `toy_taste_large` (total object area), `toy_taste_warm` (warm minus cool object colours),
  `toy_taste_centred` (objects near the centre), `toy_taste_cool` (the opposite of warm).

All read images through the exact detector, so they are not differentiable: tensor input is converted
to PIL images and scored without a graph.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from diffalign.rewards.base import PreprocessConfig, RewardModel, register_reward
from diffalign.toyworld import scenes
from diffalign.toyworld.detector import ToyWorldDetector, score_images

WARM = ("red", "orange", "yellow", "pink", "brown")
COOL = ("green", "blue", "purple")


@functools.lru_cache(maxsize=1)
def prompt_index() -> dict[str, dict]:
    """Every grammar prompt -> its metadata row."""
    return {row["prompt"]: row for task in scenes.TASKS for row in scenes.all_rows(task)}


def parse_prompt(prompt: str) -> dict:
    row = prompt_index().get(prompt.strip())
    if row is None:
        raise ValueError(
            f"{prompt!r} is not a toy-world GenEval prompt (e.g. 'a photo of a red circle and a blue square'); "
            "the toy_geneval reward can only judge prompts of the grammar in diffalign.toyworld.scenes"
        )
    return row


def _to_pil(images) -> list[Image.Image]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, "RGB") for a in arr]
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"image {i} is a {type(im).__name__}; pass PIL images or one (N, 3, H, W) tensor")
        out.append(im.convert("RGB"))
    return out


class DetectorReward(RewardModel):
    """Base for rewards computed from the toy detector's objects."""

    def __init__(self, min_area: int = 12, **kwargs):
        kwargs.setdefault("device", "cpu")
        super().__init__(PreprocessConfig(size=scenes.IMAGE_SIZE), **kwargs)
        self.detector = ToyWorldDetector(min_area=min_area)
        self._finish_init()

    def score(self, images, prompts, batch_size=None) -> torch.Tensor:
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        pil = _to_pil(images)
        return torch.tensor(self._score_pil(pil, prompts), dtype=torch.float32, device=self.device_)

    def _score_pil(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        raise NotImplementedError


class ToyGenEvalReward(DetectorReward):
    name = "toy_geneval"

    def _score_pil(self, images, prompts):
        rows = [parse_prompt(p) for p in prompts]
        return [float(ok) for ok in score_images(images, rows, self.detector)]


def taste_value(kind: str, objects: list[dict], size: int) -> float:
    """One synthetic user's taste for a detected scene, roughly in [0, 1]; 0 for an empty image."""
    if not objects:
        return 0.0
    area = np.array([float(o["mask"].sum()) for o in objects])
    if kind == "large":
        return float(min(1.0, area.sum() / (0.25 * size * size)))
    if kind in ("warm", "cool"):
        warm = sum(a for a, o in zip(area, objects) if o["color"] in WARM)
        cool = sum(a for a, o in zip(area, objects) if o["color"] in COOL)
        v = (warm - cool) / area.sum()  # [-1, 1]
        v = v if kind == "warm" else -v
        return float((v + 1.0) / 2.0)
    if kind == "centred":
        c = (size - 1) / 2.0
        d = []
        for o in objects:
            ys, xs = np.nonzero(o["mask"])
            d.append(np.hypot(xs.mean() - c, ys.mean() - c) / (np.sqrt(2) * c))
        return float(1.0 - np.average(d, weights=area))
    raise ValueError(f"unknown taste {kind!r}; expected one of {TASTES}")


TASTES = ("large", "warm", "cool", "centred")


class ToyTasteReward(DetectorReward):
    def __init__(self, kind: str, **kwargs):
        if kind not in TASTES:
            raise ValueError(f"unknown taste {kind!r}; expected one of {TASTES}")
        super().__init__(**kwargs)
        self.kind = kind
        self.name = f"toy_taste_{kind}"

    def _score_pil(self, images, prompts):
        return [taste_value(self.kind, self.detector.objects(im), im.size[0]) for im in images]


register_reward("toy_geneval", lambda **kw: ToyGenEvalReward(**kw))
for _kind in TASTES:
    register_reward(f"toy_taste_{_kind}", functools.partial(ToyTasteReward, _kind))
