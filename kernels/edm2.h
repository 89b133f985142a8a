/* edm2.h — the C ABI of our CUDA kernels (bindgen turns this into Rust; every .cu file
 * includes it). Pointers are device pointers (host pointers in the simulation mode).
 * Return value: cudaError_t as int (0 = success; launch errors only). */
#ifndef EDM2_KERNELS_H
#define EDM2_KERNELS_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
/* identical to the typedef in CUDA's driver_types.h, so a cudarc CUstream passes through */
typedef struct CUstream_st *cudaStream_t;

/* elementwise.cu */
int edm2_mp_silu_f32(const float *x, float *y, size_t n, cudaStream_t stream);
int edm2_mp_silu_backward_f32(const float *x, const float *dy, float *dx, size_t n, cudaStream_t stream);
int edm2_mp_sum_f32(float *a, const float *b, float t, size_t n, cudaStream_t stream);

/* optim.cu: Adam with non-finite zeroing (adds the count to *nonfinite), EMA lerp. */
int edm2_adam_f32(float *p, const float *g, float *m, float *v, float beta1, float beta2, float bc2_sqrt, float eps,
                  float step, size_t n, unsigned *nonfinite, cudaStream_t stream);
int edm2_ema_lerp_f32(float *e, const float *p, float w, size_t n, cudaStream_t stream);

/* reduce.cu: out[0] = sum of x (two launches: per-block partials into `partials`, which
 * must hold edm2_sum_partials(n) floats, then one block). */
size_t edm2_sum_partials(size_t n);
int edm2_sum_f32(const float *x, float *partials, float *out, size_t n, cudaStream_t stream);

/* Harness self-tests (reduce.cu): a block sum in shared memory with the barrier between
 * tree levels optionally left out (skip_sync = 1, a deliberate bug the simulation must
 * expose), and a warp-shuffle sum. One block of `threads` (power of two ≤ 1024) threads. */
int edm2_selftest_block_sum(const float *x, float *out, int threads, int skip_sync, cudaStream_t stream);
int edm2_selftest_warp_sum(const float *x, float *out, cudaStream_t stream);

/* Simulation mode only: thread schedule of a block, 0 = forward, 1 = reverse. */
void edm2_sim_set_schedule(int reverse);
#ifdef __cplusplus
}
#endif
#endif
