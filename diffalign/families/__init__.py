"""Model families: how each one noises, what it predicts, and how its denoiser is called.

`get_family(name)` returns the adapter class; `load_family(model, ...)` builds an adapter from a
hub id / local path or from an offline tiny pipeline (`tiny:sdxl`, `tiny:sd3`, `tiny:sd3-t5`).
"""

from __future__ import annotations

_REGISTRY: dict[str, type] = {}


def register_family(name: str):
    """Class decorator: register a family adapter under `name`."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"family {name!r} is already registered")
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_families() -> list[str]:
    return sorted(_REGISTRY)


def get_family(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model family {name!r}; available: {available_families()}")
    return _REGISTRY[name]


def family_option_names() -> list[str]:
    """Every registered family's keyword options (`FamilyAdapter.options`)."""
    return sorted({name for cls in _REGISTRY.values() for name in cls.options})


def family_of_pipeline(pipe) -> str:
    """The family name for a diffusers pipeline object, from its class."""
    cls_name = type(pipe).__name__
    if "StableDiffusion3" in cls_name:
        return "sd3"
    if "StableDiffusionXL" in cls_name:
        return "sdxl"
    if cls_name.startswith("StableDiffusion"):
        return "sd15"
    raise ValueError(f"no family adapter for pipeline class {cls_name}; set `family` to one of {available_families()}")


def tiny_kinds() -> dict[str, type]:
    """`tiny:<kind>` -> the family class that builds it."""
    return {kind: cls for cls in _REGISTRY.values() for kind in cls.tiny_kinds}


def pipeline_denoiser(pipe):
    """A pipeline's denoiser (its UNet or transformer), by the family of its class."""
    return getattr(pipe, get_family(family_of_pipeline(pipe)).denoiser_attr)


def load_pipeline(model: str, seed: int = 0, torch_dtype=None, revision: str | None = None, variant: str | None = None,
                  use_safetensors: bool | None = None):
    """The one pipeline loader: `tiny:sdxl` / `tiny:sd3` / `tiny:sd3-t5` (offline, random weights; an optional
    `:SEED` suffix overrides `seed`), or a Hub id / local diffusers folder (components its model_index.json lists
    as null, such as SD3 saved without T5, are passed as None)."""
    if model.startswith("tiny:"):
        parts = model.split(":")
        kinds = tiny_kinds()
        if parts[1] not in kinds or len(parts) > 3 or (len(parts) == 3 and not parts[2].isdigit()):
            raise ValueError(f"unknown tiny model {model!r}; use " + ", ".join(f"tiny:{k}" for k in sorted(kinds))
                             + ", optionally with :SEED")
        seed = int(parts[2]) if len(parts) == 3 else seed
        pipe = kinds[parts[1]].tiny_pipeline(parts[1], seed)
        return pipe.to(torch_dtype) if torch_dtype is not None else pipe
    from diffusers import DiffusionPipeline

    kwargs = {"revision": revision, "variant": variant, "torch_dtype": torch_dtype, "use_safetensors": use_safetensors}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return DiffusionPipeline.from_pretrained(model, **kwargs, **null_components(model))


def null_components(model: str) -> dict:
    """`{name: None}` for the components a local model_index.json lists as null (e.g. SD3 saved without T5):
    diffusers drops null entries on load and then reports the required ones missing unless they are passed."""
    import json
    import os

    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index, encoding="utf-8") as f:
        entries = json.load(f)
    return {k: None for k, v in entries.items() if isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None}


def load_family(model: str, family: str | None = None, seed: int = 0, revision: str | None = None,
                variant: str | None = None, **options):
    """Build the family adapter for `model`; `options` go to the adapter (e.g. prediction_type) and must be the
    family's (`get_family(name).options`)."""
    pipe = load_pipeline(model, seed=seed, revision=revision, variant=variant)
    name = family or family_of_pipeline(pipe)
    return get_family(name).from_pipeline(pipe, **options)


# Register the built-in families.
from diffalign.families import sd3, sdxl  # noqa: E402,F401
from diffalign.families.base import FamilyAdapter, drop_prompts, repeat_groups  # noqa: E402,F401
