"""The ``numpy`` reference backend: short, readable, float64 everywhere.

It is the oracle the other backends are tested against, so it favours obviously-correct
NumPy over speed: two-pass statistics accumulated in float64, and the gradient written the
way the math reads.
"""

from __future__ import annotations

import numpy as np

from batchnorm import Backend

_REDUCE = (0, 2)  # every axis of the (outer, C, inner) view except the channel axis


def _per_channel(v):
    """Shape a length-C vector to broadcast against an (outer, C, inner) view."""
    return v.reshape(1, -1, 1)


class NumpyBackend(Backend):
    """Pure-NumPy reference implementation (float64 accumulation)."""

    name = "numpy"
    priority = 0

    def channel_stats(self, x3):
        # The corrected two-pass algorithm (Chan, Golub and LeVeque, 1983): the first mean
        # is off by the rounding of a sum of values of size |mean| (NumPy sums along the
        # outer axis one by one), which the sum of the deviations from it recovers. On the
        # inputs of tests/test_random_inputs.py the uncorrected mean was off by up to 28
        # ``eps * |mean|``, the corrected one by 1.1 ``eps * mean(|x|)``.
        x = x3.astype(np.float64)
        first = x.mean(axis=_REDUCE)
        deviation = x - _per_channel(first)
        n = x.shape[0] * x.shape[2]  # values per channel
        sum_dev = deviation.sum(axis=_REDUCE)
        m2 = np.square(deviation).sum(axis=_REDUCE)
        with np.errstate(invalid="ignore", divide="ignore"):  # n == 0: NaN mean, as before
            # An infinite first mean is the mean (its deviations are inf - inf = NaN).
            mean = np.where(np.isfinite(first), first + sum_dev / n, first)
            # >= 0 mathematically; rounding could take a constant channel below 0.
            return mean, np.maximum(m2 - sum_dev * sum_dev / n, 0.0)

    def grad_sums(self, dy3, x3, mean):
        dy = dy3.astype(np.float64)
        xmu = x3.astype(np.float64) - _per_channel(mean.astype(np.float64))
        return dy.sum(axis=_REDUCE), (dy * xmu).sum(axis=_REDUCE)

    def normalize(self, x3, mean, invstd, weight, bias, out3):
        scale = invstd.astype(np.float64)
        if weight is not None:
            scale = scale * weight
        y = x3.astype(np.float64)
        if mean is not None:
            y = y - _per_channel(mean.astype(np.float64))
        y = y * _per_channel(scale)
        if bias is not None:
            y = y + _per_channel(bias.astype(np.float64))
        out3[...] = y

    def input_grad(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xmu, out3):
        n = x3.shape[0] * x3.shape[2]
        invstd = invstd.astype(np.float64)
        scale = invstd if weight is None else invstd * weight
        xmu = x3.astype(np.float64) - _per_channel(mean.astype(np.float64))
        dx = dy3.astype(np.float64) - _per_channel(sum_dy / n)
        dx -= xmu * _per_channel(invstd**2 * sum_dy_xmu / n)
        out3[...] = dx * _per_channel(scale)
