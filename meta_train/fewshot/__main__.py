"""python -m meta_train.fewshot {train,eval} ...

  train   meta-train MAML / first-order MAML / MAML++ / iMAML (or the joint baseline), with a
          progress bar, JSON-lines log and atomic checkpoints (--resume continues exactly);
          evaluates on 600 test tasks at the end and writes eval.json
  eval    evaluate the checkpoint in --out: mean over test tasks with a 95% interval
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from .maml import CURVATURES, INNER_SOLVERS
from .train import ALGORITHMS, FewShotConfig, FewShotTrainer


def _add_config(p: argparse.ArgumentParser):
    d = FewShotConfig()
    p.add_argument("--algorithm", choices=ALGORITHMS, default=d.algorithm)
    p.add_argument("--dataset", choices=["sinusoid", "omniglot"], default=d.dataset)
    p.add_argument("--data-root", default=None, help="folder holding the Omniglot archives or their unpacked folders")
    for name in ("ways", "shots", "queries", "eval_queries", "inner_steps", "eval_inner_steps", "meta_batch", "steps",
                 "epoch_len", "seed", "checkpoint_every", "channels", "msl_epochs",
                 "derivative_annealing_epochs", "cg_steps", "inner_cg_steps"):  # derivative annealing: None = a third
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("inner_lr", "outer_lr", "min_outer_lr", "lam", "inner_clip", "hours"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--curvature", choices=CURVATURES, default=d.curvature,
                   help="iMAML: the curvature in the CG system (I + C/lam) x = g")
    p.add_argument("--inner-solver", choices=INNER_SOLVERS, default=d.inner_solver,
                   help="iMAML: the proximal inner solve, gradient steps at --inner-lr or Gauss-Newton steps "
                        "(--inner-cg-steps of CG on (G + lam I) d = g each, moving --inner-lr * d)")
    for name in ("msl", "lslr", "bn_per_step", "cosine_lr", "use_vmap"):
        p.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                       help=f"switch off {name} (MAML++ component)" if name != "use_vmap" else "loop over tasks")
    p.add_argument("--msl-final-only", action="store_true",
                   help="MAML++: after --msl-epochs, only the last inner step's query loss counts and the "
                        "intermediate query passes are skipped (as the MAML++ authors' code does; without it "
                        "the earlier steps keep their floor weight)")
    p.add_argument("--outer-cosine", action="store_true",
                   help="any algorithm: anneal the outer learning rate on a cosine from --outer-lr to "
                        "--min-outer-lr over --steps (MAML++ does by default)")
    p.add_argument("--threads", type=int, default=0)


def _config(args) -> FewShotConfig:
    return FewShotConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FewShotConfig)})


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m meta_train.fewshot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--out", required=True)
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--eval-tasks", type=int, default=600)
    _add_config(tr)
    ev = sub.add_parser("eval")
    ev.add_argument("--out", required=True, help="the training run's folder")
    ev.add_argument("--tasks", type=int, default=600)
    ev.add_argument("--inner-steps", type=int, default=0, help="adaptation steps (0: the run's)")
    ev.add_argument("--running-stats", action="store_true",
                    help="MAML++: normalise each query with the per-step running batch-norm statistics "
                         "instead of the query set's own (non-transductive)")
    ev.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if args.cmd == "train":
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            trainer = FewShotTrainer(_config(args), args.out)
            trainer.run(resume=args.resume)
        except (ValueError, RuntimeError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        res = trainer.evaluate(args.eval_tasks)
        res["config"] = dataclasses.asdict(trainer.cfg)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(res, f, indent=2)
        print(json.dumps({k: v for k, v in res.items() if k != "config"}))
        return 0

    path = os.path.join(args.out, "config.json")
    if not os.path.exists(path):
        print(f"error: {args.out} has no config.json (not a training run folder)", file=sys.stderr)
        return 2
    with open(path) as f:
        cfg = FewShotConfig(**json.load(f))
    trainer = FewShotTrainer(cfg, args.out)
    trainer.load()
    if args.running_stats:
        if not (trainer.bn_running and trainer.running is not None):
            print("error: --running-stats needs a MAML++ run with per-step batch norm that has trained",
                  file=sys.stderr)
            return 2
        trainer.use_running_stats = True
    res = trainer.evaluate(args.tasks, args.inner_steps or None)
    res["bn_statistics"] = "running" if args.running_stats else "batch"
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
