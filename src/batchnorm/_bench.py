"""Benchmark cases and timing shared by ``python -m batchnorm bench`` and ``benchmarks/``.

Absolute times on a shared 2-core machine say little, so every figure is a ratio taken
within one run: time as a multiple of a plain copy of the same array (the memory-bandwidth
floor), speedup over PyTorch and over the NumPy reference, and effective GB/s under a
minimal-traffic model. A *subject* is a backend name or one of the peers ``numpy-expr``
(plain NumPy expressions), ``torch`` (``torch.nn.functional.batch_norm``), ``copy-numpy``
(:func:`numpy.copyto`), ``copy-torch`` (``Tensor.copy_``); a GPU backend brings its own
device copy ``copy-<backend>`` and, when PyTorch sees a GPU, ``torch-cuda``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import numpy as np

import batchnorm as bn

#: Named shapes ``(dims, channel axis)``: those of the performance targets, a tiny one whose
#: time is per-call overhead, and a wide one: channels-last rows longer than the numba
#: backend's column block are cut into segments, a code path of its own (a copy per segment
#: once made it 6-11x slower, unnoticed until this shape was measured).
SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "nchw": ((32, 64, 56, 56), 1),
    "nchw-c3": ((64, 3, 224, 224), 1),
    "nchw-small": ((8, 256, 14, 14), 1),
    "2d": ((256, 1024), 1),
    "nhwc": ((32, 56, 56, 64), -1),
    "tiny": ((4, 8, 4, 4), 1),
    "2d-wide": ((3136, 2048), 1),
}
OPERATIONS = ("forward-train", "forward-eval", "backward-train", "running-stats")
#: float16 and float64 are measured on this shape only (float32 on all).
EXTRA_DTYPES_SHAPE = "nchw"
REFERENCE = "numpy"
CPU_COPIES = ("copy-numpy", "copy-torch")
#: Clocks a measurement can use: wall time, or CPU time of the whole process (which does not
#: count the time other programs hold the cores, but adds up the time of all threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
EPS = 1e-5
MOMENTUM = 0.1


class Unsupported(Exception):
    """A subject cannot run a case here; the message says why."""


@dataclass(frozen=True)
class Case:
    """One (operation, shape, dtype) point; all subjects of a case form one group."""

    operation: str
    dims: tuple[int, ...]
    axis: int
    dtype: str

    @property
    def shape_label(self) -> str:
        label = "x".join(map(str, self.dims))
        return label if self.axis == 1 else f"{label}:axis={self.axis}"

    @property
    def group(self) -> str:
        return f"{self.operation}|{self.shape_label}|{self.dtype}"

    @property
    def channels(self) -> int:
        return self.dims[self.axis]

    @property
    def count(self) -> int:
        return math.prod(self.dims) // self.channels

    @property
    def traffic_bytes(self) -> int:
        """Bytes a perfect kernel moves: each big array read or written once."""
        itemsize = np.dtype(self.dtype).itemsize
        if self.operation == "running-stats":  # read 4 vectors, write 2, in the stat dtype
            return 6 * self.channels * _param_dtype(self.dtype).itemsize
        arrays = 3 if self.operation == "backward-train" else 2  # (x, dy) -> dx; x -> y
        return arrays * math.prod(self.dims) * itemsize

    @property
    def copy_bytes(self) -> int:
        """Bytes moved by the copy this case is compared with (read + write)."""
        if self.operation == "running-stats":
            return 2 * self.channels * _param_dtype(self.dtype).itemsize
        return 2 * math.prod(self.dims) * np.dtype(self.dtype).itemsize


def all_cases(
    shapes: Iterable[str] = SHAPES,
    operations: Iterable[str] = OPERATIONS,
    dtypes: Iterable[str] | None = None,
) -> list[Case]:
    """The benchmark matrix: float32 everywhere, float16/float64 on one shape.

    ``dtypes`` given explicitly applies to every shape.
    """
    cases = []
    for name in shapes:
        dims, axis = SHAPES[name]
        for dtype in dtypes or (
            ["float32", "float16", "float64"] if name == EXTRA_DTYPES_SHAPE else ["float32"]
        ):
            cases.extend(Case(op, dims, axis, dtype) for op in operations)
    return cases


def parse_shape(text: str, axis: int = 1) -> tuple[tuple[int, ...], int]:
    """A named shape from :data:`SHAPES`, or ``"32x64x56x56"`` with the given axis."""
    if text in SHAPES:
        return SHAPES[text]
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"shape {text!r} is neither one of {', '.join(SHAPES)} nor like 32x64x56x56"
        ) from None
    return dims, axis


def _param_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# -- subjects --------------------------------------------------------------------------------
@dataclass
class Runner:
    """A prepared, argument-free call of one subject on one case, and where it runs."""

    call: Callable[[], object]
    device: str  # "cpu" or "gpu"


def simulated_reason(name: str) -> str | None:
    """Why backend ``name`` must not be timed here (Numba's CUDA simulator), else None."""
    if name != "cuda":
        return None
    from numba import config

    if config.ENABLE_CUDASIM:
        return "NUMBA_ENABLE_CUDASIM=1: the CUDA simulator's timings mean nothing"
    return None


def timed_backends() -> dict[str, str | None]:
    """Every registered backend and why it is not benchmarked (None: it is)."""
    reasons = {}
    for info in bn.backend_info():
        reasons[info.name] = info.reason or simulated_reason(info.name)
    return reasons


def peer_subjects(backends: Iterable[str]) -> list[str]:
    """Peers worth running next to ``backends`` (GPU ones bring their device copy)."""
    peers = ["numpy-expr", "torch", *CPU_COPIES]
    gpu = [name for name in backends if _is_gpu_backend(name)]
    peers += [f"copy-{name}" for name in gpu]
    if gpu and _torch_cuda():
        peers.append("torch-cuda")
    return peers


def _is_gpu_backend(name: str) -> bool:
    return _synchronizer(bn.get_backend(name).from_host(np.zeros(1, np.float32))) is not None


def _synchronizer(native) -> Callable[[], None] | None:
    """How to wait for queued work on ``native``'s device; None for host arrays."""
    module = type(native).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy.cuda.get_current_stream().synchronize
    if "cuda" in module:  # Numba CUDA device arrays (real or simulated)
        from numba import cuda

        return cuda.synchronize
    return None


def _torch():
    if importlib.util.find_spec("torch") is None:
        raise Unsupported("torch is not installed")
    import torch
    from numba import get_num_threads

    # The same thread count as Numba's, so the comparison is like for like.
    torch.set_num_threads(get_num_threads())
    return torch


def _torch_cuda() -> bool:
    try:
        return _torch().cuda.is_available()
    except Unsupported:
        return False


class _Data:
    """The arrays of one case, generated once and shared by every subject."""

    def __init__(self, case: Case, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        dtype, pdtype = np.dtype(case.dtype), _param_dtype(case.dtype)
        big = np.float64 if dtype == np.float64 else np.float32
        self.x = (rng.standard_normal(case.dims, dtype=big) * 2 + 0.5).astype(dtype, copy=False)
        self.dy = rng.standard_normal(case.dims, dtype=big).astype(dtype, copy=False)
        channels = case.channels
        self.weight = rng.uniform(0.5, 1.5, channels).astype(pdtype)
        self.bias = rng.uniform(-0.5, 0.5, channels).astype(pdtype)
        self.running_mean = np.zeros(channels, pdtype)
        self.running_var = np.ones(channels, pdtype)
        _, self.mean, self.invstd = bn.forward(self.x, axis=case.axis, backend=REFERENCE)
        self.batch_var = (1 / self.invstd.astype(np.float64) ** 2 - EPS).astype(pdtype)


_data_cache: dict[Case, _Data] = {}


def case_data(case: Case) -> _Data:
    """The arrays of ``case`` (only the latest case is kept: big shapes are ~100 MB)."""
    key = Case("", case.dims, case.axis, case.dtype)  # all operations share the arrays
    if key not in _data_cache:
        _data_cache.clear()
        _data_cache[key] = _Data(case)
    return _data_cache[key]


def make_runner(subject: str, case: Case) -> Runner:
    """Prepare ``subject`` on ``case``: allocate outputs, move data, run it once.

    Raises
    ------
    Unsupported
        When the subject cannot run the case here (missing library, unsupported dtype).
    """
    data = case_data(case)
    if subject == "numpy-expr":
        runner = Runner(_numpy_expression(case, data), "cpu")
    elif subject in ("torch", "torch-cuda"):
        runner = _torch_runner(case, data, "cuda" if subject == "torch-cuda" else "cpu")
    elif subject == "copy-numpy":
        src = data.running_mean if case.operation == "running-stats" else data.x
        dst = np.empty_like(src)
        runner = Runner(lambda: np.copyto(dst, src), "cpu")
    elif subject == "copy-torch":
        torch = _torch()
        src = data.running_mean if case.operation == "running-stats" else data.x
        src_t, dst_t = torch.from_numpy(src), torch.from_numpy(np.empty_like(src))
        runner = Runner(lambda: dst_t.copy_(src_t), "cpu")
    elif subject.startswith("copy-"):
        runner = _device_copy(subject.removeprefix("copy-"), case, data)
    else:
        runner = _backend_runner(subject, case, data)
    try:
        runner.call()  # compile, allocate, and fail here rather than inside a timer
    except Exception as exc:
        raise Unsupported(f"{subject} fails on {case.group}: {type(exc).__name__}: {exc}") from exc
    return runner


def _with_sync(call: Callable[[], object], sync: Callable[[], None] | None) -> Runner:
    if sync is None:
        return Runner(call, "cpu")

    def synchronized():
        call()
        sync()

    return Runner(synchronized, "gpu")


def _backend_runner(name: str, case: Case, data: _Data) -> Runner:
    reason = simulated_reason(name)
    if reason:
        raise Unsupported(f"backend {name!r}: {reason}")
    try:
        be = bn.get_backend(name)
    except (ValueError, RuntimeError) as exc:
        raise Unsupported(str(exc)) from exc
    x, dy = be.from_host(data.x), be.from_host(data.dy)
    w, b = be.from_host(data.weight), be.from_host(data.bias)
    rm, rv = be.from_host(data.running_mean.copy()), be.from_host(data.running_var.copy())
    mean, invstd = be.from_host(data.mean), be.from_host(data.invstd)
    batch_var = be.from_host(data.batch_var)
    out = be.to_user(be.empty_like(be.as_native(x)), x)
    common = {"axis": case.axis, "backend": name, "out": out}
    calls = {
        "forward-train": partial(
            bn.forward, x, w, b, rm, rv, momentum=MOMENTUM, eps=EPS, **common
        ),
        "forward-eval": partial(bn.forward, x, w, b, rm, rv, training=False, eps=EPS, **common),
        "backward-train": partial(bn.backward, dy, x, w, mean, invstd, **common),
        "running-stats": partial(
            bn.update_running_stats, rm, rv, mean, batch_var, case.count, MOMENTUM, backend=name
        ),
    }
    return _with_sync(calls[case.operation], _synchronizer(be.as_native(x)))


def _device_copy(name: str, case: Case, data: _Data) -> Runner:
    be = bn.get_backend(name)
    src = be.as_native(
        be.from_host(data.running_mean if case.operation == "running-stats" else data.x)
    )
    dst = be.empty_like(src)
    return _with_sync(lambda: be.copy_into(dst, src), _synchronizer(src))


def _numpy_expression(case: Case, data: _Data) -> Callable[[], object]:
    """The operation as one would write it in NumPy (float16 accumulated in float32)."""
    axes = tuple(a for a in range(len(case.dims)) if a != case.axis % len(case.dims))
    bshape = [1] * len(case.dims)
    bshape[case.axis] = case.channels
    x, dy, n = data.x, data.dy, case.count
    acc = None if x.dtype != np.float16 else np.float32
    w, b = data.weight.reshape(bshape), data.bias.reshape(bshape)
    rm, rv = data.running_mean.copy(), data.running_var.copy()

    def forward_train():
        mean = x.mean(axis=axes, keepdims=True, dtype=acc)
        var = x.var(axis=axes, keepdims=True, dtype=acc)
        y = ((x - mean) * (w / np.sqrt(var + EPS)) + b).astype(x.dtype)
        rm[...] = (1 - MOMENTUM) * rm + MOMENTUM * mean.ravel()
        rv[...] = (1 - MOMENTUM) * rv + MOMENTUM * var.ravel() * (n / (n - 1))
        return y

    def forward_eval():
        scale = w / np.sqrt(rv.reshape(bshape) + EPS)
        return ((x - rm.reshape(bshape)) * scale + b).astype(x.dtype)

    mean, invstd = data.mean.reshape(bshape), data.invstd.reshape(bshape)

    def backward_train():
        xmu = x - mean
        sum_dy = dy.sum(axis=axes, keepdims=True, dtype=acc)
        sum_dy_xmu = (dy * xmu).sum(axis=axes, keepdims=True, dtype=acc)
        dx = (w * invstd) * (dy - sum_dy / n - xmu * (invstd**2 * sum_dy_xmu / n))
        return dx.astype(x.dtype), (sum_dy_xmu * invstd).ravel(), sum_dy.ravel()

    def running_stats():
        rm[...] = (1 - MOMENTUM) * rm + MOMENTUM * data.mean
        rv[...] = (1 - MOMENTUM) * rv + MOMENTUM * data.batch_var * (n / (n - 1))

    return {
        "forward-train": forward_train,
        "forward-eval": forward_eval,
        "backward-train": backward_train,
        "running-stats": running_stats,
    }[case.operation]


def _torch_runner(case: Case, data: _Data, device: str) -> Runner:
    torch = _torch()
    functional = torch.nn.functional

    def tensor(array):
        return torch.from_numpy(array).to(device)

    # PyTorch wants channels at dim 1; moving the axis keeps the memory layout (channels-last).
    x = tensor(data.x).movedim(case.axis, 1)
    dy = tensor(data.dy).movedim(case.axis, 1)
    w, b = tensor(data.weight), tensor(data.bias)
    rm, rv = tensor(data.running_mean.copy()), tensor(data.running_var.copy())
    op = case.operation
    if op == "backward-train":
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
        y = functional.batch_norm(xg, None, None, wg, bg, training=True, eps=EPS)

        def call():
            return torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)
    elif op == "running-stats":
        mean, batch_var = tensor(data.mean), tensor(data.batch_var)
        n = case.count

        def call():
            with torch.no_grad():
                rm.mul_(1 - MOMENTUM).add_(mean, alpha=MOMENTUM)
                rv.mul_(1 - MOMENTUM).add_(batch_var, alpha=MOMENTUM * n / (n - 1))
    else:
        training = op == "forward-train"

        def call():
            with torch.no_grad():
                return functional.batch_norm(
                    x, rm, rv, w, b, training=training, momentum=MOMENTUM, eps=EPS
                )

    return _with_sync(call, torch.cuda.synchronize if device == "cuda" else None)


# -- timing and figures ----------------------------------------------------------------------
def _seconds(call: Callable[[], object], number: int, clock=time.perf_counter) -> float:
    start = clock()
    for _ in range(number):
        call()
    return clock() - start


def best_times(
    runners: dict[str, Runner],
    rounds: int = 5,
    round_seconds: float = 0.02,
    budget_seconds: float = 2.0,
    clock=time.perf_counter,
) -> dict[str, float]:
    """Best per-call time of each runner over ``rounds`` interleaved rounds.

    A round repeats a call until it lasts ``round_seconds`` (so tiny calls are not timer
    noise). Rounds alternate between runners, so a burst of load from a neighbour hits all
    of them alike; the minimum is the least disturbed estimate. A runner slower than
    ``budget_seconds / rounds`` per call gets fewer rounds (at least two). ``clock`` may be
    :func:`time.process_time` to count CPU time only (see ``benchmarks/compare.py``).
    """
    numbers, limits, best = {}, {}, {}
    for name, runner in runners.items():
        once = _seconds(runner.call, 1, clock)
        numbers[name] = max(1, math.ceil(round_seconds / max(once, 1e-9)))
        limits[name] = max(2, min(rounds, int(budget_seconds / max(once, 1e-9))))
        best[name] = once
    for index in range(rounds):
        for name, runner in runners.items():
            if index < limits[name]:
                per_call = _seconds(runner.call, numbers[name], clock) / numbers[name]
                best[name] = min(best[name], per_call)
    return best


@dataclass(frozen=True)
class Figures:
    """The machine-independent figures of one subject on one case."""

    seconds: float
    copy_ratio: float | None  # time / best copy time on the same device
    speedup_vs_torch: float | None
    speedup_vs_reference: float | None
    gb_per_s: float

    def as_dict(self) -> dict[str, float | None]:
        return {
            "copy_ratio": self.copy_ratio,
            "speedup_vs_torch": self.speedup_vs_torch,
            "speedup_vs_reference": self.speedup_vs_reference,
            "gb_per_s": self.gb_per_s,
        }


def figures(case: Case, times: dict[str, float], devices: dict[str, str]) -> dict[str, Figures]:
    """Ratios of every subject timed on ``case`` against the peers timed in the same run."""

    def best_of(names):
        found = [times[n] for n in names if n in times]
        return min(found) if found else None

    gpu_copies = [n for n in times if n.startswith("copy-") and n not in CPU_COPIES]
    result = {}
    for subject, seconds in times.items():
        on_gpu = devices.get(subject) == "gpu"
        if on_gpu:
            own_copy = f"copy-{subject}"
            copy = best_of([own_copy] if own_copy in times else gpu_copies)
        else:
            copy = best_of(CPU_COPIES)
        torch_time = best_of(["torch-cuda" if on_gpu else "torch"])
        reference = times.get(REFERENCE)
        result[subject] = Figures(
            seconds=seconds,
            copy_ratio=seconds / copy if copy else None,
            speedup_vs_torch=torch_time / seconds if torch_time else None,
            speedup_vs_reference=reference / seconds if reference else None,
            gb_per_s=(case.copy_bytes if subject.startswith("copy-") else case.traffic_bytes)
            / seconds
            / 1e9,
        )
    return result


def measure(
    cases: Iterable[Case],
    subjects: Iterable[str],
    rounds: int = 5,
    progress: Callable[[Iterable], Iterable] = iter,
    clock=time.perf_counter,
) -> tuple[dict[Case, dict[str, Figures]], dict[str, str]]:
    """Time ``subjects`` on every case; returns the figures and the skipped subjects' reasons.

    ``progress`` wraps the iteration over cases (e.g. ``tqdm``).
    """
    subjects = list(subjects)
    skipped: dict[str, str] = {}
    results = {}
    for case in progress(list(cases)):
        runners = {}
        for subject in subjects:
            try:
                runners[subject] = make_runner(subject, case)
            except Unsupported as exc:
                skipped.setdefault(subject, str(exc))
        times = best_times(runners, rounds=rounds, clock=clock)
        results[case] = figures(case, times, {n: r.device for n, r in runners.items()})
    return results, skipped


# -- command line ----------------------------------------------------------------------------
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``python -m batchnorm bench`` to ``parser``."""
    parser.add_argument(
        "--shape",
        action="append",
        metavar="SHAPE",
        help=f"one of {', '.join(SHAPES)} or like 32x64x56x56 (repeatable; default: nchw)",
    )
    parser.add_argument(
        "--axis",
        type=int,
        default=1,
        help="channel axis for shapes given as dimensions (default 1)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    parser.add_argument(
        "--operation",
        action="append",
        choices=OPERATIONS,
        help="operation to time (repeatable; default: all)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        help="backend to time (repeatable; default: every available one)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (best is kept)")
    parser.add_argument(
        "--threads", type=int, help="Numba (and PyTorch) threads (default: Numba's setting)"
    )
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a busy machine, single thread)",
    )
    parser.add_argument("--plot", metavar="PNG", help="also write a bar chart (matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def progress_bar(enabled: bool) -> Callable[[Iterable], Iterable]:
    if enabled and importlib.util.find_spec("tqdm") is not None:
        from tqdm import tqdm

        return lambda cases: tqdm(cases, desc="timing", unit="case", leave=False)
    return iter


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: dict[Case, dict[str, Figures]]) -> str:
    """A plain-text table of the figures, one row per (case, subject)."""
    header = (
        "operation",
        "shape",
        "dtype",
        "subject",
        "ms",
        "x copy",
        "vs torch",
        "vs ref",
        "GB/s",
    )
    rows = [header]
    for case, by_subject in results.items():
        for subject, fig in by_subject.items():
            rows.append(
                (
                    case.operation,
                    case.shape_label,
                    case.dtype,
                    subject,
                    f"{fig.seconds * 1e3:.3f}",
                    _fmt(fig.copy_ratio, ".2f"),
                    _fmt(fig.speedup_vs_torch, ".2f"),
                    _fmt(fig.speedup_vs_reference, ".1f"),
                    f"{fig.gb_per_s:.1f}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 4 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot(results: dict[Case, dict[str, Figures]], backends: list[str], path: str) -> None:
    """Bar chart of each backend's speedup per shape, one panel per operation.

    The speedup is over PyTorch where it was timed, else over the NumPy reference.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_torch = any(f.speedup_vs_torch for by in results.values() for f in by.values())
    attribute = "speedup_vs_torch" if use_torch else "speedup_vs_reference"
    operations = list(dict.fromkeys(case.operation for case in results))
    shapes = list(dict.fromkeys(case.shape_label for case in results))
    by_key = {(case.operation, case.shape_label): by for case, by in results.items()}
    fig, axes = plt.subplots(
        len(operations),
        1,
        figsize=(max(6, 1.5 * len(shapes) + 2), 2.4 * len(operations)),
        squeeze=False,
        sharex=True,
        layout="constrained",
    )
    width = 0.8 / max(1, len(backends))
    positions = np.arange(len(shapes))
    for ax, operation in zip(axes[:, 0], operations):
        for i, name in enumerate(backends):
            figs = [by_key.get((operation, shape), {}).get(name) for shape in shapes]
            values = [getattr(f, attribute) or np.nan if f else np.nan for f in figs]
            ax.bar(positions + i * width, values, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(operation, fontsize=10)
        ax.set_ylabel(f"speedup over\n{'PyTorch' if use_torch else 'reference'}")
    axes[-1, 0].set_xticks(positions + width * (len(backends) - 1) / 2, shapes, fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(args: argparse.Namespace) -> int:
    """Run ``python -m batchnorm bench`` with parsed ``args``; returns the exit status."""
    reasons = timed_backends()
    backends = args.backend or [name for name in bn.available_backends() if not reasons[name]]
    for name in backends:
        if reasons.get(name, "unknown backend"):
            print(f"cannot time backend {name!r}: {reasons.get(name, 'unknown backend')}")
            return 2
    shapes = [parse_shape(text, args.axis) for text in (args.shape or ["nchw"])]
    cases = [
        Case(op, dims, axis, args.dtype)
        for dims, axis in shapes
        for op in (args.operation or OPERATIONS)
    ]
    if args.threads:
        from numba import set_num_threads

        set_num_threads(args.threads)
    subjects = backends + peer_subjects(backends)
    progress = progress_bar(not args.no_progress)
    results, skipped = measure(cases, subjects, args.rounds, progress, CLOCKS[args.clock])
    print(format_table(results))
    print(
        "\nx copy: time / best copy of the array on the same device (lower is better); "
        "vs torch, vs ref: speedup (higher is better); GB/s: minimal traffic / time."
    )
    for subject, reason in skipped.items():
        print(f"skipped {subject}: {reason}")
    if args.plot:
        plot(results, backends, args.plot)
        print(f"wrote {args.plot}")
    return 0
