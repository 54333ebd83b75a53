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

Two implementations must agree: :mod:`learned_opt.reference`, the whole step written straight
from the formulas one tensor at a time and sharing nothing with the others (the
specification), and the fast path below, which runs the orchestration here with the two
per-element passes of :mod:`learned_opt.fast` (all tensors together, in bounded chunks, or the
compiled kernel). This module checks the arguments and chooses between them; the pieces the
fast paths share are in :mod:`learned_opt.features`, the state in :mod:`learned_opt.state`.

Loss features when losses are missing (our definition; the reference requires a loss):
  * training-loss feature: 0 on any step called without a (finite) loss; the statistics are
    then left unchanged;
  * validation-loss feature: 0 until at least one validation loss *and* one training loss
    have been seen; afterwards the bias-corrected running mean of validation losses,
    normalised with the training-loss statistics. Validation losses do not advance the step
    counter (the reference counts them as steps).
"""


from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import batched, fast, native, reference
from .fast import Sharding  # noqa: F401
from .config import ArchConfig
from .features import (_as_scalar, clip_amount, gradient_factor, lstm_cell, lstm_statistics,  # noqa: F401
                       observe_validation_loss, tensor_constants, train_loss_statistics, update_clipper,
                       update_training_loss, validation_feature)
from .state import (GlobalState, LOptState, Number, TensorState, check_architecture, compute_dtype,  # noqa: F401
                    init_global_state, init_state, init_tensor_state, resolve_weights)

if TYPE_CHECKING:
    from .network import MetaNetwork

def _checked(weights, cfg, impl, params, grads, state, lr, weight_decay):
    """The checks both entry points make: the weights with their config, the implementation's
    name, aligned lists, and one lr and weight decay per tensor."""
    weights, cfg = resolve_weights(weights, cfg)
    if impl not in ("fast", "reference"):
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    n = len(params)
    if len(grads) != n or len(state.tensors) != n:
        raise ValueError(f"got {n} params, {len(grads)} grads and {len(state.tensors)} states")
    return weights, cfg, _per_tensor(lr, n, "lr"), _per_tensor(weight_decay, n, "weight_decay")


def _native_allowed(native_arg: Optional[bool]) -> bool:
    """The one place that decides whether the compiled kernel may be used: the argument, or by
    default the ``LEARNED_OPT_NATIVE`` environment variable."""
    return native.enabled() if native_arg is None else bool(native_arg)


def _triton_allowed(triton_arg: Optional[bool]) -> bool:
    """Whether the Triton kernels may be used: the argument, or by default the
    ``LEARNED_OPT_TRITON`` environment variable (off unless 1)."""
    import os

    return os.environ.get("LEARNED_OPT_TRITON", "0") == "1" if triton_arg is None else bool(triton_arg)


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
              impl: str = "fast", chunk_size: Optional[int] = None, inplace: bool = False,
              shard: Optional[fast.Sharding] = None, native: Optional[bool] = None,
              triton: Optional[bool] = None, hold: Optional[Tensor] = None):
    """One learned-optimizer step. Returns ``(new_params, new_state)``.

    ``params``/``grads``/``state.tensors`` are aligned lists of real tensors; ``lr`` and
    ``weight_decay`` are numbers or per-tensor sequences. ``impl`` is ``"fast"`` (default) or
    ``"reference"``. Empty tensors are carried through unchanged and take no part in the
    statistics. ``inplace=True`` lets the fast path update the given parameters and
    accumulators in place (chunk by chunk, so memory beyond the state stays bounded); the
    returned tensors are then those same objects where that was possible. Never use it under
    ``vmap`` or when the inputs must survive. ``weights`` is a name -> tensor dict with its
    ``cfg`` (default ``ArchConfig()``), or a ``MetaNetwork``, which brings its own config.
    ``native`` says whether the fast path may use the compiled CPU kernel where it can run
    (float32 on the CPU, in place, outside autograd); ``None`` (default) leaves it to the
    ``LEARNED_OPT_NATIVE`` environment variable (on unless it is 0/off/false/no). ``triton``
    likewise for the Triton kernels (:mod:`learned_opt.triton_kernels`, the ``gpu`` extra;
    float32 on a GPU, in place); ``None`` leaves it to ``LEARNED_OPT_TRITON`` (off unless it is
    1: they are tested only through Triton's interpreter so far). Where both may run, Triton
    takes the tensor.

    ``shard`` (:class:`learned_opt.fast.Sharding`): ``params``, ``grads`` and the accumulators
    are this rank's pieces of tensors sharded over a process group (what
    :class:`~learned_opt.LearnedOptimizer` passes for DTensor parameters); every per-tensor
    statistic is then reduced over the group, so each element's update equals a one-process
    step on the whole tensors. Fast path only.

    ``hold`` (a () bool tensor on the parameters' device): where True the step changes nothing,
    neither the parameters nor the state, and non-finite gradients are read as 0 on the way; the
    decision stays on the device, so a caller that computes "any gradient non-finite" there
    skips such a step without a host synchronisation (the decays are 1, the lr 0, the gradients
    read times 0, the small states kept). Fast path, one process, without the compiled CPU
    kernel.
    """
    weights, cfg, lrs, wds = _checked(weights, cfg, impl, params, grads, state, lr, weight_decay)
    n = len(params)
    if isinstance(loss, Tensor) and loss.numel() != 1:
        raise ValueError(f"a loss must be a scalar, got shape {tuple(loss.shape)}")
    if hold is not None and (impl == "reference" or shard is not None):
        raise ValueError("hold runs on the fast path of one process only (impl='fast', no shard)")
    if impl == "reference":
        if shard is not None:
            raise ValueError("sharded parameters run on the fast path only (impl='fast')")
        return reference.step(weights, params, grads, state, loss=loss, lrs=lrs, wds=wds, maximize=maximize, cfg=cfg)
    if shard is not None and (len(shard.full_shapes) != n or len(shard.sharded) != n):
        raise ValueError(f"the sharding describes {len(shard.full_shapes)} tensors, got {n}")
    sizes = [p.numel() for p in params] if shard is None else [s.numel() for s in shard.full_shapes]
    active = [i for i in range(n) if sizes[i] > 0]
    if not active:
        return list(params), state
    if shard is not None:
        shard = fast.Sharding(shard.group, tuple(shard.full_shapes[i] for i in active),
                              tuple(shard.sharded[i] for i in active))
    loss = None if loss is None else _as_scalar(loss, state.glob.step.device)
    passes = (functools.partial(fast.tensor_statistics, chunk_size=chunk_size, inplace=inplace, shard=shard,
                                use_native=_native_allowed(native), use_triton=_triton_allowed(triton)),
              functools.partial(fast.mlp_update, chunk_size=chunk_size, shard=shard))
    new_p, glob, tensors = _orchestrate(passes, weights, [params[i] for i in active], [grads[i] for i in active],
                                        [state.tensors[i] for i in active], state.glob, loss,
                                        [lrs[i] for i in active], [wds[i] for i in active], maximize, cfg, shard,
                                        scale_in_passes=True, hold=hold)
    out_params, out_tensors = list(params), list(state.tensors)
    for j, i in enumerate(active):
        out_params[i] = new_p[j].to(params[i].dtype)
        out_tensors[i] = tensors[j]
    return out_params, LOptState(glob, out_tensors)


def population_step(weights: Dict[str, Tensor], params: Sequence[Tensor], grads: Sequence[Tensor],
                    state: LOptState, *, loss: Optional[Tensor] = None,
                    lr: Union[Number, Sequence[Number]] = 1e-3,
                    weight_decay: Union[Number, Sequence[Number]] = 0.0,
                    maximize: bool = False, cfg: Optional[ArchConfig] = None,
                    impl: str = "fast", native: Optional[bool] = None,
                    chunk_rows: int = batched.DEFAULT_CHUNK_ROWS):
    """:func:`lopt_step` for ``M`` members at once, each with its own meta-weights; returns
    ``(new_params, new_state)`` with the member dimension first. Equal to ``vmap(lopt_step)``
    to float rounding (tested), without ``vmap``'s cost on small tasks (:mod:`.batched`).

    Inputs, for ``M`` members and ``T`` tensors: ``weights`` each ``(M, *shape)``; ``params``
    and ``grads`` lists of ``(M, *shape_t)`` tensors; ``state`` an :class:`LOptState` whose
    fields carry the member dimension first (global scalars ``(M,)``, accumulators
    ``(M, *shape_t, D)``, ...), as ``torch.stack`` of the members' trees gives; ``loss``
    ``None`` or the members' training losses ``(M,)``. ``lr`` and ``weight_decay`` are numbers
    or one number per tensor, shared by the members. ``impl="reference"`` runs
    :mod:`.reference` member by member; ``native`` as in :func:`lopt_step`."""
    weights, cfg, lrs, wds = _checked(weights, cfg, impl, params, grads, state, lr, weight_decay)
    if not params:
        return [], state
    Mb = params[0].shape[0]
    if any(x.shape[0] != Mb for x in list(params) + list(grads)):
        raise ValueError("every parameter and gradient needs the same leading member dimension")
    if any(x[0].numel() == 0 for x in params):
        raise ValueError("population_step does not take empty tensors")
    if loss is not None:
        loss = loss.detach().to(params[0].device, torch.float64).reshape(Mb)
    if impl == "reference":
        out = [reference.step({k: v[i] for k, v in weights.items()}, [p[i] for p in params], [g[i] for g in grads],
                              _member(state, i), loss=None if loss is None else loss[i], lrs=lrs, wds=wds,
                              maximize=maximize, cfg=cfg) for i in range(Mb)]
        return _stack([o[0] for o in out]), _stack([o[1] for o in out])
    passes = (functools.partial(batched.tensor_statistics, use_native=_native_allowed(native)),
              functools.partial(batched.mlp_update, chunk_rows=chunk_rows))
    new_p, glob, tensors = _orchestrate(passes, weights, params, grads, state.tensors, state.glob, loss,
                                        lrs, wds, maximize, cfg)
    return [x.to(p.dtype) for x, p in zip(new_p, params)], LOptState(glob, tensors)


def _member(state: LOptState, i: int) -> LOptState:
    return LOptState(GlobalState(*(x[i] for x in state.glob)),
                     [TensorState(*(x[i] for x in s)) for s in state.tensors])


def _stack(trees):
    leaves = [tree_flatten(t) for t in trees]
    return tree_unflatten([torch.stack(xs) for xs in zip(*(lv for lv, _ in leaves))], leaves[0][1])


def _mean_square(x: Tensor, chunk: int = 1 << 16) -> Tensor:
    """The float64 mean of x^2, a chunk at a time (no float64 copy of a large tensor)."""
    flat = x.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for c in flat.split(chunk):
        total = total + c.to(torch.float64).pow(2).sum()
    return total / max(flat.numel(), 1)


def _orchestrate(passes, weights, P, G, tensor_states, glob: GlobalState, loss: Optional[Tensor],
                 lrs, wds, maximize: bool, cfg: ArchConfig, shard: Optional[fast.Sharding] = None,
                 scale_in_passes: bool = False, hold: Optional[Tensor] = None):
    """The step of the fast paths, for one optimizer (``glob.step`` of shape ``()``) or a
    population (global fields ``(M,)``, every tensor with the member dimension first): loss
    features, the gradients' scale, the two passes over the elements (``passes``: statistics,
    then MLP and update) around the per-tensor LSTM. Returns the new parameters (compute
    dtype), the new global state and the new tensor states. ``scale_in_passes`` (one optimizer,
    the passes of ``fast``): the passes read the gradients times the ``scale_free`` factor
    themselves, so that no scaled copy of every gradient is made. ``hold`` (one optimizer, the
    passes of ``fast``; a () bool tensor): where True the step changes nothing, decided on the
    device without a host synchronisation (see ``lopt_step``)."""
    lead = glob.step.shape
    k, f64 = len(lead), torch.float64
    dt = compute_dtype(P)
    w = {name: x.to(dt) for name, x in weights.items()}
    P = [x.to(dt) for x in P]
    G = [(-x if maximize else x).to(dt) for x in G]
    Mo = [s.mom.to(dt) for s in tensor_states]
    V = [s.rms.to(dt) for s in tensor_states]
    shapes = [x.shape[k:] for x in P] if shard is None else list(shard.full_shapes)
    numels = [s.numel() for s in shapes]
    T = len(P)

    # step 1: the loss features, and the gradients in units of the first one's RMS
    step0, from_lstm0 = glob.step, glob.from_lstm
    glob_in = glob
    grad_scale = None  # the factor the passes read the gradients with (scale_in_passes)
    if loss is None:
        train_feat = torch.zeros(lead, dtype=f64, device=step0.device)
    else:
        glob, train_feat = train_loss_statistics(glob, loss, cfg)
    if cfg.scale_free and shard is not None:
        if bool((glob.grad_ref == 0).any()):  # the same on every rank: the state is replicated
            sums = torch.stack([x.to(f64).pow(2).sum() for x in G]) * shard.mine(f64, step0.device)[:, 0]
            mean_sq = (shard.sum(sums) / torch.tensor(numels, dtype=f64, device=sums.device)).mean()
        else:
            mean_sq = torch.zeros((), dtype=f64, device=step0.device)  # unused once grad_ref is set
        glob, factor = gradient_factor(glob, mean_sq, cfg)
        G = [x * factor.to(dt) for x in G]
    elif cfg.scale_free and scale_in_passes and k == 0:
        if hold is not None:  # no host synchronisation: the mean square at every step, one multi-tensor norm
            norms = torch._foreach_norm(G)
            mean_sq = torch.stack([x.to(f64) ** 2 / max(g.numel(), 1) for x, g in zip(norms, G)]).mean()
        elif bool((glob.grad_ref == 0).any()):  # the mean square, chunk by chunk: no float64 copies
            mean_sq = torch.stack([_mean_square(x) for x in G]).mean()
        else:
            mean_sq = torch.zeros((), dtype=f64, device=step0.device)  # unused once grad_ref is set
        glob, factor = gradient_factor(glob, mean_sq, cfg)
        grad_scale = factor.to(dt)
    elif cfg.scale_free:
        mean_sq = torch.stack([x.reshape(tuple(lead) + (-1,)).to(f64).pow(2).mean(-1) for x in G]).mean(0)
        glob, factor = gradient_factor(glob, mean_sq, cfg)
        G = [x * factor.to(dt).reshape(tuple(lead) + (1,) * (x.dim() - k)) for x in G]
    valid_feat = validation_feature(glob, cfg)
    amount = clip_amount(glob, cfg).to(dt)
    extra = {} if grad_scale is None else {"grad_scale": grad_scale}
    if hold is not None:  # a held step reads every gradient times 0 (and sanitises inf * 0)
        scale = torch.ones((), dtype=dt, device=step0.device) if grad_scale is None else grad_scale
        extra = {"grad_scale": torch.where(hold, torch.zeros_like(scale), scale), "hold": hold}

    # steps 2-3: clip, accumulators, per-tensor statistics
    work, raw = passes[0](P, G, Mo, V, amount, cfg, **extra)
    glob = update_clipper(glob, raw[..., 7] / torch.tensor(numels, dtype=raw.dtype, device=raw.device), cfg)

    # step 4: the per-tensor LSTM (a population's biases broadcast over its tensors)
    wb = w if k == 0 else {**w, **{b: w[b].unsqueeze(-2) for b in ("lstm_b", "to_mlp_b", "to_shared_b")}}
    stats = lstm_statistics(raw, shapes, train_feat, valid_feat, cfg).to(dt)
    from_mlp = torch.stack([s.from_mlp.to(dt) for s in tensor_states], dim=k)
    shared = from_lstm0.to(dt).unsqueeze(-2).expand(*lead, T, -1)
    h = torch.stack([s.lstm_h.to(dt) for s in tensor_states], dim=k)
    c = torch.stack([s.lstm_c.to(dt) for s in tensor_states], dim=k)
    h, c = lstm_cell(wb, torch.cat([stats, from_mlp, shared], dim=-1), h, c)
    to_mlp = h @ w["to_mlp_w"] + wb["to_mlp_b"]
    new_from_lstm = (h @ w["to_shared_w"] + wb["to_shared_b"]).mean(-2)

    # steps 5-6: the per-element MLP and the update
    consts = tensor_constants(step0, T, raw[..., 6].to(dt), numels, to_mlp)
    new_p, messages, new_m, new_v = passes[1](work, w, consts, lrs, wds, cfg)
    tensors = [TensorState(mom=new_m[j], rms=new_v[j], lstm_h=h[..., j, :], lstm_c=c[..., j, :],
                           from_mlp=messages[..., j, :]) for j in range(T)]
    glob = glob._replace(step=glob.step + 1, from_lstm=new_from_lstm.to(f64))
    if hold is not None:  # the per-tensor and global values as they were (the passes kept the rest)
        glob = GlobalState(*(torch.where(hold, old, new) for old, new in zip(glob_in, glob)))
        tensors = [s._replace(lstm_h=torch.where(hold, o.lstm_h.to(dt), s.lstm_h),
                              lstm_c=torch.where(hold, o.lstm_c.to(dt), s.lstm_c),
                              from_mlp=torch.where(hold, o.from_mlp.to(dt), s.from_mlp))
                   for s, o in zip(tensors, tensor_states)]
    return new_p, glob, tensors
