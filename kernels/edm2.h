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

/* elementwise.cu (NHWC ops: see the file's header comment) */
int edm2_axpby_f32(float *a, const float *b, float wa, float wb, size_t n, cudaStream_t stream);
int edm2_scale_f32(float *a, float k, size_t n, cudaStream_t stream);
int edm2_downsample2_f32(const float *x, float *y, int n, int h, int w, int c, cudaStream_t stream);
int edm2_downsample2_backward_f32(const float *dy, float *dx, int n, int h, int w, int c, cudaStream_t stream);
int edm2_upsample2_f32(const float *x, float *y, int n, int h, int w, int c, cudaStream_t stream);
int edm2_upsample2_backward_f32(const float *dy, float *dx, int n, int h, int w, int c, cudaStream_t stream);
int edm2_mp_cat_f32(const float *a, int na, const float *b, int nb, float ka, float kb, float *out, size_t pixels, cudaStream_t stream);
int edm2_mp_cat_backward_f32(const float *dout, int na, int nb, float ka, float kb, float *da, float *db, size_t pixels,
                             cudaStream_t stream);
int edm2_modulate_silu_f32(const float *h, const float *s, float *y, int n, size_t pixels, int c, cudaStream_t stream);
int edm2_modulate_silu_backward_f32(const float *h, const float *s, const float *dy, float *dh, float *ds, int n, size_t pixels, int c,
                                    cudaStream_t stream);
int edm2_dropout_f32(float *x, float p, uint64_t seed, size_t n, cudaStream_t stream);
int edm2_clip_f32(float *x, uint8_t *mask, float limit, size_t n, cudaStream_t stream);
int edm2_clip_backward_f32(float *dy, const uint8_t *mask, size_t n, cudaStream_t stream);
int edm2_add_scalar_f32(float *a, float v, size_t n, cudaStream_t stream);
int edm2_scaled_f32(const float *x, float *y, float k, size_t n, cudaStream_t stream);
int edm2_scale_images_f32(float *x, const float *k, size_t per, size_t n, cudaStream_t stream);
int edm2_precond_input_f32(const float *x, const float *c_in, float *out, int c, size_t pixels_per_image, size_t images,
                           cudaStream_t stream);
int edm2_precond_output_f32(const float *x, const float *f, const float *c_skip, const float *c_out, float *d, size_t per, size_t n,
                            cudaStream_t stream);
int edm2_mp_fourier_f32(const float *x, const float *freqs, const float *phases, float *y, size_t n, int c, cudaStream_t stream);

/* weight_norm.cu: rows of k contiguous values (x == y allowed); effective weight OIHW → OHWI
 * (taps = 9 for 3x3, 1 for 1x1/linear) with per-row denominators; its backward. */
int edm2_normalize_rows_f32(const float *x, float *y, size_t rows, int k, cudaStream_t stream);
int edm2_normalize_rows_backward_f32(const float *x, const float *dy, float *dx, size_t rows, int k, cudaStream_t stream);
int edm2_effective_weight_f32(const float *w, float *eff, float *denom, int out_ch, int in_ch, int taps, float gain,
                              cudaStream_t stream);
int edm2_effective_weight_backward_f32(const float *w, const float *d_eff, const float *denom, float *dw, float *row_dgain, int out_ch,
                                       int in_ch, int taps, float gain, cudaStream_t stream);

/* conv.cu: NHWC activations, OHWI effective weight, k = 3 (3x3 'same'), 1 (1x1) or 0 (linear,
 * h = w = 1). All overwrite their output. bf16 = 1: bf16 operands, fp32 accumulation (see the file). */
int edm2_conv_forward_f32(const float *x, const float *w, float *y, int n, int h, int wd, int cin, int cout, int k, int bf16,
                          cudaStream_t stream);
int edm2_conv_backward_data_f32(const float *dy, const float *w, float *dx, int n, int h, int wd, int cin, int cout, int k, int bf16,
                                cudaStream_t stream);
int edm2_conv_backward_weight_f32(const float *x, const float *dy, float *dw, int n, int h, int wd, int cin, int cout, int k, int bf16,
                                  cudaStream_t stream);

/* attention.cu: qkv [N, P, 3C] → y [N, P, C]; workspace qn/kn/vn [N, heads, P, C/heads],
 * w and dl [N, heads, P, P]; backward overwrites dqkv (and the dqn/dkn/dvn/dl scratch). */
int edm2_attention_forward_f32(const float *qkv, float *y, float *qn, float *kn, float *vn, float *w, int n, int p, int c, int heads,
                               cudaStream_t stream);
int edm2_attention_backward_f32(const float *qkv, const float *qn, const float *kn, const float *vn, const float *w, const float *dy,
                                float *dl, float *dqn, float *dkn, float *dvn, float *dqkv, int n, int p, int c, int heads,
                                cudaStream_t stream);

/* loss.cu: the EDM2 loss of n images of `per` values: dd (overwritten) and per-image sums
 * sums[2b] = Σ(l + u_b), sums[2b+1] = Σ(1 − l); w[b] = λ(σ_b)/exp(u_b). */
int edm2_loss_f32(const float *d, const float *y, const float *w, const float *logvar, float *dd, float *sums, size_t n, size_t per,
                  float dd_scale, cudaStream_t stream);

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
/* One warp: d (16x8 f32) = a (16x16 bf16 bits) · b (16x8 bf16 bits) through the tensor-core
 * fragment helper; wrong_layout = 1 loads b with a deliberately wrong layout. */
int edm2_selftest_mma(const uint16_t *a, const uint16_t *b, float *d, int wrong_layout, cudaStream_t stream);
int edm2_selftest_ldmatrix(const uint16_t *a, const uint16_t *b, unsigned *regs, float *d, int skip_wait, cudaStream_t stream);
/* Two blocks of 64 threads read shared memory only block 0 wrote fully: out[4]. */
int edm2_selftest_shared_poison(float *out, cudaStream_t stream);
int edm2_selftest_shared_increment(float *out, cudaStream_t stream);

/* Simulation mode only: thread schedule of a block, 0 = forward, 1 = reverse. */
void edm2_sim_set_schedule(int reverse);
#ifdef __cplusplus
}
#endif
#endif
