"""The selection rule for weights and step scales: held-out seeds of six meta-training families.

For each family, ``family_vs_adam.screen_family`` trains every candidate and Adam 1e-3 on
``--tasks`` tasks drawn with the held-out seeds (a stream meta-training never draws), the loss
not passed (as most users run it). A family's score is the mean over its tasks of
log(validation loss / Adam 1e-3's); a candidate's score is the mean over the families. A
candidate is eligible only if no family scores above ``--guard`` (default +0.05: no family more
than about 5% behind Adam), since a mean alone lets the families a candidate wins hide those it
loses. The choice is the eligible candidate with the lowest score; it replaces the default only
if it also scores below the default under the same rule (include ``""``, the default, among
the candidates). compare.py's suite is run on the chosen candidate only, never used to choose.

    python benchmarks/selection.py --weights ",W1,W2@2e-3" [--tasks 4] [--steps 1000] [--jobs 2] \\
        [--out benchmarks/results/selection.json]
"""

from __future__ import annotations

import argparse
import os

from common import parallel_map, write_result
from family_vs_adam import screen_family

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ("overfit_mlp", "overfit_teacher", "mnist1d_mlp", "mnist1d_cnn", "deep_classifier", "markov_lm")


def decide(scores, guard: float) -> dict:
    """``scores[family][candidate]`` -> per candidate its mean, its worst family and whether it
    is eligible, and the chosen candidate (None where none is eligible)."""
    families = list(scores)
    candidates = list(scores[families[0]])
    table = {}
    for c in candidates:
        per = [scores[f][c] for f in families]
        worst = max(range(len(per)), key=per.__getitem__)
        table[c] = {"mean": sum(per) / len(per), "worst_family": families[worst], "worst": per[worst],
                    "eligible": per[worst] <= guard}
    eligible = [c for c in candidates if table[c]["eligible"]]
    chosen = min(eligible, key=lambda c: table[c]["mean"]) if eligible else None
    return {"candidates": table, "chosen": chosen}


def _screen(family, tasks, steps, weights, pass_loss):
    return screen_family(family, tasks, steps, weights, pass_loss, log=lambda *a: None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="comma-separated candidates, each NAME or NAME@LR; an empty "
                    "entry is the shipped default")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--guard", type=float, default=0.05)
    ap.add_argument("--loss", action="store_true", help="pass the loss to the learned optimizer")
    ap.add_argument("--jobs", type=int, default=1, help="families screened in parallel processes (1 thread each)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "selection.json"))
    args = ap.parse_args(argv)
    if args.tasks < 1 or args.steps < 1:
        ap.error("--tasks and --steps must be positive")
    families = [f for f in args.families.split(",") if f]
    weights = args.weights.split(",")
    runs = {}
    for fam, res in zip(families, parallel_map(_screen, [(f, args.tasks, args.steps, weights, args.loss)
                                                         for f in families], jobs=args.jobs)):
        runs[fam] = res
        print(fam, {k: f"{v:+.4f}" for k, v in res["valid_log_ratio_vs_adam"].items()}, flush=True)
    scores = {f: runs[f]["valid_log_ratio_vs_adam"] for f in families}
    verdict = decide(scores, args.guard)
    for c, row in verdict["candidates"].items():
        print(f"{c or 'default'}: mean {row['mean']:+.4f}, worst {row['worst']:+.4f} ({row['worst_family']}), "
              f"{'eligible' if row['eligible'] else 'not eligible'}")
    print("chosen:", verdict["chosen"] if verdict["chosen"] is not None else "none eligible")
    write_result(args.out, "selection.py", argv, {"guard": args.guard, "pass_loss": args.loss, "tasks": args.tasks,
                                                  "steps": args.steps, "scores": scores, **verdict,
                                                  "families": runs})


if __name__ == "__main__":
    main()
