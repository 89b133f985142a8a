//! Direct ("implicit GEMM") 3x3 'same' convolution in NHWC for x86-64 AVX2 + FMA — no
//! im2col buffer.
//!
//! Forward: `y[p, o] = Σ_{tap, ci} xpad[p + tap, ci] · w[tap, ci, o]` computed in register
//! tiles of 6 output pixels × 16 output channels (12 ymm accumulators; per input channel
//! 2 weight loads, 6 broadcasts, 12 FMAs — the BLIS Haswell 6x16 shape). The input is
//! zero-padded once (`[N, H+2, W+2, C]`, 1/9 of an im2col buffer) so every tap of a
//! 6-pixel run is a constant offset. Weights are packed per 16-channel block,
//! `[O/16][9][Cin][16]`, so a tile streams them contiguously.
//!
//! Data gradient: the same kernel on the padded output gradient with the weights
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

/// `[N, H, W, C]` → zero-padded `[N, H+2, W+2, C]`.
pub fn pad1(x: &[f32], n: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let _prof = crate::profile::scope("pad");
    let (hp, wp) = (h + 2, w + 2);
    let mut out = vec![0.0f32; n * hp * wp * c];
    out.par_chunks_mut(wp * c).enumerate().for_each(|(row, dst)| {
        let (b, yp) = (row / hp, row % hp);
        if yp == 0 || yp == hp - 1 {
            return;
        }
        let src = ((b * h + yp - 1) * w) * c;
        dst[c..c + w * c].copy_from_slice(&x[src..src + w * c]);
    });
    out
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

/// `y[N, H, W, cout] = conv3x3(xpad, packed)` where `xpad` is `[N, H+2, W+2, cin]` and
/// `packed` comes from [`pack_forward`] (or [`pack_backward`] for a data gradient).
pub fn conv3x3_direct(xpad: &[f32], n: usize, h: usize, w: usize, cin: usize, packed: &[f32], cout: usize, y: &mut [f32]) {
    assert!(available() && cout % NR == 0);
    assert_eq!(xpad.len(), n * (h + 2) * (w + 2) * cin);
    assert_eq!(packed.len(), 9 * cin * cout);
    assert_eq!(y.len(), n * h * w * cout);
    let row_stride = (w + 2) * cin;
    y.par_chunks_mut(w * cout).enumerate().for_each(|(row, yr)| {
        let (b, yy) = (row / h, row % h);
        let a_row = ((b * (h + 2) + yy) * (w + 2)) * cin;
        for ob in 0..cout / NR {
            let bp = &packed[ob * 9 * cin * NR..(ob + 1) * 9 * cin * NR];
            let mut x0 = 0;
            while x0 < w {
                let m = (w - x0).min(MR);
                let a = &xpad[a_row + x0 * cin..];
                let c = &mut yr[x0 * cout + ob * NR..];
                // SAFETY: AVX2/FMA checked by `available()`; every pointer offset stays
                // within the slices (asserted sizes above: the tile reads rows yy..yy+2
                // and columns x0..x0+m+1 of the padded input, and writes m pixels).
                unsafe {
                    match m {
                        6 => tile::<6>(a.as_ptr(), row_stride, cin, bp.as_ptr(), c.as_mut_ptr(), cout),
                        5 => tile::<5>(a.as_ptr(), row_stride, cin, bp.as_ptr(), c.as_mut_ptr(), cout),
                        4 => tile::<4>(a.as_ptr(), row_stride, cin, bp.as_ptr(), c.as_mut_ptr(), cout),
                        3 => tile::<3>(a.as_ptr(), row_stride, cin, bp.as_ptr(), c.as_mut_ptr(), cout),
                        2 => tile::<2>(a.as_ptr(), row_stride, cin, bp.as_ptr(), c.as_mut_ptr(), cout),
                        _ => tile::<1>(a.as_ptr(), row_stride, cin, bp.as_ptr(), c.as_mut_ptr(), cout),
                    }
                }
                x0 += m;
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const M: usize>(a: *const f32, row_stride: usize, cin: usize, b: *const f32, c: *mut f32, cstride: usize) {
    use std::arch::x86_64::*;
    let mut acc0 = [_mm256_setzero_ps(); M];
    let mut acc1 = [_mm256_setzero_ps(); M];
    for ky in 0..3 {
        for kx in 0..3 {
            let ap = a.add(ky * row_stride + kx * cin);
            let bp = b.add((ky * 3 + kx) * cin * NR);
            for ci in 0..cin {
                let b0 = _mm256_loadu_ps(bp.add(ci * NR));
                let b1 = _mm256_loadu_ps(bp.add(ci * NR + 8));
                for m in 0..M {
                    let av = _mm256_broadcast_ss(&*ap.add(m * cin + ci));
                    acc0[m] = _mm256_fmadd_ps(av, b0, acc0[m]);
                    acc1[m] = _mm256_fmadd_ps(av, b1, acc1[m]);
                }
            }
        }
    }
    for m in 0..M {
        _mm256_storeu_ps(c.add(m * cstride), acc0[m]);
        _mm256_storeu_ps(c.add(m * cstride + 8), acc1[m]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const M: usize>(_: *const f32, _: usize, _: usize, _: *const f32, _: *mut f32, _: usize) {
    unreachable!("conv3x3 direct kernel needs x86-64")
}
