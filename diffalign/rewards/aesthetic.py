"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann 2022).

An MLP on the L2-normalised CLIP ViT-L/14 (OpenAI) image embedding; it ignores the prompt.
Layer sizes as published: 768-1024-128-64-16-1 with dropouts 0.2, 0.2, 0.1 (inactive at eval),
so a published state dict (`layers.0.weight`, `layers.2.weight`, ..., `layers.7.weight`) loads as is.
"""

from __future__ import annotations

import torch
from torch import nn

from diffalign.rewards._open_clip import build_open_clip
from diffalign.rewards.base import RewardModel, load_state_dict, register_reward, resolve_file


class AestheticMLP(nn.Module):
    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticScore(RewardModel):
    name = "aesthetic"

    def __init__(self, clip_model, pil_transform, preprocess, mlp: AestheticMLP, **kwargs):
        super().__init__(preprocess, pil_transform=pil_transform, **kwargs)
        self.clip_model = clip_model
        self.mlp = mlp
        self._finish_init()

    def _score(self, pixel_values, prompts):
        emb = self.clip_model.encode_image(pixel_values, normalize=True)
        return self.mlp(emb).squeeze(-1)


@register_reward("aesthetic")
def aesthetic(mlp_path: str | None = None, clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai",
              random_init: bool = False, seed: int = 0, **kwargs) -> AestheticScore:
    """`mlp_path`: the predictor's weights (e.g. sac+logos+ava1-l14-linearMSE.pth), a local file or
    Hub file 'owner/repo/file'. `random_init=True` builds random CLIP and MLP weights (tests only)."""
    if mlp_path is None and not random_init:
        raise ValueError("aesthetic: pass mlp_path=<path to the LAION aesthetic v2 MLP weights, e.g. "
                         "sac+logos+ava1-l14-linearMSE.pth>, or random_init=True for a random test model")
    model, pil_transform, _tok, pre = build_open_clip(clip_model, None if random_init else clip_pretrained,
                                                      random_init, seed, "aesthetic")
    embed_dim = int(model.visual.output_dim)  # 768 for ViT-L/14
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        mlp = AestheticMLP(embed_dim)
    if mlp_path is not None:
        state = load_state_dict(resolve_file(mlp_path, "aesthetic mlp_path"))
        try:
            mlp.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"aesthetic MLP weights {mlp_path!r} do not fit a {embed_dim}-1024-128-64-16-1 MLP "
                             f"on {clip_model!r} embeddings: {e}") from e
    return AestheticScore(model, pil_transform, pre, mlp, **kwargs)
