"""The public batch-norm functions: validate once, resolve the layout, call the backend.

Every check happens before any kernel runs, so an exception leaves running statistics and
``out=`` buffers untouched.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._backend import Backend
from ._dispatch import select_backend
from ._layout import plan_view, view_geometry

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# Checked first: a set lookup of the array's own dtype is ~0.15 us cheaper than np.dtype()
# and a tuple scan, and a call checks up to six arrays.
_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


def stat_dtype_for(dtype: np.dtype) -> np.dtype:
    """dtype of mean/invstd: float32 for float16/float32 input, float64 for float64."""
    # Against a dtype, not the scalar type np.float64, which == converts on every call.
    return _FLOAT64 if dtype == _FLOAT64 else _FLOAT32


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_float(name: str, native: Any) -> None:
    dtype = native.dtype
    if dtype not in _FLOAT_DTYPE_SET and np.dtype(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float16, float32 or float64, got {native.dtype}")


class _Call:
    """The backend, native arrays and 3-D layout of one call, validated."""

    def __init__(self, backend_name: str | None, x: Any, axis: Any) -> None:
        self.backend: Backend = select_backend(backend_name, x)  # it checked accepts(x)
        self.x_user = x
        self.x = native = self.backend.as_native(x)
        if native.dtype not in _FLOAT_DTYPE_SET:  # the common case costs one set lookup
            _check_float("x", native)
        self.shape = shape = tuple(native.shape)
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(f"x must have at least 2 dimensions (batch and channel), got {ndim}")
        # isinstance against numbers.Integral costs ~0.4 us; a plain int needs no such test.
        if type(axis) is not int and (
            isinstance(axis, bool) or not isinstance(axis, numbers.Integral)
        ):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        if not -ndim <= axis < ndim:
            raise ValueError(f"axis {axis} is out of range for x with {ndim} dimensions")
        self.axis = int(axis) % ndim
        self.channels = int(shape[self.axis])
        self.vector_shape = (self.channels,)
        self.count = math.prod(shape) // self.channels if self.channels else 0
        self.stat_dtype = stat_dtype_for(native.dtype)
        self._plan(native)

    def _plan(self, x: Any) -> None:
        """Plan the layout for x, and keep x's view geometry: dy, ``out`` and a fresh
        ``empty_like(x)`` usually have x's strides, and then share it."""
        self._x_strides = tuple(x.strides)
        self.layout, self._x_geometry = plan_view(tuple(x.shape), self._x_strides, self.axis)

    def _view(self, native: Any) -> Any | None:
        """The 3-D view of a native array of x's shape, or None if it needs a copy."""
        strides = tuple(native.strides)
        if strides == self._x_strides:
            geometry = self._x_geometry
        else:
            geometry = view_geometry(self.layout, tuple(native.shape), strides)
        return None if geometry is None else self.backend.strided_view(native, *geometry)

    def _native(self, name: str, array: Any) -> Any:
        backend = self.backend
        if not backend.accepts(array):
            raise TypeError(
                f"{name} is a {_type_name(array)}, which backend "
                f"{backend.name!r} cannot operate on (x is a "
                f"{_type_name(self.x_user)}); arrays are never moved implicitly"
            )
        return backend.as_native(array)

    def vector(self, name: str, array: Any, required: bool = False) -> Any:
        """A per-channel argument: None or a float array of shape (C,) of the backend's kind."""
        if array is None:
            if required:
                raise ValueError(f"{name} is required")
            return None
        native = self._native(name, array)
        if native.dtype not in _FLOAT_DTYPE_SET:  # the common case costs one set lookup
            _check_float(name, native)
        shape = native.shape
        if shape != self.vector_shape and tuple(shape) != self.vector_shape:
            raise ValueError(
                f"{name} must have shape ({self.channels},) to match the "
                f"{self.channels} channels of x along axis {self.axis}, "
                f"got {tuple(native.shape)}"
            )
        return native

    def like_x(self, name: str, array: Any) -> Any:
        """An argument that must match x in shape and dtype (dy)."""
        native = self._native(name, array)
        if tuple(native.shape) != self.shape:
            raise ValueError(
                f"{name} must have the shape of x {self.shape}, got {tuple(native.shape)}"
            )
        dtype = native.dtype
        if dtype != self.x.dtype and np.dtype(dtype) != np.dtype(self.x.dtype):
            raise TypeError(
                f"{name} must have the dtype of x ({self.x.dtype}), got {native.dtype}"
            )
        return native

    def check_out(self, out: Any, inputs: tuple[Any, ...]) -> Any:
        """The native ``out`` (callers skip this for ``out=None``), not overlapping ``inputs``."""
        native = self.like_x("out", out)
        for array in inputs:
            if self.backend.may_share_memory(native, array):
                raise ValueError("out must not overlap the input arrays")
        return native

    def view3(self, native: Any) -> Any:
        """3-D view of an input (x first, then dy).

        An input whose strides cannot be viewed is copied once into a compact array laid out
        like x (NumPy's ``order="K"``); if that input is x, the layout is planned again for it.
        """
        view = self._view(native)
        if view is not None:
            return view
        compact = self.backend.empty_like(self.x)
        self.backend.copy_into(compact, native)
        if native is self.x:
            self._plan(compact)
        return self._compact_view(compact)

    def output(self, out_native: Any) -> tuple[Any, Any, Any]:
        """``(result, result3, publish)``: where the kernel writes and how to publish it."""
        target = out_native if out_native is not None else self.backend.empty_like(self.x)
        view = self._view(target)
        if view is not None:
            return target, view, _nothing_to_publish
        scratch = self.backend.empty_like(self.x)
        return target, self._compact_view(scratch), lambda: self.backend.copy_into(target, scratch)

    def _compact_view(self, compact: Any) -> Any:
        view = self._view(compact)
        if view is None:
            raise RuntimeError(
                f"backend {self.backend.name!r}: empty_like() must return a compact array in "
                "the memory order of its argument"
            )
        return view

    def user(self, *natives: Any) -> tuple[Any, ...]:
        """Results as the user's array type (None stays None)."""
        backend = self.backend
        if type(backend).to_user is Backend.to_user:  # the default: results are the user's type
            return natives
        return tuple(None if a is None else backend.to_user(a, self.x_user) for a in natives)


def _nothing_to_publish() -> None:
    pass


# Plain floats skip the isinstance tests against numbers.Real (~0.4 us each).
def _check_eps(eps: Any) -> float:
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise TypeError(f"eps must be a real number, got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return float(eps)


def _check_momentum(momentum: Any) -> float:
    if type(momentum) is not float and (
        isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)
    ):
        raise TypeError(f"momentum must be a real number, got {momentum!r}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return float(momentum)


def _check_training(training: Any) -> bool:
    if type(training) is not bool and not isinstance(training, np.bool_):
        raise TypeError(f"training must be a bool, got {training!r}")
    return bool(training)


def forward(
    x,
    weight=None,
    bias=None,
    running_mean=None,
    running_var=None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    backend: str | None = None,
    out=None,
):
    """Batch-normalize ``x`` over every axis except the channel ``axis``.

    Parameters
    ----------
    x : array, shape (..., C, ...)
        float16, float32 or float64 input with at least 2 dimensions. Never modified.
    weight, bias : array of shape (C,), optional
        Affine parameters (gamma, beta). None means 1 and 0.
    running_mean, running_var : array of shape (C,), optional
        Running statistics. In training they are updated in place when given (both or
        neither); in evaluation they are required and used to normalize.
    training : bool, default True
        Normalize with the batch statistics (True) or the running ones (False).
    momentum : float in [0, 1], default 0.1
        ``running = (1 - momentum) * running + momentum * batch`` (PyTorch's convention;
        Keras' and Flax's ``momentum``/``decay`` is ``1 - momentum`` here).
    eps : float >= 0, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis; negative values count from the end (``-1`` for channels-last).
    backend : str, optional
        Backend name; overrides :func:`use_backend` and ``BATCHNORM_BACKEND``.
    out : array, optional
        Receives ``y``; same shape, dtype and array type as ``x``, not overlapping it.

    Returns
    -------
    y : array
        ``(x - mean) * (weight * invstd) + bias``, same shape, dtype and array type as ``x``.
    mean, invstd : array of shape (C,)
        Batch mean and ``1 / sqrt(var + eps)`` (biased variance) in training; the running
        mean and the ``invstd`` of the running variance in evaluation. float32 for float16
        and float32 input, float64 for float64 input.

    Raises
    ------
    TypeError
        Non-float dtypes, arrays of a kind the backend cannot use, mixed array kinds.
    ValueError
        Shape mismatches, ``axis`` out of range, ``eps < 0``, ``momentum`` outside [0, 1],
        evaluation without running statistics, training with one value per channel.

    Notes
    -----
    The running variance is updated with the unbiased batch variance
    ``var * n / (n - 1)``. Statistics are computed stably (never ``E[x^2] - E[x]^2``) and
    float16 input is computed in float32. An input whose strides cannot be viewed as
    ``(outer, C, inner)`` (for instance a slice that skips elements along two axes that
    would be merged) is copied once into a compact buffer.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]], dtype=np.float32)
    >>> y, mean, invstd = bn.forward(x, eps=0.0, backend="numpy")
    >>> y
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> mean
    array([ 2., 20.], dtype=float32)
    """
    call = _Call(backend, x, axis)
    be = call.backend
    weight = call.vector("weight", weight)
    bias = call.vector("bias", bias)
    training = _check_training(training)
    eps = _check_eps(eps)
    momentum = _check_momentum(momentum)
    if training:
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must be given together")
        if call.count <= 1:
            raise ValueError(
                f"expected more than 1 value per channel when training, got "
                f"input of shape {tuple(call.x.shape)} with axis={call.axis}"
            )
    elif running_mean is None or running_var is None:
        raise ValueError("evaluation (training=False) requires running_mean and running_var")
    running_mean = call.vector("running_mean", running_mean)
    running_var = call.vector("running_var", running_var)
    out_native = None if out is None else call.check_out(out, (call.x,))
    if training and running_mean is not None and be.may_share_memory(running_mean, running_var):
        raise ValueError("running_mean and running_var must not overlap")

    x3 = call.view3(call.x)
    y, y3, publish = call.output(out_native)
    if training:
        mean, _, invstd = be.forward_train(
            x3, weight, bias, eps, y3, call.stat_dtype, running_mean, running_var, momentum
        )
        publish()
    else:
        mean, invstd = be.forward_eval(
            x3, running_mean, running_var, weight, bias, eps, y3, call.stat_dtype
        )
        publish()
    y, mean, invstd = call.user(y, mean, invstd)
    return (out if out is not None else y), mean, invstd


def backward(
    dy,
    x,
    weight,
    mean,
    invstd,
    *,
    training: bool = True,
    axis: int = 1,
    backend: str | None = None,
    out=None,
):
    """Gradient of :func:`forward` with respect to ``x``, ``weight`` and ``bias``.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to ``y``; shape and dtype of ``x``.
    x : array
        The input that was given to :func:`forward`.
    weight : array of shape (C,) or None
        The affine weight given to :func:`forward` (None if there was none).
    mean, invstd : array of shape (C,)
        As returned by :func:`forward`.
    training : bool, default True
        Whether ``forward`` ran in training mode. In evaluation ``mean`` and ``invstd`` are
        constants, so ``dx = dy * weight * invstd``.
    axis : int, default 1
        The channel axis used in the forward pass.
    backend : str, optional
        Backend name; overrides :func:`use_backend` and ``BATCHNORM_BACKEND``.
    out : array, optional
        Receives ``dx``; same shape, dtype and array type as ``x``, not overlapping inputs.

    Returns
    -------
    dx : array
        Same shape, dtype and array type as ``x``.
    dweight, dbias : array of shape (C,) or None
        In the dtype of ``weight``; None when ``weight`` is None.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = bn.forward(x, eps=0.0, backend="numpy")
    >>> dx, dw, db = bn.backward(np.ones_like(x), x, np.ones(1), mean, invstd, backend="numpy")
    >>> dx.ravel(), dw, db
    (array([0., 0.]), array([0.]), array([2.]))
    """
    call = _Call(backend, x, axis)
    be = call.backend
    dy_native = call.like_x("dy", dy)
    weight = call.vector("weight", weight)
    mean = call.vector("mean", mean, required=True)
    invstd = call.vector("invstd", invstd, required=True)
    training = _check_training(training)
    out_native = None if out is None else call.check_out(out, (call.x, dy_native))

    x3 = call.view3(call.x)
    dy3 = call.view3(dy_native)
    dx, dx3, publish = call.output(out_native)
    sums = None
    if training:
        sums = be.backward_train(dy3, x3, mean, invstd, weight, dx3)
    else:
        be.normalize(dy3, None, invstd, weight, None, dx3)
        if weight is not None:
            sums = be.grad_sums(dy3, x3, mean)
    publish()
    dweight = dbias = None
    if weight is not None:
        dweight, dbias = be.param_grads(*sums, invstd, weight.dtype, weight.dtype)
    dx, dweight, dbias = call.user(dx, dweight, dbias)
    return (out if out is not None else dx), dweight, dbias


def batch_norm(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    backend: str | None = None,
):
    """Drop-in for :func:`torch.nn.functional.batch_norm`: same arguments, returns ``y``.

    Parameters
    ----------
    x, running_mean, running_var, weight, bias, training, momentum, eps
        As in :func:`forward`, in PyTorch's positional order. ``running_mean`` and
        ``running_var`` may be None when ``training`` is True.
    axis : int, default 1
        The channel axis.
    backend : str, optional
        Backend name.

    Returns
    -------
    y : array
        The normalized input.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> bn.batch_norm(np.ones((3, 2)), rm, rv, eps=0.0, backend="numpy")
    array([[1., 1.],
           [1., 1.],
           [1., 1.]])
    """
    return forward(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training=training,
        momentum=momentum,
        eps=eps,
        axis=axis,
        backend=backend,
    )[0]


def update_running_stats(
    running_mean,
    running_var,
    batch_mean,
    batch_var,
    count: int,
    momentum: float = 0.1,
    *,
    backend: str | None = None,
) -> None:
    """Update running statistics in place from one batch's statistics.

    ``running_mean = (1 - momentum) * running_mean + momentum * batch_mean`` and
    ``running_var = (1 - momentum) * running_var + momentum * batch_var * count / (count - 1)``.

    Parameters
    ----------
    running_mean, running_var : array of shape (C,)
        Updated in place; they keep their dtype.
    batch_mean, batch_var : array of shape (C,)
        The batch mean and the *biased* batch variance.
    count : int >= 2
        Number of values per channel the batch statistics were taken over.
    momentum : float in [0, 1], default 0.1
        Weight of the new batch.
    backend : str, optional
        Backend name; by default chosen from the array type of ``running_mean``.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> rm, rv = np.zeros(1), np.ones(1)
    >>> bn.update_running_stats(rm, rv, np.array([2.0]), np.array([1.0]), count=2, momentum=0.5)
    >>> rm, rv
    (array([1.]), array([1.5]))
    """
    be = select_backend(backend, running_mean)
    names = ("running_mean", "running_var", "batch_mean", "batch_var")
    arrays = (running_mean, running_var, batch_mean, batch_var)
    natives = []
    first_shape = None
    for name, array in zip(names, arrays):
        if not be.accepts(array):
            raise TypeError(
                f"{name} is a {_type_name(array)}, which backend {be.name!r} cannot operate on"
            )
        native = be.as_native(array)
        _check_float(name, native)
        shape = tuple(native.shape)
        if first_shape is None:
            first_shape = shape
        if len(shape) != 1 or shape != first_shape:
            raise ValueError(f"{name} must be 1-D with the shape of running_mean, got {shape}")
        natives.append(native)
    if type(count) is not int and (
        isinstance(count, bool) or not isinstance(count, numbers.Integral)
    ):
        raise TypeError(f"count must be an integer, got {count!r}")
    if count < 2:
        raise ValueError(f"count must be at least 2 for the unbiased variance, got {count}")
    momentum = _check_momentum(momentum)
    if be.may_share_memory(natives[0], natives[1]):
        raise ValueError("running_mean and running_var must not overlap")
    be.update_running_stats(*natives, int(count), momentum)
