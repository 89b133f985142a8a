//! The small public API for other crates: load a net, denoise a batch, read configs.

use crate::config::NetConfig;
use crate::error::{Error, Result};
use crate::io::safetensors;
use crate::nn::{Mode, Params, Precond};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// A network with its weights and the file's metadata.
pub struct LoadedNet {
    pub net: Precond,
    pub params: Params,
    pub metadata: BTreeMap<String, String>,
}

/// Loads a net from a safetensors file. The config comes from `config` if given, else
/// from the file's `edm2.config` metadata; a file without it needs an explicit config.
pub fn load_net(path: impl AsRef<Path>, config: Option<&NetConfig>) -> Result<LoadedNet> {
    let path = path.as_ref();
    let file = safetensors::read(path)?;
    if file.metadata.get("edm2.format").map(String::as_str) == Some("training-state") {
        return Err(Error::Input(format!(
            "{} is a training state (weights, Adam moments and EMAs for resuming `edm2 train`), not a network; \
             use an EMA snapshot of the run (network-snapshot-*.safetensors) or one made by `edm2 phema`",
            path.display()
        )));
    }
    let cfg = match config {
        Some(c) => c.clone(),
        None => match file.metadata.get("edm2.config") {
            Some(s) => NetConfig::from_json_str(s)
                .map_err(|e| Error::Config(format!("{}: metadata edm2.config: {e}", path.display())))?,
            None => {
                return Err(Error::Config(format!(
                    "{} has no edm2.config metadata; pass --config (a preset name or a JSON file)",
                    path.display()
                )))
            }
        },
    };
    let net = Precond::new(&cfg)?;
    let params = Params::from_file(&net.specs, &file)?;
    Ok(LoadedNet { net, params, metadata: file.metadata })
}

/// Eval-mode denoiser on NCHW tensors, as stored in files: `x` `[N, C, H, W]`, `sigma`
/// `[N]`, optional `labels` `[N, label_dim]`. Returns `D` `[N, C, H, W]` and `logvar` `[N]`.
pub fn denoise(net: &LoadedNet, x: &Tensor, sigma: &[f32], labels: Option<&Tensor>) -> Result<(Tensor, Vec<f32>)> {
    denoise_on(net, x, sigma, labels, crate::backend::Device::Cpu)
}

/// [`denoise`] on a chosen device (`Device::Cuda` needs a build with the CUDA backend;
/// `Auto` is treated as the CPU here — resolve it first with `backend::resolve_device`).
pub fn denoise_on(
    net: &LoadedNet,
    x: &Tensor,
    sigma: &[f32],
    labels: Option<&Tensor>,
    device: crate::backend::Device,
) -> Result<(Tensor, Vec<f32>)> {
    let c = &net.net.config;
    if x.shape.len() != 4 {
        return Err(Error::Input(format!("x must be [N, C, H, W], got shape {:?}", x.shape)));
    }
    if x.shape[1..] != [c.img_channels, c.img_resolution, c.img_resolution] {
        return Err(Error::Input(format!(
            "x has shape {:?}; this network takes [N, {}, {}, {}]",
            x.shape, c.img_channels, c.img_resolution, c.img_resolution
        )));
    }
    if let Some(i) = x.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!("x holds a non-finite value at flat index {i}")));
    }
    let xh = x.nchw_to_nhwc();
    net.net.check_input(&xh, sigma, labels)?;
    let (d, logvar) = DeviceNet::new(net, device)?.forward_nhwc(&xh, sigma, labels)?;
    Ok((d.nhwc_to_nchw(), logvar))
}

/// A loaded network placed on a device for eval-mode forwards (its weights uploaded once).
pub struct DeviceNet<'a> {
    net: &'a LoadedNet,
    place: Place,
}

enum Place {
    Cpu(crate::backend::cpu::Cpu),
    /// The device handle is shared with a guiding network placed [`DeviceNet::beside`]
    /// this one: one stream orders both networks' work.
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    Cuda { gpu: std::rc::Rc<crate::backend::gpu::Gpu>, params: crate::backend::gpu::GpuParams },
}

impl<'a> DeviceNet<'a> {
    /// `Auto` means the CPU here (resolve it with `backend::resolve_device` first).
    pub fn new(net: &'a LoadedNet, device: crate::backend::Device) -> Result<Self> {
        Self::with_precision(net, device, crate::backend::Precision::Fp32)
    }

    /// As [`DeviceNet::new`], in `precision` (bf16: on the CUDA backend bf16 activations;
    /// on the CPU bf16 products where the processor has AVX512-BF16, refused elsewhere).
    pub fn with_precision(net: &'a LoadedNet, device: crate::backend::Device, precision: crate::backend::Precision) -> Result<Self> {
        let place = match device {
            crate::backend::Device::Cpu | crate::backend::Device::Auto => {
                Place::Cpu(crate::backend::cpu::Cpu::for_precision(precision).map_err(Error::Input)?)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            crate::backend::Device::Cuda => {
                let gpu = crate::backend::gpu::Gpu::open(0)?;
                gpu.set_precision(precision);
                let params = crate::backend::gpu::GpuParams::upload(&gpu, &net.params)?;
                Place::Cuda { gpu: std::rc::Rc::new(gpu), params }
            }
            #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
            crate::backend::Device::Cuda => {
                return Err(Error::DeviceUnavailable("this edm2 was built without the CUDA backend; use the CPU".into()))
            }
        };
        Ok(DeviceNet { net, place })
    }

    /// Eval-mode `D` (NHWC, on the host) and `logvar` for an NHWC batch.
    pub fn forward_nhwc(&self, x: &Tensor, sigma: &[f32], labels: Option<&Tensor>) -> Result<(Tensor, Vec<f32>)> {
        match &self.place {
            Place::Cpu(cpu) => {
                let out = self.net.net.forward_on(cpu, &self.net.params, x, sigma, labels, &Mode::eval(), false)?;
                Ok((out.d, out.logvar))
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Place::Cuda { gpu, params } => {
                let gpu: &crate::backend::gpu::Gpu = gpu;
                let xd = Tensor::with_buf(&x.shape, gpu.upload_input(&x.data)?);
                let ld = labels.map(|l| gpu.upload_act(&l.data).map(|b| Tensor::with_buf(&l.shape, b))).transpose()?;
                let out = self.net.net.forward_on(gpu, params, &xd, sigma, ld.as_ref(), &Mode::eval(), false)?;
                Ok((Tensor::from_vec(&out.d.shape, gpu.download_act(&out.d.data)?), gpu.download_act(&out.logvar)?))
            }
        }
    }

    /// How often the host has waited for the device so far (downloads and
    /// synchronizations of this network's device handle; 0 on the CPU).
    pub fn host_waits(&self) -> u64 {
        match &self.place {
            Place::Cpu(_) => 0,
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Place::Cuda { gpu, .. } => gpu.waits(),
        }
    }

    /// `net` placed where `main` is, in its precision, sharing its device handle (on a
    /// GPU: the same stream, so [`DeviceNet::sample`] guides without leaving the device).
    pub fn beside(net: &'a LoadedNet, main: &DeviceNet) -> Result<Self> {
        let place = match &main.place {
            Place::Cpu(cpu) => Place::Cpu(*cpu),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Place::Cuda { gpu, .. } => {
                let params = crate::backend::gpu::GpuParams::upload(gpu, &net.params)?;
                Place::Cuda { gpu: gpu.clone(), params }
            }
        };
        Ok(DeviceNet { net, place })
    }

    /// The EDM sampler with this network (eval mode), guided by `guide` when given
    /// (`D = lerp(D_guide, D, guidance)`), from `noise` (NHWC); `labels` go to both. On a
    /// GPU the sampler's state stays on the device (`kernels/sampler.cu`: the same
    /// arithmetic as the host sampler) and only the final images are read back; elsewhere,
    /// or with a guide on another device handle, the host sampler runs. `on_eval(σ)` before
    /// each network evaluation.
    pub fn sample(
        &self,
        guide: Option<&DeviceNet>,
        noise: &Tensor,
        labels: Option<&Tensor>,
        o: &crate::sample::SamplerOpts,
        churn_noise: &mut dyn FnMut(usize) -> Tensor,
        on_eval: &mut dyn FnMut(f32),
    ) -> Result<Tensor> {
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        if let Place::Cuda { gpu, params } = &self.place {
            let guide = match guide.map(|g| (g.net, &g.place)) {
                None => Some(None),
                Some((g, Place::Cuda { gpu: gg, params: gp })) if std::rc::Rc::ptr_eq(gpu, gg) => Some(Some((&g.net, gp))),
                Some(_) => None,
            };
            if let Some(guide) = guide {
                let gpu: &crate::backend::gpu::Gpu = gpu;
                let labels = labels.map(|l| gpu.upload_act(&l.data).map(|b| Tensor::with_buf(&l.shape, b))).transpose()?;
                return crate::sample::device::edm_sampler_gpu(gpu, (&self.net.net, params), guide, noise, labels.as_ref(), o, churn_noise, on_eval);
            }
        }
        let lref = labels;
        let mut main = |x: &Tensor, sig: &[f32]| self.forward_nhwc(x, sig, lref).map(|o| o.0);
        let mut guide_eval = guide.map(|g| move |x: &Tensor, sig: &[f32]| g.forward_nhwc(x, sig, lref).map(|o| o.0));
        let guide_dyn = guide_eval.as_mut().map(|g| g as &mut dyn FnMut(&Tensor, &[f32]) -> Result<Tensor>);
        crate::sample::edm_sampler_on(&mut main, guide_dyn, noise, o, churn_noise, on_eval)
    }
}

