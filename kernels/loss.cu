// loss.cu — the uncertainty-weighted EDM2 loss (paper Eq. 21, DESIGN.md §2) and its
// gradient. D and dD are fp32 or bf16 activations (`dtype`); the images y, the weights and
// all arithmetic are fp32.
//
// Per image b with w[b] = λ(σ_b)/exp(u_b) (λ(σ) = (σ² + σd²)/(σ·σd)², computed on the
// host) and u_b = logvar[b], elementwise over the image's `per` values:
//   l = w·(D − y)²;  loss sum s_b = Σ (l + u_b);  dL/du_b ∝ Σ (1 − l);  dD = dd_scale·w·(D − y)
// with dd_scale = 2/N (times the loss scaling). Overwrites dd and sums[2b] = s_b,
// sums[2b + 1] = Σ (1 − l) (the host divides by N and scales).
// One block of 256 threads per image, a fixed reduction tree: deterministic.
// First version; checked against the CPU backend in the simulation harness.
#include "common.cuh"

#define LOSS_THREADS 256

template <typename T>
__global__ void edm2_loss_kernel(const T *__restrict__ d, const float *__restrict__ y, const float *__restrict__ w,
                                 const float *__restrict__ logvar, T *__restrict__ dd, float *__restrict__ sums, size_t per,
                                 float dd_scale) {
  EDM2_SHARED(float, red, [LOSS_THREADS]);
  const size_t b = blockIdx.x;
  const float wb = w[b], u = logvar[b];
  float s = 0.0f, ds = 0.0f;
  for (size_t i = threadIdx.x; i < per; i += blockDim.x) {
    size_t k = b * per + i;
    float r = d[k] - y[k];
    float l = wb * r * r;
    s += l + u;
    ds += 1.0f - l;
    dd[k] = dd_scale * wb * r;
  }
  s = edm2_block_sum(s, red);
  ds = edm2_block_sum(ds, red);
  if (threadIdx.x == 0) {
    sums[2 * b] = s;
    sums[2 * b + 1] = ds;
  }
}

extern "C" int edm2_loss(const void *d, const float *y, const float *w, const float *logvar, void *dd, float *sums, size_t n, size_t per,
                         float dd_scale, int dtype, cudaStream_t stream) {
  if (n == 0 || per == 0) return 0;
  if (n > 65535) return 9;  // cudaErrorInvalidConfiguration: one block per image
  EDM2_BY_DTYPE(dtype, EDM2_LAUNCH(edm2_loss_kernel<T>, (unsigned)n, LOSS_THREADS, 0, stream, (const T *)d, y, w, logvar, (T *)dd, sums,
                                   per, dd_scale);
                return (int)cudaGetLastError());
}
