"""Learned optimizer against Adam on tasks of a meta-training family.

Samples tasks from a built-in family with the held-out seeds of ``meta_train eval`` (a stream
meta-training never draws), trains each from the same initialisation and batches with every
``--weights`` file (loss passed, or not with ``--no-loss``) and with Adam at lr 1e-3, and
reports per task the mean batch loss over the last tenth of the run and the mean loss over 20
validation batches, and how many tasks each weights file wins against Adam on each. This is
where snapshots and recipes are chosen (on families' held-out seeds, never on compare.py's
suite); the held-out comparison is ``compare.py``.

    python benchmarks/family_vs_adam.py --family overfit_mlp [--tasks 8] [--steps 500] [--no-loss]
        [--weights W1,W2@3e-4] [--out benchmarks/results/family_vs_adam-overfit_mlp.json]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from common import write_result  # noqa: E402

from learned_opt import LearnedOptimizer  # noqa: E402
from meta_train.evaluate import held_out_seeds  # noqa: E402
from meta_train.tasks import get_family  # noqa: E402


def train(task, weights, steps: int, pass_loss: bool = True):
    """(mean batch loss over the last tenth of the run, mean validation loss); ``weights`` None
    means Adam at lr 1e-3, "" the shipped default; "NAME@LR" sets the learned optimizer's lr."""
    params = {k: v.clone().requires_grad_() for k, v in task.init(0).items()}
    ps = list(params.values())
    adam = weights is None
    if adam:
        opt = torch.optim.Adam(ps, lr=1e-3)
    else:
        name, _, lr = weights.partition("@")
        opt = LearnedOptimizer(ps, lr=float(lr) if lr else 1e-3, **({"weights": name} if name else {}))
    tail = []
    for t in range(steps):
        loss = task.loss(params, task.batch("train", 0, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step() if adam or not pass_loss else opt.step(loss=loss.detach())
        if t >= steps - max(1, steps // 10):
            tail.append(float(loss.detach()))
    with torch.no_grad():
        valid = statistics.mean(float(task.loss(params, task.batch("valid", 1, i))) for i in range(20))
    return statistics.mean(tail), valid


def screen_family(family: str, tasks: int, steps: int, weights, pass_loss: bool, log=print) -> dict:
    """Every weights entry (NAME, NAME@LR, "" for the default) and Adam 1e-3 on ``tasks``
    held-out tasks of ``family``. Returns the per-task rows, the win counts against Adam on the
    training tail and the validation loss, and the selection score: per weights entry, the mean
    over tasks of log(validation loss / Adam 1e-3's), lower is better (a ratio, so no task's
    loss scale dominates; a count alone hides the margins)."""
    fam = get_family(family)
    keys = [w or "default" for w in weights]
    rows = []
    wins = {m: {k: 0 for k in keys} for m in ("train_tail", "valid")}
    for seed in held_out_seeds(tasks):
        task = fam.sample(seed)
        row = {"task": task.name, "adam_1e-3": dict(zip(("train_tail", "valid"), train(task, None, steps)))}
        for w, k in zip(weights, keys):
            r = dict(zip(("train_tail", "valid"), train(task, w, steps, pass_loss)))
            row[k] = r
            for m in wins:
                wins[m][k] += r[m] < row["adam_1e-3"][m]
        rows.append(row)
        log(task.name, "  ".join(f"{k}: {v['train_tail']:.4g} ({v['valid']:.4g})" for k, v in row.items() if k != "task"))
    log_ratio = {k: sum(math.log(r[k]["valid"] / r["adam_1e-3"]["valid"]) for r in rows) / len(rows) for k in keys}
    return {"family": family, "steps": steps, "pass_loss": pass_loss, "wins_vs_adam": wins["train_tail"],
            "valid_wins_vs_adam": wins["valid"], "valid_log_ratio_vs_adam": log_ratio, "tasks": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--weights", default="", help="comma-separated weights files, each NAME or NAME@LR (the learned "
                    "optimizer's lr multiplier, default 1e-3); empty NAME: the shipped default")
    ap.add_argument("--no-loss", action="store_true", help="do not pass the loss to the learned optimizer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/family_vs_adam-FAMILY.json")
    args = ap.parse_args(argv)
    if args.tasks < 1 or args.steps < 1:
        ap.error("--tasks and --steps must be positive")
    torch.set_num_threads(args.threads)
    res = screen_family(args.family, args.tasks, args.steps, args.weights.split(","), not args.no_loss,
                        log=lambda *a: print(*a, flush=True))
    for m, label in (("wins_vs_adam", "end-of-run training loss"), ("valid_wins_vs_adam", "validation loss")):
        print(f"tasks where the learned optimizer's {label} beats Adam 1e-3:",
              {k: f"{v}/{args.tasks}" for k, v in res[m].items()})
    print("mean log(validation loss / Adam 1e-3's):", {k: f"{v:+.4f}" for k, v in res["valid_log_ratio_vs_adam"].items()})
    out = args.out or os.path.join(HERE, "results", f"family_vs_adam-{args.family}.json")
    write_result(out, "family_vs_adam.py", argv, res)


if __name__ == "__main__":
    main()
