// elementwise.cu — the magnitude-preserving pointwise ops of the network, fp32.
//
// mp_silu (paper Eq. 81): y = silu(x) / 0.596; backward dx = dy · silu'(x) / 0.596 with
//   silu'(x) = σ(x)·(1 + x·(1 − σ(x))). Overwrites y / dx.
// mp_sum (paper Eq. 88): a ← ((1 − t)·a + t·b) / sqrt((1 − t)² + t²), in place.
// axpby: a ← wa·a + wb·b (mp_sum with host coefficients; scale with b = a, wb = 0).
// NHWC ops (x [N, H, W, C]):
//   downsample2: 2x2 average pooling → [N, H/2, W/2, C]; backward spreads dy/4 (a gather).
//   upsample2: nearest 2x → [N, 2H, 2W, C]; backward sums the 4 copies (a gather).
//   mp_cat (paper Eq. 103): out[p] = [ka·a[p], kb·b[p]] over channels; backward splits.
//   modulate_silu (Block step 3): y[n, p, c] = mp_silu(h·s[n, c]); backward
//     dh = dy·mp_silu'(u)·s and ds[n, c] = Σ_p dy·mp_silu'(u)·h (one thread per (n, c)
//     loops over the pixels in order: deterministic).
//   dropout: inverted dropout, kept where hash_uniform(seed, i) ≥ p (the CPU backend's
//     counter-based hash, bit-identical masks), scaled by 1/(1−p); in place; the backward
//     is the same op on dy.
//   clip: x ← clamp(x, ±limit), mask[i] = |x| > limit before the clamp; backward zeroes
//     dy where the mask is set.
//   mp_fourier: y[i, j] = sqrt(2)·cos(freqs[j]·x[i] + phases[j]).
// add_scalar: a ← a + v. scaled: y = k·x (k = 1: a copy).
// Preconditioning (DESIGN.md §1), per-image coefficients k[b] in device memory:
//   scale_images: x[b, ...] ← k[b]·x[b, ...] (images of `per` values);
//   precond_input: out [N, H, W, C+1] = [c_in[b]·x, 1] from x [N, H, W, C];
//   precond_output: d = c_skip[b]·x + c_out[b]·f.
// Layout: flat arrays unless stated; grid-stride loops, 256 threads; overwrite outputs.
// Variants: first versions, correct before fast; checked against the CPU backend
// (tests/cuda_sim.rs) in the simulation harness.
#include "common.cuh"

__global__ void mp_silu_kernel(const float *__restrict__ x, float *__restrict__ y, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = x[i];
    y[i] = edm2_mp_silu(v);
  }
}

__global__ void mp_silu_backward_kernel(const float *__restrict__ x, const float *__restrict__ dy, float *__restrict__ dx, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    dx[i] = dy[i] * edm2_mp_silu_grad(x[i]);
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

__global__ void axpby_kernel(float *__restrict__ a, const float *__restrict__ b, float wa, float wb, size_t n) {
  EDM2_FOR(i, n) a[i] = wa * a[i] + wb * b[i];
}

__global__ void scale_kernel(float *__restrict__ a, float k, size_t n) {
  EDM2_FOR(i, n) a[i] = a[i] * k;
}

__global__ void downsample2_kernel(const float *__restrict__ x, float *__restrict__ y, int n, int h, int w, int c) {
  const int ho = h / 2, wo = w / 2;
  EDM2_FOR(i, (size_t)n * ho * wo * c) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ox = (int)(pix % wo), oy = (int)(pix / wo % ho), b = (int)(pix / ((size_t)wo * ho));
    auto at = [&](int dy, int dx) { return x[(((size_t)b * h + 2 * oy + dy) * w + 2 * ox + dx) * c + ch]; };
    y[i] = (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) * 0.25f;
  }
}

__global__ void downsample2_backward_kernel(const float *__restrict__ dy, float *__restrict__ dx, int n, int h, int w, int c) {
  const int ho = h / 2, wo = w / 2;
  EDM2_FOR(i, (size_t)n * h * w * c) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ix = (int)(pix % w), iy = (int)(pix / w % h), b = (int)(pix / ((size_t)w * h));
    dx[i] = 0.25f * dy[(((size_t)b * ho + iy / 2) * wo + ix / 2) * c + ch];
  }
}

__global__ void upsample2_kernel(const float *__restrict__ x, float *__restrict__ y, int n, int h, int w, int c) {
  const int ho = 2 * h, wo = 2 * w;
  EDM2_FOR(i, (size_t)n * ho * wo * c) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ox = (int)(pix % wo), oy = (int)(pix / wo % ho), b = (int)(pix / ((size_t)wo * ho));
    y[i] = x[(((size_t)b * h + oy / 2) * w + ox / 2) * c + ch];
  }
}

__global__ void upsample2_backward_kernel(const float *__restrict__ dy, float *__restrict__ dx, int n, int h, int w, int c) {
  const int wo = 2 * w;
  EDM2_FOR(i, (size_t)n * h * w * c) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ix = (int)(pix % w), iy = (int)(pix / w % h), b = (int)(pix / ((size_t)w * h));
    auto at = [&](int a, int d) { return dy[(((size_t)b * 2 * h + 2 * iy + a) * wo + 2 * ix + d) * c + ch]; };
    dx[i] = at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1);
  }
}

__global__ void mp_cat_kernel(const float *__restrict__ a, int na, const float *__restrict__ b, int nb, float ka, float kb,
                              float *__restrict__ out, size_t pixels) {
  const int nc = na + nb;
  EDM2_FOR(i, pixels * nc) {
    size_t p = i / nc;
    int c = (int)(i % nc);
    out[i] = c < na ? ka * a[p * na + c] : kb * b[p * nb + (c - na)];
  }
}

__global__ void mp_cat_backward_kernel(const float *__restrict__ dout, int na, int nb, float ka, float kb, float *__restrict__ da,
                                       float *__restrict__ db, size_t pixels) {
  const int nc = na + nb;
  EDM2_FOR(i, pixels * nc) {
    size_t p = i / nc;
    int c = (int)(i % nc);
    if (c < na)
      da[p * na + c] = ka * dout[i];
    else
      db[p * nb + (c - na)] = kb * dout[i];
  }
}

__global__ void modulate_silu_kernel(const float *__restrict__ h, const float *__restrict__ s, float *__restrict__ y, int c,
                                     size_t pixels, size_t total) {
  EDM2_FOR(i, total) {
    size_t b = i / (pixels * c);
    y[i] = edm2_mp_silu(h[i] * s[b * c + i % c]);
  }
}

__global__ void modulate_silu_backward_kernel(const float *__restrict__ h, const float *__restrict__ s, const float *__restrict__ dy,
                                              float *__restrict__ dh, float *__restrict__ ds, int c, size_t pixels, int n) {
  EDM2_FOR(j, (size_t)n * c) {
    size_t b = j / c;
    int ch = (int)(j % c);
    float sc = s[j], acc = 0.0f;
    for (size_t p = 0; p < pixels; p++) {
      size_t i = (b * pixels + p) * c + ch;
      float g = dy[i] * edm2_mp_silu_grad(h[i] * sc);
      dh[i] = g * sc;
      acc += g * h[i];
    }
    ds[j] = acc;
  }
}

// The CPU backend's hash_uniform: SplitMix64 finalizer of seed ^ index·golden, top 24 bits.
__device__ __forceinline__ float edm2_hash_uniform(unsigned long long seed, unsigned long long index) {
  unsigned long long z = seed ^ (index * 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (float)(z >> 40) / 16777216.0f;
}

__global__ void dropout_kernel(float *__restrict__ x, float p, float scale, unsigned long long seed, size_t n) {
  EDM2_FOR(i, n) x[i] = edm2_hash_uniform(seed, i) >= p ? x[i] * scale : 0.0f;
}

__global__ void clip_kernel(float *__restrict__ x, unsigned char *__restrict__ mask, float limit, size_t n) {
  EDM2_FOR(i, n) {
    float v = x[i];
    mask[i] = fabsf(v) > limit;
    x[i] = fminf(fmaxf(v, -limit), limit);
  }
}

__global__ void clip_backward_kernel(float *__restrict__ dy, const unsigned char *__restrict__ mask, size_t n) {
  EDM2_FOR(i, n) if (mask[i]) dy[i] = 0.0f;
}

__global__ void mp_fourier_kernel(const float *__restrict__ x, const float *__restrict__ freqs, const float *__restrict__ phases,
                                  float *__restrict__ y, size_t n, int c) {
  EDM2_FOR(i, n * c) {
    int j = (int)(i % c);
    y[i] = cosf(x[i / c] * freqs[j] + phases[j]) * 1.41421356237309515f;
  }
}

__global__ void add_scalar_kernel(float *__restrict__ a, float v, size_t n) {
  EDM2_FOR(i, n) a[i] = a[i] + v;
}

__global__ void scaled_kernel(const float *__restrict__ x, float *__restrict__ y, float k, size_t n) {
  EDM2_FOR(i, n) y[i] = k * x[i];
}

__global__ void scale_images_kernel(float *__restrict__ x, const float *__restrict__ k, size_t per, size_t n) {
  EDM2_FOR(i, n) x[i] = x[i] * k[i / per];
}

__global__ void precond_input_kernel(const float *__restrict__ x, const float *__restrict__ c_in, float *__restrict__ out, int c,
                                     size_t pixels_per_image, size_t total) {
  EDM2_FOR(i, total) {
    size_t px = i / (c + 1);
    int ch = (int)(i % (c + 1));
    out[i] = ch == c ? 1.0f : c_in[px / pixels_per_image] * x[px * c + ch];
  }
}

__global__ void precond_output_kernel(const float *__restrict__ x, const float *__restrict__ f, const float *__restrict__ c_skip,
                                      const float *__restrict__ c_out, float *__restrict__ d, size_t per, size_t n) {
  EDM2_FOR(i, n) {
    size_t b = i / per;
    d[i] = c_skip[b] * x[i] + c_out[b] * f[i];
  }
}

#define EW_LAUNCH(kernel, count, ...)                                            \
  do {                                                                           \
    size_t count_ = (count);                                                     \
    if (count_ == 0) return 0;                                                   \
    EDM2_LAUNCH(kernel, edm2_blocks(count_, 256), 256, 0, stream, __VA_ARGS__); \
    return (int)cudaGetLastError();                                              \
  } while (0)

extern "C" int edm2_axpby_f32(float *a, const float *b, float wa, float wb, size_t n, cudaStream_t stream) {
  EW_LAUNCH(axpby_kernel, n, a, b, wa, wb, n);
}
extern "C" int edm2_scale_f32(float *a, float k, size_t n, cudaStream_t stream) { EW_LAUNCH(scale_kernel, n, a, k, n); }
extern "C" int edm2_downsample2_f32(const float *x, float *y, int n, int h, int w, int c, cudaStream_t stream) {
  EW_LAUNCH(downsample2_kernel, (size_t)n * (h / 2) * (w / 2) * c, x, y, n, h, w, c);
}
extern "C" int edm2_downsample2_backward_f32(const float *dy, float *dx, int n, int h, int w, int c, cudaStream_t stream) {
  EW_LAUNCH(downsample2_backward_kernel, (size_t)n * h * w * c, dy, dx, n, h, w, c);
}
extern "C" int edm2_upsample2_f32(const float *x, float *y, int n, int h, int w, int c, cudaStream_t stream) {
  EW_LAUNCH(upsample2_kernel, (size_t)n * 4 * h * w * c, x, y, n, h, w, c);
}
extern "C" int edm2_upsample2_backward_f32(const float *dy, float *dx, int n, int h, int w, int c, cudaStream_t stream) {
  EW_LAUNCH(upsample2_backward_kernel, (size_t)n * h * w * c, dy, dx, n, h, w, c);
}
extern "C" int edm2_mp_cat_f32(const float *a, int na, const float *b, int nb, float ka, float kb, float *out, size_t pixels,
                               cudaStream_t stream) {
  EW_LAUNCH(mp_cat_kernel, pixels * (na + nb), a, na, b, nb, ka, kb, out, pixels);
}
extern "C" int edm2_mp_cat_backward_f32(const float *dout, int na, int nb, float ka, float kb, float *da, float *db, size_t pixels,
                                        cudaStream_t stream) {
  EW_LAUNCH(mp_cat_backward_kernel, pixels * (na + nb), dout, na, nb, ka, kb, da, db, pixels);
}
extern "C" int edm2_modulate_silu_f32(const float *h, const float *s, float *y, int n, size_t pixels, int c, cudaStream_t stream) {
  EW_LAUNCH(modulate_silu_kernel, (size_t)n * pixels * c, h, s, y, c, pixels, (size_t)n * pixels * c);
}
extern "C" int edm2_modulate_silu_backward_f32(const float *h, const float *s, const float *dy, float *dh, float *ds, int n,
                                               size_t pixels, int c, cudaStream_t stream) {
  EW_LAUNCH(modulate_silu_backward_kernel, (size_t)n * c, h, s, dy, dh, ds, c, pixels, n);
}
extern "C" int edm2_dropout_f32(float *x, float p, uint64_t seed, size_t n, cudaStream_t stream) {
  EW_LAUNCH(dropout_kernel, n, x, p, 1.0f / (1.0f - p), (unsigned long long)seed, n);
}
extern "C" int edm2_clip_f32(float *x, uint8_t *mask, float limit, size_t n, cudaStream_t stream) {
  EW_LAUNCH(clip_kernel, n, x, mask, limit, n);
}
extern "C" int edm2_clip_backward_f32(float *dy, const uint8_t *mask, size_t n, cudaStream_t stream) {
  EW_LAUNCH(clip_backward_kernel, n, dy, mask, n);
}
extern "C" int edm2_mp_fourier_f32(const float *x, const float *freqs, const float *phases, float *y, size_t n, int c,
                                   cudaStream_t stream) {
  EW_LAUNCH(mp_fourier_kernel, n * (size_t)c, x, freqs, phases, y, n, c);
}
extern "C" int edm2_add_scalar_f32(float *a, float v, size_t n, cudaStream_t stream) { EW_LAUNCH(add_scalar_kernel, n, a, v, n); }
extern "C" int edm2_scaled_f32(const float *x, float *y, float k, size_t n, cudaStream_t stream) {
  EW_LAUNCH(scaled_kernel, n, x, y, k, n);
}
extern "C" int edm2_scale_images_f32(float *x, const float *k, size_t per, size_t n, cudaStream_t stream) {
  if (per == 0) return 0;
  EW_LAUNCH(scale_images_kernel, n, x, k, per, n);
}
extern "C" int edm2_precond_input_f32(const float *x, const float *c_in, float *out, int c, size_t pixels_per_image, size_t images,
                                      cudaStream_t stream) {
  EW_LAUNCH(precond_input_kernel, images * pixels_per_image * (c + 1), x, c_in, out, c, pixels_per_image,
            images * pixels_per_image * (c + 1));
}
extern "C" int edm2_precond_output_f32(const float *x, const float *f, const float *c_skip, const float *c_out, float *d, size_t per,
                                       size_t n, cudaStream_t stream) {
  if (per == 0) return 0;
  EW_LAUNCH(precond_output_kernel, n, x, f, c_skip, c_out, d, per, n);
}
