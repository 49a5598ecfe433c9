"""The CUDA C kernels as ``cupy.RawModule`` objects, one per data type, built on first use.

CuPy compiles a module with NVRTC the first time one of its functions is fetched on a device
(and keeps the binary in its on-disk kernel cache), so importing this module compiles nothing
and a float64-only program never compiles the float16 kernels.
"""

from __future__ import annotations

import functools
from importlib.resources import files

import numpy as np

from . import _launch


@functools.cache
def source() -> str:
    """The text of ``kernels.cu``."""
    return files(__package__).joinpath("kernels.cu").read_text()


@functools.cache
def module_for(dtype: np.dtype):
    """The ``cupy.RawModule`` with every kernel instantiated for data of ``dtype``."""
    import cupy

    return cupy.RawModule(
        code=source(),
        options=_launch.compile_options(),
        name_expressions=_launch.name_expressions(dtype),
    )


def function(kernel: str, dtype):
    """The compiled ``kernel`` for data of ``dtype`` on the current device."""
    dtype = np.dtype(dtype)
    return module_for(dtype).get_function(_launch.kernel_name(kernel, dtype))
