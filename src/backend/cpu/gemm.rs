//! Single-precision GEMM on the `gemm` crate (AVX-512/AVX2/FMA kernels, rayon threads).
//!
//! Determinism: `gemm` splits the *output* into tiles across threads and runs the K loop
//! of each tile on one thread in a fixed order, so results are bit-identical from run to
//! run at a given thread count (tested in `tests/determinism.rs`).

/// A strided read-only matrix view: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major `[rows, cols]`.
    pub fn rm(data: &'a [f32], cols: usize) -> Self {
        MatRef { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major `[cols, rows]` buffer, seen as `[rows, cols]`.
    pub fn rm_t(data: &'a [f32], rows: usize) -> Self {
        MatRef { data, rs: 1, cs: rows }
    }
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `c[m, n] (row-major, leading dim n) = (accumulate ? c : 0) + a[m, k] · b[k, n]`.
/// `parallel`: use the rayon pool (false inside an already parallel loop).
pub fn sgemm(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool, parallel: bool) {
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    a.check(m, k);
    b.check(k, n);
    let par = if parallel && rayon::current_num_threads() > 1 && m * n * k >= 32 * 32 * 32 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: bounds of all three views were checked above; c is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}
