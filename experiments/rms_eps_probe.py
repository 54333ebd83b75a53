"""How the eps of ``1/sqrt(v + eps)`` changes what trained weights do.

The MLP's unscaled ``m/sqrt(v + eps)`` columns are meant to say how far each element's averaged
gradient stands above its noise, whatever the gradient's size. With the reference's eps of 1e-6
that holds only for gradients above about 1e-3: below, the columns shrink with the gradient, so
small gradients (deep layers on a plateau, a loss near zero) look like a noise floor. This probe
trains held-out tasks of compare.py (same data, models, batches and seeds) with one weights file
read at each ``--eps`` (the weights themselves unchanged, ``MetaNetwork.with_rms_eps``), loss
passed and not passed, and reports the final training loss, mean over seeds, beside Adam at lr
1e-3.

    python experiments/rms_eps_probe.py [--weights W] [--eps 1e-6,1e-8,1e-10,1e-12]
        [--tasks mnist1d_deep_gelu,breast_cancer_mlp,wine_long] [--seeds 3]

Writes experiments/results/rms_eps_probe.json.
"""

from __future__ import annotations

import argparse
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from common import write_result  # noqa: E402
from compare import TASKS, mean_final_loss  # noqa: E402

from learned_opt import load_weights  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="learned optimizer weights (default: shipped)")
    ap.add_argument("--eps", default="1e-6,1e-8,1e-10,1e-12")
    ap.add_argument("--tasks", default="mnist1d_deep_gelu,breast_cancer_mlp,wine_long")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "rms_eps_probe.json"))
    args = ap.parse_args(argv)
    try:
        eps_list = [float(e) for e in args.eps.split(",")]
    except ValueError:
        ap.error(f"--eps must be comma-separated numbers, got {args.eps!r}")
    if any(not (0 < e < float("inf")) for e in eps_list):
        ap.error("--eps must be positive and finite")
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown tasks {unknown}; choose from {sorted(TASKS)}")
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    torch.set_num_threads(args.threads)
    net, info = load_weights(args.weights)
    result = {"weights": info.name, "weights_checksum": info.checksum, "eps": eps_list,
              "own_eps": info.config.rms_eps, "tasks": {}}
    for task in tasks:
        rows = {}
        rows["adam_1e-3"] = mean_final_loss(task, "adam", 1e-3, args.seeds, None)
        print(f"{task} adam 1e-3: {rows['adam_1e-3']['mean']:.4g}", flush=True)
        for eps in eps_list:
            moved = net.with_rms_eps(eps)
            for kind in ("learned", "learned_noloss"):
                row = mean_final_loss(task, kind, None, args.seeds, moved)
                rows.setdefault(kind, {})[f"{eps:g}"] = row
                print(f"{task} eps {eps:g} {kind}: {row['mean']:.4g}", flush=True)
        result["tasks"][task] = rows
    write_result(args.out, "rms_eps_probe.py", argv, result)


if __name__ == "__main__":
    main()
