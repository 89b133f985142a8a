// reduce.cu — sums: a shared-memory tree within a block, then warp shuffles for the last
// 32 values; two launches for a whole array (per-block partials, then one block).
// Overwrites partials[0..edm2_sum_partials(n)) and out[0]. Deterministic: a fixed tree.
// sum_add: out[0] += the sum, one block, one launch (short vectors: gain gradients);
// sum_add_multi: many of them in one launch, a block each.
// Also the simulation harness's self-tests (a barrier that must not be left out, and a
// warp-shuffle reduction).
#include "common.cuh"
#include "multi_tensor.cuh"

#define SUM_THREADS 256
#define SUM_MAX_BLOCKS 1024

__device__ __forceinline__ float warp_sum(float v) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  return v;
}

// This block's sum of x[i] for i = start + k·stride (a fixed tree: deterministic).
__device__ __forceinline__ float block_sum_strided(const float *__restrict__ x, size_t n, size_t start, size_t stride, float *s) {
  float v = 0.0f;
  for (size_t i = start; i < n; i += stride) v += x[i];
  s[threadIdx.x] = v;
  __syncthreads();
  for (unsigned st = blockDim.x / 2; st >= 32; st >>= 1) {
    if (threadIdx.x < st) s[threadIdx.x] += s[threadIdx.x + st];
    __syncthreads();
  }
  return threadIdx.x < 32 ? warp_sum(s[threadIdx.x]) : 0.0f;  // valid in thread 0
}

// One block's sum of x[i] for i = start + k·stride, into out[blockIdx.x] (added to it with
// `accumulate`).
__global__ void block_sum_kernel(const float *__restrict__ x, float *__restrict__ out, size_t n, int accumulate) {
  EDM2_SHARED(float, s, [SUM_THREADS]);
  float w = block_sum_strided(x, n, (size_t)blockIdx.x * blockDim.x + threadIdx.x, (size_t)gridDim.x * blockDim.x, s);
  if (threadIdx.x == 0) out[blockIdx.x] = accumulate ? out[blockIdx.x] + w : w;
}

// sum_add of many vectors: block b adds table row b's x into its out[0], as a one-block
// edm2_sum_add_f32 does (the same bits).
__global__ void sum_add_multi_kernel(const unsigned long long *__restrict__ table, int n_tensors) {
  EDM2_SHARED(float, s, [SUM_THREADS]);
  for (int b = blockIdx.x; b < n_tensors; b += gridDim.x) {
    const unsigned long long *t = table + (size_t)b * EDM2_MT_ROW;
    float w = block_sum_strided((const float *)t[0], (size_t)t[EDM2_MT_LEN], threadIdx.x, blockDim.x, s);
    if (threadIdx.x == 0) *(float *)t[1] += w;
    __syncthreads();  // `s` is reused by the next vector
  }
}

extern "C" int edm2_sum_add_f32(const float *x, float *out, size_t n, cudaStream_t stream) {
  EDM2_LAUNCH(block_sum_kernel, 1, SUM_THREADS, 0, stream, x, out, n, 1);
  return (int)cudaGetLastError();
}

extern "C" int edm2_sum_add_multi_f32(const unsigned long long *table, int n_tensors, cudaStream_t stream) {
  if (n_tensors <= 0) return 0;
  unsigned blocks = (unsigned)(n_tensors < SUM_MAX_BLOCKS ? n_tensors : SUM_MAX_BLOCKS);
  EDM2_LAUNCH(sum_add_multi_kernel, blocks, SUM_THREADS, 0, stream, table, n_tensors);
  return (int)cudaGetLastError();
}

extern "C" size_t edm2_sum_partials(size_t n) {
  size_t b = (n + SUM_THREADS - 1) / SUM_THREADS;
  return b == 0 ? 1 : (b > SUM_MAX_BLOCKS ? SUM_MAX_BLOCKS : b);
}

extern "C" int edm2_sum_f32(const float *x, float *partials, float *out, size_t n, cudaStream_t stream) {
  unsigned blocks = (unsigned)edm2_sum_partials(n);
  EDM2_LAUNCH(block_sum_kernel, blocks, SUM_THREADS, 0, stream, x, partials, n, 0);
  EDM2_LAUNCH(block_sum_kernel, 1, SUM_THREADS, 0, stream, (const float *)partials, out, (size_t)blocks, 0);
  return (int)cudaGetLastError();
}

// Self-test: the classic shared-memory tree down to one value; with skip_sync the barrier
// between levels is left out, so a thread may read a partial sum before it is written.
__global__ void selftest_block_sum_kernel(const float *__restrict__ x, float *__restrict__ out, int skip_sync) {
  EDM2_SHARED(float, s, [1024]);
  s[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
    if (!skip_sync) __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = s[0];
}

extern "C" int edm2_selftest_block_sum(const float *x, float *out, int threads, int skip_sync, cudaStream_t stream) {
  EDM2_LAUNCH(selftest_block_sum_kernel, 1, threads, 0, stream, x, out, skip_sync);
  return (int)cudaGetLastError();
}

// Self-test: each of 2 warps sums its 32 values with shuffles; out[w] = sum of warp w.
__global__ void selftest_warp_sum_kernel(const float *__restrict__ x, float *__restrict__ out) {
  float v = warp_sum(x[threadIdx.x]);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v;
}

extern "C" int edm2_selftest_warp_sum(const float *x, float *out, cudaStream_t stream) {
  EDM2_LAUNCH(selftest_warp_sum_kernel, 1, 64, 0, stream, x, out);
  return (int)cudaGetLastError();
}

#ifdef EDM2_SIM
extern "C" void edm2_sim_set_schedule(int reverse) { edm2sim::schedule() = reverse; }
#endif

// Self-test of the harness's shared-memory poisoning: block 0 writes all 64 entries,
// block 1 only the lower 32; each block reads entries 3 and 40. In the simulation block 1
// reads NaN at 40 (poisoned at its start), not block 0's stale value.
__global__ void selftest_shared_poison_kernel(float *out) {
  EDM2_SHARED(float, s, [64]);
  if (blockIdx.x == 0 || threadIdx.x < 32) s[threadIdx.x] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) {
    out[blockIdx.x * 2] = s[3];
    out[blockIdx.x * 2 + 1] = s[40];
  }
}

extern "C" int edm2_selftest_shared_poison(float *out, cudaStream_t stream) {
  EDM2_LAUNCH(selftest_shared_poison_kernel, 2, 64, 0, stream, out);
  return (int)cudaGetLastError();
}

// Self-test of the tensor-core fragment layout: one warp computes D = A·B (A 16x16 and B
// 16x8, bf16 bits, both row-major in memory; D 16x8 fp32 row-major) by loading the
// fragments as the PTX ISA lays them out. wrong_layout = 1 loads B as if it were indexed
// [n][k] — a layout bug the round-trip test must see.
__global__ void selftest_mma_kernel(const uint16_t *a, const uint16_t *b, float *d, int wrong_layout) {
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  unsigned af[4], bf[2];
  for (int r = 0; r < 4; r++) {
    int row = g + 8 * (r & 1), k = 2 * t + 8 * (r >> 1);
    af[r] = (unsigned)a[row * 16 + k] | ((unsigned)a[row * 16 + k + 1] << 16);
  }
  for (int r = 0; r < 2; r++) {
    int k = 2 * t + 8 * r, n = g;
    if (wrong_layout)
      bf[r] = (unsigned)b[(n % 8) * 16 / 8 + k] | ((unsigned)b[(n % 8) * 16 / 8 + k + 1] << 16);
    else
      bf[r] = (unsigned)b[k * 8 + n] | ((unsigned)b[(k + 1) * 8 + n] << 16);
  }
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, out[4];
  edm2_mma_m16n8k16_bf16(out, af, bf, c);
  for (int i = 0; i < 4; i++) d[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = out[i];
}

extern "C" int edm2_selftest_mma(const uint16_t *a, const uint16_t *b, float *d, int wrong_layout, cudaStream_t stream) {
  EDM2_LAUNCH(selftest_mma_kernel, 1, 32, 0, stream, a, b, d, wrong_layout);
  return (int)cudaGetLastError();
}

// Self-test of ldmatrix and cp.async as a tensor-core kernel uses them: one warp stages A
// (16x16 bf16) and B (16x8 bf16), both row-major in global memory, into shared memory
// with cp.async (32 + 16 copies of 16 bytes), waits, loads the mma fragments with
// ldmatrix (A: x4, lane l at row l%16, column 8(l/16); B: x2.trans, lane l at row l%16)
// and multiplies. regs[6·lane + 0..3] = A fragment, + 4..5 = B fragment; d = A·B row-major.
// skip_wait = 1 leaves out the cp.async wait (a bug the harness must expose).
__global__ void selftest_ldmatrix_kernel(const uint16_t *a, const uint16_t *b, unsigned *regs, float *d, int skip_wait) {
  EDM2_SHARED(uint16_t, as, [16 * 16]);
  EDM2_SHARED(uint16_t, bs, [16 * 8]);
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  edm2_cp_async_16(&as[lane * 8], &a[lane * 8]);
  if (lane < 16) edm2_cp_async_16(&bs[lane * 8], &b[lane * 8]);
  edm2_cp_async_commit();
  if (!skip_wait) edm2_cp_async_wait_group<0>();
  __syncthreads();
  unsigned af[4], bf[2];
  edm2_ldmatrix_x4(af, &as[(lane % 16) * 16 + 8 * (lane / 16)]);
  edm2_ldmatrix_x2_trans(bf, &bs[(lane % 16) * 8]);
  for (int i = 0; i < 4; i++) regs[6 * lane + i] = af[i];
  for (int i = 0; i < 2; i++) regs[6 * lane + 4 + i] = bf[i];
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, out[4];
  edm2_mma_m16n8k16_bf16(out, af, bf, c);
  for (int i = 0; i < 4; i++) d[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = out[i];
}

extern "C" int edm2_selftest_ldmatrix(const uint16_t *a, const uint16_t *b, unsigned *regs, float *d, int skip_wait, cudaStream_t stream) {
  EDM2_LAUNCH(selftest_ldmatrix_kernel, 1, 32, 0, stream, a, b, regs, d, skip_wait);
  return (int)cudaGetLastError();
}

// Self-test of the race-hunting mode: every thread adds 1 to one shared float without an
// atomic — a lost-update race inside a barrier segment. The fiber mode runs one thread at
// a time and always gets blockDim.x (it cannot see this kind of race); under
// ThreadSanitizer (feature cuda-sim-tsan) the race must be reported.
__global__ void selftest_shared_increment_kernel(float *out) {
  EDM2_SHARED(float, s, [1]);
  if (threadIdx.x == 0) s[0] = 0.0f;
  __syncthreads();
  s[0] += 1.0f;  // the race
  __syncthreads();
  if (threadIdx.x == 0) out[0] = s[0];
}

extern "C" int edm2_selftest_shared_increment(float *out, cudaStream_t stream) {
  EDM2_LAUNCH(selftest_shared_increment_kernel, 1, 64, 0, stream, out);
  return (int)cudaGetLastError();
}
