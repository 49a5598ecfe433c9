"""Compile every kernel for real GPUs (PTX), no GPU needed.

Run as ``python -m batchnorm_cuda._compile_check [--cc 9.0 ...]``; it prints a JSON report.

The simulator runs kernels as Python, so typing errors that only real compilation sees
(an unsupported cast, a tuple of mixed types) would pass there; this compiles each kernel
for each dtype signature the backend launches with :func:`numba.cuda.compile_ptx`, which
needs NVVM (``numba-cuda[cu12]`` or ``[cu13]``) but no driver. It must run without
``NUMBA_ENABLE_CUDASIM`` (the simulator has no compiler), so tests call it in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from types import SimpleNamespace

from numba import types

from ._config import DEVICE
from ._kernels import ACCUMULATOR, channel_kernels, reduction_kernels

FLOATS = {"float16": types.float16, "float32": types.float32, "float64": types.float64}
STAT = {"float16": types.float32, "float32": types.float32, "float64": types.float64}
DEFAULT_CCS = ((9, 0), (7, 5))


def _array(dtype, ndim: int, layout: str = "A"):
    return types.Array(dtype, ndim, layout)


def signatures() -> list[tuple[str, str, tuple]]:
    """``(kernel name, dtype label, argument types)`` of every launch the backend makes."""
    out = []
    b = types.boolean
    f64 = types.float64
    vec64 = _array(f64, 1)
    for name, dtype in FLOATS.items():
        acc, stat = ACCUMULATOR[name], STAT[name]
        x3, vec, stat_vec = _array(dtype, 3), _array(dtype, 1), _array(stat, 1)
        part, part_n = _array(acc, 2), _array(types.int64, 2)
        for layout in ("channels_first", "channels_last"):
            out += [
                (f"stats_{layout}", name, (x3, part_n, part, part)),
                (f"grad_sums_{layout}", name, (x3, x3, stat_vec, part, part)),
                (f"normalize_{layout}", name, (x3, stat_vec, stat_vec, vec, vec, b, b, b, x3)),
                # forward_train normalizes with the float64 mean (see _kernels.affine)
                (f"normalize_{layout}", name, (x3, vec64, stat_vec, vec, vec, b, b, b, x3)),
                (
                    f"input_grad_{layout}",
                    name,
                    (x3, x3, stat_vec, stat_vec, vec, b, vec64, vec64, f64, x3),
                ),
            ]
        out += [
            # eval mode: running statistics of the parameters' dtype become mean/invstd
            ("finish_stats", name, (vec, vec, f64, f64, stat_vec, stat_vec, stat_vec)),
            ("param_grads", name, (vec64, vec64, stat_vec, vec, vec)),
            ("update_running_stats", name, (vec, vec, stat_vec, stat_vec, f64, f64)),
            ("copy_strided", name, (_array(dtype, 8), _array(dtype, 8))),
            ("merge_stat_partials", name, (x3, part_n, part, part, vec64, vec64)),
            (
                "merge_and_finish_stats",
                name,
                (x3, part_n, part, part, f64, f64, vec64, stat_vec, stat_vec, stat_vec),
            ),
        ]
    for name in ("float32", "float64"):
        part = _array(FLOATS[name], 2)
        out += [
            ("sum_partials", name, (part, part, vec64, vec64)),
            (
                "finish_stats",
                f"{name} batch",
                (vec64, vec64, f64, f64) + (_array(FLOATS[name], 1),) * 3,
            ),
        ]
    return out


def _python_function(kernel_name: str, dtype_name: str):
    dtype_name = dtype_name.split()[0]
    kernels = reduction_kernels(ACCUMULATOR[dtype_name], DEVICE.threads_per_block)
    dispatcher = getattr(kernels, kernel_name, None) or getattr(channel_kernels(), kernel_name)
    return dispatcher.py_func


@contextlib.contextmanager
def _device_functions_target(cc):
    """Compile ``@cuda.jit(device=True)`` helpers for ``cc`` instead of the current device.

    numba-cuda compiles a device function called from a kernel for the compute capability
    of the current device, even inside :func:`numba.cuda.compile_ptx`; without a GPU there
    is none. The kernel builders are cleared so each ``cc`` gets fresh dispatchers.
    """
    import numba.cuda.dispatcher as dispatcher

    current = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    reduction_kernels.cache_clear()
    channel_kernels.cache_clear()
    try:
        yield
    finally:
        dispatcher.get_current_device = current
        reduction_kernels.cache_clear()
        channel_kernels.cache_clear()


def nvvm_missing_reason() -> str | None:
    """Why PTX cannot be compiled here, or None when it can."""
    from numba import cuda

    if cuda.config.ENABLE_CUDASIM:
        return "NUMBA_ENABLE_CUDASIM=1: the simulator has no compiler"
    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        return "NVVM is not available (install numba-cuda[cu12] or numba-cuda[cu13])"
    return None


def check(ccs=DEFAULT_CCS) -> dict:
    """Compile every signature for every compute capability; report each result."""
    from numba import cuda

    reason = nvvm_missing_reason()
    if reason is not None:
        return {"skipped": reason, "results": []}
    results = []
    for cc in ccs:
        with _device_functions_target(cc):
            for kernel_name, dtype_name, argtypes in signatures():
                start = time.perf_counter()
                try:
                    func = _python_function(kernel_name, dtype_name)
                    cuda.compile_ptx(func, argtypes, cc=cc)
                    error = None
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                results.append(
                    {
                        "kernel": kernel_name,
                        "dtype": dtype_name,
                        "cc": list(cc),
                        "error": error,
                        "seconds": time.perf_counter() - start,
                    }
                )
    return {"skipped": None, "results": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cc",
        action="append",
        default=None,
        metavar="MAJOR.MINOR",
        help="compute capability (repeatable; default 9.0 and 7.5)",
    )
    args = parser.parse_args(argv)
    ccs = tuple(tuple(int(p) for p in cc.split(".")) for cc in args.cc) if args.cc else DEFAULT_CCS
    report = check(ccs)
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0 if all(r["error"] is None for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
