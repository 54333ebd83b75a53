"""The optional compiled CPU kernel of the fast path (``csrc/mlp_pass.cpp``).

On first use it is compiled with the machine's C++ compiler through
``torch.utils.cpp_extension`` (about a minute, once; PyTorch caches the build under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). Where no compiler works
the fast path runs in plain PyTorch instead, with the same results up to float rounding, and
says so once.

``LEARNED_OPT_NATIVE=0`` turns the kernel off; ``LEARNED_OPT_NATIVE=1`` makes a failed build
an error instead of a fallback.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Optional

_lock = threading.Lock()
_start_lock = threading.Lock()
_module = None
_failed: Optional[str] = None
_thread: Optional[threading.Thread] = None

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "mlp_pass.cpp")


def _setting() -> str:
    return os.environ.get("LEARNED_OPT_NATIVE", "auto").strip().lower()


def enabled() -> bool:
    return _setting() not in ("0", "off", "false", "no")


def _build():
    from torch.utils.cpp_extension import load

    errors = []
    variants = [["-O3", "-march=native", "-fno-math-errno"], ["-O3", "-fno-math-errno"]]
    if _cached(_name(False)) and not _cached(_name(True)):  # where -march=native failed before
        variants.reverse()
    for flags in variants:
        full = _name("-march=native" in flags)
        clear_stale_lock(full)
        if not _cached(full):
            print("learned_opt: compiling the native CPU kernel (once per machine, about a minute)...",
                  file=sys.stderr, flush=True)
        try:
            return load(name=full, sources=[SOURCE], extra_cflags=flags, verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: fall back
            errors.append(f"{' '.join(flags)}: {type(e).__name__}: {str(e).strip()[-400:]}")
    raise RuntimeError("\n".join(errors))


def _name(native_arch: bool) -> str:
    """The build's name: a changed source builds afresh."""
    import hashlib

    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return f"learned_opt_native_{digest}" + ("" if native_arch else "_generic")


def _cached(name: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory(name, verbose=False)
        return any(f.endswith((".so", ".pyd", ".dylib")) for f in os.listdir(folder))
    except Exception:  # noqa: BLE001 - only decides whether to print a message
        return False


STALE_LOCK_S = 900  # a build takes one or two minutes; a lock this old has no live builder


def clear_stale_lock(name: str, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove the build folder's ``lock`` if it is older than ``max_age_s``. PyTorch's
    extension loader creates that file while a process builds and every other process waits
    until it is gone, with no timeout: a build killed mid-way (Ctrl-C, a job's time limit)
    leaves it behind, and every later first step would wait forever. Returns whether a lock
    was removed (with a warning that says so)."""
    import time

    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
        age = time.time() - os.path.getmtime(lock)
    except Exception:  # noqa: BLE001 - no folder or no lock: nothing to clear
        return False
    if age <= max_age_s:
        return False
    try:
        os.remove(lock)
    except OSError:
        return False
    warnings.warn(f"learned_opt: removed a stale build lock ({lock}, {age / 60:.0f} min old), left by a kernel "
                  "build that did not finish", RuntimeWarning, stacklevel=2)
    return True


def _build_now() -> None:
    global _module, _failed
    with _lock:
        if _module is not None or _failed is not None:
            return
        try:
            _module = _build()
        except Exception as e:  # noqa: BLE001
            _failed = str(e)
            if _strict():
                raise RuntimeError(f"learned_opt: LEARNED_OPT_NATIVE=1 but the kernel did not build:\n{e}")
            warnings.warn("learned_opt: the native CPU kernel did not build, so the fast path runs in "
                          f"plain PyTorch (same results, slower). Set LEARNED_OPT_NATIVE=0 to skip the "
                          f"attempt. Build error:\n{e}", RuntimeWarning, stacklevel=4)


def _strict() -> bool:
    return _setting() in ("1", "on", "true", "yes")


def get(wait: bool = True):
    """The compiled module, or None where it is turned off or cannot be built.

    ``wait=False`` (what the optimizer's step asks) never waits for a compiler: where the
    kernel was not built on this machine yet, the build starts in a background thread and
    None comes back until it is ready, so steps run the plain-PyTorch path (same results up to
    float rounding) meanwhile. A build cached from an earlier process loads at once.
    ``LEARNED_OPT_NATIVE=1`` always waits (and makes a failed build an error)."""
    global _thread
    if _module is not None or _failed is not None or not enabled():
        return _module
    if wait or _strict() or _cached(_name(True)) or _cached(_name(False)):
        _build_now()
        return _module
    with _start_lock:  # not _lock, which the build holds while it runs
        if _thread is None:
            print("learned_opt: compiling the native CPU kernel in the background (once per machine, about a "
                  "minute); steps run in plain PyTorch until it is ready. `python -m learned_opt.build` builds "
                  "it ahead of time.", file=sys.stderr, flush=True)
            _thread = threading.Thread(target=_build_now, name="learned_opt-native-build", daemon=True)
            _thread.start()
    return _module


def status() -> str:
    """'built', 'off', 'failed: ...', 'building' or 'not tried'."""
    if not enabled():
        return "off"
    if _module is not None:
        return "built"
    if _failed is not None:
        return "failed: " + _failed
    return "building" if _thread is not None else "not tried"
