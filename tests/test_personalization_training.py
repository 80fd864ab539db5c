"""PPD training glue: the trainer hook, user splits, synthetic users, checkpointing compatibility."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from diffalign.personalization import (
    PPDConditioning,
    SyntheticUser,
    UserExample,
    add_user_attention,
    split_users,
    tiny_clip_user_encoder,
    user_attention_disabled,
    user_attention_parameters,
    user_condition,
)
from diffalign.personalization.attention import STATE_ATTR


def test_split_users_filters_and_holds_context_apart(caplog):
    ids = ["a"] * 10 + ["b"] * 9 + ["c"] * 3 + [None] * 2 + ["d"] * 12 + ["e"] * 8
    labels = [1.0] * len(ids)
    labels[0] = 0.5  # a tie of user a: never a context example
    with caplog.at_level(logging.INFO, logger="diffalign.personalization.training"):
        split = split_users(ids, num_context=4, min_pairs=8, test_fraction=0.25, seed=0, labels=labels)
    assert "1 users with < 8 pairs filtered (3 rows)" in caplog.text
    assert split.filtered_users == 1 and split.filtered_rows == 3 and split.rows_without_user == 2
    assert set(split.train_users) | set(split.test_users) == {"a", "b", "d", "e"}
    assert not set(split.train_users) & set(split.test_users) and len(split.test_users) == 1
    for user in ["a", "b", "d", "e"]:
        context, pairs = set(split.context_rows[user]), set(split.pair_rows[user])
        assert len(context) == 4 and not context & pairs
        assert context | pairs == {i for i, u in enumerate(ids) if u == user}
        assert all(labels[i] != 0.5 for i in context)
    assert not set(split.train_rows()) & set(split.test_rows())
    assert split == split_users(ids, num_context=4, min_pairs=8, test_fraction=0.25, seed=0, labels=labels)
    with pytest.raises(ValueError, match="min_pairs"):
        split_users(ids, num_context=8, min_pairs=8)
    with pytest.raises(ValueError, match="no user has"):
        split_users(ids, min_pairs=100)


def test_synthetic_users_mix_rewards():
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    blue = torch.tensor([-1.0, -1.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    warm, cool = SyntheticUser("warm", {"toy_red": 1.0}), SyntheticUser("cool", {"toy_blue": 1.0})
    assert warm.prefers(red, blue, ["x"]).item() and not cool.prefers(red, blue, ["x"]).item()
    mixed = SyntheticUser("mix", {"toy_red": 0.5, "toy_blue": 0.5})
    torch.testing.assert_close(mixed.score(red, ["x"]), 0.5 * (warm.score(red, ["x"]) + cool.score(red, ["x"])))
    with pytest.raises(ValueError, match="unknown reward"):
        SyntheticUser("x", {"no_such_reward": 1.0})


@pytest.fixture(scope="module")
def encoder():
    return tiny_clip_user_encoder(dim=16, num_tokens=2)


def _contexts(n_users=2, n=3):
    g = torch.Generator().manual_seed(0)
    return {
        f"u{j}": [UserExample("p", torch.rand(3, 16, 16, generator=g) * 2 - 1, torch.rand(3, 16, 16, generator=g) * 2 - 1) for _ in range(n)]
        for j in range(n_users)
    }


def test_ppd_hook_conditions_each_group_and_dropout_is_reproducible(encoder):
    from diffalign.testing import tiny_sd3_pipeline

    model = tiny_sd3_pipeline(0).transformer.requires_grad_(False)
    hook = PPDConditioning(encoder, _contexts(), user_dropout=0.5, seed=3)
    with pytest.raises(ValueError, match="attach"):
        hook.trainable_parameters()
    hook.attach(model)
    params = hook.trainable_parameters()
    assert len(params) == len(user_attention_parameters(model)) + len(encoder.head_parameters())
    batch = {"user_ids": ["u0", "u1", "u0", "u1"], "prompt_ids": ["a", "b", "c", "d"], "scores": torch.tensor([[1.0, 0.0]] * 4)}
    with hook.policy_context(model, batch):
        state = getattr(model, STATE_ATTR)
        emb = state.embedding
        weights = state.row_weight.clone()
        with hook.reference_context(model, batch):
            assert not state.enabled
    assert emb.shape == (8, 2, 16)  # B * k rows: each group's user repeated over its k samples
    torch.testing.assert_close(emb[0], emb[1]) and torch.testing.assert_close(emb[0], emb[4])
    assert (emb[0] - emb[2]).abs().max() > 1e-4  # u0 vs u1
    assert torch.equal(weights[0::2], weights[1::2])  # dropout per group
    with hook.policy_context(model, batch):
        assert torch.equal(getattr(model, STATE_ATTR).row_weight, weights)  # same batch, same draw
    with pytest.raises(ValueError, match="without user_id"):
        hook.policy_context(model, dict(batch, user_ids=["u0", None, "u0", "u1"]))
    with pytest.raises(KeyError, match="without context"):
        hook.policy_context(model, dict(batch, user_ids=["u0", "zz", "u0", "u1"]))


def test_ppd_hook_draws_fresh_contexts_per_batch(encoder):
    import itertools

    from diffalign.testing import tiny_sd3_pipeline

    model = tiny_sd3_pipeline(0).transformer.requires_grad_(False)
    contexts = _contexts(n_users=2, n=5)
    hook = PPDConditioning(encoder, contexts, num_context=2, seed=1)
    hook.attach(model)
    # every embedding a 2-example draw of u0 can give (sorted order, as the draw keeps it)
    feats = encoder.example_features(contexts["u0"])
    with torch.no_grad():
        subsets = {pair: encoder.pool(feats[list(pair)][None])[0] for pair in itertools.combinations(range(5), 2)}
        everything = encoder.pool(feats[None])[0]

    def condition(prompt_ids):
        batch = {"user_ids": ["u0"] * len(prompt_ids), "prompt_ids": prompt_ids, "scores": torch.tensor([[1.0, 0.0]] * len(prompt_ids))}
        with torch.no_grad(), hook.policy_context(model, batch):
            return getattr(model, STATE_ATTR).embedding[0::2].clone()  # one row per group (k = 2)

    drawn = torch.cat([condition([f"p{i}", f"q{i}"]) for i in range(6)])
    matches = [next((pair for pair, e in subsets.items() if torch.allclose(row, e, atol=1e-5)), None) for row in drawn]
    assert None not in matches  # each row is exactly the encoding of 2 of the user's 5 context examples
    assert len(set(matches)) > 1  # and the draws differ between groups and batches
    torch.testing.assert_close(condition(["p0", "q0"]), condition(["p0", "q0"]))  # a batch replays its draw
    with torch.no_grad():  # outside training the user is encoded from all its examples
        torch.testing.assert_close(hook.user_embeddings(["u0"])[0], everything)
    with pytest.raises(ValueError, match="num_context"):
        PPDConditioning(encoder, contexts, num_context=0)


def test_prepare_ppd_context_pool(encoder):
    from diffalign.data.synthetic import TwoUserPairs
    from diffalign.personalization import prepare_ppd
    from diffalign.testing import tiny_sd3_pipeline
    from diffalign.training.config import TrainConfig

    users = {f"u{i}": SyntheticUser(f"u{i}", {"toy_red" if i % 2 else "toy_blue": 1.0}) for i in range(4)}
    data = TwoUserPairs(users, num_pairs=8, resolution=8, seed=0)
    train, hook, split = prepare_ppd(data, tiny_sd3_pipeline(0).transformer, encoder, num_context=2, context_pool=5, min_pairs=6,
                                     test_fraction=0.0, seed=0)
    assert all(len(split.context_rows[u]) == 5 for u in split.train_users) and len(train) == 4 * (8 - 5)
    assert hook.num_context == 2 and all(len(c) == 5 for c in hook.contexts.values())
    with pytest.raises(ValueError, match="context_pool"):
        prepare_ppd(data, tiny_sd3_pipeline(0).transformer, encoder, num_context=4, context_pool=3, min_pairs=6)
    kw = dict(pretrained_model_name_or_path="x", objective="ppd", ppd_num_context=4, ppd_min_pairs=10)
    assert TrainConfig(**kw, ppd_context_pool=9).ppd_context_pool == 9
    for bad in (3, 10):
        with pytest.raises(ValueError, match="ppd_context_pool"):
            TrainConfig(**kw, ppd_context_pool=bad)


def test_gradient_checkpointing_recomputes_with_the_user(encoder):
    """The trainer's order: reference pass, policy pass, leave the block, backward (recomputation)."""
    from diffalign.testing import tiny_sd3_pipeline

    base = tiny_sd3_pipeline(0).transformer.requires_grad_(False)
    add_user_attention(base, encoder_dim=16, seed=0)
    with torch.no_grad():
        for attn in getattr(base, STATE_ATTR).layers:
            attn.user_attention.user_value.weight.normal_(0, 0.3)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
        pooled_projections=torch.randn(2, 64, generator=g), timestep=torch.full((2,), 500.0),
    )
    emb = torch.randn(2, 2, 16, generator=g)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        with torch.no_grad(), user_attention_disabled(model):
            model(**inputs)
        with user_condition(model, emb):
            out = model(**inputs).sample
        out.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in user_attention_parameters(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_ppd_through_the_trainer_two_steps(encoder, tmp_path):
    """objective=ppd runs in PreferenceTrainer with the hook; only LoRA + user weights + head change."""
    from diffalign.data.synthetic import TwoUserPairs
    from diffalign.families import load_family
    from diffalign.personalization.toy import context_examples
    from diffalign.training.config import TrainConfig
    from diffalign.training.trainer import PreferenceTrainer

    users = {"warm": SyntheticUser("warm", {"toy_red": 1.0}), "cool": SyntheticUser("cool", {"toy_blue": 1.0})}
    data = TwoUserPairs(users, num_pairs=4, resolution=16, seed=0)
    assert [it["user_id"] for it in data.items[:2]] == ["warm", "cool"]
    contexts = context_examples(users, num_context=2, resolution=16, seed=0)
    adapter = load_family("tiny:sd3", seed=0)
    hook = PPDConditioning(encoder, contexts)
    hook.attach(adapter.denoiser)
    head_before = [p.detach().clone() for p in encoder.head_parameters()]
    frozen_before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters() if "user_" not in n}
    cfg = TrainConfig(
        pretrained_model_name_or_path="tiny:sd3", objective="ppd", beta=500.0, resolution=16, tuning="lora", lora_rank=2,
        train_batch_size=2, max_train_steps=2, learning_rate=1e-3, output_dir=str(tmp_path), checkpointing_steps=0,
        report_to="none", progress_bar=False,
    )
    summary = PreferenceTrainer(cfg, train_dataset=data, adapter=adapter, conditioning=hook).train()
    assert summary["global_step"] == 2 and summary["final_loss"] is not None
    value_weights = [attn.user_attention.user_value.weight for attn in getattr(adapter.denoiser, STATE_ATTR).layers]
    assert all(w.abs().sum() > 0 for w in value_weights)  # moved from zero
    assert any((a - b).abs().max() > 0 for a, b in zip(head_before, encoder.head_parameters()))
    for name, p in adapter.denoiser.named_parameters():
        if name in frozen_before and "lora" not in name:
            assert torch.equal(p.detach(), frozen_before[name]), name
    hook.save(str(tmp_path / "ppd"))
    assert (tmp_path / "ppd" / "user_attention.safetensors").exists()


class _FakePipe:
    """Stands in for a personalized pipeline: the image's red level is the mean of the user embedding."""

    def __call__(self, prompt, generator, output_type, user_embedding=None, **kwargs):
        level = 0.0 if user_embedding is None else float(user_embedding.mean())
        noise = torch.rand(1, generator=generator).item() * 1e-3
        image = torch.zeros(1, 3, 4, 4)
        image[:, 0] = 0.5 + 0.4 * torch.tanh(torch.tensor(level)) + noise
        image[:, 2] = 0.5 - 0.4 * torch.tanh(torch.tensor(level)) + noise
        return type("Out", (), {"images": image})()


def test_win_rates_and_interpolation_monotonicity():
    from diffalign.personalization.evaluation import interpolation_monotonicity, win_rates

    class MeanEncoder(torch.nn.Module):
        def forward(self, examples):  # +1 per red-preferring example, -1 per blue-preferring one
            return torch.tensor([[1.0 if e.prompt == "red" else -1.0 for e in examples]]).mean().view(1, 1).expand(2, 3)

    warm, cool = SyntheticUser("warm", {"toy_red": 1.0}), SyntheticUser("cool", {"toy_blue": 1.0})
    users = {
        "warm": ([UserExample("red", None, None)] * 4, warm.score),
        "cool": ([UserExample("blue", None, None)] * 4, cool.score),
    }
    table = win_rates(_FakePipe(), MeanEncoder(), users, ["p"], seeds=[0, 1, 2], num_examples=(1, 4))
    assert table["users"]["warm"]["4"]["win_rate"] == 1.0 and table["users"]["cool"]["1"]["win_rate"] == 1.0
    assert table["mean_win_rate"]["4"] == 1.0
    with pytest.raises(ValueError, match="cannot evaluate N=8"):
        win_rates(_FakePipe(), MeanEncoder(), users, ["p"], seeds=[0], num_examples=(8,))
    report = interpolation_monotonicity(_FakePipe(), torch.ones(2, 3), -torch.ones(2, 3), warm.score, cool.score, ["p"], [0, 1])
    assert report["monotone_a"] and report["monotone_b"]
    assert report["spearman_a"] == pytest.approx(-1.0) and report["spearman_b"] == pytest.approx(1.0)
    flat = interpolation_monotonicity(_FakePipe(), torch.zeros(2, 3), torch.zeros(2, 3), warm.score, cool.score, ["p"], [0])
    assert flat["spearman_a"] is None  # constant rewards: no trend to report


def test_prepare_ppd_holds_context_and_test_users_apart(encoder):
    from diffalign.data.synthetic import TwoUserPairs
    from diffalign.personalization import prepare_ppd
    from diffalign.personalization.attention import has_user_attention
    from diffalign.testing import tiny_sd3_pipeline

    users = {f"u{i}": SyntheticUser(f"u{i}", {"toy_red" if i % 2 else "toy_blue": 1.0}) for i in range(4)}
    data = TwoUserPairs(users, num_pairs=6, resolution=8, seed=0)  # 6 pairs per user
    model = tiny_sd3_pipeline(0).transformer
    train, hook, split = prepare_ppd(data, model, encoder, num_context=2, min_pairs=5, test_fraction=0.25, seed=0)
    assert has_user_attention(model) and len(split.test_users) == 1 and len(split.train_users) == 3
    assert set(hook.contexts) == set(split.train_users)
    train_users = {data[i]["user_id"] for i in train.indices}
    assert train_users == set(split.train_users) and len(train) == 3 * (6 - 2)
    held = {i for u in split.train_users for i in split.context_rows[u]}
    assert not held & set(train.indices)


def test_eval_script_runs_offline_and_fresh_attention_ties_the_base(tmp_path):
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "eval", "personalization.py")
    spec = importlib.util.spec_from_file_location("eval_personalization", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "ppd_eval.json"
    module.main([
        "--pretrained_model_name_or_path", "tiny:sd3", "--synthetic_user", "warm=toy_red:1", "--synthetic_user", "cool=toy_blue:1",
        "--num_examples", "1", "2", "--prompts", "a square", "--seeds", "2", "--num_inference_steps", "2", "--resolution", "32",
        "--interpolate", "warm", "cool", "--output", str(out),
    ])
    result = json.loads(out.read_text())
    # Fresh user attention is the identity: every conditioned image equals the base image (a tie = 0.5).
    assert result["win_rates"]["mean_win_rate"] == {"1": 0.5, "2": 0.5}
    assert result["interpolation"]["spearman_a"] is None and result["interpolation"]["monotone_a"]
    with pytest.raises(ValueError, match="--judge"):
        module.main(["--pretrained_model_name_or_path", "tiny:sd3", "--dataset", "x"])


# --- PPD from a YAML config through the trainer (the train/train.py code path) ----------------------------
REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
PPD_YAML = __import__("os").path.join(REPO, "train", "configs", "tiny_sdxl_ppd.yaml")


def _ppd_config(out, *overrides):
    from diffalign.training import TrainConfig

    return TrainConfig.from_yaml(PPD_YAML, [f"output_dir={out}", "report_to=none", "progress_bar=false", *overrides])


def _losses(out):
    import json

    with open(out / "losses.jsonl") as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def test_ppd_yaml_tuning_none_trains_only_user_weights_resumes_and_reloads(tmp_path):
    """tiny_sdxl_ppd.yaml (tuning: none): the base UNet stays bit-identical, user attention + head change,
    step 1 is exactly log 2 (reference = the same UNet with user attention off), a resume restores the user
    weights, and the saved files reload into PersonalizedStableDiffusionXLPipeline with the same output."""
    import json
    import math
    import shutil

    from diffalign.families import load_family
    from diffalign.personalization import load_user_attention
    from diffalign.pipelines import PersonalizedStableDiffusionXLPipeline
    from diffalign.testing import tiny_sdxl_pipeline
    from diffalign.training import PreferenceTrainer

    out = tmp_path / "run"
    trainer = PreferenceTrainer(_ppd_config(out, "max_train_steps=4", "checkpointing_steps=2"))
    hook, den = trainer.conditioning, trainer.unwrapped
    assert trainer.reference is None and len({id(p) for p in trainer.trainable}) == len(trainer.trainable)
    assert {id(p) for p in trainer.trainable} == {id(p) for p in user_attention_parameters(den) + hook.encoder.head_parameters()}
    assert trainer.extra_trainable and all(not any(p is q for q in den.parameters()) for p in trainer.extra_trainable)
    owned = hook.owned_state_keys(den)
    pristine = load_family("tiny:sdxl", seed=trainer.config.model_seed).denoiser.state_dict()
    head_before = [p.detach().clone() for p in hook.encoder.head_parameters()]
    summary = trainer.train()
    assert summary["ppd_users"]["train_users"] == 5 and summary["ppd_users"]["test_users"] == 1
    losses = _losses(out)
    assert losses[1] == pytest.approx(math.log(2), abs=1e-6)  # zero-init user attention: policy == reference
    state = den.state_dict()
    assert set(state) - owned == set(pristine)
    for key, value in pristine.items():
        assert torch.equal(state[key], value), key  # the base never moved
    assert all(attn.user_attention.user_value.weight.abs().sum() > 0 for attn in getattr(den, STATE_ATTR).layers)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, hook.encoder.head_parameters()))
    users = json.loads((out / "ppd_users.json").read_text())
    assert not set(users["train_users"]) & set(users["test_users"]) and set(hook.contexts) == set(users["train_users"])
    ckpt2 = out / "checkpoint-2"
    assert (ckpt2 / "user_attention.safetensors").exists() and (ckpt2 / "user_encoder_head.safetensors").exists()
    assert not list(ckpt2.glob("model*.safetensors")) and not list(ckpt2.glob("pytorch_model*"))  # no frozen base in it

    # Resume from checkpoint-2: a fresh trainer starts with W_v' = 0; the same losses 3-4 need the restored weights.
    final = {k: state[k].clone() for k in owned}
    shutil.rmtree(out / "checkpoint-4")
    (out / "losses.jsonl").unlink()
    again = PreferenceTrainer(_ppd_config(out, "max_train_steps=4", "checkpointing_steps=2", "resume_from_checkpoint=latest"))
    assert again.train()["resumed_from_step"] == 2
    replay = _losses(out)
    for step in (3, 4):
        assert replay[step] == pytest.approx(losses[step], abs=1e-5)
    for key, value in again.unwrapped.state_dict().items():
        if key in owned:
            torch.testing.assert_close(value, final[key], atol=1e-6, rtol=1e-5)

    # The saved user attention + encoder head reload into a personalized pipeline built from scratch.
    user = users["train_users"][0]
    kw = dict(prompt="a square", num_inference_steps=2, height=32, width=32, output_type="latent")
    pipe = PersonalizedStableDiffusionXLPipeline.from_base(tiny_sdxl_pipeline(trainer.config.model_seed))
    load_user_attention(pipe.unet, out / "user_attention.safetensors")
    encoder = tiny_clip_user_encoder(dim=16, num_tokens=2, seed=trainer.config.seed)
    encoder.load_head(out / "user_encoder_head.safetensors")
    pipe.set_user_encoder(encoder.eval())
    trained = PersonalizedStableDiffusionXLPipeline.from_base(again.adapter.pipeline(again.unwrapped.eval()), again.conditioning.encoder.eval())
    trained.set_progress_bar_config(disable=True)
    examples = again.conditioning.contexts[user]
    reloaded = pipe(generator=torch.Generator().manual_seed(0), user_examples=examples, **kw).images
    expected = trained(generator=torch.Generator().manual_seed(0), user_examples=examples, **kw).images
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-4)
    assert (reloaded - base).abs().max() > 0  # the trained user branch changes the output


def test_ppd_full_finetune_reference_is_the_base_without_user_attention(tmp_path):
    """tuning=full + PPD: the frozen reference copy has no user attention and equals the base; the
    trainable list holds each parameter once; unet/ is saved without the user keys (they go to their file)."""
    import math

    from safetensors.torch import load_file

    from diffalign.families import load_family
    from diffalign.personalization.attention import has_user_attention
    from diffalign.training import PreferenceTrainer

    out = tmp_path / "full"
    trainer = PreferenceTrainer(_ppd_config(out, "tuning=full", "max_train_steps=1", "checkpointing_steps=0", "learning_rate=1e-5"))
    den = trainer.unwrapped
    assert has_user_attention(den) and not has_user_attention(trainer.reference)
    pristine = load_family("tiny:sdxl", seed=trainer.config.model_seed).denoiser.state_dict()
    ref_state = trainer.reference.state_dict()
    assert set(ref_state) == set(pristine) and all(torch.equal(ref_state[k], v) for k, v in pristine.items())
    ids = [id(p) for p in trainer.trainable]
    assert len(ids) == len(set(ids)) == len(list(den.parameters())) + len(trainer.conditioning.encoder.head_parameters())
    trainer.train()
    # Step 1: policy == reference up to kernel choice (grad-mode SDPA on CPU differs in the last bits).
    assert _losses(out)[1] == pytest.approx(math.log(2), abs=1e-4)
    # After training (base weights moved, user value weights made large), the reference is still the pristine base.
    from diffalign.kernels import per_sample_error
    from diffalign.training.sampling import KeyedDataset, collate_keyed

    with torch.no_grad():
        for attn in getattr(den, STATE_ATTR).layers:
            attn.user_attention.user_value.weight.normal_(0, 0.3)
    assert any(not torch.equal(den.state_dict()[k], v) for k, v in pristine.items())
    batch = collate_keyed([KeyedDataset(trainer.dataset)[(0, i)] for i in (0, 5)])
    inputs = trainer.prepare_inputs(batch)
    base = load_family("tiny:sdxl", seed=trainer.config.model_seed)
    with torch.no_grad():
        pred = base.predict(base.denoiser, inputs["x_t"], inputs["timesteps"], inputs["text"], inputs["micro"])
        with trainer._policy_context(batch):
            policy = trainer.adapter.predict(den, inputs["x_t"], inputs["timesteps"], inputs["text"], inputs["micro"])
    expected = per_sample_error(pred, inputs["target"], inputs["weight"]).view(2, 2)
    torch.testing.assert_close(trainer.reference_errors(batch, inputs=inputs), expected, atol=1e-6, rtol=1e-6)
    assert (per_sample_error(policy, inputs["target"], inputs["weight"]).view(2, 2) - expected).abs().max() > 1e-3
    saved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(pristine) and (out / "user_attention.safetensors").exists()


def test_ppd_from_pickapic_parquet_filters_users_and_never_uses_ties_as_context(tmp_path, caplog):
    """The real-data route: user ids and labels come from the Arrow columns; the filtered user is logged."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffalign.training import PreferenceTrainer

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (40, 32), colour).save(buf, format="PNG")
        return buf.getvalue()

    users = ["a"] * 6 + ["b"] * 6 + ["c"] * 2
    labels = [0.5, 1.0, 0.0, 1.0, 0.0, 1.0] + [1.0, 0.0] * 3 + [1.0, 0.0]
    pq.write_table(pa.table({
        "caption": [f"a square {i}" for i in range(len(users))],
        "jpg_0": pa.array([png((255, 0, 0))] * len(users), pa.binary()),
        "jpg_1": pa.array([png((0, 0, 255))] * len(users), pa.binary()),
        "label_0": pa.array(labels, pa.float64()),
        "user_id": users,
    }), str(tmp_path / "pairs.parquet"))
    cfg = _ppd_config(tmp_path / "run", f"dataset={tmp_path / 'pairs.parquet'}", "keep_ties=true", "ppd_min_pairs=4",
                      "ppd_test_fraction=0.0", f"hf_cache_dir={tmp_path / 'hf'}")
    with caplog.at_level(logging.INFO, logger="diffalign.personalization.training"):
        trainer = PreferenceTrainer(cfg)
    assert "1 users with < 4 pairs filtered (2 rows)" in caplog.text
    split = trainer.ppd_split
    assert split.train_users == ["a", "b"] and split.test_users == [] and split.filtered_rows == 2
    from diffalign.personalization.training import dataset_labels

    assert dataset_labels(trainer.dataset.dataset)[:3] == [0.5, 1.0, 0.0]  # read from the Arrow column
    assert 0 not in split.context_rows["a"]  # row 0 is user a's tie: never a context example
    assert len(trainer.dataset) == 8 and not set(trainer.dataset.indices) & {i for r in split.context_rows.values() for i in r}
    assert all(trainer.dataset[i]["user_id"] in ("a", "b") for i in range(len(trainer.dataset)))


def test_personalized_pipeline_class_per_family():
    from diffalign.pipelines import (
        PersonalizedStableDiffusion3Pipeline,
        PersonalizedStableDiffusionXLPipeline,
        personalized_pipeline_class,
    )

    assert personalized_pipeline_class("sdxl") is PersonalizedStableDiffusionXLPipeline
    assert personalized_pipeline_class("sd3") is PersonalizedStableDiffusion3Pipeline
    with pytest.raises(ValueError, match="no personalized pipeline for model family 'sd15'"):
        personalized_pipeline_class("sd15")
