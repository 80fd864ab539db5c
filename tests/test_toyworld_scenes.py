import json

import numpy as np
import pytest

from diffalign.toyworld import scenes as S


def test_render_is_deterministic():
    a = [S.sample_training_example(np.random.default_rng(3)) for _ in range(2)]
    assert a[0][1] == a[1][1]
    assert np.array_equal(np.asarray(a[0][0]), np.asarray(a[1][0]))
    b = S.sample_training_example(np.random.default_rng(4))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(b[0]))
    assert a[0][0].size == (64, 64) and a[0][0].mode == "RGB"


def test_prompts_follow_geneval_phrasing():
    assert S.single_object_row("ring")["prompt"] == "a photo of a ring"
    assert S.two_object_row("circle", "star")["prompt"] == "a photo of a circle and a star"
    row = S.counting_row("square", 3)
    assert row["prompt"] == "a photo of three squares" and row["exclude"] == [{"class": "square", "count": 4}]
    assert S.colors_row("circle", "orange")["prompt"] == "a photo of an orange circle"
    row = S.position_row("star", "right of", "ring")
    assert row["prompt"] == "a photo of a star right of a ring"
    assert row["include"] == [{"class": "ring", "count": 1}, {"class": "star", "count": 1, "position": ["right of", 0]}]
    assert S.color_attr_row("circle", "red", "square", "blue")["prompt"] == "a photo of a red circle and a blue square"
    with pytest.raises(ValueError, match="different shapes"):
        S.two_object_row("circle", "circle")


def test_shipped_eval_set_matches_the_builder():
    rows = S.load_eval_set()
    assert rows == json.loads(json.dumps(S.build_eval_set()))
    assert len(rows) == 600
    for task in S.TASKS:
        assert len(S.load_eval_set(task)) == 100
    with pytest.raises(ValueError, match="unknown task"):
        S.load_eval_set("nope")


def test_scene_objects_match_the_row():
    rng = np.random.default_rng(0)
    for task in S.TASKS:
        for _ in range(20):
            row = S.sample_row(rng, task)
            scene = S.sample_scene(row, rng)
            counts = {}
            for o in scene.objects:
                counts[o.shape] = counts.get(o.shape, 0) + 1
            for clause in row["include"]:
                assert counts[clause["class"]] == clause["count"]
                if "color" in clause:
                    assert any(o.color == clause["color"] for o in scene.objects if o.shape == clause["class"])
            if task == "position":
                rel = row["include"][1]["position"][0]
                b, a = scene.objects
                dx, dy = a.cx - b.cx, a.cy - b.cy
                assert {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[rel] > 0


def test_bad_rows_raise():
    with pytest.raises(ValueError, match="not a toy shape"):
        S.sample_scene({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}, 0)
    with pytest.raises(ValueError, match="include"):
        S.sample_scene({"tag": "single_object", "prompt": "x"}, 0)


def test_flawed_captions_are_incomplete_or_miscounted_never_contradictory():
    """Alt-text-like captions: no colours, a strict subset of objects, a wrong count (n +- 1), or no relation; each
    flaw appears, and apart from the count nothing named is absent from the scene."""
    import collections

    rng = np.random.default_rng(3)
    seen = collections.Counter()
    for _ in range(400):
        row = S.sample_row(rng)
        scene = S.sample_scene(row, rng)
        caption, flaw = S.flawed_caption(scene, rng)
        seen[flaw] += 1
        words = caption.split()
        colors = {o.color for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        named_shapes = {s for s in S.SHAPES if s in words or S.plural(s) in words}
        assert named_shapes <= shapes, (caption, scene.objects)
        assert {c for c in S.COLORS if c in words} <= colors
        if flaw == "no_colors":
            assert not any(c in words for c in S.COLORS)
        elif flaw == "partial":
            assert len(scene.objects) > 1 and caption != S.describe(scene.objects)
        elif flaw == "wrong_count":
            said = [n for n, w in S.NUMBERS.items() if w in words]
            assert said and abs(said[0] - len(scene.objects)) == 1
        else:
            assert row["tag"] == "position" and not any(r.split()[0] in words for r in S.RELATIONS)
    assert set(seen) == set(S.CAPTION_FLAWS)
    # p_flawed = 0 (the default) draws nothing extra: the clean caption stream is unchanged.
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    scene = S.sample_scene(S.sample_row(np.random.default_rng(1)), np.random.default_rng(2))
    assert S.training_caption(scene, a) == S.training_caption(scene, b, p_flawed=0.0)
    assert a.random() == b.random()
