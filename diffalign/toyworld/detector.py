"""The exact toy-world detector: the `toyworld` back-end of GenEval.

Generated images do not hold exact palette colours, so the detector works in four robust steps:

1. background: the median colour of the image border; every pixel gets the nearest of the 10 palette
   colours or the background colour (foreground = not background);
2. a 3x3 majority filter on those labels removes speckles and one-pixel colour fringes;
3. connected components per colour; a component whose morphological opening keeps fewer than
   `min_area` pixels is noise (thin fringes, stray dots) and is dropped;
4. shape: a ring if background shows through a hole in the component; otherwise the upright template
   (circle, square, triangle, star) stretched to the component's box with the highest IoU.

Each detection carries its colour, so GenEval's CLIP colour classifier is not needed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from diffalign.toyworld.scenes import COLORS, PALETTE, SHAPES, shape_mask

_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (10, 3)
_EIGHT = np.ones((3, 3), dtype=bool)


def shape_features(mask: np.ndarray, background: np.ndarray) -> dict[str, float]:
    """template IoUs, hole fraction and extent of one component (`background`: where the background label is)."""
    area = float(mask.sum())
    filled = ndimage.binary_fill_holes(mask)
    holes = float((filled & ~mask & background).sum())
    ys, xs = np.nonzero(mask)
    box_area = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    filled_area = float(filled.sum())
    ious = template_scores(filled)
    return {
        **{"iou_" + k: v for k, v in ious.items()},
        "hole_fraction": holes / filled_area,
        "extent": filled_area / box_area,
        "area": area,
    }


_TEMPLATE_RES = 48


def _templates() -> dict[str, np.ndarray]:
    """Each filled shape cropped to its own box, as a float mask at a fixed resolution."""
    out = {}
    for shape in ("circle", "square", "triangle", "star"):
        m = shape_mask(shape, 100.0, 100.0, 80.0, size=200)
        ys, xs = np.nonzero(m)
        crop = Image.fromarray((m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] * 255).astype(np.uint8))
        out[shape] = np.asarray(crop.resize((_TEMPLATE_RES, _TEMPLATE_RES), Image.BILINEAR), dtype=np.float32) / 255.0
    return out


_TEMPLATE_MASKS = _templates()


def template_scores(filled: np.ndarray) -> dict[str, float]:
    """IoU of a filled component (cropped to its box) with each upright shape template stretched to that box."""
    ys, xs = np.nonzero(filled)
    crop = filled[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    img = Image.fromarray((crop * 255).astype(np.uint8)).resize((_TEMPLATE_RES, _TEMPLATE_RES), Image.BILINEAR)
    m = np.asarray(img, dtype=np.float32) / 255.0
    out = {}
    for shape, t in _TEMPLATE_MASKS.items():
        inter = np.minimum(m, t).sum()
        union = np.maximum(m, t).sum()
        out[shape] = float(inter / max(union, 1e-6))
    return out


def classify_shape(f: dict[str, float]) -> str:
    """A ring if background shows through a hole, else the best-matching template."""
    if f["hole_fraction"] > 0.08:
        return "ring"
    return max(("circle", "square", "triangle", "star"), key=lambda s: f["iou_" + s])


class ToyWorldDetector:
    """`detect(image, class_names) -> {class: [{"box", "score", "mask", "color"}, ...]}` for toy scenes.

    `min_area` is in pixels of a 64x64 image and scales with the image area.
    """

    def __init__(self, min_area: int = 12, smooth: bool = True):
        if min_area < 1:
            raise ValueError(f"min_area must be >= 1 pixel, got {min_area}")
        self.min_area = min_area
        self.smooth = smooth

    def segment(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel labels 0..9 (palette colour index) or 10 (background): (smoothed, raw)."""
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
        border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)])
        bg = np.median(border, axis=0)
        refs = np.concatenate([_PALETTE, bg[None]], 0)  # (11, 3)
        dist = ((arr[:, :, None, :] - refs[None, None]) ** 2).sum(-1)  # (H, W, 11)
        labels = raw = dist.argmin(-1)
        if self.smooth:
            onehot = (labels[None] == np.arange(len(refs))[:, None, None]).astype(np.float32)
            votes = ndimage.uniform_filter(onehot, size=(1, 3, 3), mode="nearest")
            # Ties keep the pixel's own label.
            votes += 1e-3 * onehot
            labels = votes.argmax(0)
        return labels, raw

    def objects(self, image: Image.Image) -> list[dict]:
        """Every object found: {"shape", "color", "box", "score", "mask", "features"}."""
        labels, raw = self.segment(image)
        h, w = labels.shape
        min_area = max(1.0, self.min_area * (h * w) / (64 * 64))
        background = labels == len(COLORS)
        found = []
        for ci, colour in enumerate(COLORS):
            comp, n = ndimage.label(labels == ci, structure=_EIGHT)
            for k in range(1, n + 1):
                mask = comp == k
                core = float(ndimage.binary_opening(mask, structure=_EIGHT).sum())
                if core < min_area:
                    continue
                # The filter rounds thin star tips: measure the shape on the raw labels near the component.
                mask = (raw == ci) & ndimage.binary_dilation(mask, structure=_EIGHT, iterations=2)
                f = shape_features(mask, background)
                ys, xs = np.nonzero(mask)
                found.append(
                    {
                        "shape": classify_shape(f),
                        "color": colour,
                        "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                        # Objects clearly above the noise floor are certain; near it the score falls below
                        # GenEval's counting threshold (0.9) so borderline blobs do not count.
                        "score": float(min(1.0, core / (2.0 * min_area))),
                        "mask": mask,
                        "features": f,
                    }
                )
        return found

    def detect(self, image: Image.Image, class_names: list[str]) -> dict[str, list[dict]]:
        unknown = [c for c in class_names if c not in SHAPES]
        if unknown:
            raise ValueError(f"the toy-world detector knows the shapes {SHAPES}; it cannot detect {unknown}")
        if not isinstance(image, Image.Image):
            raise TypeError(f"detect expects a PIL image, got {type(image).__name__}")
        out: dict[str, list[dict]] = {c: [] for c in class_names}
        for obj in self.objects(image):
            if obj["shape"] in out:
                out[obj["shape"]].append({k: obj[k] for k in ("box", "score", "mask", "color")})
        for dets in out.values():
            dets.sort(key=lambda d: -d["score"])
        return out


def score_images(images: list[Image.Image], rows: list[dict], detector: ToyWorldDetector | None = None) -> list[bool]:
    """GenEval's verdict (official rules, `score_detections`) for each image against its metadata row."""
    from diffalign.evaluation.geneval.rules import score_detections

    if len(images) != len(rows):
        raise ValueError(f"got {len(images)} images for {len(rows)} metadata rows; pass one row per image")
    detector = detector or ToyWorldDetector()
    out = []
    for image, row in zip(images, rows):
        names = sorted({c["class"] for c in row.get("include", []) + row.get("exclude", [])})
        out.append(bool(score_detections(row, detector.detect(image, names))[0]))
    return out


def summarize(rows: list[dict], correct: list[bool]) -> dict[str, float]:
    """Accuracy per task, GenEval overall (mean of the task accuracies) and binomial standard errors."""
    if len(rows) != len(correct):
        raise ValueError(f"{len(rows)} rows but {len(correct)} verdicts")
    by_task: dict[str, list[bool]] = {}
    for row, ok in zip(rows, correct):
        by_task.setdefault(row["tag"], []).append(bool(ok))
    out: dict[str, float] = {}
    var = 0.0
    for task, oks in by_task.items():
        p = float(np.mean(oks))
        out[task] = p
        out[task + "_se"] = float(np.sqrt(p * (1 - p) / len(oks)))
        var += p * (1 - p) / len(oks)
    out["overall"] = float(np.mean([out[t] for t in by_task]))
    out["overall_se"] = float(np.sqrt(var) / len(by_task))
    out["n_images"] = float(len(rows))
    return out
