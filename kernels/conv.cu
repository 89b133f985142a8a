// conv.cu — MP-Conv ('same' 3x3 or 1x1, stride 1) and MP-Linear as implicit GEMMs.
//
// Layouts: activations NHWC [N, H, W, C]; the effective weight OHWI [O, taps, I] (from
// weight_norm.cu; taps = 9 for 3x3, 1 for 1x1 and linear, where linear is a 1x1 conv on
// an [N, 1, 1, C] image). Zero padding is implicit (out-of-image taps read 0).
//   forward      y[p, o]      = Σ_{tap, i} x[p + off(tap), i] · W[o, tap, i]
//                 (GEMM M = pixels, N = O, K = taps·I)                       overwrites y
//   data grad    dx[p, i]     = Σ_{tap, o} dy[p − off(tap), o] · W[o, tap, i]
//                 (GEMM M = pixels, N = I, K = taps·O)       overwrites dx, or adds to it
//                 with `accumulate` (gradients joining: the embedding's over blocks)
//   weight grad  dW[o, tap, i] = Σ_p dy[p, o] · x[p + off(tap), i]
//                 (GEMM M = O, N = taps·I, K = pixels; every block sums its whole K, no
//                 atomics: deterministic)                                     overwrites dW
// off(tap) = (tap/3 − 1, tap%3 − 1) rows/columns for 3x3, (0, 0) for 1x1.
// Kernel: one 16x16-thread block per 16x16 output tile; A and B tiles of 16 along K are
// gathered into shared memory, fp32 multiply-accumulate.
// Storage: activations (x, y, dy, dx) are fp32 or bf16 (`dtype`, templates over T); the
// effective weight and the weight gradient are fp32. With bf16 activations the products
// are bf16 × bf16 with fp32 accumulation, as tensor cores compute: the weight operand is
// rounded to bf16 on load (the activations already are), and the forward and data-gradient
// outputs are rounded to bf16 on store; the weight gradient stays fp32 (fp32 master
// weights). First version — correct, simple, deterministic; the tensor-core kernels of
// the next issue replace it. Checked against the CPU backend in the simulation harness
// (tests/gpu_kernels.rs).
#include "conv_shape.cuh"

#define TILE 16

enum { CONV_FWD = 0, CONV_DX = 1, CONV_DW = 2 };

// A(m, k) of each GEMM.
template <typename T>
__device__ __forceinline__ float conv_a(int mode, const ConvShape &s, const T *act, const T *grad, long long m, long long k) {
  if (mode == CONV_FWD) {
    int tap = (int)(k / s.cin), i = (int)(k % s.cin);
    long long q = conv_neighbor(s, m, tap, 1);
    return q < 0 ? 0.0f : act[q * s.cin + i];
  }
  if (mode == CONV_DX) {
    int tap = (int)(k / s.cout), o = (int)(k % s.cout);
    long long q = conv_neighbor(s, m, tap, -1);
    return q < 0 ? 0.0f : grad[q * s.cout + o];
  }
  return grad[k * s.cout + m];  // CONV_DW: dy[p = k, o = m]
}

// B(k, n) of each GEMM.
template <typename T>
__device__ __forceinline__ float conv_b(int mode, const ConvShape &s, const T *act, const float *wt, long long k, long long n) {
  if (mode == CONV_FWD) return wt[n * (long long)s.taps * s.cin + k];  // W[o = n][k]
  if (mode == CONV_DX) {
    int tap = (int)(k / s.cout), o = (int)(k % s.cout);
    return wt[((long long)o * s.taps + tap) * s.cin + n];  // W[o, tap, i = n]
  }
  int tap = (int)(n / s.cin), i = (int)(n % s.cin);  // CONV_DW: x[p + off(tap), i], p = k
  long long q = conv_neighbor(s, k, tap, 1);
  return q < 0 ? 0.0f : act[q * s.cin + i];
}

// The GEMM value at (m, n) of this thread in the tile (tile_m, tile_n): every thread of the
// block must call it (shared-memory staging with barriers).
template <typename T>
__device__ __forceinline__ float conv_gemm_tile(int mode, const ConvShape &s, const T *act, const T *grad, const float *wt, long long M,
                                                long long N, long long K, long long m, long long n, float (*as)[TILE],
                                                float (*bs)[TILE]) {
  const bool bf16 = sizeof(T) == 2;
  const int tx = threadIdx.x, ty = threadIdx.y;
  float acc = 0.0f;
  for (long long k0 = 0; k0 < K; k0 += TILE) {
    // as[ty][tx] = A(m, k0 + tx); bs[ty][tx] = B(k0 + ty, n); zero outside the matrices.
    float a = (m < M && k0 + tx < K) ? conv_a(mode, s, act, grad, m, k0 + tx) : 0.0f;
    float b = (n < N && k0 + ty < K) ? conv_b(mode, s, act, wt, k0 + ty, n) : 0.0f;
    as[ty][tx] = bf16 ? edm2_round_bf16(a) : a;
    bs[ty][tx] = bf16 ? edm2_round_bf16(b) : b;
    __syncthreads();
    for (int kk = 0; kk < TILE; kk++) acc += as[ty][kk] * bs[kk][tx];
    __syncthreads();
  }
  return acc;
}

// TOut: T for the forward and the data gradient, float for the weight gradient.
template <typename T, typename TOut>
__global__ void conv_gemm_kernel(int mode, ConvShape s, const T *act, const T *grad, const float *wt, TOut *out, long long M,
                                 long long N, long long K, int accumulate) {
  EDM2_SHARED(float, as, [TILE][TILE]);
  EDM2_SHARED(float, bs, [TILE][TILE]);
  const long long m = (long long)blockIdx.y * TILE + threadIdx.y, n = (long long)blockIdx.x * TILE + threadIdx.x;
  float acc = conv_gemm_tile(mode, s, act, grad, wt, M, N, K, m, n, as, bs);
  if (m < M && n < N) out[m * N + n] = accumulate ? out[m * N + n] + acc : acc;
}

// Linear layers sharing their input x [n, cin] (fp32; the blocks' emb_linear layers), in one
// launch each way, with the tiles of conv_gemm_kernel (so the bits of one call per layer).
// Table row b: slot 0 the layer's effective weight (forward, data) or dy_b (weight), slot 1
// y_b (forward), dy_b (data) or dW_b (weight), slot 2 its cout.
//   forward: y_b = x·W_bᵀ, blockIdx.z = b;  weight: dW_b = dy_bᵀ·x, blockIdx.z = b;
//   data:    dx += dy_b·W_b for b = 0, 1, … in table order, added one layer at a time
//            (the bits of one accumulating call per layer, in that order).
__global__ void linear_group_kernel(int mode, const unsigned long long *__restrict__ table, int layers, const float *x, float *dx,
                                    int n, int cin) {
  EDM2_SHARED(float, as, [TILE][TILE]);
  EDM2_SHARED(float, bs, [TILE][TILE]);
  const long long row = (long long)blockIdx.y * TILE + threadIdx.y, col = (long long)blockIdx.x * TILE + threadIdx.x;
  if (mode == CONV_DX) {
    for (int b = 0; b < layers; b++) {
      const unsigned long long *t = table + (size_t)b * 4;
      ConvShape s = {n, 1, 1, cin, (int)t[2], 1};
      float acc = conv_gemm_tile<float>(CONV_DX, s, (const float *)nullptr, (const float *)t[1], (const float *)t[0], n, cin,
                                        (long long)s.cout, row, col, as, bs);
      if (row < n && col < cin) dx[row * cin + col] = dx[row * cin + col] + acc;
    }
    return;
  }
  const unsigned long long *t = table + (size_t)blockIdx.z * 4;
  ConvShape s = {n, 1, 1, cin, (int)t[2], 1};
  if (mode == CONV_FWD) {
    float *y = (float *)t[1];
    float acc = conv_gemm_tile<float>(CONV_FWD, s, x, (const float *)nullptr, (const float *)t[0], n, s.cout, cin, row, col, as, bs);
    if (row < n && col < s.cout) y[row * s.cout + col] = acc;
  } else {
    float *dw = (float *)t[1];
    float acc = conv_gemm_tile<float>(CONV_DW, s, x, (const float *)t[0], (const float *)nullptr, s.cout, cin, n, row, col, as, bs);
    if (row < s.cout && col < cin) dw[row * cin + col] = acc;
  }
}

template <typename T, typename TOut>
static int conv_launch(int mode, ConvShape s, const T *act, const T *grad, const float *wt, TOut *out, int accumulate,
                       cudaStream_t stream) {
  long long pixels = (long long)s.n * s.h * s.w;
  long long M, N, K;
  if (mode == CONV_FWD) {
    M = pixels, N = s.cout, K = (long long)s.taps * s.cin;
  } else if (mode == CONV_DX) {
    M = pixels, N = s.cin, K = (long long)s.taps * s.cout;
  } else {
    M = s.cout, N = (long long)s.taps * s.cin, K = pixels;
  }
  if (M == 0 || N == 0) return 0;
  if ((N + TILE - 1) / TILE > 0x7fffffffLL || (M + TILE - 1) / TILE > 65535) return 9;  // cudaErrorInvalidConfiguration
  dim3 grid((unsigned)((N + TILE - 1) / TILE), (unsigned)((M + TILE - 1) / TILE));
  dim3 block(TILE, TILE);
  auto *kernel = &conv_gemm_kernel<T, TOut>;
  EDM2_LAUNCH(kernel, grid, block, 0, stream, mode, s, act, grad, wt, out, M, N, K, accumulate);
  return (int)cudaGetLastError();
}

static int conv_taps(int k) { return k == 3 ? 9 : 1; }

extern "C" int edm2_conv_forward(const void *x, const float *w, void *y, int n, int h, int wd, int cin, int cout, int k, int dtype,
                                 cudaStream_t stream) {
  ConvShape s = {n, h, wd, cin, cout, conv_taps(k)};
  EDM2_BY_DTYPE(dtype, return conv_launch<T, T>(CONV_FWD, s, (const T *)x, (const T *)nullptr, w, (T *)y, 0, stream));
}

extern "C" int edm2_conv_backward_data(const void *dy, const float *w, void *dx, int n, int h, int wd, int cin, int cout, int k,
                                       int accumulate, int dtype, cudaStream_t stream) {
  ConvShape s = {n, h, wd, cin, cout, conv_taps(k)};
  EDM2_BY_DTYPE(dtype, return conv_launch<T, T>(CONV_DX, s, (const T *)nullptr, (const T *)dy, w, (T *)dx, accumulate, stream));
}

extern "C" int edm2_linear_group(int mode, const unsigned long long *table, int layers, int max_cout, const float *x, float *dx, int n,
                                  int cin, cudaStream_t stream) {
  if (layers <= 0 || n <= 0 || cin <= 0 || max_cout <= 0) return 0;
  if (mode < CONV_FWD || mode > CONV_DW || layers > 65535) return 1;  // cudaErrorInvalidValue
  long long rows = mode == CONV_DW ? max_cout : n, cols = mode == CONV_FWD ? max_cout : cin;
  if ((rows + TILE - 1) / TILE > 65535 || (cols + TILE - 1) / TILE > 0x7fffffffLL) return 9;  // cudaErrorInvalidConfiguration
  dim3 grid((unsigned)((cols + TILE - 1) / TILE), (unsigned)((rows + TILE - 1) / TILE), mode == CONV_DX ? 1u : (unsigned)layers);
  EDM2_LAUNCH(linear_group_kernel, grid, dim3(TILE, TILE), 0, stream, mode, table, layers, x, dx, n, cin);
  return (int)cudaGetLastError();
}

extern "C" int edm2_conv_backward_weight(const void *x, const void *dy, float *dw, int n, int h, int wd, int cin, int cout, int k,
                                         int dtype, cudaStream_t stream) {
  ConvShape s = {n, h, wd, cin, cout, conv_taps(k)};
  EDM2_BY_DTYPE(dtype, return conv_launch<T, float>(CONV_DW, s, (const T *)x, (const T *)dy, (const float *)nullptr, dw, 0, stream));
}
