//! `edm2 denoise`: eval-mode D(x; sigma) on a batch from a safetensors file.

use anyhow::{Context, Result};
use edm2::backend::{resolve_device, Device};
use edm2::io::safetensors::{self, Dtype};
use edm2::{NetConfig, Tensor};
use std::collections::BTreeMap;

#[derive(clap::Args)]
pub struct Args {
    /// Network weights (safetensors, official names; f32/f16/bf16).
    #[arg(long)]
    pub net: String,
    /// Preset or JSON config; needed when the net file has no edm2.config metadata.
    #[arg(long)]
    pub config: Option<String>,
    /// Input: `x` [N,C,H,W] f32, `sigma` [N], optional `class_labels` [N,label_dim].
    #[arg(long)]
    pub input: String,
    /// Output file: `D` [N,C,H,W] and `logvar` [N].
    #[arg(long)]
    pub output: String,
    /// cpu, cuda, or auto (cuda when this build has the CUDA backend and a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: Device,
}

pub fn run(a: Args) -> Result<()> {
    let device = resolve_device(a.device)?;
    super::checks::output_file("output", std::path::Path::new(&a.output))?;
    let cfg = a.config.as_deref().map(NetConfig::resolve).transpose()?;
    let net = edm2::load_net(&a.net, cfg.as_ref())?;
    let inp = safetensors::read(&a.input)?;
    let xt = inp.require("x")?;
    let st = inp.require("sigma")?;
    if st.shape.len() != 1 {
        anyhow::bail!("{}: sigma must be [N], got shape {:?}", a.input, st.shape);
    }
    if device != Device::Cuda && xt.shape.len() == 4 {
        // One eval forward over all N images at once: its activations must fit.
        let n = xt.shape[0] as u64;
        let need = n.saturating_mul(net.net.activation_bytes_per_image(4) / 2);
        if let Some(avail) = edm2::train::memory::host_available() {
            anyhow::ensure!(
                need <= avail,
                "{}: denoising its {n} images at once needs about {:.2} GiB, but only {:.2} GiB of memory is available; split the batch",
                a.input,
                need as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            );
        }
    }
    let x = Tensor::from_vec(&xt.shape, xt.data.clone());
    let labels = inp.get("class_labels").map(|t| Tensor::from_vec(&t.shape, t.data.clone()));
    let (d, logvar) = edm2::api::denoise_on(&net, &x, &st.data, labels.as_ref(), device).with_context(|| format!("denoising {}", a.input))?;
    let n = logvar.len();
    let meta = BTreeMap::from([("edm2.format".to_string(), "denoise-output".to_string())]);
    safetensors::write(
        &a.output,
        &[("D", d.shape.as_slice(), d.data.as_slice()), ("logvar", &[n], logvar.as_slice())],
        &meta,
        Dtype::F32,
    )?;
    eprintln!("wrote D {:?} and logvar [{n}] to {}", d.shape, a.output);
    Ok(())
}
