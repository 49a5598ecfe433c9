"""Batch Normalization for NumPy and CuPy arrays, dispatched to plugin backends.

The public surface is what this module exports; see the README and the docs.
"""

from ._api import backward, batch_norm, forward, update_running_stats
from ._backend import Backend
from ._dispatch import (
    BackendInfo,
    available_backends,
    backend_info,
    get_backend,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendInfo",
    "available_backends",
    "backend_info",
    "backward",
    "batch_norm",
    "forward",
    "get_backend",
    "update_running_stats",
    "use_backend",
    "__version__",
]
