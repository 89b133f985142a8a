//! [`Backend`] on the CUDA device (or the simulated one): the network description runs
//! its ops as our kernels on device buffers. First version: correct and simple — buffers
//! are allocated per op (the pool comes with the fast kernels), and the gain gradient of
//! each layer is read back to the host.

use super::kernels::{self as k, GpuAttnCache, GpuEffWeight};
use super::{Gpu, GpuBuf};
use crate::backend::{Backend, ConvGeom, Nhwc};
use crate::error::{Error, Result};
use crate::nn::params::{ParamId, Params};

/// A parameter set on the device. Scalars (the gains) also live on the host: they are
/// kernel arguments of the effective weight, and their gradients are sums the host adds
/// up; for one-element tensors the host copy is the authoritative one.
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

    /// Reads the scalars back from their device buffers (after such an op).
    pub fn scalars_from_device(&mut self, gpu: &Gpu) -> Result<()> {
        for (v, s) in self.values.iter().zip(self.scalars.iter_mut()) {
            if let Some(s) = s {
                *s = gpu.download(v)?[0];
            }
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
    type Buf = GpuBuf<f32>;
    type Params = GpuParams;
    type Eff = GpuEffWeight;
    type Attn = GpuAttnCache;
    type Mask = GpuBuf<u8>;

    fn alloc(&self, n: usize) -> Result<GpuBuf<f32>> {
        Gpu::alloc(self, n)
    }
    fn zeros(&self, n: usize) -> Result<GpuBuf<f32>> {
        self.alloc_zeros(n)
    }
    fn upload(&self, host: &[f32]) -> Result<GpuBuf<f32>> {
        Gpu::upload(self, host)
    }
    fn download(&self, b: &GpuBuf<f32>) -> Result<Vec<f32>> {
        Gpu::download(self, b)
    }
    fn copy(&self, b: &GpuBuf<f32>) -> Result<GpuBuf<f32>> {
        k::scaled(self, b, 1.0)
    }

    fn synchronize(&self) -> Result<()> {
        Gpu::synchronize(self)
    }

    fn scalar(&self, p: &GpuParams, id: ParamId) -> f32 {
        p.scalars[id].expect("a scalar parameter")
    }
    fn zero_grads(&self, p: &GpuParams) -> Result<GpuParams> {
        let values = p.values.iter().map(|v| self.alloc_zeros(v.len())).collect::<Result<Vec<_>>>()?;
        Ok(GpuParams { values, scalars: p.scalars.iter().map(|s| s.map(|_| 0.0)).collect() })
    }
    fn add_scalar_grad(&self, g: &mut GpuParams, id: ParamId, v: f32) -> Result<()> {
        match &mut g.scalars[id] {
            Some(s) => {
                *s += v;
                Ok(())
            }
            None => Err(Error::Input(format!("parameter {id} is not a scalar"))),
        }
    }
    fn force_normalize(&self, p: &mut GpuParams, id: ParamId, row_len: usize) -> Result<()> {
        k::normalize_rows_inplace(self, &mut p.values[id], row_len)
    }

    fn effective(&self, p: &GpuParams, id: ParamId, geom: ConvGeom, gain: f32) -> Result<GpuEffWeight> {
        k::effective_weight(self, &p.values[id], geom, gain)
    }
    fn conv_forward(&self, eff: &GpuEffWeight, x: &GpuBuf<f32>, s: Nhwc, y: &mut GpuBuf<f32>) -> Result<()> {
        k::conv_forward(self, eff, x, s, y)
    }
    fn conv_backward(
        &self,
        p: &GpuParams,
        id: ParamId,
        eff: &GpuEffWeight,
        x: &GpuBuf<f32>,
        s: Nhwc,
        dy: &GpuBuf<f32>,
        dx: Option<&mut GpuBuf<f32>>,
        g: &mut GpuParams,
    ) -> Result<f32> {
        let mut d_eff = self.alloc(eff.geom.numel())?;
        k::conv_backward_weight(self, eff.geom, x, s, dy, &mut d_eff)?;
        if let Some(dx) = dx {
            k::conv_backward_data(self, eff, dy, s, dx)?;
        }
        let mut dw = self.alloc(eff.geom.numel())?;
        let dgain = k::effective_weight_backward(self, &p.values[id], eff, &d_eff, &mut dw)?;
        k::axpby(self, &mut g.values[id], &dw, 1.0, 1.0)?;
        Ok(dgain)
    }

    fn mp_silu(&self, x: &GpuBuf<f32>, y: &mut GpuBuf<f32>) -> Result<()> {
        k::mp_silu(self, x, y)
    }
    fn mp_silu_backward(&self, x: &GpuBuf<f32>, dy: &GpuBuf<f32>, dx: &mut GpuBuf<f32>) -> Result<()> {
        k::mp_silu_backward(self, x, dy, dx)
    }
    fn mp_silu_backward_acc(&self, x: &GpuBuf<f32>, dy: &GpuBuf<f32>, dx: &mut GpuBuf<f32>) -> Result<()> {
        let mut t = self.alloc(x.len())?;
        k::mp_silu_backward(self, x, dy, &mut t)?;
        k::axpby(self, dx, &t, 1.0, 1.0)
    }
    fn axpby(&self, a: &mut GpuBuf<f32>, b: &GpuBuf<f32>, wa: f32, wb: f32) -> Result<()> {
        k::axpby(self, a, b, wa, wb)
    }
    fn scale(&self, a: &mut GpuBuf<f32>, kk: f32) -> Result<()> {
        k::scale(self, a, kk)
    }
    fn scaled(&self, a: &GpuBuf<f32>, kk: f32) -> Result<GpuBuf<f32>> {
        k::scaled(self, a, kk)
    }
    fn add_scalar(&self, a: &mut GpuBuf<f32>, v: f32) -> Result<()> {
        k::add_scalar(self, a, v)
    }
    fn normalize_rows(&self, x: &GpuBuf<f32>, kk: usize, y: &mut GpuBuf<f32>) -> Result<()> {
        k::normalize_rows(self, x, kk, y)
    }
    fn normalize_rows_backward(&self, x: &GpuBuf<f32>, kk: usize, dy: &GpuBuf<f32>, dx: &mut GpuBuf<f32>) -> Result<()> {
        k::normalize_rows_backward(self, x, kk, dy, dx)
    }
    fn downsample2(&self, x: &GpuBuf<f32>, s: Nhwc, y: &mut GpuBuf<f32>) -> Result<()> {
        k::downsample2(self, x, s, y)
    }
    fn downsample2_backward(&self, dy: &GpuBuf<f32>, s: Nhwc, dx: &mut GpuBuf<f32>) -> Result<()> {
        k::downsample2_backward(self, dy, s, dx)
    }
    fn upsample2(&self, x: &GpuBuf<f32>, s: Nhwc, y: &mut GpuBuf<f32>) -> Result<()> {
        k::upsample2(self, x, s, y)
    }
    fn upsample2_backward(&self, dy: &GpuBuf<f32>, s: Nhwc, dx: &mut GpuBuf<f32>) -> Result<()> {
        k::upsample2_backward(self, dy, s, dx)
    }
    fn modulate_silu(&self, h: &GpuBuf<f32>, s: &GpuBuf<f32>, c: usize, pixels: usize, y: &mut GpuBuf<f32>) -> Result<()> {
        k::modulate_silu(self, h, s, c, pixels, y)
    }
    fn modulate_silu_backward(
        &self,
        h: &GpuBuf<f32>,
        s: &GpuBuf<f32>,
        dy: &GpuBuf<f32>,
        c: usize,
        pixels: usize,
        dh: &mut GpuBuf<f32>,
        ds: &mut GpuBuf<f32>,
    ) -> Result<()> {
        k::modulate_silu_backward(self, h, s, dy, c, pixels, dh, ds)
    }
    fn dropout(&self, x: &mut GpuBuf<f32>, p: f32, seed: u64) -> Result<()> {
        k::dropout(self, x, p, seed)
    }
    fn clip(&self, x: &mut GpuBuf<f32>, limit: f32) -> Result<Option<GpuBuf<u8>>> {
        let mut mask = Gpu::alloc::<u8>(self, x.len())?;
        k::clip(self, x, &mut mask, limit)?;
        Ok(Some(mask))
    }
    fn clip_backward(&self, dy: &mut GpuBuf<f32>, mask: &GpuBuf<u8>) -> Result<()> {
        k::clip_backward(self, dy, mask)
    }
    fn attention_forward(&self, qkv: &GpuBuf<f32>, n: usize, p: usize, c: usize, heads: usize, y: &mut GpuBuf<f32>) -> Result<GpuAttnCache> {
        k::attention_forward(self, qkv, n, p, c, heads, y)
    }
    fn attention_backward(
        &self,
        qkv: &GpuBuf<f32>,
        cache: &GpuAttnCache,
        dy: &GpuBuf<f32>,
        n: usize,
        p: usize,
        c: usize,
        heads: usize,
        dqkv: &mut GpuBuf<f32>,
    ) -> Result<()> {
        k::attention_backward(self, qkv, cache, dy, n, p, c, heads, dqkv)
    }
    fn mp_cat(&self, a: &GpuBuf<f32>, na: usize, b: &GpuBuf<f32>, nb: usize, t: f32, out: &mut GpuBuf<f32>) -> Result<()> {
        k::mp_cat(self, a, na, b, nb, t, out)
    }
    fn mp_cat_backward(&self, dout: &GpuBuf<f32>, na: usize, nb: usize, t: f32, da: &mut GpuBuf<f32>, db: &mut GpuBuf<f32>) -> Result<()> {
        k::mp_cat_backward(self, dout, na, nb, t, da, db)
    }
    fn mp_fourier(&self, x: &[f32], p: &GpuParams, freqs: ParamId, phases: ParamId) -> Result<GpuBuf<f32>> {
        let xb = Gpu::upload(self, x)?;
        let mut y = Gpu::alloc(self, x.len() * p.values[freqs].len())?;
        k::mp_fourier(self, &xb, &p.values[freqs], &p.values[phases], &mut y)?;
        Ok(y)
    }
    fn scale_images(&self, x: &mut GpuBuf<f32>, kk: &[f32]) -> Result<()> {
        k::scale_images(self, x, kk)
    }
    fn precond_input(&self, x: &GpuBuf<f32>, c_in: &[f32], ch: usize, out: &mut GpuBuf<f32>) -> Result<()> {
        k::precond_input(self, x, c_in, ch, out)
    }
    fn precond_output(&self, x: &GpuBuf<f32>, f: &GpuBuf<f32>, c_skip: &[f32], c_out: &[f32], d: &mut GpuBuf<f32>) -> Result<()> {
        k::precond_output(self, x, f, c_skip, c_out, d)
    }
}
