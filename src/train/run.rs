//! The training loop (official `training_loop`, DESIGN.md §2) on the CPU backend.
//!
//! Order of events at each image count `t` (as the official loop): status line and
//! `stats.jsonl` record every `status` images; EMA snapshots every `snapshot` images (and
//! at 0 on a fresh run); a training-state checkpoint every `checkpoint` images and when the
//! run stops (duration reached, `--slice` used up, or Ctrl-C), then a preview grid; then one
//! step: `batch / batch_gpu` accumulated passes, non-finite gradient entries zeroed and
//! counted, Adam at the scheduled learning rate, EMA update.
//!
//! Every random draw is a function of (seed, images seen) — `data::loader` for the data,
//! σ and noise, `mix(seed ^ DROPOUT, first image of the pass)` for dropout — so a run
//! resumed from a checkpoint is bit-identical to an uninterrupted one (with the same
//! `batch_gpu`: dropout masks are drawn per pass).

use super::adam::Adam;
use super::ema::{EmaOptions, EmaSet};
use super::loss::edm2_loss;
use super::memory::{host_available, StepMemory};
use super::schedule::learning_rate;
use super::snapshot::write_snapshot;
use super::rundir::{newest_valid_state, remove_partial_files, RunDirLock};
use super::state::{list_states, TrainState};
use crate::backend::{cpu::Cpu, Backend};
use crate::config::NetConfig;
use crate::tensor::Tensor;
use crate::data::loader::{Loader, StreamOptions};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::io::safetensors::Dtype;
use crate::nn::{Mode, Params, Precond};
use crate::rng::mix;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

const DROPOUT: u64 = 0xD50F_D50F_0000_0001;

/// Everything that defines a run (written to `training_options.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    /// Preset or config file the network came from.
    pub preset: String,
    /// `--data` as given (None: the built-in data).
    pub data: Option<String>,
    pub dataset: String,
    pub cond: bool,
    pub xflip: bool,
    pub max_size: Option<usize>,
    pub net: NetConfig,
    /// Images per optimizer step, and per forward/backward pass.
    pub batch: u64,
    pub batch_gpu: u64,
    /// Total images of the run, and at most this many in one invocation.
    pub duration: u64,
    pub slice: Option<u64>,
    pub lr: f64,
    /// Learning-rate decay reference, in batches (0: no decay).
    pub decay: f64,
    pub rampup_mimg: f64,
    #[serde(rename = "P_mean")]
    pub p_mean: f64,
    #[serde(rename = "P_std")]
    pub p_std: f64,
    pub loss_scaling: f64,
    pub ema: EmaOptions,
    /// Intervals in images; 0 disables.
    pub status: u64,
    pub snapshot: u64,
    pub checkpoint: u64,
    /// Keep only the newest N training states (0: keep all).
    pub keep: usize,
    pub seed: u64,
    /// "f16" or "f32".
    pub snapshot_dtype: String,
    /// Preview grid images at each checkpoint (0: none) and its sampler steps.
    pub preview: usize,
    pub preview_steps: usize,
    pub verify: bool,
    /// Arithmetic on the CUDA backend: "fp32" or "bf16" (bf16 activations; the weights,
    /// optimizer state and EMAs are fp32 either way, so a run may switch on resume).
    #[serde(default = "fp32")]
    pub precision: String,
    /// Probe images of the training-dynamics records (`dynamics.jsonl` at every status
    /// line, `train::dynamics`); 0: none.
    #[serde(default = "dynamics_probe")]
    pub dynamics: usize,
    /// Where the forward and backward passes run (not part of the run's definition: a run
    /// may be resumed on another device).
    #[serde(skip)]
    pub device: crate::backend::Device,
}

fn fp32() -> String {
    "fp32".into()
}

fn dynamics_probe() -> usize {
    16
}

impl TrainOptions {
    /// Checks the counts the loop relies on (the CLI checks user input before this with
    /// friendlier messages; this guards library callers).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        match (self.precision.as_str(), self.device) {
            ("fp32", _) | ("bf16", crate::backend::Device::Cuda) => {}
            // The CPU's bf16 products need AVX512-BF16: the reason in the error otherwise.
            ("bf16", _) => Cpu::with_bf16_products().map(|_| ()).map_err(Error::Input)?,
            (p, _) => return bad(format!("precision {p:?}: expected fp32 or bf16")),
        }
        if self.batch == 0 || self.batch_gpu == 0 || self.batch % self.batch_gpu != 0 {
            return bad(format!("batch {} must be a positive multiple of batch-gpu {}", self.batch, self.batch_gpu));
        }
        if self.duration == 0 || self.duration % self.batch != 0 {
            return bad(format!("duration {} must be a positive multiple of the batch {}", self.duration, self.batch));
        }
        for (name, v, k) in [("status", self.status, 1), ("snapshot", self.snapshot, 1024), ("checkpoint", self.checkpoint, 1024)] {
            if v != 0 && (v % self.batch != 0 || v % k != 0) {
                return bad(format!("--{name} {v} must be a multiple of the batch {}{}", self.batch, if k > 1 { " and of 1024" } else { "" }));
            }
        }
        if let Some(s) = self.slice {
            if s == 0 || s % self.batch != 0 {
                return bad(format!("--slice {s} must be a positive multiple of the batch {}", self.batch));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) || !(self.p_std > 0.0) || !(self.loss_scaling > 0.0) || self.decay < 0.0 || self.rampup_mimg < 0.0 {
            return bad("lr, P_std and ls must be positive; decay and rampup non-negative".into());
        }
        if !matches!(self.snapshot_dtype.as_str(), "f16" | "f32") {
            return bad(format!("snapshot dtype '{}' (f16 or f32)", self.snapshot_dtype));
        }
        match &self.ema {
            EmaOptions::Power { stds } if stds.is_empty() => bad("at least one EMA std is needed".into()),
            EmaOptions::Traditional { halflife_mimg, .. } if !(*halflife_mimg > 0.0) => bad("the EMA half-life must be positive".into()),
            _ => Ok(()),
        }
    }
}

/// Progress of the loop, for a progress bar.
#[derive(Clone, Debug)]
pub struct Progress {
    pub nimg: u64,
    pub start_nimg: u64,
    pub stop_nimg: u64,
    /// Training images per second over recent steps (snapshots and previews excluded).
    pub img_per_sec: f64,
    /// Mean loss per element of the last step.
    pub loss: f64,
}

/// Where the loop's output goes: lines (also appended to `log.txt`) and progress.
pub trait Reporter {
    fn line(&mut self, s: &str);
    fn progress(&mut self, _p: &Progress) {}
    /// After the EMA snapshots of an image count are written and when the run stops: the
    /// program refreshes the run's figures here.
    fn refresh_figures(&mut self, _run_dir: &Path) {}
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `duration` reached.
    Finished,
    /// `--slice` images trained in this invocation.
    Sliced,
    /// Stop requested (Ctrl-C).
    Interrupted,
    /// Nothing to do: the state is already at `duration`.
    AlreadyDone,
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub reason: StopReason,
    pub start_nimg: u64,
    pub nimg: u64,
    pub snapshots: Vec<PathBuf>,
    pub checkpoints: Vec<PathBuf>,
    pub previews: Vec<PathBuf>,
    /// Training images per second over the whole invocation (maintenance excluded).
    pub img_per_sec: f64,
    /// Mean time per step in forward+backward, and in everything else of the step
    /// (waiting for data, gradient sanitizing, Adam, EMA), seconds.
    pub fwd_bwd_sec: f64,
    pub other_sec: f64,
    pub steps: u64,
}

struct Log<'a> {
    file: Option<std::fs::File>,
    ui: &'a mut dyn Reporter,
}

impl Log<'_> {
    fn line(&mut self, s: &str) {
        if let Some(f) = self.file.as_mut() {
            let _ = writeln!(f, "{s}");
        }
        self.ui.line(s);
    }
}

/// Resident and peak resident memory of this process, GiB (Linux; 0 elsewhere).
pub fn memory_gib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / (1u64 << 20) as f64)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `12h 03m 04s` style durations (as the official status line).
pub fn format_time(sec: f64) -> String {
    let s = sec.max(0.0).round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{}h {:02}m {:02}s", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}d {:02}h {:02}m", s / 86400, s / 3600 % 24, s / 60 % 60)
    }
}

/// A preview grid: `n` images with `steps` sampler steps from `ema`, seeds 0..n, class
/// `i % label_dim`; written as `preview-{kimg:07}.png`. None for latents (not pixels).
pub fn write_preview(net: &Precond, ema: &Params, dir: &Path, nimg: u64, n: usize, steps: usize) -> Result<Option<PathBuf>> {
    let c = &net.config;
    if n == 0 || !(c.img_channels == 1 || c.img_channels == 3) {
        return Ok(None);
    }
    let (ch, r) = (c.img_channels, c.img_resolution);
    let per = ch * r * r;
    let mut noise = Vec::with_capacity(n * per);
    for s in 0..n as u64 {
        noise.extend(crate::rng::Rng::new(s).normal_vec(per));
    }
    let noise = crate::Tensor::from_vec(&[n, ch, r, r], noise).nchw_to_nhwc();
    let labels = (c.label_dim > 0).then(|| {
        let mut l = crate::Tensor::zeros(&[n, c.label_dim]);
        for i in 0..n {
            l.data[i * c.label_dim + i % c.label_dim] = 1.0;
        }
        l
    });
    let opts = crate::sample::SamplerOpts { num_steps: steps.max(2), ..Default::default() };
    let x = crate::sample::edm_sampler((net, ema), None, &noise, labels.as_ref(), &opts, &mut |_| unreachable!("no churn"), &mut |_| {})
        .nhwc_to_nchw();
    let imgs: Vec<Vec<u8>> = (0..n).map(|i| crate::io::image::to_pixels(&x.data[i * per..(i + 1) * per], ch, r, r)).collect();
    let (g, gh, gw) = crate::io::image::grid(&imgs, ch, r);
    let path = dir.join(format!("preview-{:07}.png", nimg / 1000));
    crate::io::image::write_png(&path, &g, ch, gh, gw)?;
    Ok(Some(path))
}

/// Runs (or resumes) training in `run_dir` until `duration`, the end of `--slice`, or
/// `stop` is set (the current step finishes and a checkpoint is written first).
pub fn train(opts: &TrainOptions, ds: Arc<Dataset>, run_dir: &Path, stop: &AtomicBool, ui: &mut dyn Reporter) -> Result<Summary> {
    train_holding(opts, ds, run_dir, None, stop, ui)
}

/// [`train`] with the run directory's lock already taken by the caller (`held`, e.g. the
/// command's early check before a long dataset verification): kept from there to the end
/// of the run, so no other train can slip in between, and a process watching the lock
/// file never sees our pid while the lock is free.
pub fn train_holding(opts: &TrainOptions, ds: Arc<Dataset>, run_dir: &Path, held: Option<RunDirLock>, stop: &AtomicBool, ui: &mut dyn Reporter) -> Result<Summary> {
    opts.validate()?;
    let io = |e, p: &Path| Error::Io { path: p.into(), err: e };
    std::fs::create_dir_all(run_dir).map_err(|e| io(e, run_dir))?;
    // One run per directory; held until this function returns (or the process dies).
    let lock = match held {
        Some(l) => l,
        None => RunDirLock::acquire(run_dir)?,
    };
    let log_path = run_dir.join("log.txt");
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| io(e, &log_path))?;
    let mut log = Log { file: Some(file), ui };
    if !lock.held {
        log.line(&format!("warning: {} cannot be locked (the filesystem has no flock): nothing stops a second train here", lock.path.display()));
    }
    // Under the lock no other train writes here: any dead writer's file goes.
    for p in remove_partial_files(run_dir, std::time::Duration::ZERO)? {
        log.line(&format!("Removed {} (a partial file left by an interrupted write)", p.display()));
    }

    let net = Precond::new(&opts.net)?;
    // The host step's backend: fp32, or bf16 products (validated above).
    let cpu = if opts.device == crate::backend::Device::Cuda { Cpu } else { Cpu::for_precision(opts.precision.parse().map_err(Error::Input)?).map_err(Error::Input)? };
    let specs = net.specs.clone();
    let label_dim = if opts.cond { opts.net.label_dim } else { 0 };
    if opts.cond && opts.net.label_dim == 0 {
        return Err(Error::Input("conditional training needs a network with label_dim > 0".into()));
    }
    let c = &opts.net;
    if (ds.resolution, ds.net_channels()) != (c.img_resolution, c.img_channels) {
        return Err(Error::Input(format!(
            "the dataset has {}x{}x{} items, the network takes {}x{}x{}",
            ds.resolution, ds.resolution, ds.net_channels(), c.img_resolution, c.img_resolution, c.img_channels
        )));
    }

    // Refuse a step that cannot fit before building any of it (an abort midway names
    // nothing). With the CUDA backend the host keeps only the state (weights, moments, EMAs).
    let n_emas = match &opts.ema {
        EmaOptions::Power { stds } => stds.len(),
        EmaOptions::Traditional { .. } => 1,
    };
    let on_device = opts.device == crate::backend::Device::Cuda;
    let need = StepMemory::estimate(&net, opts.batch_gpu, n_emas, if on_device && opts.precision == "bf16" { 2 } else { 4 });
    log.line(&format!(
        "Memory: about {:.2} GiB per step ({:.2} GiB of activations per pass, {:.2} GiB of weights and optimizer state)",
        need.total() as f64 / (1u64 << 30) as f64,
        need.activations as f64 / (1u64 << 30) as f64,
        need.state as f64 / (1u64 << 30) as f64
    ));
    if let Some(avail) = host_available() {
        let host = if on_device { StepMemory { activations: 0, state: net.num_params() as u64 * 4 * (3 + n_emas as u64) } } else { need };
        host.check(avail, "memory on this machine", opts.batch_gpu, "batch-gpu")?;
        // The preview grid is sampled on the host at each checkpoint, in one batch.
        let per_image = (c.img_channels * c.img_resolution * c.img_resolution) as u64;
        let preview = (opts.preview as u64).saturating_mul(net.activation_bytes_per_image(4) / 2 + 8 * 4 * per_image);
        if opts.preview > 0 && preview.saturating_add(host.state) > avail {
            return Err(Error::Run(format!(
                "the preview grid of {} images needs about {:.2} GiB at each checkpoint, but only {:.2} GiB of memory is \
                 available; lower --preview (0: none)",
                opts.preview,
                preview as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            )));
        }
    }

    // Fresh start or resume from the newest valid state (newer corrupt ones set aside).
    let resume = newest_valid_state(run_dir)?;
    for (old, new, why) in &resume.set_aside {
        log.line(&format!("warning: {} is corrupt, kept as {}: {why}", old.display(), new.display()));
    }
    if resume.state.is_none() {
        // States were here but none is usable: a fresh run would overwrite the run's
        // snapshots and previews under the same names. Refuse (every time, not only when
        // the files are set aside) until the user chooses.
        let corrupt: Vec<String> = std::fs::read_dir(run_dir)
            .map_err(|e| io(e, run_dir))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("training-state-") && n.contains(".safetensors.corrupt"))
            .collect();
        if !corrupt.is_empty() {
            return Err(Error::Run(format!(
                "{}: no valid training state to resume from ({} corrupt, kept as *.corrupt: {}). A fresh run here would \
                 overwrite this run's snapshots: use another --outdir, or move the .corrupt files away to start afresh here",
                run_dir.display(),
                corrupt.len(),
                corrupt.join(", ")
            )));
        }
    }
    let mut st = match resume.state {
        Some((path, st)) => {
            if !resume.set_aside.is_empty() {
                log.line(&format!("warning: resuming from the newest valid state {}", path.display()));
            }
            if st.config != opts.net {
                return Err(Error::Input(format!(
                    "{} holds a training state of a different network:\n  state:   {}\n  options: {}\n\
                     Resume with the same network (preset, --channels, --dropout, --cond, dataset), or use another --outdir.",
                    path.display(),
                    st.config.to_json(),
                    opts.net.to_json()
                )));
            }
            if st.ema_options != opts.ema {
                return Err(Error::Input(format!(
                    "{} tracks the EMAs {}, these options {}; resume with the same --ema-std / --ema-halflife",
                    path.display(),
                    serde_json::to_string(&st.ema_options).unwrap(),
                    serde_json::to_string(&opts.ema).unwrap()
                )));
            }
            if st.nimg % opts.batch != 0 {
                return Err(Error::Input(format!("{}: {} images seen is not a multiple of --batch {}", path.display(), st.nimg, opts.batch)));
            }
            log.line(&format!("Resuming from {} ({} images seen)", path.display(), st.nimg));
            if st.seed != opts.seed {
                log.line(&format!("warning: the state was trained with --seed {}, continuing with --seed {}", st.seed, opts.seed));
            }
            if st.dataset_len != ds.len() {
                log.line(&format!("warning: the state was trained on {} items, the dataset now has {}", st.dataset_len, ds.len()));
            }
            st
        }
        None => {
            let params = net.init_params(opts.seed);
            let ema = EmaSet::new(&opts.ema, &params)?;
            TrainState {
                config: opts.net.clone(),
                adam: Adam::new(&specs),
                params,
                ema_options: opts.ema.clone(),
                ema,
                nimg: 0,
                seed: opts.seed,
                dataset: ds.source.clone(),
                dataset_len: ds.len(),
                elapsed_sec: 0.0,
            }
        }
    };
    st.seed = opts.seed;
    st.dataset = ds.source.clone();
    st.dataset_len = ds.len();

    let options_json = serde_json::to_string_pretty(opts).expect("options serialize");
    crate::io::write_atomic(run_dir.join("training_options.json"), options_json.as_bytes())?;

    let start_nimg = st.nimg;
    let mut stop_nimg = opts.duration;
    if let Some(s) = opts.slice {
        stop_nimg = stop_nimg.min(start_nimg.saturating_add(s));
    }
    let mut summary = Summary {
        reason: StopReason::AlreadyDone,
        start_nimg,
        nimg: start_nimg,
        snapshots: vec![],
        checkpoints: vec![],
        previews: vec![],
        img_per_sec: 0.0,
        fwd_bwd_sec: 0.0,
        other_sec: 0.0,
        steps: 0,
    };
    if start_nimg >= stop_nimg {
        log.line(&format!("Nothing to train: {} images seen, the duration is {}", start_nimg, opts.duration));
        return Ok(summary);
    }
    log.line(&format!(
        "Dataset: {} ({} items, {}x{}x{}{}); network {}: {:.2} M parameters; {} images per step ({} per pass)",
        ds.source,
        ds.len(),
        ds.resolution,
        ds.resolution,
        ds.net_channels(),
        if opts.cond { format!(", {} classes", c.label_dim) } else { ", unconditional".into() },
        opts.preset,
        net.num_params() as f64 / 1e6,
        opts.batch,
        opts.batch_gpu
    ));
    log.line(&format!("Training from {} kimg to {} kimg:", start_nimg / 1000, stop_nimg / 1000));

    let stream = StreamOptions { seed: opts.seed, batch: opts.batch_gpu as usize, label_dim, p_mean: opts.p_mean, p_std: opts.p_std };
    let loader = Loader::start(ds.clone(), stream, start_nimg, 2);
    // On the CUDA backend the weights, Adam moments and EMAs live on the device; the host
    // copy in `st` is refreshed for snapshots, checkpoints and previews.
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    let gpu = match opts.device {
        crate::backend::Device::Cuda => {
            let g = crate::backend::gpu::Gpu::open(0)?;
            g.set_precision(opts.precision.parse().map_err(Error::Input)?);
            Some(g)
        }
        _ => None,
    };
    // On the device: the step's memory against what the device has free (the host check
    // was made before the state was built).
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    if let Some((free, total)) = gpu.as_ref().and_then(|g| g.memory_free()) {
        need.check(free, &format!("device memory ({:.2} GiB in all on {})", total as f64 / (1u64 << 30) as f64, gpu.as_ref().unwrap().name()), opts.batch_gpu, "batch-gpu")?;
    }
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    let mut dev = gpu.as_ref().map(|g| device::DeviceState::upload(g, &st)).transpose()?;
    let rounds = opts.batch / opts.batch_gpu;
    let per_image = (c.img_channels * c.img_resolution * c.img_resolution) as f64;
    let dtype = if opts.snapshot_dtype == "f32" { Dtype::F32 } else { Dtype::F16 };
    let mut extra = BTreeMap::new();
    extra.insert("edm2.dataset".to_string(), ds.source.clone());
    // How data maps to the network's input (DESIGN.md §5), so outputs can be decoded.
    let encoder = match ds.encoding {
        crate::data::Encoding::Pixels => serde_json::json!({"class": "StandardRGBEncoder", "scale": 1.0 / 127.5, "bias": -1.0}),
        crate::data::Encoding::Latents => serde_json::json!({
            "class": "StabilityVAEEncoder",
            "raw_mean": crate::data::LATENT_RAW_MEAN,
            "raw_std": crate::data::LATENT_RAW_STD,
            "final_mean": 0.0,
            "final_std": 0.5,
        }),
    };
    extra.insert("edm2.encoder".to_string(), encoder.to_string());
    let mut stats_file: Option<std::fs::File> = None;
    // Training dynamics: a fixed probe of the dataset's first items (seeded noise), the
    // weights of the previous measurement for the relative update sizes.
    let probe = if opts.dynamics > 0 {
        let n = opts.dynamics.min(ds.raw_len());
        let mut y = Vec::with_capacity(n * c.img_resolution * c.img_resolution * c.img_channels);
        for i in 0..n {
            y.extend(ds.encoded(i, opts.seed)?);
        }
        let shape = [n, c.img_resolution, c.img_resolution, c.img_channels];
        Some(super::dynamics::Probe::new(Tensor::from_vec(&shape, y), label_dim, opts.seed))
    } else {
        None
    };
    let mut dyn_prev: Option<crate::nn::Params> = None;
    let mut dyn_file: Option<std::fs::File> = None;

    // Per status tick.
    let mut tick_start = Instant::now();
    let mut tick_nimg = start_nimg;
    let mut tick_train_sec = 0.0f64;
    let (mut tick_losses, mut tick_nonfinite) = (Vec::<f64>::new(), 0u64);
    let mut last_lr = 0.0;
    let mut recent_rate = 0.0f64;
    let (mut total_train_sec, mut total_fwd_bwd) = (0.0f64, 0.0f64);

    // Wall time of the whole run across invocations (stored in the training state).
    let (session_start, elapsed_before) = (Instant::now(), st.elapsed_sec);
    loop {
        st.elapsed_sec = elapsed_before + session_start.elapsed().as_secs_f64();
        let interrupted = stop.load(Ordering::SeqCst);
        let done = st.nimg >= stop_nimg || interrupted;

        // Status line and stats.jsonl.
        if opts.status > 0 && (done || st.nimg % opts.status == 0) && (st.nimg != start_nimg || start_nimg == 0) {
            let now = Instant::now();
            let tick_sec = now.duration_since(tick_start).as_secs_f64();
            let (rss, peak) = memory_gib();
            let kimg_done = (st.nimg - tick_nimg) as f64 / 1e3;
            let sec_per_kimg = if kimg_done > 0.0 { tick_train_sec / kimg_done } else { 0.0 };
            let n = tick_losses.len().max(1) as f64;
            let mean = tick_losses.iter().sum::<f64>() / n;
            let std = (tick_losses.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / n).sqrt();
            let loss_s = if tick_losses.is_empty() { "-".to_string() } else { format!("{mean:.4}") };
            // Training dynamics on the probe (its cost is in the status line and stats).
            let mut dyn_sec = 0.0;
            if let Some(probe) = &probe {
                let t0 = Instant::now();
                #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
                let device_params = match (dev.as_ref(), gpu.as_ref()) {
                    (Some(d), Some(g)) => Some(d.download_params(g)?),
                    _ => None,
                };
                #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
                let device_params: Option<crate::nn::Params> = None;
                let params = device_params.as_ref().unwrap_or(&st.params);
                let d = super::dynamics::measure(&net, params, probe, dyn_prev.as_ref());
                let path = run_dir.join("dynamics.jsonl");
                if dyn_file.is_none() {
                    dyn_file = Some(std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io(e, &path))?);
                }
                let f = dyn_file.as_mut().unwrap();
                writeln!(f, "{}", d.to_json(st.nimg as f64 / 1e3)).and_then(|_| f.flush()).map_err(|e| io(e, &path))?;
                dyn_prev = Some(match device_params {
                    Some(p) => p,
                    None => st.params.clone(),
                });
                dyn_sec = t0.elapsed().as_secs_f64();
            }
            let line = format!(
                "Status: kimg {:<9.1} time {:<12} sec/kimg {:<7.3} img/s {:<7.1} loss {:<8} lr {:<9.3e} maintenance {:<6.2} cpumem {:<6.2}{}",
                st.nimg as f64 / 1e3,
                format_time(st.elapsed_sec),
                sec_per_kimg,
                if tick_train_sec > 0.0 { (st.nimg - tick_nimg) as f64 / tick_train_sec } else { 0.0 },
                loss_s,
                last_lr,
                tick_sec - tick_train_sec,
                rss,
                if tick_nonfinite > 0 { format!(" nonfinite-grads {tick_nonfinite}") } else { String::new() }
            ) + &if probe.is_some() { format!(" dynamics {dyn_sec:.2}") } else { String::new() };
            log.line(&line);
            let mut rec = serde_json::Map::new();
            let mut put = |k: &str, v: f64| {
                rec.insert(k.into(), if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null });
            };
            put("Progress/kimg", st.nimg as f64 / 1e3);
            put("Progress/nimg", st.nimg as f64);
            if !tick_losses.is_empty() {
                put("Loss/loss", mean);
                put("Loss/loss_std", std);
            }
            put("Loss/learning_rate", last_lr);
            put("Loss/nonfinite_grads", tick_nonfinite as f64);
            put("Timing/total_sec", st.elapsed_sec);
            put("Timing/sec_per_tick", tick_sec);
            put("Timing/sec_per_kimg", sec_per_kimg);
            put("Timing/maintenance_sec", tick_sec - tick_train_sec);
            if probe.is_some() {
                put("Timing/dynamics_sec", dyn_sec);
            }
            put("Resources/cpu_mem_gb", rss);
            put("Resources/peak_cpu_mem_gb", peak);
            put("timestamp", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0));
            let stats_path = run_dir.join("stats.jsonl");
            if stats_file.is_none() {
                stats_file = Some(std::fs::OpenOptions::new().create(true).append(true).open(&stats_path).map_err(|e| io(e, &stats_path))?);
            }
            let f = stats_file.as_mut().unwrap();
            writeln!(f, "{}", serde_json::Value::Object(rec)).and_then(|_| f.flush()).map_err(|e| io(e, &stats_path))?;
            tick_start = now;
            tick_nimg = st.nimg;
            tick_train_sec = 0.0;
            tick_losses.clear();
            tick_nonfinite = 0;
        }

        // The host copy of the state is needed for snapshots, checkpoints and previews.
        let snapshot_due = opts.snapshot > 0 && st.nimg % opts.snapshot == 0 && (st.nimg != start_nimg || start_nimg == 0);
        let checkpoint_due = (done || (opts.checkpoint > 0 && st.nimg % opts.checkpoint == 0)) && st.nimg != start_nimg;
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        if let (Some(d), Some(g), true) = (dev.as_mut(), gpu.as_ref(), snapshot_due || checkpoint_due) {
            d.download_into(g, &mut st)?;
        }

        // EMA snapshots.
        if snapshot_due {
            for (std, ema) in st.ema.averages() {
                let p = write_snapshot(run_dir, &specs, ema, &opts.net, st.nimg, std, dtype, &extra)?;
                log.line(&format!("Saved {}", p.file_name().unwrap().to_string_lossy()));
                summary.snapshots.push(p);
            }
            log.ui.refresh_figures(run_dir);
        }

        // Training state, then the preview grid (from the EMA closest to σ_rel 0.100).
        if checkpoint_due {
            let p = st.save(&specs, run_dir)?;
            log.line(&format!("Saved {}", p.file_name().unwrap().to_string_lossy()));
            summary.checkpoints.push(p);
            if opts.keep > 0 {
                let states = list_states(run_dir)?;
                for old in states.iter().take(states.len().saturating_sub(opts.keep)) {
                    std::fs::remove_file(old).map_err(|e| io(e, old))?;
                }
            }
            let avgs = st.ema.averages();
            let pick = avgs
                .iter()
                .min_by(|a, b| {
                    let d = |x: Option<f64>| (x.unwrap_or(0.1) - 0.1).abs();
                    d(a.0).partial_cmp(&d(b.0)).unwrap()
                })
                .map(|a| a.1)
                .unwrap();
            if let Some(p) = write_preview(&net, pick, run_dir, st.nimg, opts.preview, opts.preview_steps)? {
                log.line(&format!("Saved {}", p.file_name().unwrap().to_string_lossy()));
                summary.previews.push(p);
            }
        }

        if done {
            log.ui.refresh_figures(run_dir);
            summary.reason = if interrupted && st.nimg < stop_nimg {
                StopReason::Interrupted
            } else if st.nimg >= opts.duration {
                StopReason::Finished
            } else {
                StopReason::Sliced
            };
            break;
        }

        // One optimizer step: on the device when one is in use, else here.
        let t0 = Instant::now();
        let scale = (opts.loss_scaling * opts.batch_gpu as f64 / opts.batch as f64) as f32;
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        let device_step = match (dev.as_mut(), gpu.as_ref()) {
            (Some(d), Some(g)) => match d.step(g, &net, &mut st, &loader, opts, scale)? {
                Ok(out) => Some(out),
                Err((name, i)) => {
                    let lr = learning_rate((st.nimg - opts.batch) as f64, opts.batch as f64, opts.lr, opts.decay, opts.rampup_mimg);
                    return Err(diverged(run_dir, &st, &name, i, lr));
                }
            },
            _ => None,
        };
        #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
        let device_step: Option<StepOut> = None;
        let StepOut { loss_sum, nonfinite, lr, fwd_bwd } = match device_step {
            Some(out) => out,
            None => {
                let mut fwd_bwd = 0.0f64;
                net.force_normalize(&mut st.params);
                let mut grads = cpu.zero_grads(&st.params)?;
                let mut loss_sum = 0.0f64;
                for _ in 0..rounds {
                    let b = loader.next()?;
                    let t1 = Instant::now();
                    let mode = Mode::train(mix(opts.seed ^ DROPOUT, b.start));
                    let out = net.forward_on(&cpu, &st.params, &b.noisy, &b.sigma, b.labels.as_ref(), &mode, false)?;
                    let mut l = edm2_loss(&out.d, &out.logvar, &b.images, &b.sigma, c.sigma_data);
                    // edm2_loss divides by the pass size; the step's loss is the sum over the
                    // whole batch divided by the batch, times the loss scaling (official
                    // `loss_scaling`).
                    if scale != 1.0 {
                        crate::backend::cpu::ops::scale_inplace(&mut l.dd.data, scale);
                        l.dlogvar.iter_mut().for_each(|v| *v *= scale);
                    }
                    loss_sum += l.per_sample.iter().sum::<f64>();
                    // Each pass adds its gradients into the step's (as on the device).
                    net.backward_into(&cpu, &st.params, out.cache.expect("training forward records"), &l.dd, &l.dlogvar, &mode, &mut grads)?;
                    fwd_bwd += t1.elapsed().as_secs_f64();
                }
                let nonfinite = Adam::sanitize(&mut grads);
                let lr = learning_rate(st.nimg as f64, opts.batch as f64, opts.lr, opts.decay, opts.rampup_mimg);
                st.adam.step(&specs, &mut st.params, &grads, lr);
                st.nimg += opts.batch;
                st.ema.update(&specs, &st.params, st.nimg, opts.batch);
                // Gradients are sanitized, but the update itself can overflow (a huge
                // learning rate, an exploding v): stop before anything non-finite is saved.
                if let Some((name, i)) = st.first_nonfinite(&specs) {
                    return Err(diverged(run_dir, &st, &name, i, lr));
                }
                StepOut { loss_sum, nonfinite, lr, fwd_bwd }
            }
        };

        let step_sec = t0.elapsed().as_secs_f64();
        tick_train_sec += step_sec;
        total_train_sec += step_sec;
        total_fwd_bwd += fwd_bwd;
        summary.steps += 1;
        last_lr = lr;
        let last_loss = loss_sum / (opts.batch as f64 * per_image);
        tick_losses.push(last_loss);
        tick_nonfinite += nonfinite as u64;
        let rate = opts.batch as f64 / step_sec;
        recent_rate = if recent_rate == 0.0 { rate } else { 0.9 * recent_rate + 0.1 * rate };
        log.ui.progress(&Progress { nimg: st.nimg, start_nimg, stop_nimg, img_per_sec: recent_rate, loss: last_loss });
    }
    summary.nimg = st.nimg;
    if summary.steps > 0 {
        summary.img_per_sec = (summary.nimg - start_nimg) as f64 / total_train_sec;
        summary.fwd_bwd_sec = total_fwd_bwd / summary.steps as f64;
        summary.other_sec = (total_train_sec - total_fwd_bwd) / summary.steps as f64;
    }
    Ok(summary)
}

/// The error of a run whose state went non-finite at its last step: names the step, the
/// tensor and the newest training state on disk (all of which are finite: every state is
/// checked before it is written).
fn diverged(run_dir: &Path, st: &TrainState, tensor: &str, index: usize, lr: f64) -> Error {
    let last = list_states(run_dir).ok().and_then(|mut l| l.pop());
    Error::Run(format!(
        "training diverged at step {} ({} images): tensor '{tensor}' holds a non-finite value at flat index {index} after the \
         optimizer update (learning rate {lr:.3e}); nothing of this step was saved. {}",
        st.adam.t,
        st.nimg,
        match last {
            Some(p) => format!("The newest training state, {}, is finite: resume from it with a lower --lr (or --ls).", p.display()),
            None => "No training state had been written yet: start again with a lower --lr (or --ls).".into(),
        }
    ))
}

/// What one optimizer step reports.
struct StepOut {
    /// Sum of the per-image losses over the batch (times the loss scaling).
    loss_sum: f64,
    nonfinite: usize,
    lr: f64,
    /// Seconds in the forward/backward passes.
    fwd_bwd: f64,
}

/// The training step on the CUDA backend: the state lives on the device; each pass
/// (forward, loss, backward) and the optimizer and EMA updates run there.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
mod device {
    use super::{learning_rate, mix, StepOut, TrainOptions, DROPOUT};
    use crate::backend::gpu::{kernels as k, multi_tensor as mt, Gpu, GpuAct, GpuBuf, GpuParams};
    use crate::backend::Backend;
    use crate::data::loader::Loader;
    use crate::error::Result;
    use crate::nn::{Mode, ParamKind, Precond};
    use crate::tensor::Tensor;
    use crate::train::state::TrainState;
    use std::time::Instant;

    /// A batch on the device (and its host side: σ, first image index).
    struct DeviceBatch {
        x: Tensor<GpuAct>,
        y: GpuBuf<f32>,
        labels: Option<Tensor<GpuAct>>,
        host: crate::data::loader::Batch,
    }

    pub struct DeviceState {
        params: GpuParams,
        m: Vec<GpuBuf<f32>>,
        v: Vec<GpuBuf<f32>>,
        emas: Vec<GpuParams>,
    }

    impl DeviceState {
        pub fn upload(gpu: &Gpu, st: &TrainState) -> Result<DeviceState> {
            let up = |p: &crate::nn::Params| p.values.iter().map(|v| gpu.upload_once(v)).collect::<Result<Vec<_>>>();
            Ok(DeviceState {
                params: GpuParams::upload(gpu, &st.params)?,
                m: up(&st.adam.m)?,
                v: up(&st.adam.v)?,
                emas: st.ema.averages().iter().map(|(_, e)| GpuParams::upload(gpu, e)).collect::<Result<Vec<_>>>()?,
            })
        }

        /// The current weights (not the moments and EMAs) on the host.
        pub fn download_params(&self, gpu: &Gpu) -> Result<crate::nn::Params> {
            self.params.download(gpu)
        }

        /// Refreshes the host state (weights, Adam moments, EMAs) from the device.
        pub fn download_into(&self, gpu: &Gpu, st: &mut TrainState) -> Result<()> {
            st.params = self.params.download(gpu)?;
            for (dst, src) in st.adam.m.values.iter_mut().zip(&self.m) {
                *dst = gpu.download(src)?;
            }
            for (dst, src) in st.adam.v.values.iter_mut().zip(&self.v) {
                *dst = gpu.download(src)?;
            }
            for (dst, src) in st.ema.averages_mut().into_iter().zip(&self.emas) {
                *dst = src.download(gpu)?;
            }
            Ok(())
        }

        /// One optimizer step (gradient accumulation over `batch / batch_gpu` passes).
        /// Advances `st.nimg` and `st.adam.t` as the host step does. `Ok(Err((tensor,
        /// index)))`: the update made that tensor non-finite (the host state then holds
        /// the device's, for the error message).
        pub fn step(
            &mut self,
            gpu: &Gpu,
            net: &Precond,
            st: &mut TrainState,
            loader: &Loader,
            opts: &TrainOptions,
            scale: f32,
        ) -> Result<std::result::Result<StepOut, (String, usize)>> {
            let specs = &net.specs;
            net.force_normalize_on(gpu, &mut self.params)?;
            let mut staging = 0.0f64;
            // The step's gradients: every pass adds into them (backward_into), the gains' too.
            let mut grads = gpu.zero_grads(&self.params)?;
            // [loss sum over the step's images, non-finite gradient entries, non-finite
            // entries after the update]: the one thing the host reads back, once a step.
            let mut totals = gpu.alloc_zeros::<f64>(3)?;
            // A pass's batch goes up on the upload stream while the kernels queued before it
            // run (the weight normalization, or the previous pass's backward).
            let upload = |b: crate::data::loader::Batch| -> Result<DeviceBatch> {
                let x = Tensor::with_buf(&b.noisy.shape, gpu.upload_input(&b.noisy.data)?);
                let y = gpu.upload(&b.images.data)?;
                let labels = b.labels.as_ref().map(|l| gpu.upload_act(&l.data).map(|d| Tensor::with_buf(&l.shape, d))).transpose()?;
                Ok(DeviceBatch { x, y, labels, host: b })
            };
            let passes = opts.batch / opts.batch_gpu;
            let mut next = Some(upload(loader.next()?)?);
            // Nothing is read back until the end: the host queues the passes, Adam and the
            // EMAs back to back.
            let t1 = Instant::now();
            for pass in 0..passes {
                let DeviceBatch { x: xd, y: yd, labels: ld, host: b } = next.take().expect("uploaded above");
                let mode = Mode::train(mix(opts.seed ^ DROPOUT, b.start));
                let out = net.forward_on(gpu, &self.params, &xd, &b.sigma, ld.as_ref(), &mode, false)?;
                let k::GpuLoss { per_sample, dd, dlogvar } = k::edm2_loss(gpu, &out.d.data, &yd, &out.logvar, &b.sigma, opts.net.sigma_data, scale)?;
                k::step_totals(gpu, Some(&per_sample), None, &mut totals)?;
                let dd = Tensor::with_buf(&out.d.shape, dd);
                net.backward_into(gpu, &self.params, out.cache.expect("training forward records"), &dd, &dlogvar, &mode, &mut grads)?;
                if pass + 1 < passes {
                    // Waiting for the loader and staging the batch count as "other", as
                    // on the CPU path.
                    let t2 = Instant::now();
                    next = Some(upload(loader.next()?)?);
                    staging += t2.elapsed().as_secs_f64();
                }
            }
            // Adam with non-finite zeroing on every parameter, the gains included: one launch.
            let lr = learning_rate(st.nimg as f64, opts.batch as f64, opts.lr, opts.decay, opts.rampup_mimg);
            st.adam.t += 1;
            let mut count = gpu.alloc_zeros::<u32>(2)?;
            let tensors = self
                .params
                .values
                .iter_mut()
                .zip(&grads.values)
                .zip(self.m.iter_mut().zip(self.v.iter_mut()))
                .zip(specs)
                .filter(|(_, s)| s.kind == ParamKind::Param)
                .map(|(((p, g), (m, v)), _)| mt::AdamTensor { p, g, m, v })
                .collect();
            let a = &st.adam;
            mt::adam(gpu, tensors, lr, a.beta1, a.beta2, a.eps, a.t, &mut count, mt::CHUNK)?;
            st.nimg += opts.batch;
            // The EMAs, all of them in one launch: the same lerp weights as the host's EmaSet
            // (buffers never change). Queued before the read-back: after a diverged update
            // nothing of this step is saved, so the EMAs need not wait for the check.
            let weights = st.ema.weights(st.nimg, opts.batch);
            let params = &self.params.values;
            let tensors = self
                .emas
                .iter_mut()
                .zip(weights)
                .flat_map(|(e, w)| e.values.iter_mut().zip(params).zip(specs).map(move |((e, p), s)| (e, p, w, s.kind)))
                .filter(|t| t.3 != ParamKind::Buffer)
                .map(|(e, p, w, _)| (e, p, w))
                .collect();
            mt::ema_lerp(gpu, tensors, mt::CHUNK)?;
            k::step_totals(gpu, None, Some(&count), &mut totals)?;
            let totals = gpu.download(&totals)?;
            let (loss_sum, nonfinite) = (totals[0], totals[1] as usize);
            // Forward, backward and the update (the read-back waits for all of it).
            let fwd_bwd = t1.elapsed().as_secs_f64() - staging;
            if totals[2] > 0.0 {
                self.download_into(gpu, st)?;
                return Ok(Err(st.first_nonfinite(specs).unwrap_or_else(|| ("(a parameter)".into(), 0))));
            }
            Ok(Ok(StepOut { loss_sum, nonfinite, lr, fwd_bwd }))
        }
    }
}
