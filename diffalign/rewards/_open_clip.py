"""Building open_clip models for the rewards: by name + pretrained tag/path, or randomly initialised (tests)."""

from __future__ import annotations

import os

import torch

from diffalign.rewards.base import PreprocessConfig

TINY_CLIP = "diffalign-tiny-clip"  # 1.7M-parameter open_clip config shipped in rewards/configs (tests, benchmarks)
_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def register_configs() -> None:
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def build_open_clip(model_name: str, pretrained: str | None, random_init: bool = False, seed: int = 0,
                    what: str = "reward"):
    """Returns (model, pil_transform, tokenizer, PreprocessConfig).

    `pretrained` is an open_clip tag ('openai', 'laion2b_s32b_b79k') or a checkpoint path. A model
    without weights is only built when `random_init=True` says so: a random reward is useless outside tests.
    """
    import open_clip

    register_configs()
    if random_init:
        pretrained = None  # random_init wins over a default tag such as 'openai'
    if pretrained is None and not random_init and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"{what}: no weights given for open_clip model {model_name!r}; pass pretrained='<tag or path>' "
            "(e.g. 'openai') or random_init=True for a randomly initialised test model"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, pil_transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, pil_transform, tokenizer, preprocess_config(model)


def preprocess_config(model) -> PreprocessConfig:
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    size = size if isinstance(size, int) else tuple(size)
    if isinstance(size, tuple):
        if size[0] != size[1]:
            raise NotImplementedError(f"non-square CLIP input {size} is not supported by the tensor path")
        size = size[0]
    if cfg.get("resize_mode", "shortest") != "shortest":
        raise NotImplementedError(f"open_clip resize_mode {cfg['resize_mode']!r}; only 'shortest' is supported")
    return PreprocessConfig(size=int(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                            interpolation=cfg.get("interpolation", "bicubic"))
