"""CLIP score with open_clip: the cosine between normalised image and text embeddings, in one of two forms.

- "hessel": 2.5 * max(cos, 0)  (CLIPScore, Hessel et al. 2021)
- "torchmetrics": 100 * cos    (torchmetrics' CLIPScore per sample; torchmetrics clamps the *mean* at 0)
"""

from __future__ import annotations

import torch

from diffalign.rewards._open_clip import build_open_clip
from diffalign.rewards.base import RewardModel, register_reward

FORMS = ("hessel", "torchmetrics")


class OpenCLIPReward(RewardModel):
    """Shared by rewards that read an open_clip model's normalised embeddings."""

    def __init__(self, model, pil_transform, tokenizer, preprocess, **kwargs):
        super().__init__(preprocess, pil_transform=pil_transform, **kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self._finish_init()

    def cosine(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device_)
        image = self.model.encode_image(pixel_values, normalize=True).float()
        text = self.model.encode_text(tokens, normalize=True).float()
        return (image * text).sum(dim=-1)


class CLIPScore(OpenCLIPReward):
    name = "clip_score"

    def __init__(self, *args, form: str = "hessel", **kwargs):
        if form not in FORMS:
            raise ValueError(f"clip_score form {form!r} is unknown; use one of {FORMS}")
        super().__init__(*args, **kwargs)
        self.form = form

    def _score(self, pixel_values, prompts):
        cos = self.cosine(pixel_values, prompts)
        if self.form == "hessel":
            return 2.5 * cos.clamp(min=0.0)
        return 100.0 * cos


@register_reward("clip_score")
def clip_score(model_name: str = "ViT-L-14", pretrained: str | None = "openai", form: str = "hessel",
               random_init: bool = False, seed: int = 0, **kwargs) -> CLIPScore:
    model, pil_transform, tokenizer, pre = build_open_clip(model_name, pretrained, random_init, seed, "clip_score")
    return CLIPScore(model, pil_transform, tokenizer, pre, form=form, **kwargs)
