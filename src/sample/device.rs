//! The sampler with its state on a GPU ([`edm_sampler_gpu`]): the steps of
//! [`super::sample_in`] on device buffers (`kernels/sampler.cu`), so a run uploads the
//! noise (and any churn noise) and reads back only its final images — no transfer and no
//! host wait per network evaluation.

use super::{sample_in, SampleSpace, SamplerOpts};
use crate::backend::gpu::{kernels, sampler, Gpu, GpuAct, GpuParams};
use crate::error::{Error, Result};
use crate::nn::{Mode, Precond};
use crate::tensor::Tensor;

/// A network and its weights on the device.
pub type Net<'a> = (&'a Precond, &'a GpuParams);

/// [`super::edm_sampler`] on `gpu`: `net` (eval mode) guided by `guide` when given (both
/// on this device handle), `labels` (on the device) to both; `noise` NHWC on the host.
/// The result equals the host sampler's over the same device networks bit for bit
/// (tests/gpu_network.rs). `on_eval(σ)` before each evaluation.
#[allow(clippy::too_many_arguments)]
pub fn edm_sampler_gpu(
    gpu: &Gpu,
    net: Net,
    guide: Option<Net>,
    noise: &Tensor,
    labels: Option<&Tensor<GpuAct>>,
    o: &SamplerOpts,
    churn_noise: &mut dyn FnMut(usize) -> Tensor,
    on_eval: &mut dyn FnMut(f32),
) -> Result<Tensor> {
    if o.guidance != 1.0 && guide.is_none() {
        return Err(Error::Input("guidance != 1 needs a guiding network".into()));
    }
    let mut space = DeviceSpace { gpu, net, guide, labels, guidance: o.guidance, shape: noise.shape.clone(), on_eval };
    let x = sample_in(&mut space, noise, o, churn_noise)?;
    Ok(Tensor::from_vec(&noise.shape, gpu.download_act(&x.data)?))
}

/// The sampler's state on a GPU: fp32 device buffers (the network's input x and its
/// output D are fp32 in every precision).
struct DeviceSpace<'a, 'e> {
    gpu: &'a Gpu,
    net: Net<'a>,
    guide: Option<Net<'a>>,
    labels: Option<&'a Tensor<GpuAct>>,
    guidance: f32,
    /// NHWC of the batch.
    shape: Vec<usize>,
    on_eval: &'e mut dyn FnMut(f32),
}

impl SampleSpace for DeviceSpace<'_, '_> {
    type V = Tensor<GpuAct>;

    fn scaled(&mut self, noise: &Tensor, s: f32) -> Result<Self::V> {
        let mut x = self.gpu.upload_input(&noise.data)?;
        kernels::scale(self.gpu, &mut x, s)?;
        Ok(Tensor::with_buf(&self.shape, x))
    }

    fn add_noise(&mut self, x: &Self::V, eps: &Tensor, k: f32) -> Result<Self::V> {
        let e = self.gpu.upload_input(&eps.data)?;
        Ok(Tensor::with_buf(&self.shape, sampler::add_noise(self.gpu, &x.data, &e, k)?))
    }

    fn denoise(&mut self, x: &Self::V, t: f32) -> Result<Self::V> {
        (self.on_eval)(t);
        let sigma = vec![t; self.shape[0]];
        let run = |(n, p): Net| n.forward_on(self.gpu, p, x, &sigma, self.labels, &Mode::eval(), false).map(|o| o.d.data);
        let d = run(self.net)?;
        let d = match self.guide {
            Some(g) if self.guidance != 1.0 => {
                let gd = run(g)?;
                sampler::guidance_lerp(self.gpu, &gd, &d, self.guidance)?
            }
            _ => d,
        };
        Ok(Tensor::with_buf(&self.shape, d))
    }

    fn euler(&mut self, x: &Self::V, d: &Self::V, t_hat: f32, h: f32) -> Result<(Self::V, Self::V)> {
        let (dc, next) = sampler::heun_euler(self.gpu, &x.data, &d.data, t_hat, h)?;
        Ok((Tensor::with_buf(&self.shape, dc), Tensor::with_buf(&self.shape, next)))
    }

    fn heun(&mut self, x: &Self::V, dc: &Self::V, xn: &Self::V, dn: &Self::V, t_next: f32, h: f32) -> Result<Self::V> {
        let next = sampler::heun_correct(self.gpu, &x.data, &dc.data, &xn.data, &dn.data, t_next, h)?;
        Ok(Tensor::with_buf(&self.shape, next))
    }
}
