// vae.cu — the forward ops of the Stability VAE (src/nn/vae.rs) that the EDM2 network does
// not have, on fp32 or bf16 NHWC activations (templates over the storage type T; arithmetic
// in fp32, GroupNorm statistics combined in fp64). The convolutions, upsampling and sums of
// the VAE are the U-Net's kernels.
//
// group_norm (torch.nn.GroupNorm, then SiLU when `silu`): per image b and group g of
//   cpg = C/groups consecutive channels, mean and biased variance over the group's
//   H·W·cpg values; y = (x − mean)/sqrt(var + eps)·gamma[c] + beta[c]; silu: y·σ(y).
//   Three launches: (1) GN_SPLITS blocks per (b, g) sum x − shift and (x − shift)² over a
//   fixed share of the group (shift = the group's first value keeps the squares at the
//   scale of the variance; per-thread fp32, block tree in fp64), (2) one thread per (b, g)
//   combines its splits in order into per-channel scale a and offset o (fp32 [N, C] each),
//   (3) y = x·a + o (+ SiLU), grid-stride. Fixed order everywhere: deterministic.
//   Workspace: part [N·groups·GN_SPLITS·2] fp64, ao [2·N·C] fp32.
// add_channel_bias: y[r, c] += bias[c] (bias fp32), in place.
// subsample2_odd: y[b, i, j] = x[b, 2i+1, 2j+1] → [N, H/2, W/2, C]: a 'same' 3x3 conv so
//   sampled is diffusers' Downsample2D (pad (0, 1, 0, 1), stride 2).
// dot_attention: single head over the P pixels of an image, qkv [N, P, 3C] = q ‖ k ‖ v per
//   pixel; w[b, i, j] = softmax_j(q_i·k_j / sqrt(C)) (fp32 workspace [N, P, P], one thread
//   per row), then y[b, i, c] = Σ_j w[b, i, j]·v[b, j, c] (one thread per output).
// Variants: first versions, correct before fast (the attention keeps P x P scores; at a
// 64x64 latent that is 64 MiB per image). Checked against the CPU backend in the
// simulation harness (tests/gpu_kernels.rs, tests/gpu_vae.rs).
#include "common.cuh"

#ifdef EDM2_SIM
#define GN_SPLITS 2  // the simulated device runs every thread of every block
#else
#define GN_SPLITS 16
#endif
#define GN_THREADS 256

template <typename T>
__global__ void gn_partial_kernel(const T *__restrict__ x, double *__restrict__ part, int hw, int c, int groups) {
  EDM2_SHARED(double, red1, [GN_THREADS]);
  EDM2_SHARED(double, red2, [GN_THREADS]);
  const int ig = blockIdx.x / GN_SPLITS, split = blockIdx.x % GN_SPLITS;
  const int b = ig / groups, g = ig % groups, cpg = c / groups;
  const T *xb = x + (size_t)b * hw * c + (size_t)g * cpg;
  const float shift = xb[0];
  const size_t count = (size_t)hw * cpg;
  float s1 = 0.0f, s2 = 0.0f;
  for (size_t e = (size_t)split * GN_THREADS + threadIdx.x; e < count; e += (size_t)GN_SPLITS * GN_THREADS) {
    float d = (float)xb[(e / cpg) * c + e % cpg] - shift;
    s1 += d;
    s2 += d * d;
  }
  red1[threadIdx.x] = s1;
  red2[threadIdx.x] = s2;
  __syncthreads();
  for (int s = GN_THREADS / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) {
      red1[threadIdx.x] += red1[threadIdx.x + s];
      red2[threadIdx.x] += red2[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    part[(size_t)blockIdx.x * 2] = red1[0];
    part[(size_t)blockIdx.x * 2 + 1] = red2[0];
  }
}

template <typename T>
__global__ void gn_finalize_kernel(const T *__restrict__ x, const double *__restrict__ part, const float *__restrict__ gamma,
                                   const float *__restrict__ beta, float *__restrict__ ao, int n, int hw, int c, int groups, float eps) {
  const int cpg = c / groups;
  EDM2_FOR(ig, (size_t)n * groups) {
    const int b = (int)(ig / groups), g = (int)(ig % groups);
    double s1 = 0.0, s2 = 0.0;
    for (int k = 0; k < GN_SPLITS; k++) {
      s1 += part[(ig * GN_SPLITS + k) * 2];
      s2 += part[(ig * GN_SPLITS + k) * 2 + 1];
    }
    const double count = (double)hw * cpg;
    const double md = s1 / count;
    double var = s2 / count - md * md;
    var = var > 0.0 ? var : 0.0;
    const double mean = (double)(float)x[(size_t)b * hw * c + (size_t)g * cpg] + md;
    const double inv = 1.0 / sqrt(var + (double)eps);
    for (int ch = g * cpg; ch < (g + 1) * cpg; ch++) {
      const double a = (double)gamma[ch] * inv;
      ao[(size_t)b * c + ch] = (float)a;
      ao[(size_t)n * c + (size_t)b * c + ch] = (float)((double)beta[ch] - mean * a);
    }
  }
}

template <typename T>
__global__ void gn_apply_kernel(const T *__restrict__ x, T *__restrict__ y, const float *__restrict__ ao, int n, int hw, int c, int silu) {
  EDM2_FOR(i, (size_t)n * hw * c) {
    const size_t bc = (i / ((size_t)hw * c)) * c + i % c;
    float v = (float)x[i] * ao[bc] + ao[(size_t)n * c + bc];
    y[i] = silu ? v * edm2_sigmoid(v) : v;
  }
}

template <typename T>
__global__ void add_channel_bias_kernel(T *__restrict__ y, const float *__restrict__ bias, size_t rows, int c) {
  EDM2_FOR(i, rows * c) y[i] = (float)y[i] + bias[i % c];
}

template <typename T>
__global__ void subsample2_odd_kernel(const T *__restrict__ x, T *__restrict__ y, int n, int h, int w, int c) {
  const int ho = h / 2, wo = w / 2;
  EDM2_FOR(i, (size_t)n * ho * wo * c) {
    const int ch = (int)(i % c), j = (int)(i / c % wo), r = (int)(i / c / wo % ho), b = (int)(i / c / wo / ho);
    y[i] = (float)x[(((size_t)b * h + 2 * r + 1) * w + 2 * j + 1) * c + ch];
  }
}

// One thread per (image, query i): the row of scores, then its softmax in place.
template <typename T>
__global__ void dot_attn_softmax_kernel(const T *__restrict__ qkv, float *__restrict__ w, int n, int p, int c) {
  const float scale = 1.0f / sqrtf((float)c);
  EDM2_FOR(t, (size_t)n * p) {
    const size_t b = t / p;
    const T *q = qkv + t * 3 * c;
    float *row = w + t * p;
    float mx = -INFINITY;
    for (int j = 0; j < p; j++) {
      const T *k = qkv + (b * p + j) * 3 * c + c;
      float l = 0.0f;
      for (int cc = 0; cc < c; cc++) l += (float)q[cc] * (float)k[cc];
      row[j] = l * scale;
      mx = fmaxf(mx, row[j]);
    }
    float sum = 0.0f;
    for (int j = 0; j < p; j++) {
      row[j] = __expf(row[j] - mx);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
    for (int j = 0; j < p; j++) row[j] *= inv;
  }
}

template <typename T>
__global__ void dot_attn_pv_kernel(const T *__restrict__ qkv, const float *__restrict__ w, T *__restrict__ y, int n, int p, int c) {
  EDM2_FOR(t, (size_t)n * p * c) {
    const int cc = (int)(t % c);
    const size_t bi = t / c, b = bi / p;
    const float *row = w + bi * p;
    const T *v = qkv + b * p * 3 * c + 2 * c + cc;
    float acc = 0.0f;
    for (int j = 0; j < p; j++) acc += row[j] * (float)v[(size_t)j * 3 * c];
    y[t] = acc;
  }
}

#define VAE_LAUNCH(kernel, count, ...)                                                \
  do {                                                                                \
    EDM2_LAUNCH(kernel, edm2_blocks((count), 256), 256, 0, stream, __VA_ARGS__);      \
    if (int e_ = (int)cudaGetLastError()) return e_;                                  \
  } while (0)

template <typename T>
static int group_norm(const T *x, T *y, const float *gamma, const float *beta, double *part, float *ao, int n, int hw, int c, int groups,
                      float eps, int silu, cudaStream_t stream) {
  EDM2_LAUNCH(gn_partial_kernel<T>, (unsigned)(n * groups * GN_SPLITS), GN_THREADS, 0, stream, x, part, hw, c, groups);
  if (int e = (int)cudaGetLastError()) return e;
  VAE_LAUNCH(gn_finalize_kernel<T>, (size_t)n * groups, x, part, gamma, beta, ao, n, hw, c, groups, eps);
  VAE_LAUNCH(gn_apply_kernel<T>, (size_t)n * hw * c, x, y, ao, n, hw, c, silu);
  return 0;
}

template <typename T>
static int dot_attention(const T *qkv, T *y, float *w, int n, int p, int c, cudaStream_t stream) {
  VAE_LAUNCH(dot_attn_softmax_kernel<T>, (size_t)n * p, qkv, w, n, p, c);
  VAE_LAUNCH(dot_attn_pv_kernel<T>, (size_t)n * p * c, qkv, w, y, n, p, c);
  return 0;
}

extern "C" size_t edm2_group_norm_part_len(int n, int groups) { return (size_t)n * groups * GN_SPLITS * 2; }

extern "C" int edm2_group_norm(const void *x, void *y, const float *gamma, const float *beta, double *part, float *ao, int n, int hw, int c,
                               int groups, float eps, int silu, int dtype, cudaStream_t stream) {
  if (n <= 0 || hw <= 0 || groups <= 0 || c % groups != 0) return 1;  // cudaErrorInvalidValue
  EDM2_BY_DTYPE(dtype, return group_norm<T>((const T *)x, (T *)y, gamma, beta, part, ao, n, hw, c, groups, eps, silu, stream));
}

extern "C" int edm2_add_channel_bias(void *y, const float *bias, size_t rows, int c, int dtype, cudaStream_t stream) {
  if (rows == 0) return 0;
  if (c <= 0) return 1;
  EDM2_BY_DTYPE(dtype, VAE_LAUNCH(add_channel_bias_kernel<T>, rows * c, (T *)y, bias, rows, c); return 0);
}

extern "C" int edm2_subsample2_odd(const void *x, void *y, int n, int h, int w, int c, int dtype, cudaStream_t stream) {
  if ((size_t)n * (h / 2) * (w / 2) * c == 0) return 0;
  EDM2_BY_DTYPE(dtype, VAE_LAUNCH(subsample2_odd_kernel<T>, (size_t)n * (h / 2) * (w / 2) * c, (const T *)x, (T *)y, n, h, w, c); return 0);
}

extern "C" int edm2_dot_attention(const void *qkv, void *y, float *w, int n, int p, int c, int dtype, cudaStream_t stream) {
  if (n <= 0 || p <= 0 || c <= 0) return 1;
  EDM2_BY_DTYPE(dtype, return dot_attention<T>((const T *)qkv, (T *)y, w, n, p, c, stream));
}
