//! The CPU kernels of [`VaeOps`]: the forward operations of the Stability VAE that the
//! EDM2 network does not have (GroupNorm + SiLU, channel biases, the stride-2 sampling of
//! diffusers' `Downsample2D`, single-head softmax attention). fp32 like the rest of the
//! CPU backend; statistics accumulate in f64 and every reduction runs in a fixed order,
//! so results do not depend on the thread count.

use super::attention::softmax_row;
use super::gemm::{sgemm, MatRef};
use super::ops::fast_exp;
use super::{conv, Cpu};
use crate::backend::{ConvGeom, Nhwc, VaeOps};
use crate::error::Result;
use rayon::prelude::*;

/// Pixels per parallel work item of the GroupNorm passes (a fixed split, so the f64
/// partial sums are combined in the same order whatever the thread count).
const GN_CHUNK_PIXELS: usize = 256;

/// Query rows per work item of the attention (the scores of one block, `rows × p`, live
/// in one buffer: 64 × 4096 floats = 1 MiB at a 64x64 latent).
const ATTN_ROWS: usize = 64;

crate::multiversion! {
    /// Over the rows (`c` channels each) of one chunk, per channel: `s1[k] = Σ (x − shift[k])`,
    /// `s2[k] = Σ (x − shift[k])²` in f32. The shift (a value of the channel) keeps the
    /// squares at the scale of the variance, so f32 chunk sums lose nothing that matters.
    fn shifted_channel_sums(x: &[f32], shift: &[f32], s1: &mut [f32], s2: &mut [f32]) {
        s1.fill(0.0);
        s2.fill(0.0);
        for row in x.chunks_exact(shift.len()) {
            for (((a, q), &v), &m) in s1.iter_mut().zip(s2.iter_mut()).zip(row).zip(shift) {
                let d = v - m;
                *a += d;
                *q += d * d;
            }
        }
    }
}

crate::multiversion! {
    /// `y = x·a[k] + b[k]` per channel, then SiLU when `silu`.
    fn scale_shift_silu(x: &[f32], a: &[f32], b: &[f32], silu: bool, y: &mut [f32]) {
        for (xr, yr) in x.chunks_exact(a.len()).zip(y.chunks_exact_mut(a.len())) {
            for (((o, &v), &ak), &bk) in yr.iter_mut().zip(xr).zip(a).zip(b) {
                let t = v * ak + bk;
                *o = if silu { t / (1.0 + fast_exp(-t)) } else { t };
            }
        }
    }
}

/// Per-channel `(Σx, Σx²)` of the rows of one image, in f64: f32 sums of shifted values
/// per chunk of [`GN_CHUNK_PIXELS`] rows, combined in f64 in chunk order.
fn channel_sums(x: &[f32], c: usize) -> Vec<(f64, f64)> {
    let shift = &x[..c];
    let parts: Vec<(Vec<f32>, Vec<f32>, usize)> = x
        .par_chunks(GN_CHUNK_PIXELS * c)
        .map(|chunk| {
            let (mut s1, mut s2) = (vec![0.0f32; c], vec![0.0f32; c]);
            shifted_channel_sums(chunk, shift, &mut s1, &mut s2);
            (s1, s2, chunk.len() / c)
        })
        .collect();
    let mut total = vec![(0.0f64, 0.0f64); c];
    for (s1, s2, rows) in parts {
        for k in 0..c {
            // Σx = Σ(x−m) + N·m; Σx² = Σ(x−m)² + 2m·Σ(x−m) + N·m².
            let (a, q, m, n) = (s1[k] as f64, s2[k] as f64, shift[k] as f64, rows as f64);
            total[k].0 += a + n * m;
            total[k].1 += q + 2.0 * m * a + n * m * m;
        }
    }
    total
}

/// GroupNorm (+ SiLU) of NHWC `x`; see [`VaeOps::group_norm`].
#[allow(clippy::too_many_arguments)]
pub fn group_norm(x: &[f32], s: Nhwc, groups: usize, eps: f32, gamma: &[f32], beta: &[f32], silu: bool, y: &mut [f32]) {
    let _prof = crate::profile::scope(if silu { "group_norm_silu" } else { "group_norm" });
    let (c, hw) = (s.c, s.h * s.w);
    let cpg = c / groups;
    let count = (hw * cpg) as f64;
    for (xi, yi) in x.chunks(hw * c).zip(y.chunks_mut(hw * c)) {
        let sums = channel_sums(xi, c);
        // Per channel: y = x·a + b with a = gamma/σ_g, b = beta − mean_g·a.
        let mut a = vec![0.0f32; c];
        let mut b = vec![0.0f32; c];
        for g in 0..groups {
            let (s1, s2) = sums[g * cpg..(g + 1) * cpg].iter().fold((0.0, 0.0), |t, v| (t.0 + v.0, t.1 + v.1));
            let mean = s1 / count;
            let var = (s2 / count - mean * mean).max(0.0);
            let inv = 1.0 / (var + eps as f64).sqrt();
            for ch in g * cpg..(g + 1) * cpg {
                let ak = gamma[ch] as f64 * inv;
                a[ch] = ak as f32;
                b[ch] = (beta[ch] as f64 - mean * ak) as f32;
            }
        }
        xi.par_chunks(GN_CHUNK_PIXELS * c)
            .zip(yi.par_chunks_mut(GN_CHUNK_PIXELS * c))
            .for_each(|(xc, yc)| scale_shift_silu(xc, &a, &b, silu, yc));
    }
}

/// `y[p, c] += bias[c]`.
pub fn add_channel_bias(y: &mut [f32], bias: &[f32], c: usize) {
    y.par_chunks_mut(GN_CHUNK_PIXELS * c).for_each(|chunk| {
        for row in chunk.chunks_exact_mut(c) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// `y[n, i, j] = x[n, 2i+1, 2j+1]`; see [`VaeOps::subsample2_odd`].
pub fn subsample2_odd(x: &[f32], s: Nhwc, y: &mut [f32]) {
    let (ho, wo, c) = (s.h / 2, s.w / 2, s.c);
    y.par_chunks_mut(wo * c).enumerate().for_each(|(row, out)| {
        let (b, i) = (row / ho, row % ho);
        let src = &x[(b * s.h + 2 * i + 1) * s.w * c..];
        for j in 0..wo {
            out[j * c..(j + 1) * c].copy_from_slice(&src[(2 * j + 1) * c..(2 * j + 2) * c]);
        }
    });
}

/// Single-head softmax attention; see [`VaeOps::dot_attention`]. Blocks of query rows run
/// in parallel: scores `q·kᵀ` (strided views into `qkv`, no gather), softmax, `· v`.
pub fn dot_attention(qkv: &[f32], n: usize, p: usize, c: usize, y: &mut [f32]) {
    let _prof = crate::profile::scope("vae.attention");
    let scale = 1.0 / (c as f32).sqrt();
    let c3 = 3 * c;
    assert!(qkv.len() >= n * p * c3 && y.len() >= n * p * c);
    y.par_chunks_mut(p * c).enumerate().for_each(|(b, yi)| {
        let base = &qkv[b * p * c3..(b + 1) * p * c3];
        yi.par_chunks_mut(ATTN_ROWS * c).enumerate().for_each(|(blk, yb)| {
            let r0 = blk * ATTN_ROWS;
            let rows = yb.len() / c;
            let mut scores = vec![0.0f32; rows * p];
            let q = MatRef { data: &base[r0 * c3..], rs: c3, cs: 1 };
            let kt = MatRef { data: &base[c..], rs: 1, cs: c3 };
            sgemm(rows, p, c, q, kt, &mut scores, false, false);
            for row in scores.chunks_mut(p) {
                softmax_row(row, scale);
            }
            let v = MatRef { data: &base[2 * c..], rs: c3, cs: 1 };
            sgemm(rows, c, p, MatRef::rm(&scores, p), v, yb, false, false);
        });
    });
}

impl VaeOps for Cpu {
    type Chan = Vec<f32>;
    fn upload_chan(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }
    fn plain_weight(&self, w: &[f32], geom: ConvGeom) -> Result<conv::EffWeight> {
        geom.validate("plain_weight")?;
        let mut eff = conv::plain_weight(w, geom.out_ch, geom.in_ch, geom.k);
        if self.bf16_products() {
            conv::add_bf16_products(&mut eff);
        } else {
            // The VAE's layers only run forward: the Winograd form (fewer products, not
            // the direct kernel's bits; EDM2_WINOGRAD=0 keeps the direct kernel).
            conv::add_winograd(&mut eff);
        }
        Ok(eff)
    }
    fn add_channel_bias(&self, y: &mut Vec<f32>, bias: &Vec<f32>, c: usize) -> Result<()> {
        add_channel_bias(y, bias, c);
        Ok(())
    }
    fn group_norm(
        &self,
        x: &Vec<f32>,
        s: Nhwc,
        groups: usize,
        eps: f32,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        silu: bool,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        group_norm(x, s, groups, eps, gamma, beta, silu, y);
        Ok(())
    }
    fn subsample2_odd(&self, x: &Vec<f32>, s: Nhwc, y: &mut Vec<f32>) -> Result<()> {
        subsample2_odd(x, s, y);
        Ok(())
    }
    fn dot_attention(&self, qkv: &Vec<f32>, n: usize, p: usize, c: usize, y: &mut Vec<f32>) -> Result<()> {
        dot_attention(qkv, n, p, c, y);
        Ok(())
    }
}
