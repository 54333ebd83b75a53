"""Transient memory of a step is bounded by the chunk, not by the model.

A 50M-parameter model is stepped once in a child process (so that the measurement sees only
this step, see ``benchmarks/memory.py``); the rise of its resident size may not exceed the
new state (10 accumulator floats per parameter, plus a few per tensor) and a fixed budget.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = 64 * 2 ** 20  # bytes beyond the state, whatever the model size

CHILD = r"""
import json, sys, torch
sys.path.insert(0, {bench!r})
from memory import peak_extra_bytes
from learned_opt import LearnedOptimizer
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
shapes = [(4096, 4096)] * 2 + [(2048, 8192)] * 2 + [(10000, 1000)] + [(4096,)] * 40 + [(7, 3, 3, 3)] * 5
params = []
for s in shapes:
    p = torch.nn.Parameter(torch.empty(s).normal_(0, 0.02, generator=g))
    p.grad = torch.empty(s).normal_(0, 1e-3, generator=g)
    params.append(p)
opt = LearnedOptimizer(params)
n = sum(p.numel() for p in params)
extra = peak_extra_bytes(lambda: opt.step(lambda: 1.0))
state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
            if torch.is_tensor(v))
print(json.dumps({{"params": n, "extra": extra, "state": state}}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/clear_refs"),
                    reason="needs Linux /proc to read the peak resident size")
def test_step_of_50M_parameters_allocates_state_plus_fixed_budget():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD.format(bench=os.path.join(ROOT, "benchmarks"))],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["params"] >= 50_000_000
    assert r["state"] >= 40 * r["params"]  # the 10 accumulators per parameter exist
    assert r["extra"] <= r["state"] + BUDGET, (
        f"step allocated {r['extra'] / 2**20:.0f} MiB beyond its start; state {r['state'] / 2**20:.0f} MiB "
        f"+ budget {BUDGET / 2**20:.0f} MiB")
