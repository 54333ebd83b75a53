"""Outer optimizers: what turns the ES gradient estimate into a new theta.

* ``adam``: ``torch.optim.Adam`` on theta (default, lr 3e-4);
* ``self``: the learned optimizer being trained updates its own weights (self-training): the
  ES estimate is its gradient and the meta-loss its loss;
* a name or path of saved learned-optimizer weights: that (fixed) learned optimizer.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from learned_opt import ArchConfig, load_weights
from learned_opt.functional import LOptState, init_state, lopt_step


class OuterOptimizer:
    def __init__(self, kind: str, theta: Dict[str, Tensor], lr: float, cfg: ArchConfig):
        self.kind, self.lr, self.cfg = kind, lr, cfg
        self.names = list(theta)
        self.fixed: Optional[Dict[str, Tensor]] = None
        if kind == "adam":
            self.adam = torch.optim.Adam(list(theta.values()), lr=lr)
        else:
            if kind != "self":
                net, _ = load_weights(kind)
                self.fixed = {k: v.detach() for k, v in net.weights().items()}
                self.cfg = net.config  # a fixed outer optimizer runs with its own architecture
            weights = self.fixed if self.fixed is not None else theta
            self.state = init_state(weights, [theta[k] for k in self.names], self.cfg)

    def step(self, theta: Dict[str, Tensor], grad: Dict[str, Tensor], meta_loss: float) -> None:
        """Update ``theta`` in place."""
        if self.kind == "adam":
            for k, p in theta.items():
                p.grad = grad[k].to(p.dtype)
            self.adam.step()
            return
        weights = self.fixed if self.fixed is not None else {k: v.clone() for k, v in theta.items()}
        new, self.state = lopt_step(weights, [theta[k] for k in self.names],
                                    [grad[k] for k in self.names], self.state,
                                    loss=meta_loss, lr=self.lr, cfg=self.cfg)
        for k, v in zip(self.names, new):
            theta[k].copy_(v)

    def state_dict(self):
        if self.kind == "adam":
            return {"adam": self.adam.state_dict()}
        return self.state.to_saved()

    def load_state_dict(self, sd) -> None:
        if self.kind == "adam":
            self.adam.load_state_dict(sd["adam"])
        else:
            self.state = LOptState.from_saved(sd)
