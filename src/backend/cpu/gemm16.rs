//! A GEMM for the shapes this network has: `C[M×N] = A[M×K] · B[K×N]` with `N % 16 == 0`
//! and small K/N (1x1 convolutions, attention), on the same 6x16 AVX2/FMA register tile
//! as the direct 3x3 kernel. `A` is row-major with row stride `lda`; `B` is packed once
//! per call into 16-column panels `[N/16][K][16]` (contiguous streaming, one 64-byte line
//! per k). Rows run in blocks of 6 (remainder blocks 1–5 are compile-time variants).
//!
//! Why not the `gemm` crate here: on these shapes (N = 64–384, K = 64–256) it packs A
//! on every call and reaches ~80 GFLOP/s on 2 Zen 2 cores; this tile needs no A packing
//! (each broadcast A element is used 16 times from L1) — measured in docs/perf.md.
//! Deterministic: one accumulation chain per output element, fixed order.

use super::simd::avx2_fma;
use rayon::prelude::*;

use super::conv3x3::ConvTile;
use super::microkernel::{Bf16Dot, F32Fma, Mac512, MR, NR};

/// Whether [`gemm16`] can run: AVX2+FMA present and `n % 16 == 0`.
pub fn usable(n: usize) -> bool {
    avx2_fma() && n % NR == 0 && n > 0
}

/// Packs `B[K×N]` given elementwise into `[N/16][K][16]`.
pub fn pack_b(k: usize, n: usize, get: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    let mut p = vec![0.0f32; k * n];
    for nb in 0..n / NR {
        for kk in 0..k {
            for j in 0..NR {
                p[(nb * k + kk) * NR + j] = get(kk, nb * NR + j);
            }
        }
    }
    p
}

/// Packs a row-major `B[K×N]` (leading dimension `n`).
pub fn pack_b_rm(b: &[f32], k: usize, n: usize) -> Vec<f32> {
    pack_b(k, n, |kk, j| b[kk * n + j])
}

/// Packs `Bᵀ` of a row-major `[N×K]` buffer, i.e. `B[kk][j] = bt[j·K + kk]`.
pub fn pack_b_t(bt: &[f32], k: usize, n: usize) -> Vec<f32> {
    pack_b(k, n, |kk, j| bt[j * k + kk])
}

/// `C (row stride ldc) = A (row stride lda) · B` with `B` from [`pack_b`]. `parallel`:
/// split rows across the rayon pool (false inside an already parallel loop).
#[allow(clippy::too_many_arguments)]
pub fn gemm16(m: usize, n: usize, k: usize, a: &[f32], lda: usize, bp: &[f32], c: &mut [f32], ldc: usize, parallel: bool) {
    assert!(usable(n));
    gemm_rows::<F32Fma>(m, n, k, a, lda, bp, c, ldc, parallel, super::simd::avx512())
}

/// [`gemm16`] with bf16 products ([`super::bf16`]): `a` holds bf16 pairs along K (`k`
/// counts pairs, `lda` is in pairs: [`super::bf16::to_bf16_pairs`]) and `bp` is the
/// packing of [`gemm16`] as pairs over K ([`super::bf16::pack_pairs`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm16_bf16(m: usize, n: usize, k: usize, a: &[u32], lda: usize, bp: &[u32], c: &mut [f32], ldc: usize, parallel: bool) {
    assert!(usable(n) && super::bf16::available());
    if !parallel && super::amx::takes_gemm(m, n, k) {
        // On the tiles where the processor has them (the attention's products).
        return super::amx::gemm_seq(m, n, k, a, lda, bp, c, ldc);
    }
    gemm_rows::<Bf16Dot>(m, n, k, a, lda, bp, c, ldc, parallel, true)
}

/// The row-block driver for either element kind (`wide`: AVX-512 tiles; the AVX2 ones,
/// `!wide`, only for f32).
#[allow(clippy::too_many_arguments)]
fn gemm_rows<K: ConvTile>(m: usize, n: usize, k: usize, a: &[K::E], lda: usize, bp: &[K::E], c: &mut [f32], ldc: usize, parallel: bool, wide: bool) {
    assert!(n % NR == 0 && lda >= k && ldc >= n && bp.len() == k * n);
    assert!(wide || K::F32_ELEMENTS);
    if m == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k && c.len() >= (m - 1) * ldc + n);
    // AVX2: tiles of up to 6 rows × 16 columns; AVX-512: up to 12 rows × 32 columns (two
    // packed panels; a last odd panel alone), the same products in the same order per
    // element (bit-identical).
    let (mr, step) = if wide { (super::microkernel::MR512, 2) } else { (MR, 1) };
    let nb = n / NR;
    // Row blocks of 96 (16 tiles of 6, 8 of 12) per task.
    let rows_per_task = 96;
    let body = |(t, cc): (usize, &mut [f32])| {
        let r0 = t * rows_per_task;
        let r1 = (r0 + rows_per_task).min(m);
        // Row tiles outer, column panels inner: the mr×K slice of A stays in L1 while
        // the packed B panels stream from L2.
        let mut r = r0;
        while r < r1 {
            let mm = (r1 - r).min(mr);
            let ap = a[r * lda..].as_ptr();
            for pb in (0..nb).step_by(step) {
                let two = wide && pb + 1 < nb;
                let b = bp[pb * k * NR..].as_ptr();
                let cp = cc[(r - r0) * ldc + pb * NR..].as_mut_ptr();
                // SAFETY: AVX2/FMA present (`usable`; AVX-512F by `avx512()` when wide);
                // reads rows r..r+mm of A (k elements each, inside `a` by the assert
                // above) and the one or two k×16 panels from pb, writes those columns of
                // this task's C rows.
                unsafe {
                    if wide {
                        macro_rules! go {
                            ($m:literal) => {
                                if two {
                                    K::gemm::<$m, 2>(ap, lda, k, b, k * NR, cp, ldc)
                                } else {
                                    K::gemm::<$m, 1>(ap, lda, k, b, k * NR, cp, ldc)
                                }
                            };
                        }
                        crate::rows_dispatch!(mm, go, 12)
                    } else {
                        macro_rules! go {
                            ($m:literal) => {
                                // `!wide` only for f32 (asserted above).
                                kern::<$m>(ap as *const f32, lda, k, b as *const f32, cp, ldc)
                            };
                        }
                        crate::rows_dispatch!(mm, go, 6)
                    }
                }
            }
            r += mm;
        }
    };
    // Each task owns `rows_per_task` rows of C (the last one possibly fewer).
    let c = &mut c[..(m - 1) * ldc + n];
    if parallel {
        c.par_chunks_mut(rows_per_task * ldc).enumerate().for_each(body);
    } else {
        c.chunks_mut(rows_per_task * ldc).enumerate().for_each(body);
    }
}

/// One AVX-512 tile of `C = A · B` for any [`Mac512`] kind (inlined into
/// [`ConvTile::gemm`], which carries the CPU features).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn kern512<K: Mac512, const M: usize, const P: usize>(a: *const K::E, lda: usize, k: usize, b: *const K::E, b_panel: usize, c: *mut f32, ldc: usize) {
    use super::microkernel::{mac_tile512, store_tile512};
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); P]; M];
    mac_tile512::<K, M, P>(a, lda, 1, b, b_panel, NR, k, false, false, &mut acc);
    store_tile512::<M, P>(c, ldc, &acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kern<const M: usize>(a: *const f32, lda: usize, k: usize, b: *const f32, c: *mut f32, ldc: usize) {
    use super::microkernel::{fma_tile, store_tile};
    use std::arch::x86_64::*;
    let mut acc0 = [_mm256_setzero_ps(); M];
    let mut acc1 = [_mm256_setzero_ps(); M];
    fma_tile::<M>(a, lda, 1, b, NR, k, false, false, &mut acc0, &mut acc1);
    store_tile::<M>(c, ldc, &acc0, &acc1);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kern<const M: usize>(_: *const f32, _: usize, _: usize, _: *const f32, _: *mut f32, _: usize) {
    unreachable!("gemm16 needs x86-64")
}

/// `C[M×N] = A · Bᵀ` with bf16 products (fp32 accumulation, one thread): `a` row-major
/// `[M][K]`, `b` row-major `[N][K]`, K even, N a multiple of 16 (the attention's
/// `q·kᵀ` and `dy·vᵀ`). Both operands are rounded to bf16 here.
pub fn gemm_abt_bf16(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(k % 2 == 0 && a.len() == m * k && b.len() == n * k && c.len() == m * n);
    let (ap, bp) = (super::bf16::to_bf16_pairs_seq(a), super::bf16::to_bf16_pairs_seq(b));
    let kp = k / 2;
    // Panels [N/16][K/2][16]: lane j of pair kk is row j of B, its pair kk.
    let mut packed = vec![0u32; n * kp];
    for (nb, panel) in packed.chunks_mut(kp * NR).enumerate() {
        for kk in 0..kp {
            for j in 0..NR {
                panel[kk * NR + j] = bp[(nb * NR + j) * kp + kk];
            }
        }
    }
    gemm16_bf16(m, n, kp, &ap, kp, &packed, c, n, false);
}

/// `C[M×N] = Aᵀ · B` with bf16 products (fp32 accumulation, one thread): `a` row-major
/// `[K][M]` (A transposed), `b` row-major `[K][N]`, K even, N a multiple of 16 (the
/// attention's `wᵀ·dy` and `dlᵀ·q`).
pub fn gemm_atb_bf16(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(k % 2 == 0 && a.len() == k * m && b.len() == k * n && c.len() == m * n);
    let kp = k / 2;
    // Rows 2kk and 2kk + 1 of `a` as pairs along its columns: `[K/2][M]`, then transposed
    // to the row-major `[M][K/2]` the tile broadcasts from.
    let mut at = vec![0u32; kp * m];
    for (kk, row) in at.chunks_mut(m).enumerate() {
        super::bf16::interleave_rows(&a[2 * kk * m..][..m], &a[(2 * kk + 1) * m..][..m], row);
    }
    let mut ap = vec![0u32; m * kp];
    transpose(&at, kp, m, &mut ap);
    gemm16_bf16(m, n, kp, &ap, kp, &pack_rows_paired(b, kp, n), c, n, false);
}

/// A row-major `[K][N]` (K = 2·`kp`) as the panels of [`gemm16_bf16`], `[N/16][K/2][16]`:
/// lane j of pair kk holds rows 2kk and 2kk + 1 of column j.
fn pack_rows_paired(b: &[f32], kp: usize, n: usize) -> Vec<u32> {
    let r = super::bf16::round;
    let mut packed = vec![0u32; n * kp];
    for (nb, panel) in packed.chunks_mut(kp * NR).enumerate() {
        for kk in 0..kp {
            let (r0, r1) = (&b[2 * kk * n + nb * NR..][..NR], &b[(2 * kk + 1) * n + nb * NR..][..NR]);
            for j in 0..NR {
                panel[kk * NR + j] = r(r0[j]) as u32 | (r(r1[j]) as u32) << 16;
            }
        }
    }
    packed
}

/// `C[M×N] = A · B` with bf16 products (fp32 accumulation, one thread): `a` row-major
/// `[M][K]`, `b` row-major `[K][N]`, K even, N a multiple of 16 (the attention's `w·v`
/// and `dl·k`).
pub fn gemm_ab_bf16(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(k % 2 == 0 && a.len() == m * k && b.len() == k * n && c.len() == m * n);
    let ap = super::bf16::to_bf16_pairs_seq(a);
    let kp = k / 2;
    gemm16_bf16(m, n, kp, &ap, kp, &pack_rows_paired(b, kp, n), c, n, false);
}

/// `C[M×N] = A · Bᵀ` in fp32 on the register tiles (one thread): `a` row-major `[M][K]`,
/// `b` row-major `[N][K]`, N a multiple of 16 (the attention's `q·kᵀ` and `dy·vᵀ`).
pub fn gemm_abt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() == m * k && b.len() == n * k && c.len() == m * n);
    gemm16(m, n, k, a, k, &pack_b_t(b, k, n), c, n, false);
}

/// `C[M×N] = Aᵀ · B` in fp32 on the register tiles (one thread): `a` row-major `[K][M]`
/// (A transposed; copied to `[M][K]` so each tile row broadcasts from contiguous memory:
/// M·K moves against 2·M·N·K FLOPs), `b` row-major `[K][N]`, N a multiple of 16 (the
/// attention's `wᵀ·dy` and `dlᵀ·q`).
pub fn gemm_atb(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() == k * m && b.len() == k * n && c.len() == m * n);
    let mut at = vec![0.0f32; m * k];
    transpose(a, k, m, &mut at);
    gemm16(m, n, k, &at, k, &pack_b_rm(b, k, n), c, n, false);
}

/// `C[M×N] = A · B` in fp32 on the register tiles (one thread): `a` row-major `[M][K]`,
/// `b` row-major `[K][N]`, N a multiple of 16 (the attention's `w·v` and `dl·k`).
pub fn gemm_ab(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n);
    gemm16(m, n, k, a, k, &pack_b_rm(b, k, n), c, n, false);
}

/// `t[c][r] = s[r][c]` for a row-major `s` `[rows][cols]`, in 16x16 blocks (both sides
/// touch whole cache lines).
fn transpose<T: Copy>(s: &[T], rows: usize, cols: usize, t: &mut [T]) {
    const B: usize = 16;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    t[c * rows + r] = s[r * cols + c];
                }
            }
        }
    }
}
