"""Finding backends (entry points) and choosing one per call.

Precedence: ``backend=`` argument > :func:`use_backend` > ``BATCHNORM_BACKEND`` > automatic
choice by array type. An explicit choice never falls back to another backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from ._backend import Backend

ENTRY_POINT_GROUP = "batchnorm.backends"
ENV_VAR = "BATCHNORM_BACKEND"
AUTO = "auto"


@dataclass(frozen=True)
class BackendInfo:
    """What :func:`backend_info` reports about one registered backend.

    Attributes
    ----------
    name : str
        Name the backend is registered and selected by.
    available : bool
        Whether it can run here now.
    reason : str or None
        Why it cannot run (failed import, missing library, no device); None when available.
    version : str or None
        Version of the library its kernels are built on, when it loaded.
    devices : tuple of str
        Devices it would run on.
    """

    name: str
    available: bool
    reason: str | None
    version: str | None
    devices: tuple[str, ...] = ()


class _Registry:
    """Entry points listed once; each backend loaded and its availability checked on first
    use, then memoised (availability checks may probe a driver: not something to repeat on
    every call)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entry_points: dict[str, Any] | None = None
        self._loaded: dict[str, tuple[Backend | Exception, str | None]] = {}
        self._ordered: list[Backend] | None = None
        # The core's plans of call signatures (batchnorm._api): they hold a backend, so they
        # are forgotten with it.
        self.plans: dict[tuple, Any] = {}

    def clear(self) -> None:
        """Forget discovered and loaded backends (for tests that install plugins)."""
        with self._lock:
            self._entry_points = None
            self._loaded = {}
            self._ordered = None
            self.plans = {}

    def names(self) -> list[str]:
        with self._lock:
            if self._entry_points is None:
                self._entry_points = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
            return sorted(self._entry_points)

    def load(self, name: str) -> tuple[Backend | Exception, str | None]:
        """``(backend, None)`` if it can run, else ``(backend or load error, reason)``."""
        loaded = self._loaded.get(name)  # every call after the first: no lock, no listing
        if loaded is not None:
            return loaded
        known = self.names()
        with self._lock:
            if name not in self._loaded:
                if name not in known:
                    raise ValueError(
                        f"unknown batchnorm backend {name!r}; known backends: {', '.join(known)}"
                    )
                loaded = _instantiate(self._entry_points[name])
                self._loaded[name] = (loaded, _reason(loaded))
            return self._loaded[name]

    def ordered(self) -> list[Backend]:
        """Runnable backends in automatic-selection order (highest priority first)."""
        ordered = self._ordered  # set once, whole (clear() replaces it): no lock to read it
        if ordered is not None:
            return ordered
        with self._lock:
            if self._ordered is None:
                runnable = [b for b, why in map(self.load, self.names()) if why is None]
                self._ordered = sorted(runnable, key=lambda b: (-b.priority, b.name))
            return self._ordered


def _instantiate(ep) -> Backend | Exception:
    try:
        obj = ep.load()
        backend = obj() if isinstance(obj, type) else obj
        if not isinstance(backend, Backend):
            raise TypeError(f"entry point {ep.value!r} is not a batchnorm.Backend")
        if backend.name != ep.name:
            raise ValueError(f"entry point {ep.name!r} loads a backend named {backend.name!r}")
        return backend
    except Exception as exc:  # a broken plugin must not break the others
        return exc


def _reason(loaded: Backend | Exception) -> str | None:
    if isinstance(loaded, Exception):
        return f"failed to load: {type(loaded).__name__}: {loaded}"
    try:
        return loaded.unavailable_reason()
    except Exception as exc:
        return f"availability check failed: {type(exc).__name__}: {exc}"


registry = _Registry()
_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "batchnorm_backend", default=None
)


def backend_info() -> list[BackendInfo]:
    """Describe every registered backend, whether it can run here, and why not.

    Returns
    -------
    list of BackendInfo
        One entry per entry point in the ``batchnorm.backends`` group, sorted by name.
        Loading a plugin that fails reports the error here instead of raising.

    Examples
    --------
    >>> import batchnorm as bn
    >>> [i.name for i in bn.backend_info() if i.name == "numpy"]
    ['numpy']
    """
    infos = []
    for name in registry.names():
        loaded, reason = registry.load(name)
        ok = not isinstance(loaded, Exception)
        devices = tuple(loaded.devices()) if ok and reason is None else ()
        infos.append(
            BackendInfo(name, reason is None, reason, loaded.version if ok else None, devices)
        )
    return infos


def available_backends() -> list[str]:
    """Names of the backends that can run here now, in automatic-selection order.

    Examples
    --------
    >>> import batchnorm as bn
    >>> "numpy" in bn.available_backends()
    True
    """
    return [b.name for b in registry.ordered()]


_ENV_KEY = os.environ.encodekey(ENV_VAR)


def _requested_name() -> str | None:
    """The backend named by use_backend() or the environment, or None for automatic."""
    name = _selected.get()
    # The environment is read on every call. os.environ.get costs ~1 us when the variable is
    # unset (it raises and catches a KeyError); the dict that os.environ wraps and keeps in
    # sync answers that in 0.05 us.
    if name is None and _ENV_KEY in os.environ._data:
        name = os.environ.get(ENV_VAR, "").strip().lower() or None
    return None if name == AUTO else name


def get_backend(name: str | None = None) -> Backend:
    """Return a backend object by name, ready to run.

    Parameters
    ----------
    name : str, optional
        A registered backend name. Without it, the backend selected by
        :func:`use_backend` or ``BATCHNORM_BACKEND``; failing both, the first of
        :func:`available_backends` (the automatic choice for NumPy arrays).

    Raises
    ------
    ValueError
        If the name is unknown (the message lists the known ones).
    RuntimeError
        If the backend cannot run here (the message says why).

    Examples
    --------
    >>> import batchnorm as bn
    >>> bn.get_backend("numpy").name
    'numpy'
    """
    name = name or _requested_name()
    if name is None:
        ordered = registry.ordered()
        if not ordered:
            raise RuntimeError("no batchnorm backend can run here; see batchnorm.backend_info()")
        return ordered[0]
    loaded, reason = registry.load(name.lower())
    if reason is not None:
        raise RuntimeError(f"batchnorm backend {name!r} cannot run here: {reason}")
    return loaded


def select_backend(name: str | None, array: Any) -> Backend:
    """The backend for one call on ``array`` (the precedence rules of the module docstring)."""
    name = name or _requested_name()
    if name is not None:
        backend = get_backend(name)
        if not backend.accepts(array):
            raise TypeError(
                f"batchnorm backend {backend.name!r} cannot operate on arrays of "
                f"type {_type_name(array)}; move the data explicitly or choose "
                "another backend"
            )
        return backend
    for backend in registry.ordered():
        if backend.accepts(array):
            return backend
    raise TypeError(
        f"no available batchnorm backend accepts arrays of type {_type_name(array)}; "
        f"available: {', '.join(available_backends())}"
    )


def _type_name(array: Any) -> str:
    cls = type(array)
    return f"{cls.__module__}.{cls.__qualname__}"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Context manager that selects a backend for the calls made inside it.

    The choice is held in a :mod:`contextvars` variable, so it is local to the thread or
    asyncio task that entered the block. It overrides ``BATCHNORM_BACKEND``; an explicit
    ``backend=`` argument overrides it.

    Parameters
    ----------
    name : str
        A registered backend name, or ``"auto"`` for the choice by array type.

    Yields
    ------
    Backend or None
        The selected backend (None for ``"auto"``).

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> with bn.use_backend("numpy"):
    ...     y, mean, invstd = bn.forward(np.ones((4, 2), dtype=np.float32))
    >>> mean
    array([1., 1.], dtype=float32)
    """
    name = name.lower()
    backend = None if name == AUTO else get_backend(name)
    token = _selected.set(name)
    try:
        yield backend
    finally:
        _selected.reset(token)
