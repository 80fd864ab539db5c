"""Procedural toy scenes and a GenEval-style prompt grammar.

A scene is 1-4 flat-coloured shapes on a grey, lightly textured background, rendered at 64x64
without anti-aliasing so that every object pixel holds (a jittered copy of) its palette colour.
Prompts follow the official GenEval phrasing ("a photo of a red circle and a blue square") and the
metadata rows use GenEval's format (`tag`, `include`, `exclude`, `prompt`), so the same scoring rules apply.

Everything is deterministic given a `numpy.random.Generator` (or an integer seed).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "ring")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# Well separated in RGB, and all far from the grey background band (110-150).
PALETTE = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 40),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (255, 130, 200),
    "brown": (110, 60, 20),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three", 4: "four"}
MIN_RADIUS, MAX_RADIUS = 7, 12
COLOR_JITTER = 8
EVAL_SET_PATH = os.path.join(os.path.dirname(__file__), "data", "eval_metadata.jsonl")


def _rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: str, color: str | None = None) -> str:
    return f"{color} {shape}" if color else shape


def _a(shape: str, color: str | None = None) -> str:
    noun = _noun(shape, color)
    return f"{_article(noun)} {noun}"


def plural(shape: str) -> str:
    return shape + "s"


# --------------------------------------------------------------------------------------------
# Prompt grammar: one function per GenEval task, returning a metadata row.
# --------------------------------------------------------------------------------------------


def single_object_row(shape: str) -> dict:
    return {"tag": "single_object", "include": [{"class": shape, "count": 1}], "prompt": f"a photo of {_a(shape)}"}


def two_object_row(shape_a: str, shape_b: str) -> dict:
    if shape_a == shape_b:
        raise ValueError(f"two_object needs two different shapes, got {shape_a!r} twice")
    return {
        "tag": "two_object",
        "include": [{"class": shape_a, "count": 1}, {"class": shape_b, "count": 1}],
        "prompt": f"a photo of {_a(shape_a)} and {_a(shape_b)}",
    }


def counting_row(shape: str, count: int) -> dict:
    if count not in NUMBERS:
        raise ValueError(f"counting supports counts {sorted(NUMBERS)}, got {count}")
    return {
        "tag": "counting",
        "include": [{"class": shape, "count": count}],
        "exclude": [{"class": shape, "count": count + 1}],
        "prompt": f"a photo of {NUMBERS[count]} {plural(shape)}",
    }


def colors_row(shape: str, color: str) -> dict:
    return {
        "tag": "colors",
        "include": [{"class": shape, "count": 1, "color": color}],
        "prompt": f"a photo of {_a(shape, color)}",
    }


def position_row(shape_a: str, relation: str, shape_b: str) -> dict:
    """`shape_a` is `relation` `shape_b` (GenEval: include[1] carries ["relation", 0])."""
    if shape_a == shape_b:
        raise ValueError(f"position needs two different shapes, got {shape_a!r} twice")
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    return {
        "tag": "position",
        "include": [{"class": shape_b, "count": 1}, {"class": shape_a, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of {_a(shape_a)} {relation} {_a(shape_b)}",
    }


def color_attr_row(shape_a: str, color_a: str, shape_b: str, color_b: str) -> dict:
    if shape_a == shape_b:
        raise ValueError(f"color_attr needs two different shapes, got {shape_a!r} twice")
    return {
        "tag": "color_attr",
        "include": [
            {"class": shape_a, "count": 1, "color": color_a},
            {"class": shape_b, "count": 1, "color": color_b},
        ],
        "prompt": f"a photo of {_a(shape_a, color_a)} and {_a(shape_b, color_b)}",
    }


def all_rows(task: str) -> list[dict]:
    """Every distinct metadata row of a task, in a fixed order."""
    if task == "single_object":
        return [single_object_row(s) for s in SHAPES]
    if task == "two_object":
        return [two_object_row(a, b) for a in SHAPES for b in SHAPES if a != b]
    if task == "counting":
        return [counting_row(s, n) for s in SHAPES for n in NUMBERS]
    if task == "colors":
        return [colors_row(s, c) for s in SHAPES for c in COLORS]
    if task == "position":
        return [position_row(a, r, b) for a in SHAPES for r in RELATIONS for b in SHAPES if a != b]
    if task == "color_attr":
        return [
            color_attr_row(a, ca, b, cb)
            for a in SHAPES
            for b in SHAPES
            if a != b
            for ca in COLORS
            for cb in COLORS
            if ca != cb
        ]
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def sample_row(rng, task: str | None = None) -> dict:
    """A random metadata row (uniform over tasks when `task` is None, then uniform within the task)."""
    rng = _rng(rng)
    task = TASKS[rng.integers(len(TASKS))] if task is None else task
    rows = all_rows(task)
    return rows[rng.integers(len(rows))]


def build_eval_set(per_task: int = 100, seed: int = 0) -> list[dict]:
    """The fixed evaluation set: `per_task` rows per task.

    Small tasks (single_object has 5 distinct prompts) cycle through all their rows evenly; larger ones
    draw a seeded sample without replacement. Repeated prompts are scored with different image seeds.
    """
    rng = np.random.default_rng(seed)
    out = []
    for task in TASKS:
        rows = all_rows(task)
        if len(rows) >= per_task:
            idx = rng.choice(len(rows), size=per_task, replace=False)
        else:
            idx = np.concatenate([rng.permutation(len(rows)) for _ in range(math.ceil(per_task / len(rows)))])[:per_task]
        out.extend(rows[i] for i in idx)
    return out


def load_eval_set(task: str | None = None, path: str = EVAL_SET_PATH) -> list[dict]:
    """The shipped toy-GenEval metadata (600 rows), optionally one task's rows."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"toy evaluation set missing at {path}; rebuild it with `python -m diffalign.toyworld.scenes`")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        rows = [r for r in rows if r["tag"] == task]
    return rows


def write_eval_set(path: str = EVAL_SET_PATH, per_task: int = 100, seed: int = 0) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in build_eval_set(per_task, seed):
            f.write(json.dumps(row) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Scenes and rendering
# --------------------------------------------------------------------------------------------


@dataclass
class SceneObject:
    shape: str
    color: str
    cx: float
    cy: float
    r: float


@dataclass
class Scene:
    objects: list[SceneObject]
    background: int = 130  # grey level
    texture: str = "plain"  # plain | noise | gradient
    seed: int = 0  # seeds the texture and the colour jitter
    size: int = IMAGE_SIZE
    caption: str = ""
    row: dict = field(default_factory=dict)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of one shape, drawn without anti-aliasing."""
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = 0.85 * r  # about the circle's area
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        d.polygon(pts, fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = 0.5 * r
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(img) > 0


def render(scene: Scene) -> Image.Image:
    """Render a scene to a (size, size) RGB image. Pure function of the scene."""
    rng = np.random.default_rng(scene.seed)
    s = scene.size
    canvas = np.full((s, s, 3), float(scene.background))
    if scene.texture == "noise":
        canvas += rng.normal(0.0, 3.0, size=(s, s, 1))
    elif scene.texture == "gradient":
        ramp = np.linspace(-8.0, 8.0, s)
        canvas += (ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None])
    elif scene.texture != "plain":
        raise ValueError(f"unknown texture {scene.texture!r}; expected plain, noise or gradient")
    for obj in scene.objects:
        if obj.color not in PALETTE:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {COLORS}")
        colour = np.clip(np.array(PALETTE[obj.color], float) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
        canvas[shape_mask(obj.shape, obj.cx, obj.cy, obj.r, s)] = colour
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8), "RGB")


def _reach(shape: str, r: float) -> float:
    """Distance from the centre to the shape's farthest pixel (a square's corner lies beyond r)."""
    return 0.85 * math.sqrt(2.0) * r if shape == "square" else r


def _place(rng, radii: list[float], size: int, anchors=None, tries: int = 200) -> list[tuple[float, float]]:
    """Non-overlapping centres (gap >= 3 px, margin >= 2 px) for objects of the given radii."""
    for _ in range(tries):
        centres = []
        ok = True
        for i, r in enumerate(radii):
            for _ in range(100):
                if anchors is not None and anchors[i] is not None:
                    c = anchors[i](centres, r)
                    if c is None:
                        break
                else:
                    c = (rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2))
                lo, hi = r + 2, size - r - 2
                if not (lo <= c[0] <= hi and lo <= c[1] <= hi):
                    continue
                if all(math.hypot(c[0] - x, c[1] - y) >= r + rr + 3 for (x, y), rr in zip(centres, radii)):
                    centres.append(c)
                    break
            else:
                ok = False
            if not ok or len(centres) != i + 1:
                ok = False
                break
        if ok:
            return centres
    raise RuntimeError(f"could not place {len(radii)} objects of radii {radii} in a {size}px scene")


def _relative_anchor(rng, relation: str):
    """A sampler for the centre of object A given B's centre, so that A is clearly `relation` B."""

    def anchor(centres, r):
        (bx, by) = centres[0]
        along = rng.uniform(r + 14, 40)  # distance along the relation axis
        across = rng.uniform(-0.3, 0.3) * along  # small offset across it: the relation is unambiguous
        dx, dy = {"left of": (-along, across), "right of": (along, across), "above": (across, -along), "below": (across, along)}[
            relation
        ]
        return (bx + dx, by + dy)

    return anchor


def describe(objects: list[SceneObject]) -> str:
    """A full caption in GenEval phrasing that names every object's colour."""
    if len(objects) == 1:
        o = objects[0]
        return f"a photo of {_a(o.shape, o.color)}"
    if len({(o.shape, o.color) for o in objects}) == 1:
        return f"a photo of {NUMBERS[len(objects)]} {objects[0].color} {plural(objects[0].shape)}"
    parts = [_a(o.shape, o.color) for o in objects]
    return "a photo of " + ", ".join(parts[:-1]) + " and " + parts[-1]


def sample_scene(row: dict, rng, size: int = IMAGE_SIZE) -> Scene:
    """A scene that satisfies a toy metadata row exactly (its includes, excludes, colours and relation)."""
    rng = _rng(rng)
    task = row.get("tag")
    inc = row.get("include")
    if not inc:
        raise ValueError(f"metadata row has no 'include' clause: {row}")
    for clause in inc:
        if clause["class"] not in SHAPES:
            raise ValueError(f"class {clause['class']!r} is not a toy shape; expected one of {SHAPES}")
    relation_anchor = None
    if task == "counting":
        n = inc[0]["count"]
        colour = inc[0].get("color") or COLORS[rng.integers(len(COLORS))]
        specs = [(inc[0]["class"], colour)] * n
    elif task == "position":
        rel, target = inc[1]["position"]
        if target != 0:
            raise ValueError(f"position rows must refer to include[0], got target {target}")
        ca, cb = rng.choice(len(COLORS), size=2, replace=False)
        specs = [(inc[0]["class"], COLORS[ca]), (inc[1]["class"], COLORS[cb])]
        relation_anchor = _relative_anchor(rng, rel)
    else:
        specs = []
        for clause in inc:
            specs += [(clause["class"], clause.get("color") or COLORS[rng.integers(len(COLORS))])] * clause["count"]
    n = len(specs)
    if n > 4:
        raise ValueError(f"toy scenes hold at most 4 objects, row asks for {n}")
    max_r = {1: MAX_RADIUS, 2: MAX_RADIUS, 3: 10, 4: 9}[n]
    if relation_anchor is not None:
        max_r = 10
    radii = [float(rng.uniform(MIN_RADIUS, max_r)) for _ in range(n)]
    anchors = [None, relation_anchor] if relation_anchor is not None else None
    centres = _place(rng, [_reach(s, r) for (s, _), r in zip(specs, radii)], size, anchors)
    objects = [SceneObject(s, c, float(x), float(y), r) for (s, c), (x, y), r in zip(specs, centres, radii)]
    texture = ("plain", "noise", "gradient")[rng.integers(3)]
    scene = Scene(
        objects=objects,
        background=int(rng.integers(115, 146)),
        texture=texture,
        seed=int(rng.integers(2**31)),
        size=size,
        row=row,
    )
    scene.caption = row["prompt"]
    return scene


CAPTION_FLAWS = ("no_colors", "partial", "wrong_count", "no_relation")


def flawed_caption(scene: Scene, rng) -> tuple[str, str]:
    """An alt-text-like caption that is true but incomplete, or miscounted: (caption, flaw), the flaw drawn
    uniformly from those the scene allows.

    - no_colors: every object named without its colour ("a photo of a circle and a square");
    - partial: a multi-object scene described by a strict subset of its objects ("a photo of a red circle");
    - wrong_count: a scene of n alike objects called n - 1 or n + 1 (within 2-4) of them;
    - no_relation: a position scene described without its relation ("a photo of a star and a ring").
    """
    rng = _rng(rng)
    objects = list(scene.objects)
    alike = len(objects) > 1 and len({o.shape for o in objects}) == 1
    flaws = ["no_colors"]
    if len(objects) > 1:
        flaws.append("partial")
    if alike:
        flaws.append("wrong_count")
    if scene.row.get("tag") == "position":
        flaws.append("no_relation")
    flaw = flaws[int(rng.integers(len(flaws)))]
    if flaw == "no_colors":
        if alike:
            return f"a photo of {NUMBERS[len(objects)]} {plural(objects[0].shape)}", flaw
        return describe([SceneObject(o.shape, "", o.cx, o.cy, o.r) for o in objects]), flaw
    if flaw == "partial":
        keep = sorted(rng.choice(len(objects), size=int(rng.integers(1, len(objects))), replace=False))
        return describe([objects[i] for i in keep]), flaw
    if flaw == "wrong_count":
        n = len(objects)
        wrong = [m for m in (n - 1, n + 1) if m in NUMBERS]
        m = wrong[int(rng.integers(len(wrong)))]
        color = objects[0].color if len({o.color for o in objects}) == 1 and rng.random() < 0.5 else None
        return f"a photo of {NUMBERS[m]} {color + ' ' if color else ''}{plural(objects[0].shape)}", flaw
    return describe(objects), flaw  # no_relation: the objects and their colours, not where they are


def training_caption(scene: Scene, rng, p_full: float = 0.5, p_flawed: float = 0.0) -> str:
    """The row's GenEval prompt, or (with probability `p_full`) a full description with every colour; with
    probability `p_flawed` (drawn first, and only when > 0) a flawed caption instead (`flawed_caption`).

    Position scenes keep their relation in the full caption ("a photo of a red star left of a blue ring").
    """
    rng = _rng(rng)
    if p_flawed > 0 and rng.random() < p_flawed:
        return flawed_caption(scene, rng)[0]
    if rng.random() >= p_full:
        return scene.row.get("prompt", scene.caption) if scene.row else scene.caption
    if scene.row.get("tag") == "position":
        rel = scene.row["include"][1]["position"][0]
        b, a = scene.objects  # include[0] is the reference object, include[1] the one placed relative to it
        return f"a photo of {_a(a.shape, a.color)} {rel} {_a(b.shape, b.color)}"
    return describe(scene.objects)


def sample_training_example(rng, size: int = IMAGE_SIZE, p_full: float = 0.5, p_flawed: float = 0.0):
    """(image, caption, row) for pretraining: a random task row, a scene satisfying it, a caption."""
    rng = _rng(rng)
    row = sample_row(rng)
    scene = sample_scene(row, rng, size)
    return render(scene), training_caption(scene, rng, p_full, p_flawed), row


if __name__ == "__main__":
    print(write_eval_set())
