//! Elementwise and small reduction ops of the magnitude-preserving network, forward and
//! backward, on NHWC buffers. Each reduction runs over a fixed slice in a fixed order, so
//! results do not depend on how rayon schedules the work.

use rayon::prelude::*;

/// Elements per parallel task for purely elementwise loops.
const CHUNK: usize = 1 << 14;

/// `normalize` eps (DESIGN.md §1): added to the RMS, not to the norm.
pub const NORM_EPS: f32 = 1e-4;

/// MP-SiLU divisor (paper Eq. 81): silu(x) has RMS ≈ 0.596 for x ~ N(0, 1).
pub const MP_SILU_SCALE: f32 = 0.596;

/// `exp(x)` in f32 without a libm call, so loops over it vectorize (AVX2: 8 lanes).
/// Range reduction `x = k·ln2 + r` (|r| ≤ ln2/2, ln2 split in two for exactness), a
/// degree-6 polynomial for `e^r` (the Cephes `expf` coefficients), then `2^k` through
/// the exponent bits. Max error ≈ 1 ulp against the correctly rounded value on
/// [−87, 88] (tested in `tests/ops_parity.rs`); saturates to 0 / +inf outside.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_375;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round-to-nearest via the 1.5·2^23 trick (vectorizes, unlike f32::round).
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.336_54, 88.722_83);
    let t = xc * LOG2E + SHIFTER;
    // k as an integer from the bits of t (t = 1.5·2^23 + k exactly), not `as i32`,
    // whose saturating semantics compile to scalar code.
    let ki = (t.to_bits() as i32) - 0x4B40_0000;
    let k = t - SHIFTER;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r
        + 0.5;
    let er = p * r2 + r + 1.0;
    // 2^k as two factors so that k = 128 (and the smallest k) stay representable.
    let k1 = ki >> 1;
    let s1 = f32::from_bits(((k1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((ki - k1 + 127) as u32) << 23);
    let y = er * s1 * s2;
    let y = if x > 88.722_83 { f32::INFINITY } else { y };
    if x < -87.336_54 {
        0.0
    } else {
        y
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// The denominator of `normalize` for one row: `eps + ||x|| / sqrt(len)`, accumulated in
/// f64 (the official code accumulates in f32; f64 is closer to the exact value).
#[inline]
pub fn norm_denom(x: &[f32]) -> f32 {
    let ss = dot_f64(x, x);
    let rms = (ss.sqrt() * (1.0 / x.len() as f64).sqrt()) as f32;
    NORM_EPS + rms
}

crate::multiversion! {
    /// `Σ a·b` accumulated in f64 over 4 interleaved lanes combined in a fixed order
    /// (vectorizes; the same bits on every run).
    pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
        let mut acc = [0.0f64; 4];
        let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for j in 0..4 {
                acc[j] += x[j] as f64 * y[j] as f64;
            }
        }
        for (j, (x, y)) in ra.iter().zip(rb).enumerate() {
            acc[j] += *x as f64 * *y as f64;
        }
        (acc[0] + acc[1]) + (acc[2] + acc[3])
    }
}

/// Backward of `y = x / (eps + ||x||/sqrt(K))` for one row, given `d` = the denominator:
/// `dx = dy/d − x · (Σ dy·x) / (d² · sqrt(K) · ||x||)`; at `x = 0` the norm's subgradient
/// is zero (as in torch), leaving `dy/d`.
#[inline]
pub fn normalize_row_backward(x: &[f32], d: f32, dy: &[f32], dx: &mut [f32]) {
    let k = x.len() as f64;
    let ss = dot_f64(x, x);
    let dot = dot_f64(x, dy);
    let norm = ss.sqrt();
    let coef = if norm > 0.0 { (dot / ((d as f64) * (d as f64) * k.sqrt() * norm)) as f32 } else { 0.0 };
    let inv = 1.0 / d;
    for i in 0..x.len() {
        dx[i] = dy[i] * inv - x[i] * coef;
    }
}

/// Normalize each contiguous row of length `k` (pixel norm over C in NHWC; MPConv rows).
pub fn normalize_rows(x: &[f32], k: usize, y: &mut [f32]) {
    let _prof = crate::profile::scope("normalize_rows");
    y.par_chunks_mut(k * 256).zip(x.par_chunks(k * 256)).for_each(|(yc, xc)| {
        for (yr, xr) in yc.chunks_mut(k).zip(xc.chunks(k)) {
            let inv = 1.0 / norm_denom(xr);
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = v * inv;
            }
        }
    });
}

/// [`normalize_rows`] in place (forced weight normalization of a stored weight).
pub fn normalize_rows_inplace(x: &mut [f32], k: usize) {
    let _prof = crate::profile::scope("normalize_rows");
    x.par_chunks_mut(k * 16).for_each(|c| {
        for r in c.chunks_mut(k) {
            let inv = 1.0 / norm_denom(r);
            r.iter_mut().for_each(|v| *v *= inv);
        }
    });
}

pub fn normalize_rows_backward(x: &[f32], k: usize, dy: &[f32], dx: &mut [f32]) {
    let _prof = crate::profile::scope("normalize_rows.bwd");
    dx.par_chunks_mut(k * 256).zip(x.par_chunks(k * 256)).zip(dy.par_chunks(k * 256)).for_each(
        |((dxc, xc), dyc)| {
            for ((dxr, xr), dyr) in dxc.chunks_mut(k).zip(xc.chunks(k)).zip(dyc.chunks(k)) {
                normalize_row_backward(xr, norm_denom(xr), dyr, dxr);
            }
        },
    );
}

#[inline]
pub fn mp_silu_scalar(x: f32) -> f32 {
    x * sigmoid(x) / MP_SILU_SCALE
}

#[inline]
pub fn mp_silu_grad_scalar(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s)) / MP_SILU_SCALE
}

crate::multiversion_wide! {
    fn mp_silu_kernel(xc: &[f32], yc: &mut [f32]) {
        for (o, &v) in yc.iter_mut().zip(xc) {
            *o = mp_silu_scalar(v);
        }
    }
}

pub fn mp_silu(x: &[f32], y: &mut [f32]) {
    let _prof = crate::profile::scope("mp_silu");
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(yc, xc)| mp_silu_kernel(xc, yc));
}

/// `dx = dy · mp_silu'(x)`.
pub fn mp_silu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let _prof = crate::profile::scope("mp_silu.bwd");
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)).for_each(|((dc, xc), gc)| mp_silu_bwd_kernel(xc, gc, dc));
}

crate::multiversion_wide! {
    fn mp_silu_bwd_kernel(xc: &[f32], gc: &[f32], dc: &mut [f32]) {
        for ((o, &v), &g) in dc.iter_mut().zip(xc).zip(gc) {
            *o = g * mp_silu_grad_scalar(v);
        }
    }
}

/// Coefficients of MP-sum (paper Eq. 88): `y = wa·a + wb·b`.
pub fn mp_sum_coefs(t: f32) -> (f32, f32) {
    let s = ((1.0 - t) * (1.0 - t) + t * t).sqrt();
    ((1.0 - t) / s, t / s)
}

/// `a ← mp_sum(a, b, t)` in place.
pub fn mp_sum_inplace(a: &mut [f32], b: &[f32], t: f32) {
    let (wa, wb) = mp_sum_coefs(t);
    axpby(a, b, wa, wb);
}

/// Coefficients of MP-cat (paper Eq. 103): `[ka·a, kb·b]`.
pub fn mp_cat_coefs(na: usize, nb: usize, t: f32) -> (f32, f32) {
    let c = (((na + nb) as f64) / (((1.0 - t) * (1.0 - t) + t * t) as f64)).sqrt();
    ((c / (na as f64).sqrt() * (1.0 - t) as f64) as f32, (c / (nb as f64).sqrt() * t as f64) as f32)
}

/// MP-cat along channels of NHWC tensors with `pixels` pixels.
pub fn mp_cat(a: &[f32], na: usize, b: &[f32], nb: usize, t: f32, out: &mut [f32]) {
    let _prof = crate::profile::scope("mp_cat");
    let (ka, kb) = mp_cat_coefs(na, nb, t);
    let nc = na + nb;
    if na == 0 || nb == 0 {
        // One side empty: a scaled copy of the other.
        let (k, src) = if na == 0 { (kb, b) } else { (ka, a) };
        out.iter_mut().zip(src).for_each(|(o, &v)| *o = k * v);
        return;
    }
    // Tasks of 64 pixels; zipped rows (no indexing) so the scaling loops vectorize.
    out.par_chunks_mut(nc * 64).zip(a.par_chunks(na * 64)).zip(b.par_chunks(nb * 64)).for_each(|((oc, ac), bc)| {
        for ((row, ar), br) in oc.chunks_exact_mut(nc).zip(ac.chunks_exact(na)).zip(bc.chunks_exact(nb)) {
            let (ra, rb) = row.split_at_mut(na);
            for (o, &v) in ra.iter_mut().zip(ar) {
                *o = ka * v;
            }
            for (o, &v) in rb.iter_mut().zip(br) {
                *o = kb * v;
            }
        }
    });
}

/// Backward of [`mp_cat`]: each half of `dout`'s channels scaled back into `da` / `db`
/// (overwritten). In parallel over tasks of 64 pixels (it ran on one thread before: 13 ms
/// of a cpu-s32 step with the other worker idle).
pub fn mp_cat_backward(dout: &[f32], na: usize, nb: usize, t: f32, da: &mut [f32], db: &mut [f32]) {
    let _prof = crate::profile::scope("mp_cat.bwd");
    let (ka, kb) = mp_cat_coefs(na, nb, t);
    let nc = na + nb;
    if na == 0 || nb == 0 {
        let (k, dst) = if na == 0 { (kb, db) } else { (ka, da) };
        dst.iter_mut().zip(dout).for_each(|(o, &v)| *o = k * v);
        return;
    }
    dout.par_chunks(nc * 64).zip(da.par_chunks_mut(na * 64)).zip(db.par_chunks_mut(nb * 64)).for_each(|((dc, ac), bc)| {
        for ((row, ar), br) in dc.chunks_exact(nc).zip(ac.chunks_exact_mut(na)).zip(bc.chunks_exact_mut(nb)) {
            let (ra, rb) = row.split_at(na);
            for (o, &v) in ar.iter_mut().zip(ra) {
                *o = ka * v;
            }
            for (o, &v) in br.iter_mut().zip(rb) {
                *o = kb * v;
            }
        }
    });
}

/// 2x2 average pooling, stride 2, NHWC `[n, h, w, c]` → `[n, h/2, w/2, c]`.
pub fn downsample2(x: &[f32], n: usize, h: usize, w: usize, c: usize, y: &mut [f32]) {
    let _prof = crate::profile::scope("resample");
    let (ho, wo) = (h / 2, w / 2);
    y.par_chunks_mut(wo * c).enumerate().for_each(|(row, yr)| {
        let (b, oy) = (row / ho, row % ho);
        for ox in 0..wo {
            for ch in 0..c {
                let at = |dy: usize, dx: usize| x[((b * h + 2 * oy + dy) * w + 2 * ox + dx) * c + ch];
                yr[ox * c + ch] = (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) * 0.25;
            }
        }
    });
    let _ = n;
}

pub fn downsample2_backward(dy: &[f32], n: usize, h: usize, w: usize, c: usize, dx: &mut [f32]) {
    let _prof = crate::profile::scope("resample.bwd");
    let (ho, wo) = (h / 2, w / 2);
    dx.par_chunks_mut(w * c).enumerate().for_each(|(row, dr)| {
        let (b, iy) = (row / h, row % h);
        for ix in 0..w {
            for ch in 0..c {
                dr[ix * c + ch] = 0.25 * dy[((b * ho + iy / 2) * wo + ix / 2) * c + ch];
            }
        }
    });
    let _ = n;
}

/// 2x nearest-neighbour upsampling, NHWC `[n, h, w, c]` → `[n, 2h, 2w, c]`.
pub fn upsample2(x: &[f32], n: usize, h: usize, w: usize, c: usize, y: &mut [f32]) {
    let _prof = crate::profile::scope("resample");
    let (ho, wo) = (2 * h, 2 * w);
    y.par_chunks_mut(wo * c).enumerate().for_each(|(row, yr)| {
        let (b, oy) = (row / ho, row % ho);
        for ox in 0..wo {
            let src = ((b * h + oy / 2) * w + ox / 2) * c;
            yr[ox * c..(ox + 1) * c].copy_from_slice(&x[src..src + c]);
        }
    });
    let _ = n;
}

pub fn upsample2_backward(dy: &[f32], n: usize, h: usize, w: usize, c: usize, dx: &mut [f32]) {
    let _prof = crate::profile::scope("resample.bwd");
    let wo = 2 * w;
    dx.par_chunks_mut(w * c).enumerate().for_each(|(row, dr)| {
        let (b, iy) = (row / h, row % h);
        for ix in 0..w {
            for ch in 0..c {
                let at = |dy_: usize, dx_: usize| dy[((b * 2 * h + 2 * iy + dy_) * wo + 2 * ix + dx_) * c + ch];
                dr[ix * c + ch] = at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1);
            }
        }
    });
    let _ = n;
}

/// MP-Fourier features: `y[i, j] = sqrt(2) cos(freqs[j] · x[i] + phases[j])`.
pub fn mp_fourier(x: &[f32], freqs: &[f32], phases: &[f32]) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len() * freqs.len());
    for &v in x {
        for (f, p) in freqs.iter().zip(phases) {
            // The official code computes in float32: outer product, add, cos.
            y.push((v * f + p).cos() * std::f32::consts::SQRT_2);
        }
    }
    y
}

/// Whether any `|x| > limit` (parallel, read-only; the clip's gradient mask is only built
/// when this is true, which it rarely is).
pub fn any_abs_above(x: &[f32], limit: f32) -> bool {
    x.par_chunks(CHUNK).any(|c| c.iter().fold(false, |acc, v| acc | (v.abs() > limit)))
}

/// In-place clip to ±`limit`; returns nothing — the backward uses the clipped output
/// (`|y| < limit` or equal and unclipped) to decide where the gradient passes.
pub fn clip_inplace(x: &mut [f32], limit: f32) {
    let _prof = crate::profile::scope("clip");
    x.par_chunks_mut(CHUNK).for_each(|c| {
        for v in c {
            *v = v.clamp(-limit, limit);
        }
    });
}

/// Per-channel modulation `y[n, p, c] = mp_silu(h[n, p, c] · (s[n, c] + 1))` (Block step
/// 3, `s` = emb_linear's output: the official `c = emb_linear(emb) + 1`). The product is not
/// stored: the backward recomputes it from `h` and `s`.
pub fn modulate_silu(h: &[f32], s: &[f32], c: usize, pixels: usize, y: &mut [f32]) {
    let _prof = crate::profile::scope("modulate_silu");
    let per = pixels * c;
    y.par_chunks_mut(per).zip(h.par_chunks(per)).enumerate().for_each(|(b, (yc, hc))| {
        modulate_kernel(hc, &plus_one(&s[b * c..(b + 1) * c]), yc);
    });
}

/// `s + 1` per channel: the modulation's scale (rounded to f32 once, as the official add).
fn plus_one(s: &[f32]) -> Vec<f32> {
    s.iter().map(|v| v + 1.0).collect()
}

crate::multiversion_wide! {
    fn modulate_kernel(hc: &[f32], sb: &[f32], yc: &mut [f32]) {
        let c = sb.len();
        for (yr, hr) in yc.chunks_exact_mut(c).zip(hc.chunks_exact(c)) {
            for (y, (h, s)) in yr.iter_mut().zip(hr.iter().zip(sb)) {
                *y = mp_silu_scalar(h * s);
            }
        }
    }
}

/// Backward of [`modulate_silu`]: with `u = h·(s + 1)`, `dh = dy·silu'(u)·(s + 1)` and
/// `ds[n, c] = Σ_p dy·silu'(u)·h`.
#[allow(clippy::too_many_arguments)]
pub fn modulate_silu_backward(h: &[f32], s: &[f32], dy: &[f32], c: usize, pixels: usize, dh: &mut [f32], ds: &mut [f32]) {
    let _prof = crate::profile::scope("modulate_silu.bwd");
    let per = pixels * c;
    dh.par_chunks_mut(per).zip(ds.par_chunks_mut(c)).enumerate().for_each(|(b, (dhc, dsb))| {
        let r = b * per..(b + 1) * per;
        modulate_bwd_kernel(&h[r.clone()], &plus_one(&s[b * c..(b + 1) * c]), &dy[r], dhc, dsb);
    });
}

crate::multiversion_wide! {
    fn modulate_bwd_kernel(h: &[f32], sb: &[f32], dy: &[f32], dhc: &mut [f32], dsb: &mut [f32]) {
        let c = sb.len();
        // Per-channel sums in f32 over blocks of 64 pixels, blocks summed in f64: fixed
        // order, vectorizable across channels. Zipped iterators over exact chunks (no
        // indexing): this loop and the forward's ran 1.3x (AVX2) to 2x (AVX-512) faster
        // written so (AVX-512 Xeon, 2026-12-07; same operations, same bits).
        let mut acc = vec![0.0f64; c];
        let mut part = vec![0.0f32; c];
        let rows = h.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dhc.chunks_exact_mut(c));
        for (p, ((hr, gr), dr)) in rows.enumerate() {
            for ((((d, pa), &hv), &gv), &sv) in dr.iter_mut().zip(part.iter_mut()).zip(hr).zip(gr).zip(sb) {
                let g = gv * mp_silu_grad_scalar(hv * sv);
                *d = g * sv;
                *pa += g * hv;
            }
            if p % 64 == 63 {
                for i in 0..c {
                    acc[i] += part[i] as f64;
                    part[i] = 0.0;
                }
            }
        }
        for i in 0..c {
            dsb[i] = (acc[i] + part[i] as f64) as f32;
        }
    }
}

/// Deterministic counter-based uniform in [0, 1) (SplitMix64 finalizer of seed ⊕ index):
/// the same mask for the same seed whatever the thread count.
#[inline]
pub fn hash_uniform(seed: u64, index: u64) -> f32 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Inverted dropout in place: keep with probability 1−p and scale kept values by 1/(1−p).
/// Deterministic in (seed, element index). Returns nothing; the backward re-derives the
/// mask from the same seed.
pub fn dropout_inplace(x: &mut [f32], p: f32, seed: u64) {
    let _prof = crate::profile::scope("dropout");
    let scale = 1.0 / (1.0 - p);
    x.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, c)| {
        for (i, v) in c.iter_mut().enumerate() {
            let keep = hash_uniform(seed, (ci * CHUNK + i) as u64) >= p;
            *v = if keep { *v * scale } else { 0.0 };
        }
    });
}

/// `a ← wa·a + wb·b`, in parallel chunks.
pub fn axpby(a: &mut [f32], b: &[f32], wa: f32, wb: f32) {
    let _prof = crate::profile::scope("mp_sum");
    a.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK)).for_each(|(ac, bc)| axpby_kernel(ac, bc, wa, wb));
}

crate::multiversion_wide! {
    /// `a ← wa·a + wb·b`.
    pub fn axpby_kernel(a: &mut [f32], b: &[f32], wa: f32, wb: f32) {
        for (x, &y) in a.iter_mut().zip(b) {
            *x = wa * *x + wb * y;
        }
    }
}

/// `a ← k·a`, in parallel chunks.
pub fn scale_inplace(a: &mut [f32], k: f32) {
    a.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= k));
}

/// `k·a` as a new buffer (one pass, no copy-then-scale).
pub fn scaled(a: &[f32], k: f32) -> Vec<f32> {
    let mut out = super::zeroed(a.len());
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(o, i)| {
        for (x, y) in o.iter_mut().zip(i) {
            *x = k * y;
        }
    });
    out
}

/// `a ← a + b`, in parallel chunks.
pub fn add_inplace(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK)).for_each(|(ac, bc)| {
        for (x, y) in ac.iter_mut().zip(bc) {
            *x += y;
        }
    });
}

/// `dx ← dx + dy · mp_silu'(x)` (the backward of a branch that reads `x` twice).
pub fn mp_silu_backward_acc(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let _prof = crate::profile::scope("mp_silu.bwd");
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)).for_each(|((dc, xc), gc)| mp_silu_bwd_acc_kernel(xc, gc, dc));
}

crate::multiversion_wide! {
    fn mp_silu_bwd_acc_kernel(xc: &[f32], gc: &[f32], dc: &mut [f32]) {
        for ((o, &v), &g) in dc.iter_mut().zip(xc).zip(gc) {
            *o += g * mp_silu_grad_scalar(v);
        }
    }
}

crate::multiversion! {
    /// `Σ a·b` in f32 over 8 interleaved lanes combined in a fixed order: vectorizes, and
    /// the result depends only on the two rows (not on batch size or threading).
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for j in 0..8 {
                acc[j] += x[j] * y[j];
            }
        }
        for (j, (x, y)) in ra.iter().zip(rb).enumerate() {
            acc[j] += x * y;
        }
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    }
}

/// `y[m, o] = Σ_k a[m, k] · w[o, k]` row by row with [`dot_f32`]: every output element
/// is computed the same way whatever M is, so a sample's result does not depend on the
/// batch it is in. Used for the layers whose shapes the tile kernels do not take.
pub fn rowdot_matmul(a: &[f32], k: usize, w: &[f32], o: usize, y: &mut [f32]) {
    y.par_chunks_mut(o * 64).zip(a.par_chunks(k * 64)).for_each(|(yc, ac)| {
        for (yr, ar) in yc.chunks_mut(o).zip(ac.chunks(k)) {
            for (j, v) in yr.iter_mut().enumerate() {
                *v = dot_f32(ar, &w[j * k..(j + 1) * k]);
            }
        }
    });
}
