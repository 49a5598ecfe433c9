"""Numba kernels of the ``numba`` backend, for the two layouts of the ``(M, C, L)`` view.

* ``rows_*``: channels-first, ``x3`` of shape ``(M, C, L)``; a tile is a block of rows
  ``x3[m0:m1, c, l0:l1]`` of one channel (rows of length L, split when L is long).
* ``cols_*``: channels-last, ``x2`` of shape ``(M, C)``; a tile is a block of rows and
  columns, reduced into per-tile partial rows, vectorised across channels.

The tiling depends only on the shape and the sizes in ``_config``, never on the number of
threads, and partials are merged serially in tile order, so results are bit-identical for
any ``NUMBA_NUM_THREADS``. Each tile's mean and M2 are float64: two passes over a
channels-first tile (the second reads it from cache), one over a channels-last tile (exact
blocks of four rows joined by Chan's formula, :func:`col_tile_mean_m2`); tiles are merged
with Chan's formula.

Arrays reach the kernels C-contiguous (the caller copies other strides), in float32,
float64, or float16 as uint16 bits (see :func:`widen`), computed in float32. Per-channel
vectors are float64 (``*64``) or in the compute dtype of ``out``. Kernels with a
``parallel`` argument run the same tiles in a plain loop when it is False (small inputs,
forked children of a GNU OpenMP process). The fused
``*_forward_train``/``*_forward_eval``/``*_backward_train`` kernels are one call per
operation (each call through Numba's dispatcher costs microseconds, and returning new
arrays from one about 1.5 us more: results go into arrays passed in). With ``resident``
they run one task per channel, for channels that fit in L2, so their second pass reads
from cache; otherwise their second pass takes the tiles last to first, starting with those
still in cache. Forward-eval is one kernel: per-channel coefficients, then normalize.
Normalize and dx passes write large outputs with non-temporal stores ("streaming stores");
channels-last statistics of large inputs prefetch a few KiB ahead ("prefetching").
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# "reassoc" lets LLVM vectorise the reductions; the order it picks is fixed at compile time,
# so results stay deterministic. "numpy" errors: 1 / 0 gives inf, not ZeroDivisionError.
_OPTIONS = {
    "cache": True,
    "nogil": True,
    "error_model": "numpy",
    "fastmath": {"reassoc", "contract"},
}
_helper = njit(**_OPTIONS)
# Only prange loops run in parallel: array expressions (np.zeros) in a parallel kernel would
# each be a parallel launch of their own, costly for tiny arrays and in the serial branch.
_PARALLEL = {
    "prange": True,
    "comprehension": False,
    "reduction": False,
    "numpy": False,
    "stencil": False,
    "fusion": False,
    "setitem": False,
    "inplace_binop": False,
}
_kernel = njit(parallel=_PARALLEL, **_OPTIONS)
# Parallel loops run to an unsigned bound, ``prange(np.uint64(n))``, and their serial twins
# to the same, ``range(np.uint64(n))``: Numba types a prange index as int64 while it infers
# the kernel's types and as uint64 once the loop is a parfor, so with a signed bound each
# helper a loop calls with its index compiled twice (and the serial twin used the int64
# copy; tiles taken last to first are ``last - t`` with ``last`` unsigned too). One index
# type made the cold compile of the float32 kernels (``benchmarks/compile_time.py``) about
# 10% shorter, 44-49 s instead of 50-54 s; run times unchanged.


# -- float16 elements -------------------------------------------------------------------------
# Numba has no float16 type on the CPU, so float16 arrays reach the kernels as their uint16
# bits. LLVM's half type converts them in registers (F16C's vcvtph2ps/vcvtps2ph where the
# CPU has them): IEEE conversions, round-to-nearest-even on the way back, subnormals,
# infinities and NaN included. Every element access goes through widen/store, which are
# the identity for float32 and float64 arrays.


@intrinsic
def half_to_float(typingctx, bits):
    """float32 value of float16 ``bits`` (a uint16)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def float_to_half(typingctx, value):
    """float16 bits (a uint16) of a float32 value, rounded to nearest even."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


def widen(element):
    """An array element as computed: float16 bits as float32, float32/float64 unchanged."""
    return element


@overload(widen, jit_options={"cache": True})
def _widen(element):
    if element == types.uint16:
        return lambda element: half_to_float(element)
    return lambda element: element


def store(out, i, value):
    """``out[i] = value`` (``i`` an index or a tuple), as float16 bits where ``out`` holds them."""
    out[i] = value


@overload(store, jit_options={"cache": True})
def _store(out, i, value):
    if out.dtype == types.uint16:

        def store_half(out, i, value):
            out[i] = float_to_half(np.float32(value))

        return store_half

    def store_value(out, i, value):
        out[i] = value

    return store_value


def compute_empty(shape, like):
    """An empty array in the compute dtype of ``like``'s elements (float32 for float16)."""
    return np.empty(shape, like.dtype)


@overload(compute_empty, jit_options={"cache": True})
def _compute_empty(shape, like):
    if like.dtype == types.uint16:
        return lambda shape, like: np.empty(shape, np.float32)
    return lambda shape, like: np.empty(shape, like.dtype)


@_helper
def ceil_div(a, b):
    return -(-a // b)


@_helper
def span(start, stop):
    """``(offset, length)`` as unsigned integers, for ``a[..., offset + i]`` with
    ``i in range(length)``: unsigned indices skip Numba's negative-index check."""
    return np.uint64(start), np.uint64(stop - start)


@_helper
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub and LeVeque)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    share = n_b / n
    return n, mean_a + delta * share, m2_a + m2_b + delta * delta * n_a * share


@_helper
def exact_offset(bias, mean, shift, scale):
    """The offset of ``y = (x - shift) * scale + offset`` when ``shift`` is ``mean`` rounded
    to the compute dtype: the rounding moves into the offset, so y is normalized with the
    float64 ``mean``. A float32 shift alone would move y by ``|mean| * invstd * eps(float32)``
    (6e-4 for values near 1e4 with a spread of 1); ``x - shift`` stays exact. No rounding,
    no correction: an infinite mean (inf - inf) leaves the bias as it is, and so does a
    finite mean beyond the compute dtype's range (a float64 1e300 for float32 data: ``shift``
    is inf), so that y is -inf or inf, as ``(x - mean) * scale`` rounded would be."""
    if np.float64(mean) == np.float64(shift) or not np.isfinite(shift):
        return np.float64(bias)
    return np.float64(bias) - (np.float64(mean) - np.float64(shift)) * np.float64(scale)


@_helper
def finish_channel(
    c, n, mean, m2, eps, weight64, bias, mean_out, var_out, invstd_out, scale, offset
):  # fmt: skip
    """Store channel c's mean, biased var and invstd, and the normalize coefficients
    ``y = (x - mean_out[c]) * scale[c] + offset[c]`` (see :func:`exact_offset`)."""
    var = m2 / n
    if var < 0.0:  # written so that NaN propagates
        var = 0.0
    mean_out[c] = mean
    var_out[c] = var
    invstd_out[c] = 1.0 / np.sqrt(var + eps)
    scale[c] = np.float64(invstd_out[c]) * weight64[c]
    offset[c] = exact_offset(bias[c], mean, mean_out[c], scale[c])


@_helper
def finish_stats(mean, m2, count, eps, stats):
    """The backend's ``finish_stats`` in one loop (its NumPy steps cost microseconds each):
    ``stats`` receives the rows mean, var and invstd.
    """
    for c in range(mean.size):
        var = m2[c] / count
        if var < 0.0:  # written so that NaN propagates
            var = 0.0
        stats[0, c] = mean[c]
        stats[1, c] = var
        stats[2, c] = 1.0 / np.sqrt(var + eps)


@_helper
def update_running_stats(running_mean, running_var, batch_mean, batch_var, momentum, unbias):
    """In place: ``running = (1 - momentum) * running + momentum * batch`` (var unbiased)."""
    keep = 1.0 - momentum
    for c in range(running_mean.size):
        running_mean[c] = keep * running_mean[c] + momentum * batch_mean[c]
        running_var[c] = keep * running_var[c] + unbias * batch_var[c]


@_helper
def eval_coefficients(running_mean, running_var, weight, bias, eps, stats, like):
    """Evaluation: ``stats`` (2, C) receives mean and invstd of the running statistics;
    returns ``(shift, scale, offset)`` for normalize, in the compute dtype of ``like``.

    The same roundings as :func:`finish_stats` followed by the backend's ``normalize``:
    invstd from the variance in float64, rounded to the dtype of ``stats``; the scale is
    that rounded invstd times the weight, in float64, rounded once.
    """
    C = running_mean.size
    shift = compute_empty(C, like)
    scale = compute_empty(C, like)
    offset = compute_empty(C, like)
    for c in range(C):
        var = np.float64(running_var[c])
        if var < 0.0:  # written so that NaN propagates
            var = 0.0
        stats[0, c] = running_mean[c]
        stats[1, c] = 1.0 / np.sqrt(var + eps)
        shift[c] = stats[0, c]
        scale[c] = np.float64(stats[1, c]) * np.float64(weight[c])
        offset[c] = exact_offset(bias[c], running_mean[c], shift[c], scale[c])
    return shift, scale, offset


# -- streaming stores -------------------------------------------------------------------------
# An output larger than the caches is written with non-temporal stores: a plain store first
# reads the line it writes (a third pass over memory next to reading x and writing y) and
# evicts input that a fused kernel is about to read a second time. LLVM's vectoriser never
# emits them (it wants vector-aligned stores), so the intrinsics below compute and store one
# aligned 32-byte vector themselves; a run starts and ends with plain stores up to the first
# aligned address. Their arithmetic is the plain loops' own: ``llvm.fmuladd`` is what the
# ``contract`` flag makes of ``a * b + c`` (one fused multiply-add where the CPU has it), so
# streamed and plain elements round alike (``test_streaming_stores_are_bit_identical...``).
STREAM_VECTOR_BYTES = 32


def _affine(builder, fmuladd, inputs, coefficients):
    """``(x - shift) * scale + offset``: the normalize formula."""
    (x,), (shift, scale, offset) = inputs, coefficients
    return builder.call(fmuladd, [builder.fsub(x, shift), scale, offset])


def _input_grad(builder, fmuladd, inputs, coefficients):
    """``(dy - mean_dy - (x - mean) * coef) * scale``: the training-mode dx formula."""
    (dy, x), (mean, mean_dy, coef, scale) = inputs, coefficients
    centred = builder.fsub(x, mean)
    return builder.fmul(
        builder.call(fmuladd, [builder.fneg(centred), coef, builder.fsub(dy, mean_dy)]), scale
    )


_FORMULAS = {"affine": (_affine, 1, 3), "input_grad": (_input_grad, 2, 4)}


def _stream_signature(formula, per_column, args):
    """Signature and code of an intrinsic ``(*inputs, i, out, *coefficients[, ci])``:
    ``out.flat[i:i + w]`` gets the formula of ``inputs.flat[i:i + w]``, one 32-byte vector
    (w elements) stored non-temporally (``out``'s address at i must be aligned).
    Coefficients are scalars, or with ``per_column`` arrays read as ``coefficient[ci:]``."""
    build, n_inputs, n_coefficients = _FORMULAS[formula]
    inputs, out = args[:n_inputs], args[n_inputs + 1]
    coefficients = args[n_inputs + 2 : n_inputs + 2 + n_coefficients]
    if len(args) != n_inputs + 2 + n_coefficients + per_column:
        return None
    if out.dtype not in (types.float32, types.float64):
        return None
    if any(a.dtype != out.dtype for a in inputs):
        return None
    kinds = [c.dtype if per_column else c for c in coefficients]
    if any(k != out.dtype for k in kinds):
        return None
    dtype = out.dtype
    width = STREAM_VECTOR_BYTES * 8 // dtype.bitwidth

    def codegen(context, builder, signature, values):
        vector = ir.VectorType(context.get_value_type(dtype), width)
        undef = ir.Constant(vector, ir.Undefined)
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
        index = values[n_inputs]

        def address(k, at):
            array = context.make_array(signature.args[k])(context, builder, values[k])
            return builder.bitcast(builder.gep(array.data, [at]), vector.as_pointer())

        def coefficient(k):
            if per_column:
                return builder.load(address(k, values[-1]), align=dtype.bitwidth // 8)
            first = builder.insert_element(undef, values[k], ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(first, undef, zeros)

        loaded = [
            builder.load(address(k, index), align=dtype.bitwidth // 8) for k in range(n_inputs)
        ]
        first_coefficient = n_inputs + 2
        coefficient_vectors = [coefficient(first_coefficient + k) for k in range(n_coefficients)]
        fmuladd = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(vector, [vector, vector, vector]),
            f"llvm.fmuladd.v{width}f{dtype.bitwidth}",
        )
        result = build(builder, fmuladd, loaded, coefficient_vectors)
        stored = builder.store(result, address(n_inputs + 1, index), align=STREAM_VECTOR_BYTES)
        stored.set_metadata(
            "nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        )
        return context.get_dummy_value()

    return types.void(*args), codegen


@intrinsic
def stream_affine(typingctx, x, i, out, shift, scale, offset):
    """``out[i:i + w] = (x[i:i + w] - shift) * scale + offset``, streamed (flat indices)."""
    return _stream_signature("affine", False, (x, i, out, shift, scale, offset))


@intrinsic
def stream_affine_columns(typingctx, x, i, out, shift, scale, offset, ci):
    """:func:`stream_affine` with coefficient vectors ``shift[ci:ci + w]`` and so on."""
    return _stream_signature("affine", True, (x, i, out, shift, scale, offset, ci))


@intrinsic
def stream_input_grad(typingctx, dy, x, i, out, mean, mean_dy, coef, scale):
    """``out[i:i + w] = (dy - mean_dy - (x - mean) * coef) * scale``, streamed."""
    return _stream_signature("input_grad", False, (dy, x, i, out, mean, mean_dy, coef, scale))


@intrinsic
def stream_input_grad_columns(typingctx, dy, x, i, out, mean, mean_dy, coef, scale, ci):
    """:func:`stream_input_grad` with coefficient vectors ``mean[ci:ci + w]`` and so on."""
    args = (dy, x, i, out, mean, mean_dy, coef, scale, ci)
    return _stream_signature("input_grad", True, args)


@intrinsic
def stream_fence(typingctx):
    """Orders the non-temporal stores before what follows (they are weakly ordered)."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def _streamable(out, *inputs):
    return out.dtype in (types.float32, types.float64) and all(
        a.dtype == out.dtype for a in inputs
    )


@_helper
def stream_split(out, first, length):
    """``(head, body, width)`` of ``length`` elements from ``out.flat[first]`` on: ``head``
    plain stores reach a 32-byte boundary, then ``body`` elements in vectors of ``width``."""
    size = out.itemsize
    width = STREAM_VECTOR_BYTES // size
    misaligned = (out.ctypes.data + np.int64(first) * size) % STREAM_VECTOR_BYTES
    head = min(length, (STREAM_VECTOR_BYTES - misaligned) % STREAM_VECTOR_BYTES // size)
    return head, (length - head) // width * width, width


# A streamed loop stores each vector and goes on loading the next ones; a load whose address
# equals, modulo 4 KiB, that of a store still in flight waits for it ("4K aliasing"). Inputs
# and output share their flat indices, so this happens on every vector when the output starts
# just above an input modulo 4 KiB, as arrays of one size allocated one after another do
# (glibc puts them 16 bytes apart modulo 4 KiB: the benchmark's x, dy and out). Measured on
# (100352, 64) normalize, 2 threads: 1.16x slower with out 32 bytes above x, 1.06x at 64,
# unchanged from 128 on. Such runs go last to first, which moves the conflict to outputs just
# *below* an input.
ALIAS_WINDOW_BYTES = 128


@_helper
def just_above(out, a):
    """Whether ``out`` starts less than ALIAS_WINDOW_BYTES above ``a``, modulo 4 KiB."""
    gap = (np.int64(out.ctypes.data) - np.int64(a.ctypes.data)) % 4096
    return 0 < gap < ALIAS_WINDOW_BYTES


@_helper
def stream_vector(first, body, width, v, backwards):
    """Flat index of the v-th vector of a streamed body ``first:first + body``, taken last to
    first when ``backwards`` (:func:`just_above`)."""
    first, body, width, v = np.int64(first), np.int64(body), np.int64(width), np.int64(v)
    if backwards:
        return first + body - (v + 1) * width
    return first + v * width


@_helper
def stream_columns(head, body, width, C, backwards):
    """``(c, step)``: the column of a streamed run's first vector taken (``head`` elements
    past a row's start), and the step to the next one's (kept in ``[0, C)``, no division per
    vector)."""
    if backwards:
        return (head + body - width) % C, -width
    return head % C, width


@_helper
def periodic(v, extra):
    """``v`` followed by its first ``extra`` values, repeated as needed (``v[j % v.size]``):
    a vector of ``w <= extra`` coefficients from any column on, wrapping at the row end."""
    out = np.empty(v.size + extra, v.dtype)
    out[: v.size] = v
    for j in range(v.size, out.size):  # no division per value: the copy is per tile
        out[j] = out[j - v.size]
    return out


@_helper
def run_coefficients(v, total, C, head, width):
    """Per-column coefficients ``v`` for the vectors of ``width`` of a streamed run of
    ``total`` values whose vectors start ``head`` values in: ``v`` itself where no vector
    crosses a row's end (one row, or rows and start both in whole vectors), else
    :func:`periodic`. (An extended copy per row, when rows longer than a column block were
    streamed one by one, made (3136, 2048) normalize 11x slower.)"""
    if total <= C or (C % width == 0 and head % width == 0):
        return v
    return periodic(v, width)


# -- prefetching -------------------------------------------------------------------------------
# The statistics pass over a channels-last tile reads it from memory while its arithmetic
# (float64, per block of four rows) keeps the core busy; prefetching a few KiB ahead (the
# next tile, for tiles of few channels summed flat) keeps loads in flight meanwhile, which
# the hardware prefetchers alone do not (``_config``). Hints only: a prefetch changes no
# result and never faults (the addresses are clipped anyway).
CACHE_LINE_BYTES = 64


@intrinsic
def prefetch(typingctx, a, i):
    """Hint the CPU to bring the cache line of ``a.flat[i]`` into its caches for reading."""
    if not isinstance(a, types.Array) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        byte = ir.IntType(8).as_pointer()
        address = builder.bitcast(builder.gep(array.data, [args[1]]), byte)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32]),
            "llvm.prefetch.p0i8",
        )
        read, keep_in_all_levels, data = (ir.Constant(i32, v) for v in (0, 3, 1))
        builder.call(fn, [address, read, keep_in_all_levels, data])
        return context.get_dummy_value()

    return types.void(a, i), codegen


@_helper
def prefetch_span(x1, first, length):
    """Prefetch ``x1.flat[first:first + length]`` (unsigned offsets), clipped to the array."""
    stop = min(first + length, np.uint64(x1.size))
    for i in range(first, stop, np.uint64(CACHE_LINE_BYTES // x1.itemsize)):
        prefetch(x1, i)


# -- channels-first: x3 of shape (M, C, L) --------------------------------------------------


@_helper
def row_tiling(M, L, tile):
    """``(rows, chunk, chunks, tiles_per_channel)``: tiles of ``rows`` x ``chunk`` values."""
    if M == 0 or L == 0:
        return 1, 1, 1, 0
    if L >= tile:
        chunks = ceil_div(L, tile)
        chunk = ceil_div(L, chunks)
        rows = 1
    else:
        chunks = 1
        chunk = L
        rows = tile // L
    return rows, chunk, chunks, ceil_div(M, rows) * chunks


@_helper
def row_tile(j, M, L, rows, chunk, chunks):
    """Bounds ``(m0, m1, l0, l1)`` of tile j of a channel."""
    m0 = (j // chunks) * rows
    l0 = (j % chunks) * chunk
    return m0, min(m0 + rows, M), l0, min(l0 + chunk, L)


# Tile helpers index rows with unsigned integers (see :func:`span`): Numba then leaves out
# its negative-index wraparound, which would keep LLVM from vectorising the inner loop, and
# no slice is built per row (on rows of 200 values that costs as much as the row itself).


@_helper
def row_tile_mean_m2(x3, c, m0, m1, l0, l1):
    u0, length = span(l0, l1)
    total = 0.0
    for m in range(m0, m1):
        for i in range(length):
            total += widen(x3[m, c, u0 + i])
    n = (m1 - m0) * (l1 - l0)
    mean = total / n
    m2 = 0.0
    for m in range(m0, m1):
        for i in range(length):
            dev = widen(x3[m, c, u0 + i]) - mean
            m2 += dev * dev
    return np.float64(n), mean, m2


@_helper
def row_channel_mean_m2(x3, c, rows, chunk, chunks, tiles):
    """Mean and M2 of channel c: its tiles in order, merged one by one."""
    M, _, L = x3.shape
    n, mean, m2 = row_tile_mean_m2(x3, c, *row_tile(0, M, L, rows, chunk, chunks))
    for j in range(1, tiles):
        n_b, mean_b, m2_b = row_tile_mean_m2(x3, c, *row_tile(j, M, L, rows, chunk, chunks))
        n, mean, m2 = chan_merge(n, mean, m2, n_b, mean_b, m2_b)
    return n, mean, m2


@_helper
def row_range_normalize(x3, c, m, l0, l1, shift, scale, offset, out3):
    """``out3[m, c, l0:l1] = (x3[m, c, l0:l1] - shift) * scale + offset``, plain stores."""
    u0, length = span(l0, l1)
    for i in range(length):
        store(out3, (m, c, u0 + i), (widen(x3[m, c, u0 + i]) - shift) * scale + offset)


@_helper
def row_range_input_grad(dy3, x3, c, m, l0, l1, mean, mean_dy, coef, scale, out3):
    """``out3[m, c, l0:l1] = (dy - mean_dy - (x - mean) * coef) * scale``, plain stores."""
    u0, length = span(l0, l1)
    for i in range(length):
        dy = widen(dy3[m, c, u0 + i])
        dx = (dy - mean_dy - (widen(x3[m, c, u0 + i]) - mean) * coef) * scale
        store(out3, (m, c, u0 + i), dx)


def row_run_normalize(x3, c, m, l0, l1, shift, scale, offset, out3):
    """``out3[m, c, l0:l1] = (x3[m, c, l0:l1] - shift) * scale + offset``, streamed where the
    dtypes allow it (the run starts and ends with plain stores up to a 32-byte boundary)."""


@overload(row_run_normalize, jit_options=_OPTIONS)
def _row_run_normalize(x3, c, m, l0, l1, shift, scale, offset, out3):
    def plain(x3, c, m, l0, l1, shift, scale, offset, out3):
        row_range_normalize(x3, c, m, l0, l1, shift, scale, offset, out3)

    if not _streamable(out3, x3):
        return plain

    def streamed(x3, c, m, l0, l1, shift, scale, offset, out3):
        _, C, L = x3.shape
        first = (m * C + c) * L + l0  # flat index of [m, c, l0] in all arrays (C-contiguous)
        head, body, width = stream_split(out3, first, l1 - l0)
        row_range_normalize(x3, c, m, l0, l0 + head, shift, scale, offset, out3)
        backwards = just_above(out3, x3)
        for v in range(body // width):
            i = stream_vector(first + head, body, width, v, backwards)
            stream_affine(x3, i, out3, shift, scale, offset)
        row_range_normalize(x3, c, m, l0 + head + body, l1, shift, scale, offset, out3)

    return streamed


def row_run_input_grad(dy3, x3, c, m, l0, l1, mean, mean_dy, coef, scale, out3):
    """:func:`row_run_normalize` for dx: ``(dy - mean_dy - (x - mean) * coef) * scale``."""


@overload(row_run_input_grad, jit_options=_OPTIONS)
def _row_run_input_grad(dy3, x3, c, m, l0, l1, mean, mean_dy, coef, scale, out3):
    def plain(dy3, x3, c, m, l0, l1, mean, mean_dy, coef, scale, out3):
        row_range_input_grad(dy3, x3, c, m, l0, l1, mean, mean_dy, coef, scale, out3)

    if not _streamable(out3, dy3, x3):
        return plain

    def streamed(dy3, x3, c, m, l0, l1, mean, mean_dy, coef, scale, out3):
        _, C, L = x3.shape
        first = (m * C + c) * L + l0
        head, body, width = stream_split(out3, first, l1 - l0)
        row_range_input_grad(dy3, x3, c, m, l0, l0 + head, mean, mean_dy, coef, scale, out3)
        backwards = just_above(out3, x3) or just_above(out3, dy3)
        for v in range(body // width):
            i = stream_vector(first + head, body, width, v, backwards)
            stream_input_grad(dy3, x3, i, out3, mean, mean_dy, coef, scale)
        tail = l0 + head + body
        row_range_input_grad(dy3, x3, c, m, tail, l1, mean, mean_dy, coef, scale, out3)

    return streamed


@_helper
def row_tile_normalize(x3, c, m0, m1, l0, l1, shift, scale, offset, out3, stream):
    for m in range(m0, m1):
        if stream:
            row_run_normalize(x3, c, m, l0, l1, shift, scale, offset, out3)
        else:
            row_range_normalize(x3, c, m, l0, l1, shift, scale, offset, out3)


@_helper
def row_tile_grad_sums(dy3, x3, c, m0, m1, l0, l1, mean):
    u0, length = span(l0, l1)
    sum_dy = 0.0
    sum_dy_xmu = 0.0
    for m in range(m0, m1):
        for i in range(length):
            dy = np.float64(widen(dy3[m, c, u0 + i]))
            sum_dy += dy
            sum_dy_xmu += dy * (widen(x3[m, c, u0 + i]) - mean)
    return sum_dy, sum_dy_xmu


@_helper
def row_tile_input_grad(dy3, x3, c, m0, m1, l0, l1, mean, mean_dy, coef, scale, out3, stream):
    for m in range(m0, m1):
        if stream:
            row_run_input_grad(dy3, x3, c, m, l0, l1, mean, mean_dy, coef, scale, out3)
        else:
            row_range_input_grad(dy3, x3, c, m, l0, l1, mean, mean_dy, coef, scale, out3)


@_helper
def row_partial_stats(x3, t, rows, chunk, chunks, tiles, count, means, m2s):
    M, _, L = x3.shape
    c = t // tiles
    count[t], means[t], m2s[t] = row_tile_mean_m2(
        x3, c, *row_tile(t - c * tiles, M, L, rows, chunk, chunks)
    )


@_helper
def merge_partials(count, means, m2s, first, tiles):
    """Chan-merge ``tiles`` partials from index ``first`` on, in order."""
    if tiles == 0:
        return 0.0, np.nan, 0.0
    n, mean, m2 = count[first], means[first], m2s[first]
    for t in range(first + 1, first + tiles):
        n, mean, m2 = chan_merge(n, mean, m2, count[t], means[t], m2s[t])
    return n, mean, m2


@_helper
def row_normalize_task(x3, t, rows, chunk, chunks, tiles, shift, scale, offset, out3, stream):
    M, _, L = x3.shape
    c = t // tiles
    row_tile_normalize(
        x3,
        c,
        *row_tile(t - c * tiles, M, L, rows, chunk, chunks),
        shift[c],
        scale[c],
        offset[c],
        out3,
        stream,
    )
    if stream:
        stream_fence()


@_kernel
def rows_channel_stats(x3, tile, parallel):
    M, C, L = x3.shape
    rows, chunk, chunks, tiles = row_tiling(M, L, tile)
    count = np.empty(C * tiles)
    means = np.empty(C * tiles)
    m2s = np.empty(C * tiles)
    if parallel:
        for t in prange(np.uint64(C * tiles)):
            row_partial_stats(x3, t, rows, chunk, chunks, tiles, count, means, m2s)
    else:
        for t in range(np.uint64(C * tiles)):
            row_partial_stats(x3, t, rows, chunk, chunks, tiles, count, means, m2s)
    mean = np.empty(C)
    m2 = np.empty(C)
    for c in range(C):
        _, mean[c], m2[c] = merge_partials(count, means, m2s, c * tiles, tiles)
    return mean, m2


# The elementwise passes on their own (normalize, dx) cut the M * C rows of ``(M, C, L)``
# into tiles in memory order, each row with its own channel's coefficients: a tile is one
# contiguous block. A tile of one channel's rows reads pieces C * L values apart, which
# made (8, 256, 196) normalize 1.2-1.5x slower, (32, 64, 3136) 1.1x. (The fused passes keep
# channel tiles: their statistics need them, and their second pass re-reads those tiles.)


@_helper
def memory_rows(t, M, C, L, rows, chunk, chunks):
    """Tile t of the memory-order rows: ``(m0, m1, r0, r1, l0, l1)``, the rows ``r = m * C + c``
    in ``[r0, r1)`` (their m from m0 to m1 inclusive), values ``l0:l1`` of each."""
    r0, r1, l0, l1 = row_tile(np.int64(t), M * C, L, rows, chunk, chunks)  # signed: one compile
    return r0 // C, (r1 - 1) // C, r0, r1, l0, l1


@_helper
def memory_row_channels(m, m0, m1, r0, r1, C):
    """``(c0, c1)``: the channels of batch row m among the tile's rows ``[r0, r1)``."""
    return (r0 - m * C if m == m0 else 0), (r1 - m * C if m == m1 else C)


@_helper
def memory_normalize_task(x3, t, rows, chunk, chunks, shift, scale, offset, out3, stream):
    M, C, L = x3.shape
    m0, m1, r0, r1, l0, l1 = memory_rows(t, M, C, L, rows, chunk, chunks)
    if C == 1:  # one channel: the tile's rows share coefficients, kept out of the row loop
        row_tile_normalize(x3, 0, r0, r1, l0, l1, shift[0], scale[0], offset[0], out3, stream)
    else:
        for m in range(m0, m1 + 1):
            c0, c1 = memory_row_channels(m, m0, m1, r0, r1, C)
            for c in range(c0, c1):  # (row_tile_normalize here ran 1.5x slower)
                if stream:
                    row_run_normalize(x3, c, m, l0, l1, shift[c], scale[c], offset[c], out3)
                else:
                    row_range_normalize(x3, c, m, l0, l1, shift[c], scale[c], offset[c], out3)
    if stream:
        stream_fence()


@_kernel
def rows_normalize(x3, shift, scale, offset, out3, tile, stream, parallel):
    M, C, L = x3.shape
    rows, chunk, chunks, tiles = row_tiling(M * C, L, tile)
    coefficients = (shift, scale, offset, out3, stream)
    if parallel:
        for t in prange(np.uint64(tiles)):
            memory_normalize_task(x3, t, rows, chunk, chunks, *coefficients)
    else:
        for t in range(np.uint64(tiles)):
            memory_normalize_task(x3, t, rows, chunk, chunks, *coefficients)


@_kernel
def rows_forward_eval(
    x3, running_mean, running_var, weight, bias, eps, out3, stats, tile, stream, parallel
):
    """Evaluation in one call: :func:`eval_coefficients`, then the tiles of
    :func:`rows_normalize`.

    A parallel kernel of its own, not a function that calls :func:`rows_normalize`: Numba
    cached such a caller wrongly. When a process compiled it for new argument types while
    loading the parallel callee from the cache, the entry it wrote crashed (segmentation
    fault) the next process that loaded it (``test_cached_kernels_load_in_a_new_process``).
    """
    shift, scale, offset = eval_coefficients(
        running_mean, running_var, weight, bias, eps, stats, out3
    )
    M, C, L = x3.shape
    rows, chunk, chunks, tiles = row_tiling(M * C, L, tile)
    coefficients = (shift, scale, offset, out3, stream)
    if parallel:
        for t in prange(np.uint64(tiles)):
            memory_normalize_task(x3, t, rows, chunk, chunks, *coefficients)
    else:
        for t in range(np.uint64(tiles)):
            memory_normalize_task(x3, t, rows, chunk, chunks, *coefficients)


@_helper
def row_forward_channel(
    x3,
    c,
    rows,
    chunk,
    chunks,
    tiles,
    eps,
    weight64,
    bias,
    out3,
    mean_out,
    var_out,
    invstd_out,
    scale,
    offset,
    stream,
):
    """Statistics, then normalize, of one channel: the second read comes from cache."""
    M, _, L = x3.shape
    n, mean, m2 = row_channel_mean_m2(x3, c, rows, chunk, chunks, tiles)
    finish_channel(
        c, n, mean, m2, eps, weight64, bias, mean_out, var_out, invstd_out, scale, offset
    )
    for j in range(tiles):
        row_tile_normalize(
            x3,
            c,
            *row_tile(j, M, L, rows, chunk, chunks),
            mean_out[c],
            scale[c],
            offset[c],
            out3,
            stream,
        )
    if stream:
        stream_fence()


@_kernel
def rows_forward_train(
    x3, weight, bias, eps, out3, stats, running_mean, running_var, momentum, unbias, tile,
    resident, stream, parallel,
):  # fmt: skip
    """Fused statistics and normalize; ``stats`` (3, C) receives mean, var and invstd, and
    the running statistics are updated (:func:`update_running_stats`; empty arrays for none).

    ``resident``: one task per channel (for channels that fit in L2), so the normalize pass
    reads the channel from cache. Otherwise tiles of all channels are spread over the
    threads and normalized last to first: the last ones read are still in cache.
    """
    M, C, L = x3.shape
    rows, chunk, chunks, tiles = row_tiling(M, L, tile)
    weight64 = weight.astype(np.float64)
    mean_out, var_out, invstd_out = stats[0], stats[1], stats[2]
    scale = compute_empty(C, out3)
    offset = compute_empty(C, out3)
    if resident:
        for c in prange(np.uint64(C)):
            row_forward_channel(
                x3,
                np.int64(c),  # as the tiled path's channels: its helpers compile once
                rows,
                chunk,
                chunks,
                tiles,
                eps,
                weight64,
                bias,
                out3,
                mean_out,
                var_out,
                invstd_out,
                scale,
                offset,
                stream,
            )
    else:
        tasks = C * tiles
        count = np.empty(tasks)
        means = np.empty(tasks)
        m2s = np.empty(tasks)
        if parallel:
            for t in prange(np.uint64(tasks)):
                row_partial_stats(x3, t, rows, chunk, chunks, tiles, count, means, m2s)
        else:
            for t in range(np.uint64(tasks)):
                row_partial_stats(x3, t, rows, chunk, chunks, tiles, count, means, m2s)
        for c in range(C):
            n, mean, m2 = merge_partials(count, means, m2s, c * tiles, tiles)
            finish_channel(
                c, n, mean, m2, eps, weight64, bias, mean_out, var_out, invstd_out, scale, offset
            )
        last = np.uint64(tasks - 1)
        if parallel:
            for t in prange(np.uint64(tasks)):
                row_normalize_task(
                    x3, last - t, rows, chunk, chunks, tiles, mean_out, scale, offset, out3, stream
                )
        else:
            for t in range(np.uint64(tasks)):
                row_normalize_task(
                    x3, last - t, rows, chunk, chunks, tiles, mean_out, scale, offset, out3, stream
                )
    update_running_stats(running_mean, running_var, mean_out, var_out, momentum, unbias)


@_helper
def row_partial_grad_sums(dy3, x3, t, rows, chunk, chunks, tiles, mean64, sums_dy, sums_dy_xmu):
    M, _, L = x3.shape
    c = t // tiles
    sums_dy[t], sums_dy_xmu[t] = row_tile_grad_sums(
        dy3, x3, c, *row_tile(t - c * tiles, M, L, rows, chunk, chunks), mean64[c]
    )


@_kernel
def rows_grad_sums(dy3, x3, mean, tile, parallel):
    M, C, L = x3.shape
    mean64 = mean.astype(np.float64)
    rows, chunk, chunks, tiles = row_tiling(M, L, tile)
    sums_dy = np.empty(C * tiles)
    sums_dy_xmu = np.empty(C * tiles)
    if parallel:
        for t in prange(np.uint64(C * tiles)):
            row_partial_grad_sums(
                dy3, x3, t, rows, chunk, chunks, tiles, mean64, sums_dy, sums_dy_xmu
            )
    else:
        for t in range(np.uint64(C * tiles)):
            row_partial_grad_sums(
                dy3, x3, t, rows, chunk, chunks, tiles, mean64, sums_dy, sums_dy_xmu
            )
    sum_dy = np.zeros(C)
    sum_dy_xmu = np.zeros(C)
    for c in range(C):
        for t in range(c * tiles, (c + 1) * tiles):
            sum_dy[c] += sums_dy[t]
            sum_dy_xmu[c] += sums_dy_xmu[t]
    return sum_dy, sum_dy_xmu


@_helper
def grad_coefficients(c, n, sum_dy, sum_dy_xmu, mean64, invstd64, weight64, coefs):
    """``coefs[:, c] = (mean, sum_dy / n, invstd**2 * sum_dy_xmu / n, weight * invstd)``."""
    invstd = invstd64[c]
    coefs[0, c] = mean64[c]
    coefs[1, c] = sum_dy / n
    coefs[2, c] = invstd * invstd * sum_dy_xmu / n
    coefs[3, c] = weight64[c] * invstd


@_helper
def row_input_grad_task(dy3, x3, t, rows, chunk, chunks, tiles, coefs, out3, stream):
    M, _, L = x3.shape
    c = t // tiles
    row_tile_input_grad(
        dy3,
        x3,
        c,
        *row_tile(t - c * tiles, M, L, rows, chunk, chunks),
        coefs[0, c],
        coefs[1, c],
        coefs[2, c],
        coefs[3, c],
        out3,
        stream,
    )
    if stream:
        stream_fence()


@_helper
def memory_input_grad_task(dy3, x3, t, rows, chunk, chunks, coefs, out3, stream):
    """dx of a memory-order tile (see :func:`memory_normalize_task`)."""
    M, C, L = x3.shape
    m0, m1, r0, r1, l0, l1 = memory_rows(t, M, C, L, rows, chunk, chunks)
    if C == 1:
        row_tile_input_grad(
            dy3, x3, 0, r0, r1, l0, l1, coefs[0, 0], coefs[1, 0], coefs[2, 0], coefs[3, 0],
            out3, stream,
        )  # fmt: skip
    else:
        for m in range(m0, m1 + 1):
            c0, c1 = memory_row_channels(m, m0, m1, r0, r1, C)
            for c in range(c0, c1):
                coefficients = (coefs[0, c], coefs[1, c], coefs[2, c], coefs[3, c], out3)
                if stream:
                    row_run_input_grad(dy3, x3, c, m, l0, l1, *coefficients)
                else:
                    row_range_input_grad(dy3, x3, c, m, l0, l1, *coefficients)
    if stream:
        stream_fence()


@_kernel
def rows_input_grad(dy3, x3, coefs, out3, tile, stream, parallel):
    """dx from ``coefs`` (rows of :func:`grad_coefficients`, in the dtype of ``out3``)."""
    M, C, L = x3.shape
    rows, chunk, chunks, tiles = row_tiling(M * C, L, tile)
    if parallel:
        for t in prange(np.uint64(tiles)):
            memory_input_grad_task(dy3, x3, t, rows, chunk, chunks, coefs, out3, stream)
    else:
        for t in range(np.uint64(tiles)):
            memory_input_grad_task(dy3, x3, t, rows, chunk, chunks, coefs, out3, stream)


@_helper
def row_backward_channel(
    dy3,
    x3,
    c,
    rows,
    chunk,
    chunks,
    tiles,
    mean64,
    invstd64,
    weight64,
    coefs,
    out3,
    sum_dy,
    sum_dy_xmu,
    stream,
):
    M, _, L = x3.shape
    for j in range(tiles):
        s_dy, s_dy_xmu = row_tile_grad_sums(
            dy3, x3, c, *row_tile(j, M, L, rows, chunk, chunks), mean64[c]
        )
        sum_dy[c] += s_dy
        sum_dy_xmu[c] += s_dy_xmu
    grad_coefficients(c, M * L, sum_dy[c], sum_dy_xmu[c], mean64, invstd64, weight64, coefs)
    for j in range(tiles):
        row_tile_input_grad(
            dy3,
            x3,
            c,
            *row_tile(j, M, L, rows, chunk, chunks),
            coefs[0, c],
            coefs[1, c],
            coefs[2, c],
            coefs[3, c],
            out3,
            stream,
        )
    if stream:
        stream_fence()


@_kernel
def rows_backward_train(dy3, x3, mean, invstd, weight, out3, tile, resident, stream, parallel):
    """Fused gradient sums and dx; returns float64 sums. ``resident`` as in the forward."""
    M, C, L = x3.shape
    mean64, invstd64 = mean.astype(np.float64), invstd.astype(np.float64)
    weight64 = weight.astype(np.float64)
    rows, chunk, chunks, tiles = row_tiling(M, L, tile)
    coefs = compute_empty((4, C), out3)
    sum_dy = np.zeros(C)
    sum_dy_xmu = np.zeros(C)
    if resident:
        for c in prange(np.uint64(C)):
            row_backward_channel(
                dy3,
                x3,
                np.int64(c),  # as the tiled path's channels: its helpers compile once
                rows,
                chunk,
                chunks,
                tiles,
                mean64,
                invstd64,
                weight64,
                coefs,
                out3,
                sum_dy,
                sum_dy_xmu,
                stream,
            )
        return sum_dy, sum_dy_xmu
    tasks = C * tiles
    sums_dy = np.empty(tasks)
    sums_dy_xmu = np.empty(tasks)
    if parallel:
        for t in prange(np.uint64(tasks)):
            row_partial_grad_sums(
                dy3, x3, t, rows, chunk, chunks, tiles, mean64, sums_dy, sums_dy_xmu
            )
    else:
        for t in range(np.uint64(tasks)):
            row_partial_grad_sums(
                dy3, x3, t, rows, chunk, chunks, tiles, mean64, sums_dy, sums_dy_xmu
            )
    for c in range(C):
        for t in range(c * tiles, (c + 1) * tiles):
            sum_dy[c] += sums_dy[t]
            sum_dy_xmu[c] += sums_dy_xmu[t]
        grad_coefficients(c, M * L, sum_dy[c], sum_dy_xmu[c], mean64, invstd64, weight64, coefs)
    last = np.uint64(tasks - 1)
    if parallel:
        for t in prange(np.uint64(tasks)):
            row_input_grad_task(dy3, x3, last - t, rows, chunk, chunks, tiles, coefs, out3, stream)
    else:
        for t in range(np.uint64(tasks)):
            row_input_grad_task(dy3, x3, last - t, rows, chunk, chunks, tiles, coefs, out3, stream)
    return sum_dy, sum_dy_xmu


# -- channels-last: x2 of shape (M, C) ------------------------------------------------------


@_helper
def col_tiling(M, C, tile, column_block, min_rows):
    """``(rows, cols, col_blocks, row_blocks)``: tiles of ``rows`` x ``cols`` values."""
    if M == 0 or C == 0:
        return 1, 1, 0, 0
    cols = min(C, column_block)
    rows = max(min_rows, tile // cols)
    return rows, cols, ceil_div(C, cols), ceil_div(M, rows)


@_helper
def col_tile(t, M, C, rows, cols, col_blocks):
    """``(block, m0, m1, c0, c1)``: row block and bounds of tile t."""
    block = t // col_blocks
    m0 = block * rows
    c0 = (t - block * col_blocks) * cols
    return block, m0, min(m0 + rows, M), c0, min(c0 + cols, C)


@_helper
def elementwise_tiling(M, C, tile, column_block, min_rows):
    """``(rows, row_blocks)``: the tiles of whole rows of the elementwise passes (normalize,
    dx). Up to ``column_block`` columns they are the reductions' tiles; wider rows, which
    the reductions cut into column blocks (their partial rows must stay in L1), stay whole
    here, ``tile`` values a tile, so each tile is one contiguous run: on (3136, 2048) dx 1.45x
    and normalize 1.15x faster than by column blocks, row segment after row segment."""
    if C <= column_block:
        rows, _, _, row_blocks = col_tiling(M, C, tile, column_block, min_rows)
        return rows, row_blocks
    rows = max(1, tile // C)
    return rows, ceil_div(M, rows)


# Channels-last tiles index the flat array: ``x1[row_start(m, width, c0) + c]`` is
# ``x2[m, c0 + c]``, with unsigned offsets; on rows of 64 values this is 10-15% faster than
# two-dimensional indexing (the inner loop keeps no per-row index arithmetic). Offsets stay
# uint64 throughout: Numba types uint64 combined with a signed integer (``2 * width``) as
# float64, which silently made these loops 2x slower.


@_helper
def flat_rows(x2, c0, c1):
    """``(x1, width, cols)``: the C-contiguous ``x2`` flat, its row length and ``c1 - c0``."""
    return x2.reshape(-1), np.uint64(x2.shape[1]), np.uint64(c1 - c0)


@_helper
def row_start(m, width, c0):
    """Flat offset of ``x2[m, c0]`` (unsigned, see :func:`span`)."""
    return np.uint64(m) * width + np.uint64(c0)


@_helper
def col_tile_mean_m2(x2, block, m0, m1, c0, c1, means, m2s, ahead):
    """Partial rows ``means[block, c0:c1]`` and ``m2s[block, c0:c1]`` of one tile, in one
    pass: Welford's update by blocks of four rows.

    A block's mean and M2 are exact in float64 from pairwise sums and differences
    (``M2 = ((a - b)^2 + (c - d)^2) / 2 + ((a + b) - (c + d))^2 / 4``), and the block joins
    the tile's running mean and M2 by Chan's formula, whose weights ``f`` and ``g`` are
    the same for every column. The partial rows live in memory, not registers: each
    update is a load and a store, once per block. With ``ahead`` > 0 (tiles of whole
    rows), each block prefetches the values ``ahead`` elements past it.
    Against two passes (a sum, then squared deviations read again from L2), forward-train
    1.0-1.1x faster on 2 threads, float32, for C from 16 to 1024.
    """
    mean = means[block, c0:c1]
    m2 = m2s[block, c0:c1]
    mean[:] = 0.0
    m2[:] = 0.0
    x1, width, cols = flat_rows(x2, c0, c1)
    quads = m0 + (m1 - m0) // 4 * 4
    n = 0.0
    for m in range(m0, quads, 4):
        r0 = row_start(m, width, c0)
        r1 = r0 + width
        r2 = r1 + width
        r3 = r2 + width
        if ahead:
            prefetch_span(x1, r0 + np.uint64(ahead), np.uint64(4) * width)
        f = 4.0 / (n + 4.0)  # n_b / (n_a + n_b), n_b = 4
        g = n * f  # n_a * n_b / (n_a + n_b)
        for c in range(cols):
            a, b = np.float64(widen(x1[r0 + c])), np.float64(widen(x1[r1 + c]))
            d, e = np.float64(widen(x1[r2 + c])), np.float64(widen(x1[r3 + c]))
            ab, de = a + b, d + e
            twice_m2 = (a - b) * (a - b) + (d - e) * (d - e) + 0.5 * ((ab - de) * (ab - de))
            delta = (ab + de) * 0.25 - mean[c]
            mean[c] += delta * f
            m2[c] += 0.5 * twice_m2 + delta * delta * g
        n += 4.0
    for m in range(quads, m1):
        r0 = row_start(m, width, c0)
        f = 1.0 / (n + 1.0)
        g = n * f
        for c in range(cols):
            delta = widen(x1[r0 + c]) - mean[c]
            mean[c] += delta * f
            m2[c] += delta * delta * g
        n += 1.0


# -- channels-last with few channels ------------------------------------------------------------
# With C < PERIODIC_COLUMNS a row is shorter than a few vectors, and the column loops above
# run (nearly) scalar. Such tiles are whole rows, one contiguous run of values: they are
# summed flat instead, in blocks of ``period = lcm(C, 16)`` values where position j always
# holds column j % C, and the period's partial sums fold into C columns at the end (in a
# fixed order: results depend on the shape alone). Plain (not streamed) normalize and dx
# stores go flat the same way, with the coefficients repeated over the period. On 2
# threads, float32: (100000, 3) forward-train 5.6x, forward-eval 4.5x, backward 4.1x
# faster; (20000, 5) 4.6x, 3.8x, 4.6x; (100000, 12) 1.8x, 1.5x, 1.9x; (1000000, 3),
# whose output is streamed, 3.8x, 1.0x, 1.9x.
PERIODIC_COLUMNS = 16


@_helper
def column_period(C):
    """``lcm(C, 16)``: whole rows, and whole vectors of 4 or 8 values."""
    a, b = C, 16
    while b:
        a, b = b, a % b
    return C * 16 // a


@_helper
def fold_period(acc, C, out):
    """``out[c] = sum(acc[c::C])``, in order."""
    for c in range(C):
        total = 0.0
        for j in range(c, acc.size, C):
            total += acc[j]
        out[c] = total


@_helper
def periodic_spans(m0, m1, C, period):
    """Unsigned ``(first, quads, wholes, n, step)`` of the flat values of rows m0..m1:
    ``quads`` values go in groups of four periods, up to ``wholes`` in single periods,
    the rest (fewer than a period) one by one. (All unsigned: Numba types an unsigned
    integer combined with a signed one as float64.)"""
    step = np.uint64(period)
    first, n = span(m0 * C, m1 * C)
    quad = np.uint64(4) * step
    return first, n // quad * quad, n // step * step, n, step


@_helper
def col_tile_mean_m2_periodic(x2, block, m0, m1, means, m2s, ahead):
    """:func:`col_tile_mean_m2` of a tile of whole rows with C < PERIODIC_COLUMNS."""
    M, C = x2.shape
    x1 = x2.reshape(-1)
    period = column_period(C)
    first, quads, wholes, n, step = periodic_spans(m0, m1, C, period)
    step2, step3, quad = step + step, step + step + step, step + step + step + step
    acc = np.zeros(period)
    for i in range(first, first + quads, quad):
        for j in range(step):
            acc[j] += (np.float64(widen(x1[i + j])) + widen(x1[i + step + j])) + (
                np.float64(widen(x1[i + step2 + j])) + widen(x1[i + step3 + j])
            )
    for i in range(first + quads, first + wholes, step):
        for j in range(step):
            acc[j] += widen(x1[i + j])
    for j in range(n - wholes):
        acc[j] += widen(x1[first + wholes + j])
    mean, m2 = means[block], m2s[block]
    fold_period(acc, C, mean)
    for c in range(C):
        mean[c] /= m1 - m0
    centre = periodic(mean, period - C)  # float64
    acc[:] = 0.0
    for i in range(first, first + quads, quad):
        if ahead:
            prefetch_span(x1, i + np.uint64(ahead), quad)
        for j in range(step):
            d0, d1 = widen(x1[i + j]) - centre[j], widen(x1[i + step + j]) - centre[j]
            d2 = widen(x1[i + step2 + j]) - centre[j]
            d3 = widen(x1[i + step3 + j]) - centre[j]
            acc[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for i in range(first + quads, first + wholes, step):
        for j in range(step):
            dev = widen(x1[i + j]) - centre[j]
            acc[j] += dev * dev
    for j in range(n - wholes):
        dev = widen(x1[first + wholes + j]) - centre[j]
        acc[j] += dev * dev
    fold_period(acc, C, m2)


@_helper
def col_partial_stats(x2, t, rows, cols, col_blocks, means, m2s, ahead):
    """:func:`col_tile_mean_m2` (or its periodic form) of tile t, each block of it
    prefetching the values ``ahead`` elements past it (0: none)."""
    M, C = x2.shape
    block, m0, m1, c0, c1 = col_tile(t, M, C, rows, cols, col_blocks)
    if C < PERIODIC_COLUMNS:
        col_tile_mean_m2_periodic(x2, block, m0, m1, means, m2s, ahead)
    else:
        col_tile_mean_m2(x2, block, m0, m1, c0, c1, means, m2s, ahead)


@_helper
def col_merge(means, m2s, M, rows):
    """Chan-merge the partial rows of the row blocks, in order: ``(mean, m2)`` per channel."""
    row_blocks, C = means.shape
    if row_blocks == 0:
        return np.full(C, np.nan), np.zeros(C)
    mean = means[0].copy()
    m2 = m2s[0].copy()
    n = np.float64(min(rows, M))
    for block in range(1, row_blocks):
        n_b = np.float64(min(rows, M - block * rows))
        for c in range(C):
            _, mean[c], m2[c] = chan_merge(n, mean[c], m2[c], n_b, means[block, c], m2s[block, c])
        n += n_b
    return mean, m2


@_kernel
def cols_channel_stats(x2, tile, column_block, min_rows, ahead, parallel):
    M, C = x2.shape
    rows, cols, col_blocks, row_blocks = col_tiling(M, C, tile, column_block, min_rows)
    means = np.empty((row_blocks, C))
    m2s = np.empty((row_blocks, C))
    if parallel:
        for t in prange(np.uint64(row_blocks * col_blocks)):
            col_partial_stats(x2, t, rows, cols, col_blocks, means, m2s, ahead)
    else:
        for t in range(np.uint64(row_blocks * col_blocks)):
            col_partial_stats(x2, t, rows, cols, col_blocks, means, m2s, ahead)
    return col_merge(means, m2s, M, rows)


@_helper
def col_normalize_task(x2, t, rows, shift, scale, offset, out2, stream):
    """Normalize tile t of :func:`elementwise_tiling`, ``rows`` whole rows."""
    M, C = x2.shape
    _, m0, m1, _, _ = col_tile(t, M, C, rows, C, 1)
    x1, width, cols = flat_rows(x2, 0, C)
    out1 = out2.reshape(-1)
    if stream:  # whole rows: the tile is one contiguous run
        col_block_normalize(x1, out1, m0 * C, (m1 - m0) * C, C, shift, scale, offset)
        stream_fence()
        return
    if C < PERIODIC_COLUMNS:
        col_normalize_periodic(x1, out1, m0, m1, C, shift, scale, offset)
        return
    for m in range(m0, m1):
        r0 = row_start(m, width, 0)
        for c in range(cols):
            store(out1, r0 + c, (widen(x1[r0 + c]) - shift[c]) * scale[c] + offset[c])


@_helper
def col_normalize_periodic(x1, out1, m0, m1, C, shift, scale, offset):
    """The plain stores of :func:`col_normalize_task` for rows m0..m1 with C <
    PERIODIC_COLUMNS: flat, with the coefficients repeated over a period."""
    period = column_period(C)
    first, _, wholes, n, step = periodic_spans(m0, m1, C, period)
    shift_p, scale_p = periodic(shift, period - C), periodic(scale, period - C)
    offset_p = periodic(offset, period - C)
    for i in range(first, first + wholes, step):
        for j in range(step):
            store(out1, i + j, (widen(x1[i + j]) - shift_p[j]) * scale_p[j] + offset_p[j])
    for j in range(n - wholes):
        i = first + wholes
        store(out1, i + j, (widen(x1[i + j]) - shift_p[j]) * scale_p[j] + offset_p[j])


def col_block_normalize(x1, out1, first, total, C, shift, scale, offset):
    """``out1[first + k] = (x1[first + k] - shift[c]) * scale[c] + offset[c]`` for
    ``k < total``, c the column of element k: ``first`` starts a run of whole rows. Streamed
    as one run where the dtypes allow it, so only its two ends mix plain and streamed stores
    in a line."""


@overload(col_block_normalize, jit_options=_OPTIONS)
def _col_block_normalize(x1, out1, first, total, C, shift, scale, offset):
    def plain(x1, out1, first, total, C, shift, scale, offset):
        for k in range(total):
            c = k % C
            store(out1, first + k, (widen(x1[first + k]) - shift[c]) * scale[c] + offset[c])

    if not _streamable(out1, x1):
        return plain

    def streamed(x1, out1, first, total, C, shift, scale, offset):
        head, body, width = stream_split(out1, first, total)
        shift_p = run_coefficients(shift, total, C, head, width)
        scale_p = run_coefficients(scale, total, C, head, width)
        offset_p = run_coefficients(offset, total, C, head, width)
        for k in range(head):
            c = k % C
            out1[first + k] = (x1[first + k] - shift[c]) * scale[c] + offset[c]
        backwards = just_above(out1, x1)
        c, step = stream_columns(head, body, width, C, backwards)
        for v in range(body // width):
            i = stream_vector(first + head, body, width, v, backwards)
            stream_affine_columns(x1, i, out1, shift_p, scale_p, offset_p, c)
            c += step
            while c >= C:
                c -= C
            while c < 0:
                c += C
        for k in range(head + body, total):
            c = k % C
            out1[first + k] = (x1[first + k] - shift[c]) * scale[c] + offset[c]

    return streamed


def col_block_input_grad(dy1, x1, out1, first, total, C, mean, mean_dy, coef, scale):
    """:func:`col_block_normalize` for dx: ``(dy - mean_dy - (x - mean) * coef) * scale``."""


@overload(col_block_input_grad, jit_options=_OPTIONS)
def _col_block_input_grad(dy1, x1, out1, first, total, C, mean, mean_dy, coef, scale):
    def plain(dy1, x1, out1, first, total, C, mean, mean_dy, coef, scale):
        for k in range(total):
            c = k % C
            xc = widen(x1[first + k]) - mean[c]
            dx = (widen(dy1[first + k]) - mean_dy[c] - xc * coef[c]) * scale[c]
            store(out1, first + k, dx)

    if not _streamable(out1, dy1, x1):
        return plain

    def streamed(dy1, x1, out1, first, total, C, mean, mean_dy, coef, scale):
        head, body, width = stream_split(out1, first, total)
        mean_p = run_coefficients(mean, total, C, head, width)
        mean_dy_p = run_coefficients(mean_dy, total, C, head, width)
        coef_p = run_coefficients(coef, total, C, head, width)
        scale_p = run_coefficients(scale, total, C, head, width)
        for k in range(head):
            c = k % C
            xc = x1[first + k] - mean[c]
            out1[first + k] = (dy1[first + k] - mean_dy[c] - xc * coef[c]) * scale[c]
        backwards = just_above(out1, x1) or just_above(out1, dy1)
        c, step = stream_columns(head, body, width, C, backwards)
        for v in range(body // width):
            i = stream_vector(first + head, body, width, v, backwards)
            stream_input_grad_columns(dy1, x1, i, out1, mean_p, mean_dy_p, coef_p, scale_p, c)
            c += step
            while c >= C:
                c -= C
            while c < 0:
                c += C
        for k in range(head + body, total):
            c = k % C
            xc = x1[first + k] - mean[c]
            out1[first + k] = (dy1[first + k] - mean_dy[c] - xc * coef[c]) * scale[c]

    return streamed


@_kernel
def cols_normalize(x2, shift, scale, offset, out2, tile, column_block, min_rows, stream, parallel):
    M, C = x2.shape
    rows, row_blocks = elementwise_tiling(M, C, tile, column_block, min_rows)
    if parallel:
        for t in prange(np.uint64(row_blocks)):
            col_normalize_task(x2, t, rows, shift, scale, offset, out2, stream)
    else:
        for t in range(np.uint64(row_blocks)):
            col_normalize_task(x2, t, rows, shift, scale, offset, out2, stream)


@_kernel
def cols_forward_eval(
    x2,
    running_mean,
    running_var,
    weight,
    bias,
    eps,
    out2,
    stats,
    tile,
    column_block,
    min_rows,
    stream,
    parallel,
):
    """Evaluation in one call: :func:`eval_coefficients`, then the tiles of
    :func:`cols_normalize` (a kernel of its own, as :func:`rows_forward_eval` says why)."""
    shift, scale, offset = eval_coefficients(
        running_mean, running_var, weight, bias, eps, stats, out2
    )
    M, C = x2.shape
    rows, row_blocks = elementwise_tiling(M, C, tile, column_block, min_rows)
    if parallel:
        for t in prange(np.uint64(row_blocks)):
            col_normalize_task(x2, t, rows, shift, scale, offset, out2, stream)
    else:
        for t in range(np.uint64(row_blocks)):
            col_normalize_task(x2, t, rows, shift, scale, offset, out2, stream)


@_kernel
def cols_forward_train(
    x2,
    weight,
    bias,
    eps,
    out2,
    stats,
    running_mean,
    running_var,
    momentum,
    unbias,
    tile,
    column_block,
    min_rows,
    ahead,
    stream,
    parallel,
):
    """Statistics, then normalize; ``stats`` (3, C) receives mean, var and invstd, and the
    running statistics are updated (:func:`update_running_stats`; empty arrays for none).

    The normalize pass takes the tiles last to first: the last ones read are still in cache.
    With ``ahead`` > 0, each block of a statistics tile prefetches the values ``ahead``
    elements past it (:func:`col_tile_mean_m2`).
    """
    M, C = x2.shape
    rows, cols, col_blocks, row_blocks = col_tiling(M, C, tile, column_block, min_rows)
    tasks = row_blocks * col_blocks
    means = np.empty((row_blocks, C))
    m2s = np.empty((row_blocks, C))
    if parallel:
        for t in prange(np.uint64(tasks)):
            col_partial_stats(x2, t, rows, cols, col_blocks, means, m2s, ahead)
    else:
        for t in range(np.uint64(tasks)):
            col_partial_stats(x2, t, rows, cols, col_blocks, means, m2s, ahead)
    mean, m2 = col_merge(means, m2s, M, rows)
    weight64 = weight.astype(np.float64)
    mean_out, var_out, invstd_out = stats[0], stats[1], stats[2]
    scale = compute_empty(C, out2)
    offset = compute_empty(C, out2)
    for c in range(C):
        finish_channel(
            c, M, mean[c], m2[c], eps, weight64, bias, mean_out, var_out, invstd_out, scale,
            offset,
        )  # fmt: skip
    update_running_stats(running_mean, running_var, mean_out, var_out, momentum, unbias)
    rows, row_blocks = elementwise_tiling(M, C, tile, column_block, min_rows)
    last = np.uint64(row_blocks - 1)
    if parallel:
        for t in prange(np.uint64(row_blocks)):
            col_normalize_task(x2, last - t, rows, mean_out, scale, offset, out2, stream)
    else:
        for t in range(np.uint64(row_blocks)):
            col_normalize_task(x2, last - t, rows, mean_out, scale, offset, out2, stream)


@_helper
def col_grad_sums_periodic(dy2, x2, block, m0, m1, mean64, sums_dy, sums_dy_xmu):
    """:func:`col_partial_grad_sums` of a tile of whole rows with C < PERIODIC_COLUMNS."""
    M, C = x2.shape
    x1, dy1 = x2.reshape(-1), dy2.reshape(-1)
    period = column_period(C)
    first, quads, wholes, n, step = periodic_spans(m0, m1, C, period)
    step2, step3, quad = step + step, step + step + step, step + step + step + step
    centre = periodic(mean64, period - C)
    acc_dy = np.zeros(period)
    acc_dy_xmu = np.zeros(period)
    for i in range(first, first + quads, quad):
        for j in range(step):
            dy0, dy1_ = np.float64(widen(dy1[i + j])), np.float64(widen(dy1[i + step + j]))
            dy2_ = np.float64(widen(dy1[i + step2 + j]))
            dy3 = np.float64(widen(dy1[i + step3 + j]))
            acc_dy[j] += (dy0 + dy1_) + (dy2_ + dy3)
            acc_dy_xmu[j] += (
                dy0 * (widen(x1[i + j]) - centre[j]) + dy1_ * (widen(x1[i + step + j]) - centre[j])
            ) + (
                dy2_ * (widen(x1[i + step2 + j]) - centre[j])
                + dy3 * (widen(x1[i + step3 + j]) - centre[j])
            )
    for i in range(first + quads, first + wholes, step):
        for j in range(step):
            dy = np.float64(widen(dy1[i + j]))
            acc_dy[j] += dy
            acc_dy_xmu[j] += dy * (widen(x1[i + j]) - centre[j])
    for j in range(n - wholes):
        dy = np.float64(widen(dy1[first + wholes + j]))
        acc_dy[j] += dy
        acc_dy_xmu[j] += dy * (widen(x1[first + wholes + j]) - centre[j])
    fold_period(acc_dy, C, sums_dy[block])
    fold_period(acc_dy_xmu, C, sums_dy_xmu[block])


@_helper
def col_partial_grad_sums(
    dy2, x2, t, rows, cols, col_blocks, mean64, sums_dy, sums_dy_xmu, by_row
):
    """Partial rows of tile t, four rows per update of them (each a load and a store), or
    with ``by_row`` one (for inputs from memory: ``_config.GRAD_ROW_BYTES`` says why)."""
    M, C = x2.shape
    block, m0, m1, c0, c1 = col_tile(t, M, C, rows, cols, col_blocks)
    if C < PERIODIC_COLUMNS:
        col_grad_sums_periodic(dy2, x2, block, m0, m1, mean64, sums_dy, sums_dy_xmu)
        return
    sum_dy = sums_dy[block, c0:c1]
    sum_dy_xmu = sums_dy_xmu[block, c0:c1]
    mean = mean64[c0:c1]
    sum_dy[:] = 0.0
    sum_dy_xmu[:] = 0.0
    x1, width, cols = flat_rows(x2, c0, c1)
    dy1 = dy2.reshape(-1)
    quads = m0 if by_row else m0 + (m1 - m0) // 4 * 4
    for m in range(m0, quads, 4):
        r0 = row_start(m, width, c0)
        r1 = r0 + width
        r2 = r1 + width
        r3 = r2 + width
        for c in range(cols):
            dy0, dy1_ = np.float64(widen(dy1[r0 + c])), np.float64(widen(dy1[r1 + c]))
            dy2_, dy3 = np.float64(widen(dy1[r2 + c])), np.float64(widen(dy1[r3 + c]))
            sum_dy[c] += (dy0 + dy1_) + (dy2_ + dy3)
            sum_dy_xmu[c] += (
                dy0 * (widen(x1[r0 + c]) - mean[c]) + dy1_ * (widen(x1[r1 + c]) - mean[c])
            ) + (dy2_ * (widen(x1[r2 + c]) - mean[c]) + dy3 * (widen(x1[r3 + c]) - mean[c]))
    for m in range(quads, m1):
        r0 = row_start(m, width, c0)
        for c in range(cols):
            dy = np.float64(widen(dy1[r0 + c]))
            sum_dy[c] += dy
            sum_dy_xmu[c] += dy * (widen(x1[r0 + c]) - mean[c])


@_kernel
def cols_grad_sums(dy2, x2, mean, tile, column_block, min_rows, by_row, parallel):
    M, C = x2.shape
    mean64 = mean.astype(np.float64)
    rows, cols, col_blocks, row_blocks = col_tiling(M, C, tile, column_block, min_rows)
    sums_dy = np.empty((row_blocks, C))
    sums_dy_xmu = np.empty((row_blocks, C))
    if parallel:
        for t in prange(np.uint64(row_blocks * col_blocks)):
            col_partial_grad_sums(
                dy2, x2, t, rows, cols, col_blocks, mean64, sums_dy, sums_dy_xmu, by_row
            )
    else:
        for t in range(np.uint64(row_blocks * col_blocks)):
            col_partial_grad_sums(
                dy2, x2, t, rows, cols, col_blocks, mean64, sums_dy, sums_dy_xmu, by_row
            )
    sum_dy = np.zeros(C)
    sum_dy_xmu = np.zeros(C)
    for block in range(row_blocks):
        for c in range(C):
            sum_dy[c] += sums_dy[block, c]
            sum_dy_xmu[c] += sums_dy_xmu[block, c]
    return sum_dy, sum_dy_xmu


@_helper
def col_input_grad_task(dy2, x2, t, rows, coefs, out2, stream):
    """dx of tile t of :func:`elementwise_tiling`, ``rows`` whole rows."""
    M, C = x2.shape
    _, m0, m1, _, _ = col_tile(t, M, C, rows, C, 1)
    mean, mean_dy, coef, scale = coefs[0], coefs[1], coefs[2], coefs[3]
    x1, width, cols = flat_rows(x2, 0, C)
    dy1, out1 = dy2.reshape(-1), out2.reshape(-1)
    if stream:  # whole rows: the tile is one contiguous run
        coefficients = (mean, mean_dy, coef, scale)
        col_block_input_grad(dy1, x1, out1, m0 * C, (m1 - m0) * C, C, *coefficients)
        stream_fence()
        return
    if C < PERIODIC_COLUMNS:
        col_input_grad_periodic(dy1, x1, out1, m0, m1, C, mean, mean_dy, coef, scale)
        return
    for m in range(m0, m1):
        r0 = row_start(m, width, 0)
        for c in range(cols):
            xc = widen(x1[r0 + c]) - mean[c]
            store(out1, r0 + c, (widen(dy1[r0 + c]) - mean_dy[c] - xc * coef[c]) * scale[c])


@_helper
def col_input_grad_periodic(dy1, x1, out1, m0, m1, C, mean, mean_dy, coef, scale):
    """:func:`col_normalize_periodic` for dx."""
    period = column_period(C)
    first, _, wholes, n, step = periodic_spans(m0, m1, C, period)
    mean_p, mean_dy_p = periodic(mean, period - C), periodic(mean_dy, period - C)
    coef_p, scale_p = periodic(coef, period - C), periodic(scale, period - C)
    for i in range(first, first + wholes, step):
        for j in range(step):
            xc = widen(x1[i + j]) - mean_p[j]
            store(out1, i + j, (widen(dy1[i + j]) - mean_dy_p[j] - xc * coef_p[j]) * scale_p[j])
    for j in range(n - wholes):
        i = first + wholes
        xc = widen(x1[i + j]) - mean_p[j]
        store(out1, i + j, (widen(dy1[i + j]) - mean_dy_p[j] - xc * coef_p[j]) * scale_p[j])


@_kernel
def cols_input_grad(dy2, x2, coefs, out2, tile, column_block, min_rows, stream, parallel):
    M, C = x2.shape
    rows, row_blocks = elementwise_tiling(M, C, tile, column_block, min_rows)
    if parallel:
        for t in prange(np.uint64(row_blocks)):
            col_input_grad_task(dy2, x2, t, rows, coefs, out2, stream)
    else:
        for t in range(np.uint64(row_blocks)):
            col_input_grad_task(dy2, x2, t, rows, coefs, out2, stream)


@_kernel
def cols_backward_train(
    dy2, x2, mean, invstd, weight, out2, tile, column_block, min_rows, by_row, stream, parallel
):
    """Fused gradient sums (``by_row`` as in :func:`col_partial_grad_sums`) and dx (tiles
    last to first); returns float64 sums."""
    M, C = x2.shape
    mean64, invstd64 = mean.astype(np.float64), invstd.astype(np.float64)
    weight64 = weight.astype(np.float64)
    rows, cols, col_blocks, row_blocks = col_tiling(M, C, tile, column_block, min_rows)
    tasks = row_blocks * col_blocks
    sums_dy = np.empty((row_blocks, C))
    sums_dy_xmu = np.empty((row_blocks, C))
    if parallel:
        for t in prange(np.uint64(tasks)):
            col_partial_grad_sums(
                dy2, x2, t, rows, cols, col_blocks, mean64, sums_dy, sums_dy_xmu, by_row
            )
    else:
        for t in range(np.uint64(tasks)):
            col_partial_grad_sums(
                dy2, x2, t, rows, cols, col_blocks, mean64, sums_dy, sums_dy_xmu, by_row
            )
    sum_dy = np.zeros(C)
    sum_dy_xmu = np.zeros(C)
    for block in range(row_blocks):
        for c in range(C):
            sum_dy[c] += sums_dy[block, c]
            sum_dy_xmu[c] += sums_dy_xmu[block, c]
    coefs = compute_empty((4, C), out2)
    for c in range(C):
        grad_coefficients(c, M, sum_dy[c], sum_dy_xmu[c], mean64, invstd64, weight64, coefs)
    rows, row_blocks = elementwise_tiling(M, C, tile, column_block, min_rows)
    last = np.uint64(row_blocks - 1)
    if parallel:
        for t in prange(np.uint64(row_blocks)):
            col_input_grad_task(dy2, x2, last - t, rows, coefs, out2, stream)
    else:
        for t in range(np.uint64(row_blocks)):
            col_input_grad_task(dy2, x2, last - t, rows, coefs, out2, stream)
    return sum_dy, sum_dy_xmu
