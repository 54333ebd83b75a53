"""MLPs on small image data: the 8x8 handwritten digits bundled with scikit-learn (optional
extra ``data``; 1797 images, 10 classes; nothing is downloaded)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .base import Task, TaskFamily, generator
from .synthetic import ACTIVATIONS, _choice, mlp


@functools.lru_cache(maxsize=1)
def load_digits():
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise ImportError("image tasks need scikit-learn: pip install 'learned_opt[data]'") from None
    d = _load()
    x = torch.as_tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(d.target).long()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def digits_mlp(seed: int) -> Task:
    g = generator(301, seed)
    width = int(_choice(g, [32, 64, 128]))
    depth = int(_choice(g, [1, 2]))
    act = _choice(g, sorted(ACTIVATIONS))
    bs = int(_choice(g, [32, 64, 128]))
    train, valid = load_digits()
    return Task.from_module(f"digits-mlp-{act}-w{width}-d{depth}-b{bs}",
                            lambda: mlp([64] + [width] * depth + [10], act),
                            nn.functional.cross_entropy, train, valid, batch_size=bs,
                            family="digits_mlp")


DIGITS_MLP = TaskFamily("digits_mlp", digits_mlp)
