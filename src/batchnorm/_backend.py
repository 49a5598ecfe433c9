"""The backend protocol: what a backend implements, and defaults for the small parts.

The core (``batchnorm._api``) validates arguments, resolves the channel axis into a 3-D
strided view ``(outer, C, inner)``, chooses dtypes, and calls the methods below. A backend
only computes. Every array a method receives is already *native* to the backend (see
:meth:`Backend.as_native`) and every ``x3``/``dy3``/``out3`` argument is a 3-D view whose
axis 1 is the channel axis; it may have any strides (even negative or zero-free gaps).

Two phases, so a multi-process version can all-reduce between them:

* phase 1, per-channel reductions: :meth:`channel_stats` (mean and M2, mergeable with
  Chan's formula) and :meth:`grad_sums` (sum dy and sum dy*(x - mean));
* phase 2, elementwise: :meth:`normalize` and :meth:`input_grad`.

:meth:`forward_train`, :meth:`forward_eval` and :meth:`backward_train` compose the phases
and the per-channel steps; a backend may override them with fused kernels, and may settle
its per-call choices once per call signature in :meth:`plan_forward_train`,
:meth:`plan_forward_eval` and :meth:`plan_backward_train`. The
per-channel steps (:meth:`finish_stats`, :meth:`param_grads`, :meth:`update_running_stats`)
have defaults written with the backend's array module ``xp``; a backend whose arrays have
no such module (e.g. Numba device arrays) overrides them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from ._layout import is_c_contiguous


class Backend(ABC):
    """Base class of batch-norm backends.

    Subclass it, set :attr:`name`, implement the four kernels (:meth:`channel_stats`,
    :meth:`grad_sums`, :meth:`normalize`, :meth:`input_grad`), and register the class
    under the entry-point group ``batchnorm.backends``.

    Attributes
    ----------
    name : str
        The name users select the backend by.
    priority : int
        Order of automatic selection among the backends that accept an array: higher first.
    xp : module or None
        The array module (``numpy``, ``cupy``) the default per-channel steps use.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    xp: Any = np

    # -- identity and availability -------------------------------------------------------
    @property
    def version(self) -> str:
        """Version string of the library the kernels are built on."""
        return np.__version__

    def unavailable_reason(self) -> str | None:
        """Return why this backend cannot run here, or None when it can."""
        return None

    def accepts(self, array: Any) -> bool:
        """Whether ``array`` is of a kind this backend computes on (no transfer needed).

        The core asks once per call signature (see :meth:`plan_forward_train`) and remembers
        the answer, so it must follow from the array's type, dtype, shape and strides.
        """
        return isinstance(array, np.ndarray)

    def devices(self) -> list[str]:
        """Human-readable names of the devices the backend would run on."""
        return []

    # -- array plumbing --------------------------------------------------------------------
    def as_native(self, array: Any) -> Any:
        """Return a zero-copy view of an accepted array as the backend's native type.

        The native type must have NumPy-style ``shape``, ``dtype`` and ``strides`` (bytes),
        which must follow from those of ``array`` (the core plans once per signature).
        """
        return array

    def to_user(self, native: Any, like: Any) -> Any:
        """Return ``native`` (a result) as the array type of the user's input ``like``."""
        return native

    def empty(self, shape: tuple[int, ...], dtype: Any, like: Any) -> Any:
        """Allocate an uninitialised native array on the device of ``like``."""
        return self.xp.empty(shape, dtype=dtype)

    def empty_like(self, array: Any) -> Any:
        """Allocate a native array of ``array``'s shape, dtype and memory order (compact,
        with strides that follow from ``array``'s shape, dtype and strides)."""
        return self.xp.empty_like(array)

    def strided_view(self, array: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
        """Return a view of native ``array``'s memory with the given shape and byte strides."""
        if array.flags.c_contiguous:  # then a C-order view is a reshape, 5x cheaper
            view = array.reshape(shape)
            if view.strides == strides or is_c_contiguous(shape, strides, array.itemsize):
                return view
        return self.xp.lib.stride_tricks.as_strided(array, shape, strides)

    def may_share_memory(self, a: Any, b: Any) -> bool:
        """Whether two native arrays may overlap in memory."""
        return bool(self.xp.may_share_memory(a, b))

    def copy_into(self, dst: Any, src: Any) -> None:
        """Copy native ``src`` into native ``dst`` of the same shape."""
        self.xp.copyto(dst, src)

    def from_host(self, array: np.ndarray) -> Any:
        """Explicitly transfer (always copy) a NumPy array to this backend's array type."""
        return self.xp.array(array, copy=True)

    def to_host(self, array: Any) -> np.ndarray:
        """Explicitly transfer one of this backend's arrays to a NumPy array."""
        return np.asarray(array)

    # -- phase 1: per-channel reductions -----------------------------------------------------
    @abstractmethod
    def channel_stats(self, x3: Any) -> tuple[Any, Any]:
        """Per-channel mean and M2 (sum of squared deviations) of ``x3`` over axes 0 and 2.

        Returns float arrays of length C in the backend's accumulation dtype (at least
        float32). Must be computed stably (two-pass or Welford/Chan), never as
        ``E[x^2] - E[x]^2``. The count is ``x3.shape[0] * x3.shape[2]``.
        """

    @abstractmethod
    def grad_sums(self, dy3: Any, x3: Any, mean: Any) -> tuple[Any, Any]:
        """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` over axes 0 and 2."""

    # -- phase 2: elementwise -------------------------------------------------------------------
    @abstractmethod
    def normalize(self, x3, mean, invstd, weight, bias, out3) -> None:
        """Write ``(x - mean) * (weight * invstd) + bias`` into ``out3``.

        ``mean``, ``weight`` and ``bias`` may be None, meaning 0, 1 and 0, and may have any
        float dtype (the composed paths pass the mean as accumulated, or the running mean
        as given). Arithmetic is done in float32 at least (float64 for float64 input).
        """

    @abstractmethod
    def input_grad(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xmu, out3) -> None:
        """Write the training-mode input gradient into ``out3``.

        ``dx = weight * invstd * (dy - sum_dy / n - (x - mean) * invstd**2 * sum_dy_xmu / n)``
        with ``n = x3.shape[0] * x3.shape[2]``; ``weight`` None means 1.
        """

    # -- composed paths (override to fuse) ------------------------------------------------------
    def forward_train(
        self,
        x3,
        weight,
        bias,
        eps: float,
        out3,
        stat_dtype,
        running_mean=None,
        running_var=None,
        momentum: float = 0.0,
    ) -> tuple[Any, Any, Any]:
        """Batch statistics and normalized output in one call.

        Returns ``(mean, var, invstd)`` of dtype ``stat_dtype`` (``var`` biased). When
        ``running_mean`` and ``running_var`` are given, they are updated in place as by
        :meth:`update_running_stats` (a backend may fuse the update into its kernel, as
        cuDNN does).
        """
        count = x3.shape[0] * x3.shape[2]
        mean_acc, m2 = self.channel_stats(x3)
        mean, var, invstd = self.finish_stats(mean_acc, m2, count, eps, stat_dtype)
        # Normalize with the mean as accumulated, not as returned: rounded to float32, it
        # would move y by |mean| * invstd * eps(float32) (6e-4 for values near 1e4 with a
        # spread of 1).
        self.normalize(x3, mean_acc, invstd, weight, bias, out3)
        if running_mean is not None:
            self.update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return mean, var, invstd

    def forward_eval(
        self, x3, running_mean, running_var, weight, bias, eps: float, out3, stat_dtype
    ) -> tuple[Any, Any]:
        """Evaluation-mode output from the running statistics into ``out3``.

        Returns ``(mean, invstd)`` of dtype ``stat_dtype``: the running mean (a copy) and
        ``1 / sqrt(running_var + eps)``.
        """
        mean, _, invstd = self.finish_stats(running_mean, running_var, 1, eps, stat_dtype)
        self.normalize(x3, running_mean, invstd, weight, bias, out3)  # as given, not rounded
        return mean, invstd

    def backward_train(self, dy3, x3, mean, invstd, weight, out3) -> tuple[Any, Any]:
        """Training-mode input gradient into ``out3``; returns ``(sum_dy, sum_dy_xmu)``."""
        sum_dy, sum_dy_xmu = self.grad_sums(dy3, x3, mean)
        self.input_grad(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xmu, out3)
        return sum_dy, sum_dy_xmu

    # -- plans (override to settle per-call choices once) --------------------------------------
    # The core plans each signature of a public call once (the types, dtypes, shapes and
    # strides of its arrays) and then asks the backend for the function it will call for every
    # call with that signature. A backend can make its choices there (kernel, launch sizes,
    # conversions) instead of on every call; the defaults are the methods themselves. The
    # arguments are views and vectors with the signature's shapes, strides and dtypes (the
    # output may be a fresh array): look at those, not at their values, and keep none of them.
    def plan_forward_train(self, x3, weight, bias, out3, running_mean, running_var):
        """A function with the arguments and results of :meth:`forward_train`, for arrays
        like these."""
        return self.forward_train

    def plan_forward_eval(self, x3, running_mean, running_var, weight, bias, out3):
        """A function with the arguments and results of :meth:`forward_eval`, for arrays like
        these."""
        return self.forward_eval

    def plan_backward_train(self, dy3, x3, mean, invstd, weight, out3):
        """A function with the arguments and results of :meth:`backward_train`, for arrays
        like these."""
        return self.backward_train

    # -- per-channel steps (defaults use self.xp) ----------------------------------------------
    def finish_stats(self, mean, m2, count: int, eps: float, stat_dtype) -> tuple[Any, Any, Any]:
        """From mean and M2 over ``count`` values: ``(mean, var, invstd)`` in ``stat_dtype``.

        ``var = max(m2 / count, 0)`` (biased) and ``invstd = 1 / sqrt(var + eps)``. With
        ``count = 1`` and ``m2`` a variance this turns running statistics into eval ones.
        """
        xp = self.xp
        var = xp.divide(m2, count, dtype=np.promote_types(m2.dtype, stat_dtype))
        xp.maximum(var, 0, out=var)
        invstd = var + eps
        xp.sqrt(invstd, out=invstd)
        xp.reciprocal(invstd, out=invstd)
        return (
            mean.astype(stat_dtype),  # a copy: in eval, mean must not alias running_mean
            var.astype(stat_dtype, copy=False),
            invstd.astype(stat_dtype, copy=False),
        )

    def param_grads(self, sum_dy, sum_dy_xmu, invstd, weight_dtype, bias_dtype):
        """``(dweight, dbias) = (sum_dy_xmu * invstd, sum_dy)`` in the parameters' dtypes."""
        dweight = (sum_dy_xmu * invstd.astype(sum_dy_xmu.dtype)).astype(weight_dtype)
        return dweight, sum_dy.astype(bias_dtype)

    def update_running_stats(
        self, running_mean, running_var, batch_mean, batch_var, count: int, momentum: float
    ) -> None:
        """In place: ``running = (1 - momentum) * running + momentum * batch``.

        ``batch_var`` is biased; the running variance takes the unbiased
        ``batch_var * count / (count - 1)``. Running arrays keep their dtype.
        """
        acc = np.promote_types(running_mean.dtype, batch_mean.dtype)
        keep = 1 - momentum
        new_mean = running_mean.astype(acc)
        new_mean *= keep
        new_mean += momentum * batch_mean
        new_var = running_var.astype(acc)
        new_var *= keep
        new_var += batch_var * (momentum * count / (count - 1))
        running_mean[...] = new_mean
        running_var[...] = new_var
