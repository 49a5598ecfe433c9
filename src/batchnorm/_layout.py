"""Viewing an N-D array with a channel axis as a 3-D ``(outer, C, inner)`` array, without copying.

Batch norm reduces over every axis but the channel axis, and its elementwise passes do not
care about the order of the others, so the non-channel axes may be permuted freely. They are
sorted by stride (largest first), split into the axes "outside" the channel axis and those
"inside" it, and each group is merged into one axis when its strides allow. NCHW becomes
``(N, C, H*W)``; NHWC with ``axis=-1`` becomes ``(N*H*W, C, 1)``; a Fortran-ordered NCHW
becomes ``(W*H, C, N)``; all of them views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    """Which axes of the N-D array form the outer and inner axes of the 3-D view."""

    axis: int
    outer: tuple[int, ...]
    inner: tuple[int, ...]

    def shape3(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        return (
            math.prod(shape[a] for a in self.outer),
            shape[self.axis],
            math.prod(shape[a] for a in self.inner),
        )

    def strides3(self, shape, strides) -> tuple[int, int, int] | None:
        """Byte strides of the 3-D view of an array, or None when a group cannot merge."""
        merged = []
        for group in (self.outer, self.inner):
            stride = _merged_stride([(shape[a], strides[a]) for a in group])
            if stride is None:
                return None
            merged.append(stride)
        outer, inner = merged
        return (outer, strides[self.axis], inner)

    def view(self, backend: Any, array: Any) -> Any | None:
        """The 3-D view of a native array through ``backend``, or None if it needs a copy."""
        shape, strides = tuple(array.shape), tuple(array.strides)
        strides3 = self.strides3(shape, strides)
        if strides3 is None:
            return None
        return backend.strided_view(array, self.shape3(shape), strides3)


def _merged_stride(dims: list[tuple[int, int]]) -> int | None:
    """Stride of the single axis equivalent to ``dims`` (outermost first), or None.

    Axes of length 1 are ignored. An empty group gives stride 0, harmless for a length-1 axis.
    """
    dims = [(n, s) for n, s in dims if n != 1]
    if not dims:
        return 0
    for (_, outer_stride), (n, inner_stride) in zip(dims, dims[1:]):
        if outer_stride != n * inner_stride:
            return None
    return dims[-1][1]


def c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Byte strides of a C-contiguous array of ``shape``."""
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def plan_layout(shape: tuple[int, ...], strides: tuple[int, ...], axis: int) -> Layout:
    """Group the non-channel axes by memory order: those outside the channel axis, then inside.

    The plan always merges for a compact array (any memory order); for other strides
    :meth:`Layout.view` may return None, and the caller copies into a compact array.
    """
    if len(shape) and strides[-1] > 0 and tuple(strides) == c_strides(shape, strides[-1]):
        return Layout(axis, tuple(range(axis)), tuple(range(axis + 1, len(shape))))  # common
    others = sorted(
        (a for a in range(len(shape)) if a != axis), key=lambda a: (-abs(strides[a]), a)
    )
    channel_stride = abs(strides[axis]) if shape[axis] != 1 else 0
    split = sum(1 for a in others if abs(strides[a]) > channel_stride)
    return Layout(axis, tuple(others[:split]), tuple(others[split:]))
