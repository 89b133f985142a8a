//! [`Backend`] on the CUDA device (or the simulated one): the network description runs
//! its ops as our kernels on device buffers. Activations ([`GpuAct`]) are fp32 or bf16 by
//! the device's [`super::Precision`]; parameters, gradients and effective weights are fp32.
//! First version: correct and simple — buffers come from the pool per op; nothing in a
//! forward or backward is read back to the host (the gains' gradients are summed into
//! their device buffers).

use super::kernels::{self as k, GpuAttnCache, GpuEffWeight};
use super::{Gpu, GpuAct, GpuBuf};
use crate::backend::{Backend, ConvGeom, Nhwc};
use crate::error::Result;
use crate::nn::params::{ParamId, Params};

/// A parameter set on the device. The scalars of a parameter set (the gains) also live on
/// the host, because they are kernel arguments of the effective weight: after a device op
/// that changes them (Adam) read them back with [`GpuParams::scalars_from_device`]; after
/// changing a host copy, write it with [`GpuParams::scalars_to_device`]. Gradients have
/// no host copies (`scalars` all None).
pub struct GpuParams {
    pub values: Vec<GpuBuf<f32>>,
    pub scalars: Vec<Option<f32>>,
}

impl GpuParams {
    pub fn upload(gpu: &Gpu, p: &Params) -> Result<GpuParams> {
        let values = p.values.iter().map(|v| gpu.upload_once(v)).collect::<Result<Vec<_>>>()?;
        let scalars = p.values.iter().map(|v| (v.len() == 1).then(|| v[0])).collect();
        Ok(GpuParams { values, scalars })
    }

    /// Writes the host copies of the scalars into their device buffers (before a device
    /// op that reads all values, e.g. the optimizer).
    pub fn scalars_to_device(&mut self, gpu: &Gpu) -> Result<()> {
        for (v, s) in self.values.iter_mut().zip(&self.scalars) {
            if let Some(s) = s {
                gpu.write(&[*s], v)?;
            }
        }
        Ok(())
    }

    /// Reads the scalars back from their device buffers (after such an op), gathered into
    /// one buffer: one wait for the device, not one per gain.
    pub fn scalars_from_device(&mut self, gpu: &Gpu) -> Result<()> {
        let ids: Vec<usize> = (0..self.values.len()).filter(|&i| self.scalars[i].is_some()).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut all = gpu.alloc::<f32>(ids.len())?;
        for (slot, &i) in ids.iter().enumerate() {
            gpu.copy_into(&self.values[i], &mut all, slot)?;
        }
        for (v, &i) in gpu.download(&all)?.into_iter().zip(&ids) {
            self.scalars[i] = Some(v);
        }
        Ok(())
    }

    pub fn download(&self, gpu: &Gpu) -> Result<Params> {
        let mut values = self.values.iter().map(|v| gpu.download(v)).collect::<Result<Vec<_>>>()?;
        for (v, s) in values.iter_mut().zip(&self.scalars) {
            if let Some(s) = s {
                v[0] = *s;
            }
        }
        Ok(Params { values })
    }
}

impl Backend for Gpu {
    type Buf = GpuAct;
    type Params = GpuParams;
    type Eff = GpuEffWeight;
    type Attn = GpuAttnCache;
    type Mask = GpuBuf<u8>;

    fn alloc(&self, n: usize) -> Result<GpuAct> {
        self.alloc_act(n)
    }
    fn zeros(&self, n: usize) -> Result<GpuAct> {
        self.zeros_act(n)
    }
    fn upload(&self, host: &[f32]) -> Result<GpuAct> {
        self.upload_act(host)
    }
    fn download(&self, b: &GpuAct) -> Result<Vec<f32>> {
        self.download_act(b)
    }
    fn copy(&self, b: &GpuAct) -> Result<GpuAct> {
        k::scaled(self, b, 1.0)
    }
    fn alloc_like(&self, like: &GpuAct, n: usize) -> Result<GpuAct> {
        self.alloc_dtype(like.dtype(), n)
    }
    fn zeros_like(&self, like: &GpuAct, n: usize) -> Result<GpuAct> {
        Ok(match like.dtype() {
            super::Dtype::F32 => GpuAct::F32(self.alloc_zeros(n)?),
            super::Dtype::Bf16 => GpuAct::Bf16(self.alloc_zeros(n)?),
        })
    }
    fn convert_like(&self, b: &GpuAct, like: &GpuAct) -> Result<GpuAct> {
        k::scaled_to(self, b, like.dtype(), 1.0)
    }
    fn alloc_output(&self, n: usize) -> Result<GpuAct> {
        Ok(GpuAct::F32(Gpu::alloc(self, n)?))
    }

    fn synchronize(&self) -> Result<()> {
        Gpu::synchronize(self)
    }

    fn scalar(&self, p: &GpuParams, id: ParamId) -> f32 {
        p.scalars[id].expect("a scalar parameter")
    }
    /// Gradients live on the device only, the gains' too (no host copies: a gain's gradient
    /// is summed into its one-element buffer by the kernels, without a round trip).
    fn zero_grads(&self, p: &GpuParams) -> Result<GpuParams> {
        let values = p.values.iter().map(|v| self.alloc_zeros(v.len())).collect::<Result<Vec<_>>>()?;
        Ok(GpuParams { values, scalars: vec![None; p.scalars.len()] })
    }
    fn force_normalize(&self, p: &mut GpuParams, id: ParamId, row_len: usize) -> Result<()> {
        k::normalize_rows_inplace(self, &mut p.values[id], row_len)
    }

    fn effective(&self, p: &GpuParams, id: ParamId, geom: ConvGeom, gain: f32) -> Result<GpuEffWeight> {
        k::effective_weight(self, &p.values[id], geom, gain)
    }
    fn conv_forward(&self, eff: &GpuEffWeight, x: &GpuAct, s: Nhwc, y: &mut GpuAct) -> Result<()> {
        k::conv_forward(self, eff, x, s, y)
    }
    fn conv_backward(
        &self,
        p: &GpuParams,
        id: ParamId,
        eff: &GpuEffWeight,
        x: &GpuAct,
        s: Nhwc,
        dy: &GpuAct,
        dx: Option<&mut GpuAct>,
        gain: Option<ParamId>,
        g: &mut GpuParams,
    ) -> Result<()> {
        let mut d_eff = Gpu::alloc::<f32>(self, eff.geom.numel())?;
        k::conv_backward_weight(self, eff.geom, x, s, dy, &mut d_eff)?;
        if let Some(dx) = dx {
            k::conv_backward_data(self, eff, dy, s, dx)?;
        }
        let mut dw = Gpu::alloc::<f32>(self, eff.geom.numel())?;
        let mut rows = Gpu::alloc::<f32>(self, eff.geom.out_ch)?;
        k::effective_weight_backward(self, &p.values[id], eff, &d_eff, &mut dw, &mut rows)?;
        k::axpby(self, &mut g.values[id], &dw, 1.0, 1.0)?;
        if let Some(gid) = gain {
            let mut dgain = Gpu::alloc::<f32>(self, 1)?;
            k::sum_into(self, &rows, &mut dgain)?;
            k::axpby(self, &mut g.values[gid], &dgain, 1.0, 1.0)?;
        }
        Ok(())
    }

    fn mp_silu(&self, x: &GpuAct, y: &mut GpuAct) -> Result<()> {
        k::mp_silu(self, x, y)
    }
    fn mp_silu_backward(&self, x: &GpuAct, dy: &GpuAct, dx: &mut GpuAct) -> Result<()> {
        k::mp_silu_backward(self, x, dy, dx)
    }
    fn mp_silu_backward_acc(&self, x: &GpuAct, dy: &GpuAct, dx: &mut GpuAct) -> Result<()> {
        let mut t = self.alloc_dtype(x.dtype(), x.len())?;
        k::mp_silu_backward(self, x, dy, &mut t)?;
        k::axpby(self, dx, &t, 1.0, 1.0)
    }
    fn axpby(&self, a: &mut GpuAct, b: &GpuAct, wa: f32, wb: f32) -> Result<()> {
        k::axpby(self, a, b, wa, wb)
    }
    fn scale(&self, a: &mut GpuAct, kk: f32) -> Result<()> {
        k::scale(self, a, kk)
    }
    fn scaled(&self, a: &GpuAct, kk: f32) -> Result<GpuAct> {
        k::scaled(self, a, kk)
    }
    fn add_scalar(&self, a: &mut GpuAct, v: f32) -> Result<()> {
        k::add_scalar(self, a, v)
    }
    fn normalize_rows(&self, x: &GpuAct, kk: usize, y: &mut GpuAct) -> Result<()> {
        k::normalize_rows(self, x, kk, y)
    }
    fn normalize_rows_backward(&self, x: &GpuAct, kk: usize, dy: &GpuAct, dx: &mut GpuAct) -> Result<()> {
        k::normalize_rows_backward(self, x, kk, dy, dx)
    }
    fn downsample2(&self, x: &GpuAct, s: Nhwc, y: &mut GpuAct) -> Result<()> {
        k::downsample2(self, x, s, y)
    }
    fn downsample2_backward(&self, dy: &GpuAct, s: Nhwc, dx: &mut GpuAct) -> Result<()> {
        k::downsample2_backward(self, dy, s, dx)
    }
    fn upsample2(&self, x: &GpuAct, s: Nhwc, y: &mut GpuAct) -> Result<()> {
        k::upsample2(self, x, s, y)
    }
    fn upsample2_backward(&self, dy: &GpuAct, s: Nhwc, dx: &mut GpuAct) -> Result<()> {
        k::upsample2_backward(self, dy, s, dx)
    }
    fn modulate_silu(&self, h: &GpuAct, s: &GpuAct, c: usize, pixels: usize, y: &mut GpuAct) -> Result<()> {
        k::modulate_silu(self, h, s, c, pixels, y)
    }
    fn modulate_silu_backward(
        &self,
        h: &GpuAct,
        s: &GpuAct,
        dy: &GpuAct,
        c: usize,
        pixels: usize,
        dh: &mut GpuAct,
        ds: &mut GpuAct,
    ) -> Result<()> {
        k::modulate_silu_backward(self, h, s, dy, c, pixels, dh, ds)
    }
    fn dropout(&self, x: &mut GpuAct, p: f32, seed: u64) -> Result<()> {
        k::dropout(self, x, p, seed)
    }
    fn clip(&self, x: &mut GpuAct, limit: f32) -> Result<Option<GpuBuf<u8>>> {
        let mut mask = Gpu::alloc::<u8>(self, x.len())?;
        k::clip(self, x, &mut mask, limit)?;
        Ok(Some(mask))
    }
    fn clip_backward(&self, dy: &mut GpuAct, mask: &GpuBuf<u8>) -> Result<()> {
        k::clip_backward(self, dy, mask)
    }
    fn attention_forward(&self, qkv: &GpuAct, n: usize, p: usize, c: usize, heads: usize, y: &mut GpuAct) -> Result<GpuAttnCache> {
        k::attention_forward(self, qkv, n, p, c, heads, y)
    }
    fn attention_backward(
        &self,
        qkv: &GpuAct,
        cache: &GpuAttnCache,
        dy: &GpuAct,
        n: usize,
        p: usize,
        c: usize,
        heads: usize,
        dqkv: &mut GpuAct,
    ) -> Result<()> {
        k::attention_backward(self, qkv, cache, dy, n, p, c, heads, dqkv)
    }
    fn mp_cat(&self, a: &GpuAct, na: usize, b: &GpuAct, nb: usize, t: f32, out: &mut GpuAct) -> Result<()> {
        k::mp_cat(self, a, na, b, nb, t, out)
    }
    fn mp_cat_backward(&self, dout: &GpuAct, na: usize, nb: usize, t: f32, da: &mut GpuAct, db: &mut GpuAct) -> Result<()> {
        k::mp_cat_backward(self, dout, na, nb, t, da, db)
    }
    fn mp_fourier(&self, x: &[f32], p: &GpuParams, freqs: ParamId, phases: ParamId) -> Result<GpuAct> {
        let xb = Gpu::upload(self, x)?;
        // fp32 in both precisions: the embedding and logvar paths start here.
        let mut y = GpuAct::F32(Gpu::alloc(self, x.len() * p.values[freqs].len())?);
        k::mp_fourier(self, &xb, &p.values[freqs], &p.values[phases], &mut y)?;
        Ok(y)
    }
    fn scale_images(&self, x: &mut GpuAct, kk: &[f32]) -> Result<()> {
        k::scale_images(self, x, kk)
    }
    fn precond_input(&self, x: &GpuAct, c_in: &[f32], ch: usize, out: &mut GpuAct) -> Result<()> {
        k::precond_input(self, x, c_in, ch, out)
    }
    fn precond_output(&self, x: &GpuAct, f: &GpuAct, c_skip: &[f32], c_out: &[f32], d: &mut GpuAct) -> Result<()> {
        k::precond_output(self, x, f, c_skip, c_out, d)
    }
}
