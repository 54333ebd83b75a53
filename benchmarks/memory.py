"""Peak memory of one optimizer step: resident memory on the CPU, the CUDA allocator's peak on a GPU.

Linux only. The caller must run in a process started with ``MALLOC_MMAP_THRESHOLD_`` set low
(see :func:`child_env`) so that every large temporary is its own mapping, returned to the
system when freed: the resident size then tracks live tensors, and its high-water mark (reset
through ``/proc/self/clear_refs``) is the peak of one step.
"""

from __future__ import annotations

import gc
import os
from typing import Callable


def child_env() -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    return env


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], None]) -> int:
    """Bytes by which the resident size rose above its level before ``fn`` while it ran."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return max(0, peak - before) * 1024


def cuda_peak_extra_bytes(fn: Callable[[], None]) -> int:
    """Bytes by which the CUDA allocator's peak rose above its level before ``fn`` while it ran."""
    import torch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
