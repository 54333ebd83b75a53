"""Pure functional core of the learned optimizer.

``lopt_step(weights, params, grads, state, ...)`` returns new parameters and a new state and
changes nothing in place, so it composes with ``torch.func`` (``vmap`` over a population of
meta-weights and of parameter sets is tested against a Python loop).

One step, for the tensors given (callers pass only the tensors that have a gradient):

1. loss features from the running training/validation loss statistics;
2. gradients clipped to ``clip_mult`` x a running RMS of the gradients;
3. momentum and second-moment accumulators at several decays;
4. a per-tensor LSTM reads tensor statistics and messages and emits 17 values per tensor;
5. a per-element MLP reads 23 per-element columns (scaled by their RMS over the tensor) and
   31 per-tensor constants, and returns a direction ``d`` and a magnitude ``mag``;
6. ``p <- p * (1 - lr * weight_decay) - lr * d * exp(magnitude_rate * mag)``.

Steps 2, 3 and 5 have two implementations that must agree: :mod:`learned_opt.reference` (a
per-tensor loop written straight from the formulas) and :mod:`learned_opt.fast` (all tensors
together, in bounded chunks). The scalar and per-tensor pieces shared by both live here.

Loss features when losses are missing (our definition; the reference requires a loss):
  * training-loss feature: 0 on any step called without a (finite) loss; the statistics are
    then left unchanged;
  * validation-loss feature: 0 until at least one validation loss *and* one training loss
    have been seen; afterwards the bias-corrected running mean of validation losses,
    normalised with the training-loss statistics. Validation losses do not advance the step
    counter (the reference counts them as steps).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import N_SHAPE_DIMS, TIMESCALES, ArchConfig

if TYPE_CHECKING:
    from .network import MetaNetwork

Number = Union[float, int, Tensor]


class TensorState(NamedTuple):
    """State of one parameter tensor: 10 accumulator floats per element plus LSTM state."""

    mom: Tensor  # (*shape, D) momentum accumulators, one per decay
    rms: Tensor  # (*shape, D) second-moment accumulators
    lstm_h: Tensor  # (H,)
    lstm_c: Tensor  # (H,)
    from_mlp: Tensor  # (from_mlp,) message the MLP sent for this tensor last step


class GlobalState(NamedTuple):
    """Optimizer-wide state (float64 scalars; counts are stored as floats)."""

    step: Tensor
    train_mean: Tensor
    train_var: Tensor
    train_count: Tensor
    valid_mean: Tensor
    valid_var: Tensor
    valid_count: Tensor
    clip_t: Tensor
    clip_value: Tensor
    from_lstm: Tensor  # (from_lstm,) shared message
    # RMS of the first non-zero gradient (ArchConfig.scale_free; 0 until then, unused without it)
    grad_ref: Tensor

    @classmethod
    def from_saved(cls, fields) -> "GlobalState":
        """From a saved list of fields; lists saved before ``grad_ref`` existed get it at 0."""
        fields = list(fields)
        if len(fields) == len(cls._fields) - 1:
            fields.append(torch.zeros_like(fields[0]))
        return cls(*fields)


class LOptState(NamedTuple):
    glob: GlobalState
    tensors: List[TensorState]


# ---------------------------------------------------------------------------- state


def init_global_state(weights: Dict[str, Tensor], cfg: ArchConfig,
                      device=None) -> GlobalState:
    dev = device if device is not None else weights["init_from_lstm"].device
    z = lambda v=0.0: torch.tensor(v, dtype=torch.float64, device=dev)  # noqa: E731
    return GlobalState(
        step=z(), train_mean=z(), train_var=z(), train_count=z(),
        valid_mean=z(), valid_var=z(), valid_count=z(),
        # the clipper starts as if it had seen one gradient of RMS 1 (first clip: +-clip_mult)
        clip_t=z(1.0), clip_value=z(1.0 - cfg.clip_decay), grad_ref=z(),
        from_lstm=weights["init_from_lstm"].detach().to(dev, torch.float64).clone(),
    )


def init_tensor_state(weights: Dict[str, Tensor], cfg: ArchConfig, param: Tensor) -> TensorState:
    """Fresh state for one parameter (accumulators in fp64 for fp64 params, else fp32)."""
    dt = compute_dtype([param])
    dev = param.device
    return TensorState(
        mom=torch.zeros(*param.shape, cfg.n_decays, dtype=dt, device=dev),
        rms=torch.zeros(*param.shape, cfg.n_decays, dtype=dt, device=dev),
        lstm_h=weights["lstm_h0"].detach().to(dev, dt).clone(),
        lstm_c=weights["lstm_c0"].detach().to(dev, dt).clone(),
        from_mlp=weights["init_from_mlp"].detach().to(dev, dt).clone(),
    )


def check_architecture(weights: Dict[str, Tensor], cfg: ArchConfig) -> None:
    """A clear error where the weights were made for another architecture than ``cfg`` (the
    input widths of the LSTM and of the MLP differ): the usual cause is a missing ``cfg``
    argument with weights whose config is not the default one. The config travels in every
    weights file: ``net, _ = load_weights(...)``, then ``cfg=net.config``. (Whether the
    m/sqrt(v) columns are scaled, ``absolute_snr``, does not show in the shapes.)"""
    want = {"lstm_w": cfg.lstm_in + cfg.lstm_hidden, "mlp_w0": cfg.mlp_in}
    for name, rows in want.items():
        if name in weights and weights[name].shape[-2] != rows:
            raise ValueError(f"the weights' {name} has {weights[name].shape[-2]} input rows, the "
                             f"architecture {cfg} takes {rows}: pass the weights' own config "
                             "(cfg=net.config for net, _ = load_weights(...), or pass net itself)")


def resolve_weights(weights, cfg: Optional[ArchConfig]) -> Tuple[Dict[str, Tensor], ArchConfig]:
    """The weights as a dict and their architecture. ``weights`` is a name -> tensor dict (with
    ``cfg``, default ``ArchConfig()``) or a ``MetaNetwork``, which brings its own config (a
    ``cfg`` that differs from it is refused)."""
    from .network import MetaNetwork

    if isinstance(weights, MetaNetwork):
        if cfg is not None and cfg != weights.config:
            raise ValueError(f"cfg {cfg} differs from the network's own config {weights.config}")
        return weights.weights(), weights.config
    cfg = cfg or ArchConfig()
    check_architecture(weights, cfg)
    return weights, cfg


def init_state(weights: Union[Dict[str, Tensor], "MetaNetwork"], params: Sequence[Tensor],
               cfg: Optional[ArchConfig] = None) -> LOptState:
    """The state before the first step: ``weights`` as in :func:`resolve_weights`."""
    weights, cfg = resolve_weights(weights, cfg)
    dev = params[0].device if len(params) else None
    return LOptState(init_global_state(weights, cfg, dev),
                     [init_tensor_state(weights, cfg, p) for p in params])


def compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (fp16/bf16 are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------- shared pieces


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
    cols = [
        clip_log_abs(mean_m), torch.sign(mean_m), clip_log_abs(var_m),
        clip_log_abs(mean_v), torch.sign(mean_v), clip_log_abs(var_v),
        clip_log_abs(mean_p), torch.sign(mean_p), clip_log_abs(var_p),
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


def frozen_to_zero(step: Tensor, v: Tensor) -> Tensor:
    """``step`` (...,) set to 0 where every accumulator in ``v`` (..., D) is exactly zero: an
    element that has never had a non-zero gradient (``ArchConfig.freeze_untouched``)."""
    return torch.where((v != 0).any(-1), step, torch.zeros_like(step))


def _per_tensor(value, n: int, name: str) -> List:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} tensors")
        return list(value)
    return [value] * n


# ----------------------------------------------------------------------------- step


def lopt_step(weights: Union[Dict[str, Tensor], "MetaNetwork"], params: Sequence[Tensor], grads: Sequence[Tensor],
              state: LOptState, *, loss: Optional[Number] = None,
              lr: Union[Number, Sequence[Number]] = 1e-3,
              weight_decay: Union[Number, Sequence[Number]] = 0.0,
              maximize: bool = False, cfg: Optional[ArchConfig] = None,
              impl: str = "fast", chunk_size: Optional[int] = None, inplace: bool = False):
    """One learned-optimizer step. Returns ``(new_params, new_state)``.

    ``params``/``grads``/``state.tensors`` are aligned lists of real tensors; ``lr`` and
    ``weight_decay`` are numbers or per-tensor sequences. ``impl`` is ``"fast"`` (default) or
    ``"reference"``. Empty tensors are carried through unchanged and take no part in the
    statistics. ``inplace=True`` lets the fast path update the given parameters and
    accumulators in place (chunk by chunk, so memory beyond the state stays bounded); the
    returned tensors are then those same objects where that was possible. Never use it under
    ``vmap`` or when the inputs must survive. ``weights`` is a name -> tensor dict with its
    ``cfg`` (default ``ArchConfig()``), or a ``MetaNetwork``, which brings its own config.
    """
    from . import fast, reference

    weights, cfg = resolve_weights(weights, cfg)
    if impl == "fast":
        backend = fast
    elif impl == "reference":
        backend = reference
    else:
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    n = len(params)
    if len(grads) != n or len(state.tensors) != n:
        raise ValueError(f"got {n} params, {len(grads)} grads and {len(state.tensors)} states")
    lrs = _per_tensor(lr, n, "lr")
    wds = _per_tensor(weight_decay, n, "weight_decay")
    active = [i for i in range(n) if params[i].numel() > 0]
    if not active:
        return list(params), state

    dt = compute_dtype([params[i] for i in active])
    w = {k: v.to(dt) for k, v in weights.items()}
    P = [params[i].to(dt) for i in active]
    G = [grads[i].to(dt) for i in active]
    if maximize:
        G = [-x for x in G]
    M = [state.tensors[i].mom.to(dt) for i in active]
    V = [state.tensors[i].rms.to(dt) for i in active]
    shapes = [params[i].shape for i in active]
    numels = [params[i].numel() for i in active]

    glob, train_feat = update_training_loss(state.glob, loss, cfg)
    if cfg.scale_free:  # gradients in units of the first one's RMS
        glob, factor = gradient_factor(glob, torch.stack([(x.double() * x.double()).mean() for x in G]).mean(), cfg)
        G = [x * factor.to(dt) for x in G]
    valid_feat = validation_feature(glob, cfg)
    amount = clip_amount(glob, cfg).to(dt)

    # steps 2-3 and the per-tensor statistics
    work, raw = backend.tensor_statistics(P, G, M, V, amount, cfg, chunk_size, inplace=inplace)
    glob = update_clipper(glob, raw[:, 7] / torch.tensor(numels, dtype=raw.dtype, device=raw.device), cfg)

    # step 4: per-tensor LSTM
    stats = lstm_statistics(raw, shapes, train_feat, valid_feat, cfg).to(dt)
    from_mlp = torch.stack([state.tensors[i].from_mlp.to(dt) for i in active])
    from_lstm = state.glob.from_lstm.to(dt).expand(len(active), -1)
    h = torch.stack([state.tensors[i].lstm_h.to(dt) for i in active])
    c = torch.stack([state.tensors[i].lstm_c.to(dt) for i in active])
    h, c = lstm_cell(w, torch.cat([stats, from_mlp, from_lstm], dim=-1), h, c)
    to_mlp = h @ w["to_mlp_w"] + w["to_mlp_b"]
    new_from_lstm = (h @ w["to_shared_w"] + w["to_shared_b"]).mean(0)

    # steps 5-6: per-element MLP and the update
    consts = tensor_constants(state.glob.step, len(active), raw[:, 6].to(dt), numels, to_mlp)
    lr_a = [lrs[i] for i in active]
    wd_a = [wds[i] for i in active]
    new_p, messages, new_m, new_v = backend.mlp_update(work, w, consts, lr_a, wd_a, cfg, chunk_size)

    out_params = list(params)
    out_tensors = list(state.tensors)
    for j, i in enumerate(active):
        out_params[i] = new_p[j].to(params[i].dtype)
        out_tensors[i] = TensorState(mom=new_m[j], rms=new_v[j], lstm_h=h[j], lstm_c=c[j],
                                     from_mlp=messages[j])
    glob = glob._replace(step=glob.step + 1, from_lstm=new_from_lstm.to(torch.float64))
    return out_params, LOptState(glob, out_tensors)
