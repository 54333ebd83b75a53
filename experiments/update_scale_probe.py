"""How large the learned optimizer's steps are over a run, against Adam's.

Trains held-out tasks of compare.py (same data, model, batches and seed as its seed 0) with
Adam at lr 1e-3 and with the learned optimizer at its defaults (the shipped weights, or
``--weights``), and records at a few steps the batch loss and the root mean square of each
step's parameter change, averaged over the tensors (and per tensor, in model order, beside
the root mean square of each tensor's gradient). Adam's steps shrink as the gradient's
signal falls below its noise (m / sqrt(v) becomes small); a step that keeps its size instead
leaves the loss at a noise floor.

    python experiments/update_scale_probe.py [--tasks digits_mlp_600k,mnist1d_deep_gelu] [--weights W ...]

Writes experiments/results/update_scale_probe.json.
"""

from __future__ import annotations

import argparse
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from common import write_result  # noqa: E402
from compare import TASKS, evaluate, make_optimizer  # noqa: E402


def run(task: str, kind: str, weights, probe_at):
    spec = TASKS[task]
    train, _ = spec["data"]()
    torch.manual_seed(1000)  # compare.py's seed 0
    model = spec["model"]()
    opt = make_optimizer(kind, model.parameters(), 1e-3 if kind == "adam" else None, weights, spec["steps"], "constant")
    g = torch.Generator().manual_seed(2000)
    n, steps, bs, loss_fn = train[0].shape[0], spec["steps"], spec["batch"], spec["loss"]
    params = [p for p in model.parameters()]
    rows = []
    for t in range(steps):
        idx = torch.randint(0, n, (bs,), generator=g)
        loss = loss_fn(model(train[0][idx]), train[1][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = [p.detach().clone() for p in params] if t + 1 in probe_at else None
        opt.step(loss=loss.detach()) if kind == "learned" else opt.step()
        if before is not None:
            rms = [float((p.detach() - b).pow(2).mean().sqrt()) for p, b in zip(params, before)]
            grad_rms = [float(p.grad.pow(2).mean().sqrt()) for p in params]
            rows.append({"step": t + 1, "batch_loss": float(loss.detach()), "update_rms": sum(rms) / len(rms),
                         "update_rms_per_tensor": rms, "grad_rms_per_tensor": grad_rms})
    return {"rows": rows, "final_train_loss": evaluate(model, spec, train)[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="digits_mlp_600k,mnist1d_deep_gelu")
    ap.add_argument("--weights", nargs="*", default=[], help="further weights files to probe beside the default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "update_scale_probe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {}
    for task in args.tasks.split(","):
        steps = TASKS[task]["steps"]
        probe_at = sorted({1, 10, 20, 50, 100, steps // 4, steps // 2, steps})
        result[task] = {"adam_1e-3": run(task, "adam", None, probe_at),
                        "learned_default": run(task, "learned", None, probe_at)}
        for w in args.weights:
            result[task]["learned:" + os.path.basename(w)] = run(task, "learned", w, probe_at)
        for name, r in result[task].items():
            first, last = r["rows"][0]["update_rms"], r["rows"][-1]["update_rms"]
            r["last_over_first_update_rms"] = last / first
            print(f"{task:20s} {name:40s} final train loss {r['final_train_loss']:.4g}  "
                  f"update rms {first:.2e} -> {last:.2e} (x{last / first:.3f})", flush=True)
    write_result(args.out, "update_scale_probe.py", argv, {"benchmark": "update_scale_probe", "results": result})


if __name__ == "__main__":
    main()
