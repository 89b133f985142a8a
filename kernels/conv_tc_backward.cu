// conv_tc_backward.cu — the two gradients of the MP-Conv on tensor cores (bf16 activations),
// same operands and contract as conv.cu's bf16 backward.
//
// Data gradient (stride 1, 'same'): dx[p, i] = Σ_{tap, o} dy[p − off(tap), o] · W[o, tap, i]
//   is the forward conv of dy with the flipped, transposed weight
//   Wf[i, taps−1−tap, o] = W[o, tap, i]  (off(taps−1−tap) = −off(tap)),
//   so it runs conv_tc.cu's forward kernel on Wf: conv_weight_flip makes Wf (fp32, the
//   forward kernel rounds it to bf16 on load as it does W), then edm2_conv_forward_tc.
// Weight gradient: dW[o, tap·I + i] = Σ_p dy[p, o] · x[p + off(tap), i]
//   (GEMM M = O, N = taps·I, K = pixels: K is long and M·N small, so K is split over
//   `splits` slices — blockIdx.z — each writing an fp32 partial tile to a workspace
//   [splits][M][N]; conv_wgrad_reduce then sums the slices in slice order: the same result
//   bit for bit on every run). With one slice the kernel writes dW directly.
//   The block tile of tc_tile.cuh, as conv_tc.cu. A (64 outputs o × 32 pixels) is gathered
//   transposed from dy (threads 0..63 read 64 consecutive o of one pixel: coalesced), B
//   (32 pixels × 64 of tap·I) by implicit im2col of x (zero outside the image). Partial
//   tiles: loads outside M, N or the slice read 0; stores are bounds-checked.
//
// Variants (checked in the simulation harness against the CPU backend and conv.cu's bf16
// path, tests/gpu_kernels.rs; ptxas figures: scripts/check-kernels.sh):
//   simple (conv_wgrad_tc_kernel, any shape): scalar gathers, no cp.async pipeline, 64x64
//          tiles. H200, 2026-12-04, EDM2-S 16x16 level, batch 64, 128->128: 0.381 ms =
//          12.7 TFLOP/s (split-K and reduction included).
//   pipe WMxWN (conv_wgrad_tc_pipe_kernel, cin and cout multiples of 8): tc_pipe.cuh's
//          multistage tile with MN-major stages — 16-byte cp.async rows of dy (8 output
//          channels) and of the im2col of x (8 input channels of one tap, zero fill outside
//          the image), 3 stages, ldmatrix.trans fragments; the same split-K and ordered
//          reduction. Not yet timed.
// The data gradient's tiles are conv_tc.cu's (simple or pipelined), on the flipped weight.
#include "conv_shape.cuh"
#include "tc_tile.cuh"
#include "tc_pipe.cuh"

__global__ void conv_weight_flip_kernel(const float *__restrict__ w, float *__restrict__ wf, int cin, int cout, int taps) {
  long long total = (long long)cout * taps * cin;
  for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < total; j += (long long)gridDim.x * blockDim.x) {
    // j indexes W[o, tap, i]; its place in Wf is [i, taps − 1 − tap, o].
    int i = (int)(j % cin);
    long long r = j / cin;
    int tap = (int)(r % taps), o = (int)(r / taps);
    wf[((long long)i * taps + (taps - 1 - tap)) * cout + o] = w[j];
  }
}

__global__ void conv_wgrad_tc_kernel(ConvShape s, const edm2_bf16 *__restrict__ x, const edm2_bf16 *__restrict__ dy,
                                     float *__restrict__ out, int M, int N, long long K, long long kchunk) {
  EDM2_SHARED(uint16_t, as, [TC_BM][TC_BK + TC_PAD]);
  EDM2_SHARED(uint16_t, bs, [TC_BK][TC_BN + TC_PAD]);
  const int tid = threadIdx.x;
  const TcWarp w = tc_warp(tid);
  const int m0 = blockIdx.y * TC_BM, n0 = blockIdx.x * TC_BN;
  const long long kbeg = (long long)blockIdx.z * kchunk;
  const long long kend = kbeg + kchunk < K ? kbeg + kchunk : K;
  float acc[2][4][4];
  tc_zero(acc);
  // This thread's share: A row (output channel) ar, pixels from ak (16); B row bk, n from bn (16).
  const int ar = tid % 64, ak = (tid / 64) * 16;
  const int bk = tid / 4, bn = (tid % 4) * 16;
  for (long long k0 = kbeg; k0 < kend; k0 += TC_BK) {
    for (int j = 0; j < 16; j++) {
      long long p = k0 + ak + j;
      int o = m0 + ar;
      as[ar][ak + j] = (p < kend && o < M) ? dy[p * s.cout + o].bits : (uint16_t)0;
    }
    long long p = k0 + bk;
    for (int j = 0; j < 16; j++) {
      int n = n0 + bn + j;
      uint16_t v = 0;
      if (p < kend && n < N) {
        int tap = n / s.cin, i = n % s.cin;
        long long q = conv_neighbor(s, p, tap, 1);
        if (q >= 0) v = x[q * s.cin + i].bits;
      }
      bs[bk][bn + j] = v;
    }
    __syncthreads();
    tc_mma_k_step(acc, as, bs, w);
    __syncthreads();  // the tiles are overwritten by the next step
  }
  tc_store(out + (long long)blockIdx.z * M * N, M, N, m0, n0, acc, w);
}

// The pipelined weight gradient: M = cout (A = dyᵀ, staged as At[pixel][o]), N = taps·cin
// (B = im2col(x), staged as Bs[pixel][tap·cin + i]), K = the pixels of this block's slice
// (blockIdx.y). Tiles numbered n-tile fastest. Pixel indices fit in int (the launcher checks).
template <int WM, int WN>
__global__ void __launch_bounds__(TcpShape<WM, WN>::THREADS)
    conv_wgrad_tc_pipe_kernel(ConvShape s, const uint16_t *__restrict__ x, const uint16_t *__restrict__ dy, float *__restrict__ out,
                              int M, int N, int K, int kchunk, int n_tiles) {
  typedef TcpShape<WM, WN> S;
  EDM2_SHARED(uint16_t, as, [TCP_STAGES * S::A_STAGE]);
  EDM2_SHARED(uint16_t, bs, [TCP_STAGES * S::B_STAGE]);
  const int tid = threadIdx.x;
  const int m0 = (int)(blockIdx.x / n_tiles) * S::BM, n0 = (int)(blockIdx.x % n_tiles) * S::BN;
  const int kbeg = (int)blockIdx.y * kchunk;
  const int kend = kbeg + kchunk < K ? kbeg + kchunk : K;
  // This thread's chunk column (8 channels) in each operand, fixed over the K loop: A's
  // output channels o..o+7, B's input channels i..i+7 of tap `tap`.
  constexpr int A_CH = S::BM / 8, B_CH = S::BN / 8;
  constexpr int A_ROWS = TCP_BK * A_CH / S::THREADS, B_ROWS = TCP_BK * B_CH / S::THREADS;
  const int ca = tid % A_CH, ra0 = tid / A_CH, cb = tid % B_CH, rb0 = tid / B_CH;
  const int o = m0 + ca * 8, n = n0 + cb * 8;
  const bool m_ok = o < M, n_ok = n < N;
  const int tap = n_ok ? n / s.cin : 0, i = n - tap * s.cin;
  const int ddy = s.taps == 9 ? tap / 3 - 1 : 0, ddx = s.taps == 9 ? tap % 3 - 1 : 0;
  const int hw = s.h * s.w;
  auto load = [&](int st, int kt) {
    const int k0 = kbeg + kt * TCP_BK;
    uint16_t *a = as + st * S::A_STAGE;
#pragma unroll
    for (int j = 0; j < A_ROWS; j++) {
      const int kr = ra0 + j * (S::THREADS / A_CH), p = k0 + kr;
      const bool ok = m_ok && p < kend;
      edm2_cp_async_16_zfill(a + tcp_swizzle_mn(kr, ca, S::BM), ok ? dy + (long long)p * s.cout + o : dy, ok ? 16 : 0);
    }
    uint16_t *b = bs + st * S::B_STAGE;
#pragma unroll
    for (int j = 0; j < B_ROWS; j++) {
      const int kr = rb0 + j * (S::THREADS / B_CH), p = k0 + kr;
      bool ok = n_ok && p < kend;
      if (ok) {
        const int rem = p % hw, yy = rem / s.w + ddy, xx = rem % s.w + ddx;
        ok = yy >= 0 && yy < s.h && xx >= 0 && xx < s.w;
      }
      const uint16_t *src = ok ? x + (long long)(p + ddy * s.w + ddx) * s.cin + i : x;
      edm2_cp_async_16_zfill(b + tcp_swizzle_mn(kr, cb, S::BN), src, ok ? 16 : 0);
    }
  };
  float acc[4][4][4];
  tcp_mainloop<WM, WN, true>(acc, as, bs, (kend - kbeg + TCP_BK - 1) / TCP_BK, load);
  tcp_store_f32<WN>(out + (long long)blockIdx.y * M * N, M, N, m0, n0, acc);
}

// dw[j] = Σ_{z < splits} ws[z][j], in slice order (deterministic).
__global__ void conv_wgrad_reduce_kernel(const float *__restrict__ ws, float *__restrict__ dw, long long mn, int splits) {
  for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < mn; j += (long long)gridDim.x * blockDim.x) {
    float a = 0.0f;
    for (int z = 0; z < splits; z++) a += ws[(long long)z * mn + j];
    dw[j] = a;
  }
}

static int conv_taps_tc(int k) { return k == 3 ? 9 : 1; }

extern "C" int edm2_conv_weight_flip(const float *w, float *wf, int cin, int cout, int k, cudaStream_t stream) {
  long long total = (long long)cout * conv_taps_tc(k) * cin;
  if (total == 0) return 0;
  EDM2_LAUNCH(conv_weight_flip_kernel, edm2_blocks((size_t)total, 256), 256, 0, stream, w, wf, cin, cout, conv_taps_tc(k));
  return (int)cudaGetLastError();
}

extern "C" int edm2_conv_wgrad_tc_splits(int n, int h, int wd, int cin, int cout, int k) {
  long long M = cout, N = (long long)conv_taps_tc(k) * cin, K = (long long)n * h * wd;
  if (M <= 0 || N <= 0 || K <= 0) return 1;
  long long tiles = ((M + TC_BM - 1) / TC_BM) * ((N + TC_BN - 1) / TC_BN);
  // Enough blocks to fill a big GPU twice over (~264 SMs' worth), each slice at least 4
  // K steps (binds only for tiny inputs: a 64x64 level at batch 8 already has 1024 steps),
  // and the workspace at most 2^26 floats (256 MiB).
  long long want = (2 * 264 + tiles - 1) / tiles;
  long long by_k = K / (4 * TC_BK);
  long long by_ws = (1LL << 26) / (M * N);
  long long s = want;
  if (s > by_k) s = by_k;
  if (s > by_ws) s = by_ws;
  if (s > 64) s = 64;
  return s < 1 ? 1 : (int)s;
}

extern "C" int edm2_conv_backward_weight_tc(const uint16_t *x, const uint16_t *dy, float *dw, float *ws, int splits, int n, int h, int wd,
                                            int cin, int cout, int k, cudaStream_t stream) {
  ConvShape s = {n, h, wd, cin, cout, conv_taps_tc(k)};
  long long M = cout, N = (long long)s.taps * cin, K = (long long)n * h * wd;
  if (M == 0 || N == 0) return 0;
  if (splits < 1 || (splits > 1 && ws == nullptr)) return 1;  // cudaErrorInvalidValue
  if ((N + TC_BN - 1) / TC_BN > 0x7fffffffLL || (M + TC_BM - 1) / TC_BM > 65535 || splits > 65535 || N > 0x7fffffffLL) return 9;
  // Slices of whole K steps; the last ones may be empty (they write zero partials).
  long long kchunk = (K + splits - 1) / splits;
  kchunk = (kchunk + TC_BK - 1) / TC_BK * TC_BK;
  dim3 grid((unsigned)((N + TC_BN - 1) / TC_BN), (unsigned)((M + TC_BM - 1) / TC_BM), (unsigned)splits);
  float *out = splits == 1 ? dw : ws;
  EDM2_LAUNCH(conv_wgrad_tc_kernel, grid, 128, 0, stream, s, (const edm2_bf16 *)x, (const edm2_bf16 *)dy, out, (int)M, (int)N, K, kchunk);
  int rc = (int)cudaGetLastError();
  if (rc || splits == 1) return rc;
  EDM2_LAUNCH(conv_wgrad_reduce_kernel, edm2_blocks((size_t)(M * N), 256), 256, 0, stream, ws, dw, M * N, splits);
  return (int)cudaGetLastError();
}

// The pipelined weight gradient's tile: 1 = 128x128, 2 = 128x64, 3 = 64x64 (M = cout x N =
// taps·cin); 0 = 128x128 where both sides fill it, else 64x64.
static int conv_wgrad_tc_pipe_tile(int variant, long long M, long long N) {
  if (variant != 0) return variant;
  return M >= 128 && N >= 128 ? 1 : 3;
}

extern "C" int edm2_conv_wgrad_tc_pipe_splits(int n, int h, int wd, int cin, int cout, int k, int variant) {
  long long M = cout, N = (long long)conv_taps_tc(k) * cin, K = (long long)n * h * wd;
  if (M <= 0 || N <= 0 || K <= 0) return 1;
  int v = conv_wgrad_tc_pipe_tile(variant, M, N);
  long long bm = v == 3 ? 64 : 128, bn = v == 1 ? 128 : 64;
  long long tiles = ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
  // As edm2_conv_wgrad_tc_splits: two blocks per SM of a big GPU, slices of at least 4 K
  // steps, a workspace of at most 2^26 floats, at most 64 slices.
  long long s = (2 * 264 + tiles - 1) / tiles;
  long long by_k = K / (4 * TCP_BK), by_ws = (1LL << 26) / (M * N);
  if (s > by_k) s = by_k;
  if (s > by_ws) s = by_ws;
  if (s > 64) s = 64;
  return s < 1 ? 1 : (int)s;
}

template <int WM, int WN>
static int conv_wgrad_tc_pipe_launch(ConvShape s, const uint16_t *x, const uint16_t *dy, float *out, int M, int N, int K, int splits,
                                     cudaStream_t stream) {
  typedef TcpShape<WM, WN> S;
  long long tiles = (long long)((M + S::BM - 1) / S::BM) * ((N + S::BN - 1) / S::BN);
  if (tiles > 0x7fffffffLL || splits > 65535) return 9;  // cudaErrorInvalidConfiguration
  // Slices of whole K steps; the last ones may be empty (they write zero partials).
  int kchunk = (int)(((long long)K + splits - 1) / splits);
  kchunk = (kchunk + TCP_BK - 1) / TCP_BK * TCP_BK;
  dim3 grid((unsigned)tiles, (unsigned)splits);
  EDM2_LAUNCH((conv_wgrad_tc_pipe_kernel<WM, WN>), grid, S::THREADS, 0, stream, s, x, dy, out, M, N, K, kchunk,
              (int)((N + S::BN - 1) / S::BN));
  return (int)cudaGetLastError();
}

extern "C" int edm2_conv_backward_weight_tc_pipe(const uint16_t *x, const uint16_t *dy, float *dw, float *ws, int splits, int n, int h,
                                                 int wd, int cin, int cout, int k, int variant, cudaStream_t stream) {
  ConvShape s = {n, h, wd, cin, cout, conv_taps_tc(k)};
  long long M = cout, N = (long long)s.taps * cin, K = (long long)n * h * wd;
  if (cin % 8 != 0 || cout % 8 != 0 || K > 0x7fffffffLL - (1LL << 20) || N > 0x7fffffffLL) return 1;  // not this kernel's shape
  if (M == 0 || N == 0) return 0;
  if (splits < 1 || (splits > 1 && ws == nullptr)) return 1;  // cudaErrorInvalidValue
  float *out = splits == 1 ? dw : ws;
  int rc;
  switch (conv_wgrad_tc_pipe_tile(variant, M, N)) {
    case 1: rc = conv_wgrad_tc_pipe_launch<2, 4>(s, x, dy, out, (int)M, (int)N, (int)K, splits, stream); break;
    case 2: rc = conv_wgrad_tc_pipe_launch<2, 2>(s, x, dy, out, (int)M, (int)N, (int)K, splits, stream); break;
    case 3: rc = conv_wgrad_tc_pipe_launch<1, 2>(s, x, dy, out, (int)M, (int)N, (int)K, splits, stream); break;
    default: return 1;
  }
  if (rc || splits == 1) return rc;
  EDM2_LAUNCH(conv_wgrad_reduce_kernel, edm2_blocks((size_t)(M * N), 256), 256, 0, stream, ws, dw, M * N, splits);
  return (int)cudaGetLastError();
}
