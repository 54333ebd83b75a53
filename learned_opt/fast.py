"""Fast implementation: every tensor of the step handled together, in bounded chunks.

All tensors are laid end to end in one flat index space. Per-tensor reductions are segment
sums (``index_add`` with the tensor id of each element) over chunks of at most ``chunk_size``
elements, so no feature matrix is larger than ``chunk_size x 32`` whatever the model size.
Compared with :mod:`learned_opt.reference` it:

* folds the 31 per-tensor constant inputs into a per-tensor first-layer bias;
* computes only the two per-element outputs (direction, magnitude); the 16 message outputs
  are a linear map of the tensor mean of the last hidden layer, so they are obtained from
  that mean (exact by linearity);
* makes three cheap passes for statistics (means; centred variances and column scales)
  before the MLP pass.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Tuple

import torch
from torch import Tensor

from .config import ArchConfig
from .functional import element_columns

DEFAULT_CHUNK = 1 << 16


class _Work(NamedTuple):
    p: Tensor  # (N,)
    g: Tensor  # (N,) clipped
    m: Tensor  # (N, D) updated
    v: Tensor  # (N, D)
    shapes: List[torch.Size]
    numels: Tensor  # (T,)
    chunks: Tuple


@functools.lru_cache(maxsize=64)
def _chunk_plan(numels: Tuple[int, ...], chunk: int, device: str):
    """[(start, stop, tensor id of each element in [start, stop))] covering all elements."""
    total = sum(numels)
    ids, bounds, offsets = [], [], [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    for a in range(0, total, chunk):
        b = min(a + chunk, total)
        bounds.append((a, b))
    for a, b in bounds:
        # tensors overlapping [a, b)
        pieces, t = [], 0
        while offsets[t + 1] <= a:
            t += 1
        while t < len(numels) and offsets[t] < b:
            lo, hi = max(a, offsets[t]), min(b, offsets[t + 1])
            if hi > lo:
                pieces.append((t, hi - lo))
            t += 1
        seg = torch.repeat_interleave(torch.tensor([t for t, _ in pieces]),
                                      torch.tensor([k for _, k in pieces])).to(device)
        ids.append((a, b, seg))
    return tuple(ids)


def _flat(xs, tail=()):
    return torch.cat([x.reshape(-1, *tail) for x in xs])


def tensor_statistics(params, grads, mom, rms, amount, cfg: ArchConfig, chunk_size=None):
    chunk = chunk_size or DEFAULT_CHUNK
    D = cfg.n_decays
    p, g = _flat(params), _flat(grads)
    m, v = _flat(mom, (D,)), _flat(rms, (D,))
    dt, dev = p.dtype, p.device
    b = torch.tensor(cfg.decays, dtype=dt, device=dev)
    g = torch.clamp(g, -amount, amount)
    m = b * m + (1 - b) * g.unsqueeze(-1)
    v = b * v + (1 - b) * (g * g).unsqueeze(-1)

    numels = tuple(x.numel() for x in params)
    plan = _chunk_plan(numels, chunk, str(dev))
    T = len(numels)
    n = torch.tensor(numels, dtype=dt, device=dev)

    # statistics accumulate in float64, as in the reference (see there why)
    f64 = torch.float64
    n64 = n.to(f64)
    sums = torch.zeros(T, 5, dtype=f64, device=dev)
    for a, bb, seg in plan:
        pc, gc = p[a:bb].to(f64), g[a:bb].to(f64)
        vals = torch.stack([m[a:bb].to(f64).sum(-1), v[a:bb].to(f64).sum(-1), pc, pc * pc,
                            gc * gc], dim=-1)
        sums = sums.index_add(0, seg, vals)
    mean_m, mean_v, mean_p = sums[:, 0] / (n64 * D), sums[:, 1] / (n64 * D), sums[:, 2] / n64

    cent = torch.zeros(T, 3, dtype=f64, device=dev)
    for a, bb, seg in plan:
        vals = torch.stack([
            ((m[a:bb].to(f64) - mean_m[seg].unsqueeze(-1)) ** 2).sum(-1),
            ((v[a:bb].to(f64) - mean_v[seg].unsqueeze(-1)) ** 2).sum(-1),
            (p[a:bb].to(f64) - mean_p[seg]) ** 2,
        ], dim=-1)
        cent = cent.index_add(0, seg, vals)
    raw = torch.stack([mean_m, cent[:, 0] / (n64 * D), mean_v, cent[:, 1] / (n64 * D),
                       mean_p, cent[:, 2] / n64, sums[:, 3], sums[:, 4]], dim=-1)
    work = _Work(p, g, m, v, [x.shape for x in params], n, plan)
    return work, raw


def mlp_update(work: _Work, w, consts: Tensor, lrs, wds, cfg: ArchConfig, chunk_size=None):
    p, g, m, v, plan = work.p, work.g, work.m, work.v, work.chunks
    dt, dev = p.dtype, p.device
    T = consts.shape[0]
    E = cfg.n_element_cols
    L = cfg.mlp_layers

    # per-tensor scale of each element column: rsqrt(eps + mean(x^2))
    sq = torch.zeros(T, E, dtype=dt, device=dev)
    for a, b, seg in plan:
        cols = element_columns(g[a:b], p[a:b], m[a:b], v[a:b], cfg)
        sq = sq.index_add(0, seg, cols * cols)
    scale = torch.rsqrt(cfg.norm_eps + sq / work.numels.unsqueeze(-1))

    w0 = w["mlp_w0"]
    bias0 = consts @ w0[E:] + w["mlp_b0"]  # the constant inputs, folded into a bias
    w0 = w0[:E]
    wl, bl = w[f"mlp_w{L}"], w[f"mlp_b{L}"]
    lr = torch.stack([torch.as_tensor(x, dtype=dt, device=dev) for x in lrs])
    decay = 1 - lr * torch.stack([torch.as_tensor(x, dtype=dt, device=dev) for x in wds])

    hsum = torch.zeros(T, wl.shape[0], dtype=dt, device=dev)
    parts = []
    for a, b, seg in plan:
        cols = element_columns(g[a:b], p[a:b], m[a:b], v[a:b], cfg) * scale[seg]
        h = torch.relu(cols @ w0 + bias0[seg])
        for i in range(1, L):
            h = torch.relu(h @ w[f"mlp_w{i}"] + w[f"mlp_b{i}"])
        hsum = hsum.index_add(0, seg, h)
        out = h @ wl[:, :2] + bl[:2]
        step = lr[seg] * out[:, 0] * torch.exp(cfg.magnitude_rate * out[:, 1])
        parts.append(p[a:b] * decay[seg] - step)
    new_flat = torch.cat(parts) if len(parts) > 1 else parts[0]
    messages = (hsum / work.numels.unsqueeze(-1)) @ wl[:, 2:] + bl[2:]

    sizes = [int(k) for k in (s.numel() for s in work.shapes)]
    D = cfg.n_decays
    new_p = [x.view(s) for x, s in zip(new_flat.split(sizes), work.shapes)]
    new_m = [x.view(*s, D) for x, s in zip(m.split(sizes), work.shapes)]
    new_v = [x.view(*s, D) for x, s in zip(v.split(sizes), work.shapes)]
    return new_p, messages, new_m, new_v
