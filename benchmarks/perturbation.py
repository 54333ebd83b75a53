"""How much does rounding noise steer the optimizer? Two runs whose gradients differ by a relative
1e-6 (what compiling the model, another reduction order or another GPU changes), as a multiple
of Adam's divergence under the same perturbation.

Each optimizer trains a small classifier (an MLP with a softmax output, whose output bias has a
mean gradient that is zero in exact arithmetic) twice from the same initialisation on the same
batches; in the second run every gradient is multiplied elementwise by (1 + 1e-6 * noise) with a
fixed noise. Reported: the relative parameter difference ||p_a - p_b|| / ||p_a|| after 20, 100
and 300 steps, median over seeds, and its ratio to Adam's.

    python benchmarks/perturbation.py [--weights W1,W2] [--sign-tolerance 1e-4] [--seeds 5]
        [--out benchmarks/results/perturbation.json]

``--sign-tolerance T`` also runs every weights file read with ``ArchConfig.sign_tolerance = T``
(``MetaNetwork.with_options``: the same weights, the LSTM's sign inputs 0 within rounding).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from torch import nn

from common import write_result
from learned_opt import LearnedOptimizer, load_weights

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = (20, 100, 300)


def _run(make_opt, seed: int, rel: float):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(100 + seed)
    teacher = torch.randn(20, 10, generator=g)
    noise = [torch.randn(p.shape, generator=torch.Generator().manual_seed(7 + i)) for i, p in enumerate(model.parameters())]
    snaps = {}
    for t in range(1, max(CHECKPOINTS) + 1):
        x = torch.randn(32, 20, generator=g)
        loss = nn.functional.cross_entropy(model(x), (x @ teacher).argmax(-1))
        opt.zero_grad()
        loss.backward()
        if rel:
            with torch.no_grad():
                for p, n in zip(model.parameters(), noise):
                    p.grad.mul_(1 + rel * n)
        opt.step(loss=loss.detach()) if isinstance(opt, LearnedOptimizer) else opt.step()
        if t in CHECKPOINTS:
            snaps[t] = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    return snaps


def divergence(make_opt, seeds: int, rel: float = 1e-6):
    out = {t: [] for t in CHECKPOINTS}
    for s in range(seeds):
        a, b = _run(make_opt, s, 0.0), _run(make_opt, s, rel)
        for t in CHECKPOINTS:
            out[t].append(float((a[t] - b[t]).norm() / a[t].norm()))
    return {t: statistics.median(v) for t, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="", help="comma-separated weights; empty: the shipped default")
    ap.add_argument("--sign-tolerance", type=float, default=0.0,
                    help="also run each weights file with this ArchConfig.sign_tolerance")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "perturbation.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = {"adam_1e-3": divergence(lambda p: torch.optim.Adam(p, lr=1e-3), args.seeds)}
    for w in args.weights.split(","):
        net = load_weights(w or None)[0]
        variants = {w or "default": net}
        if args.sign_tolerance:
            variants[f"{w or 'default'} sign_tolerance={args.sign_tolerance:g}"] = net.with_options(
                sign_tolerance=args.sign_tolerance)
        for name, n in variants.items():
            res[name] = divergence(lambda p, n=n: LearnedOptimizer(p, weights=n), args.seeds)
    for name, r in res.items():
        ratio = {t: r[t] / max(res["adam_1e-3"][t], 1e-30) for t in CHECKPOINTS}
        r["over_adam"] = ratio
        print(f"{name:>58}: " + ", ".join(f"step {t}: {r[t]:.2e} ({ratio[t]:.0f}x Adam)" for t in CHECKPOINTS))
    write_result(args.out, "perturbation.py", argv, {"relative_perturbation": 1e-6, "seeds": args.seeds,
                                                      "results": {k: {str(t): v for t, v in r.items()}
                                                                  for k, r in res.items()}})
    return res


if __name__ == "__main__":
    main()
