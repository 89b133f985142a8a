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

/// A parameter set on the device, the gains included: a gain is a one-element buffer that
/// the effective-weight kernel reads on the device ([`k::Gain::At`]), so nothing of a
/// training step goes back to the host for it.
pub struct GpuParams {
    pub values: Vec<GpuBuf<f32>>,
    /// For a gradient set between [`Backend::defer_weight_grads`] and
    /// [`Backend::finish_weight_grads`]: the layers whose effective-weight backward is still
    /// to run (None: each runs in its `conv_backward`).
    deferred: Option<Vec<DeferredGrad>>,
}

/// A layer's weight gradient waiting for its effective-weight backward: the gradient of
/// its effective weight and what the backward needs besides the parameters.
struct DeferredGrad {
    id: ParamId,
    geom: ConvGeom,
    gain: f32,
    gain_id: Option<ParamId>,
    d_eff: GpuBuf<f32>,
}

/// Bytes of effective-weight gradients a deferred gradient set holds before it finishes
/// them (bounds the extra memory on large networks: EDM2-XS's weights are ~0.5 GB).
const DEFERRED_BYTES: usize = 256 << 20;

impl GpuParams {
    pub fn new(values: Vec<GpuBuf<f32>>) -> GpuParams {
        GpuParams { values, deferred: None }
    }

    pub fn upload(gpu: &Gpu, p: &Params) -> Result<GpuParams> {
        let values = p.values.iter().map(|v| gpu.upload_once(v)).collect::<Result<Vec<_>>>()?;
        Ok(GpuParams::new(values))
    }

    /// The values on the host; an error for a gradient set with layers still deferred.
    pub fn download(&self, gpu: &Gpu) -> Result<Params> {
        self.check_finished("download")?;
        let values = self.values.iter().map(|v| gpu.download(v)).collect::<Result<Vec<_>>>()?;
        Ok(Params { values })
    }

    /// An error when weight gradients are still deferred (read before
    /// [`Backend::finish_weight_grads`]: they would be missing).
    pub fn check_finished(&self, what: &str) -> Result<()> {
        match &self.deferred {
            Some(d) if !d.is_empty() => Err(crate::Error::Cuda(format!(
                "{what}: {} weight gradients are still deferred (finish_weight_grads was not called)",
                d.len()
            ))),
            _ => Ok(()),
        }
    }

    /// Runs the deferred layers' effective-weight backward (one launch) and the sums of
    /// their gain gradients (one launch); keeps deferring.
    fn flush(&mut self, gpu: &Gpu, p: &GpuParams) -> Result<()> {
        let Some(pending) = self.deferred.as_mut() else { return Ok(()) };
        if pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(pending);
        let mut rows: Vec<Option<GpuBuf<f32>>> =
            pending.iter().map(|d| d.gain_id.map(|_| gpu.alloc::<f32>(d.geom.out_ch)).transpose()).collect::<Result<_>>()?;
        {
            // Each weight's gradient buffer once (conv_backward finishes a repeated one first).
            let mut slots: Vec<Option<&mut GpuBuf<f32>>> = self.values.iter_mut().map(Some).collect();
            let mut layers = Vec::with_capacity(pending.len());
            for (d, r) in pending.iter().zip(rows.iter_mut()) {
                let dw = slots.get_mut(d.id).and_then(Option::take).ok_or_else(|| crate::Error::Cuda(format!("deferred gradient of parameter {} twice", d.id)))?;
                layers.push(super::multi_tensor::EffBackward {
                    w: &p.values[d.id],
                    geom: d.geom,
                    gain: d.gain,
                    gain_at: d.gain_id.map(|g| &p.values[g]),
                    d_eff: &d.d_eff,
                    dw,
                    row_dgain: r.as_mut(),
                    accumulate: true,
                });
            }
            super::multi_tensor::effective_weight_backward(gpu, layers)?;
        }
        let mut slots: Vec<Option<&mut GpuBuf<f32>>> = self.values.iter_mut().map(Some).collect();
        let mut sums = Vec::new();
        for (d, r) in pending.iter().zip(&rows) {
            if let (Some(gid), Some(r)) = (d.gain_id, r) {
                let out = slots.get_mut(gid).and_then(Option::take).ok_or_else(|| crate::Error::Cuda(format!("deferred gain gradient of parameter {gid} twice")))?;
                sums.push((r, out));
            }
        }
        super::multi_tensor::sum_add(gpu, sums)
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

    /// Gradients live on the device only, the gains' too (no host copies: a gain's gradient
    /// is summed into its one-element buffer by the kernels, without a round trip).
    fn zero_grads(&self, p: &GpuParams) -> Result<GpuParams> {
        let values = p.values.iter().map(|v| self.alloc_zeros(v.len())).collect::<Result<Vec<_>>>()?;
        Ok(GpuParams::new(values))
    }
    fn force_normalize(&self, p: &mut GpuParams, id: ParamId, row_len: usize) -> Result<()> {
        k::normalize_rows_inplace(self, &mut p.values[id], row_len)
    }
    fn force_normalize_all(&self, p: &mut GpuParams, weights: &[(ParamId, usize)]) -> Result<()> {
        let mut row_len: Vec<Option<usize>> = vec![None; p.values.len()];
        for &(id, k) in weights {
            *row_len.get_mut(id).ok_or_else(|| crate::Error::Input(format!("force_normalize_all: no parameter {id}")))? = Some(k);
        }
        let tensors = p.values.iter_mut().zip(row_len).filter_map(|(w, k)| k.map(|k| (w, k))).collect();
        super::multi_tensor::normalize_rows(self, tensors)
    }

    fn effective(&self, p: &GpuParams, id: ParamId, geom: ConvGeom, gain: Option<ParamId>) -> Result<GpuEffWeight> {
        let gain = gain.map_or(k::Gain::Value(1.0), |g| k::Gain::At(&p.values[g]));
        k::effective_weight(self, &p.values[id], geom, gain)
    }
    fn batches_effective(&self) -> bool {
        true
    }
    fn effective_all(&self, p: &GpuParams, jobs: &[(ParamId, ConvGeom, Option<ParamId>)], backward: bool) -> Result<Vec<GpuEffWeight>> {
        let gain = |g: Option<ParamId>| g.map_or(k::Gain::Value(1.0), |g| k::Gain::At(&p.values[g]));
        super::multi_tensor::effective_weights(self, jobs.iter().map(|&(id, geom, g)| (&p.values[id], geom, gain(g))).collect(), backward)
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
        self.conv_backward_into(p, id, eff, x, s, dy, dx.map(|d| (d, false)), gain, g)
    }
    fn conv_backward_acc(
        &self,
        p: &GpuParams,
        id: ParamId,
        eff: &GpuEffWeight,
        x: &GpuAct,
        s: Nhwc,
        dy: &GpuAct,
        dx: &mut GpuAct,
        gain: Option<ParamId>,
        g: &mut GpuParams,
    ) -> Result<()> {
        self.conv_backward_into(p, id, eff, x, s, dy, Some((dx, true)), gain, g)
    }
    fn linear_group_forward(&self, layers: &[(&GpuEffWeight, ConvGeom)], x: &GpuAct, n: usize) -> Result<Vec<GpuAct>> {
        let effs: Vec<&GpuEffWeight> = layers.iter().map(|l| l.0).collect();
        k::linear_group::forward(self, &effs, x, n)
    }
    fn linear_group_backward(
        &self,
        p: &GpuParams,
        layers: &[(ParamId, ConvGeom, &GpuEffWeight, &GpuAct, Option<ParamId>)],
        x: &GpuAct,
        n: usize,
        dx: &mut GpuAct,
        g: &mut GpuParams,
    ) -> Result<()> {
        let mut d_effs = layers.iter().map(|l| Gpu::alloc::<f32>(self, l.1.numel())).collect::<Result<Vec<_>>>()?;
        {
            let mut wl: Vec<(ConvGeom, &dyn k::Values, &mut GpuBuf<f32>)> =
                layers.iter().zip(d_effs.iter_mut()).map(|(l, d)| (l.1, l.3 as &dyn k::Values, d)).collect();
            k::linear_group::backward_weight(self, &mut wl, x, n)?;
        }
        let dl: Vec<(&GpuEffWeight, &dyn k::Values)> = layers.iter().map(|l| (l.2, l.3 as &dyn k::Values)).collect();
        k::linear_group::backward_data(self, &dl, dx, n)?;
        for (l, d_eff) in layers.iter().zip(d_effs) {
            self.effective_weight_grad(p, l.0, l.2, d_eff, l.4, g)?;
        }
        Ok(())
    }
    fn defer_weight_grads(&self, g: &mut GpuParams) {
        g.deferred.get_or_insert_with(Vec::new);
    }
    fn finish_weight_grads(&self, p: &GpuParams, g: &mut GpuParams) -> Result<()> {
        g.flush(self, p)?;
        g.deferred = None;
        Ok(())
    }
    fn mp_silu(&self, x: &GpuAct, y: &mut GpuAct) -> Result<()> {
        k::mp_silu(self, x, y)
    }
    fn mp_silu_backward(&self, x: &GpuAct, dy: &GpuAct, dx: &mut GpuAct) -> Result<()> {
        k::mp_silu_backward(self, x, dy, dx, false)
    }
    fn mp_silu_backward_acc(&self, x: &GpuAct, dy: &GpuAct, dx: &mut GpuAct) -> Result<()> {
        k::mp_silu_backward(self, x, dy, dx, true)
    }
    fn axpby(&self, a: &mut GpuAct, b: &GpuAct, wa: f32, wb: f32) -> Result<()> {
        k::axpby(self, a, b, wa, wb)
    }
    fn axpby_clip(&self, a: &mut GpuAct, b: &GpuAct, wa: f32, wb: f32, limit: Option<f32>) -> Result<Option<GpuBuf<u8>>> {
        match limit {
            Some(l) => {
                let mut mask = Gpu::alloc::<u8>(self, a.len())?;
                k::axpby_clip(self, a, b, wa, wb, l, &mut mask)?;
                Ok(Some(mask))
            }
            None => k::axpby(self, a, b, wa, wb).map(|_| None),
        }
    }
    fn scale(&self, a: &mut GpuAct, kk: f32) -> Result<()> {
        k::scale(self, a, kk)
    }
    fn scaled(&self, a: &GpuAct, kk: f32) -> Result<GpuAct> {
        k::scaled(self, a, kk)
    }
    fn split_scaled(&self, a: &mut GpuAct, ka: f32, kb: f32) -> Result<GpuAct> {
        k::split_scaled(self, a, ka, kb, None)
    }
    fn split_scaled_masked(&self, a: &mut GpuAct, ka: f32, kb: f32, mask: Option<&GpuBuf<u8>>) -> Result<GpuAct> {
        k::split_scaled(self, a, ka, kb, mask)
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
    fn normalize_rows_silu(&self, x: &GpuAct, kk: usize, y: &mut GpuAct, a: &mut GpuAct) -> Result<()> {
        k::normalize_rows_silu(self, x, kk, y, a)
    }
    fn normalize_rows_backward_silu(&self, x: &GpuAct, kk: usize, dy: &mut GpuAct, xm: &GpuAct, da0: &GpuAct, dx: &mut GpuAct) -> Result<()> {
        k::normalize_rows_backward_silu(self, x, kk, dy, xm, da0, dx)
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
        y: &GpuAct,
        dy: &GpuAct,
        n: usize,
        p: usize,
        c: usize,
        heads: usize,
        dqkv: &mut GpuAct,
    ) -> Result<()> {
        k::attention_backward(self, qkv, cache, y, dy, n, p, c, heads, dqkv)
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

impl Gpu {
    /// [`Backend::conv_backward`]; the data gradient `(dx, add)` overwrites `dx` or adds to it.
    #[allow(clippy::too_many_arguments)]
    fn conv_backward_into(
        &self,
        p: &GpuParams,
        id: ParamId,
        eff: &GpuEffWeight,
        x: &GpuAct,
        s: Nhwc,
        dy: &GpuAct,
        dx: Option<(&mut GpuAct, bool)>,
        gain: Option<ParamId>,
        g: &mut GpuParams,
    ) -> Result<()> {
        let mut d_eff = Gpu::alloc::<f32>(self, eff.geom.numel())?;
        k::conv_backward_weight(self, eff.geom, x, s, dy, &mut d_eff)?;
        match dx {
            Some((dx, false)) => k::conv_backward_data(self, eff, dy, s, dx)?,
            Some((dx, true)) => k::conv_backward_data_add(self, eff, dy, s, dx)?,
            None => {}
        }
        self.effective_weight_grad(p, id, eff, d_eff, gain, g)
    }

    /// From the gradient `d_eff` of layer `id`'s effective weight to its stored weight's
    /// (and its gain's) gradient in `g`: now, or with the other layers at the end of the
    /// pass when `g` defers.
    fn effective_weight_grad(
        &self,
        p: &GpuParams,
        id: ParamId,
        eff: &GpuEffWeight,
        d_eff: GpuBuf<f32>,
        gain: Option<ParamId>,
        g: &mut GpuParams,
    ) -> Result<()> {
        if let Some(pending) = g.deferred.as_mut() {
            // Batched at the end of the pass (finish_weight_grads), or when this layer's
            // gradient buffers are already waiting or the waiting bytes reach the cap.
            let repeated = pending.iter().any(|d| d.id == id || (gain.is_some() && d.gain_id == gain));
            let bytes: usize = pending.iter().map(|d| d.d_eff.len() * 4).sum();
            if repeated || bytes + d_eff.len() * 4 > DEFERRED_BYTES {
                g.flush(self, p)?;
            }
            let pending = g.deferred.as_mut().expect("still deferring");
            pending.push(DeferredGrad { id, geom: eff.geom, gain: eff.gain, gain_id: gain, d_eff });
            return Ok(());
        }
        // The weight's gradient goes straight into its gradient buffer (accumulate), the
        // gain's rows are summed into the gain's: no temporaries, no separate adds.
        let gain_at = gain.map(|gid| &p.values[gid]);
        let mut rows = gain.map(|_| Gpu::alloc::<f32>(self, eff.geom.out_ch)).transpose()?;
        k::effective_weight_backward(self, &p.values[id], eff, gain_at, &d_eff, &mut g.values[id], rows.as_mut(), true)?;
        if let (Some(gid), Some(rows)) = (gain, &rows) {
            k::sum_add_into(self, rows, &mut g.values[gid])?;
        }
        Ok(())
    }
}
