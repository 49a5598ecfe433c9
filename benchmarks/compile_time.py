"""First-call cost in a fresh process, with a cold and with a warm Numba cache.

Usage::

    python benchmarks/compile_time.py [--backend numba ...]

Each measurement starts a new interpreter whose ``NUMBA_CACHE_DIR`` is a temporary folder:
empty for the cold run, filled by that cold run for the warm one. The child reports the
import time of ``batchnorm`` and the time of the first call of each step, which includes
compiling (cold) or loading (warm) the kernels it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import batchnorm as bn
from batchnorm import _bench

# Runs in the fresh process; prints one JSON object of seconds per step.
_CHILD = r"""
import json, sys, time
start = time.perf_counter()
import numpy as np
import batchnorm as bn
timings = {"import": time.perf_counter() - start}
be = bn.get_backend(sys.argv[1])
rng = np.random.default_rng(0)
x = be.from_host(rng.standard_normal((8, 16, 8, 8), dtype=np.float32))
x2 = be.from_host(rng.standard_normal((64, 16), dtype=np.float32))
w = be.from_host(np.ones(16, np.float32))
rm, rv = be.from_host(np.zeros(16, np.float32)), be.from_host(np.ones(16, np.float32))
steps = {
    "forward-train": lambda: bn.forward(x, w, w, rm, rv, backend=be.name),
    "forward-eval": lambda: bn.forward(x, w, w, rm, rv, training=False, backend=be.name),
    "backward-train": lambda: bn.backward(x, x, w, rm, rv, backend=be.name),
    "forward-train 2-D": lambda: bn.forward(x2, w, w, backend=be.name),
}
for step, call in steps.items():
    start = time.perf_counter()
    be.to_host(call()[0])  # to_host waits for a device to finish
    timings[step] = time.perf_counter() - start
print(json.dumps(timings))
"""


def first_call(backend: str, cache_dir: str | Path) -> dict[str, float]:
    """Seconds per step (``import``, then first calls) in a fresh process using ``cache_dir``."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, backend],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    timings = json.loads(done.stdout.strip().splitlines()[-1])
    timings["total"] = sum(timings.values())
    return timings


def cold_and_warm(backend: str) -> dict[str, dict[str, float]]:
    """``{"cold": timings, "warm": timings}`` for ``backend`` with a fresh cache folder."""
    with tempfile.TemporaryDirectory(prefix="batchnorm-numba-cache-") as cache:
        return {"cold": first_call(backend, cache), "warm": first_call(backend, cache)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", help="default: every timeable backend")
    args = parser.parse_args(argv)
    reasons = _bench.timed_backends()
    backends = args.backend or [n for n in bn.available_backends() if reasons[n] is None]
    rows = [(name, state, t) for name in backends for state, t in cold_and_warm(name).items()]
    steps = list(rows[0][2])
    print(f"{'backend':<8} {'cache':<5} " + " ".join(f"{s:>17}" for s in steps) + "   (seconds)")
    for name, state, timings in rows:
        print(f"{name:<8} {state:<5} " + " ".join(f"{timings[s]:17.3f}" for s in steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
