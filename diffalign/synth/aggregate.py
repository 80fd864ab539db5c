"""Win-count aggregation of several reward models into one ranking (RankDPO, Karthik et al. 2025).

For image i among k images of a prompt, C_i counts over reward models r and other images j the times
R_r(x_i) > R_r(x_j); ties count for nothing. phi_i = C_i / (n_rewards * (k - 1)) lies in [0, 1].
Only comparisons within one reward are made, so rewards on different scales need no normalisation.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_float_tensor(scores) -> torch.Tensor:
    s = torch.as_tensor(scores)
    if not torch.is_floating_point(s):
        s = s.double()
    return s


def win_count_scores(scores) -> torch.Tensor:
    """scores (n_rewards, k) or (B, n_rewards, k), raw reward values -> phi (k,) or (B, k), float32."""
    s = _as_float_tensor(scores)
    if s.ndim not in (2, 3):
        raise ValueError(f"scores must be (n_rewards, k) or (B, n_rewards, k), got shape {tuple(s.shape)}")
    n_rewards, k = s.shape[-2], s.shape[-1]
    if k < 2:
        raise ValueError(f"win counts need k >= 2 images per prompt, got k={k}")
    if n_rewards < 1:
        raise ValueError("scores has no reward rows (n_rewards=0)")
    if torch.isnan(s).any():
        bad = torch.nonzero(torch.isnan(s))[0].tolist()
        raise ValueError(f"scores contain NaN (first at index {bad}); a reward model failed on that image")
    # wins[..., r, i, j] = R_r(x_i) > R_r(x_j): strict, so ties (and i == j) count nothing.
    wins = s.unsqueeze(-1) > s.unsqueeze(-2)
    counts = wins.sum(dim=(-3, -1))
    return (counts.double() / (n_rewards * (k - 1))).float()


def ranks_from_phi(phi) -> torch.Tensor:
    """Ranks (k,) or (B, k), int32, 1 = best; equal phi keeps image order (the earlier image ranks higher)."""
    p = _as_float_tensor(phi)
    if p.ndim not in (1, 2):
        raise ValueError(f"phi must be (k,) or (B, k), got shape {tuple(p.shape)}")
    order = torch.sort(-p, dim=-1, stable=True).indices
    positions = torch.arange(1, p.shape[-1] + 1, dtype=torch.int32).expand_as(order).contiguous()
    ranks = torch.empty_like(positions)
    ranks.scatter_(-1, order, positions)
    return ranks


def win_count_ranks(scores) -> torch.Tensor:
    """Ranks straight from raw scores: `ranks_from_phi(win_count_scores(scores))`."""
    return ranks_from_phi(win_count_scores(scores))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
