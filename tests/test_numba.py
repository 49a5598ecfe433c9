"""Tests specific to the ``numba`` backend: its parallel paths, determinism, fork and threads.

The shared conformance suite checks the results on small and oddly strided inputs; these
take the parallel paths (shapes above the serial threshold, both layouts, one channel per
task or tiles merged across tasks) and the process/thread situations of the issue.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import batchnorm as bn
from batchnorm._dispatch import registry
from batchnorm.testing import assert_close

batchnorm_numba = pytest.importorskip("batchnorm_numba")
from batchnorm_numba import _config  # noqa: E402

pytestmark = pytest.mark.skipif(
    "numba" not in bn.available_backends(), reason="the numba backend is not available"
)

# (shape, axis, path): big enough for the parallel kernels, both layouts, C = 1, 3, 1024.
PARALLEL_CASES = [
    ((4, 1, 70_000), 1, "channels-first, C=1, rows split in chunks"),
    ((16, 3, 48, 48), 1, "channels-first, C=3, tiles merged across tasks"),
    ((8, 1024, 40), 1, "channels-first, C=1024, one channel per task"),
    ((40, 64, 56), 1, "channels-first, C=64, one channel per task"),
    ((70_000, 1), 1, "one channel, L=1: one long row"),
    ((20_000, 3), 1, "channels-last, C=3"),
    ((96, 1024), -1, "channels-last, C=1024"),
    ((12, 30, 30, 64), -1, "channels-last NHWC, C=64"),
    ((60, 5000), 1, "channels-last, C=5000: several column blocks"),
]


def _data(shape, dtype, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2.0 + offset).astype(dtype)


def _train_step(x, axis, backend, seed=1):
    """forward (training, running stats) and backward; every result, as a tuple."""
    channels = x.shape[axis]
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(channels).astype(x.dtype)
    bias = rng.standard_normal(channels).astype(x.dtype)
    running_mean = np.zeros(channels, x.dtype)
    running_var = np.ones(channels, x.dtype)
    y, mean, invstd = bn.forward(
        x, weight, bias, running_mean, running_var, axis=axis, backend=backend
    )
    dy = _data(x.shape, x.dtype, seed=seed + 1)
    dx, dweight, dbias = bn.backward(dy, x, weight, mean, invstd, axis=axis, backend=backend)
    y_eval, _, _ = bn.forward(
        x, weight, bias, running_mean, running_var, training=False, axis=axis, backend=backend
    )
    return y, mean, invstd, running_mean, running_var, dx, dweight, dbias, y_eval


NAMES = "y mean invstd running_mean running_var dx dweight dbias y_eval".split()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axis", "path"), PARALLEL_CASES, ids=[c[2] for c in PARALLEL_CASES]
)
def test_parallel_paths_match_reference(shape, axis, path, dtype):
    x = _data(shape, dtype, offset=3.0)
    assert x.size >= _config.SERIAL_ELEMENTS, "the case must take the parallel kernels"
    actual = _train_step(x, axis, "numba")
    expected = _train_step(x, axis, "numpy")
    for name, a, e in zip(NAMES, actual, expected):
        assert_close(a, e, dtype, f"{name} ({path})")


def test_kernel_helpers_compile_once_per_argument_types():
    """A helper the kernels' loops call with their index compiles once, whether the loop ran
    in parallel or on the calling thread: a prange index is int64 while Numba infers types
    and uint64 once the loop is a parfor, so loops with a signed bound (or signed and
    unsigned indices mixed) compiled and cached a second copy of the helper, 10% of the
    cold compile. Run every path (parallel and serial, both layouts, both fused
    strategies), then look for signatures that differ only in int64 against uint64."""
    from batchnorm_numba import _kernels

    serial_cases = [((4, 8, 4, 4), 1), ((64, 16), 1), ((30, 3), 1), ((8, 1, 5), 1)]
    for shape, axis in [(shape, axis) for shape, axis, _ in PARALLEL_CASES] + serial_cases:
        x = _data(shape, np.float32, offset=3.0)
        _train_step(x, axis, "numba")
        bn.forward(x, axis=axis, backend="numba")  # no running statistics: their empty pair

    loop_helpers = (_kernels.col_partial_stats, _kernels.row_partial_stats)
    if not all(helper.signatures for helper in loop_helpers):
        pytest.skip(
            "the kernels came from Numba's on-disk cache, so their helpers were not compiled "
            "in this process (a fresh checkout, or an empty NUMBA_CACHE_DIR, compiles them)"
        )
    twins = {}
    for name, helper in vars(_kernels).items():
        by_types = {}
        for signature in getattr(helper, "signatures", ()):
            key = tuple("integer" if str(t) in ("int64", "uint64") else str(t) for t in signature)
            by_types.setdefault(key, []).append(signature)
        found = [group for group in by_types.values() if len(group) > 1]
        if found:
            twins[name] = found
    assert not twins


def test_one_tile_runs_on_the_calling_thread():
    """A channels-last batch of one tile (64 rows of 1024 features) skips the parallel
    launch, which costs more than it saves there; one row more makes two tiles, run in
    parallel. Both agree with the reference."""
    from batchnorm_numba import _is_parallel

    for rows, parallel in ((64, False), (65, True)):
        x = _data((rows, 1024), np.float32, offset=3.0)
        assert x.size >= _config.SERIAL_ELEMENTS
        assert _is_parallel(x) is parallel
        for name, a, e in zip(NAMES, _train_step(x, 1, "numba"), _train_step(x, 1, "numpy")):
            assert_close(a, e, np.float32, f"{name} ({rows} rows)")


def test_the_cases_cover_both_fused_strategies():
    """One-channel-per-task and merged-tiles paths are both among PARALLEL_CASES."""
    from batchnorm_numba import _input, _resident

    from batchnorm._layout import plan_layout

    backend = bn.get_backend("numba")
    resident = []
    for shape, axis, _ in PARALLEL_CASES:
        x = np.empty(shape, np.float32)
        x3 = plan_layout(x.shape, x.strides, axis % x.ndim).view(backend, x)
        resident.append(_resident(_input(x3), arrays=1))
    assert any(resident) and not all(resident)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_variance_of_offset_data_is_exact(dtype):
    """A large mean and a small spread: the trap of E[x^2] - E[x]^2 in float32."""
    rng = np.random.default_rng(3)
    x = (1000.0 + rng.standard_normal((64, 3, 32, 32))).astype(dtype)
    _, mean, invstd = bn.forward(x, eps=0.0, backend="numba")
    _, mean_ref, invstd_ref = bn.forward(x, eps=0.0, backend="numpy")
    assert_close(mean, mean_ref, dtype, "mean")
    assert_close(invstd, invstd_ref, dtype, "invstd")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("channels", [2, 3, 5, 7, 12, 15])
@pytest.mark.parametrize("rows", [1, 37, 1001, 40_000])
def test_few_channels_last_match_the_reference(dtype, channels, rows):
    """Channels-last with C < PERIODIC_COLUMNS sums each tile flat, a period of lcm(C, 16)
    values at a time: tiles of one row, of a partial period and of many (parallel) periods
    agree with the reference, offset data included."""
    from batchnorm_numba._kernels import PERIODIC_COLUMNS

    assert channels < PERIODIC_COLUMNS
    offset, scale = (100.0, 1.0) if dtype == np.float16 else (1e4, 0.01)
    spread = (_data((rows + 1, channels), np.float64, seed=rows) * scale + offset).astype(dtype)
    _, mean, invstd = bn.forward(spread, eps=1e-6, backend="numba")  # two equal values:
    _, mean_ref, invstd_ref = bn.forward(spread, eps=1e-6, backend="numpy")  # no inf
    assert_close(mean, mean_ref, dtype, "mean of offset data")
    assert_close(invstd, invstd_ref, dtype, "invstd of offset data")
    x = _data((rows + 1, channels), dtype, seed=rows, offset=1.0)
    for actual, expected, name in zip(
        _train_step(x, 1, "numba"), _train_step(x, 1, "numpy"), NAMES
    ):
        assert_close(actual, expected, dtype, name)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_compiled_per_channel_steps_match_the_default(dtype):
    """finish_stats and update_running_stats (compiled loops) against the protocol's NumPy ones."""
    backend = bn.get_backend("numba")
    mean = np.array([1.5, -2.0, 0.0, np.nan], dtype)
    m2 = np.array([4.0, -1e-3, 0.0, 1.0], dtype)  # a negative M2 clamps to a zero variance
    for actual, expected in zip(
        backend.finish_stats(mean, m2, 3, 1e-5, dtype),
        bn.Backend.finish_stats(backend, mean, m2, 3, 1e-5, dtype),
    ):
        assert actual.dtype == expected.dtype
        assert_close(actual, expected, dtype, "finish_stats")
    running = [np.array([0.5, 1.0, -1.0, 2.0], dtype), np.array([1.0, 2.0, 0.5, 1.0], dtype)]
    default = [r.copy() for r in running]
    backend.update_running_stats(*running, mean, m2, 10, 0.1)
    bn.Backend.update_running_stats(backend, *default, mean, m2, 10, 0.1)
    for actual, expected in zip(running, default):
        assert actual.dtype == expected.dtype
        assert_close(actual, expected, dtype, "update_running_stats")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("param_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    ("shape", "axis"), [((4, 6, 5, 5), 1), ((300, 7), 1), ((16, 3, 48, 48), 1), ((96, 5, 70), -1)]
)
def test_fused_eval_is_bit_identical_to_the_composed_steps(
    dtype, param_dtype, affine, shape, axis
):
    """forward_eval (one kernel) rounds as finish_stats then normalize do, in both layouts."""
    from batchnorm._layout import plan_layout

    backend = bn.get_backend("numba")
    rng = np.random.default_rng(5)
    channels = shape[axis]
    x = _data(shape, dtype)
    running_mean = rng.standard_normal(channels).astype(param_dtype)
    running_var = (rng.random(channels) * 3).astype(param_dtype)
    running_var[0] = -0.5  # clamps to a zero variance, as finish_stats does
    weight = rng.standard_normal(channels).astype(param_dtype) if affine else None
    bias = rng.standard_normal(channels).astype(param_dtype) if affine else None
    layout = plan_layout(x.shape, x.strides, axis % x.ndim)
    stat_dtype = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    results = []
    for forward_eval in (backend.forward_eval, bn.Backend.forward_eval.__get__(backend)):
        y = np.empty_like(x)
        mean, invstd = forward_eval(
            layout.view(backend, x),
            running_mean,
            running_var,
            weight,
            bias,
            1e-3,
            layout.view(backend, y),
            stat_dtype,
        )
        results.append((y, mean, invstd))
    for fused, composed in zip(*results):
        assert fused.dtype == composed.dtype
        assert fused.tobytes() == composed.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((8, 64, 14, 14), 1),  # memory-order tiles span channels and batch rows
        ((5, 7, 33), 1),
        ((4, 1, 9000), 1),  # one channel, rows split in pieces
        ((2, 3, 40, 70), 1),
        ((300, 7), 1),
        ((12, 30, 30, 64), -1),
    ],
)
def test_phase_kernels_match_the_reference(monkeypatch, dtype, shape, axis):
    """The two-phase kernels (channel_stats, normalize, grad_sums, input_grad), composed by
    the protocol's default forward_train and backward_train, agree with the NumPy
    reference; their elementwise passes store the same bits streamed or not."""
    from batchnorm._layout import plan_layout

    backend = bn.get_backend("numba")
    rng = np.random.default_rng(11)
    channels = shape[axis]
    x, dy = _data(shape, dtype, offset=1.0), _data(shape, dtype, seed=5)
    weight = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    layout = plan_layout(x.shape, x.strides, axis % x.ndim)
    stat_dtype = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    composed_forward = bn.Backend.forward_train.__get__(backend)
    composed_backward = bn.Backend.backward_train.__get__(backend)
    runs = []
    for stream_bytes in (1 << 62, 0):
        monkeypatch.setattr(_config, "STREAM_BYTES", stream_bytes)
        monkeypatch.setattr(_config, "STREAM_RUN_BYTES", 0)
        y, dx = np.empty_like(x), np.empty_like(x)
        mean, _, invstd = composed_forward(
            layout.view(backend, x), weight, bias, 1e-5, layout.view(backend, y), stat_dtype
        )
        sums = composed_backward(
            layout.view(backend, dy), layout.view(backend, x), mean, invstd, weight,
            layout.view(backend, dx),
        )  # fmt: skip
        dweight, dbias = backend.param_grads(*sums, invstd, weight.dtype, bias.dtype)
        runs.append((y, mean, invstd, dx, dweight, dbias))
    y_ref, mean_ref, invstd_ref = bn.forward(x, weight, bias, axis=axis, backend="numpy")
    dx_ref, dweight_ref, dbias_ref = bn.backward(
        dy, x, weight, mean_ref, invstd_ref, axis=axis, backend="numpy"
    )
    expected = (y_ref, mean_ref, invstd_ref, dx_ref, dweight_ref, dbias_ref)
    names = ("y", "mean", "invstd", "dx", "dweight", "dbias")
    for actual, reference, name in zip(runs[0], expected, names):
        assert_close(actual, reference, dtype, name)
    for plain, streamed in zip(*runs):
        assert plain.tobytes() == streamed.tobytes()


def _arrays_at(shape, dtype, gaps):
    """Arrays of ``shape`` carved from one buffer, each starting ``gaps[k]`` bytes past a
    4 KiB boundary."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(len(gaps) * (size + 8192), np.uint8)
    arrays = []
    for k, gap in enumerate(gaps):
        start = k * (size + 8192)
        start += (-(raw.ctypes.data + start)) % 4096 + gap
        arrays.append(np.frombuffer(raw.data, dtype, int(np.prod(shape)), start).reshape(shape))
    return arrays


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), [((8, 5, 300), 1), ((600, 37), 1), ((40, 1100), 1)])
@pytest.mark.parametrize(
    ("out_gap", "above"),
    [(32, "x"), (2048 + 64, "dy"), (1024, None), (4096 - 32, None)],
    ids=["just-above-x", "just-above-dy", "apart", "just-below-x"],
)
def test_streamed_runs_taken_last_to_first_store_the_same_bits(
    monkeypatch, dtype, shape, axis, out_gap, above
):
    """A streamed run whose output starts just above an input modulo 4 KiB (4K aliasing:
    arrays of one size allocated one after another) is taken last to first; its bits are
    those of plain stores, in forward (both modes) and backward."""
    from batchnorm_numba import _kernels

    x, dy, out = _arrays_at(shape, dtype, [0, 2048, out_gap])
    x[...], dy[...] = _data(shape, dtype), _data(shape, dtype, seed=1)
    assert bool(_kernels.just_above(out, x)) == (above == "x")
    assert bool(_kernels.just_above(out, dy)) == (above == "dy")
    channels = shape[axis]
    w, b = np.linspace(0.5, 1.5, channels, dtype=dtype), np.linspace(-1, 1, channels)
    results = {}
    for stream_bytes in (1 << 62, 0):
        monkeypatch.setattr(_config, "STREAM_BYTES", stream_bytes)
        monkeypatch.setattr(_config, "STREAM_RUN_BYTES", 0)
        got = []
        for training in (True, False):
            rm, rv = np.zeros(channels, dtype), np.ones(channels, dtype)
            y, *stats = bn.forward(x, w, b, rm, rv, training=training, out=out, backend="numba")
            got += [y.copy(), *stats]
        mean, invstd = got[1:3]
        dx, *grads = bn.backward(dy, x, w, mean, invstd, out=out, backend="numba")
        got += [dx.copy(), *grads]
        results[stream_bytes] = got
    for plain, streamed in zip(results[1 << 62], results[0]):
        assert plain.tobytes() == streamed.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((4, 6, 5, 37), 1),
        ((16, 3, 48, 48), 1),
        ((300, 37), 1),
        ((2000, 3), 1),  # fewer channels than a vector holds
        ((96, 5, 7, 64), -1),
        ((70, 1100), 1),  # column blocks: streamed row by row
    ],
)
@pytest.mark.parametrize("misaligned", [0, 1, 2], ids=["aligned", "misaligned", "unaligned"])
def test_streaming_stores_are_bit_identical_to_plain_stores(
    monkeypatch, dtype, shape, axis, misaligned
):
    """Non-temporal stores (outputs of STREAM_BYTES and more: y, and dx of backward) change no
    bit of the results, whatever the output's alignment: runs start with plain stores up to a
    32-byte boundary."""
    rng = np.random.default_rng(8)
    channels = shape[axis]
    x = _data(shape, dtype)
    param = np.float64 if dtype == np.float64 else np.float32
    w, b = rng.uniform(0.5, 1.5, channels).astype(param), rng.standard_normal(channels)
    rm, rv = rng.standard_normal(channels).astype(param), rng.random(channels).astype(param)
    results = {}
    for stream_bytes in (1 << 62, 0):
        monkeypatch.setattr(_config, "STREAM_BYTES", stream_bytes)
        monkeypatch.setattr(_config, "STREAM_RUN_BYTES", 0)  # short rows streamed too
        outs = []
        for training in (True, False):
            # an output one element past an allocation (misaligned), or one byte past it
            # (unaligned: not even element-aligned, so it is never streamed)
            raw = np.zeros((x.size + 1) * x.itemsize, np.uint8)
            offset = (0, x.itemsize, 1)[misaligned]
            out = np.frombuffer(raw.data, x.dtype, x.size, offset).reshape(x.shape)
            stats = bn.forward(
                x, w, b.astype(param), rm.copy(), rv.copy(), training=training, axis=axis,
                out=out, backend="numba",
            )  # fmt: skip
            outs += [out, *stats]
        dy = _data(shape, dtype)[::-1].copy()
        mean, invstd = outs[2:4]  # of the training forward: outs = [out, y, mean, invstd, ...]
        outs += bn.backward(dy, x, w, mean, invstd, axis=axis, backend="numba")
        results[stream_bytes] = outs
    for plain, streamed in zip(results[1 << 62], results[0]):
        assert plain.tobytes() == streamed.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1000, 7), (301, 64), (96, 5, 7, 64), (70, 1100)])
def test_prefetching_is_bit_identical(monkeypatch, dtype, shape):
    """Prefetching in the channels-last statistics pass (inputs of PREFETCH_BYTES and more:
    a few KiB ahead, or the next tile of few channels) changes no bit, including the last
    tiles, whose prefetches would reach past the array and are clipped."""
    import batchnorm_numba
    from batchnorm_numba._kernels import PERIODIC_COLUMNS

    x = _data(shape, dtype, offset=3.0)
    results = {}
    for prefetch in (False, True):
        monkeypatch.setattr(_config, "PREFETCH_BYTES", 0 if prefetch else 1 << 62)
        monkeypatch.setattr(_config, "PREFETCH_TILE_BYTES", 1 << 62)
        monkeypatch.setattr(_config, "PREFETCH_ROW_BYTES", 1 << 62)
        monkeypatch.setattr(registry, "plans", {})  # a plan keeps the choice it was made with
        kernel_view = batchnorm_numba._input(x.reshape(-1, shape[-1], 1))
        C = kernel_view.shape[1]
        # float16 prefetches only tiles of few channels, summed flat
        prefetched = C <= _config.COLUMN_BLOCK and (dtype != np.float16 or C < PERIODIC_COLUMNS)
        assert (batchnorm_numba._prefetch(kernel_view) > 0) is (prefetch and prefetched)
        y, mean, invstd = bn.forward(x, axis=-1, backend="numba")
        stats = bn.get_backend("numba").channel_stats(x.reshape(-1, shape[-1], 1))
        results[prefetch] = (y, mean, invstd, *stats)
    for plain, prefetched in zip(results[False], results[True]):
        assert plain.tobytes() == prefetched.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1000, 7), (301, 64), (96, 5, 7, 64), (70, 1100)])
def test_gradient_sums_by_row_match_the_reference(monkeypatch, dtype, shape):
    """The channels-last gradient sums add one row at a time to their partial rows for inputs
    from memory (``_config.GRAD_ROW_BYTES``), four otherwise: both agree with the reference,
    through the fused backward and ``grad_sums``, for whole rows, and for C under
    PERIODIC_COLUMNS and column blocks, where the choice does not apply."""
    import batchnorm_numba

    x, dy = _data(shape, dtype, offset=3.0), _data(shape, dtype, seed=1)
    channels = shape[-1]
    w = np.linspace(0.5, 1.5, channels).astype(np.float32 if dtype == np.float16 else dtype)
    _, mean, invstd = bn.forward(x, axis=-1, backend="numpy")
    expected = bn.backward(dy, x, w, mean, invstd, axis=-1, backend="numpy")
    view = (-1, channels, 1)
    expected_sums = bn.get_backend("numpy").grad_sums(dy.reshape(view), x.reshape(view), mean)
    for by_row in (False, True):
        monkeypatch.setattr(_config, "PREFETCH_BYTES", 0 if by_row else 1 << 62)
        monkeypatch.setattr(_config, "GRAD_ROW_BYTES", 0)
        monkeypatch.setattr(registry, "plans", {})  # a plan keeps the choice it was made with
        kernel_view = batchnorm_numba._input(x.reshape(view))
        applies = by_row and channels <= _config.COLUMN_BLOCK  # not for column blocks
        assert batchnorm_numba._grad_by_row(kernel_view) is applies
        got = bn.backward(dy, x, w, mean, invstd, axis=-1, backend="numba")
        for name, g, e in zip(("dx", "dweight", "dbias"), got, expected):
            assert_close(g, e, dtype, f"{name}, by_row={by_row}")
        sums = bn.get_backend("numba").grad_sums(dy.reshape(view), x.reshape(view), mean)
        for name, g, e in zip(("sum_dy", "sum_dy_xmu"), sums, expected_sums):
            assert_close(g, e, np.float64 if dtype == np.float64 else np.float32, name)


# -- float16 conversions in the kernels --------------------------------------------------


def _kernel_conversions():
    """Jitted loops over the kernels' float16 element access (widen, store)."""
    from batchnorm_numba._kernels import store, widen
    from numba import njit

    @njit
    def widen_all(bits, out):
        for i in range(bits.size):
            out[i] = widen(bits[i])

    @njit
    def store_all(values, out):
        for i in range(values.size):
            store(out, i, values[i])

    return widen_all, store_all


def _same_bits_or_both_nan(actual, expected):
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    np.testing.assert_array_equal(np.signbit(actual), np.signbit(expected))
    assert actual[~nan].tobytes() == expected[~nan].tobytes()


def test_float16_to_float32_matches_numpy_for_every_bit_pattern():
    widen_all, _ = _kernel_conversions()
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = np.empty(bits.size, np.float32)
    widen_all(bits, widened)
    # NaN payloads may differ: the hardware conversion quiets signalling NaNs.
    _same_bits_or_both_nan(widened, bits.view(np.float16).astype(np.float32))


def test_float32_to_float16_rounds_like_numpy():
    """Round to nearest even at every tie, next to it, and on random bit patterns."""
    _, store_all = _kernel_conversions()
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)]
    with np.errstate(over="ignore"):  # above 65504 comes inf (its tie, 65520, is below)
        upper = np.nextafter(halves, np.inf).astype(np.float32)
    lower = halves.astype(np.float32)
    ties = lower + (upper - lower) / 2  # exact in float32: halves have 11 significant bits
    random_bits = np.random.default_rng(5).integers(0, 1 << 32, 1 << 20, dtype=np.uint64)
    values = np.concatenate(
        [
            lower,
            ties,
            np.nextafter(ties, np.inf),
            np.nextafter(ties, -np.inf),
            random_bits.astype(np.uint32).view(np.float32),
            np.array(
                [np.inf, -np.inf, np.nan, -np.nan, 65520.0, -65520.0, 1e-9, -1e-9], np.float32
            ),
        ]
    )
    stored = np.empty(values.size, np.uint16)
    store_all(values, stored)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    _same_bits_or_both_nan(stored.view(np.float16), expected)


# -- determinism across thread counts ------------------------------------------------------

_DETERMINISM_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import batchnorm as bn
    sys.path.insert(0, {tests!r})
    from test_numba import PARALLEL_CASES, _data, _train_step
    results = {{}}
    for i, (shape, axis, _) in enumerate(PARALLEL_CASES):
        for dtype in (np.float16, np.float32, np.float64):
            out = _train_step(_data(shape, dtype, offset=3.0), axis, "numba")
            for j, a in enumerate(out):
                results[f"{{i}}-{{np.dtype(dtype).name}}-{{j}}"] = a
    np.savez(sys.argv[1], **results)
""")


def _run_python(script, env_update, *args, timeout=600):
    env = {**os.environ, **env_update}
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_results_are_bit_identical_for_1_and_2_threads(tmp_path):
    # The parent compiles first, so the children load the kernels from Numba's cache.
    for shape, axis, _ in PARALLEL_CASES:
        for dtype in (np.float16, np.float32, np.float64):
            _train_step(_data(shape, dtype, offset=3.0), axis, "numba")
    script = _DETERMINISM_SCRIPT.format(tests=os.path.dirname(__file__))
    files = {}
    for threads in ("1", "2"):
        files[threads] = tmp_path / f"threads{threads}.npz"
        done = _run_python(script, {"NUMBA_NUM_THREADS": threads}, str(files[threads]))
        assert done.returncode == 0, done.stderr
    one, two = np.load(files["1"]), np.load(files["2"])
    assert sorted(one.files) == sorted(two.files) and one.files
    for key in one.files:
        assert one[key].tobytes() == two[key].tobytes(), f"result {key} differs"


# -- Numba's on-disk cache across processes --------------------------------------------------

_CACHE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import batchnorm as bn
    from batchnorm.testing import assert_close

    param_dtype = np.dtype(sys.argv[1])
    rng = np.random.default_rng(0)
    for shape, axis in (((6, 5), -1), ((2, 3, 5), 1)):  # the cols_ and the rows_ kernels
        x = rng.standard_normal(shape).astype(np.float32)
        channels = shape[axis]
        weight, bias = (rng.standard_normal(channels).astype(param_dtype) for _ in "wb")
        running = (rng.standard_normal(channels), rng.random(channels) + 0.5)
        running = tuple(r.astype(np.float32) for r in running)
        args = (x, weight, bias, *running)
        y = bn.forward(*args, training=False, axis=axis, backend="numba")[0]
        expected = bn.forward(*args, training=False, axis=axis, backend="numpy")[0]
        assert_close(y, expected, np.float32, f"forward-eval {{shape}}")
    print("ok")
""")


def test_cached_kernels_load_in_a_new_process(tmp_path):
    # A cache entry written by a process that compiled a kernel for new argument types while
    # it loaded the kernel's callees from the cache must load in the next process. Evaluation
    # once called the parallel normalize kernel from a plain compiled function; Numba's
    # entry for float64 weights, written after a float32 run had filled the cache, crashed
    # the next process that loaded it (a segmentation fault, exit code -11).
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    for step, param_dtype in enumerate(("float32", "float64", "float64")):
        done = _run_python(_CACHE_SCRIPT, env, param_dtype)
        assert done.returncode == 0 and "ok" in done.stdout, (
            f"run {step + 1} ({param_dtype} weights) ended with {done.returncode}: "
            f"{done.stderr[-2000:]}"
        )


def test_no_kernel_calls_a_parallel_kernel():
    # The static side of the test above: a compiled function that calls a parallel kernel
    # is what Numba's cache mishandled, so the parallel loops of each operation live in its
    # own kernel.
    import ast
    import inspect

    from batchnorm_numba import _kernels

    tree = ast.parse(inspect.getsource(_kernels))
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    parallel = {
        f.name for f in functions if any(ast.unparse(d) == "_kernel" for d in f.decorator_list)
    }
    callers = {
        (f.name, call.func.id)
        for f in functions
        for call in ast.walk(f)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id in parallel
    }
    assert not callers, f"functions calling parallel kernels: {sorted(callers)}"
    assert {"cols_forward_eval", "rows_forward_eval", "cols_normalize"} <= parallel


# -- fork and threads ----------------------------------------------------------------------

_FORK_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp
    import sys
    import numpy as np
    import numba
    import batchnorm as bn
    from batchnorm.testing import assert_close

    x = np.random.default_rng(0).standard_normal((32, 8, 64, 64)).astype(np.float32)
    y_parent, _, _ = bn.forward(x, backend="numba")  # starts Numba's threads

    def child(path):
        np.save(path, bn.forward(x, backend="numba")[0])

    proc = mp.get_context("fork").Process(target=child, args=(sys.argv[1],))
    proc.start()
    proc.join(300)
    assert proc.exitcode == 0, f"the forked child ended with {proc.exitcode}"
    assert_close(np.load(sys.argv[1]), y_parent, np.float32, "forked child")
    y_again, _, _ = bn.forward(x, backend="numba")  # the parent keeps working
    assert y_again.tobytes() == y_parent.tobytes()
    print("layer", numba.threading_layer())
""")


def _layers():
    """Threading layers to test: Numba's default, and each one explicitly."""
    layers = ["default"]
    for name, module in (("omp", "omppool"), ("workqueue", "workqueue"), ("tbb", "tbbpool")):
        try:
            __import__(f"numba.np.ufunc.{module}")
        except ImportError as exc:
            layers.append(
                pytest.param(
                    name,
                    marks=pytest.mark.skip(
                        reason=f"Numba's {name} threading layer is not available here: {exc}"
                    ),
                )
            )
        else:
            layers.append(name)
    return layers


@pytest.mark.parametrize("layer", _layers())
def test_fork_after_use_works_in_child_and_parent(layer, tmp_path):
    env = {} if layer == "default" else {"NUMBA_THREADING_LAYER": layer}
    done = _run_python(_FORK_SCRIPT, env, str(tmp_path / "child.npy"))
    assert done.returncode == 0, done.stdout + done.stderr
    if layer != "default":
        assert f"layer {layer}" in done.stdout


_THREADS_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_numba import check_concurrent_calls
    check_concurrent_calls()
""")


def check_concurrent_calls(threads=4, repeats=3):
    """Several Python threads call the backend at once; each gets its serial result."""
    inputs = [(_data((16, 4, 40, 40), np.float32, seed=i), 1) for i in range(threads)]
    inputs += [(_data((4000, 24), np.float32, seed=10 + i), 1) for i in range(threads)]
    expected = [_train_step(x, axis, "numba") for x, axis in inputs]
    failures = []

    def work(k):
        x, axis = inputs[k]
        for _ in range(repeats):
            got = _train_step(x, axis, "numba")
            if any(a.tobytes() != e.tobytes() for a, e in zip(got, expected[k])):
                failures.append(k)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not failures, f"threads {sorted(set(failures))} got wrong results"


def test_concurrent_python_threads_get_correct_results():
    check_concurrent_calls()


@pytest.mark.parametrize("layer", [p for p in _layers() if p != "default"])
def test_concurrent_python_threads_with_each_threading_layer(layer):
    script = _THREADS_SCRIPT.format(tests=os.path.dirname(__file__))
    done = _run_python(script, {"NUMBA_THREADING_LAYER": layer})
    assert done.returncode == 0, done.stdout + done.stderr
