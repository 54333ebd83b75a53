"""The held-out suite: ten training problems that meta-training never sees, each with a
training set and a held-out (validation) set.

Other data sets, architectures, losses, widths, depths and batch sizes than the meta-training
families (``meta_train/tasks``); one task has 11.4x the parameters of the largest
meta-training task, one runs 10,000 steps (5x the longest meta-training horizon). Several can
over-fit: small training sets (wine 140 rows, breast cancer 469, diabetes 342), label noise
(``digits_mlp_noisy``: 300 rows, a fifth of their labels random), long runs. No recipe,
constant or snapshot of the learned optimizer is chosen on these tasks.

``TASKS[name]`` holds ``model()`` (a fresh ``nn.Module``; the caller seeds torch), ``data()``
(``((x_train, y_train), (x_valid, y_valid))``), ``loss(out, y)``, ``batch``, ``steps``,
``about``, and ``accuracy(out, y)`` (the fraction correct) where the task has classes.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

LARGEST_META_TRAINING_TASK = 52_234  # mnist1d_wide, 1,024 units (the default's runs; 39,562 without that family)
LONGEST_META_TRAINING_HORIZON = 2_000


# ----------------------------------------------------------------------------- data


def _sk(name):
    try:
        import sklearn.datasets as d
    except ImportError:
        raise ImportError("the held-out suite needs scikit-learn and mnist1d: pip install 'learned_opt[data]'") from None
    return getattr(d, name)()


def _split(x, y, n_valid, seed=0):
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[n_valid:], y[n_valid:]), (x[:n_valid], y[:n_valid])


def digits():
    d = _sk("load_digits")
    return _split(torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target), 297)


def digits_noisy(n_train=300, noise=0.2):
    """The first ``n_train`` training rows of :func:`digits`, a ``noise`` fraction of their
    labels replaced by random digits; the held-out rows keep their true labels."""
    (x, y), valid = digits()
    g = torch.Generator().manual_seed(7)
    x, y = x[:n_train], y[:n_train].clone()
    flip = torch.rand(n_train, generator=g) < noise
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return (x, y), valid


def standardised(name, n_valid, target_too=False):
    d = _sk(name)
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    y = torch.tensor(d.target)
    if target_too:
        y = y.float()
        y = (y - y.mean()) / y.std()
    return _split(x, y, n_valid)


def mnist1d():
    from meta_train.tasks.mnist1d import load_mnist1d
    xtr, ytr, xte, yte = load_mnist1d()
    return (xtr, ytr), (xte, yte)


def sorting_sequences(n, length=10, vocab=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return x, x.sort(dim=1).values


def _autoencoder_data():
    (xtr, _), (xva, _) = digits()
    return (xtr, xtr), (xva, xva)


# ---------------------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10))

    def forward(self, x):
        return self.net(x.view(-1, 1, 8, 8))


class SeqGRU(nn.Module):
    def __init__(self, hidden=48):
        super().__init__()
        self.gru = nn.GRU(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        _, h = self.gru(x.view(x.shape[0], 10, 4))
        return self.head(h[-1])


class SortTransformer(nn.Module):
    def __init__(self, vocab=16, length=10, d=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
        self.body = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.norm(self.body(self.embed(x) + self.pos)))


def mlp(sizes, act):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------- losses


def ce(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def ce_accuracy(out, y):
    return float((out.argmax(-1) == y).float().mean())


def bce(out, y):
    return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y.float())


def bce_accuracy(out, y):
    return float(((out.squeeze(-1) > 0).long() == y).float().mean())


def mse_recon(out, y):
    return nn.functional.mse_loss(torch.sigmoid(out), y)


def mse(out, y):
    return nn.functional.mse_loss(out.squeeze(-1), y)


TASKS: Dict[str, Dict] = {
    "digits_mlp_600k": dict(model=lambda: mlp([64, 1024, 512, 10], nn.ReLU), data=digits, loss=ce,
                            accuracy=ce_accuracy, batch=64, steps=300,
                            about="sklearn digits 8x8, MLP 64-1024-512-10 ReLU (11.4x the largest meta-training task)"),
    "digits_cnn": dict(model=DigitsCNN, data=digits, loss=ce, accuracy=ce_accuracy, batch=32, steps=500,
                       about="sklearn digits, 2-layer 2-D CNN, batch 32"),
    "digits_autoencoder": dict(model=lambda: mlp([64, 32, 8, 32, 64], nn.Tanh), data=_autoencoder_data,
                               loss=mse_recon, batch=128, steps=500,
                               about="sklearn digits, tanh autoencoder 64-32-8-32-64, MSE on pixels"),
    "mnist1d_deep_gelu": dict(model=lambda: mlp([40] + [64] * 5 + [10], nn.GELU), data=mnist1d, loss=ce,
                              accuracy=ce_accuracy, batch=16, steps=500,
                              about="MNIST-1D official test split for validation, 5 hidden GELU layers, batch 16"),
    "mnist1d_gru": dict(model=SeqGRU, data=mnist1d, loss=ce, accuracy=ce_accuracy, batch=64, steps=500,
                        about="MNIST-1D read as 10 steps of 4 values by a GRU (48 units)"),
    "breast_cancer_mlp": dict(model=lambda: mlp([30, 64, 64, 1], nn.ELU), data=lambda: standardised(
        "load_breast_cancer", 100), loss=bce, accuracy=bce_accuracy, batch=32, steps=500,
        about="sklearn breast cancer (30 standardised features, 469 training rows), ELU MLP, logistic loss"),
    "sort_transformer": dict(model=SortTransformer,
                             data=lambda: (sorting_sequences(4096, seed=1), sorting_sequences(512, seed=2)),
                             loss=ce, accuracy=ce_accuracy, batch=32, steps=500,
                             about="sort 10 tokens of 16 with a pre-norm transformer layer (d=32, 2 heads)"),
    "wine_long": dict(model=lambda: mlp([13, 32, 3], nn.Tanh), data=lambda: standardised("load_wine", 38),
                      loss=ce, accuracy=ce_accuracy, batch=16, steps=10_000,
                      about="sklearn wine (140 training rows), tanh MLP, 10,000 steps (5x the longest "
                            "meta-training horizon)"),
    "digits_mlp_noisy": dict(model=lambda: mlp([64, 256, 256, 10], nn.ReLU), data=digits_noisy, loss=ce,
                             accuracy=ce_accuracy, batch=32, steps=1500,
                             about="sklearn digits, 300 training rows with 20% of labels random, MLP 64-256-256-10"),
    "diabetes_mlp": dict(model=lambda: mlp([10, 128, 128, 1], nn.SiLU),
                         data=lambda: standardised("load_diabetes", 100, target_too=True), loss=mse,
                         batch=32, steps=2000,
                         about="sklearn diabetes regression (342 training rows, standardised target), SiLU MLP, MSE"),
}
