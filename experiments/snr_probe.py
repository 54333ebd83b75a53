"""What the learned optimizer's LSTM can see of the gradient's signal-to-noise ratio.

Trains held-out tasks of compare.py with the default learned optimizer (lr 1e-3) and, at a
few steps, reads each tensor's accumulators back from the optimizer state to compute:

* the share of the base statistics' 8 log-magnitude columns (``clip_log_abs`` of the means
  and variances of m, v and p, and of the norms of p and g in ``functional.lstm_statistics``)
  that sit at the clip bounds of [-5, 5]: a column at a bound tells the LSTM nothing about
  changes beyond it;
* the two columns ``ArchConfig(snr_stats=True)`` adds: log E[m^2]/E[v] and log E[g^2]/E[v]
  (here with the gradient before clipping, which on these tasks clips rarely after the first
  steps), as means over the tensors.

    python experiments/snr_probe.py [--tasks digits_mlp_600k,breast_cancer_mlp] [--out PATH]

Writes experiments/results/snr_probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from compare import TASKS  # noqa: E402
from learned_opt import ArchConfig, LearnedOptimizer  # noqa: E402
from learned_opt.config import N_LSTM_STATS  # noqa: E402
from learned_opt.features import lstm_statistics  # noqa: E402

# the columns of lstm_statistics that are clip_log_abs values (the rest are signs, shapes, losses)
LOG_COLUMNS = [0, 2, 3, 5, 6, 8, 9, 10]
SNR = ArchConfig(snr_stats=True)



def raw_statistics(p, g, m, v):
    """(8,) float64 statistics of one tensor: mean/var of m, of v (over elements and decays),
    of p, then the sums of squares of p and of g (the layout ``lstm_statistics`` reads)."""
    m, v, p, g = m.double(), v.double(), p.double(), g.double()
    return torch.stack([m.mean(), m.var(unbiased=False), v.mean(), v.var(unbiased=False),
                        p.mean(), p.var(unbiased=False), (p * p).sum(), (g * g).sum()])

def probe(opt, params):
    zero = torch.zeros((), dtype=torch.float64)
    at_bound, snr_m, snr_g = [], [], []
    for p in params:
        st = opt.state.get(p, {})
        if p.grad is None or "mom" not in st or p.numel() == 0:
            continue
        raw = raw_statistics(p.detach(), p.grad, st["mom"], st["rms"]).unsqueeze(0)
        cols = lstm_statistics(raw, [p.shape], zero, zero, SNR)[0]
        base = cols[LOG_COLUMNS]
        at_bound.append(float((base.abs() >= 5.0 - 1e-9).double().mean()))
        snr_m.append(float(cols[N_LSTM_STATS]))
        snr_g.append(float(cols[N_LSTM_STATS + 1]))
    n = len(at_bound)
    return {"log_columns_at_clip_bound": sum(at_bound) / n, "log_snr_m": sum(snr_m) / n,
            "log_snr_g": sum(snr_g) / n, "log_snr_m_per_tensor": snr_m}


def run(task_name, probe_at, seed=0):
    spec = TASKS[task_name]
    train, _ = spec["data"]()
    torch.manual_seed(1000 + seed)
    model = spec["model"]()
    params = list(model.parameters())
    opt = LearnedOptimizer(params)
    g = torch.Generator().manual_seed(2000 + seed)
    n, bs, loss_fn = train[0].shape[0], spec["batch"], spec["loss"]
    steps = max(probe_at)
    out, window = [], []
    for t in range(1, steps + 1):
        idx = torch.randint(0, n, (bs,), generator=g)
        loss = loss_fn(model(train[0][idx]), train[1][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(loss=loss.detach())
        window.append(float(loss.detach()))
        if t in probe_at:
            rec = {"step": t, "recent_train_loss": sum(window) / len(window)}
            rec.update(probe(opt, params))
            out.append(rec)
            window = []
            print(task_name, {k: (round(v, 3) if isinstance(v, float) else "...") for k, v in rec.items()},
                  flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="digits_mlp_600k,breast_cancer_mlp,mnist1d_deep_gelu,mnist1d_gru,"
                                       "sort_transformer")
    ap.add_argument("--steps", default="1,10,30,100,300,500")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "snr_probe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    probe_at = sorted(int(s) for s in args.steps.split(","))
    res = {name: run(name, probe_at) for name in args.tasks.split(",")}
    with open(args.out, "w") as f:
        json.dump({"benchmark": "snr_probe", "optimizer": "LearnedOptimizer() defaults, loss passed",
                   "command": "python experiments/snr_probe.py " + " ".join(argv or sys.argv[1:]),
                   "results": res}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
