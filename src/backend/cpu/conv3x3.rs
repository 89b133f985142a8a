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

const NR: usize = 16;
const MR: usize = 6;

/// True when the CPU has AVX2 and FMA (checked once).
pub fn available() -> bool {
    super::simd::avx2_fma()
}

/// Forward packing: OHWI `[O][9][Cin]` → `[O/16][9][Cin][16]`.
pub fn pack_forward(w_ohwi: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut p = vec![0.0f32; w_ohwi.len()];
    for ob in 0..cout / NR {
        for tap in 0..9 {
            for ci in 0..cin {
                for j in 0..NR {
                    p[((ob * 9 + tap) * cin + ci) * NR + j] = w_ohwi[((ob * NR + j) * 9 + tap) * cin + ci];
                }
            }
        }
    }
    p
}

/// Data-gradient packing: OHWI `[O][9][Cin]` → `[Cin/16][9][O][16]` with the taps flipped.
pub fn pack_backward(w_ohwi: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut p = vec![0.0f32; w_ohwi.len()];
    for cb in 0..cin / NR {
        for tap in 0..9 {
            for o in 0..cout {
                for j in 0..NR {
                    p[((cb * 9 + tap) * cout + o) * NR + j] = w_ohwi[(o * 9 + (8 - tap)) * cin + cb * NR + j];
                }
            }
        }
    }
    p
}

/// `y[N, H, W, cout] = conv3x3(x, packed)` for an unpadded NHWC `x` `[N, H, W, cin]`
/// ('same' zero padding is implicit: taps that fall outside the image are skipped) and
/// `packed` from [`pack_forward`] (or [`pack_backward`] for a data gradient).
pub fn conv3x3_direct(x: &[f32], n: usize, h: usize, w: usize, cin: usize, packed: &[f32], cout: usize, y: &mut [f32]) {
    assert!(available() && cout % NR == 0);
    assert_eq!(x.len(), n * h * w * cin);
    assert_eq!(packed.len(), 9 * cin * cout);
    assert_eq!(y.len(), n * h * w * cout);
    let row_stride = w * cin;
    y.par_chunks_mut(w * cout).enumerate().for_each(|(row, yr)| {
        let (b, yy) = (row / h, row % h);
        // Rows of taps inside the image.
        let ky0 = if yy == 0 { 1 } else { 0 };
        let ky1 = if yy + 1 == h { 2 } else { 3 };
        let base = (b * h + yy) * w * cin;
        for ob in 0..cout / NR {
            let bp = &packed[ob * 9 * cin * NR..(ob + 1) * 9 * cin * NR];
            let mut x0 = 0;
            while x0 < w {
                let m = (w - x0).min(MR);
                let (left, right) = (x0 == 0, x0 + m == w);
                let c = yr[x0 * cout + ob * NR..].as_mut_ptr();
                let a = x[base + x0 * cin..].as_ptr();
                let k = Taps { ky0, ky1, row_stride, cin };
                // SAFETY: AVX2/FMA checked by `available()`. The tile reads pixel
                // (yy + ky − 1, x0 + i + kx − 1) only where it lies inside the image
                // (rows ky0..ky1; the first/last column of taps is skipped for the
                // pixel on the left/right image edge) and writes m pixels of this row.
                unsafe {
                    macro_rules! go {
                        ($m:literal) => {
                            match (left, right) {
                                (false, false) => tile::<$m, false, false>(a, k, bp.as_ptr(), c, cout),
                                (true, false) => tile::<$m, true, false>(a, k, bp.as_ptr(), c, cout),
                                (false, true) => tile::<$m, false, true>(a, k, bp.as_ptr(), c, cout),
                                (true, true) => tile::<$m, true, true>(a, k, bp.as_ptr(), c, cout),
                            }
                        };
                    }
                    match m {
                        6 => go!(6),
                        5 => go!(5),
                        4 => go!(4),
                        3 => go!(3),
                        2 => go!(2),
                        _ => go!(1),
                    }
                }
                x0 += m;
            }
        }
    });
}

/// The tap rows of a tile and the input strides.
#[derive(Clone, Copy)]
struct Taps {
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
    use std::arch::x86_64::*;
    let cin = k.cin;
    let mut acc0 = [_mm256_setzero_ps(); M];
    let mut acc1 = [_mm256_setzero_ps(); M];
    // One tap over all input channels; `skip_first`/`skip_last` are constants at each
    // call site, so the pixel loop unrolls without branches.
    #[inline(always)]
    unsafe fn tap<const M: usize>(
        ap: *const f32,
        bp: *const f32,
        cin: usize,
        skip_first: bool,
        skip_last: bool,
        acc0: &mut [__m256; M],
        acc1: &mut [__m256; M],
    ) {
        for ci in 0..cin {
            let b0 = _mm256_loadu_ps(bp.add(ci * NR));
            let b1 = _mm256_loadu_ps(bp.add(ci * NR + 8));
            for m in 0..M {
                if (skip_first && m == 0) || (skip_last && m == M - 1) {
                    continue;
                }
                let av = _mm256_broadcast_ss(&*ap.add(m * cin + ci));
                acc0[m] = _mm256_fmadd_ps(av, b0, acc0[m]);
                acc1[m] = _mm256_fmadd_ps(av, b1, acc1[m]);
            }
        }
    }
    for ky in k.ky0..k.ky1 {
        let row = a.offset((ky as isize - 1) * k.row_stride as isize);
        let bp = b.add(ky * 3 * cin * NR);
        // kx = 0 reads column x − 1; pointer arithmetic only (the skipped pixel is never read).
        tap::<M>(row.wrapping_sub(cin), bp, cin, LEFT, false, &mut acc0, &mut acc1);
        tap::<M>(row, bp.add(cin * NR), cin, false, false, &mut acc0, &mut acc1);
        tap::<M>(row.wrapping_add(cin), bp.add(2 * cin * NR), cin, false, RIGHT, &mut acc0, &mut acc1);
    }
    for m in 0..M {
        _mm256_storeu_ps(c.add(m * cstride), acc0[m]);
        _mm256_storeu_ps(c.add(m * cstride + 8), acc1[m]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const M: usize, const LEFT: bool, const RIGHT: bool>(_: *const f32, _: Taps, _: *const f32, _: *mut f32, _: usize) {
    unreachable!("conv3x3 direct kernel needs x86-64")
}
