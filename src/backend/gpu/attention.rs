//! Cosine attention on the device. Two implementations, one contract (the CPU backend's
//! `attention` module is the reference for both):
//! - `kernels/attention_flash.cu`, FlashAttention-2 style on tensor cores, for bf16
//!   activations with a head width of 16, 32 or 64 (EDM2's is 64): no `[N, heads, P, P]`
//!   buffer — the forward keeps one log-sum-exp per row and the backward recomputes the
//!   softmax from it (at EDM2-XS batch 128 the kept softmax was ~1.4 GB).
//! - `kernels/attention.cu`, fp32 kernels that keep the softmax: fp32 activations (the
//!   exact mode), other head widths, and `EDM2_FLASH_ATTENTION=0` / [`Gpu::set_flash_attention`].

use super::kernels::{dtype_of, expect_len, int, Values};
use super::{check, ffi, Dtype, Gpu, GpuBuf};
use crate::error::{Error, Result};

/// What the attention backward needs from the forward (device workspace).
pub enum GpuAttnCache {
    /// fp32 kernels: the normalized q, k, v `[N, heads, P, Ch]` and the softmax `[N, heads, P, P]`.
    Softmax { qn: GpuBuf<f32>, kn: GpuBuf<f32>, vn: GpuBuf<f32>, w: GpuBuf<f32> },
    /// Flash kernels: the normalized q, k, v as bf16 `[3][N, heads, P, Ch]` and each
    /// softmax row's log-denominator `[N, heads, P]`.
    Flash { qkvn: GpuBuf<u16>, lse: GpuBuf<f32> },
}

impl GpuAttnCache {
    /// The softmax `[N, heads, P, P]`, where this cache keeps one (the fp32 kernels).
    pub fn softmax(&self) -> Option<&GpuBuf<f32>> {
        match self {
            GpuAttnCache::Softmax { w, .. } => Some(w),
            GpuAttnCache::Flash { .. } => None,
        }
    }

    /// Whether the flash kernels made it.
    pub fn is_flash(&self) -> bool {
        matches!(self, GpuAttnCache::Flash { .. })
    }
}

fn attn_dims(kernel: &str, n: usize, p: usize, c: usize, heads: usize) -> Result<(i32, i32, i32, i32)> {
    if heads == 0 || c % heads != 0 || n == 0 || p == 0 {
        return Err(Error::Input(format!("{kernel}: {c} channels do not split into {heads} heads")));
    }
    Ok((int(kernel, n)?, int(kernel, p)?, int(kernel, c)?, int(kernel, heads)?))
}

/// Whether the flash kernels take this call: bf16 in and out, a head width they are built
/// for, and [`Gpu::flash_attention`] on.
fn takes_flash(gpu: &Gpu, dtypes: &[Dtype], c: i32, heads: i32) -> bool {
    gpu.flash_attention() && dtypes.iter().all(|&d| d == Dtype::Bf16) && unsafe { ffi::edm2_flash_attention_supported(c, heads) } != 0
}

/// The flash kernels stage rows with 16-byte copies.
fn aligned16(kernel: &str, name: &str, ptr: *const std::ffi::c_void) -> Result<()> {
    if (ptr as usize) % 16 != 0 {
        return Err(Error::Input(format!("{kernel}: {name} is not 16-byte aligned")));
    }
    Ok(())
}

/// Cosine attention: `qkv` `[n, p, 3c]` → `y` `[n, p, c]`.
pub fn attention_forward(gpu: &Gpu, qkv: &dyn Values, n: usize, p: usize, c: usize, heads: usize, y: &mut dyn Values) -> Result<GpuAttnCache> {
    let k = "attention_forward";
    let (ni, pi, ci, hi) = attn_dims(k, n, p, c, heads)?;
    expect_len(k, "qkv", qkv.len(), n * p * 3 * c)?;
    expect_len(k, "y", y.len(), n * p * c)?;
    let dt = dtype_of(k, &[qkv.dtype(), y.dtype()])?;
    let st = gpu.stream()?;
    if takes_flash(gpu, &[qkv.dtype(), y.dtype()], ci, hi) {
        let mut qkvn = gpu.alloc::<u16>(3 * n * p * c)?;
        let mut lse = gpu.alloc::<f32>(n * heads * p)?;
        check(k, unsafe {
            ffi::edm2_flash_attention_forward(
                qkv.vptr(gpu) as *const u16,
                y.vptr_mut(gpu) as *mut u16,
                qkvn.ptr_mut(gpu),
                lse.ptr_mut(gpu),
                ni,
                pi,
                ci,
                hi,
                st,
            )
        })?;
        return Ok(GpuAttnCache::Flash { qkvn, lse });
    }
    let (mut qn, mut kn, mut vn) = (gpu.alloc(n * p * c)?, gpu.alloc(n * p * c)?, gpu.alloc(n * p * c)?);
    let mut w = gpu.alloc(n * heads * p * p)?;
    check(k, unsafe {
        ffi::edm2_attention_forward(
            qkv.vptr(gpu),
            y.vptr_mut(gpu),
            qn.ptr_mut(gpu),
            kn.ptr_mut(gpu),
            vn.ptr_mut(gpu),
            w.ptr_mut(gpu),
            ni,
            pi,
            ci,
            hi,
            dt,
            st,
        )
    })?;
    Ok(GpuAttnCache::Softmax { qn, kn, vn, w })
}

/// Gradient of [`attention_forward`]: `dy` `[n, p, c]` → `dqkv` `[n, p, 3c]` (overwritten).
/// `y` is the forward's output (the flash backward's row dot products D = Σ dy·y read it).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    gpu: &Gpu,
    qkv: &dyn Values,
    cache: &GpuAttnCache,
    y: &dyn Values,
    dy: &dyn Values,
    n: usize,
    p: usize,
    c: usize,
    heads: usize,
    dqkv: &mut dyn Values,
) -> Result<()> {
    let k = "attention_backward";
    let (ni, pi, ci, hi) = attn_dims(k, n, p, c, heads)?;
    expect_len(k, "qkv", qkv.len(), n * p * 3 * c)?;
    expect_len(k, "y", y.len(), n * p * c)?;
    expect_len(k, "dy", dy.len(), n * p * c)?;
    expect_len(k, "dqkv", dqkv.len(), n * p * 3 * c)?;
    let dt = dtype_of(k, &[qkv.dtype(), y.dtype(), dy.dtype(), dqkv.dtype()])?;
    let st = gpu.stream()?;
    let (mut dq, mut dk, mut dv) = (gpu.alloc::<f32>(n * p * c)?, gpu.alloc::<f32>(n * p * c)?, gpu.alloc::<f32>(n * p * c)?);
    match cache {
        GpuAttnCache::Flash { qkvn, lse } => {
            if dt != Dtype::Bf16.code() {
                return Err(Error::Input(format!("{k}: a flash-attention cache needs bf16 activations")));
            }
            expect_len(k, "cache.qkvn", qkvn.len(), 3 * n * p * c)?;
            expect_len(k, "cache.lse", lse.len(), n * heads * p)?;
            aligned16(k, "dy", dy.vptr(gpu))?;
            let mut delta = gpu.alloc::<f32>(n * heads * p)?;
            check(k, unsafe {
                ffi::edm2_flash_attention_backward(
                    qkv.vptr(gpu) as *const u16,
                    qkvn.ptr(gpu),
                    lse.ptr(gpu),
                    y.vptr(gpu) as *const u16,
                    dy.vptr(gpu) as *const u16,
                    delta.ptr_mut(gpu),
                    dq.ptr_mut(gpu),
                    dk.ptr_mut(gpu),
                    dv.ptr_mut(gpu),
                    dqkv.vptr_mut(gpu) as *mut u16,
                    ni,
                    pi,
                    ci,
                    hi,
                    st,
                )
            })
        }
        GpuAttnCache::Softmax { qn, kn, vn, w } => {
            expect_len(k, "cache.w", w.len(), n * heads * p * p)?;
            let mut dl = gpu.alloc::<f32>(n * heads * p * p)?;
            check(k, unsafe {
                ffi::edm2_attention_backward(
                    qkv.vptr(gpu),
                    qn.ptr(gpu),
                    kn.ptr(gpu),
                    vn.ptr(gpu),
                    w.ptr(gpu),
                    dy.vptr(gpu),
                    dl.ptr_mut(gpu),
                    dq.ptr_mut(gpu),
                    dk.ptr_mut(gpu),
                    dv.ptr_mut(gpu),
                    dqkv.vptr_mut(gpu),
                    ni,
                    pi,
                    ci,
                    hi,
                    dt,
                    st,
                )
            })
        }
    }
}
