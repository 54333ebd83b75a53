"""How much of the learned optimizer's step comes from its direction and how much from its
magnitude path.

The MLP's two per-element outputs make the step ``lr * d * exp(rate * mag)``
(``ArchConfig.magnitude_rate``). This trains held-out tasks of compare.py (seed 0, loss passed)
with the readable reference implementation and records, at a few steps, the root mean square
of ``d`` and the spread of the factor ``exp(rate * mag)`` over all elements. A factor that stays
within a hair of 1 means the step's size is set by ``d`` alone: the network then has no
multiplicative way to shrink a step.

    python experiments/magnitude_probe.py [--tasks mnist1d_deep_gelu] [--weights W ...]

Writes experiments/results/magnitude_probe.json.
"""

from __future__ import annotations

import argparse
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from common import wrapped, write_result  # noqa: E402
from compare import TASKS  # noqa: E402

from learned_opt import LearnedOptimizer, load_weights, reference  # noqa: E402


def recording_outputs(into: list):
    """Within the block every reference MLP call also appends its (n, 2) outputs (d, mag)."""
    def wrap(original):
        def mlp(w, x, cfg):
            out = original(w, x, cfg)
            into.append(out[:, :2].detach())
            return out
        return mlp
    return wrapped(reference, "_mlp", wrap)


def run(task: str, weights, probe_at):
    spec = TASKS[task]
    train, _ = spec["data"]()
    torch.manual_seed(1000)  # compare.py's seed 0
    model = spec["model"]()
    net = load_weights(weights)[0] if weights else load_weights()[0]
    rate = net.config.magnitude_rate
    opt = LearnedOptimizer(model.parameters(), weights=net, impl="reference")
    g = torch.Generator().manual_seed(2000)
    n, steps, bs, loss_fn = train[0].shape[0], spec["steps"], spec["batch"], spec["loss"]
    rows, outs = [], []
    with recording_outputs(outs):
        for t in range(steps):
            idx = torch.randint(0, n, (bs,), generator=g)
            loss = loss_fn(model(train[0][idx]), train[1][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            outs.clear()
            opt.step(loss=loss.detach())
            if t + 1 in probe_at:
                o = torch.cat(outs)
                factor = torch.exp(rate * o[:, 1])
                q = torch.quantile(factor.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
                rows.append({"step": t + 1, "batch_loss": float(loss.detach()),
                             "d_rms": float(o[:, 0].pow(2).mean().sqrt()),
                             "factor_q05": float(q[0]), "factor_median": float(q[1]), "factor_q95": float(q[2])})
                print(task, weights or "default", rows[-1], flush=True)
    return {"magnitude_rate": rate, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mnist1d_deep_gelu")
    ap.add_argument("--weights", nargs="*", default=[], help="further weights files to probe beside the default")
    ap.add_argument("--steps", default="1,10,100,250,500", help="steps to record at (comma-separated)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "magnitude_probe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    probe_at = {int(s) for s in args.steps.split(",")}
    result = {}
    for task in args.tasks.split(","):
        result[task] = {w or "default": run(task, w, probe_at) for w in [None] + args.weights}
    write_result(args.out, "magnitude_probe.py", argv, result)


if __name__ == "__main__":
    main()
