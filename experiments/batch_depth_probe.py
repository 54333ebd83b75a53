"""Where around the held-out deep GELU task does the learned optimizer lose to Adam?

``compare.py``'s ``mnist1d_deep_gelu`` (5 hidden GELU layers of 64 units, batch 16, 500 steps)
is the held-out task every learned optimizer so far has lost to Adam at lr 1e-3. This probe
trains the same MLP at other depths and batch sizes, with the same data, steps, seeds and
measurement as ``compare.py`` (it reuses its ``run_one``), to tell depth from gradient noise.
The meta-training families use batches of 32 and more with at most 3 hidden layers, and
``mnist1d_small_batch`` batches of 8 and 16 with 2-4, so the probe is not a held-out evaluation
of its own: it is a diagnostic. Each weights file gets one column (loss passed to ``step``); Adam at 1e-3 and 3e-3
are the baselines.

    python experiments/batch_depth_probe.py [--weights A,B] [--depths 2,3,5] [--batches 8,16,32,64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))

import compare  # noqa: E402
from common import write_result  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="", help="comma-separated weights names or paths ('' : the default)")
    ap.add_argument("--depths", default="2,3,5")
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(compare.RESULTS, "batch_depth_probe"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = [w or None for w in args.weights.split(",")]
    base = compare.TASKS["mnist1d_deep_gelu"]
    cells = []
    for depth in (int(x) for x in args.depths.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            name = f"mnist1d_gelu_d{depth}_b{batch}"
            compare.TASKS[name] = dict(base, batch=batch,
                                       model=lambda d=depth: compare.mlp([40] + [64] * d + [10], nn.GELU))
            row = {"depth": depth, "batch": batch, "final_train_loss": {}}
            runs = [(f"learned:{w or 'default'}", "learned", None, w) for w in weights]
            runs += [("adam@0.001", "adam", 1e-3, None), ("adam@0.003", "adam", 3e-3, None)]
            for label, kind, lr, w in runs:
                losses = [compare.run_one(name, kind, lr, s, w)["final_train_loss"] for s in range(args.seeds)]
                row["final_train_loss"][label] = statistics.mean(losses)
            print(depth, batch, {k: round(v, 4) for k, v in row["final_train_loss"].items()}, flush=True)
            cells.append(row)
    write_result(args.out + ".json", "batch_depth_probe.py", argv,
                 {"about": "mean final training loss over seeds; GELU MLPs of width 64 on MNIST-1D, 500 steps",
                  "seeds": args.seeds, "cells": cells})
    labels = list(cells[0]["final_train_loss"])
    lines = ["| depth | batch | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for c in cells:
        best = min(c["final_train_loss"].values())
        lines.append(f"| {c['depth']} | {c['batch']} | " + " | ".join(
            (f"**{v:.4g}**" if v == best else f"{v:.4g}") for v in c["final_train_loss"].values()) + " |")
    with open(args.out + ".md", "w") as f:
        cmd = "python experiments/batch_depth_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
        f.write("Mean final training loss over seeds (bold: best in the row); loss passed to the "
                f"learned optimizer. `{cmd.strip()}`\n\n" + "\n".join(lines) + "\n")
    print("wrote", args.out + ".md")


if __name__ == "__main__":
    main()
