// tc_pipe.cuh — the pipelined tensor-core block tile (CUTLASS's multistage implicit GEMM,
// cut down to what our convolutions need): C (BM x BN, fp32 in registers) += A (BM x K) ·
// B (K x BN), A and B both stored K-contiguous ("row-major A, column-major B": A[m][k],
// B as Bt[n][k]), streamed through TCP_STAGES shared-memory stages by cp.async, so the
// copies of step k + 2 run while the tensor cores work on step k.
//
// - Stage layout: per operand [rows][TCP_BK = 32] bf16 = 64 bytes = four 16-byte chunks a
//   row, no padding. Chunk c of row r sits at chunk c ^ ((r >> 1) & 3) (XOR swizzle): the
//   eight rows one ldmatrix phase reads (rows r..r+7, one logical chunk) then fall on eight
//   different 16-byte bank groups, so fragment loads are free of bank conflicts, and the
//   16-byte cp.async stores stay whole.
// - Warps: WM x WN, each a 64 x 32 warp tile = 4 m16 × 4 n8 mma.m16n8k16 (64 fp32
//   accumulators a thread). A fragments by ldmatrix.x4, B fragments two n8 tiles at a time
//   by ldmatrix.x4 on Bt (non-transposed: Bt rows are B's columns).
// - The caller's `load(stage, kt)` issues the cp.async copies of K step kt into a stage;
//   tcp_mainloop commits one group per step (empty ones too: the group count stays in step
//   with kt), waits for step kt with cp.async.wait_group(TCP_STAGES − 2) and one
//   __syncthreads, which also tells every thread that the stage about to be refilled
//   (consumed one step earlier) is free.
// - The weight gradient's operands come the other way round (dy [pixel][o] and x
//   [pixel][i]: M- and N-contiguous), so tcp_mainloop<.., MN_MAJOR = true> keeps each
//   stage as [TCP_BK k-rows][BM or BN] with chunk c of row k at c ^ (k & 7) (the 128-byte
//   swizzle: ldmatrix reads eight k-rows of one chunk) and loads both fragments with
//   ldmatrix.x4.trans.
#pragma once
#include "common.cuh"

#define TCP_BK 32
#define TCP_STAGES 3

template <int WM, int WN>
struct TcpShape {
  static constexpr int BM = 64 * WM, BN = 32 * WN, THREADS = 32 * WM * WN;
  static constexpr int A_STAGE = BM * TCP_BK, B_STAGE = BN * TCP_BK;  // elements
};

// Element offset of chunk c (8 bf16) of row r in a [rows][32] stage.
__device__ __forceinline__ int tcp_swizzle(int r, int c) { return r * TCP_BK + ((c ^ ((r >> 1) & 3)) << 3); }

// One stage (two k16 steps) of the warp tile at (wm, wn).
__device__ __forceinline__ void tcp_mma_stage(float (&acc)[4][4][4], const uint16_t *as, const uint16_t *bs, int wm, int wn, int lane) {
#pragma unroll
  for (int ks = 0; ks < 2; ks++) {
    unsigned af[4][4], bf[4][2];
#pragma unroll
    for (int mi = 0; mi < 4; mi++) edm2_ldmatrix_x4(af[mi], as + tcp_swizzle(wm * 64 + mi * 16 + lane % 16, ks * 2 + lane / 16));
#pragma unroll
    for (int nj = 0; nj < 2; nj++) {
      unsigned t[4];
      // Matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
      edm2_ldmatrix_x4(t, bs + tcp_swizzle(wn * 32 + nj * 16 + (lane / 16) * 8 + lane % 8, ks * 2 + (lane / 8) % 2));
      bf[2 * nj][0] = t[0];
      bf[2 * nj][1] = t[1];
      bf[2 * nj + 1][0] = t[2];
      bf[2 * nj + 1][1] = t[3];
    }
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
#pragma unroll
      for (int ni = 0; ni < 4; ni++) edm2_mma_m16n8k16_bf16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
  }
}

// Element offset of chunk c (8 bf16) of k-row k in an MN-major stage of `width` elements a row.
__device__ __forceinline__ int tcp_swizzle_mn(int k, int c, int width) { return k * width + ((c ^ (k & 7)) << 3); }

// One MN-major stage: A as At[k][BM], B as Bs[k][BN].
template <int BM, int BN>
__device__ __forceinline__ void tcp_mma_stage_mn(float (&acc)[4][4][4], const uint16_t *as, const uint16_t *bs, int wm, int wn, int lane) {
  const int i = lane / 8, r = lane % 8;
#pragma unroll
  for (int ks = 0; ks < 2; ks++) {
    unsigned af[4][4], bf[4][2];
    // A matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15), stored
    // transposed: lane l points at k-row (l / 16)·8 + l % 8 of chunk (m + ((l / 8) & 1)·8) / 8.
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
      edm2_ldmatrix_x4_trans(af[mi], as + tcp_swizzle_mn(ks * 16 + (i >> 1) * 8 + r, (wm * 64 + mi * 16 + (i & 1) * 8) / 8, BM));
    // B matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
#pragma unroll
    for (int nj = 0; nj < 2; nj++) {
      unsigned t[4];
      edm2_ldmatrix_x4_trans(t, bs + tcp_swizzle_mn(ks * 16 + (i & 1) * 8 + r, (wn * 32 + nj * 16 + (i >> 1) * 8) / 8, BN));
      bf[2 * nj][0] = t[0];
      bf[2 * nj][1] = t[1];
      bf[2 * nj + 1][0] = t[2];
      bf[2 * nj + 1][1] = t[3];
    }
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
#pragma unroll
      for (int ni = 0; ni < 4; ni++) edm2_mma_m16n8k16_bf16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
  }
}

// The multistage main loop over kt = 0..KT−1; `load(stage, kt)` issues step kt's copies.
template <int WM, int WN, bool MN_MAJOR = false, typename Load>
__device__ __forceinline__ void tcp_mainloop(float (&acc)[4][4][4], uint16_t *as, uint16_t *bs, int KT, const Load &load) {
  typedef TcpShape<WM, WN> S;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wm = warp / WN, wn = warp % WN;
#pragma unroll
  for (int mi = 0; mi < 4; mi++)
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
      for (int r = 0; r < 4; r++) acc[mi][ni][r] = 0.0f;
#pragma unroll
  for (int st = 0; st < TCP_STAGES - 1; st++) {
    if (st < KT) load(st, st);
    edm2_cp_async_commit();
  }
  for (int kt = 0; kt < KT; kt++) {
    edm2_cp_async_wait_group<TCP_STAGES - 2>();
    __syncthreads();
    const int next = kt + TCP_STAGES - 1;
    if (next < KT) load(next % TCP_STAGES, next);
    edm2_cp_async_commit();
    const int st = kt % TCP_STAGES;
    if (MN_MAJOR)
      tcp_mma_stage_mn<S::BM, S::BN>(acc, as + st * S::A_STAGE, bs + st * S::B_STAGE, wm, wn, lane);
    else
      tcp_mma_stage(acc, as + st * S::A_STAGE, bs + st * S::B_STAGE, wm, wn, lane);
  }
  edm2_cp_async_wait_all();  // no copy may still be in flight when the block exits
}

// Two adjacent bf16 values as one 4-byte store (p 4-byte aligned).
__device__ __forceinline__ void tcp_store_bf16x2(uint16_t *p, float a, float b) {
  unsigned v = (unsigned)edm2_bf16_bits(a) | ((unsigned)edm2_bf16_bits(b) << 16);
#ifdef EDM2_SIM
  std::memcpy(p, &v, 4);
#else
  *reinterpret_cast<unsigned *>(p) = v;
#endif
}

// Stores the warp tile's accumulators as bf16 into a row-major M x N output at block
// origin (m0, n0), bounds-checked; pairs of columns as one store where N is even.
template <int WN>
__device__ __forceinline__ void tcp_store_bf16(uint16_t *out, long long M, int N, long long m0, int n0, const float (&acc)[4][4][4]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wm = warp / WN, wn = warp % WN;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; mi++)
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        long long m = m0 + wm * 64 + mi * 16 + g + 8 * h;
        int n = n0 + wn * 32 + ni * 8 + 2 * t;
        if (m >= M || n >= N) continue;
        uint16_t *p = out + m * N + n;
        if ((N & 1) == 0) {
          tcp_store_bf16x2(p, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        } else {
          p[0] = edm2_bf16_bits(acc[mi][ni][2 * h]);
          if (n + 1 < N) p[1] = edm2_bf16_bits(acc[mi][ni][2 * h + 1]);
        }
      }
}

// Stores the warp tile's accumulators as fp32 into a row-major M x N output at block
// origin (m0, n0), bounds-checked (the weight gradient's partial tiles).
template <int WN>
__device__ __forceinline__ void tcp_store_f32(float *out, int M, int N, int m0, int n0, const float (&acc)[4][4][4]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wm = warp / WN, wn = warp % WN;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; mi++)
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        int m = m0 + wm * 64 + mi * 16 + g + 8 * h, n = n0 + wn * 32 + ni * 8 + 2 * t;
        if (m >= M) continue;
        float *p = out + (long long)m * N + n;
        if (n < N) p[0] = acc[mi][ni][2 * h];
        if (n + 1 < N) p[1] = acc[mi][ni][2 * h + 1];
      }
}

// The tile of a pipelined launch: 1 = 128x128, 2 = 128x64, 3 = 64x64 (M x N); 0 = the
// largest tile that still gives every SM of a big GPU (132 on an H100/H200) two blocks,
// else the smallest. (A guess until timings on the card say otherwise.)
static inline int edm2_conv_tc_pipe_variant(int variant, long long M, long long N) {
  if (variant != 0) return variant;
  const long long want = 2 * 132;
  if (((M + 127) / 128) * ((N + 127) / 128) >= want) return 1;
  if (((M + 127) / 128) * ((N + 63) / 64) >= want) return 2;
  return 3;
}
