"""A tiny in-memory preference data set for smoke tests and the tiny configs (`dataset: synthetic:pairs`).

Each group is a prompt "a <colour> square" and k flat images of different colours; the image
whose colour matches the prompt is best, the others rank by colour distance. It needs no files
and yields items in the data room's format (`diffalign.data.collate_groups` stacks them).
"""

from __future__ import annotations

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


def synthetic_users(num_users: int = 4, pairs_per_user: int = 8, resolution: int = 64, seed: int = 0):
    """Pairs with `user_id` for PPD smoke runs: users u0, u1, ... judge the SAME colour pairs, even users
    preferring the redder image (`toy_red`), odd users the bluer one (`toy_blue`)."""
    from diffalign.personalization.toy import TwoUserPairs
    from diffalign.personalization.training import SyntheticUser

    if num_users < 1 or pairs_per_user < 1:
        raise ValueError(f"synthetic:users needs >= 1 user and >= 1 pair per user, got {num_users}, {pairs_per_user}")
    users = {f"u{i}": SyntheticUser(f"u{i}", {"toy_blue" if i % 2 else "toy_red": 1.0}) for i in range(num_users)}
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
