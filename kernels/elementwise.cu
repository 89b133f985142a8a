// elementwise.cu — the magnitude-preserving pointwise ops of the network, fp32.
//
// mp_silu (paper Eq. 81): y = silu(x) / 0.596; backward dx = dy · silu'(x) / 0.596 with
//   silu'(x) = σ(x)·(1 + x·(1 − σ(x))). Overwrites y / dx.
// mp_sum (paper Eq. 88): a ← ((1 − t)·a + t·b) / sqrt((1 − t)² + t²), in place.
// Layout: flat arrays (any layout: the ops are pointwise); grid-stride loops, 256 threads.
// Variants: first versions, correct before fast; checked against the CPU backend
// (tests/cuda_sim.rs) in the simulation harness.
#include "common.cuh"

#define MP_SILU_SCALE 0.596f

__device__ __forceinline__ float edm2_sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

__global__ void mp_silu_kernel(const float *__restrict__ x, float *__restrict__ y, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = x[i];
    y[i] = v * edm2_sigmoid(v) / MP_SILU_SCALE;
  }
}

__global__ void mp_silu_backward_kernel(const float *__restrict__ x, const float *__restrict__ dy, float *__restrict__ dx, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = x[i], s = edm2_sigmoid(v);
    dx[i] = dy[i] * (s * (1.0f + v * (1.0f - s)) / MP_SILU_SCALE);
  }
}

__global__ void mp_sum_kernel(float *__restrict__ a, const float *__restrict__ b, float wa, float wb, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    a[i] = wa * a[i] + wb * b[i];
}

extern "C" int edm2_mp_silu_f32(const float *x, float *y, size_t n, cudaStream_t stream) {
  if (n == 0) return 0;
  EDM2_LAUNCH(mp_silu_kernel, edm2_blocks(n, 256), 256, 0, stream, x, y, n);
  return (int)cudaGetLastError();
}

extern "C" int edm2_mp_silu_backward_f32(const float *x, const float *dy, float *dx, size_t n, cudaStream_t stream) {
  if (n == 0) return 0;
  EDM2_LAUNCH(mp_silu_backward_kernel, edm2_blocks(n, 256), 256, 0, stream, x, dy, dx, n);
  return (int)cudaGetLastError();
}

extern "C" int edm2_mp_sum_f32(float *a, const float *b, float t, size_t n, cudaStream_t stream) {
  if (n == 0) return 0;
  float s = sqrtf((1.0f - t) * (1.0f - t) + t * t);
  EDM2_LAUNCH(mp_sum_kernel, edm2_blocks(n, 256), 256, 0, stream, a, b, (1.0f - t) / s, t / s, n);
  return (int)cudaGetLastError();
}
