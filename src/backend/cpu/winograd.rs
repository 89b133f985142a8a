//! Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural
//! Networks") for the plain 3x3 'same' convolutions of the Stability VAE in fp32 — layers
//! that only ever run forward (encode / decode), where the U-Net's exact direct kernel
//! is not needed as a reference.
//!
//! Each 2x2 block of output pixels ("tile") reads a 4x4 input patch `d` (rows and columns
//! `2·ty − 1 .. 2·ty + 2`, zero outside the image). In one dimension
//! `y0 = m0 + m1 + m2`, `y1 = m1 − m2 − m3` with `m = (Bᵀd) ⊙ (Gg)`,
//! `Bᵀd = [d0 − d2, d1 + d2, d2 − d1, d1 − d3]`, `Gg = [g0, (g0+g1+g2)/2, (g0−g1+g2)/2, g2]`;
//! in two, the same along rows and columns. The 16 products per (tile, input channel,
//! output channel) replace the direct form's 36 (2.25x fewer multiplies), and their sum
//! over input channels is 16 GEMMs `M[ξ] (tiles × cout) = V[ξ] (tiles × cin) · U[ξ]
//! (cin × cout)` on [`super::gemm16`]'s register tile (ξ = one of the 4x4 positions).
//!
//! Work is split in fixed chunks of tiles: per chunk, the input transform writes V (16 × tiles × cin), the 16 GEMMs M, the
//! output transform the 2x2 pixels of each tile (the last row / column of an odd-sized
//! image dropped). So the result does not depend on the thread count. It is not the
//! direct kernel's result bit for bit: the transforms add and halve before the products
//! (relative difference ~1e-6 on the VAE's layers, tested), which is why only the VAE
//! takes this path and `EDM2_WINOGRAD=0` switches it off.

use rayon::prelude::*;

use super::microkernel::NR;

/// Positions of the 4x4 transformed tile.
const POS: usize = 16;

/// True unless `EDM2_WINOGRAD=0` (read once).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("EDM2_WINOGRAD").is_none_or(|v| v != "0"))
}

/// Whether a plain 3x3 layer of these widths runs here: enabled, the GEMM tile usable
/// (`cout % 16 == 0`) and the input channels in whole 16-lane vectors, at least 32 of them
/// (below that the transforms cost more than the products they save).
pub fn takes(cin: usize, cout: usize) -> bool {
    enabled() && super::gemm16::usable(cout) && cin % NR == 0 && cin >= 32
}

/// `U[ξ] = (G g Gᵀ)[ξ]` of an OHWI weight `[cout][3][3][cin]`, packed for the GEMM as
/// `[16][cout/16][cin][16]`.
pub fn transform_weight(ohwi: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    assert!(ohwi.len() == cout * 9 * cin && cout % NR == 0);
    // Per output channel: [cin][16] transformed taps, then regrouped by position.
    let mut per_o = vec![0.0f32; cout * cin * POS];
    per_o.par_chunks_mut(cin * POS).enumerate().for_each(|(o, dst)| {
        for i in 0..cin {
            let g = |ky: usize, kx: usize| ohwi[((o * 3 + ky) * 3 + kx) * cin + i];
            // Along the rows (ky), then along the columns (kx).
            let mut t = [[0.0f32; 3]; 4];
            for (kx, col) in (0..3).map(|kx| (kx, [g(0, kx), g(1, kx), g(2, kx)])) {
                for (r, v) in g_transform(col).into_iter().enumerate() {
                    t[r][kx] = v;
                }
            }
            for (r, row) in t.iter().enumerate() {
                for (c, v) in g_transform(*row).into_iter().enumerate() {
                    dst[i * POS + r * 4 + c] = v;
                }
            }
        }
    });
    let nb = cout / NR;
    let mut u = vec![0.0f32; POS * cout * cin];
    u.par_chunks_mut(cin * NR).enumerate().for_each(|(pb, dst)| {
        let (xi, ob) = (pb / nb, pb % nb);
        for i in 0..cin {
            for j in 0..NR {
                dst[i * NR + j] = per_o[((ob * NR + j) * cin + i) * POS + xi];
            }
        }
    });
    u
}

/// `Gg` of three taps.
fn g_transform([g0, g1, g2]: [f32; 3]) -> [f32; 4] {
    [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]
}

/// Tiles per chunk: four 12-row register tiles. Timed on the VAE's layers (AVX-512 Xeon,
/// 2 threads, 2026-12-08, `examples/amx_layers … 2`): 24–96 tiles alike (1.5x the direct
/// kernel at 512x512/128 channels, 1.7–1.85x at 64x64/512); V sized to half an L2 instead
/// (256 tiles at 128 channels: V and M 2 MB each) 1.2–1.3x. Overridable by
/// `EDM2_WINOGRAD_TILES` for timing (the result does not change: a tile's arithmetic does
/// not depend on its chunk).
fn chunk_tiles() -> usize {
    static TILES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *TILES.get_or_init(|| std::env::var("EDM2_WINOGRAD_TILES").ok().and_then(|v| v.parse().ok()).filter(|&v| v > 0).unwrap_or(48))
}

/// `y[N, H, W, cout] = conv3x3(x)` ('same' zero padding) of an NHWC `x` `[N, H, W, cin]`
/// with `u` from [`transform_weight`]; any `h`, `w` ≥ 1.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(x: &[f32], n: usize, h: usize, w: usize, cin: usize, u: &[f32], cout: usize, y: &mut [f32]) {
    assert!(cin % NR == 0 && cout % NR == 0 && super::gemm16::usable(cout));
    assert_eq!(x.len(), n * h * w * cin);
    assert_eq!(u.len(), POS * cin * cout);
    assert_eq!(y.len(), n * h * w * cout);
    let g = Grid { h, w, th: h.div_ceil(2), tw: w.div_ceil(2) };
    let tiles = n * g.th * g.tw;
    let per = chunk_tiles().min(tiles.max(1));
    struct Out(*mut f32);
    // SAFETY: every chunk writes the pixels of its own tiles only (disjoint 2x2 blocks).
    unsafe impl Sync for Out {}
    let out = Out(y.as_mut_ptr());
    let out = &out;
    thread_local! {
        static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    (0..tiles.div_ceil(per)).into_par_iter().for_each(|c| {
        let (t0, t1) = (c * per, ((c + 1) * per).min(tiles));
        let m = t1 - t0;
        SCRATCH.with_borrow_mut(|(v, mm)| {
            // Both are overwritten whole below (the input transform writes every element,
            // zeros included; the GEMM stores every element of M).
            v.resize(POS * m * cin, 0.0);
            mm.resize(POS * m * cout, 0.0);
            let (v, mm) = (&mut v[..POS * m * cin], &mut mm[..POS * m * cout]);
            input_transform(x, g, cin, t0, t1, v);
            for xi in 0..POS {
                super::gemm16::gemm16(m, cout, cin, &v[xi * m * cin..][..m * cin], cin, &u[xi * cin * cout..][..cin * cout], &mut mm[xi * m * cout..][..m * cout], cout, false);
            }
            // SAFETY: `out` holds n·h·w·cout floats (asserted); this chunk's tiles write
            // only their own pixels inside the image.
            unsafe { output_transform(mm, g, cout, t0, t1, out.0) };
        });
    });
}

/// The image and its tile grid.
#[derive(Clone, Copy)]
struct Grid {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Grid {
    /// Image, tile row and tile column of tile `t`.
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        (t / (self.th * self.tw), (t / self.tw) % self.th, t % self.tw)
    }
}

/// V[ξ][t − t0][ci] for tiles t0..t1 (row stride cin, position stride (t1 − t0)·cin).
fn input_transform(x: &[f32], g: Grid, cin: usize, t0: usize, t1: usize, v: &mut [f32]) {
    input_transform_wide(x, g.h, g.w, g.th, g.tw, cin, t0, t1, v)
}

crate::multiversion_wide! {
    #[allow(clippy::too_many_arguments)]
    fn input_transform_wide(x: &[f32], h: usize, w: usize, th: usize, tw: usize, cin: usize, t0: usize, t1: usize, v: &mut [f32]) {
        let g = Grid { h, w, th, tw };
        let m = t1 - t0;
        for t in t0..t1 {
            let (b, ty, tx) = g.tile(t);
            for c0 in (0..cin).step_by(NR) {
                // The 4x4 patch, 16 channels per entry, zero outside the image.
                let mut d = [[[0.0f32; NR]; 4]; 4];
                for (r, dr) in d.iter_mut().enumerate() {
                    let Some(yy) = (2 * ty + r).checked_sub(1).filter(|&yy| yy < h) else { continue };
                    for (cc, dv) in dr.iter_mut().enumerate() {
                        let Some(xx) = (2 * tx + cc).checked_sub(1).filter(|&xx| xx < w) else { continue };
                        dv.copy_from_slice(&x[((b * h + yy) * w + xx) * cin + c0..][..NR]);
                    }
                }
                // Bᵀ d along the rows, then d B along the columns.
                let e: [[Lanes; 4]; 4] = std::array::from_fn(|cc| b_transpose([d[0][cc], d[1][cc], d[2][cc], d[3][cc]]));
                // e[cc][r]: row r of Bᵀ d at column cc.
                for r in 0..4 {
                    let row = b_transpose([e[0][r], e[1][r], e[2][r], e[3][r]]);
                    for (c, val) in row.iter().enumerate() {
                        let at = (r * 4 + c) * m * cin + (t - t0) * cin + c0;
                        let dst: &mut Lanes = (&mut v[at..at + NR]).try_into().unwrap();
                        *dst = *val;
                    }
                }
            }
        }
    }
}

/// 16 lanes (channels) of one tile entry.
type Lanes = [f32; NR];

/// `Bᵀ [d0, d1, d2, d3]` lane by lane.
#[inline(always)]
fn b_transpose([d0, d1, d2, d3]: [Lanes; 4]) -> [Lanes; 4] {
    let f = |a: Lanes, b: Lanes, s: f32| -> Lanes { std::array::from_fn(|l| a[l] + s * b[l]) };
    [f(d0, d2, -1.0), f(d1, d2, 1.0), f(d2, d1, -1.0), f(d1, d3, -1.0)]
}

/// `Aᵀ [m0, m1, m2, m3]` lane by lane.
#[inline(always)]
fn a_transpose([m0, m1, m2, m3]: [Lanes; 4]) -> [Lanes; 2] {
    [std::array::from_fn(|l| m0[l] + m1[l] + m2[l]), std::array::from_fn(|l| m1[l] - m2[l] - m3[l])]
}

/// The 2x2 output pixels of tiles t0..t1 from M[ξ][t − t0][co].
///
/// # Safety
/// `y` must hold the whole output `[N, H, W, cout]` and no other thread may write these
/// tiles' pixels.
unsafe fn output_transform(mm: &[f32], g: Grid, cout: usize, t0: usize, t1: usize, y: *mut f32) {
    output_transform_wide(mm, g.h, g.w, g.th, g.tw, cout, t0, t1, y as usize)
}

crate::multiversion_wide! {
    #[allow(clippy::too_many_arguments)]
    fn output_transform_wide(mm: &[f32], h: usize, w: usize, th: usize, tw: usize, cout: usize, t0: usize, t1: usize, y: usize) {
        let g = Grid { h, w, th, tw };
        let m = t1 - t0;
        let y = y as *mut f32;
        for t in t0..t1 {
            let (b, ty, tx) = g.tile(t);
            for c0 in (0..cout).step_by(NR) {
                let entry = |xi: usize| -> Lanes {
                    let at = xi * m * cout + (t - t0) * cout + c0;
                    mm[at..at + NR].try_into().unwrap()
                };
                // Aᵀ M along the rows (4 → 2) per column c, then along the columns.
                let s: [[Lanes; 2]; 4] = std::array::from_fn(|c| a_transpose([entry(c), entry(4 + c), entry(8 + c), entry(12 + c)]));
                for i in 0..2 {
                    let yy = 2 * ty + i;
                    if yy >= h {
                        continue;
                    }
                    let px = a_transpose([s[0][i], s[1][i], s[2][i], s[3][i]]);
                    for (j, p) in px.iter().enumerate() {
                        let xx = 2 * tx + j;
                        if xx < w {
                            // SAFETY (the caller's): pixel (b, yy, xx) is inside the
                            // output and belongs to this tile alone.
                            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), y.add(((b * h + yy) * w + xx) * cout + c0), NR) };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct definition of a 'same' 3x3 convolution in f64 (OHWI weight).
    fn reference(x: &[f32], n: usize, h: usize, w: usize, cin: usize, wt: &[f32], cout: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; n * h * w * cout];
        for b in 0..n {
            for yy in 0..h {
                for xx in 0..w {
                    for o in 0..cout {
                        let mut s = 0.0f64;
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (sy, sx) = (yy as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                                if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                    continue;
                                }
                                for i in 0..cin {
                                    s += x[((b * h + sy as usize) * w + sx as usize) * cin + i] as f64 * wt[((o * 3 + ky) * 3 + kx) * cin + i] as f64;
                                }
                            }
                        }
                        y[((b * h + yy) * w + xx) * cout + o] = s;
                    }
                }
            }
        }
        y
    }

    /// Against the definition on even and odd sizes (the dropped last row / column),
    /// several chunks and a partial register tile, to within fp32 rounding.
    #[test]
    fn matches_the_direct_definition() {
        if !super::super::gemm16::usable(16) {
            return; // no AVX2 here: the path is never taken
        }
        let mut rng = crate::rng::Rng::new(7);
        for &(n, h, w, cin, cout) in &[(2, 6, 8, 32, 16), (1, 5, 7, 48, 32), (3, 9, 4, 32, 48), (1, 1, 1, 32, 16)] {
            let x = rng.normal_vec(n * h * w * cin);
            let wt = rng.normal_vec(cout * 9 * cin);
            let u = transform_weight(&wt, cout, cin);
            let mut y = vec![f32::NAN; n * h * w * cout];
            conv3x3(&x, n, h, w, cin, &u, cout, &mut y);
            let want = reference(&x, n, h, w, cin, &wt, cout);
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (a, b) in y.iter().zip(&want) {
                assert!(a.is_finite(), "an output pixel was not written ({n}x{h}x{w} {cin}->{cout})");
                num += (*a as f64 - b).powi(2);
                den += b * b;
            }
            let rel = (num / den).sqrt();
            assert!(rel < 1e-6, "{n}x{h}x{w} {cin}->{cout}: relative L2 {rel:e}");
        }
    }

    /// The chunking does not change a tile's arithmetic: one chunk per tile and one for
    /// everything give the same bits.
    #[test]
    fn chunks_do_not_change_the_bits() {
        if !super::super::gemm16::usable(16) {
            return;
        }
        let mut rng = crate::rng::Rng::new(8);
        let (n, h, w, cin, cout) = (2, 6, 6, 32, 32);
        let x = rng.normal_vec(n * h * w * cin);
        let u = transform_weight(&rng.normal_vec(cout * 9 * cin), cout, cin);
        let mut whole = vec![0.0f32; n * h * w * cout];
        conv3x3(&x, n, h, w, cin, &u, cout, &mut whole);
        // Tile by tile through the same steps as a chunk of one.
        let g = Grid { h, w, th: 3, tw: 3 };
        let mut single = vec![0.0f32; whole.len()];
        for t in 0..n * 9 {
            let mut v = vec![0.0f32; POS * cin];
            let mut mm = vec![0.0f32; POS * cout];
            input_transform(&x, g, cin, t, t + 1, &mut v);
            for xi in 0..POS {
                super::super::gemm16::gemm16(1, cout, cin, &v[xi * cin..][..cin], cin, &u[xi * cin * cout..][..cin * cout], &mut mm[xi * cout..][..cout], cout, false);
            }
            // SAFETY: `single` is the whole output; one tile at a time.
            unsafe { output_transform(&mm, g, cout, t, t + 1, single.as_mut_ptr()) };
        }
        assert!(whole.iter().zip(&single).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
