//! `edm2 generate`: sample images with the EDM sampler, optional guidance by a second
//! network (classifier-free guidance or autoguidance).
//!
//! Noise: image `seed` starts from `Rng::new(seed)` (SplitMix64 + Box–Muller, `edm2::rng`),
//! C·H·W standard normals in NCHW order, so a seed gives the same image on every machine,
//! batch size and backend. Random classes (when `--class` is not given) come from
//! `Rng::new(seed ^ 0xC1A55)`: `floor(uniform · label_dim)`. Churn noise for the k-th
//! churned step of image `seed` comes from `Rng::new(seed ^ ((k + 1) << 32))`.

use anyhow::{bail, Context, Result};
use edm2::backend::{resolve_device, Device};
use edm2::io::image::{grid, to_pixels, write_png};
use edm2::io::safetensors::{self, Dtype};
use edm2::rng::Rng;
use edm2::sample::SamplerOpts;
use edm2::{NetConfig, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::checks::{finite, output_dir, output_file};

/// Sampler steps accepted (the paper uses 32; a thousand is already far past any gain).
const MAX_STEPS: usize = 10_000;

fn precision_is_bf16(p: &str) -> bool {
    p == "bf16"
}

#[derive(clap::Args)]
pub struct Args {
    /// Network to sample from (snapshot, post-hoc reconstruction or any net file).
    #[arg(long)]
    pub net: String,
    /// Guiding network (its config from its own metadata, else --gnet-config, else --config).
    #[arg(long)]
    pub gnet: Option<String>,
    /// Config of the guiding network when its file has no metadata.
    #[arg(long = "gnet-config")]
    pub gnet_config: Option<String>,
    /// Guidance weight w in D = g + w (D_net − g); ≠ 1 needs --gnet.
    #[arg(long, default_value_t = 1.0)]
    pub guidance: f32,
    /// Seeds, e.g. 0-63,100 (one image per seed).
    #[arg(long, default_value = "0-63")]
    pub seeds: String,
    /// Class label for all images (default: a random class per seed).
    #[arg(long)]
    pub class: Option<usize>,
    /// Sampling steps (2·steps − 1 network evaluations).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Output directory for {seed:06d}.png.
    #[arg(long, default_value = "out")]
    pub outdir: PathBuf,
    /// Put images in {seed//1000*1000:06d}/ subdirectories.
    #[arg(long)]
    pub subdirs: bool,
    /// Also write all images as one grid PNG.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Start from given noise: `noise` [N,C,H,W], optional `class_labels` [N,L] and
    /// `churn_noise` [K,N,C,H,W]; images are named by row index and --seeds is not used.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Write the final samples before quantization as `samples` [N,C,H,W] f32.
    #[arg(long = "save-raw")]
    pub save_raw: Option<PathBuf>,
    /// Config of --net when its file has no metadata.
    #[arg(long)]
    pub config: Option<String>,
    #[arg(long = "S_churn", default_value_t = 0.0)]
    pub s_churn: f64,
    #[arg(long = "S_min", default_value_t = 0.0)]
    pub s_min: f64,
    #[arg(long = "S_max", default_value_t = f64::INFINITY)]
    pub s_max: f64,
    #[arg(long = "S_noise", default_value_t = 1.0)]
    pub s_noise: f64,
    /// cpu, cuda, or auto (cuda when this build has the CUDA backend and a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Arithmetic: fp32, or bf16. On the CUDA backend bf16 stores activations as bf16,
    /// products with fp32 accumulation (the sampler's state, x and D stay fp32). On a CPU
    /// with AVX512-BF16 it runs the convolutions' products in bf16 with fp32 accumulation
    /// (activations fp32); other CPUs refuse it.
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    pub precision: String,
    /// For latent networks (4 channels, e.g. the ImageNet-512 ones): decode the samples to
    /// PNG images with this VAE (a diffusers model directory such as
    /// stabilityai/sd-vae-ft-mse, or its .safetensors file with config.json beside it).
    /// Without it latents are written as .npy (`edm2 decode` turns them into PNGs later).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// With --vae: also keep each image's latents as {seed:06d}.npy.
    #[arg(long)]
    pub latents: bool,
}

/// The most images one `generate` may name (a list of this many seeds is 128 MiB; a
/// bigger run is split over invocations, e.g. by --seeds ranges across machines).
pub const MAX_SEEDS: u64 = 1 << 24;

/// "0-63,100" → [0..=63, 100]; at most [`MAX_SEEDS`] seeds, counted before any is listed.
pub fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let mut ranges = Vec::new();
    let mut count = 0u64;
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b): (u64, u64) = match part.split_once('-') {
            Some((a, b)) => {
                let bad = || format!("--seeds: bad seed range '{part}' (expected START-END of non-negative integers)");
                (a.trim().parse().with_context(bad)?, b.trim().parse().with_context(bad)?)
            }
            None => {
                let v = part.parse().with_context(|| format!("--seeds: bad seed '{part}'"))?;
                (v, v)
            }
        };
        if b < a {
            bail!("--seeds: bad seed range '{part}': end before start");
        }
        count = count.saturating_add((b - a).saturating_add(1));
        if count > MAX_SEEDS {
            bail!("--seeds '{s}' selects more than {MAX_SEEDS} images; split the work over several runs (e.g. 0-999999, 1000000-1999999)");
        }
        ranges.push((a, b));
    }
    let mut out = Vec::with_capacity(count as usize);
    for (a, b) in ranges {
        out.extend(a..=b);
    }
    if out.is_empty() {
        bail!("--seeds selects no images");
    }
    Ok(out)
}

fn image_path(outdir: &Path, name: u64, subdirs: bool, ext: &str) -> PathBuf {
    let dir = if subdirs { outdir.join(format!("{:06}", name / 1000 * 1000)) } else { outdir.to_path_buf() };
    dir.join(format!("{name:06}.{ext}"))
}

pub fn run(a: Args) -> Result<()> {
    let device = resolve_device(a.device)?;
    if precision_is_bf16(&a.precision) && device != Device::Cuda {
        // bf16 products on a CPU with AVX512-BF16; refused (saying why) elsewhere.
        edm2::backend::cpu::Cpu::with_bf16_products().map_err(anyhow::Error::msg)?;
        eprintln!("--precision bf16 on the CPU: the products on {}", edm2::backend::cpu::amx::products_name());
        if let Some(note) = edm2::backend::cpu::Cpu::bf16_slower_note() {
            eprintln!("{note}");
        }
    }
    // Every number and output path checked before a network is loaded.
    finite("guidance", a.guidance as f64, None)?;
    if a.guidance != 1.0 && a.gnet.is_none() {
        bail!("--guidance {} needs a guiding network (--gnet); guidance 1 means no guidance", a.guidance);
    }
    anyhow::ensure!(a.batch > 0 && a.steps >= 2, "--batch must be positive and --steps at least 2");
    anyhow::ensure!(a.steps <= MAX_STEPS, "--steps {} is more than {MAX_STEPS}", a.steps);
    finite("S_churn", a.s_churn, Some(0.0))?;
    finite("S_min", a.s_min, Some(0.0))?;
    finite("S_noise", a.s_noise, Some(0.0))?;
    // S_max may be +inf (the default: churn at every σ ≥ S_min), never NaN.
    if a.s_max.is_nan() || a.s_max < a.s_min {
        bail!("--S_max {} must be a number at least --S_min {}", a.s_max, a.s_min);
    }
    let seeds = if a.noise.is_none() { Some(parse_seeds(&a.seeds)?) } else { None };
    output_dir("outdir", &a.outdir)?;
    // Partial images of an earlier, killed run (never those of a live one sharing the folder).
    let mut dirs = vec![a.outdir.clone()];
    if a.subdirs {
        dirs.extend(std::fs::read_dir(&a.outdir)?.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
    }
    for d in dirs {
        // (An hour old at least: the folder may be shared with generates on other machines.)
        for p in edm2::train::rundir::remove_partial_files(&d, std::time::Duration::from_secs(3600))? {
            eprintln!("removed {} (a partial file left by an interrupted write)", p.display());
        }
    }
    if let Some(g) = &a.grid {
        output_file("grid", g)?;
    }
    if let Some(r) = &a.save_raw {
        output_file("save-raw", r)?;
    }
    let cfg = a.config.as_deref().map(NetConfig::resolve).transpose()?;
    let net = edm2::load_net(&a.net, cfg.as_ref())?;
    let gnet = match &a.gnet {
        Some(g) => {
            let has_meta = safetensors::read_header(g)?.metadata.contains_key("edm2.config");
            let gcfg = if has_meta { None } else { a.gnet_config.as_deref().or(a.config.as_deref()).map(NetConfig::resolve).transpose()? };
            Some(edm2::load_net(g, gcfg.as_ref())?)
        }
        None => None,
    };
    let c = net.net.config.clone();
    if let Some(g) = &gnet {
        let gc = &g.net.config;
        if (gc.img_resolution, gc.img_channels, gc.label_dim) != (c.img_resolution, c.img_channels, c.label_dim) {
            bail!("the guiding network makes {}x{}x{} images with label_dim {}, the main one {}x{}x{} with label_dim {}",
                gc.img_resolution, gc.img_resolution, gc.img_channels, gc.label_dim, c.img_resolution, c.img_resolution, c.img_channels, c.label_dim);
        }
    }
    if let Some(k) = a.class {
        if c.label_dim == 0 {
            bail!("--class given but the network is unconditional");
        }
        if k >= c.label_dim {
            bail!("--class {k} is out of range (label_dim {})", c.label_dim);
        }
    }
    let (ch, r) = (c.img_channels, c.img_resolution);
    let per = ch * r * r;
    // Images: (name, noise NCHW, label row, optional churn noise).
    let given = match &a.noise {
        Some(p) => {
            let f = safetensors::read(p)?;
            let t = f.require("noise")?;
            if t.shape.len() != 4 || t.shape[1..] != [ch, r, r] {
                bail!("{}: noise has shape {:?}, the network takes [N, {ch}, {r}, {r}]", p.display(), t.shape);
            }
            if let Some(cn) = f.get("churn_noise") {
                if cn.shape.len() != 5 || cn.shape[1..] != [t.shape[0], ch, r, r] {
                    bail!("{}: churn_noise has shape {:?}, expected [K, {}, {ch}, {r}, {r}]", p.display(), cn.shape, t.shape[0]);
                }
            }
            if let (Some(l), true) = (f.get("class_labels"), c.label_dim > 0) {
                if l.shape != [t.shape[0], c.label_dim] {
                    bail!("{}: class_labels has shape {:?}, expected [{}, {}]", p.display(), l.shape, t.shape[0], c.label_dim);
                }
            }
            Some(f)
        }
        None => None,
    };
    let names: Vec<u64> = match (&given, seeds) {
        (Some(f), _) => (0..f.require("noise")?.shape[0] as u64).collect(),
        (None, Some(s)) => s,
        (None, None) => unreachable!("seeds are parsed when no --noise is given"),
    };
    // What must fit in memory: one batch of the sampler (and the network's activations),
    // and everything kept to the end (the grid's pixels, the raw samples).
    let batch = a.batch.min(names.len()) as u64;
    // (A grid of decoded latents holds 3 bytes per pixel of 8x the latent's side.)
    let grid_per = if a.vae.is_some() && ch == 4 { 3 * 64 * per / 4 } else { per } as u64;
    let kept = (names.len() as u64).saturating_mul(grid_per * a.grid.is_some() as u64 + 4 * per as u64 * a.save_raw.is_some() as u64);
    // (The CPU's bf16 mode keeps fp32 activations.)
    let act_bytes = if precision_is_bf16(&a.precision) && device == Device::Cuda { 2 } else { 4 };
    // On the host: the sampler's batch buffers (noise, x, churn, output), the kept images,
    // and on the CPU the network's activations (an eval forward keeps about half of what a
    // training pass records). The device's share is checked by its allocator.
    let activations = if device == Device::Cuda { 0 } else { net.net.activation_bytes_per_image(act_bytes) / 2 };
    let need = batch.saturating_mul(activations.saturating_add(8 * 4 * per as u64)).saturating_add(kept);
    {
        if let Some(avail) = edm2::train::memory::host_available() {
            if need > avail {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                bail!(
                    "sampling needs about {:.2} GiB ({:.2} GiB for --batch {batch}{}), but only {:.2} GiB of memory is available; \
                     lower --batch{}",
                    gib(need),
                    gib(need - kept),
                    if kept > 0 { format!(", {:.2} GiB for the --grid/--save-raw images of all {} seeds", gib(kept), names.len()) } else { String::new() },
                    gib(avail),
                    if kept > 0 { ", or generate fewer seeds per run with --grid/--save-raw" } else { "" }
                );
            }
        }
    }
    let opts = SamplerOpts {
        num_steps: a.steps,
        guidance: a.guidance,
        s_churn: a.s_churn,
        s_min: a.s_min,
        s_max: a.s_max,
        s_noise: a.s_noise,
        ..Default::default()
    };
    // Latent networks: the VAE decoder (loaded before any sampling, so a bad --vae costs
    // nothing) or .npy latents.
    let decoder = match (&a.vae, ch) {
        (Some(v), 4) => Some(super::vae::Decoder::load(v, device, a.precision.parse().map_err(anyhow::Error::msg)?)?),
        (Some(v), _) => bail!("--vae {}: the network makes {ch}-channel images, not 4-channel latents", v.display()),
        (None, _) => None,
    };
    anyhow::ensure!(!a.latents || decoder.is_some(), "--latents keeps the latents next to the decoded images; it needs --vae");
    let ext = if ch == 4 && decoder.is_none() { "npy" } else { "png" };
    if ch == 4 && decoder.is_none() {
        eprintln!("note: 4-channel latents are written as .npy; --vae DIR decodes them to PNG (or `edm2 decode` later)");
    } else if ch != 1 && ch != 3 && ch != 4 {
        bail!("cannot write {ch}-channel images as PNG (1 or 3 channels, or 4-channel latents)");
    }
    // What a written image is: (channels, side).
    let (img_ch, img_side) = match &decoder {
        Some(d) => (3, r * d.factor()),
        None => (ch, r),
    };
    let mut decode_time = std::time::Duration::ZERO;
    let t_start = std::time::Instant::now();
    // The networks on the chosen device, weights uploaded once.
    let precision: edm2::backend::Precision = a.precision.parse().map_err(anyhow::Error::msg)?;
    let on_net = edm2::api::DeviceNet::with_precision(&net, device, precision)?;
    // The guide beside the net: on a GPU one device handle, so the sampler guides there.
    let on_gnet = gnet.as_ref().map(|g| edm2::api::DeviceNet::beside(g, &on_net)).transpose()?;
    let mut raw = Vec::new();
    let mut grid_px = Vec::new();
    let nbatches = names.len().div_ceil(a.batch);
    for (bi, chunk) in names.chunks(a.batch).enumerate() {
        let todo: Vec<u64> = if a.grid.is_none() && a.save_raw.is_none() {
            chunk.iter().copied().filter(|&s| !image_path(&a.outdir, s, a.subdirs, ext).exists()).collect()
        } else {
            chunk.to_vec()
        };
        eprintln!("batch {}/{nbatches}: {} images{}", bi + 1, todo.len(), if todo.len() < chunk.len() { " (others exist)" } else { "" });
        if todo.is_empty() {
            continue;
        }
        let n = todo.len();
        let mut noise = vec![0.0f32; n * per];
        let mut labels = (c.label_dim > 0).then(|| Tensor::zeros(&[n, c.label_dim]));
        for (i, &s) in todo.iter().enumerate() {
            match &given {
                Some(f) => {
                    let t = f.require("noise")?;
                    noise[i * per..(i + 1) * per].copy_from_slice(&t.data[s as usize * per..(s as usize + 1) * per]);
                    if let (Some(l), Some(gl)) = (labels.as_mut(), f.get("class_labels")) {
                        // (Its shape was checked when the file was read.)
                        l.data[i * c.label_dim..(i + 1) * c.label_dim].copy_from_slice(&gl.data[s as usize * c.label_dim..(s as usize + 1) * c.label_dim]);
                        continue;
                    }
                }
                None => noise[i * per..(i + 1) * per].copy_from_slice(&Rng::new(s).normal_vec(per)),
            }
            if let Some(l) = labels.as_mut() {
                let k = a.class.unwrap_or_else(|| (Rng::new(s ^ 0xC1A55).uniform() * c.label_dim as f64) as usize % c.label_dim);
                l.data[i * c.label_dim + k] = 1.0;
            }
        }
        let noise = Tensor::from_vec(&[n, ch, r, r], noise).nchw_to_nhwc();
        let churn_given = given.as_ref().and_then(|f| f.get("churn_noise").cloned());
        let mut churn = |k: usize| -> Tensor {
            let mut d = vec![0.0f32; n * per];
            for (i, &s) in todo.iter().enumerate() {
                match &churn_given {
                    Some(t) if k < t.shape[0] => {
                        let total = t.shape[1] * per;
                        let src = k * total + s as usize * per;
                        d[i * per..(i + 1) * per].copy_from_slice(&t.data[src..src + per]);
                    }
                    _ => d[i * per..(i + 1) * per].copy_from_slice(&Rng::new(s ^ ((k as u64 + 1) << 32)).normal_vec(per)),
                }
            }
            Tensor::from_vec(&[n, ch, r, r], d).nchw_to_nhwc()
        };
        let mut evals = 0;
        let total_evals = 2 * a.steps - 1;
        // On a GPU the sampler's state stays on the device (one download per batch).
        let x = on_net
            .sample(on_gnet.as_ref(), &noise, labels.as_ref(), &opts, &mut churn, &mut |_| {
                evals += 1;
                eprint!("\r  step {evals}/{total_evals}");
            })?
            .nhwc_to_nchw();
        eprintln!();
        let decoded = match &decoder {
            Some(d) => {
                let t = std::time::Instant::now();
                let mut px = Vec::with_capacity(n * 3 * img_side * img_side);
                let sub = d.batch_size(r, r, None);
                for (k, part) in x.data.chunks(sub * per).enumerate() {
                    eprint!("\r  decoding {}/{n}", (k * sub + part.len() / per).min(n));
                    px.extend(d.decode(part, part.len() / per, r, r)?);
                }
                eprintln!();
                decode_time += t.elapsed();
                Some(px)
            }
            None => None,
        };
        for (i, &s) in todo.iter().enumerate() {
            let img = &x.data[i * per..(i + 1) * per];
            let path = image_path(&a.outdir, s, a.subdirs, ext);
            std::fs::create_dir_all(path.parent().unwrap()).with_context(|| format!("creating {}", path.parent().unwrap().display()))?;
            if let Some(px) = &decoded {
                let one = 3 * img_side * img_side;
                let px = px[i * one..(i + 1) * one].to_vec();
                write_png(&path, &px, 3, img_side, img_side)?;
                if a.latents {
                    edm2::io::npy::write(&path.with_extension("npy"), img, &[ch, r, r])?;
                }
                if a.grid.is_some() {
                    grid_px.push(px);
                }
            } else if ch == 4 {
                edm2::io::npy::write(&path, img, &[ch, r, r])?;
            } else {
                let px = to_pixels(img, ch, r, r);
                write_png(&path, &px, ch, r, r)?;
                if a.grid.is_some() {
                    grid_px.push(px);
                }
            }
        }
        if a.save_raw.is_some() {
            raw.extend_from_slice(&x.data);
        }
    }
    if let Some(p) = &a.save_raw {
        let n = raw.len() / per;
        safetensors::write(p, &[("samples", &[n, ch, r, r], &raw)], &BTreeMap::new(), Dtype::F32)?;
    }
    if let (Some(p), false) = (&a.grid, grid_px.is_empty()) {
        let (g, gh, gw) = grid(&grid_px, img_ch, img_side);
        write_png(p, &g, img_ch, gh, gw)?;
    }
    if decoder.is_some() {
        let total = t_start.elapsed().as_secs_f64();
        let dec = decode_time.as_secs_f64();
        eprintln!("time: sampling {:.1} s, VAE decoding {dec:.1} s ({:.0}% of the run)", total - dec, 100.0 * dec / total.max(1e-9));
    }
    eprintln!("done: {} images in {}", names.len(), a.outdir.display());
    Ok(())
}
