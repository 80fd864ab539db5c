"""ImageReward (Xu et al. 2023), through its own package (the optional extra: `pip install "diffalign[imagereward]"`)."""

from __future__ import annotations

import torch

from diffalign.rewards.base import PreprocessConfig, RewardModel, register_reward


class ImageReward(RewardModel):
    name = "imagereward"

    def __init__(self, model, **kwargs):
        # ImageReward preprocesses PIL images itself (BLIP, 224); the tensor path is not mirrored.
        super().__init__(PreprocessConfig(), **kwargs)
        self.model = model

    def score(self, images, prompts, batch_size=None):
        if isinstance(images, torch.Tensor):
            raise NotImplementedError("imagereward scores PIL images only; the differentiable path is not implemented")
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        with torch.no_grad():
            scores = [float(self.model.score(p, [im])) for im, p in zip(images, prompts)]
        return torch.tensor(scores, dtype=torch.float32, device=self.device_)


@register_reward("imagereward")
def imagereward(model_name_or_path: str = "ImageReward-v1.0", **kwargs) -> ImageReward:
    try:
        import ImageReward as RM
    except ImportError as e:
        raise ImportError("the 'imagereward' reward needs the optional ImageReward package: "
                          'pip install "diffalign[imagereward]"') from e
    device = kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return ImageReward(RM.load(model_name_or_path, device=str(device)), **kwargs)
