"""The public batch-norm functions: validate, resolve the layout, call the backend.

What depends only on the arguments' signature is checked and planned once per signature
(see :class:`_Plan`); every call checks its values. Every check happens before any kernel
runs, so an exception leaves running statistics and ``out=`` buffers untouched.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._backend import Backend
from ._dispatch import _requested_name, registry, select_backend
from ._layout import plan_layout, plan_view, view_geometry

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


# -- plans: the checks and choices of one argument signature, made once ---------------------
# Most of what a call checks and chooses (the backend, dtypes, shapes, the 3-D views, the
# backend's kernel and launch sizes) depends only on the arguments' signature: the backend
# requested, the axis, the mode, and the type, dtype, shape and strides of every array. A
# signature's first call makes a _Plan, with every check; later calls with it run the plan,
# which checks only what depends on values (eps, momentum, arrays that overlap). This is
# worth more than its isolated cost suggests: in a loop of calls each Python step after a
# kernel runs several times slower than alone (the kernel flushed the interpreter's data
# from the caches). Planned, a (256, 1024) forward-train call runs half the Python it ran
# (629 bytecodes, not 1254) and took 95 us instead of 125 in the benchmark.
_PLANS_KEPT = 256  # signatures; a program cycling through more re-plans rather than grows


def _plan_for(kind: type, backend_name: Any, axis: Any, mode: Any, arrays: tuple) -> _Plan:
    """The plan of ``kind`` (:class:`_ForwardPlan`, :class:`_BackwardPlan`) for a call on
    ``arrays`` (x first): the one kept for its signature, or a new one."""
    requested = backend_name or _requested_name()
    key = _signature(kind, requested, axis, mode, arrays)
    plans = registry.plans  # forgotten with the backends (registry.clear())
    try:
        plan = plans.get(key) if key is not None else None
    except TypeError:  # an unhashable shape or dtype: planned afresh
        key = plan = None
    if plan is None:
        plan = kind(requested, arrays[0], axis, mode, *arrays[1:])
        if key is not None:
            if len(plans) >= _PLANS_KEPT:
                plans.clear()
            plans[key] = plan
    return plan


def _signature(kind: type, requested: Any, axis: Any, mode: Any, arrays: tuple) -> tuple | None:
    """The key of a call's plan: which kind of plan, the backend requested, the axis, the
    mode and every array's type, dtype, shape and strides (None where an array is absent).
    None when an argument has no such key: that call is planned afresh."""
    if type(axis) is not int:  # True == 1 as a key: a bool axis must meet its TypeError
        return None
    try:
        signatures = [
            None if a is None else (type(a), a.dtype, a.shape, a.strides) for a in arrays
        ]
    except AttributeError:  # not array-like: the plan's checks say what is wrong
        return None
    return (kind, requested, axis, mode, *signatures)


class _Plan:
    """The backend, checks and 3-D views of one argument signature.

    Built on the signature's first call, raising on the first failed check; it keeps no
    array. ``geometry`` values are the ``(shape3, strides3)`` of an array's 3-D view, or None
    when the array is copied (an input) or written through a scratch array (``out``).
    """

    def __init__(self, requested: str | None, x: Any, axis: Any) -> None:
        self.backend: Backend = select_backend(requested, x)  # it checked accepts(x)
        backend_type = type(self.backend)
        self.converts = backend_type.as_native is not Backend.as_native
        self.converts_back = backend_type.to_user is not Backend.to_user
        self.x_type_name = _type_name(x)  # for messages
        native = self.backend.as_native(x)
        if native.dtype not in _FLOAT_DTYPE_SET:  # the common case costs one set lookup
            _check_float("x", native)
        self.x_dtype = native.dtype
        self.shape = shape = tuple(native.shape)
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(f"x must have at least 2 dimensions (batch and channel), got {ndim}")
        if type(axis) is not int and (
            isinstance(axis, bool) or not isinstance(axis, numbers.Integral)
        ):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        if not -ndim <= axis < ndim:
            raise ValueError(f"axis {axis} is out of range for x with {ndim} dimensions")
        self.axis = int(axis) % ndim
        self.channels = int(shape[self.axis])
        self.count = math.prod(shape) // self.channels if self.channels else 0
        self.stat_dtype = stat_dtype_for(native.dtype)
        # x's own view, else (an input whose strides cannot be viewed) that of the compact copy
        # taken of it: empty_like(x), laid out like x (NumPy's order="K"), which also holds
        # outputs and copies of other inputs.
        self.layout, self.x_geometry = plan_view(shape, tuple(native.strides), self.axis)
        compact = self.backend.empty_like(native)
        if self.x_geometry is None:
            self.layout = plan_layout(shape, tuple(compact.strides), self.axis)
        self.compact_geometry = self.geometry(compact)
        if self.compact_geometry is None:
            raise RuntimeError(
                f"backend {self.backend.name!r}: empty_like() must return a compact array in "
                "the memory order of its argument"
            )

    def geometry(self, native: Any) -> tuple | None:
        """The geometry of a native array of x's shape in this plan's layout."""
        return view_geometry(self.layout, tuple(native.shape), tuple(native.strides))

    # -- checks, made when planning --------------------------------------------------------
    def native(self, name: str, array: Any) -> Any:
        """``array`` as the backend's native type, if the backend accepts it."""
        backend = self.backend
        if not backend.accepts(array):
            raise TypeError(
                f"{name} is a {_type_name(array)}, which backend "
                f"{backend.name!r} cannot operate on (x is a "
                f"{self.x_type_name}); arrays are never moved implicitly"
            )
        return backend.as_native(array)

    def vector(self, name: str, array: Any, required: bool = False) -> Any:
        """A per-channel argument: None or a float array of shape (C,) of the backend's kind."""
        if array is None:
            if required:
                raise ValueError(f"{name} is required")
            return None
        native = self.native(name, array)
        if native.dtype not in _FLOAT_DTYPE_SET:  # the common case costs one set lookup
            _check_float(name, native)
        if tuple(native.shape) != (self.channels,):
            raise ValueError(
                f"{name} must have shape ({self.channels},) to match the "
                f"{self.channels} channels of x along axis {self.axis}, "
                f"got {tuple(native.shape)}"
            )
        return native

    def like_x(self, name: str, array: Any) -> Any:
        """An argument that must match x in shape and dtype (dy, out)."""
        native = self.native(name, array)
        if tuple(native.shape) != self.shape:
            raise ValueError(
                f"{name} must have the shape of x {self.shape}, got {tuple(native.shape)}"
            )
        dtype = native.dtype
        if dtype != self.x_dtype and np.dtype(dtype) != np.dtype(self.x_dtype):
            raise TypeError(f"{name} must have the dtype of x ({self.x_dtype}), got {dtype}")
        return native

    # -- per call -------------------------------------------------------------------------------
    def natives(self, *arrays: Any) -> tuple[Any, ...]:
        """The call's arrays as the backend's native type (None stays None)."""
        if not self.converts:  # the default: the user's arrays are native
            return arrays
        backend = self.backend
        return tuple(None if a is None else backend.as_native(a) for a in arrays)

    def view3(self, native: Any, geometry: tuple | None, x: Any) -> Any:
        """The 3-D view of input ``native``; with no ``geometry``, of a compact copy of it laid
        out like ``x`` (copied once, not per pass)."""
        backend = self.backend
        if geometry is not None:
            return backend.strided_view(native, *geometry)
        compact = backend.empty_like(x)
        backend.copy_into(compact, native)
        return backend.strided_view(compact, *self.compact_geometry)

    def output(self, out: Any, geometry: tuple | None, x: Any) -> tuple[Any, Any, Any]:
        """``(result, result3, scratch)``: where the kernel writes, and the scratch array to
        copy into ``out`` afterwards when ``out`` cannot be viewed (else None)."""
        backend = self.backend
        if out is not None and geometry is not None:
            return out, backend.strided_view(out, *geometry), None
        target = backend.empty_like(x)
        target3 = backend.strided_view(target, *self.compact_geometry)
        return (target, target3, None) if out is None else (out, target3, target)

    def user(self, x_user: Any, *natives: Any) -> tuple[Any, ...]:
        """Results as the user's array type, that of ``x_user`` (None stays None)."""
        if not self.converts_back:  # the default: results are the user's type
            return natives
        backend = self.backend
        return tuple(None if a is None else backend.to_user(a, x_user) for a in natives)

    def example3(self, native: Any, geometry: tuple | None, x: Any) -> Any:
        """A 3-D view like those the calls of this plan pass for ``native`` (None: for a new
        output), without copying anything: the backend plans with it, and looks at its
        shape, strides and dtype only."""
        return self.output(native, geometry, x)[1]


class _ForwardPlan(_Plan):
    """A :class:`_Plan` of :func:`forward`, with the backend's function for it."""

    def __init__(self, requested, x, axis, training, weight, bias, running_mean, running_var, out):
        super().__init__(requested, x, axis)
        if training and self.count <= 1:
            raise ValueError(
                f"expected more than 1 value per channel when training, got "
                f"input of shape {self.shape} with axis={self.axis}"
            )
        weight = self.vector("weight", weight)
        bias = self.vector("bias", bias)
        running_mean = self.vector("running_mean", running_mean)
        running_var = self.vector("running_var", running_var)
        x = self.backend.as_native(x)
        out = None if out is None else self.like_x("out", out)
        self.out_geometry = None if out is None else self.geometry(out)
        x3 = self.example3(x, self.x_geometry, x)
        y3 = self.example3(out, self.out_geometry, x)
        if training:
            self.run = self.backend.plan_forward_train(
                x3, weight, bias, y3, running_mean, running_var
            )
        else:
            self.run = self.backend.plan_forward_eval(
                x3, running_mean, running_var, weight, bias, y3
            )


class _BackwardPlan(_Plan):
    """A :class:`_Plan` of :func:`backward`, with the backend's function for it."""

    def __init__(self, requested, x, axis, training, dy, weight, mean, invstd, out):
        super().__init__(requested, x, axis)
        if dy is None:
            raise ValueError("dy is required")
        dy = self.like_x("dy", dy)
        weight = self.vector("weight", weight)
        mean = self.vector("mean", mean, required=True)
        invstd = self.vector("invstd", invstd, required=True)
        out = None if out is None else self.like_x("out", out)
        self.dy_geometry = self.geometry(dy)
        self.out_geometry = None if out is None else self.geometry(out)
        self.run = None  # evaluation: normalize and grad_sums
        if training:
            x = self.backend.as_native(x)
            self.run = self.backend.plan_backward_train(
                self.example3(dy, self.dy_geometry, x),
                self.example3(x, self.x_geometry, x),
                mean,
                invstd,
                weight,
                self.example3(out, self.out_geometry, x),
            )


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
    # The usual values pass a few comparisons; the functions check the others (or raise).
    if type(training) is not bool:
        training = _check_training(training)
    if type(eps) is not float or not 0.0 <= eps < math.inf:
        eps = _check_eps(eps)
    if type(momentum) is not float or not 0.0 <= momentum <= 1.0:
        momentum = _check_momentum(momentum)
    if training:
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must be given together")
    elif running_mean is None or running_var is None:
        raise ValueError("evaluation (training=False) requires running_mean and running_var")
    arrays = (x, weight, bias, running_mean, running_var, out)
    plan = _plan_for(_ForwardPlan, backend, axis, training, arrays)

    be = plan.backend
    x_user, out_user = x, out
    x, weight, bias, running_mean, running_var, out = plan.natives(*arrays)
    if out is not None and be.may_share_memory(out, x):
        raise ValueError("out must not overlap the input arrays")
    if training and running_mean is not None and be.may_share_memory(running_mean, running_var):
        raise ValueError("running_mean and running_var must not overlap")
    x3 = plan.view3(x, plan.x_geometry, x)
    y, y3, scratch = plan.output(out, plan.out_geometry, x)
    if training:
        mean, _, invstd = plan.run(
            x3, weight, bias, eps, y3, plan.stat_dtype, running_mean, running_var, momentum
        )
    else:
        mean, invstd = plan.run(
            x3, running_mean, running_var, weight, bias, eps, y3, plan.stat_dtype
        )
    if scratch is not None:
        be.copy_into(y, scratch)
    y, mean, invstd = plan.user(x_user, y, mean, invstd)
    return (out_user if out_user is not None else y), mean, invstd


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
    if type(training) is not bool:
        training = _check_training(training)
    arrays = (x, dy, weight, mean, invstd, out)
    plan = _plan_for(_BackwardPlan, backend, axis, training, arrays)

    be = plan.backend
    x_user, out_user = x, out
    x, dy, weight, mean, invstd, out = plan.natives(*arrays)
    if out is not None and (be.may_share_memory(out, x) or be.may_share_memory(out, dy)):
        raise ValueError("out must not overlap the input arrays")
    x3 = plan.view3(x, plan.x_geometry, x)
    dy3 = plan.view3(dy, plan.dy_geometry, x)
    dx, dx3, scratch = plan.output(out, plan.out_geometry, x)
    sums = None
    if training:
        sums = plan.run(dy3, x3, mean, invstd, weight, dx3)
    else:
        be.normalize(dy3, None, invstd, weight, None, dx3)
        if weight is not None:
            sums = be.grad_sums(dy3, x3, mean)
    if scratch is not None:
        be.copy_into(dx, scratch)
    dweight = dbias = None
    if weight is not None:
        dweight, dbias = be.param_grads(*sums, invstd, weight.dtype, weight.dtype)
    dx, dweight, dbias = plan.user(x_user, dx, dweight, dbias)
    return (out_user if out_user is not None else dx), dweight, dbias


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
