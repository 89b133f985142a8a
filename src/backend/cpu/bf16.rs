//! The CPU's `--precision bf16` mode: the products of the convolutions on `vdpbf16ps`
//! (AVX512-BF16: 16 lanes, each reducing a pair of bf16 products into an f32 accumulator,
//! twice the products of an fp32 FMA per instruction), fp32 everywhere else.
//!
//! Unlike the GPU's bf16 mode the activations stay fp32 in memory: each convolution
//! rounds its two operands to bf16 (round to nearest even) right before the product, into
//! a scratch buffer half their size, and accumulates in fp32. So the error is that of the
//! bf16 operands alone (relative 2⁻⁹ per factor), within the GPU mode's bounds, which
//! also round the stored activations.
//!
//! The pairs a `vdpbf16ps` lane reduces must be adjacent along the reduction:
//! * forward and data gradient reduce over input channels, which NHWC stores adjacently:
//!   the operand is the plain bf16 copy ([`to_bf16_pairs`]), one `u32` per channel pair;
//!   the packed weights pair the same two channels per output lane ([`pack_pairs`]);
//! * the weight gradient reduces over pixels: adjacent pixels would pair a tap's source
//!   pixels at different parities, so the pairs are the same pixel of two images
//!   ([`interleave_images`]), which every tap shifts alike.

use rayon::prelude::*;

/// True when the bf16 products can run: the AVX-512 path is in use and the CPU has
/// AVX512-BF16 (and BW, for the interleaving shuffles).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        super::simd::avx512()
            && *HAS.get_or_init(|| is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `v` rounded to bf16, nearest even (NaN stays a quiet NaN), as `vcvtne2ps2bf16` does
/// for normal numbers.
pub fn round(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
pub fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Elements per parallel task of the conversions (a few hundred KB of input).
const TASK: usize = 1 << 16;

/// `x` (even length) in bf16, two consecutive values per `u32` (the first in the low half).
pub fn to_bf16_pairs(x: &[f32]) -> Vec<u32> {
    assert!(x.len() % 2 == 0);
    let _prof = crate::profile::scope("bf16.convert");
    let mut out = super::zeroed(x.len() / 2);
    out.par_chunks_mut(TASK / 2).zip(x.par_chunks(TASK)).for_each(|(d, s)| pairs_into(s, d));
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pairs_avx512(s: &[f32], d: &mut [u32]) {
    use std::arch::x86_64::*;
    let full = s.len() / 32;
    for i in 0..full {
        let lo = _mm512_loadu_ps(s.as_ptr().add(32 * i));
        let hi = _mm512_loadu_ps(s.as_ptr().add(32 * i + 16));
        // 32 bf16 in order: `lo` in the low 256 bits.
        let v = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(d.as_mut_ptr().add(16 * i) as *mut __m512i, std::mem::transmute::<__m512bh, __m512i>(v));
    }
    for (o, p) in d[16 * full..].iter_mut().zip(s[32 * full..].chunks_exact(2)) {
        *o = round(p[0]) as u32 | (round(p[1]) as u32) << 16;
    }
}

/// [`to_bf16_pairs`] on the calling thread (for callers already inside a parallel loop).
pub fn to_bf16_pairs_seq(x: &[f32]) -> Vec<u32> {
    assert!(x.len() % 2 == 0);
    let mut out = vec![0u32; x.len() / 2];
    pairs_into(x, &mut out);
    out
}

/// `s` (even length) as bf16 pairs into `d` (half its length).
pub(crate) fn pairs_into(s: &[f32], d: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX512-BF16/F checked by `available()`; `d` holds half of `s`.
        unsafe { pairs_avx512(s, d) };
        return;
    }
    for (o, p) in d.iter_mut().zip(s.chunks_exact(2)) {
        *o = round(p[0]) as u32 | (round(p[1]) as u32) << 16;
    }
}

/// `x` = `n` images of `per_image` values as `ceil(n/2)` image pairs: element `j` of pair
/// `i` holds image `2i` (low half) and `2i + 1` (high half; zero for the last of an odd
/// `n`) of element `j`, in bf16.
pub fn interleave_images(x: &[f32], n: usize, per_image: usize) -> Vec<u32> {
    assert_eq!(x.len(), n * per_image);
    let _prof = crate::profile::scope("bf16.interleave");
    let mut out = super::zeroed(n.div_ceil(2) * per_image);
    out.par_chunks_mut(TASK / 2).enumerate().for_each(|(t, d)| {
        // This task's elements, possibly across a pair boundary: split there.
        let mut e = t * (TASK / 2);
        let mut d = d;
        while !d.is_empty() {
            let (pair, j) = (e / per_image, e % per_image);
            let len = d.len().min(per_image - j);
            let (now, rest) = d.split_at_mut(len);
            let a = &x[2 * pair * per_image + j..][..len];
            let b = (2 * pair + 1 < n).then(|| &x[(2 * pair + 1) * per_image + j..][..len]);
            interleave_run(a, b, now);
            d = rest;
            e += len;
        }
    });
    out
}

/// `d[j]` = the bf16 pair (`a[j]` low, `b[j]` high): two rows of a matrix as pairs along
/// its columns (one thread).
pub fn interleave_rows(a: &[f32], b: &[f32], d: &mut [u32]) {
    assert!(a.len() == d.len() && b.len() == d.len());
    interleave_run(a, Some(b), d)
}

/// `d[j]` = the bf16 pair (`a[j]` low, `b[j]` high; zero without `b`).
pub(crate) fn interleave_run(a: &[f32], b: Option<&[f32]>, d: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(b), true) = (b, available()) {
        // SAFETY: AVX512-BF16/BW checked by `available()`; `a`, `b`, `d` have one length.
        unsafe { interleave_avx512(a, b, d) };
        return;
    }
    for (i, o) in d.iter_mut().enumerate() {
        *o = round(a[i]) as u32 | (b.map_or(0, |b| round(b[i])) as u32) << 16;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_avx512(a: &[f32], b: &[f32], d: &mut [u32]) {
    use std::arch::x86_64::*;
    // Word 2i of the result takes word i (a_i), word 2i + 1 word 16 + i (b_i).
    let idx: [i16; 32] = std::array::from_fn(|w| (w / 2 + 16 * (w % 2)) as i16);
    let idx = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
    let full = d.len() / 16;
    for i in 0..full {
        let av = _mm512_loadu_ps(a.as_ptr().add(16 * i));
        let bv = _mm512_loadu_ps(b.as_ptr().add(16 * i));
        let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(bv, av));
        _mm512_storeu_si512(d.as_mut_ptr().add(16 * i) as *mut __m512i, _mm512_permutexvar_epi16(idx, v));
    }
    for i in 16 * full..d.len() {
        d[i] = round(a[i]) as u32 | (round(b[i]) as u32) << 16;
    }
}

/// Both bf16 forms of `x` (`n` images of `per_image` values, `per_image` even) from one
/// pass over it: ([`to_bf16_pairs`], [`interleave_images`]), for an output gradient that
/// feeds both the data gradient and the weight gradient (a third less memory traffic
/// than two passes).
pub fn pairs_and_interleave(x: &[f32], n: usize, per_image: usize) -> (Vec<u32>, Vec<u32>) {
    assert!(x.len() == n * per_image && per_image % 2 == 0);
    let _prof = crate::profile::scope("bf16.convert2");
    let mut pairs = super::zeroed(x.len() / 2);
    let mut inter = super::zeroed(n.div_ceil(2) * per_image);
    // One task per image pair: its two images' pairs (per_image u32) and its interleaved
    // block (per_image u32).
    pairs.par_chunks_mut(per_image).zip(inter.par_chunks_mut(per_image)).enumerate().for_each(|(j, (pd, id))| {
        let a = &x[2 * j * per_image..][..per_image];
        let b = (2 * j + 1 < n).then(|| &x[(2 * j + 1) * per_image..][..per_image]);
        let (pa, pb) = pd.split_at_mut((per_image / 2).min(pd.len()));
        pairs_into(a, pa);
        if let Some(b) = b {
            pairs_into(b, pb);
        }
        interleave_run(a, b, id);
    });
    (pairs, inter)
}

/// A panel-packed weight `[G][K][16]` (f32, K even) as `[G][K/2][16]` bf16 pairs: lane
/// `j` of pair `k` holds rows `2k` (low) and `2k + 1` (high) of column `j` — the operand
/// layout of [`super::microkernel::Bf16Dot`] for a reduction over K.
pub fn pack_pairs(packed: &[f32], k: usize) -> Vec<u32> {
    pack_pairs_padded(packed, k, k)
}

/// [`pack_pairs`] with each group's K padded to `kp` (even, ≥ k) with zero pairs: the
/// `[G][kp/2][16]` operand of the AMX tiles ([`super::amx`]), whose reduction steps are
/// 32 elements.
pub fn pack_pairs_padded(packed: &[f32], k: usize, kp: usize) -> Vec<u32> {
    assert!(k % 2 == 0 && kp % 2 == 0 && kp >= k && packed.len() % (16 * k) == 0);
    let mut out = super::zeroed(packed.len() / k * kp / 2);
    out.par_chunks_mut(8 * kp).zip(packed.par_chunks(16 * k)).for_each(|(d, s)| {
        for kp in 0..k / 2 {
            for j in 0..16 {
                d[kp * 16 + j] = round(s[2 * kp * 16 + j]) as u32 | (round(s[(2 * kp + 1) * 16 + j]) as u32) << 16;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties to the even (1).
        assert_eq!(widen(round(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to the even (1 + 2^-6).
        assert_eq!(widen(round(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        assert_eq!(widen(round(1.0 + 1.0 / 256.0 + 1e-6)), 1.0 + 1.0 / 128.0);
        assert_eq!(widen(round(-3.0)), -3.0);
        assert!(widen(round(f32::NAN)).is_nan());
        assert_eq!(widen(round(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn vector_conversions_match_the_scalar_rounding() {
        let x: Vec<f32> = (0..2 * 16 * 5 + 6).map(|i| ((i as f32) * 0.7311).sin() * 3.0 + 1e-3 * i as f32).collect();
        let p = to_bf16_pairs(&x);
        for (i, v) in p.iter().enumerate() {
            assert_eq!((*v & 0xffff) as u16, round(x[2 * i]), "pair {i}");
            assert_eq!((*v >> 16) as u16, round(x[2 * i + 1]), "pair {i}");
        }
        // Both forms in one pass: the same values as the two separate passes.
        let (pp, ii) = pairs_and_interleave(&x[..5 * 32], 5, 32);
        assert_eq!(pp, to_bf16_pairs(&x[..5 * 32]));
        assert_eq!(ii, interleave_images(&x[..5 * 32], 5, 32));
        // Three images of 37 values: two pairs, the second with a zero high half.
        let per = 37;
        let x = &x[..3 * per];
        let q = interleave_images(x, 3, per);
        assert_eq!(q.len(), 2 * per);
        for pair in 0..2 {
            for j in 0..per {
                let v = q[pair * per + j];
                assert_eq!((v & 0xffff) as u16, round(x[2 * pair * per + j]));
                let hi = if 2 * pair + 1 < 3 { round(x[(2 * pair + 1) * per + j]) } else { 0 };
                assert_eq!((v >> 16) as u16, hi);
            }
        }
    }
}
