//! MP-Conv on the CPU: weight normalization to an effective weight, and 'same'
//! convolutions (1x1 / 3x3, stride 1) and fully connected layers in NHWC as GEMMs.
//!
//! * Effective weight (paper Eq. 47): `w = normalize_rows(W) · gain / sqrt(fan_in)`,
//!   stored `[O, kh, kw, I]` ("OHWI") so that a row matches an im2col patch of an NHWC
//!   image. The parameter itself keeps the official `[O, I, kh, kw]` layout.
//! * 3x3: im2col into `[pixels, 9·I]` then one GEMM with the effective weight seen as
//!   `[9·I, O]`. 1x1 and linear: one GEMM directly on the input.
//! * Backward: `dX = dY · W` (col2im as a gather, no atomics), `dW = dYᵀ · patches`.

use super::{conv3x3, gemm16};
use super::gemm::{sgemm, MatRef};
use super::ops::{norm_denom, normalize_row_backward};
use rayon::prelude::*;

/// The normalized, gain-scaled weight, in OHWI layout or — for 3x3 convolutions that run
/// on the direct kernel — only in that kernel's packed layout (one pass over the stored
/// weight instead of two; it matters for large nets, where these passes are memory-bound).
pub struct EffWeight {
    pub out_ch: usize,
    pub in_ch: usize,
    /// 0 (linear), 1 or 3.
    pub k: usize,
    /// `[O, k, k, I]` (or `[O, I]`); empty when `packed` holds the weight.
    pub w: Vec<f32>,
    /// Per output row `eps + rms(W_row)`.
    pub denom: Vec<f32>,
    pub gain: f32,
    /// 3x3 weights packed for the direct kernel: `[O'/16][9][I][16]`, O' = O, or for a
    /// plain weight with O not a multiple of 16 ([`plain_weight`], forward only) O rounded
    /// up with zero rows.
    pub packed: Option<Vec<f32>>,
    /// The bf16 mode's forward operand ([`add_bf16_products`]): the weight of the 3x3
    /// direct kernel or of the 1x1 GEMM as bf16 pairs over input channels; None in fp32
    /// (and for layers the bf16 kernels do not take, which then run in fp32).
    pub bf16: Option<Vec<u32>>,
    /// A plain 3x3 weight transformed for [`super::winograd`] ([`add_winograd`]: the
    /// VAE's fp32 layers, forward only); when set it is the only form kept.
    pub winograd: Option<Vec<f32>>,
}

impl EffWeight {
    pub fn fan_in(&self) -> usize {
        self.in_ch * self.k.max(1) * self.k.max(1)
    }

    /// The OHWI weight, unpacked from the kernel layout when that is all there is.
    pub fn ohwi(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.packed {
            Some(p) if self.w.is_empty() => {
                let mut w = conv3x3::unpack_forward(p, self.packed_out(), self.in_ch);
                w.truncate(self.out_ch * self.fan_in());
                std::borrow::Cow::Owned(w)
            }
            _ => std::borrow::Cow::Borrowed(&self.w),
        }
    }

    /// Output channels of the packed 3x3 weight (more than `out_ch` when padded).
    pub fn packed_out(&self) -> usize {
        match &self.packed {
            Some(p) => p.len() / (9 * self.in_ch),
            None => self.out_ch,
        }
    }
}

/// Effective weight from the stored parameter `w` (`[O, I, k, k]` or `[O, I]`).
pub fn effective_weight(w: &[f32], out_ch: usize, in_ch: usize, k: usize, gain: f32) -> EffWeight {
    let _prof = crate::profile::scope("weight_norm");
    let fan = in_ch * k.max(1) * k.max(1);
    arrange_weight(w, out_ch, in_ch, k, gain, Some(gain / (fan as f32).sqrt()))
}

/// An ordinary (not magnitude-preserving) convolution's weight `w` (`[O, I, k, k]` or
/// `[O, I]`) in the layout the convolutions read, values unchanged (the VAE's layers).
pub fn plain_weight(w: &[f32], out_ch: usize, in_ch: usize, k: usize) -> EffWeight {
    if k == 3 && conv3x3::available() && out_ch % 16 != 0 {
        // A narrow output (the VAE's RGB conv_out): packed with zero rows up to a multiple
        // of 16, so the direct kernel runs it instead of an im2col of the whole image (a
        // 9·I-wide copy of every pixel: 1.2 GB for 128 channels at 512x512).
        let padded = out_ch.next_multiple_of(16);
        let mut wp = w.to_vec();
        wp.resize(padded * in_ch * 9, 0.0);
        let mut eff = arrange_weight(&wp, padded, in_ch, k, 1.0, None);
        eff.out_ch = out_ch;
        eff.denom.truncate(out_ch);
        return eff;
    }
    arrange_weight(w, out_ch, in_ch, k, 1.0, None)
}

/// Moves a plain 3x3 weight ([`plain_weight`]) to the Winograd form where
/// [`super::winograd::takes`] its widths: the forward then runs there, and the direct
/// kernel's packing is dropped (a layer keeps one form of its weight). For layers that
/// only run forward (the VAE's); fp32 only (the bf16 mode's operands come first).
pub fn add_winograd(eff: &mut EffWeight) {
    if eff.k != 3 || eff.bf16.is_some() || eff.packed_out() != eff.out_ch || !super::winograd::takes(eff.in_ch, eff.out_ch) {
        return;
    }
    let u = super::winograd::transform_weight(&eff.ohwi(), eff.out_ch, eff.in_ch);
    eff.winograd = Some(u);
    eff.packed = None;
    eff.w = Vec::new();
}

/// `w` rearranged from OIHW into the conv layout; with `normalize = Some(scale)` each row
/// becomes `(row / (eps + rms(row)))·scale` (paper Eq. 47), with None it is copied as is.
fn arrange_weight(w: &[f32], out_ch: usize, in_ch: usize, k: usize, gain: f32, normalize: Option<f32>) -> EffWeight {
    let kk = k.max(1) * k.max(1);
    let fan = in_ch * kk;
    assert_eq!(w.len(), out_ch * fan);
    // Without normalization the denominator and the scale are 1: `(v / 1)·1` is `v` exactly.
    let scale_g = normalize.unwrap_or(1.0);
    let denom_of = |row: &[f32]| if normalize.is_some() { norm_denom(row) } else { 1.0 };
    let mut denom = vec![0.0f32; out_ch];
    if k == 3 && conv3x3::available() && out_ch % 16 == 0 {
        // Straight into the packed layout [O/16][9][I][16].
        let mut packed = vec![0.0f32; w.len()];
        packed.par_chunks_mut(16 * fan).zip(denom.par_chunks_mut(16)).enumerate().for_each(|(ob, (dst, dens))| {
            let rows = &w[ob * 16 * fan..(ob + 1) * 16 * fan];
            for (j, d) in dens.iter_mut().enumerate() {
                *d = denom_of(&rows[j * fan..(j + 1) * fan]);
            }
            // Each packed row of 16 written whole (the 16 source rows are read as 16
            // streams): a strided store per element cost twice as much on big layers.
            for ci in 0..in_ch {
                for tap in 0..9 {
                    let out = &mut dst[(tap * in_ch + ci) * 16..(tap * in_ch + ci + 1) * 16];
                    for (j, v) in out.iter_mut().enumerate() {
                        // Same operation order as the official code: normalize, then scale.
                        *v = (rows[j * fan + ci * 9 + tap] / dens[j]) * scale_g;
                    }
                }
            }
        });
        return EffWeight { out_ch, in_ch, k, w: Vec::new(), denom, gain, packed: Some(packed), bf16: None, winograd: None };
    }
    let mut eff = vec![0.0f32; w.len()];
    eff.par_chunks_mut(fan).zip(denom.par_iter_mut()).enumerate().for_each(|(o, (row, d))| {
        let src = &w[o * fan..(o + 1) * fan];
        *d = denom_of(src);
        for ci in 0..in_ch {
            for tap in 0..kk {
                // Same operation order as the official code: normalize, then scale.
                row[tap * in_ch + ci] = (src[ci * kk + tap] / *d) * scale_g;
            }
        }
    });
    EffWeight { out_ch, in_ch, k, w: eff, denom, gain, packed: None, bf16: None, winograd: None }
}

/// Switches `eff` to bf16 products ([`super::bf16`]) where a bf16 kernel takes the layer:
/// 3x3 convolutions on the direct kernel and 1x1 convolutions on [`gemm16`], with an even
/// number of input channels (pairs). Other layers (linear, narrow outputs, the 5-channel
/// input of a latent network) stay fp32.
pub fn add_bf16_products(eff: &mut EffWeight) {
    let _prof = crate::profile::scope("weight_norm.bf16");
    let (o, i) = (eff.out_ch, eff.in_ch);
    if !super::bf16::available() || i % 2 != 0 {
        return;
    }
    if eff.k == 3 && eff.packed.is_none() && super::amx::available() {
        // The tiles take a narrow output too (the 3-channel out_conv): the direct
        // kernel's packing, its columns past `o` zero (so `packed_out` is o rounded up
        // to 16; `w` stays for the fp32 paths).
        let po = o.div_ceil(16) * 16;
        let mut p = vec![0.0f32; po * 9 * i];
        for (j, row) in eff.w.chunks_exact(9 * i).enumerate() {
            for (t, ci) in (0..9 * i).map(|e| (e / i, e % i)) {
                p[((j / 16 * 9 + t) * i + ci) * 16 + j % 16] = row[t * i + ci];
            }
        }
        eff.packed = Some(p);
    }
    // The AMX tiles take the same panels with K padded to their 32-element steps.
    let pairs = |p: &[f32]| if super::amx::available() { super::amx::pack_weight(p, i) } else { super::bf16::pack_pairs(p, i) };
    eff.bf16 = match (eff.k, &eff.packed) {
        // The tiles also take a narrow output (the 3-channel out_conv), on its 16-wide packing.
        (3, Some(p)) if eff.packed_out() == o || super::amx::available() => Some(pairs(p)),
        (1, _) if gemm16::usable(o) => Some(pairs(&gemm16::pack_b_t(&eff.w, i, o))),
        _ => None,
    };
}

/// Whether the backward of a bf16 layer can run its weight gradient on the direct
/// kernel's bf16 form (the same shapes as the fp32 direct kernel).
fn direct_weight_grad(n: usize, h: usize, w: usize, i: usize, o: usize) -> bool {
    // The direct kernel wins when the pixel reduction is long relative to the channel
    // counts; with few pixels per weight (e.g. 8x8 at batch 4 with 512+ channels: 55–98
    // vs 169–173 GFLOP/s) im2col + GEMM wins (measured on Zen 2, docs/perf.md). At 32→32
    // and 64→64 with 4k–64k pixels the direct kernel is 1–2% faster per training step
    // (cpu-fmnist b64: 1072 → 1055 ms; cpu-s32 b32: 2629 → 2598 ms, medians of
    // interleaved runs), so only tiny channel counts use im2col.
    let pixels = n * h * w;
    o % 16 == 0 && pixels >= 4 * (i + o) && i + o >= 64
}

/// Backward of [`effective_weight`]: from `d_eff` (OHWI) to the gradient of the stored
/// parameter (OIHW, written into `dw`) and of the gain (returned).
pub fn effective_weight_backward(w: &[f32], eff: &EffWeight, d_eff: &[f32], dw: &mut [f32]) -> f32 {
    let _prof = crate::profile::scope("weight_norm.bwd");
    let kk = eff.k.max(1) * eff.k.max(1);
    let fan = eff.fan_in();
    let inv_sqrt_fan = 1.0 / (fan as f32).sqrt();
    let scale_g = eff.gain * inv_sqrt_fan;
    // dgain = Σ d_eff · normalize(W) / sqrt(fan), reduced per row then rows in order.
    let mut row_dgain = vec![0.0f64; eff.out_ch];
    dw.par_chunks_mut(fan).zip(row_dgain.par_iter_mut()).enumerate().for_each(|(o, (dwr, dg))| {
        let src = &w[o * fan..(o + 1) * fan];
        let d = eff.denom[o];
        // d_eff row back to OIHW order.
        let mut g_oihw = vec![0.0f32; fan];
        let drow = &d_eff[o * fan..(o + 1) * fan];
        for ci in 0..eff.in_ch {
            for tap in 0..kk {
                g_oihw[ci * kk + tap] = drow[tap * eff.in_ch + ci];
            }
        }
        let dn: Vec<f32> = g_oihw.iter().map(|g| g * scale_g).collect();
        *dg = super::ops::dot_f64(&g_oihw, src) / d as f64 * inv_sqrt_fan as f64;
        normalize_row_backward(src, d, &dn, dwr);
    });
    row_dgain.iter().sum::<f64>() as f32
}

/// im2col for a 3x3 'same' convolution: `patches[p, tap·C + c]`.
pub fn im2col3(x: &[f32], n: usize, h: usize, w: usize, c: usize, patches: &mut [f32]) {
    im2col3_rows(x, h, w, c, 0, n * h, patches);
}

/// im2col of the image rows `r0..r1` (a row = one `y` of one image, `b·h + y`), into
/// `patches[(row − r0)·w + x, tap·C + c]`.
pub fn im2col3_rows(x: &[f32], h: usize, w: usize, c: usize, r0: usize, r1: usize, patches: &mut [f32]) {
    let _prof = crate::profile::scope("im2col");
    let kdim = 9 * c;
    patches[..(r1 - r0) * w * kdim].par_chunks_mut(w * kdim).enumerate().for_each(|(i, pr)| {
        let row = r0 + i;
        let (b, y) = (row / h, row % h);
        for xx in 0..w {
            let dst = &mut pr[xx * kdim..(xx + 1) * kdim];
            for ky in 0..3 {
                let sy = y as isize + ky as isize - 1;
                for kx in 0..3 {
                    let sx = xx as isize + kx as isize - 1;
                    let tap = ky * 3 + kx;
                    let d = &mut dst[tap * c..(tap + 1) * c];
                    if sy < 0 || sy >= h as isize || sx < 0 || sx >= w as isize {
                        d.fill(0.0);
                    } else {
                        let s = ((b * h + sy as usize) * w + sx as usize) * c;
                        d.copy_from_slice(&x[s..s + c]);
                    }
                }
            }
        }
    });
}

/// col2im as a gather: `dx[b, y, x, c] = Σ_taps dpatches[(b, y−ky+1, x−kx+1), tap·C + c]`.
pub fn col2im3(dpatches: &[f32], n: usize, h: usize, w: usize, c: usize, dx: &mut [f32]) {
    let _prof = crate::profile::scope("col2im");
    let kdim = 9 * c;
    dx.par_chunks_mut(w * c).enumerate().for_each(|(row, dr)| {
        let (b, y) = (row / h, row % h);
        let _ = n;
        dr.fill(0.0);
        for xx in 0..w {
            let d = &mut dr[xx * c..(xx + 1) * c];
            for ky in 0..3 {
                let py = y as isize - ky as isize + 1;
                if py < 0 || py >= h as isize {
                    continue;
                }
                for kx in 0..3 {
                    let px = xx as isize - kx as isize + 1;
                    if px < 0 || px >= w as isize {
                        continue;
                    }
                    let tap = ky * 3 + kx;
                    let s = ((b * h + py as usize) * w + px as usize) * kdim + tap * c;
                    for (o, &v) in d.iter_mut().zip(&dpatches[s..s + c]) {
                        *o += v;
                    }
                }
            }
        }
    });
}

/// Forward of an MP-Conv / MP-Linear on NHWC input `x` with `pixels` = N·H·W rows
/// (or N for linear). For k = 3 the spatial shape `(n, h, w)` is needed.
pub fn conv_forward(eff: &EffWeight, x: &[f32], n: usize, h: usize, w: usize, y: &mut [f32]) {
    let pixels = n * h * w;
    let (o, i) = (eff.out_ch, eff.in_ch);
    if let Some(wb) = &eff.bf16 {
        if super::amx::available() {
            let po = eff.packed_out();
            if eff.k == 1 {
                super::amx::conv1x1(x, pixels, i, wb, o, y);
            } else if po == o {
                super::amx::conv3x3(x, n, h, w, i, wb, o, y);
            } else {
                // A narrow output: into the packing's 16-wide buffer, then its first `o`.
                let mut wide = super::zeroed(pixels * po);
                super::amx::conv3x3(x, n, h, w, i, wb, po, &mut wide);
                y.par_chunks_mut(o).zip(wide.par_chunks(po)).for_each(|(d, s)| d.copy_from_slice(&s[..o]));
            }
            return;
        }
        // bf16 products (`add_bf16_products` chose the layer): the input as channel pairs.
        let xb = super::bf16::to_bf16_pairs(x);
        if eff.k == 1 {
            let _prof = crate::profile::scope("conv1x1.gemm16.bf16");
            gemm16::gemm16_bf16(pixels, o, i / 2, &xb, i / 2, wb, y, o, true);
        } else {
            let _prof = crate::profile::scope("conv3x3.direct.bf16");
            conv3x3::conv3x3_direct_bf16(&xb, n, h, w, i, wb, o, y);
        }
        return;
    }
    if let Some(u) = &eff.winograd {
        let _prof = crate::profile::scope("conv3x3.winograd");
        super::winograd::conv3x3(x, n, h, w, i, u, o, y);
        return;
    }
    match eff.k {
        1 if gemm16::usable(o) => {
            let _prof = crate::profile::scope("conv1x1.gemm16");
            let bp = gemm16::pack_b_t(&eff.w, i, o);
            gemm16::gemm16(pixels, o, i, x, i, &bp, y, o, true);
        }
        0 | 1 => {
            // Linear layers and narrow 1x1 convs: row-wise dot products, so a sample's
            // output does not depend on the batch size (the `gemm` crate's blocking does).
            let _prof = crate::profile::scope(if eff.k == 0 { "linear" } else { "conv1x1.rowdot" });
            super::ops::rowdot_matmul(x, i, &eff.w, o, y);
        }
        3 if eff.packed.is_some() && eff.packed_out() == o => {
            let _prof = crate::profile::scope("conv3x3.direct");
            conv3x3::conv3x3_direct(x, n, h, w, i, eff.packed.as_ref().unwrap(), o, y);
        }
        3 if eff.packed.is_some() => {
            // Padded output channels: into a wider buffer, then the first `o` of each pixel.
            let _prof = crate::profile::scope("conv3x3.direct_padded");
            let po = eff.packed_out();
            let mut wide = vec![0.0f32; pixels * po];
            conv3x3::conv3x3_direct(x, n, h, w, i, eff.packed.as_ref().unwrap(), po, &mut wide);
            y.par_chunks_mut(o).zip(wide.par_chunks(po)).for_each(|(d, s)| d.copy_from_slice(&s[..o]));
        }
        3 => {
            // Output widths the direct kernel does not take (e.g. the 3-channel out_conv):
            // im2col per image and row-wise dot products (batch-size independent).
            let kdim = 9 * i;
            let w_ohwi = eff.ohwi();
            let mut patches = vec![0.0f32; h * w * kdim];
            for b in 0..n {
                im2col3_rows(x, h, w, i, b * h, (b + 1) * h, &mut patches);
                let _prof = crate::profile::scope("conv3x3.rowdot");
                super::ops::rowdot_matmul(&patches, kdim, &w_ohwi, o, &mut y[b * h * w * o..(b + 1) * h * w * o]);
            }
        }
        k => panic!("unsupported kernel size {k}"),
    }
}

/// Backward of [`conv_forward`]: `dx` (if requested) and `d_eff` (OHWI, overwritten).
pub fn conv_backward(
    eff: &EffWeight,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    d_eff: &mut [f32],
) {
    let pixels = n * h * w;
    let (o, i) = (eff.out_ch, eff.in_ch);
    // Only forward-only layers (the VAE's) are moved to the Winograd form.
    assert!(eff.winograd.is_none(), "conv_backward of a Winograd-form weight");
    if eff.bf16.is_some() && conv_backward_bf16(eff, x, n, h, w, dy, dx.as_deref_mut(), d_eff) {
        return;
    }
    match eff.k {
        1 if gemm16::usable(o) => {
            {
                let _prof = crate::profile::scope("conv1x1.bwd_w.direct");
                conv3x3::conv_weight_grad(1, x, n, h, w, i, dy, o, d_eff);
            }
            if let Some(dx) = dx {
                if gemm16::usable(i) {
                    let _prof = crate::profile::scope("conv1x1.bwd_x.gemm16");
                    let bp = gemm16::pack_b_rm(&eff.w, o, i);
                    gemm16::gemm16(pixels, i, o, dy, o, &bp, dx, i, true);
                } else {
                    let _prof = crate::profile::scope("conv1x1.bwd_x.gemm");
                    sgemm(pixels, i, o, MatRef::rm(dy, o), MatRef::rm(&eff.w, i), dx, false, true);
                }
            }
        }
        0 | 1 => {
            let _prof = crate::profile::scope(if eff.k == 0 { "linear.bwd.gemm" } else { "conv1x1.bwd.gemm" });
            // dW[o, i] = Σ_p dY[p, o] X[p, i]
            sgemm(o, i, pixels, MatRef::rm_t(dy, o), MatRef::rm(x, i), d_eff, false, true);
            if let Some(dx) = dx {
                sgemm(pixels, i, o, MatRef::rm(dy, o), MatRef::rm(&eff.w, i), dx, false, true);
            }
        }
        3 if eff.packed.is_some() && eff.packed_out() == o && i % 16 == 0 => {
            if direct_weight_grad(n, h, w, i, o) {
                let _prof = crate::profile::scope("conv3x3.bwd_w.direct");
                conv3x3::conv_weight_grad(3, x, n, h, w, i, dy, o, d_eff);
            } else {
                conv3x3_weight_grad_im2col(x, n, h, w, i, dy, o, d_eff);
            }
            if let Some(dx) = dx {
                let packed = conv3x3::pack_backward_from_forward(eff.packed.as_ref().unwrap(), o, i);
                let _prof = crate::profile::scope("conv3x3.bwd_x.direct");
                conv3x3::conv3x3_direct(dy, n, h, w, o, &packed, i, dx);
            }
        }
        3 => {
            // Row-chunked im2col keeps the patches in cache (a whole-batch im2col of the
            // 32→1 output conv at 64x32x32 is 75 MB).
            conv3x3_weight_grad_im2col(x, n, h, w, i, dy, o, d_eff);
            if let Some(dx) = dx {
                let w_ohwi = eff.ohwi();
                if o < 16 {
                    let _prof = crate::profile::scope("conv3x3.bwd_x.narrow");
                    conv3x3_narrow_dx(dy, n, h, w, o, &w_ohwi, i, dx);
                } else {
                    let _prof = crate::profile::scope("conv3x3.bwd_x.gemm");
                    let kdim = 9 * i;
                    let mut patches = vec![0.0f32; pixels * kdim];
                    sgemm(pixels, kdim, o, MatRef::rm(dy, o), MatRef::rm(&w_ohwi, kdim), &mut patches, false, true);
                    col2im3(&patches, n, h, w, i, dx);
                }
            }
        }
        k => panic!("unsupported kernel size {k}"),
    }
}

/// [`conv_backward`] of a layer in bf16 products where its shapes allow the bf16 kernels
/// (false, having done nothing, where they do not: the fp32 path runs instead). The
/// weight gradient reduces over pixels of image pairs, the data gradient over output
/// channel pairs.
#[allow(clippy::too_many_arguments)]
fn conv_backward_bf16(eff: &EffWeight, x: &[f32], n: usize, h: usize, w: usize, dy: &[f32], dx: Option<&mut [f32]>, d_eff: &mut [f32]) -> bool {
    use super::bf16::{interleave_images, pack_pairs, pairs_and_interleave};
    let (o, i, k) = (eff.out_ch, eff.in_ch, eff.k);
    if super::amx::available() {
        // The tiles take any layer `add_bf16_products` chose (output channels in 16s, input
        // channels even), given a data gradient's outputs in 16s too.
        if dx.is_some() && i % 16 != 0 {
            return false;
        }
        // A narrow output (3x3 only): its gradient widened to the packing's 16 channels
        // with zeros, whose weight-gradient rows are then dropped.
        let po = eff.packed_out();
        let wide_dy;
        let dy = if po == o {
            dy
        } else {
            wide_dy = widen_channels(dy, o, po);
            &wide_dy
        };
        if po == o {
            super::amx::weight_grad(k, x, n, h, w, i, dy, o, d_eff);
        } else {
            let taps = k * k;
            let mut wide = super::zeroed(po * taps * i);
            super::amx::weight_grad(k, x, n, h, w, i, dy, po, &mut wide);
            d_eff.copy_from_slice(&wide[..o * taps * i]);
        }
        if let Some(dx) = dx {
            let _prof = crate::profile::scope(if k == 1 { "conv1x1.bwd_x.amx" } else { "conv3x3.bwd_x.amx" });
            if k == 1 {
                let bp = super::amx::pack_weight(&gemm16::pack_b_rm(&eff.w, o, i), o);
                super::amx::conv1x1(dy, n * h * w, o, &bp, i, dx);
            } else {
                let bp = super::amx::pack_weight(&conv3x3::pack_backward_from_forward(eff.packed.as_ref().unwrap(), po, i), po);
                super::amx::conv3x3(dy, n, h, w, po, &bp, i, dx);
            }
        }
        return true;
    }
    let ok = match k {
        1 => gemm16::usable(o) && (dx.is_none() || gemm16::usable(i)),
        3 => i % 16 == 0 && direct_weight_grad(n, h, w, i, o),
        _ => false,
    };
    if !ok {
        return false;
    }
    // dy in both bf16 forms from one pass when both gradients are wanted.
    let (dyb, dyi) = match dx {
        Some(_) => {
            let (p, i) = pairs_and_interleave(dy, n, h * w * o);
            (Some(p), i)
        }
        None => (None, interleave_images(dy, n, h * w * o)),
    };
    {
        let _prof = crate::profile::scope(if k == 1 { "conv1x1.bwd_w.bf16" } else { "conv3x3.bwd_w.bf16" });
        let xi = interleave_images(x, n, h * w * i);
        conv3x3::conv_weight_grad_bf16(k, &xi, n.div_ceil(2), h, w, i, &dyi, o, d_eff);
    }
    if let (Some(dx), Some(dyb)) = (dx, dyb) {
        if k == 1 {
            let _prof = crate::profile::scope("conv1x1.bwd_x.bf16");
            let bp = pack_pairs(&gemm16::pack_b_rm(&eff.w, o, i), o);
            gemm16::gemm16_bf16(n * h * w, i, o / 2, &dyb, o / 2, &bp, dx, i, true);
        } else {
            let _prof = crate::profile::scope("conv3x3.bwd_x.bf16");
            let packed = pack_pairs(&conv3x3::pack_backward_from_forward(eff.packed.as_ref().unwrap(), o, i), o);
            conv3x3::conv3x3_direct_bf16(&dyb, n, h, w, o, &packed, i, dx);
        }
    }
    true
}

/// `x` (rows of `c` channels) with each row widened to `wide` channels, zero beyond `c`.
fn widen_channels(x: &[f32], c: usize, wide: usize) -> Vec<f32> {
    let mut out = super::zeroed(x.len() / c * wide);
    out.par_chunks_mut(wide).zip(x.par_chunks(c)).for_each(|(d, s)| d[..c].copy_from_slice(s));
    out
}

/// Data gradient of a 3x3 conv with few output channels (the output conv):
/// `dx[q, ci] = Σ_tap Σ_o dy[q − off(tap), o] · w[o, tap, ci]`, one dx row per task (no
/// patch matrix; deterministic). `w_ohwi` is `[o, 3, 3, i]`.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_narrow_dx(dy: &[f32], n: usize, h: usize, w: usize, o: usize, w_ohwi: &[f32], i: usize, dx: &mut [f32]) {
    dx[..n * h * w * i].par_chunks_mut(w * i).enumerate().for_each(|(row, dr)| {
        let (b, y) = (row / h, row % h);
        dr.fill(0.0);
        for ky in 0..3 {
            // dx row y receives dy row y + 1 − ky through tap row ky.
            let sy = y as isize + 1 - ky as isize;
            if sy < 0 || sy >= h as isize {
                continue;
            }
            let dyr = &dy[(b * h + sy as usize) * w * o..(b * h + sy as usize + 1) * w * o];
            for xx in 0..w {
                let d = &mut dr[xx * i..(xx + 1) * i];
                for kx in 0..3 {
                    let sx = xx as isize + 1 - kx as isize;
                    if sx < 0 || sx >= w as isize {
                        continue;
                    }
                    for oc in 0..o {
                        let tap = (oc * 3 + ky) * 3 + kx;
                        super::ops::axpby_kernel(d, &w_ohwi[tap * i..(tap + 1) * i], 1.0, dyr[sx as usize * o + oc]);
                    }
                }
            }
        }
    });
}

/// Weight gradient of a 3x3 conv, `d_eff[o, tap, ci] = Σ_p dy[p, o] · patch[p, tap·C + ci]`,
/// as GEMMs over chunks of whole image rows (~2048 pixels) whose im2col stays in cache;
/// chunks accumulate in a fixed order (deterministic).
pub fn conv3x3_weight_grad_im2col(x: &[f32], n: usize, h: usize, w: usize, cin: usize, dy: &[f32], cout: usize, d_eff: &mut [f32]) {
    let kdim = 9 * cin;
    let rows_per_chunk = (2048 / w).max(1).min(n * h);
    let mut patches = vec![0.0f32; rows_per_chunk * w * kdim];
    let mut r0 = 0;
    while r0 < n * h {
        let r1 = (r0 + rows_per_chunk).min(n * h);
        im2col3_rows(x, h, w, cin, r0, r1, &mut patches);
        let pc = (r1 - r0) * w;
        let _prof = crate::profile::scope("conv3x3.bwd_w.gemm");
        sgemm(cout, kdim, pc, MatRef { data: &dy[r0 * w * cout..], rs: 1, cs: cout }, MatRef::rm(&patches, kdim), d_eff, r0 > 0, true);
        r0 = r1;
    }
}
