"""GenEval's scoring rules as pure functions (no models, no I/O).

A faithful re-implementation of the rules in the official `evaluation/evaluate_images.py`
(github.com/djghosh13/geneval, Ghosh et al. 2023). Same thresholds, same order of operations,
same `reason` strings. Quirks of the official code that we reproduce on purpose:

- Confidence filter is strict (`score > threshold`, compared in float32 as numpy does for mmdet's
  float32 scores); counting prompts use `counting_threshold`
  (0.9) for every class of the prompt, include AND exclude clauses alike.
- Per class: sort by score (descending), keep `score > threshold`, cap to `max_objects`, THEN the
  greedy IoU suppression runs on what is left (so the cap applies before NMS). Ties in score are
  ordered like numpy's `argsort(...)[::-1]` with a stable sort (the later detection first), which
  is what the official code gets for up to 16 candidates.
- `nms_threshold == 1.0` (the default) disables suppression entirely, even for identical boxes;
  otherwise a box is dropped when its IoU with a kept box is >= the threshold. IoU uses the
  inclusive-pixel convention (+1 on widths and heights), as mmdet 1.x did.
- Include clauses look only at the `count` most confident detections of the class; exclude
  clauses count ALL kept detections. For counting prompts ("two clocks": include clock>=2,
  exclude clock>=3) this means: at least 2 and at most 2 detections above 0.9.
- The colour check runs on those top-`count` objects only; a position clause is checked only
  when the colour check (if any) passed, and needs every (object, target) pair to satisfy it.
  A group that failed is recorded as "no target" for later position clauses.
- Relative position: centre offset minus `position_threshold` x (sum of the two boxes' sizes),
  clamped at 0 per axis, then divided by the norm of the ORIGINAL offset (not the revised one),
  compared with +-0.5. Computed in float32 like the official numpy code on mmdet's float32 boxes.
  If both revised components are below 1e-3 there is no relation at all ("no-relation zone").
- The official reason for a failed position joins a Python `set` of relations, whose order varies
  with the hash seed; we list relations in the fixed order left of, right of, above, below. With
  no relation the official string has two spaces ("found  target"); we keep that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# Official defaults (evaluate_images.py `--options`).
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
POSITION_THRESHOLD = 0.1


def validate_metadata(metadata: Mapping) -> None:
    """Raise ValueError naming the problem if `metadata` is not a GenEval prompt record."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"GenEval metadata must be a dict, got {type(metadata).__name__}.")
    for key in ("tag", "prompt", "include"):
        if key not in metadata:
            raise ValueError(f"GenEval metadata is missing '{key}': {dict(metadata)!r}")
    if metadata["tag"] not in TAGS:
        raise ValueError(f"Unknown GenEval tag {metadata['tag']!r}; expected one of {TAGS}.")
    for kind in ("include", "exclude"):
        clauses = metadata.get(kind, [])
        if not isinstance(clauses, list):
            raise ValueError(f"GenEval metadata '{kind}' must be a list, got {clauses!r}.")
        for i, clause in enumerate(clauses):
            if not isinstance(clause, Mapping) or "class" not in clause or "count" not in clause:
                raise ValueError(f"GenEval {kind} clause {i} needs 'class' and 'count': {clause!r}")
            if not isinstance(clause["count"], int) or clause["count"] < 1:
                raise ValueError(
                    f"GenEval {kind} clause {i} has a bad count {clause['count']!r}; use an int >= 1."
                )
            if "position" in clause:
                if kind != "include":
                    raise ValueError(
                        f"A position is only allowed in include clauses, found in {kind} clause {i}."
                    )
                rel, target = clause["position"]
                if rel not in RELATIONS:
                    raise ValueError(
                        f"Unknown relation {rel!r} in include clause {i}; expected one of {RELATIONS}."
                    )
                if not isinstance(target, int) or not 0 <= target < i:
                    raise ValueError(
                        f"Include clause {i} refers to target group {target!r}; it must be an earlier clause index (0..{i - 1})."
                    )


def _check_detection(name: str, i: int, det: Mapping) -> None:
    box = det.get("box") if isinstance(det, Mapping) else None
    if box is None or len(box) < 4:
        raise ValueError(f"Detection {i} of class {name!r} needs a 'box' [x0, y0, x1, y1]; got {det!r}")
    score = det.get("score")
    if score is None or not math.isfinite(float(score)):
        raise ValueError(f"Detection {i} of class {name!r} needs a finite 'score'; got {score!r}")


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with inclusive pixel coordinates (+1 on each side), as the official code computes it."""

    def area(b):
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area(
        [max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])]
    )
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def filter_detections(
    detections: Mapping[str, Sequence[Mapping]],
    tag: str,
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[Mapping]]:
    """Confidence filter, sort, cap per class, optional greedy IoU suppression.

    Returns a dict class -> kept detections (the same dict objects, most confident first);
    classes with nothing kept are absent, as in the official code.
    """
    confidence = counting_threshold if tag == "counting" else threshold
    kept: dict[str, list[Mapping]] = {}
    for name, dets in detections.items():
        dets = list(dets)
        for i, det in enumerate(dets):
            _check_detection(name, i, det)
        if not dets:
            continue
        # float32, like the official comparison of mmdet's float32 scores with a Python float.
        scores = np.asarray([float(d["score"]) for d in dets], dtype=np.float32)
        order = np.argsort(scores, kind="stable")[::-1]
        order = [int(i) for i in order if scores[i] > np.float32(confidence)][:max_objects]
        chosen: list[Mapping] = []
        while order:
            best = order.pop(0)
            chosen.append(dets[best])
            if nms_threshold != 1:
                order = [j for j in order if compute_iou(dets[best]["box"], dets[j]["box"]) < nms_threshold]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = POSITION_THRESHOLD
) -> tuple[str, ...]:
    """Relations of box A relative to box B, in the fixed order of RELATIONS (y grows downwards)."""
    boxes = np.asarray([list(box_a)[:4], list(box_b)[:4]], dtype=np.float32).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - np.float32(position_threshold) * (dim_a + dim_b), 0) * np.sign(
        offset
    )
    if np.all(np.abs(revised) < 1e-3):
        return ()
    dx, dy = revised / np.linalg.norm(offset)
    relations = []
    if dx < -0.5:
        relations.append("left of")
    if dx > 0.5:
        relations.append("right of")
    if dy < -0.5:
        relations.append("above")
    if dy > 0.5:
        relations.append("below")
    return tuple(relations)


def evaluate_clauses(
    metadata: Mapping,
    objects: Mapping[str, Sequence[Mapping]],
    *,
    position_threshold: float = POSITION_THRESHOLD,
) -> tuple[bool, str]:
    """Apply the include/exclude clauses to already-filtered detections (see `filter_detections`)."""
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Mapping] | None] = []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        matched = True
        found = list(objects.get(name, []))[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colors = [obj.get("color") for obj in found]
                if any(c is None for c in colors):
                    raise ValueError(
                        f"A {name!r} detection matched by a colour clause has no 'color'; classify it first "
                        "(diffalign.evaluation.geneval.colors.ColorClassifier) or have the detector set it."
                    )
                want = clause["color"]
                if colors.count(want) < count:
                    correct = matched = False
                    reasons.append(
                        f"expected {want} {name}>={count}, found {colors.count(want)} {want}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    )
            if "position" in clause and matched:
                relation, target = clause["position"]
                if matched_groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for target_obj in matched_groups[target]:
                            actual = relative_position(obj["box"], target_obj["box"], position_threshold)
                            if relation not in actual:
                                correct = matched = False
                                reasons.append(
                                    f"expected {name} {relation} target, found {' and '.join(actual)} target"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        n = len(objects.get(name, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {n}")
    return correct, "\n".join(reasons)


def colour_requests(metadata: Mapping, objects: Mapping[str, Sequence[Mapping]]) -> list[tuple[str, int]]:
    """(class, index) of the filtered detections whose colour the rules will read.

    Mirrors the official laziness: colours are classified only for the top-`count` objects of
    an include clause with a colour, and only when there are enough of them.
    """
    wanted: list[tuple[str, int]] = []
    for clause in metadata.get("include", []):
        if "color" not in clause:
            continue
        found = list(objects.get(clause["class"], []))[: clause["count"]]
        if len(found) < clause["count"]:
            continue
        wanted.extend((clause["class"], i) for i in range(len(found)) if (clause["class"], i) not in wanted)
    return wanted


def score_detections(
    metadata: Mapping,
    detections: Mapping[str, Sequence[Mapping]],
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
    position_threshold: float = POSITION_THRESHOLD,
) -> tuple[bool, str]:
    """GenEval's verdict for one image.

    `detections` maps a class name to raw detections `{"box": [x0, y0, x1, y1], "score": float,
    "color": str | None}` (any order; unknown keys ignored). Detections read by a colour clause
    must carry a colour. Returns `(correct, reason)`; `reason` is "" when correct.
    """
    validate_metadata(metadata)
    kept = filter_detections(
        detections,
        metadata["tag"],
        threshold=threshold,
        counting_threshold=counting_threshold,
        max_objects=max_objects,
        nms_threshold=nms_threshold,
    )
    return evaluate_clauses(metadata, kept, position_threshold=position_threshold)
