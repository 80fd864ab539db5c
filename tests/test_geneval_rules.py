"""GenEval rules on synthetic detections: every tag, every rule, the official reason strings."""

import pytest

from diffalign.evaluation.geneval import (
    TAGS,
    compute_iou,
    filter_detections,
    load_metadata,
    load_object_names,
    relative_position,
    score_detections,
)


def det(box, score=0.95, color=None):
    return {"box": list(box), "score": score, "color": color}


SINGLE = {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}
TWO = {
    "tag": "two_object",
    "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
    "prompt": "a photo of a bench and a sports ball",
}
COUNT2 = {
    "tag": "counting",
    "include": [{"class": "clock", "count": 2}],
    "exclude": [{"class": "clock", "count": 3}],
    "prompt": "a photo of two clocks",
}
COLOR = {
    "tag": "colors",
    "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}],
    "prompt": "a photo of a blue fire hydrant",
}
POS = {
    "tag": "position",
    "include": [
        {"class": "teddy bear", "count": 1},
        {"class": "dog", "count": 1, "position": ["right of", 0]},
    ],
    "prompt": "a photo of a dog right of a teddy bear",
}
ATTR = {
    "tag": "color_attr",
    "include": [
        {"class": "wine glass", "count": 1, "color": "purple"},
        {"class": "apple", "count": 1, "color": "black"},
    ],
    "prompt": "a photo of a purple wine glass and a black apple",
}


def test_shipped_data():
    rows = load_metadata()
    assert len(rows) == 553
    counts = {t: sum(r["tag"] == t for r in rows) for t in TAGS}
    assert counts == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    names = load_object_names()
    assert len(names) == 80 and names[0] == "person" and names[-1] == "toothbrush"
    assert {c["class"] for r in rows for c in r["include"]} <= set(names)


def test_single_object_and_threshold_is_strict():
    assert score_detections(SINGLE, {"cow": [det([0, 0, 10, 10], 0.31)]}) == (True, "")
    # score == threshold is dropped (strict >), as officially.
    assert score_detections(SINGLE, {"cow": [det([0, 0, 10, 10], 0.3)]}) == (
        False,
        "expected cow>=1, found 0",
    )
    assert score_detections(SINGLE, {}) == (False, "expected cow>=1, found 0")
    # A custom threshold is honoured.
    assert score_detections(SINGLE, {"cow": [det([0, 0, 10, 10], 0.31)]}, threshold=0.5)[0] is False


def test_two_object_missing_one():
    ok, reason = score_detections(TWO, {"bench": [det([0, 0, 5, 5])]})
    assert not ok and reason == "expected sports ball>=1, found 0"
    both = {"bench": [det([0, 0, 5, 5])], "sports ball": [det([6, 6, 9, 9], 0.4)]}
    assert score_detections(TWO, both) == (True, "")


def test_counting_uses_09_and_exclusion():
    two = {"clock": [det([0, 0, 5, 5], 0.95), det([10, 10, 15, 15], 0.91)]}
    assert score_detections(COUNT2, two) == (True, "")
    # The second clock is below 0.9: only one counts (though 0.85 > 0.3).
    low = {"clock": [det([0, 0, 5, 5], 0.95), det([10, 10, 15, 15], 0.85)]}
    assert score_detections(COUNT2, low) == (False, "expected clock>=2, found 1")
    # A third confident clock trips the exclude clause; a third weak one does not.
    three = {"clock": two["clock"] + [det([20, 20, 25, 25], 0.92)]}
    assert score_detections(COUNT2, three) == (False, "expected clock<3, found 3")
    three_weak = {"clock": two["clock"] + [det([20, 20, 25, 25], 0.89)]}
    assert score_detections(COUNT2, three_weak) == (True, "")
    # counting_threshold is a parameter.
    assert score_detections(COUNT2, low, counting_threshold=0.8) == (True, "")
    # The 0.9 threshold applies only to counting prompts.
    assert score_detections(SINGLE, {"cow": [det([0, 0, 5, 5], 0.5)]})[0] is True


def test_counting_exclusion_and_inclusion_fail_together():
    meta = {
        **COUNT2,
        "include": [{"class": "clock", "count": 4}],
        "exclude": [{"class": "clock", "count": 2}],
    }
    ok, reason = score_detections(
        meta, {"clock": [det([0, 0, 5, 5]), det([9, 9, 12, 12]), det([20, 20, 30, 30])]}
    )
    assert not ok and reason == "expected clock>=4, found 3\nexpected clock<2, found 3"


def test_colour_match_and_mismatch():
    assert score_detections(COLOR, {"fire hydrant": [det([0, 0, 5, 5], color="blue")]}) == (True, "")
    ok, reason = score_detections(COLOR, {"fire hydrant": [det([0, 0, 5, 5], color="red")]})
    assert not ok and reason == "expected blue fire hydrant>=1, found 0 blue; and 1 red"
    # Only the top-count (most confident) object is colour-checked; a blue one below it is ignored.
    dets = {"fire hydrant": [det([0, 0, 5, 5], 0.5, "blue"), det([9, 9, 15, 15], 0.9, "yellow")]}
    assert score_detections(COLOR, dets) == (
        False,
        "expected blue fire hydrant>=1, found 0 blue; and 1 yellow",
    )
    # An object read by a colour clause must carry a colour.
    with pytest.raises(ValueError, match="no 'color'"):
        score_detections(COLOR, {"fire hydrant": [det([0, 0, 5, 5])]})
    # Colour of a missing object is never asked for.
    assert score_detections(COLOR, {}) == (False, "expected fire hydrant>=1, found 0")


def test_colour_reason_lists_colours_in_palette_order():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 3, "color": "green"}], "prompt": "x"}
    dets = {
        "car": [
            det([0, 0, 1, 1], 0.9, "white"),
            det([0, 0, 1, 1], 0.8, "red"),
            det([0, 0, 1, 1], 0.7, "white"),
        ]
    }
    ok, reason = score_detections(meta, dets)
    assert not ok and reason == "expected green car>=3, found 0 green; and 1 red, 2 white"


def test_color_attr_two_clauses():
    good = {"wine glass": [det([0, 0, 5, 5], color="purple")], "apple": [det([8, 8, 9, 9], color="black")]}
    assert score_detections(ATTR, good) == (True, "")
    bad = {"wine glass": [det([0, 0, 5, 5], color="purple")], "apple": [det([8, 8, 9, 9], color="red")]}
    assert score_detections(ATTR, bad) == (False, "expected black apple>=1, found 0 black; and 1 red")


# Target box at the centre: 40x40 at (80..120, 80..120).
TARGET = [80, 80, 120, 120]


@pytest.mark.parametrize(
    "box,relations",
    [
        ([0, 80, 40, 120], ("left of",)),
        ([160, 80, 200, 120], ("right of",)),
        ([80, 0, 120, 40], ("above",)),
        ([80, 160, 120, 200], ("below",)),
        ([0, 0, 40, 40], ("left of", "above")),  # diagonal: both components are ~0.707 after normalising
        ([85, 85, 125, 125], ()),  # overlapping, offset 5 < 0.1 * (40 + 40): the no-relation zone
    ],
)
def test_relative_position_each_relation(box, relations):
    assert relative_position(box, TARGET) == relations


def test_position_threshold_arithmetic():
    # Offset 10 along x, boxes 40 wide: revised = max(10 - 0.1 * 80, 0) = 2, normalised by |offset| = 10 -> 0.2.
    assert relative_position([90, 80, 130, 120], TARGET) == ()
    # Offset 20: revised 12 / 20 = 0.6 > 0.5 -> right of.
    assert relative_position([100, 80, 140, 120], TARGET) == ("right of",)
    # Offset 16 (x) and 0 (y): revised 8/16 = 0.5 exactly is NOT > 0.5.
    assert relative_position([96, 80, 136, 120], TARGET) == ()
    # A larger position_threshold widens the no-relation zone.
    assert relative_position([100, 80, 140, 120], TARGET, position_threshold=0.2) == ()
    # Off-axis: x offset 40, y offset 30 -> revised (32, 22) / 50 = (0.64, 0.44): only "right of".
    assert relative_position([120, 110, 160, 150], TARGET) == ("right of",)


def test_position_rule_in_context():
    bear = det(TARGET)
    ok_dets = {"teddy bear": [bear], "dog": [det([160, 80, 200, 120])]}
    assert score_detections(POS, ok_dets) == (True, "")
    wrong = {"teddy bear": [bear], "dog": [det([0, 0, 40, 40])]}
    assert score_detections(POS, wrong) == (
        False,
        "expected dog right of target, found left of and above target",
    )
    none = {"teddy bear": [bear], "dog": [det([85, 85, 125, 125])]}
    # No relation: the official string keeps the double space.
    assert score_detections(POS, none) == (False, "expected dog right of target, found  target")


def test_position_missing_target():
    ok, reason = score_detections(POS, {"dog": [det([160, 80, 200, 120])]})
    assert not ok and reason == "expected teddy bear>=1, found 0\nno target for dog to be right of"


def test_position_every_pair_must_hold():
    meta = {
        "tag": "position",
        "include": [{"class": "cat", "count": 2}, {"class": "dog", "count": 1, "position": ["below", 0]}],
        "prompt": "x",
    }
    cats = [det([0, 0, 40, 40], 0.9), det([100, 0, 140, 40], 0.8)]
    assert score_detections(meta, {"cat": cats, "dog": [det([0, 100, 40, 140])]}) == (True, "")
    # Dog below cat 1 but directly right of cat 2's column? Put it far right and level with cat 2.
    ok, reason = score_detections(meta, {"cat": cats, "dog": [det([300, 0, 340, 40])]})
    assert not ok and reason == "expected dog below target, found right of target"


def test_max_objects_caps_before_exclusion():
    many = {"clock": [det([i * 10, 0, i * 10 + 5, 5], 0.95 - i * 0.001) for i in range(20)]}
    meta = {
        **COUNT2,
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 17}],
    }
    # 20 confident clocks, but only 16 are kept per class, so "<17" holds.
    assert score_detections(meta, many) == (True, "")
    assert score_detections(meta, many, max_objects=17) == (False, "expected clock<17, found 17")
    kept = filter_detections(many, "counting", max_objects=3)
    assert [d["score"] for d in kept["clock"]] == [0.95, 0.949, 0.948]


def test_nms_off_by_default_and_greedy_when_on():
    dup = {"clock": [det([0, 0, 10, 10], 0.95), det([0, 0, 10, 10], 0.94), det([50, 50, 60, 60], 0.93)]}
    # Default nms_threshold=1.0 disables suppression even for identical boxes.
    assert len(filter_detections(dup, "counting")["clock"]) == 3
    assert score_detections(COUNT2, dup) == (False, "expected clock<3, found 3")
    # With suppression the duplicate goes, the distant box stays.
    kept = filter_detections(dup, "counting", nms_threshold=0.5)["clock"]
    assert [d["score"] for d in kept] == [0.95, 0.93]
    assert score_detections(COUNT2, dup, nms_threshold=0.5) == (True, "")
    # IoU >= threshold is suppressed; below survives.  iou([0,0,10,10],[0,0,10,20]) = 121/231.
    pair = {"x": [det([0, 0, 10, 10], 0.9), det([0, 0, 10, 20], 0.8)]}
    iou = compute_iou([0, 0, 10, 10], [0, 0, 10, 20])
    assert iou == pytest.approx(121 / 231)
    assert len(filter_detections(pair, "colors", nms_threshold=iou)["x"]) == 1
    assert len(filter_detections(pair, "colors", nms_threshold=iou + 1e-9)["x"]) == 2


def test_sorting_and_ties():
    dets = {"cow": [det([0, 0, 1, 1], 0.4), det([5, 5, 6, 6], 0.8), det([9, 9, 10, 10], 0.4)]}
    kept = filter_detections(dets, "single_object")["cow"]
    assert [d["box"][0] for d in kept] == [5, 9, 0]  # descending; tie: later detection first
    assert filter_detections({"cow": []}, "single_object") == {}


def test_bad_input():
    with pytest.raises(ValueError, match="Unknown GenEval tag"):
        score_detections({**SINGLE, "tag": "nope"}, {})
    with pytest.raises(ValueError, match="missing 'include'"):
        score_detections({"tag": "single_object", "prompt": "x"}, {})
    with pytest.raises(ValueError, match="needs a 'box'"):
        score_detections(SINGLE, {"cow": [{"score": 0.9}]})
    with pytest.raises(ValueError, match="finite 'score'"):
        score_detections(SINGLE, {"cow": [{"box": [0, 0, 1, 1], "score": float("nan")}]})
    bad_pos = {**POS, "include": [{"class": "dog", "count": 1, "position": ["right of", 0]}]}
    with pytest.raises(ValueError, match="earlier clause"):
        score_detections(bad_pos, {})
