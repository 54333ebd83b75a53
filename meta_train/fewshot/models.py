"""Few-shot models as pure functions of their parameters.

A :class:`FunctionalModel` has ``init(seed) -> params`` and
``forward(params, x, step, stats=None) -> (output, batch_stats)``. ``step`` is the number of
inner updates made so far (0 for the support pass before any update); models with per-step
batch-norm weights (MAML++) use it to pick theirs. Batch norm is written by hand so that
``vmap`` over tasks and second-order gradients are right (see docs/fewshot.md).
``from_module`` wraps any ``nn.Module`` of the user's (buffers are held fixed).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Params = Dict[str, Tensor]


class FunctionalModel:
    """init/forward, plus which parameters the inner loop adapts."""

    def __init__(self, init: Callable[[int], Params], forward: Callable, outer_only: Tuple[str, ...] = (),
                 n_stats: int = 0, name: str = "model"):
        self.init, self.forward, self.outer_only, self.n_stats, self.name = init, forward, outer_only, n_stats, name

    def inner_names(self, params: Params) -> List[str]:
        return [k for k in params if k not in self.outer_only]


def from_module(module: nn.Module, name: Optional[str] = None) -> FunctionalModel:
    """Any nn.Module (no batch-norm running statistics are updated; buffers stay as they are)."""
    buffers = dict(module.named_buffers())
    template = {k: v.detach().clone() for k, v in module.named_parameters()}

    def init(seed: int) -> Params:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in module.modules():
                if hasattr(m, "reset_parameters") and m is not module:
                    m.reset_parameters()
            out = {k: v.detach().clone() for k, v in module.named_parameters()}
        with torch.no_grad():  # leave the user's module as it was
            for k, v in module.named_parameters():
                v.copy_(template[k])
        return out

    def forward(params, x, step=0, stats=None):
        return torch.func.functional_call(module, (params, buffers), (x,)), []

    return FunctionalModel(init, forward, name=name or type(module).__name__)


def batch_norm(h: Tensor, weight: Tensor, bias: Tensor, stats: Optional[Tuple[Tensor, Tensor]],
               eps: float = 1e-5) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Batch norm over (N, H, W) per channel with batch statistics, or the given (mean, var)."""
    dims = [0] + list(range(2, h.dim()))
    mean = h.mean(dims)
    var = h.var(dims, unbiased=False)
    use_mean, use_var = (mean, var) if stats is None else stats
    shape = [1, -1] + [1] * (h.dim() - 2)
    out = (h - use_mean.view(shape)) * torch.rsqrt(use_var.view(shape) + eps)
    return out * weight.view(shape) + bias.view(shape), (mean.detach(), var.detach())


def conv4(ways: int, channels: int = 64, in_channels: int = 1, image: int = 28, per_step_bn: int = 0,
          max_pool: bool = True) -> FunctionalModel:
    """The standard 4-block few-shot network: [3x3 conv, batch norm, ReLU, 2x2 max-pool] x 4 and a
    linear head. ``per_step_bn=S`` gives each of the S+1 forward passes of an inner loop its own
    batch-norm weights and biases (MAML++ BNWB; these are then learned only in the outer loop)."""
    size = image
    for _ in range(4):
        size = size // 2
    feat = channels * size * size

    def init(seed: int) -> Params:
        g = torch.Generator().manual_seed(seed)
        p: Params = {}
        c_in = in_channels
        for i in range(4):
            fan_in = c_in * 9
            p[f"conv{i}.weight"] = torch.randn(channels, c_in, 3, 3, generator=g) * math.sqrt(2.0 / fan_in)
            p[f"conv{i}.bias"] = torch.zeros(channels)
            shape = (per_step_bn + 1, channels) if per_step_bn else (channels,)
            p[f"bn{i}.weight"] = torch.ones(shape)
            p[f"bn{i}.bias"] = torch.zeros(shape)
            c_in = channels
        p["head.weight"] = torch.randn(ways, feat, generator=g) * math.sqrt(1.0 / feat)
        p["head.bias"] = torch.zeros(ways)
        return p

    def forward(params: Params, x: Tensor, step: int = 0, stats=None):
        h, seen = x, []
        for i in range(4):
            h = F.conv2d(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=1)
            w, b = params[f"bn{i}.weight"], params[f"bn{i}.bias"]
            if per_step_bn:
                w, b = w[min(step, per_step_bn)], b[min(step, per_step_bn)]
            h, st = batch_norm(h, w, b, None if stats is None else stats[i])
            seen.append(st)
            h = F.relu(h)
            h = F.max_pool2d(h, 2) if max_pool else h
        return F.linear(h.flatten(1), params["head.weight"], params["head.bias"]), seen

    outer_only = tuple(f"bn{i}.{k}" for i in range(4) for k in ("weight", "bias")) if per_step_bn else ()
    return FunctionalModel(init, forward, outer_only=outer_only, n_stats=4, name=f"conv4-{channels}")


def sine_mlp(hidden: int = 40) -> FunctionalModel:
    """The 1-40-40-1 ReLU regressor of the sinusoid benchmark."""
    module = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                           nn.Linear(hidden, 1))
    return from_module(module, name=f"mlp-1-{hidden}-{hidden}-1")
