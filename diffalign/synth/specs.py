"""Generator and reward specs, and the short `source,key=value,...` strings the CLI reads.

    tiny:sdxl:0,steps=2,size=32                 a tiny offline SDXL pipeline (diffalign.testing), weights seed 0
    stabilityai/stable-diffusion-xl-base-1.0,id=sdxl,steps=30,guidance=5,size=1024,dtype=float16
    clip_score,model_name=ViT-L-14,pretrained=openai,form=hessel
    hpsv21,checkpoint=/models/HPS_v2.1_compressed.pt
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

SEED_POLICIES = ("per_prompt", "fixed")


def parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_spec(spec: str) -> tuple[str, dict]:
    head, *rest = [part.strip() for part in spec.split(",")]
    if not head:
        raise ValueError(f"spec {spec!r} has no source/name before the first comma")
    kwargs = {}
    for part in rest:
        if "=" not in part:
            raise ValueError(f"spec {spec!r}: {part!r} is not key=value")
        key, value = part.split("=", 1)
        kwargs[key.strip()] = parse_value(value.strip())
    return head, kwargs


@dataclass
class GeneratorSpec:
    """One image source. Each prompt gets `images_per_prompt` images from it, seeds by `seed_policy`:
    'per_prompt': seed + index * images_per_prompt + j (every image its own noise); 'fixed': seed + j."""

    source: str  # diffusers id/path, or tiny:sdxl[:seed] / tiny:sd3[:seed]
    id: str | None = None
    steps: int = 30
    guidance: float = 5.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    seed_policy: str = "per_prompt"
    images_per_prompt: int = 1
    batch_size: int = 4
    dtype: str | None = None  # float16 / bfloat16 / float32; default float32 on CPU, float16 on GPU
    variant: str | None = None
    scheduler: str | None = None  # a diffusers scheduler class name, built from the pipeline's own config
    lora: str | None = None  # a LoRA folder or file (e.g. a trained policy: an iterative round's generator), fused in
    extra: dict = field(default_factory=dict)  # passed to the pipeline call (e.g. negative_prompt)

    def __post_init__(self):
        if self.id is None:
            self.id = self.source
        if self.seed_policy not in SEED_POLICIES:
            raise ValueError(f"generator {self.id!r}: seed_policy {self.seed_policy!r} is unknown; use {SEED_POLICIES}")
        if self.images_per_prompt < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"generator {self.id!r}: images_per_prompt, steps and batch_size must be >= 1")
        if not (math.isfinite(float(self.guidance)) and self.guidance >= 0):
            raise ValueError(f"generator {self.id!r}: guidance must be a finite number >= 0, got {self.guidance}")
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"generator {self.id!r}: {side}={value} must be a positive multiple of 8 (the VAE's "
                                 "downsampling; SD3 needs 16)")

    def seeds(self, index: int) -> list[int]:
        n = self.images_per_prompt
        base = self.seed + (index * n if self.seed_policy == "per_prompt" else 0)
        return [base + j for j in range(n)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, spec: str) -> GeneratorSpec:
        source, kw = split_spec(spec)
        aliases = {"n": "images_per_prompt", "guidance_scale": "guidance", "num_inference_steps": "steps"}
        kw = {aliases.get(k, k): v for k, v in kw.items()}
        if "size" in kw:
            size = kw.pop("size")
            kw.setdefault("height", size)
            kw.setdefault("width", size)
        names = {f.name for f in dataclasses.fields(cls)} - {"source", "extra"}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ValueError(f"generator spec {spec!r}: unknown key(s) {unknown}; known: {sorted(names | {'size', 'n'})}")
        if "id" in kw:
            kw["id"] = str(kw["id"])
        return cls(source=source, **kw)


@dataclass
class RewardSpec:
    name: str
    id: str | None = None
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.id is None:
            self.id = self.name

    @classmethod
    def parse(cls, spec: str) -> RewardSpec:
        name, kw = split_spec(spec)
        rid = kw.pop("id", None)
        return cls(name=name, id=None if rid is None else str(rid), kwargs=kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_unique_ids(specs, what: str) -> None:
    ids = [s.id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"{what} ids {dup} are used more than once; give each an id=... in its spec")


def swap_scheduler(pipe, name: str | None):
    """Replace `pipe.scheduler` by the diffusers scheduler class `name`, configured from the current one
    (same betas / shift / timestep spacing); None keeps the pipeline's own."""
    if name is None:
        return pipe
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"scheduler {name!r} is not a diffusers scheduler class (e.g. DPMSolverMultistepScheduler, EulerDiscreteScheduler)")
    own = type(pipe.scheduler).__name__
    if own.startswith("FlowMatch") and not name.startswith("FlowMatch"):
        raise ValueError(f"scheduler {name!r} does not sample a flow-matching pipeline (its own: {own}); built from "
                         "its config it follows another noise process. Keep the pipeline's scheduler or pick a FlowMatch* one")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


def load_pipeline(spec: GeneratorSpec, device):
    """Build the pipeline for `spec` on `device` (one at a time: the caller frees it before the next)."""
    import torch

    from diffalign.families import load_pipeline as load_any_pipeline
    from diffalign.rewards.base import resolve_dtype

    device = torch.device(device)
    default = "float16" if device.type == "cuda" and not spec.source.startswith("tiny:") else "float32"
    pipe = load_any_pipeline(spec.source, torch_dtype=resolve_dtype(spec.dtype or default), variant=spec.variant or None)
    if spec.lora:
        import os

        if not os.path.exists(spec.lora):
            raise FileNotFoundError(f"generator {spec.id!r}: lora {spec.lora!r} does not exist")
        folder, name = (os.path.dirname(spec.lora) or ".", os.path.basename(spec.lora)) if os.path.isfile(spec.lora) else (spec.lora, None)
        pipe.load_lora_weights(folder, **({"weight_name": name} if name else {}))
        pipe.fuse_lora()  # sampling runs the fused weights: no per-layer adapter cost
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return swap_scheduler(pipe, spec.scheduler)


def generate_images(pipe, spec: GeneratorSpec, prompts: list[str], seeds: list[int]):
    """One PIL image per (prompt, seed); noise comes from CPU generators, so it is the same on any device."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(spec.extra)
    if spec.height is not None:
        kwargs["height"] = spec.height
    if spec.width is not None:
        kwargs["width"] = spec.width
    out = pipe(prompt=list(prompts), num_inference_steps=spec.steps, guidance_scale=spec.guidance,
               generator=generators, output_type="pil", **kwargs)
    images = out.images
    if len(images) != len(prompts):
        raise RuntimeError(f"generator {spec.id!r} returned {len(images)} images for {len(prompts)} prompts")
    return images
