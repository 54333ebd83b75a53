"""The learned optimizer with no argument against what a user would pick instead, on the
held-out suite (``benchmarks/suite.py``): held-out loss and accuracy first, training loss
second.

Every optimizer trains the same initialisation on the same batches (3 seeds):

* ``learned``: ``LearnedOptimizer(model.parameters())``, the loss passed to ``step``;
* ``learned_noloss``: the same, ``step()`` called without the loss (as HF Trainer, timm and
  accelerate call it);
* ``adam``: Adam at lr 1e-4, 3e-4, 1e-3, 3e-3 and 1e-2; ``Adam 1e-3`` is the default a user
  starts from, ``Adam tuned`` the lr with the lowest mean **validation** loss per task (chosen on
  the very runs reported, which favours it);
* the peers a user picks for "no tuning", each with its own defaults: ``adamw`` (lr 1e-3,
  weight decay 1e-2), ``sf_adamw`` (schedule-free AdamW, ``schedulefree.AdamWScheduleFree``,
  lr 2.5e-3, evaluated at its averaged point) and ``prodigy`` (``pytorch_optimizer.Prodigy``,
  lr 1.0).

``--schedule cosine`` adds one run per optimizer at its default lr with a linear warm-up over
the first 5% of the steps and a cosine decay to 0 after it, through ``torch.optim.lr_scheduler``
as HF Trainer does (schedule-free AdamW gets the same warm-up through its own
``warmup_steps`` and no decay, as its authors intend). ``--loss-scales 0.01,100`` adds runs of
the learned optimizer and Adam 1e-3 with the training loss multiplied by each factor; their
held-out loss is measured unscaled.

Per run: final training and held-out loss and accuracy on fixed evaluation sets, whether it
diverged (a non-finite loss, or a final training loss above the initial one), the largest
training-loss spike in the second half (a batch loss over the median of the 100 before it),
the parameters' norm, and the optimizer's step time. Finished runs are appended to a
JSON-lines cache, so an interrupted comparison resumes; ``--baselines-from`` takes the runs that
do not depend on the learned optimizer's weights from another cache.

    python benchmarks/compare.py [--weights NAME_OR_PATH] [--tasks a,b] [--seeds 3] [--threads 1]
        [--jobs N] [--schedule constant,cosine] [--loss-scales 0.01,100] [--baselines-from RUNS]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

from common import parallel_map
from learned_opt import LearnedOptimizer
from suite import LARGEST_META_TRAINING_TASK, LONGEST_META_TRAINING_HORIZON, TASKS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ADAM_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
# kind -> the lrs of its constant-schedule runs (None: the optimizer's own default)
KINDS = {"learned": [None], "learned_noloss": [None], "adam": ADAM_LRS, "adamw": [None],
         "sf_adamw": [None], "prodigy": [None]}
PEERS = ("adamw", "sf_adamw", "prodigy")
DEFAULT_LR = {"adam": 1e-3}
WARMUP = 0.05  # of the steps, for --schedule cosine
SPIKE_WINDOW = 100


# --------------------------------------------------------------------------- running


def make_optimizer(kind, params, lr, weights, steps: int, schedule: str):
    if kind in ("learned", "learned_noloss"):  # lr None: the optimizer's default, as a user gets it
        return LearnedOptimizer(params, **({"weights": weights} if weights else {}),
                                **({"lr": lr} if lr is not None else {}))
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(params, **({"lr": lr} if lr is not None else {}))
    if kind == "sf_adamw":
        try:
            import schedulefree
        except ImportError:
            raise ImportError("compare.py's peers need schedulefree: pip install 'learned_opt[peers]'") from None
        warmup = int(WARMUP * steps) if schedule == "cosine" else 0
        return schedulefree.AdamWScheduleFree(params, warmup_steps=warmup, **({"lr": lr} if lr is not None else {}))
    if kind == "prodigy":
        try:
            from pytorch_optimizer import Prodigy
        except ImportError:
            raise ImportError("compare.py's peers need pytorch_optimizer: pip install 'learned_opt[peers]'") from None
        return Prodigy(params, lr=lr if lr is not None else 1.0)
    raise ValueError(kind)


def warmup_cosine(steps: int):
    """The lr factor at each step: linear warm-up over ``WARMUP`` of the steps, then cosine to 0."""
    warm = max(1, int(WARMUP * steps))

    def factor(t):
        if t < warm:
            return (t + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / max(1, steps - warm))))
    return factor


@torch.no_grad()
def evaluate(model, spec, data, limit=2048):
    """(loss, accuracy or None) on the first ``limit`` rows of ``data``."""
    x, y = data
    out = model(x[:limit])
    acc = spec["accuracy"](out, y[:limit]) if "accuracy" in spec else None
    return float(spec["loss"](out, y[:limit])), acc


def _set_mode(opt, train: bool):
    """Schedule-free optimizers keep two points: train at one, evaluate at the other."""
    if hasattr(opt, "train") and hasattr(opt, "eval") and not isinstance(opt, LearnedOptimizer):
        opt.train() if train else opt.eval()


def run_one(task_name: str, kind: str, lr, seed: int, weights, schedule: str = "constant",
            loss_scale: float = 1.0, curve_points: int = 100, make_opt=None) -> Dict:
    """Train one task with one optimizer, schedule, loss factor and seed. ``make_opt(model)``,
    if given, builds the optimizer instead of ``kind``/``lr``/``weights`` (``kind`` still says
    whether ``step`` gets the loss: it does for "learned")."""
    spec = TASKS[task_name]
    train, valid = spec["data"]()
    torch.manual_seed(1000 + seed)
    model = spec["model"]()
    n, steps, bs, loss_fn = train[0].shape[0], spec["steps"], spec["batch"], spec["loss"]
    opt = make_opt(model) if make_opt is not None else make_optimizer(kind, model.parameters(), lr, weights,
                                                                      steps, schedule)
    sched = None
    if schedule == "cosine" and kind != "sf_adamw":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    elif schedule != "constant" and schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    g = torch.Generator().manual_seed(2000 + seed)
    init_train = evaluate(model, spec, train)[0]
    every = max(1, steps // curve_points)
    curve, window, t_opt = [], [], 0.0
    recent = collections.deque(maxlen=SPIKE_WINDOW)
    spike = 0.0
    finite = True
    _set_mode(opt, True)
    for t in range(steps):
        idx = torch.randint(0, n, (bs,), generator=g)
        loss = loss_fn(model(train[0][idx]), train[1][idx])
        scaled = loss * loss_scale if loss_scale != 1.0 else loss
        opt.zero_grad(set_to_none=True)
        scaled.backward()
        t0 = time.perf_counter()
        if kind == "learned":
            opt.step(loss=scaled.detach())
        else:
            opt.step()
        t_opt += time.perf_counter() - t0
        if sched is not None:
            sched.step()
        v = float(loss.detach())
        if 2 * t >= steps and len(recent) == SPIKE_WINDOW:
            med = statistics.median(recent)
            if med > 0:
                spike = max(spike, v / med)
        recent.append(v)
        window.append(v)
        if (t + 1) % every == 0:
            curve.append(sum(window) / len(window))
            window = []
        if not math.isfinite(v):
            finite = False
            break
    _set_mode(opt, False)
    nan = float("nan")
    final_train, train_acc = evaluate(model, spec, train) if finite else (nan, None)
    final_valid, valid_acc = evaluate(model, spec, valid) if finite else (nan, None)
    diverged = (not finite or not math.isfinite(final_train) or not math.isfinite(final_valid)
                or final_train > init_train)
    with torch.no_grad():
        norm = math.sqrt(sum(float(p.double().pow(2).sum()) for p in model.parameters()))
    return {"task": task_name, "kind": kind, "lr": lr, "seed": seed, "schedule": schedule,
            "loss_scale": loss_scale, "initial_train_loss": init_train, "final_train_loss": final_train,
            "final_valid_loss": final_valid, "train_accuracy": train_acc, "valid_accuracy": valid_acc,
            "diverged": diverged, "max_spike": spike, "param_norm": norm,
            "ms_per_step": 1e3 * t_opt / steps, "steps": steps, "curve_every": every, "curve": curve,
            "parameters": sum(p.numel() for p in model.parameters())}


def mean_final_loss(task_name: str, kind: str, lr, seeds: int, weights, divide_by: float = 1.0) -> Dict:
    """``{"mean", "seeds"}``: the final training loss of ``run_one`` over seeds 0..seeds-1, each
    divided by ``divide_by`` (to undo a task's loss factor)."""
    finals = [run_one(task_name, kind, lr, s, weights, curve_points=10)["final_train_loss"] / divide_by
              for s in range(seeds)]
    return {"mean": sum(finals) / len(finals), "seeds": finals}


def key(r):
    return (r["task"], r["kind"], r["lr"], r["seed"], r.get("schedule", "constant"), r.get("loss_scale", 1.0))


# ------------------------------------------------------------------------- summarising


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _finite_mean(xs):
    return _mean(xs) if xs and all(x is not None and math.isfinite(x) for x in xs) else float("nan")


def _high(x):
    return x if x is not None and math.isfinite(x) else float("inf")


def agg(rs: List[Dict]) -> Dict:
    return {"valid": _finite_mean([r["final_valid_loss"] for r in rs]),
            "valid_acc": _mean([r.get("valid_accuracy") for r in rs]),
            "train": _finite_mean([r["final_train_loss"] for r in rs]),
            "param_norm": _mean([r.get("param_norm") for r in rs]),
            "max_spike": max([r.get("max_spike", 0.0) for r in rs], default=0.0),
            "ms_per_step": _mean([r["ms_per_step"] for r in rs]),
            "diverged": sum(r["diverged"] for r in rs), "seeds": len(rs)}


def _pick(runs, task, kind, lr="any", schedule="constant", loss_scale=1.0):
    return [r for r in runs if r["task"] == task and r["kind"] == kind and (lr == "any" or r["lr"] == lr)
            and r.get("schedule", "constant") == schedule and r.get("loss_scale", 1.0) == loss_scale]


def table_for(runs, tasks, schedule: str) -> Dict:
    """Per task: the learned optimizer, Adam 1e-3, Adam tuned on validation loss (constant
    schedule only), the three peers and the best of them by validation loss."""
    table = {}
    for task in tasks:
        row = {k: agg(_pick(runs, task, k, schedule=schedule)) for k in ("learned", "learned_noloss") + PEERS}
        row["adam_1e-3"] = agg(_pick(runs, task, "adam", 1e-3, schedule))
        if schedule == "constant":
            best = min(ADAM_LRS, key=lambda lr: _high(agg(_pick(runs, task, "adam", lr))["valid"]))
            row["adam_tuned"] = dict(agg(_pick(runs, task, "adam", best)), lr=best)
        peer = min(PEERS, key=lambda k: _high(row[k]["valid"]))
        row["best_peer"] = dict(row[peer], name=peer)
        first = _pick(runs, task, "adam", 1e-3, schedule)
        row["parameters"] = first[0]["parameters"] if first else None
        row["steps"] = TASKS[task]["steps"]
        table[task] = row
    return table


def counts_for(table: Dict) -> Dict:
    out = {}
    tasks = list(table)
    for kind in ("learned", "learned_noloss"):
        c = {"tasks": len(tasks)}
        val = lambda t, k: _high(table[t][k]["valid"])  # noqa: E731
        c["valid_below_adam_1e-3"] = sum(val(t, kind) < val(t, "adam_1e-3") for t in tasks)
        c["valid_below_best_peer"] = sum(val(t, kind) < val(t, "best_peer") for t in tasks)
        if all("adam_tuned" in table[t] for t in tasks):
            c["valid_within_2pct_of_tuned_adam"] = sum(val(t, kind) <= 1.02 * val(t, "adam_tuned") for t in tasks)
        with_acc = [t for t in tasks if table[t][kind]["valid_acc"] is not None
                    and table[t]["adam_1e-3"]["valid_acc"] is not None]
        gaps = {t: table[t][kind]["valid_acc"] - table[t]["adam_1e-3"]["valid_acc"] for t in with_acc}
        c["accuracy_tasks"] = len(with_acc)
        c["accuracy_not_below_adam_1e-3_by_0.5pt"] = sum(gaps[t] >= -0.005 for t in with_acc)
        c["worst_accuracy_gap_vs_adam_1e-3"] = min(gaps.values()) if gaps else None
        c["train_below_adam_1e-3"] = sum(_high(table[t][kind]["train"]) < _high(table[t]["adam_1e-3"]["train"])
                                         for t in tasks)
        c["tasks_with_a_diverged_seed"] = sum(table[t][kind]["diverged"] > 0 for t in tasks)
        c["tasks_with_a_spike_over_10x"] = sum(table[t][kind]["max_spike"] > 10 for t in tasks)
        out[kind] = c
    out["adam_1e-3_tasks_with_a_spike_over_10x"] = sum(table[t]["adam_1e-3"]["max_spike"] > 10 for t in tasks)
    return out


def loss_scale_table(runs, tasks, scales) -> Dict:
    """Held-out loss with the training loss multiplied by each factor, over the unscaled run's."""
    out = {}
    for kind in ("learned", "learned_noloss", "adam"):
        lr = 1e-3 if kind == "adam" else None
        rows = {}
        for task in tasks:
            base = agg(_pick(runs, task, kind, lr))["valid"]
            rows[task] = {str(s): agg(_pick(runs, task, kind, lr, loss_scale=s))["valid"] / base for s in scales}
        worst = max((abs(r - 1) for row in rows.values() for r in row.values() if math.isfinite(r)), default=None)
        within = sum(all(math.isfinite(r) and abs(r - 1) <= 0.15 for r in row.values()) for row in rows.values())
        out[kind] = {"ratios": rows, "tasks_within_15pct": within, "tasks": len(tasks), "worst": worst}
    return out


def summarise(runs: List[Dict], tasks: List[str], schedules, scales) -> Dict:
    out = {}
    for sched in schedules:
        table = table_for(runs, tasks, sched)
        out[sched] = {"table": table, "counts": counts_for(table)}
    if scales:
        out["loss_scale"] = loss_scale_table(runs, tasks, scales)
    return out


def _fmt(x, acc=None):
    if x is None or not math.isfinite(x):
        return "nan"
    s = f"{x:.4g}"
    return s + (f" / {100 * acc:.1f}%" if acc is not None else "")


def _signed_points(gap):
    return "n/a" if gap is None else f"{100 * gap:+.2f} points"


def markdown(summary: Dict, weights_name: str) -> str:
    lines = [f"Learned optimizer weights: `{weights_name}`. Held-out loss / accuracy (mean over seeds); "
             "training loss below.", ""]
    for sched in ("constant", "cosine"):
        if sched not in summary:
            continue
        table, counts = summary[sched]["table"], summary[sched]["counts"]
        tuned = sched == "constant"
        header = ["| task | learned (loss) | learned (no loss) | Adam 1e-3 | " + ("Adam tuned | " if tuned else "")
                  + "AdamW | SF-AdamW | Prodigy |", "|---|---|---|---|" + ("---|" if tuned else "") + "---|---|---|"]

        def cells(row):
            return [row["learned"], row["learned_noloss"], row["adam_1e-3"]] + (
                [row["adam_tuned"]] if tuned else []) + [row[k] for k in PEERS]
        lines += [f"### {'Constant lr' if tuned else 'Warm-up and cosine decay'}", ""] + header
        for task, row in table.items():
            text = []
            for c in cells(row):
                s = _fmt(c["valid"], c["valid_acc"])
                if c.get("lr") is not None and c is row.get("adam_tuned"):
                    s += f" @{c['lr']:g}"
                if c["diverged"]:
                    s += f" **{c['diverged']} diverged**"
                text.append(s)
            lines.append(f"| {task} | " + " | ".join(text) + " |")
        lines += ["", "Training loss:", ""] + header
        for task, row in table.items():
            lines.append(f"| {task} | " + " | ".join(_fmt(c["train"]) for c in cells(row)) + " |")
        lines.append("")
        for kind in ("learned", "learned_noloss"):
            c = counts[kind]
            n = c["tasks"]
            lines.append(
                f"- `{kind}`: held-out loss below Adam 1e-3 on {c['valid_below_adam_1e-3']}/{n}, below the best "
                f"peer on {c['valid_below_best_peer']}/{n}"
                + (f", within 2% of tuned Adam on {c['valid_within_2pct_of_tuned_adam']}/{n}"
                   if "valid_within_2pct_of_tuned_adam" in c else "")
                + f"; accuracy at most 0.5 points below Adam 1e-3 on "
                f"{c['accuracy_not_below_adam_1e-3_by_0.5pt']}/{c['accuracy_tasks']} (least difference "
                f"{_signed_points(c['worst_accuracy_gap_vs_adam_1e-3'])}); training loss below Adam 1e-3 on {c['train_below_adam_1e-3']}/{n}; tasks with a "
                f"diverged seed {c['tasks_with_a_diverged_seed']}, with a spike over 10x "
                f"{c['tasks_with_a_spike_over_10x']} (Adam 1e-3: {counts['adam_1e-3_tasks_with_a_spike_over_10x']}).")
        lines.append("")
    if "loss_scale" in summary:
        lines += ["### Loss scale", "", "Held-out loss with the training loss multiplied by a factor, over the "
                  "unscaled run's:", ""]
        for kind, v in summary["loss_scale"].items():
            ratios = "; ".join(f"{t} " + ", ".join(f"x{s}: {r:.3f}" for s, r in row.items())
                               for t, row in v["ratios"].items())
            lines.append(f"- `{kind}`{' 1e-3' if kind == 'adam' else ''}: within 15% on "
                         f"{v['tasks_within_15pct']}/{v['tasks']} tasks. {ratios}")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(runs, tasks, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install 'learned_opt[plot]'): no plot written")
        return
    cols = 5
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for kind, lr, label in (("learned", None, "learned (loss)"), ("learned_noloss", None, "learned (no loss)"),
                                ("adam", 1e-3, "Adam 1e-3"), ("adamw", None, "AdamW"),
                                ("sf_adamw", None, "SF-AdamW"), ("prodigy", None, "Prodigy")):
            rs = _pick(runs, task, kind, lr)
            if not rs or any(len(r["curve"]) != len(rs[0]["curve"]) for r in rs):
                continue
            ys = [sum(c) / len(c) for c in zip(*[r["curve"] for r in rs])]
            xs = [(i + 1) * rs[0]["curve_every"] for i in range(len(ys))]
            ax.plot(xs, ys, label=label, lw=1.1)
        ax.set_title(task + " (training loss)", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print("wrote", path)


def plan(tasks, seeds: int, schedules, scales, kinds=tuple(KINDS)) -> List[tuple]:
    """(task, kind, lr, seed, schedule, loss_scale) of every run the comparison needs (of the
    optimizers ``kinds``)."""
    todo = []
    for t in tasks:
        for s in range(seeds):
            for sched in schedules:
                for k in kinds:
                    for lr in (KINDS[k] if sched == "constant" else [DEFAULT_LR.get(k)]):
                        todo.append((t, k, lr, s, sched, 1.0))
            for f in scales:
                for k in ("learned", "learned_noloss", "adam"):
                    if k in kinds:
                        todo.append((t, k, DEFAULT_LR.get(k), s, "constant", f))
    return todo


def _worker(t, k, lr, s, sched, f, weights):
    return run_one(t, k, lr, s, weights, schedule=sched, loss_scale=f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="learned-optimizer weights (default: the package default)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--schedule", default="constant,cosine", help="constant and/or cosine, comma-separated")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help="the optimizers to run (the report needs them all, from this cache or --baselines-from)")
    ap.add_argument("--loss-scales", default="", help="factors for the loss-scale runs, e.g. 0.01,100")
    ap.add_argument("--prefix", default=os.path.join(RESULTS, "compare"),
                    help="writes PREFIX.json, PREFIX.md, PREFIX.png and the run cache PREFIX-runs.jsonl")
    ap.add_argument("--baselines-from", default=None, metavar="RUNS_JSONL",
                    help="take the runs that do not use the learned optimizer from another run cache")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs in parallel processes (--threads each); the losses are unaffected, but the "
                         "time-per-step column then measures a loaded machine")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    schedules = [s for s in args.schedule.split(",") if s]
    if not schedules or any(s not in ("constant", "cosine") for s in schedules) or "constant" not in schedules:
        raise SystemExit("--schedule takes constant, or constant,cosine")
    scales = [float(x) for x in args.loss_scales.split(",") if x]
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        raise SystemExit(f"--kinds takes some of {list(KINDS)}")
    from learned_opt import load_weights
    _, info = load_weights(args.weights) if args.weights else load_weights()
    os.makedirs(os.path.dirname(os.path.abspath(args.prefix)), exist_ok=True)
    cache = args.prefix + "-runs.jsonl"
    runs = []
    if os.path.exists(cache):
        with open(cache) as f:
            runs = [json.loads(line) for line in f if line.strip()]
        runs = [r for r in runs if r.get("weights_checksum") in (None, info.checksum) or not r["kind"].startswith("learned")]
    if args.baselines_from:
        with open(args.baselines_from) as f:
            theirs = [json.loads(line) for line in f if line.strip()]
        have = {key(r) for r in runs}
        new = [r for r in theirs if not r["kind"].startswith("learned") and r["task"] in tasks
               and r["seed"] < args.seeds and key(r) not in have and "valid_accuracy" in r]
        runs += new
        with open(cache, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
        print(f"took {len(new)} baseline runs from {args.baselines_from}", flush=True)
    done = {key(r) for r in runs}
    todo = [x for x in plan(tasks, args.seeds, schedules, scales, kinds) if x not in done]
    print(f"{len(todo)} runs to do ({len(done)} cached), weights {info.name} ({info.checksum[:12]})", flush=True)
    results = parallel_map(_worker, [x + (args.weights,) for x in todo], args.jobs, args.threads)
    for i, ((t, k, lr, s, sched, f), r) in enumerate(zip(todo, results)):
        if k.startswith("learned"):
            r["weights_checksum"] = info.checksum
        runs.append(r)
        with open(cache, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        acc = "" if r["valid_accuracy"] is None else f" acc {r['valid_accuracy']:.3f}"
        print(f"[{i + 1}/{len(todo)}] {t} {k} lr={lr} seed={s} {sched} x{f:g}: valid {r['final_valid_loss']:.4g}"
              f"{acc} train {r['final_train_loss']:.4g} {r['ms_per_step']:.2f} ms/step"
              f"{' DIVERGED' if r['diverged'] else ''}", flush=True)
    missing = [x for x in plan(tasks, args.seeds, schedules, scales) if x not in {key(r) for r in runs}]
    if missing:
        print(f"{len(missing)} runs of other optimizers are still missing (e.g. {missing[0]}): no report")
        return
    summary = summarise(runs, tasks, schedules, scales)
    result = {"benchmark": "compare", "weights": {"name": info.name, "checksum": info.checksum},
              "threads": args.threads, "jobs": args.jobs, "seeds": args.seeds, "torch": torch.__version__,
              "largest_meta_training_task_params": LARGEST_META_TRAINING_TASK,
              "longest_meta_training_horizon": LONGEST_META_TRAINING_HORIZON,
              "tasks": {t: {k: v for k, v in TASKS[t].items() if k in ("about", "batch", "steps")} for t in tasks},
              "command": "python benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              **summary}
    with open(args.prefix + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.prefix + ".md", "w") as f:
        f.write(markdown(summary, info.name))
    print(markdown(summary, info.name))
    plot(runs, tasks, args.prefix + ".png")


if __name__ == "__main__":
    main()
