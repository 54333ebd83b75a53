"""Does the learned optimizer inflate weights? Parameter norms after training, against Adam.

On a separable classification problem the training cross-entropy keeps falling as the weights
grow, so an update rule that learned to grow them looks good on training loss and bad on
held-out loss. Each optimizer trains the same MLP from the same initialisation on the same
batches (2-class Gaussian blobs that a line separates, 256 training points, batch 32, 1,500
steps); the script reports the final parameter norm, its ratio to Adam's, the training and
held-out loss, and how far a padding row of an embedding (which never gets a gradient) moved.

    python benchmarks/weight_norm.py [--weights W1,W2] [--seeds 3] [--steps 1500]
        [--out benchmarks/results/weight_norm.json]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

import torch
from torch import nn

from common import write_result
from learned_opt import LearnedOptimizer

HERE = os.path.dirname(os.path.abspath(__file__))


def blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 10, generator=g) * 0.7
    x[:, 0] += 2.0 * (2 * y - 1)  # a margin along the first axis: separable
    return x, y


class Model(nn.Module):
    """An MLP on the inputs, plus an embedding whose row 0 is padding (never used, never a
    gradient): a row that must not move."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 10, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, x, tok):
        return self.mlp(x + self.emb(tok))


def run(make_opt, pass_loss: bool, seed: int, steps: int):
    xtr, ytr = blobs(256, 100 + seed)
    xva, yva = blobs(1024, 200 + seed)
    torch.manual_seed(seed)
    model = Model()
    pad_before = model.emb.weight[0].detach().clone()
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(300 + seed)
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        tok = torch.randint(1, 4, (32,), generator=g)  # never the padding index
        loss = nn.functional.cross_entropy(model(xtr[idx], tok), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach()) if pass_loss else opt.step()
    with torch.no_grad():
        ones = torch.ones(len(xtr), dtype=torch.long)
        train = float(nn.functional.cross_entropy(model(xtr, ones), ytr))
        valid = float(nn.functional.cross_entropy(model(xva, torch.ones(len(xva), dtype=torch.long)), yva))
        norm = math.sqrt(sum(float(p.pow(2).sum()) for n, p in model.named_parameters() if n.startswith("mlp")))
        pad = float((model.emb.weight[0] - pad_before).abs().max())
    return {"param_norm": norm, "train_loss": train, "valid_loss": valid, "padding_row_moved": pad}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="", help="comma-separated weights; empty: the shipped default")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "weight_norm.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = {"adam_1e-3": (lambda p: torch.optim.Adam(p, lr=1e-3), False)}
    for w in args.weights.split(","):
        name = w or "default"
        kinds[name] = (lambda p, w=w: LearnedOptimizer(p, **({"weights": w} if w else {})), True)
        kinds[name + " (no loss)"] = (lambda p, w=w: LearnedOptimizer(p, **({"weights": w} if w else {})), False)
    res = {}
    for name, (make, pass_loss) in kinds.items():
        runs = [run(make, pass_loss, s, args.steps) for s in range(args.seeds)]
        res[name] = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
    base = res["adam_1e-3"]["param_norm"]
    for name, r in res.items():
        r["norm_over_adam"] = r["param_norm"] / base
        print(f"{name:>40}: norm {r['param_norm']:.3f} ({r['norm_over_adam']:.2f}x Adam), train {r['train_loss']:.4g}, "
              f"held-out {r['valid_loss']:.4g}, padding row moved {r['padding_row_moved']:.3g}")
    write_result(args.out, "weight_norm.py", argv, {"steps": args.steps, "seeds": args.seeds, "results": res})


if __name__ == "__main__":
    main()
