"""Does the learned optimizer care how large the gradients are?

Adam's step is (up to its epsilon) the same whatever constant the loss is multiplied by; a
drop-in replacement should be as indifferent, since users write ``reduction="sum"``, weigh
their losses or scale them for mixed precision. This probe trains held-out tasks of
compare.py (same data, models, batches and seeds) with the loss multiplied by each ``--scales``
factor, for the learned optimizer at its defaults (loss passed, scaled like the gradients, as a
user's would be) and for Adam at lr 1e-3, and reports the final training loss of the unscaled
objective, mean over seeds.

    python experiments/grad_scale_probe.py [--tasks mnist1d_deep_gelu,breast_cancer_mlp]
        [--scales 0.01,0.1,1,10,100] [--seeds 3] [--weights W]

Writes experiments/results/grad_scale_probe.json.
"""

from __future__ import annotations

import argparse
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from common import write_result  # noqa: E402
from compare import TASKS, mean_final_loss  # noqa: E402


def scaled_task(name: str, factor: float) -> str:
    """Register a copy of task ``name`` whose loss is multiplied by ``factor``; returns its key."""
    spec = TASKS[name]
    key = f"{name}@x{factor:g}"
    TASKS[key] = dict(spec, loss=lambda out, y, f=spec["loss"]: factor * f(out, y))
    return key


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mnist1d_deep_gelu,breast_cancer_mlp")
    ap.add_argument("--scales", default="0.01,0.1,1,10,100")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--weights", default=None, help="learned optimizer weights (default: shipped)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "grad_scale_probe.json"))
    args = ap.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    if any(not s > 0 for s in scales):
        ap.error("--scales must be positive")
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        ap.error(f"unknown tasks {unknown}; choose from {sorted(TASKS)}")
    torch.set_num_threads(args.threads)
    result = {"scales": scales, "weights": args.weights, "tasks": {}}
    for task in args.tasks.split(","):
        rows = {}
        for factor in scales:
            key = scaled_task(task, factor)
            for kind, lr in (("learned", None), ("adam", 1e-3)):
                row = mean_final_loss(key, kind, lr, args.seeds, args.weights, divide_by=factor)
                rows.setdefault(kind, {})[f"{factor:g}"] = row
                print(f"{task} x{factor:g} {kind}: {row['mean']:.4g}", flush=True)
        result["tasks"][task] = rows
    write_result(args.out, "grad_scale_probe.py", argv, result)


if __name__ == "__main__":
    main()
