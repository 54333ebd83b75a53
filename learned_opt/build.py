"""Build the optional compiled CPU kernel now, so that no training step waits for a compiler.

    python -m learned_opt.build

Prints how long the build took (a one-time cost per machine and kernel source; later
processes load the cached build) and the kernel's status. Without it, the first step on a
machine starts the build in the background and runs the plain-PyTorch path until it is ready.
"""

from __future__ import annotations

import sys
import time

from . import native


def main() -> int:
    if not native.enabled():
        print("learned_opt: the native kernel is turned off (LEARNED_OPT_NATIVE=0)")
        return 0
    t0 = time.perf_counter()
    native.get(wait=True)
    print(f"learned_opt: native kernel {native.status()[:300]} in {time.perf_counter() - t0:.1f} s "
          f"(source {native.SOURCE})")
    return 0 if native.status() == "built" else 1


if __name__ == "__main__":
    sys.exit(main())
