"""GenEval end to end: generate (tiny SDXL) -> evaluate (tiny Mask2Former + tiny CLIP) -> summary; resume; bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.evaluation.detectors import load_detector
from diffalign.evaluation.geneval import TAGS, load_metadata
from diffalign.evaluation.geneval.runner import (
    MANIFEST,
    EvalOptions,
    GenEvalErrors,
    evaluate,
    generate,
    parse_indices,
)
from diffalign.evaluation.geneval.summary import read_results, summarize, summarize_file


def tiny_color_classifier(tmp_path_factory):
    import open_clip

    from diffalign.evaluation.geneval.colors import ColorClassifier

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    path = tmp_path_factory.mktemp("clip") / "geneval-e2e-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("geneval-e2e-clip", pretrained=None)
    return ColorClassifier(model, preprocess, open_clip.get_tokenizer("geneval-e2e-clip"), device="cpu")


# The first prompt of each tag in the official file: single_object, two_object, counting, colors, position, color_attr.
INDICES = [0, 80, 179, 259, 353, 453]
N_SAMPLES = 2
GEN_KWARGS = {"num_inference_steps": 2, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from diffalign.testing import tiny_sdxl_pipeline

    out = str(tmp_path_factory.mktemp("geneval") / "run")
    pipe = tiny_sdxl_pipeline(0)
    report = generate(
        pipe, out, indices=INDICES, n_samples=N_SAMPLES, pipeline_kwargs=GEN_KWARGS, progress=False
    )
    return out, pipe, report


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import Mask2FormerImageProcessor

    from diffalign.testing import tiny_mask2former

    detector = load_detector(
        "mask2former",
        model=tiny_mask2former(),
        processor=Mask2FormerImageProcessor(),
        device="cpu",
        test_size=(64, 64),
        max_per_image=800,  # all (query, class) pairs: every class shows up
    )
    return detector, tiny_color_classifier(tmp_path_factory)


# A random detector scores ~0.01: thresholds of 0 let detections through so the colour and position code runs.
OPEN = EvalOptions(threshold=0.0, counting_threshold=0.0)


def test_generate_layout_and_resume(generated):
    out, pipe, report = generated
    assert report == {"generated": len(INDICES) * N_SAMPLES, "skipped": 0, "prompts": len(INDICES)}
    official = load_metadata()
    assert sorted(d for d in os.listdir(out) if d.isdigit()) == [f"{i:05d}" for i in INDICES]
    for i in INDICES:
        with open(os.path.join(out, f"{i:05d}", "metadata.jsonl")) as f:
            assert json.load(f) == official[i]
        assert sorted(os.listdir(os.path.join(out, f"{i:05d}", "samples"))) == ["0000.png", "0001.png"]
    with open(os.path.join(out, MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["indices"] == INDICES and manifest["n_samples"] == N_SAMPLES and manifest["seed"] == 42
    # Resume: nothing to do.
    again = generate(
        pipe, out, indices=INDICES, n_samples=N_SAMPLES, pipeline_kwargs=GEN_KWARGS, progress=False
    )
    assert again == {"generated": 0, "skipped": len(INDICES) * N_SAMPLES, "prompts": len(INDICES)}
    # A deleted image is regenerated identically (per-image seeds).
    path = os.path.join(out, "00179", "samples", "0001.png")
    before = np.asarray(Image.open(path))
    os.remove(path)
    third = generate(
        pipe, out, indices=INDICES, n_samples=N_SAMPLES, pipeline_kwargs=GEN_KWARGS, progress=False
    )
    assert third["generated"] == 1
    assert np.array_equal(np.asarray(Image.open(path)), before)
    # The two samples of a prompt differ (different seeds).
    other = np.asarray(Image.open(os.path.join(out, "00179", "samples", "0000.png")))
    assert not np.array_equal(other, before)


def test_generate_bad_input(generated, tmp_path):
    out, pipe, _ = generated
    with pytest.raises(ValueError, match="other settings"):
        generate(pipe, out, indices=INDICES, n_samples=3, pipeline_kwargs=GEN_KWARGS, progress=False)
    with pytest.raises(ValueError, match="must not set 'prompt'"):
        generate(pipe, str(tmp_path / "x"), indices=[0], pipeline_kwargs={"prompt": "a"}, progress=False)
    with pytest.raises(ValueError, match="outside"):
        generate(pipe, str(tmp_path / "y"), indices=[553], progress=False)
    # A folder made for another prompt list is refused.
    custom = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    ]
    with pytest.raises(ValueError, match="belongs to another metadata file"):
        target = str(tmp_path / "z")
        generate(pipe, target, indices=[0], n_samples=1, pipeline_kwargs=GEN_KWARGS, progress=False)
        os.remove(os.path.join(target, MANIFEST))
        generate(pipe, target, metadata=custom, n_samples=1, pipeline_kwargs=GEN_KWARGS, progress=False)
    assert parse_indices("0-2,5", 10) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="outside"):
        parse_indices("5-20", 10)


def test_evaluate_and_summary(generated, models, tmp_path):
    from diffalign.cli import main as cli_main

    out, _, _ = generated
    detector, colors = models
    results = str(tmp_path / "results.jsonl")
    report = evaluate(out, detector, colors, outfile=results, options=OPEN, progress=False)
    assert report["evaluated"] == len(INDICES) * N_SAMPLES and report["errors"] == []
    assert not os.path.exists(results + ".errors.jsonl")
    rows = read_results(results)
    official = load_metadata()
    assert len(rows) == len(INDICES) * N_SAMPLES
    for row in rows:
        assert set(row) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
        folder = os.path.basename(os.path.dirname(os.path.dirname(row["filename"])))
        assert json.loads(row["metadata"]) == official[int(folder)]
        assert row["correct"] == (row["reason"] == "")
        for boxes in json.loads(row["details"]).values():
            assert all(len(b) == 5 for b in boxes)
    assert {r["tag"] for r in rows} == set(TAGS)
    # Every class is detected (thresholds 0, all pairs kept), so objects are found and counting over-counts.
    assert all(r["correct"] for r in rows if r["tag"] in ("single_object", "two_object"))
    assert all(r["reason"].startswith("expected clock<3, found") for r in rows if r["tag"] == "counting")

    # Summary through the CLI, two "runs" to compare; arithmetic checked against results.jsonl.
    js, png = str(tmp_path / "summary.json"), str(tmp_path / "bars.png")
    assert (
        cli_main(
            [
                "geneval",
                "summary",
                results,
                results,
                "--names",
                "base",
                "aligned",
                "--json",
                js,
                "--plot",
                png,
            ]
        )
        == 0
    )
    with open(js) as f:
        summ = json.load(f)["base"]
    per_tag = {t: np.mean([r["correct"] for r in rows if r["tag"] == t]) for t in TAGS}
    for t in TAGS:
        assert summ["tasks"][t]["accuracy"] == pytest.approx(per_tag[t])
        assert summ["tasks"][t]["total"] == N_SAMPLES
    assert summ["overall"] == pytest.approx(np.mean(list(per_tag.values())))
    by_prompt = {}
    for r in rows:
        by_prompt[r["prompt"]] = by_prompt.get(r["prompt"], False) or r["correct"]
    assert summ["prompts"] == len(INDICES)
    assert summ["correct_prompts"] == pytest.approx(np.mean(list(by_prompt.values())))
    assert summ["correct_images"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert Image.open(png).size[0] > 100

    # Resume: everything is already there.
    again = evaluate(out, detector, colors, outfile=results, options=OPEN, progress=False)
    assert again["evaluated"] == 0 and again["reused"] == len(rows)
    with pytest.raises(ValueError, match="made with options"):
        evaluate(out, detector, colors, outfile=results, progress=False)


class OracleDetector:
    """Returns the same detections for every image: enough to satisfy all six test prompts, colours included."""

    def __init__(self, break_some=False):
        bear, dog = [10, 40, 20, 50], [40, 40, 50, 50]
        if break_some:
            dog = [0, 40, 8, 50]  # left of the bear
        self.dets = {
            "bench": [{"box": [0, 0, 10, 10], "score": 0.8}],
            "sports ball": [{"box": [20, 0, 25, 5], "score": 0.7}],
            "clock": [{"box": [30, 0, 35, 5], "score": 0.95}, {"box": [40, 0, 45, 5], "score": 0.92}],
            "fire hydrant": [{"box": [0, 20, 5, 25], "score": 0.9, "color": "red" if break_some else "blue"}],
            "teddy bear": [{"box": bear, "score": 0.9}],
            "dog": [{"box": dog, "score": 0.9}],
            "wine glass": [{"box": [0, 55, 5, 60], "score": 0.9, "color": "purple"}],
            "apple": [{"box": [10, 55, 15, 60], "score": 0.9, "color": "black"}],
        }

    def detect(self, image, class_names):
        return {k: [{**d, "mask": None, "color": d.get("color")} for d in v] for k, v in self.dets.items()}


def test_evaluate_wiring_with_oracle_detector(generated, tmp_path):
    out, _, _ = generated
    # No colour classifier: the detector's colours are used, CLIP is never needed.
    good = str(tmp_path / "good.jsonl")
    evaluate(out, OracleDetector(), None, outfile=good, progress=False)
    s = summarize_file(good)
    assert s["overall"] == 1.0 and s["correct_prompts"] == 1.0 and s["images"] == 12
    bad = str(tmp_path / "bad.jsonl")
    evaluate(out, OracleDetector(break_some=True), None, outfile=bad, progress=False)
    s = summarize_file(bad)
    assert s["tasks"]["position"]["accuracy"] == 0.0 and s["tasks"]["colors"]["accuracy"] == 0.0
    assert s["overall"] == pytest.approx(4 / 6)
    reasons = {r["tag"]: r["reason"] for r in read_results(bad)}
    assert reasons["colors"] == "expected blue fire hydrant>=1, found 0 blue; and 1 red"
    assert reasons["position"] == "expected dog right of target, found left of target"

    # A kill mid-write leaves a cut last line: evaluate drops it, redoes that row and keeps the others.
    with open(good, encoding="utf-8") as f:
        lines = f.readlines()
    with open(good, "w", encoding="utf-8") as f:
        f.writelines(lines[:-2] + [lines[-2][:25]])
    evaluate(out, OracleDetector(), None, outfile=good, progress=False)
    with open(good, encoding="utf-8") as f:
        redone = f.readlines()
    assert sorted(redone) == sorted(lines) and redone[:-2] == lines[:-2]
    # A line that ends cut but whole (killed before its newline) gets the newline, and nothing is redone.
    with open(good, "w", encoding="utf-8") as f:
        f.writelines(lines[:-1] + [lines[-1].rstrip("\n")])
    evaluate(out, OracleDetector(), None, outfile=good, progress=False)
    with open(good, encoding="utf-8") as f:
        assert f.readlines() == lines


def test_bad_input_keeps_the_rest(generated, tmp_path):
    src, _, _ = generated
    out = str(tmp_path / "broken")
    shutil.copytree(src, out)
    with open(os.path.join(out, "00080", "samples", "0001.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    shutil.rmtree(os.path.join(out, "00259"))  # a whole prompt folder is missing
    with open(os.path.join(out, "00453", "metadata.jsonl"), "w") as f:
        json.dump(load_metadata()[454], f)  # metadata that doesn't match the folder
    results = str(tmp_path / "broken.jsonl")
    with pytest.raises(GenEvalErrors) as info:
        evaluate(out, OracleDetector(), None, outfile=results, progress=False)
    msg = str(info.value)
    assert "3 prompt folder(s)/image(s) could not be evaluated" in msg
    assert "unreadable image" in msg and "missing prompt folder" in msg and "metadata mismatch" in msg
    errors = [json.loads(line) for line in open(results + ".errors.jsonl")]
    assert sorted((e["folder"], e["filename"]) for e in errors) == [
        ("00080", "0001.png"),
        ("00259", None),
        ("00453", None),
    ]
    # The others were evaluated: 12 images - 1 unreadable - 2 (missing folder) - 2 (bad metadata) = 7.
    rows = read_results(results)
    assert len(rows) == 7 and all(r["correct"] for r in rows)
    with pytest.raises(ValueError, match="could not be evaluated"):
        summarize_file(results)
    s = summarize_file(results, allow_errors=True)
    assert s["errors"] == 3 and s["images"] == 7 and s["missing_tasks"] == ["colors", "color_attr"]
    # A missing sample is reported too, and the folder's other images still count.
    os.remove(os.path.join(out, "00000", "samples", "0000.png"))
    report = evaluate(
        out, OracleDetector(), None, outfile=str(tmp_path / "r2.jsonl"), raise_on_error=False, progress=False
    )
    assert ("00000", "0000.png") in {(e["folder"], e["filename"]) for e in report["errors"]}
    assert report["evaluated"] == 6
    # No metadata check: a folder's own metadata is trusted.
    report = evaluate(
        out,
        OracleDetector(),
        None,
        outfile=str(tmp_path / "r3.jsonl"),
        reference_metadata=None,
        raise_on_error=False,
        progress=False,
    )
    assert report["evaluated"] == 8
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate(str(tmp_path / "nope"), OracleDetector(), None)
    with pytest.raises(ValueError, match="needs colour classification"):
        evaluate(src, models_free_detector(), None, outfile=str(tmp_path / "r4.jsonl"), progress=False)


def models_free_detector():
    det = OracleDetector()
    det.dets["fire hydrant"][0].pop("color")
    return det


def test_summary_arithmetic_and_bad_rows(tmp_path):
    rows = []
    for tag, flags in zip(
        TAGS, [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [1, 1, 1, 0]]
    ):
        for k, f in enumerate(flags):
            meta = json.dumps({"tag": tag, "prompt": f"{tag}-{k // 2}"})
            rows.append(
                {
                    "filename": f"x/{k}.png",
                    "tag": tag,
                    "prompt": "p",
                    "correct": bool(f),
                    "reason": "",
                    "metadata": meta,
                }
            )
    s = summarize(rows)
    assert s["tasks"]["single_object"] == {"accuracy": 0.5, "correct": 2, "total": 4}
    assert s["overall"] == pytest.approx((0.5 + 0.25 + 0 + 1 + 0.25 + 0.75) / 6)
    # Prompts (2 per tag, 2 images each): any-correct -> so: 1,0 ; to: 1,0 ; co: 0,0 ; cl: 1,1 ; po: 1,0 ; ca: 1,1.
    assert s["prompts"] == 12 and s["correct_prompts"] == pytest.approx(7 / 12)
    path = tmp_path / "r.jsonl"
    path.write_text('{"filename": "a"}\n')
    with pytest.raises(ValueError, match="lacks"):
        read_results(str(path))
    with pytest.raises(FileNotFoundError):
        read_results(str(tmp_path / "missing.jsonl"))


def test_cli_generate_from_folder_with_lora(tmp_path):
    """`diffalign geneval generate` on a saved pipeline folder, with and without a LoRA (which must change the image)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffalign.cli import main as cli_main
    from diffalign.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(0)
    model_dir, lora_dir = str(tmp_path / "model"), str(tmp_path / "lora")
    pipe.save_pretrained(model_dir)
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    type(pipe).save_lora_weights(lora_dir, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    common = [
        "--indices",
        "259",
        "--n_samples",
        "1",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    ]
    assert (
        cli_main(["geneval", "generate", "--model", model_dir, "--out", str(tmp_path / "base"), *common]) == 0
    )
    assert (
        cli_main(
            [
                "geneval",
                "generate",
                "--model",
                model_dir,
                "--lora",
                lora_dir,
                "--out",
                str(tmp_path / "lora_run"),
                *common,
            ]
        )
        == 0
    )
    base = np.asarray(Image.open(tmp_path / "base" / "00259" / "samples" / "0000.png"))
    tuned = np.asarray(Image.open(tmp_path / "lora_run" / "00259" / "samples" / "0000.png"))
    assert base.shape == tuned.shape == (64, 64, 3) and not np.array_equal(base, tuned)
    with open(tmp_path / "lora_run" / MANIFEST) as f:
        assert json.load(f)["model"].endswith("+ " + lora_dir)
    bad = ["geneval", "generate", "--model", model_dir, "--out", str(tmp_path / "x"), "--pipeline_kwargs", "[1]", *common]
    assert cli_main(bad) == 2  # an expected error: one line on stderr (the CLI's job), the exception with --debug
    with pytest.raises(ValueError, match="JSON object"):
        cli_main(["--debug", *bad])


def test_cli_evaluate_with_toyworld_detector(tmp_path, capsys):
    """`diffalign geneval evaluate --detector toyworld` on rendered toy scenes (colours from the detector, no CLIP)."""
    from diffalign.cli import main as cli_main
    from diffalign.toyworld.scenes import render, sample_row, sample_scene

    rng = np.random.default_rng(0)
    rows = [sample_row(rng, task) for task in TAGS]
    meta_file = tmp_path / "toy.jsonl"
    meta_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "toy"
    for i, row in enumerate(rows):
        (out / f"{i:05d}" / "samples").mkdir(parents=True)
        (out / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(row))
        render(sample_scene(row, rng)).save(out / f"{i:05d}" / "samples" / "0000.png")
    assert (
        cli_main(["geneval", "evaluate", str(out), "--detector", "toyworld", "--metadata", str(meta_file)])
        == 0
    )
    rows_out = read_results(str(out / "results.jsonl"))
    assert len(rows_out) == 6 and {r["tag"] for r in rows_out} == set(TAGS)
    # Exact renders through the exact detector: (nearly) everything must be judged correct.
    assert sum(r["correct"] for r in rows_out) >= 5, [r["reason"] for r in rows_out]
    # Against the official prompts these folders are a metadata mismatch: exit status 1, named.
    assert (
        cli_main(
            [
                "geneval",
                "evaluate",
                str(out),
                "--detector",
                "toyworld",
                "--outfile",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 1
    )
    assert "metadata mismatch" in capsys.readouterr().err
