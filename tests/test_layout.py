"""The (outer, C, inner) views the core hands to backends: views, not copies."""

from __future__ import annotations

import numpy as np
import pytest
from batchnorm_numpy import NumpyBackend

import batchnorm as bn
from batchnorm._layout import plan_layout


def view_of(a, axis):
    layout = plan_layout(a.shape, a.strides, axis % a.ndim)
    return layout.view(NumpyBackend(), a)


@pytest.mark.parametrize(
    "make,axis,shape3",
    [
        (lambda: np.zeros((2, 3, 4, 5)), 1, (2, 3, 20)),
        (lambda: np.zeros((2, 4, 5, 3)), -1, (40, 3, 1)),
        (lambda: np.zeros((8, 3)), 1, (8, 3, 1)),
        (lambda: np.asfortranarray(np.zeros((2, 3, 4, 5))), 1, (20, 3, 2)),
        (lambda: np.zeros((2, 4, 5, 3)).transpose(0, 3, 1, 2), 1, (40, 3, 1)),
        (lambda: np.zeros((4, 3, 5))[::2], 1, (2, 3, 5)),
        (lambda: np.zeros((4, 3, 5))[:, :, ::-1], 1, (4, 3, 5)),
        (lambda: np.zeros((3, 4, 5)), 2, (12, 5, 1)),
        (lambda: np.zeros((4, 3, 5)), 0, (1, 4, 15)),
    ],
)
def test_views_share_memory(make, axis, shape3):
    a = make()
    v = view_of(a, axis)
    assert v is not None and v.shape == shape3
    assert np.shares_memory(v, a)
    a[...] = np.random.default_rng(0).standard_normal(a.shape)
    for c in range(a.shape[axis]):  # channel c of the view holds exactly channel c of x
        np.testing.assert_array_equal(
            np.sort(v[:, c].ravel()), np.sort(np.take(a, c, axis).ravel())
        )


def test_unviewable_strides_are_reported():
    a = np.zeros((4, 3, 6, 5))[:, :, ::2, :]
    assert view_of(a, 1) is None


class RecordingBackend(NumpyBackend):
    name = "numpy"

    def channel_stats(self, x3):
        self.seen = x3
        return super().channel_stats(x3)


@pytest.mark.parametrize(
    "make",
    [lambda a: a, lambda a: np.asfortranarray(a), lambda a: a[::2]],
    ids=["C", "F", "sliced"],
)
def test_backend_receives_a_view_not_a_copy(monkeypatch, make):
    from batchnorm._dispatch import registry

    recorder = RecordingBackend()
    registry.names()
    monkeypatch.setitem(registry._loaded, "numpy", (recorder, None))
    monkeypatch.setattr(registry, "plans", {})  # plans made with the real numpy backend
    x = make(np.random.default_rng(0).standard_normal((4, 3, 5, 6)))
    bn.forward(x, backend="numpy")
    assert np.shares_memory(recorder.seen, x)
