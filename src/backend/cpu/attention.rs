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

/// q, k and v of one (image `b`, head) as `[P, Ch]` rows each, normalized per pixel
/// (`x / norm_denom(x)`). Per pixel the head's 3·Ch interleaved channels are one
/// contiguous run of `qkv`, read once for all three (de-interleaved into the rows, then
/// scaled in place), instead of three strided passes.
#[allow(clippy::too_many_arguments)]
fn gather_normalized(qkv: &[f32], b: usize, p: usize, c: usize, ch: usize, head: usize, q: &mut [f32], k: &mut [f32], v: &mut [f32]) {
    for i in 0..p {
        let base = (b * p + i) * 3 * c + head * ch * 3;
        let src = &qkv[base..base + 3 * ch];
        let (qr, kr, vr) = (&mut q[i * ch..(i + 1) * ch], &mut k[i * ch..(i + 1) * ch], &mut v[i * ch..(i + 1) * ch]);
        for (cc, t) in src.chunks_exact(3).enumerate() {
            qr[cc] = t[0];
            kr[cc] = t[1];
            vr[cc] = t[2];
        }
        for r in [qr, kr, vr] {
            let inv = 1.0 / norm_denom(r);
            for x in r.iter_mut() {
                *x *= inv;
            }
        }
    }
}

pub fn attention_forward(qkv: &[f32], n: usize, p: usize, c: usize, heads: usize, y: &mut [f32]) -> AttnCache {
    attention_forward_in(false, qkv, n, p, c, heads, y)
}

/// Where the attention's six products run: bf16 pairs on `vdpbf16ps` (asked for, the
/// processor has it, pixels and head width multiples of 16), the fp32 register tiles of
/// [`super::gemm16`] (pixels and head width multiples of 16, AVX2 present), or the `gemm`
/// crate (any other shape or processor). The tiles over the crate: on these small
/// products (P = 64–256, Ch = 64) the crate packs both operands per call and ran at
/// 110–145 GFLOP/s on 2 AVX-512 Xeon cores (docs/perf.md).
#[derive(Clone, Copy)]
enum Products {
    Bf16,
    Tiles,
    Crate,
}

impl Products {
    fn choose(bf16: bool, p: usize, ch: usize) -> Self {
        let shapes = p % 16 == 0 && ch % 16 == 0;
        if bf16 && shapes && super::bf16::available() {
            Products::Bf16
        } else if shapes && super::gemm16::usable(p) {
            Products::Tiles
        } else {
            Products::Crate
        }
    }

    /// `c[m×n] = a[m×k] · b[k×n]` (all row-major, overwritten).
    fn ab(self, m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        match self {
            Products::Bf16 => super::gemm16::gemm_ab_bf16(m, n, k, a, b, c),
            Products::Tiles => super::gemm16::gemm_ab(m, n, k, a, b, c),
            Products::Crate => sgemm(m, n, k, MatRef::rm(a, k), MatRef::rm(b, n), c, false, false),
        }
    }

    /// `c[m×n] = a[m×k] · bᵀ` for a row-major `b` `[n][k]`.
    fn abt(self, m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        match self {
            Products::Bf16 => super::gemm16::gemm_abt_bf16(m, n, k, a, b, c),
            Products::Tiles => super::gemm16::gemm_abt(m, n, k, a, b, c),
            Products::Crate => sgemm(m, n, k, MatRef::rm(a, k), MatRef::rm_t(b, k), c, false, false),
        }
    }

    /// `c[m×n] = aᵀ · b` for a row-major `a` `[k][m]`.
    fn atb(self, m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        match self {
            Products::Bf16 => super::gemm16::gemm_atb_bf16(m, n, k, a, b, c),
            Products::Tiles => super::gemm16::gemm_atb(m, n, k, a, b, c),
            Products::Crate => sgemm(m, n, k, MatRef::rm_t(a, m), MatRef::rm(b, n), c, false, false),
        }
    }
}

/// [`attention_forward`], with `bf16`: the two products (`q·kᵀ`, `w·v`) on bf16
/// operands with fp32 accumulation (the CPU's bf16 mode); normalization and softmax fp32.
pub fn attention_forward_in(bf16: bool, qkv: &[f32], n: usize, p: usize, c: usize, heads: usize, y: &mut [f32]) -> AttnCache {
    let _prof = crate::profile::scope("attention");
    let ch = c / heads;
    let products = Products::choose(bf16, p, ch);
    let nh = n * heads;
    let mut q = super::zeroed(nh * p * ch);
    let mut k = super::zeroed(nh * p * ch);
    let mut v = super::zeroed(nh * p * ch);
    let mut w = super::zeroed(nh * p * p);
    let mut yh = super::zeroed(nh * p * ch);
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
            gather_normalized(qkv, b, p, c, ch, head, qh, kh, vh);
            drop(_g);
            // logits[i, j] = Σ_c q[i, c] k[j, c]
            let _g = crate::profile::scope("attention.qk");
            products.abt(p, p, ch, qh, kh, wh);
            drop(_g);
            let _g = crate::profile::scope("attention.softmax");
            for row in wh.chunks_mut(p) {
                softmax_row(row, scale);
            }
            drop(_g);
            let _g = crate::profile::scope("attention.pv");
            products.ab(p, ch, p, wh, vh, yhh);
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
    let products = Products::choose(bf16, p, ch);
    let scale = 1.0 / (ch as f32).sqrt();
    // Per (image, head): gradients of the normalized q, k, v, as [P, Ch] each.
    let mut dn = super::zeroed(n * heads * 3 * p * ch);
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
        products.atb(p, ch, p, wh, &dyh, dv);
        // dw[i, j] = Σ_c dy[i, c] v[j, c]
        let mut dl = vec![0.0f32; p * p];
        products.abt(p, p, ch, &dyh, vh, &mut dl);
        // softmax backward, then the 1/sqrt(Ch) scale of the logits.
        for (dlr, wr) in dl.chunks_mut(p).zip(wh.chunks(p)) {
            softmax_backward_row(dlr, wr, scale);
        }
        // dq = dl · k, dk = dlᵀ · q
        products.ab(p, ch, p, &dl, kh, dq);
        products.atb(p, ch, p, &dl, qh, dk);
    });
    // Through the per-pixel normalizations, scattered back to the interleaved layout: per
    // pixel and head, the 3·Ch interleaved channels are one contiguous run of qkv and of
    // dqkv (read and written once for q, k and v together).
    dqkv.par_chunks_mut(p * 3 * c).enumerate().for_each(|(b, db)| {
        let mut raw = vec![0.0f32; 3 * ch];
        let mut dr = vec![0.0f32; 3 * ch];
        for i in 0..p {
            for head in 0..heads {
                let idx = b * heads + head;
                let at = (b * p + i) * 3 * c + head * ch * 3;
                let src = &qkv[at..at + 3 * ch];
                for (cc, t) in src.chunks_exact(3).enumerate() {
                    for s in 0..3 {
                        raw[s * ch + cc] = t[s];
                    }
                }
                for s in 0..3 {
                    let g = &dn[(idx * 3 + s) * p * ch + i * ch..][..ch];
                    let x = &raw[s * ch..(s + 1) * ch];
                    normalize_row_backward(x, norm_denom(x), g, &mut dr[s * ch..(s + 1) * ch]);
                }
                let dst = &mut db[i * 3 * c + head * ch * 3..][..3 * ch];
                for (cc, t) in dst.chunks_exact_mut(3).enumerate() {
                    for s in 0..3 {
                        t[s] = dr[s * ch + cc];
                    }
                }
            }
        }
    });
}

/// The largest element of `row` (NaNs skipped), on 8 lanes of `vmaxps` where AVX2 is
/// present: neither `f32::max` nor a compare-select loop vectorizes (they compiled to
/// scalar `vmaxss`).
fn row_max(row: &[f32]) -> f32 {
    let fold = |a: f32, &b: &f32| if b > a { b } else { a };
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2_fma() {
        #[target_feature(enable = "avx2")]
        unsafe fn lanes(row: &[f32]) -> [f32; 8] {
            use std::arch::x86_64::*;
            let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in row.chunks_exact(8) {
                // vmaxps returns its second operand when either is NaN: a NaN is skipped.
                acc = _mm256_max_ps(_mm256_loadu_ps(c.as_ptr()), acc);
            }
            let mut l = [0.0f32; 8];
            _mm256_storeu_ps(l.as_mut_ptr(), acc);
            l
        }
        // SAFETY: AVX2 checked above; the loads stay inside `row`'s whole chunks.
        let l = unsafe { lanes(row) };
        return l.iter().chain(row.chunks_exact(8).remainder()).fold(f32::NEG_INFINITY, fold);
    }
    row.iter().fold(f32::NEG_INFINITY, fold)
}

crate::multiversion! {
    /// In place: `dl ← w ⊙ (dl − ⟨dl, w⟩) · scale`, the softmax backward of one row of
    /// probabilities `w` (then the logits' scale). The dot product over 8 lanes
    /// ([`super::ops::dot_f32`]): a sequential f32 sum did not vectorize (a chain of
    /// dependent additions per row), and this loop ran on the x86-64 baseline before.
    fn softmax_backward_row(dl: &mut [f32], w: &[f32], scale: f32) {
        let dot = super::ops::dot_f32(dl, w);
        for (d, &wv) in dl.iter_mut().zip(w) {
            *d = wv * (*d - dot) * scale;
        }
    }
}

crate::multiversion! {
    /// In place: `row ← softmax(row · scale)` for `scale > 0`, as `exp((x − max)·scale)`
    /// over their sum ([`row_max`]), the sum over 8 lanes combined in a fixed order
    /// (vectorizable, deterministic).
    pub fn softmax_row(row: &mut [f32], scale: f32) {
        let m = row_max(row);
        let mut sums = [0.0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for ch in &mut chunks {
            for j in 0..8 {
                ch[j] = super::ops::fast_exp((ch[j] - m) * scale);
                sums[j] += ch[j];
            }
        }
        for (j, l) in chunks.into_remainder().iter_mut().enumerate() {
            *l = super::ops::fast_exp((*l - m) * scale);
            sums[j] += *l;
        }
        let inv = 1.0 / sums.iter().sum::<f32>();
        for l in row.iter_mut() {
            *l *= inv;
        }
    }
}
