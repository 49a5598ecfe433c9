"""The shared conformance suite: every backend against the float64 NumPy reference.

Each test takes the `backend` fixture (tests/conftest.py) and compares with
``backend="numpy"`` on the same inputs, within batchnorm.testing's per-dtype tolerances.
The reference itself is pinned by the finite-difference check and the hand-derived cases at
the end of this file (and by tests/test_torch_semantics.py against PyTorch).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm.testing import assert_close

DTYPES = [np.float16, np.float32, np.float64]

# (shape, channel axis): 2-D to 6-D, channels-first, channels-last, a middle axis, axis 0.
SHAPES = [
    ((8, 3), 1),
    ((4, 3, 5), 1),
    ((2, 3, 4, 5), 1),
    ((2, 3, 2, 3, 4), 1),
    ((2, 2, 3, 1, 2, 2), 1),
    ((2, 4, 3, 5), -1),
    ((3, 4, 5), 2),
    ((4, 3, 5), 0),
    ((2, 1, 3), 1),  # C = 1
    ((2, 5), 1),  # N*L = 2 per channel
]


def param_dtype(dtype):
    """Parameters and running stats: float32 for float16 input (mixed precision)."""
    return np.float32 if dtype == np.float16 else dtype


def make_inputs(shape, axis, dtype, seed=0, affine=True):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    pd = param_dtype(dtype)
    return {
        "x": (rng.standard_normal(shape) * 2 + 0.5).astype(dtype),
        "dy": rng.standard_normal(shape).astype(dtype),
        "weight": rng.uniform(0.5, 1.5, c).astype(pd) if affine else None,
        "bias": rng.standard_normal(c).astype(pd) if affine else None,
        "running_mean": rng.standard_normal(c).astype(pd),
        "running_var": rng.uniform(0.5, 2.0, c).astype(pd),
    }


def run_forward(case, inp, *, training, axis, backend_name=None, **kwargs):
    """forward() on `case`'s arrays; returns host results and host running stats."""
    put = case.put if case is not None else (lambda a: None if a is None else a.copy())
    get = case.get if case is not None else (lambda a: a)
    rm, rv = put(inp["running_mean"]), put(inp["running_var"])
    y, mean, invstd = bn.forward(
        put(inp["x"]),
        put(inp["weight"]),
        put(inp["bias"]),
        rm,
        rv,
        training=training,
        axis=axis,
        backend=backend_name or case.name,
        **kwargs,
    )
    return get(y), get(mean), get(invstd), get(rm), get(rv)


def reference_forward(inp, **kwargs):
    return run_forward(None, inp, backend_name="numpy", **kwargs)


def assert_forward_matches(backend, inp, *, training, axis, **kwargs):
    dtype = inp["x"].dtype
    got = run_forward(backend, inp, training=training, axis=axis, **kwargs)
    want = reference_forward(inp, training=training, axis=axis, **kwargs)
    for name, g, w in zip(("y", "mean", "invstd", "running_mean", "running_var"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close(g, w, dtype, name)


def assert_backward_matches(backend, inp, *, training, axis):
    dtype = inp["x"].dtype
    x, w = inp["x"], inp["weight"]
    _, mean, invstd, _, _ = reference_forward(inp, training=training, axis=axis)
    want = bn.backward(
        inp["dy"], x, w, mean, invstd, training=training, axis=axis, backend="numpy"
    )
    got = bn.backward(
        backend.put(inp["dy"]),
        backend.put(x),
        backend.put(w),
        backend.put(mean),
        backend.put(invstd),
        training=training,
        axis=axis,
        backend=backend.name,
    )
    for name, g, e in zip(("dx", "dweight", "dbias"), got, want):
        if e is None:
            assert g is None, name
            continue
        g = backend.get(g)
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert_close(g, e, dtype, name)


# -- forward and backward over shapes, axes, dtypes, affine --------------------------
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward(backend, training, shape, axis, dtype, affine):
    inp = make_inputs(shape, axis, dtype, affine=affine)
    assert_forward_matches(backend, inp, training=training, axis=axis, momentum=0.3)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward(backend, training, shape, axis, dtype, affine):
    inp = make_inputs(shape, axis, dtype, affine=affine)
    assert_backward_matches(backend, inp, training=training, axis=axis)


def large_shape(backend, channels_last):
    """Big enough to take a backend's parallel paths (tiny under the CUDA simulator)."""
    shape = (2, 3, 64) if backend.simulated else (16, 3, 128 * 128)
    return (shape[0] * shape[2], shape[1]) if channels_last else shape


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCL", "NC"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_large(backend, channels_last, dtype):
    shape = large_shape(backend, channels_last)
    inp = make_inputs(shape, 1, dtype, seed=3)
    assert_forward_matches(backend, inp, training=True, axis=1)
    assert_forward_matches(backend, inp, training=False, axis=1)
    assert_backward_matches(backend, inp, training=True, axis=1)


# -- memory layouts --------------------------------------------------------------------
# name -> (base shape, view). Views use basic slicing only, so they apply to every array type
# (no Ellipsis: Numba's CUDA device arrays refuse it, though its simulator accepts it).
SLICED_VIEWS = {
    "batch_step": ((8, 3, 5, 6), lambda a: a[::2]),
    "inner_step": ((4, 3, 5, 12), lambda a: a[:, :, :, ::3]),
    "middle_step": ((4, 3, 6, 5), lambda a: a[:, :, ::2, :]),  # no 3-D view: copied once
    "channel_step": ((4, 6, 5), lambda a: a[:, ::2]),
    "reversed": ((4, 3, 5), lambda a: a[:, :, ::-1]),
    "offset": ((5, 4, 7), lambda a: a[1:, 1:, 2:]),
}


@pytest.mark.parametrize("view", sorted(SLICED_VIEWS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_sliced_inputs(backend, view, dtype):
    base_shape, take = SLICED_VIEWS[view]
    rng = np.random.default_rng(1)
    x_base = rng.standard_normal(base_shape).astype(dtype)
    dy_base = rng.standard_normal(base_shape).astype(dtype)
    x_host, dy_host = take(x_base), take(dy_base)
    c = x_host.shape[1]
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    x_base_dev = backend.put(x_base)
    x_dev, dy_dev = take(x_base_dev), take(backend.put(dy_base))

    y, mean, invstd = bn.forward(x_dev, backend.put(w), backend.put(b), backend=backend.name)
    y_ref, mean_ref, invstd_ref = bn.forward(np.ascontiguousarray(x_host), w, b, backend="numpy")
    assert_close(backend.get(y), y_ref, dtype, "y")
    assert_close(backend.get(invstd), invstd_ref, dtype, "invstd")
    dx, dw, db = bn.backward(dy_dev, x_dev, backend.put(w), mean, invstd, backend=backend.name)
    dx_ref, dw_ref, db_ref = bn.backward(
        np.ascontiguousarray(dy_host),
        np.ascontiguousarray(x_host),
        w,
        mean_ref,
        invstd_ref,
        backend="numpy",
    )
    assert_close(backend.get(dx), dx_ref, dtype, "dx")
    assert_close(backend.get(dw), dw_ref, dtype, "dweight")
    assert_close(backend.get(db), db_ref, dtype, "dbias")
    np.testing.assert_array_equal(backend.get(x_base_dev), x_base)  # input untouched


@pytest.mark.parametrize("layout", ["fortran", "nhwc_memory_as_nchw"])
def test_strided_layouts(backend, layout):
    """Fortran order and a transposed NHWC buffer, both handed over as NCHW views."""
    rng = np.random.default_rng(2)
    if layout == "fortran":
        host = np.asfortranarray(rng.standard_normal((4, 3, 5, 6)).astype(np.float32))
    else:
        host = rng.standard_normal((4, 5, 6, 3)).astype(np.float32).transpose(0, 3, 1, 2)
    base = backend.put(np.ascontiguousarray(host.transpose(np.argsort(host.strides)[::-1])))
    dev = backend.backend.strided_view(backend.backend.as_native(base), host.shape, host.strides)
    dev = backend.backend.to_user(dev, base)
    y, mean, invstd = bn.forward(dev, backend=backend.name)
    y_ref, mean_ref, invstd_ref = bn.forward(np.ascontiguousarray(host), backend="numpy")
    assert_close(backend.get(y), y_ref, np.float32, "y")
    assert_close(backend.get(invstd), invstd_ref, np.float32, "invstd")
    # dy laid out differently again, with no 3-D view at all: copied to x's layout
    dy_base = rng.standard_normal((4, 3, 10, 6)).astype(np.float32)
    dy = backend.put(dy_base)[:, :, ::2, :]
    dx, _, _ = bn.backward(dy, dev, None, mean, invstd, backend=backend.name)
    dx_ref, _, _ = bn.backward(
        np.ascontiguousarray(dy_base[:, :, ::2, :]),
        np.ascontiguousarray(host),
        None,
        mean_ref,
        invstd_ref,
        backend="numpy",
    )
    assert_close(backend.get(dx), dx_ref, np.float32, "dx")


def test_empty_batch_in_evaluation(backend):
    x = backend.put(np.zeros((0, 3, 4), np.float32))
    stats = backend.put(np.ones(3, np.float32))
    y, mean, invstd = bn.forward(
        x, running_mean=stats, running_var=stats, training=False, backend=backend.name
    )
    assert tuple(y.shape) == (0, 3, 4)
    np.testing.assert_allclose(backend.get(mean), 1.0)


def test_out_argument(backend):
    inp = make_inputs((4, 3, 5), 1, np.float32)
    out = backend.put(np.full_like(inp["x"], np.nan))
    x = backend.put(inp["x"])
    y, _, _ = bn.forward(x, out=out, backend=backend.name)
    assert y is out
    y_ref, mean, invstd = bn.forward(inp["x"], backend="numpy")
    assert_close(backend.get(out), y_ref, np.float32, "out")
    dx_out = backend.put(np.full_like(inp["x"], np.nan))
    dx, _, _ = bn.backward(
        backend.put(inp["dy"]),
        x,
        None,
        backend.put(mean),
        backend.put(invstd),
        out=dx_out,
        backend=backend.name,
    )
    assert dx is dx_out
    dx_ref, _, _ = bn.backward(inp["dy"], inp["x"], None, mean, invstd, backend="numpy")
    assert_close(backend.get(dx_out), dx_ref, np.float32, "dx out")


def test_inputs_not_modified(backend):
    inp = make_inputs((4, 3, 5), 1, np.float32)
    dev = {k: backend.put(v) for k, v in inp.items()}
    y, mean, invstd = bn.forward(dev["x"], dev["weight"], dev["bias"], backend=backend.name)
    bn.backward(dev["dy"], dev["x"], dev["weight"], mean, invstd, backend=backend.name)
    for k, v in inp.items():
        np.testing.assert_array_equal(backend.get(dev[k]), v, err_msg=k)


def test_result_types(backend):
    x = backend.put(np.ones((4, 3), np.float16) + np.arange(3, dtype=np.float16))
    x[0] = backend.put(np.zeros(3, np.float16))
    y, mean, invstd = bn.forward(x, backend=backend.name)
    assert type(y) is type(x) and type(mean) is type(x)
    assert y.dtype == np.float16 and mean.dtype == np.float32 and invstd.dtype == np.float32
    x64 = backend.put(np.arange(8.0).reshape(4, 2))
    _, mean, invstd = bn.forward(x64, backend=backend.name)
    assert mean.dtype == np.float64 and invstd.dtype == np.float64


def test_update_running_stats(backend):
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        rm, rv = rng.standard_normal(5).astype(dtype), rng.uniform(1, 2, 5).astype(dtype)
        bm, bv = rng.standard_normal(5).astype(dtype), rng.uniform(1, 2, 5).astype(dtype)
        rm_dev, rv_dev = backend.put(rm), backend.put(rv)
        bn.update_running_stats(
            rm_dev, rv_dev, backend.put(bm), backend.put(bv), 10, 0.25, backend=backend.name
        )
        assert_close(backend.get(rm_dev), 0.75 * rm + 0.25 * bm, dtype, "running_mean")
        assert_close(backend.get(rv_dev), 0.75 * rv + 0.25 * bv * 10 / 9, dtype, "running_var")
        assert backend.get(rm_dev).dtype == dtype


# -- numerics: the known traps ---------------------------------------------------------
def test_large_mean_small_std_float32(backend):
    """mean 1e4, std 1e-2: E[x^2] - E[x]^2 loses every digit here; two-pass/Welford does not."""
    n = 64 if backend.simulated else 4096
    rng = np.random.default_rng(5)
    x = (1e4 + 1e-2 * rng.standard_normal((n, 2))).astype(np.float32)
    exact = x.astype(np.float64)
    y, mean, invstd = bn.forward(backend.put(x), eps=0.0, backend=backend.name)
    np.testing.assert_allclose(backend.get(mean), exact.mean(0), rtol=1e-7)
    np.testing.assert_allclose(backend.get(invstd), 1 / exact.std(0), rtol=1e-3)
    y = backend.get(y).astype(np.float64)
    np.testing.assert_allclose(y.std(0), 1.0, rtol=1e-2)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=0.05)


@pytest.mark.parametrize("axis", [1, -1], ids=["NCL", "NC"])
def test_y_is_normalized_with_the_unrounded_mean(backend, axis, large_mean_case):
    """float32 values near 1e4 with a spread of 1: the mean rounded to float32 is off by up
    to 5e-4 of a standard deviation, and y must not inherit that, in training (the batch
    mean) or in evaluation (a float64 running mean)."""
    if backend.simulated:
        shape = (4, 16, 8) if axis == 1 else (32, 16)
    else:  # large enough for the numba backend's parallel paths
        shape = (32, 16, 2048) if axis == 1 else (65536, 16)
    x, w, b, running, check = large_mean_case(shape, axis)
    y, _, _ = bn.forward(*map(backend.put, (x, w, b)), axis=axis, backend=backend.name)
    y_eval, _, _ = bn.forward(
        *map(backend.put, (x, w, b, *running)), training=False, axis=axis, backend=backend.name
    )
    check(backend.get(y), "training")
    check(backend.get(y_eval), "evaluation")


# NumPy warns of inf - inf; the CUDA simulator's kernel threads are Python threads, which
# the test's np.errstate (thread-local) does not reach.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_values_propagate_as_in_the_reference(backend):
    """+inf in one channel and NaN in another (training), infinite and huge running means,
    one beyond float32's range (evaluation, float64 running statistics with float32 data):
    inf and NaN come out where the reference has them, and the finite values match it."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((64, 5)).astype(np.float32)
    x[5, 0], x[7, 1] = np.inf, np.nan
    # 1e300 has no float32 value: y is -inf, as (x - 1e300) * invstd rounded to float32.
    running_mean, running_var = np.array([np.inf, 0.0, 1e30, -np.inf, 1e300]), np.ones(5)
    for training in (True, False):
        running = () if training else (running_mean, running_var)
        with np.errstate(invalid="ignore"):  # inf - inf in NumPy (the reference) warns
            want = bn.forward(x, None, None, *running, training=training, backend="numpy")
            got = bn.forward(
                backend.put(x),
                None,
                None,
                *map(backend.put, running),
                training=training,
                backend=backend.name,
            )
        for name, g, w in zip(("y", "mean", "invstd"), got, want):
            g, what = backend.get(g), f"{name}, training={training}"
            if name == "mean":  # Welford's and Chan's updates (cuda, cupy, numba) meet inf - inf
                infinite = np.isinf(w)
                assert np.all((g[infinite] == w[infinite]) | np.isnan(g[infinite])), what
                g, w = g[~infinite], w[~infinite]
            for kind in (np.isnan, np.isposinf, np.isneginf):
                np.testing.assert_array_equal(kind(g), kind(w), f"{what}: {kind.__name__}")
            finite = np.isfinite(w)
            assert_close(g[finite], w[finite], np.float32, what)


def test_constant_channel(backend):
    x = np.ones((6, 3), np.float32) * np.array([2.5, -7.0, 0.0], np.float32)
    b = np.array([0.25, 0.5, -1.0], np.float32)
    y, mean, invstd = bn.forward(
        backend.put(x), None, backend.put(b), eps=1e-5, backend=backend.name
    )
    np.testing.assert_array_equal(backend.get(y), np.broadcast_to(b, x.shape))
    np.testing.assert_allclose(backend.get(invstd), 1 / np.sqrt(np.float32(1e-5)), rtol=1e-6)
    dx, _, _ = bn.backward(
        backend.put(np.ones_like(x)), backend.put(x), None, mean, invstd, backend=backend.name
    )
    np.testing.assert_allclose(backend.get(dx), 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "scale,dtype",
    [(1e15, np.float32), (1e-15, np.float32), (1e150, np.float64), (1e-150, np.float64)],
    ids=["huge32", "tiny32", "huge64", "tiny64"],
)
def test_extreme_magnitudes(backend, scale, dtype):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((16, 3)) * scale).astype(dtype)
    y, mean, invstd = bn.forward(backend.put(x), eps=0.0, backend=backend.name)
    y_ref, _, invstd_ref = bn.forward(x, eps=0.0, backend="numpy")
    assert np.all(np.isfinite(backend.get(y)))
    assert_close(backend.get(y), y_ref, dtype, "y")
    np.testing.assert_allclose(backend.get(invstd), invstd_ref, rtol=1e-5)


def test_finite_difference_gradient(backend):
    """float64 central differences of L = sum(y * g) against backward()."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 2, 2))
    w, b = rng.uniform(0.5, 1.5, 2), rng.standard_normal(2)
    g = rng.standard_normal(x.shape)

    def loss(x_, w_, b_):
        y, _, _ = bn.forward(
            backend.put(x_), backend.put(w_), backend.put(b_), backend=backend.name
        )
        return float(np.sum(backend.get(y) * g))

    def numeric(f, a, h=1e-6):
        grad = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            up, down = a.copy(), a.copy()
            up[i] += h
            down[i] -= h
            grad[i] = (f(up) - f(down)) / (2 * h)
        return grad

    _, mean, invstd = bn.forward(
        backend.put(x), backend.put(w), backend.put(b), backend=backend.name
    )
    dx, dw, db = bn.backward(
        backend.put(g), backend.put(x), backend.put(w), mean, invstd, backend=backend.name
    )
    np.testing.assert_allclose(backend.get(dx), numeric(lambda a: loss(a, w, b), x), atol=1e-6)
    np.testing.assert_allclose(backend.get(dw), numeric(lambda a: loss(x, a, b), w), atol=1e-6)
    np.testing.assert_allclose(backend.get(db), numeric(lambda a: loss(x, w, a), b), atol=1e-6)


# -- property test: random shapes and axes -----------------------------------------------
@st.composite
def shapes_and_axes(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < 2:  # training needs 2 values per channel
        shape = (shape[0] + 1, *shape[1:]) if axis % ndim != 0 else (*shape[:-1], shape[-1] + 1)
    return shape, axis


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=shapes_and_axes(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property_random_shapes(backend, case, dtype, seed):
    shape, axis = case
    inp = make_inputs(shape, axis, dtype, seed=seed)
    assert_forward_matches(backend, inp, training=True, axis=axis)
    assert_backward_matches(backend, inp, training=True, axis=axis)


# -- bad input: clear exceptions, nothing modified ---------------------------------------
def _bad_forward_cases():
    f32 = np.float32
    return [
        ("weight", dict(weight=np.ones(4, f32)), ValueError),
        ("bias", dict(bias=np.ones((3, 1), f32)), ValueError),
        ("running_mean", dict(running_mean=np.ones(2, f32)), ValueError),
        ("running_var", dict(running_var=np.ones(4, f32)), ValueError),
        ("weight", dict(weight=np.ones(3, np.int32)), TypeError),
        ("eps", dict(eps=-1e-5), ValueError),
        ("momentum", dict(momentum=1.5), ValueError),
        ("momentum", dict(momentum=-0.1), ValueError),
        ("axis", dict(axis=3), ValueError),
        ("axis", dict(axis=-4), ValueError),
        ("x must have dtype", dict(x=np.ones((4, 3, 5), np.int64)), TypeError),
        ("x must have dtype", dict(x=np.ones((4, 3, 5), bool)), TypeError),
        ("x must have dtype", dict(x=np.ones((4, 3, 5), np.complex64)), TypeError),
        ("more than 1 value per channel", dict(x=np.ones((1, 3, 1), f32)), ValueError),
        ("requires running_mean", dict(training=False, running_var=None), ValueError),
        ("together", dict(running_var=None), ValueError),
        ("out", dict(out=np.empty((4, 3, 6), f32)), ValueError),
        ("out", dict(out=np.empty((4, 3, 5), np.float64)), TypeError),
    ]


@pytest.mark.parametrize(
    "match,change,exc", _bad_forward_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_bad_forward_input_leaves_state_untouched(backend, match, change, exc):
    rng = np.random.default_rng(8)
    args = {
        "x": rng.standard_normal((4, 3, 5)).astype(np.float32),
        "weight": np.ones(3, np.float32),
        "bias": np.zeros(3, np.float32),
        "running_mean": np.full(3, 0.5, np.float32),
        "running_var": np.full(3, 2.0, np.float32),
        "out": np.full((4, 3, 5), 7.0, np.float32),
    }
    args.update(change)
    dev = {k: backend.put(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    x = dev.pop("x")
    with pytest.raises(exc, match=match):
        bn.forward(x, backend=backend.name, **dev)
    for name in ("running_mean", "running_var", "out"):
        if isinstance(args[name], np.ndarray):
            np.testing.assert_array_equal(backend.get(dev[name]), args[name], err_msg=name)


def test_bad_backward_input(backend):
    x = backend.put(np.ones((4, 3), np.float32))
    stats = backend.put(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="dy"):
        bn.backward(
            backend.put(np.ones((4, 2), np.float32)), x, None, stats, stats, backend=backend.name
        )
    with pytest.raises(TypeError, match="dy"):
        bn.backward(backend.put(np.ones((4, 3))), x, None, stats, stats, backend=backend.name)
    with pytest.raises(ValueError, match="mean"):
        bn.backward(x, x, None, backend.put(np.ones(2, np.float32)), stats, backend=backend.name)
    with pytest.raises(ValueError, match="invstd"):
        bn.backward(x, x, None, stats, None, backend=backend.name)


def test_bad_update_running_stats_leaves_state_untouched(backend):
    rm, rv = backend.put(np.zeros(3)), backend.put(np.ones(3))
    good = backend.put(np.ones(3))
    with pytest.raises(ValueError, match="count"):
        bn.update_running_stats(rm, rv, good, good, 1, backend=backend.name)
    with pytest.raises(ValueError, match="momentum"):
        bn.update_running_stats(rm, rv, good, good, 5, momentum=2.0, backend=backend.name)
    with pytest.raises(ValueError, match="batch_var"):
        bn.update_running_stats(rm, rv, good, backend.put(np.ones(4)), 5, backend=backend.name)
    np.testing.assert_array_equal(backend.get(rm), np.zeros(3))
    np.testing.assert_array_equal(backend.get(rv), np.ones(3))


# -- the reference itself, against hand-derived values ----------------------------------
def test_reference_hand_computed():
    x = np.array([[1.0, -2.0], [3.0, 2.0], [5.0, 6.0]])
    w, b = np.array([2.0, 0.5]), np.array([1.0, -1.0])
    rm, rv = np.zeros(2), np.ones(2)
    y, mean, invstd = bn.forward(x, w, b, rm, rv, eps=0.0, momentum=0.5, backend="numpy")
    # channel 0: mean 3, biased var 8/3; channel 1: mean 2, biased var 32/3
    np.testing.assert_allclose(mean, [3.0, 2.0])
    np.testing.assert_allclose(invstd, [np.sqrt(3 / 8), np.sqrt(3 / 32)])
    np.testing.assert_allclose(y[:, 0], 2 * (x[:, 0] - 3) * np.sqrt(3 / 8) + 1)
    np.testing.assert_allclose(rm, [1.5, 1.0])
    np.testing.assert_allclose(rv, [0.5 + 0.5 * 4.0, 0.5 + 0.5 * 16.0])  # unbiased: 4 and 16


def test_overlapping_buffers_are_rejected(backend):
    x = backend.put(np.arange(12.0, dtype=np.float32).reshape(4, 3))
    stats = backend.put(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="out must not overlap"):
        bn.forward(x, out=x, backend=backend.name)
    with pytest.raises(ValueError, match="must not overlap"):
        bn.forward(x, running_mean=stats, running_var=stats, backend=backend.name)
    np.testing.assert_array_equal(backend.get(stats), np.ones(3))
    np.testing.assert_array_equal(backend.get(x), np.arange(12.0).reshape(4, 3))


# -- plans: a signature's second call runs what its first call planned ------------------------
# (batchnorm._api: the checks and the backend's choices are made once per signature of
# types, dtypes, shapes and strides; later calls run the plan with their own arrays.)
PLAN_LAYOUTS = {
    "nchw": lambda a: a,
    "nhwc": lambda a: np.moveaxis(np.moveaxis(a, 1, -1).copy(), -1, 1),
    "strided": lambda a: np.repeat(a, 2, axis=-1)[..., ::2],  # viewed with a gap
    "copied": lambda a: np.repeat(a, 2, axis=0)[::2][:, :, ::-1],  # needs a compact copy
}


def _plan_out(backend, kind, shape):
    """``out`` of a kind: none, compact, or every other element of a wider array (written
    through a scratch array, as it cannot be viewed when the layout needs a copy)."""
    if kind == "none":
        return None
    if kind == "compact":
        return backend.put(np.full(shape, np.nan, np.float32))
    wide = backend.put(np.full((*shape[:-1], 2 * shape[-1]), np.nan, np.float32))
    return wide[:, :, ::2]


@pytest.mark.parametrize("layout", PLAN_LAYOUTS)
@pytest.mark.parametrize("out_kind", ["none", "compact", "strided"])
def test_planned_calls_use_their_own_arrays(backend, layout, out_kind):
    """Three calls with one signature and different arrays (data, parameters, running
    statistics, ``out``) each match the reference: the plan the first call made keeps
    nothing of its arrays. Views, inputs copied once, ``out`` viewed or written through a
    scratch array; training and evaluation, forward and backward."""
    shape = (4, 3, 6) if backend.simulated else (16, 3, 40)
    make = PLAN_LAYOUTS[layout]
    for seed in range(3):
        inp = make_inputs(shape, 1, np.float32, seed=seed)
        inp["x"], inp["dy"] = make(inp["x"]), make(inp["dy"])
        x, dy, w = backend.put(inp["x"]), backend.put(inp["dy"]), backend.put(inp["weight"])
        for training in (True, False):
            out = _plan_out(backend, out_kind, shape)
            got = run_forward(backend, inp, training=training, axis=1, out=out)
            want = reference_forward(inp, training=training, axis=1)
            if out is not None:
                np.testing.assert_array_equal(backend.get(out), got[0])
            for name, g, e in zip(
                ("y", "mean", "invstd", "running_mean", "running_var"), got, want
            ):
                assert_close(g, e, np.float32, f"{name}, seed {seed}, training={training}")
            _, mean, invstd, _, _ = want
            out = _plan_out(backend, out_kind, shape)
            grads = bn.backward(
                dy, x, w, backend.put(mean), backend.put(invstd), training=training,
                backend=backend.name, out=out,
            )  # fmt: skip
            expected = bn.backward(
                inp["dy"], inp["x"], inp["weight"], mean, invstd, training=training,
                backend="numpy",
            )  # fmt: skip
            assert out is None or grads[0] is out
            for name, g, e in zip(("dx", "dweight", "dbias"), grads, expected):
                assert_close(backend.get(g), e, np.float32, f"{name}, seed {seed}")


def test_planned_signature_still_checks_values(backend):
    """After a signature is planned, what depends on values is still checked on every call,
    before anything is modified: eps, momentum, ``out`` overlapping x, shared running
    statistics."""
    x = backend.put(np.arange(24.0, dtype=np.float32).reshape(8, 3))
    rm, rv = backend.put(np.zeros(3, np.float32)), backend.put(np.ones(3, np.float32))
    out = backend.put(np.zeros((8, 3), np.float32))
    bn.forward(x, None, None, rm, rv, out=out, backend=backend.name)  # planned
    before = [backend.get(a).copy() for a in (x, rm, rv)]
    with pytest.raises(ValueError, match="eps"):
        bn.forward(x, None, None, rm, rv, out=out, eps=-1.0, backend=backend.name)
    with pytest.raises(ValueError, match="momentum"):
        bn.forward(x, None, None, rm, rv, out=out, momentum=2.0, backend=backend.name)
    x2 = backend.put(np.ones((8, 3), np.float32))
    with pytest.raises(ValueError, match="out must not overlap"):
        bn.forward(x2, None, None, rm, rv, out=x2, backend=backend.name)  # out's signature
    stats = backend.put(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="must not overlap"):
        bn.forward(x, None, None, stats, stats, out=out, backend=backend.name)
    for a, b in zip((x, rm, rv), before):
        np.testing.assert_array_equal(backend.get(a), b)


def test_plans_keep_no_array_alive(backend):
    """A plan holds no array of the call that made it: they are freed with the caller's."""
    import gc
    import weakref

    rng = np.random.default_rng(0)
    arrays = [backend.put(rng.standard_normal((6, 3, 4)).astype(np.float32))]
    arrays += [backend.put(np.full(3, v, np.float32)) for v in (1.0, 0.0, 0.0, 1.0)]
    arrays += [backend.put(np.empty((6, 3, 4), np.float32))]
    x, w, b, rm, rv, out = arrays
    mean, invstd = bn.forward(x, w, b, rm, rv, out=out, backend=backend.name)[1:]
    bn.forward(x, w, b, rm, rv, training=False, out=out, backend=backend.name)
    bn.backward(backend.put(np.ones((6, 3, 4), np.float32)), x, w, mean, invstd, out=out,
                backend=backend.name)  # fmt: skip
    refs = [weakref.ref(a) for a in arrays]
    del x, w, b, rm, rv, out, arrays
    gc.collect()
    assert all(r() is None for r in refs)
