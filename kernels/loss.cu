// loss.cu — the uncertainty-weighted EDM2 loss (paper Eq. 21, DESIGN.md §2) and its
// gradient, entirely on the device (nothing is read back per pass). D and dD are fp32 or
// bf16 activations (`dtype`); the images y, σ, logvar, the outputs and all arithmetic are
// fp32.
//
// Per image b with u_b = logvar[b] and w_b = λ(σ_b)/exp(u_b), λ(σ) = (σ² + σd²)/(σ·σd)²
// (evaluated as the CPU's train::loss::loss_weight), elementwise over the image's `per`
// values:
//   l = w_b·(D − y)²;  dD = dd_scale·w_b·(D − y)                               overwrites dd
//   loss_sums[b] = Σ (l + u_b)                                          overwrites loss_sums
//   dlogvar[b]   = dlv_scale·Σ (1 − l)                                    overwrites dlogvar
// with dd_scale = 2/N and dlv_scale = 1/N (N images), both times the loss scaling.
// One block of 256 threads per image, a fixed reduction tree: deterministic.
// step_totals: what the host reads of a training step, in one f64 buffer (one download):
//   out[0] += Σ_b loss_sums[b] (in order, in f64, as the host summed them), and, where
//   counts is given, out[1], out[2] = Adam's two non-finite counts (exact in f64).
// First version; checked against the CPU backend in the simulation harness.
#include "common.cuh"

#define LOSS_THREADS 256

template <typename T>
__global__ void edm2_loss_kernel(const T *__restrict__ d, const float *__restrict__ y, const float *__restrict__ sigma, float sigma_data,
                                 const float *__restrict__ logvar, T *__restrict__ dd, float *__restrict__ loss_sums,
                                 float *__restrict__ dlogvar, size_t per, float dd_scale, float dlv_scale) {
  EDM2_SHARED(float, red, [LOSS_THREADS]);
  const size_t b = blockIdx.x;
  const float sg = sigma[b], u = logvar[b];
  const float lambda = (sg * sg + sigma_data * sigma_data) / ((sg * sigma_data) * (sg * sigma_data));
  const float wb = lambda / expf(u);
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
    loss_sums[b] = s;
    dlogvar[b] = dlv_scale * ds;
  }
}

extern "C" int edm2_loss(const void *d, const float *y, const float *sigma, float sigma_data, const float *logvar, void *dd,
                         float *loss_sums, float *dlogvar, size_t n, size_t per, float dd_scale, float dlv_scale, int dtype,
                         cudaStream_t stream) {
  if (n == 0 || per == 0) return 0;
  if (n > 65535) return 9;  // cudaErrorInvalidConfiguration: one block per image
  EDM2_BY_DTYPE(dtype, EDM2_LAUNCH(edm2_loss_kernel<T>, (unsigned)n, LOSS_THREADS, 0, stream, (const T *)d, y, sigma, sigma_data, logvar,
                                   (T *)dd, loss_sums, dlogvar, per, dd_scale, dlv_scale);
                return (int)cudaGetLastError());
}

__global__ void step_totals_kernel(const float *__restrict__ loss_sums, size_t n, const unsigned *__restrict__ counts, double *out) {
  double s = 0.0;
  for (size_t b = 0; b < n; b++) s += (double)loss_sums[b];
  if (n) out[0] += s;
  if (counts) {
    out[1] = (double)counts[0];
    out[2] = (double)counts[1];
  }
}

extern "C" int edm2_step_totals(const float *loss_sums, size_t n, const unsigned *counts, double *out, cudaStream_t stream) {
  if (n == 0 && !counts) return 0;
  EDM2_LAUNCH(step_totals_kernel, 1, 1, 0, stream, loss_sums, n, counts, out);
  return (int)cudaGetLastError();
}
