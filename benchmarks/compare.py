"""LearnedOptimizer with its defaults against tuned baselines, on tasks meta-training never saw.

Eight held-out tasks (other data sets, architectures, losses, widths, depths and batch sizes
than the meta-training families; one task has 11.4x the parameters of the largest meta-training
task, one runs 10,000 steps, 5x the longest meta-training horizon of 2,000), 3 seeds each.
Every optimizer trains the same initialisation on the same batches:

* ``learned``: ``LearnedOptimizer(model.parameters())``, no argument, the loss passed to step;
* ``learned_noloss``: the same, the loss never passed;
* ``adam``: Adam, lr in {1e-4, 3e-4, 1e-3, 3e-3, 1e-2} (``Adam 1e-3`` is one of them);
* ``adamw``: AdamW (weight decay 1e-2), the same lrs;
* ``sgd``: SGD with momentum 0.9, lr in {1e-3, 3e-3, 1e-2, 3e-2, 1e-1}.

The tuned baselines take, per task, the lr with the lowest mean final training loss over the
seeds (tuned on the very runs being reported, which favours them). Final training and
validation losses are measured on fixed evaluation sets after the last step; a run *diverges*
if a loss is not finite or the final training loss exceeds the initial one.

Every finished run is appended to a JSON-lines cache, so an interrupted comparison resumes.
To judge new weights quickly, take the baselines (which do not depend on the weights) from an
earlier cache with ``--baselines-from``, and spread the runs over processes with ``--jobs``
(the losses are the same; the time-per-step column then measures a loaded machine).

    python benchmarks/compare.py [--weights NAME_OR_PATH] [--tasks a,b] [--seeds 3] [--threads 1]
                                 [--jobs N] [--baselines-from OTHER-runs.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from common import parallel_map  # noqa: E402
from learned_opt import LearnedOptimizer  # noqa: E402

RESULTS = os.path.join(HERE, "results")
LRS = {"adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "adamw": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
       "sgd": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}
LARGEST_META_TRAINING_TASK = 52_234  # mnist1d_wide, 1,024 units (the default's runs; 39,562 without that family)
LONGEST_META_TRAINING_HORIZON = 2_000


# ----------------------------------------------------------------------------- data


def _sk(name):
    try:
        import sklearn.datasets as d
    except ImportError:
        raise ImportError("compare.py needs scikit-learn and mnist1d: pip install 'learned_opt[data]'") from None
    return getattr(d, name)()


def _split(x, y, n_valid, seed=0):
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[n_valid:], y[n_valid:]), (x[:n_valid], y[:n_valid])


def digits():
    d = _sk("load_digits")
    return _split(torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target), 297)


def standardised(name, n_valid):
    d = _sk(name)
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return _split(x, torch.tensor(d.target), n_valid)


def mnist1d():
    from meta_train.tasks.mnist1d import load_mnist1d
    xtr, ytr, xte, yte = load_mnist1d()
    return (xtr, ytr), (xte, yte)


def sorting_sequences(n, length=10, vocab=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return x, x.sort(dim=1).values


# ---------------------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10))

    def forward(self, x):
        return self.net(x.view(-1, 1, 8, 8))


class SeqGRU(nn.Module):
    def __init__(self, hidden=48):
        super().__init__()
        self.gru = nn.GRU(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        _, h = self.gru(x.view(x.shape[0], 10, 4))
        return self.head(h[-1])


class SortTransformer(nn.Module):
    def __init__(self, vocab=16, length=10, d=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
        self.body = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.norm(self.body(self.embed(x) + self.pos)))


def mlp(sizes, act):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def ce(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def bce(out, y):
    return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y.float())


def mse_recon(out, y):
    return nn.functional.mse_loss(torch.sigmoid(out), y)


def _autoencoder_data():
    (xtr, _), (xva, _) = digits()
    return (xtr, xtr), (xva, xva)


TASKS: Dict[str, Dict] = {
    "digits_mlp_600k": dict(model=lambda: mlp([64, 1024, 512, 10], nn.ReLU), data=digits, loss=ce,
                            batch=64, steps=300,
                            about="sklearn digits 8x8, MLP 64-1024-512-10 ReLU (11.4x the largest meta-training task)"),
    "digits_cnn": dict(model=DigitsCNN, data=digits, loss=ce, batch=32, steps=500,
                       about="sklearn digits, 2-layer 2-D CNN, batch 32"),
    "digits_autoencoder": dict(model=lambda: mlp([64, 32, 8, 32, 64], nn.Tanh), data=_autoencoder_data,
                               loss=mse_recon, batch=128, steps=500,
                               about="sklearn digits, tanh autoencoder 64-32-8-32-64, MSE on pixels"),
    "mnist1d_deep_gelu": dict(model=lambda: mlp([40] + [64] * 5 + [10], nn.GELU), data=mnist1d, loss=ce,
                              batch=16, steps=500,
                              about="MNIST-1D official test split for validation, 5 hidden GELU layers, batch 16"),
    "mnist1d_gru": dict(model=SeqGRU, data=mnist1d, loss=ce, batch=64, steps=500,
                        about="MNIST-1D read as 10 steps of 4 values by a GRU (48 units)"),
    "breast_cancer_mlp": dict(model=lambda: mlp([30, 64, 64, 1], nn.ELU), data=lambda: standardised(
        "load_breast_cancer", 100), loss=bce, batch=32, steps=500,
        about="sklearn breast cancer (30 standardised features), ELU MLP, logistic loss"),
    "sort_transformer": dict(model=SortTransformer,
                             data=lambda: (sorting_sequences(4096, seed=1), sorting_sequences(512, seed=2)),
                             loss=ce, batch=32, steps=500,
                             about="sort 10 tokens of 16 with a pre-norm transformer layer (d=32, 2 heads)"),
    "wine_long": dict(model=lambda: mlp([13, 32, 3], nn.Tanh), data=lambda: standardised("load_wine", 38),
                      loss=ce, batch=16, steps=10_000,
                      about="sklearn wine, tanh MLP, 10,000 steps (5x the longest meta-training horizon)"),
}


# --------------------------------------------------------------------------- running


def make_optimizer(kind, params, lr, weights):
    if kind in ("learned", "learned_noloss"):  # lr None: the optimizer's default, as a user gets it
        return LearnedOptimizer(params, **({"weights": weights} if weights else {}),
                                **({"lr": lr} if lr is not None else {}))
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(kind)


@torch.no_grad()
def full_loss(model, loss_fn, data, limit=2048):
    x, y = data
    return float(loss_fn(model(x[:limit]), y[:limit]))


def run_one(task_name: str, kind: str, lr, seed: int, weights, curve_points=100, make_opt=None) -> Dict:
    """Train one task with one optimizer and seed. ``make_opt(model)``, if given, builds the
    optimizer instead of ``kind``/``lr``/``weights`` (``kind`` still says whether ``step`` gets
    the loss: it does for "learned")."""
    spec = TASKS[task_name]
    train, valid = spec["data"]()
    torch.manual_seed(1000 + seed)
    model = spec["model"]()
    opt = make_opt(model) if make_opt is not None else make_optimizer(kind, model.parameters(), lr, weights)
    g = torch.Generator().manual_seed(2000 + seed)
    n, steps, bs, loss_fn = train[0].shape[0], spec["steps"], spec["batch"], spec["loss"]
    init_train = full_loss(model, loss_fn, train)
    every = max(1, steps // curve_points)
    curve, window, t_opt = [], [], 0.0
    finite = True
    for t in range(steps):
        idx = torch.randint(0, n, (bs,), generator=g)
        loss = loss_fn(model(train[0][idx]), train[1][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t0 = time.perf_counter()
        if kind == "learned":
            opt.step(loss=loss.detach())
        else:
            opt.step()
        t_opt += time.perf_counter() - t0
        v = float(loss.detach())
        window.append(v)
        if (t + 1) % every == 0:
            curve.append(sum(window) / len(window))
            window = []
        if not math.isfinite(v):
            finite = False
            break
    final_train = full_loss(model, loss_fn, train) if finite else float("nan")
    final_valid = full_loss(model, loss_fn, valid) if finite else float("nan")
    diverged = (not finite or not math.isfinite(final_train) or not math.isfinite(final_valid)
                or final_train > init_train)
    return {"task": task_name, "kind": kind, "lr": lr, "seed": seed, "initial_train_loss": init_train,
            "final_train_loss": final_train, "final_valid_loss": final_valid, "diverged": diverged,
            "ms_per_step": 1e3 * t_opt / steps, "steps": steps, "curve_every": every, "curve": curve,
            "parameters": sum(p.numel() for p in model.parameters())}


def mean_final_loss(task_name: str, kind: str, lr, seeds: int, weights, divide_by: float = 1.0) -> Dict:
    """``{"mean", "seeds"}``: the final training loss of ``run_one`` over seeds 0..seeds-1, each
    divided by ``divide_by`` (to undo a task's loss factor)."""
    finals = [run_one(task_name, kind, lr, s, weights, curve_points=10)["final_train_loss"] / divide_by
              for s in range(seeds)]
    return {"mean": sum(finals) / len(finals), "seeds": finals}


def key(r):
    return (r["task"], r["kind"], r["lr"], r["seed"])


def summarise(runs: List[Dict], tasks: List[str], seeds: int) -> Dict:
    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    def pick(task, kind, lr=None):
        return [r for r in runs if r["task"] == task and r["kind"] == kind and (lr is None or r["lr"] == lr)]

    table = {}
    for task in tasks:
        row = {}
        for kind in ("learned", "learned_noloss"):
            rs = pick(task, kind)
            row[kind] = agg(rs, mean)
        row["adam_1e-3"] = agg(pick(task, "adam", 1e-3), mean)
        for kind in ("adam", "adamw", "sgd"):
            best = min(LRS[kind], key=lambda lr: _nan_high(mean([r["final_train_loss"] for r in pick(task, kind, lr)])))
            row[f"{kind}_tuned"] = dict(agg(pick(task, kind, best), mean), lr=best)
        row["parameters"] = runs[[r["task"] for r in runs].index(task)]["parameters"]
        row["steps"] = TASKS[task]["steps"]
        table[task] = row
    counts = {}
    for kind in ("learned", "learned_noloss"):
        beats_adam = sum(table[t][kind]["train"] < table[t]["adam_1e-3"]["train"] for t in tasks)
        ties_tuned = sum(table[t][kind]["train"] <= 1.02 * table[t]["adam_tuned"]["train"] for t in tasks)
        diverged = sum(table[t][kind]["diverged"] for t in tasks)
        counts[kind] = {"beats_adam_1e-3": beats_adam, "beats_or_ties_tuned_adam": ties_tuned,
                        "tasks_with_a_diverged_seed": diverged, "tasks": len(tasks)}
    return {"table": table, "counts": counts}


def _nan_high(x):
    return x if math.isfinite(x) else float("inf")


def agg(rs, mean):
    tr = [r["final_train_loss"] for r in rs]
    return {"train": mean(tr) if all(math.isfinite(x) for x in tr) else float("nan"),
            "train_std": statistics.pstdev(tr) if len(tr) > 1 and all(math.isfinite(x) for x in tr) else float("nan"),
            "valid": mean([r["final_valid_loss"] for r in rs]),
            "ms_per_step": mean([r["ms_per_step"] for r in rs]),
            "diverged": sum(r["diverged"] for r in rs), "seeds": len(rs)}


def markdown(summary: Dict, weights_name: str) -> str:
    lines = [f"Learned optimizer weights: `{weights_name}`. Final training loss (mean over seeds), "
             "validation loss in brackets, optimizer step time in ms.", "",
             "| task | params | steps | learned (loss passed) | learned (no loss) | Adam 1e-3 | Adam tuned | "
             "AdamW tuned | SGD+mom tuned |", "|---|---|---|---|---|---|---|---|---|"]
    for task, row in summary["table"].items():
        def cell(c, lr=False):
            s = f"{c['train']:.4g} ({c['valid']:.4g}) {c['ms_per_step']:.2f}ms"
            if lr:
                s += f" @{c['lr']:g}"
            if c["diverged"]:
                s += f" **{c['diverged']} diverged**"
            return s
        lines.append(f"| {task} | {row['parameters']:,} | {row['steps']:,} | {cell(row['learned'])} | "
                     f"{cell(row['learned_noloss'])} | {cell(row['adam_1e-3'])} | {cell(row['adam_tuned'], True)} | "
                     f"{cell(row['adamw_tuned'], True)} | {cell(row['sgd_tuned'], True)} |")
    lines.append("")
    for kind, c in summary["counts"].items():
        lines.append(f"- `{kind}`: beats Adam 1e-3 on {c['beats_adam_1e-3']}/{c['tasks']} tasks; beats or ties "
                     f"(within 2%) tuned Adam on {c['beats_or_ties_tuned_adam']}/{c['tasks']}; tasks with a "
                     f"diverged seed: {c['tasks_with_a_diverged_seed']}.")
    return "\n".join(lines) + "\n"


def plot(runs, tasks, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install 'learned_opt[plot]'): no plot written")
        return
    summary = summarise(runs, tasks, 0)["table"]
    cols = 4
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        shown = [("learned", None, "learned (loss passed)"), ("learned_noloss", None, "learned (no loss)"),
                 ("adam", 1e-3, "Adam 1e-3"), ("adam", summary[task]["adam_tuned"]["lr"],
                                               f"Adam tuned ({summary[task]['adam_tuned']['lr']:g})")]
        for kind, lr, label in shown:
            rs = [r for r in runs if r["task"] == task and r["kind"] == kind and (lr is None or r["lr"] == lr)]
            if not rs or any(len(r["curve"]) != len(rs[0]["curve"]) for r in rs):
                continue
            ys = [sum(c) / len(c) for c in zip(*[r["curve"] for r in rs])]
            xs = [(i + 1) * rs[0]["curve_every"] for i in range(len(ys))]
            ax.plot(xs, ys, label=label, lw=1.2)
        ax.set_title(task, fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="learned-optimizer weights (default: the package default)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefix", default=os.path.join(RESULTS, "compare"),
                    help="writes PREFIX.json, PREFIX.md, PREFIX.png and the run cache PREFIX-runs.jsonl")
    ap.add_argument("--baselines-from", default=None, metavar="RUNS_JSONL",
                    help="take the Adam/AdamW/SGD runs from another run cache (they do not depend on the weights)")
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
               and r["seed"] < args.seeds and key(r) not in have]
        runs += new
        with open(cache, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
        print(f"took {len(new)} baseline runs from {args.baselines_from}", flush=True)
    done = {key(r) for r in runs}
    todo = [(t, k, lr, s) for t in tasks for s in range(args.seeds)
            for k, lrs in [("learned", [None]), ("learned_noloss", [None])] + [(k, LRS[k]) for k in ("adam", "adamw", "sgd")]
            for lr in lrs]
    todo = [x for x in todo if x not in done]
    print(f"{len(todo)} runs to do ({len(done)} cached), weights {info.name} ({info.checksum[:12]})", flush=True)
    results = parallel_map(run_one, [(t, k, lr, s, args.weights) for t, k, lr, s in todo], args.jobs, args.threads)
    for i, ((t, k, lr, s), r) in enumerate(zip(todo, results)):
        if k.startswith("learned"):
            r["weights_checksum"] = info.checksum
        runs.append(r)
        with open(cache, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[{i + 1}/{len(todo)}] {t} {k} lr={lr} seed={s}: train {r['final_train_loss']:.4g} "
              f"valid {r['final_valid_loss']:.4g} {r['ms_per_step']:.2f} ms/step"
              f"{' DIVERGED' if r['diverged'] else ''}", flush=True)
    summary = summarise(runs, tasks, args.seeds)
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
