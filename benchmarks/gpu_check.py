"""One short run on a GPU machine: conformance on the device, 64-bit indexing, benchmarks.

Usage::

    python benchmarks/gpu_check.py OUT_DIR [--backends cuda,cupy] [--smoke] [--skip-tests]

Steps, each recorded in ``OUT_DIR/gpu_check.json`` (and printed):

1. the shared conformance suite (and ``tests/test_cuda.py`` for ``cuda``) on the real device,
   one pytest subprocess per GPU backend that can run here (with 8 pytest-xdist workers
   where pytest-xdist is installed);
2. a forward pass over more than 2**31 elements (channels-first and channels-last), checked
   against CuPy's float64 reductions, for the 64-bit indexing;
3. forward-train, forward-eval and backward for NCHW (256, 64, 56, 56) and (32, 64, 56, 56),
   channels-last (32, 56, 56, 64) and 2-D (256, 1024), float32 and float16, timed with
   CUDA events next to a device-to-device copy of the same array and PyTorch's CUDA batch
   norm when importable. Printed as ratios: achieved bandwidth as a fraction of the copy's
   (traffic models: forward-train 3 passes, forward-eval 2, backward 5) and speedup over
   PyTorch.

The project must be installed (its backends are entry points): on a machine without network
``pip install --no-index --no-deps batchnorm-*.whl``. ``--smoke`` uses tiny shapes and a test
subset so the whole script can be tried under ``NUMBA_ENABLE_CUDASIM=1`` on any machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import batchnorm as bn

REPO = Path(__file__).resolve().parent.parent
GPU_BACKENDS = ("cuda", "cupy")
EPS = 1e-5
#: Passes over x-sized memory each operation needs at minimum (the copy makes 2).
TRAFFIC = {"forward-train": 3, "forward-eval": 2, "backward": 5}
#: Targets on an H100/H200-class GPU for the large shapes (fraction of copy bandwidth).
TARGETS = {"forward-train": 0.75, "forward-eval": 0.85, "backward": 0.70}
LARGE_SHAPES = ("nchw-256",)
SHAPES = {  # name -> (dims, channel axis)
    "nchw-256": ((256, 64, 56, 56), 1),
    "nchw-32": ((32, 64, 56, 56), 1),
    "nhwc-32": ((32, 56, 56, 64), -1),
    "2d-256": ((256, 1024), 1),
}
SMOKE_SHAPES = {
    "nchw-256": ((4, 8, 6, 6), 1),
    "nchw-32": ((2, 8, 6, 6), 1),
    "nhwc-32": ((2, 6, 6, 8), -1),
    "2d-256": ((16, 32), 1),
}
DTYPES = ("float32", "float16")


# -- device arrays: CuPy when it works, else Numba device arrays ----------------------------
class Device:
    """Array creation, copies and timing on the GPU (or the simulator in ``--smoke``)."""

    def __init__(self) -> None:
        from numba import cuda

        self.cuda = cuda
        self.simulated = bool(cuda.config.ENABLE_CUDASIM)
        self.cupy = None
        if not self.simulated:
            try:
                import cupy

                if cupy.cuda.runtime.getDeviceCount() > 0:
                    self.cupy = cupy
            except Exception:
                self.cupy = None

    def describe(self) -> dict:
        if self.simulated:
            return {"name": "CUDA simulator"}
        device = self.cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else device.name
        return {
            "name": name,
            "compute_capability": list(device.compute_capability),
            "multiprocessors": int(device.MULTIPROCESSOR_COUNT),
        }

    def put(self, host: np.ndarray):
        if self.cupy is not None:
            return self.cupy.asarray(host)
        return self.cuda.to_device(host)

    def get(self, array) -> np.ndarray:
        if self.cupy is not None and isinstance(array, self.cupy.ndarray):
            return self.cupy.asnumpy(array)
        return array.copy_to_host()

    def empty_like(self, array):
        if self.cupy is not None:
            return self.cupy.empty_like(array)
        return self.cuda.device_array_like(array)

    def copy(self, dst, src) -> None:
        """Device-to-device memcpy of the whole buffer (the bandwidth reference)."""
        if self.cupy is not None:
            dst.data.copy_from_device_async(src.data, src.nbytes)
        else:
            dst.copy_to_device(src)

    def synchronize(self) -> None:
        self.cuda.synchronize()

    def time_per_call(self, fn, iterations: int, repeats: int) -> float:
        """Best of ``repeats`` mean times of ``iterations`` back-to-back calls, in seconds."""
        fn()  # compiles kernels on first use
        self.synchronize()
        best = float("inf")
        for _ in range(repeats):
            if self.simulated:  # simulator events carry no time
                start = time.perf_counter()
                for _ in range(iterations):
                    fn()
                self.synchronize()
                elapsed = time.perf_counter() - start
            else:
                begin, end = self.cuda.event(), self.cuda.event()
                begin.record()
                for _ in range(iterations):
                    fn()
                end.record()
                end.synchronize()
                elapsed = self.cuda.event_elapsed_time(begin, end) / 1e3
            best = min(best, elapsed / iterations)
        return best


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# -- step 1: conformance on the device -------------------------------------------------------
def run_tests(backend: str, out_dir: Path, smoke: bool) -> dict:
    files = ["tests/test_conformance.py"] + (["tests/test_cuda.py"] if backend == "cuda" else [])
    exercised = out_dir / f"exercised-{backend}.txt"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *files,
        "-q",
        "-p",
        "no:cacheprovider",
        "--backend",
        backend,
        f"--junitxml={out_dir / f'junit-{backend}.xml'}",
    ]
    if smoke:
        cmd += ["-k", "test_forward and float32 and affine"]
    elif importlib.util.find_spec("xdist") is not None:
        # Compiling the cuda backend's kernels dominates its suite; 8 processes compile them
        # in parallel (on an H200 machine: 45 s instead of several minutes).
        cmd += ["-n", "8"]
    env = dict(os.environ, BATCHNORM_TESTED_BACKENDS_FILE=str(exercised))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    was_exercised = exercised.exists() and backend in exercised.read_text().split()
    return {
        "backend": backend,
        "command": " ".join(cmd),
        "returncode": done.returncode,
        "passed": done.returncode == 0 and was_exercised,
        "exercised": was_exercised,
        "summary": lines[-1] if lines else done.stderr.strip()[-2000:],
        "seconds": round(time.perf_counter() - start, 1),
    }


# -- step 2: more than 2**31 elements ---------------------------------------------------------
def check_index64(dev: Device, backend: str, smoke: bool) -> list[dict]:
    """forward() over > 2**31 float16 elements, against float64 statistics."""
    # CuPy computes the reference on the device; without it (the simulator) only the smoke
    # shapes are checked, with NumPy on the host.
    xp = dev.cupy if dev.cupy is not None else np
    if xp is np and not smoke:
        return [{"backend": backend, "skipped": "needs CuPy on a real GPU"}]
    big = 2**31 + 1024
    # name -> (shape, channel axis, the last elements: those a 32-bit index gets wrong)
    cases = {
        "channels-first": ((2, 1, big // 2), 1, np.s_[-1:, :, -256:]),
        "channels-last": ((big // 64, 64), 1, np.s_[-4:, :]),
    }
    if smoke:
        cases = {
            "channels-first": ((2, 1, 64), 1, np.s_[-1:, :, -16:]),
            "channels-last": ((8, 64), 1, np.s_[-4:, :]),
        }
    results = []
    for name, (shape, axis, tail) in cases.items():
        if xp is np:
            x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        else:
            x = xp.random.standard_normal(shape, dtype=xp.float32)
        x = x.astype(xp.float16) + xp.float16(3)
        reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
        want_mean = x.mean(axis=reduce_axes, dtype=xp.float64)
        want_invstd = 1 / xp.sqrt(x.var(axis=reduce_axes, dtype=xp.float64) + EPS)
        start = time.perf_counter()
        y, mean, invstd = bn.forward(
            x if xp is not np else dev.put(x), eps=EPS, axis=axis, backend=backend
        )
        dev.synchronize()
        seconds = time.perf_counter() - start
        if xp is np:
            y, mean, invstd = dev.get(y), dev.get(mean), dev.get(invstd)
        mean_err = float(xp.abs(mean - want_mean).max() / xp.abs(want_mean).max())
        invstd_err = float((xp.abs(invstd - want_invstd) / want_invstd).max())
        per_channel = [1] * x.ndim
        per_channel[axis] = -1
        want_tail = (
            x[tail].astype(xp.float64) - want_mean.reshape(per_channel)
        ) * want_invstd.reshape(per_channel)
        tail_err = float(xp.abs(y[tail].astype(xp.float64) - want_tail).max())
        results.append(
            {
                "backend": backend,
                "case": name,
                "shape": list(shape),
                "elements": int(x.size),
                "seconds": round(seconds, 4),
                "mean_rel_err": mean_err,
                "invstd_rel_err": invstd_err,
                "tail_abs_err": tail_err,
                "passed": mean_err < 1e-4 and invstd_err < 1e-3 and tail_err < 1e-2,
            }
        )
        del x, y
    return results


# -- step 3: benchmarks ----------------------------------------------------------------------
def _torch_calls(torch, x, dy, weight, bias, running_mean, running_var, axis):
    """PyTorch's CUDA batch norm on the same memory (channels-last shown to it as NCHW)."""
    as_t = lambda a: torch.as_tensor(a, device="cuda")  # noqa: E731
    xt, dyt = as_t(x), as_t(dy)
    if axis != 1:  # NHWC memory, NCHW logical shape: PyTorch's channels_last format
        order = (0, xt.ndim - 1, *range(1, xt.ndim - 1))
        xt, dyt = xt.permute(order), dyt.permute(order)
    w, b, rm, rv = map(as_t, (weight, bias, running_mean, running_var))
    F = torch.nn.functional
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(xt, w, b, rm, rv, True, 0.1, EPS)
    return {
        "forward-train": lambda: F.batch_norm(xt, rm, rv, w, b, True, 0.1, EPS),
        "forward-eval": lambda: F.batch_norm(xt, rm, rv, w, b, False, 0.1, EPS),
        "backward": lambda: torch.ops.aten.native_batch_norm_backward(
            dyt, xt, w, rm, rv, save_mean, save_invstd, True, EPS, [True, True, True]
        ),
    }


def _backend_calls(backend, x, dy, weight, bias, running_mean, running_var, axis):
    _, mean, invstd = bn.forward(x, weight, bias, axis=axis, backend=backend)
    return {
        "forward-train": lambda: bn.forward(
            x, weight, bias, running_mean, running_var, axis=axis, backend=backend
        ),
        "forward-eval": lambda: bn.forward(
            x, weight, bias, running_mean, running_var, training=False, axis=axis, backend=backend
        ),
        "backward": lambda: bn.backward(dy, x, weight, mean, invstd, axis=axis, backend=backend),
    }


def _benchmark_case(
    dev: Device,
    backends: list[str],
    torch,
    host: np.ndarray,
    axis: int,
    params: list[np.ndarray],
    iterations: int,
    repeats: int,
) -> dict:
    """Seconds per call of every subject and operation on one array, and of the copy."""
    x, dy = dev.put(host), dev.put(host[::-1].copy())
    weight, bias, running_mean, running_var = map(dev.put, params)
    scratch = dev.empty_like(x)
    copy_seconds = dev.time_per_call(lambda: dev.copy(scratch, x), iterations, repeats)
    subjects = {
        name: _backend_calls(name, x, dy, weight, bias, running_mean, running_var, axis)
        for name in backends
    }
    if torch is not None and dev.cupy is not None:
        subjects["torch"] = _torch_calls(
            torch, x, dy, weight, bias, running_mean, running_var, axis
        )
    times = {
        op: {
            name: dev.time_per_call(calls[op], iterations, repeats)
            for name, calls in subjects.items()
        }
        for op in TRAFFIC
    }
    return {"copy": copy_seconds, "times": times}


def benchmark(
    dev: Device, backends: list[str], shapes: dict, iterations: int, repeats: int
) -> list[dict]:
    torch = None if dev.simulated else _torch_cuda()
    rng = np.random.default_rng(0)
    rows = []
    for shape_name, (dims, axis) in shapes.items():
        for dtype in DTYPES:
            host = (rng.standard_normal(dims, dtype=np.float32) + 0.5).astype(dtype)
            params = [rng.uniform(0.5, 1.5, dims[axis]).astype(np.float32) for _ in range(4)]
            case = _benchmark_case(dev, backends, torch, host, axis, params, iterations, repeats)
            for op, times in case["times"].items():
                for name, seconds in times.items():
                    rows.append(
                        {
                            "shape": shape_name,
                            "dims": list(dims),
                            "axis": axis,
                            "dtype": dtype,
                            "operation": op,
                            "subject": name,
                            "seconds": seconds,
                            "copy_seconds": case["copy"],
                            "copy_bandwidth_fraction": TRAFFIC[op] * case["copy"] / (2 * seconds),
                            "speedup_vs_torch": (
                                times["torch"] / seconds if "torch" in times else None
                            ),
                        }
                    )
    return rows


def verdicts(rows: list[dict], backends: list[str]) -> list[dict]:
    """The issue's targets, for the large shapes: bandwidth fraction and PyTorch speedup."""
    out = []
    for row in rows:
        if row["shape"] in LARGE_SHAPES and row["subject"] in backends:
            target = TARGETS[row["operation"]]
            speedup = row["speedup_vs_torch"]
            out.append(
                {key: row[key] for key in ("subject", "shape", "dtype", "operation")}
                | {
                    "bandwidth_target": target,
                    "bandwidth_met": row["copy_bandwidth_fraction"] >= target,
                    "torch_met": None if speedup is None else speedup >= 1.0,
                }
            )
    return out


def _print_table(rows: list[dict]) -> None:
    print(
        f"{'shape':10} {'dtype':8} {'operation':14} {'subject':8} {'time us':>10} "
        f"{'x copy bw':>10} {'vs torch':>9}"
    )
    for r in rows:
        vs = "" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x"
        print(
            f"{r['shape']:10} {r['dtype']:8} {r['operation']:14} {r['subject']:8} "
            f"{r['seconds'] * 1e6:10.1f} {r['copy_bandwidth_fraction']:10.2f} {vs:>9}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder the JSON results are written to")
    parser.add_argument(
        "--backends",
        default=",".join(GPU_BACKENDS),
        help="comma-separated GPU backends to check (default: cuda,cupy)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes, a test subset and one repeat (works in the simulator)",
    )
    parser.add_argument("--skip-tests", action="store_true", help="skip the pytest step")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    infos = {info.name: info for info in bn.backend_info()}
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends = [b for b in wanted if b in infos and infos[b].available]
    dev = Device()
    report = {
        "smoke": args.smoke,
        "device": dev.describe(),
        "python": platform.python_version(),
        "backends": {
            name: {"available": i.available, "reason": i.reason, "version": i.version}
            for name, i in infos.items()
            if name in wanted
        },
        "tests": [],
        "index64": [],
        "benchmarks": [],
        "targets": [],
    }
    path = args.out_dir / "gpu_check.json"

    def save() -> None:  # after every step, so a run cut short still leaves its results
        path.write_text(json.dumps(report, indent=2))

    print(f"device: {report['device']}; backends to check: {backends or 'none'}")
    for name in wanted:
        if name not in backends:
            print(f"  {name}: skipped ({infos[name].reason if name in infos else 'unknown'})")
    save()
    if not args.skip_tests:
        for name in backends:
            result = run_tests(name, args.out_dir, args.smoke)
            report["tests"].append(result)
            print(f"tests[{name}]: {result['summary']} ({result['seconds']} s)")
            save()
    for name in backends:
        for result in check_index64(dev, name, args.smoke):
            report["index64"].append(result)
            print(f"index64[{name}]: {result}")
        save()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    iterations, repeats = (2, 1) if args.smoke else (20, 3)
    report["benchmarks"] = benchmark(dev, backends, shapes, iterations, repeats)
    report["targets"] = verdicts(report["benchmarks"], backends)
    save()
    _print_table(report["benchmarks"])
    for v in report["targets"]:
        print(
            f"target {v['subject']} {v['shape']} {v['dtype']} {v['operation']}: bandwidth "
            f">= {v['bandwidth_target']}: {v['bandwidth_met']}; >= torch: {v['torch_met']}"
        )
    print(f"results: {path}")
    failed = [t for t in report["tests"] if not t["passed"]]
    failed += [r for r in report["index64"] if r.get("passed") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
