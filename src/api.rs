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
    let (d, logvar) = match device {
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        crate::backend::Device::Cuda => {
            use crate::backend::gpu::{Gpu, GpuParams};
            let gpu = Gpu::open(0)?;
            let params = GpuParams::upload(&gpu, &net.params)?;
            let xd = Tensor::with_buf(&xh.shape, gpu.upload(&xh.data)?);
            let ld = labels.map(|l| gpu.upload(&l.data).map(|b| Tensor::with_buf(&l.shape, b))).transpose()?;
            let out = net.net.forward_on(&gpu, &params, &xd, sigma, ld.as_ref(), &Mode::eval(), false)?;
            (Tensor::from_vec(&out.d.shape, gpu.download(&out.d.data)?), out.logvar)
        }
        #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
        crate::backend::Device::Cuda => {
            return Err(Error::DeviceUnavailable("this edm2 was built without the CUDA backend; use the CPU".into()))
        }
        crate::backend::Device::Cpu | crate::backend::Device::Auto => {
            let out = net.net.forward(&net.params, &xh, sigma, labels, &Mode::eval(), false);
            (out.d, out.logvar)
        }
    };
    Ok((d.nhwc_to_nchw(), logvar))
}
