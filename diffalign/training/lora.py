"""LoRA set-up of the trained denoiser, optionally starting from an earlier LoRA.

`init_lora` names a diffusers-format LoRA (a folder with `pytorch_lora_weights.safetensors`, as this trainer,
the diffusers scripts and `save_lora_weights` write it). Two ways to start from it:

- continue (default): the new adapter starts from its weights, so the policy is base + that LoRA and the
  reference (adapters off) stays the base. An iterative round against the original base.
- merge (`init_lora_merge`): it is fused into the base weights and a fresh adapter trains on top, so the
  reference is base + that LoRA. An iterative round against the previous round's policy.
"""

from __future__ import annotations

import torch

INIT_ADAPTER = "init"


def _load_named(family, denoiser: torch.nn.Module, path: str, adapter_name: str) -> None:
    import os

    if not os.path.isdir(path) and not os.path.isfile(path):
        raise FileNotFoundError(f"init_lora {path!r} does not exist (a folder with pytorch_lora_weights.safetensors)")
    kwargs = {}
    if os.path.isfile(path):
        path, kwargs["weight_name"] = os.path.dirname(path) or ".", os.path.basename(path)
    family.load_lora(denoiser, path, adapter_name, **kwargs)


def add_lora(family, denoiser: torch.nn.Module, lora_config, init_lora: str | None = None, merge: bool = False) -> None:
    """Add the trainable adapter "default" (`lora_config`, a peft LoraConfig) to `denoiser`, from `init_lora` if given."""
    import warnings

    with warnings.catch_warnings():  # peft warns about the second adapter and the deleted one: both are the plan
        warnings.filterwarnings("ignore", message=".*(peft_config|which is now deleted).*", category=UserWarning)
        _add_lora(family, denoiser, lora_config, init_lora, merge)


def _add_lora(family, denoiser, lora_config, init_lora, merge) -> None:
    if init_lora and merge:
        _load_named(family, denoiser, init_lora, INIT_ADAPTER)
        denoiser.fuse_lora(adapter_names=[INIT_ADAPTER])
        denoiser.unload_lora()  # the fused weights stay in the base layers
    denoiser.add_adapter(lora_config)
    if init_lora and not merge:
        _load_named(family, denoiser, init_lora, INIT_ADAPTER)
        _copy_adapter(denoiser, INIT_ADAPTER, "default", init_lora)
        denoiser.delete_adapters(INIT_ADAPTER)
        denoiser.set_adapter("default")


def _copy_adapter(denoiser: torch.nn.Module, source: str, target: str, path: str) -> None:
    """Copy adapter `source`'s weights into `target`: the same modules, rank and scale, or a clear error."""
    src_cfg, dst_cfg = denoiser.peft_config[source], denoiser.peft_config[target]
    if src_cfg.r != dst_cfg.r or src_cfg.lora_alpha / src_cfg.r != dst_cfg.lora_alpha / dst_cfg.r:
        raise ValueError(f"init_lora {path!r} has rank {src_cfg.r} and alpha {src_cfg.lora_alpha}; this run has "
                         f"lora_rank {dst_cfg.r} and lora_alpha {dst_cfg.lora_alpha}: set them to match")
    params = dict(denoiser.named_parameters())
    wanted = {n for n in params if f".{target}." in n}
    found = {n.replace(f".{source}.", f".{target}."): n for n in params if f".{source}." in n}
    missing, extra = sorted(wanted - set(found)), sorted(set(found) - wanted)
    if missing or extra:
        example = (missing or extra)[0]
        raise ValueError(f"init_lora {path!r} adapts other modules than lora_target_modules "
                         f"({len(missing)} of this run's LoRA weights missing from it, {len(extra)} extra; e.g. {example})")
    with torch.no_grad():
        for name in wanted:
            params[name].copy_(params[found[name]].to(params[name].dtype))
