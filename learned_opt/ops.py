"""The optimizer's in-place step as one ``torch.library`` custom op, ``learned_opt::step_``.

``LearnedOptimizer.step`` gathers the tensors that have a gradient, creates missing state, and
then calls this op once. ``torch.compile`` sees the op as a single node that mutates the
parameters and the state (its fake implementation returns nothing and creates nothing), so
``torch.compile(opt.step)`` and a compiled training step that calls it trace without graph
breaks, ``fullgraph=True`` included. Inside the op the step runs eagerly, as it does without
compiling: the finite check, the compiled CPU kernel or the chunked passes, the LSTM. Compiling
therefore neither speeds the step up nor slows it down; what it removes is the break in the
caller's graph.

:func:`apply_step` is the op's body, also called directly for DTensor (FSDP2) parameters,
which a custom op cannot take (their step reduces statistics over the shards' process group),
and for complex parameters, whose real views mutated by a custom op the compiler cannot carry.
"""

from __future__ import annotations

import functools
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import functional as F
from .config import ArchConfig


@functools.lru_cache(maxsize=16)
def _config(text: str) -> ArchConfig:
    return ArchConfig.from_json(text)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite. The fused per-tensor 2-norms are fast
    but overflow to inf on finite values beyond ~1e19, so a non-finite answer is confirmed
    with the exact per-tensor max-abs (slower, only then)."""
    if not tensors:
        return True
    if bool(torch.stack([x.float() for x in torch._foreach_norm(tensors, 2)]).isfinite().all()):
        return True
    return bool(finite_flag(tensors))


def finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A () bool tensor on the tensors' device: whether every element is finite, from the
    exact per-tensor max-abs (no overflow), without reading it on the host."""
    return torch.stack([x.isfinite() for x in torch._foreach_norm(tensors, float("inf"))]).all()


def _copy_all(pairs) -> None:
    """``dst.copy_(src)`` for every pair whose tensors differ, as one multi-tensor copy (one
    launch on a GPU for the many small per-tensor states, not one each)."""
    todo = [(d, s) for d, s in pairs if s is not d]
    if todo:
        dsts, srcs = zip(*todo)
        torch._foreach_copy_(list(dsts), list(srcs))


def apply_step(params: List[Tensor], grads: List[Tensor], mom: List[Tensor], rms: List[Tensor],
               lstm_h: List[Tensor], lstm_c: List[Tensor], from_mlp: List[Tensor], glob: List[Tensor],
               skips: Tensor, weights: List[Tensor], weight_names: str, loss: Optional[Tensor],
               lrs: Tensor, wds: Tensor, group_of: List[int], config: str, impl: str, chunk_size: int,
               shard: Optional[F.Sharding] = None, on_device: Optional[bool] = None) -> None:
    """One step written into the given tensors: ``params`` (real tensors: complex parameters'
    real views; gradients already negated where a group maximises), the five per-tensor state
    lists, ``glob`` (the ``GlobalState`` fields in their order) and ``skips`` (the count of
    skipped steps). If any gradient is not finite, on
    any rank of ``shard``'s group, nothing but ``skips`` changes and a ``RuntimeWarning`` says
    so. ``weight_names``: the weights' names joined by commas. ``lrs``/``wds``: one value per
    param group, ``group_of`` each tensor's group; ``chunk_size`` 0 for the default.

    ``on_device`` (default: on a CUDA device, one process, the fast path): the finite check
    and the skip stay on the device (``lopt_step``'s ``hold``), so the step makes no host
    synchronisation for them; the warning for a skipped step comes at the next step."""
    if on_device is None:
        on_device = params[0].is_cuda and shard is None and impl == "fast"
    if on_device:
        _report_held(skips)
        nonempty = [g for g in grads if g.numel()]
        finite = finite_flag(nonempty) if nonempty else torch.ones((), dtype=torch.bool, device=params[0].device)
        hold = ~finite
        skips.add_(hold.to(skips.dtype))
        _defer_report(skips, hold)
        _write_step(params, grads, mom, rms, lstm_h, lstm_c, from_mlp, glob, weights, weight_names, loss,
                    lrs, wds, group_of, config, impl, chunk_size, None, hold)
        return
    finite = all_finite([g for g in grads if g.numel()])
    if shard is not None:  # every rank skips, or none: each sees only its pieces
        flag = torch.tensor([1.0 if finite else 0.0], device=params[0].device)
        finite = bool(shard.sum(flag).item() == torch.distributed.get_world_size(shard.group))
    if not finite:
        skips.add_(1)
        warnings.warn(f"LearnedOptimizer: non-finite gradient, step skipped ({int(skips)} so far)",
                      RuntimeWarning, stacklevel=3)
        return
    _write_step(params, grads, mom, rms, lstm_h, lstm_c, from_mlp, glob, weights, weight_names, loss,
                lrs, wds, group_of, config, impl, chunk_size, shard, None)


def _write_step(params, grads, mom, rms, lstm_h, lstm_c, from_mlp, glob, weights, weight_names, loss,
                lrs, wds, group_of, config, impl, chunk_size, shard, hold) -> None:
    lr, wd = lrs.tolist(), wds.tolist()
    state = F.LOptState(F.GlobalState(*glob),
                        [F.TensorState(*t) for t in zip(mom, rms, lstm_h, lstm_c, from_mlp)])
    new_params, new_state = F.lopt_step(
        dict(zip(weight_names.split(","), weights)), params, grads, state, loss=loss,
        lr=[lr[i] for i in group_of], weight_decay=[wd[i] for i in group_of], cfg=_config(config), impl=impl,
        chunk_size=chunk_size or None, inplace=True, shard=shard, hold=hold)
    pairs = list(zip(params, new_params)) + list(zip(glob, new_state.glob))
    for dsts, srcs in zip((mom, rms, lstm_h, lstm_c, from_mlp), zip(*new_state.tensors)):
        pairs += zip(dsts, srcs)
    _copy_all(pairs)


# a step held on the device: its flag, copied to the host without waiting, is read at the next
# step of the same optimizer (keyed by its skip counter), when the copy has long finished
_held: Dict[int, tuple] = {}


def _defer_report(skips: Tensor, hold: Tensor) -> None:
    if hold.device.type == "cuda":
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(hold, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        _held[id(skips)] = (flag, done)
    else:
        _held[id(skips)] = (hold.clone(), None)


def _report_held(skips: Tensor) -> None:
    entry = _held.pop(id(skips), None)
    if entry is None:
        return
    flag, done = entry
    if done is not None:
        done.synchronize()  # the event of a copy queued one step ago, not the whole stream
    if bool(flag):
        warnings.warn(f"LearnedOptimizer: non-finite gradient, the previous step was skipped on the device "
                      f"({int(skips)} so far)", RuntimeWarning, stacklevel=3)


@torch.library.custom_op("learned_opt::step_",
                         mutates_args=("params", "mom", "rms", "lstm_h", "lstm_c", "from_mlp", "glob", "skips"))
def step_(params: List[Tensor], grads: List[Tensor], mom: List[Tensor], rms: List[Tensor],
          lstm_h: List[Tensor], lstm_c: List[Tensor], from_mlp: List[Tensor], glob: List[Tensor],
          skips: Tensor, weights: List[Tensor], weight_names: str, loss: Optional[Tensor],
          lrs: Tensor, wds: Tensor, group_of: List[int], config: str, impl: str, chunk_size: int) -> None:
    apply_step(params, grads, mom, rms, lstm_h, lstm_c, from_mlp, glob, skips, weights, weight_names,
               loss, lrs, wds, group_of, config, impl, chunk_size)


@step_.register_fake
def _step_fake(params, grads, mom, rms, lstm_h, lstm_c, from_mlp, glob, skips, weights, weight_names,
               loss, lrs, wds, group_of, config, impl, chunk_size) -> None:
    return None
