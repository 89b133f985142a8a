// optim.cu — the optimizer and averaging kernels of the training step, fp32 master weights.
//
// adam: non-finite gradient entries count as 0 (DESIGN.md §2), then PyTorch's Adam:
//   m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  p ← p − step · m / (sqrt(v)/bc2 + ε)
//   with step = lr/(1−β1ᵗ) and bc2 = sqrt(1−β2ᵗ) computed on the host in f64.
//   Overwrites p, m, v; adds the number of non-finite gradient entries to nonfinite[0] and
//   the number of entries whose updated p, m or v is non-finite (a diverged run: an
//   overflowing update) to nonfinite[1] (atomic; the caller reads both once per step).
// ema_lerp: e ← lerp(e, p, w) as PyTorch's kernel evaluates it (FMA, two branches on |w|):
//   the power-function EMA update with w = 1 − β.
// Variants: first versions; checked against the CPU backend in the simulation harness.
#include "common.cuh"

__global__ void adam_kernel(float *__restrict__ p, const float *__restrict__ g, float *__restrict__ m, float *__restrict__ v,
                            float b1, float b2, float bc2, float eps, float step, size_t n, unsigned *__restrict__ nonfinite) {
  unsigned bad = 0, bad_out = 0;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float gi = g[i];
    if (!isfinite(gi)) {
      gi = 0.0f;
      bad++;
    }
    float mi = b1 * m[i] + (1.0f - b1) * gi;
    float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float pi = p[i] - step * mi / (sqrtf(vi) / bc2 + eps);
    p[i] = pi;
    if (!isfinite(pi) || !isfinite(mi) || !isfinite(vi)) bad_out++;
  }
  if (bad) atomicAdd(nonfinite, bad);
  if (bad_out) atomicAdd(nonfinite + 1, bad_out);
}

__global__ void ema_lerp_kernel(float *__restrict__ e, const float *__restrict__ p, float w, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float a = e[i], b = p[i];
    e[i] = fabsf(w) < 0.5f ? fmaf(w, b - a, a) : fmaf(-(b - a), 1.0f - w, b);
  }
}

extern "C" int edm2_adam_f32(float *p, const float *g, float *m, float *v, float beta1, float beta2, float bc2_sqrt, float eps,
                             float step, size_t n, unsigned *nonfinite, cudaStream_t stream) {
  if (n == 0) return 0;
  EDM2_LAUNCH(adam_kernel, edm2_blocks(n, 256), 256, 0, stream, p, g, m, v, beta1, beta2, bc2_sqrt, eps, step, n, nonfinite);
  return (int)cudaGetLastError();
}

extern "C" int edm2_ema_lerp_f32(float *e, const float *p, float w, size_t n, cudaStream_t stream) {
  if (n == 0) return 0;
  EDM2_LAUNCH(ema_lerp_kernel, edm2_blocks(n, 256), 256, 0, stream, e, p, w, n);
  return (int)cudaGetLastError();
}
