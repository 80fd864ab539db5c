"""User cross-attention and the personalized pipelines on tiny SDXL and SD3 (CPU, offline)."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from diffalign.personalization import (
    UserAttnProcessor,
    UserExample,
    add_user_attention,
    interpolate_users,
    load_user_attention,
    remove_user_attention,
    save_user_attention,
    set_user_scale,
    user_attention_disabled,
    user_attention_parameters,
    user_condition,
)
from diffalign.personalization.attention import STATE_ATTR
from diffalign.pipelines import PersonalizedStableDiffusion3Pipeline, PersonalizedStableDiffusionXLPipeline
from diffalign.testing import tiny_sd3_pipeline, tiny_sdxl_pipeline

ENC_DIM = 16
FAMILIES = ["sdxl", "sd3"]
GEN = dict(prompt="a red cube on a blue sphere", num_inference_steps=2, height=32, width=32, output_type="np")


@pytest.fixture(scope="module")
def base_pipes():
    return {"sdxl": tiny_sdxl_pipeline(0), "sd3": tiny_sd3_pipeline(0)}


def _fresh(base_pipes, family):
    """A personalized pipeline on deep copies of the base components (the base stays untouched)."""
    base = base_pipes[family]
    comps = {k: (copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v) for k, v in base.components.items()}
    cls = PersonalizedStableDiffusionXLPipeline if family == "sdxl" else PersonalizedStableDiffusion3Pipeline
    pipe = cls(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") and pipe.unet is not None else pipe.transformer


def _inputs(family, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family == "sdxl":
        return dict(
            sample=torch.randn(batch, 4, 16, 16, generator=g),
            timestep=torch.full((batch,), 10),
            encoder_hidden_states=torch.randn(batch, 7, 64, generator=g),
            added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)},
        )
    return dict(
        hidden_states=torch.randn(batch, 4, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
        pooled_projections=torch.randn(batch, 64, generator=g),
        timestep=torch.full((batch,), 500.0),
    )


def _run(model, inputs):
    return model(**inputs).sample


def _perturb(model, std=0.3, seed=0):
    """Give the zero-initialised values random weights, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attn in getattr(model, STATE_ATTR).layers:
            w = attn.user_attention.user_value.weight
            w.copy_(torch.randn(w.shape, generator=g) * std)


def _trained_user_model(base_pipes, family):
    """A copy of the family's denoiser with user attention whose values are non-zero (as after training)."""
    model = copy.deepcopy(_denoiser(base_pipes[family]))
    add_user_attention(model, encoder_dim=ENC_DIM, seed=0)
    _perturb(model)
    return model


def _halves(inputs):
    """Split a batch-2 denoiser input into its first and second sample."""
    def part(sl):
        return {k: (v[sl] if torch.is_tensor(v) else {kk: vv[sl] for kk, vv in v.items()}) for k, v in inputs.items()}

    return part(slice(0, 1)), part(slice(1, 2))


def _layers(model):
    return getattr(model, STATE_ATTR).layers


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_identity_pipeline(base_pipes, family):
    base_image = base_pipes[family](generator=torch.Generator().manual_seed(3), guidance_scale=5.0, **GEN).images
    pipe = _fresh(base_pipes, family)
    add_user_attention(_denoiser(pipe), encoder_dim=ENC_DIM, seed=0)
    user = torch.randn(4, ENC_DIM)
    image = pipe(generator=torch.Generator().manual_seed(3), guidance_scale=5.0, user_embedding=user, **GEN).images
    assert (image == base_image).all()
    # The comparison can fail: once the values are non-zero the user changes the image.
    _perturb(_denoiser(pipe))
    changed = pipe(generator=torch.Generator().manual_seed(3), guidance_scale=5.0, user_embedding=user, **GEN).images
    assert abs(changed - base_image).max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_user_parameters(base_pipes, family, tiny_encoder):
    model = copy.deepcopy(_denoiser(base_pipes[family])).requires_grad_(False)
    add_user_attention(model, encoder_dim=tiny_encoder.dim, seed=0)
    user_params = {id(p) for p in user_attention_parameters(model)}
    base_params = [p for p in model.parameters() if id(p) not in user_params]
    assert len(user_params) == 2 * len(_layers(model)) + 4  # W_k', W_v' per layer; projection weight/bias + norm

    examples = _examples(4)
    inputs = _inputs(family)

    # Step 0: only W_v' gets a gradient (W_k', the projection and the encoder sit behind a zero W_v').
    emb = tiny_encoder.encode_users([examples, examples[:2]])
    with user_condition(model, emb):
        _run(model, inputs).pow(2).mean().backward()
    assert all(p.grad is None for p in base_params)
    assert all(attn.user_attention.user_value.weight.grad.abs().sum() > 0 for attn in _layers(model))
    model.zero_grad(set_to_none=True)
    tiny_encoder.zero_grad(set_to_none=True)

    # After some training every user-side parameter, and the encoder head, is reached; nothing else.
    _perturb(model)
    emb = tiny_encoder.encode_users([examples, examples[:2]])
    with user_condition(model, emb):
        _run(model, inputs).pow(2).mean().backward()
    assert all(p.grad is None for p in base_params)
    for p in user_attention_parameters(model):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_encoder.head_parameters())
    assert all(p.grad is None for p in tiny_encoder.clip.parameters())
    tiny_encoder.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_and_removed_equal_base_and_scale_is_linear(base_pipes, family):
    model = copy.deepcopy(_denoiser(base_pipes[family]))
    inputs = _inputs(family)
    with torch.no_grad():
        base = _run(model, inputs)
        add_user_attention(model, encoder_dim=ENC_DIM, seed=0)
        _perturb(model)
        user = torch.randn(2, 3, ENC_DIM)
        with user_condition(model, user):
            one = _run(model, inputs)
            with user_attention_disabled(model):
                assert torch.equal(_run(model, inputs), base)
            set_user_scale(model, 0.0)
            assert torch.equal(_run(model, inputs), base)
            set_user_scale(model, 1.0)
        with user_condition(model, user, scale=0.5):
            half = _run(model, inputs)
        set_user_scale(model, 0.5)
        with user_condition(model, user):
            assert torch.equal(_run(model, inputs), half)
        set_user_scale(model, 1.0)
        assert torch.equal(_run(model, inputs), base)  # outside the block: no user
        remove_user_attention(model)
        assert torch.equal(_run(model, inputs), base)
    assert (one - base).abs().max() > 1e-4
    assert not any("user_" in name for name, _ in model.named_parameters())
    assert 0 < (half - base).abs().mean() < (one - base).abs().mean()


def test_lora_targets_skip_user_weights_and_disable_adapters_keeps_user_on(base_pipes):
    from peft import LoraConfig

    model = copy.deepcopy(base_pipes["sdxl"].unet)
    add_user_attention(model, encoder_dim=ENC_DIM, seed=0)
    _perturb(model)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    names = [n for n, _ in model.named_modules()]
    assert not any("user_" in n and "lora" in n for n in names)
    inputs = _inputs("sdxl")
    user = torch.randn(2, 3, ENC_DIM)
    with torch.no_grad():
        model.disable_adapters()
        base = _run(model, inputs)
        with user_condition(model, user):
            lora_off = _run(model, inputs)
            with user_attention_disabled(model):
                reference = _run(model, inputs)
        model.enable_adapters()
    assert (lora_off - base).abs().max() > 1e-4  # disable_adapters() alone leaves the user branch on
    assert torch.equal(reference, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(base_pipes, family, tmp_path):
    model = copy.deepcopy(_denoiser(base_pipes[family]))
    add_user_attention(model, encoder_dim=ENC_DIM, scale=0.7, seed=0)
    _perturb(model)
    path = tmp_path / "user_attention.safetensors"
    save_user_attention(model, path)
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert all("user_" in k for k in saved) and len(saved) == len(user_attention_parameters(model))

    other = copy.deepcopy(_denoiser(base_pipes[family]))
    load_user_attention(other, path)  # installs, then loads
    inputs = _inputs(family)
    user = torch.randn(2, 3, ENC_DIM)
    with torch.no_grad(), user_condition(model, user), user_condition(other, user):
        torch.testing.assert_close(_run(other, inputs), _run(model, inputs), rtol=0, atol=0)
    assert _layers(other)[0].user_attention.scale == 0.7

    wrong = copy.deepcopy(_denoiser(base_pipes[family]))
    add_user_attention(wrong, encoder_dim=ENC_DIM + 1)
    with pytest.raises(ValueError, match="encoder_dim"):
        load_user_attention(wrong, path)
    with pytest.raises(FileNotFoundError):
        load_user_attention(wrong, tmp_path / "missing.safetensors")


def _fake_xformers(monkeypatch):
    """Let diffusers' xformers switch run on a CPU: fake availability, CUDA probe and the kernel (SDPA)."""
    import diffusers.models.attention_processor as ap

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None, scale=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setattr(ap, "xformers", fake, raising=False)
    monkeypatch.setattr(ap, "is_xformers_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_randn = torch.randn

    def randn(*args, device=None, **kwargs):  # the CUDA probe tensor, made on the CPU
        return real_randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setitem(sys.modules, "xformers", fake)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("via", ["pipeline", "model"])
def test_xformers_switch_keeps_user_attention(base_pipes, family, via, monkeypatch):
    from diffusers.models.attention_processor import XFormersAttnProcessor, XFormersJointAttnProcessor

    pipe = _fresh(base_pipes, family)
    model = _denoiser(pipe)
    add_user_attention(model, encoder_dim=ENC_DIM, seed=0)
    _perturb(model)
    weights = [attn.user_attention.user_value.weight for attn in _layers(model)]
    inputs = _inputs(family)
    user = torch.randn(2, 3, ENC_DIM)
    with torch.no_grad(), user_condition(model, user):
        before = _run(model, inputs)

    _fake_xformers(monkeypatch)
    if via == "pipeline":
        pipe.enable_xformers_memory_efficient_attention()  # re-wraps at once
    else:
        model.enable_xformers_memory_efficient_attention()  # plain model: re-wrapped at the next forward
        assert not any(isinstance(attn.processor, UserAttnProcessor) for attn in _layers(model))
    with torch.no_grad(), user_condition(model, user):
        after = _run(model, inputs)
    expected_base = XFormersJointAttnProcessor if family == "sd3" else XFormersAttnProcessor
    for attn, w in zip(_layers(model), weights):
        assert isinstance(attn.processor, UserAttnProcessor)
        assert type(attn.processor.base) is expected_base
        assert attn.user_attention.user_value.weight is w
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_free_guidance_gives_null_user_to_unconditional_half(base_pipes, family):
    model = _trained_user_model(base_pipes, family)
    inputs = _inputs(family, batch=2)
    first, single = _halves(inputs)
    user = torch.randn(1, 3, ENC_DIM)
    with torch.no_grad():
        uncond_base = _run(model, first)
        with user_condition(model, user):
            cond_user = _run(model, single)
        with user_condition(model, user, classifier_free_guidance=True):
            both = _run(model, inputs)
    torch.testing.assert_close(both[:1], uncond_base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:], cond_user, atol=1e-5, rtol=1e-5)
    assert (cond_user - _run(model, single)).abs().max() > 1e-4

    # In the pipeline every denoiser call with guidance sees [null, user] weights.
    pipe = _fresh(base_pipes, family)
    den = _denoiser(pipe)
    add_user_attention(den, encoder_dim=ENC_DIM, seed=0)
    seen = []
    den.register_forward_hook(lambda m, a, o: seen.append(getattr(m, STATE_ATTR).weight.tolist()))
    pipe(generator=torch.Generator().manual_seed(0), guidance_scale=5.0, user_embedding=user[0], **GEN)
    assert seen == [[0.0, 1.0]] * GEN["num_inference_steps"]
    seen.clear()
    pipe(generator=torch.Generator().manual_seed(0), guidance_scale=1.0, user_embedding=user[0], **GEN)
    assert seen == [[1.0]] * GEN["num_inference_steps"]


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_user_conditions_the_unconditional_half(base_pipes, family):
    model = _trained_user_model(base_pipes, family)
    inputs = _inputs(family, batch=2)
    first, second = _halves(inputs)
    user, negative = torch.randn(1, 3, ENC_DIM), torch.randn(1, 3, ENC_DIM)
    with torch.no_grad():
        with user_condition(model, negative):
            uncond_negative = _run(model, first)
        with user_condition(model, user):
            cond_user = _run(model, second)
        with user_condition(model, user, classifier_free_guidance=True, negative_user_embedding=negative):
            both = _run(model, inputs)
        uncond_null = _run(model, first)
    torch.testing.assert_close(both[:1], uncond_negative, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:], cond_user, atol=1e-5, rtol=1e-5)
    assert (uncond_negative - uncond_null).abs().max() > 1e-4  # the negative user really changed that half
    with pytest.raises(ValueError, match="classifier_free_guidance"):
        with user_condition(model, user, negative_user_embedding=negative):
            pass
    with pytest.raises(ValueError, match="shape of user_embedding"):
        with user_condition(model, user, classifier_free_guidance=True, negative_user_embedding=torch.randn(2, 3, ENC_DIM)):
            pass


def test_pipeline_negative_user(base_pipes, tiny_encoder):
    pipe = _fresh(base_pipes, "sdxl")
    add_user_attention(pipe.unet, encoder_dim=tiny_encoder.dim, seed=0)
    _perturb(pipe.unet)
    pipe.set_user_encoder(tiny_encoder.eval())
    examples = _examples(3)
    anti = [UserExample(ex.prompt, ex.rejected, ex.chosen) for ex in examples]
    kw = dict(GEN, guidance_scale=3.0)

    def run(**user):
        return pipe(generator=torch.Generator().manual_seed(0), user_examples=examples, **user, **kw).images

    null_negative = run()
    by_examples = run(negative_user_examples=anti)
    by_embedding = run(negative_user_embedding=pipe.encode_user(anti))
    assert (by_examples == by_embedding).all() and abs(by_examples - null_negative).max() > 1e-4
    with pytest.raises(ValueError, match="either"):
        run(negative_user_examples=anti, negative_user_embedding=pipe.encode_user(anti))
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        pipe(user_examples=examples, negative_user_examples=anti, **dict(GEN, guidance_scale=1.0))
    with pytest.raises(ValueError, match="without a user"):
        pipe(negative_user_examples=anti, **kw)


def test_pipeline_user_arguments_and_errors(base_pipes, tiny_encoder):
    pipe = _fresh(base_pipes, "sd3")
    with pytest.raises(ValueError, match="no user attention"):
        pipe(user_embedding=torch.randn(4, ENC_DIM), **GEN)
    add_user_attention(pipe.transformer, encoder_dim=tiny_encoder.dim, seed=0)
    _perturb(pipe.transformer)
    examples = _examples(3)
    with pytest.raises(ValueError, match="set_user_encoder"):
        pipe(user_examples=examples, **GEN)
    pipe.set_user_encoder(tiny_encoder.eval())
    kw = dict(GEN, guidance_scale=3.0)
    by_examples = pipe(generator=torch.Generator().manual_seed(0), user_examples=examples, **kw).images
    by_embedding = pipe(generator=torch.Generator().manual_seed(0), user_embedding=pipe.encode_user(examples), **kw).images
    assert (by_examples == by_embedding).all()
    zero_scale = pipe(generator=torch.Generator().manual_seed(0), user_examples=examples, user_scale=0.0, **kw).images
    base = base_pipes["sd3"](generator=torch.Generator().manual_seed(0), **kw).images
    assert (zero_scale == base).all() and abs(by_examples - base).max() > 1e-4
    with pytest.raises(ValueError, match="either"):
        pipe(user_examples=examples, user_embedding=torch.randn(4, ENC_DIM), **GEN)
    with pytest.raises(ValueError, match="2 user embeddings for 1 prompts"):
        pipe(user_embedding=torch.randn(2, 4, tiny_encoder.dim), **GEN)
    with pytest.raises(ValueError, match="num_tokens"):
        pipe(user_embedding=torch.randn(4, tiny_encoder.dim + 1), **GEN)


def test_interpolate_users():
    a, b = torch.zeros(4, 8), torch.ones(4, 8)
    assert torch.equal(interpolate_users(a, b, 0.0), a)
    assert torch.equal(interpolate_users(a, b, 1.0), b)
    torch.testing.assert_close(interpolate_users(a, b, 0.25), torch.full((4, 8), 0.25))
    with pytest.raises(ValueError, match="outside"):
        interpolate_users(a, b, 1.5)
    torch.testing.assert_close(interpolate_users(a, b, 1.5, extrapolate=True), torch.full((4, 8), 1.5))
    with pytest.raises(ValueError, match="shape"):
        interpolate_users(a, torch.ones(3, 8), 0.5)


def test_batch_mismatch_is_an_error(base_pipes):
    model = copy.deepcopy(base_pipes["sdxl"].unet)
    add_user_attention(model, encoder_dim=ENC_DIM)
    with pytest.raises(ValueError, match="does not match the model batch"):
        with torch.no_grad(), user_condition(model, torch.randn(3, 2, ENC_DIM)):
            _run(model, _inputs("sdxl", batch=2))
    with pytest.raises(ValueError, match="already installed"):
        add_user_attention(model, encoder_dim=ENC_DIM)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        add_user_attention(torch.nn.Linear(2, 2), encoder_dim=ENC_DIM)


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_encoder():
    from diffalign.personalization import tiny_clip_user_encoder

    return tiny_clip_user_encoder(dim=ENC_DIM, num_tokens=4)


def _examples(n, seed=0):
    from diffalign.personalization import UserExample

    g = torch.Generator().manual_seed(seed)
    return [
        UserExample(f"prompt {i}", torch.rand(3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 32, 32, generator=g) * 2 - 1)
        for i in range(n)
    ]


def test_float32_user_weights_on_a_bf16_model(base_pipes):
    model = copy.deepcopy(base_pipes["sd3"].transformer).to(torch.bfloat16)
    add_user_attention(model, encoder_dim=ENC_DIM, seed=0)
    for p in user_attention_parameters(model):  # as the trainer keeps trainable weights
        p.data = p.data.float()
    _perturb(model)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _inputs("sd3").items()}
    with torch.no_grad():
        base = _run(model, inputs)
        with user_condition(model, torch.randn(2, 3, ENC_DIM)):
            out = _run(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - base.float()).abs().max() > 0


def test_one_user_per_prompt_in_a_batch(base_pipes):
    pipe = _fresh(base_pipes, "sdxl")
    add_user_attention(pipe.unet, encoder_dim=ENC_DIM, seed=0)
    _perturb(pipe.unet)
    users = torch.randn(2, 3, ENC_DIM, generator=torch.Generator().manual_seed(1))
    kw = dict(GEN, guidance_scale=4.0)
    kw.pop("prompt")
    both = pipe(prompt=["a red cube", "a blue ball"], user_embedding=users,
                generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], **kw).images
    for i, (prompt, seed) in enumerate([("a red cube", 5), ("a blue ball", 6)]):
        alone = pipe(prompt=prompt, user_embedding=users[i], generator=torch.Generator().manual_seed(seed), **kw).images
        assert abs(both[i] - alone[0]).max() < 1e-4
    swapped = pipe(prompt=["a red cube", "a blue ball"], user_embedding=users.flip(0),
                   generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], **kw).images
    assert abs(swapped - both).max() > 1e-4
