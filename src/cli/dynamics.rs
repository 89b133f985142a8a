//! `edm2 dynamics`: the per-layer magnitudes of a saved network on the fixed probe batch
//! (`train::dynamics`), so two checkpoints — ours or official networks converted to
//! safetensors — can be compared the way the paper compares training runs.

use anyhow::{Context, Result};
use edm2::train::dynamics::{measure, Probe};
use edm2::NetConfig;

/// Probe images at most (an eval forward of all of them runs at once).
const MAX_PROBE: usize = 256;

#[derive(clap::Args)]
pub struct Args {
    /// Network: a snapshot, a post-hoc reconstruction, any net file, or a training state
    /// (its trained weights).
    #[arg(long)]
    pub net: String,
    /// Preset or JSON config; needed when the net file has no edm2.config metadata.
    #[arg(long)]
    pub config: Option<String>,
    /// Probe images from this dataset (folder, zip, fashion-mnist, builtin), its first N
    /// items; default: synthetic images N(0, σ_data²) of the network's shape.
    #[arg(long)]
    pub data: Option<String>,
    /// Probe batch size (σ of image i: the i-th of 8 fixed noise levels, cyclically).
    #[arg(long, default_value_t = 16)]
    pub probe: usize,
    /// Seed of the probe's noise (and synthetic images).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON record (the format of a run's dynamics.jsonl) instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!((1..=MAX_PROBE).contains(&a.probe), "--probe {}: must be 1..{MAX_PROBE}", a.probe);
    let cfg = a.config.as_deref().map(NetConfig::resolve).transpose()?;
    let net = load(&a.net, cfg.as_ref())?;
    let c = &net.net.config;
    let probe = match &a.data {
        None => Probe::synthetic(&net.net, a.probe, a.seed),
        Some(spec) => {
            let ds = edm2::data::Dataset::open(Some(spec), &edm2::data::DataOptions { xflip: false, max_size: Some(a.probe), ..Default::default() })
                .with_context(|| format!("--data {spec}"))?;
            anyhow::ensure!(
                ds.resolution == c.img_resolution && ds.net_channels() == c.img_channels,
                "--data {spec}: {}x{}x{} items; the network takes {}x{}x{}",
                ds.resolution,
                ds.resolution,
                ds.net_channels(),
                c.img_resolution,
                c.img_resolution,
                c.img_channels
            );
            let n = ds.len().min(a.probe);
            let mut y = Vec::new();
            for i in 0..n {
                y.extend(ds.encoded(i, a.seed)?);
            }
            let shape = [n, c.img_resolution, c.img_resolution, c.img_channels];
            Probe::new(edm2::Tensor::from_vec(&shape, y), c.label_dim, a.seed)
        }
    };
    let d = measure(&net.net, &net.params, &probe, None);
    if a.json {
        let kimg = net.metadata.get("edm2.nimg").and_then(|v| v.parse::<f64>().ok()).map(|n| n / 1e3).unwrap_or(0.0);
        println!("{}", d.to_json(kimg));
        return Ok(());
    }
    println!("RMS per block, output and residual branch (probe of {} images, σ buckets cyclic):", probe.sigma.len());
    for (name, v) in &d.activations {
        match d.branches.iter().find(|(b, _)| b == name) {
            Some((_, r)) => println!("  {name:<28} {v:>9.4}   branch {r:>9.4}"),
            None => println!("  {name:<28} {v:>9.4}"),
        }
    }
    println!("weight RMS (stored, magnitude-preserving layers):");
    for w in &d.weights {
        println!("  {:<40} {:>9.4}", w.name, w.rms);
    }
    println!("weighted denoising error by σ (λ(σ)·mean((D − y)²)):");
    for (s, l) in &d.loss_by_sigma {
        println!("  σ = {s:<6} {l:>9.4}");
    }
    Ok(())
}

/// A network file, or the trained (not EMA) weights of a training state.
fn load(path: &str, cfg: Option<&NetConfig>) -> Result<edm2::LoadedNet> {
    let meta = edm2::io::safetensors::read_header(path)?;
    if meta.metadata.get("edm2.format").map(String::as_str) == Some("training-state") {
        let st = edm2::train::state::TrainState::load(std::path::Path::new(path))?;
        let net = edm2::Precond::new(&st.config)?;
        let metadata = [("edm2.nimg".to_string(), st.nimg.to_string())].into_iter().collect();
        return Ok(edm2::LoadedNet { net, params: st.params, metadata });
    }
    Ok(edm2::load_net(path, cfg)?)
}
