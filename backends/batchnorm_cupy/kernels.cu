// Batch-norm kernels of the `cupy` backend. cupy.RawModule compiles them with NVRTC on first
// use, one module per data type (see _kernels.py); the tests compile-check them with nvcc.
//
// Every array is a strided 3-D view (outer, C, inner) given as a pointer to element [0, 0, 0]
// and three element strides (any sign). For one channel, the positions to visit form the
// plane (outer, inner), flattened as r = m * inner + l. The 2-D grid is
//   blockIdx.x: a split of the plane, positions [blockIdx.x * chunk, (blockIdx.x + 1) * chunk)
//   blockIdx.y: a tile of channels_per_block channels (looping when there are > gridDim.y)
// and a block of BN_BLOCK_THREADS threads is channels_per_block slots x `lanes` lanes:
// thread t works on channel tile * channels_per_block + t % channels_per_block and visits the
// block's positions starting at t / channels_per_block, stepping by lanes. One slot suits
// channels-first data (consecutive threads read consecutive inner positions); 32 slots suit
// channels-last data (consecutive threads read consecutive channels of one row). A thread
// keeps its channel for a whole tile, so per-channel values are read once, not per element.
//
// Reductions write one partial per (split, channel) into [splits, C] buffers; a finishing
// kernel merges the splits in order, so results are deterministic (no float atomics).
// float16 is loaded into float; float and float16 accumulate in float, double in double.
//
// The per-channel kernels (one thread per channel) take the caller's parameters and running
// statistics as they are: a pointer to element 0, the element size in bytes (2, 4 or 8 for
// float16, float32, float64) and a stride in elements. So no conversion or copy runs before
// them, and each replaces the several CuPy operations of the Backend default it stands for,
// with the same operations in the same dtypes (the same results, bit for bit).

#ifndef BN_BLOCK_THREADS
#error "define BN_BLOCK_THREADS (batchnorm_cupy._launch.BLOCK_THREADS)"
#endif
#ifndef BN_UNROLL
#error "define BN_UNROLL (batchnorm_cupy._launch.UNROLL)"
#endif

// IEEE binary16 storage. Converted with PTX instructions so that no header is needed, which
// keeps the NVRTC compile independent of where the CUDA headers are installed.
struct half_bits {
    unsigned short bits;
};

template <typename T>
struct accumulator {
    using type = float;
};
template <>
struct accumulator<double> {
    using type = double;
};
template <typename T>
using acc_t = typename accumulator<T>::type;

// Resident blocks per multiprocessor the data kernels limit their registers for: with
// BN_UNROLL loads in flight per thread, 1024 threads of 4-byte (768 of 8-byte) elements keep
// enough bytes in flight to saturate memory bandwidth; double needs more registers.
template <typename T>
constexpr int min_blocks_per_sm = sizeof(T) == 8 ? 3 : 4;

__device__ __forceinline__ float to_acc(half_bits v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

__device__ __forceinline__ void store(half_bits* p, float v) {
    unsigned short bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(v));
    p->bits = bits;
}
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
// Rounded once, as NumPy's and CuPy's float64 -> float16 casts are (PTX converts f64 to f16
// directly only from sm_70 on): rounding to odd into float keeps enough bits (24 > 11 + 2) for
// the rounding to nearest into half to come out as if taken from the double.
__device__ __forceinline__ void store(half_bits* p, double v) {
    float f = __double2float_rz(v);
    if (double(f) != v) f = __uint_as_float(__float_as_uint(f) | 1u);  // a NaN stays NaN
    store(p, f);
}

// Products that round on their own, as separate CuPy/NumPy operations do: nvcc would otherwise
// contract a product and the sum it feeds into one fused multiply-add, rounded once.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Element c of a per-channel vector of any float dtype (see the top of this file), as A.
template <typename A>
__device__ __forceinline__ A load_any(const void* p, int itemsize, long long stride, long long c) {
    const long long i = c * stride;
    if (itemsize == 2) return A(to_acc(static_cast<const half_bits*>(p)[i]));
    if (itemsize == 4) return A(static_cast<const float*>(p)[i]);
    return A(static_cast<const double*>(p)[i]);
}

template <typename A>
__device__ __forceinline__ void store_any(void* p, int itemsize, long long stride, long long c,
                                          A v) {
    const long long i = c * stride;
    if (itemsize == 2) {
        store(static_cast<half_bits*>(p) + i, v);
    } else if (itemsize == 4) {
        static_cast<float*>(p)[i] = float(v);
    } else {
        static_cast<double*>(p)[i] = double(v);
    }
}

// factor * element c of a float or double vector, rounded in that vector's dtype (a float16
// vector is not handled: the backend leaves those to CuPy). Returned exactly, as a double.
__device__ __forceinline__ double scaled_any(const void* p, int itemsize, long long stride,
                                             long long c, double factor) {
    if (itemsize == 4) return mul_rn(float(factor), load_any<float>(p, itemsize, stride, c));
    return mul_rn(factor, load_any<double>(p, itemsize, stride, c));
}

// 1 / sqrt(max(var, 0) + eps) in V, eps rounded to V first.
template <typename V>
__device__ __forceinline__ V invstd_of(V var, double eps) {
    var = var < V(0) ? V(0) : var;  // a NaN stays NaN
    return V(1) / sqrt(var + V(eps));
}

// Which channel and which positions of the plane one thread of a block works on.
struct BlockShare {
    int slot, lane, lanes;
    long long first, end;  // first position of this thread, end of the block's split

    __device__ BlockShare(int channels_per_block, long long chunk, long long plane) {
        slot = threadIdx.x % channels_per_block;
        lane = threadIdx.x / channels_per_block;
        lanes = BN_BLOCK_THREADS / channels_per_block;
        const long long begin = blockIdx.x * chunk;
        end = min(plane, begin + chunk);
        first = begin + lane;
    }
};

// BN_UNROLL consecutive positions of one thread, so that it has BN_UNROLL loads in flight.
struct Batch {
    long long m[BN_UNROLL], l[BN_UNROLL];
    bool valid[BN_UNROLL];
};

// Calls visit(batch) for the positions first, first + step, ... < end, computing (m, l) by
// one division per thread and additions after that.
template <typename Visit>
__device__ __forceinline__ void for_each_batch(long long first, long long end, long long step,
                                               long long inner, Visit visit) {
    if (first >= end) return;
    long long m = first / inner, l = first % inner;
    const long long step_m = step / inner, step_l = step % inner;
    for (long long r = first; r < end; r += BN_UNROLL * step) {
        Batch batch;
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u) {
            batch.valid[u] = r + u * step < end;
            batch.m[u] = m;
            batch.l[u] = l;
            m += step_m;
            l += step_l;
            if (l >= inner) {
                l -= inner;
                ++m;
            }
        }
        visit(batch);
    }
}

// Count, mean and M2 (sum of squared deviations) of a set of values.
template <typename A>
struct MeanM2 {
    A count, mean, m2;

    // Chan, Golub and LeVeque's pairwise update, valid for any split of the values. Counts
    // are whole numbers, exact in float below 2**24: a thread's share stays far below that
    // (the launch plan gives each thread at most the plane over splits x lanes).
    __device__ void merge(const MeanM2& other) {
        if (other.count == 0) return;
        if (count == 0) {
            *this = other;
            return;
        }
        const A total = count + other.count;
        const A delta = other.mean - mean;
        const A other_share = other.count / total;
        mean += delta * other_share;
        m2 += other.m2 + delta * delta * count * other_share;
        count = total;
    }
};

template <typename A>
struct SumPair {
    A dy, dy_xmu;

    __device__ void merge(const SumPair& other) {
        dy += other.dy;
        dy_xmu += other.dy_xmu;
    }
};

// Merges the states of all lanes of each slot (a tree in a fixed order: deterministic).
// On return shared[slot] holds the block's result for that slot.
template <typename State>
__device__ void merge_lanes(State* shared, const BlockShare& share, int channels_per_block) {
    __syncthreads();
    for (int half = share.lanes / 2; half > 0; half /= 2) {
        if (share.lane < half) {
            shared[threadIdx.x].merge(shared[threadIdx.x + half * channels_per_block]);
        }
        __syncthreads();
    }
}

template <typename T>
__global__ void __launch_bounds__(BN_BLOCK_THREADS, min_blocks_per_sm<T>)
channel_stats_partial(const T* __restrict__ x, long long x_outer_stride,
                      long long x_channel_stride, long long x_inner_stride, long long outer,
                      int channels, long long inner, int channels_per_block, long long chunk,
                      acc_t<T>* __restrict__ shift, acc_t<T>* __restrict__ partial_mean,
                      acc_t<T>* __restrict__ partial_m2) {
    using A = acc_t<T>;
    __shared__ MeanM2<A> shared[BN_BLOCK_THREADS];
    const BlockShare share(channels_per_block, chunk, outer * inner);
    for (long long tile = blockIdx.y; tile * channels_per_block < channels; tile += gridDim.y) {
        const long long c = tile * channels_per_block + share.slot;
        MeanM2<A> state = {0, 0, 0};
        if (c < channels && outer * inner > 0) {
            const T* xc = x + c * x_channel_stride;
            // Values are accumulated minus one value of their own channel (x[0, c, 0]). In
            // float a mean near 1e4 is rounded to 1e-3, which would swamp a spread of 1e-2;
            // the shifted values are of the order of the spread, so the rounding scales with
            // it. The finishing kernel adds the shift back to the mean.
            const A k = to_acc(xc[0]);
            if (blockIdx.x == 0 && share.lane == 0) shift[c] = k;
            for_each_batch(share.first, share.end, share.lanes, inner, [&](const Batch& b) {
                // Mean and M2 of the batch by two passes over registers, then one merge:
                // one division per batch instead of one per value (Welford).
                A v[BN_UNROLL];
                A sum = 0;
                int n = 0;
#pragma unroll
                for (int u = 0; u < BN_UNROLL; ++u) {
                    v[u] = b.valid[u]
                               ? to_acc(xc[b.m[u] * x_outer_stride + b.l[u] * x_inner_stride]) - k
                               : A(0);
                    sum += v[u];
                    n += b.valid[u];
                }
                MeanM2<A> batch = {A(n), sum / A(n), 0};
#pragma unroll
                for (int u = 0; u < BN_UNROLL; ++u) {
                    const A d = v[u] - batch.mean;
                    batch.m2 += b.valid[u] ? d * d : A(0);
                }
                state.merge(batch);
            });
        }
        shared[threadIdx.x] = state;
        merge_lanes(shared, share, channels_per_block);
        if (share.lane == 0 && c < channels) {
            partial_mean[(long long)blockIdx.x * channels + c] = shared[share.slot].mean;
            partial_m2[(long long)blockIdx.x * channels + c] = shared[share.slot].m2;
        }
        __syncthreads();  // shared is reused by the next tile
    }
}

// Merges the [splits, C] partials (of values minus shift) in split order. Writes mean, and
// each of m2, the biased variance and invstd = 1 / sqrt(var + eps) whose pointer is not null.
// With scale and offset (forward-train, which passes var and invstd too) it also writes
// normalize's coefficients for y = (x - shift) * scale + offset: scale = weight * invstd (in A)
// and offset = bias - (mean - shift) * scale, taken in double from the mean of the shifted
// values, which is of the order of the spread. y normalized with the mean rounded to A instead
// would be off by |mean| * invstd * eps(A): 6e-4 for float values near 1e4 with a spread of 1.
// weight and bias are vectors of any float dtype (null: 1 and 0).
template <typename A>
__global__ void channel_stats_finish(const A* __restrict__ shift,
                                     const A* __restrict__ partial_mean,
                                     const A* __restrict__ partial_m2, int splits, int channels,
                                     long long plane, long long chunk, double eps,
                                     const void* __restrict__ weight, int weight_itemsize,
                                     long long weight_stride, const void* __restrict__ bias,
                                     int bias_itemsize, long long bias_stride,
                                     A* __restrict__ mean, A* __restrict__ m2, A* __restrict__ var,
                                     A* __restrict__ invstd, A* __restrict__ scale,
                                     A* __restrict__ offset) {
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < channels;
         c += (long long)gridDim.x * blockDim.x) {
        MeanM2<A> total = {0, 0, 0};
        for (int s = 0; s < splits; ++s) {
            const long long count = max(0LL, min(chunk, plane - s * chunk));
            total.merge({A(count), partial_mean[s * (long long)channels + c],
                         partial_m2[s * (long long)channels + c]});
        }
        mean[c] = plane > 0 ? shift[c] + total.mean : total.mean;
        if (m2 != nullptr) m2[c] = total.m2;
        A biased = total.m2 / A(plane);
        biased = biased < 0 ? A(0) : biased;  // a NaN stays NaN
        if (var != nullptr) var[c] = biased;
        const A inv = A(1) / sqrt(biased + A(eps));
        if (invstd != nullptr) invstd[c] = inv;
        if (scale != nullptr && offset != nullptr) {
            const A s =
                weight != nullptr ? load_any<A>(weight, weight_itemsize, weight_stride, c) * inv
                                  : inv;
            const double b =
                bias != nullptr ? load_any<double>(bias, bias_itemsize, bias_stride, c) : 0.0;
            scale[c] = s;
            offset[c] = A(b - double(total.mean) * double(s));
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(BN_BLOCK_THREADS, min_blocks_per_sm<T>)
grad_sums_partial(const T* __restrict__ dy, long long dy_outer_stride, long long dy_channel_stride,
                  long long dy_inner_stride, const T* __restrict__ x, long long x_outer_stride,
                  long long x_channel_stride, long long x_inner_stride, long long outer,
                  int channels, long long inner, int channels_per_block, long long chunk,
                  const acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ partial_dy,
                  acc_t<T>* __restrict__ partial_dy_xmu) {
    using A = acc_t<T>;
    __shared__ SumPair<A> shared[BN_BLOCK_THREADS];
    const BlockShare share(channels_per_block, chunk, outer * inner);
    for (long long tile = blockIdx.y; tile * channels_per_block < channels; tile += gridDim.y) {
        const long long c = tile * channels_per_block + share.slot;
        SumPair<A> state = {0, 0};
        if (c < channels) {
            const T* dyc = dy + c * dy_channel_stride;
            const T* xc = x + c * x_channel_stride;
            const A mu = mean[c];
            for_each_batch(share.first, share.end, share.lanes, inner, [&](const Batch& b) {
                A g[BN_UNROLL], v[BN_UNROLL];
#pragma unroll
                for (int u = 0; u < BN_UNROLL; ++u) {
                    g[u] = b.valid[u]
                               ? to_acc(dyc[b.m[u] * dy_outer_stride + b.l[u] * dy_inner_stride])
                               : A(0);
                    v[u] = b.valid[u]
                               ? to_acc(xc[b.m[u] * x_outer_stride + b.l[u] * x_inner_stride])
                               : mu;
                }
#pragma unroll
                for (int u = 0; u < BN_UNROLL; ++u) {
                    state.dy += g[u];
                    state.dy_xmu += g[u] * (v[u] - mu);
                }
            });
        }
        shared[threadIdx.x] = state;
        merge_lanes(shared, share, channels_per_block);
        if (share.lane == 0 && c < channels) {
            partial_dy[(long long)blockIdx.x * channels + c] = shared[share.slot].dy;
            partial_dy_xmu[(long long)blockIdx.x * channels + c] = shared[share.slot].dy_xmu;
        }
        __syncthreads();
    }
}

template <typename A>
__global__ void grad_sums_finish(const A* __restrict__ partial_dy,
                                 const A* __restrict__ partial_dy_xmu, int splits, int channels,
                                 A* __restrict__ sum_dy, A* __restrict__ sum_dy_xmu) {
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < channels;
         c += (long long)gridDim.x * blockDim.x) {
        SumPair<A> total = {0, 0};
        for (int s = 0; s < splits; ++s) {
            total.merge({partial_dy[s * (long long)channels + c],
                         partial_dy_xmu[s * (long long)channels + c]});
        }
        sum_dy[c] = total.dy;
        sum_dy_xmu[c] = total.dy_xmu;
    }
}

// Evaluation from running statistics (Backend.forward_eval's finish_stats with count 1): mean, a
// copy of running_mean in A, and invstd = 1 / sqrt(max(running_var, 0) + eps), computed in the
// wider of A and running_var's dtype and then rounded to A. Also normalize's coefficients in A:
// scale = weight * invstd and shift = bias (weight and bias may be null: 1 and 0), for
// y = (x - mean) * scale + shift. A running mean wider than A (double for float data) has its
// rounding moved into shift, taken in double, so that y is normalized with the running mean as
// given; not where the mean is infinite (inf - inf) or beyond A's range (mean[c] is inf: y is
// then -inf or inf, as (x - running_mean) * scale rounded would be).
template <typename A>
__global__ void eval_stats(const void* __restrict__ running_mean, int running_mean_itemsize,
                           long long running_mean_stride, const void* __restrict__ running_var,
                           int running_var_itemsize, long long running_var_stride,
                           const void* __restrict__ weight, int weight_itemsize,
                           long long weight_stride, const void* __restrict__ bias,
                           int bias_itemsize, long long bias_stride, int channels, double eps,
                           A* __restrict__ mean, A* __restrict__ invstd, A* __restrict__ scale,
                           A* __restrict__ shift) {
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < channels;
         c += (long long)gridDim.x * blockDim.x) {
        mean[c] = load_any<A>(running_mean, running_mean_itemsize, running_mean_stride, c);
        const A inv =
            sizeof(A) == 8 || running_var_itemsize == 8
                ? A(invstd_of(
                      load_any<double>(running_var, running_var_itemsize, running_var_stride, c),
                      eps))
                : A(invstd_of(
                      load_any<float>(running_var, running_var_itemsize, running_var_stride, c),
                      eps));
        invstd[c] = inv;
        const A s =
            weight != nullptr ? load_any<A>(weight, weight_itemsize, weight_stride, c) * inv : inv;
        scale[c] = s;
        shift[c] = bias != nullptr ? load_any<A>(bias, bias_itemsize, bias_stride, c) : A(0);
        const double rounding =
            load_any<double>(running_mean, running_mean_itemsize, running_mean_stride, c) -
            double(mean[c]);
        if (rounding != 0 && isfinite(mean[c])) {
            const double b =
                bias != nullptr ? load_any<double>(bias, bias_itemsize, bias_stride, c) : 0.0;
            shift[c] = A(b - rounding * double(s));
        }
    }
}

// In place, as Backend.update_running_stats: running = (1 - momentum) * running + momentum *
// batch, where the variance takes momentum * count / (count - 1) (var_momentum) times the biased
// batch variance. Computed in A, the promoted dtype of running_mean and batch_mean; each batch
// value is scaled in its own dtype (float or double); a sum with a double batch variance is
// taken in double; results are stored in the running vectors' dtypes.
template <typename A>
__global__ void update_running_stats(void* __restrict__ running_mean, int running_mean_itemsize,
                                     long long running_mean_stride,
                                     void* __restrict__ running_var, int running_var_itemsize,
                                     long long running_var_stride,
                                     const void* __restrict__ batch_mean, int batch_mean_itemsize,
                                     long long batch_mean_stride,
                                     const void* __restrict__ batch_var, int batch_var_itemsize,
                                     long long batch_var_stride, int channels, double keep,
                                     double momentum, double var_momentum) {
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < channels;
         c += (long long)gridDim.x * blockDim.x) {
        const A old_mean = load_any<A>(running_mean, running_mean_itemsize, running_mean_stride, c);
        const A old_var = load_any<A>(running_var, running_var_itemsize, running_var_stride, c);
        const double mean_step =
            scaled_any(batch_mean, batch_mean_itemsize, batch_mean_stride, c, momentum);
        const double var_step =
            scaled_any(batch_var, batch_var_itemsize, batch_var_stride, c, var_momentum);
        const A mean = mul_rn(old_mean, A(keep)) + A(mean_step);
        A var = mul_rn(old_var, A(keep));
        var = batch_var_itemsize == 8 ? A(double(var) + var_step) : var + A(var_step);
        store_any(running_mean, running_mean_itemsize, running_mean_stride, c, mean);
        store_any(running_var, running_var_itemsize, running_var_stride, c, var);
    }
}

// dweight = sum_dy_xmu * invstd (invstd of any float dtype, taken as A) and dbias = sum_dy,
// stored in the parameters' dtypes (Backend.param_grads).
template <typename A>
__global__ void param_grads(const A* __restrict__ sum_dy, const A* __restrict__ sum_dy_xmu,
                            const void* __restrict__ invstd, int invstd_itemsize,
                            long long invstd_stride, int channels, void* __restrict__ dweight,
                            int dweight_itemsize, long long dweight_stride,
                            void* __restrict__ dbias, int dbias_itemsize,
                            long long dbias_stride) {
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < channels;
         c += (long long)gridDim.x * blockDim.x) {
        const A inv = load_any<A>(invstd, invstd_itemsize, invstd_stride, c);
        store_any(dweight, dweight_itemsize, dweight_stride, c, sum_dy_xmu[c] * inv);
        store_any(dbias, dbias_itemsize, dbias_stride, c, sum_dy[c]);
    }
}

// out = (x - mean) * (weight * invstd) + bias; mean, weight and bias may be null (0, 1, 0).
template <typename T>
__global__ void __launch_bounds__(BN_BLOCK_THREADS, min_blocks_per_sm<T>)
normalize(const T* __restrict__ x, long long x_outer_stride, long long x_channel_stride,
          long long x_inner_stride, T* __restrict__ out, long long out_outer_stride,
          long long out_channel_stride, long long out_inner_stride, long long outer, int channels,
          long long inner, int channels_per_block, long long chunk,
          const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
          const acc_t<T>* __restrict__ weight, const acc_t<T>* __restrict__ bias) {
    using A = acc_t<T>;
    const BlockShare share(channels_per_block, chunk, outer * inner);
    for (long long tile = blockIdx.y; tile * channels_per_block < channels; tile += gridDim.y) {
        const long long c = tile * channels_per_block + share.slot;
        if (c >= channels) continue;
        const A center = mean != nullptr ? mean[c] : A(0);
        const A scale = weight != nullptr ? weight[c] * invstd[c] : invstd[c];
        const A shift = bias != nullptr ? bias[c] : A(0);
        const T* xc = x + c * x_channel_stride;
        T* outc = out + c * out_channel_stride;
        for_each_batch(share.first, share.end, share.lanes, inner, [&](const Batch& b) {
            A v[BN_UNROLL];
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                if (b.valid[u]) {
                    v[u] = to_acc(xc[b.m[u] * x_outer_stride + b.l[u] * x_inner_stride]);
                }
            }
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                if (b.valid[u]) {
                    store(outc + b.m[u] * out_outer_stride + b.l[u] * out_inner_stride,
                          (v[u] - center) * scale + shift);
                }
            }
        });
    }
}

// Training-mode input gradient, with n = outer * inner values per channel:
// out = weight * invstd * (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n).
// weight may be null (1).
template <typename T>
__global__ void __launch_bounds__(BN_BLOCK_THREADS, min_blocks_per_sm<T>)
input_grad(const T* __restrict__ dy, long long dy_outer_stride, long long dy_channel_stride,
           long long dy_inner_stride, const T* __restrict__ x, long long x_outer_stride,
           long long x_channel_stride, long long x_inner_stride, T* __restrict__ out,
           long long out_outer_stride, long long out_channel_stride, long long out_inner_stride,
           long long outer, int channels, long long inner, int channels_per_block, long long chunk,
           const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
           const acc_t<T>* __restrict__ weight, const acc_t<T>* __restrict__ sum_dy,
           const acc_t<T>* __restrict__ sum_dy_xmu) {
    using A = acc_t<T>;
    const BlockShare share(channels_per_block, chunk, outer * inner);
    const A n = A(outer * inner);
    for (long long tile = blockIdx.y; tile * channels_per_block < channels; tile += gridDim.y) {
        const long long c = tile * channels_per_block + share.slot;
        if (c >= channels) continue;
        const A mu = mean[c];
        const A inv = invstd[c];
        const A scale = weight != nullptr ? weight[c] * inv : inv;
        const A mean_dy = sum_dy[c] / n;
        const A xmu_coef = inv * inv * sum_dy_xmu[c] / n;
        const T* dyc = dy + c * dy_channel_stride;
        const T* xc = x + c * x_channel_stride;
        T* outc = out + c * out_channel_stride;
        for_each_batch(share.first, share.end, share.lanes, inner, [&](const Batch& b) {
            A g[BN_UNROLL], v[BN_UNROLL];
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                if (b.valid[u]) {
                    g[u] = to_acc(dyc[b.m[u] * dy_outer_stride + b.l[u] * dy_inner_stride]);
                    v[u] = to_acc(xc[b.m[u] * x_outer_stride + b.l[u] * x_inner_stride]);
                }
            }
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                if (b.valid[u]) {
                    store(outc + b.m[u] * out_outer_stride + b.l[u] * out_inner_stride,
                          (g[u] - mean_dy - (v[u] - mu) * xmu_coef) * scale);
                }
            }
        });
    }
}
