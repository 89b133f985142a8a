//! The CPU backend: fp32, NHWC, rayon threads, GEMMs on the `gemm` crate. It is the
//! reference every other backend is checked against, so every op here is exact fp32
//! arithmetic with deterministic reduction order.

pub mod amx;
pub mod attention;
pub mod bf16;
mod backend;
pub use backend::Cpu;
pub mod conv;
pub mod conv3x3;
pub mod gemm;
pub mod gemm16;
pub mod microkernel;
#[macro_use]
pub mod simd;
pub mod ops;
pub mod vae_ops;
pub mod winograd;

/// `n` zeros (or any fill value of `T::default()`), written by all worker threads when
/// `n` is large. The binary keeps freed memory for reuse (`main.rs`), so a large
/// `vec![0.0; n]` is not fresh zero pages but a memset on the calling thread while the
/// other workers wait: measured at ≈ 8 GB/s, ≈ 5% of a cpu-s32 training step's samples
/// on a 2-core AVX-512 Xeon (`perf`, 2026-12-07). Sharing the writes across the pool
/// divides that by the thread count. Small buffers (inside already parallel loops) keep
/// `vec!`.
pub fn zeroed<T: Copy + Default + Send + Sync>(n: usize) -> Vec<T> {
    use rayon::prelude::*;
    const PARALLEL_BYTES: usize = 1 << 20;
    if n * std::mem::size_of::<T>() < PARALLEL_BYTES || rayon::current_num_threads() < 2 {
        return vec![T::default(); n];
    }
    let mut v = Vec::with_capacity(n);
    // Chunks of 256 KiB per task; `fill` compiles to memset (an element-wise
    // `par_extend(repeat_n(..))` did not, and was slower than one thread's memset).
    let per_task = (PARALLEL_BYTES / 4 / std::mem::size_of::<T>()).max(1);
    v.spare_capacity_mut()[..n].par_chunks_mut(per_task).for_each(|c| c.fill(std::mem::MaybeUninit::new(T::default())));
    // SAFETY: the first `n` elements were all written just above.
    unsafe { v.set_len(n) };
    v
}
