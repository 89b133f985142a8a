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
// Variants: first versions moved one value per thread and access (2-byte loads in bf16)
// and divided every NHWC index into pixel coordinates; now 16-byte packs where the
// pointers are aligned and, for the NHWC kernels, the channels fill whole packs (one
// division per pack), the rest one value at a time with the same arithmetic (2026-12-08:
// simulator and PTX only, not yet timed on a GPU; docs/perf.md). Checked against the CPU
// backend (tests/gpu_kernels.rs) in the simulation harness.
#include "common.cuh"

// Packed kernels (common.cuh's edm2_lanes): the first loop moves the launch's `packs`
// 16-byte packs of L lanes (pack j: values jL .. jL + L − 1), the second the values past
// them one at a time (all of them where a launch is unaligned: packs = 0). Both
// grid-stride; the same arithmetic per value in both.
#define LD(p) edm2_load_lanes<L>(p, j)
#define ST(p, v) edm2_store_lanes<L>(p, j, v)
#define EACH_LANE _Pragma("unroll") for (int l = 0; l < L; l++)
#define REST(i, n, packs) EDM2_FOR(rest_, (n) - (packs) * (size_t)L) if (const size_t i = (packs) * (size_t)L + rest_; true)

template <typename T>
__global__ void mp_silu_kernel(const T *__restrict__ x, T *__restrict__ y, size_t n, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    auto a = LD(x);
    edm2_lanes<T, L> o;
    EACH_LANE o.v[l] = edm2_mp_silu(a.v[l]);
    ST(y, o);
  }
  REST(i, n, packs) y[i] = edm2_mp_silu(x[i]);
}

template <typename T>
__global__ void mp_silu_backward_kernel(const T *__restrict__ x, const T *__restrict__ dy, T *__restrict__ dx, size_t n, size_t packs,
                                        int accumulate) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    auto a = LD(x);
    auto g = LD(dy);
    edm2_lanes<T, L> o;
    if (accumulate) {
      auto d = LD(dx);
      EACH_LANE o.v[l] = edm2_mp_silu_grad_acc(d.v[l], g.v[l], a.v[l]);
    } else {
      EACH_LANE o.v[l] = g.v[l] * edm2_mp_silu_grad(a.v[l]);
    }
    ST(dx, o);
  }
  REST(i, n, packs) dx[i] = accumulate ? edm2_mp_silu_grad_acc(dx[i], dy[i], x[i]) : dy[i] * edm2_mp_silu_grad(x[i]);
}

// a ← wa·a + wb·b (mp_sum with its coefficients, axpby).
template <typename T>
__global__ void axpby_kernel(T *__restrict__ a, const T *__restrict__ b, float wa, float wb, size_t n, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    auto av = LD(a);
    auto bv = LD(b);
    EACH_LANE av.v[l] = wa * av.v[l] + wb * bv.v[l];
    ST(a, av);
  }
  REST(i, n, packs) a[i] = wa * a[i] + wb * b[i];
}

// A block's last mp_sum and its clip in one pass: the sum rounded to the storage type as
// axpby stores it, then clip_kernel's mask and clamp (the same bits as the two launches).
template <typename T>
__device__ __forceinline__ float edm2_sum_clip(float a, float b, float wa, float wb, float limit, unsigned char &mask) {
  T t;
  t = wa * a + wb * b;  // rounded to the storage type (edm2_bf16 converts by assignment)
  float v = t;
  mask = fabsf(v) > limit;
  return fminf(fmaxf(v, -limit), limit);
}
template <typename T>
__global__ void axpby_clip_kernel(T *__restrict__ a, const T *__restrict__ b, float wa, float wb, float limit,
                                  unsigned char *__restrict__ mask, size_t n, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    auto av = LD(a);
    auto bv = LD(b);
    edm2_lanes<unsigned char, L> m;
    EACH_LANE av.v[l] = edm2_sum_clip<T>(av.v[l], bv.v[l], wa, wb, limit, m.v[l]);
    ST(a, av);
    ST(mask, m);
  }
  REST(i, n, packs) a[i] = edm2_sum_clip<T>(a[i], b[i], wa, wb, limit, mask[i]);
}

template <typename T>
__global__ void scale_kernel(T *__restrict__ a, float k, size_t n, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    auto av = LD(a);
    EACH_LANE av.v[l] = av.v[l] * k;
    ST(a, av);
  }
  REST(i, n, packs) a[i] = a[i] * k;
}

// The NHWC kernels below move packs along the channels where c is a multiple of the lanes
// (a pack then lies in one pixel, whose coordinates are divided out once per pack, not per
// value; every offset below is then a multiple of L); otherwise one value at a time.
// The packs at p, p + c, p + row, p + row + c (a 2x2 window of pixels, c channels
// apart, rows `row` apart) summed per lane in that order, in fp32.
template <int L, typename T>
__device__ __forceinline__ edm2_lanes<float, L> quad_sum(const T *p, int c, size_t row) {
  auto a = edm2_load_lanes<L>(p, 0);
  auto b = edm2_load_lanes<L>(p + c, 0);
  auto d = edm2_load_lanes<L>(p + row, 0);
  auto e = edm2_load_lanes<L>(p + row + c, 0);
  edm2_lanes<float, L> sum;
  EACH_LANE sum.v[l] = a.v[l] + b.v[l] + d.v[l] + e.v[l];
  return sum;
}

template <typename T>
__global__ void downsample2_kernel(const T *__restrict__ x, T *__restrict__ y, int n, int h, int w, int c, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  const int ho = h / 2, wo = w / 2;
  const size_t row = (size_t)w * c;
  // The input index of output value i's top-left source.
  auto src = [&](size_t i) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ox = (int)(pix % wo), oy = (int)(pix / wo % ho), b = (int)(pix / ((size_t)wo * ho));
    return (((size_t)b * h + 2 * oy) * w + 2 * ox) * c + ch;
  };
  EDM2_FOR(j, packs) {
    const auto sum = quad_sum<L>(x + src(j * L), c, row);
    edm2_lanes<T, L> o;
    EACH_LANE o.v[l] = sum.v[l] * 0.25f;
    ST(y, o);
  }
  REST(i, n * (size_t)ho * wo * c, packs) {
    const size_t s = src(i);
    y[i] = (x[s] + x[s + c] + x[s + row] + x[s + row + c]) * 0.25f;
  }
}

template <typename T>
__global__ void downsample2_backward_kernel(const T *__restrict__ dy, T *__restrict__ dx, int n, int h, int w, int c, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  const int ho = h / 2, wo = w / 2;
  auto src = [&](size_t i) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ix = (int)(pix % w), iy = (int)(pix / w % h), b = (int)(pix / ((size_t)w * h));
    return (((size_t)b * ho + iy / 2) * wo + ix / 2) * c + ch;
  };
  EDM2_FOR(j, packs) {
    auto g = edm2_load_lanes<L>(dy + src(j * L), 0);
    edm2_lanes<T, L> o;
    EACH_LANE o.v[l] = 0.25f * g.v[l];
    ST(dx, o);
  }
  REST(i, n * (size_t)h * w * c, packs) dx[i] = 0.25f * dy[src(i)];
}

template <typename T>
__global__ void upsample2_kernel(const T *__restrict__ x, T *__restrict__ y, int n, int h, int w, int c, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  const int ho = 2 * h, wo = 2 * w;
  auto src = [&](size_t i) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ox = (int)(pix % wo), oy = (int)(pix / wo % ho), b = (int)(pix / ((size_t)wo * ho));
    return (((size_t)b * h + oy / 2) * w + ox / 2) * c + ch;
  };
  EDM2_FOR(j, packs) ST(y, edm2_load_lanes<L>(x + src(j * L), 0));
  REST(i, n * (size_t)ho * wo * c, packs) y[i] = x[src(i)];
}

template <typename T>
__global__ void upsample2_backward_kernel(const T *__restrict__ dy, T *__restrict__ dx, int n, int h, int w, int c, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  const int wo = 2 * w;
  const size_t row = (size_t)wo * c;
  // The index in dy of the top-left copy of input value i.
  auto src = [&](size_t i) {
    int ch = (int)(i % c);
    size_t pix = i / c;
    int ix = (int)(pix % w), iy = (int)(pix / w % h), b = (int)(pix / ((size_t)w * h));
    return (((size_t)b * 2 * h + 2 * iy) * wo + 2 * ix) * c + ch;
  };
  EDM2_FOR(j, packs) {
    const auto sum = quad_sum<L>(dy + src(j * L), c, row);
    edm2_lanes<T, L> o;
    EACH_LANE o.v[l] = sum.v[l];
    ST(dx, o);
  }
  REST(i, n * (size_t)h * w * c, packs) {
    const size_t s = src(i);
    dx[i] = dy[s] + dy[s + c] + dy[s + row] + dy[s + row + c];
  }
}

// Packs where na and nb are multiples of the lanes: a pack then lies wholly in a or in b.
template <typename T>
__global__ void mp_cat_kernel(const T *__restrict__ a, int na, const T *__restrict__ b, int nb, float ka, float kb,
                              T *__restrict__ out, size_t pixels, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  const int nc = na + nb;
  EDM2_FOR(j, packs) {
    const size_t p = j * L / nc;
    const int c = (int)(j * L - p * nc);
    const bool in_a = c < na;
    auto v = in_a ? edm2_load_lanes<L>(a + p * na + c, 0) : edm2_load_lanes<L>(b + p * nb + (c - na), 0);
    const float k = in_a ? ka : kb;
    edm2_lanes<T, L> o;
    EACH_LANE o.v[l] = k * v.v[l];
    ST(out, o);
  }
  REST(i, pixels * nc, packs) {
    size_t p = i / nc;
    int c = (int)(i % nc);
    out[i] = c < na ? ka * a[p * na + c] : kb * b[p * nb + (c - na)];
  }
}

template <typename T>
__global__ void mp_cat_backward_kernel(const T *__restrict__ dout, int na, int nb, float ka, float kb, T *__restrict__ da,
                                       T *__restrict__ db, size_t pixels, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  const int nc = na + nb;
  EDM2_FOR(j, packs) {
    const size_t p = j * L / nc;
    const int c = (int)(j * L - p * nc);
    const bool in_a = c < na;
    auto g = LD(dout);
    const float k = in_a ? ka : kb;
    edm2_lanes<T, L> o;
    EACH_LANE o.v[l] = k * g.v[l];
    edm2_store_lanes<L>(in_a ? da + p * na + c : db + p * nb + (c - na), 0, o);
  }
  REST(i, pixels * nc, packs) {
    size_t p = i / nc;
    int c = (int)(i % nc);
    if (c < na)
      da[p * na + c] = ka * dout[i];
    else
      db[p * nb + (c - na)] = kb * dout[i];
  }
}

// One image per blockIdx.y: 32-bit indices within an image (the launcher checks the size),
// no 64-bit division per element; `packs` per image along the channels where c is a
// multiple of the lanes (else 0).
template <typename T>
__global__ void modulate_silu_kernel(const T *__restrict__ h, const float *__restrict__ s, T *__restrict__ y, unsigned c,
                                     unsigned per_image, unsigned packs) {
  constexpr int L = EDM2_LANES(T);
  const size_t base = (size_t)blockIdx.y * per_image;
  const float *sb = s + (size_t)blockIdx.y * c;
  const T *hb = h + base;
  T *yb = y + base;
  for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < packs; j += gridDim.x * blockDim.x) {
    const unsigned c0 = j * L % c;
    auto hv = LD(hb);
    edm2_lanes<T, L> o;
    EACH_LANE o.v[l] = edm2_mp_silu(hv.v[l] * (sb[c0 + l] + 1.0f));
    ST(yb, o);
  }
  for (unsigned i = packs * L + blockIdx.x * blockDim.x + threadIdx.x; i < per_image; i += gridDim.x * blockDim.x)
    yb[i] = edm2_mp_silu(hb[i] * (sb[i % c] + 1.0f));
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

// The same in packs: thread x of a block takes the L channels of pack blockIdx.x·32 + x
// (every pixel's run of them one 16-byte access), lane y the pixels y, y + MODP_LANES, …,
// each lane's L partial ds summed in a fixed order as above. Where c is a multiple of the
// lanes and the pointers are aligned. Twice the pixel lanes of the per-channel kernel:
// a block moves 16 bytes per thread and access, and there are L times fewer blocks.
#define MODP_LANES 16
template <typename T>
__global__ void modulate_silu_backward_packed_kernel(const T *__restrict__ h, const float *__restrict__ s, const T *__restrict__ dy,
                                                     T *__restrict__ dh, float *__restrict__ ds, int c, unsigned pixels) {
  constexpr int L = EDM2_LANES(T);
  EDM2_SHARED(float, part, [MODP_LANES][MOD_CH * 8]);
  const int b = blockIdx.y, packs = c / L, j = blockIdx.x * MOD_CH + threadIdx.x;
  float acc[L];
#pragma unroll
  for (int l = 0; l < L; l++) acc[l] = 0.0f;
  if (j < packs) {
    float sc[L];
#pragma unroll
    for (int l = 0; l < L; l++) sc[l] = s[(size_t)b * c + (size_t)j * L + l] + 1.0f;
    const size_t base = (size_t)b * pixels * packs + j;  // in packs
    for (unsigned p = threadIdx.y; p < pixels; p += MODP_LANES) {
      const size_t q = base + (size_t)p * packs;
      auto hv = edm2_load_lanes<L>(h, q);
      auto gv = edm2_load_lanes<L>(dy, q);
      edm2_lanes<T, L> o;
#pragma unroll
      for (int l = 0; l < L; l++) {
        float hl = hv.v[l];
        float g = gv.v[l] * edm2_mp_silu_grad(hl * sc[l]);
        o.v[l] = g * sc[l];
        acc[l] += g * hl;
      }
      edm2_store_lanes<L>(dh, q, o);
    }
  }
#pragma unroll
  for (int l = 0; l < L; l++) part[threadIdx.y][threadIdx.x * L + l] = acc[l];
  __syncthreads();
  if (threadIdx.y == 0 && j < packs) {
#pragma unroll
    for (int l = 0; l < L; l++) {
      float t = part[0][threadIdx.x * L + l];
      for (int y = 1; y < MODP_LANES; y++) t += part[y][threadIdx.x * L + l];
      ds[(size_t)b * c + (size_t)j * L + l] = t;
    }
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
__global__ void dropout_kernel(T *__restrict__ x, float p, float scale, unsigned long long seed, size_t n, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    auto v = LD(x);
    EACH_LANE v.v[l] = edm2_hash_uniform(seed, j * L + l) >= p ? v.v[l] * scale : 0.0f;
    ST(x, v);
  }
  REST(i, n, packs) x[i] = edm2_hash_uniform(seed, i) >= p ? x[i] * scale : 0.0f;
}

__device__ __forceinline__ float edm2_clip_one(float v, float limit, unsigned char &mask) {
  mask = fabsf(v) > limit;
  return fminf(fmaxf(v, -limit), limit);
}
template <typename T>
__global__ void clip_kernel(T *__restrict__ x, unsigned char *__restrict__ mask, float limit, size_t n, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    auto v = LD(x);
    edm2_lanes<unsigned char, L> m;
    EACH_LANE v.v[l] = edm2_clip_one(v.v[l], limit, m.v[l]);
    ST(x, v);
    ST(mask, m);
  }
  REST(i, n, packs) x[i] = edm2_clip_one(x[i], limit, mask[i]);
}

template <typename T>
__global__ void clip_backward_kernel(T *__restrict__ dy, const unsigned char *__restrict__ mask, size_t n, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    auto m = LD(mask);
    auto g = LD(dy);
    EACH_LANE if (m.v[l]) g.v[l] = 0.0f;
    ST(dy, g);
  }
  REST(i, n, packs) if (mask[i]) dy[i] = 0.0f;
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
__global__ void add_scalar_kernel(T *__restrict__ a, float v, size_t n, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    auto av = LD(a);
    EACH_LANE av.v[l] = av.v[l] + v;
    ST(a, av);
  }
  REST(i, n, packs) a[i] = a[i] + v;
}

// Lanes of a pack when two storage types meet: the 16 bytes of the wider one.
template <typename A, typename B>
constexpr int edm2_lanes_of() {
  return EDM2_LANES(A) < EDM2_LANES(B) ? EDM2_LANES(A) : EDM2_LANES(B);
}

template <typename TX, typename T>
__global__ void scaled_kernel(const TX *__restrict__ x, T *__restrict__ y, float k, size_t n, size_t packs) {
  constexpr int L = edm2_lanes_of<TX, T>();
  EDM2_FOR(j, packs) {
    auto v = LD(x);
    edm2_lanes<T, L> o;
    EACH_LANE o.v[l] = k * v.v[l];
    ST(y, o);
  }
  REST(i, n, packs) y[i] = k * x[i];
}

// The two branches of an mp_sum's backward in one pass: y = kb·x and x ← ka·x (the same
// products as scaled and scale, so the same bits); where `mask` is given, x is first zeroed
// where it is set (a clip's backward before the mp_sum's: clip_backward's bits).
template <typename T>
__global__ void split_scaled_kernel(T *__restrict__ x, T *__restrict__ y, float ka, float kb, const unsigned char *__restrict__ mask,
                                    size_t n, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    auto xv = LD(x);
    edm2_lanes<unsigned char, L> m = {};
    if (mask) m = LD(mask);
    edm2_lanes<T, L> o;
    EACH_LANE {
      float v = m.v[l] ? 0.0f : (float)xv.v[l];
      o.v[l] = kb * v;
      xv.v[l] = ka * v;
    }
    ST(y, o);
    ST(x, xv);
  }
  REST(i, n, packs) {
    float v = mask && mask[i] ? 0.0f : (float)x[i];
    y[i] = kb * v;
    x[i] = ka * v;
  }
}

// Per-image coefficients k[b] of images of `per` values: packs where per is a multiple of
// the lanes (a pack then lies in one image: one division per pack).
template <typename T>
__global__ void scale_images_kernel(T *__restrict__ x, const float *__restrict__ k, size_t per, size_t n, size_t packs) {
  constexpr int L = EDM2_LANES(T);
  EDM2_FOR(j, packs) {
    const float kb = k[j * L / per];
    auto v = LD(x);
    EACH_LANE v.v[l] = v.v[l] * kb;
    ST(x, v);
  }
  REST(i, n, packs) x[i] = x[i] * k[i / per];
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
                                      const float *__restrict__ c_out, TX *__restrict__ d, size_t per, size_t n, size_t packs) {
  constexpr int L = edm2_lanes_of<TX, T>();
  EDM2_FOR(j, packs) {
    const size_t b = j * L / per;
    auto xv = LD(x);
    auto fv = LD(f);
    edm2_lanes<TX, L> o;
    EACH_LANE o.v[l] = c_skip[b] * xv.v[l] + c_out[b] * fv.v[l];
    ST(d, o);
  }
  REST(i, n, packs) {
    size_t b = i / per;
    d[i] = c_skip[b] * x[i] + c_out[b] * f[i];
  }
}

// Launchers: activation pointers are `void *` of storage type `dtype` (EDM2_F32 or
// EDM2_BF16); every other pointer is fp32. scaled converts (x of x_dtype, y of dtype);
// the preconditioning reads the network input x and writes D in x_dtype — fp32 in the
// bf16 mode too, as the official mixed precision keeps x and D in fp32 — and the
// network's activations (out, F) in dtype. PACKED_LAUNCH: the packs of n values in lanes
// L where the pointers listed are 16-byte aligned (and `whole`: the kernel's own layout
// condition), and the launch over them; the kernel's arguments end with n, packs.
#define RD(p) ((const T *)(p))
#define WR(p) ((T *)(p))
#define PACKED_LAUNCH(kernel, n, L, whole, aligned, ...)                 \
  do {                                                                   \
    size_t n_ = (n);                                                     \
    size_t packs_ = edm2_packs(n_, (L), (whole) && edm2_aligned16 aligned); \
    EW_LAUNCH(kernel, edm2_items(n_, packs_), __VA_ARGS__, packs_);      \
  } while (0)

extern "C" int edm2_mp_silu(const void *x, void *y, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(mp_silu_kernel<T>, n, EDM2_LANES(T), true, (x, y), RD(x), WR(y), n));
}
extern "C" int edm2_mp_silu_backward(const void *x, const void *dy, void *dx, size_t n, int accumulate, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, {
    size_t packs = edm2_packs(n, EDM2_LANES(T), edm2_aligned16(x, dy, dx));
    EW_LAUNCH(mp_silu_backward_kernel<T>, edm2_items(n, packs), RD(x), RD(dy), WR(dx), n, packs, accumulate);
  });
}
extern "C" int edm2_mp_sum(void *a, const void *b, float t, size_t n, int dtype, cudaStream_t stream) {
  float s = sqrtf((1.0f - t) * (1.0f - t) + t * t);
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(axpby_kernel<T>, n, EDM2_LANES(T), true, (a, b), WR(a), RD(b), (1.0f - t) / s, t / s, n));
}
extern "C" int edm2_axpby(void *a, const void *b, float wa, float wb, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(axpby_kernel<T>, n, EDM2_LANES(T), true, (a, b), WR(a), RD(b), wa, wb, n));
}
extern "C" int edm2_axpby_clip(void *a, const void *b, float wa, float wb, float limit, uint8_t *mask, size_t n, int dtype,
                               cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(axpby_clip_kernel<T>, n, EDM2_LANES(T), true, (a, b, mask), WR(a), RD(b), wa, wb, limit, mask, n));
}
extern "C" int edm2_scale(void *a, float k, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(scale_kernel<T>, n, EDM2_LANES(T), true, (a), WR(a), k, n));
}
extern "C" int edm2_downsample2(const void *x, void *y, int n, int h, int w, int c, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(downsample2_kernel<T>, (size_t)n * (h / 2) * (w / 2) * c, EDM2_LANES(T), c % EDM2_LANES(T) == 0, (x, y),
                                     RD(x), WR(y), n, h, w, c));
}
extern "C" int edm2_downsample2_backward(const void *dy, void *dx, int n, int h, int w, int c, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(downsample2_backward_kernel<T>, (size_t)n * h * w * c, EDM2_LANES(T), c % EDM2_LANES(T) == 0, (dy, dx),
                                     RD(dy), WR(dx), n, h, w, c));
}
extern "C" int edm2_upsample2(const void *x, void *y, int n, int h, int w, int c, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(upsample2_kernel<T>, (size_t)n * 4 * h * w * c, EDM2_LANES(T), c % EDM2_LANES(T) == 0, (x, y), RD(x),
                                     WR(y), n, h, w, c));
}
extern "C" int edm2_upsample2_backward(const void *dy, void *dx, int n, int h, int w, int c, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(upsample2_backward_kernel<T>, (size_t)n * h * w * c, EDM2_LANES(T), c % EDM2_LANES(T) == 0, (dy, dx),
                                     RD(dy), WR(dx), n, h, w, c));
}
extern "C" int edm2_mp_cat(const void *a, int na, const void *b, int nb, float ka, float kb, void *out, size_t pixels, int dtype,
                           cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(mp_cat_kernel<T>, pixels * (na + nb), EDM2_LANES(T), na % EDM2_LANES(T) == 0 && nb % EDM2_LANES(T) == 0,
                                     (a, b, out), RD(a), na, RD(b), nb, ka, kb, WR(out), pixels));
}
extern "C" int edm2_mp_cat_backward(const void *dout, int na, int nb, float ka, float kb, void *da, void *db, size_t pixels, int dtype,
                                    cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(mp_cat_backward_kernel<T>, pixels * (na + nb), EDM2_LANES(T),
                                     na % EDM2_LANES(T) == 0 && nb % EDM2_LANES(T) == 0, (dout, da, db), RD(dout), na, nb, ka, kb, WR(da),
                                     WR(db), pixels));
}
extern "C" int edm2_modulate_silu(const void *h, const float *s, void *y, int n, size_t pixels, int c, int dtype, cudaStream_t stream) {
  size_t per = pixels * (size_t)c;
  if (n <= 0 || per == 0) return 0;
  if (n > 65535 || per > 0xffffffffu) return 1;  // cudaErrorInvalidValue: grid.y is the image
  EDM2_BY_DTYPE(dtype, {
    const int L = EDM2_LANES(T);
    unsigned packs = (unsigned)edm2_packs(per, L, c % L == 0 && edm2_aligned16(h, y));
    size_t items = edm2_items(per, packs);
    dim3 grid(edm2_blocks(items, 256) < 4096u ? edm2_blocks(items, 256) : 4096u, (unsigned)n);
    EDM2_LAUNCH(modulate_silu_kernel<T>, grid, 256, 0, stream, RD(h), s, WR(y), (unsigned)c, (unsigned)per, packs);
    return (int)cudaGetLastError();
  });
}
extern "C" int edm2_modulate_silu_backward(const void *h, const float *s, const void *dy, void *dh, float *ds, int n, size_t pixels, int c,
                                           int dtype, cudaStream_t stream) {
  if (n <= 0 || c <= 0) return 0;
  if (n > 65535 || pixels > 0xffffffffu) return 1;  // cudaErrorInvalidValue: grid.y is the image
  EDM2_BY_DTYPE(dtype, {
    const int L = EDM2_LANES(T);
    if (edm2_packs(pixels * (size_t)c, L, c % L == 0 && edm2_aligned16(h, dy, dh)) > 0) {
      dim3 grid((unsigned)((c / L + MOD_CH - 1) / MOD_CH), (unsigned)n), block(MOD_CH, MODP_LANES);
      EDM2_LAUNCH(modulate_silu_backward_packed_kernel<T>, grid, block, 0, stream, RD(h), s, RD(dy), WR(dh), ds, c, (unsigned)pixels);
    } else {
      dim3 grid((unsigned)((c + MOD_CH - 1) / MOD_CH), (unsigned)n), block(MOD_CH, MOD_LANES);
      EDM2_LAUNCH(modulate_silu_backward_kernel<T>, grid, block, 0, stream, RD(h), s, RD(dy), WR(dh), ds, c, (unsigned)pixels);
    }
    return (int)cudaGetLastError();
  });
}
extern "C" int edm2_dropout(void *x, float p, uint64_t seed, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(dropout_kernel<T>, n, EDM2_LANES(T), true, (x), WR(x), p, 1.0f / (1.0f - p), (unsigned long long)seed, n));
}
extern "C" int edm2_clip(void *x, uint8_t *mask, float limit, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(clip_kernel<T>, n, EDM2_LANES(T), true, (x, mask), WR(x), mask, limit, n));
}
extern "C" int edm2_clip_backward(void *dy, const uint8_t *mask, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(clip_backward_kernel<T>, n, EDM2_LANES(T), true, (dy, mask), WR(dy), mask, n));
}
extern "C" int edm2_mp_fourier(const float *x, const float *freqs, const float *phases, void *y, size_t n, int c, int dtype,
                               cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, EW_LAUNCH(mp_fourier_kernel<T>, n * (size_t)c, x, freqs, phases, WR(y), n, c));
}
extern "C" int edm2_add_scalar(void *a, float v, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(add_scalar_kernel<T>, n, EDM2_LANES(T), true, (a), WR(a), v, n));
}
extern "C" int edm2_scaled(const void *x, int x_dtype, void *y, float k, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE_AS(x_dtype, TX, EDM2_BY_DTYPE(dtype, auto *kernel = &scaled_kernel<TX, T>;
                                              PACKED_LAUNCH(kernel, n, (edm2_lanes_of<TX, T>()), true, (x, y), (const TX *)x, WR(y), k, n)));
}
extern "C" int edm2_split_scaled(void *x, void *y, float ka, float kb, const uint8_t *mask, size_t n, int dtype, cudaStream_t stream) {
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(split_scaled_kernel<T>, n, EDM2_LANES(T), true, (x, y, mask), WR(x), WR(y), ka, kb, mask, n));
}
extern "C" int edm2_scale_images(void *x, const float *k, size_t per, size_t n, int dtype, cudaStream_t stream) {
  if (per == 0) return 0;
  EDM2_BY_DTYPE(dtype, PACKED_LAUNCH(scale_images_kernel<T>, n, EDM2_LANES(T), per % EDM2_LANES(T) == 0, (x), WR(x), k, per, n));
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
  EDM2_BY_DTYPE_AS(x_dtype, TX, EDM2_BY_DTYPE(dtype, auto *kernel = &precond_output_kernel<TX, T>; constexpr int L = edm2_lanes_of<TX, T>();
                                              PACKED_LAUNCH(kernel, n, L, per % L == 0, (x, f, d), (const TX *)x, RD(f), c_skip, c_out, (TX *)d,
                                                            per, n)));
}
