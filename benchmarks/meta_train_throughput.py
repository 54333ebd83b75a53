"""Meta-training throughput: a population evaluated batched versus one member at a time,
and where the unroll time goes.

Task: an MNIST-1D MLP 40-128-32-10 (9,706 parameters), batch 128, cross-entropy. One inner
step of a member is: task forward and backward (``grad_and_value``), then one learned-optimizer
step with that member's meta-weights. For populations of 1, 8, 16 (8 antithetic pairs) and 32
members we time, side by side in this process and interleaved repeat by repeat:

* ``batched`` (what meta-training runs): the task's forward/backward of every member in one
  ``vmap`` call, then :func:`learned_opt.functional.population_step` for all members;
* ``batched_vmap``: the whole inner step (``lopt_step`` included) under one ``vmap`` call,
  the previous implementation, for comparison;
* ``loop``: a Python loop calls the unbatched functional step (``lopt_step``) once per member,
  the same computation as ``batched`` one member at a time;
* ``loop_inplace``: the same loop, but with the drop-in optimizer's own hot path
  (``lopt_step(..., inplace=True)``: the compiled kernel where it builds), the fastest
  one-member step we have; reported so the speed-up is not read against a slow baseline only;
* ``lopt only`` / ``task only``: the batched learned-optimizer step on fixed gradients and
  the batched task forward/backward alone, to split the batched step time between them.

Reported: inner steps per second of the population (members x steps / s), time per member
step, the speed-up per member of ``batched`` over ``loop`` (the issue's figure) and over
``loop_inplace``, and the two shares. Medians over repeats.

    python benchmarks/meta_train_throughput.py [--repeats 7] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.func import grad_and_value, vmap


from common import interleaved_medians, write_result  # noqa: E402
from learned_opt import ArchConfig, load_weights  # noqa: E402
from learned_opt.functional import population_step  # noqa: E402
from learned_opt.functional import init_state, lopt_step  # noqa: E402
from meta_train.population import stack  # noqa: E402
from meta_train.tasks.base import Task  # noqa: E402
from meta_train.tasks.synthetic import mlp  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def make_task() -> Task:
    from meta_train.tasks.mnist1d import _data
    train, valid = _data()
    return Task.from_module("mnist1d-mlp-128-32-b128", lambda: mlp([40, 128, 32, 10], "relu"),
                            nn.functional.cross_entropy, train, valid, batch_size=128)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="inner steps per timed repeat")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--populations", default="1,8,16,32")
    ap.add_argument("--out", default=os.path.join(RESULTS, "meta_train_throughput.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ArchConfig()
    task = make_task()
    names = list(task.init(0))
    n_params = sum(v.numel() for v in task.init(0).values())
    net, _ = load_weights("adam-like-init-v0")
    base = {k: v.detach() for k, v in net.weights().items()}

    def inner(w, params, state, batch):
        grads, loss = grad_and_value(task.loss)(params, batch)
        new_p, new_s = lopt_step(w, [params[k] for k in names], [grads[k] for k in names],
                                 state, loss=loss, lr=1e-3, cfg=cfg)
        return dict(zip(names, new_p)), new_s, loss

    def inner_inplace(w, params, state, batch):
        grads, loss = grad_and_value(task.loss)(params, batch)
        with torch.no_grad():
            lopt_step(w, [params[k] for k in names], [grads[k] for k in names], state, loss=loss,
                      lr=1e-3, cfg=cfg, inplace=True)
        return loss

    batched_task = vmap(grad_and_value(task.loss))

    def opt_only(w, params, grads, state, loss):
        with torch.no_grad():
            new_p, new_s = population_step(w, [params[k] for k in names], [grads[k] for k in names],
                                           state, loss=loss, lr=1e-3, cfg=cfg)
        return dict(zip(names, new_p)), new_s

    def batched_inner(w, params, state, batch):
        grads, loss = batched_task(params, batch)
        new_p, new_s = opt_only(w, params, grads, state, loss)
        return new_p, new_s, loss

    vmapped_inner = vmap(inner)

    rows = []
    for M in [int(x) for x in args.populations.split(",")]:
        g = torch.Generator().manual_seed(M)
        ws = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(M)]
        ps = [task.init(i) for i in range(M)]
        ss = [init_state(ws[i], [ps[i][k] for k in names], cfg) for i in range(M)]
        W, P, S = stack(ws), stack(ps), stack(ss)
        batches = [[task.batch("train", i, t) for i in range(M)] for t in range(args.steps)]
        B = [stack(b) for b in batches]
        G, L = batched_task(P, B[0])

        def run_batched():
            p, s = P, S
            for t in range(args.steps):
                p, s, _ = batched_inner(W, p, s, B[t])

        def run_vmap():
            p, s = P, S
            for t in range(args.steps):
                p, s, _ = vmapped_inner(W, p, s, B[t])

        def run_loop():
            for i in range(M):
                p, s = ps[i], ss[i]
                for t in range(args.steps):
                    p, s, _ = inner(ws[i], p, s, batches[t][i])

        def run_loop_inplace():
            for i in range(M):
                p = {k: ps[i][k].clone() for k in names}
                s = init_state(ws[i], [p[k] for k in names], cfg)
                for t in range(args.steps):
                    inner_inplace(ws[i], p, s, batches[t][i])

        def run_opt():
            for t in range(args.steps):
                opt_only(W, P, G, S, L)

        def run_task():
            for t in range(args.steps):
                batched_task(P, B[t])

        fns = {"batched": run_batched, "batched_vmap": run_vmap, "loop": run_loop,
               "loop_inplace": run_loop_inplace, "lopt_only": run_opt, "task_only": run_task}
        med = interleaved_medians(fns, args.repeats, warmup=1)
        member_steps = M * args.steps
        split = med["lopt_only"] + med["task_only"]
        row = {
            "members": M,
            "batched_inner_steps_per_s": member_steps / med["batched"],
            "loop_inner_steps_per_s": member_steps / med["loop"],
            "batched_ms_per_member_step": 1e3 * med["batched"] / member_steps,
            "loop_ms_per_member_step": 1e3 * med["loop"] / member_steps,
            "batched_vmap_ms_per_member_step": 1e3 * med["batched_vmap"] / member_steps,
            "loop_inplace_ms_per_member_step": 1e3 * med["loop_inplace"] / member_steps,
            "speedup_per_member": med["loop"] / med["batched"],
            "speedup_vs_loop_inplace": med["loop_inplace"] / med["batched"],
            "speedup_vmap_per_member": med["loop"] / med["batched_vmap"],
            "share_learned_optimizer": med["lopt_only"] / split,
            "share_task_forward_backward": med["task_only"] / split,
            "median_s": med,
        }
        rows.append(row)
        print(f"M={M:3d}  batched {row['batched_inner_steps_per_s']:8.1f} steps/s  "
              f"loop {row['loop_inner_steps_per_s']:8.1f} steps/s  speed-up x{row['speedup_per_member']:.2f} "
              f"(vs in-place loop x{row['speedup_vs_loop_inplace']:.2f}, vmap x{row['speedup_vmap_per_member']:.2f})  "
              f"lopt {100 * row['share_learned_optimizer']:.0f}% / task {100 * row['share_task_forward_backward']:.0f}%",
              flush=True)

    write_result(args.out, "meta_train_throughput.py", argv, {
        "benchmark": "meta_train_throughput",
        "task": {"name": task.name, "parameters": n_params, "batch_size": 128},
        "steps_per_repeat": args.steps, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
