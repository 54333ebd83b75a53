"""One learned-optimizer step for a whole population at once, without ``vmap``.

Meta-training runs ``M`` copies of a small task side by side, each member with its own
meta-weights. ``population_step`` is ``vmap(lopt_step)`` written out by hand: every input has
a leading member dimension (the layout ``torch.stack`` of the members' trees gives), and the
result equals ``lopt_step`` member by member to float rounding (tested against both the
vmapped step and a loop). Why not just ``vmap``? On CPU, small tasks are bound by operator
overhead and ``vmap`` turns the fast path's packing and segment sums into slow batched
gathers; here the Python loop is over the task's tensors (a handful), each operation covers
all members, and the per-element MLP is either one batched matmul per layer or, where the
compiled kernel of :mod:`learned_opt.native` is available (float32 on CPU, outside autograd),
that kernel called per member and tensor with the member's folded weights.

Inputs, for ``M`` members and ``T`` tensors:

* ``weights``: the meta-weights, each ``(M, *shape)``;
* ``params``, ``grads``: lists of ``(M, *shape_t)`` tensors;
* ``state``: an :class:`~learned_opt.functional.LOptState` whose fields carry the member
  dimension first (global scalars ``(M,)``, accumulators ``(M, *shape_t, D)``, ...);
* ``loss``: ``None`` or the members' training losses ``(M,)``.

It is functional: the inputs are not changed. The MLP's temporaries are bounded by
``chunk_rows`` rows (members x elements) per layer; the first pass, in its PyTorch form, makes
a few temporaries the size of the accumulators (meta-training tasks are small; the compiled
form makes none).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from . import native
from .config import ArchConfig
from .fast import _column_square_sums, combine_rows
from .features import (clip_amount, column_scale, element_columns, fold_first_layer, frozen_to_zero, gradient_factor, unit_rms_factor,
                       lstm_cell, lstm_statistics, tensor_constants, train_loss_statistics, update_clipper,
                       validation_feature)
from .state import LOptState, TensorState, check_architecture, compute_dtype

DEFAULT_CHUNK_ROWS = 1 << 16  # rows (members x elements) per chunk of the MLP pass

_BIASES = ("lstm_b", "to_mlp_b", "to_shared_b")


def population_step(weights: Dict[str, Tensor], params: Sequence[Tensor], grads: Sequence[Tensor],
                    state: LOptState, *, loss: Optional[Tensor] = None,
                    lr: Union[float, Sequence[float]] = 1e-3, cfg: Optional[ArchConfig] = None,
                    use_native: bool = True, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """``lopt_step`` for ``M`` members at once; returns ``(new_params, new_state)`` with the
    member dimension first. ``lr`` is a number or one number per tensor (shared by members)."""
    cfg = cfg or ArchConfig()
    check_architecture(weights, cfg)
    T = len(params)
    if len(grads) != T or len(state.tensors) != T:
        raise ValueError(f"got {T} params, {len(grads)} grads and {len(state.tensors)} states")
    if T == 0:
        return [], state
    Mb = params[0].shape[0]
    if any(x.shape[0] != Mb for x in list(params) + list(grads)):
        raise ValueError("every parameter and gradient needs the same leading member dimension")
    if any(x[0].numel() == 0 for x in params):
        raise ValueError("population_step does not take empty tensors")
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * T
    if len(lrs) != T:
        raise ValueError(f"lr has {len(lrs)} entries for {T} tensors")
    dt = compute_dtype(params)
    dev = params[0].device
    f64 = torch.float64
    D = cfg.n_decays
    L = cfg.mlp_layers
    w = {k: v.to(dt) for k, v in weights.items()}

    glob = state.glob
    if loss is None:
        train_feat = torch.zeros(Mb, dtype=f64, device=dev)
    else:
        glob, train_feat = train_loss_statistics(glob, loss.detach().to(dev, f64).reshape(Mb), cfg)
    valid_feat = validation_feature(glob, cfg)
    if cfg.scale_free:  # each member's gradients in units of its first one's RMS
        mean_sq = torch.stack([x.reshape(Mb, -1).to(f64).pow(2).mean(1) for x in grads]).mean(0)
        glob, factor = gradient_factor(glob, mean_sq, cfg)
        grads = [x * factor.to(dt).view(Mb, *([1] * (x.dim() - 1))) for x in grads]
    amount = clip_amount(glob, cfg).to(dt)  # (M,)
    amt = amount.unsqueeze(-1)

    # pass 1: clip, accumulators, per-tensor statistics and column mean squares
    kernel = _kernel(dt, dev, w) if use_native and not cfg.unit_rms_update else None
    b = torch.tensor(cfg.decays, dtype=dt, device=dev)
    one_b = 1 - b
    shapes = [x.shape[1:] for x in params]
    numels = [s.numel() for s in shapes]
    P, G, Mo, V, raws, sqs = [], [], [], [], [], []
    for t in range(T):
        p = params[t].reshape(Mb, -1).to(dt)
        g = grads[t].reshape(Mb, -1).to(dt)
        m = state.tensors[t].mom.reshape(Mb, -1, D).to(dt)
        v = state.tensors[t].rms.reshape(Mb, -1, D).to(dt)
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
    raw = torch.stack(raws, dim=1)  # (M, T, 8)
    n_t = torch.tensor(numels, dtype=dt, device=dev)
    scale = column_scale(torch.stack(sqs, dim=1) / n_t[:, None], cfg)  # (M, T, E)
    glob = update_clipper(glob, raw[..., 7] / n_t.to(raw.dtype), cfg)

    # the per-tensor LSTM, all members and tensors together
    wb = dict(w)
    for k in _BIASES:
        wb[k] = w[k].unsqueeze(1)
    stats = lstm_statistics(raw, shapes, train_feat, valid_feat, cfg).to(dt)
    from_mlp = torch.stack([s.from_mlp.to(dt) for s in state.tensors], dim=1)
    from_lstm = state.glob.from_lstm.to(dt).unsqueeze(1).expand(-1, T, -1)
    h = torch.stack([s.lstm_h.to(dt) for s in state.tensors], dim=1)
    c = torch.stack([s.lstm_c.to(dt) for s in state.tensors], dim=1)
    h, c = lstm_cell(wb, torch.cat([stats, from_mlp, from_lstm], dim=-1), h, c)
    to_mlp = h @ w["to_mlp_w"] + wb["to_mlp_b"]
    new_from_lstm = (h @ w["to_shared_w"] + wb["to_shared_b"]).mean(-2)

    # pass 2: the per-element MLP and the update, first layer folded per member and tensor
    consts = tensor_constants(state.glob.step, T, raw[..., 6].to(dt), numels, to_mlp)
    w0s, w0c = fold_first_layer(w["mlp_w0"], scale, cfg)  # (M, T, E, H), (M, C, H)
    bias0 = consts @ w0c + w["mlp_b0"].unsqueeze(1)  # (M, T, H)
    wl, bl = w[f"mlp_w{L}"], w[f"mlp_b{L}"]
    if kernel is not None:
        per_member = _member_weights(w, amount, cfg)
    new_p, hsums = [], []
    for t in range(T):
        lr_t = float(lrs[t])
        if kernel is not None:
            p_new, hs = _mlp_native(kernel, t, G[t], P[t], Mo[t], V[t], per_member, w0s, bias0, lr_t, cfg)
        else:
            p_new, hs = _mlp_torch(t, G[t], P[t], Mo[t], V[t], w, w0s, bias0, lr_t, cfg, chunk_rows)
        new_p.append(p_new)
        hsums.append(hs)
    hsum = torch.stack(hsums, dim=1)  # (M, T, H)
    messages = (hsum / n_t[:, None]) @ wl[..., 2:] + bl[:, None, 2:]

    out_p = [new_p[t].view(Mb, *shapes[t]).to(params[t].dtype) for t in range(T)]
    out_s = [TensorState(mom=Mo[t].view(Mb, *shapes[t], D), rms=V[t].view(Mb, *shapes[t], D),
                         lstm_h=h[:, t], lstm_c=c[:, t], from_mlp=messages[:, t]) for t in range(T)]
    glob = glob._replace(step=glob.step + 1, from_lstm=new_from_lstm.to(f64))
    return out_p, LOptState(glob, out_s)


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


def _mlp_torch(t, g, p, m, v, w, w0s, bias0, lr, cfg: ArchConfig, chunk_rows: int):
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
    return p - lr * step, hsum


def _kernel(dt, dev, w):
    """The compiled kernel where it can run this step: float32 on CPU, outside autograd."""
    if dt != torch.float32 or dev.type != "cpu" or torch.is_grad_enabled() or not native.enabled():
        return None
    if any(x.requires_grad for x in w.values()):
        return None
    return native.get()


def _member_weights(w, amount, cfg: ArchConfig):
    """The kernel's arguments that do not depend on the tensor, for all members."""
    L = cfg.mlp_layers
    wl, bl = w[f"mlp_w{L}"], w[f"mlp_b{L}"]
    return ([w[f"mlp_w{k}"].contiguous() for k in range(1, L)], [w[f"mlp_b{k}"].contiguous() for k in range(1, L)],
            wl[..., 0].contiguous(), wl[..., 1].contiguous(), bl[:, 0].tolist(), bl[:, 1].tolist(),
            amount.tolist())


def _mlp_native(kernel, t, g, p, m, v, per_member, w0s, bias0, lr, cfg: ArchConfig):
    """The compiled MLP pass (all members in one call), on a copy of the parameters (it
    updates them in place)."""
    hidden_w, hidden_b, w_dir, w_mag, b_dir, b_mag, amounts = per_member
    p_new = p.clone()
    hs = kernel.mlp_pass_members(g, p_new, m, v, amounts, cfg.rms_eps, w0s[:, t].contiguous(),
                                 bias0[:, t].contiguous(), hidden_w, hidden_b, w_dir, w_mag, b_dir, b_mag,
                                 cfg.magnitude_rate, lr, 1.0, cfg.freeze_untouched)
    return p_new, hs.to(p.dtype)
