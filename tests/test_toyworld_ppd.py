"""Toy-world PPD efficacy run (diffalign.toyworld.ppd) with tiny budgets on the shipped toy-sdxl."""

import json
import os

import numpy as np
import pytest
import torch

from diffalign.personalization.encoder import UserExample, interpolate_users
from diffalign.toyworld import ppd as T

TINY = dict(num_train_users=4, num_test_users=4, num_prompts=4, images_per_prompt=3, context_images=2, train_steps=3,
            batch_size=4, eval_prompts=3, num_inference_steps=2, num_examples=(1, 2), specificity_examples=2,
            alphas=(0.0, 0.5, 1.0))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ppd"))
    return out, T.run_quickstart_ppd(out, seed=0, progress=False, **TINY)


def test_results_have_required_keys_and_sane_ranges(run):
    out, res = run
    assert res["method"] == "ppd" and res["family"] == "sdxl" and res["seconds"] > 0
    assert res == json.loads(json.dumps(res))  # JSON-able
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["win_rate"] == res["win_rate"]
    own = res["win_rate"]["own"]
    assert set(own) == {"1", "2"}
    # Per user: 3 images with its own embedding; 3 x 3 images made from the 3 other held-out users' examples.
    for s, n in [*((s, 3) for s in own.values()), (res["win_rate"]["other"], 9), (res["win_rate"]["own_vs_other"], 9)]:
        assert 0.0 <= s["mean"] <= 1.0 and s["se"] >= 0.0 and len(s["per_user"]) == 4
        # ties count 1/2: every per-comparison outcome is 0, 1/2 or 1, so 2 * n * mean is an integer
        assert all(abs(2 * n * p - round(2 * n * p)) < 1e-9 for p in s["per_user"])
    for name, row in res["per_user"].items():
        assert set(row["other_users"]) == set(res["per_user"]) - {name}
    assert res["data"]["eval_images_per_model"] == 3
    # Training really ran through the project trainer.
    assert res["training"]["global_step"] == 3
    assert np.isfinite(res["training"]["final_loss"])
    # Every pair was labelled or counted as a tie: 4 users x 4 prompts x C(3, 2) pairs.
    assert res["data"]["train_pairs"] + res["data"]["ties_dropped"] == 4 * 4 * 3


def test_interpolation_endpoints_are_the_users_own_images(run):
    out, res = run
    points, it = res["interpolation"], res["interpolation_summary"]
    assert [p["alpha"] for p in points] == [0.0, 0.5, 1.0]
    assert it["user_a"] != it["user_b"]
    assert it["cosine"] == pytest.approx(-1.0)  # the most opposed held-out users: an antipodal pair
    ns = str(it["num_examples"])
    # alpha 0 is user A's own embedding, alpha 1 user B's: the same images as their own N=ns generations.
    assert points[0]["reward_a"] == pytest.approx(res["per_user"][it["user_a"]]["mean_reward"][ns])
    assert points[-1]["reward_b"] == pytest.approx(res["per_user"][it["user_b"]]["mean_reward"][ns])
    # Strictly monotone (k=0): A's reward never rises from alpha 0 to 1, B's never falls.
    ra, rb = [p["reward_a"] for p in points], [p["reward_b"] for p in points]
    assert it["monotone_a"] is all(b <= a for a, b in zip(ra, ra[1:]))
    assert it["monotone_b"] is all(b >= a for a, b in zip(rb, rb[1:]))
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["interpolation"]["points"] == points


def test_rerun_reuses_the_cache_and_reproduces(run):
    out, res = run
    again = T.run_quickstart_ppd(out, seed=0, progress=False, **TINY)
    assert again["win_rate"] == res["win_rate"]
    assert again["interpolation"] == res["interpolation"]
    assert again["training"]["final_loss"] == res["training"]["final_loss"]


def test_evaluation_only_options_reuse_training_and_are_cached_apart(run):
    out, res = run
    scaled = T.run_quickstart_ppd(out, seed=0, progress=False, eval_user_scale=2.0, **TINY)
    assert scaled["config"]["eval_user_scale"] == 2.0
    assert scaled["training"] == res["training"]  # the trained user weights were reused, not retrained
    (cache,) = [os.path.join(out, d, "eval-features-seed0.json") for d in os.listdir(out) if d.startswith("cache-")]
    with open(cache) as f:
        keys = list(json.load(f))
    user_keys = [k for k in keys if k.startswith("user/")]
    # scale-2 images are stored under their own keys, next to (not over) the scale-1 ones
    assert any(k.endswith("/scale2") for k in user_keys) and any("/scale" not in k for k in user_keys)
    negative = T.run_quickstart_ppd(out, seed=0, progress=False, negative_user="swapped", **TINY)
    assert negative["training"] == res["training"] and negative["config"]["negative_user"] == "swapped"
    with open(cache) as f:
        keys = list(json.load(f))
    # every user image set of the plain run was made again with a negative user, under its own key
    plain = [k for k in keys if k.startswith("user/") and "/scale" not in k and "/negative" not in k]
    with_negative = [k for k in keys if "/negative" in k]
    assert len(with_negative) == len(plain) and {k.split("/negative")[0] for k in with_negative} == set(plain)


def test_sft_weight_reaches_the_trainer(tmp_path):
    res = T.run_quickstart_ppd(str(tmp_path), seed=0, progress=False, sft_weight=100.0, **TINY)
    assert res["config"]["sft_weight"] == 100.0
    # the trainer logs the anchor term only when it adds it to the loss
    assert res["training"]["final_metrics"]["sft_anchor"] > 0.0


def test_generate_passes_the_scaled_user_branch_to_the_pipeline():
    seen = []

    class FakeStableDiffusionXLPipeline:  # families are told by pipeline class name
        vae_scale_factor = 4  # the initial noise follows the pipeline's latent geometry
        unet = type("Unet", (), {"config": type("Config", (), {"in_channels": 4})})()

        def __call__(self, **kw):
            seen.append(kw)
            return type("Out", (), {"images": [None] * len(kw["prompt"])})()

    cfg = T.ToyWorldPPDConfig(user_scale=0.5, eval_user_scale=3.0, generate_batch_size=2, progress=False)
    emb = torch.zeros(1, cfg.num_tokens, cfg.encoder_dim)
    T.generate(FakeStableDiffusionXLPipeline(), ["a photo of a ring"] * 3, [1, 2, 3], cfg, user_embedding=emb)
    assert len(seen) == 2 and all(kw["user_scale"] == 1.5 and kw["user_embedding"] is emb for kw in seen)
    assert tuple(seen[0]["latents"].shape) == (2, 4, 16, 16)
    T.generate(FakeStableDiffusionXLPipeline(), ["a photo of a ring"], [1], cfg)  # the base: no user branch at all
    assert "user_scale" not in seen[-1] and "user_embedding" not in seen[-1]
    negative = torch.ones(1, cfg.num_tokens, cfg.encoder_dim)
    T.generate(FakeStableDiffusionXLPipeline(), ["a photo of a ring"], [1], cfg, user_embedding=emb, negative_embedding=negative)
    assert seen[-1]["negative_user_embedding"] is negative


def test_swapped_examples_are_the_opposite_judgements():
    examples = [UserExample("p0", "a", "b"), UserExample("p1", "c", "d")]
    anti = T.swapped(examples)
    assert [(e.prompt, e.chosen, e.rejected) for e in anti] == [("p0", "b", "a"), ("p1", "d", "c")]
    assert T.swapped(anti) == examples


def test_heldout_users_are_disjoint_from_training_users():
    cfg = T.ToyWorldPPDConfig(num_train_users=10, num_test_users=6, progress=False)
    scales = {"size": 0.1, "warmth": 0.4, "centredness": 0.1}
    train, test = T.split_population(cfg, scales)
    assert len(train) == 10 and len(test) == 6
    for users in (train, test):  # opposite pairs: the population has no user-independent preference
        for a, b in zip(users[::2], users[1::2]):
            np.testing.assert_allclose(a.direction, -np.array(b.direction))
    assert not {u.name for u in train} & {u.name for u in test}
    assert not {u.direction for u in train} & {u.direction for u in test}
    for u in train + test:
        assert np.linalg.norm(u.direction) == pytest.approx(1.0)
        assert u.weights["toy_taste_warm"] == 0.0 or u.weights["toy_taste_cool"] == 0.0  # warm or cool, never both
        assert u.weights["toy_taste_large"] == pytest.approx(u.direction[0] / 0.1)
    # Seeded: the same population again, another seed another one.
    assert [u.direction for u in T.split_population(cfg, scales)[1]] == [u.direction for u in test]
    cfg1 = T.ToyWorldPPDConfig(num_train_users=10, num_test_users=6, seed=1, progress=False)
    assert [u.direction for u in T.split_population(cfg1, scales)[1]] != [u.direction for u in test]


def _scenes(n):
    from diffalign.toyworld import scenes

    rng = np.random.default_rng(0)
    return [scenes.render(scenes.sample_scene(scenes.sample_row(rng, "two_object"), rng)) for _ in range(n)]


def test_user_reward_matches_the_registered_taste_rewards():
    images = _scenes(6)
    features = T.taste_features(images)
    user = T.make_users(1, 3, "x", {"size": 0.1, "warmth": 0.4, "centredness": 0.1})[0]
    pixels = torch.stack([T.to_tensor(im) for im in images])  # SyntheticUser scores (N, 3, H, W) in [-1, 1]
    expected = user.synthetic_user().score(pixels, ["a photo of a circle and a square"] * 6).double().numpy()
    np.testing.assert_allclose(user.reward(features), expected, rtol=1e-5, atol=1e-5)


def test_label_pairs_orders_by_reward_and_counts_ties():
    features = np.array([[0.1, 1, 0, 0.5], [0.2, 1, 0, 0.5], [0.2, 1, 0, 0.5], [0.3, 0, 1, 0.4]], dtype=float)
    user = T.ToyUser("u", (1.0, 0.0, 0.0), {"toy_taste_large": 1.0, "toy_taste_warm": 0.0, "toy_taste_cool": 0.0,
                                            "toy_taste_centred": 0.0})
    pairs, ties = T.label_pairs([user], features, [0, 0, 0, 1])
    assert ties == {"u": 1}  # images 1 and 2 have the same size
    assert sorted(pairs) == [("u", 1, 0), ("u", 2, 0)]


def test_embeddings_depend_on_the_examples_and_interpolate_exactly():
    cfg = T.ToyWorldPPDConfig(encoder="tiny", encoder_dim=32, progress=False)
    enc = T.make_encoder(cfg).eval()
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 64, 64, generator=g) * 2 - 1 for _ in range(4)]
    a = [UserExample("a photo of a circle", imgs[0], imgs[1])]
    b = [UserExample("a photo of a circle", imgs[1], imgs[0])]  # the opposite judgement
    with torch.no_grad():
        ea, eb = enc(a), enc(b)
    assert ea.shape == (cfg.num_tokens, 32)
    assert not torch.allclose(ea, eb)
    assert torch.equal(interpolate_users(ea, eb, 0.0), ea) and torch.equal(interpolate_users(ea, eb, 1.0), eb)
    assert torch.allclose(interpolate_users(ea, eb, 0.5), (ea + eb) / 2)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="tasks"):
        T.ToyWorldPPDConfig(tasks=("nope",))
    with pytest.raises(ValueError, match="num_test_users"):
        T.ToyWorldPPDConfig(num_test_users=1)
    with pytest.raises(ValueError, match="specificity_examples"):
        T.ToyWorldPPDConfig(num_examples=(1, 2), specificity_examples=4)
    with pytest.raises(ValueError, match="alphas"):
        T.ToyWorldPPDConfig(alphas=(1.0, 0.0))
    with pytest.raises(ValueError, match="antipodal"):
        T.ToyWorldPPDConfig(num_train_users=5)
    with pytest.raises(ValueError, match="encoder"):
        T.ToyWorldPPDConfig(encoder="vit")
    with pytest.raises(ValueError, match="tuning"):
        T.ToyWorldPPDConfig(tuning="full")
    with pytest.raises(ValueError, match="sft_weight"):
        T.ToyWorldPPDConfig(sft_weight=-1.0)
    with pytest.raises(ValueError, match="negative_user"):
        T.ToyWorldPPDConfig(negative_user="other")
    with pytest.raises(ValueError, match="context_pool"):
        T.ToyWorldPPDConfig(num_context=4, context_pool=3)
    with pytest.raises(ValueError, match="eval_user_scale"):
        T.ToyWorldPPDConfig(eval_user_scale=0.0)
    with pytest.raises(ValueError, match="do not vary"):
        T.taste_scales(np.ones((5, 4)))
    user = T.ToyUser("u", (1.0, 0.0, 0.0), {"toy_taste_large": 1.0})
    pool = {"features": np.ones((4, 4)), "prompt_index": [0, 0, 1, 1], "prompts": ["p"] * 4, "images": [None] * 4}
    with pytest.raises(ValueError, match="decisive pair"):
        T.heldout_examples(user, pool, 1, seed=0)


def test_taste_encoder_reads_the_examples_judgement():
    images = _scenes(2)
    px = [T.to_tensor(im) for im in images]
    cfg = T.ToyWorldPPDConfig(encoder="taste", encoder_dim=32, progress=False)
    enc = T.make_encoder(cfg).eval()
    fwd = enc.example_features([UserExample("p", px[0], px[1])])
    rev = enc.example_features([UserExample("p", px[1], px[0])])
    f = T.taste_features(images)
    np.testing.assert_allclose(fwd[0, :4].numpy(), f[0], atol=1e-6)  # chosen's tastes, then rejected's, then the difference
    np.testing.assert_allclose(fwd[0, 8:].numpy(), f[0] - f[1], atol=1e-6)
    assert torch.allclose(fwd[0, 8:], -rev[0, 8:])
    with torch.no_grad():
        assert not torch.allclose(enc([UserExample("p", px[0], px[1])]), enc([UserExample("p", px[1], px[0])]))
