"""How the learned optimizer's final loss on held-out tasks moves with its ``lr`` multiplier.

A diagnostic, not a tuning: ``compare.py`` always uses the default ``lr``. If a larger ``lr``
helps, the optimizer is too timid on that task; if a smaller one helps, it sits on a noise
floor that a shrinking step (as Adam's m/sqrt(v) gives when gradients turn noisy) would get
under. Same tasks, seeds, batches and loss passing as ``compare.py``.

    python experiments/lr_sensitivity.py [--weights a,b] [--tasks digits_mlp_600k,breast_cancer_mlp]
                                        [--lrs 3e-4,1e-3,3e-3] [--seeds 3] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from common import parallel_map  # noqa: E402
from compare import TASKS, run_one  # noqa: E402


def _one(task, lr, seed, weights):
    r = run_one(task, "learned", lr, seed, weights)
    return {k: r[k] for k in ("task", "lr", "seed", "final_train_loss", "final_valid_loss", "diverged", "curve")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="rnn-mlp-pes-mix-v1,adam-like-init-v0")
    ap.add_argument("--tasks", default="digits_mlp_600k,breast_cancer_mlp")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "lr_sensitivity.json"))
    args = ap.parse_args(argv)
    tasks, lrs, weights = args.tasks.split(","), [float(x) for x in args.lrs.split(",")], args.weights.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    torch.set_num_threads(args.threads)
    todo = [(t, lr, s, w) for w in weights for t in tasks for lr in lrs for s in range(args.seeds)]
    results = list(parallel_map(_one, todo, args.jobs, args.threads))
    table = {}
    for (t, lr, s, w), r in zip(todo, results):
        r["weights"] = w
        cell = table.setdefault(w, {}).setdefault(t, {}).setdefault(f"{lr:g}", [])
        cell.append(r["final_train_loss"])
    summary = {w: {t: {lr: statistics.mean(v) for lr, v in row.items()} for t, row in rows.items()}
               for w, rows in table.items()}
    for w, rows in summary.items():
        for t, row in rows.items():
            print(f"{w:24s} {t:20s} " + "  ".join(f"lr {lr}: {v:.4g}" for lr, v in row.items()), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "lr_sensitivity", "seeds": args.seeds, "torch": torch.__version__,
                   "mean_final_train_loss": summary, "runs": results,
                   "command": "python experiments/lr_sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:])},
                  f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
