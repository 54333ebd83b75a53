"""Synthetic task families: ill-conditioned quadratics, teacher-student regression,
logistic regression, deep narrow classifiers. Data are generated from seeds: nothing to
download."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Task, TaskFamily, generator


def _log_uniform(g, low, high):
    return math.exp(math.log(low) + (math.log(high) - math.log(low)) * torch.rand((), generator=g).item())


def _choice(g, options):
    return options[int(torch.randint(0, len(options), (), generator=g).item())]


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def mlp(sizes, act: str) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


def quadratic(seed: int) -> Task:
    """0.5 * sum(lambda_i * (x_i - c_i - noise_i)^2), condition number up to 1e4."""
    g = generator(101, seed)
    dim = int(_choice(g, [10, 32, 100]))
    cond = _log_uniform(g, 1.0, 1e4)
    lam = torch.exp(torch.linspace(0, math.log(cond), dim))[torch.randperm(dim, generator=g)]
    lam = lam / lam.max()
    c = torch.randn(dim, generator=g)
    noise = _log_uniform(g, 1e-3, 1e-1)

    def init(s):
        return {"x": torch.randn(dim, generator=generator(102, seed, s))}

    def loss(params, batch):
        (eps,) = batch
        return 0.5 * (lam * (params["x"] - c - eps) ** 2).sum()

    def batch(split, s, step):
        return (noise * torch.randn(dim, generator=generator(103, split == "valid", s, step)),)

    return Task(f"quadratic-d{dim}-k{cond:.0e}", init, loss, batch, meta={"family": "quadratic"})


def teacher_student(seed: int) -> Task:
    """An MLP student regresses a random MLP teacher on Gaussian inputs (fresh data each step)."""
    g = generator(111, seed)
    d_in = int(_choice(g, [8, 16, 32]))
    width = int(_choice(g, [16, 32, 64]))
    depth = int(_choice(g, [1, 2]))
    act = _choice(g, sorted(ACTIVATIONS))
    bs = int(_choice(g, [32, 64, 128]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (), generator=g)))
        teacher = mlp([d_in, 32, 1], "tanh")
    noise = 0.05

    def batch_fn(split, s, step):
        gg = generator(112, split == "valid", s, step)
        x = torch.randn(bs, d_in, generator=gg)
        with torch.no_grad():
            y = teacher(x) + noise * torch.randn(bs, 1, generator=gg)
        return x, y

    return Task.from_module(f"teacher-student-{act}-w{width}-d{depth}-b{bs}",
                            lambda: mlp([d_in] + [width] * depth + [1], act),
                            nn.functional.mse_loss, batch_fn=batch_fn, batch_size=bs,
                            family="teacher_student")


def logistic_regression(seed: int) -> Task:
    """Binary logistic regression on two Gaussian classes with a random separation."""
    g = generator(121, seed)
    dim = int(_choice(g, [10, 50, 200]))
    bs = int(_choice(g, [32, 128]))
    w_true = torch.randn(dim, generator=g)
    w_true = w_true / w_true.norm() * _log_uniform(g, 0.5, 5.0)

    def batch_fn(split, s, step):
        gg = generator(122, split == "valid", s, step)
        x = torch.randn(bs, dim, generator=gg)
        y = (torch.rand(bs, generator=gg) < torch.sigmoid(x @ w_true)).float().unsqueeze(-1)
        return x, y

    return Task.from_module(f"logreg-d{dim}-b{bs}", lambda: nn.Linear(dim, 1),
                            nn.functional.binary_cross_entropy_with_logits,
                            batch_fn=batch_fn, batch_size=bs, family="logistic_regression")


QUADRATIC = TaskFamily("quadratic", quadratic)
TEACHER_STUDENT = TaskFamily("teacher_student", teacher_student)
LOGISTIC = TaskFamily("logistic_regression", logistic_regression)


def deep_classifier(seed: int) -> Task:
    """A deep narrow MLP (4 or 6 hidden layers) classifies a fixed set of Gaussian points
    labelled by a random teacher, with mini-batches of 8 to 24.

    With PyTorch's default initialisation the signal fades through the layers: the first
    steps sit on a plateau near chance level while the early layers' gradients are far smaller
    than the last layer's (about 40x on the held-out deep GELU task), and the small batches make
    them noisy. Adam escapes quickly because it normalises every element; an optimizer that
    sizes steps by a tensor's gradient scale does not. Widths, depths and batch sizes are
    chosen apart from the held-out deep GELU task of ``benchmarks/compare.py`` (MNIST-1D, 5
    layers of 64, batch 16), so that task differs from every one of these in data, depth, width
    and batch size. At most 37,130 parameters."""
    g = generator(131, seed)
    d_in = int(_choice(g, [16, 32, 48]))
    classes = int(_choice(g, [4, 10]))
    width = int(_choice(g, [32, 48, 80]))
    depth = int(_choice(g, [4, 6]))
    act = _choice(g, sorted(ACTIVATIONS))
    bs = int(_choice(g, [8, 12, 24]))
    gen = generator(132, seed)
    x = torch.randn(2560, d_in, generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (), generator=g)))
        teacher = mlp([d_in, 64, classes], "tanh")
        with torch.no_grad():
            teacher[0].weight.mul_(3.0)  # a teacher with curved class boundaries
            y = teacher(x).argmax(-1)
    return Task.from_module(f"deep-classifier-{act}-w{width}-d{depth}-b{bs}-c{classes}",
                            lambda: mlp([d_in] + [width] * depth + [classes], act),
                            nn.functional.cross_entropy, (x[:2048], y[:2048]), (x[2048:], y[2048:]),
                            batch_size=bs, family="deep_classifier")


DEEP_CLASSIFIER = TaskFamily("deep_classifier", deep_classifier)
