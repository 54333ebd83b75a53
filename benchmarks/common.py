"""Shared pieces of the benchmark scripts: interleaved timing and result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, Sequence

import torch


def interleaved_medians(calls: Dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each call; the calls alternate within every repeat so that a change
    in machine load hits them all alike."""
    for f in calls.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def write_result(path: str, script: str, argv, result: Dict) -> None:
    """Write ``result`` as JSON with the command and the machine it ran on."""
    result = dict(result, torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                  cpus=os.cpu_count(),
                  command=f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", path)


def _star(fn_and_args):
    fn, args = fn_and_args
    return fn(*args)


def parallel_map(fn: Callable, items: Iterable[Sequence], jobs: int = 1, threads: int = 1) -> Iterator:
    """``fn(*item)`` for each item, in order. With ``jobs > 1`` the calls run in that many
    spawned processes of ``threads`` threads each (``fn`` must be a module-level function);
    results come back as they are needed, in the order of ``items``."""
    items = list(items)
    if jobs <= 1:
        return (fn(*item) for item in items)
    import concurrent.futures
    import multiprocessing
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=torch.set_num_threads, initargs=(threads,))
    return pool.map(_star, [(fn, item) for item in items])


@contextlib.contextmanager
def wrapped(module, name: str, wrap: Callable[[Callable], Callable]):
    """Within the block ``module.name`` is ``wrap(original)``; the original is put back after.
    For probes that look inside, or change, one function of the optimizer."""
    original = getattr(module, name)
    setattr(module, name, wrap(original))
    try:
        yield
    finally:
        setattr(module, name, original)
