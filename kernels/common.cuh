// common.cuh — what every kernel file includes: the C ABI, and the launch macro, which
// is a real <<<>>> launch under nvcc and a simulated one under g++ (sim/cuda_sim.h,
// force-included by build.rs with EDM2_SIM defined).
#pragma once
#ifndef EDM2_SIM
#include <cuda_runtime.h>
#define EDM2_LAUNCH(kernel, grid, block, smem, stream, ...) \
  do {                                                     \
    edm2_count_launch();                                   \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__); \
  } while (0)
// Tensor cores: D = A·B + C for one warp, A 16x16 bf16 (row-major), B 16x8 bf16
// (column-major), C/D 16x8 fp32, in the PTX ISA's register fragments (a[4], b[2] hold two
// bf16 each, low half first; see sim/cuda_sim.h for the layout, which the harness
// emulates). Needs sm_80+.
__device__ __forceinline__ void edm2_mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
// ldmatrix.sync.aligned.m8n8.x{4,2}[.trans].shared.b16: the warp loads four (two) 8x8
// b16 matrices from shared memory; lanes 8i..8i+7 give the 16-byte-aligned addresses of
// matrix i's eight rows. Lane l receives in r[i] row l>>2, elements 2(l&3) and 2(l&3)+1 of
// matrix i (low half first) — with .trans the transpose: rows 2(l&3) and 2(l&3)+1 of
// column l>>2. With a 16x16 row-major tile and lane l pointing at row l%16, column
// 8(l/16), x4 gives exactly the A fragment of edm2_mma_m16n8k16_bf16; x2.trans over a
// 16x8 row-major [k][n] tile gives its B fragment.
__device__ __forceinline__ void edm2_ldmatrix_x4(unsigned r[4], const void *row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}
__device__ __forceinline__ void edm2_ldmatrix_x4_trans(unsigned r[4], const void *row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}
__device__ __forceinline__ void edm2_ldmatrix_x2(unsigned r[2], const void *row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
}
__device__ __forceinline__ void edm2_ldmatrix_x2_trans(unsigned r[2], const void *row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
}
// cp.async (sm_80+): a 16-byte global→shared copy that completes asynchronously. Copies
// issued before edm2_cp_async_commit form a group; edm2_cp_async_wait_group<N> waits until
// at most N groups of this thread are pending, edm2_cp_async_wait_all for all. The data
// is visible to the issuing thread after the wait, to the others after a __syncthreads.
// (The harness performs a thread's copies only at its wait, so a missing wait reads the
// poisoned shared memory.)
__device__ __forceinline__ void edm2_cp_async_16(void *smem_dst, const void *gmem_src) {
  unsigned d = (unsigned)__cvta_generic_to_shared(smem_dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(gmem_src) : "memory");
}
// The same with zero fill: copies src_bytes (0 or 16) and fills the rest of the 16 bytes
// with zeros (PTX cp.async's src-size operand); with 0, nothing is read from src (which
// must still be a valid address). The padding of implicit-GEMM gathers.
__device__ __forceinline__ void edm2_cp_async_16_zfill(void *smem_dst, const void *gmem_src, int src_bytes) {
  unsigned d = (unsigned)__cvta_generic_to_shared(smem_dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(gmem_src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void edm2_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void edm2_cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void edm2_cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// A static shared-memory array, 16-byte aligned (ldmatrix and cp.async need it):
// `EDM2_SHARED(float, tile, [16][16]);`. The simulation harness poisons it (all bits set:
// NaN) at the start of every block, so reading shared memory that no thread of the block
// wrote shows up.
#define EDM2_SHARED(type, name, dims) __shared__ __align__(16) type name dims
#endif
#include "edm2.h"

// Every EDM2_LAUNCH counts itself here (host side, per launching thread, read by
// edm2_launch_count): `bench` reports launches per training step from it, the figure the
// launch-overhead work is judged by. Per thread, so that concurrent tests do not count
// each other's launches. An inline variable: one object across all .cu files.
inline thread_local unsigned long long edm2_launch_counter = 0;
static inline void edm2_count_launch() { edm2_launch_counter++; }

// The elementwise launchers that found every pointer of a launch 16-byte aligned and moved
// the values in 16-byte packs (edm2_lanes below): tests check that the packed path ran.
inline thread_local unsigned long long edm2_packed_counter = 0;

// Grid size for a grid-stride loop over n elements. The simulated device creates a
// thread per CUDA thread of every block, so there the grid is capped at a few blocks:
// the grid-stride loops then also run their multi-iteration path in the tests.
#ifdef EDM2_SIM
#define EDM2_MAX_BLOCKS 3u
#else
#define EDM2_MAX_BLOCKS (65535u * 8u)
#endif
static inline unsigned edm2_blocks(size_t n, unsigned threads) {
  size_t b = (n + threads - 1) / threads;
  return (unsigned)(b > EDM2_MAX_BLOCKS ? EDM2_MAX_BLOCKS : (b == 0 ? 1 : b));
}

#define EDM2_NORM_EPS 1e-4f
#define EDM2_MP_SILU_SCALE 0.596f

// Grid-stride loop over [0, n).
#define EDM2_FOR(i, n) for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

__device__ __forceinline__ float edm2_sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }
// mp_silu (paper Eq. 81) and its derivative.
__device__ __forceinline__ float edm2_mp_silu(float x) { return x * edm2_sigmoid(x) / EDM2_MP_SILU_SCALE; }
__device__ __forceinline__ float edm2_mp_silu_grad(float x) {
  float s = edm2_sigmoid(x);
  return s * (1.0f + x * (1.0f - s)) / EDM2_MP_SILU_SCALE;
}
// dx + dy·mp_silu'(x): the accumulating mp_silu backward (elementwise.cu) and the encoder
// block's fused pixel-norm backward (weight_norm.cu) share it, so the same bits.
__device__ __forceinline__ float edm2_mp_silu_grad_acc(float dx, float dy, float x) {
  float g = dy * edm2_mp_silu_grad(x);
  return dx + g;
}

// Sum of v over the block, returned to every thread. blockDim.x must be a power of two
// and `red` hold blockDim.x floats. A fixed tree: deterministic.
__device__ __forceinline__ float edm2_block_sum(float v, float *red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  float r = red[0];
  __syncthreads();  // `red` may be reused right after
  return r;
}

// The denominator of `normalize` (DESIGN.md §1): eps + ||x|| / sqrt(k), from Σx².
__device__ __forceinline__ float edm2_norm_denom(float ss, int k) { return EDM2_NORM_EPS + sqrtf(ss) * sqrtf(1.0f / (float)k); }

// x rounded to the nearest bfloat16 (ties to even), returned as a float: the value a bf16
// tensor would store. NaN and infinities pass through.
__device__ __forceinline__ float edm2_round_bf16(float x) {
  unsigned u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;
  u += 0x7fffu + ((u >> 16) & 1u);
  return __uint_as_float(u & 0xffff0000u);
}

// bf16 bits of x, rounded to nearest (ties to even); NaN stays a (quiet) NaN, overflow
// rounds to infinity as IEEE rounding does.
__device__ __forceinline__ uint16_t edm2_bf16_bits(float x) {
  unsigned u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// A bf16 value in memory (activation storage, DESIGN.md's bf16 mode): reads convert to
// float, stores of a float round to nearest even. Kernels are templates over their
// activation storage type T (float or edm2_bf16) and compute in float either way, so one
// kernel body serves both (`y[i] = f(x[i])`). 2 bytes, so a bf16 tensor is half the memory
// traffic of an fp32 one.
struct edm2_bf16 {
  uint16_t bits;
  __device__ __forceinline__ operator float() const { return __uint_as_float((unsigned)bits << 16); }
  __device__ __forceinline__ edm2_bf16 &operator=(float x) {
    bits = edm2_bf16_bits(x);
    return *this;
  }
};

// 16-byte packs (issue 16: elementwise work moves each byte once, in 16-byte accesses). A
// pack holds L values of T (EDM2_LANES(T): 8 bf16 or 4 fp32 make 16 bytes; a mask's bytes
// come in packs of as many lanes); with every pointer of a launch 16-byte aligned (pool
// buffers are) a kernel reads and writes whole packs — one ld/st.global.v4 each, which
// nvcc emits for these aligned aggregates — and the values past the last whole pack one at
// a time. An unaligned launch passes 0 packs: everything one at a time, the same
// arithmetic per value either way (so the same bits).
template <typename T, int L>
struct alignas(sizeof(T) * L) edm2_lanes {
  T v[L];
};
#define EDM2_LANES(T) (16 / (int)sizeof(T))
// Pack j (values jL .. jL + L − 1) of p.
template <int L, typename T>
__device__ __forceinline__ edm2_lanes<T, L> edm2_load_lanes(const T *p, size_t j) {
  return reinterpret_cast<const edm2_lanes<T, L> *>(p)[j];
}
template <int L, typename T>
__device__ __forceinline__ void edm2_store_lanes(T *p, size_t j, const edm2_lanes<T, L> &v) {
  reinterpret_cast<edm2_lanes<T, L> *>(p)[j] = v;
}
// Host side: whether every pointer is 16-byte aligned (null counts as aligned: an absent
// optional operand).
template <typename... P>
static inline bool edm2_aligned16(P... p) {
  return (((((uintptr_t)(const void *)p) & 15u) == 0) && ...);
}
// Packs of a launch over n values of lanes L: n / L where `aligned`, else 0; counts a
// packed launch.
static inline size_t edm2_packs(size_t n, int lanes, bool aligned) {
  size_t packs = aligned ? n / (size_t)lanes : 0;
  if (packs > 0) edm2_packed_counter++;
  return packs;
}
// Work items of a packed launch's grid: the packs, or the values when there are none.
static inline size_t edm2_items(size_t n, size_t packs) { return packs > 0 ? packs : n; }

// The body of a launcher taking an activation dtype (edm2.h: EDM2_F32, EDM2_BF16): runs
// `body` (which returns) with T the storage type; an unknown dtype returns
// cudaErrorInvalidValue. Use as the launcher's last statement. EDM2_BY_DTYPE_AS names the
// type (for a second dtype inside the body; a template-id with two arguments must then be
// taken into a variable first, as macro arguments split at its comma).
#define EDM2_BY_DTYPE_AS(dtype, TT, ...) \
  if ((dtype) == EDM2_F32) {             \
    typedef float TT;                    \
    __VA_ARGS__;                         \
  }                                      \
  if ((dtype) == EDM2_BF16) {            \
    typedef edm2_bf16 TT;                \
    __VA_ARGS__;                         \
  }                                      \
  return 1
#define EDM2_BY_DTYPE(dtype, ...) EDM2_BY_DTYPE_AS(dtype, T, __VA_ARGS__)

// A launcher's body for a grid-stride elementwise kernel over `count` items (256 threads
// a block, `stream` the launcher's argument): nothing to do for 0 items, else the launch
// and its launch error.
#define EW_LAUNCH(kernel, count, ...)                                            \
  do {                                                                           \
    size_t count_ = (count);                                                     \
    if (count_ == 0) return 0;                                                   \
    EDM2_LAUNCH(kernel, edm2_blocks(count_, 256), 256, 0, stream, __VA_ARGS__); \
    return (int)cudaGetLastError();                                              \
  } while (0)
