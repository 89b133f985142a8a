// conv_tc.cu — MP-Conv forward on tensor cores (bf16 activations): the implicit GEMM of
// conv.cu (y[p, o] = Σ_{tap, i} x[p + off(tap), i] · W[o, tap, i]; M = pixels, N = O,
// K = taps·I; 3x3 'same', 1x1 and linear) with bf16 × bf16 → fp32 products from
// mma.m16n8k16 instead of fp32 FMAs. Same operands and contract as conv.cu's bf16
// forward: x and y NHWC bf16, the effective weight OHWI fp32 (rounded to bf16 on load,
// as conv.cu does), fp32 accumulation, y rounded to bf16 on store; overwrites y.
//
// Kernel: a 64x64 output tile per block of 128 threads (4 warps, 2x2, each 32x32 =
// 2 m16 × 4 n8 mma tiles), K in steps of 32. Each step gathers A (64 pixels × 32 k,
// implicit im2col, zero outside the image and past K) and B (32 k × 64 outputs) into
// shared memory as bf16 bits, then each warp loads its fragments with ldmatrix (A: x4;
// B: x2.trans over the row-major [k][n] tile — the layouts the harness self-tests check,
// and that matched an H200) and issues 2 k16 × 8 mma. Rows are padded by 8 elements
// (16 bytes) so the ldmatrix rows stay 16-byte aligned and spread over the banks.
// Partial tiles anywhere: loads outside M, N or K read 0; stores are bounds-checked.
// Deterministic (a fixed order within each mma and across K steps).
//
// Variant: first tensor-core version — scalar gathers and no cp.async pipelining; not
// measured on a GPU yet (the next lent GPU: `bench --precision bf16` with and without
// EDM2_TENSOR_CORE_CONV=1). Checked against the CPU backend and conv.cu's bf16 path in
// the simulation harness (tests/gpu_kernels.rs).
#include "conv_shape.cuh"

#define TC_BM 64
#define TC_BN 64
#define TC_BK 32
#define TC_PAD 8

__global__ void conv_forward_tc_kernel(ConvShape s, const edm2_bf16 *__restrict__ x,
                                                              const float *__restrict__ wt, edm2_bf16 *__restrict__ y, long long M,
                                                              int N, int K) {
  EDM2_SHARED(uint16_t, as, [TC_BM][TC_BK + TC_PAD]);
  EDM2_SHARED(uint16_t, bs, [TC_BK][TC_BN + TC_PAD]);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2, g = lane >> 2, t = lane & 3;
  const long long m0 = (long long)blockIdx.y * TC_BM;
  const int n0 = blockIdx.x * TC_BN;
  float acc[2][4][4];
  for (int mi = 0; mi < 2; mi++)
    for (int ni = 0; ni < 4; ni++)
      for (int r = 0; r < 4; r++) acc[mi][ni][r] = 0.0f;
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
    for (int ks = 0; ks < TC_BK; ks += 16) {
      unsigned af[2][4], bf[4][2];
      for (int mi = 0; mi < 2; mi++) edm2_ldmatrix_x4(af[mi], &as[wm * 32 + mi * 16 + lane % 16][ks + 8 * (lane / 16)]);
      for (int ni = 0; ni < 4; ni++) edm2_ldmatrix_x2_trans(bf[ni], &bs[ks + lane % 16][wn * 32 + ni * 8]);
      for (int mi = 0; mi < 2; mi++)
        for (int ni = 0; ni < 4; ni++) edm2_mma_m16n8k16_bf16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
    }
    __syncthreads();  // the tiles are overwritten by the next step
  }
  // C fragment: element r at row g + 8(r >> 1), column 2t + (r & 1) of the 16x8 tile.
  for (int mi = 0; mi < 2; mi++)
    for (int ni = 0; ni < 4; ni++)
      for (int r = 0; r < 4; r++) {
        long long m = m0 + wm * 32 + mi * 16 + g + 8 * (r >> 1);
        int n = n0 + wn * 32 + ni * 8 + 2 * t + (r & 1);
        if (m < M && n < N) y[m * N + n] = acc[mi][ni][r];
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
