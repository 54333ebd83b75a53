"""Triton kernels of the step's two per-element passes (the optional ``gpu`` extra; work in
progress towards one fused GPU step, not yet used by :class:`~learned_opt.LearnedOptimizer`).

:func:`stats_pass` does, for one flat tensor, the fast path's first pass
(:func:`learned_opt.fast.tensor_statistics`): clip the gradient, update the accumulators in
place, and return the tensor's block rows (element count, sums, second moments centred on the
block's mean in float64, sums of squares of p and g: the form
:func:`learned_opt.fast.merge_rows` combines) and the column sums of squares of the MLP's
element columns. :func:`mlp_pass` does, for one flat tensor, what the fast path's second pass does with plain
PyTorch (:func:`learned_opt.fast.mlp_update`): clip the gradient, build the 23 element
columns, run the per-element MLP with the tensor's folded first layer (column scales in the
weights, per-tensor constants in the bias), apply ``p <- p * decay - lr * d * exp(rate * mag)``
in place, and return the sum over the elements of the last hidden layer (the messages' input).
Each program takes a block of elements; its partial sums go to their own row of a buffer that
is summed afterwards, so the result does not depend on scheduling. All arithmetic is float32
with IEEE dots (no TF32). Tested against the PyTorch path in Triton's interpreter
(``TRITON_INTERPRET=1``, on the CPU); on a GPU the same kernel compiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 64  # elements per program
DP = 8  # the decays, padded to a power of two


@triton.jit
def _stats_pass_kernel(g_ptr, p_ptr, m_ptr, v_ptr, n, D, amount, rms_eps, decays_ptr, rows_ptr, sq_ptr,
                       BLOCK: tl.constexpr, DP: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    ds = tl.arange(0, DP)
    ok_d = ds < D
    both = ok[:, None] & ok_d[None, :]
    b = tl.load(decays_ptr + ds, mask=ok_d, other=0.0)

    g = tl.load(g_ptr + rows, mask=ok, other=0.0)
    g = tl.minimum(tl.maximum(g, -amount), amount)
    p = tl.load(p_ptr + rows, mask=ok, other=0.0)
    m = tl.load(m_ptr + rows[:, None] * D + ds[None, :], mask=both, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * D + ds[None, :], mask=both, other=0.0)
    m = b[None, :] * m + (1 - b[None, :]) * g[:, None]
    v = b[None, :] * v + (1 - b[None, :]) * (g * g)[:, None]
    m = tl.where(both, m, 0.0)
    v = tl.where(both, v, 0.0)
    tl.store(m_ptr + rows[:, None] * D + ds[None, :], m, mask=both)
    tl.store(v_ptr + rows[:, None] * D + ds[None, :], v, mask=both)

    # float64 sums; second moments centred on this block's own means
    k = tl.sum(ok.to(tl.float64), axis=0)
    m64, v64, p64, g64 = m.to(tl.float64), v.to(tl.float64), p.to(tl.float64), g.to(tl.float64)
    sm, sv, sp = tl.sum(tl.sum(m64, axis=1), axis=0), tl.sum(tl.sum(v64, axis=1), axis=0), tl.sum(p64, axis=0)
    dm = tl.where(both, m - (sm / (k * D)).to(tl.float32), 0.0)
    dv = tl.where(both, v - (sv / (k * D)).to(tl.float32), 0.0)
    dp = tl.where(ok, p - (sp / k).to(tl.float32), 0.0)
    row = rows_ptr + pid * 9
    tl.store(row, k)
    tl.store(row + 1, sm)
    tl.store(row + 2, sv)
    tl.store(row + 3, sp)
    tl.store(row + 4, tl.sum(tl.sum((dm * dm).to(tl.float64), axis=1), axis=0))
    tl.store(row + 5, tl.sum(tl.sum((dv * dv).to(tl.float64), axis=1), axis=0))
    tl.store(row + 6, tl.sum((dp * dp).to(tl.float64), axis=0))
    tl.store(row + 7, tl.sum(p64 * p64, axis=0))
    tl.store(row + 8, tl.sum(g64 * g64, axis=0))

    # column sums of squares: g, p, log|p|, then m, v, m/sqrt(v + eps), 1/sqrt(v + eps) per decay
    inv = tl.where(both, 1.0 / (v + rms_eps), 0.0)
    lg = tl.where(ok, tl.log(tl.abs(p) + 1e-8), 0.0)
    out = sq_ptr + pid * E_PAD
    tl.store(out, tl.sum(g * g, axis=0))
    tl.store(out + 1, tl.sum(p * p, axis=0))
    tl.store(out + 2, tl.sum(lg * lg, axis=0))
    tl.store(out + 3 + ds, tl.sum(m * m, axis=0), mask=ok_d)
    tl.store(out + 3 + D + ds, tl.sum(v * v, axis=0), mask=ok_d)
    tl.store(out + 3 + 2 * D + ds, tl.sum(m * m * inv, axis=0), mask=ok_d)
    tl.store(out + 3 + 3 * D + ds, tl.sum(inv, axis=0), mask=ok_d)


def stats_pass(g, p, m, v, amount: float, rms_eps: float, decays):
    """The first pass over one flat float32 tensor: ``g``, ``p`` (n,) and the accumulators
    ``m``, ``v`` (n, D), updated in place. Returns the float64 block rows (blocks, 9) and each
    block's column sums of squares (blocks, E)."""
    n, D = p.numel(), m.shape[-1]
    if D > DP:
        raise ValueError(f"the Triton kernel takes at most {DP} decays, got {D}")
    if any(x.dtype != torch.float32 for x in (g, p, m, v)) or not (m.is_contiguous() and v.is_contiguous()):
        raise TypeError("the Triton kernel computes in float32 on contiguous accumulators")
    blocks = triton.cdiv(n, BLOCK)
    E = 3 + 4 * D
    rows = torch.empty(blocks, 9, dtype=torch.float64, device=p.device)
    sq = torch.empty(blocks, E, dtype=torch.float32, device=p.device)
    b = torch.as_tensor(decays, dtype=torch.float32, device=p.device)
    _stats_pass_kernel[(blocks,)](g.contiguous(), p.contiguous(), m, v, n, D, float(amount), float(rms_eps), b, rows, sq,
                                  BLOCK=BLOCK, DP=DP, E_PAD=E)
    return rows, sq


@triton.jit
def _mlp_pass_kernel(g_ptr, p_ptr, m_ptr, v_ptr, n, D, amount, rms_eps,
                     w0_ptr, b0_ptr, wh_ptr, bh_ptr, wdir_ptr, wmag_ptr, b_dir, b_mag,
                     rate, lr, decay, freeze, part_ptr,
                     BLOCK: tl.constexpr, DP: tl.constexpr, H: tl.constexpr, HIDDEN: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    ds = tl.arange(0, DP)
    ok_d = ds < D
    hs = tl.arange(0, H)
    both = ok[:, None] & ok_d[None, :]

    g = tl.load(g_ptr + rows, mask=ok, other=0.0)
    g = tl.minimum(tl.maximum(g, -amount), amount)
    p = tl.load(p_ptr + rows, mask=ok, other=0.0)
    m = tl.load(m_ptr + rows[:, None] * D + ds[None, :], mask=both, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * D + ds[None, :], mask=both, other=0.0)
    rs = tl.where(both, 1.0 / tl.sqrt(v + rms_eps), 0.0)

    # first layer: the columns g, p, log|p|, m, v, m/sqrt(v), 1/sqrt(v) against the rows of w0
    w_g = tl.load(w0_ptr + hs)
    w_p = tl.load(w0_ptr + H + hs)
    w_l = tl.load(w0_ptr + 2 * H + hs)
    h = g[:, None] * w_g[None, :] + p[:, None] * w_p[None, :] + tl.log(tl.abs(p) + 1e-8)[:, None] * w_l[None, :]
    w_m = tl.load(w0_ptr + (3 + ds[:, None]) * H + hs[None, :], mask=ok_d[:, None], other=0.0)
    w_v = tl.load(w0_ptr + (3 + D + ds[:, None]) * H + hs[None, :], mask=ok_d[:, None], other=0.0)
    w_s = tl.load(w0_ptr + (3 + 2 * D + ds[:, None]) * H + hs[None, :], mask=ok_d[:, None], other=0.0)
    w_r = tl.load(w0_ptr + (3 + 3 * D + ds[:, None]) * H + hs[None, :], mask=ok_d[:, None], other=0.0)
    h += tl.sum(m[:, :, None] * w_m[None, :, :], axis=1)
    h += tl.sum(v[:, :, None] * w_v[None, :, :], axis=1)
    h += tl.sum((m * rs)[:, :, None] * w_s[None, :, :], axis=1)
    h += tl.sum(rs[:, :, None] * w_r[None, :, :], axis=1)
    h = tl.maximum(h + tl.load(b0_ptr + hs)[None, :], 0.0)
    for i in tl.static_range(HIDDEN):  # the hidden layers
        w = tl.load(wh_ptr + i * H * H + hs[:, None] * H + hs[None, :])
        h = tl.maximum(tl.dot(h, w, input_precision="ieee") + tl.load(bh_ptr + i * H + hs)[None, :], 0.0)

    d = tl.sum(h * tl.load(wdir_ptr + hs)[None, :], axis=1) + b_dir
    mag = tl.sum(h * tl.load(wmag_ptr + hs)[None, :], axis=1) + b_mag
    if freeze:  # never a non-zero gradient: no step
        live = tl.sum(tl.where(v != 0.0, 1.0, 0.0), axis=1) > 0
        d = tl.where(live, d, 0.0)
    tl.store(p_ptr + rows, p * decay - lr * (d * tl.exp(rate * mag)), mask=ok)
    tl.store(part_ptr + pid * H + hs, tl.sum(tl.where(ok[:, None], h, 0.0), axis=0))


def mlp_pass(g, p, m, v, amount: float, rms_eps: float, w0s, bias0, hidden_w, hidden_b, w_dir, w_mag,
             b_dir: float, b_mag: float, rate: float, lr: float, decay: float, freeze: bool):
    """The MLP pass over one flat float32 tensor: ``g``, ``p`` (n,), accumulators ``m``, ``v``
    (n, D) already updated by the first pass, ``w0s`` (E, H) the tensor's first-layer rows with
    its column scales folded in, ``bias0`` (H,) its first-layer bias with the constants folded
    in, ``hidden_w``/``hidden_b`` the hidden layers' weights. Updates ``p`` in place; returns
    the sum of the last hidden layer over the elements, (H,)."""
    n, D = p.numel(), m.shape[-1]
    H = bias0.shape[0]
    if D > DP:
        raise ValueError(f"the Triton kernel takes at most {DP} decays, got {D}")
    if any(x.dtype != torch.float32 for x in (g, p, m, v, w0s, bias0)):
        raise TypeError("the Triton kernel computes in float32")
    blocks = triton.cdiv(n, BLOCK)
    part = torch.empty(blocks, H, dtype=torch.float32, device=p.device)
    if hidden_w:
        wh = torch.stack([w.contiguous() for w in hidden_w]).contiguous()
        bh = torch.stack([b.contiguous() for b in hidden_b]).contiguous()
    else:  # no hidden layer: the kernel's loop does not run
        wh = bh = torch.zeros(1, dtype=torch.float32, device=p.device)
    _mlp_pass_kernel[(blocks,)](g.contiguous(), p, m.contiguous(), v.contiguous(), n, D, float(amount), float(rms_eps),
                                w0s.contiguous(), bias0.contiguous(), wh, bh, w_dir.contiguous(), w_mag.contiguous(),
                                float(b_dir), float(b_mag), float(rate), float(lr), float(decay), bool(freeze), part,
                                BLOCK=BLOCK, DP=DP, H=H, HIDDEN=len(hidden_w))
    return part.sum(0)
