import numpy as np
import torch

import diffalign.rewards as R
from diffalign.toyworld import scenes as S
from diffalign.toyworld import toy_clip as T


def test_perturb_changes_the_prompt_within_the_task():
    rng = np.random.default_rng(0)
    for task in S.TASKS:
        for _ in range(20):
            row = S.sample_row(rng, task)
            neg = T.perturb(row, rng)
            assert neg["tag"] == task and neg["prompt"] != row["prompt"]


def test_clip_loss_trains_and_reward_scores():
    model, tok = T.build_model(seed=0)
    items = [T._example(0, i, 2) for i in range(4)]
    loss = T.clip_loss(model, tok, *[[x[k] for x in items] for k in range(4)])
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0

    reward = R.load("toy_clip", random_init=True)
    images = [x[0] for x in items]
    s = reward.score(images, [x[1] for x in items])
    assert s.shape == (4,) and torch.isfinite(s).all()
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for im in images])
    torch.testing.assert_close(reward.score(x, [i[1] for i in items]), s, atol=1e-4, rtol=1e-4)


def test_decisive_pairs_are_decisive():
    pairs = T.decisive_pairs(6, seed=1)
    from diffalign.toyworld.detector import score_images

    for row, a, b, a_right in pairs:
        assert score_images([a, b], [row, row]) == [a_right, not a_right]


def test_shipped_toy_clip_agrees_with_the_exact_checker():
    reward = R.load("toy_clip")
    res = T.agreement(reward, T.decisive_pairs(60, seed=7))
    assert res["n_pairs"] == 60 and res["overall"] >= 0.8, res


def test_loading_trained_weights_does_not_claim_a_random_model(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        T.load_model()
    assert "initialized randomly" not in caplog.text
    with caplog.at_level(logging.WARNING):
        T.build_model()  # a model for training from scratch: open_clip's warning is true there and stays
    assert "initialized randomly" in caplog.text
    assert not any(isinstance(f, T._DropRandomInitWarning) for f in logging.getLogger().filters)
