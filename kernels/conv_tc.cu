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
// Variant: first tensor-core version — scalar gathers and no cp.async pipelining; not
// measured on a GPU yet (the next lent GPU: `bench --precision bf16` with and without
// EDM2_TENSOR_CORE_CONV=1). Checked against the CPU backend and conv.cu's bf16 path in
// the simulation harness (tests/gpu_kernels.rs).
#include "conv_shape.cuh"
#include "tc_tile.cuh"

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
