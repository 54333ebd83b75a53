"""MLPs and 1-D CNNs on MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d``
package (optional extra ``data``) and cached in memory."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .base import Task, TaskFamily, generator
from .synthetic import ACTIVATIONS, _choice, mlp


@functools.lru_cache(maxsize=1)
def load_mnist1d():
    """(x_train, y_train, x_test, y_test) as tensors; x has shape (N, 40)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ImportError("MNIST-1D tasks need the 'mnist1d' package: "
                          "pip install 'learned_opt[data]'") from None
    d = make_dataset(get_dataset_args())  # generated locally; get_dataset() would download
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return f(d["x"]), torch.as_tensor(d["y"]).long(), f(d["x_test"]), torch.as_tensor(d["y_test"]).long()


class Conv1dNet(nn.Module):
    def __init__(self, channels, act: str, length: int = 40, classes: int = 10):
        super().__init__()
        convs, c_in = [], 1
        for c in channels:
            convs.append(nn.Conv1d(c_in, c, 5, stride=2, padding=2))
            c_in = c
            length = (length + 1) // 2
        self.convs = nn.ModuleList(convs)
        self.act = ACTIVATIONS[act]()
        self.head = nn.Linear(c_in * length, classes)

    def forward(self, x):
        h = x.unsqueeze(-2)
        for conv in self.convs:
            h = self.act(conv(h))
        return self.head(h.flatten(-2))


def _data():
    xtr, ytr, xte, yte = load_mnist1d()
    # meta-training keeps the official test split out: validation is the last 500 train rows
    return (xtr[:3500], ytr[:3500]), (xtr[3500:], ytr[3500:])


def _mlp_task(seed: int, key: int, family: str, widths, depths, batches) -> Task:
    """An MLP classifier of MNIST-1D: width, depth, activation and batch size drawn in that
    order from the given choices with the family's generator ``key``."""
    g = generator(key, seed)
    width = int(_choice(g, widths))
    depth = int(_choice(g, depths))
    act = _choice(g, sorted(ACTIVATIONS))
    bs = int(_choice(g, batches))
    train, valid = _data()
    return Task.from_module(f"{family.replace('_', '-')}-{act}-w{width}-d{depth}-b{bs}",
                            lambda: mlp([40] + [width] * depth + [10], act),
                            nn.functional.cross_entropy, train, valid, batch_size=bs, family=family)


def mnist1d_mlp(seed: int) -> Task:
    return _mlp_task(seed, 201, "mnist1d_mlp", [16, 32, 64, 128], [1, 2, 3], [32, 64, 128, 256])


def mnist1d_cnn(seed: int) -> Task:
    g = generator(211, seed)
    c = int(_choice(g, [8, 16, 32]))
    n = int(_choice(g, [2, 3]))
    act = _choice(g, ["relu", "gelu", "tanh"])
    bs = int(_choice(g, [32, 64, 128]))
    train, valid = _data()
    return Task.from_module(f"mnist1d-cnn-{act}-c{c}x{n}-b{bs}",
                            lambda: Conv1dNet([c] * n, act), nn.functional.cross_entropy,
                            train, valid, batch_size=bs, family="mnist1d_cnn")


def mnist1d_wide(seed: int) -> Task:
    """One wide hidden layer (256 to 1,024 units, at most 52,234 parameters): large tensors,
    so meta-training sees tensor sizes near those of bigger models."""
    g = generator(221, seed)
    width = int(_choice(g, [256, 512, 1024]))
    act = _choice(g, sorted(ACTIVATIONS))
    bs = int(_choice(g, [32, 64, 128, 256]))
    train, valid = _data()
    return Task.from_module(f"mnist1d-wide-{act}-w{width}-b{bs}",
                            lambda: mlp([40, width, 10], act),
                            nn.functional.cross_entropy, train, valid, batch_size=bs,
                            family="mnist1d_wide")


def mnist1d_small_batch(seed: int) -> Task:
    """MLPs of 2-4 hidden layers with mini-batches of 8 or 16: noisy gradients in deeper
    networks, which the other families (batches of 32 and more, at most 3 hidden layers) do not
    show. (The held-out deep GELU task of ``benchmarks/compare.py`` has 5 hidden layers.) At most
    32,842 parameters."""
    return _mlp_task(seed, 231, "mnist1d_small_batch", [16, 32, 64, 96], [2, 3, 4], [8, 16])


MNIST1D_MLP = TaskFamily("mnist1d_mlp", mnist1d_mlp)
MNIST1D_SMALL_BATCH = TaskFamily("mnist1d_small_batch", mnist1d_small_batch)
MNIST1D_WIDE = TaskFamily("mnist1d_wide", mnist1d_wide)
MNIST1D_CNN = TaskFamily("mnist1d_cnn", mnist1d_cnn)
