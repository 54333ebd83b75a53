"""The task API: what meta-training trains learned optimizers on.

A :class:`Task` is a model, a loss and data, written in plain PyTorch::

    task = Task.from_module(
        name="my-mlp",
        model_fn=lambda: nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1)),
        loss_fn=nn.functional.mse_loss,          # loss_fn(model(x), y)
        train=(x_train, y_train), valid=(x_valid, y_valid), batch_size=64)

Meta-training needs two things from it, both pure functions so that a population of tasks
can be evaluated batched under ``torch.func.vmap`` and a run can be resumed exactly:

* ``init(seed) -> {name: tensor}``: fresh parameters;
* ``loss(params, batch) -> scalar``;
* ``batch(split, seed, step) -> batch``: the batch a trajectory with data seed ``seed`` sees
  at inner step ``step`` of ``split`` ("train" or "valid"). A deterministic function of its
  arguments: this is what lets the two members of an antithetic pair see the same data and
  a resumed run see the same batches.

Data can be given as in-memory tensors (sampled with replacement) or as a callable
``batch_fn(split, seed, step)`` for data made on the fly. A :class:`TaskFamily` samples tasks
from an integer seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

Batch = Any
Params = Dict[str, Tensor]


def _mix(*ints: int) -> int:
    """A deterministic 63-bit seed from integers (independent of Python's hash seed)."""
    h = 0x9E3779B97F4A7C15
    for i in ints:
        h ^= (int(i) & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)
        h &= 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def generator(*ints: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*ints))


_SPLITS = {"train": 0, "valid": 1}


def sample_batch(data: Sequence[Tensor], batch_size: int, split: str, seed: int, step: int):
    """A batch of ``batch_size`` rows drawn with replacement, fixed by (split, seed, step)."""
    n = data[0].shape[0]
    idx = torch.randint(0, n, (batch_size,), generator=generator(_SPLITS[split], seed, step))
    return tuple(t[idx] for t in data)


@dataclasses.dataclass
class Task:
    """A model, a loss and data. See the module docstring."""

    name: str
    init: Callable[[int], Params]
    loss: Callable[[Params, Batch], Tensor]
    batch: Callable[[str, int, int], Batch]
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def arch_key(self) -> Tuple:
        """Tasks with equal keys have parameters of equal shapes (they can be stacked)."""
        p = self.init(0)
        return tuple((k, tuple(v.shape)) for k, v in p.items())

    @classmethod
    def from_module(cls, name: str, model_fn: Callable[[], nn.Module],
                    loss_fn: Callable[[Tensor, Tensor], Tensor],
                    train: Union[Sequence[Tensor], Callable] = None,
                    valid: Union[Sequence[Tensor], Callable, None] = None,
                    batch_size: int = 128, batch_fn: Optional[Callable] = None,
                    **meta) -> "Task":
        """Build a task from an ``nn.Module`` factory, ``loss_fn(output, target)`` and data.

        ``train``/``valid``: tuples ``(inputs, targets)`` of tensors (``valid`` defaults to
        ``train``), or give ``batch_fn(split, seed, step) -> (inputs, targets)`` instead.
        The module must not hold buffers that change in the forward pass (no BatchNorm
        running statistics); parameters are passed functionally.
        """
        model = model_fn()
        buffers = dict(model.named_buffers())

        def init(seed: int) -> Params:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(7, seed))
                m = model_fn()
            return {k: v.detach().clone() for k, v in m.named_parameters()}

        def loss(params: Params, batch) -> Tensor:
            x, y = batch
            out = torch.func.functional_call(model, (params, buffers), (x,))
            return loss_fn(out, y)

        if batch_fn is None:
            if train is None:
                raise ValueError("give train=(inputs, targets) or batch_fn")
            data = {"train": tuple(train), "valid": tuple(valid) if valid is not None else tuple(train)}

            def batch_fn(split, seed, step):
                return sample_batch(data[split], batch_size, split, seed, step)

        return cls(name=name, init=init, loss=loss, batch=batch_fn, meta=dict(meta, batch_size=batch_size))


def scale_parameters(task: Task, seed: int, low: float = 1e-2, high: float = 1e2) -> Task:
    """Parameter-scale augmentation: the optimizer sees ``p / s`` while the model uses ``p``,
    with one scale ``s`` per tensor drawn log-uniformly from [low, high]."""
    names = list(task.init(0))
    g = generator(11, seed)
    scales = {k: math.exp(math.log(low) + (math.log(high) - math.log(low)) * torch.rand((), generator=g).item())
              for k in names}

    def init(s):
        return {k: v / scales[k] for k, v in task.init(s).items()}

    def loss(params, batch):
        return task.loss({k: v * scales[k] for k, v in params.items()}, batch)

    return dataclasses.replace(task, name=task.name + "+scaled", init=init, loss=loss,
                               meta=dict(task.meta, param_scales=scales))


def scale_loss(task: Task, seed: int, low: float = 1e-2, high: float = 1e2) -> Task:
    """Loss-scale augmentation: the task's loss (and so its gradients) multiplied by one factor
    drawn log-uniformly from [low, high], so that the optimizer meets losses summed, weighted or
    in other units. Under the log meta-loss the factor adds a constant that the antithetic
    difference cancels: the objective is unchanged, only what the optimizer sees."""
    u = torch.rand((), generator=generator(19, seed)).item()
    factor = math.exp(math.log(low) + (math.log(high) - math.log(low)) * u)

    def loss(params, batch):
        return factor * task.loss(params, batch)

    return dataclasses.replace(task, name=f"{task.name}+loss-x{factor:.3g}", loss=loss,
                               meta=dict(task.meta, loss_scale=factor))


@dataclasses.dataclass
class TaskFamily:
    """A distribution over tasks: ``sample(seed) -> Task``."""

    name: str
    sample_fn: Callable[[int], Task]

    def sample(self, seed: int) -> Task:
        return self.sample_fn(seed)


def mixture(name: str, families: Sequence[TaskFamily], weights: Optional[Sequence[float]] = None) -> TaskFamily:
    """A family that picks one of ``families`` (by ``weights``) for each seed."""
    w = torch.tensor(weights if weights is not None else [1.0] * len(families), dtype=torch.float64)

    def sample(seed):
        i = int(torch.multinomial(w, 1, generator=generator(13, seed)).item())
        return families[i].sample(_mix(17, seed))

    return TaskFamily(name, sample)
