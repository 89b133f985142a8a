//! The EDM sampler's elementwise steps on the device (`kernels/sampler.cu`): the state of
//! a sampling run stays in fp32 device buffers, so a run reads back only its final
//! images ([`crate::api::DeviceNet::sample`]). The kernels round every operation on its
//! own in the host sampler's order (`src/sample/mod.rs`), so given the same network
//! outputs they give its bits.

use super::{check, ffi, same_len, Gpu, GpuAct, GpuBuf};
use crate::error::{Error, Result};

/// The fp32 buffer of a sampler value (the network input and D are fp32 in every
/// precision).
fn f32_of<'a>(kernel: &str, v: &'a GpuAct) -> Result<&'a GpuBuf<f32>> {
    match v {
        GpuAct::F32(b) => Ok(b),
        GpuAct::Bf16(_) => Err(Error::Input(format!("{kernel}: sampler values are fp32, got a bf16 buffer"))),
    }
}

/// `(dc, next) = ((x − d) / t_hat, x + h·dc)`: the Euler step of a Heun step.
pub fn heun_euler(gpu: &Gpu, x: &GpuAct, d: &GpuAct, t_hat: f32, h: f32) -> Result<(GpuAct, GpuAct)> {
    let k = "heun_euler";
    let (x, d) = (f32_of(k, x)?, f32_of(k, d)?);
    same_len(k, x.len(), d.len())?;
    let (mut dc, mut next) = (gpu.alloc::<f32>(x.len())?, gpu.alloc::<f32>(x.len())?);
    let s = gpu.stream()?;
    // SAFETY: four device buffers of x.len() floats each (lengths checked or allocated so).
    check(k, unsafe { ffi::edm2_heun_euler(x.ptr(gpu), d.ptr(gpu), t_hat, h, dc.ptr_mut(gpu), next.ptr_mut(gpu), x.len(), s) })?;
    Ok((GpuAct::F32(dc), GpuAct::F32(next)))
}

/// `x + h·(0.5·dc + 0.5·(xn − dn) / t_next)`: the second-order correction.
pub fn heun_correct(gpu: &Gpu, x: &GpuAct, dc: &GpuAct, xn: &GpuAct, dn: &GpuAct, t_next: f32, h: f32) -> Result<GpuAct> {
    let k = "heun_correct";
    let (x, dc, xn, dn) = (f32_of(k, x)?, f32_of(k, dc)?, f32_of(k, xn)?, f32_of(k, dn)?);
    for len in [dc.len(), xn.len(), dn.len()] {
        same_len(k, x.len(), len)?;
    }
    let mut next = gpu.alloc::<f32>(x.len())?;
    let s = gpu.stream()?;
    // SAFETY: five device buffers of x.len() floats each.
    check(k, unsafe { ffi::edm2_heun_correct(x.ptr(gpu), dc.ptr(gpu), xn.ptr(gpu), dn.ptr(gpu), t_next, h, next.ptr_mut(gpu), x.len(), s) })?;
    Ok(GpuAct::F32(next))
}

/// `torch.lerp(g, d, w)`: guidance `g + w·(d − g)` as PyTorch evaluates it.
pub fn guidance_lerp(gpu: &Gpu, g: &GpuAct, d: &GpuAct, w: f32) -> Result<GpuAct> {
    let k = "guidance_lerp";
    let (g, d) = (f32_of(k, g)?, f32_of(k, d)?);
    same_len(k, g.len(), d.len())?;
    let mut out = gpu.alloc::<f32>(g.len())?;
    let s = gpu.stream()?;
    // SAFETY: three device buffers of g.len() floats each.
    check(k, unsafe { ffi::edm2_guidance_lerp(g.ptr(gpu), d.ptr(gpu), w, out.ptr_mut(gpu), g.len(), s) })?;
    Ok(GpuAct::F32(out))
}

/// `x + k·e` (the churn's added noise, `k` = the noise scale times S_noise).
pub fn add_noise(gpu: &Gpu, x: &GpuAct, e: &GpuAct, k: f32) -> Result<GpuAct> {
    let kn = "add_noise";
    let (x, e) = (f32_of(kn, x)?, f32_of(kn, e)?);
    same_len(kn, x.len(), e.len())?;
    let mut out = gpu.alloc::<f32>(x.len())?;
    let s = gpu.stream()?;
    // SAFETY: three device buffers of x.len() floats each.
    check(kn, unsafe { ffi::edm2_add_noise(x.ptr(gpu), e.ptr(gpu), k, out.ptr_mut(gpu), x.len(), s) })?;
    Ok(GpuAct::F32(out))
}
