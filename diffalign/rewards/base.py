"""The reward-model interface, its registry, and the image preprocessing every CLIP-style reward shares.

A reward model maps (image, prompt) pairs to one float each, higher is better:

    reward = diffalign.rewards.load("clip_score", model_name="ViT-L-14", pretrained="openai")
    scores = reward.score(images, prompts)          # FloatTensor (N,)

`images` is a list of PIL images (scored through the model's own preprocessing, exactly as
its authors did) or a float tensor (N, 3, H, W) in [-1, 1] (scored through a torch re-implementation
of the same resize / centre-crop / normalise, so gradients flow back to the pixels).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation, used by CLIP ViT-L/14, PickScore, HPSv2 and the LAION aesthetic predictor.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    """Resize the shorter side to `size` (bicubic, antialiased), centre-crop `size` x `size`, normalise."""

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    # torchvision / transformers rule: the short side becomes `size`, the long side int(size * long / short).
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def preprocess_tensor(images: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Differentiable twin of the PIL preprocessing: [-1, 1] (N, 3, H, W) -> normalised (N, 3, size, size)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    x = (images.float() + 1.0) / 2.0
    h, w = x.shape[-2:]
    new_h, new_w = resized_shape(h, w, cfg.size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode=cfg.interpolation, align_corners=False, antialias=True)
        # PIL clamps bicubic overshoot when it writes uint8 pixels; do the same.
        x = x.clamp(0.0, 1.0)
    top = int(round((new_h - cfg.size) / 2.0))
    left = int(round((new_w - cfg.size) / 2.0))
    x = x[:, :, top : top + cfg.size, left : left + cfg.size]
    mean = torch.tensor(cfg.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def resolve_file(path_or_hub: str, what: str) -> str:
    """A local file, or `owner/repo/path/in/repo` on the Hugging Face Hub (downloaded only when asked for)."""
    if os.path.isfile(path_or_hub):
        return path_or_hub
    parts = path_or_hub.split("/")
    if len(parts) >= 3 and not os.path.isabs(path_or_hub) and not path_or_hub.startswith("."):
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))
    raise FileNotFoundError(
        f"{what}: {path_or_hub!r} is neither a local file nor a Hub file reference 'owner/repo/filename'."
    )


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """safetensors, or a torch pickle read with weights_only=True (never arbitrary objects)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    # Checkpoints saved from DDP carry a 'module.' prefix.
    return {k.removeprefix("module."): v for k, v in obj.items()}


class RewardModel(torch.nn.Module):
    """Base class: batching, device/dtype placement, PIL vs tensor input. Subclasses implement `_score`.

    `_score(pixel_values, prompts)` receives normalised pixels (N, 3, S, S) in the model's dtype and
    returns (N,) scores. Parameters are frozen: gradients flow only to tensor inputs.
    """

    name: str = "reward"

    def __init__(self, preprocess: PreprocessConfig, pil_transform: Callable | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 batch_size: int = 16):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.preprocess = preprocess
        self.pil_transform = pil_transform
        self.device_ = torch.device(device) if device is not None else default_device()
        self.dtype_ = resolve_dtype(dtype)
        self.batch_size = batch_size

    def _finish_init(self) -> None:
        # Call at the end of a subclass __init__, once its modules exist.
        self.eval()
        self.requires_grad_(False)
        self.to(device=self.device_, dtype=self.dtype_)

    def _score(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def preprocess_pil(self, images: Sequence) -> torch.Tensor:
        from PIL import Image

        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"image {i} is a {type(im).__name__}; pass PIL images or one (N, 3, H, W) tensor")
        if self.pil_transform is not None:
            return torch.stack([self.pil_transform(im.convert("RGB")) for im in images])
        import numpy as np

        # Images may differ in size: preprocess one at a time, then stack.
        return torch.cat([
            preprocess_tensor(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
                              / 127.5 - 1.0, self.preprocess)
            for im in images])

    def score(self, images, prompts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Scores (N,) float32 on the model's device. Tensor input keeps the autograd graph."""
        prompts = list(prompts)
        n = len(images)
        if n != len(prompts):
            raise ValueError(f"got {n} images but {len(prompts)} prompts; pass one prompt per image")
        if n == 0:
            return torch.zeros(0, dtype=torch.float32, device=self.device_)
        bs = batch_size or self.batch_size
        is_tensor = isinstance(images, torch.Tensor)
        out = []
        with torch.set_grad_enabled(is_tensor and torch.is_grad_enabled()):
            for start in range(0, n, bs):
                chunk = images[start : start + bs]
                if is_tensor:
                    pixels = preprocess_tensor(chunk.to(self.device_), self.preprocess)
                else:
                    pixels = self.preprocess_pil(chunk)
                pixels = pixels.to(device=self.device_, dtype=self.dtype_)
                out.append(self._score(pixels, prompts[start : start + bs]).float())
        return torch.cat(out)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, device={self.device_}, dtype={self.dtype_}, size={self.preprocess.size}"


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., RewardModel]] = {}


def register_reward(name: str, factory: Callable[..., RewardModel] | None = None):
    """Register a factory `(**kwargs) -> RewardModel` under `name`. Use as a decorator or call directly."""

    def _register(fn):
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered; pick another name")
        _REGISTRY[name] = fn
        return fn

    return _register(factory) if factory is not None else _register


# Packages (the toy world among them) register rewards of their own through this entry-point group; they are
# imported on first need, so `load("toy_clip")` works without importing the toy world first.
PLUGIN_GROUP = "diffalign.rewards"
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    from importlib.metadata import entry_points

    _plugins_loaded = True
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as e:
            raise ImportError(f"reward plugin {ep.name!r} ({ep.value}, entry-point group {PLUGIN_GROUP!r}) "
                              f"failed to import: {e}") from e


def available() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def load(name: str, **kwargs) -> RewardModel:
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(available())}")
    model = _REGISTRY[name](**kwargs)
    model.name = name if model.name == "reward" else model.name
    return model
