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

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import fast, reference
from .config import ArchConfig
from .features import (clip_amount, gradient_factor, lstm_cell, lstm_statistics, observe_validation_loss,  # noqa: F401
                       tensor_constants, update_clipper, update_training_loss, validation_feature)
from .state import (GlobalState, LOptState, Number, TensorState, check_architecture, compute_dtype,  # noqa: F401
                    init_global_state, init_state, init_tensor_state, resolve_weights)

if TYPE_CHECKING:
    from .network import MetaNetwork

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
    weights, cfg = resolve_weights(weights, cfg)
    if impl not in ("fast", "reference"):
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    n = len(params)
    if len(grads) != n or len(state.tensors) != n:
        raise ValueError(f"got {n} params, {len(grads)} grads and {len(state.tensors)} states")
    if isinstance(loss, Tensor) and loss.numel() != 1:
        raise ValueError(f"a loss must be a scalar, got shape {tuple(loss.shape)}")
    lrs = _per_tensor(lr, n, "lr")
    wds = _per_tensor(weight_decay, n, "weight_decay")
    if impl == "reference":
        return reference.step(weights, params, grads, state, loss=loss, lrs=lrs, wds=wds, maximize=maximize, cfg=cfg)
    backend = fast
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
