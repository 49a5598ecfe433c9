"""A loopback backend: NumPy kernels for a marker array type, counting every kernel call.

It exists so the dispatch machinery (discovery, auto-selection by array type, precedence) is
tested on a plain CPU machine, as networkx does with its loopback backend.
"""

from collections import Counter

import numpy as np

from batchnorm import Backend


class LoopbackArray(np.ndarray):
    """The array type only this backend accepts."""


def _sum(a):
    return a.astype(np.float64).sum(axis=(0, 2))


class LoopbackBackend(Backend):
    name = "loopback"
    priority = 100
    calls: Counter = Counter()

    def accepts(self, array):
        return isinstance(array, LoopbackArray)

    def from_host(self, array):
        return np.array(array, copy=True).view(LoopbackArray)

    def channel_stats(self, x3):
        self.calls["channel_stats"] += 1
        n = x3.shape[0] * x3.shape[2]
        mean = _sum(x3) / n
        return mean, _sum((x3 - mean.reshape(1, -1, 1)) ** 2)

    def grad_sums(self, dy3, x3, mean):
        self.calls["grad_sums"] += 1
        return _sum(dy3), _sum(dy3 * (x3 - mean.reshape(1, -1, 1)))

    def normalize(self, x3, mean, invstd, weight, bias, out3):
        self.calls["normalize"] += 1
        c = (1, -1, 1)
        scale = invstd if weight is None else invstd * weight
        y = x3 if mean is None else x3 - mean.reshape(c)
        out3[...] = y * scale.reshape(c) + (0 if bias is None else bias.reshape(c))

    def input_grad(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xmu, out3):
        self.calls["input_grad"] += 1
        n, c = x3.shape[0] * x3.shape[2], (1, -1, 1)
        scale = invstd if weight is None else invstd * weight
        xmu = x3 - mean.reshape(c)
        dx = dy3 - (sum_dy / n).reshape(c) - xmu * (invstd**2 * sum_dy_xmu / n).reshape(c)
        out3[...] = dx * scale.reshape(c)
