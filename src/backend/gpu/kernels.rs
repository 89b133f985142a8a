//! Safe wrappers around the kernels of `kernels/*.cu` (FFI in [`super::ffi`]): lengths
//! are checked, then the launcher is called with the buffers' device pointers on the
//! compute stream of `gpu`. The same code runs on a real GPU (feature `cuda`) and on the
//! simulated device (feature `cuda-sim`).

use super::conv_algo::{candidates, ConvAlgo, ConvDir, ConvKey};
use super::{check, ffi, same_len, Dtype, Gpu, GpuAct, GpuBuf};
pub use super::attention::{attention_backward, attention_forward, GpuAttnCache};
pub use crate::backend::{ConvGeom, Nhwc};
use crate::error::{Error, Result};

/// Device values a kernel reads or writes as activations: a [`GpuAct`] (fp32 or bf16) or a
/// plain fp32 buffer (parameters, gradients). Kernels take `&dyn Values` and check that all
/// the activations of one launch share a dtype.
pub trait Values {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn dtype(&self) -> Dtype;
    fn vptr(&self, gpu: &Gpu) -> *const std::ffi::c_void;
    fn vptr_mut(&mut self, gpu: &Gpu) -> *mut std::ffi::c_void;
}

impl Values for GpuAct {
    fn len(&self) -> usize {
        GpuAct::len(self)
    }
    fn dtype(&self) -> Dtype {
        GpuAct::dtype(self)
    }
    fn vptr(&self, gpu: &Gpu) -> *const std::ffi::c_void {
        GpuAct::vptr(self, gpu)
    }
    fn vptr_mut(&mut self, gpu: &Gpu) -> *mut std::ffi::c_void {
        GpuAct::vptr_mut(self, gpu)
    }
}

impl Values for GpuBuf<f32> {
    fn len(&self) -> usize {
        GpuBuf::len(self)
    }
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn vptr(&self, gpu: &Gpu) -> *const std::ffi::c_void {
        self.ptr(gpu) as *const std::ffi::c_void
    }
    fn vptr_mut(&mut self, gpu: &Gpu) -> *mut std::ffi::c_void {
        self.ptr_mut(gpu) as *mut std::ffi::c_void
    }
}

/// Checks that buffer `name` is fp32 (a kernel argument that is fp32 in every precision).
fn fp32(kernel: &str, name: &str, b: &dyn Values) -> Result<()> {
    if b.dtype() == Dtype::F32 {
        Ok(())
    } else {
        Err(Error::Input(format!("{kernel}: {name} must be fp32, got {:?}", b.dtype())))
    }
}

/// The kernels' dtype code of a launch whose activations have these dtypes (all equal).
pub(super) fn dtype_of(kernel: &str, dtypes: &[Dtype]) -> Result<i32> {
    match dtypes.split_first() {
        Some((d, rest)) if rest.iter().all(|r| r == d) => Ok(d.code()),
        Some(_) => Err(Error::Input(format!("{kernel}: activations of different dtypes {dtypes:?}"))),
        None => Ok(Dtype::F32.code()),
    }
}

/// `y = silu(x) / 0.596` (paper Eq. 81).
pub fn mp_silu(gpu: &Gpu, x: &dyn Values, y: &mut dyn Values) -> Result<()> {
    same_len("mp_silu", x.len(), y.len())?;
    let dt = dtype_of("mp_silu", &[x.dtype(), y.dtype()])?;
    let s = gpu.stream()?;
    check("mp_silu", unsafe { ffi::edm2_mp_silu(x.vptr(gpu), y.vptr_mut(gpu), x.len(), dt, s) })
}

/// `dx = dy · mp_silu'(x)`, or `dx += dy · mp_silu'(x)` with `accumulate` (in fp32, rounded
/// once to the storage type).
pub fn mp_silu_backward(gpu: &Gpu, x: &dyn Values, dy: &dyn Values, dx: &mut dyn Values, accumulate: bool) -> Result<()> {
    same_len("mp_silu_backward dy", x.len(), dy.len())?;
    same_len("mp_silu_backward dx", x.len(), dx.len())?;
    let dt = dtype_of("mp_silu_backward", &[x.dtype(), dy.dtype(), dx.dtype()])?;
    let s = gpu.stream()?;
    check("mp_silu_backward", unsafe {
        ffi::edm2_mp_silu_backward(x.vptr(gpu), dy.vptr(gpu), dx.vptr_mut(gpu), x.len(), accumulate as i32, dt, s)
    })
}

/// `a ← mp_sum(a, b, t)` (paper Eq. 88).
pub fn mp_sum(gpu: &Gpu, a: &mut dyn Values, b: &dyn Values, t: f32) -> Result<()> {
    same_len("mp_sum", a.len(), b.len())?;
    let dt = dtype_of("mp_sum", &[a.dtype(), b.dtype()])?;
    let s = gpu.stream()?;
    check("mp_sum", unsafe { ffi::edm2_mp_sum(a.vptr_mut(gpu), b.vptr(gpu), t, a.len(), dt, s) })
}

/// Sum of `x` (a fixed reduction tree: deterministic), read back to the host.
pub fn sum(gpu: &Gpu, x: &GpuBuf<f32>) -> Result<f32> {
    let mut out = gpu.alloc::<f32>(1)?;
    sum_into(gpu, x, &mut out)?;
    Ok(gpu.download(&out)?[0])
}

/// `out[0] += ` the sum of `x`, one launch of one block (short vectors; deterministic).
pub fn sum_add_into(gpu: &Gpu, x: &GpuBuf<f32>, out: &mut GpuBuf<f32>) -> Result<()> {
    expect_len("sum_add", "out", out.len(), 1)?;
    let s = gpu.stream()?;
    check("sum_add", unsafe { ffi::edm2_sum_add_f32(x.ptr(gpu), out.ptr_mut(gpu), x.len(), s) })
}

/// `out[0]` = the sum of `x`, on the device (no wait).
pub fn sum_into(gpu: &Gpu, x: &GpuBuf<f32>, out: &mut GpuBuf<f32>) -> Result<()> {
    expect_len("sum", "out", out.len(), 1)?;
    let mut partials = gpu.alloc::<f32>(unsafe { ffi::edm2_sum_partials(x.len()) })?;
    let s = gpu.stream()?;
    check("sum", unsafe { ffi::edm2_sum_f32(x.ptr(gpu), partials.ptr_mut(gpu), out.ptr_mut(gpu), x.len(), s) })
}

/// One Adam step on a flat parameter (PyTorch's form, non-finite gradient entries as 0);
/// `t` = the step number after this step. Adds the number of non-finite gradient entries
/// to the device counter `nonfinite[0]` and the number of entries whose updated weight or
/// moment is non-finite (divergence) to `nonfinite[1]` (one pair for all parameters of a
/// step, read once: a download per parameter would stall the stream ~60 times a step).
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
    nonfinite: &mut GpuBuf<u32>,
) -> Result<()> {
    expect_len("adam", "nonfinite", nonfinite.len(), 2)?;
    for (name, l) in [("adam g", g.len()), ("adam m", m.len()), ("adam v", v.len())] {
        same_len(name, p.len(), l)?;
    }
    let (step, bc2) = adam_coefficients(lr, beta1, beta2, t);
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
            nonfinite.ptr_mut(gpu),
            s,
        )
    })
}

/// Adam's step size `lr/(1−β1ᵗ)` and `sqrt(1−β2ᵗ)` (PyTorch's bias corrections), in f64
/// on the host as PyTorch computes them, then rounded to the kernel's f32.
pub(super) fn adam_coefficients(lr: f64, beta1: f64, beta2: f64, t: u64) -> (f32, f32) {
    let t = t.min(i32::MAX as u64) as i32;
    ((lr / (1.0 - beta1.powi(t))) as f32, (1.0 - beta2.powi(t)).sqrt() as f32)
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

/// Harness self-test: `[block 0: s[3], s[40], block 1: s[3], s[40]]` where block 1 never
/// wrote `s[40]` (NaN on the simulated device, which poisons shared memory per block).
pub fn selftest_shared_poison(gpu: &Gpu) -> Result<[f32; 4]> {
    let mut out = gpu.alloc::<f32>(4)?;
    let s = gpu.stream()?;
    check("selftest_shared_poison", unsafe { ffi::edm2_selftest_shared_poison(out.ptr_mut(gpu), s) })?;
    let o = gpu.download(&out)?;
    Ok([o[0], o[1], o[2], o[3]])
}

/// Harness self-test of the tensor-core helper: one warp computes `A·B` (A 16x16, B 16x8,
/// bf16 bit patterns, row-major) into a 16x8 fp32 row-major result, loading the
/// fragments in the PTX ISA's layout (`wrong_layout`: a deliberately wrong B layout).
pub fn selftest_mma(gpu: &Gpu, a: &[u16; 256], b: &[u16; 128], wrong_layout: bool) -> Result<Vec<f32>> {
    let (ab, bb) = (gpu.upload(&a[..])?, gpu.upload(&b[..])?);
    let mut d = gpu.alloc::<f32>(128)?;
    let s = gpu.stream()?;
    check("selftest_mma", unsafe { ffi::edm2_selftest_mma(ab.ptr(gpu), bb.ptr(gpu), d.ptr_mut(gpu), wrong_layout as i32, s) })?;
    gpu.download(&d)
}

/// Self-test of ldmatrix and cp.async: stages A (16x16) and B (16x8) bf16 bits into shared
/// memory with cp.async, loads the mma fragments with ldmatrix and multiplies. Returns the
/// fragments each lane got (6 per lane: A's 4, B's 2) and D = A·B (16x8 row-major).
/// `skip_wait` leaves out the cp.async wait.
pub fn selftest_ldmatrix(gpu: &Gpu, a: &[u16; 256], b: &[u16; 128], skip_wait: bool) -> Result<(Vec<u32>, Vec<f32>)> {
    let (ab, bb) = (gpu.upload(&a[..])?, gpu.upload(&b[..])?);
    let (mut regs, mut d) = (gpu.alloc::<u32>(6 * 32)?, gpu.alloc::<f32>(128)?);
    let s = gpu.stream()?;
    check("selftest_ldmatrix", unsafe {
        ffi::edm2_selftest_ldmatrix(ab.ptr(gpu), bb.ptr(gpu), regs.ptr_mut(gpu), d.ptr_mut(gpu), skip_wait as i32, s)
    })?;
    Ok((gpu.download(&regs)?, gpu.download(&d)?))
}

/// Self-test of the race-hunting mode: 64 threads add 1 to one shared float without an
/// atomic (a race inside a barrier segment). Returns the sum.
pub fn selftest_shared_increment(gpu: &Gpu) -> Result<f32> {
    let mut out = gpu.alloc::<f32>(1)?;
    let s = gpu.stream()?;
    check("selftest_shared_increment", unsafe { ffi::edm2_selftest_shared_increment(out.ptr_mut(gpu), s) })?;
    Ok(gpu.download(&out)?[0])
}

/// Simulated device only: the thread schedule of every block from now on, forward
/// (0..n) or reverse. A missing barrier shows up as a wrong result under one of them.
#[cfg(feature = "cuda-sim")]
pub fn set_reverse_schedule(reverse: bool) {
    unsafe { ffi::edm2_sim_set_schedule(reverse as i32) }
}

/// Checks that buffer `name` holds exactly `want` elements (`len` of them).
pub(super) fn expect_len(kernel: &str, name: &str, len: usize, want: usize) -> Result<()> {
    if len == want {
        Ok(())
    } else {
        Err(Error::Input(format!("{kernel}: {name} holds {len} elements, expected {want}")))
    }
}

fn nhwc_ints(kernel: &str, s: Nhwc) -> Result<(i32, i32, i32, i32)> {
    Ok((int(kernel, s.n)?, int(kernel, s.h)?, int(kernel, s.w)?, int(kernel, s.c)?))
}

pub(super) fn int(kernel: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Input(format!("{kernel}: dimension {v} too large")))
}

/// `a ← wa·a + wb·b`.
pub fn axpby(gpu: &Gpu, a: &mut dyn Values, b: &dyn Values, wa: f32, wb: f32) -> Result<()> {
    same_len("axpby", a.len(), b.len())?;
    let dt = dtype_of("axpby", &[a.dtype(), b.dtype()])?;
    let s = gpu.stream()?;
    check("axpby", unsafe { ffi::edm2_axpby(a.vptr_mut(gpu), b.vptr(gpu), wa, wb, a.len(), dt, s) })
}

/// `a ← clamp(wa·a + wb·b, ±limit)` in one launch, `mask` set where `|wa·a + wb·b| > limit`:
/// the bits of [`axpby`] then [`clip`].
pub fn axpby_clip(gpu: &Gpu, a: &mut dyn Values, b: &dyn Values, wa: f32, wb: f32, limit: f32, mask: &mut GpuBuf<u8>) -> Result<()> {
    same_len("axpby_clip", a.len(), b.len())?;
    same_len("axpby_clip mask", a.len(), mask.len())?;
    let dt = dtype_of("axpby_clip", &[a.dtype(), b.dtype()])?;
    let s = gpu.stream()?;
    check("axpby_clip", unsafe { ffi::edm2_axpby_clip(a.vptr_mut(gpu), b.vptr(gpu), wa, wb, limit, mask.ptr_mut(gpu), a.len(), dt, s) })
}

/// `a ← k·a`.
pub fn scale(gpu: &Gpu, a: &mut dyn Values, k: f32) -> Result<()> {
    let s = gpu.stream()?;
    check("scale", unsafe { ffi::edm2_scale(a.vptr_mut(gpu), k, a.len(), a.dtype().code(), s) })
}

/// 2x2 average pooling of `x` (shape `s`, even h and w) into `y` `[n, h/2, w/2, c]`.
pub fn downsample2(gpu: &Gpu, x: &dyn Values, s: Nhwc, y: &mut dyn Values) -> Result<()> {
    let k = "downsample2";
    expect_len(k, "x", x.len(), s.numel())?;
    expect_len(k, "y", y.len(), s.numel() / 4)?;
    let (n, h, w, c) = nhwc_ints(k, s)?;
    let dt = dtype_of(k, &[x.dtype(), y.dtype()])?;
    let st = gpu.stream()?;
    check(k, unsafe { ffi::edm2_downsample2(x.vptr(gpu), y.vptr_mut(gpu), n, h, w, c, dt, st) })
}

/// Gradient of [`downsample2`]: `dy` `[n, h/2, w/2, c]` → `dx` of shape `s`.
pub fn downsample2_backward(gpu: &Gpu, dy: &dyn Values, s: Nhwc, dx: &mut dyn Values) -> Result<()> {
    let k = "downsample2_backward";
    expect_len(k, "dy", dy.len(), s.numel() / 4)?;
    expect_len(k, "dx", dx.len(), s.numel())?;
    let (n, h, w, c) = nhwc_ints(k, s)?;
    let dt = dtype_of(k, &[dy.dtype(), dx.dtype()])?;
    let st = gpu.stream()?;
    check(k, unsafe { ffi::edm2_downsample2_backward(dy.vptr(gpu), dx.vptr_mut(gpu), n, h, w, c, dt, st) })
}

/// Nearest 2x upsampling of `x` (shape `s`) into `y` `[n, 2h, 2w, c]`.
pub fn upsample2(gpu: &Gpu, x: &dyn Values, s: Nhwc, y: &mut dyn Values) -> Result<()> {
    let k = "upsample2";
    expect_len(k, "x", x.len(), s.numel())?;
    expect_len(k, "y", y.len(), s.numel() * 4)?;
    let (n, h, w, c) = nhwc_ints(k, s)?;
    let dt = dtype_of(k, &[x.dtype(), y.dtype()])?;
    let st = gpu.stream()?;
    check(k, unsafe { ffi::edm2_upsample2(x.vptr(gpu), y.vptr_mut(gpu), n, h, w, c, dt, st) })
}

/// Gradient of [`upsample2`]: `dy` `[n, 2h, 2w, c]` → `dx` of shape `s`.
pub fn upsample2_backward(gpu: &Gpu, dy: &dyn Values, s: Nhwc, dx: &mut dyn Values) -> Result<()> {
    let k = "upsample2_backward";
    expect_len(k, "dy", dy.len(), s.numel() * 4)?;
    expect_len(k, "dx", dx.len(), s.numel())?;
    let (n, h, w, c) = nhwc_ints(k, s)?;
    let dt = dtype_of(k, &[dy.dtype(), dx.dtype()])?;
    let st = gpu.stream()?;
    check(k, unsafe { ffi::edm2_upsample2_backward(dy.vptr(gpu), dx.vptr_mut(gpu), n, h, w, c, dt, st) })
}

/// MP-cat over channels (paper Eq. 103) of `a` `[pixels, na]` and `b` `[pixels, nb]`.
pub fn mp_cat(gpu: &Gpu, a: &dyn Values, na: usize, b: &dyn Values, nb: usize, t: f32, out: &mut dyn Values) -> Result<()> {
    let k = "mp_cat";
    if na == 0 || nb == 0 || a.len() % na != 0 {
        return Err(Error::Input(format!("{k}: bad channel counts {na} + {nb} for {} values", a.len())));
    }
    let pixels = a.len() / na;
    expect_len(k, "b", b.len(), pixels * nb)?;
    expect_len(k, "out", out.len(), pixels * (na + nb))?;
    let (ka, kb) = crate::backend::cpu::ops::mp_cat_coefs(na, nb, t);
    let dt = dtype_of(k, &[a.dtype(), b.dtype(), out.dtype()])?;
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_mp_cat(a.vptr(gpu), int(k, na)?, b.vptr(gpu), int(k, nb)?, ka, kb, out.vptr_mut(gpu), pixels, dt, st)
    })
}

/// Gradient of [`mp_cat`].
#[allow(clippy::too_many_arguments)]
pub fn mp_cat_backward(
    gpu: &Gpu,
    dout: &dyn Values,
    na: usize,
    nb: usize,
    t: f32,
    da: &mut dyn Values,
    db: &mut dyn Values,
) -> Result<()> {
    let k = "mp_cat_backward";
    if na == 0 || nb == 0 || dout.len() % (na + nb) != 0 {
        return Err(Error::Input(format!("{k}: bad channel counts {na} + {nb} for {} values", dout.len())));
    }
    let pixels = dout.len() / (na + nb);
    expect_len(k, "da", da.len(), pixels * na)?;
    expect_len(k, "db", db.len(), pixels * nb)?;
    let (ka, kb) = crate::backend::cpu::ops::mp_cat_coefs(na, nb, t);
    let dt = dtype_of(k, &[dout.dtype(), da.dtype(), db.dtype()])?;
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_mp_cat_backward(dout.vptr(gpu), int(k, na)?, int(k, nb)?, ka, kb, da.vptr_mut(gpu), db.vptr_mut(gpu), pixels, dt, st)
    })
}

/// `y[n, p, c] = mp_silu(h[n, p, c] · s[n, c])` for `h` `[n, pixels, c]`; `s` is fp32 in
/// both precisions (the embedding path).
pub fn modulate_silu(gpu: &Gpu, h: &dyn Values, s: &dyn Values, c: usize, pixels: usize, y: &mut dyn Values) -> Result<()> {
    let k = "modulate_silu";
    let n = if c == 0 { 0 } else { s.len() / c };
    expect_len(k, "s", s.len(), n * c)?;
    expect_len(k, "h", h.len(), n * pixels * c)?;
    expect_len(k, "y", y.len(), h.len())?;
    let dt = dtype_of(k, &[h.dtype(), y.dtype()])?;
    fp32(k, "s", s)?;
    let st = gpu.stream()?;
    check(k, unsafe { ffi::edm2_modulate_silu(h.vptr(gpu), s.vptr(gpu) as *const f32, y.vptr_mut(gpu), int(k, n)?, pixels, int(k, c)?, dt, st) })
}

/// Gradient of [`modulate_silu`]: `dh` (like `h`) and `ds` (like `s`), both overwritten.
#[allow(clippy::too_many_arguments)]
pub fn modulate_silu_backward(
    gpu: &Gpu,
    h: &dyn Values,
    s: &dyn Values,
    dy: &dyn Values,
    c: usize,
    pixels: usize,
    dh: &mut dyn Values,
    ds: &mut dyn Values,
) -> Result<()> {
    let k = "modulate_silu_backward";
    let n = if c == 0 { 0 } else { s.len() / c };
    expect_len(k, "s", s.len(), n * c)?;
    expect_len(k, "h", h.len(), n * pixels * c)?;
    expect_len(k, "dy", dy.len(), h.len())?;
    expect_len(k, "dh", dh.len(), h.len())?;
    expect_len(k, "ds", ds.len(), s.len())?;
    let dt = dtype_of(k, &[h.dtype(), dy.dtype(), dh.dtype()])?;
    fp32(k, "s", s)?;
    fp32(k, "ds", ds)?;
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_modulate_silu_backward(
            h.vptr(gpu),
            s.vptr(gpu) as *const f32,
            dy.vptr(gpu),
            dh.vptr_mut(gpu),
            ds.vptr_mut(gpu) as *mut f32,
            int(k, n)?,
            pixels,
            int(k, c)?,
            dt,
            st,
        )
    })
}

/// Inverted dropout in place with the CPU backend's mask (`ops::hash_uniform(seed, i)`).
pub fn dropout(gpu: &Gpu, x: &mut dyn Values, p: f32, seed: u64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Input(format!("dropout: probability {p} outside [0, 1)")));
    }
    let st = gpu.stream()?;
    check("dropout", unsafe { ffi::edm2_dropout(x.vptr_mut(gpu), p, seed, x.len(), x.dtype().code(), st) })
}

/// `x ← clamp(x, ±limit)`; `mask` records where `|x| > limit` (for [`clip_backward`]).
pub fn clip(gpu: &Gpu, x: &mut dyn Values, mask: &mut GpuBuf<u8>, limit: f32) -> Result<()> {
    same_len("clip", x.len(), mask.len())?;
    let st = gpu.stream()?;
    check("clip", unsafe { ffi::edm2_clip(x.vptr_mut(gpu), mask.ptr_mut(gpu), limit, x.len(), x.dtype().code(), st) })
}

/// Zeroes `dy` where [`clip`] clipped.
pub fn clip_backward(gpu: &Gpu, dy: &mut dyn Values, mask: &GpuBuf<u8>) -> Result<()> {
    same_len("clip_backward", dy.len(), mask.len())?;
    let st = gpu.stream()?;
    check("clip_backward", unsafe { ffi::edm2_clip_backward(dy.vptr_mut(gpu), mask.ptr(gpu), dy.len(), dy.dtype().code(), st) })
}

/// MP-Fourier features `y[i, j] = sqrt(2)·cos(freqs[j]·x[i] + phases[j])`.
pub fn mp_fourier(gpu: &Gpu, x: &GpuBuf<f32>, freqs: &GpuBuf<f32>, phases: &GpuBuf<f32>, y: &mut dyn Values) -> Result<()> {
    let k = "mp_fourier";
    same_len(k, freqs.len(), phases.len())?;
    expect_len(k, "y", y.len(), x.len() * freqs.len())?;
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_mp_fourier(x.ptr(gpu), freqs.ptr(gpu), phases.ptr(gpu), y.vptr_mut(gpu), x.len(), int(k, freqs.len())?, y.dtype().code(), st)
    })
}

/// `y = normalize(x)` per row of `k` values (pixel norm; `x` and `y` may not alias — use
/// [`normalize_rows_inplace`]).
pub fn normalize_rows(gpu: &Gpu, x: &dyn Values, k: usize, y: &mut dyn Values) -> Result<()> {
    same_len("normalize_rows", x.len(), y.len())?;
    let rows = rows_of("normalize_rows", x.len(), k)?;
    let dt = dtype_of("normalize_rows", &[x.dtype(), y.dtype()])?;
    let st = gpu.stream()?;
    check("normalize_rows", unsafe { ffi::edm2_normalize_rows(x.vptr(gpu), y.vptr_mut(gpu), std::ptr::null_mut(), rows, int("normalize_rows", k)?, dt, st) })
}

/// [`normalize_rows`] also writing `a = mp_silu(y)` in the same pass (an encoder block's
/// pixel norm and its residual branch's first op; the bits of [`mp_silu`] on `y`).
pub fn normalize_rows_silu(gpu: &Gpu, x: &dyn Values, k: usize, y: &mut dyn Values, a: &mut dyn Values) -> Result<()> {
    let kn = "normalize_rows_silu";
    same_len(kn, x.len(), y.len())?;
    same_len(kn, x.len(), a.len())?;
    let rows = rows_of(kn, x.len(), k)?;
    let dt = dtype_of(kn, &[x.dtype(), y.dtype(), a.dtype()])?;
    let st = gpu.stream()?;
    check(kn, unsafe { ffi::edm2_normalize_rows(x.vptr(gpu), y.vptr_mut(gpu), a.vptr_mut(gpu), rows, int(kn, k)?, dt, st) })
}

/// Forced weight normalization of a stored weight, in place.
pub fn normalize_rows_inplace(gpu: &Gpu, x: &mut GpuBuf<f32>, k: usize) -> Result<()> {
    let rows = rows_of("normalize_rows", x.len(), k)?;
    let st = gpu.stream()?;
    check("normalize_rows", unsafe { ffi::edm2_normalize_weight_rows_f32(x.ptr_mut(gpu), rows, int("normalize_rows", k)?, st) })
}

/// Gradient of [`normalize_rows`].
pub fn normalize_rows_backward(gpu: &Gpu, x: &dyn Values, k: usize, dy: &dyn Values, dx: &mut dyn Values) -> Result<()> {
    same_len("normalize_rows_backward dy", x.len(), dy.len())?;
    same_len("normalize_rows_backward dx", x.len(), dx.len())?;
    let rows = rows_of("normalize_rows_backward", x.len(), k)?;
    let dt = dtype_of("normalize_rows_backward", &[x.dtype(), dy.dtype(), dx.dtype()])?;
    let st = gpu.stream()?;
    check("normalize_rows_backward", unsafe {
        let null = std::ptr::null();
        ffi::edm2_normalize_rows_backward(x.vptr(gpu), dy.vptr(gpu), null, null, dx.vptr_mut(gpu), rows, int("normalize_rows", k)?, dt, st)
    })
}

/// [`normalize_rows_backward`] of the gradient `dy + da0·mp_silu'(xm)` (an encoder block:
/// its pixel norm's output `xm` fed both the skip and the residual branch's mp_silu), in one
/// pass: the bits of [`mp_silu_backward`] accumulating into `dy`, then the norm's backward.
#[allow(clippy::too_many_arguments)]
pub fn normalize_rows_backward_silu(gpu: &Gpu, x: &dyn Values, k: usize, dy: &dyn Values, xm: &dyn Values, da0: &dyn Values, dx: &mut dyn Values) -> Result<()> {
    let kn = "normalize_rows_backward_silu";
    for (name, v) in [("dy", dy), ("xm", xm), ("da0", da0)] {
        same_len(&format!("{kn} {name}"), x.len(), v.len())?;
    }
    same_len(&format!("{kn} dx"), x.len(), dx.len())?;
    let rows = rows_of(kn, x.len(), k)?;
    let dt = dtype_of(kn, &[x.dtype(), dy.dtype(), xm.dtype(), da0.dtype(), dx.dtype()])?;
    let st = gpu.stream()?;
    check(kn, unsafe {
        ffi::edm2_normalize_rows_backward(x.vptr(gpu), dy.vptr(gpu), xm.vptr(gpu), da0.vptr(gpu), dx.vptr_mut(gpu), rows, int(kn, k)?, dt, st)
    })
}

fn rows_of(kernel: &str, len: usize, k: usize) -> Result<usize> {
    if k == 0 || len % k != 0 {
        return Err(Error::Input(format!("{kernel}: {len} values are not rows of {k}")));
    }
    Ok(len / k)
}

/// The effective weight on the device: OHWI `[O, taps, I]` and per-row denominators.
/// `gain` is the fixed gain it was made with; one made from a gain parameter ([`Gain::At`])
/// needs the same buffer again in [`effective_weight_backward`].
pub struct GpuEffWeight {
    pub geom: ConvGeom,
    pub gain: f32,
    pub w: GpuBuf<f32>,
    pub denom: GpuBuf<f32>,
    /// With bf16 activations and the tensor-core convolutions on: `w` in bf16, the
    /// pipelined forward's operand (made where the input channels suit that kernel),
    /// written by the effective-weight kernel itself so that the convolution launches no
    /// conversion of its own. None: it converts `w` per call.
    pub bf16: Option<GpuAct>,
    /// Likewise the flipped transpose `[I, taps, O]` in bf16, the pipelined data
    /// gradient's operand (made where the output channels suit it and a backward will run).
    pub bf16_flip: Option<GpuAct>,
}

/// The gain of an effective weight: a fixed value, or a gain parameter's one-element
/// device buffer, read by the kernel (so Adam's update of a gain never goes back to the
/// host before the next forward).
#[derive(Clone, Copy)]
pub enum Gain<'a> {
    Value(f32),
    At(&'a GpuBuf<f32>),
}

impl Gain<'_> {
    fn split(self, kernel: &str, gpu: &Gpu) -> Result<(f32, *const f32)> {
        match self {
            Gain::Value(g) => Ok((g, std::ptr::null())),
            Gain::At(b) => {
                expect_len(kernel, "gain", b.len(), 1)?;
                Ok((1.0, b.ptr(gpu)))
            }
        }
    }
}

/// `normalize(W)·gain/sqrt(fan_in)` (paper Eq. 47) from the stored OIHW weight.
pub fn effective_weight(gpu: &Gpu, w: &GpuBuf<f32>, geom: ConvGeom, gain: Gain) -> Result<GpuEffWeight> {
    let k = "effective_weight";
    let (mut eff, gain_at) = effective_weight_buffers(gpu, k, w, geom, gain, true)?;
    let (wb, wf) = eff.bf16_ptrs(gpu);
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_effective_weight_f32(
            w.ptr(gpu),
            eff.w.ptr_mut(gpu),
            eff.denom.ptr_mut(gpu),
            wb,
            wf,
            int(k, geom.out_ch)?,
            int(k, geom.in_ch)?,
            int(k, geom.taps())?,
            eff.gain,
            gain_at,
            st,
        )
    })?;
    Ok(eff)
}

/// The (unwritten) buffers of a new effective weight of `w` with their checks, and the
/// gain's device address (null for a fixed gain, which `eff.gain` holds). `backward`:
/// whether a backward will use it (the data gradient's operand is made only then).
pub(super) fn effective_weight_buffers(
    gpu: &Gpu,
    k: &str,
    w: &GpuBuf<f32>,
    geom: ConvGeom,
    gain: Gain,
    backward: bool,
) -> Result<(GpuEffWeight, *const f32)> {
    geom.validate(k)?;
    expect_len(k, "w", w.len(), geom.numel())?;
    int(k, geom.fan_in())?;
    let (gain, gain_at) = gain.split(k, gpu)?;
    // The bf16 operands of the pipelined tensor-core kernels, where those can run (not for
    // the linear layers, whose activations are fp32 in every precision; the forward takes
    // input channels in multiples of 32, the data gradient output channels).
    let tc = gpu.act_dtype() == Dtype::Bf16 && gpu.tensor_core_conv() && geom.k > 0;
    let operand = |made: bool| made.then(|| gpu.alloc_dtype(Dtype::Bf16, geom.numel())).transpose();
    let bf16 = operand(tc && geom.in_ch % 32 == 0)?;
    let bf16_flip = operand(tc && backward && geom.out_ch % 32 == 0)?;
    Ok((GpuEffWeight { geom, gain, w: gpu.alloc(geom.numel())?, denom: gpu.alloc(geom.out_ch)?, bf16, bf16_flip }, gain_at))
}

impl GpuEffWeight {
    /// Device addresses of the bf16 operands (null where there are none).
    pub(super) fn bf16_ptrs(&mut self, gpu: &Gpu) -> (*mut u16, *mut u16) {
        let ptr = |a: &mut Option<GpuAct>| a.as_mut().map_or(std::ptr::null_mut(), |b| b.vptr_mut(gpu) as *mut u16);
        (ptr(&mut self.bf16), ptr(&mut self.bf16_flip))
    }
}

/// Gradient of [`effective_weight`]: `d_eff` (OHWI) → `dw` (OIHW; overwritten, or added to
/// with `accumulate`: a gradient buffer) and the gain's gradient per output row into
/// `row_dgain` (overwritten, where given; [`sum_add_into`] adds the rows up in a fixed
/// order). `gain_at`: the gain parameter the effective weight was made with, if any. Reads
/// nothing of `eff` but its geometry and fixed gain (the rows' denominators are recomputed
/// from `w`, bit for bit the forward's).
#[allow(clippy::too_many_arguments)]
pub fn effective_weight_backward(
    gpu: &Gpu,
    w: &GpuBuf<f32>,
    eff: &GpuEffWeight,
    gain_at: Option<&GpuBuf<f32>>,
    d_eff: &GpuBuf<f32>,
    dw: &mut GpuBuf<f32>,
    row_dgain: Option<&mut GpuBuf<f32>>,
    accumulate: bool,
) -> Result<()> {
    let k = "effective_weight_backward";
    let (gain, gain_at) = gain_at.map_or(Gain::Value(eff.gain), Gain::At).split(k, gpu)?;
    let g = eff.geom;
    expect_len(k, "w", w.len(), g.numel())?;
    expect_len(k, "d_eff", d_eff.len(), g.numel())?;
    expect_len(k, "dw", dw.len(), g.numel())?;
    let rows = match row_dgain {
        Some(r) => {
            expect_len(k, "row_dgain", r.len(), g.out_ch)?;
            r.ptr_mut(gpu)
        }
        None => std::ptr::null_mut(),
    };
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_effective_weight_backward_f32(
            w.ptr(gpu),
            d_eff.ptr(gpu),
            dw.ptr_mut(gpu),
            rows,
            int(k, g.out_ch)?,
            int(k, g.in_ch)?,
            int(k, g.taps())?,
            gain,
            gain_at,
            accumulate as i32,
            st,
        )
    })?;
    Ok(())
}

fn conv_dims(kernel: &str, geom: ConvGeom, s: Nhwc) -> Result<(i32, i32, i32)> {
    geom.validate(kernel)?;
    if s.c != geom.in_ch || (geom.k == 0 && (s.h != 1 || s.w != 1)) {
        return Err(Error::Input(format!("{kernel}: input {s:?} does not fit {geom:?}")));
    }
    Ok((int(kernel, s.n)?, int(kernel, s.h)?, int(kernel, s.w)?))
}

/// `y` `[n, h, w, O]` = conv(`x` `[n, h, w, I]`, eff) ('same', stride 1), on the kernel
/// [`Gpu::conv_algo`] picks for the shape (conv_algo.rs).
pub fn conv_forward(gpu: &Gpu, eff: &GpuEffWeight, x: &dyn Values, s: Nhwc, y: &mut dyn Values) -> Result<()> {
    let key = ConvKey::new(ConvDir::Forward, eff.geom, s, x.dtype() == Dtype::Bf16 && y.dtype() == Dtype::Bf16);
    let pipe_ok = pipe_ok(gpu, eff.geom.in_ch, x, y);
    tuned(gpu, key, pipe_ok, &mut |a: ConvAlgo| match a.tile() {
        None => conv_forward_simt(gpu, eff, x, s, y),
        Some(tile) => conv_forward_tensor_core_tile(gpu, eff, x, s, y, tile),
    })
}

/// Runs convolution `key` on the variant [`Gpu::conv_algo`] picks among those that apply
/// (`pipe_ok`: the pipelined tiles can take it): `run(variant)` launches one.
fn tuned(gpu: &Gpu, key: ConvKey, pipe_ok: bool, run: &mut dyn FnMut(ConvAlgo) -> Result<()>) -> Result<()> {
    let cands = candidates(&key, gpu.tensor_core_conv(), pipe_ok);
    let algo = gpu.conv_algo(key, &cands, pipe_ok, run)?;
    run(algo)
}

/// [`conv_forward`] on conv.cu's SIMT kernel (fp32 or bf16 activations).
pub fn conv_forward_simt(gpu: &Gpu, eff: &GpuEffWeight, x: &dyn Values, s: Nhwc, y: &mut dyn Values) -> Result<()> {
    let k = "conv_forward";
    let (n, h, w) = conv_dims(k, eff.geom, s)?;
    expect_len(k, "x", x.len(), s.numel())?;
    expect_len(k, "y", y.len(), s.pixels() * eff.geom.out_ch)?;
    let (i, o) = (int(k, eff.geom.in_ch)?, int(k, eff.geom.out_ch)?);
    let dt = dtype_of(k, &[x.dtype(), y.dtype()])?;
    let st = gpu.stream()?;
    check(k, unsafe { ffi::edm2_conv_forward(x.vptr(gpu), eff.w.ptr(gpu), y.vptr_mut(gpu), n, h, w, i, o, eff.geom.k as i32, dt, st) })
}

/// The block tile of the tensor-core convolutions (forward and data gradient): `simple`
/// is conv_tc.cu's first kernel (any shape); the others are its pipelined kernel
/// (kernels/tc_pipe.cuh; input channels a multiple of 32, else `simple` runs), `auto`
/// picks the tile from the shape. Set by `EDM2_CONV_TC_TILE` = auto | simple | 128x128 |
/// 128x64 | 64x64 (the benchmarks time each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcTile {
    Auto,
    Simple,
    T128x128,
    T128x64,
    T64x64,
}

impl TcTile {
    pub const ALL: [TcTile; 5] = [
        TcTile::Auto,
        TcTile::Simple,
        TcTile::T128x128,
        TcTile::T128x64,
        TcTile::T64x64,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TcTile::Auto => "auto",
            TcTile::Simple => "simple",
            TcTile::T128x128 => "128x128",
            TcTile::T128x64 => "128x64",
            TcTile::T64x64 => "64x64",
        }
    }

    /// `EDM2_CONV_TC_TILE`, or `auto` when unset; an unknown value is an error naming it.
    pub fn from_env() -> Result<TcTile> {
        match std::env::var("EDM2_CONV_TC_TILE") {
            Err(_) => Ok(TcTile::Auto),
            Ok(v) => TcTile::ALL.into_iter().find(|t| t.name() == v).ok_or_else(|| {
                Error::Input(format!("EDM2_CONV_TC_TILE={v:?}: expected one of auto, simple, 128x128, 128x64, 64x64"))
            }),
        }
    }

    /// The pipelined kernel's `variant` argument (None: the simple kernel).
    fn pipe_variant(self) -> Option<i32> {
        match self {
            TcTile::Simple => None,
            TcTile::Auto => Some(0),
            TcTile::T128x128 => Some(1),
            TcTile::T128x64 => Some(2),
            TcTile::T64x64 => Some(3),
        }
    }
}

/// [`conv_forward`] on tensor cores (kernels/conv_tc.cu) with the tile given: bf16
/// activations only; the pipelined tiles where the input channels are a multiple of 32
/// (and the buffers aligned), else the simple kernel.
pub fn conv_forward_tensor_core_tile(
    gpu: &Gpu,
    eff: &GpuEffWeight,
    x: &dyn Values,
    s: Nhwc,
    y: &mut dyn Values,
    tile: TcTile,
) -> Result<()> {
    let k = "conv_forward_tensor_core";
    let (n, h, w) = conv_dims(k, eff.geom, s)?;
    expect_len(k, "x", x.len(), s.numel())?;
    expect_len(k, "y", y.len(), s.pixels() * eff.geom.out_ch)?;
    if dtype_of(k, &[x.dtype(), y.dtype()])? != Dtype::Bf16.code() {
        return Err(Error::Input(format!(
            "{k}: needs bf16 activations, got {:?}",
            x.dtype()
        )));
    }
    let (i, o) = (int(k, eff.geom.in_ch)?, int(k, eff.geom.out_ch)?);
    if let Some(variant) = tile
        .pipe_variant()
        .filter(|_| pipe_ok(gpu, eff.geom.in_ch, x, y))
    {
        let dims = (n, h, w, i, o, eff.geom.k as i32);
        return match &eff.bf16 {
            Some(wb) => conv_forward_pipe(gpu, x, wb, y, dims, variant),
            None => conv_forward_pipe(gpu, x, &scaled_to(gpu, &eff.w, Dtype::Bf16, 1.0)?, y, dims, variant),
        };
    }
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_conv_forward_tc(
            x.vptr(gpu) as *const u16,
            eff.w.ptr(gpu),
            y.vptr_mut(gpu) as *mut u16,
            n,
            h,
            w,
            i,
            o,
            eff.geom.k as i32,
            st,
        )
    })
}

/// Whether the pipelined forward kernel can run a convolution of `cin` input channels
/// from `x` into `y`: `cin` a multiple of its 32-channel K step, `x` read with 16-byte
/// copies and `y` stored in pairs (true of every buffer we allocate; a view at an odd
/// offset takes the simple kernel).
fn pipe_ok(gpu: &Gpu, cin: usize, x: &dyn Values, y: &mut dyn Values) -> bool {
    cin % 32 == 0 && (x.vptr(gpu) as usize) % 16 == 0 && (y.vptr_mut(gpu) as usize) % 4 == 0
}

/// The pipelined tensor-core forward (kernels/conv_tc.cu) with a bf16 weight `wb`
/// `[cout][taps·cin]`; dims = (n, h, w, cin, cout, k), checked by the caller.
fn conv_forward_pipe(
    gpu: &Gpu,
    x: &dyn Values,
    wb: &GpuAct,
    y: &mut dyn Values,
    dims: (i32, i32, i32, i32, i32, i32),
    variant: i32,
) -> Result<()> {
    let (n, h, w, i, o, kk) = dims;
    let st = gpu.stream()?;
    check("conv_forward_tc_pipe", unsafe {
        ffi::edm2_conv_forward_tc_pipe(
            x.vptr(gpu) as *const u16,
            wb.vptr(gpu) as *const u16,
            y.vptr_mut(gpu) as *mut u16,
            n,
            h,
            w,
            i,
            o,
            kk,
            variant,
            st,
        )
    })
}

/// Data gradient: `dx` (like `x`, shape `s`, overwritten) from `dy`, on the kernel
/// [`Gpu::conv_algo`] picks for the shape (conv_algo.rs).
pub fn conv_backward_data(
    gpu: &Gpu,
    eff: &GpuEffWeight,
    dy: &dyn Values,
    s: Nhwc,
    dx: &mut dyn Values,
) -> Result<()> {
    let key = ConvKey::new(ConvDir::Data, eff.geom, s, dy.dtype() == Dtype::Bf16 && dx.dtype() == Dtype::Bf16);
    let pipe_ok = pipe_ok(gpu, eff.geom.out_ch, dy, dx);
    tuned(gpu, key, pipe_ok, &mut |a: ConvAlgo| match a.tile() {
        None => conv_backward_data_simt(gpu, eff, dy, s, dx),
        Some(tile) => conv_backward_data_tensor_core_tile(gpu, eff, dy, s, dx, tile),
    })
}

/// [`conv_backward_data`] adding into `dx` instead of overwriting it (gradients joining:
/// the embedding's, summed over the blocks). One launch where the SIMT kernel is the only
/// variant for the shape (the linear layers: fp32 activations); elsewhere the data gradient
/// into a temporary and an add (the tuner runs its candidates on the output, which must
/// be overwritten).
pub fn conv_backward_data_add(gpu: &Gpu, eff: &GpuEffWeight, dy: &dyn Values, s: Nhwc, dx: &mut dyn Values) -> Result<()> {
    let key = ConvKey::new(ConvDir::Data, eff.geom, s, dy.dtype() == Dtype::Bf16 && dx.dtype() == Dtype::Bf16);
    if candidates(&key, gpu.tensor_core_conv(), pipe_ok(gpu, eff.geom.out_ch, dy, dx)) == [ConvAlgo::Simt] {
        return conv_backward_data_simt_into(gpu, eff, dy, s, dx, true);
    }
    let mut t = gpu.alloc_dtype(dx.dtype(), dx.len())?;
    conv_backward_data(gpu, eff, dy, s, &mut t)?;
    axpby(gpu, dx, &t, 1.0, 1.0)
}

/// [`conv_backward_data`] on conv.cu's SIMT kernel (fp32 or bf16 activations).
pub fn conv_backward_data_simt(gpu: &Gpu, eff: &GpuEffWeight, dy: &dyn Values, s: Nhwc, dx: &mut dyn Values) -> Result<()> {
    conv_backward_data_simt_into(gpu, eff, dy, s, dx, false)
}

/// [`conv_backward_data_simt`], adding into `dx` with `accumulate`.
fn conv_backward_data_simt_into(gpu: &Gpu, eff: &GpuEffWeight, dy: &dyn Values, s: Nhwc, dx: &mut dyn Values, accumulate: bool) -> Result<()> {
    let k = "conv_backward_data";
    let (n, h, w) = conv_dims(k, eff.geom, s)?;
    expect_len(k, "dy", dy.len(), s.pixels() * eff.geom.out_ch)?;
    expect_len(k, "dx", dx.len(), s.numel())?;
    let (i, o) = (int(k, eff.geom.in_ch)?, int(k, eff.geom.out_ch)?);
    let dt = dtype_of(k, &[dy.dtype(), dx.dtype()])?;
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_conv_backward_data(
            dy.vptr(gpu),
            eff.w.ptr(gpu),
            dx.vptr_mut(gpu),
            n,
            h,
            w,
            i,
            o,
            eff.geom.k as i32,
            accumulate as i32,
            dt,
            st,
        )
    })
}

/// [`conv_backward_data`] on tensor cores with the tile given: the forward kernel of
/// conv_tc.cu on the flipped, transposed effective weight (kernels/conv_tc_backward.cu).
/// bf16 only; the pipelined tiles where the output channels are a multiple of 32.
pub fn conv_backward_data_tensor_core_tile(
    gpu: &Gpu,
    eff: &GpuEffWeight,
    dy: &dyn Values,
    s: Nhwc,
    dx: &mut dyn Values,
    tile: TcTile,
) -> Result<()> {
    let k = "conv_backward_data_tensor_core";
    let (n, h, w) = conv_dims(k, eff.geom, s)?;
    expect_len(k, "dy", dy.len(), s.pixels() * eff.geom.out_ch)?;
    expect_len(k, "dx", dx.len(), s.numel())?;
    if dtype_of(k, &[dy.dtype(), dx.dtype()])? != Dtype::Bf16.code() {
        return Err(Error::Input(format!(
            "{k}: needs bf16 activations, got {:?}",
            dy.dtype()
        )));
    }
    let (i, o, kk) = (
        int(k, eff.geom.in_ch)?,
        int(k, eff.geom.out_ch)?,
        eff.geom.k as i32,
    );
    // The forward with cin = O and cout = I, on the flipped transpose of the weight: the
    // effective-weight kernel's bf16 one where it made it, else flipped and converted here.
    let pipe = tile.pipe_variant().filter(|_| pipe_ok(gpu, eff.geom.out_ch, dy, dx));
    if let (Some(variant), Some(wfb)) = (pipe, &eff.bf16_flip) {
        return conv_forward_pipe(gpu, dy, wfb, dx, (n, h, w, o, i, kk), variant);
    }
    let mut wf = gpu.alloc::<f32>(eff.geom.numel())?;
    let st = gpu.stream()?;
    check("conv_weight_flip", unsafe {
        ffi::edm2_conv_weight_flip(eff.w.ptr(gpu), wf.ptr_mut(gpu), i, o, kk, st)
    })?;
    if let Some(variant) = pipe {
        let wb = scaled_to(gpu, &wf, Dtype::Bf16, 1.0)?;
        return conv_forward_pipe(gpu, dy, &wb, dx, (n, h, w, o, i, kk), variant);
    }
    check(k, unsafe {
        ffi::edm2_conv_forward_tc(
            dy.vptr(gpu) as *const u16,
            wf.ptr(gpu),
            dx.vptr_mut(gpu) as *mut u16,
            n,
            h,
            w,
            o,
            i,
            kk,
            st,
        )
    })
}

/// Weight gradient w.r.t. the effective weight: `d_eff` OHWI (overwritten), on the kernel
/// [`Gpu::conv_algo`] picks for the shape (conv_algo.rs).
pub fn conv_backward_weight(
    gpu: &Gpu,
    geom: ConvGeom,
    x: &dyn Values,
    s: Nhwc,
    dy: &dyn Values,
    d_eff: &mut GpuBuf<f32>,
) -> Result<()> {
    let key = ConvKey::new(ConvDir::Weight, geom, s, x.dtype() == Dtype::Bf16 && dy.dtype() == Dtype::Bf16);
    let pipe_ok = wgrad_pipe_ok(gpu, geom, x, s, dy);
    tuned(gpu, key, pipe_ok, &mut |a: ConvAlgo| match a.tile() {
        None => conv_backward_weight_simt(gpu, geom, x, s, dy, d_eff),
        Some(tile) => conv_backward_weight_tensor_core_tile(gpu, geom, x, s, dy, d_eff, tile),
    })
}

/// Whether the pipelined weight-gradient kernel can run: channels multiples of 8, the
/// pixels within its int indices, both operands 16-byte aligned.
fn wgrad_pipe_ok(gpu: &Gpu, geom: ConvGeom, x: &dyn Values, s: Nhwc, dy: &dyn Values) -> bool {
    geom.in_ch % 8 == 0
        && geom.out_ch % 8 == 0
        && s.pixels() < (i32::MAX as usize) / 2
        && (x.vptr(gpu) as usize) % 16 == 0
        && (dy.vptr(gpu) as usize) % 16 == 0
}

/// [`conv_backward_weight`] on tensor cores with the tile given, split-K over the pixels
/// into a pooled fp32 workspace, reduced in a fixed order (kernels/conv_tc_backward.cu);
/// bf16 only. The pipelined kernel where [`wgrad_pipe_ok`], else the simple one.
pub fn conv_backward_weight_tensor_core_tile(
    gpu: &Gpu,
    geom: ConvGeom,
    x: &dyn Values,
    s: Nhwc,
    dy: &dyn Values,
    d_eff: &mut GpuBuf<f32>,
    tile: TcTile,
) -> Result<()> {
    let k = "conv_backward_weight_tensor_core";
    let (n, h, w) = conv_dims(k, geom, s)?;
    expect_len(k, "x", x.len(), s.numel())?;
    expect_len(k, "dy", dy.len(), s.pixels() * geom.out_ch)?;
    expect_len(k, "d_eff", d_eff.len(), geom.numel())?;
    if dtype_of(k, &[x.dtype(), dy.dtype()])? != Dtype::Bf16.code() {
        return Err(Error::Input(format!(
            "{k}: needs bf16 activations, got {:?}",
            x.dtype()
        )));
    }
    let (i, o, kk) = (int(k, geom.in_ch)?, int(k, geom.out_ch)?, geom.k as i32);
    let pipe = tile.pipe_variant().filter(|_| wgrad_pipe_ok(gpu, geom, x, s, dy));
    let splits = match pipe {
        Some(v) => unsafe { ffi::edm2_conv_wgrad_tc_pipe_splits(n, h, w, i, o, kk, v) },
        None => unsafe { ffi::edm2_conv_wgrad_tc_splits(n, h, w, i, o, kk) },
    }
    .max(1);
    let mut ws = (splits > 1)
        .then(|| gpu.alloc::<f32>(splits as usize * geom.numel()))
        .transpose()?;
    let ws_ptr = ws.as_mut().map_or(std::ptr::null_mut(), |b| b.ptr_mut(gpu));
    let (xp, dyp) = (x.vptr(gpu) as *const u16, dy.vptr(gpu) as *const u16);
    let st = gpu.stream()?;
    match pipe {
        Some(v) => check("conv_backward_weight_tc_pipe", unsafe {
            ffi::edm2_conv_backward_weight_tc_pipe(
                xp,
                dyp,
                d_eff.ptr_mut(gpu),
                ws_ptr,
                splits,
                n,
                h,
                w,
                i,
                o,
                kk,
                v,
                st,
            )
        }),
        None => check(k, unsafe {
            ffi::edm2_conv_backward_weight_tc(
                xp,
                dyp,
                d_eff.ptr_mut(gpu),
                ws_ptr,
                splits,
                n,
                h,
                w,
                i,
                o,
                kk,
                st,
            )
        }),
    }
}

/// [`conv_backward_weight`] on conv.cu's SIMT kernel (fp32 or bf16 activations).
pub fn conv_backward_weight_simt(gpu: &Gpu, geom: ConvGeom, x: &dyn Values, s: Nhwc, dy: &dyn Values, d_eff: &mut GpuBuf<f32>) -> Result<()> {
    let k = "conv_backward_weight";
    let (n, h, w) = conv_dims(k, geom, s)?;
    expect_len(k, "x", x.len(), s.numel())?;
    expect_len(k, "dy", dy.len(), s.pixels() * geom.out_ch)?;
    expect_len(k, "d_eff", d_eff.len(), geom.numel())?;
    let (i, o) = (int(k, geom.in_ch)?, int(k, geom.out_ch)?);
    let dt = dtype_of(k, &[x.dtype(), dy.dtype()])?;
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_conv_backward_weight(x.vptr(gpu), dy.vptr(gpu), d_eff.ptr_mut(gpu), n, h, w, i, o, geom.k as i32, dt, st)
    })
}

/// `a ← a + v`.
pub fn add_scalar(gpu: &Gpu, a: &mut dyn Values, v: f32) -> Result<()> {
    let st = gpu.stream()?;
    check("add_scalar", unsafe { ffi::edm2_add_scalar(a.vptr_mut(gpu), v, a.len(), a.dtype().code(), st) })
}

/// `k·x` as a new buffer (`k` = 1: a device copy).
pub fn scaled(gpu: &Gpu, x: &dyn Values, k: f32) -> Result<GpuAct> {
    scaled_to(gpu, x, x.dtype(), k)
}

/// `k·x` as a new buffer of `dtype` (`k` = 1: a conversion, bf16 rounded to nearest even).
pub fn scaled_to(gpu: &Gpu, x: &dyn Values, dtype: Dtype, k: f32) -> Result<GpuAct> {
    let mut y = gpu.alloc_dtype(dtype, x.len())?;
    let st = gpu.stream()?;
    check("scaled", unsafe { ffi::edm2_scaled(x.vptr(gpu), x.dtype().code(), y.vptr_mut(gpu), k, x.len(), dtype.code(), st) })?;
    Ok(y)
}

/// `kb·x` as a new buffer and `x ← ka·x`, in one launch (the bits of [`scaled`] and [`scale`]);
/// with a clip `mask`, `x` is zeroed where it is set first (the bits of [`clip_backward`]
/// before them).
pub fn split_scaled(gpu: &Gpu, x: &mut dyn Values, ka: f32, kb: f32, mask: Option<&GpuBuf<u8>>) -> Result<GpuAct> {
    let m = match mask {
        Some(m) => {
            same_len("split_scaled mask", x.len(), m.len())?;
            m.ptr(gpu)
        }
        None => std::ptr::null(),
    };
    let mut y = gpu.alloc_dtype(x.dtype(), x.len())?;
    let st = gpu.stream()?;
    check("split_scaled", unsafe { ffi::edm2_split_scaled(x.vptr_mut(gpu), y.vptr_mut(gpu), ka, kb, m, x.len(), x.dtype().code(), st) })?;
    Ok(y)
}

/// Per-image factors: `x[b, ...] ← k[b]·x[b, ...]`.
pub fn scale_images(gpu: &Gpu, x: &mut dyn Values, k: &[f32]) -> Result<()> {
    let per = images_of("scale_images", x.len(), k.len())?;
    let kb = gpu.upload(k)?;
    let st = gpu.stream()?;
    check("scale_images", unsafe { ffi::edm2_scale_images(x.vptr_mut(gpu), kb.ptr(gpu), per, x.len(), x.dtype().code(), st) })
}

fn images_of(kernel: &str, len: usize, images: usize) -> Result<usize> {
    if images == 0 || len % images != 0 {
        return Err(Error::Input(format!("{kernel}: {len} values do not split into {images} images")));
    }
    Ok(len / images)
}

/// The network input `[c_in[b]·x, 1]` (NHWC, `c` image channels → `c + 1`); `x` and `out`
/// may differ in dtype (the bf16 mode keeps the input x in fp32).
pub fn precond_input(gpu: &Gpu, x: &dyn Values, c_in: &[f32], c: usize, out: &mut dyn Values) -> Result<()> {
    let k = "precond_input";
    let per = images_of(k, x.len(), c_in.len())?;
    if c == 0 || per % c != 0 {
        return Err(Error::Input(format!("{k}: images of {per} values do not have {c} channels")));
    }
    expect_len(k, "out", out.len(), x.len() / c * (c + 1))?;
    let kb = gpu.upload(c_in)?;
    let (xt, dt) = (x.dtype().code(), out.dtype().code());
    let st = gpu.stream()?;
    check(k, unsafe { ffi::edm2_precond_input(x.vptr(gpu), xt, kb.ptr(gpu), out.vptr_mut(gpu), int(k, c)?, per / c, c_in.len(), dt, st) })
}

/// `d = c_skip[b]·x + c_out[b]·f`; `x` and `d` share a dtype, `f` may differ (the bf16
/// mode keeps x and D in fp32, as the official mixed precision does).
pub fn precond_output(gpu: &Gpu, x: &dyn Values, f: &dyn Values, c_skip: &[f32], c_out: &[f32], d: &mut dyn Values) -> Result<()> {
    let k = "precond_output";
    let per = images_of(k, x.len(), c_skip.len())?;
    same_len(k, c_skip.len(), c_out.len())?;
    expect_len(k, "f", f.len(), x.len())?;
    expect_len(k, "d", d.len(), x.len())?;
    let (ks, ko) = (gpu.upload(c_skip)?, gpu.upload(c_out)?);
    let xt = dtype_of(k, &[x.dtype(), d.dtype()])?;
    let dt = f.dtype().code();
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_precond_output(x.vptr(gpu), xt, f.vptr(gpu), ks.ptr(gpu), ko.ptr(gpu), d.vptr_mut(gpu), per, x.len(), dt, st)
    })
}

/// The EDM2 loss on the device: what [`crate::train::loss::edm2_loss`] computes, left on
/// the device (a training pass reads nothing back), gradients multiplied by `scale` (the
/// loss scaling).
pub struct GpuLoss {
    /// Per-image sums of the elementwise loss `Σ (l + u_b)` (fp32).
    pub per_sample: GpuBuf<f32>,
    /// dL/dD · scale, like `d` (same dtype).
    pub dd: GpuAct,
    /// dL/dlogvar · scale per image (fp32).
    pub dlogvar: GpuAct,
}

impl GpuLoss {
    /// `Σ loss / N`, read back (waits for the device).
    pub fn total(&self, gpu: &Gpu) -> Result<f64> {
        let v = gpu.download(&self.per_sample)?;
        Ok(v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64)
    }
}

/// The uncertainty-weighted EDM2 loss of `d` against `images` (`n` images of equal size;
/// `logvar` one value per image, any dtype), its gradient w.r.t. D and w.r.t. logvar.
#[allow(clippy::too_many_arguments)]
pub fn edm2_loss(
    gpu: &Gpu,
    d: &dyn Values,
    images: &GpuBuf<f32>,
    logvar: &dyn Values,
    sigma: &[f32],
    sigma_data: f32,
    scale: f32,
) -> Result<GpuLoss> {
    let k = "edm2_loss";
    let n = sigma.len();
    same_len(k, logvar.len(), n)?;
    expect_len(k, "images", images.len(), d.len())?;
    let per = images_of(k, d.len(), n)?;
    let sb = gpu.upload(sigma)?;
    // The kernel reads fp32 logvar (the network's is fp32 already; convert anything else).
    let converted = if logvar.dtype() == Dtype::F32 { None } else { Some(scaled_to(gpu, logvar, Dtype::F32, 1.0)?) };
    let logvar: &dyn Values = match &converted {
        Some(c) => c,
        None => logvar,
    };
    let mut dd = gpu.alloc_dtype(d.dtype(), d.len())?;
    let mut per_sample = gpu.alloc::<f32>(n)?;
    let mut dlogvar = gpu.alloc::<f32>(n)?;
    let st = gpu.stream()?;
    check(k, unsafe {
        ffi::edm2_loss(
            d.vptr(gpu),
            images.ptr(gpu),
            sb.ptr(gpu),
            sigma_data,
            logvar.vptr(gpu) as *const f32,
            dd.vptr_mut(gpu),
            per_sample.ptr_mut(gpu),
            dlogvar.ptr_mut(gpu),
            n,
            per,
            2.0 / n as f32 * scale,
            scale / n as f32,
            d.dtype().code(),
            st,
        )
    })?;
    Ok(GpuLoss { per_sample, dd, dlogvar: GpuAct::F32(dlogvar) })
}

/// What the host reads of a training step, gathered into one f64 buffer `out` of 3 (one
/// download a step): `out[0] +=` the sum of `loss_sums` (in order, in f64); with `counts`
/// (Adam's two non-finite counters), `out[1]`, `out[2]` = those counts.
pub fn step_totals(gpu: &Gpu, loss_sums: Option<&GpuBuf<f32>>, counts: Option<&GpuBuf<u32>>, out: &mut GpuBuf<f64>) -> Result<()> {
    expect_len("step_totals", "out", out.len(), 3)?;
    if let Some(c) = counts {
        expect_len("step_totals", "counts", c.len(), 2)?;
    }
    let (l, n) = loss_sums.map_or((std::ptr::null(), 0), |b| (b.ptr(gpu), b.len()));
    let c = counts.map_or(std::ptr::null(), |b| b.ptr(gpu));
    let s = gpu.stream()?;
    check("step_totals", unsafe { ffi::edm2_step_totals(l, n, c, out.ptr_mut(gpu), s) })
}

/// Linear layers sharing their fp32 input (the blocks' `emb_linear`), one launch per
/// direction for all of them (conv.cu's `linear_group_kernel`: the tiles of the single
/// calls, so the same bits as one [`conv_forward`] / [`conv_backward_data_add`] /
/// [`conv_backward_weight`] per layer).
pub mod linear_group {
    use super::*;

    const FWD: i32 = 0;
    const DATA: i32 = 1;
    const WEIGHT: i32 = 2;

    /// The common input width and the largest output width; every layer must be linear
    /// with `cin` inputs, every buffer fp32.
    fn dims(k: &str, geoms: &[ConvGeom], x: &dyn Values, n: usize) -> Result<(usize, usize)> {
        let cin = geoms.first().map_or(0, |g| g.in_ch);
        for g in geoms {
            g.validate(k)?;
            if g.k != 0 || g.in_ch != cin {
                return Err(Error::Input(format!("{k}: {g:?} is not a linear layer of {cin} inputs")));
            }
        }
        fp32(k, "x", x)?;
        expect_len(k, "x", x.len(), n * cin)?;
        int(k, n)?;
        int(k, cin)?;
        Ok((cin, geoms.iter().map(|g| g.out_ch).max().unwrap_or(0)))
    }

    fn launch(gpu: &Gpu, k: &'static str, mode: i32, rows: &[u64], max_cout: usize, x: &dyn Values, dx: *mut f32, n: usize, cin: usize) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let layers = i32::try_from(rows.len() / 4).map_err(|_| Error::Input(format!("{k}: too many layers")))?;
        let table = gpu.upload(rows)?;
        let st = gpu.stream()?;
        check(k, unsafe {
            ffi::edm2_linear_group(mode, table.ptr(gpu), layers, int(k, max_cout)?, x.vptr(gpu) as *const f32, dx, n as i32, cin as i32, st)
        })
    }

    fn addr<P>(p: *const P) -> u64 {
        p as usize as u64
    }

    /// `y_b = x·W_bᵀ` for every effective weight of `effs`, `x` `[n, in]`.
    pub fn forward(gpu: &Gpu, effs: &[&GpuEffWeight], x: &dyn Values, n: usize) -> Result<Vec<GpuAct>> {
        let k = "linear_group_forward";
        let geoms: Vec<ConvGeom> = effs.iter().map(|e| e.geom).collect();
        let (cin, max_cout) = dims(k, &geoms, x, n)?;
        let mut ys = Vec::with_capacity(effs.len());
        let mut rows = Vec::with_capacity(4 * effs.len());
        for e in effs {
            let mut y = gpu.alloc::<f32>(n * e.geom.out_ch)?;
            rows.extend([addr(e.w.ptr(gpu)), addr(y.ptr_mut(gpu)), e.geom.out_ch as u64, 0]);
            ys.push(GpuAct::F32(y));
        }
        launch(gpu, k, FWD, &rows, max_cout, x, std::ptr::null_mut(), n, cin)?;
        Ok(ys)
    }

    /// `dx += dy_b·W_b` for every `(W_b, dy_b)` of `layers`, added in that order.
    pub fn backward_data(gpu: &Gpu, layers: &[(&GpuEffWeight, &dyn Values)], dx: &mut dyn Values, n: usize) -> Result<()> {
        let k = "linear_group_backward_data";
        let geoms: Vec<ConvGeom> = layers.iter().map(|l| l.0.geom).collect();
        let (cin, max_cout) = dims(k, &geoms, &*dx, n)?;
        let mut rows = Vec::with_capacity(4 * layers.len());
        for (e, dy) in layers {
            fp32(k, "dy", *dy)?;
            expect_len(k, "dy", dy.len(), n * e.geom.out_ch)?;
            rows.extend([addr(e.w.ptr(gpu)), addr(dy.vptr(gpu)), e.geom.out_ch as u64, 0]);
        }
        let dxp = dx.vptr_mut(gpu) as *mut f32;
        launch(gpu, k, DATA, &rows, max_cout, &*dx, dxp, n, cin)
    }

    /// `dW_b = dy_bᵀ·x` (overwritten) for every `(geometry, dy_b, dW_b)` of `layers`.
    pub fn backward_weight(gpu: &Gpu, layers: &mut [(ConvGeom, &dyn Values, &mut GpuBuf<f32>)], x: &dyn Values, n: usize) -> Result<()> {
        let k = "linear_group_backward_weight";
        let geoms: Vec<ConvGeom> = layers.iter().map(|l| l.0).collect();
        let (cin, max_cout) = dims(k, &geoms, x, n)?;
        let mut rows = Vec::with_capacity(4 * layers.len());
        for (g, dy, dw) in layers.iter_mut() {
            fp32(k, "dy", *dy)?;
            expect_len(k, "dy", dy.len(), n * g.out_ch)?;
            expect_len(k, "dW", dw.len(), g.numel())?;
            rows.extend([addr(dy.vptr(gpu)), addr(dw.ptr_mut(gpu)), g.out_ch as u64, 0]);
        }
        launch(gpu, k, WEIGHT, &rows, max_cout, x, std::ptr::null_mut(), n, cin)
    }
}
