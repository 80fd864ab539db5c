import numpy as np
import pytest
import torch

import diffalign.rewards as R
import diffalign.toyworld.rewards  # noqa: F401  (registers the toy rewards)
from diffalign.toyworld import scenes as S


def _img(*objs):
    return S.render(S.Scene(objects=[S.SceneObject(*o) for o in objs], seed=0))


def test_registered():
    for name in ("toy_geneval", "toy_taste_large", "toy_taste_warm", "toy_taste_cool", "toy_taste_centred"):
        assert name in R.available()


def test_toy_geneval_reward_is_the_exact_checker():
    reward = R.load("toy_geneval")
    rng = np.random.default_rng(0)
    rows = [S.sample_row(rng, t) for t in S.TASKS for _ in range(3)]
    images = [S.render(S.sample_scene(r, rng)) for r in rows]
    prompts = [r["prompt"] for r in rows]
    assert reward.score(images, prompts).tolist() == [1.0] * len(rows)
    assert reward.score(images, prompts[1:] + prompts[:1]).mean() < 0.5
    # Tensor input in [-1, 1] gives the same verdicts.
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for im in images])
    assert reward.score(x, prompts).tolist() == [1.0] * len(rows)
    with pytest.raises(ValueError, match="not a toy-world GenEval prompt"):
        reward.score(images[:1], ["a photo of a dog"])


def test_taste_rewards_order_scenes_as_their_users_would():
    big, small = _img(("circle", "green", 32, 32, 12)), _img(("circle", "green", 32, 32, 7))
    red, blue = _img(("square", "red", 32, 32, 9)), _img(("square", "blue", 32, 32, 9))
    centre, corner = _img(("star", "white", 32, 32, 9)), _img(("star", "white", 11, 11, 9))
    p = ["a photo of a circle"] * 2
    assert R.load("toy_taste_large").score([big, small], p).tolist()[0] > R.load("toy_taste_large").score([small], p[:1]).item()
    warm = R.load("toy_taste_warm").score([red, blue], p)
    cool = R.load("toy_taste_cool").score([red, blue], p)
    assert warm[0] > warm[1] and cool[1] > cool[0]
    cen = R.load("toy_taste_centred").score([centre, corner], p)
    assert cen[0] > cen[1]
    with pytest.raises(ValueError, match="unknown taste"):
        diffalign.toyworld.rewards.ToyTasteReward("loud")
