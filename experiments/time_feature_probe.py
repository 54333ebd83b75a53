"""Do the step features explain the learned optimizer's plateau on long runs?

The MLP sees sin(t / (tau pi)) for timescales tau up to 1e5 (``learned_opt.config.TIMESCALES``).
Meta-training horizons stop at 2,000 steps, so on the 10,000-step held-out task of compare.py
some of these inputs reach values that meta-training never showed (for tau = 3,000: 0.87 at
step 10,000 against at most 0.21 by step 2,000). This probe runs that task (or others) with
the step features as they are and with the step held at ``--cap`` (default 2,000) inside the
features only, which changes nothing up to that step; Adam at lr 1e-3 runs beside them. If the
held features close the gap to Adam, the plateau comes from the out-of-range inputs.

    python experiments/time_feature_probe.py [--tasks wine_long] [--cap 2000] [--seeds 3]

Writes experiments/results/time_feature_probe.json (final training loss per seed and the
training-loss curve every tenth of the run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from common import wrapped, write_result  # noqa: E402
from compare import run_one  # noqa: E402

from learned_opt import features  # noqa: E402


def step_features_held_at(cap: float):
    """Within the block the step sinusoids see min(step, cap); everything else sees the step."""
    return wrapped(features, "step_sinusoids",
                   lambda original: lambda step, dtype: original(step.clamp(max=cap), dtype))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="wine_long")
    ap.add_argument("--cap", type=float, default=2000.0, help="step the features are held at")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "time_feature_probe.json"))
    args = ap.parse_args(argv)
    if args.cap <= 0:
        ap.error("--cap must be positive")
    torch.set_num_threads(args.threads)
    variants = {"learned": ("learned", None), "learned_held": ("learned", args.cap),
                "learned_noloss": ("learned_noloss", None), "learned_noloss_held": ("learned_noloss", args.cap),
                "adam@0.001": ("adam", None)}
    result = {"cap": args.cap, "tasks": {}}
    for task in args.tasks.split(","):
        rows = {}
        for seed in range(args.seeds):  # the variants alternate within a seed
            for name, (kind, cap) in variants.items():
                with step_features_held_at(cap) if cap else contextlib.nullcontext():
                    r = run_one(task, kind, 1e-3 if kind == "adam" else None, seed, None, curve_points=10)
                rows.setdefault(name, []).append({"seed": seed, "final_train_loss": r["final_train_loss"],
                                                  "curve": r["curve"], "curve_every": r["curve_every"]})
                print(f"{task} {name} seed {seed}: {r['final_train_loss']:.4g}", flush=True)
        means = {k: statistics.mean(x["final_train_loss"] for x in v) for k, v in rows.items()}
        result["tasks"][task] = {"mean_final_train_loss": means, "runs": rows}
        print(task, {k: f"{v:.4g}" for k, v in means.items()}, flush=True)
    write_result(args.out, "time_feature_probe.py", argv, result)


if __name__ == "__main__":
    main()
