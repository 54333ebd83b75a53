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


class TruncatedES:
    """Antithetic truncated ES: each truncation's estimate uses only its own directions. One
    inner state per pair suffices (both members restart each truncation from it)."""

    name = "tes"
    per_member = False

    def __init__(self, pairs: int, dim: int):
        self.pairs, self.dim = pairs, dim

    def estimate(self, z: Tensor, loss_pos: Tensor, loss_neg: Tensor, sigma: float,
                 mask: Optional[Tensor] = None) -> Tuple[Tensor, float, int]:
        """``z`` (pairs, dim): this truncation's directions. See :func:`antithetic_estimate`."""
        return antithetic_estimate(z, loss_pos, loss_neg, sigma, mask)

    def reset(self, pairs) -> None:
        """The pairs ``pairs`` (a slice or indices) start a new inner problem."""

    def state_dict(self) -> Optional[Tensor]:
        return None

    def load_state_dict(self, saved: Optional[Tensor]) -> None:
        pass


class PES(TruncatedES):
    """Persistent ES (Vicol et al. 2021): each pair's estimate uses the sum of all its
    directions since its inner problem was reset, which removes the truncation bias. Each
    member keeps its own inner state."""

    name = "pes"
    per_member = True

    def __init__(self, pairs: int, dim: int):
        super().__init__(pairs, dim)
        self.total = torch.zeros(pairs, dim)

    def estimate(self, z, loss_pos, loss_neg, sigma, mask=None):
        self.total += z
        return antithetic_estimate(self.total, loss_pos, loss_neg, sigma, mask)

    def reset(self, pairs) -> None:
        self.total[pairs] = 0.0

    def state_dict(self) -> Optional[Tensor]:
        return self.total

    def load_state_dict(self, saved: Optional[Tensor]) -> None:
        self.total = saved


ESTIMATORS = {cls.name: cls for cls in (TruncatedES, PES)}


def make_estimator(name: str, pairs: int, dim: int) -> TruncatedES:
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {name!r}")
    return ESTIMATORS[name](pairs, dim)
