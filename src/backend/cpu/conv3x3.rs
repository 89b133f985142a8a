//! Direct ("implicit GEMM") 3x3 'same' convolution in NHWC for x86-64 AVX2 + FMA — no
//! im2col buffer.
//!
//! Forward: `y[p, o] = Σ_{tap, ci} xpad[p + tap, ci] · w[tap, ci, o]` computed in register
//! tiles of 6 output pixels × 16 output channels (12 ymm accumulators; per input channel
//! 2 weight loads, 6 broadcasts, 12 FMAs — the BLIS Haswell 6x16 shape). Every tap of a
//! 6-pixel run is a constant offset into the unpadded input; the zero padding is
//! implicit (image-edge rows skip a row of taps; in the tiles that touch the left/right
//! image edge, compile-time variants skip that pixel's outer column of taps), so no
//! padded copy or im2col buffer is made. Weights are
//! packed per 16-channel block, `[O/16][9][Cin][16]`, so a tile streams them
//! contiguously.
//!
//! Data gradient: the same kernel on the output gradient with the weights
//! transposed and spatially flipped (`[Cin/16][9][O][16]`, tap' = 8 − tap).
//!
//! Variants measured on cpu-s32 (2-core Zen 2, batch 32, per training step): im2col +
//! `gemm` crate 670 ms forward GEMM + 125 ms im2col; this kernel: see docs/perf.md.
//! Requires `cout % 16 == 0`; callers fall back to im2col + GEMM otherwise.
//!
//! Deterministic: each output element is one accumulation chain in a fixed order.

use rayon::prelude::*;

use super::microkernel::{Bf16Dot, F32Fma, Mac512, MR, NR};

/// True when the CPU has AVX2 and FMA (checked once).
pub fn available() -> bool {
    super::simd::avx2_fma()
}

/// OHWI `[O][9][Cin]` from the forward packing `[O/16][9][Cin][16]` (which
/// `conv::effective_weight` writes directly).
pub fn unpack_forward(p: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut w = vec![0.0f32; p.len()];
    for o in 0..cout {
        let (ob, j) = (o / NR, o % NR);
        for t in 0..9 * cin {
            w[o * 9 * cin + t] = p[(ob * 9 * cin + t) * NR + j];
        }
    }
    w
}

/// Data-gradient packing `[Cin/16][9][O][16]`, taps flipped, from the forward packing
/// `[O/16][9][Cin][16]` (no OHWI copy needed).
pub fn pack_backward_from_forward(pf: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let _prof = crate::profile::scope("pack");
    let mut p = vec![0.0f32; pf.len()];
    p.par_chunks_mut(9 * cout * NR).enumerate().for_each(|(cb, dst)| {
        for tap in 0..9 {
            for o in 0..cout {
                let (ob, j) = (o / NR, o % NR);
                let src = &pf[(ob * 9 + (8 - tap)) * cin * NR..];
                let d = &mut dst[(tap * cout + o) * NR..(tap * cout + o + 1) * NR];
                for (jj, v) in d.iter_mut().enumerate() {
                    *v = src[(cb * NR + jj) * NR + j];
                }
            }
        }
    });
    p
}

/// `y[N, H, W, cout] = conv3x3(x, packed)` for an unpadded NHWC `x` `[N, H, W, cin]`
/// ('same' zero padding is implicit: taps that fall outside the image are skipped) and
/// `packed` in the forward packing (or [`pack_backward_from_forward`] for a data gradient).
pub fn conv3x3_direct(x: &[f32], n: usize, h: usize, w: usize, cin: usize, packed: &[f32], cout: usize, y: &mut [f32]) {
    assert!(available() && cout % NR == 0);
    // AVX2: tiles of up to 6 pixels × 16 channels; AVX-512: up to 12 pixels × 32 channels
    // (two 16-channel blocks of the same packing, the same products in the same order per
    // output element: bit-identical results).
    if super::simd::avx512() {
        direct_rows::<F32Fma>(x, n, h, w, cin, packed, cout, y);
        return;
    }
    assert_eq!(x.len(), n * h * w * cin);
    assert_eq!(packed.len(), 9 * cin * cout);
    assert_eq!(y.len(), n * h * w * cout);
    let row_stride = w * cin;
    let panel = 9 * cin * NR;
    y.par_chunks_mut(w * cout).enumerate().for_each(|(row, yr)| {
        // Output-channel blocks outer: one block's weights stay in L2 over the row.
        for ob in 0..cout / NR {
            for_each_run(row, h, w, MR, |x0, m, left, right, k| {
                let c = yr[x0 * cout + ob * NR..].as_mut_ptr();
                let a = x[((row * w) + x0) * cin..].as_ptr();
                // SAFETY: AVX2/FMA checked by `available()`. The tile reads pixel
                // (yy + ky − 1, x0 + i + kx − 1) only where it lies inside the image (rows
                // k.ky0..k.ky1; the first/last column of taps is skipped for the pixel on
                // the left/right image edge) and writes m pixels of this row.
                unsafe { run256(m, left, right, a, Taps { row_stride, cin, ..k }, packed[ob * panel..].as_ptr(), c, cout) }
            });
        }
    });
}

/// [`conv3x3_direct`] with bf16 products ([`super::bf16`]): `xb` is the input as bf16
/// channel pairs (`[N, H, W, cin/2]`, [`super::bf16::to_bf16_pairs`]) and `packed` the
/// packing of [`conv3x3_direct`] as pairs over input channels
/// ([`super::bf16::pack_pairs`]: `[cout/16][9][cin/2][16]`).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_direct_bf16(xb: &[u32], n: usize, h: usize, w: usize, cin: usize, packed: &[u32], cout: usize, y: &mut [f32]) {
    assert!(super::bf16::available() && cout % NR == 0 && cin % 2 == 0);
    direct_rows::<Bf16Dot>(xb, n, h, w, cin / 2, packed, cout, y);
}

/// The AVX-512 driver of the direct convolution for either element kind: one image row
/// per task, the row split into near-equal runs of ≤ 12 pixels, each run × 32 output
/// channels one register tile. `cin` counts elements of `K` per pixel.
#[allow(clippy::too_many_arguments)]
fn direct_rows<K: ConvTile>(x: &[K::E], n: usize, h: usize, w: usize, cin: usize, packed: &[K::E], cout: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n * h * w * cin);
    assert_eq!(packed.len(), 9 * cin * cout);
    assert_eq!(y.len(), n * h * w * cout);
    let row_stride = w * cin;
    let (nb, panel) = (cout / NR, 9 * cin * NR);
    y.par_chunks_mut(w * cout).enumerate().for_each(|(row, yr)| {
        for ob in (0..nb).step_by(2) {
            let two = ob + 1 < nb;
            for_each_run(row, h, w, super::microkernel::MR512, |x0, m, left, right, k| {
                let c = yr[x0 * cout + ob * NR..].as_mut_ptr();
                let a = x[(row * w + x0) * cin..].as_ptr();
                // SAFETY: the CPU has what `K` needs (checked by the callers). As in
                // `conv3x3_direct`; the second panel (when `two`) is the next 16-channel
                // block of `packed` and of y.
                unsafe { run512::<K>(m, two, left, right, a, Taps { row_stride, cin, ..k }, packed[ob * panel..].as_ptr(), panel, c, cout) }
            });
        }
    });
}

/// Calls `run(x0, m, left, right, taps)` for each run of output pixels of image row `row`
/// (of `h` rows per image, `w` pixels per row): `ceil(w/mr)` near-equal runs (AVX2, 32 →
/// 6,6,5,5,5,5; 8 → 4,4), since a short remainder tile has too few accumulators to hide
/// the FMA latency; `taps` has the rows of taps inside the image (strides left to fill).
fn for_each_run(row: usize, h: usize, w: usize, mr: usize, mut run: impl FnMut(usize, usize, bool, bool, Taps)) {
    let yy = row % h;
    let ky0 = if yy == 0 { 1 } else { 0 };
    let ky1 = if yy + 1 == h { 2 } else { 3 };
    let taps = Taps { ky0, ky1, row_stride: 0, cin: 0 };
    let runs = w.div_ceil(mr);
    let (run_len, extra) = (w / runs, w % runs);
    let mut x0 = 0;
    for r in 0..runs {
        let m = run_len + (r < extra) as usize;
        run(x0, m, x0 == 0, x0 + m == w, taps);
        x0 += m;
    }
}

/// [`tile`] with its compile-time parameters from run-time ones (m ≤ 6).
#[allow(clippy::too_many_arguments)]
unsafe fn run256(m: usize, left: bool, right: bool, a: *const f32, k: Taps, bp: *const f32, c: *mut f32, cout: usize) {
    macro_rules! go {
        ($m:literal) => {
            match (left, right) {
                (false, false) => tile::<$m, false, false>(a, k, bp, c, cout),
                (true, false) => tile::<$m, true, false>(a, k, bp, c, cout),
                (false, true) => tile::<$m, false, true>(a, k, bp, c, cout),
                (true, true) => tile::<$m, true, true>(a, k, bp, c, cout),
            }
        };
    }
    crate::rows_dispatch!(m, go, 6)
}

/// [`ConvTile::tile`] with its compile-time parameters from run-time ones (m ≤ 12).
#[allow(clippy::too_many_arguments)]
unsafe fn run512<K: ConvTile>(m: usize, two: bool, left: bool, right: bool, a: *const K::E, k: Taps, bp: *const K::E, panel: usize, c: *mut f32, cout: usize) {
    macro_rules! go {
        ($m:literal) => {
            match (two, left, right) {
                (true, false, false) => K::tile::<$m, 2, false, false>(a, k, bp, panel, c, cout),
                (true, true, false) => K::tile::<$m, 2, true, false>(a, k, bp, panel, c, cout),
                (true, false, true) => K::tile::<$m, 2, false, true>(a, k, bp, panel, c, cout),
                (true, true, true) => K::tile::<$m, 2, true, true>(a, k, bp, panel, c, cout),
                (false, false, false) => K::tile::<$m, 1, false, false>(a, k, bp, panel, c, cout),
                (false, true, false) => K::tile::<$m, 1, true, false>(a, k, bp, panel, c, cout),
                (false, false, true) => K::tile::<$m, 1, false, true>(a, k, bp, panel, c, cout),
                (false, true, true) => K::tile::<$m, 1, true, true>(a, k, bp, panel, c, cout),
            }
        };
    }
    crate::rows_dispatch!(m, go, 12)
}

/// An element kind of the AVX-512 convolution tiles ([`Mac512`]: fp32 FMAs or bf16 pair
/// dots), with the tile entry points of the 3x3 kernel, the weight gradient and the 1x1
/// GEMM compiled for the CPU features that kind needs (the
/// generic bodies are inlined into them, so the intrinsics inline too).
pub trait ConvTile: Mac512 {
    /// One register tile of the direct convolution: [`tile512`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const M: usize, const P: usize, const LEFT: bool, const RIGHT: bool>(a: *const Self::E, k: Taps, b: *const Self::E, b_panel: usize, c: *mut f32, cstride: usize);
    /// One weight-gradient tile over a chunk of rows: [`dw_run512`].
    unsafe fn dw<const M: usize, const P: usize>(x: *const Self::E, dy: *const Self::E, g: &DwRows, acc: *mut f32);
    /// One tile of the 1x1 GEMM: [`super::gemm16::kern512`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm<const M: usize, const P: usize>(a: *const Self::E, lda: usize, k: usize, b: *const Self::E, b_panel: usize, c: *mut f32, ldc: usize);
}

// Elsewhere the AVX-512 tiles are never selected (`simd::avx512()` is false).
#[cfg(not(target_arch = "x86_64"))]
impl<T: Mac512> ConvTile for T {
    unsafe fn tile<const M: usize, const P: usize, const LEFT: bool, const RIGHT: bool>(_: *const T::E, _: Taps, _: *const T::E, _: usize, _: *mut f32, _: usize) {
        unreachable!("the AVX-512 tiles need x86-64")
    }
    unsafe fn dw<const M: usize, const P: usize>(_: *const T::E, _: *const T::E, _: &DwRows, _: *mut f32) {
        unreachable!("the AVX-512 tiles need x86-64")
    }
    unsafe fn gemm<const M: usize, const P: usize>(_: *const T::E, _: usize, _: usize, _: *const T::E, _: usize, _: *mut f32, _: usize) {
        unreachable!("the AVX-512 tiles need x86-64")
    }
}

#[cfg(target_arch = "x86_64")]
impl ConvTile for F32Fma {
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const M: usize, const P: usize, const LEFT: bool, const RIGHT: bool>(a: *const f32, k: Taps, b: *const f32, b_panel: usize, c: *mut f32, cstride: usize) {
        tile512::<Self, M, P, LEFT, RIGHT>(a, k, b, b_panel, c, cstride)
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn dw<const M: usize, const P: usize>(x: *const f32, dy: *const f32, g: &DwRows, acc: *mut f32) {
        dw_run512::<Self, M, P>(x, dy, g, acc)
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn gemm<const M: usize, const P: usize>(a: *const f32, lda: usize, k: usize, b: *const f32, b_panel: usize, c: *mut f32, ldc: usize) {
        super::gemm16::kern512::<Self, M, P>(a, lda, k, b, b_panel, c, ldc)
    }
}

#[cfg(target_arch = "x86_64")]
impl ConvTile for Bf16Dot {
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const M: usize, const P: usize, const LEFT: bool, const RIGHT: bool>(a: *const u32, k: Taps, b: *const u32, b_panel: usize, c: *mut f32, cstride: usize) {
        tile512::<Self, M, P, LEFT, RIGHT>(a, k, b, b_panel, c, cstride)
    }
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dw<const M: usize, const P: usize>(x: *const u32, dy: *const u32, g: &DwRows, acc: *mut f32) {
        dw_run512::<Self, M, P>(x, dy, g, acc)
    }
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn gemm<const M: usize, const P: usize>(a: *const u32, lda: usize, k: usize, b: *const u32, b_panel: usize, c: *mut f32, ldc: usize) {
        super::gemm16::kern512::<Self, M, P>(a, lda, k, b, b_panel, c, ldc)
    }
}

/// One AVX-512 register tile: M consecutive pixels × P·16 output channels (panel `p` of
/// the packed weight at `b + p·b_panel`), `k.cin` elements of `K` per pixel. Otherwise
/// as [`tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile512<K: Mac512, const M: usize, const P: usize, const LEFT: bool, const RIGHT: bool>(
    a: *const K::E,
    k: Taps,
    b: *const K::E,
    b_panel: usize,
    c: *mut f32,
    cstride: usize,
) {
    use super::microkernel::{mac_tile512, store_tile512};
    use std::arch::x86_64::*;
    let cin = k.cin;
    let mut acc = [[_mm512_setzero_ps(); P]; M];
    for ky in k.ky0..k.ky1 {
        let row = a.offset((ky as isize - 1) * k.row_stride as isize);
        let bp = b.add(ky * 3 * cin * NR);
        mac_tile512::<K, M, P>(row.wrapping_sub(cin), cin, 1, bp, b_panel, NR, cin, LEFT, false, &mut acc);
        mac_tile512::<K, M, P>(row, cin, 1, bp.add(cin * NR), b_panel, NR, cin, false, false, &mut acc);
        mac_tile512::<K, M, P>(row.wrapping_add(cin), cin, 1, bp.add(2 * cin * NR), b_panel, NR, cin, false, RIGHT, &mut acc);
    }
    store_tile512::<M, P>(c, cstride, &acc);
}

/// The tap rows of a tile and the input strides.
#[derive(Clone, Copy)]
pub struct Taps {
    ky0: usize,
    ky1: usize,
    row_stride: usize,
    cin: usize,
}

/// One register tile: M consecutive pixels × 16 output channels. `a` points at the
/// input pixel under the first output pixel (the centre tap). LEFT / RIGHT: the first /
/// last pixel is on the image edge, so its left / right column of taps is zero padding.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const M: usize, const LEFT: bool, const RIGHT: bool>(a: *const f32, k: Taps, b: *const f32, c: *mut f32, cstride: usize) {
    use super::microkernel::{fma_tile, store_tile};
    use std::arch::x86_64::*;
    let cin = k.cin;
    let mut acc0 = [_mm256_setzero_ps(); M];
    let mut acc1 = [_mm256_setzero_ps(); M];
    for ky in k.ky0..k.ky1 {
        let row = a.offset((ky as isize - 1) * k.row_stride as isize);
        let bp = b.add(ky * 3 * cin * NR);
        // kx = 0 reads column x − 1; pointer arithmetic only (the skipped pixel is never read).
        // One tap over all input channels per call; the skip flags are constants.
        fma_tile::<M>(row.wrapping_sub(cin), cin, 1, bp, NR, cin, LEFT, false, &mut acc0, &mut acc1);
        fma_tile::<M>(row, cin, 1, bp.add(cin * NR), NR, cin, false, false, &mut acc0, &mut acc1);
        fma_tile::<M>(row.wrapping_add(cin), cin, 1, bp.add(2 * cin * NR), NR, cin, false, RIGHT, &mut acc0, &mut acc1);
    }
    store_tile::<M>(c, cstride, &acc0, &acc1);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const M: usize, const LEFT: bool, const RIGHT: bool>(_: *const f32, _: Taps, _: *const f32, _: *mut f32, _: usize) {
    unreachable!("conv3x3 direct kernel needs x86-64")
}

/// Weight gradient without im2col of a 'same' k×k convolution (k = 3, or 1 for 1x1
/// convolutions and — with h = w = 1 — linear layers):
/// `d_eff[o, tap, ci] = Σ_p dy[p, o] · x[p + tap, ci]` (OHWI, overwritten). Register tiles of 6 input channels × 16 output channels with the
/// pixels as the reduction; the pixels run in chunks of a few image rows that stay in
/// L2 while every tile of a thread passes over them. Tiles are split between the threads
/// in fixed contiguous groups and each tile reduces its chunks in order, so the result
/// does not depend on scheduling (nor on the thread count). Requires `cout % 16 == 0`.
#[allow(clippy::too_many_arguments)]
pub fn conv_weight_grad(k: usize, x: &[f32], n: usize, h: usize, w: usize, cin: usize, dy: &[f32], cout: usize, d_eff: &mut [f32]) {
    assert!(available());
    weight_grad::<F32Fma>(k, x, n, h, w, cin, dy, cout, d_eff, super::simd::avx512())
}

/// [`conv_weight_grad`] with bf16 products ([`super::bf16`]): `xi` and `dyi` are the
/// input and output gradient as image pairs ([`super::bf16::interleave_images`]; `n2`
/// pairs), so each `vdpbf16ps` lane reduces one pixel of two images.
#[allow(clippy::too_many_arguments)]
pub fn conv_weight_grad_bf16(k: usize, xi: &[u32], n2: usize, h: usize, w: usize, cin: usize, dyi: &[u32], cout: usize, d_eff: &mut [f32]) {
    assert!(super::bf16::available());
    weight_grad::<Bf16Dot>(k, xi, n2, h, w, cin, dyi, cout, d_eff, true)
}

/// The weight-gradient driver for either element kind (`wide`: the AVX-512 tiles; the
/// AVX2 ones, `!wide`, only for f32).
#[allow(clippy::too_many_arguments)]
fn weight_grad<K: ConvTile>(k: usize, x: &[K::E], n: usize, h: usize, w: usize, cin: usize, dy: &[K::E], cout: usize, d_eff: &mut [f32], wide: bool) {
    assert!(cout % NR == 0 && (k == 1 || k == 3));
    assert!(wide || K::F32_ELEMENTS);
    let taps = k * k;
    assert_eq!(x.len(), n * h * w * cin);
    assert_eq!(dy.len(), n * h * w * cout);
    assert_eq!(d_eff.len(), taps * cin * cout);
    // Tile: `mr` input channels × `oc` output channels (AVX2 6x16; AVX-512 12x32, the
    // last output block 16 wide when cout is an odd number of 16s).
    let (mr, oc) = if wide { (super::microkernel::MR512, 2 * NR) } else { (MR, NR) };
    let cblocks = cin.div_ceil(mr);
    let oblocks = cout.div_ceil(oc);
    // Tiles ordered (o-block, tap, ci-block); each has an mr x oc accumulator.
    let ntiles = oblocks * taps * cblocks;
    let threads = rayon::current_num_threads().max(1).min(ntiles);
    let mut acc = vec![0.0f32; ntiles * mr * oc];
    let per = ntiles.div_ceil(threads);
    // Rows per chunk: as many pixels as keep the chunk's x and dy (~256 KB) in L2.
    let chunk_pixels = (65536 / (cin + cout)).clamp(16, 1024);
    let rows_per_chunk = (chunk_pixels / w).max(1);
    let tile_of = |t: usize| {
        let (ob, rest) = (t / (taps * cblocks), t % (taps * cblocks));
        (ob, rest / cblocks, rest % cblocks)
    };
    acc.par_chunks_mut(per * mr * oc).enumerate().for_each(|(g, accg)| {
        let t0 = g * per;
        let rows = n * h;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + rows_per_chunk).min(rows);
            for (i, tacc) in accg.chunks_mut(mr * oc).enumerate() {
                let (ob, tap, cb) = tile_of(t0 + i);
                // A 1x1 convolution is the centre tap alone.
                let (ky, kx) = if k == 3 { (tap / 3, tap % 3) } else { (1, 1) };
                let ci0 = cb * mr;
                let m = (cin - ci0).min(mr);
                let (xlo, xhi) = (if kx == 0 { 1 } else { 0 }, if kx == 2 { w - 1 } else { w });
                if xlo >= xhi {
                    continue;
                }
                let geo = DwRows { r0, r1, h, w, ky, kx, xlo, xhi, cin, cout, ci0, o0: ob * oc };
                let (xp, dp, ap) = (x.as_ptr(), dy.as_ptr(), tacc.as_mut_ptr());
                if wide {
                    let two = ob * oc + oc <= cout;
                    // SAFETY: AVX-512F checked by `avx512()`; as below, with 16 or 32
                    // output channels from o0 (inside dy: `two` only when o0 + 32 ≤ cout).
                    unsafe {
                        macro_rules! go {
                            ($m:literal) => {
                                if two {
                                    K::dw::<$m, 2>(xp, dp, &geo, ap)
                                } else {
                                    K::dw::<$m, 1>(xp, dp, &geo, ap)
                                }
                            };
                        }
                        crate::rows_dispatch!(m, go, 12)
                    }
                    continue;
                }
                // SAFETY: AVX2/FMA checked by `available()`; `dw_run` reads, for each
                // chunk row whose source row is inside the image, pixels xlo..xhi of dy
                // (16 channels from o0) and the matching source pixels of x (channels
                // ci0..ci0+m), all inside the slices.
                unsafe {
                    macro_rules! go {
                        ($m:literal) => {
                            // `!wide` only for f32 (asserted above).
                            dw_run::<$m>(xp as *const f32, dp as *const f32, &geo, ap)
                        };
                    }
                    crate::rows_dispatch!(m, go, 6)
                }
            }
            r0 = r1;
        }
    });
    // Scatter the tiles (rows: input channels, stride oc) into OHWI.
    for t in 0..ntiles {
        let (ob, tap, cb) = tile_of(t);
        let ci0 = cb * mr;
        for mi in 0..(cin - ci0).min(mr) {
            for j in 0..oc.min(cout - ob * oc) {
                d_eff[((ob * oc + j) * taps + tap) * cin + ci0 + mi] = acc[(t * mr + mi) * oc + j];
            }
        }
    }
}

/// Which pixels a weight-gradient tile reduces over in one chunk.
pub struct DwRows {
    r0: usize,
    r1: usize,
    h: usize,
    w: usize,
    ky: usize,
    kx: usize,
    xlo: usize,
    xhi: usize,
    cin: usize,
    cout: usize,
    ci0: usize,
    o0: usize,
}

impl DwRows {
    /// For each chunk row whose source row is inside the image: the element offsets of its
    /// first source pixel in x (channel ci0) and of its first output pixel in dy (channel
    /// o0). Output pixel xx reads source pixel (sy, xx + kx − 1): a tile's rows are input
    /// channels (stride 1), its reduction runs over pixels (stride cin in x, cout in dy).
    fn rows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (self.r0..self.r1).filter_map(move |r| {
            let (b, yy) = (r / self.h, r % self.h);
            let sy = (yy + self.ky).checked_sub(1).filter(|&sy| sy < self.h)?;
            let xo = ((b * self.h + sy) * self.w + self.xlo + self.kx - 1) * self.cin + self.ci0;
            Some((xo, (r * self.w + self.xlo) * self.cout + self.o0))
        })
    }
}

/// Accumulates the chunk's pixels into an M x 16 tile stored at `acc` (`[M][16]`),
/// keeping the tile in registers over all rows of the chunk.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_run<const M: usize>(x: *const f32, dy: *const f32, g: &DwRows, acc: *mut f32) {
    use super::microkernel::{fma_tile, load_tile, store_tile};
    use std::arch::x86_64::*;
    let (cin, cout) = (g.cin, g.cout);
    let mut a0 = [_mm256_setzero_ps(); M];
    let mut a1 = [_mm256_setzero_ps(); M];
    load_tile::<M>(acc, NR, &mut a0, &mut a1);
    let len = g.xhi - g.xlo;
    for (xo, dyo) in g.rows() {
        fma_tile::<M>(x.add(xo), 1, cin, dy.add(dyo), cout, len, false, false, &mut a0, &mut a1);
    }
    store_tile::<M>(acc, NR, &a0, &a1);
}

/// [`dw_run`] on an AVX-512 tile of M input channels × P·16 output channels, stored at
/// `acc` with row stride 32 (the tile buffer of the AVX-512 path), any [`Mac512`] kind.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dw_run512<K: Mac512, const M: usize, const P: usize>(x: *const K::E, dy: *const K::E, g: &DwRows, acc: *mut f32) {
    use super::microkernel::{load_tile512, mac_tile512, store_tile512};
    use std::arch::x86_64::*;
    let (cin, cout) = (g.cin, g.cout);
    let mut a = [[_mm512_setzero_ps(); P]; M];
    load_tile512::<M, P>(acc, 2 * NR, &mut a);
    let len = g.xhi - g.xlo;
    for (xo, dyo) in g.rows() {
        mac_tile512::<K, M, P>(x.add(xo), 1, cin, dy.add(dyo), NR, cout, len, false, false, &mut a);
    }
    store_tile512::<M, P>(acc, 2 * NR, &a);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dw_run<const M: usize>(_: *const f32, _: *const f32, _: &DwRows, _: *mut f32) {
    unreachable!("conv3x3 direct kernel needs x86-64")
}
