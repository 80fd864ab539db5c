"""Where the demo's images come from: resolving `--base`, loading the pipeline and the aligned LoRA, and
generating base vs aligned with the same seed.

One pipeline serves both columns: the LoRA is switched off for the base image and on for the aligned
one, under a lock, so concurrent requests never see each other's adapter state.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

TOY_CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "toyworld", "checkpoints")
FAMILIES = ("sdxl", "sd3")
LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

RANDOM_MODEL_NOTICE = (
    "The model `{spec}` is a RANDOMLY initialised tiny pipeline (diffalign.testing): its images are noise and "
    "its scores mean nothing. It shows how the app works, not what alignment does."
)


@dataclass
class ModelSource:
    """What `--base` resolved to."""

    spec: str  # what the user asked for
    kind: str  # "toy" (trained toy-world checkpoint), "tiny" (random offline fixture) or "pretrained"
    family: str | None  # "sdxl", "sd3", or None when unknown before loading
    location: str | None  # folder or Hub id for "toy"/"pretrained"
    notices: list[str]

    @property
    def label(self) -> str:
        if self.kind != "toy":
            return self.spec
        return f"{self.spec} ({os.path.basename(self.location)})"


def toy_checkpoint_path(family: str) -> str | None:
    """The toy-world checkpoint folder of a family, if it is there (a diffusers pipeline folder)."""
    for name in (f"toy-{family}", family):
        path = os.path.join(TOY_CHECKPOINT_DIR, name)
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
    return None


def resolve_base(spec: str) -> ModelSource:
    """`toy[:family]` -> the toy checkpoint, else a loud fallback to `tiny:family`; `tiny:family`; or a path / Hub id."""
    spec = (spec or "").strip()
    if not spec:
        raise ValueError("--base is empty; pass 'toy', 'tiny:sdxl', 'tiny:sd3', a diffusers folder or a Hub id")
    head, _, family = spec.partition(":")
    if head in ("toy", "tiny"):
        family = family or "sdxl"
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r} in --base {spec!r}; use one of {FAMILIES}")
        if head == "toy":
            path = toy_checkpoint_path(family)
            if path is not None:
                return ModelSource(spec, "toy", family, path, [])
            fallback = f"tiny:{family}"
            notice = (
                f"No toy-world checkpoint for `{spec}` in `{TOY_CHECKPOINT_DIR}` (build it with "
                f"`python -m diffalign.toyworld.pretrain`). Falling back to `{fallback}`. "
                + RANDOM_MODEL_NOTICE.format(spec=fallback)
            )
            return ModelSource(fallback, "tiny", family, None, [notice])
        return ModelSource(spec, "tiny", family, None, [RANDOM_MODEL_NOTICE.format(spec=spec)])
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(
                f"--base {spec!r} is a path but holds no model_index.json; pass a diffusers pipeline folder "
                "(saved with save_pretrained)"
            )
        return ModelSource(spec, "pretrained", None, path, [])
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "pretrained", None, spec, [f"`{spec}` is read from the Hugging Face Hub (or its local cache)."])
    raise FileNotFoundError(
        f"--base {spec!r} is neither an existing folder nor a Hub id 'owner/name'; "
        "check the path, or use 'toy' / 'tiny:sdxl' / 'tiny:sd3'"
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device ({e}); use cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asks for CUDA but torch sees no GPU; use --device cpu")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"--dtype {dtype!r} is unknown; use one of {sorted(names)}")
    return names[dtype]


def family_of(pipe) -> str:
    from diffalign.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    if family not in ("sdxl", "sd3"):
        raise ValueError(f"the demo supports SDXL- and SD3-family pipelines, got {type(pipe).__name__}")
    return family


def load_pipeline(source: ModelSource, device: torch.device, dtype: torch.dtype):
    from diffalign.families import load_pipeline as load_any_pipeline

    if source.kind == "tiny":
        pipe = load_any_pipeline(f"tiny:{source.family}")
    elif source.kind == "toy":
        from diffalign.toyworld.pretrain import load_toy_pipeline  # finds the shipped checkpoint

        pipe = load_toy_pipeline(source.family, source.location, device="cpu")
    else:
        pipe = load_any_pipeline(source.location, torch_dtype=dtype, use_safetensors=True)  # no pickles
    source.family = family_of(pipe)
    pipe.set_progress_bar_config(disable=True)
    if source.kind != "pretrained" and dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)  # from_pretrained already loaded the others in `dtype`
    return pipe.to(device)


def resolve_lora_file(path: str) -> str:
    """A LoRA checkpoint: a .safetensors file, or a folder holding `pytorch_lora_weights.safetensors`
    (or exactly one other .safetensors file). Only safetensors are read: no pickles from user paths."""
    if path is None or not str(path).strip():
        raise ValueError("the LoRA path is empty")
    p = os.path.expanduser(str(path).strip())
    if not os.path.exists(p):
        raise FileNotFoundError(
            f"LoRA checkpoint {path!r} not found; pass a .safetensors file or a folder holding {LORA_FILE} "
            "(what the trainer / save_lora_weights writes)"
        )
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, LORA_FILE)):
            return os.path.join(p, LORA_FILE)
        found = sorted(glob.glob(os.path.join(p, "*.safetensors")))
        if len(found) != 1:
            raise FileNotFoundError(
                f"LoRA folder {path!r} holds {len(found)} .safetensors files ({[os.path.basename(f) for f in found]}); "
                f"expected {LORA_FILE} or exactly one .safetensors file"
            )
        return found[0]
    if not p.endswith(".safetensors"):
        raise ValueError(f"LoRA checkpoint {path!r} is not a .safetensors file; only safetensors are loaded (safe loading)")
    return p


def _adapter_name(path: str) -> str:
    return "aligned_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]


class DemoModels:
    """The loaded pipeline plus its LoRA adapters; `generate` is thread-safe."""

    def __init__(self, base: str, lora: str | None = None, device: str = "auto", dtype: str = "float32", max_loras: int = 4):
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        self.source = resolve_base(base)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.pipe = load_pipeline(self.source, self.device, self.dtype)
        self.family = self.source.family
        self.lock = threading.RLock()
        self.max_loras = max_loras
        self._adapters: OrderedDict[str, str] = OrderedDict()  # resolved file -> adapter name, least recent first
        self.default_lora = None
        if lora:
            self.default_lora = self.load_lora(lora)

    # ------------------------------------------------------------------ sizes
    @property
    def native_size(self) -> int:
        """The size the model was built for: sample_size of the denoiser times the VAE factor."""
        denoiser = getattr(self.pipe, "unet", None) or self.pipe.transformer
        sample = denoiser.config.sample_size
        sample = sample[0] if isinstance(sample, (tuple, list)) else sample
        return int(sample * self.pipe.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        # The VAE's downsampling times SD3's patch size; SDXL's UNet pads odd latent sizes itself.
        patch = getattr(getattr(self.pipe, "transformer", None), "config", None)
        patch = getattr(patch, "patch_size", 1) if patch is not None else 1
        return max(8, int(self.pipe.vae_scale_factor * patch))

    # ------------------------------------------------------------------ LoRA
    def load_lora(self, path: str) -> str:
        """Load (once) and return the resolved file; raises FileNotFoundError/ValueError on a bad path."""
        file = resolve_lora_file(path)
        with self.lock:
            if file in self._adapters:
                self._adapters.move_to_end(file)
            else:
                from safetensors import safe_open

                name = _adapter_name(file)
                try:
                    with safe_open(file, framework="pt"):
                        pass
                except Exception as e:  # safetensors raises its own error types for corrupt files
                    raise ValueError(f"LoRA {path!r} is not a readable safetensors file ({type(e).__name__}: {e})") from None
                try:
                    # From the file, not a state dict: diffusers then reads the adapter metadata (lora_alpha).
                    self.pipe.load_lora_weights(os.path.dirname(file), weight_name=os.path.basename(file), adapter_name=name)
                except (ValueError, KeyError, RuntimeError) as e:
                    raise ValueError(f"LoRA {path!r} does not fit the base model {self.source.label}: {e}") from e
                if name not in {n for names in self.pipe.get_list_adapters().values() for n in names}:
                    raise ValueError(f"LoRA {path!r} loaded no weights into the base model {self.source.label}")
                self._adapters[file] = name
                self._evict()
        return file

    def _evict(self):
        """Unload the least recently used LoRAs beyond `max_loras` (never the default one)."""
        while len(self._adapters) > self.max_loras:
            victim = next((f for f in self._adapters if f != self.default_lora), None)
            if victim is None:
                return
            self.pipe.delete_adapters([self._adapters.pop(victim)])

    @property
    def loaded_loras(self) -> list[str]:
        return list(self._adapters)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: str,
        seed: int,
        steps: int,
        size: int,
        guidance: float,
        lora: str | None = None,
        on_step: Callable[[int], None] | None = None,
        pipe=None,
        **pipe_kwargs,
    ):
        """One image. `lora` = a resolved file from `load_lora` (the aligned model), or None (the base).
        `pipe` = another pipeline sharing these components (the personalized one); extra kwargs go to it."""
        def callback(pipe, step, timestep, kwargs):
            if on_step is not None:
                on_step(step + 1)
            return {}

        pipe = pipe or self.pipe
        with self.lock:
            if self._adapters:
                if lora is None:
                    self.pipe.disable_lora()
                else:
                    if lora not in self._adapters:  # evicted by another request since its load_lora
                        self.load_lora(lora)
                    self._adapters.move_to_end(lora)
                    self.pipe.enable_lora()
                    self.pipe.set_adapters([self._adapters[lora]])
            elif lora is not None:
                raise ValueError(f"LoRA {lora!r} was not loaded; call load_lora first")
            # A CPU generator makes the noise identical on every device.
            generator = torch.Generator("cpu").manual_seed(int(seed))
            with torch.no_grad():
                out = pipe(
                    prompt=prompt,
                    num_inference_steps=int(steps),
                    height=int(size),
                    width=int(size),
                    guidance_scale=float(guidance),
                    generator=generator,
                    callback_on_step_end=callback,
                    **pipe_kwargs,
                )
        return out.images[0]
