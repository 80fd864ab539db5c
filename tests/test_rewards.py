"""Reward models: registry, preprocessing constants, and each score formula against an eager re-computation
on a tiny random model of the same architecture (open_clip tiny config, tiny transformers CLIPModel)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import rewards
from diffalign.rewards import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TINY_CLIP,
    PreprocessConfig,
    preprocess_tensor,
)

PROMPTS = ["a red cube on a blue sphere", "two green cats", "a photo of a yellow bus", "an empty room"]


def _images(n=4, seed=0, sizes=((80, 96), (96, 80), (64, 64), (70, 130))):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        # Smooth-ish images (low-frequency noise upsampled) so resampling differences stay small.
        small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    return out


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


@pytest.fixture(scope="module")
def tiny_clip():
    return rewards.load("clip_score", model_name=TINY_CLIP, random_init=True, seed=0, device="cpu")


def _eager_open_clip_cos(model, pixels, prompts):
    import open_clip

    tokens = open_clip.tokenize(prompts)
    img = model.visual(pixels)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = model.encode_text(tokens)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1)


# ------------------------------------------------------------------------------------------ registry
def test_registry_names_and_errors():
    names = rewards.available()
    for name in ("clip_score", "pickscore", "hpsv2", "hpsv21", "aesthetic", "imagereward"):
        assert name in names
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        rewards.load("nope")
    # A model without weights is refused unless random_init says so.
    with pytest.raises(ValueError, match="random_init=True"):
        rewards.load("clip_score", model_name=TINY_CLIP, pretrained=None)
    with pytest.raises(ValueError, match="mlp_path"):
        rewards.load("aesthetic")
    with pytest.raises(ValueError, match="form"):
        rewards.load("clip_score", model_name=TINY_CLIP, random_init=True, form="cosine")


def test_register_custom_reward_and_duplicate():
    class Brightness(rewards.RewardModel):
        def __init__(self, **kw):
            super().__init__(PreprocessConfig(size=8), **kw)
            self._finish_init()

        def _score(self, pixel_values, prompts):
            return pixel_values.mean(dim=(1, 2, 3))

    @rewards.register_reward("test_brightness")
    def _factory(**kw):
        return Brightness(**kw)

    r = rewards.load("test_brightness", device="cpu")
    assert r.name == "test_brightness"
    ims = _images(2)
    assert r.score(ims, PROMPTS[:2]).shape == (2,)
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("test_brightness", lambda **kw: Brightness(**kw))
    with pytest.raises(ValueError, match="one prompt per image"):
        r.score(ims, PROMPTS[:1])


# ------------------------------------------------------------------------------------------ preprocessing
def test_preprocessing_constants_pinned():
    """Every shipped reward uses OpenAI CLIP normalisation and 'bicubic shorter side -> 224, centre crop 224'."""
    import open_clip
    from transformers import CLIPImageProcessor

    from diffalign.rewards.pickscore import processor_preprocess_config

    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    expected = PreprocessConfig(size=224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, interpolation="bicubic")
    # clip_score / aesthetic default (ViT-L-14 openai) and HPSv2 (ViT-H-14, laion2b base): read, not downloaded.
    for model_name, tag in (("ViT-L-14", "openai"), ("ViT-H-14", "laion2b_s32b_b79k")):
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        assert tuple(cfg["mean"]) == OPENAI_CLIP_MEAN and tuple(cfg["std"]) == OPENAI_CLIP_STD
        assert cfg["interpolation"] == "bicubic" and cfg.get("resize_mode", "shortest") == "shortest"
        assert open_clip.get_model_config(model_name)["vision_cfg"]["image_size"] == 224
    # PickScore's processor is a default CLIPImageProcessor (laion ViT-H-14).
    assert processor_preprocess_config(CLIPImageProcessor()) == expected
    # The tiny open_clip config keeps the same recipe at 64 px.
    from diffalign.rewards._open_clip import build_open_clip

    _m, transform, _t, pre = build_open_clip(TINY_CLIP, None, random_init=True)
    assert pre == PreprocessConfig(size=64, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, interpolation="bicubic")
    assert "bicubic" in repr(transform) and "CenterCrop" in repr(transform)


def test_tensor_preprocessing_matches_pil_transforms(tiny_clip):
    from transformers import CLIPImageProcessor

    from diffalign.rewards.pickscore import processor_preprocess_config

    proc = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    for im in _images(4):
        x = _to_tensor(im)[None]
        ours = preprocess_tensor(x, tiny_clip.preprocess)[0]
        theirs = tiny_clip.pil_transform(im)
        assert ours.shape == theirs.shape == (3, 64, 64)
        # PIL resamples in uint8; the torch twin in float: differences are a few grey levels at most.
        diff = (ours - theirs).abs() * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1) * 255
        assert diff.mean() < 1.0 and diff.max() < 12, (im.size, diff.mean(), diff.max())
        hf = torch.as_tensor(proc(images=[im], return_tensors="pt")["pixel_values"][0])
        ours_hf = preprocess_tensor(x, processor_preprocess_config(proc))[0]
        diff = (ours_hf - hf).abs() * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1) * 255
        assert diff.mean() < 1.0 and diff.max() < 12, (im.size, diff.mean(), diff.max())


# ------------------------------------------------------------------------------------------ formulas
def test_clip_score_formulas(tiny_clip):
    ims = _images(4)
    pixels = torch.stack([tiny_clip.pil_transform(im) for im in ims])
    with torch.no_grad():
        cos = _eager_open_clip_cos(tiny_clip.model, pixels, PROMPTS)
    got = tiny_clip.score(ims, PROMPTS, batch_size=3)  # two batches
    torch.testing.assert_close(got, 2.5 * cos.clamp(min=0), rtol=1e-5, atol=1e-6)
    tm = rewards.load("clip_score", model_name=TINY_CLIP, random_init=True, seed=0, form="torchmetrics", device="cpu")
    torch.testing.assert_close(tm.score(ims, PROMPTS), 100 * cos, rtol=1e-5, atol=1e-4)
    # Same seed, same random model; output dtype float32 whatever the model dtype.
    bf = rewards.load("clip_score", model_name=TINY_CLIP, random_init=True, seed=0, dtype="bfloat16", device="cpu",
                      form="torchmetrics")
    out = bf.score(ims, PROMPTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, 100 * cos, rtol=0.1, atol=3.0)


def test_hps_formula_and_checkpoint_loading(tmp_path, tiny_clip):
    # An HPS-style checkpoint: {'state_dict': ...} with DDP 'module.' prefixes.
    src = rewards.load("clip_score", model_name=TINY_CLIP, random_init=True, seed=7, device="cpu").model
    ckpt = tmp_path / "HPS_tiny.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, ckpt)
    hps = rewards.load("hpsv21", checkpoint=str(ckpt), model_name=TINY_CLIP, device="cpu")
    assert hps.name == "hpsv21"
    for k, v in src.state_dict().items():
        torch.testing.assert_close(hps.model.state_dict()[k], v)
    ims = _images(4, seed=1)
    pixels = torch.stack([hps.pil_transform(im) for im in ims])
    with torch.no_grad():
        cos = _eager_open_clip_cos(src, pixels, PROMPTS)
    torch.testing.assert_close(hps.score(ims, PROMPTS), cos, rtol=1e-5, atol=1e-6)  # raw cosine, no scale
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.nope": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        rewards.load("hpsv2", checkpoint=str(bad), model_name=TINY_CLIP, device="cpu")
    with pytest.raises(FileNotFoundError, match="hpsv2 checkpoint"):
        rewards.load("hpsv2", checkpoint=str(tmp_path / "missing.pt"), model_name=TINY_CLIP, device="cpu")


def test_aesthetic_formula_and_published_layout(tmp_path):
    from diffalign.rewards.aesthetic import AestheticMLP

    mlp = AestheticMLP(768)
    linears = [(m.in_features, m.out_features) for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    assert linears == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [m.p for m in mlp.layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]
    assert sorted(mlp.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))

    torch.manual_seed(3)
    weights = AestheticMLP(32).state_dict()
    path = tmp_path / "tiny-aesthetic.pth"
    torch.save(weights, path)
    aes = rewards.load("aesthetic", mlp_path=str(path), clip_model=TINY_CLIP, random_init=True, seed=0, device="cpu")
    ims = _images(4, seed=2)
    pixels = torch.stack([aes.pil_transform(im) for im in ims])
    with torch.no_grad():
        emb = aes.clip_model.visual(pixels)
        x = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # no activations in the published MLP
            x = x @ weights[f"layers.{i}.weight"].T + weights[f"layers.{i}.bias"]
    torch.testing.assert_close(aes.score(ims, ["ignored"] * 4), x[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        torch.save(AestheticMLP(16).state_dict(), tmp_path / "wrong.pth")
        rewards.load("aesthetic", mlp_path=str(tmp_path / "wrong.pth"), clip_model=TINY_CLIP, random_init=True,
                     device="cpu")


def _tiny_clip_model_dir(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    from diffalign.testing import tiny_clip_text_config
    from diffalign.tokenization import clip_tokenizer

    vision = CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=37,
                              num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=tiny_clip_text_config().to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=32))
    with torch.no_grad():
        model.logit_scale.fill_(4.0)  # exp(4) ~ 54.6: a scale different from the default catches a missing .exp()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 64},
                                                            crop_size={"height": 64, "width": 64}),
                         tokenizer=clip_tokenizer())
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return model, proc


def test_pickscore_formula(tmp_path):
    model, proc = _tiny_clip_model_dir(tmp_path / "pick")
    pick = rewards.load("pickscore", model_name_or_path=str(tmp_path / "pick"), device="cpu")
    ims = _images(4, seed=3)
    with torch.no_grad():
        pixels = torch.as_tensor(proc(images=ims, return_tensors="pt")["pixel_values"])
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tok = proc(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.text_projection(model.text_model(**tok).pooler_output)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        expected = torch.exp(torch.tensor(4.0)) * (img * txt).sum(-1)
    torch.testing.assert_close(pick.score(ims, PROMPTS), expected, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------ gradients
def test_differentiable_path_matches_pil_and_has_gradients(tiny_clip):
    ims = _images(4, seed=4)
    x = torch.stack([_to_tensor(im) for im in _images(4, seed=4, sizes=((64, 64),))])
    pil_ims = [Image.fromarray(((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for t in x]
    x.requires_grad_(True)
    # The torchmetrics form: the Hessel clamp can zero the gradient of a random model.
    tm = rewards.load("clip_score", model_name=TINY_CLIP, random_init=True, seed=0, form="torchmetrics", device="cpu")
    s = tm.score(x, PROMPTS)
    s.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(s.detach(), tm.score(pil_ims, PROMPTS), rtol=1e-4, atol=1e-3)
    # Non-square larger inputs go through resize + crop and still agree closely with the PIL path.
    big = [im.resize((im.width * 2, im.height * 2), Image.BICUBIC) for im in ims]
    xt = torch.stack([_to_tensor(im) for im in big[:2] if im.size == big[0].size])
    pil_scores = tiny_clip.score(big[:1], PROMPTS[:1])
    torch.testing.assert_close(tiny_clip.score(xt[:1], PROMPTS[:1]), pil_scores, rtol=0.05, atol=0.02)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        tiny_clip.score(torch.zeros(1, 4, 8, 8), PROMPTS[:1])


@pytest.mark.skipif(importlib.util.find_spec("ImageReward") is not None, reason="ImageReward is installed")
def test_imagereward_missing_extra_is_clear():
    with pytest.raises(ImportError, match=r"diffalign\[imagereward\]"):
        rewards.load("imagereward")


# ------------------------------------------------------------------------------------------ evaluation
def test_report_summary_and_win_rates():
    from diffalign.rewards.report import summarize, win_rates

    s = summarize({"r": [1.0, 2.0, 3.0, 6.0]})["r"]
    # mean 3; sample variance (4 + 1 + 0 + 9) / 3 = 14/3; stderr = sqrt(14/3) / 2
    assert s["n"] == 4 and s["mean"] == pytest.approx(3.0) and s["stderr"] == pytest.approx((14 / 3) ** 0.5 / 2)
    w = win_rates({"r": [1.0, 2.0, 3.0]}, {"r": [0.0, 2.0, 4.0]})["r"]
    assert (w["wins"], w["losses"], w["ties"], w["win_rate"]) == (1, 1, 1, pytest.approx(0.5))
    with pytest.raises(ValueError, match="matched"):
        win_rates({"r": [1.0]}, {"r": [1.0, 2.0]})


def test_eval_script_scores_folders_and_compares(tmp_path, capsys):
    import importlib.util
    import json
    import pathlib

    from diffalign.rewards.report import save_image_folder

    names = [f"{i}.png" for i in range(4)]
    set_a, set_b = _images(4, seed=10, sizes=((64, 64),)), _images(4, seed=11, sizes=((64, 64),))
    save_image_folder(str(tmp_path / "a"), names, set_a, PROMPTS)
    save_image_folder(str(tmp_path / "b"), names[::-1], set_b[::-1], PROMPTS[::-1])  # other order, same keys
    script = pathlib.Path(__file__).resolve().parents[1] / "eval" / "rewards.py"
    spec = importlib.util.spec_from_file_location("eval_rewards", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "r.json"
    module.main(["--images", str(tmp_path / "a"), "--images", str(tmp_path / "b"), "--json", str(out),
                 "--reward", f"clip_score,model_name={TINY_CLIP},random_init=true,seed=0,device=cpu,form=torchmetrics"])
    result = json.loads(out.read_text())
    tm = rewards.load("clip_score", model_name=TINY_CLIP, random_init=True, seed=0, form="torchmetrics", device="cpu")
    sa, sb = tm.score(set_a, PROMPTS).double(), tm.score(set_b, PROMPTS).double()
    assert not torch.equal(sa, sb)
    assert result["summary"]["a"]["clip_score"]["mean"] == pytest.approx(float(sa.mean()), rel=1e-5)
    assert result["summary"]["b"]["clip_score"]["mean"] == pytest.approx(float(sb.mean()), rel=1e-5)
    expected = (float((sa > sb).sum()) + 0.5 * float((sa == sb).sum())) / 4
    assert result["win_rates"]["per_reward"]["clip_score"]["win_rate"] == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert "| clip_score |" in printed and "win rate a vs b" in printed
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        module.main(["--images", str(tmp_path), "--reward", "clip_score"])


def test_image_folders_are_read_lazily_and_bad_files_are_named(tmp_path):
    from diffalign.rewards.report import ImageFiles, load_image_folder, save_image_folder

    save_image_folder(str(tmp_path / "a"), ["0.png", "1.png"], _images(2, seed=1, sizes=((16, 16),)), PROMPTS[:2])
    keys, images, prompts = load_image_folder(str(tmp_path / "a"))
    assert isinstance(images, ImageFiles) and keys == ["0.png", "1.png"] and len(images) == 2
    assert [im.size for im in images[0:2]] == [(16, 16), (16, 16)]  # decoded per batch, on access
    (tmp_path / "a" / "1.png").write_bytes((tmp_path / "a" / "1.png").read_bytes()[:30])  # truncated
    _, images, _ = load_image_folder(str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"1.png is not a readable image"):
        images[1]
    with open(tmp_path / "a" / "metadata.jsonl", "a", encoding="utf-8") as f:
        f.write('{"file_name": "2.png", "prompt"\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:3 is not valid JSON"):
        load_image_folder(str(tmp_path / "a"))


def test_resolve_file_local_or_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from diffalign.rewards.base import resolve_file

    local = tmp_path / "w.pt"
    local.write_bytes(b"x")
    assert resolve_file(str(local), "w") == str(local)
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename: calls.append((repo_id, filename)) or "/cache/f")
    assert resolve_file("xswu/HPSv2/HPS_v2.1_compressed.pt", "hps") == "/cache/f"
    assert calls == [("xswu/HPSv2", "HPS_v2.1_compressed.pt")]
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        resolve_file(str(tmp_path / "missing.pt"), "hps checkpoint")


def test_registry_finds_rewards_registered_by_other_rooms():
    # The toy world registers its rewards in its own modules; load() must find them without the caller
    # importing the toy world first.
    from diffalign.rewards import available, load

    names = available()
    for name in ("toy_geneval", "toy_geneval_graded", "toy_clip", "toy_taste_warm"):
        assert name in names
    assert type(load("toy_geneval")).__name__ == "ToyGenEvalReward"


def test_toy_rewards_come_from_the_entry_point_group_not_a_hard_coded_list(monkeypatch):
    import inspect
    from importlib.metadata import EntryPoint

    from diffalign.rewards import base

    assert "toyworld" not in inspect.getsource(base)  # the registry names no room above it
    assert {"toy_clip", "toy_geneval", "toy_taste_warm"} <= set(rewards.available())
    # A plugin that fails to import is named in the error, not skipped.
    broken = EntryPoint(name="broken", value="diffalign.no_such_module", group=base.PLUGIN_GROUP)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [broken] if group == base.PLUGIN_GROUP else [])
    monkeypatch.setattr(base, "_plugins_loaded", False)
    with pytest.raises(ImportError, match="reward plugin 'broken' \\(diffalign.no_such_module"):
        rewards.available()


def test_wins_counts_ties_as_half_and_needs_matched_items():
    from diffalign.evaluation.stats import wins

    assert wins([3, 1, 2, 2], [1, 3, 2, 5]).tolist() == [1.0, 0.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="matched"):
        wins([1, 2], [1, 2, 3])
