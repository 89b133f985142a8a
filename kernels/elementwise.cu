// elementwise.cu — the magnitude-preserving pointwise ops of the network, on fp32 or bf16
// activations (templates over the storage type T; arithmetic in fp32).
//
// mp_silu (paper Eq. 81): y = silu(x) / 0.596; backward dx = dy · silu'(x) / 0.596 with
//   silu'(x) = σ(x)·(1 + x·(1 − σ(x))). Overwrites y / dx (the backward adds to dx with
//   `accumulate`: a branch's gradient joining another's, one pass).
// mp_sum (paper Eq. 88): a ← ((1 − t)·a + t·b) / sqrt((1 − t)² + t²), in place.
// axpby: a ← wa·a + wb·b (mp_sum with host coefficients; scale with b = a, wb = 0);
//   axpby_clip: then clamped to ±limit with clip's mask (a block's last mp_sum and clip).
// NHWC ops (x [N, H, W, C]):
//   downsample2: 2x2 average pooling → [N, H/2, W/2, C]; backward spreads dy/4 (a gather).
//   upsample2: nearest 2x → [N, 2H, 2W, C]; backward sums the 4 copies (a gather).
//   mp_cat (paper Eq. 103): out[p] = [ka·a[p], kb·b[p]] over channels; backward splits.
//   modulate_silu (Block step 3): y[n, p, c] = mp_silu(h·(s[n, c] + 1)), s = emb_linear's
//     output (the + 1 of the official `c = emb_linear(emb) + 1` done here, not in a launch
//     of its own); s and ds fp32 in both precisions (the embedding path stays fp32, as in
//     the official code); backward, with u = h·(s + 1),
//     dh = dy·mp_silu'(u)·(s + 1) and ds[n, c] = Σ_p dy·mp_silu'(u)·h (8 pixel lanes per
//     channel, partials added in a fixed order: deterministic).
//   dropout: inverted dropout, kept where hash_uniform(seed, i) ≥ p (the CPU backend's
//     counter-based hash, bit-identical masks), scaled by 1/(1−p); in place; the backward
//     is the same op on dy.
//   clip: x ← clamp(x, ±limit), mask[i] = |x| > limit before the clamp; backward zeroes
//     dy where the mask is set.
//   mp_fourier: y[i, j] = sqrt(2)·cos(freqs[j]·x[i] + phases[j]).
// add_scalar: a ← a + v. scaled: y = k·x (k = 1: a copy). split_scaled: y = kb·x and
// x ← ka·x in one pass (x zeroed first where a clip mask is given).
// Preconditioning (DESIGN.md §1), per-image coefficients k[b] in device memory:
//   scale_images: x[b, ...] ← k[b]·x[b, ...] (images of `per` values);
//   precond_input: out [N, H, W, C+1] = [c_in[b]·x, 1] from x [N, H, W, C];
//   precond_output: d = c_skip[b]·x + c_out[b]·f.
// Layout: flat arrays unless stated; grid-stride loops, 256 threads; overwrite outputs.
// Variants: first versions, correct before fast; checked against the CPU backend
// (tests/cuda_sim.rs) in the simulation harness.
#include "common.cuh"

template <typename T>
__global__ void mp_silu_kernel(const T *__restrict__ x, T *__restrict__ y, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = x[i];
    y[i] = edm2_mp_silu(v);
  }
}

template <typename T>
__global__ void mp_silu_backward_kernel(const T *__restrict__ x, const T *__restrict__ dy, T *__restrict__ dx, size_t n, int accumulate) {
  EDM2_FOR(i, n) {
    dx[i] = accumulate ? edm2_mp_silu_grad_acc(dx[i], dy[i], x[i]) : dy[i] * edm2_mp_silu_grad(x[i]);
  }
}

template <typename T>
__global__ void mp_sum_kernel(T *__restrict__ a, const T *__restrict__ b, float wa, float wb, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    a[i] = wa * a[i] + wb * b[i];
}

template <typename T>
__global__ void axpby_kernel(T *__restrict__ a, const T *__restrict__ b, float wa, float wb, size_t n) {
  EDM2_FOR(i, n) a[i] = wa * a[i] + wb * b[i];
}

// A block's last mp_sum and its clip in one pass: the sum rounded to the storage type as
// axpby stores it, then clip_kernel's mask and clamp (the same bits as the two launches).
template <typename T>
__global__ void axpby_clip_kernel(T *__restrict__ a, const T *__restrict__ b, float wa, float wb, float limit,
                                  unsigned char *__restrict__ mask, size_t n) {
  EDM2_FOR(i, n) {
    T t;
    t = wa * a[i] + wb * b[i];  // rounded to the storage type (edm2_bf16 converts by assignment)
    float v = t;
    mask[i] = fabsf(v) > limit;
    a[i] = fminf(fmaxf(v, -limit), limit);
  }
}

template <typename T>
__global__ void scale_kernel(T *__restrict__ a, float k, size_t n) {
  EDM2_FOR(i, n) a[i] = a[i] * k;
}

template <typename T>
__global__ void downsample2_kernel(const T *__restrict__ x, T *__restrict__ y, int n, int h, int w, int c) {
  const int ho = h / 2, wo = w / 2;
  EDM2_FOR(i, (size_t)n * ho * wo * c) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ox = (int)(pix % wo), oy = (int)(pix / wo % ho), b = (int)(pix / ((size_t)wo * ho));
    auto at = [&](int dy, int dx) { return x[(((size_t)b * h + 2 * oy + dy) * w + 2 * ox + dx) * c + ch]; };
    y[i] = (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) * 0.25f;
  }
}

template <typename T>
__global__ void downsample2_backward_kernel(const T *__restrict__ dy, T *__restrict__ dx, int n, int h, int w, int c) {
  const int ho = h / 2, wo = w / 2;
  EDM2_FOR(i, (size_t)n * h * w * c) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ix = (int)(pix % w), iy = (int)(pix / w % h), b = (int)(pix / ((size_t)w * h));
    dx[i] = 0.25f * dy[(((size_t)b * ho + iy / 2) * wo + ix / 2) * c + ch];
  }
}

template <typename T>
__global__ void upsample2_kernel(const T *__restrict__ x, T *__restrict__ y, int n, int h, int w, int c) {
  const int ho = 2 * h, wo = 2 * w;
  EDM2_FOR(i, (size_t)n * ho * wo * c) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ox = (int)(pix % wo), oy = (int)(pix / wo % ho), b = (int)(pix / ((size_t)wo * ho));
    y[i] = x[(((size_t)b * h + oy / 2) * w + ox / 2) * c + ch];
  }
}

template <typename T>
__global__ void upsample2_backward_kernel(const T *__restrict__ dy, T *__restrict__ dx, int n, int h, int w, int c) {
  const int wo = 2 * w;
  EDM2_FOR(i, (size_t)n * h * w * c) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ix = (int)(pix % w), iy = (int)(pix / w % h), b = (int)(pix / ((size_t)w * h));
    auto at = [&](int a, int d) { return dy[(((size_t)b * 2 * h + 2 * iy + a) * wo + 2 * ix + d) * c + ch]; };
    dx[i] = at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1);
  }
}

template <typename T>
__global__ void mp_cat_kernel(const T *__restrict__ a, int na, const T *__restrict__ b, int nb, float ka, float kb,
                              T *__restrict__ out, size_t pixels) {
  const int nc = na + nb;
  EDM2_FOR(i, pixels * nc) {
    size_t p = i / nc;
    int c = (int)(i % nc);
    out[i] = c < na ? ka * a[p * na + c] : kb * b[p * nb + (c - na)];
  }
}

template <typename T>
__global__ void mp_cat_backward_kernel(const T *__restrict__ dout, int na, int nb, float ka, float kb, T *__restrict__ da,
                                       T *__restrict__ db, size_t pixels) {
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

// One image per blockIdx.y: 32-bit indices within an image (the launcher checks the size),
// no 64-bit division per element.
template <typename T>
__global__ void modulate_silu_kernel(const T *__restrict__ h, const float *__restrict__ s, T *__restrict__ y, unsigned c,
                                     unsigned per_image) {
  const size_t base = (size_t)blockIdx.y * per_image;
  const float *sb = s + (size_t)blockIdx.y * c;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < per_image; i += gridDim.x * blockDim.x)
    y[base + i] = edm2_mp_silu(h[base + i] * (sb[i % c] + 1.0f));
}

// Block (MOD_CH channels x MOD_LANES pixel lanes) per (channel tile, image): a warp reads 32
// consecutive channels of a pixel (coalesced NHWC), lane y takes pixels y, y + MOD_LANES, …;
// the lanes' partial ds are added in a fixed order. Was one thread per (image, channel)
// looping over every pixel (n·c threads in all: 64 blocks running 4096-step loops at an
// XS 64x64 level).
#define MOD_CH 32
#define MOD_LANES 8
template <typename T>
__global__ void modulate_silu_backward_kernel(const T *__restrict__ h, const float *__restrict__ s, const T *__restrict__ dy,
                                              T *__restrict__ dh, float *__restrict__ ds, int c, unsigned pixels) {
  EDM2_SHARED(float, part, [MOD_LANES][MOD_CH]);
  const int b = blockIdx.y, ch = blockIdx.x * MOD_CH + threadIdx.x;
  float acc = 0.0f;
  if (ch < c) {
    const float sc = s[(size_t)b * c + ch] + 1.0f;
    const size_t base = (size_t)b * pixels * c + ch;
    for (unsigned p = threadIdx.y; p < pixels; p += MOD_LANES) {
      size_t i = base + (size_t)p * c;
      float hv = h[i];
      float g = dy[i] * edm2_mp_silu_grad(hv * sc);
      dh[i] = g * sc;
      acc += g * hv;
    }
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && ch < c) {
    float t = part[0][threadIdx.x];
    for (int l = 1; l < MOD_LANES; l++) t += part[l][threadIdx.x];
    ds[(size_t)b * c + ch] = t;
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

template <typename T>
__global__ void dropout_kernel(T *__restrict__ x, float p, float scale, unsigned long long seed, size_t n) {
  EDM2_FOR(i, n) x[i] = edm2_hash_uniform(seed, i) >= p ? x[i] * scale : 0.0f;
}

template <typename T>
__global__ void clip_kernel(T *__restrict__ x, unsigned char *__restrict__ mask, float limit, size_t n) {
  EDM2_FOR(i, n) {
    float v = x[i];
    mask[i] = fabsf(v) > limit;
    x[i] = fminf(fmaxf(v, -limit), limit);
  }
}

template <typename T>
__global__ void clip_backward_kernel(T *__restrict__ dy, const unsigned char *__restrict__ mask, size_t n) {
  EDM2_FOR(i, n) if (mask[i]) dy[i] = 0.0f;
}

template <typename T>
__global__ void mp_fourier_kernel(const float *__restrict__ x, const float *__restrict__ freqs, const float *__restrict__ phases,
                                  T *__restrict__ y, size_t n, int c) {
  EDM2_FOR(i, n * c) {
    int j = (int)(i % c);
    y[i] = cosf(x[i / c] * freqs[j] + phases[j]) * 1.41421356237309515f;
  }
}

template <typename T>
__global__ void add_scalar_kernel(T *__restrict__ a, float v, size_t n) {
  EDM2_FOR(i, n) a[i] = a[i] + v;
}

template <typename TX, typename T>
__global__ void scaled_kernel(const TX *__restrict__ x, T *__restrict__ y, float k, size_t n) {
  EDM2_FOR(i, n) y[i] = k * x[i];
}

// The two branches of an mp_sum's backward in one pass: y = kb·x and x ← ka·x (the same
// products as scaled and scale, so the same bits); where `mask` is given, x is first zeroed
// where it is set (a clip's backward before the mp_sum's: clip_backward's bits).
template <typename T>
__global__ void split_scaled_kernel(T *__restrict__ x, T *__restrict__ y, float ka, float kb, const unsigned char *__restrict__ mask,
                                    size_t n) {
  EDM2_FOR(i, n) {
    float v = mask && mask[i] ? 0.0f : (float)x[i];
    y[i] = kb * v;
    x[i] = ka * v;
  }
}

template <typename T>
__global__ void scale_images_kernel(T *__restrict__ x, const float *__restrict__ k, size_t per, size_t n) {
  EDM2_FOR(i, n) x[i] = x[i] * k[i / per];
}

template <typename TX, typename T>
__global__ void precond_input_kernel(const TX *__restrict__ x, const float *__restrict__ c_in, T *__restrict__ out, int c,
                                     size_t pixels_per_image, size_t total) {
  EDM2_FOR(i, total) {
    size_t px = i / (c + 1);
    int ch = (int)(i % (c + 1));
    out[i] = ch == c ? 1.0f : c_in[px / pixels_per_image] * x[px * c + ch];
  }
}

template <typename TX, typename T>
__global__ void precond_output_kernel(const TX *__restrict__ x, const T *__restrict__ f, const float *__restrict__ c_skip,
                                      const float *__restrict__ c_out, TX *__restrict__ d, size_t per, size_t n) {
  EDM2_FOR(i, n) {
    size_t b = i / per;
    d[i] = c_skip[b] * x[i] + c_out[b] * f[i];
  }
}

// Launchers: activation pointers are `void *` of storage type `dtype` (EDM2_F32 or
// EDM2_BF16); every other pointer is fp32. scaled converts (x of x_dtype, y of dtype);
// the preconditioning reads the network input x and writes D in x_dtype — fp32 in the
// bf16 mode too, as the official mixed precision keeps x and D in fp32 — and the
// network's activations (out, F) in dtype.
#define RD(p) ((const T *)(p))
#define WR(p) ((T *)(p))

extern "C" int edm2_mp_silu(const void *x, void *y, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(mp_silu_kernel<T>, n, RD(x), WR(y), n));
}
extern "C" int edm2_mp_silu_backward(const void *x, const void *dy, void *dx, size_t n, int accumulate, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(mp_silu_backward_kernel<T>, n, RD(x), RD(dy), WR(dx), n, accumulate));
}
extern "C" int edm2_mp_sum(void *a, const void *b, float t, size_t n, int dtype, cudaStream_t stream) {
  float s = sqrtf((1.0f - t) * (1.0f - t) + t * t);
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(mp_sum_kernel<T>, n, WR(a), RD(b), (1.0f - t) / s, t / s, n));
}
extern "C" int edm2_axpby(void *a, const void *b, float wa, float wb, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(axpby_kernel<T>, n, WR(a), RD(b), wa, wb, n));
}
extern "C" int edm2_axpby_clip(void *a, const void *b, float wa, float wb, float limit, uint8_t *mask, size_t n, int dtype,
                               cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(axpby_clip_kernel<T>, n, WR(a), RD(b), wa, wb, limit, mask, n));
}
extern "C" int edm2_scale(void *a, float k, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(scale_kernel<T>, n, WR(a), k, n));
}
extern "C" int edm2_downsample2(const void *x, void *y, int n, int h, int w, int c, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(downsample2_kernel<T>, (size_t)n * (h / 2) * (w / 2) * c, RD(x), WR(y), n, h, w, c));
}
extern "C" int edm2_downsample2_backward(const void *dy, void *dx, int n, int h, int w, int c, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(downsample2_backward_kernel<T>, (size_t)n * h * w * c, RD(dy), WR(dx), n, h, w, c));
}
extern "C" int edm2_upsample2(const void *x, void *y, int n, int h, int w, int c, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(upsample2_kernel<T>, (size_t)n * 4 * h * w * c, RD(x), WR(y), n, h, w, c));
}
extern "C" int edm2_upsample2_backward(const void *dy, void *dx, int n, int h, int w, int c, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(upsample2_backward_kernel<T>, (size_t)n * h * w * c, RD(dy), WR(dx), n, h, w, c));
}
extern "C" int edm2_mp_cat(const void *a, int na, const void *b, int nb, float ka, float kb, void *out, size_t pixels, int dtype,
                           cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(mp_cat_kernel<T>, pixels * (na + nb), RD(a), na, RD(b), nb, ka, kb, WR(out), pixels));
}
extern "C" int edm2_mp_cat_backward(const void *dout, int na, int nb, float ka, float kb, void *da, void *db, size_t pixels, int dtype,
                                    cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(mp_cat_backward_kernel<T>, pixels * (na + nb), RD(dout), na, nb, ka, kb, WR(da), WR(db), pixels));
}
extern "C" int edm2_modulate_silu(const void *h, const float *s, void *y, int n, size_t pixels, int c, int dtype, cudaStream_t stream) {
  size_t per = pixels * (size_t)c;
  if (n <= 0 || per == 0) return 0;
  if (n > 65535 || per > 0xffffffffu) return 1;  // cudaErrorInvalidValue: grid.y is the image
  dim3 grid(edm2_blocks(per, 256) < 4096u ? edm2_blocks(per, 256) : 4096u, (unsigned)n);
  EDM2_BY_DTYPE(dtype, EDM2_LAUNCH(modulate_silu_kernel<T>, grid, 256, 0, stream, RD(h), s, WR(y), (unsigned)c, (unsigned)per);
                return (int)cudaGetLastError());
}
extern "C" int edm2_modulate_silu_backward(const void *h, const float *s, const void *dy, void *dh, float *ds, int n, size_t pixels, int c,
                                           int dtype, cudaStream_t stream) {
  if (n <= 0 || c <= 0) return 0;
  if (n > 65535 || pixels > 0xffffffffu) return 1;  // cudaErrorInvalidValue: grid.y is the image
  dim3 grid((unsigned)((c + MOD_CH - 1) / MOD_CH), (unsigned)n), block(MOD_CH, MOD_LANES);
  EDM2_BY_DTYPE(dtype, EDM2_LAUNCH(modulate_silu_backward_kernel<T>, grid, block, 0, stream, RD(h), s, RD(dy), WR(dh), ds, c,
                                   (unsigned)pixels);
                return (int)cudaGetLastError());
}
extern "C" int edm2_dropout(void *x, float p, uint64_t seed, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(dropout_kernel<T>, n, WR(x), p, 1.0f / (1.0f - p), (unsigned long long)seed, n));
}
extern "C" int edm2_clip(void *x, uint8_t *mask, float limit, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(clip_kernel<T>, n, WR(x), mask, limit, n));
}
extern "C" int edm2_clip_backward(void *dy, const uint8_t *mask, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(clip_backward_kernel<T>, n, WR(dy), mask, n));
}
extern "C" int edm2_mp_fourier(const float *x, const float *freqs, const float *phases, void *y, size_t n, int c, int dtype,
                               cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(mp_fourier_kernel<T>, n * (size_t)c, x, freqs, phases, WR(y), n, c));
}
extern "C" int edm2_add_scalar(void *a, float v, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(add_scalar_kernel<T>, n, WR(a), v, n));
}
extern "C" int edm2_scaled(const void *x, int x_dtype, void *y, float k, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE_AS(x_dtype, TX, EDM2_BY_DTYPE(dtype, auto *kernel = &scaled_kernel<TX, T>; EW_LAUNCH(kernel, n, (const TX *)x, WR(y), k, n)));
}
extern "C" int edm2_split_scaled(void *x, void *y, float ka, float kb, const uint8_t *mask, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(split_scaled_kernel<T>, n, WR(x), WR(y), ka, kb, mask, n));
}
extern "C" int edm2_scale_images(void *x, const float *k, size_t per, size_t n, int dtype, cudaStream_t stream) {
  if (per == 0) return 0;
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(scale_images_kernel<T>, n, WR(x), k, per, n));
}
extern "C" int edm2_precond_input(const void *x, int x_dtype, const float *c_in, void *out, int c, size_t pixels_per_image, size_t images,
                                  int dtype, cudaStream_t stream) {
  size_t total = images * pixels_per_image * (c + 1);
  EDM2_BY_DTYPE_AS(x_dtype, TX, EDM2_BY_DTYPE(dtype, auto *kernel = &precond_input_kernel<TX, T>;
                                              EW_LAUNCH(kernel, total, (const TX *)x, c_in, WR(out), c, pixels_per_image, total)));
}
extern "C" int edm2_precond_output(const void *x, int x_dtype, const void *f, const float *c_skip, const float *c_out, void *d, size_t per,
                                   size_t n, int dtype, cudaStream_t stream) {
  if (per == 0) return 0;
  EDM2_BY_DTYPE_AS(x_dtype, TX, EDM2_BY_DTYPE(dtype, auto *kernel = &precond_output_kernel<TX, T>;
                                              EW_LAUNCH(kernel, n, (const TX *)x, RD(f), c_skip, c_out, (TX *)d, per, n)));
}
