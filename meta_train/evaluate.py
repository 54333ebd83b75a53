"""Evaluate learned-optimizer weights on held-out tasks of a family.

Held-out tasks are sampled with seeds from a stream that meta-training never uses. Each task
is trained from the same initialisation and data by every set of weights given, and the
meta-objective (mean over the trajectory of log training loss) and the final loss are
reported.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from torch import Tensor
from torch.func import grad_and_value

from learned_opt import ArchConfig, load_weights
from learned_opt.functional import init_state, lopt_step

from .tasks import get_family
from .tasks.base import _mix

HELD_OUT_STREAM = 987_654_321


def held_out_seeds(n: int) -> List[int]:
    return [_mix(HELD_OUT_STREAM, i) for i in range(n)]


def train_curve(weights: Dict[str, Tensor], task, steps: int, lr: float = 1e-3,
                pass_loss: bool = True, init_seed: int = 0, data_seed: int = 0,
                cfg: Optional[ArchConfig] = None) -> List[float]:
    cfg = cfg or ArchConfig()
    params = task.init(init_seed)
    names = list(params)
    state = init_state(weights, [params[k] for k in names], cfg)
    losses = []
    for t in range(steps):
        grads, loss = grad_and_value(task.loss)(params, task.batch("train", data_seed, t))
        new, state = lopt_step(weights, [params[k] for k in names], [grads[k] for k in names],
                               state, loss=loss if pass_loss else None, lr=lr, cfg=cfg)
        params = dict(zip(names, new))
        losses.append(float(loss))
    return losses


def evaluate(weights_list: Sequence[str], family: str, n_tasks: int = 8, steps: int = 300,
             pass_loss: bool = True) -> Dict[str, Dict]:
    fam = get_family(family)
    tasks = [fam.sample(s) for s in held_out_seeds(n_tasks)]
    out = {}
    for w in weights_list:
        net, info = load_weights(w)
        weights = {k: v.detach() for k, v in net.weights().items()}
        per_task = []
        for task in tasks:
            curve = train_curve(weights, task, steps, pass_loss=pass_loss, cfg=net.config)
            logs = [math.log(x) if x > 0 and math.isfinite(x) else float("inf") for x in curve]
            per_task.append({"task": task.name, "meta_objective": sum(logs) / len(logs),
                             "final_loss": curve[-1]})
        finite = [r["meta_objective"] for r in per_task if math.isfinite(r["meta_objective"])]
        out[w] = {"name": info.name, "checksum": info.checksum, "tasks": per_task,
                  "mean_meta_objective": sum(finite) / len(finite) if finite else float("nan"),
                  "diverged": len(per_task) - len(finite)}
    return out
