// sampler.cu — the EDM sampler's elementwise steps on the device (Karras et al. 2022,
// Alg. 2; src/sample/mod.rs is the reference and the order of every operation here), so a
// sampling run keeps its state on the device and reads back only the final images. All
// buffers are fp32 (the sampler's state x, and D, which the preconditioning writes in the
// input's fp32 in every precision).
//   heun_euler:    dc = (x − d) / t_hat;  next = x + h·dc                  (both written)
//   heun_correct:  next = x + h·(0.5·dc + 0.5·(xn − dn) / t_next)
//   add_noise:     out = x + k·e          (the churn: k = sqrt(t_hat² − t²)·S_noise)
//   guidance_lerp: out = torch.lerp(g, d, w): |w| < 0.5: fma(w, d − g, g), else
//                  fma(−(d − g), 1 − w, d)    (train::ema::torch_lerp, Rust's mul_add)
// Each product and sum rounded on its own (__fmul_rn and friends: nvcc never contracts
// them into an FMA, as it does `a + b·c` by default), so these kernels give the host
// sampler's bits on a GPU as in the simulator; the lerp's fmaf is the host's mul_add.
// Grid-stride, 256 threads. First version; checked against the host sampler in the
// simulation harness (tests/gpu_network.rs).
#include "common.cuh"

__global__ void heun_euler_kernel(const float *__restrict__ x, const float *__restrict__ d, float t_hat, float h, float *__restrict__ dc,
                                  float *__restrict__ next, size_t n) {
  EDM2_FOR(i, n) {
    float c = __fdiv_rn(__fsub_rn(x[i], d[i]), t_hat);
    dc[i] = c;
    next[i] = __fadd_rn(x[i], __fmul_rn(h, c));
  }
}

__global__ void heun_correct_kernel(const float *__restrict__ x, const float *__restrict__ dc, const float *__restrict__ xn,
                                    const float *__restrict__ dn, float t_next, float h, float *__restrict__ next, size_t n) {
  EDM2_FOR(i, n) {
    float dp = __fdiv_rn(__fsub_rn(xn[i], dn[i]), t_next);
    next[i] = __fadd_rn(x[i], __fmul_rn(h, __fadd_rn(__fmul_rn(0.5f, dc[i]), __fmul_rn(0.5f, dp))));
  }
}

__global__ void guidance_lerp_kernel(const float *__restrict__ g, const float *__restrict__ d, float w, float *__restrict__ out, size_t n) {
  EDM2_FOR(i, n) {
    float diff = __fsub_rn(d[i], g[i]);
    out[i] = fabsf(w) < 0.5f ? fmaf(w, diff, g[i]) : fmaf(-diff, __fsub_rn(1.0f, w), d[i]);
  }
}

__global__ void add_noise_kernel(const float *__restrict__ x, const float *__restrict__ e, float k, float *__restrict__ out, size_t n) {
  EDM2_FOR(i, n) out[i] = __fadd_rn(x[i], __fmul_rn(k, e[i]));
}

extern "C" int edm2_heun_euler(const float *x, const float *d, float t_hat, float h, float *dc, float *next, size_t n, cudaStream_t stream) {
  EW_LAUNCH(heun_euler_kernel, n, x, d, t_hat, h, dc, next, n);
}

extern "C" int edm2_heun_correct(const float *x, const float *dc, const float *xn, const float *dn, float t_next, float h, float *next, size_t n,
                                 cudaStream_t stream) {
  EW_LAUNCH(heun_correct_kernel, n, x, dc, xn, dn, t_next, h, next, n);
}

extern "C" int edm2_guidance_lerp(const float *g, const float *d, float w, float *out, size_t n, cudaStream_t stream) {
  EW_LAUNCH(guidance_lerp_kernel, n, g, d, w, out, n);
}

extern "C" int edm2_add_noise(const float *x, const float *e, float k, float *out, size_t n, cudaStream_t stream) {
  EW_LAUNCH(add_noise_kernel, n, x, e, k, out, n);
}
