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
// Multi-tensor forms (adam_multi, ema_lerp_multi, add_multi): the same element updates
//   over every tensor of a step in one launch (one per tensor cost ~300 launches a step
//   at XS). A table of EDM2_MT_ROW u64 per tensor (edm2.h) names the operands; the flat
//   chunk index space (chunks of `chunk` elements, a prefix sum in the table) is spread
//   over the blocks, and a block finds its tensor by binary search. Where every operand of
//   a tensor is 16-byte aligned (all pool buffers are), a chunk moves float4s.
// Variants: first versions; checked against the CPU backend and against the per-tensor
// kernels (bit for bit) in the simulation harness.
#include "common.cuh"
#include "multi_tensor.cuh"

extern "C" unsigned long long edm2_launch_count(void) { return edm2_launch_counter; }
extern "C" unsigned long long edm2_packed_launch_count(void) { return edm2_packed_counter; }

// One Adam element (shared by the per-tensor and the multi-tensor kernels).
__device__ __forceinline__ void adam_element(float &p, float g, float &m, float &v, float b1, float b2, float bc2, float eps,
                                             float step, unsigned &bad, unsigned &bad_out) {
  if (!isfinite(g)) {
    g = 0.0f;
    bad++;
  }
  float mi = b1 * m + (1.0f - b1) * g;
  float vi = b2 * v + (1.0f - b2) * g * g;
  m = mi;
  v = vi;
  float pi = p - step * mi / (sqrtf(vi) / bc2 + eps);
  p = pi;
  if (!isfinite(pi) || !isfinite(mi) || !isfinite(vi)) bad_out++;
}

__device__ __forceinline__ float torch_lerp(float a, float b, float w) {
  return fabsf(w) < 0.5f ? fmaf(w, b - a, a) : fmaf(-(b - a), 1.0f - w, b);
}

__global__ void adam_kernel(float *__restrict__ p, const float *__restrict__ g, float *__restrict__ m, float *__restrict__ v,
                            float b1, float b2, float bc2, float eps, float step, size_t n, unsigned *__restrict__ nonfinite) {
  unsigned bad = 0, bad_out = 0;
  EDM2_FOR(i, n) adam_element(p[i], g[i], m[i], v[i], b1, b2, bc2, eps, step, bad, bad_out);
  if (bad) atomicAdd(nonfinite, bad);
  if (bad_out) atomicAdd(nonfinite + 1, bad_out);
}

// Calls body(row, i0, width) over the elements of every chunk this block owns: width 4
// (i0 a multiple of 4 from the chunk start, all `used` operands 16-byte aligned) or 1.
template <class Body>
__device__ __forceinline__ void mt_for_each(const unsigned long long *rows, int n_rows, long long n_chunks, int chunk, int used,
                                            Body body) {
  for (long long c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const unsigned long long *r = mt_row(rows, n_rows, c);
    size_t n = (size_t)r[EDM2_MT_LEN];
    size_t start = (size_t)(c - (long long)r[EDM2_MT_FIRST_CHUNK]) * (size_t)chunk;
    size_t end = start + (size_t)chunk < n ? start + (size_t)chunk : n;
    unsigned long long any = 0;
    for (int k = 0; k < used; k++) any |= r[k];
    size_t vec_end = (any & 15) == 0 && chunk % 4 == 0 ? start + (end - start) / 4 * 4 : start;
    for (size_t i = start + 4 * (size_t)threadIdx.x; i < vec_end; i += 4 * (size_t)blockDim.x) body(r, i, 4);
    for (size_t i = vec_end + threadIdx.x; i < end; i += blockDim.x) body(r, i, 1);
  }
}

__device__ __forceinline__ float4 mt_load4(const float *p) { return *reinterpret_cast<const float4 *>(p); }
__device__ __forceinline__ void mt_store4(float *p, float4 v) { *reinterpret_cast<float4 *>(p) = v; }
__device__ __forceinline__ float &lane(float4 &v, int k) { return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w; }

__global__ void adam_multi_kernel(const unsigned long long *__restrict__ rows, int n_rows, long long n_chunks, int chunk, float b1,
                                  float b2, float bc2, float eps, float step, unsigned *__restrict__ nonfinite) {
  unsigned bad = 0, bad_out = 0;
  mt_for_each(rows, n_rows, n_chunks, chunk, 4, [&](const unsigned long long *r, size_t i, int width) {
    float *p = (float *)r[0] + i, *m = (float *)r[2] + i, *v = (float *)r[3] + i;
    const float *g = (const float *)r[1] + i;
    if (width == 4) {
      float4 p4 = mt_load4(p), g4 = mt_load4(g), m4 = mt_load4(m), v4 = mt_load4(v);
      for (int k = 0; k < 4; k++) adam_element(lane(p4, k), lane(g4, k), lane(m4, k), lane(v4, k), b1, b2, bc2, eps, step, bad, bad_out);
      mt_store4(p, p4);
      mt_store4(m, m4);
      mt_store4(v, v4);
    } else {
      adam_element(*p, *g, *m, *v, b1, b2, bc2, eps, step, bad, bad_out);
    }
  });
  if (bad) atomicAdd(nonfinite, bad);
  if (bad_out) atomicAdd(nonfinite + 1, bad_out);
}

// e ← lerp(e, p, w) with w = the f32 bits in the row's EDM2_MT_ARG.
__global__ void ema_lerp_multi_kernel(const unsigned long long *__restrict__ rows, int n_rows, long long n_chunks, int chunk) {
  mt_for_each(rows, n_rows, n_chunks, chunk, 2, [&](const unsigned long long *r, size_t i, int width) {
    float *e = (float *)r[0] + i;
    const float *p = (const float *)r[1] + i;
    float w = __uint_as_float((unsigned)r[EDM2_MT_ARG]);
    if (width == 4) {
      float4 e4 = mt_load4(e), p4 = mt_load4(p);
      for (int k = 0; k < 4; k++) lane(e4, k) = torch_lerp(lane(e4, k), lane(p4, k), w);
      mt_store4(e, e4);
    } else {
      *e = torch_lerp(*e, *p, w);
    }
  });
}

// a ← a + b.
__global__ void add_multi_kernel(const unsigned long long *__restrict__ rows, int n_rows, long long n_chunks, int chunk) {
  mt_for_each(rows, n_rows, n_chunks, chunk, 2, [&](const unsigned long long *r, size_t i, int width) {
    float *a = (float *)r[0] + i;
    const float *b = (const float *)r[1] + i;
    if (width == 4) {
      float4 a4 = mt_load4(a), b4 = mt_load4(b);
      for (int k = 0; k < 4; k++) lane(a4, k) += lane(b4, k);
      mt_store4(a, a4);
    } else {
      *a += *b;
    }
  });
}

__global__ void ema_lerp_kernel(float *__restrict__ e, const float *__restrict__ p, float w, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    e[i] = torch_lerp(e[i], p[i], w);
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

#define MT_THREADS 256
static unsigned mt_blocks(long long n_chunks) {
  return (unsigned)(n_chunks > (long long)EDM2_MAX_BLOCKS ? EDM2_MAX_BLOCKS : (n_chunks < 1 ? 1 : n_chunks));
}

extern "C" int edm2_adam_multi_f32(const unsigned long long *rows, int n_rows, long long n_chunks, int chunk, float beta1, float beta2,
                                   float bc2_sqrt, float eps, float step, unsigned *nonfinite, cudaStream_t stream) {
  if (n_rows <= 0 || n_chunks <= 0) return 0;
  if (chunk <= 0) return 1;
  EDM2_LAUNCH(adam_multi_kernel, mt_blocks(n_chunks), MT_THREADS, 0, stream, rows, n_rows, n_chunks, chunk, beta1, beta2, bc2_sqrt, eps,
              step, nonfinite);
  return (int)cudaGetLastError();
}

extern "C" int edm2_ema_lerp_multi_f32(const unsigned long long *rows, int n_rows, long long n_chunks, int chunk, cudaStream_t stream) {
  if (n_rows <= 0 || n_chunks <= 0) return 0;
  if (chunk <= 0) return 1;
  EDM2_LAUNCH(ema_lerp_multi_kernel, mt_blocks(n_chunks), MT_THREADS, 0, stream, rows, n_rows, n_chunks, chunk);
  return (int)cudaGetLastError();
}

extern "C" int edm2_add_multi_f32(const unsigned long long *rows, int n_rows, long long n_chunks, int chunk, cudaStream_t stream) {
  if (n_rows <= 0 || n_chunks <= 0) return 0;
  if (chunk <= 0) return 1;
  EDM2_LAUNCH(add_multi_kernel, mt_blocks(n_chunks), MT_THREADS, 0, stream, rows, n_rows, n_chunks, chunk);
  return (int)cudaGetLastError();
}
