"""The two per-element passes of the step for a whole population at once, without ``vmap``.

Meta-training runs ``M`` copies of a small task side by side, each member with its own
meta-weights. :func:`learned_opt.functional.population_step` runs the same orchestration as
the drop-in step (:func:`~learned_opt.functional.lopt_step`) on inputs with a leading member
dimension, and this module supplies its two passes over the elements. Why not just ``vmap``
the drop-in step? On CPU, small tasks are bound by operator overhead and ``vmap`` turns the
fast path's packing and segment sums into slow batched gathers; here the Python loop is over
the task's tensors (a handful), each operation covers all members, and the per-element MLP is
either one batched matmul per layer or, where the compiled kernel of :mod:`learned_opt.native`
is available (float32 on CPU, outside autograd), that kernel called per member and tensor with
the member's folded weights.

It is functional: the inputs are not changed. The MLP's temporaries are bounded by
``chunk_rows`` rows (members x elements) per layer; the first pass, in its PyTorch form, makes
a few temporaries the size of the accumulators (meta-training tasks are small; the compiled
form makes none).
"""

from __future__ import annotations

from typing import List, NamedTuple

import torch
from torch import Tensor

from . import native
from .config import ArchConfig
from .fast import _column_square_sums, combine_rows
from .features import column_scale, element_columns, fold_first_layer, frozen_to_zero, unit_rms_factor

DEFAULT_CHUNK_ROWS = 1 << 16  # rows (members x elements) per chunk of the MLP pass


class _Work(NamedTuple):
    params: List[Tensor]  # (M, n) flat, compute dtype
    grads: List[Tensor]  # (M, n) clipped (unclipped where the kernel clips itself)
    mom: List[Tensor]  # (M, n, D) updated
    rms: List[Tensor]
    shapes: List[torch.Size]  # one member's shape of each tensor
    scale: Tensor  # (M, T, E) the element columns' per-tensor factors
    amount: Tensor  # (M,) clip bounds
    kernel: object  # the compiled kernel, or None


def tensor_statistics(params, grads, mom, rms, amount, cfg: ArchConfig, use_native: bool = True):
    """Pass 1 for every member: clip the gradients, update the accumulators, and return the
    work for pass 2 and the per-tensor statistics (M, T, 8), float64."""
    Mb = params[0].shape[0]
    dt, dev, D = params[0].dtype, params[0].device, cfg.n_decays
    kernel = _kernel(dt, dev) if use_native and not cfg.unit_rms_update else None
    b = torch.tensor(cfg.decays, dtype=dt, device=dev)
    one_b = 1 - b
    amt = amount.unsqueeze(-1)
    P, G, Mo, V, raws, sqs = [], [], [], [], [], []
    for p, g, m, v in zip(params, grads, mom, rms):
        p, g, m, v = p.reshape(Mb, -1), g.reshape(Mb, -1), m.reshape(Mb, -1, D), v.reshape(Mb, -1, D)
        if kernel is not None:  # g stays unclipped: both kernel passes clip it themselves
            g, p, m, v, raw_t, sq_t = _stats_native(kernel, g, p, m, v, amount, b, one_b, cfg)
        else:
            g, m, v, raw_t, sq_t = _stats_torch(g, p, m, v, amt, b, one_b, cfg)
        raws.append(raw_t)
        sqs.append(sq_t)
        P.append(p)
        G.append(g)
        Mo.append(m)
        V.append(v)
    shapes = [x.shape[1:] for x in params]
    n_t = torch.tensor([s.numel() for s in shapes], dtype=dt, device=dev)
    scale = column_scale(torch.stack(sqs, dim=1) / n_t[:, None], cfg)
    return _Work(P, G, Mo, V, shapes, scale, amount, kernel), torch.stack(raws, dim=1)


def mlp_update(work: _Work, w, consts: Tensor, lrs, wds, cfg: ArchConfig, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """Pass 2 for every member: the per-element MLP (first layer folded per member and
    tensor) and the update. Returns the new parameters (M, *shape), the messages (M, T, F) and
    the accumulators (M, *shape, D)."""
    Mb, L, D = consts.shape[0], cfg.mlp_layers, cfg.n_decays
    w0s, w0c = fold_first_layer(w["mlp_w0"], work.scale, cfg)  # (M, T, E, H), (M, C, H)
    bias0 = consts @ w0c + w["mlp_b0"].unsqueeze(1)  # (M, T, H)
    wl, bl = w[f"mlp_w{L}"], w[f"mlp_b{L}"]
    if work.kernel is not None:
        per_member = _member_weights(w, work.amount, cfg)
    new_p, hsums = [], []
    for t in range(len(work.params)):
        lr_t, keep = float(lrs[t]), 1.0 - float(lrs[t]) * float(wds[t])
        g, p, m, v = work.grads[t], work.params[t], work.mom[t], work.rms[t]
        if work.kernel is not None:
            p_new, hs = _mlp_native(work.kernel, t, g, p, m, v, per_member, w0s, bias0, lr_t, keep, cfg)
        else:
            p_new, hs = _mlp_torch(t, g, p, m, v, w, w0s, bias0, lr_t, keep, cfg, chunk_rows)
        new_p.append(p_new.view(Mb, *work.shapes[t]))
        hsums.append(hs)
    n_t = torch.tensor([s.numel() for s in work.shapes], dtype=consts.dtype, device=consts.device)
    messages = (torch.stack(hsums, dim=1) / n_t[:, None]) @ wl[..., 2:] + bl[:, None, 2:]
    new_m = [m.view(Mb, *s, D) for m, s in zip(work.mom, work.shapes)]
    new_v = [v.view(Mb, *s, D) for v, s in zip(work.rms, work.shapes)]
    return new_p, messages, new_m, new_v


def _stats_torch(g, p, m, v, amt, b, one_b, cfg: ArchConfig):
    """Pass 1 for one tensor of every member, in batched PyTorch operations: returns the
    clipped gradient, the new accumulators, the raw statistics (M, 8) and the column sums of
    squares (M, E)."""
    D = cfg.n_decays
    f64 = torch.float64
    n = p.shape[1]
    g = torch.clamp(g, -amt, amt)
    m = b * m + one_b * g.unsqueeze(-1)
    v = b * v + one_b * (g * g).unsqueeze(-1)
    mean_m = m.sum((1, 2), dtype=f64) / (n * D)
    mean_v = v.sum((1, 2), dtype=f64) / (n * D)
    mean_p = p.sum(1, dtype=f64) / n
    dm = m - mean_m.to(p.dtype)[:, None, None]
    dv = v - mean_v.to(p.dtype)[:, None, None]
    dp = p - mean_p.to(p.dtype)[:, None]
    raw = torch.stack([
        mean_m, (dm * dm).sum((1, 2), dtype=f64) / (n * D),
        mean_v, (dv * dv).sum((1, 2), dtype=f64) / (n * D),
        mean_p, (dp * dp).sum(1, dtype=f64) / n,
        (p * p).sum(1, dtype=f64), (g * g).sum(1, dtype=f64)], dim=-1)
    return g, m, v, raw, _column_square_sums(g, p, m, v, cfg)


def _stats_native(kernel, g, p, m, v, amount, b, one_b, cfg: ArchConfig):
    """Pass 1 with the compiled kernel (all members in one call), on copies of the
    accumulators (it updates them in place); its per-block rows are combined as in the fast
    path."""
    Mb, n = p.shape
    g, p = g.contiguous(), p.contiguous()
    m, v = m.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format)
    rows, sqs = kernel.stats_pass_members(g, p, m, v, amount.tolist(), b, one_b, cfg.rms_eps)
    blocks = rows.shape[1]
    idx = torch.arange(Mb).repeat_interleave(blocks)
    n64 = torch.full((Mb,), float(n), dtype=torch.float64)
    raw = combine_rows(rows.reshape(Mb * blocks, -1), idx, n64, cfg.n_decays)
    return g, p, m, v, raw, sqs.sum(1).to(p.dtype)


def _mlp_torch(t, g, p, m, v, w, w0s, bias0, lr, keep, cfg: ArchConfig, chunk_rows: int):
    """Batched matmuls over the members, in chunks of elements. g is already clipped."""
    Mb, n = p.shape
    L = cfg.mlp_layers
    wl, bl = w[f"mlp_w{L}"], w[f"mlp_b{L}"]
    rows = max(1, chunk_rows // Mb)
    outs, hsum = [], 0
    d_sq = d_n = torch.zeros(Mb, dtype=torch.float64, device=p.device)
    for a in range(0, n, rows):
        cols = element_columns(g[:, a:a + rows], p[:, a:a + rows], m[:, a:a + rows], v[:, a:a + rows], cfg)
        h = torch.baddbmm(bias0[:, t:t + 1], cols, w0s[:, t]).relu_()
        for i in range(1, L):
            h = torch.baddbmm(w[f"mlp_b{i}"].unsqueeze(1), h, w[f"mlp_w{i}"]).relu_()
        out = torch.bmm(h, wl[..., :2]) + bl[:, None, :2]
        d = out[..., 0]
        if cfg.freeze_untouched:
            d = frozen_to_zero(d, v[:, a:a + rows])
        outs.append(d * torch.exp(cfg.magnitude_rate * out[..., 1]))
        if cfg.unit_rms_update:
            live = (v[:, a:a + rows] != 0).any(-1) if cfg.freeze_untouched else torch.ones_like(d, dtype=torch.bool)
            d_sq = d_sq + (d * d).sum(1).double()
            d_n = d_n + live.sum(1).double()
        hsum = hsum + h.sum(1)
    step = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if cfg.unit_rms_update:  # each member's d / RMS(d) over this tensor
        step = step * unit_rms_factor(d_sq, d_n).to(step.dtype).unsqueeze(1)
    return p * keep - lr * step, hsum


def _kernel(dt, dev):
    """The compiled kernel where it can run this step: float32 on CPU, outside autograd."""
    if dt != torch.float32 or dev.type != "cpu" or torch.is_grad_enabled():
        return None
    return native.get()


def _member_weights(w, amount, cfg: ArchConfig):
    """The kernel's arguments that do not depend on the tensor, for all members."""
    L = cfg.mlp_layers
    wl, bl = w[f"mlp_w{L}"], w[f"mlp_b{L}"]
    return ([w[f"mlp_w{k}"].contiguous() for k in range(1, L)], [w[f"mlp_b{k}"].contiguous() for k in range(1, L)],
            wl[..., 0].contiguous(), wl[..., 1].contiguous(), bl[:, 0].tolist(), bl[:, 1].tolist(),
            amount.tolist())


def _mlp_native(kernel, t, g, p, m, v, per_member, w0s, bias0, lr, keep, cfg: ArchConfig):
    """The compiled MLP pass (all members in one call), on a copy of the parameters (it
    updates them in place)."""
    hidden_w, hidden_b, w_dir, w_mag, b_dir, b_mag, amounts = per_member
    p_new = p.clone()
    hs = kernel.mlp_pass_members(g, p_new, m, v, amounts, cfg.rms_eps, w0s[:, t].contiguous(),
                                 bias0[:, t].contiguous(), hidden_w, hidden_b, w_dir, w_mag, b_dir, b_mag,
                                 cfg.magnitude_rate, lr, keep, cfg.freeze_untouched)
    return p_new, hs.to(p.dtype)
