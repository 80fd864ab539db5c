"""Image decoding and preprocessing: resize the shorter side, crop, optional flip, to [-1, 1] float32.

We also return what SDXL's micro-conditioning needs: the image's original (h, w) and the crop's (top, left),
measured the way diffusers' SDXL training script does (crop coordinates in the resized, possibly flipped image).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffalign.data.errors import SKIP_HINT, DataError


def decode_image(value: Any, *, row: int | None = None, column: str | None = None) -> Image.Image:
    """Decode image bytes (or a datasets Image struct {bytes, path}) fully into an RGB PIL image.

    `load()` forces the whole decode, so truncated files fail here, with the row and column named.
    """
    if isinstance(value, dict):  # datasets.Image() storage
        data, path = value.get("bytes"), value.get("path")
        if data is None and path:
            if not os.path.exists(path):
                raise DataError(
                    f"image path {path!r} does not exist.", row=row, column=column, fix=f"embed the image bytes, {SKIP_HINT}."
                )
            value = _read_file(path)
        else:
            value = data
    if value is None:
        raise DataError("image is null.", row=row, column=column, fix=f"drop or re-export this row, {SKIP_HINT}.")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise DataError(
            f"expected encoded image bytes (PNG/JPEG), got {type(value).__name__}.",
            row=row,
            column=column,
            fix="store images as PNG/JPEG bytes (binary column).",
        )
    try:
        with Image.open(io.BytesIO(bytes(value))) as image:
            image.load()
            return to_rgb(image)
    except Exception as error:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DataError(
            f"cannot decode the image ({len(value)} bytes; {type(error).__name__}: {error}).",
            row=row,
            column=column,
            fix=f"re-export this row's image, remove the row, {SKIP_HINT}.",
        ) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16- and 32-bit integer images are scaled to 0..255 first: PIL's own convert("RGB")
    clips them, so a 16-bit PNG comes out nearly white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        values = np.asarray(image).astype(np.float64)
        wide = image.mode.startswith("I;16") or values.max(initial=0) > 255
        peak = 65535.0 if wide else 255.0
        gray = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@dataclass
class ImageTransform:
    """Resize so the shorter side is `resolution`, crop `resolution` x `resolution`, maybe flip, scale to [-1, 1]."""

    resolution: int = 1024
    crop: str = "center"  # "center" or "random"
    random_flip: bool = False  # flip with probability 0.5

    def __post_init__(self):
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}.")
        if int(self.resolution) < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {self.resolution}.")
        self.resolution = int(self.resolution)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None):
        """Returns (pixels float32 (3, R, R) in [-1, 1], original_size (h, w), crop_top_left (top, left))."""
        if rng is None and (self.crop == "random" or self.random_flip):
            raise ValueError("a random crop/flip needs an rng (np.random.Generator) so that runs are reproducible.")
        res = self.resolution
        width, height = image.size
        original_size = (height, width)
        scale = res / min(width, height)
        new_w, new_h = max(res, round(width * scale)), max(res, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.crop == "center":
            top = int(round((new_h - res) / 2.0))
            left = int(round((new_w - res) / 2.0))
        else:
            top = int(rng.integers(0, new_h - res + 1))
            left = int(rng.integers(0, new_w - res + 1))
        image = image.crop((left, top, left + res, top + res))
        array = np.asarray(image, dtype=np.uint8)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)
        return pixels, original_size, (top, left)

    def config(self) -> dict:
        return {"resolution": self.resolution, "crop": self.crop, "random_flip": self.random_flip}


def item_rng(seed: int, epoch: int, row: int) -> np.random.Generator:
    """Per-item generator: the same (seed, epoch, row) gives the same crop/flip, whatever worker loads it."""
    return np.random.default_rng([int(seed), int(epoch), int(row)])
