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
// One block of 128 threads per row (grid-stride over rows); block sums in a fixed tree,
// so results are deterministic. Variants: first versions, correct before fast; checked
// against the CPU backend in the simulation harness (tests/gpu_kernels.rs).
#include "common.cuh"
#include "multi_tensor.cuh"

#define ROW_THREADS 128

// With `a` (pixel norm in an encoder block): also a = mp_silu(y) of the stored y, the
// residual branch's first op (elementwise.cu's mp_silu on y: the same bits, one pass less).
template <typename T>
__global__ void normalize_rows_kernel(const T *x, T *y, T *a, size_t rows, int k) {
  EDM2_SHARED(float, red, [ROW_THREADS]);
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *xr = x + r * k;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) ss += xr[i] * xr[i];
    float inv = 1.0f / edm2_norm_denom(edm2_block_sum(ss, red), k);
    T *yr = y + r * k;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      T v;
      v = xr[i] * inv;
      yr[i] = v;
      if (a) a[r * k + i] = edm2_mp_silu((float)v);
    }
    __syncthreads();  // in place: every read of this row is done before the next row
  }
}

// Forced weight normalization of every weight of a network in one launch (in place):
// the multi-tensor table's chunks are rows, EDM2_MT_ARG holds a tensor's row length. The
// row work is normalize_rows_kernel's, so the bits are the same.
__global__ void normalize_rows_multi_kernel(const unsigned long long *__restrict__ table, int n_tensors, long long n_rows) {
  EDM2_SHARED(float, red, [ROW_THREADS]);
  for (long long c = blockIdx.x; c < n_rows; c += gridDim.x) {
    const unsigned long long *t = mt_row(table, n_tensors, c);
    const int k = (int)t[EDM2_MT_ARG];
    float *xr = (float *)t[0] + (size_t)(c - (long long)t[EDM2_MT_FIRST_CHUNK]) * (size_t)k;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) ss += xr[i] * xr[i];
    float inv = 1.0f / edm2_norm_denom(edm2_block_sum(ss, red), k);
    for (int i = threadIdx.x; i < k; i += blockDim.x) xr[i] = xr[i] * inv;
    __syncthreads();  // every read of this row is done before the next row reuses `red`
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

template <typename T>
__global__ void normalize_rows_backward_kernel(const T *__restrict__ x, const T *__restrict__ dy, const T *__restrict__ xm,
                                               const T *__restrict__ da0, T *__restrict__ dx, size_t rows, int k) {
  EDM2_SHARED(float, red, [ROW_THREADS]);
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *xr = x + r * k;
    float ss = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      ss += xr[i] * xr[i];
      dot += xr[i] * normalize_rows_grad_in(dy, xm, da0, r * k + i);
    }
    ss = edm2_block_sum(ss, red);
    dot = edm2_block_sum(dot, red);
    float d = edm2_norm_denom(ss, k), norm = sqrtf(ss);
    float coef = norm > 0.0f ? dot / (d * d * sqrtf((float)k) * norm) : 0.0f;
    float inv = 1.0f / d;
    for (int i = threadIdx.x; i < k; i += blockDim.x) dx[r * k + i] = normalize_rows_grad_in(dy, xm, da0, r * k + i) * inv - xr[i] * coef;
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

extern "C" int edm2_normalize_rows(const void *x, void *y, void *a, size_t rows, int k, int dtype, cudaStream_t stream) {
  if (rows == 0 || k <= 0) return 0;
  EDM2_BY_DTYPE(dtype, EDM2_LAUNCH(normalize_rows_kernel<T>, row_blocks(rows), ROW_THREADS, 0, stream, (const T *)x, (T *)y, (T *)a, rows, k);
                return (int)cudaGetLastError());
}

extern "C" int edm2_normalize_rows_multi_f32(const unsigned long long *table, int n_tensors, long long n_rows, cudaStream_t stream) {
  if (n_tensors <= 0 || n_rows <= 0) return 0;
  EDM2_LAUNCH(normalize_rows_multi_kernel, row_blocks((size_t)n_rows), ROW_THREADS, 0, stream, table, n_tensors, n_rows);
  return (int)cudaGetLastError();
}

extern "C" int edm2_normalize_rows_backward(const void *x, const void *dy, const void *xm, const void *da0, void *dx, size_t rows, int k,
                                            int dtype, cudaStream_t stream) {
  if (rows == 0 || k <= 0) return 0;
  EDM2_BY_DTYPE(dtype,
                EDM2_LAUNCH(normalize_rows_backward_kernel<T>, row_blocks(rows), ROW_THREADS, 0, stream, (const T *)x, (const T *)dy,
                            (const T *)xm, (const T *)da0, (T *)dx, rows, k);
                return (int)cudaGetLastError());
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
