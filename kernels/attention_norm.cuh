// attention_norm.cuh — the per-head normalizations of q, k, v that both attention
// implementations share (attention.cu: fp32 softmax kept for the backward;
// attention_flash.cu: FlashAttention-2 style on tensor cores): the prologue that
// normalizes qkv [N, P, 3C] (channel (head·Ch + c)·3 + s) into [N, heads, P, Ch] rows, and
// the epilogue that takes the gradients of the normalized rows back into dqkv.
#pragma once
#include "common.cuh"

struct AttnShape {
  int n, p, c, heads;
};

#define ATT_LAUNCH(kernel, count, ...)                                                  \
  do {                                                                                  \
    EDM2_LAUNCH(kernel, edm2_blocks((count), 128), 128, 0, stream, __VA_ARGS__);        \
    if (int e_ = (int)cudaGetLastError()) return e_;                                    \
  } while (0)

static int attn_check(AttnShape a) { return a.heads <= 0 || a.c % a.heads != 0 || a.n <= 0 || a.p <= 0; }

// One thread per (image, head, pixel, s): gathers the Ch values and normalizes them into
// [N, heads, P, Ch] rows of O (float, or edm2_bf16 for the flash kernels' operands).
template <typename T, typename O>
__global__ void attn_normalize_kernel(const T *__restrict__ qkv, O *__restrict__ qn, O *__restrict__ kn, O *__restrict__ vn,
                                      AttnShape a) {
  const int ch = a.c / a.heads;
  EDM2_FOR(t, (size_t)a.n * a.heads * a.p * 3) {
    int s = (int)(t % 3), i = (int)(t / 3 % a.p), head = (int)(t / 3 / a.p % a.heads), b = (int)(t / 3 / a.p / a.heads);
    const T *src = qkv + ((size_t)b * a.p + i) * 3 * a.c + (size_t)head * ch * 3 + s;
    float ss = 0.0f;
    for (int c = 0; c < ch; c++) ss += src[3 * c] * src[3 * c];
    float inv = 1.0f / edm2_norm_denom(ss, ch);
    O *dst = (s == 0 ? qn : s == 1 ? kn : vn) + (((size_t)b * a.heads + head) * a.p + i) * ch;
    for (int c = 0; c < ch; c++) dst[c] = src[3 * c] * inv;
  }
}

// One thread per (image, head, pixel, s): through the normalization, into dqkv.
template <typename T>
__global__ void attn_denormalize_kernel(const T *__restrict__ qkv, const float *__restrict__ dqn, const float *__restrict__ dkn,
                                        const float *__restrict__ dvn, T *__restrict__ dqkv, AttnShape a) {
  const int ch = a.c / a.heads;
  EDM2_FOR(t, (size_t)a.n * a.heads * a.p * 3) {
    int s = (int)(t % 3), i = (int)(t / 3 % a.p), head = (int)(t / 3 / a.p % a.heads), b = (int)(t / 3 / a.p / a.heads);
    size_t off = ((size_t)b * a.p + i) * 3 * a.c + (size_t)head * ch * 3 + s;
    const T *x = qkv + off;
    const float *g = (s == 0 ? dqn : s == 1 ? dkn : dvn) + (((size_t)b * a.heads + head) * a.p + i) * ch;
    float ss = 0.0f, dot = 0.0f;
    for (int c = 0; c < ch; c++) {
      ss += x[3 * c] * x[3 * c];
      dot += x[3 * c] * g[c];
    }
    float d = edm2_norm_denom(ss, ch), norm = sqrtf(ss);
    float coef = norm > 0.0f ? dot / (d * d * sqrtf((float)ch) * norm) : 0.0f;
    float inv = 1.0f / d;
    for (int c = 0; c < ch; c++) dqkv[off + 3 * c] = g[c] * inv - x[3 * c] * coef;
  }
}

