"""No step waits for a compiler: where the kernel was never built, ``get(wait=False)`` starts
the build in the background and the step runs the plain path meanwhile."""

import threading
import time

import torch
from torch import nn

from learned_opt import LearnedOptimizer, native


def test_first_use_builds_in_the_background(monkeypatch):
    release = threading.Event()
    sentinel = object()

    def slow_build():
        release.wait(10)
        return sentinel
    monkeypatch.setenv("LEARNED_OPT_NATIVE", "auto")
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_thread", None)
    monkeypatch.setattr(native, "_cached", lambda name: False)
    monkeypatch.setattr(native, "_build", slow_build)
    t0 = time.perf_counter()
    assert native.get(wait=False) is None and native.status() == "building"
    model = nn.Linear(200, 100)  # large enough for the kernel
    opt = LearnedOptimizer(model.parameters())
    model(torch.randn(4, 200)).sum().backward()
    opt.step()  # the plain path: the fake kernel is never called
    assert time.perf_counter() - t0 < 5
    release.set()
    native._thread.join(10)
    assert native.get(wait=False) is sentinel and native.status() == "built"


def test_strict_setting_waits(monkeypatch):
    monkeypatch.setenv("LEARNED_OPT_NATIVE", "1")
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_thread", None)
    monkeypatch.setattr(native, "_cached", lambda name: False)
    monkeypatch.setattr(native, "_build", lambda: "built-module")
    assert native.get(wait=False) == "built-module" and native._thread is None


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(monkeypatch, tmp_path):
    import os

    import pytest

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = native._name(True)
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    open(lock, "w").close()
    assert not native.clear_stale_lock(name)  # a build may be running: kept
    assert os.path.exists(lock)
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert native.clear_stale_lock(name)
    assert not os.path.exists(lock)
    assert not native.clear_stale_lock(name)  # nothing left to clear
