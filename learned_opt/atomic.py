"""Crash- and race-safe file writes: a file is written under a temporary name unique to the
writer, given the permissions a plain ``open`` would give it, then renamed over the target. A
reader sees the old file or the new one, never a half, and two processes writing the same file at
once (two runs building the same data cache) cannot trip over each other's temporary file.
Used for weights files, meta-training and few-shot checkpoints and the Omniglot cache."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch


def atomic_write(path: "str | os.PathLike", write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` to write the file at a temporary path, then move it to ``path``."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder or ".")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)  # mkstemp makes the file private; give it the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: Any, path: "str | os.PathLike") -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
