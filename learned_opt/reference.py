"""Readable reference implementation: one tensor at a time, straight from the formulas.

It is the specification the fast path (:mod:`learned_opt.fast`) is tested against; it is not
meant to be quick. Both expose the same two functions used by
:func:`learned_opt.functional.lopt_step`.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple

import torch
from torch import Tensor

from .config import ArchConfig
from .features import column_scale, element_columns, unit_rms_factor


class _Work(NamedTuple):
    params: List[Tensor]
    grads: List[Tensor]  # clipped
    mom: List[Tensor]  # updated, (*shape, D)
    rms: List[Tensor]


def _decays(cfg: ArchConfig, like: Tensor) -> Tensor:
    return torch.tensor(cfg.decays, dtype=like.dtype, device=like.device)


def raw_statistics(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> Tensor:
    """(8,) float64 statistics of one tensor with clipped gradient ``g`` and accumulators
    ``m``, ``v``: mean/var of m, of v (over elements and decays), of p, then the sums of
    squares of p and of g."""
    # statistics in float64: the log(1e-8 + |mean|) features are very sensitive to the
    # rounding of a mean that nearly cancels, so both implementations accumulate exactly
    m64, v64, p64, g64 = m.double(), v.double(), p.double(), g.double()
    return torch.stack([
        m64.mean(), ((m64 - m64.mean()) ** 2).mean(),
        v64.mean(), ((v64 - v64.mean()) ** 2).mean(),
        p64.mean(), ((p64 - p64.mean()) ** 2).mean(),
        (p64 * p64).sum(), (g64 * g64).sum(),
    ])


def tensor_statistics(params, grads, mom, rms, amount, cfg: ArchConfig, chunk_size=None,
                      inplace=False):
    """Clip the gradients, update the accumulators, and return per-tensor statistics
    (T, 8, float64): mean/var of m, of v, of p, sum of squares of p and of the clipped gradient.
    Always out of place (``inplace`` is accepted and ignored)."""
    rows, G, M, V = [], [], [], []
    for p, g, m, v in zip(params, grads, mom, rms):
        b = _decays(cfg, p)
        g = torch.clamp(g, -amount, amount)
        m = b * m + (1 - b) * g.unsqueeze(-1)
        v = b * v + (1 - b) * (g * g).unsqueeze(-1)
        rows.append(raw_statistics(p, g, m, v))
        G.append(g)
        M.append(m)
        V.append(v)
    return _Work(list(params), G, M, V), torch.stack(rows)


def mlp(w: Dict[str, Tensor], x: Tensor, cfg: ArchConfig) -> Tensor:
    """The per-parameter MLP: Linear -> ReLU -> ... -> Linear."""
    for i in range(cfg.mlp_layers + 1):
        x = x @ w[f"mlp_w{i}"] + w[f"mlp_b{i}"]
        if i < cfg.mlp_layers:
            x = torch.relu(x)
    return x


def mlp_update(work: _Work, w, consts: Tensor, lrs, wds, cfg: ArchConfig, chunk_size=None):
    """Run the MLP on every element of every tensor and apply the update."""
    new_params, messages = [], []
    for j, (p, g, m, v) in enumerate(zip(work.params, work.grads, work.mom, work.rms)):
        D = cfg.n_decays
        raw = element_columns(g.reshape(-1), p.reshape(-1), m.reshape(-1, D), v.reshape(-1, D), cfg)
        cols = raw * column_scale((raw * raw).mean(dim=0, keepdim=True), cfg)
        feats = [cols, consts[j].expand(cols.shape[0], -1)]
        if cfg.dual_snr:  # the m/sqrt(v) columns once more, unscaled
            a, b = cfg.snr_column_range
            feats.append(raw[:, a:b])
        feats = torch.cat(feats, dim=-1)
        out = mlp(w, feats, cfg)
        d, mag = out[:, 0], out[:, 1]
        live = (v.reshape(-1, D) != 0).any(-1) if cfg.freeze_untouched else torch.ones_like(d, dtype=torch.bool)
        d = torch.where(live, d, torch.zeros_like(d))  # never a non-zero gradient: no step
        if cfg.unit_rms_update:  # d / RMS(d) over the elements that may move
            d = d * unit_rms_factor((d * d).sum(), live.sum())
        step = lrs[j] * d * torch.exp(cfg.magnitude_rate * mag)
        new_params.append(p * (1 - lrs[j] * wds[j]) - step.reshape(p.shape))
        messages.append(out[:, 2:].mean(dim=0))
    return new_params, torch.stack(messages), work.mom, work.rms
