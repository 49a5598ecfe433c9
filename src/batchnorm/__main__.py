"""Command line: ``python -m batchnorm info | check | bench`` (also the ``batchnorm`` command)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from . import _api, backend_info, get_backend
from .testing import max_error

# (label, shape, axis, dtype): the standard problems `check` runs on every backend.
CHECK_PROBLEMS = [
    ("NCHW f32", (4, 8, 6, 6), 1, np.float32),
    ("NHWC f32", (4, 6, 6, 8), -1, np.float32),
    ("2-D f16", (32, 16), 1, np.float16),
    ("NCL f64", (4, 8, 16), 1, np.float64),
]


def cmd_info(args: argparse.Namespace) -> int:
    """Print every registered backend, whether it can run and why not, and the machine."""
    print(
        f"batchnorm {_version()} on Python {platform.python_version()}, "
        f"NumPy {np.__version__}, {os.cpu_count()} CPUs"
    )
    try:
        import numba

        print(
            f"numba {numba.__version__}: {numba.get_num_threads()} threads, "
            f"threading layer {numba.config.THREADING_LAYER!r} (NUMBA_NUM_THREADS to change)"
        )
    except ImportError:
        print("numba: not installed")
    for info in backend_info():
        state = "available" if info.available else f"unavailable: {info.reason}"
        version = f" {info.version}" if info.version else ""
        devices = f" on {', '.join(info.devices)}" if info.devices else ""
        print(f"  {info.name:<8}{version:<12} {state}{devices}")
    return 0


def _version() -> str:
    from . import __version__

    return __version__


def _check_backend(name: str) -> tuple[float, float, int]:
    """Run the standard problems on one backend; (worst error / tolerance, seconds, problems)."""
    backend = get_backend(name)
    rng = np.random.default_rng(0)
    worst, started, count = 0.0, time.perf_counter(), 0
    for _, shape, axis, dtype in CHECK_PROBLEMS:
        c = shape[axis]
        pdt = _api.stat_dtype_for(np.dtype(dtype))
        x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        w, b = rng.uniform(0.5, 1.5, c).astype(pdt), rng.standard_normal(c).astype(pdt)
        rm, rv = np.zeros(c, pdt), np.ones(c, pdt)
        put = backend.from_host
        for training in (True, False):
            ref = _api.forward(
                x, w, b, rm.copy(), rv.copy(), training=training, axis=axis, backend="numpy"
            )
            got = _api.forward(
                put(x),
                put(w),
                put(b),
                put(rm),
                put(rv),
                training=training,
                axis=axis,
                backend=name,
            )
            ref_grads = _api.backward(
                dy, x, w, ref[1], ref[2], training=training, axis=axis, backend="numpy"
            )
            got_grads = _api.backward(
                put(dy), put(x), put(w), got[1], got[2], training=training, axis=axis, backend=name
            )
            for g, r in zip((*got, *got_grads), (*ref, *ref_grads)):
                worst = max(worst, max_error(backend.to_host(g), r, dtype))
            count += 1
    return worst, time.perf_counter() - started, count


def cmd_check(args: argparse.Namespace) -> int:
    """Compare each available backend with the reference; non-zero exit on disagreement."""
    names = args.backend or [i.name for i in backend_info() if i.available]
    print(f"{'backend':<10}{'problems':>9}{'max error':>12}{'time (s)':>10}  result")
    failed = False
    for info in backend_info():
        if info.name not in names:
            continue
        if not info.available:
            print(f"{info.name:<10}{'-':>9}{'-':>12}{'-':>10}  skipped: {info.reason}")
            failed |= bool(args.backend)  # asking for a backend that can't run is a failure
            continue
        try:
            worst, seconds, count = _check_backend(info.name)
        except Exception as exc:  # report and keep checking the others
            print(f"{info.name:<10}{'-':>9}{'-':>12}{'-':>10}  ERROR {type(exc).__name__}: {exc}")
            failed = True
            continue
        ok = worst <= 1.0
        failed |= not ok
        print(
            f"{info.name:<10}{count:>9}{worst:>12.3g}{seconds:>10.2f}  {'pass' if ok else 'FAIL'}"
        )
    print(
        "max error is in units of the per-dtype tolerance (batchnorm.testing.TOLERANCES); "
        "<= 1 passes"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m batchnorm`` and the ``batchnorm`` command."""
    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list backends, availability, versions, threads, devices")
    check = sub.add_parser("check", help="self-test every available backend against the reference")
    check.add_argument("--backend", action="append", help="check only this backend (repeatable)")
    try:
        from . import _bench
    except ImportError:
        _bench = None
    if _bench is not None:
        _bench.add_bench_arguments(sub.add_parser("bench", help="benchmark table of ratios"))
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "check":
        return cmd_check(args)
    return _bench.run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
