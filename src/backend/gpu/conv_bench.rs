//! Our convolutions against cuBLAS on the same problem sizes (issue 14, item 4): for each
//! convolution shape and direction a step ran (the shapes [`Gpu::conv_choices`] lists),
//! the kernel the tuning kept, timed on the device with CUDA events over back-to-back
//! launches, next to cuBLAS's bf16 GEMM (`cublasGemmEx`, bf16 operands, fp32 compute) of
//! the implicit GEMM's M, N, K ([`gemm_dims`]). For 1x1 convolutions the GEMM *is* the
//! convolution, so cuBLAS runs on the same operands and its result is compared with ours
//! (relative L2); a 3x3 convolution would need an im2col copy of the input for that (up to
//! 1.2 GB at EDM2-XS batch 128), so only its time is compared there (the parity tests check
//! its values against the CPU backend).
//!
//! Only in the `cuda` build (the simulator has no cuBLAS); cuBLAS is loaded at run time,
//! and a machine without it gets an error naming the library, not a panic.

use super::conv_algo::{ConvAlgo, ConvDir, ConvKey};
use super::Gpu;
use crate::error::Result;

/// One row of the comparison.
#[derive(Clone, Debug)]
pub struct VsCublas {
    pub key: ConvKey,
    /// The variant that ran ours.
    pub algo: ConvAlgo,
    /// The implicit GEMM's sizes ([`gemm_dims`]).
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ours_ms: f64,
    pub cublas_ms: f64,
    /// ‖ours − cuBLAS‖ / ‖cuBLAS‖ where both ran on the same operands (1x1), else None.
    pub rel_l2: Option<f64>,
}

impl VsCublas {
    /// Rate of `ms` on this problem, in TFLOP/s (2 FLOPs per multiply-add).
    pub fn tflops(&self, ms: f64) -> f64 {
        2.0 * self.key.macs() / (ms * 1e-3) / 1e12
    }
}

/// The implicit GEMM of a convolution, row-major `C[M×N] = A[M×K]·B[K×N]`: forward
/// M = pixels, N = cout, K = taps·cin; data gradient M = pixels, N = cin, K = taps·cout;
/// weight gradient M = cout, N = taps·cin, K = pixels.
pub fn gemm_dims(key: &ConvKey) -> (usize, usize, usize) {
    let taps = key.k.max(1) * key.k.max(1);
    let pixels = key.n * key.h * key.w;
    match key.dir {
        ConvDir::Forward => (pixels, key.cout, taps * key.cin),
        ConvDir::Data => (pixels, key.cin, taps * key.cout),
        ConvDir::Weight => (key.cout, taps * key.cin, pixels),
    }
}

/// Times ours and cuBLAS on every bf16 shape of `keys` (each as the mean of `reps`
/// back-to-back launches after a warm-up). The device's precision must be bf16. Our time
/// includes what our call launches besides the product (the bf16 weight conversion, the
/// data gradient's weight flip); cuBLAS gets its operands ready-made.
/// `visit`, when given, is called for each shape with a launcher of ours and one of cuBLAS
/// (for a benchmark harness to time them its own way; the criterion group
/// `cuda/conv_shapes` does).
#[cfg(feature = "cuda")]
pub fn compare_with_cublas(gpu: &Gpu, keys: &[ConvKey], reps: usize, mut visit: Option<&mut Visit>) -> Result<Vec<VsCublas>> {
    use super::kernels::{self as kk, ConvGeom, Gain, Nhwc};
    use super::{driver_err, Dtype, GpuAct};
    use crate::error::Error;
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t as Op, cudaDataType_t as Ty};
    if gpu.act_dtype() != Dtype::Bf16 {
        return Err(Error::Input("the cuBLAS comparison runs in bf16 (--precision bf16)".into()));
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(Error::DeviceUnavailable("cuBLAS (libcublas.so) was not found on this machine: no comparison".into()));
    }
    let blas = cudarc::cublas::CudaBlas::new(gpu.stream.clone()).map_err(|e| driver_err("creating the cuBLAS handle", e))?;
    let reps = reps.max(1);
    let mut rng = crate::rng::Rng::new(14);
    let mut rows = Vec::new();
    let keys: Vec<ConvKey> = keys.iter().copied().filter(|k| k.bf16).collect();
    // The 3x3 problems' cuBLAS operands: scratch of the largest size, allocated once (the
    // buffer pool keeps every size it has seen).
    let most = |f: &dyn Fn(usize, usize, usize) -> usize| {
        keys.iter().filter(|k| k.k > 1).map(|key| {
            let (m, n, k) = gemm_dims(key);
            f(m, n, k)
        }).max().unwrap_or(0)
    };
    // (Contents unspecified: only timed. At least one element: no zero-size allocation.)
    let scratch_a = gpu.alloc_dtype(Dtype::Bf16, most(&|m, _, k| m * k).max(1))?;
    let scratch_b = gpu.alloc_dtype(Dtype::Bf16, most(&|_, n, k| k * n).max(1))?;
    let mut scratch_c = gpu.alloc::<f32>(most(&|m, n, _| m * n).max(1))?;
    // Random activations drawn once at the largest size (drawing ~10^8 normals per shape
    // would take longer than the timing); x and dy are windows of it.
    let biggest = keys.iter().map(|k| k.n * k.h * k.w * k.cin.max(k.cout)).max().unwrap_or(0);
    let noise = rng.normal_vec(biggest + 1);
    for key in &keys {
        let s = Nhwc { n: key.n, h: key.h, w: key.w, c: key.cin };
        let geom = ConvGeom { out_ch: key.cout, in_ch: key.cin, k: key.k };
        let (m, n, k) = gemm_dims(key);
        let w = gpu.upload(&rng.normal_vec(geom.numel()))?;
        let eff = kk::effective_weight(gpu, &w, geom, Gain::Value(1.0))?;
        let x = gpu.upload_act(&noise[..s.numel()])?;
        let dy = gpu.upload_act(&noise[1..1 + s.pixels() * key.cout])?;
        let mut y = gpu.alloc_act(s.pixels() * key.cout)?;
        let mut dx = gpu.alloc_act(s.numel())?;
        let mut de = gpu.alloc::<f32>(geom.numel())?;
        // Ours: the dispatcher, so the variant kept for this shape runs.
        let mut ours = |dir: ConvDir| -> Result<()> {
            match dir {
                ConvDir::Forward => kk::conv_forward(gpu, &eff, &x, s, &mut y),
                ConvDir::Data => kk::conv_backward_data(gpu, &eff, &dy, s, &mut dx),
                ConvDir::Weight => kk::conv_backward_weight(gpu, geom, &x, s, &dy, &mut de),
            }
        };
        ours(key.dir)?;
        let ours_ms = gpu.time_ms(&mut || (0..reps).try_for_each(|_| ours(key.dir)))? / reps as f64;
        let algo = gpu.conv_choices().iter().find(|c| c.key == *key).map_or(ConvAlgo::Simt, |c| c.algo);
        // cuBLAS, column-major: the row-major C[M×N] is Cᵀ [N×M] = Bᵀ·Aᵀ. 1x1: the real
        // operands (weights bf16 [O][I]); 3x3: scratch operands of the same sizes.
        let one = key.k <= 1;
        let wb = kk::scaled_to(gpu, &eff.w, Dtype::Bf16, 1.0)?;
        let fp32_out = key.dir == ConvDir::Weight;
        let mut c_out = if one { Some(gpu.alloc_dtype(if fp32_out { Dtype::F32 } else { Dtype::Bf16 }, m * n)?) } else { None };
        let p = |a: &GpuAct| a.vptr(gpu);
        // (transa, transb, A, lda, B, ldb) of the column-major call with m' = N, n' = M.
        let (ta, tb, a_ptr, lda, b_ptr, ldb) = match (key.dir, one) {
            // y[p][o] = Σ_i x[p][i]·w[o][i]: Yᶜ(o,p) = Σ_i Wᶜ(i,o)·Xᶜ(i,p).
            (ConvDir::Forward, true) => (Op::CUBLAS_OP_T, Op::CUBLAS_OP_N, p(&wb), key.cin, p(&x), key.cin),
            // dx[p][i] = Σ_o dy[p][o]·w[o][i]: DXᶜ = Wᶜ·DYᶜ.
            (ConvDir::Data, true) => (Op::CUBLAS_OP_N, Op::CUBLAS_OP_N, p(&wb), key.cin, p(&dy), key.cout),
            // dw[o][i] = Σ_p dy[p][o]·x[p][i]: DWᶜ = Xᶜ·DYᶜᵀ.
            (ConvDir::Weight, true) => (Op::CUBLAS_OP_N, Op::CUBLAS_OP_T, p(&x), key.cin, p(&dy), key.cout),
            // Row-major A[M×K], B[K×N] as scratch: Cᶜ(N×M) = Bᶜ(N×K)·Aᶜ(K×M).
            (_, false) => (Op::CUBLAS_OP_N, Op::CUBLAS_OP_N, p(&scratch_b), n, p(&scratch_a), k),
        };
        let c_ptr = match c_out.as_mut() {
            Some(c) => c.vptr_mut(gpu),
            None => scratch_c.ptr_mut(gpu) as *mut std::ffi::c_void,
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let int = |v: usize| i32::try_from(v).map_err(|_| Error::Input(format!("cuBLAS comparison: {v} does not fit an int ({key:?})")));
        let (gm, gn, gk, glda, gldb) = (int(n)?, int(m)?, int(k)?, int(lda)?, int(ldb)?);
        let cublas = || -> Result<()> {
            // SAFETY: the operands hold at least lda·(columns) elements as laid out above
            // (checked sizes: m·k, k·n and m·n elements), all on this device, ordered on
            // the compute stream the handle uses.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    ta,
                    tb,
                    gm,
                    gn,
                    gk,
                    &alpha as *const f32 as *const _,
                    a_ptr,
                    Ty::CUDA_R_16BF,
                    glda,
                    b_ptr,
                    Ty::CUDA_R_16BF,
                    gldb,
                    &beta as *const f32 as *const _,
                    c_ptr,
                    if fp32_out { Ty::CUDA_R_32F } else { Ty::CUDA_R_16BF },
                    gm,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| driver_err("cublasGemmEx", e))
        };
        cublas()?;
        if let Some(v) = visit.as_mut() {
            v(key, &mut || ours(key.dir), &mut || cublas())?;
        }
        let cublas_ms = gpu.time_ms(&mut || (0..reps).try_for_each(|_| cublas()))? / reps as f64;
        let rel_l2 = if let Some(c_out) = &c_out {
            let ours_out = match key.dir {
                ConvDir::Forward => gpu.download_act(&y)?,
                ConvDir::Data => gpu.download_act(&dx)?,
                ConvDir::Weight => gpu.download(&de)?,
            };
            let theirs = gpu.download_act(c_out)?;
            let (num, den) = ours_out.iter().zip(&theirs).fold((0.0f64, 0.0f64), |(nu, de), (&a, &b)| {
                (nu + (a as f64 - b as f64).powi(2), de + (b as f64).powi(2))
            });
            Some((num / den.max(f64::MIN_POSITIVE)).sqrt())
        } else {
            None
        };
        rows.push(VsCublas { key: *key, algo, m, n, k, ours_ms, cublas_ms, rel_l2 });
    }
    Ok(rows)
}

/// A visitor of [`compare_with_cublas`]: (shape, launch ours, launch cuBLAS).
pub type Visit<'a> = dyn FnMut(&ConvKey, &mut dyn FnMut() -> Result<()>, &mut dyn FnMut() -> Result<()>) -> Result<()> + 'a;

/// Prints the rows as a table (TFLOP/s, % of `peak_tflops`, the speed ratio cuBLAS time /
/// ours — above 1 where ours is faster —, rel L2) and the sum over the shapes.
pub fn print_table(rows: &[VsCublas], reps: usize, peak_tflops: f64) {
    println!("ours against cuBLAS (bf16 GEMM of the same M, N, K; mean of {reps} back-to-back launches):");
    println!(
        "  {:<7} {:<28} {:>22} {:<10} {:>9} {:>7} {:>6} {:>9} {:>7} {:>6} {:>7} {:>9}",
        "dir", "shape", "M x N x K", "ours", "ms", "TFLOP/s", "%peak", "cuBLAS ms", "TFLOP/s", "%peak", "cb/ours", "rel L2"
    );
    for r in rows {
        let k = &r.key;
        let (to, tc) = (r.tflops(r.ours_ms), r.tflops(r.cublas_ms));
        println!(
            "  {:<7} {:<28} {:>22} {:<10} {:>9.3} {:>7.1} {:>5.1}% {:>9.3} {:>7.1} {:>5.1}% {:>7.2} {:>9}",
            k.dir.name(),
            format!("n{} {}x{} {}->{} k{}", k.n, k.h, k.w, k.cin, k.cout, k.k),
            format!("{} x {} x {}", r.m, r.n, r.k),
            r.algo.name(),
            r.ours_ms,
            to,
            100.0 * to / peak_tflops,
            r.cublas_ms,
            tc,
            100.0 * tc / peak_tflops,
            r.cublas_ms / r.ours_ms,
            r.rel_l2.map_or("-".into(), |e| format!("{e:.2e}"))
        );
    }
    let (ours, theirs) = rows.iter().fold((0.0, 0.0), |(a, b), r| (a + r.ours_ms, b + r.cublas_ms));
    println!(
        "  every shape once: ours {ours:.2} ms, cuBLAS {theirs:.2} ms (speed = cuBLAS time / ours: {:.2}); peak {peak_tflops} TFLOP/s",
        theirs / f64::max(ours, 1e-9)
    );
}

/// Without the `cuda` build there is no cuBLAS.
#[cfg(not(feature = "cuda"))]
pub fn compare_with_cublas(_gpu: &Gpu, _keys: &[ConvKey], _reps: usize, _visit: Option<&mut Visit>) -> Result<Vec<VsCublas>> {
    Err(crate::error::Error::DeviceUnavailable("the cuBLAS comparison needs the `cuda` build (the simulator has no cuBLAS)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each direction's GEMM does the convolution's multiply-adds, no more, no fewer, with
    /// the reduction over what the direction sums (input taps, output taps, pixels).
    #[test]
    fn gemm_dims_cover_the_convolution() {
        for (k, cin, cout) in [(3usize, 128usize, 256usize), (1, 192, 64), (0, 512, 2048)] {
            for dir in [ConvDir::Forward, ConvDir::Data, ConvDir::Weight] {
                let key = ConvKey { dir, n: 128, h: if k == 0 { 1 } else { 16 }, w: if k == 0 { 1 } else { 8 }, cin, cout, k, bf16: true };
                let (m, n, kk) = gemm_dims(&key);
                assert_eq!((m * n * kk) as f64, key.macs(), "{key:?}");
                let (taps, pixels) = (k.max(1) * k.max(1), key.n * key.h * key.w);
                let reduced = match dir {
                    ConvDir::Forward => taps * cin,
                    ConvDir::Data => taps * cout,
                    ConvDir::Weight => pixels,
                };
                assert_eq!(kk, reduced, "{key:?}");
            }
        }
    }
}
