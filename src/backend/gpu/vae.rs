//! [`VaeOps`] on the CUDA device (or the simulated one): the Stability VAE's own ops as
//! the kernels of `kernels/vae.cu`; its convolutions are the U-Net's (`conv_forward` with
//! plain weights in the same OHWI layout the effective weights use).

use super::kernels::{dtype_of, expect_len, int, GpuEffWeight};
use super::{check, ffi, Gpu, GpuAct, GpuBuf};
use crate::backend::{ConvGeom, Nhwc, VaeOps};
use crate::error::{Error, Result};

/// The dtype code shared by `a` and `b` (an error if they differ).
fn dtype2(kernel: &str, a: &GpuAct, b: &GpuAct) -> Result<i32> {
    dtype_of(kernel, &[a.dtype(), b.dtype()])
}

impl VaeOps for Gpu {
    type Chan = GpuBuf<f32>;

    fn upload_chan(&self, v: &[f32]) -> Result<GpuBuf<f32>> {
        self.upload_once(v)
    }

    fn plain_weight(&self, w: &[f32], geom: ConvGeom) -> Result<GpuEffWeight> {
        geom.validate("plain_weight")?;
        expect_len("plain_weight", "w", w.len(), geom.numel())?;
        // OIHW → OHWI (the layout of the effective weights), values unchanged; the row
        // denominators of a plain weight are 1 (only a backward would read them).
        let (o, i, taps) = (geom.out_ch, geom.in_ch, geom.taps());
        let mut ohwi = vec![0.0f32; w.len()];
        for oc in 0..o {
            for ic in 0..i {
                for t in 0..taps {
                    ohwi[(oc * taps + t) * i + ic] = w[(oc * i + ic) * taps + t];
                }
            }
        }
        Ok(GpuEffWeight { geom, gain: 1.0, w: self.upload_once(&ohwi)?, denom: self.upload_once(&vec![1.0f32; o])?, bf16: None, bf16_flip: None })
    }

    fn add_channel_bias(&self, y: &mut GpuAct, bias: &GpuBuf<f32>, c: usize) -> Result<()> {
        let k = "add_channel_bias";
        expect_len(k, "bias", bias.len(), c)?;
        if c == 0 || y.len() % c != 0 {
            return Err(Error::Input(format!("{k}: {} values are not rows of {c} channels", y.len())));
        }
        let (dt, st) = (y.dtype().code(), self.stream()?);
        check(k, unsafe { ffi::edm2_add_channel_bias(y.vptr_mut(self), bias.ptr(self), y.len() / c, int(k, c)?, dt, st) })
    }

    fn group_norm(
        &self,
        x: &GpuAct,
        s: Nhwc,
        groups: usize,
        eps: f32,
        gamma: &GpuBuf<f32>,
        beta: &GpuBuf<f32>,
        silu: bool,
        y: &mut GpuAct,
    ) -> Result<()> {
        let k = "group_norm";
        expect_len(k, "x", x.len(), s.numel())?;
        expect_len(k, "y", y.len(), s.numel())?;
        expect_len(k, "gamma", gamma.len(), s.c)?;
        expect_len(k, "beta", beta.len(), s.c)?;
        if groups == 0 || s.c % groups != 0 {
            return Err(Error::Input(format!("{k}: {} channels do not split into {groups} groups", s.c)));
        }
        let dt = dtype2(k, x, y)?;
        let (n, hw, c, g) = (int(k, s.n)?, int(k, s.h * s.w)?, int(k, s.c)?, int(k, groups)?);
        // SAFETY: a pure function of its arguments.
        let mut part = self.alloc::<f64>(unsafe { ffi::edm2_group_norm_part_len(n, g) })?;
        let mut ao = self.alloc::<f32>(2 * s.n * s.c)?;
        let st = self.stream()?;
        check(k, unsafe {
            ffi::edm2_group_norm(
                x.vptr(self),
                y.vptr_mut(self),
                gamma.ptr(self),
                beta.ptr(self),
                part.ptr_mut(self),
                ao.ptr_mut(self),
                n,
                hw,
                c,
                g,
                eps,
                silu as i32,
                dt,
                st,
            )
        })
    }

    fn subsample2_odd(&self, x: &GpuAct, s: Nhwc, y: &mut GpuAct) -> Result<()> {
        let k = "subsample2_odd";
        expect_len(k, "x", x.len(), s.numel())?;
        expect_len(k, "y", y.len(), s.n * (s.h / 2) * (s.w / 2) * s.c)?;
        let dt = dtype2(k, x, y)?;
        let st = self.stream()?;
        check(k, unsafe { ffi::edm2_subsample2_odd(x.vptr(self), y.vptr_mut(self), int(k, s.n)?, int(k, s.h)?, int(k, s.w)?, int(k, s.c)?, dt, st) })
    }

    fn dot_attention(&self, qkv: &GpuAct, n: usize, p: usize, c: usize, y: &mut GpuAct) -> Result<()> {
        let k = "dot_attention";
        expect_len(k, "qkv", qkv.len(), n * p * 3 * c)?;
        expect_len(k, "y", y.len(), n * p * c)?;
        let dt = dtype2(k, qkv, y)?;
        let mut w = self.alloc::<f32>(n * p * p)?;
        let st = self.stream()?;
        check(k, unsafe { ffi::edm2_dot_attention(qkv.vptr(self), y.vptr_mut(self), w.ptr_mut(self), int(k, n)?, int(k, p)?, int(k, c)?, dt, st) })
    }
}
