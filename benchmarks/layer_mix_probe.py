"""Which layers does the learned optimizer handle worse than Adam?

Trains an MLP task of compare.py (default: the deep GELU task, the one every weights file has
lost) with its parameters split between the learned optimizer (defaults, loss passed) and
Adam at lr 1e-3: all learned, all Adam, and mixes where a group of layers is given to the
other optimizer. Layer 0 is the input layer, layer -1 the output layer; "hidden" is every
layer between them. Same data, models, batches and seeds as compare.py; mean final training
loss over seeds, and the mean batch loss over the first 50 steps.

    python benchmarks/layer_mix_probe.py [--task mnist1d_deep_gelu] [--seeds 3] [--weights W]

Writes benchmarks/results/layer_mix_probe.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from common import write_result  # noqa: E402
from compare import TASKS, full_loss  # noqa: E402

from learned_opt import LearnedOptimizer  # noqa: E402


def layer_groups(model):
    """The Linear layers' (weight, bias) pairs, in order."""
    return [list(m.parameters()) for m in model.modules() if isinstance(m, torch.nn.Linear)]


# which layers the learned optimizer trains; Adam trains the others
MIXES = {
    "all learned": lambda i, n: True,
    "all Adam": lambda i, n: False,
    "learned except input layer": lambda i, n: i != 0,
    "learned except hidden layers": lambda i, n: i in (0, n - 1),
    "learned except output layer": lambda i, n: i != n - 1,
    "learned on input layer only": lambda i, n: i == 0,
    "learned on hidden layers only": lambda i, n: 0 < i < n - 1,
    "learned on output layer only": lambda i, n: i == n - 1,
}


def run(task: str, learned_on, seed: int, weights):
    spec = TASKS[task]
    train, _ = spec["data"]()
    torch.manual_seed(1000 + seed)  # compare.py's seeding
    model = spec["model"]()
    layers = layer_groups(model)
    if sum(len(x) for x in layers) != len(list(model.parameters())):
        raise ValueError(f"{task}: the probe needs a model made of Linear layers and activations only")
    mine = [p for i, ps in enumerate(layers) if learned_on(i, len(layers)) for p in ps]
    theirs = [p for i, ps in enumerate(layers) if not learned_on(i, len(layers)) for p in ps]
    learned = LearnedOptimizer(mine, **({"weights": weights} if weights else {})) if mine else None
    adam = torch.optim.Adam(theirs, lr=1e-3) if theirs else None
    g = torch.Generator().manual_seed(2000 + seed)
    n, early = train[0].shape[0], []
    for t in range(spec["steps"]):
        idx = torch.randint(0, n, (spec["batch"],), generator=g)
        loss = spec["loss"](model(train[0][idx]), train[1][idx])
        model.zero_grad(set_to_none=True)
        loss.backward()
        if learned:
            learned.step(loss=loss.detach())
        if adam:
            adam.step()
        if t < 50:
            early.append(float(loss.detach()))
    return full_loss(model, spec["loss"], train), statistics.mean(early)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mnist1d_deep_gelu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--weights", default=None, help="learned optimizer weights (default: shipped)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "layer_mix_probe.json"))
    args = ap.parse_args(argv)
    if args.task not in TASKS:
        ap.error(f"unknown task {args.task}; choose from {sorted(TASKS)}")
    torch.set_num_threads(args.threads)
    rows = {}
    for name, learned_on in MIXES.items():
        runs = [run(args.task, learned_on, seed, args.weights) for seed in range(args.seeds)]
        rows[name] = {"mean_final_train_loss": statistics.mean(r[0] for r in runs),
                      "mean_batch_loss_first_50": statistics.mean(r[1] for r in runs),
                      "final_train_loss": [r[0] for r in runs]}
        print(f"{name:32s} final {rows[name]['mean_final_train_loss']:.4f}  "
              f"first 50 steps {rows[name]['mean_batch_loss_first_50']:.3f}", flush=True)
    write_result(args.out, "layer_mix_probe.py", argv, {"task": args.task, "weights": args.weights, "mixes": rows})


if __name__ == "__main__":
    main()
