"""Cost of ``LearnedOptimizer.step`` against ``torch.optim.Adam``, in one process.

Parameter sets of about 10k, 100k, 1M and 10M parameters shaped like transformer stacks (per
block: four d x d attention matrices, a d x 4d and a 4d x d MLP matrix, their biases, two
norm weights and biases; plus an embedding and a head), so most tensors are small and most
parameters sit in a few large matrices. Per size, interleaved repeat by repeat:

* the median time of ``step()`` for LearnedOptimizer (default weights and settings, the loss
  passed), Adam(foreach=True) and Adam(fused=True); gradients are fixed random tensors;
* the achieved GFLOP/s of the learned step, counting 2 x 1,824 flops per parameter (the
  per-element MLP 23-32-32-2 of docs/design.md), against the fp32 matmul peak of this
  machine measured in this run (median of 2048 x 2048 x 2048 products);
* peak extra memory of one step in floats per parameter (resident-size high-water mark,
  measured in a child process per size, see ``benchmarks/memory.py``).

Then whole training steps (forward, backward, step) at batch 128 for a small CNN on 28x28
images and an MNIST-1D MLP, LearnedOptimizer against Adam(foreach=True).

    python benchmarks/step_overhead.py [--sizes 10k,100k,1M,10M] [--repeats 9] [--device cuda]

With ``--device cuda`` everything runs on the GPU: timings synchronise the device, the peak is
that of fp32 matmuls (TF32 off), and the extra memory of one step is read from the CUDA
allocator's peak (``torch.cuda.max_memory_allocated``) in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))

from common import interleaved_medians, write_result  # noqa: E402
from learned_opt import LearnedOptimizer, native  # noqa: E402

FLOPS_PER_PARAM = 2 * (23 * 32 + 32 * 32 + 32 * 2)
SIZES = {"10k": (16, 3, 64), "100k": (40, 5, 256), "1M": (112, 6, 1024), "10M": (320, 8, 4096)}


def transformer_shapes(d: int, blocks: int, vocab: int):
    shapes = [(vocab, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,)]  # norm
        for _ in range(4):
            shapes += [(d, d), (d,)]  # q, k, v, o
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # norm, MLP
    shapes += [(d,), (d,), (vocab, d), (vocab,)]
    return shapes


DEVICE = torch.device("cpu")


def synced(fn):
    """``fn`` followed by a device synchronisation, so that a timer sees the GPU's work."""
    if DEVICE.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(DEVICE)
    return call


def make_params(size: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in transformer_shapes(*SIZES[size]):
        p = nn.Parameter((torch.randn(s, generator=g) * 0.02).to(DEVICE))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(DEVICE)
        ps.append(p)
    return ps


def median_time(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def matmul_peak(repeats=7, n=2048):
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    mm = synced(lambda: a @ b)
    mm()
    return 2 * n ** 3 / median_time(mm, repeats) / 1e9


def optimizers(params):
    return {
        "learned": LearnedOptimizer(params),
        "adam_foreach": torch.optim.Adam(params, lr=1e-3, foreach=True),
        "adam_fused": torch.optim.Adam(params, lr=1e-3, fused=True),
    }


def time_steps(size, repeats):
    rows = {}
    sets = {k: make_params(size) for k in ("learned", "adam_foreach", "adam_fused")}
    opts = {k: optimizers(sets[k])[k] for k in sets}
    calls = {k: synced((lambda o=o: o.step(lambda: 1.0)) if k == "learned" else (lambda o=o: o.step()))
             for k, o in opts.items()}
    rows.update(interleaved_medians(calls, repeats))
    return rows, sum(p.numel() for p in sets["learned"]), len(sets["learned"])


def memory_child(size: str, which: str) -> None:
    from memory import peak_extra_bytes
    params = make_params(size)
    opt = optimizers(params)[which]
    step = (lambda: opt.step(lambda: 1.0)) if which == "learned" else opt.step
    step()  # allocate the state
    step()
    print(json.dumps({"bytes": peak_extra_bytes(step)}))


def measure_memory(size: str, which: str) -> float:
    if DEVICE.type == "cuda":  # in this process: the allocator's peak is exact
        from memory import cuda_peak_extra_bytes
        params = make_params(size)
        opt = optimizers(params)[which]
        step = (lambda: opt.step(lambda: 1.0)) if which == "learned" else opt.step
        step()
        step()  # the state is allocated
        return cuda_peak_extra_bytes(step)
    from memory import child_env
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", size, which],
                         capture_output=True, text=True, env=child_env(), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x)


def whole_steps(repeats):
    torch.manual_seed(0)
    d = DEVICE
    cases = {
        "cnn_28x28_b128": (SmallCNN, torch.randn(128, 1, 28, 28, device=d), torch.randint(0, 10, (128,), device=d)),
        "mnist1d_mlp_b128": (lambda: nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 32),
                                                   nn.ReLU(), nn.Linear(32, 10)),
                             torch.randn(128, 40, device=d), torch.randint(0, 10, (128,), device=d)),
    }
    out = {}
    for name, (factory, x, y) in cases.items():
        runs = {}
        for which in ("learned", "adam_foreach"):
            torch.manual_seed(1)
            model = factory().to(d)
            opt = (LearnedOptimizer(model.parameters()) if which == "learned"
                   else torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True))

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                if isinstance(opt, LearnedOptimizer):
                    opt.step(loss=loss.detach())
                else:
                    opt.step()
            runs[which] = synced(step)
        med = interleaved_medians(runs, repeats)
        n = sum(p.numel() for p in factory().parameters())
        out[name] = {"parameters": n, "ms": {k: 1e3 * v for k, v in med.items()},
                     "ratio_vs_adam": med["learned"] / med["adam_foreach"]}
        print(f"{name:18s} {n:8d} params  learned {1e3 * med['learned']:7.2f} ms  "
              f"adam {1e3 * med['adam_foreach']:7.2f} ms  x{out[name]['ratio_vs_adam']:.2f}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10k,100k,1M,10M")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "step_overhead.json"))
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        where = torch.cuda.get_device_name(DEVICE)
    else:
        where = f"{torch.get_num_threads()} threads"
    peak = matmul_peak()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s ({where})", flush=True)
    sizes = []
    for size in args.sizes.split(","):
        t, n, n_tensors = time_steps(size, args.repeats)
        gflops = FLOPS_PER_PARAM * n / t["learned"] / 1e9
        row = {"size": size, "parameters": n, "tensors": n_tensors,
               "ms": {k: 1e3 * v for k, v in t.items()},
               "ratio_vs_adam_foreach": t["learned"] / t["adam_foreach"],
               "ratio_vs_adam_fused": t["learned"] / t["adam_fused"],
               "gflops": gflops, "fraction_of_matmul_peak": gflops / peak}
        if not args.no_memory:
            for which in ("learned", "adam_foreach"):
                row[f"peak_extra_floats_per_param_{which}"] = measure_memory(size, which) / 4 / n
        sizes.append(row)
        mem = row.get("peak_extra_floats_per_param_learned", float("nan"))
        print(f"{size:>5s} {n:9d} params {n_tensors:4d} tensors  learned {row['ms']['learned']:9.2f} ms  "
              f"adam foreach {row['ms']['adam_foreach']:7.2f} ms (x{row['ratio_vs_adam_foreach']:.1f})  "
              f"fused {row['ms']['adam_fused']:7.2f} ms  {gflops:5.1f} GFLOP/s "
              f"({100 * row['fraction_of_matmul_peak']:.0f}% of peak)  extra memory {mem:.2f} floats/param",
              flush=True)
    whole = whole_steps(max(args.repeats, 15))
    write_result(args.out, "step_overhead.py", argv, {
        "benchmark": "step_overhead", "device": where if DEVICE.type == "cuda" else "cpu",
        "flops_per_param": FLOPS_PER_PARAM, "matmul_peak_gflops": peak,
        "native_kernel": native.status().split("\n")[0], "sizes": sizes, "whole_training_step": whole})


if __name__ == "__main__":
    main()
