"""``torch.compile`` and ``LearnedOptimizer.step``: compiled against eager, in one process.

The step is one custom op (``learned_opt::step_``), so ``torch.compile(opt.step,
fullgraph=True)`` traces it whole and runs the op eagerly inside the compiled code. Per
parameter set (the transformer-shaped sets of ``step_overhead.py``), two optimizers from the same
state are stepped on the same fixed gradients, one eagerly and one through the compiled step,
interleaved repeat by repeat; the script reports both medians, their ratio, the graph breaks
``torch._dynamo.explain`` finds, and the one-time compile (the first two compiled calls: the
first creates the state, the second sees it) apart from the per-step figures. The same
comparison for a whole training step (forward, backward, step) of a small MLP, with the model
compiled and the step called eagerly, or from inside a compiled function.

    python benchmarks/compile_step.py [--sizes 10k,100k,1M] [--repeats 15] \\
        [--out benchmarks/results/compile_step.json]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from common import interleaved_medians, write_result
from step_overhead import SIZES, transformer_shapes

from learned_opt import LearnedOptimizer

HERE = os.path.dirname(os.path.abspath(__file__))


def _params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 0.01
    return ps


def step_figures(size: str, repeats: int) -> dict:
    shapes = transformer_shapes(*SIZES[size])
    eager_params, compiled_params = _params(shapes, 0), _params(shapes, 0)
    eager = LearnedOptimizer(eager_params, lr=torch.tensor(1e-3))
    comp = LearnedOptimizer(compiled_params, lr=torch.tensor(1e-3))
    loss = torch.tensor(1.0)
    torch._dynamo.reset()  # explain runs the step too: on a third optimizer
    explained = torch._dynamo.explain(LearnedOptimizer(_params(shapes, 0), lr=torch.tensor(1e-3)).step)(loss=loss)
    torch._dynamo.reset()
    compiled = torch.compile(comp.step, fullgraph=True)
    t0 = time.perf_counter()
    compiled(loss=loss)
    compiled(loss=loss)
    first_two = time.perf_counter() - t0
    eager.step(loss=loss)
    eager.step(loss=loss)
    med = interleaved_medians({"eager": lambda: eager.step(loss=loss), "compiled": lambda: compiled(loss=loss)},
                              repeats)
    same = all(torch.equal(a, b) for a, b in zip(eager_params, compiled_params))
    return dict(size=size, params=sum(p.numel() for p in eager_params), tensors=len(shapes),
                graph_breaks=explained.graph_break_count, graphs=explained.graph_count,
                eager_ms=1e3 * med["eager"], compiled_ms=1e3 * med["compiled"],
                compiled_over_eager=med["compiled"] / med["eager"], first_two_compiled_calls_s=first_two,
                same_parameters=same)


def training_figures(repeats: int) -> dict:
    """Forward, backward and step of an MLP at batch 128: the step called eagerly, or inside a
    compiled function (``fullgraph=True``) that also clips the gradients."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(40, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 40, generator=g), torch.randint(0, 10, (128,), generator=g)
    runs = {}
    for name in ("eager", "compiled"):
        model = make()
        opt = LearnedOptimizer(model.parameters(), lr=torch.tensor(1e-3))

        def update(opt=opt, model=model, loss=None):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(loss=loss)

        fn = torch.compile(update, fullgraph=True) if name == "compiled" else update

        def train_step(model=model, opt=opt, fn=fn):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            fn(loss=loss.detach())

        t0 = time.perf_counter()
        train_step()
        train_step()
        runs[name] = (train_step, time.perf_counter() - t0)
    med = interleaved_medians({k: v[0] for k, v in runs.items()}, repeats)
    return dict(eager_ms=1e3 * med["eager"], compiled_ms=1e3 * med["compiled"],
                compiled_over_eager=med["compiled"] / med["eager"],
                first_two_steps_s={k: v[1] for k, v in runs.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10k,100k,1M")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compile_step.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes.split(","):
        row = step_figures(size, args.repeats)
        rows.append(row)
        print(f"{size}: {row['params']:,} params, {row['tensors']} tensors, graph breaks {row['graph_breaks']}, "
              f"eager {row['eager_ms']:.2f} ms, compiled {row['compiled_ms']:.2f} ms "
              f"(x{row['compiled_over_eager']:.3f}), first two compiled calls {row['first_two_compiled_calls_s']:.1f} s, "
              f"same parameters: {row['same_parameters']}")
    train = training_figures(args.repeats)
    print(f"MLP training step: eager {train['eager_ms']:.2f} ms, compiled update {train['compiled_ms']:.2f} ms "
          f"(x{train['compiled_over_eager']:.3f})")
    write_result(args.out, "compile_step.py", argv, dict(steps=rows, training_step=train))


if __name__ == "__main__":
    main()
