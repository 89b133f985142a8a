//! The register tiles every hand-written CPU kernel here is built on (x86-64). AVX2 +
//! FMA: `M` rows × 16 columns of f32 accumulators in 2·M ymm registers, fed per reduction
//! step by two 8-wide loads of B and `M` broadcasts of A — the BLIS "6x16" shape (12
//! accumulators hide the FMA latency with 2 FMA pipes). AVX-512F: `M` rows × `P` panels
//! of 16 in M·P zmm registers (12x32: 24 accumulators), same packing, same order of
//! products per output element (the two paths give the same bits). Users: the direct
//! 3x3 convolution (forward, data and weight gradients) and the 1x1 GEMM.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `rows_dispatch!(m, go, 6)` (or `12`) expands to `match m { 6 => go!(6), …, _ => go!(1) }`:
/// the compile-time row count of a tile from a run-time one.
#[macro_export]
macro_rules! rows_dispatch {
    ($m:expr, $go:ident, 6) => {
        match $m {
            6 => $go!(6),
            5 => $go!(5),
            4 => $go!(4),
            3 => $go!(3),
            2 => $go!(2),
            _ => $go!(1),
        }
    };
    ($m:expr, $go:ident, 12) => {
        match $m {
            12 => $go!(12),
            11 => $go!(11),
            10 => $go!(10),
            9 => $go!(9),
            8 => $go!(8),
            7 => $go!(7),
            m => $crate::rows_dispatch!(m, $go, 6),
        }
    };
}

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

/// Rows of a full AVX-512 tile: 12 rows × 2 panels of 16 = 24 zmm accumulators, plus 2 B
/// loads and a broadcast, of the 32 registers.
pub const MR512: usize = 12;

/// What one AVX-512 reduction step multiplies: the element type of A and B, how it is
/// loaded (16 lanes) and broadcast, and the multiply-accumulate into 16 f32 lanes.
/// [`F32Fma`]: one f32 per lane, `vfmadd231ps` (the fp32 reference). [`Bf16Dot`]: one
/// `u32` holding two bf16 per lane (the pair a `vdpbf16ps` lane reduces: low half first),
/// i.e. twice the products per instruction; the CPU's `--precision bf16` mode.
#[cfg(target_arch = "x86_64")]
pub trait Mac512 {
    type E: Copy + Send + Sync;
    /// Whether `E` is f32: only then may a driver hand the same slices to the AVX2 tiles
    /// (which take f32) on a machine without AVX-512.
    const F32_ELEMENTS: bool;
    type V: Copy;
    /// 16 lanes from `p`.
    unsafe fn load(p: *const Self::E) -> Self::V;
    /// `*p` in every lane.
    unsafe fn bcast(p: *const Self::E) -> Self::V;
    /// `acc + a · b` per lane (for bf16 pairs: `acc + a.lo·b.lo + a.hi·b.hi`).
    unsafe fn mac(acc: __m512, a: Self::V, b: Self::V) -> __m512;
}

/// Elsewhere only the element types (the AVX-512 tiles never run there).
#[cfg(not(target_arch = "x86_64"))]
pub trait Mac512 {
    type E: Copy + Send + Sync;
    /// As on x86-64.
    const F32_ELEMENTS: bool;
}
#[cfg(not(target_arch = "x86_64"))]
impl Mac512 for F32Fma {
    type E = f32;
    const F32_ELEMENTS: bool = true;
}
#[cfg(not(target_arch = "x86_64"))]
impl Mac512 for Bf16Dot {
    type E = u32;
    const F32_ELEMENTS: bool = false;
}

/// fp32 products on `vfmadd231ps` (see [`Mac512`]).
pub struct F32Fma;
/// bf16-pair products on `vdpbf16ps`, fp32 accumulation (see [`Mac512`]).
pub struct Bf16Dot;

#[cfg(target_arch = "x86_64")]
impl Mac512 for F32Fma {
    type E = f32;
    const F32_ELEMENTS: bool = true;
    type V = __m512;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn bcast(p: *const f32) -> __m512 {
        _mm512_set1_ps(*p)
    }
    #[inline(always)]
    unsafe fn mac(acc: __m512, a: __m512, b: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, acc)
    }
}

#[cfg(target_arch = "x86_64")]
impl Mac512 for Bf16Dot {
    type E = u32;
    const F32_ELEMENTS: bool = false;
    type V = __m512bh;
    #[inline(always)]
    unsafe fn load(p: *const u32) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i))
    }
    #[inline(always)]
    unsafe fn bcast(p: *const u32) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*p as i32))
    }
    #[inline(always)]
    unsafe fn mac(acc: __m512, a: __m512bh, b: __m512bh) -> __m512 {
        _mm512_dpbf16_ps(acc, a, b)
    }
}

/// The AVX-512 form of [`fma_tile`], for any [`Mac512`] element: `M` rows × `P` panels
/// of 16 columns (one zmm accumulator per row and panel). Panel `p` of B is read at
/// `b.add(p·b_panel + k·b_k)`, so the panels of a packed `[N/16][K][16]` weight (or two
/// halves of a 32-wide row) feed one tile with the same packing as the AVX2 path. With
/// [`F32Fma`] the products of an output element are accumulated in the same order as
/// [`fma_tile`], so both fp32 paths give the same bits. Must be inlined into a function
/// compiled with `avx512f` (and `avx512bf16` for [`Bf16Dot`]).
///
/// # Safety
/// Every address read must be valid; the CPU must support what `K` uses.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn mac_tile512<K: Mac512, const M: usize, const P: usize>(
    a: *const K::E,
    a_row: usize,
    a_k: usize,
    b: *const K::E,
    b_panel: usize,
    b_k: usize,
    len: usize,
    skip_first: bool,
    skip_last: bool,
    acc: &mut [[__m512; P]; M],
) {
    for k in 0..len {
        let bv: [K::V; P] = std::array::from_fn(|p| K::load(b.add(p * b_panel + k * b_k)));
        for m in 0..M {
            if (skip_first && m == 0) || (skip_last && m == M - 1) {
                continue;
            }
            let av = K::bcast(a.add(m * a_row + k * a_k));
            for p in 0..P {
                acc[m][p] = K::mac(acc[m][p], av, bv[p]);
            }
        }
    }
}

/// Loads an `M` × `P`·16 tile from `c` (row stride `ldc`, panel `p` at `c + 16p`).
///
/// # Safety
/// `c` must hold the tile; AVX-512F required.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn load_tile512<const M: usize, const P: usize>(c: *const f32, ldc: usize, acc: &mut [[__m512; P]; M]) {
    for (m, row) in acc.iter_mut().enumerate() {
        for (p, v) in row.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(c.add(m * ldc + p * NR));
        }
    }
}

/// Stores an `M` × `P`·16 tile to `c` (row stride `ldc`, panel `p` at `c + 16p`).
///
/// # Safety
/// `c` must hold the tile; AVX-512F required.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn store_tile512<const M: usize, const P: usize>(c: *mut f32, ldc: usize, acc: &[[__m512; P]; M]) {
    for (m, row) in acc.iter().enumerate() {
        for (p, v) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(m * ldc + p * NR), *v);
        }
    }
}
