"""Inner optimizers of a population: the small interface the unrolls step through.

An inner optimizer steps ``M`` stacked copies of a task's parameters (dicts of ``(M, ...)``
tensors) at once and has three methods:

* ``init(params, weights)``: its state before the first step;
* ``step(params, grads, state, weights, loss=None, t=0)``: new ``(params, state)``, changing
  nothing in place (``t`` counts inner steps from 0);
* ``to_saved(state)`` / ``from_saved(saved)``: the state as plain containers of tensors, for
  checkpoints loadable with ``weights_only=True``.

:class:`LearnedInner` is the learned optimizer (``weights`` are the members' stacked
meta-weights; the learned optimizer's own state types stay inside ``learned_opt``) and
:class:`AdamInner` plain Adam, which ``--versus-adam`` runs beside the members.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_map

from learned_opt import ArchConfig, init_state, observe_validation_loss
from learned_opt.functional import LOptState, population_step


class LearnedInner:
    """The learned optimizer for ``M`` members, each with its own meta-weights."""

    def __init__(self, cfg: ArchConfig, names, lr: float):
        self.cfg, self.names, self.lr = cfg, list(names), lr
        self._init = vmap(lambda w, p: init_state(w, [p[k] for k in self.names], cfg))
        self._observe = vmap(lambda s, v: observe_validation_loss(s, v, cfg))

    def init(self, params: Dict[str, Tensor], weights: Dict[str, Tensor]) -> LOptState:
        return self._init(weights, params)

    def step(self, params, grads, state, weights, loss: Optional[Tensor] = None, t: int = 0):
        with torch.no_grad():
            new_p, new_s = population_step(weights, [params[k] for k in self.names],
                                           [grads[k] for k in self.names], state, loss=loss, lr=self.lr,
                                           cfg=self.cfg)
        return dict(zip(self.names, new_p)), new_s

    def observe_validation(self, state, losses: Tensor):
        """Feed each member's validation loss (M,) to its optimizer's features."""
        return self._observe(state, losses)

    @staticmethod
    def to_saved(state: Optional[LOptState]):
        return None if state is None else state.to_saved()

    @staticmethod
    def from_saved(saved) -> Optional[LOptState]:
        return None if saved is None else LOptState.from_saved(saved)


class AdamInner:
    """Plain Adam (bias-corrected, as ``torch.optim.Adam`` with its defaults) on stacked
    parameters. Its state is the first and second moments; the step count is the ``t`` given."""

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def init(self, params: Dict[str, Tensor], weights: Any = None) -> Dict[str, Dict[str, Tensor]]:
        return {"m": tree_map(torch.zeros_like, params), "v": tree_map(torch.zeros_like, params)}

    def step(self, params, grads, state, weights: Any = None, loss: Optional[Tensor] = None, t: int = 0):
        b1, b2 = self.b1, self.b2
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        new_p, m, v = {}, {}, {}
        with torch.no_grad():
            for k, p in params.items():
                g = grads[k]
                m[k] = b1 * state["m"][k] + (1 - b1) * g
                v[k] = b2 * state["v"][k] + (1 - b2) * g * g
                new_p[k] = p - self.lr * (m[k] / c1) / ((v[k] / c2).sqrt() + self.eps)
        return new_p, {"m": m, "v": v}

    @staticmethod
    def to_saved(state):
        return None if state is None else {k: dict(v) for k, v in state.items()}

    @staticmethod
    def from_saved(saved):
        return None if saved is None else {k: dict(v) for k, v in saved.items()}
