"""Viewing an N-D array with a channel axis as a 3-D ``(outer, C, inner)`` array, without copying.

Batch norm reduces over every axis but the channel axis, and its elementwise passes do not
care about the order of the others, so the non-channel axes may be permuted freely. They are
sorted by stride (largest first), split into the axes "outside" the channel axis and those
"inside" it, and each group is merged into one axis when its strides allow. NCHW becomes
``(N, C, H*W)``; NHWC with ``axis=-1`` becomes ``(N*H*W, C, 1)``; a Fortran-ordered NCHW
becomes ``(W*H, C, N)``; all of them views.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    """Which axes of the N-D array form the outer and inner axes of the 3-D view."""

    axis: int
    outer: tuple[int, ...]
    inner: tuple[int, ...]

    def view(self, backend: Any, array: Any) -> Any | None:
        """The 3-D view of a native array through ``backend``, or None if it needs a copy."""
        geometry = view_geometry(self, tuple(array.shape), tuple(array.strides))
        if geometry is None:
            return None
        return backend.strided_view(array, *geometry)


@functools.lru_cache(maxsize=256)
def view_geometry(layout: Layout, shape, strides):
    """``(shape3, strides3)`` of the view, or None when a group of axes cannot merge."""
    merged = []
    for group in (layout.outer, layout.inner):
        stride = _merged_stride([(shape[a], strides[a]) for a in group])
        if stride is None:
            return None
        merged.append(stride)
    shape3 = (
        math.prod(shape[a] for a in layout.outer),
        shape[layout.axis],
        math.prod(shape[a] for a in layout.inner),
    )
    return shape3, (merged[0], strides[layout.axis], merged[1])


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


@functools.lru_cache(maxsize=256)  # asked on every call's views: 0.1 us cached, 0.45 not
def is_c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """Whether these byte strides are C order (axes of length 1 may have any stride)."""
    expected = itemsize
    for n, stride in zip(reversed(shape), reversed(strides)):
        if n != 1 and stride != expected:
            return False
        expected *= n
    return True


@functools.lru_cache(maxsize=256)
def plan_layout(shape: tuple[int, ...], strides: tuple[int, ...], axis: int) -> Layout:
    """Group the non-channel axes by memory order: those outside the channel axis, then inside.

    The plan always merges for a compact array (any memory order); for other strides
    :meth:`Layout.view` may return None, and the caller copies into a compact array.
    """
    if strides[-1] > 0 and is_c_contiguous(shape, strides, strides[-1]):
        return Layout(axis, tuple(range(axis)), tuple(range(axis + 1, len(shape))))  # common
    others = sorted(
        (a for a in range(len(shape)) if a != axis), key=lambda a: (-abs(strides[a]), a)
    )
    channel_stride = abs(strides[axis]) if shape[axis] != 1 else 0
    split = sum(1 for a in others if abs(strides[a]) > channel_stride)
    return Layout(axis, tuple(others[:split]), tuple(others[split:]))


@functools.lru_cache(maxsize=256)
def plan_view(shape: tuple[int, ...], strides: tuple[int, ...], axis: int):
    """``(layout, geometry)`` of an array: its plan, and its own view's ``(shape3, strides3)``
    (None when it needs a copy). One cached call instead of two on every call's x."""
    layout = plan_layout(shape, strides, axis)
    return layout, view_geometry(layout, shape, strides)
