"""Antithetic ES gradient estimates (truncated ES and PES), as small pure pieces.

With ``z_j ~ N(0, I)``, members ``theta +- sigma z_j`` and their meta-losses ``L+-_j``::

    estimate = mean_j  d_j (L+_j - L-_j) / (2 sigma)

where ``d_j = z_j`` for truncated ES, and for PES ``d_j`` is the sum of all ``z_j`` used since
the pair's inner problem was reset (Vicol et al. 2021), which removes truncation bias.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def antithetic_estimate(directions: Tensor, loss_pos: Tensor, loss_neg: Tensor, sigma: float,
                        mask: Optional[Tensor] = None) -> Tuple[Tensor, float, int]:
    """Returns (estimate (d,), estimator variance, pairs used). ``mask`` drops pairs (for
    example those whose losses were not finite); with no pair left the estimate is zero."""
    diff = (loss_pos.to(torch.float64) - loss_neg.to(torch.float64)) / (2 * sigma)
    if mask is None:
        mask = torch.isfinite(diff)
    mask = mask & torch.isfinite(diff)
    n = int(mask.sum())
    if n == 0:
        return torch.zeros(directions.shape[-1], dtype=torch.float64), float("nan"), 0
    per_pair = directions[mask].to(torch.float64) * diff[mask].unsqueeze(-1)
    est = per_pair.mean(0)
    var = float(((per_pair - est) ** 2).sum(-1).mean())
    return est, var, n


class PESAccumulator:
    """The running sum of each pair's directions since its last reset."""

    def __init__(self, pairs: int, dim: int):
        self.total = torch.zeros(pairs, dim)

    def add(self, z: Tensor) -> Tensor:
        self.total += z
        return self.total

    def reset(self, pairs) -> None:
        self.total[pairs] = 0.0
