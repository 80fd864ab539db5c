"""Reward models behind one interface (`RewardModel.score(images, prompts) -> (N,)`, higher is better)
and one registry (`load(name, **kwargs)`, `available()`, `register_reward(name)`).

Built in: clip_score, pickscore, hpsv2, hpsv21, aesthetic, imagereward (optional extra).
"""

# Importing the modules registers their factories; the heavy libraries load only when a reward is built.
from diffalign.rewards import aesthetic, clip_score, hps, imagereward, pickscore  # noqa: E402,F401
from diffalign.rewards._open_clip import TINY_CLIP  # noqa: E402
from diffalign.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PreprocessConfig,
    RewardModel,
    available,
    load,
    preprocess_tensor,
    register_reward,
)

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PreprocessConfig",
    "RewardModel",
    "TINY_CLIP",
    "available",
    "load",
    "preprocess_tensor",
    "register_reward",
]
