import functools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffalign.toyworld import scenes as S
from diffalign.toyworld.detector import ToyWorldDetector, score_images, summarize


@functools.lru_cache(maxsize=1)
def _rendered_eval_set(seed=0):
    rng = np.random.default_rng(seed)
    rows = S.load_eval_set()
    return tuple(S.render(S.sample_scene(r, rng)) for r in rows), rows


def test_oracle_accuracy_on_rendered_scenes():
    # The oracle ceiling: rendered ground truth scored with the official GenEval rules.
    images, rows = _rendered_eval_set()
    summary = summarize(rows, score_images(list(images), rows))
    for task in S.TASKS:
        assert summary[task] >= 0.99, (task, summary)
    assert summary["overall"] >= 0.99


def test_wrong_prompts_are_rejected():
    # The same images judged against mismatched rows must mostly fail, or the oracle test means nothing.
    images, rows = _rendered_eval_set()
    shifted = (rows[1:] + rows[:1])[::3]
    summary = summarize(shifted, score_images(list(images)[::3], shifted))
    assert summary["overall"] < 0.5, summary


def test_robust_to_blur_and_colour_noise():
    rng = np.random.default_rng(1)
    rows = [S.sample_row(rng) for _ in range(150)]
    images = []
    for row in rows:
        img = S.render(S.sample_scene(row, rng)).filter(ImageFilter.GaussianBlur(0.7))
        arr = np.asarray(img, dtype=float) + rng.normal(0, 8, (64, 64, 3))
        images.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    assert np.mean(score_images(images, rows)) >= 0.95


def test_detection_format():
    scene = S.Scene(objects=[S.SceneObject("ring", "blue", 20, 20, 9), S.SceneObject("star", "yellow", 44, 44, 10)], seed=0)
    dets = ToyWorldDetector().detect(S.render(scene), ["ring", "star", "circle"])
    assert set(dets) == {"ring", "star", "circle"} and dets["circle"] == []
    (ring,), (star,) = dets["ring"], dets["star"]
    assert ring["color"] == "blue" and star["color"] == "yellow"
    assert ring["mask"].dtype == bool and ring["mask"].shape == (64, 64)
    x0, y0, x1, y1 = ring["box"]
    assert abs((x0 + x1) / 2 - 20) <= 1 and abs((y0 + y1) / 2 - 20) <= 1 and ring["score"] == 1.0
    with pytest.raises(ValueError, match="cannot detect"):
        ToyWorldDetector().detect(S.render(scene), ["dog"])


def test_summary_standard_errors():
    rows = [{"tag": "colors"}] * 4 + [{"tag": "position"}] * 4
    s = summarize(rows, [1, 1, 0, 0, 1, 1, 1, 1])
    assert s["colors"] == 0.5 and s["position"] == 1.0 and s["overall"] == 0.75
    assert s["colors_se"] == pytest.approx(0.25) and s["overall_se"] == pytest.approx(0.125)
