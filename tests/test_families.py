"""Family adapters: targets match the hand formulas and diffusers' schedulers, groups share noise
and timestep, and the adapter calls the denoiser exactly as the diffusers pipelines do."""

import math

import pytest
import torch

from diffalign.families import get_family, load_family
from diffalign.families.sd3 import flow_matching_target
from diffalign.families.sdxl import ddpm_noisy_inputs
from diffalign.testing import tiny_sd3_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a red cube on a blue sphere", "two cats"]


@pytest.fixture(scope="module")
def sdxl_pipe():
    return tiny_sdxl_pipeline(0)


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_sd3_pipeline(0, with_t5=True)


def test_registry_errors_name_the_choices():
    with pytest.raises(ValueError, match="available"):
        get_family("sd9")
    assert get_family("sdxl").name == "sdxl" and get_family("sd3").name == "sd3"


def test_ddpm_targets_match_scheduler_and_hand_formula():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t, target, w = ddpm_noisy_inputs(sched, x0, noise, t, "epsilon")
    assert torch.equal(target, noise) and torch.equal(w, torch.ones(3))
    a = sched.alphas_cumprod[500]
    torch.testing.assert_close(x_t[1], a.sqrt() * x0[1] + (1 - a).sqrt() * noise[1])
    x_t_v, v, _ = ddpm_noisy_inputs(sched, x0, noise, t, "v_prediction")
    torch.testing.assert_close(x_t_v, x_t)
    torch.testing.assert_close(v[1], a.sqrt() * noise[1] - (1 - a).sqrt() * x0[1])
    # bf16 latents: noised in fp32, then rounded once (diffusers on bf16 inputs rounds the schedule first).
    x_t_bf16, v_bf16, _ = ddpm_noisy_inputs(sched, x0.bfloat16(), noise.bfloat16(), t, "v_prediction")
    x0r, nr = x0.bfloat16().float(), noise.bfloat16().float()
    assert torch.equal(x_t_bf16, sched.add_noise(x0r, nr, t).bfloat16())
    assert torch.equal(v_bf16, sched.get_velocity(x0r, nr, t).bfloat16())


def test_flow_matching_target_and_weights():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    x_t, target, w = flow_matching_target(x0, noise, sigmas)
    torch.testing.assert_close(x_t[2], 0.1 * x0[2] + 0.9 * noise[2])
    torch.testing.assert_close(target, noise - x0)
    assert torch.equal(w, torch.ones(3))
    for scheme in ("sigma_sqrt", "cosmap"):
        _, _, w = flow_matching_target(x0, noise, sigmas, weighting=scheme)
        torch.testing.assert_close(w, compute_loss_weighting_for_sd3(scheme, sigmas).float())
        torch.testing.assert_close(w[1], torch.tensor(4.0 if scheme == "sigma_sqrt" else 2 / (math.pi * 0.5)))
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        flow_matching_target(x0, noise, sigmas, "sigmoid")
    torch.testing.assert_close(flow_matching_target(x0, noise, sigmas, "cosmap")[2][1], torch.tensor(2 / (math.pi * 0.5)))


def test_sd3_logit_normal_sampling_matches_diffusers(sd3_pipe):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    fam = get_family("sd3").from_pipeline(sd3_pipe)
    t = fam.sample_timesteps(64, generator=torch.Generator().manual_seed(3))
    u = compute_density_for_timestep_sampling("logit_normal", 64, 0.0, 1.0, generator=torch.Generator().manual_seed(3))
    expected = fam.noise_scheduler.timesteps[(u * 1000).long()]
    torch.testing.assert_close(t, expected)
    # sigma = t / 1000 is the shifted schedule's sigma (train_dreambooth_sd3's get_sigmas).
    idx = (u * 1000).long()
    torch.testing.assert_close(fam.sigmas_from_timesteps(t), fam.noise_scheduler.sigmas[idx], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_groups_share_noise_and_timestep(name, sdxl_pipe, sd3_pipe):
    pipe = sdxl_pipe if name == "sdxl" else sd3_pipe
    fam = get_family(name).from_pipeline(pipe)
    latents = torch.randn(2, 3, 4, 8, 8)
    noise, t = fam.group_noise_and_timesteps(latents, torch.Generator().manual_seed(0))
    assert torch.equal(noise[:, 0], noise[:, 1]) and torch.equal(noise[:, 0], noise[:, 2])
    assert not torch.equal(noise[0, 0], noise[1, 0])
    assert torch.equal(t[:, 0], t[:, 2])
    out = fam.training_inputs(latents, noise=noise, timesteps=t)
    assert out["x_t"].shape == (6, 4, 8, 8) and out["timesteps"].shape == (6,)
    x_t, target, _ = fam.noisy_inputs(latents[1, 2:3], noise[1, 2:3], t[1, 2:3])
    torch.testing.assert_close(out["x_t"][5:6], x_t)
    torch.testing.assert_close(out["target"][5:6], target)


def test_sdxl_text_and_prediction_match_pipeline(sdxl_pipe):
    fam = get_family("sdxl").from_pipeline(sdxl_pipe)
    text = fam.encode_prompts(PROMPTS)
    pe, _, pooled, _ = sdxl_pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(text["prompt_embeds"], pe)
    torch.testing.assert_close(text["pooled_prompt_embeds"], pooled)
    # Micro-conditioning from the REAL original size and crop, not the training resolution.
    micro = fam.micro_conditioning(torch.tensor([[512, 768], [64, 64]]), torch.tensor([[10, 0], [0, 0]]), (64, 64))
    ids = [
        sdxl_pipe._get_add_time_ids((512, 768), (10, 0), (64, 64), torch.float32, text_encoder_projection_dim=32),
        sdxl_pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=32),
    ]
    torch.testing.assert_close(micro["time_ids"], torch.cat(ids))
    x_t, t = torch.randn(2, 4, 32, 32), torch.tensor([10, 700])
    with torch.no_grad():
        ours = fam.predict(sdxl_pipe.unet, x_t, t, text, micro)
        theirs = sdxl_pipe.unet(
            x_t, t, encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.cat(ids)}, return_dict=False
        )[0]
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="time_ids"):
        fam.predict(sdxl_pipe.unet, x_t, t, text, None)


def test_sdxl_latents_scaled(sdxl_pipe):
    fam = get_family("sdxl").from_pipeline(sdxl_pipe)
    px = torch.rand(2, 3, 64, 64) * 2 - 1
    lat = fam.encode_images(px, generator=torch.Generator().manual_seed(0))
    raw = sdxl_pipe.vae.encode(px).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(lat, raw * sdxl_pipe.vae.config.scaling_factor)
    with pytest.raises(ValueError, match="pixel_values"):
        fam.encode_images(px[0])


@pytest.mark.parametrize("with_t5", [False, True])
def test_sd3_text_and_prediction_match_pipeline(with_t5, sd3_pipe):
    pipe = sd3_pipe if with_t5 else tiny_sd3_pipeline(0, with_t5=False)
    fam = get_family("sd3").from_pipeline(pipe, max_sequence_length=77)
    text = fam.encode_prompts(PROMPTS)
    pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=77)
    torch.testing.assert_close(text["prompt_embeds"], pe)
    torch.testing.assert_close(text["pooled_prompt_embeds"], pooled)
    x_t = torch.randn(2, 4, 32, 32)
    pipe.scheduler.set_timesteps(4)
    t = pipe.scheduler.timesteps[1].expand(2)  # the pipeline's `timestep = t.expand(latents.shape[0])`
    with torch.no_grad():
        ours = fam.predict(pipe.transformer, x_t, t, text)
        theirs = pipe.transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=pe, pooled_projections=pooled, return_dict=False)[0]
    torch.testing.assert_close(ours, theirs)
    px = torch.rand(1, 3, 64, 64) * 2 - 1
    lat = fam.encode_images(px, generator=torch.Generator().manual_seed(0))
    raw = pipe.vae.encode(px).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(lat, (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor)


def test_sd15_through_the_sdxl_adapter():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffalign.testing import tiny_clip_text_config, tiny_sdxl_components

    c = tiny_sdxl_components(0)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=c["vae"], text_encoder=CLIPTextModel(tiny_clip_text_config()), tokenizer=c["tokenizer"], unet=unet,
        scheduler=c["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    fam = get_family("sd15").from_pipeline(pipe)
    text = fam.encode_prompts(PROMPTS)
    pe, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(text["prompt_embeds"], pe)
    assert fam.micro_conditioning(torch.zeros(2, 2), torch.zeros(2, 2), (64, 64)) is None
    x_t, t = torch.randn(2, 4, 32, 32), torch.tensor([5, 900])
    with torch.no_grad():
        torch.testing.assert_close(fam.predict(unet, x_t, t, text), unet(x_t, t, encoder_hidden_states=pe).sample)


def test_load_family_tiny_and_bad_name():
    fam = load_family("tiny:sd3", loss_weighting="cosmap")
    assert fam.name == "sd3" and fam.loss_weighting == "cosmap"
    with pytest.raises(ValueError, match="tiny"):
        load_family("tiny:sd9")
    with pytest.raises(ValueError, match="loss_weighting"):
        load_family("tiny:sd3", loss_weighting="snr")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_group_encoding_is_one_pass_with_each_groups_own_draws(family, sdxl_pipe):
    pipe = sdxl_pipe if family == "sdxl" else tiny_sd3_pipeline(0, with_t5=False)
    fam = get_family(family).from_pipeline(pipe)
    px = torch.rand(3, 2, 3, 64, 64) * 2 - 1  # 3 groups of 2 images
    with torch.no_grad():
        together = fam.encode_image_groups(px, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
        apart = torch.stack([fam.encode_images(px[i], generator=torch.Generator().manual_seed(s)) for i, s in enumerate((5, 6, 7))])
    assert together.shape == apart.shape
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-4)


def test_family_options_are_explicit(sdxl_pipe, sd3_pipe, tmp_path):
    from diffalign.training import PreferenceTrainer, TrainConfig

    assert get_family("sdxl").from_pipeline(sdxl_pipe, prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match=r"\['prediction_type'\] do not apply to model family 'sd3'; its options: "
                                         r"\['timestep_sampling'"):
        get_family("sd3").from_pipeline(sd3_pipe, prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"\['loss_weighting'\] do not apply to model family 'sdxl'"):
        get_family("sdxl").from_pipeline(sdxl_pipe, loss_weighting="cosmap")
    # The trainer passes only the options a config sets, and the family refuses another family's.
    cfg = TrainConfig(pretrained_model_name_or_path="tiny:sdxl", dataset="synthetic:pairs:4", resolution=64,
                      loss_weighting="cosmap", report_to="none", progress_bar=False, output_dir=str(tmp_path / "o"))
    assert cfg.family_options() == {"loss_weighting": "cosmap"}
    with pytest.raises(ValueError, match="do not apply to model family 'sdxl'"):
        PreferenceTrainer(cfg)


def test_load_family_passes_revision_and_variant(monkeypatch, sdxl_pipe):
    import diffalign.families as families

    seen = {}

    def fake_load_pipeline(model, seed=0, torch_dtype=None, revision=None, variant=None):
        seen.update(model=model, revision=revision, variant=variant)
        return sdxl_pipe

    monkeypatch.setattr(families, "load_pipeline", fake_load_pipeline)
    adapter = families.load_family("org/sdxl", revision="abc123", variant="fp16")
    assert seen == {"model": "org/sdxl", "revision": "abc123", "variant": "fp16"} and adapter.name == "sdxl"


def test_one_pipeline_loader_knows_tiny_specs_with_a_seed():
    from diffalign.families import load_pipeline

    a, b = load_pipeline("tiny:sdxl:3"), load_pipeline("tiny:sdxl", seed=3)
    other = load_pipeline("tiny:sdxl", seed=4)
    wa, wb, wo = (next(p.unet.parameters()) for p in (a, b, other))
    assert torch.equal(wa, wb) and not torch.equal(wa, wo)
    assert type(load_pipeline("tiny:sd3-t5")).__name__ == "StableDiffusion3Pipeline"
    for bad in ("tiny:flux", "tiny:sdxl:x", "tiny:sdxl:1:2"):
        with pytest.raises(ValueError, match="unknown tiny model"):
            load_pipeline(bad)


def test_families_own_their_tiny_models_and_denoiser_name():
    from diffalign.families import get_family, load_pipeline, pipeline_denoiser, tiny_kinds

    assert {k: c.name for k, c in tiny_kinds().items()} == {"sdxl": "sdxl", "sd3": "sd3", "sd3-t5": "sd3"}
    sdxl, sd3 = load_pipeline("tiny:sdxl"), load_pipeline("tiny:sd3")
    assert pipeline_denoiser(sdxl) is sdxl.unet and pipeline_denoiser(sd3) is sd3.transformer
    assert sd3.text_encoder_3 is None and load_pipeline("tiny:sd3-t5").text_encoder_3 is not None
    with pytest.raises(NotImplementedError, match="sd15"):
        get_family("sd15").tiny_pipeline("sd15", 0)
    with pytest.raises(ValueError, match="tiny:sd3, tiny:sd3-t5, tiny:sdxl"):
        load_pipeline("tiny:flux")
