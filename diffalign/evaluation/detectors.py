"""Object detector back-ends for GenEval, behind one interface and one registry.

A detector has `detect(image: PIL.Image, class_names: list[str]) -> dict[str, list[dict]]`,
each detection `{"box": [x0, y0, x1, y1], "score": float, "mask": np.ndarray[bool] (H, W) | None,
"color": str | None}`; `class_names` are the detector's labels in label order (GenEval's
`object_names.txt`). A detection that carries `color` skips the CLIP colour classifier.

Back-ends (load with `load_detector(name, **kwargs)`):
- "mask2former": transformers' Mask2Former (pip-installable, CPU or GPU), post-processed the way
  mmdet's Mask2Former does it (see `instance_postprocess`).
- "mmdet": the official mmdet 2.x Mask2Former checkpoint, for parity (optional; needs mmcv/mmdet).
- "toyworld": the toy world's exact detector, `diffalign.toyworld.detector.ToyWorldDetector`.
Targets are imported lazily, so a missing optional dependency only matters when it is used.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image

DEFAULT_MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
MMDET_CONFIG = "configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
MMDET_CHECKPOINT_URL = (
    "https://download.openmmlab.com/mmdetection/v2.0/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco/"
    "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth"
)
MMDET_INSTALL = (
    "The 'mmdet' GenEval detector needs mmdet 2.x and mmcv-full 1.x, which GenEval pins "
    "(it used mmcv-full==1.7.1 with torch 1.12 / CUDA 11.3). Install them with, e.g.:\n"
    '  pip install "diffalign[geneval-mmdet]" && mim install mmcv-full==1.7.1\n'
    "(mmcv-full needs a build matching your torch and CUDA), or use the pip-only back-end: --detector mask2former."
)


class Detector(Protocol):
    def detect(self, image: Image.Image, class_names: list[str]) -> dict[str, list[dict]]: ...


_REGISTRY: dict[str, str] = {
    "mask2former": "diffalign.evaluation.detectors:Mask2FormerDetector",
    "mmdet": "diffalign.evaluation.detectors:MMDetDetector",
    "toyworld": "diffalign.toyworld.detector:ToyWorldDetector",
}


def register_detector(name: str, target: str) -> None:
    """Register `"package.module:Factory"` under `name` (imported only when loaded)."""
    if ":" not in target:
        raise ValueError(f"Detector target must look like 'package.module:Factory', got {target!r}.")
    _REGISTRY[name] = target


def available_detectors() -> list[str]:
    return sorted(_REGISTRY)


def load_detector(name: str, **kwargs) -> Detector:
    """Build the detector registered as `name` with `kwargs` (e.g. `load_detector("mask2former", device="cuda")`)."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown GenEval detector {name!r}; available: {available_detectors()}.")
    module_name, attr = _REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ImportError(
            f"Detector {name!r} needs module {module_name!r}, which could not be imported: {e}"
        ) from e
    return getattr(module, attr)(**kwargs)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) float32 tight boxes [x0, y0, x1 + 1, y1 + 1]; zeros for empty masks (mmdet's mask2bbox)."""
    n = masks.shape[0]
    boxes = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    if n == 0:
        return boxes
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    w, h = cols.shape[1], rows.shape[1]
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    nonempty = cols.any(dim=1) & rows.any(dim=1)
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ys, h).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    stacked = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[nonempty] = stacked[nonempty]
    return boxes


def instance_postprocess(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    padded_size: tuple[int, int],
    valid_size: tuple[int, int],
    image_size: tuple[int, int],
    max_per_image: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask2Former query outputs of one image -> (labels (K,), scores (K,), binary masks (K, H, W)).

    As mmdet 2.x's `MaskFormerFusionHead` does for instance results: mask logits are resized
    (bilinear) to the padded input, cropped to the resized image, resized to the original size;
    the top `max_per_image` (query, class) pairs by class probability (no-object column dropped)
    are kept; score = class probability x mean foreground probability inside the mask (> 0 logits).
    """
    num_classes = class_logits.shape[1] - 1
    probs = class_logits.float().softmax(dim=-1)[:, :-1]
    k = min(max_per_image, probs.numel())
    top_scores, top_idx = probs.flatten().topk(k, sorted=True)
    labels = top_idx % num_classes
    queries = top_idx // num_classes
    # Resize only the chosen queries (the same result as resizing all of them first, less memory).
    logits = mask_logits[queries].float()[None]
    logits = torch.nn.functional.interpolate(
        logits, size=tuple(padded_size), mode="bilinear", align_corners=False
    )
    logits = logits[:, :, : valid_size[0], : valid_size[1]]
    logits = torch.nn.functional.interpolate(
        logits, size=tuple(image_size), mode="bilinear", align_corners=False
    )[0]
    binary = logits > 0
    mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return labels, top_scores * mask_scores, binary


class Mask2FormerDetector:
    """transformers' `Mask2FormerForUniversalSegmentation` as a GenEval detector.

    `test_size=(800, 1333)` resizes like mmdet's test pipeline (shorter side 800, longer at most
    1333); pass None to use the processor's own size. Pass `model` and `processor` to use
    already-built objects (tests build a tiny random one offline). `min_score` drops detections
    scoring <= it before their masks leave the GPU; GenEval's rules keep only scores above the
    threshold, so `min_score = min(threshold, counting_threshold)` changes no verdict (the CLI
    sets it that way) and saves copying ~100 full-size masks per image.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MASK2FORMER,
        *,
        model=None,
        processor=None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        test_size: tuple[int, int] | None = (800, 1333),
        max_per_image: int = 100,
        min_score: float | None = None,
        local_files_only: bool = False,
    ):
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        if model is None:
            model = Mask2FormerForUniversalSegmentation.from_pretrained(
                model_name_or_path, local_files_only=local_files_only
            )
            if processor is None:
                processor = Mask2FormerImageProcessor.from_pretrained(
                    model_name_or_path, local_files_only=local_files_only
                )
        if processor is None:
            processor = Mask2FormerImageProcessor()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.model = model.eval().to(self.device, dtype)
        self.processor = processor
        self.test_size = test_size
        self.max_per_image = max_per_image
        self.min_score = min_score

    @torch.no_grad()
    def detect(self, image: Image.Image, class_names: list[str]) -> dict[str, list[dict]]:
        num_labels = self.model.config.num_labels
        if len(class_names) != num_labels:
            raise ValueError(
                f"The Mask2Former model has {num_labels} labels but {len(class_names)} class names were given; "
                "pass the names in the model's label order (GenEval's object_names.txt for COCO)."
            )
        image = image.convert("RGB")
        kwargs = {}
        if self.test_size is not None:
            kwargs["size"] = {"shortest_edge": self.test_size[0], "longest_edge": self.test_size[1]}
        inputs = self.processor(images=image, return_tensors="pt", **kwargs)
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        pixel_mask = inputs["pixel_mask"]
        valid = (int(pixel_mask[0].any(dim=1).sum()), int(pixel_mask[0].any(dim=0).sum()))
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask.to(self.device))
        labels, scores, masks = instance_postprocess(
            outputs.class_queries_logits[0],
            outputs.masks_queries_logits[0],
            padded_size=tuple(pixel_values.shape[-2:]),
            valid_size=valid,
            image_size=(image.height, image.width),
            max_per_image=self.max_per_image,
        )
        boxes = masks_to_boxes(masks)
        keep = masks.flatten(1).any(
            dim=1
        )  # an empty mask scores 0 and has no box; mmdet keeps it, no threshold can
        if self.min_score is not None:
            keep &= scores > self.min_score
        return _group(labels[keep], scores[keep], boxes[keep], masks[keep], class_names)


def _group(labels, scores, boxes, masks, class_names: Sequence[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    labels, scores, boxes = labels.tolist(), scores.float().cpu().tolist(), boxes.cpu().tolist()
    masks = masks.cpu().numpy() if masks is not None else None
    for i, label in enumerate(labels):
        out.setdefault(class_names[label], []).append(
            {
                "box": boxes[i],
                "score": float(scores[i]),
                "mask": None if masks is None else masks[i],
                "color": None,
            }
        )
    return out


class MMDetDetector:
    """The official GenEval detector: mmdet 2.x Mask2Former Swin-S (COCO), for parity runs.

    `checkpoint` is the .pth file GenEval downloads (`MMDET_CHECKPOINT_URL`); `config` defaults to
    the Mask2Former config shipped with mmdet.
    """

    def __init__(self, checkpoint: str | None = None, config: str | None = None, device: str | None = None):
        try:
            import mmdet
            from mmdet.apis import inference_detector, init_detector
        except (ImportError, AssertionError) as e:  # mmdet 2.x asserts a compatible mmcv version on import
            raise ImportError(f"{MMDET_INSTALL}\n(import failed with: {type(e).__name__}: {e})") from e
        if checkpoint is None or not os.path.isfile(checkpoint):
            raise FileNotFoundError(
                f"mmdet checkpoint not found: {checkpoint!r}. Download it (as GenEval's download_models.sh does) from\n"
                f"  {MMDET_CHECKPOINT_URL}\nand pass --mmdet_checkpoint PATH."
            )
        if config is None:
            root = os.path.dirname(mmdet.__file__)
            candidates = [os.path.join(root, "..", MMDET_CONFIG), os.path.join(root, ".mim", MMDET_CONFIG)]
            config = next((c for c in candidates if os.path.isfile(c)), None)
            if config is None:
                raise FileNotFoundError(
                    f"mmdet's Mask2Former config was not found under {root}; pass --mmdet_config PATH."
                )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = init_detector(config, checkpoint, device=self.device)
        self._infer = inference_detector

    def detect(self, image: Image.Image, class_names: list[str]) -> dict[str, list[dict]]:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # mmdet reads files as BGR
        result = self._infer(self.model, bgr)
        out: dict[str, list[dict]] = {}
        if hasattr(result, "pred_instances"):  # mmdet 3.x DetDataSample
            inst = result.pred_instances
            masks = inst.masks.cpu().numpy().astype(bool) if "masks" in inst else None
            for i, (label, score, box) in enumerate(
                zip(inst.labels.tolist(), inst.scores.tolist(), inst.bboxes.tolist())
            ):
                out.setdefault(class_names[label], []).append(
                    {
                        "box": box,
                        "score": float(score),
                        "mask": None if masks is None else masks[i],
                        "color": None,
                    }
                )
            return out
        bbox = result[0] if isinstance(result, tuple) else result  # mmdet 2.x: per-class (n, 5) arrays
        segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        if len(bbox) != len(class_names):
            raise ValueError(
                f"mmdet returned {len(bbox)} classes but {len(class_names)} class names were given."
            )
        for c, name in enumerate(class_names):
            for j, row in enumerate(bbox[c]):
                mask = None if segm is None else np.asarray(segm[c][j], dtype=bool)
                out.setdefault(name, []).append(
                    {"box": [float(v) for v in row[:4]], "score": float(row[4]), "mask": mask, "color": None}
                )
        return out
