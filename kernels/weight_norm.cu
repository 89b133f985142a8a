// weight_norm.cu — row normalization: magnitude-preserving weights (fp32) and pixel norm
// (fp32 or bf16 activations, fp32 arithmetic).
//
// normalize (DESIGN.md §1, paper Eq. 47): y = x / (eps + ||x||/sqrt(k)) per row of k
//   contiguous values, eps = 1e-4 added to the RMS. Used for
//   - forced weight normalization of the fp32 master weights (in place: x == y allowed),
//   - pixel norm over the channels of an NHWC activation (rows = pixels, k = C);
//   backward: dx = dy/d − x·(Σ dy·x)/(d²·sqrt(k)·||x||) (0 subgradient at x = 0).
//   normalize_rows_multi: the forced normalization of all weights in one launch.
//   effective_weight_multi: every effective weight of a forward pass in one launch (the
//   same row body as effective_weight_kernel, so the same bits).
// effective weight: eff[o, tap, i] = normalize(W[o])[i, tap] · gain / sqrt(fan_in), from the
//   stored OIHW parameter to the OHWI layout the conv kernels read (fan_in = I·taps);
//   denom[o] keeps the row's denominator for the backward. Overwrites eff and denom; where
//   given, also eff in bf16 (the tensor-core forward's operand) and the data gradient's
//   flipped transpose in bf16 (Wf[i, taps-1-tap, o]), so those kernels need no conversion
//   launches of their own (the same bits as converting eff afterwards). A
//   gain parameter is read on the device (gain_at): nothing goes back to the host when
//   Adam changes it.
// effective weight backward: from d_eff (OHWI) to dW (OIHW, overwritten, or added to the
//   gradient buffer with `accumulate`: no separate add) and the per-row gain gradient
//   row_dgain[o] = Σ d_eff·normalize(W)/sqrt(fan_in) (overwritten, where given; the caller
//   adds the rows up with the deterministic edm2_sum_add_f32). The row's denominator is
//   recomputed from W (the forward's value, bit for bit), so the backward reads nothing
//   of the forward's. effective_weight_backward_multi: every layer of a backward pass in
//   one launch (the same row body), after the pass's weight gradients.
// Weights: one block of 128 threads per row (grid-stride over rows); pixel norm: a warp
// per row (rows of a few hundred channels), in 16-byte packs where the layout allows. Sums
// in a fixed tree (shared memory, or xor shuffles), so results are deterministic. Variants: first versions, correct before fast; checked
// against the CPU backend in the simulation harness (tests/gpu_kernels.rs).
#include "common.cuh"
#include "multi_tensor.cuh"

#define ROW_THREADS 128

// Row `xr` of an fp32 weight normalized in place by one block (a fixed tree: the bits of
// both weight kernels below).
__device__ __forceinline__ void normalize_weight_row(float *xr, int k, float *red) {
  float ss = 0.0f;
  for (int i = threadIdx.x; i < k; i += blockDim.x) ss += xr[i] * xr[i];
  float inv = 1.0f / edm2_norm_denom(edm2_block_sum(ss, red), k);
  for (int i = threadIdx.x; i < k; i += blockDim.x) xr[i] = xr[i] * inv;
  __syncthreads();  // every read of this row is done before the next row reuses `red`
}

// Forced weight normalization of one weight (in place): a block per row.
__global__ void normalize_weight_rows_kernel(float *w, size_t rows, int k) {
  EDM2_SHARED(float, red, [ROW_THREADS]);
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) normalize_weight_row(w + r * k, k, red);
}

// Pixel norm: a warp per row (NORM_ROWS rows per block), the row in 16-byte packs where k
// is a multiple of the lanes and the pointers are aligned (`packed`; else one value per
// lane at a time), the sums over the warp in a fixed xor-shuffle tree (every lane holds
// the same bits: deterministic). A row is a pixel's channels (a few hundred values, 384
// bytes at 192 bf16 channels): a 128-thread block per row spent more in its seven-level
// shared-memory tree and barriers than in moving the row.
#define NORM_ROWS 8
__device__ __forceinline__ float edm2_warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

template <typename T>
__global__ void normalize_rows_warp_kernel(const T *x, T *y, T *a, size_t rows, int k, int packed) {
  constexpr int L = EDM2_LANES(T);
  const int lane = threadIdx.x % 32;
  for (size_t r = (size_t)blockIdx.x * NORM_ROWS + threadIdx.x / 32; r < rows; r += (size_t)gridDim.x * NORM_ROWS) {
    const T *xr = x + r * k;
    T *yr = y + r * k;
    T *ar = a ? a + r * k : nullptr;
    float ss = 0.0f;
    if (packed) {
      for (int j = lane; j < k / L; j += 32) {
        auto v = edm2_load_lanes<L>(xr, j);
#pragma unroll
        for (int l = 0; l < L; l++) ss += v.v[l] * v.v[l];
      }
    } else {
      for (int i = lane; i < k; i += 32) ss += xr[i] * xr[i];
    }
    const float inv = 1.0f / edm2_norm_denom(edm2_warp_sum(ss), k);
    if (packed) {
      for (int j = lane; j < k / L; j += 32) {
        auto v = edm2_load_lanes<L>(xr, j);
        edm2_lanes<T, L> o, s;
#pragma unroll
        for (int l = 0; l < L; l++) {
          o.v[l] = v.v[l] * inv;
          s.v[l] = edm2_mp_silu((float)o.v[l]);
        }
        edm2_store_lanes<L>(yr, j, o);
        if (ar) edm2_store_lanes<L>(ar, j, s);
      }
    } else {
      for (int i = lane; i < k; i += 32) {
        T v;
        v = xr[i] * inv;
        yr[i] = v;
        if (ar) ar[i] = edm2_mp_silu((float)v);
      }
    }
  }
}

// Forced weight normalization of every weight of a network in one launch (in place):
// the multi-tensor table's chunks are rows, EDM2_MT_ARG holds a tensor's row length. The
// row work is normalize_weight_rows_kernel's, so the bits are the same.
__global__ void normalize_rows_multi_kernel(const unsigned long long *__restrict__ table, int n_tensors, long long n_rows) {
  EDM2_SHARED(float, red, [ROW_THREADS]);
  for (long long c = blockIdx.x; c < n_rows; c += gridDim.x) {
    const unsigned long long *t = mt_row(table, n_tensors, c);
    const int k = (int)t[EDM2_MT_ARG];
    normalize_weight_row((float *)t[0] + (size_t)(c - (long long)t[EDM2_MT_FIRST_CHUNK]) * (size_t)k, k, red);
  }
}

// With `xm` and `da0` (an encoder block, whose pixel norm's output xm fed mp_silu and the
// skip): the incoming gradient is first dy + da0·mp_silu'(xm), rounded to the storage type
// as elementwise.cu's accumulating mp_silu_backward stores it (the same bits, one pass less).
template <typename T>
__device__ __forceinline__ float normalize_rows_grad_in(const T *__restrict__ dy, const T *__restrict__ xm, const T *__restrict__ da0,
                                                         size_t i) {
  if (!xm) return dy[i];
  T g;
  g = edm2_mp_silu_grad_acc(dy[i], da0[i], xm[i]);
  return g;
}

// normalize_rows_grad_in for the L values of pack j of row r0 (every operand given is
// 16-byte aligned: the launcher checked).
template <int L, typename T>
__device__ __forceinline__ edm2_lanes<float, L> normalize_rows_grad_in_pack(const T *__restrict__ dy, const T *__restrict__ xm,
                                                                            const T *__restrict__ da0, size_t r0, int j) {
  edm2_lanes<float, L> g;
  auto d = edm2_load_lanes<L>(dy + r0, j);
  if (!xm) {
#pragma unroll
    for (int l = 0; l < L; l++) g.v[l] = d.v[l];
    return g;
  }
  auto m = edm2_load_lanes<L>(xm + r0, j);
  auto a = edm2_load_lanes<L>(da0 + r0, j);
#pragma unroll
  for (int l = 0; l < L; l++) {
    T t;
    t = edm2_mp_silu_grad_acc(d.v[l], a.v[l], m.v[l]);
    g.v[l] = t;
  }
  return g;
}

// The pixel norm's backward, laid out as normalize_rows_warp_kernel (a warp per row).
template <typename T>
__global__ void normalize_rows_backward_kernel(const T *__restrict__ x, const T *__restrict__ dy, const T *__restrict__ xm,
                                               const T *__restrict__ da0, T *__restrict__ dx, size_t rows, int k, int packed) {
  constexpr int L = EDM2_LANES(T);
  const int lane = threadIdx.x % 32;
  for (size_t r = (size_t)blockIdx.x * NORM_ROWS + threadIdx.x / 32; r < rows; r += (size_t)gridDim.x * NORM_ROWS) {
    const size_t r0 = r * k;
    float ss = 0.0f, dot = 0.0f;
    if (packed) {
      for (int j = lane; j < k / L; j += 32) {
        auto v = edm2_load_lanes<L>(x + r0, j);
        auto g = normalize_rows_grad_in_pack<L>(dy, xm, da0, r0, j);
#pragma unroll
        for (int l = 0; l < L; l++) {
          ss += v.v[l] * v.v[l];
          dot += v.v[l] * g.v[l];
        }
      }
    } else {
      for (int i = lane; i < k; i += 32) {
        ss += x[r0 + i] * x[r0 + i];
        dot += x[r0 + i] * normalize_rows_grad_in(dy, xm, da0, r0 + i);
      }
    }
    ss = edm2_warp_sum(ss);
    dot = edm2_warp_sum(dot);
    float d = edm2_norm_denom(ss, k), norm = sqrtf(ss);
    float coef = norm > 0.0f ? dot / (d * d * sqrtf((float)k) * norm) : 0.0f;
    float inv = 1.0f / d;
    if (packed) {
      for (int j = lane; j < k / L; j += 32) {
        auto v = edm2_load_lanes<L>(x + r0, j);
        auto g = normalize_rows_grad_in_pack<L>(dy, xm, da0, r0, j);
        edm2_lanes<T, L> o;
#pragma unroll
        for (int l = 0; l < L; l++) o.v[l] = g.v[l] * inv - v.v[l] * coef;
        edm2_store_lanes<L>(dx + r0, j, o);
      }
    } else {
      for (int i = lane; i < k; i += 32) dx[r0 + i] = normalize_rows_grad_in(dy, xm, da0, r0 + i) * inv - x[r0 + i] * coef;
    }
  }
}

// Row o of an effective weight (the body of both effective-weight kernels: the same bits).
__device__ __forceinline__ void effective_weight_row(const float *__restrict__ w, float *__restrict__ eff, float *__restrict__ denom,
                                                     uint16_t *__restrict__ eff_bf16, uint16_t *__restrict__ flip_bf16, int o,
                                                     int out_ch, int in_ch, int taps, float scale_g, float *red) {
  const int fan = in_ch * taps;
  const float *wr = w + (size_t)o * fan;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < fan; i += blockDim.x) ss += wr[i] * wr[i];
  float d = edm2_norm_denom(edm2_block_sum(ss, red), fan);
  if (threadIdx.x == 0) denom[o] = d;
  // i = ci·taps + tap (OIHW) → tap·I + ci (OHWI). Normalize, then scale, as the official code.
  for (int i = threadIdx.x; i < fan; i += blockDim.x) {
    int ci = i / taps, tap = i % taps;
    float v = (wr[i] / d) * scale_g;
    eff[(size_t)o * fan + tap * in_ch + ci] = v;
    // The tensor-core kernels' operands, rounded as a bf16 conversion of eff rounds:
    // eff itself, and the data gradient's flipped transpose Wf[ci, taps-1-tap, o].
    if (eff_bf16) eff_bf16[(size_t)o * fan + tap * in_ch + ci] = edm2_bf16_bits(v);
    if (flip_bf16) flip_bf16[((size_t)ci * taps + (taps - 1 - tap)) * out_ch + o] = edm2_bf16_bits(v);
  }
}

__global__ void effective_weight_kernel(const float *__restrict__ w, float *__restrict__ eff, float *__restrict__ denom,
                                        uint16_t *__restrict__ eff_bf16, uint16_t *__restrict__ flip_bf16, int out_ch, int in_ch,
                                        int taps, float gain, const float *__restrict__ gain_at) {
  EDM2_SHARED(float, red, [ROW_THREADS]);
  const float scale_g = (gain_at ? *gain_at : gain) / sqrtf((float)(in_ch * taps));
  for (int o = blockIdx.x; o < out_ch; o += gridDim.x) {
    effective_weight_row(w, eff, denom, eff_bf16, flip_bf16, o, out_ch, in_ch, taps, scale_g, red);
  }
}

// Every effective weight of a forward pass in one launch: chunks are output rows.
__global__ void effective_weight_multi_kernel(const unsigned long long *__restrict__ table, int n_tensors, long long n_rows) {
  EDM2_SHARED(float, red, [ROW_THREADS]);
  for (long long c = blockIdx.x; c < n_rows; c += gridDim.x) {
    const unsigned long long *t = mt_row(table, n_tensors, c);
    const int in_ch = (int)t[EDM2_MT_LEN], taps = (int)(t[EDM2_MT_ARG] & 0xffffffffull);
    const int out_ch = (int)t[EDM2_MT_EXTRA + 2];
    const float *gain_at = (const float *)t[3];
    const float gain = __uint_as_float((unsigned)(t[EDM2_MT_ARG] >> 32));
    const float scale_g = (gain_at ? *gain_at : gain) / sqrtf((float)(in_ch * taps));
    const int o = (int)(c - (long long)t[EDM2_MT_FIRST_CHUNK]);
    effective_weight_row((const float *)t[0], (float *)t[1], (float *)t[2], (uint16_t *)t[EDM2_MT_EXTRA], (uint16_t *)t[EDM2_MT_EXTRA + 1],
                         o, out_ch, in_ch, taps, scale_g, red);
  }
}

// Row o of an effective weight's backward (the body of both backward kernels: the same
// bits). The row's denominator is recomputed from W (the same loop and block sum as
// effective_weight_row, so the same value the forward used): the backward does not need
// the forward's buffers, and a batched backward at the end of a pass can run after them.
__device__ __forceinline__ void effective_weight_backward_row(const float *__restrict__ w, const float *__restrict__ d_eff,
                                                              float *__restrict__ dw, float *__restrict__ row_dgain, int o,
                                                              int in_ch, int taps, float scale_g, int accumulate, float *red) {
  const int fan = in_ch * taps;
  const float inv_sqrt_fan = 1.0f / sqrtf((float)fan);
  const float *wr = w + (size_t)o * fan, *gr = d_eff + (size_t)o * fan;
  float ss = 0.0f, gw = 0.0f;
  for (int i = threadIdx.x; i < fan; i += blockDim.x) {
    float g = gr[(i % taps) * in_ch + i / taps];  // OHWI → OIHW
    ss += wr[i] * wr[i];
    gw += g * wr[i];
  }
  ss = edm2_block_sum(ss, red);
  gw = edm2_block_sum(gw, red);
  float d = edm2_norm_denom(ss, fan), norm = sqrtf(ss);
  if (row_dgain && threadIdx.x == 0) row_dgain[o] = gw / d * inv_sqrt_fan;
  // normalize backward with dn = g·scale_g: Σ dn·w = scale_g·Σ g·w.
  float coef = norm > 0.0f ? (scale_g * gw) / (d * d * sqrtf((float)fan) * norm) : 0.0f;
  float inv = 1.0f / d;
  for (int i = threadIdx.x; i < fan; i += blockDim.x) {
    float g = gr[(i % taps) * in_ch + i / taps];
    float v = (g * scale_g) * inv - wr[i] * coef;
    if (accumulate)
      dw[(size_t)o * fan + i] += v;
    else
      dw[(size_t)o * fan + i] = v;
  }
}

__global__ void effective_weight_backward_kernel(const float *__restrict__ w, const float *__restrict__ d_eff, float *__restrict__ dw,
                                                 float *__restrict__ row_dgain, int out_ch, int in_ch, int taps, float gain,
                                                 const float *__restrict__ gain_at, int accumulate) {
  const float scale_g = (gain_at ? *gain_at : gain) / sqrtf((float)(in_ch * taps));
  EDM2_SHARED(float, red, [ROW_THREADS]);
  for (int o = blockIdx.x; o < out_ch; o += gridDim.x)
    effective_weight_backward_row(w, d_eff, dw, row_dgain, o, in_ch, taps, scale_g, accumulate, red);
}

// The effective-weight backward of every layer of a backward pass in one launch: chunks are
// output rows (see edm2.h for the table).
__global__ void effective_weight_backward_multi_kernel(const unsigned long long *__restrict__ table, int n_tensors, long long n_rows) {
  EDM2_SHARED(float, red, [ROW_THREADS]);
  for (long long c = blockIdx.x; c < n_rows; c += gridDim.x) {
    const unsigned long long *t = mt_row(table, n_tensors, c);
    const int in_ch = (int)t[EDM2_MT_LEN], taps = (int)(t[EDM2_MT_ARG] & 0xffffffffull);
    const float *gain_at = (const float *)t[EDM2_MT_EXTRA];
    const float gain = __uint_as_float((unsigned)(t[EDM2_MT_ARG] >> 32));
    const float scale_g = (gain_at ? *gain_at : gain) / sqrtf((float)(in_ch * taps));
    const int o = (int)(c - (long long)t[EDM2_MT_FIRST_CHUNK]);
    effective_weight_backward_row((const float *)t[0], (const float *)t[1], (float *)t[2], (float *)t[3], o, in_ch, taps, scale_g,
                                  (int)t[EDM2_MT_EXTRA + 1], red);
  }
}

// One block per row, grid-stride beyond the cap (a few blocks on the simulated device).
static unsigned row_blocks(size_t rows) {
  size_t cap = EDM2_MAX_BLOCKS < 65535u ? EDM2_MAX_BLOCKS : 65535u;
  return (unsigned)(rows < cap ? (rows == 0 ? 1 : rows) : cap);
}

// Blocks of NORM_ROWS warps covering `rows` rows (grid-stride beyond the cap).
static unsigned warp_row_blocks(size_t rows) { return row_blocks((rows + NORM_ROWS - 1) / NORM_ROWS); }

extern "C" int edm2_normalize_rows(const void *x, void *y, void *a, size_t rows, int k, int dtype, cudaStream_t stream) {
  if (rows == 0 || k <= 0) return 0;
  EDM2_BY_DTYPE(dtype, {
    const int packed = (int)edm2_packs(rows * (size_t)k, EDM2_LANES(T), k % EDM2_LANES(T) == 0 && edm2_aligned16(x, y, a)) > 0;
    EDM2_LAUNCH(normalize_rows_warp_kernel<T>, warp_row_blocks(rows), NORM_ROWS * 32, 0, stream, (const T *)x, (T *)y, (T *)a, rows, k, packed);
    return (int)cudaGetLastError();
  });
}

extern "C" int edm2_normalize_weight_rows_f32(float *w, size_t rows, int k, cudaStream_t stream) {
  if (rows == 0 || k <= 0) return 0;
  EDM2_LAUNCH(normalize_weight_rows_kernel, row_blocks(rows), ROW_THREADS, 0, stream, w, rows, k);
  return (int)cudaGetLastError();
}

extern "C" int edm2_normalize_rows_multi_f32(const unsigned long long *table, int n_tensors, long long n_rows, cudaStream_t stream) {
  if (n_tensors <= 0 || n_rows <= 0) return 0;
  EDM2_LAUNCH(normalize_rows_multi_kernel, row_blocks((size_t)n_rows), ROW_THREADS, 0, stream, table, n_tensors, n_rows);
  return (int)cudaGetLastError();
}

extern "C" int edm2_normalize_rows_backward(const void *x, const void *dy, const void *xm, const void *da0, void *dx, size_t rows, int k,
                                            int dtype, cudaStream_t stream) {
  if (rows == 0 || k <= 0) return 0;
  EDM2_BY_DTYPE(dtype, {
    const int packed = (int)edm2_packs(rows * (size_t)k, EDM2_LANES(T), k % EDM2_LANES(T) == 0 && edm2_aligned16(x, dy, xm, da0, dx)) > 0;
    EDM2_LAUNCH(normalize_rows_backward_kernel<T>, warp_row_blocks(rows), NORM_ROWS * 32, 0, stream, (const T *)x, (const T *)dy,
                (const T *)xm, (const T *)da0, (T *)dx, rows, k, packed);
    return (int)cudaGetLastError();
  });
}

extern "C" int edm2_effective_weight_f32(const float *w, float *eff, float *denom, uint16_t *eff_bf16, uint16_t *flip_bf16, int out_ch,
                                         int in_ch, int taps, float gain, const float *gain_at, cudaStream_t stream) {
  if (out_ch <= 0) return 0;
  EDM2_LAUNCH(effective_weight_kernel, row_blocks(out_ch), ROW_THREADS, 0, stream, w, eff, denom, eff_bf16, flip_bf16, out_ch, in_ch,
              taps, gain, gain_at);
  return (int)cudaGetLastError();
}

extern "C" int edm2_effective_weight_multi_f32(const unsigned long long *table, int n_tensors, long long n_rows, cudaStream_t stream) {
  if (n_tensors <= 0 || n_rows <= 0) return 0;
  EDM2_LAUNCH(effective_weight_multi_kernel, row_blocks((size_t)n_rows), ROW_THREADS, 0, stream, table, n_tensors, n_rows);
  return (int)cudaGetLastError();
}

extern "C" int edm2_effective_weight_backward_f32(const float *w, const float *d_eff, float *dw, float *row_dgain, int out_ch, int in_ch,
                                                  int taps, float gain, const float *gain_at, int accumulate, cudaStream_t stream) {
  if (out_ch <= 0) return 0;
  EDM2_LAUNCH(effective_weight_backward_kernel, row_blocks(out_ch), ROW_THREADS, 0, stream, w, d_eff, dw, row_dgain, out_ch, in_ch,
              taps, gain, gain_at, accumulate);
  return (int)cudaGetLastError();
}

extern "C" int edm2_effective_weight_backward_multi_f32(const unsigned long long *table, int n_tensors, long long n_rows,
                                                        cudaStream_t stream) {
  if (n_tensors <= 0 || n_rows <= 0) return 0;
  EDM2_LAUNCH(effective_weight_backward_multi_kernel, row_blocks((size_t)n_rows), ROW_THREADS, 0, stream, table, n_tensors, n_rows);
  return (int)cudaGetLastError();
}
