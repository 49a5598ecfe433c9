"""The ``cuda`` backend: Numba CUDA kernels on CuPy arrays, Numba device arrays and any
object with ``__cuda_array_interface__`` (PyTorch CUDA tensors), all zero-copy.

Importing this package never fails: numba-cuda is imported the first time the backend is
asked whether it can run, and kernels compile on first launch. Under
``NUMBA_ENABLE_CUDASIM=1`` the backend runs on Numba's CUDA simulator (no GPU needed).

Results come back as the input's kind (CuPy in, CuPy out). Kernels launch on the caller's
current CuPy (or PyTorch) stream, without any synchronisation. NumPy arrays are refused;
use :meth:`CudaBackend.from_host` and :meth:`CudaBackend.to_host` to move data explicitly.
"""

from __future__ import annotations

import functools
import importlib.util
from importlib import metadata
from typing import Any

import numpy as np

from batchnorm import Backend


def _acc_dtype(dtype) -> np.dtype:
    """Accumulation dtype of input ``dtype``: float32 for float16/float32, float64 for float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


class CudaBackend(Backend):
    """Numba CUDA kernels; native arrays are Numba device arrays.

    Examples
    --------
    >>> import batchnorm as bn
    >>> info = {i.name: i for i in bn.backend_info()}
    >>> info["cuda"].available or "cuda" in info["cuda"].reason.lower()
    True
    """

    name = "cuda"
    priority = 10
    xp = None

    # -- identity and availability -------------------------------------------------------
    @property
    def version(self) -> str:
        try:
            return metadata.version("numba-cuda")
        except metadata.PackageNotFoundError:
            return "numba-cuda not installed"

    @functools.cached_property
    def _reason(self) -> str | None:
        if importlib.util.find_spec("numba_cuda") is None:
            return "numba-cuda is not installed (pip install 'batchnorm[cuda]')"
        try:
            from numba import cuda
        except Exception as exc:  # a broken CUDA install must not break the import
            return f"numba-cuda failed to import: {type(exc).__name__}: {exc}"
        if cuda.config.ENABLE_CUDASIM:
            return None
        error = cuda.cuda_error()
        if error is not None:
            return f"the CUDA driver could not be initialised: {' '.join(str(error).split())}"
        if not cuda.is_available():
            return "no CUDA device found"
        return None

    def unavailable_reason(self) -> str | None:
        return self._reason

    def accepts(self, array: Any) -> bool:
        if isinstance(array, np.ndarray):
            return False
        return bool(getattr(array, "__cuda_ndarray__", False)) or hasattr(
            array, "__cuda_array_interface__"
        )

    def devices(self) -> list[str]:
        from numba import cuda

        if cuda.config.ENABLE_CUDASIM:
            return ["CUDA simulator"]
        names = []
        for device in cuda.list_devices():
            name = device.name.decode() if isinstance(device.name, bytes) else device.name
            major, minor = device.compute_capability
            names.append(f"{name} (compute capability {major}.{minor})")
        return names

    # -- array plumbing --------------------------------------------------------------------
    @functools.cached_property
    def _arrays(self):
        from . import _arrays

        return _arrays

    @functools.cached_property
    def _multiprocessors(self) -> int:
        if self._arrays.SIMULATED:
            return 1
        from numba import cuda

        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)

    def as_native(self, array: Any) -> Any:
        return self._arrays.wrap(array)

    def to_user(self, native: Any, like: Any) -> Any:
        return self._arrays.to_user(native, like)

    def empty(self, shape, dtype, like):
        return self._arrays.allocate(shape, dtype, like)

    def empty_like(self, array):
        return self._arrays.allocate_like(array)

    def strided_view(self, array, shape, strides):
        return self._arrays.strided_view(array, shape, strides)

    def may_share_memory(self, a, b) -> bool:
        return self._arrays.may_share_memory(a, b)

    def copy_into(self, dst, src) -> None:
        self._arrays.copy_into(dst, src)

    def from_host(self, array: np.ndarray) -> Any:
        """Copy a NumPy array to the GPU as a Numba device array (explicit transfer)."""
        return self._arrays.from_host(array)

    def to_host(self, array: Any) -> np.ndarray:
        """Copy a device array (or CuPy array, or any CUDA array) to a new NumPy array."""
        if isinstance(array, np.ndarray):
            return array.copy()
        return self._arrays.to_host(self._arrays.wrap(array))

    # -- launching -------------------------------------------------------------------------
    def _kernels_for(self, dtype):
        from numba import float32, float64

        from ._kernels import reduction_kernels

        acc = float64 if _acc_dtype(dtype) == np.float64 else float32
        return reduction_kernels(acc, self._arrays.launch_config().threads_per_block)

    def _channel_kernels(self):
        from ._kernels import channel_kernels

        return channel_kernels()

    def _per_channel(self, kernel, like, channels: int, *args) -> None:
        from ._config import per_channel_launch

        blocks, threads = per_channel_launch(self._arrays.launch_config(), channels)
        kernel[blocks, threads, self._arrays.stream_of(like)](*args)

    def _reduce(self, name: str, x3, partial_dtypes, *args):
        """Run reduction ``name`` over ``x3``; returns its ``[splits, C]`` partial buffers."""
        from ._config import reduction_launch

        channels_last = x3.shape[2] == 1
        launch = reduction_launch(
            self._arrays.launch_config(), tuple(x3.shape), self._multiprocessors, channels_last
        )
        # An empty reduction has no splits: the merge then yields zeros.
        splits = launch.grid[1] if x3.size else 0
        parts = [self.empty((splits, x3.shape[1]), dt, x3) for dt in partial_dtypes]
        if splits:
            kernel = getattr(
                self._kernels_for(x3.dtype),
                f"{name}_{'channels_last' if channels_last else 'channels_first'}",
            )
            kernel[launch.grid, launch.block, self._arrays.stream_of(x3)](*args, *parts)
        return parts

    def _elementwise(self, name: str, x3, *args) -> None:
        from ._config import elementwise_launch

        if x3.size == 0:
            return
        channels_last = x3.shape[2] == 1
        launch = elementwise_launch(self._arrays.launch_config(), tuple(x3.shape), channels_last)
        kernel = getattr(
            self._kernels_for(x3.dtype),
            f"{name}_{'channels_last' if channels_last else 'channels_first'}",
        )
        kernel[launch.grid, launch.block, self._arrays.stream_of(x3)](*args)

    # -- phase 1 ---------------------------------------------------------------------------
    def channel_stats(self, x3):
        acc = _acc_dtype(x3.dtype)
        part_n, part_mean, part_m2 = self._reduce("stats", x3, (np.int64, acc, acc), x3)
        channels = x3.shape[1]
        mean = self.empty((channels,), np.float64, x3)
        m2 = self.empty((channels,), np.float64, x3)
        self._per_channel(
            self._channel_kernels().merge_stat_partials,
            x3,
            channels,
            x3,
            part_n,
            part_mean,
            part_m2,
            mean,
            m2,
        )
        return mean, m2

    def forward_train(
        self, x3, weight, bias, eps, out3, stat_dtype, running_mean=None, running_var=None,
        momentum=0.0,
    ):  # fmt: skip
        # Three launches: partial statistics, their merge with the finishing step, normalize
        # (and a fourth for the running statistics). Normalize takes the float64 mean, not
        # the returned one (see _kernels.affine).
        acc = _acc_dtype(x3.dtype)
        parts = self._reduce("stats", x3, (np.int64, acc, acc), x3)
        channels = x3.shape[1]
        mean64 = self.empty((channels,), np.float64, x3)
        mean, var, invstd = (self.empty((channels,), stat_dtype, x3) for _ in range(3))
        self._per_channel(
            self._channel_kernels().merge_and_finish_stats,
            x3,
            channels,
            x3,
            *parts,
            float(x3.shape[0] * x3.shape[2]),
            float(eps),
            mean64,
            mean,
            var,
            invstd,
        )
        self.normalize(x3, mean64, invstd, weight, bias, out3)
        if running_mean is not None:
            self.update_running_stats(
                running_mean, running_var, mean, var, x3.shape[0] * x3.shape[2], momentum
            )
        return mean, var, invstd

    def grad_sums(self, dy3, x3, mean):
        acc = _acc_dtype(x3.dtype)
        part_dy, part_dy_xmu = self._reduce("grad_sums", x3, (acc, acc), dy3, x3, mean)
        channels = x3.shape[1]
        sum_dy = self.empty((channels,), np.float64, x3)
        sum_dy_xmu = self.empty((channels,), np.float64, x3)
        self._per_channel(
            self._channel_kernels().sum_partials,
            x3,
            channels,
            part_dy,
            part_dy_xmu,
            sum_dy,
            sum_dy_xmu,
        )
        return sum_dy, sum_dy_xmu

    # -- phase 2 ---------------------------------------------------------------------------
    def normalize(self, x3, mean, invstd, weight, bias, out3) -> None:
        # None parameters are flagged off; invstd stands in for them and is never read.
        self._elementwise(
            "normalize",
            x3,
            x3,
            invstd if mean is None else mean,
            invstd,
            invstd if weight is None else weight,
            invstd if bias is None else bias,
            mean is not None,
            weight is not None,
            bias is not None,
            out3,
        )

    def input_grad(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xmu, out3) -> None:
        count = x3.shape[0] * x3.shape[2]
        self._elementwise(
            "input_grad",
            x3,
            dy3,
            x3,
            mean,
            invstd,
            invstd if weight is None else weight,
            weight is not None,
            sum_dy,
            sum_dy_xmu,
            1.0 / count,
            out3,
        )

    # -- per-channel steps ------------------------------------------------------------------
    def finish_stats(self, mean, m2, count: int, eps: float, stat_dtype):
        channels = mean.shape[0]
        outs = [self.empty((channels,), stat_dtype, mean) for _ in range(3)]
        self._per_channel(
            self._channel_kernels().finish_stats,
            mean,
            channels,
            mean,
            m2,
            float(count),
            float(eps),
            *outs,
        )
        return tuple(outs)

    def param_grads(self, sum_dy, sum_dy_xmu, invstd, weight_dtype, bias_dtype):
        channels = sum_dy.shape[0]
        dweight = self.empty((channels,), weight_dtype, sum_dy)
        dbias = self.empty((channels,), bias_dtype, sum_dy)
        self._per_channel(
            self._channel_kernels().param_grads,
            sum_dy,
            channels,
            sum_dy,
            sum_dy_xmu,
            invstd,
            dweight,
            dbias,
        )
        return dweight, dbias

    def update_running_stats(
        self, running_mean, running_var, batch_mean, batch_var, count: int, momentum: float
    ) -> None:
        self._per_channel(
            self._channel_kernels().update_running_stats,
            running_mean,
            running_mean.shape[0],
            running_mean,
            running_var,
            batch_mean,
            batch_var,
            count / (count - 1),
            float(momentum),
        )
