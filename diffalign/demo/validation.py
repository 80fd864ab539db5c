"""Input checks for the demo. Each raises `DemoInputError` (a ValueError) naming the problem and the fix;
the app turns it into a visible `gr.Error` and keeps serving."""

from __future__ import annotations

import math
import os

from PIL import Image, UnidentifiedImageError

MAX_SEED = 2**32 - 1


class DemoInputError(ValueError):
    """Bad user input: shown to the user as is."""


def check_prompt(prompt, max_chars: int) -> str:
    if prompt is None or not str(prompt).strip():
        raise DemoInputError("The prompt is empty: type a prompt or pick one of the examples.")
    prompt = str(prompt).strip()
    if len(prompt) > max_chars:
        raise DemoInputError(f"The prompt has {len(prompt)} characters; the limit is {max_chars}. Shorten it.")
    return prompt


def _as_int(value, name: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(f) or f != int(f):
        raise DemoInputError(f"{name} must be a whole number, got {value!r}.")
    return int(f)


def check_steps(steps, max_steps: int) -> int:
    steps = _as_int(steps, "steps")
    if not (1 <= steps <= max_steps):
        raise DemoInputError(f"steps={steps} is outside the allowed range 1..{max_steps}; pick fewer steps.")
    return steps


def check_size(size, min_size: int, max_size: int, multiple: int = 8) -> int:
    size = _as_int(size, "size")
    if not (min_size <= size <= max_size):
        raise DemoInputError(f"size={size} px is outside the allowed range {min_size}..{max_size} px.")
    if size % multiple:
        raise DemoInputError(f"size={size} px must be a multiple of {multiple} (the latent grid); try {size - size % multiple}.")
    return size


def check_seed(seed) -> int:
    seed = _as_int(seed, "seed")
    if not (0 <= seed <= MAX_SEED):
        raise DemoInputError(f"seed={seed} must be in 0..{MAX_SEED}.")
    return seed


def check_float(name: str, value, low: float, high: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number, got {value!r}.") from None
    if not (math.isfinite(v) and low <= v <= high):
        raise DemoInputError(f"{name}={value} is outside the allowed range {low}..{high}.")
    return v


def check_guidance(guidance, max_guidance: float) -> float:
    return check_float("guidance", guidance, 0.0, max_guidance)


def upload_path(upload) -> str:
    """The server-side path of a gradio upload (a str, a FileData-like object, or a dict with 'path')."""
    if isinstance(upload, str):
        return upload
    if isinstance(upload, dict) and "path" in upload:
        return upload["path"]
    path = getattr(upload, "path", None) or getattr(upload, "name", None)
    if not isinstance(path, str):
        raise DemoInputError(f"could not read the upload {upload!r}; upload PNG or JPEG files.")
    return path


def open_image_upload(upload, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open an uploaded image after checking its byte size and pixel count (before decoding the pixels)."""
    path = upload_path(upload)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DemoInputError(f"the upload {name!r} is missing on the server; upload it again.")
    n_bytes = os.path.getsize(path)
    if n_bytes > max_bytes:
        raise DemoInputError(f"the upload {name!r} has {n_bytes / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB.")
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise DemoInputError(
                    f"the upload {name!r} is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels. Downscale it."
                )
            im.load()
            return im.convert("RGB")
    except DemoInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        detail = str(e).replace(path, name)  # no server paths in messages
        raise DemoInputError(f"the upload {name!r} is not a readable image ({type(e).__name__}: {detail}); upload a PNG or JPEG.") from None
