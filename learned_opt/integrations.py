"""Helpers for training frameworks that build the optimizer themselves.

:func:`register_timm` makes ``LearnedOptimizer`` one of timm's optimizers, so that timm's
``create_optimizer_v2(model, opt="learnedopt")`` and its training script (``--opt learnedopt``)
build it, with timm's parameter groups (no weight decay on biases and norms, layer decay)::

    from learned_opt.integrations import register_timm
    register_timm()
    opt = timm.optim.create_optimizer_v2(model, opt="learnedopt", lr=1e-3, weight_decay=0.05)

timm calls ``step()`` without the loss: feed it with :func:`learned_opt.observe_loss` where the
loss is computed (see the README's *Using it with ...*).
"""

from __future__ import annotations

from typing import Optional

from .optimizer import LearnedOptimizer

TIMM_NAME = "learnedopt"  # timm splits names at "_" (its "lookahead_" prefix), so none here


def timm_optim_info(name: str = TIMM_NAME):
    """timm's description of ``LearnedOptimizer`` (``timm.optim.OptimInfo``): it takes ``lr``
    and ``weight_decay`` and no ``eps``, ``betas`` or ``momentum`` (timm drops those for it)."""
    if "_" in name or "-" in name or not name:
        raise ValueError(f"timm reads '_' as a prefix separator: use a name without '_' or '-', got {name!r}")
    from timm.optim import OptimInfo
    return OptimInfo(name=name, opt_class=LearnedOptimizer,
                     description="learned_opt: per-tensor LSTM + per-parameter MLP learned optimizer",
                     has_eps=False, has_momentum=False, has_betas=False)


def register_timm(name: str = TIMM_NAME, registry: Optional[object] = None) -> None:
    """Register ``LearnedOptimizer`` with timm under ``name`` (in timm's default registry, or
    ``registry``). Registering again is a no-op."""
    info = timm_optim_info(name)
    if registry is None:
        from timm.optim import _optim_factory  # the registry create_optimizer_v2 reads
        registry = _optim_factory.default_registry
    try:
        if registry.get_optimizer_info(name).opt_class is LearnedOptimizer:
            return
    except ValueError:  # not registered yet
        pass
    registry.register(info)
