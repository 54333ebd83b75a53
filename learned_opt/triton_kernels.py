"""Triton kernels of the step's two per-element passes (the optional ``gpu`` extra; work in
progress towards one fused GPU step, used by the fast path with ``triton=True``).

Each pass is one launch over a **tensor table**: every tensor's elements are cut into blocks of
``BLOCK``, and program ``i`` looks up which tensor its block belongs to and that tensor's
addresses (an int64 table of data pointers), size and per-tensor values (lr, weight decay, the
MLP's folded first layer). Per-tensor scalars are read from device memory, so a launch needs no
host synchronisation. :func:`stats_pass_table` and :func:`mlp_pass_table` take lists of
tensors; :func:`stats_pass` and :func:`mlp_pass` are the same kernels on a table of one.

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


class _Table:
    """The tensor table of one launch: for flat float32 tensors of sizes ``numels``, which
    tensor each block of ``BLOCK`` elements belongs to (``owner``), the tensors' first blocks and
    sizes, and int64 tables of the data pointers of each list of tensors given to ``pointers``."""

    def __init__(self, numels, device):
        blocks = [triton.cdiv(n, BLOCK) for n in numels]
        self.n_blocks = sum(blocks)
        self.device = device
        self.owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32),
                                             torch.tensor(blocks, dtype=torch.int64)).to(device)
        first = [0]
        for b in blocks[:-1]:
            first.append(first[-1] + b)
        self.first = torch.tensor(first, dtype=torch.int32, device=device)
        self.numel = torch.tensor(list(numels), dtype=torch.int64, device=device)

    def pointers(self, tensors):
        return torch.tensor([x.data_ptr() for x in tensors], dtype=torch.int64, device=self.device)


@triton.jit
def _block(pid, owner_ptr, first_ptr, numel_ptr, BLOCK: tl.constexpr):
    """This program's tensor, the indices of its elements (int64) and their mask."""
    t = tl.load(owner_ptr + pid)
    j = pid - tl.load(first_ptr + t)
    n = tl.load(numel_ptr + t)
    rows = j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return t, rows, rows < n


@triton.jit
def _ptr(table, t):
    return tl.load(table + t).to(tl.pointer_type(tl.float32))


@triton.jit
def _stats_pass_kernel(g_tab, p_tab, m_tab, v_tab, owner_ptr, first_ptr, numel_ptr, D, amount_ptr, gscale_ptr,
                       rms_eps, decays_ptr, rows_ptr, sq_ptr, BLOCK: tl.constexpr, DP: tl.constexpr,
                       E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    t, rows, ok = _block(pid, owner_ptr, first_ptr, numel_ptr, BLOCK)
    g_ptr, p_ptr, m_ptr, v_ptr = _ptr(g_tab, t), _ptr(p_tab, t), _ptr(m_tab, t), _ptr(v_tab, t)
    amount = tl.load(amount_ptr)
    ds = tl.arange(0, DP)
    ok_d = ds < D
    both = ok[:, None] & ok_d[None, :]
    b = tl.load(decays_ptr + ds, mask=ok_d, other=0.0)

    g = tl.load(g_ptr + rows, mask=ok, other=0.0) * tl.load(gscale_ptr)
    g = tl.where(g == g, g, 0.0)  # a step held on the device reads its gradients times 0: inf * 0 is 0
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


def _check(tensors, what):
    if any(x.dtype != torch.float32 or not x.is_contiguous() for x in tensors):
        raise TypeError(f"the Triton kernel computes in float32 on contiguous {what}")


def _device_scalar(value, device):
    """A number or 1-element tensor (the clip amount, the gradients' scale factor) as a
    float32 (1,) tensor on ``device``, which the kernels read in device memory."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(1)


def stats_pass_table(gs, ps, ms, vs, amount, rms_eps: float, decays, grad_scale=None):
    """The first pass over flat float32 tensors, one launch for all: ``gs[i]``, ``ps[i]``
    (n_i,) and the accumulators ``ms[i]``, ``vs[i]`` (n_i, D), updated in place; ``amount``
    the clip (a number or a one-element tensor); every gradient is read times ``grad_scale`` (a
    number or one-element tensor; None: 1). Returns the float64 block rows (blocks, 9),
    each block's column sums of squares (blocks, E), and the index in the lists of each block's
    tensor (blocks,)."""
    D = ms[0].shape[-1]
    if D > DP:
        raise ValueError(f"the Triton kernel takes at most {DP} decays, got {D}")
    _check([*gs, *ps, *ms, *vs], "tensors")
    dev = ps[0].device
    table = _Table([p.numel() for p in ps], dev)
    E = 3 + 4 * D
    rows = torch.empty(table.n_blocks, 9, dtype=torch.float64, device=dev)
    sq = torch.empty(table.n_blocks, E, dtype=torch.float32, device=dev)
    b = torch.as_tensor(decays, dtype=torch.float32, device=dev)
    _stats_pass_kernel[(table.n_blocks,)](table.pointers(gs), table.pointers(ps), table.pointers(ms),
                                          table.pointers(vs), table.owner, table.first, table.numel, D,
                                          _device_scalar(amount, dev),
                                          _device_scalar(1.0 if grad_scale is None else grad_scale, dev),
                                          float(rms_eps), b, rows, sq,
                                          BLOCK=BLOCK, DP=DP, E_PAD=E)
    return rows, sq, table.owner.long()


def stats_pass(g, p, m, v, amount: float, rms_eps: float, decays):
    """The first pass over one flat float32 tensor: ``g``, ``p`` (n,) and the accumulators
    ``m``, ``v`` (n, D), updated in place. Returns the float64 block rows (blocks, 9) and each
    block's column sums of squares (blocks, E)."""
    rows, sq, _ = stats_pass_table([g], [p], [m], [v], amount, rms_eps, decays)
    return rows, sq


@triton.jit
def _mlp_pass_kernel(g_tab, p_tab, m_tab, v_tab, owner_ptr, first_ptr, numel_ptr, D, amount_ptr, gscale_ptr, rms_eps,
                     w0_ptr, b0_ptr, wh_ptr, bh_ptr, wdir_ptr, wmag_ptr, bout_ptr,
                     rate, lr_ptr, decay_ptr, freeze, part_ptr,
                     BLOCK: tl.constexpr, DP: tl.constexpr, H: tl.constexpr, E: tl.constexpr,
                     HIDDEN: tl.constexpr):
    pid = tl.program_id(0)
    t, rows, ok = _block(pid, owner_ptr, first_ptr, numel_ptr, BLOCK)
    g_ptr, p_ptr, m_ptr, v_ptr = _ptr(g_tab, t), _ptr(p_tab, t), _ptr(m_tab, t), _ptr(v_tab, t)
    amount = tl.load(amount_ptr)
    w0_ptr += t.to(tl.int64) * E * H  # this tensor's folded first layer and bias
    b0_ptr += t * H
    ds = tl.arange(0, DP)
    ok_d = ds < D
    hs = tl.arange(0, H)
    both = ok[:, None] & ok_d[None, :]

    g = tl.load(g_ptr + rows, mask=ok, other=0.0) * tl.load(gscale_ptr)
    g = tl.where(g == g, g, 0.0)  # a step held on the device reads its gradients times 0: inf * 0 is 0
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

    d = tl.sum(h * tl.load(wdir_ptr + hs)[None, :], axis=1) + tl.load(bout_ptr)
    mag = tl.sum(h * tl.load(wmag_ptr + hs)[None, :], axis=1) + tl.load(bout_ptr + 1)
    if freeze:  # never a non-zero gradient: no step
        live = tl.sum(tl.where(v != 0.0, 1.0, 0.0), axis=1) > 0
        d = tl.where(live, d, 0.0)
    lr, decay = tl.load(lr_ptr + t), tl.load(decay_ptr + t)
    tl.store(p_ptr + rows, p * decay - lr * (d * tl.exp(rate * mag)), mask=ok)
    tl.store(part_ptr + pid * H + hs, tl.sum(tl.where(ok[:, None], h, 0.0), axis=0))


def mlp_pass_table(gs, ps, ms, vs, amount, rms_eps: float, w0s, bias0, hidden_w, hidden_b, w_dir, w_mag,
                   b_out, rate: float, lr, decay, freeze: bool, grad_scale=None):
    """The MLP pass over flat float32 tensors, one launch for all: ``gs[i]``, ``ps[i]`` (n_i,),
    accumulators ``ms[i]``, ``vs[i]`` (n_i, D) already updated by the first pass; ``w0s`` (T, E,
    H) each tensor's first-layer rows with its column scales folded in, ``bias0`` (T, H) its
    first-layer bias with the constants folded in, ``hidden_w``/``hidden_b`` the hidden
    layers, ``w_dir``/``w_mag`` (H,) and ``b_out`` (2,) the two per-element outputs, ``lr`` and
    ``decay`` (T,) per tensor (tensors, or numbers for all); gradients read times ``grad_scale``
    (None: 1). Updates each ``ps[i]`` in place;
    returns each tensor's sum of the last hidden layer over its elements, (T, H)."""
    D = ms[0].shape[-1]
    T, E, H = w0s.shape
    if D > DP:
        raise ValueError(f"the Triton kernel takes at most {DP} decays, got {D}")
    if T != len(ps):
        raise ValueError(f"w0s holds {T} tensors' first layers for {len(ps)} tensors")
    _check([*gs, *ps, *ms, *vs], "tensors")
    _check([w0s, bias0], "weights")
    dev = ps[0].device
    table = _Table([p.numel() for p in ps], dev)
    part = torch.empty(table.n_blocks, H, dtype=torch.float32, device=dev)
    if hidden_w:
        wh = torch.stack([w.contiguous() for w in hidden_w]).contiguous()
        bh = torch.stack([b.contiguous() for b in hidden_b]).contiguous()
    else:  # no hidden layer: the kernel's loop does not run
        wh = bh = torch.zeros(1, dtype=torch.float32, device=dev)
    per_tensor = [torch.as_tensor(x, dtype=torch.float32, device=dev).reshape(-1).expand(T).contiguous()
                  for x in (lr, decay)]
    _mlp_pass_kernel[(table.n_blocks,)](table.pointers(gs), table.pointers(ps), table.pointers(ms),
                                        table.pointers(vs), table.owner, table.first, table.numel, D,
                                        _device_scalar(amount, dev),
                                        _device_scalar(1.0 if grad_scale is None else grad_scale, dev),
                                        float(rms_eps), w0s, bias0, wh, bh,
                                        w_dir.contiguous(), w_mag.contiguous(),
                                        torch.as_tensor(b_out, dtype=torch.float32, device=dev).contiguous(),
                                        float(rate), *per_tensor, bool(freeze), part,
                                        BLOCK=BLOCK, DP=DP, H=H, E=E, HIDDEN=len(hidden_w))
    return torch.zeros(T, H, dtype=torch.float32, device=dev).index_add_(0, table.owner.long(), part)


def mlp_pass(g, p, m, v, amount: float, rms_eps: float, w0s, bias0, hidden_w, hidden_b, w_dir, w_mag,
             b_dir: float, b_mag: float, rate: float, lr: float, decay: float, freeze: bool):
    """The MLP pass over one flat float32 tensor: ``g``, ``p`` (n,), accumulators ``m``, ``v``
    (n, D) already updated by the first pass, ``w0s`` (E, H) the tensor's first-layer rows with
    its column scales folded in, ``bias0`` (H,) its first-layer bias with the constants folded
    in, ``hidden_w``/``hidden_b`` the hidden layers' weights. Updates ``p`` in place; returns
    the sum of the last hidden layer over the elements, (H,)."""
    if any(x.dtype != torch.float32 for x in (g, p, m, v, w0s, bias0)):
        raise TypeError("the Triton kernel computes in float32")
    return mlp_pass_table([g], [p], [m.contiguous()], [v.contiguous()], amount, rms_eps,
                          w0s.contiguous().unsqueeze(0), bias0.contiguous().unsqueeze(0), hidden_w, hidden_b,
                          w_dir, w_mag, [b_dir, b_mag], rate, lr, decay, freeze)[0]
