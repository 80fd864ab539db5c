"""GenEval back-ends: detector registry, Mask2Former post-processing, colour crops and classifier."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.evaluation.detectors import (
    MMDET_INSTALL,
    available_detectors,
    instance_postprocess,
    load_detector,
    masks_to_boxes,
)
from diffalign.evaluation.geneval.colors import TEMPLATES, ColorClassifier, make_crop
from diffalign.evaluation.geneval.rules import COLORS

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_color_classifier(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("clip") / "geneval-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("geneval-tiny-clip", pretrained=None)
    return ColorClassifier(model, preprocess, open_clip.get_tokenizer("geneval-tiny-clip"), device="cpu")


def test_registry():
    assert {"mask2former", "mmdet", "toyworld"} <= set(available_detectors())
    with pytest.raises(ValueError, match="Unknown GenEval detector"):
        load_detector("yolo")


def test_mmdet_missing_gives_install_hint():
    try:
        import mmdet  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError) as info:
            load_detector("mmdet", checkpoint="x.pth")
        assert "mim install mmcv-full" in str(info.value) and "--detector mask2former" in str(info.value)
        assert str(info.value).startswith(MMDET_INSTALL)
    else:
        pytest.skip("mmdet is installed here")


def test_masks_to_boxes_matches_a_loop():
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((5, 12, 9)) > 0.93)
    masks[2] = False
    boxes = masks_to_boxes(masks)
    for m, b in zip(masks.numpy(), boxes.tolist()):
        ys, xs = np.nonzero(m)
        want = [0, 0, 0, 0] if len(xs) == 0 else [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert b == [float(v) for v in want]


def test_instance_postprocess_scores_and_resizing():
    # Two queries, three classes (+ no-object). Query 0 is confidently class 2 with a mask on the top-left
    # quarter of a 16x16 logit map; the input was padded from 32x24 (valid) to 32x32; the image is 64x48.
    class_logits = torch.tensor([[0.0, 0.0, 8.0, 0.0], [0.0, 0.0, 0.0, 8.0]])
    mask_logits = torch.full((2, 16, 16), -10.0)
    mask_logits[0, :8, :6] = 10.0
    labels, scores, masks = instance_postprocess(
        class_logits,
        mask_logits,
        padded_size=(32, 32),
        valid_size=(32, 24),
        image_size=(64, 48),
        max_per_image=3,
    )
    assert labels.tolist()[0] == 2
    prob = torch.softmax(class_logits[0], -1)[2]
    fg = masks[0]
    assert masks.shape == (3, 64, 48)
    # Mask: rows 0..31 of the 64 (half), columns 0..23 of 48 (6/12 of the valid width, i.e. half).
    assert fg[:30, :22].all() and not fg[34:].any() and not fg[:, 26:].any()
    # score = class prob x mean foreground probability; ~1 inside except the interpolated edge.
    assert 0.97 * float(prob) < float(scores[0]) <= float(prob)
    assert (scores[1:] < 1e-3).all()  # query 1's best class is no-object


def test_mask2former_detector_tiny():
    from transformers import Mask2FormerImageProcessor

    from diffalign.testing import tiny_mask2former

    det = load_detector(
        "mask2former",
        model=tiny_mask2former(num_labels=4, num_queries=5),
        processor=Mask2FormerImageProcessor(),
        device="cpu",
        test_size=(64, 96),
        max_per_image=7,
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    out = det.detect(image, ["a", "b", "c", "d"])
    dets = [d for v in out.values() for d in v]
    assert 0 < len(dets) <= 7 and set(out) <= {"a", "b", "c", "d"}
    for d in dets:
        assert d["mask"].shape == (48, 80) and d["mask"].dtype == bool and d["color"] is None
        assert 0.0 <= d["score"] <= 1.0
        ys, xs = np.nonzero(d["mask"])
        assert d["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # min_score drops detections at or below it (lossless for the rules, whose thresholds are strict).
    floor = sorted(d["score"] for d in dets)[len(dets) // 2]
    det2 = load_detector(
        "mask2former",
        model=det.model,
        processor=det.processor,
        device="cpu",
        test_size=(64, 96),
        max_per_image=7,
        min_score=floor,
    )
    kept = [d for v in det2.detect(image, ["a", "b", "c", "d"]).values() for d in v]
    assert sorted(d["score"] for d in kept) == sorted(d["score"] for d in dets if d["score"] > floor)
    with pytest.raises(ValueError, match="4 labels but 80 class names"):
        det.detect(image, ["x"] * 80)


def test_make_crop_composites_on_grey():
    arr = np.zeros((10, 10, 3), dtype=np.uint8)
    arr[:, :] = (255, 0, 0)
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 3:6] = True
    crop = np.asarray(make_crop(Image.fromarray(arr), [2, 1, 7, 6], mask))
    assert crop.shape == (5, 5, 3)
    # Crop origin (x=2, y=1): mask rows 2..4 -> crop rows 1..3, cols 3..5 -> crop cols 1..3.
    assert (crop[1:4, 1:4] == (255, 0, 0)).all()
    assert (crop[0] == 0x99).all() and (crop[:, 4] == 0x99).all()
    # Without a mask the crop is the image itself.
    assert (np.asarray(make_crop(Image.fromarray(arr), [0, 0, 3, 3], None)) == (255, 0, 0)).all()
    with pytest.raises(ValueError, match="mask shape"):
        make_crop(Image.fromarray(arr), [0, 0, 3, 3], np.ones((4, 4), bool))


def test_color_classifier_recipe(tmp_path_factory):
    clf = tiny_color_classifier(tmp_path_factory)
    assert TEMPLATES == (
        "a photo of a {c} {object}",
        "a photo of a {c}-colored {object}",
        "a photo of a {c} object",
    )
    weights = clf.text_classifier("car")
    assert weights.shape == (32, 10) and torch.allclose(weights.norm(dim=0), torch.ones(10), atol=1e-5)
    # The recipe by hand for one colour: mean of normalised template embeddings, re-normalised.
    texts = [t.format(c="blue", object="car") for t in TEMPLATES]
    with torch.no_grad():
        emb = torch.nn.functional.normalize(clf.model.encode_text(clf.tokenizer(texts)).float(), dim=-1).mean(
            0
        )
    assert torch.allclose(weights[:, COLORS.index("blue")], emb / emb.norm(), atol=1e-5)
    # classify == argmax of cosine similarity of the preprocessed crop.
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    objs = [{"box": [0, 0, 40, 40], "mask": None}, {"box": [10, 20, 60, 64], "mask": np.ones((64, 64), bool)}]
    got = clf.classify(image, objs, "car")
    assert len(got) == 2 and set(got) <= set(COLORS)
    with torch.no_grad():
        feats = clf.model.encode_image(
            torch.stack([clf.preprocess(make_crop(image, o["box"], o["mask"])) for o in objs])
        )
    want = (torch.nn.functional.normalize(feats.float(), dim=-1) @ weights).argmax(1).tolist()
    assert got == [COLORS[i] for i in want]
    assert clf.classify(image, [], "car") == []


def test_toyworld_detector_loads_lazily_through_the_registry():
    det = load_detector("toyworld")
    assert type(det).__module__ == "diffalign.toyworld.detector"
    out = det.detect(Image.new("RGB", (64, 64), (200, 200, 200)), ["circle"])
    assert isinstance(out, dict) and all(isinstance(v, list) for v in out.values())


def test_postprocess_agrees_with_transformers_when_no_resizing_differs():
    """At 384x384 (transformers' fixed mask grid) our mmdet-style post-processing equals
    `Mask2FormerImageProcessor.post_process_instance_segmentation` (top num_queries pairs)."""
    from transformers import Mask2FormerImageProcessor

    torch.manual_seed(0)
    q, c = 6, 5
    class_logits = torch.randn(q, c + 1) * 3
    mask_logits = torch.randn(q, 96, 96) * 4
    labels, scores, masks = instance_postprocess(
        class_logits,
        mask_logits,
        padded_size=(384, 384),
        valid_size=(384, 384),
        image_size=(384, 384),
        max_per_image=q,
    )

    class Out:
        class_queries_logits = class_logits[None]
        masks_queries_logits = mask_logits[None]

    ref = Mask2FormerImageProcessor().post_process_instance_segmentation(
        Out(), threshold=0.0, target_sizes=[(384, 384)], return_binary_maps=True
    )[0]
    ours = sorted(
        (int(lab), round(float(s), 5), int(m.sum())) for lab, s, m in zip(labels, scores, masks) if m.any()
    )
    theirs = sorted(
        (info["label_id"], round(info["score"], 5), int(ref["segmentation"][k].sum()))
        for k, info in enumerate(ref["segments_info"])
    )
    assert len(ours) > 0 and ours == theirs
