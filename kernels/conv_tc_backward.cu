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
// Variant: first tensor-core versions (scalar gathers, no cp.async pipeline), checked in
// the simulation harness against the CPU backend and conv.cu's bf16 path
// (tests/gpu_kernels.rs); not yet timed on a GPU. ptxas (sm_90): see scripts/check-kernels.sh.
#include "conv_shape.cuh"
#include "tc_tile.cuh"

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
