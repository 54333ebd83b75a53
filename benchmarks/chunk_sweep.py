"""Step time and transient memory of ``LearnedOptimizer`` against its ``chunk_size``.

The fast path walks large tensors in chunks so that its temporaries stay bounded. On the CPU a
cache-sized chunk is best; on a GPU the step is bound by kernel launches, so larger chunks win.
This sweep is the measurement behind the defaults in ``learned_opt/fast.py``.

    python benchmarks/chunk_sweep.py --device cuda [--sizes 1M,10M] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

import step_overhead as so  # noqa: E402
from common import interleaved_medians, write_result  # noqa: E402
from learned_opt import LearnedOptimizer  # noqa: E402
from memory import cuda_peak_extra_bytes  # noqa: E402

CHUNKS = [1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="1M,10M")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    so.DEVICE = torch.device(args.device)
    cuda = so.DEVICE.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    rows = []
    for size in args.sizes.split(","):
        sets = {c: so.make_params(size) for c in CHUNKS}
        opts = {c: LearnedOptimizer(sets[c], chunk_size=c) for c in CHUNKS}
        med = interleaved_medians({c: so.synced(lambda o=o: o.step(lambda: 1.0)) for c, o in opts.items()},
                                  args.repeats)
        n = sum(p.numel() for p in sets[CHUNKS[0]])
        for c in CHUNKS:
            row = {"size": size, "parameters": n, "chunk_size": c, "ms": 1e3 * med[c]}
            if cuda:
                step_bytes = cuda_peak_extra_bytes(lambda o=opts[c]: o.step(lambda: 1.0))
                row["peak_extra_floats_per_param"] = step_bytes / 4 / n
            rows.append(row)
            print(f"{size:>4s} chunk 2^{c.bit_length() - 1:<2d} {row['ms']:9.2f} ms  "
                  f"extra {row.get('peak_extra_floats_per_param', float('nan')):.2f} floats/param", flush=True)
        del sets, opts
    out = args.out or os.path.join(HERE, "results", f"chunk_sweep-{so.DEVICE.type}.json")
    write_result(out, "chunk_sweep.py", argv, {
        "benchmark": "chunk_sweep", "device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows})


if __name__ == "__main__":
    main()
