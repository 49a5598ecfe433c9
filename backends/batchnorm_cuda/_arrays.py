"""Numba device arrays as the native type: wrapping, views, allocation, streams, copies.

Imported only once numba-cuda is known to import. Under ``NUMBA_ENABLE_CUDASIM=1`` Numba's
device arrays are NumPy arrays in disguise (``FakeCUDAArray``) and device memory is host
memory, so each function has a short simulator branch.
"""

from __future__ import annotations

import ctypes
import math
import sys
from typing import Any

import numpy as np
from numba import cuda

from ._config import DEVICE, SIMULATOR, copy_launch
from ._kernels import COPY_NDIM, channel_kernels

SIMULATED = bool(cuda.config.ENABLE_CUDASIM)

#: Numba streams wrapping CuPy streams, by CuPy stream pointer. Arrays bound to one of these
#: came from CuPy, so their scratch and results are allocated from CuPy's memory pool.
_cupy_streams: dict[int, Any] = {}


def launch_config():
    """The launch sizes in force: tiny ones in the simulator."""
    return SIMULATOR if SIMULATED else DEVICE


def is_device_array(obj: Any) -> bool:
    """Whether ``obj`` is a Numba device array (real or simulated)."""
    return bool(getattr(obj, "__cuda_ndarray__", False))


def _is_instance_of(obj: Any, module: str, attribute: str) -> bool:
    """``isinstance`` against a class of an already imported module (never imports it)."""
    mod = sys.modules.get(module)
    return mod is not None and isinstance(obj, getattr(mod, attribute))


def is_cupy_array(obj: Any) -> bool:
    return _is_instance_of(obj, "cupy", "ndarray")


def is_torch_tensor(obj: Any) -> bool:
    return _is_instance_of(obj, "torch", "Tensor")


def _caller_stream(obj: Any) -> Any | None:
    """The Numba stream of the caller's current stream for ``obj``'s library, if it has one."""
    if is_cupy_array(obj):
        ptr = sys.modules["cupy"].cuda.get_current_stream().ptr
        if ptr not in _cupy_streams:
            _cupy_streams[ptr] = cuda.external_stream(ptr)
        return _cupy_streams[ptr]
    if is_torch_tensor(obj):
        torch = sys.modules["torch"]
        return cuda.external_stream(torch.cuda.current_stream(obj.device).cuda_stream)
    return None


def _uses_cupy_pool(stream: Any) -> bool:
    return any(stream is known for known in _cupy_streams.values())


def stream_of(array: Any) -> Any:
    """The stream kernels on ``array`` launch on (0: Numba's default stream)."""
    return array.stream


def wrap(obj: Any) -> Any:
    """Zero-copy Numba device array of a device array or ``__cuda_array_interface__`` object.

    The result is bound to the caller's current CuPy (or PyTorch) stream, so kernels are
    ordered after the caller's pending work without any synchronisation.
    """
    if is_device_array(obj):
        return obj
    if SIMULATED:
        return _simulated_from_interface(obj)
    native = cuda.as_cuda_array(obj, sync=False)
    stream = _caller_stream(obj)
    return native if stream is None else native.bind(stream)


def _extent(shape, strides, itemsize) -> tuple[int, int]:
    """Byte offsets ``[low, high)`` an array spans relative to its first element."""
    if math.prod(shape) == 0:
        return 0, 0
    low = sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    high = sum(max(0, (n - 1) * s) for n, s in zip(shape, strides)) + itemsize
    return low, high


def _simulated_from_interface(obj: Any) -> Any:
    # In the simulator "device" pointers are host pointers, so the interface's pointer is
    # viewed in place: zero-copy, as on a GPU.
    desc = obj.__cuda_array_interface__
    dtype = np.dtype(desc["typestr"])
    shape = tuple(desc["shape"])
    strides = desc.get("strides") or contiguous_strides(shape, dtype.itemsize)
    low, high = _extent(shape, strides, dtype.itemsize)
    if high == low:
        return cuda.devicearray.FakeCUDAArray(np.empty(shape, dtype))
    buffer = (ctypes.c_char * (high - low)).from_address(desc["data"][0] + low)
    buffer.owner = obj  # the NumPy view's base chain keeps the exporter alive
    array = np.ndarray(shape, dtype, buffer=buffer, offset=-low, strides=strides)
    return cuda.devicearray.FakeCUDAArray(array)


def contiguous_strides(shape, itemsize: int, axes_order=None) -> tuple[int, ...]:
    """Strides of a dense array whose axes, outermost first, are ``axes_order`` (C order)."""
    order = list(range(len(shape))) if axes_order is None else list(axes_order)
    strides = [0] * len(shape)
    step = itemsize
    for axis in reversed(order):
        strides[axis] = step
        step *= max(int(shape[axis]), 1)
    return tuple(strides)


def allocate(shape, dtype, like: Any, strides=None) -> Any:
    """Uninitialised dense device array on ``like``'s stream; C order unless ``strides``."""
    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    if strides is None:
        strides = contiguous_strides(shape, dtype.itemsize)
    nbytes = math.prod(shape) * dtype.itemsize
    if SIMULATED:
        raw = np.empty(nbytes, np.uint8)
        return cuda.devicearray.FakeCUDAArray(np.ndarray(shape, dtype, raw, 0, strides))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    stream = stream_of(like) if like is not None else 0
    if _uses_cupy_pool(stream):
        # CuPy's pool is stream-ordered and cached: no cudaMalloc/cudaFree (and so no
        # implicit device synchronisation) per call.
        raw = cuda.as_cuda_array(sys.modules["cupy"].empty(nbytes, np.uint8), sync=False)
    else:
        raw = cuda.device_array(nbytes, np.uint8, stream=stream)
    return DeviceNDArray(shape, strides, dtype, stream=stream, gpu_data=raw.gpu_data)


def allocate_like(array: Any) -> Any:
    """Uninitialised array with ``array``'s shape, dtype and axis order (NumPy's order 'K')."""
    if array.size == 0:
        # No memory is addressed, so the argument's own strides (whatever they are) fit.
        return allocate(array.shape, array.dtype, array, tuple(array.strides))
    order = sorted(range(len(array.shape)), key=lambda a: -abs(array.strides[a]))
    strides = contiguous_strides(array.shape, array.dtype.itemsize, order)
    return allocate(array.shape, array.dtype, array, strides)


def strided_view(array: Any, shape, strides) -> Any:
    """View of ``array``'s memory from its first element with the given shape and strides."""
    shape, strides = tuple(int(n) for n in shape), tuple(int(s) for s in strides)
    if SIMULATED:
        view = np.lib.stride_tricks.as_strided(array._ary, shape, strides)
        return cuda.devicearray.FakeCUDAArray(view, stream=array.stream)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(shape, strides, array.dtype, stream=array.stream, gpu_data=array.gpu_data)


def _address_range(array: Any) -> tuple[int, int]:
    start = array.device_ctypes_pointer.value or 0
    low, high = _extent(array.shape, array.strides, array.dtype.itemsize)
    return start + low, start + high


def may_share_memory(a: Any, b: Any) -> bool:
    """Whether the address ranges of two device arrays overlap."""
    if SIMULATED:
        return bool(np.may_share_memory(a._ary, b._ary))
    if a.size == 0 or b.size == 0:
        return False
    low_a, high_a = _address_range(a)
    low_b, high_b = _address_range(b)
    return low_a < high_b and low_b < high_a


def copy_into(dst: Any, src: Any) -> None:
    """Copy between device arrays of one shape and any strides, on ``dst``'s stream."""
    ndim = len(src.shape)
    if ndim > COPY_NDIM:
        raise ValueError(
            f"the cuda backend copies arrays of at most {COPY_NDIM} dimensions, got {ndim}"
        )
    if src.size == 0:
        return
    pad = COPY_NDIM - ndim
    dst8 = strided_view(dst, (1,) * pad + tuple(dst.shape), (0,) * pad + tuple(dst.strides))
    src8 = strided_view(src, (1,) * pad + tuple(src.shape), (0,) * pad + tuple(src.strides))
    blocks, threads = copy_launch(launch_config(), src.size)
    channel_kernels().copy_strided[blocks, threads, stream_of(dst)](dst8, src8)


def from_host(array: np.ndarray) -> Any:
    """Copy a NumPy array to the device, keeping Fortran order if it has it."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"from_host expects a numpy.ndarray, got {type(array).__name__}")
    if array.size == 0:
        return allocate(array.shape, array.dtype, None)
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        return cuda.to_device(np.asfortranarray(array))
    return cuda.to_device(np.ascontiguousarray(array))


def to_host(array: Any) -> np.ndarray:
    """Copy a device array (any strides) to a new NumPy array and wait for it."""
    if SIMULATED:
        return array.copy_to_host()
    if not (array.is_c_contiguous() or array.is_f_contiguous()):
        dense = allocate(array.shape, array.dtype, array)
        copy_into(dense, array)
        array = dense
    stream = stream_of(array)
    host = array.copy_to_host(stream=stream)
    if not isinstance(stream, int):
        stream.synchronize()
    return host


def to_user(native: Any, like: Any) -> Any:
    """``native`` as the array kind of the user's input ``like`` (zero-copy)."""
    if is_device_array(like):
        return native
    # Unbound (stream 0) so the consumer does not synchronise on the export: our kernels
    # already run on the caller's stream.
    if is_cupy_array(like):
        return sys.modules["cupy"].asarray(native.bind(0))
    if is_torch_tensor(like):
        return sys.modules["torch"].as_tensor(native.bind(0), device=like.device)
    return native
