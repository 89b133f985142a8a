//! Cosine ("group-free") self-attention of the EDM2 block (paper §3/Appendix B.2):
//! q, k, v are each normalized over the channels of their head at every pixel, then
//! ordinary softmax attention with logits `q̂·k̂ / sqrt(Ch)`.
//!
//! Input `qkv`: NHWC `[N, P, 3C]` where channel `(head·Ch + c)·3 + s` holds q/k/v (`s` =
//! 0/1/2, fastest). Output `[N, P, C]` with channel `head·Ch + c`. Parallel over
//! (image, head); inside, three small GEMMs per (image, head).

use super::gemm::{sgemm, MatRef};
use super::ops::{norm_denom, normalize_row_backward};
use rayon::prelude::*;

/// What the backward needs: normalized q, k, v `[N, heads, P, Ch]` and the softmax.
pub struct AttnCache {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// `[N, heads, P, P]`
    pub w: Vec<f32>,
}

fn gather_normalized(qkv: &[f32], n_: usize, p: usize, c: usize, ch: usize, head: usize, s: usize, out: &mut [f32]) {
    let b = n_;
    let mut tmp = vec![0.0f32; ch];
    for i in 0..p {
        let base = (b * p + i) * 3 * c;
        for cc in 0..ch {
            tmp[cc] = qkv[base + (head * ch + cc) * 3 + s];
        }
        let inv = 1.0 / norm_denom(&tmp);
        for cc in 0..ch {
            out[i * ch + cc] = tmp[cc] * inv;
        }
    }
}

pub fn attention_forward(qkv: &[f32], n: usize, p: usize, c: usize, heads: usize, y: &mut [f32]) -> AttnCache {
    attention_forward_in(false, qkv, n, p, c, heads, y)
}

/// Whether the attention's products run in bf16 ([`super::bf16`]): asked for, and the
/// shapes the bf16 GEMMs take (pixels and head width multiples of 16).
fn bf16_products(asked: bool, p: usize, ch: usize) -> bool {
    asked && p % 16 == 0 && ch % 16 == 0 && super::bf16::available()
}

/// [`attention_forward`], with `bf16`: the two products (`q·kᵀ`, `w·v`) on bf16
/// operands with fp32 accumulation (the CPU's bf16 mode); normalization and softmax fp32.
pub fn attention_forward_in(bf16: bool, qkv: &[f32], n: usize, p: usize, c: usize, heads: usize, y: &mut [f32]) -> AttnCache {
    let _prof = crate::profile::scope("attention");
    let ch = c / heads;
    let bf16 = bf16_products(bf16, p, ch);
    let nh = n * heads;
    let mut q = vec![0.0f32; nh * p * ch];
    let mut k = vec![0.0f32; nh * p * ch];
    let mut v = vec![0.0f32; nh * p * ch];
    let mut w = vec![0.0f32; nh * p * p];
    let mut yh = vec![0.0f32; nh * p * ch];
    let scale = 1.0 / (ch as f32).sqrt();
    q.par_chunks_mut(p * ch)
        .zip(k.par_chunks_mut(p * ch))
        .zip(v.par_chunks_mut(p * ch))
        .zip(w.par_chunks_mut(p * p))
        .zip(yh.par_chunks_mut(p * ch))
        .enumerate()
        .for_each(|(idx, ((((qh, kh), vh), wh), yhh))| {
            let (b, head) = (idx / heads, idx % heads);
            let _g = crate::profile::scope("attention.gather");
            gather_normalized(qkv, b, p, c, ch, head, 0, qh);
            gather_normalized(qkv, b, p, c, ch, head, 1, kh);
            gather_normalized(qkv, b, p, c, ch, head, 2, vh);
            drop(_g);
            // logits[i, j] = Σ_c q[i, c] k[j, c]
            let _g = crate::profile::scope("attention.qk");
            if bf16 {
                super::gemm16::gemm_abt_bf16(p, p, ch, qh, kh, wh);
            } else {
                sgemm(p, p, ch, MatRef::rm(qh, ch), MatRef::rm_t(kh, ch), wh, false, false);
            }
            drop(_g);
            let _g = crate::profile::scope("attention.softmax");
            for row in wh.chunks_mut(p) {
                softmax_row(row, scale);
            }
            drop(_g);
            let _g = crate::profile::scope("attention.pv");
            if bf16 {
                super::gemm16::gemm_ab_bf16(p, ch, p, wh, vh, yhh);
            } else {
                sgemm(p, ch, p, MatRef::rm(wh, p), MatRef::rm(vh, ch), yhh, false, false);
            }
        });
    // Re-join heads: y[b, i, head·Ch + c].
    y.par_chunks_mut(p * c).enumerate().for_each(|(b, yb)| {
        for head in 0..heads {
            let src = &yh[(b * heads + head) * p * ch..(b * heads + head + 1) * p * ch];
            for i in 0..p {
                yb[i * c + head * ch..i * c + (head + 1) * ch].copy_from_slice(&src[i * ch..(i + 1) * ch]);
            }
        }
    });
    AttnCache { q, k, v, w }
}

/// Backward: `dy` `[N, P, C]` → `dqkv` `[N, P, 3C]` (overwritten).
pub fn attention_backward(
    qkv: &[f32],
    cache: &AttnCache,
    dy: &[f32],
    n: usize,
    p: usize,
    c: usize,
    heads: usize,
    dqkv: &mut [f32],
) {
    attention_backward_in(false, qkv, cache, dy, n, p, c, heads, dqkv)
}

/// [`attention_backward`], with `bf16`: its four products (`wᵀ·dy`, `dy·vᵀ`, `dl·k`,
/// `dlᵀ·q`) on bf16 operands with fp32 accumulation.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_in(
    bf16: bool,
    qkv: &[f32],
    cache: &AttnCache,
    dy: &[f32],
    n: usize,
    p: usize,
    c: usize,
    heads: usize,
    dqkv: &mut [f32],
) {
    let _prof = crate::profile::scope("attention.bwd");
    let ch = c / heads;
    let bf16 = bf16_products(bf16, p, ch);
    let scale = 1.0 / (ch as f32).sqrt();
    // Per (image, head): gradients of the normalized q, k, v, as [P, Ch] each.
    let mut dn = vec![0.0f32; n * heads * 3 * p * ch];
    dn.par_chunks_mut(3 * p * ch).enumerate().for_each(|(idx, dnh)| {
        let (b, head) = (idx / heads, idx % heads);
        let off = idx * p * ch;
        let qh = &cache.q[off..off + p * ch];
        let kh = &cache.k[off..off + p * ch];
        let vh = &cache.v[off..off + p * ch];
        let wh = &cache.w[idx * p * p..(idx + 1) * p * p];
        let mut dyh = vec![0.0f32; p * ch];
        for i in 0..p {
            dyh[i * ch..(i + 1) * ch].copy_from_slice(&dy[(b * p + i) * c + head * ch..(b * p + i) * c + (head + 1) * ch]);
        }
        let (dq, rest) = dnh.split_at_mut(p * ch);
        let (dk, dv) = rest.split_at_mut(p * ch);
        // dv[j, c] = Σ_i w[i, j] dy[i, c]
        if bf16 {
            super::gemm16::gemm_atb_bf16(p, ch, p, wh, &dyh, dv);
        } else {
            sgemm(p, ch, p, MatRef::rm_t(wh, p), MatRef::rm(&dyh, ch), dv, false, false);
        }
        // dw[i, j] = Σ_c dy[i, c] v[j, c]
        let mut dl = vec![0.0f32; p * p];
        if bf16 {
            super::gemm16::gemm_abt_bf16(p, p, ch, &dyh, vh, &mut dl);
        } else {
            sgemm(p, p, ch, MatRef::rm(&dyh, ch), MatRef::rm_t(vh, ch), &mut dl, false, false);
        }
        // softmax backward, then the 1/sqrt(Ch) scale of the logits.
        for (dlr, wr) in dl.chunks_mut(p).zip(wh.chunks(p)) {
            let dot: f32 = dlr.iter().zip(wr).map(|(a, b)| a * b).sum();
            for (d, &wv) in dlr.iter_mut().zip(wr) {
                *d = wv * (*d - dot) * scale;
            }
        }
        // dq = dl · k, dk = dlᵀ · q
        if bf16 {
            super::gemm16::gemm_ab_bf16(p, ch, p, &dl, kh, dq);
        } else {
            sgemm(p, ch, p, MatRef::rm(&dl, p), MatRef::rm(kh, ch), dq, false, false);
        }
        if bf16 {
            super::gemm16::gemm_atb_bf16(p, ch, p, &dl, qh, dk);
        } else {
            sgemm(p, ch, p, MatRef::rm_t(&dl, p), MatRef::rm(qh, ch), dk, false, false);
        }
    });
    // Through the per-pixel normalizations, scattered back to the interleaved layout.
    dqkv.par_chunks_mut(p * 3 * c).enumerate().for_each(|(b, db)| {
        let mut raw = vec![0.0f32; ch];
        let mut dr = vec![0.0f32; ch];
        for head in 0..heads {
            let idx = b * heads + head;
            for s in 0..3 {
                let g = &dn[(idx * 3 + s) * p * ch..(idx * 3 + s + 1) * p * ch];
                for i in 0..p {
                    let base = (b * p + i) * 3 * c;
                    for cc in 0..ch {
                        raw[cc] = qkv[base + (head * ch + cc) * 3 + s];
                    }
                    normalize_row_backward(&raw, norm_denom(&raw), &g[i * ch..(i + 1) * ch], &mut dr);
                    for cc in 0..ch {
                        db[i * 3 * c + (head * ch + cc) * 3 + s] = dr[cc];
                    }
                }
            }
        }
    });
}

crate::multiversion! {
    /// In place: `row ← softmax(row · scale)`. The max and the sum run over 8 interleaved
    /// partial lanes combined in a fixed order (vectorizable, deterministic).
    pub fn softmax_row(row: &mut [f32], scale: f32) {
        let mut mx = [f32::NEG_INFINITY; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for ch in &mut chunks {
            for j in 0..8 {
                ch[j] *= scale;
                mx[j] = mx[j].max(ch[j]);
            }
        }
        for (j, l) in chunks.into_remainder().iter_mut().enumerate() {
            *l *= scale;
            mx[j] = mx[j].max(*l);
        }
        let m = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sums = [0.0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for ch in &mut chunks {
            for j in 0..8 {
                ch[j] = super::ops::fast_exp(ch[j] - m);
                sums[j] += ch[j];
            }
        }
        for (j, l) in chunks.into_remainder().iter_mut().enumerate() {
            *l = super::ops::fast_exp(*l - m);
            sums[j] += *l;
        }
        let inv = 1.0 / sums.iter().sum::<f32>();
        for l in row.iter_mut() {
            *l *= inv;
        }
    }
}
