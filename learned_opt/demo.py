"""Train one small model twice, with LearnedOptimizer and with Adam, and compare.

    python -m learned_opt.demo [--steps 1000] [--seed 0] [--weights NAME_OR_PATH]

The task is generated locally (nothing is downloaded): 20-dimensional inputs labelled into 10
classes by a fixed random teacher network, learned by a 3-layer MLP at batch 128.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from . import DEFAULT_WEIGHTS, LearnedOptimizer


def make_data(seed: int, n_train: int = 8192, n_test: int = 2048, dim: int = 20, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, dim, generator=g)
    w1 = torch.randn(dim, 64, generator=g) / dim ** 0.5
    w2 = torch.randn(64, classes, generator=g) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(-1)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def run(name, make_opt, data, steps, seed, log_every):
    (xtr, ytr), (xte, yte) = data
    model = make_model(seed)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    curve = []
    t0 = time.perf_counter()
    for t in range(1, steps + 1):
        idx = torch.randint(0, xtr.shape[0], (128,), generator=g)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        if isinstance(opt, LearnedOptimizer):
            opt.step(loss=loss)
        else:
            opt.step()
        if t % log_every == 0 or t == steps:
            with torch.no_grad():
                curve.append((t, nn.functional.cross_entropy(model(xtr), ytr).item()))
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(xte).argmax(-1) == yte).float().mean().item()
        test_loss = nn.functional.cross_entropy(model(xte), yte).item()
    return dict(name=name, curve=curve, acc=acc, test_loss=test_loss, ms_per_step=1e3 * elapsed / steps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS, help="shipped weights name or .safetensors path")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = make_data(args.seed)
    log_every = max(1, args.steps // 5)
    print(f"Task: 3-layer MLP (20k params), synthetic 10-class data, batch 128, {args.steps} steps")
    print(f"LearnedOptimizer weights: {args.weights} (no tuning)\n")
    results = [
        run("LearnedOptimizer", lambda p: LearnedOptimizer(p, weights=args.weights), data, args.steps, args.seed, log_every),
        run("Adam lr=1e-3", lambda p: torch.optim.Adam(p, lr=1e-3), data, args.steps, args.seed, log_every),
    ]
    head = f"{'step':>6} " + " ".join(f"{r['name']:>18}" for r in results)
    print("full training-set loss")
    print(head)
    for i, (t, _) in enumerate(results[0]["curve"]):
        print(f"{t:>6} " + " ".join(f"{r['curve'][i][1]:>18.4f}" for r in results))
    print()
    print(f"{'':>6} " + " ".join(f"{r['name']:>18}" for r in results))
    print(f"{'test loss':>6} " + " ".join(f"{r['test_loss']:>18.4f}" for r in results))
    print(f"{'test acc':>6} " + " ".join(f"{r['acc']:>18.3f}" for r in results))
    print(f"{'ms/step':>6} " + " ".join(f"{r['ms_per_step']:>18.2f}" for r in results))
    return results


if __name__ == "__main__":
    main()
