// conv_tc.cu — MP-Conv forward on tensor cores (bf16 activations): the implicit GEMM of
// conv.cu (y[p, o] = Σ_{tap, i} x[p + off(tap), i] · W[o, tap, i]; M = pixels, N = O,
// K = taps·I; 3x3 'same', 1x1 and linear) with bf16 × bf16 → fp32 products from
// mma.m16n8k16 instead of fp32 FMAs. Same operands and contract as conv.cu's bf16
// forward: x and y NHWC bf16, the effective weight OHWI fp32 (rounded to bf16 on load,
// as conv.cu does), fp32 accumulation, y rounded to bf16 on store; overwrites y.
//
// Kernel: the 64x64 block tile of tc_tile.cuh (128 threads, 4 warps of 32x32, K in steps
// of 32). Each step gathers A (64 pixels × 32 k, implicit im2col, zero outside the image
// and past K) and B (32 k × 64 outputs) into shared memory as bf16 bits, then each warp
// loads its fragments with ldmatrix and issues 2 k16 × 8 mma.
// Partial tiles anywhere: loads outside M, N or K read 0; stores are bounds-checked.
// Deterministic (a fixed order within each mma and across K steps).
//
// Variants (edm2_conv_forward_tc_pipe's `variant`; all checked against the CPU backend and
// conv.cu's bf16 path in the simulation harness, tests/gpu_kernels.rs):
//   simple   (conv_forward_tc_kernel, any shape): scalar gathers with a division per
//            element, the fp32 weight rounded in the loop, no pipelining. H200, 2026-12-04,
//            EDM2-S 16x16 level, batch 64, 128->128: 0.407 ms = 11.9 TFLOP/s (1.5% of 790).
//            EDM2-XS batch 128 bf16 training: 50.5 img/s with the gradients on it too.
//   pipe WMxWN (conv_forward_tc_pipe_kernel, cin a multiple of 32; tc_pipe.cuh): bf16
//            weight [cout][taps·cin] prepared once per call, 16-byte cp.async gathers with
//            zero fill for the padding (one K step of 32 lies inside one tap, so each pixel
//            row is 64 contiguous bytes), 3 stages, swizzled shared memory, 64x32 warp
//            tiles: 128x128 (8 warps), 128x64 (4), 64x64 (2). Not yet timed.
#include "conv_shape.cuh"
#include "tc_tile.cuh"
#include "tc_pipe.cuh"

__global__ void conv_forward_tc_kernel(ConvShape s, const edm2_bf16 *__restrict__ x, const float *__restrict__ wt,
                                       edm2_bf16 *__restrict__ y, long long M, int N, int K) {
  EDM2_SHARED(uint16_t, as, [TC_BM][TC_BK + TC_PAD]);
  EDM2_SHARED(uint16_t, bs, [TC_BK][TC_BN + TC_PAD]);
  const int tid = threadIdx.x;
  const TcWarp w = tc_warp(tid);
  const long long m0 = (long long)blockIdx.y * TC_BM;
  const int n0 = blockIdx.x * TC_BN;
  float acc[2][4][4];
  tc_zero(acc);
  // This thread's share of the gathers: A row ar, k from ak (16 values); B row bk, n from
  // bn (16 values).
  const int ar = tid / 2, ak = (tid % 2) * 16;
  const int bk = tid / 4, bn = (tid % 4) * 16;
  const long long am = m0 + ar;
  for (int k0 = 0; k0 < K; k0 += TC_BK) {
    for (int j = 0; j < 16; j++) {
      int k = k0 + ak + j;
      uint16_t v = 0;
      if (am < M && k < K) {
        int tap = k / s.cin, i = k % s.cin;
        long long q = conv_neighbor(s, am, tap, 1);
        if (q >= 0) v = x[q * s.cin + i].bits;
      }
      as[ar][ak + j] = v;
    }
    for (int j = 0; j < 16; j++) {
      int k = k0 + bk, n = n0 + bn + j;
      bs[bk][bn + j] = (k < K && n < N) ? edm2_bf16_bits(wt[(long long)n * K + k]) : (uint16_t)0;
    }
    __syncthreads();
    tc_mma_k_step(acc, as, bs, w);
    __syncthreads();  // the tiles are overwritten by the next step
  }
  tc_store(y, M, N, m0, n0, acc, w);
}

// The pipelined forward: A = the implicit im2col of x (row m = output pixel, k = tap·cin + i),
// Bt = the bf16 weight [cout][taps·cin]. Tiles are numbered n-tile fastest (blockIdx.x), so
// the blocks of one pixel tile run side by side and share its gathers in L2.
template <int WM, int WN>
__global__ void __launch_bounds__(TcpShape<WM, WN>::THREADS)
    conv_forward_tc_pipe_kernel(ConvShape s, const uint16_t *__restrict__ x, const uint16_t *__restrict__ wb, uint16_t *__restrict__ y,
                                long long M, int N, int K, int n_tiles) {
  typedef TcpShape<WM, WN> S;
  EDM2_SHARED(uint16_t, as, [TCP_STAGES * S::A_STAGE]);
  EDM2_SHARED(uint16_t, bs, [TCP_STAGES * S::B_STAGE]);
  const int tid = threadIdx.x;
  const long long m0 = (long long)(blockIdx.x / n_tiles) * S::BM;
  const int n0 = (int)(blockIdx.x % n_tiles) * S::BN;
  // This thread's A rows: chunk c of rows r0 + j·(THREADS/4), j < A_ROWS; its pixel's
  // (y, x) found once (no division in the loop but one per K step for the tap).
  constexpr int A_ROWS = S::BM * 4 / S::THREADS, B_ROWS = S::BN * 4 / S::THREADS;
  const int c = tid % 4, r0 = tid / 4;
  int py[A_ROWS], px[A_ROWS];
  const long long hw = (long long)s.h * s.w;
#pragma unroll
  for (int j = 0; j < A_ROWS; j++) {
    long long m = m0 + r0 + j * (S::THREADS / 4);
    int rem = (int)(m % hw);
    py[j] = m < M ? rem / s.w : -(1 << 20);  // rows past M: never inside the image
    px[j] = rem % s.w;
  }
  auto load = [&](int st, int kt) {
    const int k0 = kt * TCP_BK, tap = k0 / s.cin, i0 = k0 - tap * s.cin + c * 8;
    const int dy = s.taps == 9 ? tap / 3 - 1 : 0, dx = s.taps == 9 ? tap % 3 - 1 : 0;
    uint16_t *a = as + st * S::A_STAGE;
#pragma unroll
    for (int j = 0; j < A_ROWS; j++) {
      const int r = r0 + j * (S::THREADS / 4);
      const int yy = py[j] + dy, xx = px[j] + dx;
      const bool ok = yy >= 0 && yy < s.h && xx >= 0 && xx < s.w;
      const uint16_t *src = ok ? x + (m0 + r + (long long)dy * s.w + dx) * s.cin + i0 : x;
      edm2_cp_async_16_zfill(a + tcp_swizzle(r, c), src, ok ? 16 : 0);
    }
    uint16_t *b = bs + st * S::B_STAGE;
#pragma unroll
    for (int j = 0; j < B_ROWS; j++) {
      const int r = r0 + j * (S::THREADS / 4);
      const bool ok = n0 + r < N;
      const uint16_t *src = ok ? wb + (long long)(n0 + r) * K + k0 + c * 8 : wb;
      edm2_cp_async_16_zfill(b + tcp_swizzle(r, c), src, ok ? 16 : 0);
    }
  };
  float acc[4][4][4];
  tcp_mainloop<WM, WN>(acc, as, bs, K / TCP_BK, load);
  tcp_store_bf16<WN>(y, M, N, m0, n0, acc);
}

template <int WM, int WN>
static int conv_forward_tc_pipe_launch(ConvShape s, const uint16_t *x, const uint16_t *wb, uint16_t *y, long long M, int K,
                                       cudaStream_t stream) {
  typedef TcpShape<WM, WN> S;
  long long m_tiles = (M + S::BM - 1) / S::BM, n_tiles = (s.cout + S::BN - 1) / S::BN;
  if (m_tiles * n_tiles > 0x7fffffffLL) return 9;  // cudaErrorInvalidConfiguration
  EDM2_LAUNCH((conv_forward_tc_pipe_kernel<WM, WN>), (unsigned)(m_tiles * n_tiles), S::THREADS, 0, stream, s, x, wb, y, M, s.cout, K,
              (int)n_tiles);
  return (int)cudaGetLastError();
}

extern "C" int edm2_conv_forward_tc_pipe(const uint16_t *x, const uint16_t *wb, uint16_t *y, int n, int h, int wd, int cin, int cout,
                                         int k, int variant, cudaStream_t stream) {
  ConvShape s = {n, h, wd, cin, cout, k == 3 ? 9 : 1};
  long long M = (long long)n * h * wd;
  long long K = (long long)s.taps * cin;
  if (cin % TCP_BK != 0 || K > 0x7fffffffLL) return 1;  // cudaErrorInvalidValue: not this kernel's shape
  if (M == 0 || cout == 0) return 0;
  switch (edm2_conv_tc_pipe_variant(variant, M, cout)) {
    case 1: return conv_forward_tc_pipe_launch<2, 4>(s, x, wb, y, M, (int)K, stream);
    case 2: return conv_forward_tc_pipe_launch<2, 2>(s, x, wb, y, M, (int)K, stream);
    case 3: return conv_forward_tc_pipe_launch<1, 2>(s, x, wb, y, M, (int)K, stream);
    default: return 1;
  }
}

extern "C" int edm2_conv_forward_tc(const uint16_t *x, const float *w, uint16_t *y, int n, int h, int wd, int cin, int cout, int k,
                                    cudaStream_t stream) {
  ConvShape s = {n, h, wd, cin, cout, k == 3 ? 9 : 1};
  long long M = (long long)n * h * wd;
  long long K = (long long)s.taps * cin;
  if (M == 0 || cout == 0) return 0;
  if (K > 0x7fffffffLL || (M + TC_BM - 1) / TC_BM > 65535) return 9;  // cudaErrorInvalidConfiguration
  dim3 grid((unsigned)((cout + TC_BN - 1) / TC_BN), (unsigned)((M + TC_BM - 1) / TC_BM));
  EDM2_LAUNCH(conv_forward_tc_kernel, grid, 128, 0, stream, s, (const edm2_bf16 *)x, w, (edm2_bf16 *)y, M, cout, (int)K);
  return (int)cudaGetLastError();
}
