"""The ``numba`` backend: parallel CPU kernels, the default for NumPy arrays.

Kernels are compiled by Numba on first use, nothing at import; ``cache=True`` stores them in
Numba's cache (``__pycache__`` beside the sources, or ``NUMBA_CACHE_DIR``) so a later
process loads them in about a second instead of compiling (about 45 s cold for the float32
kernels, and as long again for float16, which has kernels of its own). Two layouts of the
core's ``(M, C, L)`` view have kernels of their own: channels-first (``L > 1``: rows of one
channel) and channels-last (``L == 1``: vectorised across channels). Inputs whose view is
not C-contiguous are copied once. float16 arrays reach the kernels as their bits and are
computed in float32, converted in registers.

Work is cut into tiles that depend only on the shape, never on the number of threads, and
partial results are merged serially in tile order, so results are bit-identical for any
``NUMBA_NUM_THREADS``. Each tile's mean and M2 are float64: two passes over a
channels-first tile (the second from cache), Welford's update by exact blocks of four rows
over a channels-last one; tiles are merged with Chan's formula. The fused training passes
run one channel per task while a channel fits in cache (``_config.RESIDENT_BYTES``), so the
second read of ``x`` (and ``dy``) comes from cache; otherwise tiles of all channels are
spread over the threads (C = 1 or 3 still uses every thread). Inputs under
``_config.SERIAL_ELEMENTS`` elements run on the calling thread.

Threads
-------
The kernels use Numba's thread pool: ``NUMBA_NUM_THREADS`` (default: all cores) sets its
size, and :func:`numba.set_num_threads` lowers the count for the calling thread, e.g.
``numba.set_num_threads(2)``.

Threading layer and ``fork``
----------------------------
The backend does not choose Numba's threading layer (``NUMBA_THREADING_LAYER``: ``tbb``,
``omp`` or ``workqueue``, chosen by Numba on first parallel launch); it works with each:

* ``omp`` (GNU OpenMP, Numba's usual pick on Linux) is thread-safe, but GNU OpenMP cannot
  run in a child forked after it started ("fork() called from a process already using GNU
  OpenMP" kills the child). A process forked after the backend ran (``multiprocessing``'s
  ``fork`` start method, data-loader workers) therefore runs the kernels on one thread;
  the parent keeps all threads.
* ``workqueue`` survives ``fork`` (children run in parallel too) but aborts the process on
  concurrent launches, so the backend serialises its parallel calls with a lock: calls
  from several Python threads are correct, one at a time.
* ``tbb`` (``pip install tbb``) is both thread- and fork-safe: parallel everywhere.

Use ``NUMBA_THREADING_LAYER=workqueue`` (or ``tbb``) for parallel kernels in forked
workers, or the ``spawn``/``forkserver`` start methods.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from batchnorm import Backend

from . import _config as config
from . import _kernels as kernels

_serial_only = False  # set in a child forked from a process running GNU OpenMP
_workqueue_lock = threading.Lock()


def _threading_layer() -> str | None:
    """The threading layer Numba launched, or None before the first parallel launch."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _after_fork_in_child() -> None:
    global _serial_only, _workqueue_lock
    # GNU OpenMP would kill this child at its next parallel region (Intel's is fork-safe,
    # but Numba does not say which vendor it runs, so both go serial).
    _serial_only = _serial_only or _threading_layer() == "omp"
    _workqueue_lock = threading.Lock()  # the parent may have held it while forking


os.register_at_fork(after_in_child=_after_fork_in_child)


_thread_safe_layer = False  # set once a thread-safe layer ("omp", "tbb") is known to run


def _run(kernel: Any, parallel: bool, *args: Any) -> Any:
    """``kernel(*args)``, under the lock that serialises parallel launches unless the
    threading layer is known to be thread-safe (see the module docstring)."""
    global _thread_safe_layer
    if parallel and not _thread_safe_layer:
        if _threading_layer() in (None, "workqueue"):
            with _workqueue_lock:
                return kernel(*args)
        _thread_safe_layer = True  # the layer never changes once launched
    return kernel(*args)


def _is_parallel(x: np.ndarray) -> bool:
    """Whether a kernel runs its tiles on the thread pool: enough elements to pay for the
    launch, and more than one tile (a channels-last (64, 1024) is one tile: launched in
    parallel, forward-train ran 1.5x slower than on the calling thread alone)."""
    if x.size < config.SERIAL_ELEMENTS or _serial_only:
        return False
    if x.ndim == 2:
        M, C = x.shape
        rows = max(
            config.MIN_ROWS_PER_TILE, config.COLUMN_TILE_ELEMENTS // min(C, config.COLUMN_BLOCK)
        )
        return M > rows or C > config.COLUMN_BLOCK
    return True


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)
_NUMBA_FLOATS = frozenset((_FLOAT32, _FLOAT64))


def _compute_dtype(dtype: Any) -> np.dtype:
    return _FLOAT64 if dtype == _FLOAT64 else _FLOAT32


def _kernel_view(a3: np.ndarray) -> np.ndarray:
    """The view a kernel takes: ``(M, C)`` channels-last, ``(M, C, L)`` channels-first.

    One channel with ``L == 1`` becomes ``(1, 1, M)``: one long row, not M rows of one.
    """
    M, C, L = a3.shape
    if L == 1 and C > 1:
        return a3[:, :, 0]
    if L == 1:
        return np.lib.stride_tricks.as_strided(a3, (1, C, M), (0, a3.strides[1], a3.strides[0]))
    return a3


#: The dtype a kernel sees for each input dtype: float16 as its uint16 bits (Numba has no
#: float16 type on the CPU; the kernels convert in registers and compute in float32).
_KERNEL_DTYPES = {
    np.dtype(np.float16): np.dtype(np.uint16),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}


def _kernel_dtype(dtype: Any) -> np.dtype:
    return _KERNEL_DTYPES.get(np.dtype(dtype), _FLOAT32)


def _as_kernel_dtype(array: np.ndarray, kernel_dtype: np.dtype) -> np.ndarray:
    # Only float16 needs reinterpreting; .view() costs 0.3 us even when it changes nothing.
    return array if array.dtype is kernel_dtype else array.view(kernel_dtype)


def _input(a3: np.ndarray) -> np.ndarray:
    """Kernel view of an input, copied if it is not C-contiguous (or not a float dtype).

    Other strides would each compile (and run unvectorised) kernels of their own: one copy
    is cheaper.
    """
    view = _kernel_view(a3)
    kernel_dtype = _KERNEL_DTYPES.get(view.dtype)
    if kernel_dtype is None:
        return np.ascontiguousarray(view, dtype=_FLOAT32)
    return _as_kernel_dtype(np.ascontiguousarray(view), kernel_dtype)


def _output(out3: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(out, pending)``: the array a kernel writes, and the view :func:`_publish` copies
    it into afterwards (None when the kernel writes ``out3`` in place).
    """
    view = _kernel_view(out3)
    kernel_dtype = _KERNEL_DTYPES.get(view.dtype)
    if kernel_dtype is not None and view.flags.c_contiguous:
        return _as_kernel_dtype(view, kernel_dtype), None
    return np.empty(view.shape, dtype=_kernel_dtype(view.dtype)), view


def _operands(x3: np.ndarray, out3: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(x, out, pending)``: :func:`_input` of ``x3`` and :func:`_output` of ``out3``.

    The common case (C-contiguous float32 or float64, channels-first or channels-last) is
    handled here without those helpers: every Python step of a call costs several times
    its isolated time, because the previous kernel flushed the interpreter's data from the
    caches; on (256, 1024) forward-train the fast path and :func:`_run` made the whole
    call 1.1x faster.
    """
    dtype = x3.dtype
    if dtype in _NUMBA_FLOATS and out3.dtype is dtype:
        if x3.flags.c_contiguous and out3.flags.c_contiguous:
            _, C, L = x3.shape
            if L != 1:
                return x3, out3, None
            if C > 1:
                return x3[:, :, 0], out3[:, :, 0], None
    out, pending = _output(out3)
    return _input(x3), out, pending


def _kernel_view_for(a3: np.ndarray) -> Any:
    """How the kernels take views like ``a3`` without a copy (C-contiguous float32 or
    float64): as they are (channels-first) or as rows (channels-last); None if they can't."""
    if a3.dtype in _NUMBA_FLOATS and a3.flags.c_contiguous:
        _, C, L = a3.shape
        if L != 1:
            return _as_it_is
        if C > 1:
            return _rows_of
    return None


def _input_for(a3: np.ndarray) -> Any:
    """:func:`_input` for calls whose view has the shape, strides and dtype of this one."""
    return _kernel_view_for(a3) or _input


def _operands_for(x3: np.ndarray, out3: np.ndarray) -> Any:
    """:func:`_operands` for calls whose views have the shapes, strides and dtypes of these:
    its common cases without its tests."""
    view = _kernel_view_for(x3)
    if view is None or out3.dtype != x3.dtype or not out3.flags.c_contiguous:
        return _operands
    return lambda x3, out3: (view(x3), view(out3), None)


def _planned_kernel(x3: np.ndarray, out3: np.ndarray, cols_kernel: Any, rows_kernel: Any):
    """``(operands, x, kernel)`` of a plan: :func:`_operands_for`, x's kernel view, and the
    kernel of its layout (channels-last ``cols_*`` for a 2-D view, else ``rows_*``)."""
    operands = _operands_for(x3, out3)
    x, _, _ = operands(x3, out3)
    return operands, x, cols_kernel if x.ndim == 2 else rows_kernel


def _as_it_is(a: Any) -> Any:
    return a


def _rows_of(a3: np.ndarray) -> np.ndarray:
    return a3[:, :, 0]


def _publish(out: np.ndarray, pending: np.ndarray | None) -> None:
    """Copy what a kernel wrote into ``out`` to the view :func:`_output` left pending."""
    if pending is not None:
        pending[...] = out.view(np.float16) if out.dtype == np.uint16 else out


def _tiling(x: np.ndarray) -> tuple[int, ...]:
    """The tile-size arguments of the kernels of x's layout."""
    if x.ndim == 2:
        return config.COLUMN_TILE_ELEMENTS, config.COLUMN_BLOCK, config.MIN_ROWS_PER_TILE
    return (config.TILE_ELEMENTS,)


def _stream(out: np.ndarray) -> bool:
    """Whether ``out`` is written with non-temporal stores: large enough to leave the caches,
    in contiguous runs (a tile's rows) long enough that few cache lines mix both stores."""
    if out.nbytes < config.STREAM_BYTES:  # first: the common small case costs one compare
        return False
    if not out.flags.aligned:  # no run of whole elements reaches a 32-byte boundary: the
        return False  # aligned vector stores would fault (np.frombuffer(..., offset=1))
    if out.ndim == 2:  # a tile of the elementwise passes, whole rows, is one run
        rows, _ = kernels.elementwise_tiling(*out.shape, *_tiling(out))
        run = rows * out.shape[1]
    else:
        run = out.shape[2]
    return run * out.itemsize >= config.STREAM_RUN_BYTES


def _prefetch(x: np.ndarray) -> int:
    """How many elements ahead the statistics pass over channels-last tiles prefetches (0:
    it does not): inputs from memory, not cache, and the rows and dtypes where it was
    measured faster (``_config.PREFETCH_DISTANCE_BYTES`` and what follows it)."""
    if x.nbytes < config.PREFETCH_BYTES:
        return 0
    rows, cols, col_blocks, _ = kernels.col_tiling(*x.shape, *_tiling(x))
    if col_blocks != 1:
        return 0
    if cols < kernels.PERIODIC_COLUMNS:  # summed flat: the next tile
        tile = rows * cols
        return tile if tile * x.itemsize <= config.PREFETCH_TILE_BYTES else 0
    if x.itemsize < 4 or cols * x.itemsize > config.PREFETCH_ROW_BYTES:  # float16 is uint16
        return 0
    return config.PREFETCH_DISTANCE_BYTES // x.itemsize


def _resident(x: np.ndarray, arrays: int) -> bool:
    """Whether a fused pass runs one task per channel: a channel of ``arrays`` inputs in L2."""
    if x.ndim == 2 or not _is_parallel(x):
        return False
    M, C, L = x.shape
    channel_bytes = arrays * M * L * x.itemsize
    return C >= config.RESIDENT_MIN_CHANNELS and channel_bytes <= config.RESIDENT_BYTES


def _grad_by_row(x: np.ndarray) -> bool:
    """Whether the channels-last gradient sums add one row at a time to their partial rows,
    not four: inputs from memory whose rows are long, and not cut into column blocks
    (``_config.GRAD_ROW_BYTES``)."""
    if x.nbytes < config.PREFETCH_BYTES or x.shape[1] > config.COLUMN_BLOCK:
        return False
    return x.shape[1] * x.itemsize >= config.GRAD_ROW_BYTES


def _fused_launch(
    x: np.ndarray, arrays: int, how: Callable[[np.ndarray], int]
) -> dict[bool, tuple]:
    """The launch arguments of a fused kernel over ``arrays`` inputs like ``x``, for a
    parallel call (True) and a serial one (False, in a forked child): channels-last, the
    tiling and how the first pass reads a tile (``how(x)``: :func:`_prefetch`'s distance
    in the forward, :func:`_grad_by_row`'s flag in the backward); channels-first, the tile
    and whether to run one task per resident channel, a parallel loop, so never in a serial
    call."""
    if x.ndim == 2:
        return dict.fromkeys((True, False), (*_tiling(x), how(x)))
    resident = _resident(x, arrays)
    return {True: (config.TILE_ELEMENTS, resident), False: (config.TILE_ELEMENTS, False)}


def _vector(v: Any, fill: float, channels: int, dtype: np.dtype = _FLOAT64) -> np.ndarray:
    """A per-channel argument as a contiguous array (``fill`` for None).

    The cheapest NumPy call for each case (they are per-call overhead): ``empty`` and
    ``fill`` take a third of ``np.full``'s time; ``astype`` (always a new contiguous
    array) half of ``ascontiguousarray``'s when the dtype changes.
    """
    if type(v) is np.ndarray and v.dtype is dtype and v.flags.c_contiguous:
        return v  # the common case first: the core checked the shape
    if v is None:
        filled = np.empty(channels, dtype)
        filled.fill(fill)
        return filled
    if type(v) is np.ndarray and v.ndim == 1 and v.dtype != dtype:
        return v.astype(dtype)
    return np.ascontiguousarray(v, dtype=dtype)


def _param(v: Any, fill: float, channels: int, dtype: np.dtype) -> np.ndarray:
    """A per-channel argument the kernel widens itself: ``v`` as it is when it is a
    contiguous float32 or float64 NumPy vector (no per-call conversion), else
    :func:`_vector` in ``dtype``."""
    if type(v) is np.ndarray and v.dtype in _NUMBA_FLOATS and v.flags.c_contiguous:
        return v  # the core checked the shape: (C,)
    return _vector(v, fill, channels, dtype)


def _param_for(v: Any, fill: float, channels: int, dtype: np.dtype) -> Any:
    """:func:`_param` for calls whose argument has the type, dtype and strides of ``v``: the
    vector as it is, one constant vector of ``fill`` for None (the kernels only read it),
    or a conversion per call."""
    if v is None:
        constant = _vector(None, fill, channels, dtype)
        return lambda v: constant
    if type(v) is np.ndarray and v.dtype in _NUMBA_FLOATS and v.flags.c_contiguous:
        return _as_it_is
    return lambda v: _vector(v, fill, channels, dtype)


def _scale(invstd: Any, weight: Any, channels: int, dtype: np.dtype) -> np.ndarray:
    """``invstd * weight`` multiplied in float64, rounded once to ``dtype``.

    Widening to float64 is exact and ``v * 1.0 == v``, so a missing factor leaves just the
    cast (one NumPy call instead of four); a mixed-dtype ufunc casts its inputs itself.
    """
    if weight is None or invstd is None:
        return _vector(weight if invstd is None else invstd, 1.0, channels, dtype)
    return np.multiply(invstd, weight, dtype=_FLOAT64).astype(dtype, copy=False)


def _numba_vectors(*vectors: Any) -> bool:
    """Whether per-channel vectors go to a compiled loop: NumPy float32/float64 1-D arrays."""
    for v in vectors:
        if not (type(v) is np.ndarray and v.ndim == 1 and v.dtype in _NUMBA_FLOATS):
            return False
    return True


#: The running statistics the fused training kernels update when there are none: empty
#: vectors of the compute dtype, so the kernels compiled for them are those for float32
#: (float64) running statistics.
_NO_RUNNING = {dtype: (np.empty(0, dtype), np.empty(0, dtype)) for dtype in _NUMBA_FLOATS}


class NumbaBackend(Backend):
    """Parallel CPU backend compiled with Numba (``@njit(parallel=True)``).

    Selected automatically for NumPy arrays (priority 10, above ``numpy``). See the module
    docstring for threads, the threading layer and ``fork``.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> y, mean, invstd = bn.forward(np.array([[1.0], [3.0]]), eps=0.0, backend="numba")
    >>> y.ravel(), mean
    (array([-1.,  1.]), array([2.]))
    """

    name = "numba"
    priority = 10

    @property
    def version(self) -> str:
        return numba.__version__

    def devices(self) -> list[str]:
        return [f"cpu ({numba.config.NUMBA_NUM_THREADS} threads)"]

    # -- per-channel steps: one compiled loop instead of several NumPy calls -------------------
    def finish_stats(self, mean, m2, count, eps, stat_dtype):
        if not _numba_vectors(mean, m2) or np.dtype(stat_dtype) not in _NUMBA_FLOATS:
            return super().finish_stats(mean, m2, count, eps, stat_dtype)
        stats = np.empty((3, mean.size), stat_dtype)
        kernels.finish_stats(mean, m2, count, eps, stats)
        return stats[0], stats[1], stats[2]

    def update_running_stats(
        self, running_mean, running_var, batch_mean, batch_var, count, momentum
    ):
        if not _numba_vectors(running_mean, running_var, batch_mean, batch_var):
            super().update_running_stats(
                running_mean, running_var, batch_mean, batch_var, count, momentum
            )
            return
        kernels.update_running_stats(
            running_mean,
            running_var,
            batch_mean,
            batch_var,
            momentum,
            momentum * count / (count - 1),
        )

    # -- phase 1 ---------------------------------------------------------------------------
    def channel_stats(self, x3):
        x = _input(x3)
        parallel = _is_parallel(x)
        if x.ndim == 2:
            return _run(
                kernels.cols_channel_stats, parallel, x, *_tiling(x), _prefetch(x), parallel
            )
        return _run(kernels.rows_channel_stats, parallel, x, *_tiling(x), parallel)

    def grad_sums(self, dy3, x3, mean):
        x, dy = _input(x3), _input(dy3)
        mean = _param(mean, 0.0, x3.shape[1], _compute_dtype(x3.dtype))
        parallel = _is_parallel(x)
        if x.ndim == 2:
            tail = (*_tiling(x), _grad_by_row(x), parallel)
            return _run(kernels.cols_grad_sums, parallel, dy, x, mean, *tail)
        return _run(kernels.rows_grad_sums, parallel, dy, x, mean, *_tiling(x), parallel)

    # -- phase 2 ---------------------------------------------------------------------------
    def normalize(self, x3, mean, invstd, weight, bias, out3):
        channels = x3.shape[1]
        ct = _compute_dtype(x3.dtype)
        shift = _vector(mean, 0.0, channels, ct)
        scale = _scale(invstd, weight, channels, ct)
        if mean is not None and mean.dtype != shift.dtype:  # see kernels.exact_offset
            rounded = (mean != shift) & np.isfinite(shift)
            rounding = np.subtract(mean, shift, out=np.zeros(channels), where=rounded)
            offset = (_vector(bias, 0.0, channels) - rounding * scale).astype(ct)
        else:
            offset = _vector(bias, 0.0, channels, ct)
        x, out, pending = _operands(x3, out3)
        parallel = _is_parallel(x)
        kernel = kernels.cols_normalize if x.ndim == 2 else kernels.rows_normalize
        _run(kernel, parallel, x, shift, scale, offset, out, *_tiling(x), _stream(out), parallel)
        _publish(out, pending)

    def input_grad(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xmu, out3):
        channels = x3.shape[1]
        n = x3.shape[0] * x3.shape[2]
        invstd64 = _vector(invstd, 1.0, channels)
        # The rows are those of kernels.grad_coefficients, the fused kernel's version.
        coefs = np.stack(
            [
                _vector(mean, 0.0, channels),
                _vector(sum_dy, 0.0, channels) / n,
                invstd64 * invstd64 * _vector(sum_dy_xmu, 0.0, channels) / n,
                _vector(weight, 1.0, channels) * invstd64,
            ]
        ).astype(_compute_dtype(x3.dtype))
        x, out, pending = _operands(x3, out3)
        dy = _input(dy3)
        parallel = _is_parallel(x)
        kernel = kernels.cols_input_grad if x.ndim == 2 else kernels.rows_input_grad
        _run(kernel, parallel, dy, x, coefs, out, *_tiling(x), _stream(out), parallel)
        _publish(out, pending)

    # -- fused: one kernel call each, planned --------------------------------------------------
    # Each plan_* method settles what depends only on the arrays' shapes, strides and dtypes
    # (views, kernel, tiling, conversions) and returns the function that runs a call; the
    # method of the same name plans and runs at once. Results go into arrays allocated here:
    # a compiled function returning new arrays costs about 1.5 us more per call.
    def plan_forward_train(self, x3, weight, bias, out3, running_mean, running_var):
        channels, count = x3.shape[1], x3.shape[0] * x3.shape[2]
        ct = _compute_dtype(x3.dtype)
        operands, x, kernel = _planned_kernel(
            x3, out3, kernels.cols_forward_train, kernels.rows_forward_train
        )
        launch = _fused_launch(x, arrays=1, how=_prefetch)
        parallel = _is_parallel(x)
        weight_of = _param_for(weight, 1.0, channels, ct)
        bias_of = _param_for(bias, 0.0, channels, ct)
        # The kernels update NumPy float32/float64 running statistics too (a Python call
        # less); an empty pair updates nothing.
        fused = running_mean is not None and _numba_vectors(running_mean, running_var)
        unbias = count / (count - 1) if fused else 0.0
        no_running = _NO_RUNNING[ct]
        default_update = super().update_running_stats

        def forward_train(
            x3, weight, bias, eps, out3, stat_dtype, running_mean=None, running_var=None,
            momentum=0.0,
        ):  # fmt: skip
            x, out, pending = operands(x3, out3)
            stats = np.empty((3, channels), ct)
            running = (running_mean, running_var) if fused else no_running
            go = parallel and not _serial_only
            _run(
                kernel, go,
                x, weight_of(weight), bias_of(bias), eps, out, stats, *running, momentum,
                momentum * unbias, *launch[go], _stream(out), go,
            )  # fmt: skip
            _publish(out, pending)
            if running_mean is not None and not fused:  # not NumPy float vectors: the default
                default_update(running_mean, running_var, stats[0], stats[1], count, momentum)
            if ct != stat_dtype:  # never with the core's dtypes: the kernels compute in them
                stats = stats.astype(stat_dtype)
            return stats[0], stats[1], stats[2]

        return forward_train

    def forward_train(
        self, x3, weight, bias, eps, out3, stat_dtype, running_mean=None, running_var=None,
        momentum=0.0,
    ):  # fmt: skip
        run = self.plan_forward_train(x3, weight, bias, out3, running_mean, running_var)
        return run(x3, weight, bias, eps, out3, stat_dtype, running_mean, running_var, momentum)

    def plan_forward_eval(self, x3, running_mean, running_var, weight, bias, out3):
        if not _numba_vectors(running_mean, running_var):
            return super().forward_eval  # the composed default
        channels = x3.shape[1]
        ct = _compute_dtype(x3.dtype)
        operands, x, kernel = _planned_kernel(
            x3, out3, kernels.cols_forward_eval, kernels.rows_forward_eval
        )
        tiling = _tiling(x)
        parallel = _is_parallel(x)
        # weight and bias keep their dtype (the kernel widens them), like the running stats.
        weight_of = _param_for(weight, 1.0, channels, ct)
        bias_of = _param_for(bias, 0.0, channels, ct)
        default = super().forward_eval

        def forward_eval(x3, running_mean, running_var, weight, bias, eps, out3, stat_dtype):
            if ct != stat_dtype:  # never through the public API
                return default(x3, running_mean, running_var, weight, bias, eps, out3, stat_dtype)
            x, out, pending = operands(x3, out3)
            stats = np.empty((2, channels), ct)
            go = parallel and not _serial_only
            _run(
                kernel, go,
                x, running_mean, running_var, weight_of(weight), bias_of(bias), eps, out, stats,
                *tiling, _stream(out), go,
            )  # fmt: skip
            _publish(out, pending)
            return stats[0], stats[1]

        return forward_eval

    def forward_eval(self, x3, running_mean, running_var, weight, bias, eps, out3, stat_dtype):
        run = self.plan_forward_eval(x3, running_mean, running_var, weight, bias, out3)
        return run(x3, running_mean, running_var, weight, bias, eps, out3, stat_dtype)

    def plan_backward_train(self, dy3, x3, mean, invstd, weight, out3):
        channels = x3.shape[1]
        ct = _compute_dtype(x3.dtype)
        operands, x, kernel = _planned_kernel(
            x3, out3, kernels.cols_backward_train, kernels.rows_backward_train
        )
        dy_of = _input_for(dy3)
        launch = _fused_launch(x, arrays=2, how=_grad_by_row)
        parallel = _is_parallel(x)
        mean_of = _param_for(mean, 0.0, channels, ct)
        invstd_of = _param_for(invstd, 1.0, channels, ct)
        weight_of = _param_for(weight, 1.0, channels, ct)

        def backward_train(dy3, x3, mean, invstd, weight, out3):
            x, out, pending = operands(x3, out3)
            go = parallel and not _serial_only
            sums = _run(
                kernel, go,
                dy_of(dy3), x, mean_of(mean), invstd_of(invstd), weight_of(weight), out,
                *launch[go], _stream(out), go,
            )  # fmt: skip
            _publish(out, pending)
            return sums

        return backward_train

    def backward_train(self, dy3, x3, mean, invstd, weight, out3):
        run = self.plan_backward_train(dy3, x3, mean, invstd, weight, out3)
        return run(dy3, x3, mean, invstd, weight, out3)
