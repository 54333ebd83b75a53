"""The pieces of one step that every implementation shares: loss features, the gradient
clipper and scale, the per-tensor LSTM's statistics and cell, the MLP's per-element columns
and per-tensor constants. Below the implementations (:mod:`.reference`, :mod:`.fast`,
:mod:`.batched`) and the dispatcher (:mod:`.functional`); imports only :mod:`.config` and
:mod:`.state`."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .config import N_SHAPE_DIMS, TIMESCALES, ArchConfig
from .state import GlobalState, LOptState, Number


def _corrected(value: Tensor, decay: float, count: Tensor) -> Tensor:
    return value / (1.0 - decay ** count + 1e-8)


def normalised_loss(loss: Tensor, g: GlobalState, cfg: ArchConfig) -> Tensor:
    """(loss - mean) / std with the bias-corrected training statistics, clipped to [-5, 5]."""
    d = cfg.train_loss_decay
    mean = _corrected(g.train_mean, d, g.train_count)
    var = _corrected(g.train_var, d, g.train_count)
    # the floor of the variance: absolute, or relative to the loss's own size (scale_free)
    floor = 1e-8 * mean * mean + 1e-30 if cfg.scale_free else 1e-8
    return torch.clamp((loss - mean) * torch.rsqrt(var + floor), -5.0, 5.0)


def _as_scalar(loss: Number, device) -> Tensor:
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"a loss must be a scalar, got shape {tuple(loss.shape)}")
        return loss.detach().to(device, torch.float64).reshape(())
    return torch.tensor(float(loss), dtype=torch.float64, device=device)


def update_training_loss(g: GlobalState, loss: Optional[Number], cfg: ArchConfig):
    """Returns (new global state, training-loss feature). Non-finite losses are ignored."""
    if loss is None:
        return g, torch.zeros((), dtype=torch.float64, device=g.step.device)
    return train_loss_statistics(g, _as_scalar(loss, g.step.device), cfg)


def train_loss_statistics(g: GlobalState, loss: Tensor, cfg: ArchConfig):
    """``update_training_loss`` for a float64 loss tensor; elementwise, so a population's
    states (fields of shape (M,)) and losses (M,) work too."""
    ok = torch.isfinite(loss)
    safe = torch.where(ok, loss, torch.zeros_like(loss))
    d = cfg.train_loss_decay
    mean = d * g.train_mean + (1 - d) * safe
    var = d * g.train_var + (1 - d) * (mean - safe) ** 2
    count = g.train_count + 1
    new = g._replace(train_mean=torch.where(ok, mean, g.train_mean),
                     train_var=torch.where(ok, var, g.train_var),
                     train_count=torch.where(ok, count, g.train_count))
    feat = torch.where(ok, normalised_loss(safe, new, cfg), torch.zeros_like(safe))
    return new, feat


def observe_validation_loss(state: LOptState, loss: Number,
                            cfg: Optional[ArchConfig] = None) -> LOptState:
    """Feed one validation loss into the running validation statistics (non-finite: ignored)."""
    cfg = cfg or ArchConfig()
    g = state.glob
    loss = _as_scalar(loss, g.step.device)
    ok = torch.isfinite(loss)
    safe = torch.where(ok, loss, torch.zeros_like(loss))
    d = cfg.valid_loss_decay
    mean = d * g.valid_mean + (1 - d) * safe
    var = d * g.valid_var + (1 - d) * (mean - safe) ** 2
    g = g._replace(valid_mean=torch.where(ok, mean, g.valid_mean),
                   valid_var=torch.where(ok, var, g.valid_var),
                   valid_count=torch.where(ok, g.valid_count + 1, g.valid_count))
    return state._replace(glob=g)


def validation_feature(g: GlobalState, cfg: ArchConfig) -> Tensor:
    vmean = _corrected(g.valid_mean, cfg.valid_loss_decay, g.valid_count)
    feat = normalised_loss(vmean, g, cfg)
    seen = (g.valid_count > 0) & (g.train_count > 0)
    return torch.where(seen, feat, torch.zeros_like(feat))


def clip_amount(g: GlobalState, cfg: ArchConfig) -> Tensor:
    return g.clip_value / (1.0 - cfg.clip_decay ** g.clip_t) * cfg.clip_mult


def update_clipper(g: GlobalState, mean_sq_per_tensor: Tensor, cfg: ArchConfig) -> GlobalState:
    """Running average of the RMS of the clipped gradients (mean over tensors of mean(g^2))."""
    rms = torch.sqrt(1e-8 + mean_sq_per_tensor.to(torch.float64).mean(-1))
    value = g.clip_value * cfg.clip_decay + rms * (1.0 - cfg.clip_decay)
    return g._replace(clip_t=g.clip_t + 1, clip_value=value)


def gradient_factor(g: GlobalState, mean_sq: Tensor, cfg: ArchConfig) -> Tuple[GlobalState, Tensor]:
    """``ArchConfig.scale_free``: the factor ``grad_reference / s`` that this step's gradients
    are multiplied by, and the state with ``s`` (``grad_ref``) set where this is the first step
    with a finite, non-zero gradient. ``mean_sq`` is the mean over tensors of mean(g^2), () or a
    population's (M,). Elementwise, so it works under vmap and for populations."""
    rms = torch.sqrt(mean_sq.to(torch.float64))
    usable = torch.isfinite(rms) & (rms > 0)
    ref = torch.where(g.grad_ref > 0, g.grad_ref, torch.where(usable, rms, torch.zeros_like(rms)))
    factor = torch.where(ref > 0, cfg.grad_reference / torch.where(ref > 0, ref, torch.ones_like(ref)),
                         torch.ones_like(ref))
    return g._replace(grad_ref=ref), factor


def clip_log_abs(x: Tensor) -> Tensor:
    return torch.clamp(torch.log(1e-8 + x.abs()), -5.0, 5.0)


def shape_features(shapes: Sequence[torch.Size]) -> List[List[float]]:
    """log(dim) - 1 for 4 dims per tensor, padded with ones. Tensors of rank > 4 fold their
    leading dims into the first (the reference stops at rank 4); 0-d tensors are [1, 1, 1, 1].
    Also returns the is-scalar flag as a fifth value."""
    out = []
    for s in shapes:
        dims = list(s)
        if len(dims) > N_SHAPE_DIMS:
            dims = [math.prod(dims[: len(dims) - N_SHAPE_DIMS + 1])] + dims[len(dims) - N_SHAPE_DIMS + 1:]
        dims = dims + [1] * (N_SHAPE_DIMS - len(dims))
        out.append([math.log(d) - 1.0 for d in dims] + [1.0 if len(s) == 0 else -1.0])
    return out


def clip_log_ratio(num: Tensor, den: Tensor) -> Tensor:
    """log(num / den) for non-negative num, den, clipped to [-10, 5]; den = 0 reads as the floor."""
    ratio = torch.log(num + 1e-30) - torch.log(den.clamp_min(1e-30))
    return torch.clamp(torch.where(den > 0, ratio, torch.full_like(ratio, -10.0)), -10.0, 5.0)


def lstm_statistics(raw: Tensor, shapes, train_feat: Tensor, valid_feat: Tensor,
                    cfg: Optional[ArchConfig] = None) -> Tensor:
    """The per-tensor LSTM statistics: 18, and 2 more with ``cfg.snr_stats``.

    ``raw`` is (T, 8): mean and variance of m (over elements and decays), of v and of p, then
    the sums of squares of p and of the clipped gradient. Leading dimensions (a population's
    (M, T, 8), with loss features of shape (M,)) are carried through.
    """
    mean_m, var_m, mean_v, var_v, mean_p, var_p, ss_p, ss_g = raw.unbind(-1)
    lead = raw.shape[:-1]
    shp = torch.tensor(shape_features(shapes), dtype=raw.dtype, device=raw.device).expand(*lead, -1)
    tol = 0.0 if cfg is None else cfg.sign_tolerance

    def sign(mean, var):  # 0 where the mean is within rounding of zero (ArchConfig.sign_tolerance)
        if not tol:
            return torch.sign(mean)
        return torch.where(mean.abs() <= tol * torch.sqrt(var + mean * mean), torch.zeros_like(mean), torch.sign(mean))

    cols = [
        clip_log_abs(mean_m), sign(mean_m, var_m), clip_log_abs(var_m),
        clip_log_abs(mean_v), sign(mean_v, var_v), clip_log_abs(var_v),
        clip_log_abs(mean_p), sign(mean_p, var_p), clip_log_abs(var_p),
        clip_log_abs(torch.sqrt(ss_p)), clip_log_abs(torch.sqrt(ss_g)),
        shp[..., 4],
    ] + [shp[..., j] for j in range(N_SHAPE_DIMS)] + [
        train_feat.to(raw.dtype).unsqueeze(-1).expand(lead),
        valid_feat.to(raw.dtype).unsqueeze(-1).expand(lead),
    ]
    if cfg is not None and cfg.snr_stats:
        numel = torch.tensor([max(math.prod(s), 1) for s in shapes], dtype=raw.dtype, device=raw.device)
        mean_sq_m = var_m + mean_m * mean_m  # E[m^2] over elements and decays
        cols += [clip_log_ratio(mean_sq_m, mean_v), clip_log_ratio(ss_g / numel, mean_v)]
    return torch.stack(cols, dim=-1)


def lstm_cell(w: Dict[str, Tensor], x: Tensor, h: Tensor, c: Tensor):
    """One LSTM step on a batch of tensors; forget-gate bias +1."""
    gates = torch.cat([x, h], dim=-1) @ w["lstm_w"] + w["lstm_b"]
    i, gg, f, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(gg)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def step_sinusoids(step: Tensor, dtype) -> Tensor:
    tau = torch.tensor(TIMESCALES, dtype=dtype, device=step.device)
    return torch.sin(step.to(dtype).unsqueeze(-1) / (tau * math.pi))


def tensor_constants(step: Tensor, n_tensors: int, ss_p: Tensor, numels: Sequence[int],
                     to_mlp: Tensor) -> Tensor:
    """(T, 31) MLP inputs constant over a tensor: step sinusoids, log(#tensors) - 1,
    log(||p|| + 1e-8), log(numel), and the 17 values from the LSTM. Leading dimensions (a
    population's steps (M,), ``ss_p`` (M, T) and ``to_mlp`` (M, T, 17)) are carried through."""
    lead, dt = to_mlp.shape[:-1], to_mlp.dtype
    sin = step_sinusoids(step, dt).unsqueeze(-2).expand(*lead, -1)
    count = torch.full((*lead, 1), math.log(n_tensors) - 1.0, dtype=dt, device=to_mlp.device)
    log_norm = torch.log(torch.sqrt(ss_p) + 1e-8).unsqueeze(-1)
    log_n = torch.log(torch.tensor(numels, dtype=dt, device=to_mlp.device)).unsqueeze(-1).expand(*lead, 1)
    return torch.cat([sin, count, log_norm, log_n, to_mlp], dim=-1)


def column_scale(mean_sq: Tensor, cfg: ArchConfig) -> Tensor:
    """The per-tensor factors of the MLP's element columns, from each column's mean square over
    the tensor (..., E): rsqrt(norm_eps + mean_sq), and 1 for the m/sqrt(v) columns with
    ``cfg.absolute_snr``."""
    scale = torch.rsqrt(cfg.norm_eps + mean_sq)
    if cfg.absolute_snr:
        a, b = cfg.snr_column_range
        scale = torch.cat([scale[..., :a], torch.ones_like(scale[..., a:b]), scale[..., b:]], dim=-1)
    return scale


def fold_first_layer(w0: Tensor, scale: Tensor, cfg: ArchConfig) -> Tuple[Tensor, Tensor]:
    """The MLP's first weight matrix ``w0`` (..., mlp_in, H) arranged for the fast paths, which
    multiply the unscaled element columns by per-tensor weights: returns the element-column rows
    with the column factors ``scale`` (..., T, E) folded in, (..., T, E, H), and the rows that
    take the per-tensor constants, (..., C, H). With ``cfg.dual_snr`` the rows of the unscaled
    m/sqrt(v) inputs are added to the scaled copies' rows: one column, two weights."""
    E, C = cfg.n_element_cols, cfg.n_const_cols
    w0s = scale.unsqueeze(-1) * w0[..., :E, :].unsqueeze(-3)
    if cfg.dual_snr:
        a, b = cfg.snr_column_range
        extra = w0[..., E + C:, :].unsqueeze(-3)
        w0s = torch.cat([w0s[..., :a, :], w0s[..., a:b, :] + extra, w0s[..., b:, :]], dim=-2)
    return w0s, w0[..., E:E + C, :]


def element_columns(g: Tensor, p: Tensor, m: Tensor, v: Tensor, cfg: ArchConfig) -> Tensor:
    """The 23 per-element MLP columns for flat g, p (n,) and m, v (n, D), before scaling:
    g, p, log(|p| + 1e-8), m x D, v x D, m/sqrt(v + eps) x D, 1/sqrt(v + eps) x D."""
    rs = torch.rsqrt(v + cfg.rms_eps)
    return torch.cat([g.unsqueeze(-1), p.unsqueeze(-1), torch.log(p.abs() + 1e-8).unsqueeze(-1),
                      m, v, m * rs, rs], dim=-1)


def unit_rms_factor(sum_sq: Tensor, count: Tensor) -> Tensor:
    """``ArchConfig.unit_rms_update``: 1 / RMS of a tensor's direction outputs from their sum of
    squares and count (elementwise over tensors or members); 0 where nothing moves."""
    count = count.to(sum_sq.dtype)
    mean_sq = sum_sq / count.clamp_min(1)
    return torch.where(mean_sq > 0, torch.rsqrt(mean_sq.clamp_min(1e-30)), torch.zeros_like(mean_sq))


def frozen_to_zero(step: Tensor, v: Tensor) -> Tensor:
    """``step`` (...,) set to 0 where every accumulator in ``v`` (..., D) is exactly zero: an
    element that has never had a non-zero gradient (``ArchConfig.freeze_untouched``)."""
    return torch.where((v != 0).any(-1), step, torch.zeros_like(step))
