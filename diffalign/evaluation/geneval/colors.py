"""Zero-shot CLIP colour classification of detected objects, as GenEval does it.

Each crop is the instance mask composited onto a #999999 background, then cropped to the box.
The classifier for an object name averages the L2-normalised text embeddings of three
templates per colour (then re-normalises), and picks the colour with the highest cosine
similarity -- the `clip_benchmark` zero-shot recipe the official code calls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from diffalign.evaluation.geneval.rules import COLORS

TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {object}",
    "a photo of a {c}-colored {object}",
    "a photo of a {c} object",
)
BACKGROUND = "#999999"  # the official "#999"


def make_crop(
    image: Image.Image, box: Sequence[float], mask: np.ndarray | None, background: str = BACKGROUND
) -> Image.Image:
    """The object's pixels (where `mask` is True) on a flat background, cropped to `box`.

    With no mask the crop is taken from the image itself. PIL rounds the float box, as the
    official code relies on.
    """
    image = image.convert("RGB")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"mask shape {mask.shape} does not match the image (H, W) = {(image.height, image.width)}."
            )
        blank = Image.new("RGB", image.size, color=background)
        image = Image.composite(image, blank, Image.fromarray(mask.astype(bool)))
    return image.crop(tuple(float(v) for v in box[:4]))


class ColorClassifier:
    """Zero-shot colour classifier around an open_clip model.

    Build it with `ColorClassifier.from_pretrained("ViT-L-14", "openai")` (the official choice;
    `pretrained` may be a tag or a path to a weights file), or pass a model, its image
    preprocessing transform and tokenizer (tests use a tiny open_clip model built from a config).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess,
        tokenizer,
        *,
        device: str | torch.device = "cpu",
        colors: Sequence[str] = COLORS,
        templates: Sequence[str] = TEMPLATES,
        background: str = BACKGROUND,
        batch_size: int = 16,
        amp: bool | None = None,
    ):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.colors = tuple(colors)
        self.templates = tuple(templates)
        self.background = background
        self.batch_size = batch_size
        # The official run uses clip_benchmark's CUDA autocast (fp16); on CPU we stay in fp32.
        self.amp = (self.device.type == "cuda") if amp is None else amp
        self._classifiers: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_name: str = "ViT-L-14",
        pretrained: str | None = "openai",
        *,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> ColorClassifier:
        """Load an open_clip model; `pretrained` is an open_clip tag or a local weights file."""
        import open_clip

        if pretrained is not None and os.path.sep in pretrained and not os.path.exists(pretrained):
            raise FileNotFoundError(
                f"CLIP weights not found at {pretrained}; pass an existing file or an open_clip tag such as 'openai'."
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device
        )
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), device=device, **kwargs)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    @torch.no_grad()
    def text_classifier(self, object_name: str) -> torch.Tensor:
        """(D, n_colors) float32 zero-shot weights for `object_name`, cached."""
        if object_name not in self._classifiers:
            weights = []
            for color in self.colors:
                texts = [t.format(c=color, object=object_name) for t in self.templates]
                with self._autocast():
                    emb = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
                emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=0)
                weights.append(emb / emb.norm())
            self._classifiers[object_name] = torch.stack(weights, dim=1)
        return self._classifiers[object_name]

    @torch.no_grad()
    def classify(self, image: Image.Image, objects: Sequence[dict], object_name: str) -> list[str]:
        """Colour name of each object (`{"box", "mask"}` dicts) of class `object_name` in `image`."""
        if not objects:
            return []
        weights = self.text_classifier(object_name)
        crops = [make_crop(image, obj["box"], obj.get("mask"), self.background) for obj in objects]
        out: list[str] = []
        for start in range(0, len(crops), self.batch_size):
            pixels = torch.stack([self.preprocess(c) for c in crops[start : start + self.batch_size]]).to(
                self.device
            )
            with self._autocast():
                feats = self.model.encode_image(pixels).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
            out.extend(self.colors[i] for i in (feats @ weights).argmax(dim=1).tolist())
        return out
