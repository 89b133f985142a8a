//! The CUDA kernels executed on the simulated device (feature `cuda-sim`): the same
//! `kernels/*.cu` sources compiled by g++ against `sim/cuda_sim.h`, called through the
//! bindgen FFI of `kernels/edm2.h`. Device memory is host memory here, so the wrappers
//! take slices; the real device backend passes device pointers to the same functions.

#[allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code)]
pub mod ffi {
    include!(concat!(env!("OUT_DIR"), "/edm2_ffi.rs"));
}

use crate::error::{Error, Result};

fn check(name: &str, rc: i32) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::DeviceUnavailable(format!("{name}: CUDA error {rc}")))
    }
}

fn same_len(name: &str, a: usize, b: usize) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(Error::Input(format!("{name}: length mismatch ({a} vs {b})")))
    }
}

/// Thread schedule of every block from now on: forward (0..n) or reverse. A missing
/// barrier shows up as a wrong result under at least one of them.
pub fn set_reverse_schedule(reverse: bool) {
    unsafe { ffi::edm2_sim_set_schedule(reverse as i32) }
}

/// `y = silu(x) / 0.596` (paper Eq. 81).
pub fn mp_silu(x: &[f32], y: &mut [f32]) -> Result<()> {
    same_len("mp_silu", x.len(), y.len())?;
    check("mp_silu", unsafe { ffi::edm2_mp_silu_f32(x.as_ptr(), y.as_mut_ptr(), x.len(), std::ptr::null_mut()) })
}

/// `dx = dy · mp_silu'(x)`.
pub fn mp_silu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    same_len("mp_silu_backward", x.len(), dy.len())?;
    same_len("mp_silu_backward", x.len(), dx.len())?;
    check("mp_silu_backward", unsafe {
        ffi::edm2_mp_silu_backward_f32(x.as_ptr(), dy.as_ptr(), dx.as_mut_ptr(), x.len(), std::ptr::null_mut())
    })
}

/// `a ← mp_sum(a, b, t)` (paper Eq. 88).
pub fn mp_sum(a: &mut [f32], b: &[f32], t: f32) -> Result<()> {
    same_len("mp_sum", a.len(), b.len())?;
    check("mp_sum", unsafe { ffi::edm2_mp_sum_f32(a.as_mut_ptr(), b.as_ptr(), t, a.len(), std::ptr::null_mut()) })
}

/// Sum of `x` (a fixed reduction tree: deterministic).
pub fn sum(x: &[f32]) -> Result<f32> {
    let mut partials = vec![f32::NAN; unsafe { ffi::edm2_sum_partials(x.len()) }];
    let mut out = [f32::NAN];
    check("sum", unsafe { ffi::edm2_sum_f32(x.as_ptr(), partials.as_mut_ptr(), out.as_mut_ptr(), x.len(), std::ptr::null_mut()) })?;
    Ok(out[0])
}

/// Harness self-test: one block of `x.len()` threads sums `x` in shared memory; with
/// `skip_sync` the barrier between tree levels is left out (a deliberate race).
pub fn selftest_block_sum(x: &[f32], skip_sync: bool) -> Result<f32> {
    if !x.len().is_power_of_two() || x.len() > 1024 {
        return Err(Error::Input("selftest_block_sum: a power of two ≤ 1024 threads".into()));
    }
    let mut out = [f32::NAN];
    check("selftest_block_sum", unsafe {
        ffi::edm2_selftest_block_sum(x.as_ptr(), out.as_mut_ptr(), x.len() as i32, skip_sync as i32, std::ptr::null_mut())
    })?;
    Ok(out[0])
}

/// Harness self-test: two warps each sum 32 values with `__shfl_down_sync`.
pub fn selftest_warp_sum(x: &[f32; 64]) -> Result<[f32; 2]> {
    let mut out = [f32::NAN; 2];
    check("selftest_warp_sum", unsafe { ffi::edm2_selftest_warp_sum(x.as_ptr(), out.as_mut_ptr(), std::ptr::null_mut()) })?;
    Ok(out)
}

/// One Adam step on a flat parameter (PyTorch's form, non-finite gradient entries as 0);
/// `t` = the step number after this step. Returns how many entries were non-finite.
#[allow(clippy::too_many_arguments)]
pub fn adam(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], lr: f64, beta1: f64, beta2: f64, eps: f64, t: u64) -> Result<u32> {
    for (name, l) in [("g", g.len()), ("m", m.len()), ("v", v.len())] {
        same_len(&format!("adam {name}"), p.len(), l)?;
    }
    let step = (lr / (1.0 - beta1.powi(t as i32))) as f32;
    let bc2 = (1.0 - beta2.powi(t as i32)).sqrt() as f32;
    let mut bad = 0u32;
    check("adam", unsafe {
        ffi::edm2_adam_f32(
            p.as_mut_ptr(),
            g.as_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            beta1 as f32,
            beta2 as f32,
            bc2,
            eps as f32,
            step,
            p.len(),
            &mut bad,
            std::ptr::null_mut(),
        )
    })?;
    Ok(bad)
}

/// `e ← lerp(e, p, w)` as PyTorch evaluates it (the power-function EMA update, w = 1 − β).
pub fn ema_lerp(e: &mut [f32], p: &[f32], w: f32) -> Result<()> {
    same_len("ema_lerp", e.len(), p.len())?;
    check("ema_lerp", unsafe { ffi::edm2_ema_lerp_f32(e.as_mut_ptr(), p.as_ptr(), w, e.len(), std::ptr::null_mut()) })
}
