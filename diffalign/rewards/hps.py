"""HPSv2 / HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preferences.

The score is the raw cosine between the normalised image and text embeddings (no logit scale),
as in the authors' `score.py`. The two versions differ only in the checkpoint.
"""

from __future__ import annotations

from diffalign.rewards._open_clip import build_open_clip
from diffalign.rewards.base import load_state_dict, register_reward, resolve_file
from diffalign.rewards.clip_score import OpenCLIPReward

HPS_CHECKPOINTS = {"hpsv2": "xswu/HPSv2/HPS_v2_compressed.pt", "hpsv21": "xswu/HPSv2/HPS_v2.1_compressed.pt"}


class HPSv2(OpenCLIPReward):
    name = "hpsv2"

    def _score(self, pixel_values, prompts):
        return self.cosine(pixel_values, prompts)


def _build(version: str, checkpoint: str | None, model_name: str, random_init: bool, seed: int, **kwargs) -> HPSv2:
    if checkpoint is None and not random_init:
        checkpoint = HPS_CHECKPOINTS[version]
    # The architecture is built empty and the HPS checkpoint overwrites every weight.
    model, pil_transform, tokenizer, pre = build_open_clip(model_name, None, random_init=True, seed=seed, what=version)
    if checkpoint is not None:
        state = load_state_dict(resolve_file(checkpoint, f"{version} checkpoint"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{version} checkpoint {checkpoint!r} does not fit open_clip {model_name!r}: "
                             f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    reward = HPSv2(model, pil_transform, tokenizer, pre, **kwargs)
    reward.name = version
    return reward


@register_reward("hpsv2")
def hpsv2(checkpoint: str | None = None, model_name: str = "ViT-H-14", random_init: bool = False, seed: int = 0,
          **kwargs) -> HPSv2:
    """`checkpoint`: a local HPS_v2 file or Hub file 'owner/repo/file' (default xswu/HPSv2/HPS_v2_compressed.pt)."""
    return _build("hpsv2", checkpoint, model_name, random_init, seed, **kwargs)


@register_reward("hpsv21")
def hpsv21(checkpoint: str | None = None, model_name: str = "ViT-H-14", random_init: bool = False, seed: int = 0,
           **kwargs) -> HPSv2:
    """As `hpsv2`, with the v2.1 checkpoint by default (xswu/HPSv2/HPS_v2.1_compressed.pt)."""
    return _build("hpsv21", checkpoint, model_name, random_init, seed, **kwargs)
