// attention.cu — cosine ("group-free") self-attention of the EDM2 block (paper §3,
// Appendix B.2), forward and backward. qkv, y and their gradients are fp32 or bf16
// activations (`dtype`); the workspace and all arithmetic are fp32.
//
// Input qkv: NHWC [N, P, 3C], channel (head·Ch + c)·3 + s holds q/k/v (s = 0/1/2, fastest),
// as the official reshape. Output y: [N, P, C] with channel head·Ch + c.
// q, k, v are each normalized over the Ch channels of their head at every pixel
// (normalize, DESIGN.md §1); logits q̂·k̂ / sqrt(Ch); softmax over the keys.
// Workspace: qn/kn/vn [N, heads, P, Ch] (normalized) and w [N, heads, P, P] (the softmax,
// kept for the backward; dw reuses a second [N, heads, P, P] buffer).
// Kernels: one thread per output element or per row, no barriers, no atomics —
// deterministic. Backward: dv = wᵀ·dy, dl = dy·vᵀ, softmax backward dl ← w·(dl − Σ w·dl)/sqrt(Ch),
// dq = dl·k̂, dk = dlᵀ·q̂, then through the three normalizations into dqkv (overwritten).
// The fp32 path (exact against the CPU backend, O(P²) memory); bf16 activations take the
// FlashAttention-2 kernels of attention_flash.cu (no P x P buffer, tensor cores).
// Checked against the CPU backend in the simulation harness.
#include "attention_norm.cuh"

// One thread per (image·head, query i): the row of logits, then its softmax in place.
__global__ void attn_softmax_kernel(const float *__restrict__ qn, const float *__restrict__ kn, float *__restrict__ w, AttnShape a) {
  const int ch = a.c / a.heads;
  const float scale = 1.0f / sqrtf((float)ch);
  EDM2_FOR(t, (size_t)a.n * a.heads * a.p) {
    size_t bh = t / a.p;
    const float *q = qn + t * ch;
    float *row = w + t * a.p;
    float mx = -INFINITY;
    for (int j = 0; j < a.p; j++) {
      const float *k = kn + (bh * a.p + j) * ch;
      float l = 0.0f;
      for (int c = 0; c < ch; c++) l += q[c] * k[c];
      row[j] = l * scale;
      mx = fmaxf(mx, row[j]);
    }
    float sum = 0.0f;
    for (int j = 0; j < a.p; j++) {
      row[j] = __expf(row[j] - mx);
      sum += row[j];
    }
    float inv = 1.0f / sum;
    for (int j = 0; j < a.p; j++) row[j] *= inv;
  }
}

// One thread per output element y[b, i, head·Ch + c] = Σ_j w[i, j] v̂[j, c].
template <typename T>
__global__ void attn_pv_kernel(const float *__restrict__ w, const float *__restrict__ vn, T *__restrict__ y, AttnShape a) {
  const int ch = a.c / a.heads;
  EDM2_FOR(t, (size_t)a.n * a.p * a.c) {
    int cc = (int)(t % a.c), i = (int)(t / a.c % a.p), b = (int)(t / a.c / a.p);
    int head = cc / ch, c = cc % ch;
    size_t bh = (size_t)b * a.heads + head;
    const float *row = w + (bh * a.p + i) * a.p;
    const float *v = vn + bh * a.p * ch + c;
    float acc = 0.0f;
    for (int j = 0; j < a.p; j++) acc += row[j] * v[(size_t)j * ch];
    y[t] = acc;
  }
}

// dv̂[bh, j, c] = Σ_i w[i, j] dy[b, i, head·Ch + c]  (into dvn).
template <typename T>
__global__ void attn_dv_kernel(const float *__restrict__ w, const T *__restrict__ dy, float *__restrict__ dvn, AttnShape a) {
  const int ch = a.c / a.heads;
  EDM2_FOR(t, (size_t)a.n * a.heads * a.p * ch) {
    int c = (int)(t % ch), j = (int)(t / ch % a.p);
    size_t bh = t / ch / a.p;
    int b = (int)(bh / a.heads), head = (int)(bh % a.heads);
    float acc = 0.0f;
    for (int i = 0; i < a.p; i++) acc += w[(bh * a.p + i) * a.p + j] * dy[((size_t)b * a.p + i) * a.c + head * ch + c];
    dvn[t] = acc;
  }
}

// One thread per (bh, i): dl[i, j] = Σ_c dy[i, c] v̂[j, c], then the softmax backward and
// the logit scale, written into dl.
template <typename T>
__global__ void attn_dlogits_kernel(const float *__restrict__ w, const float *__restrict__ vn, const T *__restrict__ dy,
                                    float *__restrict__ dl, AttnShape a) {
  const int ch = a.c / a.heads;
  const float scale = 1.0f / sqrtf((float)ch);
  EDM2_FOR(t, (size_t)a.n * a.heads * a.p) {
    size_t bh = t / a.p;
    int i = (int)(t % a.p), b = (int)(bh / a.heads), head = (int)(bh % a.heads);
    const T *g = dy + ((size_t)b * a.p + i) * a.c + head * ch;
    const float *wr = w + t * a.p;
    float *dr = dl + t * a.p;
    float dot = 0.0f;
    for (int j = 0; j < a.p; j++) {
      const float *v = vn + (bh * a.p + j) * ch;
      float acc = 0.0f;
      for (int c = 0; c < ch; c++) acc += g[c] * v[c];
      dr[j] = acc;
      dot += acc * wr[j];
    }
    for (int j = 0; j < a.p; j++) dr[j] = wr[j] * (dr[j] - dot) * scale;
  }
}

// dq̂[bh, i, c] = Σ_j dl[i, j] k̂[j, c] and dk̂[bh, j, c] = Σ_i dl[i, j] q̂[i, c].
__global__ void attn_dqk_kernel(const float *__restrict__ dl, const float *__restrict__ qn, const float *__restrict__ kn,
                                float *__restrict__ dqn, float *__restrict__ dkn, AttnShape a) {
  const int ch = a.c / a.heads;
  EDM2_FOR(t, (size_t)a.n * a.heads * a.p * ch) {
    int c = (int)(t % ch), r = (int)(t / ch % a.p);
    size_t bh = t / ch / a.p;
    const float *d = dl + bh * a.p * a.p;
    float aq = 0.0f, ak = 0.0f;
    for (int j = 0; j < a.p; j++) {
      aq += d[(size_t)r * a.p + j] * kn[(bh * a.p + j) * ch + c];
      ak += d[(size_t)j * a.p + r] * qn[(bh * a.p + j) * ch + c];
    }
    dqn[t] = aq;
    dkn[t] = ak;
  }
}

template <typename T>
static int attention_forward(const T *qkv, T *y, float *qn, float *kn, float *vn, float *w, AttnShape a, cudaStream_t stream) {
  size_t rows = (size_t)a.n * a.heads * a.p;
  auto normalize = attn_normalize_kernel<T, float>;
  ATT_LAUNCH(normalize, rows * 3, qkv, qn, kn, vn, a);
  ATT_LAUNCH(attn_softmax_kernel, rows, qn, kn, w, a);
  ATT_LAUNCH(attn_pv_kernel<T>, (size_t)a.n * a.p * a.c, w, vn, y, a);
  return 0;
}

template <typename T>
static int attention_backward(const T *qkv, const float *qn, const float *kn, const float *vn, const float *w, const T *dy, float *dl,
                              float *dqn, float *dkn, float *dvn, T *dqkv, AttnShape a, cudaStream_t stream) {
  size_t rows = (size_t)a.n * a.heads * a.p;
  ATT_LAUNCH(attn_dv_kernel<T>, (size_t)a.n * a.p * a.c, w, dy, dvn, a);
  ATT_LAUNCH(attn_dlogits_kernel<T>, rows, w, vn, dy, dl, a);
  ATT_LAUNCH(attn_dqk_kernel, (size_t)a.n * a.p * a.c, dl, qn, kn, dqn, dkn, a);
  ATT_LAUNCH(attn_denormalize_kernel<T>, rows * 3, qkv, dqn, dkn, dvn, dqkv, a);
  return 0;
}

extern "C" int edm2_attention_forward(const void *qkv, void *y, float *qn, float *kn, float *vn, float *w, int n, int p, int c, int heads,
                                      int dtype, cudaStream_t stream) {
  AttnShape a = {n, p, c, heads};
  if (attn_check(a)) return 1;  // cudaErrorInvalidValue
  EDM2_BY_DTYPE(dtype, return attention_forward<T>((const T *)qkv, (T *)y, qn, kn, vn, w, a, stream));
}

extern "C" int edm2_attention_backward(const void *qkv, const float *qn, const float *kn, const float *vn, const float *w, const void *dy,
                                       float *dl, float *dqn, float *dkn, float *dvn, void *dqkv, int n, int p, int c, int heads, int dtype,
                                       cudaStream_t stream) {
  AttnShape a = {n, p, c, heads};
  if (attn_check(a)) return 1;
  EDM2_BY_DTYPE(dtype, return attention_backward<T>((const T *)qkv, qn, kn, vn, w, (const T *)dy, dl, dqn, dkn, dvn, (T *)dqkv, a, stream));
}
