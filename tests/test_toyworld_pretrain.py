import json
import os

import pytest
import torch

from diffalign.toyworld import pretrain as P


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_text_encoding_matches_the_pipeline(family):
    comps = P.build_components(family, seed=0)
    pipe = P.make_pipeline(family, comps)
    prompts = ["a photo of a red circle and a blue square", "a photo of three stars"]
    ids = P.TokenCache(comps["tokenizer"])(prompts)
    with torch.no_grad():
        ours, pooled = P.encode_text(family, comps["text_encoder"], comps["text_encoder_2"], ids)
        if family == "sdxl":
            ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        else:
            ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(pooled, ref_pooled)


def test_toy_sd3_starts_as_dit_adaln_zero_and_trains():
    torch.manual_seed(0)
    model = P.toy_sd3_transformer()
    model.set_attn_processor(P.RepeatedTokenJointAttnProcessor())
    assert model.config.qk_norm == "rms_norm"
    x = torch.randn(2, 4, P.LATENT_SIZE, P.LATENT_SIZE)
    ctx, pooled = torch.randn(2, 77, 2 * P.TEXT_HIDDEN), torch.randn(2, 2 * P.TEXT_HIDDEN)

    def forward():
        return model(hidden_states=x, timestep=torch.tensor([100.0, 900.0]), encoder_hidden_states=ctx,
                     pooled_projections=pooled, joint_attention_kwargs={"last_token_repeats": P.SD3_ZERO_TOKENS}).sample

    # Zero modulation and output projection: the model starts at exactly 0 (DiT's adaLN-Zero)...
    out = forward()
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(b.norm1.linear.weight) == 0 for b in model.transformer_blocks)
    # ... and gradients still reach every block: two steps later the blocks' modulation has moved.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        (forward() - x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.count_nonzero(forward()) > 0
    assert all(torch.count_nonzero(b.norm1.linear.weight) > 0 for b in model.transformer_blocks)


def _run(tmp_path, family, steps, **kw):
    cfg = P.PretrainConfig(
        family=family,
        output_dir=str(tmp_path / f"toy-{family}"),
        state_dir=str(tmp_path / f"state-{family}"),
        vae_steps=2,
        vae_batch_size=2,
        steps=steps,
        batch_size=2,
        eval_every=2,
        eval_per_task=1,
        num_inference_steps=2,
        save_every=2,
        log_every=1,
        vae_calibration_images=4,
        progress=False,
        **kw,
    )
    return cfg, P.pretrain(cfg)


def _log(cfg):
    with open(os.path.join(cfg.state_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sdxl_recipe_runs_resumes_and_loads(tmp_path):
    cfg, res = _run(tmp_path, "sdxl", steps=2)
    assert res["step"] == 2 and 0.0 <= res["overall"] <= 1.0 and res["n_images"] == 6
    first = [r["loss"] for r in _log(cfg) if r["stage"] == "sdxl"]
    assert len(first) == 2 and all(x == x and x > 0 for x in first)
    # A run killed after logging step 3 but before saving it: the resume logs step 3 once, not twice.
    with open(os.path.join(cfg.state_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps({"stage": "sdxl", "step": 3, "loss": 9.0}) + "\n")
    # Resume to 4 steps: the same run continues (no VAE retraining, steps 3 and 4 only).
    cfg, res = _run(tmp_path, "sdxl", steps=4)
    log = _log(cfg)
    assert [r["step"] for r in log if r["stage"] == "sdxl"] == [1, 2, 3, 4]
    assert [r["step"] for r in log if r["stage"] == "vae"] == [1, 2]
    assert [r["step"] for r in log if r["stage"] == "eval"] == [2, 4]
    resumed = [r["loss"] for r in log if r["stage"] == "sdxl"]

    # The same 4 steps uninterrupted give the same losses (data and noise are seeded by the step).
    straight, _ = _run(tmp_path / "straight", "sdxl", steps=4)
    uninterrupted = [r["loss"] for r in _log(straight) if r["stage"] == "sdxl"]
    assert resumed == pytest.approx(uninterrupted, rel=1e-4)

    pipe = P.load_toy_pipeline("sdxl", cfg.output_dir)
    image = pipe("a photo of a red circle", num_inference_steps=2).images[0]
    assert image.size == (64, 64)
    info = json.load(open(os.path.join(cfg.output_dir, "toyworld_info.json")))
    assert info["steps"] == 4 and info["family"] == "sdxl"
    assert not os.path.exists(os.path.join(cfg.output_dir, "tokenizer", "tokenizer.json"))

    # toy-sd3 reusing that VAE (no stage 1).
    cfg3, res3 = _run(tmp_path, "sd3", steps=2, vae_from=cfg.output_dir)
    assert not [r for r in _log(cfg3) if r["stage"] == "vae"]
    pipe3 = P.load_toy_pipeline("sd3", cfg3.output_dir)
    assert pipe3("a photo of a blue star", num_inference_steps=2).images[0].size == (64, 64)
    # Its own calibration: on the calibration scenes, (z - shift_factor) * scaling_factor has mean 0 and std 1
    # (fp16 storage of the weights moves the latents slightly).
    stream = P.SceneStream(cfg3.seed + 20_000, cfg3.p_full_caption)
    x = torch.stack([stream[i][0] for i in range(cfg3.vae_calibration_images)])
    with torch.no_grad():
        z = pipe3.vae.encode(x).latent_dist.mean.float()
    scaled = (z - pipe3.vae.config.shift_factor) * pipe3.vae.config.scaling_factor
    assert abs(float(scaled.mean())) < 0.02 and float(scaled.std()) == pytest.approx(1.0, abs=0.02)


def test_config_errors():
    with pytest.raises(ValueError, match="family"):
        P.PretrainConfig(family="sd15")
    with pytest.raises(ValueError, match="caption_dropout"):
        P.PretrainConfig(caption_dropout=1.0)
    with pytest.raises(FileNotFoundError, match="pretrain"):
        P.load_toy_pipeline("sdxl", "/nonexistent")


def test_cli_parses_types():
    cfg = P.parse_args(["--family", "sd3", "--steps", "7", "--lr", "0.5", "--time_limit_s", "3", "--progress", "false"])
    assert cfg.family == "sd3" and cfg.steps == 7 and cfg.lr == 0.5 and cfg.time_limit_s == 3.0 and cfg.progress is False


def test_shipped_checkpoints_load_generate_and_fit_the_budget():
    total = 0  # every toy checkpoint together (toy-sdxl, toy-sd3, toy-clip): the 60 MB budget
    for root, _, files in os.walk(P.CHECKPOINT_ROOT):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    assert total <= 60_000_000, f"shipped checkpoints take {total} bytes"
    sd3 = P.load_toy_pipeline("sd3")
    assert sd3("a photo of a red circle", num_inference_steps=2).images[0].size == (64, 64)

    # toy-sdxl is really trained: single objects come out right (an untrained model scores 0 here).
    from diffalign.toyworld import scenes
    from diffalign.toyworld.detector import score_images

    pipe = P.load_toy_pipeline("sdxl")
    rows = [scenes.single_object_row(s) for s in scenes.SHAPES]
    images = P.generate(pipe, [r["prompt"] for r in rows], list(range(len(rows))), 10, 5.0)
    assert sum(score_images(images, rows)) >= 3


def test_repeated_token_attention_equals_the_pipelines_zero_tokens():
    # 77 CLIP tokens + 1 zero token weighted 256x must equal 77 + 256 zero tokens through the whole transformer.
    torch.manual_seed(0)
    m = P.toy_sd3_transformer().eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)  # zero-initialised output layers would make any two inputs agree
    width = 2 * P.TEXT_HIDDEN
    x, clip, pooled, t = torch.randn(2, 4, 16, 16), torch.randn(2, 77, width), torch.randn(2, width), torch.tensor([100.0, 900.0])
    full = torch.cat([clip, torch.zeros(2, P.SD3_ZERO_TOKENS, width)], 1)
    one = torch.cat([clip, torch.zeros(2, 1, width)], 1)
    with torch.no_grad():
        ref = m(hidden_states=x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled).sample
        m.set_attn_processor(P.RepeatedTokenJointAttnProcessor())
        plain = m(hidden_states=x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled).sample
        fast = m(hidden_states=x, timestep=t, encoder_hidden_states=one, pooled_projections=pooled,
                 joint_attention_kwargs={"last_token_repeats": P.SD3_ZERO_TOKENS}).sample
        unweighted = m(hidden_states=x, timestep=t, encoder_hidden_states=one, pooled_projections=pooled).sample
    torch.testing.assert_close(plain, ref)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
    assert (unweighted - ref).abs().max() > 1e-3  # the weight matters: the check can fail


def test_fast_sd3_generation_is_the_default_call():
    import numpy as np

    comps = P.build_components("sd3", seed=0)
    for p in comps["transformer"].parameters():
        p.data.normal_(0, 0.05)
    pipe = P.make_pipeline("sd3", comps)

    def run(**kw):
        latents = torch.randn(2, *P.latent_shape(pipe), generator=torch.Generator().manual_seed(0))
        return pipe(prompt=["a photo of a ring"] * 2, height=64, width=64, num_inference_steps=3, latents=latents,
                    output_type="np", **kw).images

    ref = run()
    kw = P.fast_sd3_kwargs(pipe)
    assert kw["max_sequence_length"] == 1
    np.testing.assert_allclose(run(**kw), ref, atol=1e-5)
    # SDXL, or a transformer with someone else's attention processors, is left alone.
    assert P.fast_sd3_kwargs(P.make_pipeline("sdxl", P.build_components("sdxl"))) == {}


def test_stored_half_loads_as_float32(tmp_path):
    comps = P.build_components("sdxl", seed=0)
    P.make_pipeline("sdxl", comps).save_pretrained(tmp_path)
    P.store_half(str(tmp_path))
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "text_encoder" / "model.safetensors"))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    pipe = P.load_toy_pipeline("sdxl", str(tmp_path))
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype, pipe.vae.dtype} == {torch.float32}
    w = comps["unet"].conv_in.weight
    torch.testing.assert_close(pipe.unet.conv_in.weight, w.half().float())


def test_lr_schedule_warms_up_holds_then_cools_down_to_a_floor():
    factor = P._lr_lambda(warmup=10, decay_start=100, decay_steps=50, final_ratio=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == 1.0 and factor(99) == 1.0
    assert factor(124) == pytest.approx(1 - 25 / 50 * 0.9) and factor(149) == pytest.approx(0.1)
    assert factor(10_000) == pytest.approx(0.1)
    assert P._lr_lambda(10)(10_000) == 1.0  # no cool-down: constant
    with pytest.raises(ValueError, match="decay_steps"):
        P.PretrainConfig(decay_start=5, decay_steps=0)
