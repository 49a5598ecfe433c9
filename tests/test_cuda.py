"""Tests specific to the ``cuda`` backend (the shared suite is tests/test_conformance.py).

On a machine without a GPU run them under the simulator:
``NUMBA_ENABLE_CUDASIM=1 pytest tests/test_cuda.py``. The PTX compile checks run in a
subprocess without the simulator (it has no compiler) and need NVVM, not a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.testing import assert_close

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")

import batchnorm_cuda  # noqa: E402
from batchnorm_cuda import _config, _kernels  # noqa: E402
from batchnorm_cuda._compile_check import DEFAULT_CCS, signatures  # noqa: E402

_INFO = {info.name: info for info in bn.backend_info()}["cuda"]
needs_cuda = pytest.mark.skipif(not _INFO.available, reason=f"cuda: {_INFO.reason}")
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _cupy_with_device():
    """The cupy module when it can reach a real GPU (never under the simulator)."""
    if SIMULATED:
        return None
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


needs_cupy = pytest.mark.skipif(
    _cupy_with_device() is None, reason="CuPy with a real GPU (not the simulator) is needed"
)


@pytest.fixture
def cuda_backend():
    return bn.get_backend("cuda")


def _reference(x, axis=1, **kwargs):
    return bn.forward(x, axis=axis, backend="numpy", **kwargs)


# -- availability ------------------------------------------------------------------------
def _without_simulator(monkeypatch):
    from numba import cuda

    monkeypatch.setattr(cuda.config, "ENABLE_CUDASIM", 0)
    return cuda


def test_reason_when_numba_cuda_is_missing(monkeypatch):
    real_find_spec = batchnorm_cuda.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "numba_cuda" else real_find_spec(name, *args)

    monkeypatch.setattr(batchnorm_cuda.importlib.util, "find_spec", find_spec)
    assert "numba-cuda is not installed" in batchnorm_cuda.CudaBackend().unavailable_reason()


def test_reason_when_the_driver_fails(monkeypatch):
    cuda = _without_simulator(monkeypatch)
    monkeypatch.setattr(cuda, "cuda_error", lambda: "CUDA driver library cannot be found.")
    reason = batchnorm_cuda.CudaBackend().unavailable_reason()
    assert reason.startswith("the CUDA driver could not be initialised")
    assert "library cannot be found" in reason


def test_reason_when_there_is_no_device(monkeypatch):
    cuda = _without_simulator(monkeypatch)
    monkeypatch.setattr(cuda, "cuda_error", lambda: None)
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    assert batchnorm_cuda.CudaBackend().unavailable_reason() == "no CUDA device found"


@pytest.mark.skipif(not SIMULATED, reason="checks the simulator's availability")
def test_simulator_counts_as_a_device():
    assert _INFO.available and _INFO.devices == ("CUDA simulator",)


def test_import_compiles_nothing_and_needs_no_cuda():
    code = (
        "import sys, batchnorm_cuda; "
        "print(any(m.startswith(('numba.cuda', 'numba_cuda')) for m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@needs_cuda
def test_kernels_compile_lazily():
    code = (
        "import batchnorm as bn; from batchnorm_cuda import _kernels as k; "
        "bn.backend_info(); bn.get_backend('cuda'); "
        "print(k.reduction_kernels.cache_info().currsize, "
        "k.channel_kernels.cache_info().currsize)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "0"]


# -- array kinds ---------------------------------------------------------------------------
@needs_cuda
def test_numpy_input_is_a_type_error_naming_the_backend():
    with pytest.raises(TypeError, match="'cuda'"):
        bn.forward(np.ones((4, 3), np.float32), backend="cuda")


@needs_cuda
def test_mixed_array_kinds_are_a_type_error(cuda_backend):
    x = cuda_backend.from_host(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="never moved implicitly"):
        bn.forward(x, np.ones(3, np.float32), backend="cuda")


@needs_cuda
def test_numba_device_arrays_are_used_in_place(cuda_backend):
    from numba import cuda

    host = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float32)
    x = cuda.to_device(host)
    assert cuda_backend.accepts(x)
    assert cuda_backend.as_native(x) is x
    y, mean, invstd = bn.forward(x, backend="cuda")
    assert type(y) is type(x) and type(mean) is type(x) and type(invstd) is type(x)
    assert not cuda_backend.may_share_memory(y, x)
    assert_close(cuda_backend.to_host(y), _reference(host)[0], np.float32, "y")


class _InterfaceOnly:
    """Exposes nothing but ``__cuda_array_interface__`` (as a third-party array would)."""

    def __init__(self, interface, owner):
        self.__cuda_array_interface__ = interface
        self._owner = owner


def _interface_object(backend, host):
    """An object with only ``__cuda_array_interface__`` over a copy of ``host``.

    In the simulator device memory is host memory, so the interface points at a NumPy
    array; on a GPU it points at a Numba device array.
    """
    if SIMULATED:
        buffer = host.copy()
        ptr = buffer.__array_interface__["data"][0]
        interface = {
            "shape": buffer.shape,
            "strides": None,
            "typestr": buffer.dtype.str,
            "data": (ptr, False),
            "version": 3,
        }
        return _InterfaceOnly(interface, buffer), buffer
    device = backend.from_host(host)
    return _InterfaceOnly(device.__cuda_array_interface__, device), device


@needs_cuda
def test_cuda_array_interface_objects_are_zero_copy(cuda_backend):
    host = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    obj, memory = _interface_object(cuda_backend, host)
    assert cuda_backend.accepts(obj)
    native = cuda_backend.as_native(obj)
    cuda_backend.copy_into(native, cuda_backend.from_host(-host))
    # Writing through the wrapped view changed the exporter's own memory.
    np.testing.assert_array_equal(cuda_backend.to_host(memory), -host)
    y, _, _ = bn.forward(obj, backend="cuda")
    assert_close(cuda_backend.to_host(y), _reference(-host)[0], np.float32, "y")


@needs_cupy
def test_cupy_in_cupy_out_zero_copy_on_the_current_stream(cuda_backend):
    cupy = _cupy_with_device()
    host = np.random.default_rng(1).standard_normal((8, 4, 5)).astype(np.float32)
    x = cupy.asarray(host)
    native = cuda_backend.as_native(x)
    assert native.device_ctypes_pointer.value == x.data.ptr
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        assert int(cuda_backend.as_native(x).stream) == stream.ptr
        y, mean, invstd = bn.forward(x, backend="cuda")
        dx, _, _ = bn.backward(cupy.ones_like(x), x, None, mean, invstd, backend="cuda")
    stream.synchronize()
    assert all(isinstance(a, cupy.ndarray) for a in (y, mean, invstd, dx))
    assert_close(cupy.asnumpy(y), _reference(host)[0], np.float32, "y")


# -- kernels -------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize(
    "shape,axis", [((9, 3, 10), 1), ((17, 5), 1)], ids=["channels_first", "channels_last"]
)
def test_reductions_merge_several_splits_deterministically(cuda_backend, shape, axis):
    config = cuda_backend._arrays.launch_config()

    def splits(outer):
        shape3 = (outer, shape[1], math.prod(shape[2:]))
        channels_last = shape3[2] == 1
        launch = _config.reduction_launch(
            config, shape3, cuda_backend._multiprocessors, channels_last=channels_last
        )
        return launch.grid[1]

    # Grow the batch until the plan splits it: a real GPU's blocks hold more rows than the
    # simulator's (an H200 gives one split for the 9 rows that split in the simulator).
    while splits(shape[0]) < 2:
        shape = (2 * shape[0], *shape[1:])
    x_host = np.random.default_rng(2).standard_normal(shape).astype(np.float32) + 3
    x3 = cuda_backend.from_host(x_host.reshape(shape[0], shape[1], -1))
    first = [cuda_backend.to_host(a) for a in cuda_backend.channel_stats(x3)]
    second = [cuda_backend.to_host(a) for a in cuda_backend.channel_stats(x3)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    values = x_host.reshape(shape[0], shape[1], -1).astype(np.float64)
    np.testing.assert_allclose(first[0], values.mean(axis=(0, 2)), rtol=1e-6)
    m2 = ((values - values.mean(axis=(0, 2))[None, :, None]) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(first[1], m2, rtol=1e-5)


@needs_cuda
def test_copy_into_handles_any_strides(cuda_backend):
    host = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    src = cuda_backend.strided_view(cuda_backend.from_host(host), (2, 3, 2, 5), (480, 160, 80, 8))
    dst = cuda_backend.empty((2, 3, 2, 5), np.float64, src)
    cuda_backend.copy_into(dst, src)
    np.testing.assert_array_equal(cuda_backend.to_host(dst), host[:, :, ::2, :])


def test_launch_sizes_cover_every_shape():
    for config in (_config.DEVICE, _config.SIMULATOR):
        for shape in [(1, 1, 1), (256, 64, 3136), (100352, 64, 1), (3, 1000, 7), (5, 3, 1)]:
            for channels_last in (True, False):
                for launch in (
                    _config.reduction_launch(config, shape, 132, channels_last),
                    _config.elementwise_launch(config, shape, channels_last),
                ):
                    bx, by = launch.block
                    assert bx * by == config.threads_per_block
                    assert all(1 <= g <= 65535 for g in launch.grid)
    with pytest.raises(ValueError, match="power of two"):
        _config.LaunchConfig(threads_per_block=96)


# -- compilation for real GPUs ---------------------------------------------------------------
@pytest.fixture(scope="module")
def compile_report():
    """One subprocess compiles every kernel signature for every compute capability."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    done = subprocess.run(
        [sys.executable, "-m", "batchnorm_cuda._compile_check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if not done.stdout.strip():
        pytest.fail(f"compile check produced no report:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout)
    return report["skipped"], {
        (r["kernel"], r["dtype"], tuple(r["cc"])): r for r in report["results"]
    }


@pytest.mark.parametrize("cc", DEFAULT_CCS, ids=lambda cc: f"sm{cc[0]}{cc[1]}")
@pytest.mark.parametrize(
    "kernel,dtype", [(k, d) for k, d, _ in signatures()], ids=lambda v: str(v).replace(" ", "_")
)
def test_kernel_compiles_to_ptx(compile_report, kernel, dtype, cc):
    skipped, results = compile_report
    if skipped:
        pytest.skip(skipped)
    result = results[(kernel, dtype, cc)]
    assert result["error"] is None, result["error"]


def test_every_kernel_has_a_compile_check():
    checked = {k for k, _, _ in signatures()}
    threads = _config.DEVICE.threads_per_block
    built = set(vars(_kernels.reduction_kernels(_kernels.ACCUMULATOR["float32"], threads)))
    built |= set(vars(_kernels.channel_kernels()))
    assert built == checked
