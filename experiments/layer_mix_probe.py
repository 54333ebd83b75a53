"""Which layers does the learned optimizer handle worse than Adam?

Trains an MLP task of compare.py (default: the deep GELU task, lost by every weights file
before `rnn-mlp-pes-eps-v3`) with its parameters split between the learned optimizer (defaults,
loss passed) and Adam at lr 1e-3: all learned, all Adam, and mixes where a group of layers is given to the
other optimizer. Layer 0 is the input layer, layer -1 the output layer; "hidden" is every
layer between them. Same data, models, batches and seeds as compare.py; mean final training
loss over seeds, and the mean batch loss over the first 50 steps.

    python experiments/layer_mix_probe.py [--task mnist1d_deep_gelu] [--seeds 3] [--weights W]

Writes experiments/results/layer_mix_probe.json.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from common import write_result  # noqa: E402
from compare import TASKS, run_one  # noqa: E402

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


class SplitOptimizer:
    """The learned optimizer on some parameters and Adam at lr 1e-3 on the others, stepped
    together (either part may be empty)."""

    def __init__(self, mine, theirs, weights):
        self.learned = LearnedOptimizer(mine, **({"weights": weights} if weights else {})) if mine else None
        self.adam = torch.optim.Adam(theirs, lr=1e-3) if theirs else None

    def zero_grad(self, set_to_none=True):
        for opt in (self.learned, self.adam):
            if opt is not None:
                opt.zero_grad(set_to_none=set_to_none)

    def step(self, loss=None):
        if self.learned is not None:
            self.learned.step(loss=loss)
        if self.adam is not None:
            self.adam.step()


def split_for(task: str, learned_on, weights):
    """``make_opt`` for compare.run_one: the Linear layers that ``learned_on(i, n)`` picks go
    to the learned optimizer, the rest to Adam."""
    def make(model):
        layers = layer_groups(model)
        if sum(len(x) for x in layers) != len(list(model.parameters())):
            raise ValueError(f"{task}: the probe needs a model made of Linear layers and activations only")
        mine = [p for i, ps in enumerate(layers) if learned_on(i, len(layers)) for p in ps]
        theirs = [p for i, ps in enumerate(layers) if not learned_on(i, len(layers)) for p in ps]
        return SplitOptimizer(mine, theirs, weights)
    return make


def run(task: str, learned_on, seed: int, weights):
    """(final training loss, mean batch loss over the first 50 steps) of one seed: compare.py's
    training loop, data, batches and seeding."""
    steps = TASKS[task]["steps"]
    if steps % 50:
        raise ValueError(f"{task}: the probe needs a step count that is a multiple of 50")
    r = run_one(task, "learned", None, seed, None, curve_points=steps // 50,
                make_opt=split_for(task, learned_on, weights))
    return r["final_train_loss"], r["curve"][0]


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
