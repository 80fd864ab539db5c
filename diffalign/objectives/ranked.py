"""RankDPO (Karthik et al. 2024): a listwise, DCG-weighted DPO over groups of k ranked samples.

For every pair (i, j) where i scores strictly above j (tied samples form no pair):
    Delta_ij * -logsigmoid(-0.5 * beta * (s_i - s_j)),   s = err_policy - err_ref
    Delta_ij = |G_i - G_j| * |1 / D(rank_i) - 1 / D(rank_j)|,  G = 2^phi - 1,  D(r) = log2(1 + r)
The loss sums over pairs and averages over groups. With weighting="none" (Delta = 1) and k = 2 it is
exactly Diffusion-DPO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.objectives._validation import check_beta, check_errors, check_scores, upcast

WEIGHTINGS = ("dcg", "none")
DISCOUNT_SOURCES = ("true", "predicted")


def ranks_from(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks per row, best (largest value) first; ties keep the given column order."""
    order = torch.argsort(-values, dim=1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(1, values.shape[1] + 1, device=values.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


def dcg_pair_weights(scores: torch.Tensor, discount_ranks: torch.Tensor) -> torch.Tensor:
    """Delta_ij of shape (B, k, k) from gains 2^phi - 1 and discounts 1 / log2(1 + rank)."""
    gains = torch.pow(2.0, upcast(scores)) - 1
    inv_discount = 1.0 / torch.log2(1.0 + upcast(discount_ranks))
    return (gains[:, :, None] - gains[:, None, :]).abs() * (inv_discount[:, :, None] - inv_discount[:, None, :]).abs()


def rank_dpo(
    err_policy: torch.Tensor,
    err_ref: torch.Tensor,
    scores: torch.Tensor,
    beta: float = 5000.0,
    weighting: str = "dcg",
    discount_from: str = "true",
) -> tuple[torch.Tensor, dict]:
    """RankDPO on errors of shape (B, k), k >= 2, in any order; `scores` (B, k) in [0, 1], higher is better.

    discount_from="true" takes the discount ranks from `scores`; "predicted" from the model's current
    implied order (-s, detached), as in LambdaLoss. The pairs themselves always follow `scores`.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    if discount_from not in DISCOUNT_SOURCES:
        raise ValueError(f"unknown discount_from {discount_from!r}; choose one of {DISCOUNT_SOURCES}")
    check_beta(beta)
    check_errors(err_policy, err_ref)
    check_scores(scores, err_policy.shape)

    scores = upcast(scores.to(err_policy.device))
    s = upcast(err_policy) - upcast(err_ref)
    true_ranks = ranks_from(scores)
    # above[b, i, j]: sample i scores strictly above sample j. Ties form no pair: DCG gives them zero weight anyway,
    # and with weighting="none" the stored order would otherwise become a label; metrics would count coin flips.
    above = scores[:, :, None] > scores[:, None, :]
    # Same operation order as Diffusion-DPO, (e_i - e_j) - (r_i - r_j), so k=2 reproduces it bit for bit.
    policy, ref = upcast(err_policy), upcast(err_ref)
    pair_logits = -0.5 * beta * ((policy[:, :, None] - policy[:, None, :]) - (ref[:, :, None] - ref[:, None, :]))

    if weighting == "dcg":
        discount_ranks = true_ranks if discount_from == "true" else ranks_from(-s.detach())
        weights = dcg_pair_weights(scores, discount_ranks)
    else:
        weights = torch.ones_like(pair_logits)

    pair_losses = weights * -F.logsigmoid(pair_logits)
    loss = torch.where(above, pair_losses, torch.zeros_like(pair_losses)).sum(dim=(1, 2)).mean()

    with torch.no_grad():
        reward = -beta * s
        best = true_ranks == 1
        worst = true_ranks == scores.shape[1]
        n_pairs = above.sum().clamp(min=1)
        metrics = {
            # Fraction of ordered pairs whose implicit rewards agree with the ranking.
            "implicit_acc": ((pair_logits > 0) & above).sum() / n_pairs,
            "rewards/best": reward[best].mean(),
            "rewards/worst": reward[worst].mean(),
            "rewards/margin": (reward[best] - reward[worst]).mean(),
            "drift/best": s[best].mean(),
            "drift/worst": s[worst].mean(),
            "drift/mean": s.mean(),
            "pair_weight/mean": (weights * above).sum() / n_pairs,
            # Spearman-style agreement between the implied order and the true ranking, in [-1, 1].
            "rank_corr": _rank_correlation(true_ranks, ranks_from(-s)),
        }
    return loss, metrics


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    k = a.shape[1]
    d2 = ((a - b).float() ** 2).sum(dim=1)
    return (1 - 6 * d2 / (k * (k * k - 1))).mean()
