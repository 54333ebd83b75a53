"""The learned optimizer's step, complete and readable: the specification.

One tensor at a time, straight from the formulas, with nothing shared with the fast paths
(:mod:`learned_opt.fast`, :mod:`learned_opt.batched` and the compiled kernel): it imports only
the configuration and the state's containers, so a mistake in a piece the fast paths share
(loss features, the clipper, the LSTM, the messages) shows up as a difference in the parity
tests instead of hiding in both. It is not meant to be quick. ``LearnedOptimizer(...,
impl="reference")`` and ``lopt_step(..., impl="reference")`` run it.

One step, for the tensors that have elements (empty ones are carried through and take no
part in any statistic; ``T`` counts the others):

1. **Training loss.** A finite loss updates running averages (decay ``train_loss_decay``) of
   the loss and of its squared deviation; the feature is the loss standardised by their
   bias-corrected values, clipped to [-5, 5]. No loss, or a non-finite one: feature 0, the
   averages unchanged. The **validation feature** is the bias-corrected running validation
   loss (fed by ``observe_validation_loss``) standardised the same way, 0 until both losses
   have been seen.
2. **Scale** (``scale_free``): gradients times ``grad_reference / s``, ``s`` the RMS of the
   first non-zero gradient (kept in the state).
3. **Clip** every gradient element to +-``clip_mult`` x a bias-corrected running average of
   the gradients' RMS; then the accumulators ``m <- b m + (1-b) g`` and ``v <- b v + (1-b)
   g^2`` at every decay ``b``.
4. **Per-tensor LSTM.** Its inputs per tensor: log-magnitudes and signs of the mean of m, v
   and p and log-magnitudes of their variances (over elements and decays), the log-norms of p
   and of the clipped gradient, an is-scalar flag and four log-dimensions, the two loss
   features (and with ``snr_stats`` two log-ratios: E[m^2]/E[v] and E[g^2]/E[v]), the message
   the tensor's MLP sent last step and the message shared by all tensors' LSTMs.
5. **Per-element MLP.** Inputs: 23 element columns (g, p, log|p|, m, v, m/sqrt(v + eps),
   1/sqrt(v + eps) at each decay), each divided by its RMS over the tensor (except the
   m/sqrt(v) ones with ``absolute_snr``; ``dual_snr`` appends them once more, unscaled), and
   31 per-tensor constants (step sinusoids, log T - 1, log ||p||, log numel, 17 LSTM outputs).
   Outputs: a direction ``d``, a magnitude ``mag`` and the 16-value message (its mean over
   the tensor).
6. **Update**: ``p <- p (1 - lr wd) - lr d exp(magnitude_rate mag)``; with
   ``freeze_untouched`` ``d`` is 0 where ``v`` is all zeros; with ``unit_rms_update`` ``d`` is
   divided by its RMS over the tensor's elements that may move.

Every ``if`` below is on the configuration, never on a value, so the step runs under
``torch.func.vmap`` too.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .config import N_SHAPE_DIMS, TIMESCALES, ArchConfig
from .state import LOptState, Number, TensorState


def _bias_corrected(average: Tensor, decay: float, count: Tensor) -> Tensor:
    return average / (1.0 - decay ** count + 1e-8)


def _standardise(loss: Tensor, mean_avg: Tensor, var_avg: Tensor, count: Tensor, cfg: ArchConfig) -> Tensor:
    """(loss - mean) / std with the bias-corrected training-loss averages, clipped to [-5, 5]."""
    mean = _bias_corrected(mean_avg, cfg.train_loss_decay, count)
    var = _bias_corrected(var_avg, cfg.train_loss_decay, count)
    floor = 1e-8 * mean * mean + 1e-30 if cfg.scale_free else 1e-8
    return torch.clamp((loss - mean) / torch.sqrt(var + floor), -5.0, 5.0)


def _log_magnitude(x: Tensor) -> Tensor:
    return torch.clamp(torch.log(1e-8 + x.abs()), -5.0, 5.0)


def _log_ratio(num: Tensor, den: Tensor) -> Tensor:
    """log(num / den) clipped to [-10, 5]; a zero denominator reads as the floor, -10."""
    ratio = torch.log(num + 1e-30) - torch.log(torch.clamp(den, min=1e-30))
    return torch.clamp(torch.where(den > 0, ratio, torch.full_like(ratio, -10.0)), -10.0, 5.0)


def _log_dims(shape: torch.Size) -> List[float]:
    """log(dim) - 1 of four dimensions (leading dims of a higher rank folded into the first,
    missing ones read as 1), then +1 for a 0-d tensor and -1 otherwise."""
    dims = list(shape)
    if len(dims) > N_SHAPE_DIMS:
        dims = [math.prod(dims[:len(dims) - N_SHAPE_DIMS + 1])] + dims[len(dims) - N_SHAPE_DIMS + 1:]
    dims += [1] * (N_SHAPE_DIMS - len(dims))
    return [math.log(d) - 1.0 for d in dims] + [1.0 if len(shape) == 0 else -1.0]


def _lstm_inputs(p, g, m, v, shape, train_feat, valid_feat, cfg: ArchConfig, dt) -> Tensor:
    """The statistics one tensor gives its LSTM (float64 sums: a mean that nearly cancels
    must not pick up rounding)."""
    m64, v64, p64, g64 = m.double(), v.double(), p.double(), g.double()
    mean_m, mean_v, mean_p = m64.mean(), v64.mean(), p64.mean()
    var_m, var_v, var_p = ((m64 - mean_m) ** 2).mean(), ((v64 - mean_v) ** 2).mean(), ((p64 - mean_p) ** 2).mean()
    norm_p, norm_g = torch.sqrt((p64 * p64).sum()), torch.sqrt((g64 * g64).sum())
    dims = torch.tensor(_log_dims(shape), dtype=torch.float64, device=p.device)
    def sign(x, mean):  # 0 within sign_tolerance x RMS of zero
        rms = torch.sqrt((x * x).mean())
        return torch.where(mean.abs() <= cfg.sign_tolerance * rms, torch.zeros_like(mean), torch.sign(mean))

    stats = [_log_magnitude(mean_m), sign(m64, mean_m), _log_magnitude(var_m),
             _log_magnitude(mean_v), sign(v64, mean_v), _log_magnitude(var_v),
             _log_magnitude(mean_p), sign(p64, mean_p), _log_magnitude(var_p),
             _log_magnitude(norm_p), _log_magnitude(norm_g),
             dims[N_SHAPE_DIMS], *dims[:N_SHAPE_DIMS], train_feat.double(), valid_feat.double()]
    if cfg.snr_stats:
        stats += [_log_ratio(var_m + mean_m * mean_m, mean_v), _log_ratio((g64 * g64).mean(), mean_v)]
    return torch.stack(stats).to(dt)


def _lstm(w: Dict[str, Tensor], x: Tensor, h: Tensor, c: Tensor):
    """One LSTM cell step, gates in the order input, candidate, forget (bias +1), output."""
    gates = torch.cat([x, h]) @ w["lstm_w"] + w["lstm_b"]
    i, cand, f, o = gates.chunk(4)
    c = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(cand)
    return torch.sigmoid(o) * torch.tanh(c), c


def _element_inputs(p, g, m, v, cfg: ArchConfig) -> List[Tensor]:
    """What the MLP reads per element, as a list of (n, k) blocks: the element columns, each
    divided by its RMS over the tensor, and with ``dual_snr`` the m/sqrt(v) columns once more,
    unscaled (they go after the per-tensor constants)."""
    D = cfg.n_decays
    p, g, m, v = p.reshape(-1, 1), g.reshape(-1, 1), m.reshape(-1, D), v.reshape(-1, D)
    inv_rms = 1.0 / torch.sqrt(v + cfg.rms_eps)
    cols = torch.cat([g, p, torch.log(p.abs() + 1e-8), m, v, m * inv_rms, inv_rms], dim=1)
    scale = 1.0 / torch.sqrt(cfg.norm_eps + (cols * cols).mean(dim=0))
    a, b = cfg.snr_column_range
    if cfg.absolute_snr:
        scale = torch.cat([scale[:a], torch.ones_like(scale[a:b]), scale[b:]])
    parts = [cols * scale]
    if cfg.dual_snr:
        parts.append(cols[:, a:b])
    return parts


def _mlp(w: Dict[str, Tensor], x: Tensor, cfg: ArchConfig) -> Tensor:
    for i in range(cfg.mlp_layers + 1):
        x = x @ w[f"mlp_w{i}"] + w[f"mlp_b{i}"]
        if i < cfg.mlp_layers:
            x = torch.relu(x)
    return x


def step(weights: Dict[str, Tensor], params: Sequence[Tensor], grads: Sequence[Tensor], state: LOptState, *,
         loss: Optional[Number], lrs: Sequence[Number], wds: Sequence[Number], maximize: bool, cfg: ArchConfig):
    """One step: returns ``(new_params, new_state)``, changing nothing in place. ``lrs`` and
    ``wds`` hold one learning rate and one weight decay per tensor; the arguments are checked
    by the caller (:func:`learned_opt.functional.lopt_step`)."""
    glob = state.glob
    active = [i for i, p in enumerate(params) if p.numel() > 0]
    if not active:
        return list(params), state
    dt = torch.float64 if any(params[i].dtype == torch.float64 for i in active) else torch.float32
    w = {k: x.to(dt) for k, x in weights.items()}
    T = len(active)

    # 1. the loss features
    d = cfg.train_loss_decay
    train_mean, train_var, train_count = glob.train_mean, glob.train_var, glob.train_count
    train_feat = torch.zeros((), dtype=torch.float64, device=glob.step.device)
    if loss is not None:
        x = loss.detach().double().reshape(()) if isinstance(loss, Tensor) else torch.tensor(float(loss), dtype=torch.float64)
        x = x.to(glob.step.device)
        ok = torch.isfinite(x)
        x = torch.where(ok, x, torch.zeros_like(x))
        new_mean = d * train_mean + (1 - d) * x
        new_var = d * train_var + (1 - d) * (new_mean - x) ** 2
        train_mean = torch.where(ok, new_mean, train_mean)
        train_var = torch.where(ok, new_var, train_var)
        train_count = torch.where(ok, train_count + 1, train_count)
        train_feat = torch.where(ok, _standardise(x, train_mean, train_var, train_count, cfg), train_feat)
    valid_avg = _bias_corrected(glob.valid_mean, cfg.valid_loss_decay, glob.valid_count)
    valid_feat = torch.where((glob.valid_count > 0) & (train_count > 0),
                             _standardise(valid_avg, train_mean, train_var, train_count, cfg),
                             torch.zeros_like(valid_avg))

    P = [params[i].to(dt) for i in active]
    G = [grads[i].to(dt) * (-1.0 if maximize else 1.0) for i in active]

    # 2. the gradients' scale
    grad_ref = glob.grad_ref
    if cfg.scale_free:
        rms = torch.sqrt(torch.stack([(g.double() ** 2).mean() for g in G]).mean())
        usable = torch.isfinite(rms) & (rms > 0)
        grad_ref = torch.where(grad_ref > 0, grad_ref, torch.where(usable, rms, torch.zeros_like(rms)))
        factor = torch.where(grad_ref > 0, cfg.grad_reference / torch.where(grad_ref > 0, grad_ref, 1.0), 1.0)
        G = [g * factor.to(dt) for g in G]

    # 3. clip, accumulators
    bound = (glob.clip_value / (1.0 - cfg.clip_decay ** glob.clip_t) * cfg.clip_mult).to(dt)
    b = torch.tensor(cfg.decays, dtype=dt, device=P[0].device)
    G = [torch.clamp(g, -bound, bound) for g in G]
    M = [b * state.tensors[i].mom.to(dt) + (1 - b) * g.unsqueeze(-1) for i, g in zip(active, G)]
    V = [b * state.tensors[i].rms.to(dt) + (1 - b) * (g * g).unsqueeze(-1) for i, g in zip(active, G)]
    grad_rms = torch.sqrt(1e-8 + torch.stack([(g.double() ** 2).mean() for g in G]).mean())
    clip_value = glob.clip_value * cfg.clip_decay + grad_rms * (1.0 - cfg.clip_decay)

    # 4. the per-tensor LSTMs and the message they share
    H, C, to_mlp, shared = [], [], [], []
    for j, i in enumerate(active):
        s = state.tensors[i]
        x = torch.cat([_lstm_inputs(P[j], G[j], M[j], V[j], params[i].shape, train_feat, valid_feat, cfg, dt),
                       s.from_mlp.to(dt), glob.from_lstm.to(dt)])
        h, c = _lstm(w, x, s.lstm_h.to(dt), s.lstm_c.to(dt))
        H.append(h)
        C.append(c)
        to_mlp.append(h @ w["to_mlp_w"] + w["to_mlp_b"])
        shared.append(h @ w["to_shared_w"] + w["to_shared_b"])

    # 5-6. the per-element MLP and the update
    taus = torch.tensor(TIMESCALES, dtype=dt, device=P[0].device)
    sinusoids = torch.sin(glob.step.to(dt) / (taus * math.pi))
    out_params, out_tensors = list(params), list(state.tensors)
    for j, i in enumerate(active):
        p, n = P[j], P[j].numel()
        norm_p = torch.sqrt((p.double() ** 2).sum().to(dt))
        consts = torch.cat([sinusoids, torch.tensor([math.log(T) - 1.0], dtype=dt, device=p.device),
                            torch.log(norm_p + 1e-8).reshape(1), torch.tensor([math.log(n)], dtype=dt, device=p.device),
                            to_mlp[j]])
        parts = _element_inputs(p, G[j], M[j], V[j], cfg)
        feats = torch.cat([parts[0], consts.expand(n, -1)] + parts[1:], dim=1)
        out = _mlp(w, feats, cfg)
        direction, mag = out[:, 0], out[:, 1]
        if cfg.freeze_untouched:  # never a non-zero gradient: no step
            live = (V[j].reshape(n, -1) != 0).any(dim=1)
            direction = torch.where(live, direction, torch.zeros_like(direction))
        if cfg.unit_rms_update:
            count = live.sum() if cfg.freeze_untouched else torch.tensor(n)
            mean_sq = (direction * direction).sum() / torch.clamp(count, min=1)
            direction = torch.where(mean_sq > 0, direction / torch.sqrt(torch.clamp(mean_sq, min=1e-30)),
                                    torch.zeros_like(direction))
        update = lrs[i] * direction * torch.exp(cfg.magnitude_rate * mag)
        out_params[i] = (p * (1 - lrs[i] * wds[i]) - update.reshape(p.shape)).to(params[i].dtype)
        out_tensors[i] = TensorState(mom=M[j], rms=V[j], lstm_h=H[j], lstm_c=C[j], from_mlp=out[:, 2:].mean(dim=0))

    new_glob = glob._replace(step=glob.step + 1, train_mean=train_mean, train_var=train_var,
                             train_count=train_count, clip_t=glob.clip_t + 1, clip_value=clip_value,
                             grad_ref=grad_ref, from_lstm=torch.stack(shared).mean(0).double())
    return out_params, LOptState(new_glob, out_tensors)
