"""Tiny in-memory preference data for smoke tests and the tiny configs (`dataset: synthetic:...`).

- `synthetic:pairs` / `synthetic:ranked`: each group is a prompt "a <colour> square" and k flat images of
  different colours; the image whose colour matches the prompt is best, the others rank by colour distance.
- `synthetic:users`: `TwoUserPairs`, the same random colour pairs judged by several users (PPD smoke runs);
  the built-in users prefer the redder or the bluer image (the pixel-statistics `TOY_CHANNEL_REWARDS`).

They need no files and yield items in the data room's format (`diffalign.data.collate_groups` stacks them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

COLOURS = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (-1.0, -1.0, -1.0),
}


class SyntheticPreferenceDataset(torch.utils.data.Dataset):
    schema = "synthetic"

    def __init__(self, num_groups: int = 64, k: int = 2, resolution: int = 64, seed: int = 0):
        if k < 2:
            raise ValueError(f"k must be >= 2, got {k}")
        if k > len(COLOURS):
            raise ValueError(f"k must be <= {len(COLOURS)} (one colour per image), got {k}")
        self.num_groups, self.k, self.resolution, self.seed = num_groups, k, resolution, seed
        self.skipped_rows = 0

    def __len__(self) -> int:
        return self.num_groups

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        names = list(COLOURS)
        target = names[index % len(names)]
        others = [n for n in names if n != target]
        chosen = [target] + list(rng.choice(others, size=self.k - 1, replace=False))
        ref = np.array(COLOURS[target])
        dist = np.array([np.abs(np.array(COLOURS[c]) - ref).sum() for c in chosen])
        scores = 1.0 - dist / 6.0  # 1 for the matching colour, lower for farther ones
        order = np.argsort(-scores, kind="stable")  # best first, as pairs require
        if self.k == 2:
            scores = np.array([1.0, 0.0])
        else:
            scores = scores[order]
        chosen = [chosen[i] for i in order]
        res = self.resolution
        noise = torch.from_numpy(rng.standard_normal((self.k, 3, res, res)).astype(np.float32)) * 0.1
        colours = torch.tensor([COLOURS[c] for c in chosen], dtype=torch.float32).view(self.k, 3, 1, 1)
        pixels = (colours + noise).clamp(-1, 1)
        return {
            "pixel_values": pixels,
            "scores": torch.tensor(scores, dtype=torch.float32),
            "prompt": f"a {target} square",
            "prompt_id": f"synthetic-{index}",
            "user_id": None,
            "original_sizes": torch.tensor([[res, res]] * self.k, dtype=torch.int64),
            "crop_top_lefts": torch.zeros(self.k, 2, dtype=torch.int64),
        }


def channel_reward(weights: tuple[float, float, float]) -> Callable:
    """A reward that weighs an image's mean R, G, B: images (N, 3, H, W) in [-1, 1] -> (N,)."""
    w = torch.tensor(weights, dtype=torch.float32)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (images.float().mean(dim=(2, 3)) * w.to(images.device)).sum(dim=1)

    return reward


# Pixel-statistics rewards for offline toy runs (also the toy rewards of diffalign.personalization's users).
TOY_CHANNEL_REWARDS: dict[str, Callable] = {
    "toy_red": channel_reward((1.0, -0.5, -0.5)),
    "toy_blue": channel_reward((-0.5, -0.5, 1.0)),
    "toy_green": channel_reward((-0.5, 1.0, -0.5)),
    "toy_bright": channel_reward((1 / 3, 1 / 3, 1 / 3)),
}

TWO_USER_PROMPT = "a square"


class PairJudge(Protocol):
    def prefers(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class RewardUser:
    """A user who prefers the image with the higher `reward` (one reward, no standardisation)."""

    def __init__(self, reward: Callable):
        self.reward = reward

    def prefers(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.reward(images_a, prompts) > self.reward(images_b, prompts)


def pair_images(rng: np.random.Generator, resolution: int) -> torch.Tensor:
    """Two flat random colours with a little texture: (2, 3, H, W) in [-1, 1]."""
    colours = torch.from_numpy(rng.uniform(-0.9, 0.9, size=(2, 3, 1, 1)).astype(np.float32))
    noise = torch.from_numpy(rng.standard_normal((2, 3, resolution, resolution)).astype(np.float32)) * 0.05
    return (colours + noise).clamp(-1, 1)


class TwoUserPairs(torch.utils.data.Dataset):
    """Pairs judged by each user (same images for every user), in the data room's item format. `users` maps a
    user id to anything with `prefers(images_a, images_b, prompts)` (e.g. personalization's `SyntheticUser`)."""

    def __init__(self, users: Mapping[str, PairJudge], num_pairs: int, resolution: int, seed: int):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(num_pairs):
            px = pair_images(rng, resolution)
            for name, user in users.items():
                a_first = bool(user.prefers(px[:1], px[1:], [TWO_USER_PROMPT])[0])
                ordered = px if a_first else px.flip(0)
                self.items.append({
                    "pixel_values": ordered,
                    "scores": torch.tensor([1.0, 0.0]),
                    "prompt": TWO_USER_PROMPT,
                    "prompt_id": f"toy-{i}",
                    "user_id": name,
                    "original_sizes": torch.tensor([[resolution, resolution]] * 2),
                    "crop_top_lefts": torch.zeros(2, 2, dtype=torch.int64),
                })

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def synthetic_users(num_users: int = 4, pairs_per_user: int = 8, resolution: int = 64, seed: int = 0):
    """Pairs with `user_id` for PPD smoke runs: users u0, u1, ... judge the SAME colour pairs, even users
    preferring the redder image (`toy_red`), odd users the bluer one (`toy_blue`)."""
    if num_users < 1 or pairs_per_user < 1:
        raise ValueError(f"synthetic:users needs >= 1 user and >= 1 pair per user, got {num_users}, {pairs_per_user}")
    users = {f"u{i}": RewardUser(TOY_CHANNEL_REWARDS["toy_blue" if i % 2 else "toy_red"]) for i in range(num_users)}
    return TwoUserPairs(users, num_pairs=pairs_per_user, resolution=resolution, seed=seed)


def synthetic_from_spec(spec: str, resolution: int, seed: int):
    """`synthetic:pairs[:N]`, `synthetic:ranked[:N[:k]]` or `synthetic:users[:U[:P]]` (U users x P pairs, with user_id)."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[1] not in ("pairs", "ranked", "users"):
        raise ValueError(
            f"bad synthetic data spec {spec!r}; use synthetic:pairs[:N], synthetic:ranked[:N[:k]] or synthetic:users[:U[:P]]"
        )
    if parts[1] == "users":
        return synthetic_users(int(parts[2]) if len(parts) > 2 else 4, int(parts[3]) if len(parts) > 3 else 8, resolution, seed)
    n = int(parts[2]) if len(parts) > 2 else 64
    k = 2 if parts[1] == "pairs" else (int(parts[3]) if len(parts) > 3 else 4)
    return SyntheticPreferenceDataset(num_groups=n, k=k, resolution=resolution, seed=seed)
