// tc_tile.cuh — the block tile both tensor-core conv kernels share (conv_tc.cu forward,
// conv_tc_backward.cu weight gradient): C (64 x 64, fp32) += A (64 x 32) · B (32 x 64) per
// K step, A and B staged in shared memory as bf16 bits, row-major [m][k] and [k][n], rows
// padded by TC_PAD elements (16 bytes) so ldmatrix rows stay 16-byte aligned and spread
// over the banks. 128 threads = 4 warps in 2x2, each a 32x32 warp tile = 2 m16 × 4 n8
// mma.m16n8k16 tiles; fragments come from ldmatrix (A: x4; B: x2.trans), the layouts the
// harness self-tests check and an H200 confirmed.
#pragma once
#include "common.cuh"

#define TC_BM 64
#define TC_BN 64
#define TC_BK 32
#define TC_PAD 8

struct TcWarp {
  int lane, wm, wn, g, t;  // lane; warp row/column in the 2x2; the fragment's row group and column pair
};

__device__ __forceinline__ TcWarp tc_warp(int tid) {
  int lane = tid % 32, warp = tid / 32;
  return TcWarp{lane, warp / 2, warp % 2, lane >> 2, lane & 3};
}

__device__ __forceinline__ void tc_zero(float (&acc)[2][4][4]) {
  for (int mi = 0; mi < 2; mi++)
    for (int ni = 0; ni < 4; ni++)
      for (int r = 0; r < 4; r++) acc[mi][ni][r] = 0.0f;
}

// One K step of TC_BK over the staged tiles (the caller syncs before and after).
__device__ __forceinline__ void tc_mma_k_step(float (&acc)[2][4][4], const uint16_t (*as)[TC_BK + TC_PAD],
                                              const uint16_t (*bs)[TC_BN + TC_PAD], const TcWarp &w) {
  for (int ks = 0; ks < TC_BK; ks += 16) {
    unsigned af[2][4], bf[4][2];
    for (int mi = 0; mi < 2; mi++) edm2_ldmatrix_x4(af[mi], &as[w.wm * 32 + mi * 16 + w.lane % 16][ks + 8 * (w.lane / 16)]);
    for (int ni = 0; ni < 4; ni++) edm2_ldmatrix_x2_trans(bf[ni], &bs[ks + w.lane % 16][w.wn * 32 + ni * 8]);
    for (int mi = 0; mi < 2; mi++)
      for (int ni = 0; ni < 4; ni++) edm2_mma_m16n8k16_bf16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
  }
}

// Stores the block's C tile at (m0, n0) of a row-major M x N output (T = float, or
// edm2_bf16: rounded on store), bounds-checked. C fragment: element r at row
// g + 8(r >> 1), column 2t + (r & 1) of each 16x8 tile.
template <typename T>
__device__ __forceinline__ void tc_store(T *out, long long M, long long N, long long m0, long long n0, const float (&acc)[2][4][4],
                                         const TcWarp &w) {
  for (int mi = 0; mi < 2; mi++)
    for (int ni = 0; ni < 4; ni++)
      for (int r = 0; r < 4; r++) {
        long long m = m0 + w.wm * 32 + mi * 16 + w.g + 8 * (r >> 1);
        long long n = n0 + w.wn * 32 + ni * 8 + 2 * w.t + (r & 1);
        if (m < M && n < N) out[m * N + n] = acc[mi][ni][r];
      }
}
