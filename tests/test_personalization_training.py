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
    from diffalign.families import load_family
    from diffalign.personalization.toy import TwoUserPairs, context_examples
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
    from diffalign.personalization import prepare_ppd
    from diffalign.personalization.attention import has_user_attention
    from diffalign.personalization.toy import TwoUserPairs
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
