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

/* Activation storage types: pointers declared `void *` point at activations of the
 * launcher's `dtype` (fp32, or bf16 bit patterns; arithmetic is fp32 either way). Every
 * other pointer is fp32. An unknown dtype returns 1 (cudaErrorInvalidValue). */
#define EDM2_F32 0
#define EDM2_BF16 1

/* elementwise.cu (NHWC ops: see the file's header comment) */
int edm2_mp_silu(const void *x, void *y, size_t n, int dtype, cudaStream_t stream);
int edm2_mp_silu_backward(const void *x, const void *dy, void *dx, size_t n, int accumulate, int dtype, cudaStream_t stream);
int edm2_mp_sum(void *a, const void *b, float t, size_t n, int dtype, cudaStream_t stream);
int edm2_axpby(void *a, const void *b, float wa, float wb, size_t n, int dtype, cudaStream_t stream);
int edm2_axpby_clip(void *a, const void *b, float wa, float wb, float limit, uint8_t *mask, size_t n, int dtype, cudaStream_t stream);
int edm2_scale(void *a, float k, size_t n, int dtype, cudaStream_t stream);
int edm2_downsample2(const void *x, void *y, int n, int h, int w, int c, int dtype, cudaStream_t stream);
int edm2_downsample2_backward(const void *dy, void *dx, int n, int h, int w, int c, int dtype, cudaStream_t stream);
int edm2_upsample2(const void *x, void *y, int n, int h, int w, int c, int dtype, cudaStream_t stream);
int edm2_upsample2_backward(const void *dy, void *dx, int n, int h, int w, int c, int dtype, cudaStream_t stream);
int edm2_mp_cat(const void *a, int na, const void *b, int nb, float ka, float kb, void *out, size_t pixels, int dtype, cudaStream_t stream);
int edm2_mp_cat_backward(const void *dout, int na, int nb, float ka, float kb, void *da, void *db, size_t pixels, int dtype,
                         cudaStream_t stream);
/* modulate_silu: y = mp_silu(h·(s + 1)); s and ds [n, c] are fp32 (the embedding path) in both precisions. */
int edm2_modulate_silu(const void *h, const float *s, void *y, int n, size_t pixels, int c, int dtype, cudaStream_t stream);
int edm2_modulate_silu_backward(const void *h, const float *s, const void *dy, void *dh, float *ds, int n, size_t pixels, int c, int dtype,
                                cudaStream_t stream);
int edm2_dropout(void *x, float p, uint64_t seed, size_t n, int dtype, cudaStream_t stream);
int edm2_clip(void *x, uint8_t *mask, float limit, size_t n, int dtype, cudaStream_t stream);
int edm2_clip_backward(void *dy, const uint8_t *mask, size_t n, int dtype, cudaStream_t stream);
int edm2_add_scalar(void *a, float v, size_t n, int dtype, cudaStream_t stream);
/* y (dtype) = k·x (x_dtype): also a dtype conversion. */
int edm2_scaled(const void *x, int x_dtype, void *y, float k, size_t n, int dtype, cudaStream_t stream);
int edm2_split_scaled(void *x, void *y, float ka, float kb, const uint8_t *mask, size_t n, int dtype, cudaStream_t stream);
int edm2_scale_images(void *x, const float *k, size_t per, size_t n, int dtype, cudaStream_t stream);
/* Preconditioning: the input x and the output d are of x_dtype, out and f of dtype. */
int edm2_precond_input(const void *x, int x_dtype, const float *c_in, void *out, int c, size_t pixels_per_image, size_t images, int dtype,
                       cudaStream_t stream);
int edm2_precond_output(const void *x, int x_dtype, const void *f, const float *c_skip, const float *c_out, void *d, size_t per, size_t n,
                        int dtype, cudaStream_t stream);
int edm2_mp_fourier(const float *x, const float *freqs, const float *phases, void *y, size_t n, int c, int dtype, cudaStream_t stream);

/* sampler.cu: the EDM sampler's steps on fp32 buffers (see the file's header comment). */
int edm2_heun_euler(const float *x, const float *d, float t_hat, float h, float *dc, float *next, size_t n, cudaStream_t stream);
int edm2_heun_correct(const float *x, const float *dc, const float *xn, const float *dn, float t_next, float h, float *next, size_t n,
                      cudaStream_t stream);
int edm2_guidance_lerp(const float *g, const float *d, float w, float *out, size_t n, cudaStream_t stream);
int edm2_add_noise(const float *x, const float *e, float k, float *out, size_t n, cudaStream_t stream);

/* weight_norm.cu: rows of k contiguous values (x == y allowed; fp32 weights or activations of
 * `dtype`); effective weight OIHW → OHWI (taps = 9 for 3x3, 1 for 1x1/linear) with per-row
 * denominators; its backward. */
/* With a (may be null): also a = mp_silu(y) (an encoder block's pixel norm and its branch's first op). */
int edm2_normalize_rows(const void *x, void *y, void *a, size_t rows, int k, int dtype, cudaStream_t stream);
/* The forced normalization of one fp32 weight's rows, in place (the bits of edm2_normalize_rows_multi_f32). */
int edm2_normalize_weight_rows_f32(float *w, size_t rows, int k, cudaStream_t stream);
/* Rows of many fp32 tensors normalized in place, one launch: a multi-tensor table (see
 * optim.cu's section below) whose chunks are rows, slot 0 the tensor, EDM2_MT_ARG its row
 * length, n_rows the total. */
int edm2_normalize_rows_multi_f32(const unsigned long long *table, int n_tensors, long long n_rows, cudaStream_t stream);
/* edm2_effective_weight_f32 of many weights in one launch; chunks are output rows. A table
 * row: slots 0-3 w, eff, denom, gain_at (0: none); EDM2_MT_LEN in_ch; EDM2_MT_ARG taps in
 * the low 32 bits and the f32 bits of the fixed gain in the high 32; EDM2_MT_EXTRA + 0, 1:
 * eff_bf16, flip_bf16 (0: none); EDM2_MT_EXTRA + 2: out_ch. */
int edm2_effective_weight_multi_f32(const unsigned long long *table, int n_tensors, long long n_rows, cudaStream_t stream);
/* With xm and da0 (may be null): the gradient taken is dy + da0·mp_silu'(xm) (an encoder block). */
int edm2_normalize_rows_backward(const void *x, const void *dy, const void *xm, const void *da0, void *dx, size_t rows, int k, int dtype,
                                 cudaStream_t stream);
/* The gain is *gain_at where gain_at is not null (a gain parameter, read on the device),
 * else `gain`. eff_bf16 / flip_bf16 (may be null): eff in bf16, and its flipped transpose
 * [in][taps][out] (taps reversed) in bf16, for the tensor-core convolutions. The backward adds into dw where `accumulate` is set (a gradient buffer). */
int edm2_effective_weight_f32(const float *w, float *eff, float *denom, uint16_t *eff_bf16, uint16_t *flip_bf16, int out_ch, int in_ch,
                              int taps, float gain, const float *gain_at, cudaStream_t stream);
/* row_dgain may be null (no gain gradient wanted). */
int edm2_effective_weight_backward_f32(const float *w, const float *d_eff, float *dw, float *row_dgain, int out_ch, int in_ch, int taps,
                                       float gain, const float *gain_at, int accumulate, cudaStream_t stream);
/* edm2_effective_weight_backward_f32 of many layers in one launch; chunks are output rows. A
 * table row: slots 0-3 w, d_eff, dw, row_dgain (0: none); EDM2_MT_LEN in_ch; EDM2_MT_ARG taps
 * in the low 32 bits and the f32 bits of the fixed gain in the high 32; EDM2_MT_EXTRA + 0:
 * gain_at (0: none), + 1: accumulate. */
int edm2_effective_weight_backward_multi_f32(const unsigned long long *table, int n_tensors, long long n_rows, cudaStream_t stream);

/* conv.cu: NHWC activations of `dtype`, OHWI fp32 effective weight, k = 3 (3x3 'same'), 1 (1x1)
 * or 0 (linear, h = w = 1). All overwrite their output; the weight gradient is fp32. bf16
 * activations: bf16 operands, fp32 accumulation (see the file). */
int edm2_conv_forward(const void *x, const float *w, void *y, int n, int h, int wd, int cin, int cout, int k, int dtype,
                      cudaStream_t stream);
int edm2_conv_backward_data(const void *dy, const float *w, void *dx, int n, int h, int wd, int cin, int cout, int k, int accumulate,
                            int dtype, cudaStream_t stream);
int edm2_conv_backward_weight(const void *x, const void *dy, float *dw, int n, int h, int wd, int cin, int cout, int k, int dtype,
                              cudaStream_t stream);
/* Linear layers sharing their fp32 input x [n, cin] (the blocks' emb_linear), one launch each
 * way with the tiles of the calls above (the same bits as one call per layer): mode 0
 * forward y_b = x·W_bᵀ, 1 data gradient dx += dy_b·W_b for b in table order, 2 weight
 * gradient dW_b = dy_bᵀ·x. `table` (device memory): 4 u64 per layer — slot 0 W_b (modes 0,
 * 1) or dy_b (mode 2), slot 1 y_b / dy_b / dW_b, slot 2 cout_b; max_cout the largest. */
int edm2_linear_group(int mode, const unsigned long long *table, int layers, int max_cout, const float *x, float *dx, int n, int cin,
                      cudaStream_t stream);

/* conv_tc.cu: the forward of edm2_conv_forward on tensor cores, bf16 activations only (x and
 * y bf16 bits; same shapes, same rounding). */
int edm2_conv_forward_tc(const uint16_t *x, const float *w, uint16_t *y, int n, int h, int wd, int cin, int cout, int k,
                         cudaStream_t stream);

/* conv_tc.cu, pipelined (kernels/tc_pipe.cuh): the same forward for cin a multiple of 32 with
 * the weight given as bf16 bits wb [cout][taps·cin] (edm2_scaled of the OHWI weight). variant:
 * 0 = chosen from the shape, 1 = 128x128 tiles, 2 = 128x64, 3 = 64x64. Returns 1 (invalid
 * value) for a shape it does not take (cin not a multiple of 32) or an unknown variant. */
int edm2_conv_forward_tc_pipe(const uint16_t *x, const uint16_t *wb, uint16_t *y, int n, int h, int wd, int cin, int cout, int k,
                              int variant, cudaStream_t stream);

/* conv_tc_backward.cu: the gradients of edm2_conv_backward_data/_weight on tensor cores (bf16
 * activations). The data gradient is edm2_conv_forward_tc of dy with wf = edm2_conv_weight_flip(w)
 * (fp32 [cin, taps, cout], taps flipped) and cin/cout swapped. The weight gradient splits the
 * pixels over `splits` slices (edm2_conv_wgrad_tc_splits) with an fp32 workspace ws of
 * splits * cout * taps * cin floats (unused, may be NULL, when splits = 1), reduced in a fixed
 * order; overwrites dw. */
int edm2_conv_weight_flip(const float *w, float *wf, int cin, int cout, int k, cudaStream_t stream);
int edm2_conv_wgrad_tc_splits(int n, int h, int wd, int cin, int cout, int k);
int edm2_conv_backward_weight_tc(const uint16_t *x, const uint16_t *dy, float *dw, float *ws, int splits, int n, int h, int wd,
                                 int cin, int cout, int k, cudaStream_t stream);

/* conv_tc_backward.cu, pipelined (kernels/tc_pipe.cuh): the weight gradient for cin and cout
 * multiples of 8, the same split-K contract with its own slice count; variant as
 * edm2_conv_forward_tc_pipe's (0 = from the shape). Returns 1 for a shape it does not take. */
int edm2_conv_wgrad_tc_pipe_splits(int n, int h, int wd, int cin, int cout, int k, int variant);
int edm2_conv_backward_weight_tc_pipe(const uint16_t *x, const uint16_t *dy, float *dw, float *ws, int splits, int n, int h, int wd,
                                      int cin, int cout, int k, int variant, cudaStream_t stream);

/* attention.cu: qkv [N, P, 3C] → y [N, P, C] (activations of `dtype`); fp32 workspace qn/kn/vn
 * [N, heads, P, C/heads], w and dl [N, heads, P, P]; backward overwrites dqkv (and the
 * dqn/dkn/dvn/dl scratch). */
int edm2_attention_forward(const void *qkv, void *y, float *qn, float *kn, float *vn, float *w, int n, int p, int c, int heads, int dtype,
                           cudaStream_t stream);
int edm2_attention_backward(const void *qkv, const float *qn, const float *kn, const float *vn, const float *w, const void *dy, float *dl,
                            float *dqn, float *dkn, float *dvn, void *dqkv, int n, int p, int c, int heads, int dtype, cudaStream_t stream);

/* attention_flash.cu: the same attention for bf16 activations (qkv, y, dy, dqkv as bf16 bits),
 * FlashAttention-2 style on tensor cores, for head widths C/heads of 16, 32 or 64
 * (edm2_flash_attention_supported). Workspace: qkvn 3·N·P·C bf16 (the normalized q, k, v,
 * forward → backward), lse N·heads·P floats (forward → backward); backward scratch delta
 * N·heads·P and dqn/dkn/dvn N·P·C floats. No P x P buffer. */
int edm2_flash_attention_supported(int c, int heads);
int edm2_flash_attention_forward(const uint16_t *qkv, uint16_t *y, uint16_t *qkvn, float *lse, int n, int p, int c, int heads,
                                 cudaStream_t stream);
int edm2_flash_attention_backward(const uint16_t *qkv, const uint16_t *qkvn, const float *lse, const uint16_t *y, const uint16_t *dy,
                                  float *delta, float *dqn, float *dkn, float *dvn, uint16_t *dqkv, int n, int p, int c, int heads,
                                  cudaStream_t stream);

/* loss.cu: the EDM2 loss of n images of `per` values (see the file): overwrites dd,
 * loss_sums[b] = Σ(l + u_b) and dlogvar[b] = dlv_scale·Σ(1 − l); w_b = λ(σ_b)/exp(u_b) from
 * sigma and logvar (fp32, n each). d and dd are activations of `dtype`, the images y fp32. */
int edm2_loss(const void *d, const float *y, const float *sigma, float sigma_data, const float *logvar, void *dd, float *loss_sums,
              float *dlogvar, size_t n, size_t per, float dd_scale, float dlv_scale, int dtype, cudaStream_t stream);
/* out[0] += Σ loss_sums[0..n) (in order, f64); with counts, out[1..3) = counts[0..2). */
int edm2_step_totals(const float *loss_sums, size_t n, const unsigned *counts, double *out, cudaStream_t stream);

/* optim.cu: Adam with non-finite zeroing (adds the count to nonfinite[0], and the entries it left non-finite to nonfinite[1]), EMA lerp. */
int edm2_adam_f32(float *p, const float *g, float *m, float *v, float beta1, float beta2, float bc2_sqrt, float eps,
                  float step, size_t n, unsigned *nonfinite, cudaStream_t stream);
int edm2_ema_lerp_f32(float *e, const float *p, float w, size_t n, cudaStream_t stream);
/* Multi-tensor forms: one launch for many tensors. `rows` (device memory) holds
 * EDM2_MT_ROW u64 per tensor: the device addresses of its operands in slots 0-3 (adam: p,
 * g, m, v; ema_lerp: e, p; add: a, b — a += b), its element count, the f32 bits of a
 * per-tensor argument (ema_lerp: w) and the index of its first chunk: the number of
 * `chunk`-element chunks of the tensors before it (n_chunks: of all). */
#define EDM2_MT_ROW 12
#define EDM2_MT_LEN 4
#define EDM2_MT_ARG 5
#define EDM2_MT_FIRST_CHUNK 6
/* Slots 7-11: further operands of kernels that need more than four (effective_weight_multi). */
#define EDM2_MT_EXTRA 7
int edm2_adam_multi_f32(const unsigned long long *rows, int n_rows, long long n_chunks, int chunk, float beta1, float beta2, float bc2_sqrt,
                        float eps, float step, unsigned *nonfinite, cudaStream_t stream);
int edm2_ema_lerp_multi_f32(const unsigned long long *rows, int n_rows, long long n_chunks, int chunk, cudaStream_t stream);
int edm2_add_multi_f32(const unsigned long long *rows, int n_rows, long long n_chunks, int chunk, cudaStream_t stream);
/* The number of kernel launches the calling thread has made (every launcher counts its own). */
unsigned long long edm2_launch_count(void);
/* The number of elementwise launches of the calling thread that moved 16-byte packs (all
 * their pointers aligned; common.cuh). */
unsigned long long edm2_packed_launch_count(void);

/* reduce.cu: out[0] = sum of x (two launches: per-block partials into `partials`, which
 * must hold edm2_sum_partials(n) floats, then one block). */
size_t edm2_sum_partials(size_t n);
int edm2_sum_f32(const float *x, float *partials, float *out, size_t n, cudaStream_t stream);
/* out[0] += the sum of x in one launch (one block; for short vectors such as a layer's
 * per-row gain gradients). Deterministic: a fixed order. */
int edm2_sum_add_f32(const float *x, float *out, size_t n, cudaStream_t stream);
/* edm2_sum_add_f32 of many vectors in one launch, one block each (the same bits): a
 * multi-tensor table whose rows are slot 0 x, slot 1 out, EDM2_MT_LEN n, one chunk each. */
int edm2_sum_add_multi_f32(const unsigned long long *table, int n_tensors, cudaStream_t stream);

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

/* vae.cu: forward ops of the Stability VAE (see the file's header comment). NHWC
 * activations of `dtype`; gamma, beta, bias fp32. group_norm's workspace: part of
 * edm2_group_norm_part_len(n, groups) doubles, ao of 2·n·c floats; dot_attention's w of
 * n·p·p floats. */
size_t edm2_group_norm_part_len(int n, int groups);
int edm2_group_norm(const void *x, void *y, const float *gamma, const float *beta, double *part, float *ao, int n, int hw, int c,
                    int groups, float eps, int silu, int dtype, cudaStream_t stream);
int edm2_add_channel_bias(void *y, const float *bias, size_t rows, int c, int dtype, cudaStream_t stream);
int edm2_subsample2_odd(const void *x, void *y, int n, int h, int w, int c, int dtype, cudaStream_t stream);
int edm2_dot_attention(const void *qkv, void *y, float *w, int n, int p, int c, int dtype, cudaStream_t stream);

/* Simulation mode only: thread schedule of a block, 0 = forward, 1 = reverse. */
void edm2_sim_set_schedule(int reverse);
#ifdef __cplusplus
}
#endif
#endif
