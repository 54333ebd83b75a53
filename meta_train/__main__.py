"""Command line: ``python -m meta_train {train,eval,plot,families} ...``."""

from __future__ import annotations

import argparse
import json
import os


def _add_train_args(ap):
    from .population import UnrollSettings
    from .trainer import MetaTrainConfig
    d, u = MetaTrainConfig(), UnrollSettings()
    ap.add_argument("--out", required=True, help="output folder (checkpoints, log.jsonl, weights)")
    ap.add_argument("--family", default=d.family, help="task family, or several joined by '+'")
    ap.add_argument("--scale-augment", action="store_true", help="random per-tensor parameter scales")
    ap.add_argument("--loss-scale-augment", action="store_true",
                    help="each task's loss times a random factor in [1e-2, 1e2] (needs the log transform)")
    ap.add_argument("--estimator", choices=["tes", "pes"], default=d.estimator)
    ap.add_argument("--sigma", type=float, default=d.sigma)
    ap.add_argument("--pairs", type=int, default=d.pairs, help="antithetic pairs in the population")
    ap.add_argument("--groups", type=int, default=d.groups, help="tasks trained at once")
    ap.add_argument("--outer", default=d.outer, help="'adam', 'self', or saved weights (name or path)")
    ap.add_argument("--outer-lr", type=float, default=d.outer_lr)
    ap.add_argument("--steps", type=int, default=d.steps, help="outer steps (the budget)")
    ap.add_argument("--init", default=d.init, help="starting weights: name, path or 'random'")
    ap.add_argument("--snr-stats", action="store_true",
                    help="train the architecture with the two signal-to-noise LSTM inputs; starting "
                         "weights without them get them at zero weight (the same updates at first)")
    ap.add_argument("--absolute-snr", action="store_true",
                    help="train the architecture whose MLP sees m/sqrt(v) unscaled (ArchConfig.absolute_snr); "
                         "starting weights keep their values")
    ap.add_argument("--dual-snr", action="store_true",
                    help="train the architecture whose MLP sees m/sqrt(v) both scaled and unscaled "
                         "(ArchConfig.dual_snr); starting weights without the unscaled inputs get them at zero weight")
    ap.add_argument("--magnitude-rate", type=float, default=0.0,
                    help="rate of the step's magnitude path, update = lr * d * exp(rate * mag) "
                         "(ArchConfig.magnitude_rate); starting weights at another rate are rescaled to "
                         "give the same updates. 0: the starting weights' own")
    ap.add_argument("--rms-eps", type=float, default=0.0,
                    help="eps of 1/sqrt(v + eps) in the features (ArchConfig.rms_eps); starting weights keep "
                         "their values, so their updates change. 0: the starting weights' own")
    ap.add_argument("--freeze-untouched", action="store_true",
                    help="elements that never had a non-zero gradient take no step (ArchConfig.freeze_untouched)")
    ap.add_argument("--scale-free", action="store_true",
                    help="the step does not depend on the loss's scale (ArchConfig.scale_free); "
                         "starting weights keep their values")
    ap.add_argument("--unit-rms-update", action="store_true",
                    help="each tensor's direction output divided by its RMS (ArchConfig.unit_rms_update)")
    ap.add_argument("--sign-tolerance", type=float, default=None,
                    help="the LSTM reads the sign of a per-tensor mean as 0 within this tolerance times its RMS "
                         "(ArchConfig.sign_tolerance); starting weights keep their values. Default: the weights' own")
    ap.add_argument("--train-only", default=d.train_only, metavar="NAMES",
                    help="comma-separated weight tensors to perturb and train (e.g. mlp_w2,mlp_b2); the others "
                         "keep their starting values. Fewer perturbed weights give a less noisy estimate")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    ap.add_argument("--ema", type=float, default=d.ema,
                    help="also keep an exponential moving average of the weights with this decay "
                         "(e.g. 0.999), written as weights-ema.safetensors; 0: none. May be changed on resume")
    ap.add_argument("--unroll", type=int, default=u.unroll, help="inner steps per truncation")
    ap.add_argument("--min-horizon", type=int, default=u.min_horizon)
    ap.add_argument("--max-horizon", type=int, default=u.max_horizon)
    ap.add_argument("--inner-lr", type=float, default=u.inner_lr)
    ap.add_argument("--meta-loss", choices=["train", "valid"], default=u.meta_loss)
    ap.add_argument("--loss-transform", choices=["log", "none"], default=u.loss_transform)
    ap.add_argument("--valid-every", type=int, default=u.valid_every)
    ap.add_argument("--valid-prob", type=float, default=u.valid_prob,
                    help="chance that a task's run feeds validation losses to the optimizer (every --valid-every steps)")
    ap.add_argument("--loss-prob", type=float, default=u.loss_prob,
                    help="chance that a truncation passes the training loss to the optimizer")
    ap.add_argument("--late-weight", type=float, default=u.late_weight,
                    help="weight inner step t's loss by (P+1) * (t/horizon)^P in the meta-loss: 0 (default) "
                         "weighs every step alike, larger P moves the objective towards the final loss")
    ap.add_argument("--versus-adam", type=float, default=u.versus_adam, metavar="K",
                    help="run Adam beside the members and count each inner step as "
                         "softplus(K (log L - log L_Adam + margin)) / K: steps where the learned optimizer "
                         "is far ahead of Adam count little (0, default: plain log L); with --meta-loss valid, "
                         "both are validation losses")
    ap.add_argument("--adam-lr", type=float, default=u.adam_lr, help="lr of the Adam runs of --versus-adam")
    ap.add_argument("--adam-margin", type=float, default=u.adam_margin,
                    help="log of the lead over Adam where --versus-adam's hinge turns")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    ap.add_argument("--workers", type=int, default=1, help="local worker processes (gloo)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: default)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a worker waits for the others")


def cmd_train(args):
    from .distributed import free_port, worker
    args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "fn"})  # picklable
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
    elif args.workers > 1:
        import torch.multiprocessing as mp
        mp.spawn(worker, args=(args.workers, args, free_port()), nprocs=args.workers, join=True)
    else:
        worker(0, 1, args, None)


def cmd_eval(args):
    from .evaluate import evaluate
    res = evaluate(args.weights, args.family, args.tasks, args.steps, pass_loss=not args.no_loss)
    for w, r in res.items():
        print(f"{w}: mean meta-objective {r['mean_meta_objective']:.4f} over {len(r['tasks'])} "
              f"held-out tasks ({r['diverged']} diverged)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"family": args.family, "tasks": args.tasks, "steps": args.steps,
                       "pass_loss": not args.no_loss, "results": res}, f, indent=1)


def cmd_plot(args):
    from .plot import plot_runs
    plot_runs(args.runs, args.out, labels=args.labels)
    print(f"wrote {args.out}")


def cmd_families(args):
    from .tasks import family_names
    print("\n".join(family_names()))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m meta_train", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="meta-train learned-optimizer weights")
    _add_train_args(tr)
    tr.set_defaults(fn=cmd_train)
    ev = sub.add_parser("eval", help="compare weights on held-out tasks of a family")
    ev.add_argument("weights", nargs="+", help="weights names or paths")
    ev.add_argument("--family", required=True)
    ev.add_argument("--tasks", type=int, default=8)
    ev.add_argument("--steps", type=int, default=300)
    ev.add_argument("--no-loss", action="store_true", help="do not pass the loss to the optimizer")
    ev.add_argument("--json", help="write the results here")
    ev.set_defaults(fn=cmd_eval)
    pl = sub.add_parser("plot", help="plot meta-training curves (log.jsonl) to PNG")
    pl.add_argument("runs", nargs="+", help="run folders")
    pl.add_argument("--out", required=True)
    pl.add_argument("--labels", nargs="*")
    pl.set_defaults(fn=cmd_plot)
    fa = sub.add_parser("families", help="list the built-in task families")
    fa.set_defaults(fn=cmd_families)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
