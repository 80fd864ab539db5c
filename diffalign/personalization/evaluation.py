"""PPD evaluation: win rate of user-conditioned over base generations, and interpolation monotonicity.

A judge decides, per (prompt, seed), whether the user-conditioned image beats the base image from the
same seed. For a synthetic user the judge is the user's own reward; for a real user it is a preference
model given by the caller (a reward from `diffalign.rewards`, or any callable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from diffalign.evaluation.stats import wins
from diffalign.personalization.encoder import UserEncoder, UserExample, interpolate_users
from diffalign.personalization.training import SyntheticUser

# A judge scores images for prompts: (N, 3, H, W) in [-1, 1], list[str] -> (N,) higher is better.
Judge = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def _generate(pipe, prompts, seeds, user_embedding=None, **kwargs) -> torch.Tensor:
    images = []
    for prompt in prompts:
        for seed in seeds:
            out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="pt",
                       user_embedding=user_embedding, **kwargs)
            images.append(out.images[0] * 2 - 1)
    return torch.stack(images)


@torch.no_grad()
def synthetic_user_examples(pipe, user: SyntheticUser, prompts: Sequence[str], n: int, seed: int = 0, **kwargs) -> list[UserExample]:
    """Context pairs for a synthetic user: two base generations per prompt, ordered by the user's reward."""
    examples = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        a, b = _generate(pipe, [prompt], [seed + 2 * i, seed + 2 * i + 1], **kwargs)
        if user.prefers(a[None], b[None], [prompt])[0]:
            examples.append(UserExample(prompt, a, b))
        else:
            examples.append(UserExample(prompt, b, a))
    return examples


@torch.no_grad()
def win_rates(
    pipe,
    encoder: UserEncoder,
    users: dict[str, tuple[Sequence[UserExample], Judge]],
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_examples: Sequence[int] = (1, 2, 4, 8),
    **generate_kwargs,
) -> dict:
    """For each user and each N, the share of (prompt, seed) where the judge prefers the image conditioned
    on the user's first N context examples over the base image (ties count half)."""
    encoder.eval()
    base = _generate(pipe, prompts, seeds, **generate_kwargs)
    flat_prompts = [p for p in prompts for _ in seeds]
    table: dict = {"num_examples": list(num_examples), "users": {}}
    for name, (examples, judge) in tqdm(users.items(), desc="users"):
        base_scores = judge(base, flat_prompts).float().cpu()
        row = {}
        for n in num_examples:
            if n > len(examples):
                raise ValueError(f"user {name!r} has {len(examples)} context examples; cannot evaluate N={n}")
            emb = encoder(list(examples[:n]))
            images = _generate(pipe, prompts, seeds, user_embedding=emb, **generate_kwargs)
            scores = judge(images, flat_prompts).float().cpu()
            row[str(n)] = {"win_rate": float(wins(scores.numpy(), base_scores.numpy()).mean()), "mean_score": float(scores.mean()),
                           "base_mean_score": float(base_scores.mean())}
        table["users"][name] = row
    table["mean_win_rate"] = {
        str(n): float(np.mean([table["users"][u][str(n)]["win_rate"] for u in users])) for n in num_examples
    }
    return table


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Rank correlation with ties averaged; None when undefined (a constant sequence)."""
    from scipy.stats import spearmanr

    if len(set(y)) < 2 or len(set(x)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


@torch.no_grad()
def interpolation_monotonicity(
    pipe,
    emb_a: torch.Tensor,
    emb_b: torch.Tensor,
    judge_a: Judge,
    judge_b: Judge,
    prompts: Sequence[str],
    seeds: Sequence[int],
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    **generate_kwargs,
) -> dict:
    """Walk from user A (alpha 0) to user B (alpha 1): A's reward should fall and B's rise.

    Reports mean rewards per alpha, their Spearman correlation with alpha (ideal: -1 for A, +1 for B)
    and whether each sequence is (non-strictly) monotone.
    """
    flat_prompts = [p for p in prompts for _ in seeds]
    ra, rb = [], []
    for alpha in alphas:
        images = _generate(pipe, prompts, seeds, user_embedding=interpolate_users(emb_a, emb_b, alpha), **generate_kwargs)
        ra.append(float(judge_a(images, flat_prompts).float().mean()))
        rb.append(float(judge_b(images, flat_prompts).float().mean()))
    return {
        "alphas": list(alphas),
        "reward_a": ra,
        "reward_b": rb,
        "spearman_a": _spearman(alphas, ra),
        "spearman_b": _spearman(alphas, rb),
        "monotone_a": bool(all(x >= y for x, y in zip(ra, ra[1:]))),
        "monotone_b": bool(all(x <= y for x, y in zip(rb, rb[1:]))),
    }
