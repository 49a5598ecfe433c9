"""The ``cupy`` backend: CUDA C kernels (``kernels.cu``) run through ``cupy.RawModule``.

Statistics and gradient sums are one pass each over the data: a 2-D grid of blocks (splits
of the reduced positions x tiles of channels) writes per-split partial results (Welford/Chan
mean and M2, or plain sums), which a per-channel kernel merges in a fixed order, so results are
deterministic. Normalization and the input gradient are single fused elementwise passes.
Every array is read through its own strides; float16 is computed in float32. The per-channel
steps (evaluation statistics, running-statistics update, parameter gradients) are one small
kernel each, which takes vectors of any float dtype and stride as they are, so a public call
is a fixed handful of launches, not one CuPy operation per arithmetic step: forward-train 3,
and 1 more with running statistics; forward-eval 2; backward-train 4 (and one conversion per
weight or bias whose dtype is not the computation dtype, in training).

Everything runs on CuPy's current stream of the device holding the input, and nothing waits
for the device. Importing this module never imports CuPy; :meth:`CupyBackend.unavailable_reason`
says why the backend cannot run (CuPy missing, no driver or device).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any

import numpy as np

from batchnorm import Backend

from . import _kernels, _launch
from ._launch import FINISH_THREADS, accumulation_dtype, element_strides, finish_grid

__all__ = ["CupyBackend"]


@functools.cache
def _unavailable_reason() -> str | None:
    try:
        import cupy
    except ModuleNotFoundError as exc:
        if exc.name != "cupy":
            return f"cupy failed to import: {exc}"
        return "cupy is not installed"
    except Exception as exc:  # e.g. a broken CUDA library: report it, don't raise
        return f"cupy failed to import: {type(exc).__name__}: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"no CUDA driver or device: {exc}"
    return None if count > 0 else "no CUDA driver or device: no CUDA device found"


@functools.cache
def _multiprocessor_count(device_id: int) -> int:
    import cupy

    runtime = cupy.cuda.runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device_id)


def _any_vector(vector) -> tuple:
    """Kernel arguments of a per-channel vector of any float dtype and stride: the array (a
    pointer to element 0; None is a null pointer), its element size and its element stride."""
    if vector is None:
        return None, np.int32(0), np.int64(0)
    (stride,) = element_strides(vector.strides, vector.itemsize)
    return vector, np.int32(vector.itemsize), np.int64(stride)


def _view_args(array3) -> tuple:
    """Kernel arguments of a 3-D view: the array (a pointer to element [0, 0, 0]) and strides."""
    return (array3, *map(np.int64, element_strides(array3.strides, array3.itemsize)))


def _geometry_args(shape3, launch: _launch.Launch) -> tuple:
    outer, channels, inner = shape3
    return (
        np.int64(outer),
        np.int32(channels),
        np.int64(inner),
        np.int32(launch.channels_per_block),
        np.int64(launch.chunk),
    )


class CupyBackend(Backend):
    """Batch norm on CuPy arrays with custom CUDA kernels.

    Accepts ``cupy.ndarray`` only, and is chosen before the ``cuda`` backend for them.
    Requires CuPy (extra ``cupy``) and a CUDA device; the kernels are compiled by CuPy's
    NVRTC on first use per data type and kept in CuPy's kernel cache.

    Examples
    --------
    >>> import batchnorm as bn
    >>> info = {i.name: i for i in bn.backend_info()}["cupy"]
    >>> info.available or info.reason.startswith(("cupy", "no CUDA"))
    True
    """

    name = "cupy"
    priority = 20

    # -- identity and availability -------------------------------------------------------
    @property
    def xp(self):
        """The ``cupy`` module (imported on first use)."""
        import cupy

        return cupy

    @property
    def version(self) -> str:
        """CuPy's version, or ``"not installed"``."""
        try:
            import cupy
        except Exception:  # the reason is reported by unavailable_reason()
            return "not installed"
        return cupy.__version__

    def unavailable_reason(self) -> str | None:
        """Why CuPy cannot run here (not installed, no driver or device), or None."""
        return _unavailable_reason()

    def accepts(self, array: Any) -> bool:
        """Whether ``array`` is a ``cupy.ndarray`` (never imports CuPy to find out)."""
        if not type(array).__module__.startswith("cupy"):
            return False
        cupy = sys.modules.get("cupy")
        return cupy is not None and isinstance(array, cupy.ndarray)

    def devices(self) -> list[str]:
        """Name and compute capability of each CUDA device."""
        runtime = self.xp.cuda.runtime
        names = []
        for device_id in range(runtime.getDeviceCount()):
            props = runtime.getDeviceProperties(device_id)
            name = props["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            names.append(f"{name} (compute capability {props['major']}.{props['minor']})")
        return names

    # -- array plumbing --------------------------------------------------------------------
    def empty(self, shape, dtype, like):
        with self._device(like):
            return self.xp.empty(shape, dtype=dtype)

    def empty_like(self, array):
        with self._device(array):
            return self.xp.empty_like(array)

    def to_host(self, array) -> np.ndarray:
        return self.xp.asnumpy(array)

    # -- phase 1: per-channel reductions -----------------------------------------------------
    def channel_stats(self, x3):
        with self._device(x3):
            mean, m2, _, _, _ = self._stats(x3, eps=None)
        return mean, m2

    def grad_sums(self, dy3, x3, mean):
        xp = self.xp
        outer, channels, inner = x3.shape
        acc = accumulation_dtype(x3.dtype)
        with self._device(x3):
            sum_dy, sum_dy_xmu = xp.empty(channels, acc), xp.empty(channels, acc)
            if channels == 0:
                return sum_dy, sum_dy_xmu
            launch = self._plan(x3)
            partial_dy = xp.empty((launch.splits, channels), acc)
            partial_dy_xmu = xp.empty((launch.splits, channels), acc)
            self._run(
                "grad_sums_partial",
                x3.dtype,
                launch.grid,
                launch.block,
                (
                    *_view_args(dy3),
                    *_view_args(x3),
                    *_geometry_args(x3.shape, launch),
                    self._vector(mean, acc),
                    partial_dy,
                    partial_dy_xmu,
                ),
            )
            self._run(
                "grad_sums_finish",
                x3.dtype,
                finish_grid(channels),
                (FINISH_THREADS,),
                (
                    partial_dy,
                    partial_dy_xmu,
                    np.int32(launch.splits),
                    np.int32(channels),
                    sum_dy,
                    sum_dy_xmu,
                ),
            )
        return sum_dy, sum_dy_xmu

    # -- phase 2: elementwise -------------------------------------------------------------------
    def normalize(self, x3, mean, invstd, weight, bias, out3) -> None:
        if x3.size == 0:
            return
        acc = accumulation_dtype(x3.dtype)
        with self._device(x3):
            launch = self._plan(x3)
            self._run(
                "normalize",
                x3.dtype,
                launch.grid,
                launch.block,
                (
                    *_view_args(x3),
                    *_view_args(out3),
                    *_geometry_args(x3.shape, launch),
                    *(self._vector(v, acc) for v in (mean, invstd, weight, bias)),
                ),
            )

    def input_grad(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xmu, out3) -> None:
        if x3.size == 0:
            return
        acc = accumulation_dtype(x3.dtype)
        vectors = (mean, invstd, weight, sum_dy, sum_dy_xmu)
        with self._device(x3):
            launch = self._plan(x3)
            self._run(
                "input_grad",
                x3.dtype,
                launch.grid,
                launch.block,
                (
                    *_view_args(dy3),
                    *_view_args(x3),
                    *_view_args(out3),
                    *_geometry_args(x3.shape, launch),
                    *(self._vector(v, acc) for v in vectors),
                ),
            )

    # -- fused paths ---------------------------------------------------------------------------
    def forward_train(
        self, x3, weight, bias, eps, out3, stat_dtype, running_mean=None, running_var=None,
        momentum=0.0,
    ):  # fmt: skip
        """Statistics with var and invstd from the finishing kernel, then one normalize pass
        (and the running statistics' kernel)."""
        with self._device(x3):
            mean, _, var, invstd, coefficients = self._stats(x3, eps=eps, affine=(weight, bias))
            if coefficients is not None:
                shift, scale, offset = coefficients  # see channel_stats_finish
                self.normalize(x3, shift, scale, None, offset, out3)
            if running_mean is not None:
                self.update_running_stats(
                    running_mean, running_var, mean, var, x3.shape[0] * x3.shape[2], momentum
                )
        stats = (mean, var, invstd)
        if mean.dtype == stat_dtype:  # always, through the public API
            return stats
        return tuple(a.astype(stat_dtype) for a in stats)

    def forward_eval(self, x3, running_mean, running_var, weight, bias, eps, out3, stat_dtype):
        """One per-channel kernel (mean, invstd and the affine coefficients), then normalize."""
        acc = accumulation_dtype(x3.dtype)
        if acc != stat_dtype:  # never through the public API
            return super().forward_eval(
                x3, running_mean, running_var, weight, bias, eps, out3, stat_dtype
            )
        channels = x3.shape[1]
        with self._device(x3):
            # invstd, then normalize's coefficients: weight * invstd, and bias (or zeros)
            mean, invstd, scale, shift = self.xp.empty((4, channels), acc)
            if channels:
                self._run(
                    "eval_stats",
                    acc,
                    finish_grid(channels),
                    (FINISH_THREADS,),
                    (
                        *_any_vector(running_mean),
                        *_any_vector(running_var),
                        *_any_vector(weight),
                        *_any_vector(bias),
                        np.int32(channels),
                        np.float64(eps),
                        mean,
                        invstd,
                        scale,
                        shift,
                    ),
                )
            self.normalize(x3, mean, scale, None, shift, out3)
        return mean, invstd

    # -- per-channel steps: one kernel each ----------------------------------------------------
    def update_running_stats(
        self, running_mean, running_var, batch_mean, batch_var, count: int, momentum: float
    ) -> None:
        if batch_mean.dtype == np.float16 or batch_var.dtype == np.float16:
            # The default rounds products to float16 (reachable only through the public
            # update_running_stats): left to CuPy's float16 arithmetic.
            super().update_running_stats(
                running_mean, running_var, batch_mean, batch_var, count, momentum
            )
            return
        channels = running_mean.shape[0]
        if channels == 0:
            return
        with self._device(running_mean):
            self._run(
                "update_running_stats",
                np.promote_types(running_mean.dtype, batch_mean.dtype),
                finish_grid(channels),
                (FINISH_THREADS,),
                (
                    *_any_vector(running_mean),
                    *_any_vector(running_var),
                    *_any_vector(batch_mean),
                    *_any_vector(batch_var),
                    np.int32(channels),
                    np.float64(1 - momentum),
                    np.float64(momentum),
                    np.float64(momentum * count / (count - 1)),  # as the default computes it
                ),
            )

    def param_grads(self, sum_dy, sum_dy_xmu, invstd, weight_dtype, bias_dtype):
        channels = sum_dy.shape[0]
        acc = accumulation_dtype(sum_dy_xmu.dtype)
        with self._device(sum_dy):
            dweight = self.xp.empty(channels, weight_dtype)
            dbias = self.xp.empty(channels, bias_dtype)
            if channels:
                self._run(
                    "param_grads",
                    acc,
                    finish_grid(channels),
                    (FINISH_THREADS,),
                    (
                        self._vector(sum_dy, acc),
                        self._vector(sum_dy_xmu, acc),
                        *_any_vector(invstd),
                        np.int32(channels),
                        *_any_vector(dweight),
                        *_any_vector(dbias),
                    ),
                )
        return dweight, dbias

    # -- helpers (overridden by the CPU tests, which emulate the kernels) ------------------------
    def _stats(self, x3, eps: float | None, affine: tuple | None = None):
        """``(mean, m2, None, None, None)`` without ``eps``; with it ``(mean, None, var,
        invstd, coefficients)``, where for ``affine=(weight, bias)`` the coefficients are
        normalize's ``(shift, scale, offset)`` (see ``channel_stats_finish``), else None (and
        None for an input without channels)."""
        xp = self.xp
        outer, channels, inner = x3.shape
        acc = accumulation_dtype(x3.dtype)
        mean = xp.empty(channels, acc)
        m2 = xp.empty(channels, acc) if eps is None else None
        var, invstd = (
            (None, None) if eps is None else (xp.empty(channels, acc), xp.empty(channels, acc))
        )
        if channels == 0:
            return mean, m2, var, invstd, None
        launch = self._plan(x3)
        shift = xp.empty(channels, acc)  # x[0, c, 0]: the partials are of x - shift
        partial_mean = xp.empty((launch.splits, channels), acc)
        partial_m2 = xp.empty((launch.splits, channels), acc)
        self._run(
            "channel_stats_partial",
            x3.dtype,
            launch.grid,
            launch.block,
            (*_view_args(x3), *_geometry_args(x3.shape, launch), shift, partial_mean, partial_m2),
        )
        weight, bias = affine if affine is not None else (None, None)
        scale, offset = (xp.empty(channels, acc) for _ in range(2)) if affine else (None, None)
        self._run(
            "channel_stats_finish",
            x3.dtype,
            finish_grid(channels),
            (FINISH_THREADS,),
            (
                shift,
                partial_mean,
                partial_m2,
                np.int32(launch.splits),
                np.int32(channels),
                np.int64(outer * inner),
                np.int64(launch.chunk),
                np.float64(0.0 if eps is None else eps),
                *_any_vector(weight),
                *_any_vector(bias),
                mean,
                m2,
                var,
                invstd,
                scale,
                offset,
            ),
        )
        coefficients = (shift, scale, offset) if affine is not None else None
        return mean, m2, var, invstd, coefficients

    def _plan(self, x3) -> _launch.Launch:
        strides3 = element_strides(x3.strides, x3.itemsize)
        return _launch.plan_launch(
            x3.shape, _launch.is_channels_last(x3.shape, strides3), self._multiprocessors()
        )

    def _vector(self, vector, acc):
        """A per-channel argument as a contiguous array of ``acc`` (None stays a null pointer);
        a copy, one launch, only when it has another dtype or is not contiguous."""
        if vector is None or (vector.dtype == acc and vector.flags.c_contiguous):
            return vector
        return self.xp.ascontiguousarray(vector, dtype=acc)

    def _device(self, array) -> contextlib.AbstractContextManager:
        """Makes the device holding ``array`` current, with its current stream."""
        return array.device

    def _multiprocessors(self) -> int:
        return _multiprocessor_count(self.xp.cuda.runtime.getDevice())

    def _run(self, kernel: str, dtype, grid, block, args) -> None:
        """Launch on the current stream (CuPy's default when no stream is passed)."""
        _kernels.function(kernel, dtype)(grid, block, args)
