//! Safe wrappers around the kernels of `kernels/*.cu` (FFI in [`super::ffi`]): lengths
//! are checked, then the launcher is called with the buffers' device pointers on the
//! compute stream of `gpu`. The same code runs on a real GPU (feature `cuda`) and on the
//! simulated device (feature `cuda-sim`).

use super::{check, ffi, same_len, Gpu, GpuBuf};
use crate::error::{Error, Result};

/// `y = silu(x) / 0.596` (paper Eq. 81).
pub fn mp_silu(gpu: &Gpu, x: &GpuBuf<f32>, y: &mut GpuBuf<f32>) -> Result<()> {
    same_len("mp_silu", x.len(), y.len())?;
    let s = gpu.stream()?;
    check("mp_silu", unsafe { ffi::edm2_mp_silu_f32(x.ptr(gpu), y.ptr_mut(gpu), x.len(), s) })
}

/// `dx = dy · mp_silu'(x)`.
pub fn mp_silu_backward(gpu: &Gpu, x: &GpuBuf<f32>, dy: &GpuBuf<f32>, dx: &mut GpuBuf<f32>) -> Result<()> {
    same_len("mp_silu_backward dy", x.len(), dy.len())?;
    same_len("mp_silu_backward dx", x.len(), dx.len())?;
    let s = gpu.stream()?;
    check("mp_silu_backward", unsafe {
        ffi::edm2_mp_silu_backward_f32(x.ptr(gpu), dy.ptr(gpu), dx.ptr_mut(gpu), x.len(), s)
    })
}

/// `a ← mp_sum(a, b, t)` (paper Eq. 88).
pub fn mp_sum(gpu: &Gpu, a: &mut GpuBuf<f32>, b: &GpuBuf<f32>, t: f32) -> Result<()> {
    same_len("mp_sum", a.len(), b.len())?;
    let s = gpu.stream()?;
    check("mp_sum", unsafe { ffi::edm2_mp_sum_f32(a.ptr_mut(gpu), b.ptr(gpu), t, a.len(), s) })
}

/// Sum of `x` (a fixed reduction tree: deterministic).
pub fn sum(gpu: &Gpu, x: &GpuBuf<f32>) -> Result<f32> {
    let mut partials = gpu.alloc::<f32>(unsafe { ffi::edm2_sum_partials(x.len()) })?;
    let mut out = gpu.alloc::<f32>(1)?;
    let s = gpu.stream()?;
    check("sum", unsafe { ffi::edm2_sum_f32(x.ptr(gpu), partials.ptr_mut(gpu), out.ptr_mut(gpu), x.len(), s) })?;
    Ok(gpu.download(&out)?[0])
}

/// One Adam step on a flat parameter (PyTorch's form, non-finite gradient entries as 0);
/// `t` = the step number after this step. Returns how many entries were non-finite.
#[allow(clippy::too_many_arguments)]
pub fn adam(
    gpu: &Gpu,
    p: &mut GpuBuf<f32>,
    g: &GpuBuf<f32>,
    m: &mut GpuBuf<f32>,
    v: &mut GpuBuf<f32>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    t: u64,
) -> Result<u32> {
    for (name, l) in [("adam g", g.len()), ("adam m", m.len()), ("adam v", v.len())] {
        same_len(name, p.len(), l)?;
    }
    let step = (lr / (1.0 - beta1.powi(t as i32))) as f32;
    let bc2 = (1.0 - beta2.powi(t as i32)).sqrt() as f32;
    let mut bad = gpu.alloc_zeros::<u32>(1)?;
    let s = gpu.stream()?;
    check("adam", unsafe {
        ffi::edm2_adam_f32(
            p.ptr_mut(gpu),
            g.ptr(gpu),
            m.ptr_mut(gpu),
            v.ptr_mut(gpu),
            beta1 as f32,
            beta2 as f32,
            bc2,
            eps as f32,
            step,
            p.len(),
            bad.ptr_mut(gpu),
            s,
        )
    })?;
    Ok(gpu.download(&bad)?[0])
}

/// `e ← lerp(e, p, w)` as PyTorch evaluates it (the power-function EMA update, w = 1 − β).
pub fn ema_lerp(gpu: &Gpu, e: &mut GpuBuf<f32>, p: &GpuBuf<f32>, w: f32) -> Result<()> {
    same_len("ema_lerp", e.len(), p.len())?;
    let s = gpu.stream()?;
    check("ema_lerp", unsafe { ffi::edm2_ema_lerp_f32(e.ptr_mut(gpu), p.ptr(gpu), w, e.len(), s) })
}

/// Harness self-test: one block of `x.len()` threads sums `x` in shared memory; with
/// `skip_sync` the barrier between tree levels is left out (a deliberate race).
pub fn selftest_block_sum(gpu: &Gpu, x: &GpuBuf<f32>, skip_sync: bool) -> Result<f32> {
    if !x.len().is_power_of_two() || x.len() > 1024 {
        return Err(Error::Input("selftest_block_sum: a power of two ≤ 1024 threads".into()));
    }
    let mut out = gpu.alloc::<f32>(1)?;
    let s = gpu.stream()?;
    check("selftest_block_sum", unsafe {
        ffi::edm2_selftest_block_sum(x.ptr(gpu), out.ptr_mut(gpu), x.len() as i32, skip_sync as i32, s)
    })?;
    Ok(gpu.download(&out)?[0])
}

/// Harness self-test: two warps each sum 32 of 64 values with `__shfl_down_sync`.
pub fn selftest_warp_sum(gpu: &Gpu, x: &GpuBuf<f32>) -> Result<[f32; 2]> {
    same_len("selftest_warp_sum", x.len(), 64)?;
    let mut out = gpu.alloc::<f32>(2)?;
    let s = gpu.stream()?;
    check("selftest_warp_sum", unsafe { ffi::edm2_selftest_warp_sum(x.ptr(gpu), out.ptr_mut(gpu), s) })?;
    let o = gpu.download(&out)?;
    Ok([o[0], o[1]])
}

/// Simulated device only: the thread schedule of every block from now on, forward
/// (0..n) or reverse. A missing barrier shows up as a wrong result under one of them.
#[cfg(feature = "cuda-sim")]
pub fn set_reverse_schedule(reverse: bool) {
    unsafe { ffi::edm2_sim_set_schedule(reverse as i32) }
}
