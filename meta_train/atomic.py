"""Crash- and race-safe writes: a file is written under a temporary name unique to the writer,
then renamed over the target, so a reader sees the old file or the new one, never a half, and two
processes writing the same file at once (two runs building the same data cache) cannot trip
over each other's temporary file."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: "str | os.PathLike") -> None:
    path = os.fspath(path)
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder or ".")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
