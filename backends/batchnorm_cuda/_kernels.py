"""The CUDA kernels, built lazily: nothing is compiled until a kernel is first launched.

Every array argument is an ``(outer, C, inner)`` view with any strides. Two thread mappings:

* channels-first (``inner > 1``, e.g. NCHW as ``(N, C, H*W)``): threads run along the
  contiguous inner axis of one channel;
* channels-last (``inner == 1``, e.g. NHWC as ``(N*H*W, C, 1)``): threads run along the
  channels of one row, so a warp reads consecutive channels.

Reductions write one partial result per (split, channel) into ``[splits, C]`` buffers and a
per-channel kernel merges them in split order, so results are deterministic (no float
atomics). Statistics accumulate ``x - x[0, c, 0]``: a float32 Welford mean of values near
1e4 would round every update at 1e-3, swamping a spread of 1e-2; the shifted values are
exact (Sterbenz) and small.

Loops use 64-bit indices so arrays over 2**31 elements work. Elementwise math is done in
``acc`` (float32 for float16/float32 input, float64 for float64); the per-channel kernels
work in float64, which costs nothing at C values.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

from numba import cuda, float32, float64, int64

#: Accumulation type of each input dtype name.
ACCUMULATOR = {"float16": float32, "float32": float32, "float64": float64}


def _chan_merge_for(acc):
    """Chan's pairwise merge of (count, mean, M2) summaries, in ``acc``."""

    @cuda.jit(device=True)
    def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
        if n_b == 0:
            return n_a, mean_a, m2_a
        if n_a == 0:
            return n_b, mean_b, m2_b
        n = n_a + n_b
        delta = mean_b - mean_a
        # n_a * n_b / n written as n_a * (n_b / n): the integer product could overflow.
        frac_b = acc(n_b) / acc(n)
        return n, mean_a + delta * frac_b, m2_a + m2_b + delta * delta * acc(n_a) * frac_b

    return chan_merge


@functools.cache
def reduction_kernels(acc, threads: int) -> SimpleNamespace:
    """Statistics, gradient-sum and elementwise kernels accumulating in numba type ``acc``.

    ``threads`` is the block size every launch uses (``blockDim.x * blockDim.y``): the
    length of the shared-memory arrays of the block merge.
    """
    chan_merge = _chan_merge_for(acc)

    @cuda.jit(device=True)
    def welford_add(n, mean, m2, value):
        n += 1
        delta = value - mean
        mean += delta / acc(n)
        m2 += delta * (value - mean)
        return n, mean, m2

    # The block merges use shared memory only (no warp shuffles), so they also run in the
    # simulator. Each step folds the upper half of the live threads into the lower half;
    # it stops when ``keep`` results are left (1, or one per channel of the tile).
    @cuda.jit(device=True)
    def block_merge_stats(sh_n, sh_mean, sh_m2, tid, keep):
        half = threads // 2
        while half >= keep:
            if tid < half:
                n, mean, m2 = chan_merge(
                    sh_n[tid],
                    sh_mean[tid],
                    sh_m2[tid],
                    sh_n[tid + half],
                    sh_mean[tid + half],
                    sh_m2[tid + half],
                )
                sh_n[tid] = n
                sh_mean[tid] = mean
                sh_m2[tid] = m2
            cuda.syncthreads()
            half //= 2

    @cuda.jit(device=True)
    def block_sum_pair(sh_a, sh_b, tid, keep):
        half = threads // 2
        while half >= keep:
            if tid < half:
                sh_a[tid] += sh_a[tid + half]
                sh_b[tid] += sh_b[tid + half]
            cuda.syncthreads()
            half //= 2

    @cuda.jit
    def stats_channels_first(x, part_n, part_mean, part_m2):
        sh_n = cuda.shared.array(threads, int64)
        sh_mean = cuda.shared.array(threads, acc)
        sh_m2 = cuda.shared.array(threads, acc)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        bx, by = cuda.blockDim.x, cuda.blockDim.y
        c = cuda.blockIdx.x
        shift = acc(x[0, c, 0])
        n, mean, m2 = int64(0), acc(0), acc(0)
        for m in range(int64(cuda.blockIdx.y) * by + ty, x.shape[0], int64(cuda.gridDim.y) * by):
            for k in range(tx, x.shape[2], bx):
                n, mean, m2 = welford_add(n, mean, m2, acc(x[m, c, k]) - shift)
        tid = ty * bx + tx
        sh_n[tid], sh_mean[tid], sh_m2[tid] = n, mean, m2
        cuda.syncthreads()
        block_merge_stats(sh_n, sh_mean, sh_m2, tid, 1)
        if tid == 0:
            split = cuda.blockIdx.y
            part_n[split, c] = sh_n[0]
            part_mean[split, c] = sh_mean[0]
            part_m2[split, c] = sh_m2[0]

    @cuda.jit
    def stats_channels_last(x, part_n, part_mean, part_m2):
        sh_n = cuda.shared.array(threads, int64)
        sh_mean = cuda.shared.array(threads, acc)
        sh_m2 = cuda.shared.array(threads, acc)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        bx, by = cuda.blockDim.x, cuda.blockDim.y
        c = int64(cuda.blockIdx.x) * bx + tx
        n, mean, m2 = int64(0), acc(0), acc(0)
        if c < x.shape[1]:
            shift = acc(x[0, c, 0])
            for m in range(
                int64(cuda.blockIdx.y) * by + ty, x.shape[0], int64(cuda.gridDim.y) * by
            ):
                for k in range(x.shape[2]):
                    n, mean, m2 = welford_add(n, mean, m2, acc(x[m, c, k]) - shift)
        tid = ty * bx + tx
        sh_n[tid], sh_mean[tid], sh_m2[tid] = n, mean, m2
        cuda.syncthreads()
        block_merge_stats(sh_n, sh_mean, sh_m2, tid, bx)
        if ty == 0 and c < x.shape[1]:
            split = cuda.blockIdx.y
            part_n[split, c] = sh_n[tx]
            part_mean[split, c] = sh_mean[tx]
            part_m2[split, c] = sh_m2[tx]

    @cuda.jit
    def grad_sums_channels_first(dy, x, mean, part_dy, part_dy_xmu):
        sh_dy = cuda.shared.array(threads, acc)
        sh_dy_xmu = cuda.shared.array(threads, acc)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        bx, by = cuda.blockDim.x, cuda.blockDim.y
        c = cuda.blockIdx.x
        mu = acc(mean[c])
        sum_dy, sum_dy_xmu = acc(0), acc(0)
        for m in range(int64(cuda.blockIdx.y) * by + ty, x.shape[0], int64(cuda.gridDim.y) * by):
            for k in range(tx, x.shape[2], bx):
                g = acc(dy[m, c, k])
                sum_dy += g
                sum_dy_xmu += g * (acc(x[m, c, k]) - mu)
        tid = ty * bx + tx
        sh_dy[tid], sh_dy_xmu[tid] = sum_dy, sum_dy_xmu
        cuda.syncthreads()
        block_sum_pair(sh_dy, sh_dy_xmu, tid, 1)
        if tid == 0:
            split = cuda.blockIdx.y
            part_dy[split, c], part_dy_xmu[split, c] = sh_dy[0], sh_dy_xmu[0]

    @cuda.jit
    def grad_sums_channels_last(dy, x, mean, part_dy, part_dy_xmu):
        sh_dy = cuda.shared.array(threads, acc)
        sh_dy_xmu = cuda.shared.array(threads, acc)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        bx, by = cuda.blockDim.x, cuda.blockDim.y
        c = int64(cuda.blockIdx.x) * bx + tx
        sum_dy, sum_dy_xmu = acc(0), acc(0)
        if c < x.shape[1]:
            mu = acc(mean[c])
            for m in range(
                int64(cuda.blockIdx.y) * by + ty, x.shape[0], int64(cuda.gridDim.y) * by
            ):
                for k in range(x.shape[2]):
                    g = acc(dy[m, c, k])
                    sum_dy += g
                    sum_dy_xmu += g * (acc(x[m, c, k]) - mu)
        tid = ty * bx + tx
        sh_dy[tid], sh_dy_xmu[tid] = sum_dy, sum_dy_xmu
        cuda.syncthreads()
        block_sum_pair(sh_dy, sh_dy_xmu, tid, bx)
        if ty == 0 and c < x.shape[1]:
            split = cuda.blockIdx.y
            part_dy[split, c], part_dy_xmu[split, c] = sh_dy[tx], sh_dy_xmu[tx]

    # Elementwise passes. ``has_*`` flags stand for None parameters (the caller passes
    # ``invstd`` in their place, never read), so one compiled kernel serves every case.
    #
    # y = (x - center) * scale + shift, with center the mean rounded to ``acc``: a float64
    # mean (the batch mean as merged, a float64 running mean) has its rounding moved into
    # shift, so y is normalized with the float64 mean and ``x - center`` stays exact. A
    # float32 center alone would move y by ``|mean| * invstd * eps(float32)`` (6e-4 for values
    # near 1e4 with a spread of 1). No correction where there is no rounding, the mean is
    # infinite (inf - inf), or beyond acc's range (center is inf: y is then -inf or inf, as
    # (x - mean) * scale rounded would be); as the numba backend's ``exact_offset``.
    @cuda.jit(device=True)
    def affine(c, mean, invstd, weight, bias, has_mean, has_weight, has_bias):
        center = acc(mean[c]) if has_mean else acc(0)
        scale = acc(invstd[c]) * acc(weight[c]) if has_weight else acc(invstd[c])
        offset = float64(bias[c]) if has_bias else float64(0)
        if has_mean:
            rounding = float64(mean[c]) - float64(center)
            if rounding != 0 and math.isfinite(center):
                offset -= rounding * float64(scale)
        return center, scale, acc(offset)

    @cuda.jit
    def normalize_channels_first(
        x, mean, invstd, weight, bias, has_mean, has_weight, has_bias, out
    ):
        channels = x.shape[1]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        bx, by = cuda.blockDim.x, cuda.blockDim.y
        for row in range(
            int64(cuda.blockIdx.x) * by + ty, x.shape[0] * channels, int64(cuda.gridDim.x) * by
        ):
            m = row // channels
            c = row - m * channels
            center, scale, shift = affine(
                c, mean, invstd, weight, bias, has_mean, has_weight, has_bias
            )
            for k in range(tx, x.shape[2], bx):
                out[m, c, k] = (acc(x[m, c, k]) - center) * scale + shift

    @cuda.jit
    def normalize_channels_last(
        x, mean, invstd, weight, bias, has_mean, has_weight, has_bias, out
    ):
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        bx, by = cuda.blockDim.x, cuda.blockDim.y
        for c in range(int64(cuda.blockIdx.x) * bx + tx, x.shape[1], int64(cuda.gridDim.x) * bx):
            center, scale, shift = affine(
                c, mean, invstd, weight, bias, has_mean, has_weight, has_bias
            )
            for m in range(
                int64(cuda.blockIdx.y) * by + ty, x.shape[0], int64(cuda.gridDim.y) * by
            ):
                for k in range(x.shape[2]):
                    out[m, c, k] = (acc(x[m, c, k]) - center) * scale + shift

    # dx = weight * invstd * (dy - sum_dy / n - (x - mean) * invstd**2 * sum_dy_xmu / n)
    @cuda.jit(device=True)
    def grad_coefficients(c, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, inv_count):
        inv = acc(invstd[c])
        scale = inv * acc(weight[c]) if has_weight else inv
        mean_dy = acc(sum_dy[c]) * inv_count
        xmu_coef = inv * inv * acc(sum_dy_xmu[c]) * inv_count
        return acc(mean[c]), scale, mean_dy, xmu_coef

    @cuda.jit
    def input_grad_channels_first(
        dy, x, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, inv_count, out
    ):
        channels = x.shape[1]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        bx, by = cuda.blockDim.x, cuda.blockDim.y
        for row in range(
            int64(cuda.blockIdx.x) * by + ty, x.shape[0] * channels, int64(cuda.gridDim.x) * by
        ):
            m = row // channels
            c = row - m * channels
            mu, scale, mean_dy, xmu_coef = grad_coefficients(
                c, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, acc(inv_count)
            )
            for k in range(tx, x.shape[2], bx):
                out[m, c, k] = (
                    acc(dy[m, c, k]) - mean_dy - (acc(x[m, c, k]) - mu) * xmu_coef
                ) * scale

    @cuda.jit
    def input_grad_channels_last(
        dy, x, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, inv_count, out
    ):
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        bx, by = cuda.blockDim.x, cuda.blockDim.y
        for c in range(int64(cuda.blockIdx.x) * bx + tx, x.shape[1], int64(cuda.gridDim.x) * bx):
            mu, scale, mean_dy, xmu_coef = grad_coefficients(
                c, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, acc(inv_count)
            )
            for m in range(
                int64(cuda.blockIdx.y) * by + ty, x.shape[0], int64(cuda.gridDim.y) * by
            ):
                for k in range(x.shape[2]):
                    out[m, c, k] = (
                        acc(dy[m, c, k]) - mean_dy - (acc(x[m, c, k]) - mu) * xmu_coef
                    ) * scale

    return SimpleNamespace(
        stats_channels_first=stats_channels_first,
        stats_channels_last=stats_channels_last,
        grad_sums_channels_first=grad_sums_channels_first,
        grad_sums_channels_last=grad_sums_channels_last,
        normalize_channels_first=normalize_channels_first,
        normalize_channels_last=normalize_channels_last,
        input_grad_channels_first=input_grad_channels_first,
        input_grad_channels_last=input_grad_channels_last,
    )


#: Dimensions of the strided copy kernel; arrays with fewer are padded with length-1 axes.
COPY_NDIM = 8


@functools.cache
def channel_kernels() -> SimpleNamespace:
    """One-thread-per-channel kernels (float64 arithmetic) and the strided copy."""
    chan_merge = _chan_merge_for(float64)

    @cuda.jit(device=True)
    def merged_stats(x, part_n, part_mean, part_m2, c):
        n, mean, m2 = int64(0), float64(0), float64(0)
        for split in range(part_n.shape[0]):
            n, mean, m2 = chan_merge(
                n,
                mean,
                m2,
                part_n[split, c],
                float64(part_mean[split, c]),
                float64(part_m2[split, c]),
            )
        shift = float64(x[0, c, 0]) if x.size > 0 else 0.0
        return shift + mean, m2

    @cuda.jit
    def merge_stat_partials(x, part_n, part_mean, part_m2, mean_out, m2_out):
        c = cuda.grid(1)
        if c < mean_out.shape[0]:
            mean_out[c], m2_out[c] = merged_stats(x, part_n, part_mean, part_m2, c)

    # merge_stat_partials and finish_stats in one launch, for forward_train; the float64 mean
    # goes to normalize too (see affine)
    @cuda.jit
    def merge_and_finish_stats(
        x, part_n, part_mean, part_m2, count, eps, mean64_out, mean_out, var_out, invstd_out
    ):
        c = cuda.grid(1)
        if c < mean_out.shape[0]:
            mean, m2 = merged_stats(x, part_n, part_mean, part_m2, c)
            var = max(m2 / count, 0.0)
            mean64_out[c] = mean
            mean_out[c] = mean
            var_out[c] = var
            invstd_out[c] = 1.0 / math.sqrt(var + eps)

    @cuda.jit
    def sum_partials(part_a, part_b, out_a, out_b):
        c = cuda.grid(1)
        if c < out_a.shape[0]:
            total_a, total_b = float64(0), float64(0)
            for split in range(part_a.shape[0]):
                total_a += float64(part_a[split, c])
                total_b += float64(part_b[split, c])
            out_a[c] = total_a
            out_b[c] = total_b

    @cuda.jit
    def finish_stats(mean, m2, count, eps, mean_out, var_out, invstd_out):
        c = cuda.grid(1)
        if c < mean.shape[0]:
            var = max(float64(m2[c]) / count, 0.0)
            mean_out[c] = mean[c]
            var_out[c] = var
            invstd_out[c] = 1.0 / math.sqrt(var + eps)

    @cuda.jit
    def param_grads(sum_dy, sum_dy_xmu, invstd, dweight, dbias):
        c = cuda.grid(1)
        if c < sum_dy.shape[0]:
            dweight[c] = float64(sum_dy_xmu[c]) * float64(invstd[c])
            dbias[c] = sum_dy[c]

    @cuda.jit
    def update_running_stats(running_mean, running_var, batch_mean, batch_var, unbias, momentum):
        c = cuda.grid(1)
        if c < running_mean.shape[0]:
            keep = 1.0 - momentum
            running_mean[c] = keep * float64(running_mean[c]) + momentum * float64(batch_mean[c])
            running_var[c] = (
                keep * float64(running_var[c]) + momentum * float64(batch_var[c]) * unbias
            )

    @cuda.jit
    def copy_strided(dst, src):
        start = int64(cuda.grid(1))
        for flat in range(start, src.size, int64(cuda.gridsize(1))):
            rest = flat
            rest, i7 = divmod(rest, src.shape[7])
            rest, i6 = divmod(rest, src.shape[6])
            rest, i5 = divmod(rest, src.shape[5])
            rest, i4 = divmod(rest, src.shape[4])
            rest, i3 = divmod(rest, src.shape[3])
            rest, i2 = divmod(rest, src.shape[2])
            i0, i1 = divmod(rest, src.shape[1])
            dst[i0, i1, i2, i3, i4, i5, i6, i7] = src[i0, i1, i2, i3, i4, i5, i6, i7]

    return SimpleNamespace(
        merge_stat_partials=merge_stat_partials,
        merge_and_finish_stats=merge_and_finish_stats,
        sum_partials=sum_partials,
        finish_stats=finish_stats,
        param_grads=param_grads,
        update_running_stats=update_running_stats,
        copy_strided=copy_strided,
    )
