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


#: (kernel, dtype) -> cupy.RawKernel, which loads itself on each device it is called on.
_functions: dict = {}
#: Data dtypes whose module has been compiled, in order of first use.
_modules_used: list = []


def function(kernel: str, dtype):
    """The compiled ``kernel`` for data of ``dtype``, run on the current device when called.

    Memoised: ``RawModule.get_function`` builds a new kernel object and asks the driver for
    the function again on every call, host time that would otherwise be part of each launch.
    """
    key = (kernel, dtype)
    found = _functions.get(key)
    if found is None:
        dtype = np.dtype(dtype)
        name = _launch.kernel_name(kernel, dtype)
        found = _functions[key] = _module_with(kernel, dtype).get_function(name)
    return found


def _module_with(kernel: str, dtype: np.dtype):
    """The module to take ``kernel`` for ``dtype`` from.

    A kernel templated on the accumulation type is in every module whose data has that
    accumulation type (float16's and float32's both have the ``float`` ones), so one already
    compiled is used rather than a second compiled for it: float16 data with float32 running
    statistics needs only the float16 module.
    """
    if kernel in _launch.ACC_KERNELS:
        acc = _launch.accumulation_dtype(dtype)
        for used in _modules_used:
            if _launch.accumulation_dtype(used) == acc:
                return module_for(used)
    if dtype not in _modules_used:
        _modules_used.append(dtype)
    return module_for(dtype)
