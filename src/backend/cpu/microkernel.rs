//! The one register tile every hand-written CPU kernel here is built on (x86-64
//! AVX2 + FMA): `M` rows × 16 columns of f32 accumulators in 2·M ymm registers, fed per
//! reduction step by two 8-wide loads of B and `M` broadcasts of A — the BLIS "6x16"
//! shape (12 accumulators hide the FMA latency with 2 FMA pipes). Users: the direct 3x3
//! convolution (forward, data and weight gradients) and the 1x1 GEMM.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Columns of the tile.
pub const NR: usize = 16;
/// Rows of a full tile.
pub const MR: usize = 6;

/// `acc[m] += Σ_k A(m, k) · B(k, 0..16)` for `k` in `0..len`, where
/// `A(m, k) = *a.add(m·a_row + k·a_k)` and `B(k, ·)` are the 16 floats at `b.add(k·b_k)`.
/// `skip_first` / `skip_last` leave row 0 / row M−1 untouched (image-edge taps); callers
/// pass constants so the row loop unrolls without branches. Must be inlined into a
/// function compiled with `avx2,fma`.
///
/// # Safety
/// Every address read must be valid; the CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn fma_tile<const M: usize>(
    a: *const f32,
    a_row: usize,
    a_k: usize,
    b: *const f32,
    b_k: usize,
    len: usize,
    skip_first: bool,
    skip_last: bool,
    acc0: &mut [__m256; M],
    acc1: &mut [__m256; M],
) {
    for k in 0..len {
        let b0 = _mm256_loadu_ps(b.add(k * b_k));
        let b1 = _mm256_loadu_ps(b.add(k * b_k + 8));
        for m in 0..M {
            if (skip_first && m == 0) || (skip_last && m == M - 1) {
                continue;
            }
            let av = _mm256_broadcast_ss(&*a.add(m * a_row + k * a_k));
            acc0[m] = _mm256_fmadd_ps(av, b0, acc0[m]);
            acc1[m] = _mm256_fmadd_ps(av, b1, acc1[m]);
        }
    }
}

/// Loads a tile from `c` (`M` rows of 16 at stride `ldc`).
///
/// # Safety
/// `c` must hold the tile; AVX2 required.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn load_tile<const M: usize>(c: *const f32, ldc: usize, acc0: &mut [__m256; M], acc1: &mut [__m256; M]) {
    for m in 0..M {
        acc0[m] = _mm256_loadu_ps(c.add(m * ldc));
        acc1[m] = _mm256_loadu_ps(c.add(m * ldc + 8));
    }
}

/// Stores a tile to `c` (`M` rows of 16 at stride `ldc`).
///
/// # Safety
/// `c` must hold the tile; AVX2 required.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn store_tile<const M: usize>(c: *mut f32, ldc: usize, acc0: &[__m256; M], acc1: &[__m256; M]) {
    for m in 0..M {
        _mm256_storeu_ps(c.add(m * ldc), acc0[m]);
        _mm256_storeu_ps(c.add(m * ldc + 8), acc1[m]);
    }
}
