"""Tasks that over-fit: small training sets, some with noisy labels, validated on held-out rows.

A learned optimizer meta-trained only on training loss learns to drive it to zero as fast as
it can, and on a small training set that means memorising it: growing weights, confident
wrong answers on new data. These families give the validation meta-objective
(``--meta-loss valid``) something to push against: each task trains on 64 to 800 examples (with
up to a fifth of their labels replaced by random ones) and is scored on rows it never trains on.

* ``overfit_mlp``: MLPs (1-3 hidden layers of 32-128 units) on a subset of MNIST-1D's
  meta-training rows, validated on its 500 held-out rows;
* ``overfit_teacher``: MLPs on Gaussian points labelled by a random teacher network, validated
  on 512 fresh points from the same teacher.

Kept apart from ``benchmarks/``' held-out suites: no task here uses their data sets other than
MNIST-1D's meta-training rows, their architectures or their training-set sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Task, TaskFamily, generator
from .synthetic import ACTIVATIONS, _choice, mlp


def noisy_labels(y: torch.Tensor, fraction: float, classes: int, gen: torch.Generator) -> torch.Tensor:
    """``y`` with a ``fraction`` of its entries (chosen by ``gen``) replaced by random classes."""
    flip = torch.rand(y.shape, generator=gen) < fraction
    return torch.where(flip, torch.randint(0, classes, y.shape, generator=gen), y)


def _draw(g):
    n = int(_choice(g, [64, 128, 256, 512, 800]))
    noise = float(_choice(g, [0.0, 0.0, 0.1, 0.2]))
    width = int(_choice(g, [32, 64, 128]))
    depth = int(_choice(g, [1, 2, 3]))
    act = _choice(g, sorted(ACTIVATIONS))
    bs = int(_choice(g, [16, 32, 64]))
    return n, noise, width, depth, act, min(bs, n)


def overfit_mlp(seed: int) -> Task:
    from .mnist1d import _data
    g = generator(401, seed)
    n, noise, width, depth, act, bs = _draw(g)
    (xtr, ytr), valid = _data()
    idx = torch.randperm(xtr.shape[0], generator=generator(402, seed))[:n]
    y = noisy_labels(ytr[idx], noise, 10, generator(403, seed))
    return Task.from_module(f"overfit-mlp-n{n}-noise{noise:g}-{act}-w{width}-d{depth}-b{bs}",
                            lambda: mlp([40] + [width] * depth + [10], act), nn.functional.cross_entropy,
                            (xtr[idx], y), valid, batch_size=bs, family="overfit_mlp",
                            train_size=n, label_noise=noise)


def overfit_teacher(seed: int) -> Task:
    g = generator(411, seed)
    n, noise, width, depth, act, bs = _draw(g)
    d_in = int(_choice(g, [8, 24, 64]))
    classes = int(_choice(g, [2, 5, 10]))
    gen = generator(412, seed)
    x = torch.randn(n + 512, d_in, generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (), generator=g)))
        teacher = mlp([d_in, 32, classes], "tanh")
        with torch.no_grad():
            teacher[0].weight.mul_(2.0)
            y = teacher(x).argmax(-1)
    ytr = noisy_labels(y[:n], noise, classes, generator(413, seed))
    return Task.from_module(f"overfit-teacher-n{n}-noise{noise:g}-d{d_in}-c{classes}-{act}-w{width}-d{depth}-b{bs}",
                            lambda: mlp([d_in] + [width] * depth + [classes], act), nn.functional.cross_entropy,
                            (x[:n], ytr), (x[n:], y[n:]), batch_size=bs, family="overfit_teacher",
                            train_size=n, label_noise=noise)


OVERFIT_MLP = TaskFamily("overfit_mlp", overfit_mlp)
OVERFIT_TEACHER = TaskFamily("overfit_teacher", overfit_teacher)
