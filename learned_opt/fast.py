"""Fast implementation of the two per-element passes, tested equal to :mod:`learned_opt.reference`.

Work is cut into chunks of at most ``chunk_size`` elements, so no temporary is larger than
``chunk_size x 32`` values whatever the model size:

* a *large* tensor (at least ``min(chunk_size, SMALL)`` elements) is walked in chunks of its
  own flat view; per-tensor reductions are plain sums and per-tensor values broadcast, so the
  hot loop has no gather or scatter;
* all *small* tensors (biases, norms, ...) are packed end to end and walked together; their
  per-tensor reductions are segment sums (``index_add``) over the tensor id of each element.

The Python loop is over chunks, not over tensors or elements. Compared with the reference it:

* folds each tensor's column normalisation into its own copy of the first-layer weights and
  the 31 per-tensor constant inputs into its first-layer bias (``addmm`` with a bias row);
* computes only the two per-element outputs (direction, magnitude); the 16 message outputs
  are a linear map of the tensor mean of the last hidden layer, so they come from that mean
  (exact by linearity);
* with ``inplace=True`` (what :class:`~learned_opt.LearnedOptimizer` uses) updates the
  accumulators and the parameters in place, chunk by chunk, so the only memory beyond the
  state is one chunk's temporaries. The functional default (used under ``vmap`` by
  meta-training) returns new tensors.

In the in-place path on CPU (float32, outside autograd) whole large tensors go instead to a
compiled kernel, :mod:`learned_opt.native` (``csrc/mlp_pass.cpp``), which fuses each pass into
one sweep with no temporaries of the tensor's size; it is built on first use and the code
below is its fallback where no compiler works (``LEARNED_OPT_NATIVE=0`` forces the fallback).

Two passes read the accumulators: the first updates them and takes the per-tensor statistics
(float64 sums, second moments centred per chunk and combined across chunks, and the mean
square of every MLP column); the second runs the MLP and the update.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import native
from .config import ArchConfig
from .features import column_scale, element_columns, fold_first_layer, frozen_to_zero, unit_rms_factor

DEFAULT_CHUNK = 1 << 14
# On a GPU the step is bound by kernel launches, not by memory traffic, so it takes fewer,
# larger chunks: on an H100, 10M parameters, 783 ms at 2^14 elements, 86 ms at 2^18, 69 ms at
# 2^20 (benchmarks/results/chunk_sweep-cuda.json); transient memory then stays under ~300 MB.
DEFAULT_CHUNK_CUDA = 1 << 20
SMALL = 4096  # tensors with fewer elements than this (or than the chunk) are packed together


def default_chunk(device: torch.device) -> int:
    return DEFAULT_CHUNK_CUDA if device.type == "cuda" else DEFAULT_CHUNK


class _Plan(NamedTuple):
    large: Tuple[Tuple[int, int, int], ...]  # (tensor, start, stop) chunks of large tensors
    small: Tuple[int, ...]  # ids of the packed tensors, in pack order
    # (start, stop, tensor id per element, ids of the tensors present) of chunks of the pack
    packed: Tuple[Tuple[int, int, Tensor, Tensor], ...]


@functools.lru_cache(maxsize=64)
def _plan(numels: Tuple[int, ...], chunk: int, device: str) -> _Plan:
    cut = min(chunk, SMALL)
    large, small = [], []
    for t, n in enumerate(numels):
        if n >= cut:
            large.extend((t, a, min(a + chunk, n)) for a in range(0, n, chunk))
        else:
            small.append(t)
    ids = torch.repeat_interleave(torch.tensor(small, dtype=torch.long),
                                  torch.tensor([numels[t] for t in small], dtype=torch.long))
    packed = tuple((a, min(a + chunk, len(ids)), ids[a:a + chunk].to(device),
                    torch.unique_consecutive(ids[a:a + chunk]).to(device))
                   for a in range(0, len(ids), chunk))
    return _Plan(tuple(large), tuple(small), packed)


class _Work(NamedTuple):
    p: List[Tensor]  # flat views (large tensors); entry of a small tensor unused
    g: List[Tensor]  # flat, unclipped
    m: List[Tensor]  # (n, D), updated
    v: List[Tensor]
    pack: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]  # packed p, g, m, v of small tensors
    amount: Tensor
    shapes: List[torch.Size]
    numels: Tensor  # (T,)
    plan: _Plan
    scale: Tensor  # (T, E) column scales
    inplace: bool
    originals: Tuple[List[Tensor], List[Tensor], List[Tensor]]  # params, mom, rms as given
    native: frozenset  # large tensors whose first pass ran in a kernel (the compiled CPU one or Triton)
    kernel: str  # which: "native", "triton" or ""
    grad_scale: Optional[Tensor]  # () factor the gradients are read with (scale_free), None: 1
    # () bool on the device, or None: True holds everything as it is (a step skipped on the
    # device for a non-finite gradient, without a host synchronisation): decays 1, lr 0, and the
    # gradients (read times a grad_scale of 0) sanitised to 0
    hold: Optional[Tensor] = None


def _chunks(work_or_lists, plan: _Plan):
    """Yield (tensor or None, (seg, present) or None, p, g, m, v) for every chunk, large
    tensors first."""
    p, g, m, v, pack = work_or_lists
    for t, a, b in plan.large:
        yield t, None, p[t][a:b], g[t][a:b], m[t][a:b], v[t][a:b]
    if pack is not None:
        pp, pg, pm, pv = pack
        for a, b, seg, present in plan.packed:
            yield None, (seg, present), pp[a:b], pg[a:b], pm[a:b], pv[a:b]


def _reduce(rows: List[Tensor], ids: List, T: int, like: Tensor) -> Tensor:
    """Sum per-chunk rows into (T, k): a row per large chunk (id = its tensor) and a (T, k)
    block per packed chunk (id None)."""
    k = rows[0].shape[-1]
    out = torch.zeros(T, k, dtype=like.dtype, device=like.device)
    singles = [r for r, i in zip(rows, ids) if i is not None]
    if singles:
        idx = torch.tensor([i for i in ids if i is not None], dtype=torch.long, device=like.device)
        out = out.index_add(0, idx, torch.stack(singles))
    for r, i in zip(rows, ids):
        if i is None:
            out = out + r
    return out


def _column_square_sums(g: Tensor, p: Tensor, m: Tensor, v: Tensor, cfg: ArchConfig) -> Tensor:
    """Column sums of ``element_columns(g, p, m, v) ** 2`` without building the (n, 23) matrix
    (the first pass needs only these): (m * rsqrt(v + eps))^2 = m^2 / (v + eps), and so on.
    g, p are (..., n) and m, v (..., n, D); leading dimensions (a population's) are kept."""
    inv = torch.reciprocal(v + cfg.rms_eps)
    lg = torch.log(p.abs() + 1e-8)
    mm = m * m
    return torch.cat([torch.stack([(g * g).sum(-1), (p * p).sum(-1), (lg * lg).sum(-1)], -1),
                      mm.sum(-2), (v * v).sum(-2), (mm * inv).sum(-2), inv.sum(-2)], -1)


def _values(xs, dt, dev) -> Tensor:
    """Per-tensor hyperparameters (numbers or 0-d tensors) as one vector."""
    if all(isinstance(x, (int, float)) for x in xs):
        return torch.tensor(xs, dtype=dt, device=dev)
    return torch.stack([torch.as_tensor(x, dtype=dt, device=dev) for x in xs])


def _join(parts: List[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def tensor_statistics(params, grads, mom, rms, amount, cfg: ArchConfig, chunk_size=None,
                      inplace: bool = False, shard: Optional[Sharding] = None, use_native: bool = True,
                      use_triton: bool = False, grad_scale: Optional[Tensor] = None,
                      hold: Optional[Tensor] = None):
    """The first pass. ``grad_scale`` (a 0-d tensor, or None for 1): every gradient is read
    multiplied by it, chunk by chunk or inside the kernels, so that no scaled copy of all the
    gradients is made (``ArchConfig.scale_free``). ``hold`` (see ``_Work``): the caller also
    passes a ``grad_scale`` of 0 where it is True; the accumulators are then rewritten with
    their own values."""
    dev, dt = params[0].device, params[0].dtype
    chunk = chunk_size or default_chunk(dev)
    D = cfg.n_decays
    T = len(params)
    f64 = torch.float64
    numels = tuple(x.numel() for x in params)
    plan = _plan(numels, chunk, str(dev))
    b = torch.tensor(cfg.decays, dtype=dt, device=dev)
    if hold is not None:  # decays of 1 keep every accumulator exactly: 1 * m + 0 * 0
        b = torch.where(hold, torch.ones_like(b), b)
        use_native = False  # the compiled CPU kernel reads its scalars on the host
    one_b = 1 - b
    n = torch.tensor(numels, dtype=dt, device=dev)
    n64 = n.to(f64)

    P = [x.reshape(-1) for x in params]
    G = [x.reshape(-1) for x in grads]
    M = [x.reshape(-1, D) for x in mom]
    V = [x.reshape(-1, D) for x in rms]
    pack = None
    if plan.small:
        pack = tuple(torch.cat([L[t] for t in plan.small]) for L in (P, G, M, V))

    # pass A: clip, update the accumulators, first moments (float64, as in the reference)
    large = {c[0] for c in plan.large}
    # in place only where the flat views really alias the state (reshape may have copied);
    # otherwise (always under vmap) new accumulators are built chunk by chunk
    in_place = inplace and all(M[t].data_ptr() == mom[t].data_ptr() and V[t].data_ptr() == rms[t].data_ptr()
                               for t in large)
    new_m, new_v = {t: [] for t in large}, {t: [] for t in large}
    pack_m, pack_v = [], []
    rows, sqs, ids = [], [], []
    # the compiled kernel takes whole large tensors where it can; its rows are per block of
    # elements, combined below exactly like the chunks' rows
    native_t, kind = set(), ""
    if not cfg.unit_rms_update:
        native_t, kind = _triton_ok(P, G, M, V, large, in_place, use_triton), "triton"
        if not native_t:
            native_t, kind = _native_ok(P, G, M, V, large, in_place, use_native), "native"
    if native_t and kind == "triton":  # one launch for all of them (a tensor table)
        from . import triton_kernels
        order = sorted(native_t)
        r, q, owner = triton_kernels.stats_pass_table([G[t] for t in order], [P[t] for t in order],
                                                      [M[t] for t in order], [V[t] for t in order],
                                                      amount, cfg.rms_eps, cfg.decays if hold is None else b,
                                                      grad_scale=grad_scale)
        rows.append(r)
        sqs.append(q.to(dt))
        ids.append(torch.tensor(order, dtype=torch.long, device=dev).index_select(0, owner))
    elif native_t:
        amt = float(amount)
        gs = 1.0 if grad_scale is None else float(grad_scale)
        kernel = native.get(wait=False)
        for t in sorted(native_t):
            r, q = kernel.stats_pass(G[t], P[t], M[t], V[t], amt, b, one_b, cfg.rms_eps, gs)
            rows.append(r)
            sqs.append(q.to(dt))
            ids.append(torch.full((r.shape[0],), t, dtype=torch.long, device=dev))
    for t, seg, p, g, m, v in _chunks((P, G, M, V, pack), plan):
        if t in native_t:
            continue
        if grad_scale is not None:
            g = g * grad_scale.to(dt)
        if hold is not None:  # a held step reads inf * 0 or nan as 0
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        g = torch.clamp(g, -amount, amount)
        # the same operations as the reference, rounding included: a mean of m that nearly
        # cancels makes the log|mean| statistic sensitive to the last bit (no fused addcmul)
        if in_place and seg is None:
            m = m.mul_(b).add_(one_b * g.unsqueeze(-1))
            v = v.mul_(b).add_(one_b * (g * g).unsqueeze(-1))
        else:
            m = b * m + one_b * g.unsqueeze(-1)
            v = b * v + one_b * (g * g).unsqueeze(-1)
            (new_m[t] if seg is None else pack_m).append(m)
            (new_v[t] if seg is None else pack_v).append(v)
        # float64 statistics of this chunk: sums, and second moments centred on the chunk's
        # own mean (combined across chunks below, so no second pass over the accumulators)
        if seg is None:
            # sums accumulate in float64 straight from the working dtype (no float64 copies of
            # the chunk); the deviations from the chunk mean are small, so their squares are
            # taken in the working dtype and summed in float64
            k = p.shape[0]
            sm, sv, sp = m.sum(dtype=f64), v.sum(dtype=f64), p.sum(dtype=f64)
            dm, dv, dp = m - (sm / (k * D)).to(dt), v - (sv / (k * D)).to(dt), p - (sp / k).to(dt)
            rows.append(torch.stack([sm.new_tensor(k), sm, sv, sp, (dm * dm).sum(dtype=f64),
                                     (dv * dv).sum(dtype=f64), (dp * dp).sum(dtype=f64),
                                     (p * p).sum(dtype=f64), (g * g).sum(dtype=f64)]).unsqueeze(0))
            sqs.append(_column_square_sums(g, p, m, v, cfg).unsqueeze(0))
            ids.append(torch.tensor([t], device=dev))
        else:
            m64, v64, p64, g64 = m.to(f64), v.to(f64), p.to(f64), g.to(f64)
            seg, present = seg
            ones = torch.ones_like(p64)
            first = torch.zeros(T, 4, dtype=f64, device=dev).index_add(
                0, seg, torch.stack([ones, m64.sum(-1), v64.sum(-1), p64], dim=-1))
            k = first[:, 0].clamp_min(1)
            cm, cv, cp = first[:, 1] / (k * D), first[:, 2] / (k * D), first[:, 3] / k
            dm = m64 - cm.index_select(0, seg).unsqueeze(-1)
            dv = v64 - cv.index_select(0, seg).unsqueeze(-1)
            dp = p64 - cp.index_select(0, seg)
            second = torch.zeros(T, 5, dtype=f64, device=dev).index_add(
                0, seg, torch.stack([(dm * dm).sum(-1), (dv * dv).sum(-1), dp * dp, p64 * p64,
                                     g64 * g64], dim=-1))
            rows.append(torch.cat([first, second], dim=-1).index_select(0, present))
            cols = element_columns(g, p, m, v, cfg)
            sqs.append(torch.zeros(T, cols.shape[-1], dtype=dt, device=dev)
                       .index_add(0, seg, cols * cols).index_select(0, present))
            ids.append(present)
    if not in_place:
        M = [_join(new_m[i]) if i in large else x for i, x in enumerate(M)]
        V = [_join(new_v[i]) if i in large else x for i, x in enumerate(V)]
    if pack is not None:
        pack = (pack[0], pack[1], _join(pack_m), _join(pack_v))

    if not rows:  # this rank holds no element of any tensor (a sharded run)
        rows, sqs = [torch.zeros(0, 9, dtype=f64, device=dev)], [torch.zeros(0, cfg.n_element_cols, dtype=dt, device=dev)]
        ids = [torch.zeros(0, dtype=torch.long, device=dev)]
    idx = torch.cat(ids)
    R = torch.cat(rows)
    sq = torch.zeros(T, cfg.n_element_cols, dtype=dt, device=dev).index_add(0, idx, torch.cat(sqs))
    if shard is not None:  # the whole tensors' statistics from every rank's pieces
        R, idx, sq = _gather_shards(R, idx, sq, T, D, shard)
        sq = sq.to(dt)
        n64 = torch.tensor([s.numel() for s in shard.full_shapes], dtype=f64, device=dev)
        n = n64.to(dt)
    raw = combine_rows(R, idx, n64, D)
    scale = column_scale(sq / n.unsqueeze(-1), cfg)
    work = _Work(P, G, M, V, pack, amount, [x.shape for x in params], n, plan, scale, inplace,
                 (list(params), list(mom), list(rms)), frozenset(native_t), kind if native_t else "", grad_scale,
                 hold)
    return work, raw


def merge_rows(R: Tensor, idx: Tensor, T: int, D: int) -> Tensor:
    """Float64 rows of blocks of elements, row j belonging to tensor ``idx[j]``, merged into one
    row per tensor of the same form. A row is (elements, sum m, sum v, sum p, sums of squares of
    m, v, p centred on the row's own means, sum p^2, sum g^2). Sums add; centred moments add
    plus each block's n (mean_block - mean)^2. Rows of no elements add nothing."""
    tot = torch.zeros(T, R.shape[1], dtype=R.dtype, device=R.device).index_add(0, idx, R)
    n = tot[:, 0].clamp_min(1)
    mean_m, mean_v, mean_p = tot[:, 1] / (n * D), tot[:, 2] / (n * D), tot[:, 3] / n
    kc = R[:, 0].clamp_min(1)
    shift = torch.stack([
        D * kc * (R[:, 1] / (kc * D) - mean_m[idx]) ** 2,
        D * kc * (R[:, 2] / (kc * D) - mean_v[idx]) ** 2,
        kc * (R[:, 3] / kc - mean_p[idx]) ** 2], dim=-1) * (R[:, :1] > 0)
    cent = tot[:, 4:7] + torch.zeros(T, 3, dtype=R.dtype, device=R.device).index_add(0, idx, shift)
    return torch.cat([tot[:, :4], cent, tot[:, 7:]], dim=-1)


def combine_rows(R: Tensor, idx: Tensor, n64: Tensor, D: int) -> Tensor:
    """The (T, 8) raw statistics (mean and variance of m, of v, of p, then the sums of squares
    of p and of g) from rows of blocks (:func:`merge_rows`) of tensors of ``n64`` elements."""
    tot = merge_rows(R, idx, n64.shape[0], D)
    return torch.stack([tot[:, 1] / (n64 * D), tot[:, 4] / (n64 * D), tot[:, 2] / (n64 * D), tot[:, 5] / (n64 * D),
                        tot[:, 3] / n64, tot[:, 6] / n64, tot[:, 7], tot[:, 8]], dim=-1)


class Sharding(NamedTuple):
    """Parameters sharded over the ranks of ``group`` (FSDP2, tensor parallel): each rank holds
    a piece of every tensor marked in ``sharded`` (the others are whole on every rank), and the
    per-tensor statistics are reduced over the group from the pieces."""
    group: object  # a torch.distributed ProcessGroup
    full_shapes: Tuple[torch.Size, ...]
    sharded: Tuple[bool, ...]

    def mine(self, dt, dev) -> Tensor:
        """(T, 1): 1 for the tensors whose contribution from this rank counts (its piece of a
        sharded tensor; a whole tensor counts on rank 0 only)."""
        import torch.distributed as dist

        rank0 = dist.get_rank(self.group) == 0
        return torch.tensor([[1.0 if s or rank0 else 0.0] for s in self.sharded], dtype=dt, device=dev)

    def sum(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x


def _gather_shards(R, idx, sq, T: int, D: int, shard: Sharding):
    """One collective for all tensors: every rank's merged rows and column square sums, from
    which every rank computes the statistics of the whole tensors."""
    import torch.distributed as dist

    mine = shard.mine(R.dtype, R.device)
    local = torch.cat([merge_rows(R, idx, T, D), sq.to(R.dtype)], dim=-1) * mine
    world = dist.get_world_size(shard.group)
    out = torch.empty(world * T, local.shape[1], dtype=local.dtype, device=local.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (the new name, torch >= 2.12)
    gather(out, local.contiguous(), group=shard.group)
    rows = out[:, :9]
    idx = torch.arange(T, device=R.device).repeat(world)
    return rows, idx, out[:, 9:].reshape(world, T, -1).sum(0)


def _triton_ok(P, G, M, V, large, in_place: bool, allowed: bool) -> set:
    """The large tensors the Triton kernels take where they are asked for: in place, outside
    autograd, float32 contiguous tensors on a GPU (or anywhere under Triton's interpreter)."""
    if not (allowed and in_place and large) or torch.is_grad_enabled():
        return set()
    import os

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return {t for t in large if (P[t].device.type == "cuda" or interpreted)
            and all(x.dtype == torch.float32 and x.is_contiguous() for x in (P[t], G[t], M[t], V[t]))}


def _native_ok(P, G, M, V, large, in_place: bool, allowed: bool) -> set:
    """The large tensors the compiled kernel can take: where ``allowed``, only in the in-place
    path (never under ``vmap`` or autograd), float32 contiguous CPU tensors, and only where the
    kernel built."""
    if not (allowed and in_place and large) or torch.is_grad_enabled():
        return set()
    ok = {t for t in large if P[t].dtype == torch.float32 and P[t].device.type == "cpu"
          and all(x.dtype == torch.float32 and x.is_contiguous() for x in (P[t], G[t], M[t], V[t]))}
    if not ok or native.get(wait=False) is None:
        return set()
    return ok


def mlp_update(work: _Work, w, consts: Tensor, lrs, wds, cfg: ArchConfig, chunk_size=None,
               shard: Optional[Sharding] = None):
    plan = work.plan
    P, G, M, V = work.p, work.g, work.m, work.v
    dt, dev = consts.dtype, consts.device
    T = consts.shape[0]
    E = cfg.n_element_cols
    L = cfg.mlp_layers
    D = cfg.n_decays

    w0 = w["mlp_w0"]
    w0s, w0c = fold_first_layer(w0, work.scale, cfg)  # (T, E, H): the column scales, folded into weights
    bias0 = consts @ w0c + w["mlp_b0"]  # (T, H): the constant inputs, folded into a bias
    wl, bl = w[f"mlp_w{L}"], w[f"mlp_b{L}"]
    # the two per-element outputs as two matrix-vector products: a (n, 32) x (32, 2) matmul
    # runs several times slower than two gemv calls on CPU
    w_dir, w_mag = wl[:, 0].contiguous(), wl[:, 1].contiguous()
    b_dir, b_mag = bl[0], bl[1]
    lr = _values(lrs, dt, dev)
    if work.hold is not None:  # lr 0 and decay 1: p * 1 - 0 * step is p exactly
        lr = torch.where(work.hold, torch.zeros_like(lr), lr)
    decay = 1 - lr * _values(wds, dt, dev)
    rate = cfg.magnitude_rate
    large = {c[0] for c in plan.large}
    write_p = work.inplace and all(P[t].data_ptr() == work.originals[0][t].data_ptr() for t in large)
    new_large = {t: [] for t in large} if not write_p else None

    hsums, ids = [], []
    pack_parts = []
    # the compiled kernel takes whole large tensors where it can (in place, float32 on CPU)
    # (the same tensors as in the first pass, where the parameters are written in place and
    # the meta-weights are float32 on the CPU too)
    native_t = set()
    if write_p and all(x.dtype == torch.float32 and (x.device.type == "cpu" or work.kernel == "triton")
                       for x in w.values()):
        native_t = work.native
    hidden_w = [w[f"mlp_w{i}"].contiguous() for i in range(1, L)]
    hidden_b = [w[f"mlp_b{i}"].contiguous() for i in range(1, L)]
    if native_t and work.kernel == "triton":  # one launch for all of them (a tensor table)
        from . import triton_kernels
        order = sorted(native_t)
        sel = torch.tensor(order, dtype=torch.long, device=dev)
        hs = triton_kernels.mlp_pass_table([G[t] for t in order], [P[t] for t in order], [M[t] for t in order],
                                           [V[t] for t in order], work.amount, cfg.rms_eps,
                                           w0s.index_select(0, sel).contiguous(), bias0.index_select(0, sel).contiguous(),
                                           hidden_w, hidden_b, w_dir, w_mag, bl[:2], rate, lr.index_select(0, sel),
                                           decay.index_select(0, sel), cfg.freeze_untouched, grad_scale=work.grad_scale)
        hsums.append(torch.zeros(T, hs.shape[-1], dtype=dt, device=dev).index_copy(0, sel, hs.to(dt)))
        ids.append(None)
    elif native_t:
        kernel = native.get()
        amount = float(work.amount)
        gs = 1.0 if work.grad_scale is None else float(work.grad_scale)
        for t in sorted(native_t):
            hs = kernel.mlp_pass(G[t], P[t], M[t], V[t], amount, cfg.rms_eps, w0s[t].contiguous(),
                                 bias0[t].contiguous(), hidden_w, hidden_b, w_dir, w_mag, float(b_dir),
                                 float(b_mag), rate, float(lr[t]), float(decay[t]), cfg.freeze_untouched, gs)
            hsums.append(hs.to(dt))
            ids.append(t)
    def apply(t, seg, p, step):
        if seg is None:
            if write_p:
                p.mul_(decay[t]).sub_(lr[t] * step)
            else:
                new_large[t].append(p * decay[t] - lr[t] * step)
        else:
            pack_parts.append(p * decay.index_select(0, seg) - lr.index_select(0, seg) * step)

    # ArchConfig.unit_rms_update: per-tensor sums of d^2 and counts of elements that may move
    if cfg.unit_rms_update:
        d_sq = torch.zeros(T, dtype=torch.float64, device=dev)
        d_n = torch.zeros(T, dtype=torch.float64, device=dev)
    deferred = []
    for t, seg, p, g, m, v in _chunks((P, G, M, V, work.pack), plan):
        if t in native_t:
            continue
        seg = None if seg is None else seg[0]
        if work.grad_scale is not None:
            g = g * work.grad_scale.to(dt)
        if work.hold is not None:
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        cols = element_columns(torch.clamp(g, -work.amount, work.amount), p, m, v, cfg)
        if seg is None:
            h = torch.addmm(bias0[t], cols, w0s[t]).relu_()
        else:
            h = (cols * work.scale.index_select(0, seg)) @ w0[:E]
            if cfg.dual_snr:  # the unscaled copies of the m/sqrt(v) columns
                a, b = cfg.snr_column_range
                h = h.addmm_(cols[:, a:b], w0[E + cfg.n_const_cols:])
            h = h.add_(bias0.index_select(0, seg)).relu_()
        for i in range(1, L):
            h = torch.addmm(w[f"mlp_b{i}"], h, w[f"mlp_w{i}"]).relu_()
        d = torch.mv(h, w_dir) + b_dir
        if cfg.freeze_untouched:
            d = frozen_to_zero(d, v)
        step = d * torch.exp(rate * (torch.mv(h, w_mag) + b_mag))
        if seg is None:
            hsums.append(h.sum(0))
            ids.append(t)
        else:
            hsums.append(torch.zeros(T, h.shape[-1], dtype=dt, device=dev).index_add(0, seg, h))
            ids.append(None)
        if cfg.unit_rms_update:  # the update waits for the RMS of d over the whole tensor
            live = ((v != 0).any(-1) if cfg.freeze_untouched else torch.ones_like(d, dtype=torch.bool)).to(d_n.dtype)
            sq = (d * d).to(d_sq.dtype)
            if seg is None:  # one tensor: add its chunk's sums at index t
                where, sq, live = torch.tensor([t], device=dev), sq.sum().reshape(1), live.sum().reshape(1)
            else:
                where = seg
            d_sq = d_sq.index_add(0, where, sq)
            d_n = d_n.index_add(0, where, live)
            deferred.append((t, seg, p, step))
        else:
            apply(t, seg, p, step)
    if cfg.unit_rms_update:
        if shard is not None:  # the RMS over the whole tensors
            mine = shard.mine(d_sq.dtype, dev)[:, 0]
            d_sq, d_n = shard.sum(torch.stack([d_sq * mine, d_n * mine])).unbind(0)
        factor = unit_rms_factor(d_sq, d_n).to(dt)
        for t, seg, p, step in deferred:
            apply(t, seg, p, step * (factor[t] if seg is None else factor.index_select(0, seg)))
    hsum = (_reduce(hsums, ids, T, consts) if hsums  # (none where this rank holds no element at all)
            else torch.zeros(T, w[f"mlp_b{L - 1}"].shape[-1], dtype=dt, device=dev))
    if shard is not None:  # the messages are means over the whole tensors
        hsum = shard.sum(hsum * shard.mine(dt, dev))
    messages = (hsum / work.numels.unsqueeze(-1)) @ wl[:, 2:] + bl[2:]

    shapes = work.shapes
    new_p: List[Optional[Tensor]] = [None] * T
    new_m: List[Optional[Tensor]] = [None] * T
    new_v: List[Optional[Tensor]] = [None] * T
    for t in large:
        if write_p:
            new_p[t] = work.originals[0][t]
        else:
            parts = new_large[t]
            new_p[t] = _join(parts).view(shapes[t])
        new_m[t] = M[t].view(*shapes[t], D)
        new_v[t] = V[t].view(*shapes[t], D)
    if plan.small:
        sizes = [shapes[t].numel() for t in plan.small]
        flat_p = _join(pack_parts)
        for t, x, mm, vv in zip(plan.small, flat_p.split(sizes), work.pack[2].split(sizes),
                                work.pack[3].split(sizes)):
            new_p[t] = x.view(shapes[t])
            if work.inplace:
                work.originals[1][t].copy_(mm.view(*shapes[t], D))
                work.originals[2][t].copy_(vv.view(*shapes[t], D))
                new_m[t], new_v[t] = work.originals[1][t], work.originals[2][t]
            else:
                new_m[t], new_v[t] = mm.view(*shapes[t], D), vv.view(*shapes[t], D)
    return new_p, messages, new_m, new_v
