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
use super::step::{train_step, StateRefs, StepOut, StepPlan};
use super::memory::{host_available, StepMemory};
use super::schedule::learning_rate;
use super::snapshot::write_snapshot;
use super::rundir::{newest_valid_state, remove_partial_files, RunDirLock};
use super::state::{list_states, TrainState};
use crate::backend::cpu::Cpu;
use crate::config::NetConfig;
use crate::tensor::Tensor;
use crate::data::loader::{Loader, StreamOptions};
use crate::data::Dataset;
use crate::dist::{Collective, Solo};
use crate::error::{Error, Result};
use crate::io::safetensors::Dtype;
use crate::nn::{Params, Precond};
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
    train_ranked(opts, ds, run_dir, held, &Solo, stop, ui)
}

/// [`train_holding`] as one rank of a data-parallel run (issue 20): each rank runs its
/// share of every step's passes (`batch = batch_gpu × passes × world`, the passes one
/// process would run dealt out in turn), the gradients and the loss are summed over the
/// ranks, and every rank applies the same update. Rank 0 alone takes the lock and writes
/// (log, stats, snapshots, states, previews); the others train quietly. A stop on any rank
/// stops all after the same step.
#[allow(clippy::too_many_arguments)]
pub fn train_ranked(
    opts: &TrainOptions,
    ds: Arc<Dataset>,
    run_dir: &Path,
    held: Option<RunDirLock>,
    comm: &dyn Collective,
    stop: &AtomicBool,
    ui: &mut dyn Reporter,
) -> Result<Summary> {
    opts.validate()?;
    let (rank, world) = (comm.rank(), comm.world());
    if opts.batch % (opts.batch_gpu * world as u64) != 0 {
        return Err(Error::Input(format!(
            "--batch {} must be a multiple of --batch-gpu {} times the {world} processes (the global batch is batch-gpu x passes x processes)",
            opts.batch, opts.batch_gpu
        )));
    }
    let io = |e, p: &Path| Error::Io { path: p.into(), err: e };
    let mut quiet = Quiet;
    let (lock, mut log) = if rank == 0 {
        std::fs::create_dir_all(run_dir).map_err(|e| io(e, run_dir))?;
        // One run per directory; held until this function returns (or the process dies).
        let lock = match held {
            Some(l) => l,
            None => RunDirLock::acquire(run_dir)?,
        };
        let log_path = run_dir.join("log.txt");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| io(e, &log_path))?;
        (Some(lock), Log { file: Some(file), ui })
    } else {
        (None, Log { file: None, ui: &mut quiet })
    };
    if let Some(lock) = lock.as_ref().filter(|l| !l.held) {
        log.line(&format!("warning: {} cannot be locked (the filesystem has no flock): nothing stops a second train here", lock.path.display()));
    }
    if rank == 0 {
        // Under the lock no other train writes here: any dead writer's file goes.
        for p in remove_partial_files(run_dir, std::time::Duration::ZERO)? {
            log.line(&format!("Removed {} (a partial file left by an interrupted write)", p.display()));
        }
    }
    if world > 1 {
        roll_call(comm, &ds, &mut log)?;
    }

    let net = Precond::new(&opts.net)?;
    let c = &opts.net;
    if opts.cond && c.label_dim == 0 {
        return Err(Error::Input("conditional training needs a network with label_dim > 0".into()));
    }
    if (ds.resolution, ds.net_channels()) != (c.img_resolution, c.img_channels) {
        return Err(Error::Input(format!(
            "the dataset has {}x{}x{} items, the network takes {}x{}x{}",
            ds.resolution, ds.resolution, ds.net_channels(), c.img_resolution, c.img_resolution, c.img_channels
        )));
    }
    let need = check_memory(opts, &net, &mut log)?;
    let mut st = state_on_every_rank(opts, &net, &ds, run_dir, &mut log, comm)?;
    if rank == 0 {
        let options_json = serde_json::to_string_pretty(opts).expect("options serialize");
        crate::io::write_atomic(run_dir.join("training_options.json"), options_json.as_bytes())?;
    }

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

    // Data: every draw a function of (seed, images seen), prefetched on threads.
    let label_dim = if opts.cond { c.label_dim } else { 0 };
    let stream = StreamOptions { seed: opts.seed, batch: opts.batch_gpu as usize, label_dim, p_mean: opts.p_mean, p_std: opts.p_std };
    let loader = Loader::start_rank(ds.clone(), stream, start_nimg, 2, rank, world);
    let mut engine = Engine::open(opts, &st, &need, comm.local_rank())?;
    let outputs = Outputs::new(opts, &net, &ds, run_dir);
    let mut status = Status::new(opts, &net, &ds, run_dir, start_nimg)?;
    let per_image = (c.img_channels * c.img_resolution * c.img_resolution) as f64;
    let mut recent_rate = 0.0f64;
    let (mut total_train_sec, mut total_fwd_bwd) = (0.0f64, 0.0f64);

    // Wall time of the whole run across invocations (stored in the training state).
    let (session_start, elapsed_before) = (Instant::now(), st.elapsed_sec);
    loop {
        st.elapsed_sec = elapsed_before + session_start.elapsed().as_secs_f64();
        // A stop asked of any rank stops every rank before the same step.
        let interrupted = if world > 1 { comm.any(stop.load(Ordering::SeqCst))? } else { stop.load(Ordering::SeqCst) };
        let done = st.nimg >= stop_nimg || interrupted;

        // Maintenance (rank 0): the status line, snapshots, the checkpoint and its preview.
        if rank == 0 && opts.status > 0 && (done || st.nimg % opts.status == 0) && (st.nimg != start_nimg || start_nimg == 0) {
            status.report(&mut log, &st, &net, &engine)?;
        }
        let snapshot_due = rank == 0 && opts.snapshot > 0 && st.nimg % opts.snapshot == 0 && (st.nimg != start_nimg || start_nimg == 0);
        let checkpoint_due = rank == 0 && (done || (opts.checkpoint > 0 && st.nimg % opts.checkpoint == 0)) && st.nimg != start_nimg;
        if snapshot_due || checkpoint_due {
            // The host copy of the state is what snapshots, checkpoints and previews read.
            engine.refresh(&mut st)?;
        }
        if snapshot_due {
            outputs.snapshots(&mut log, &st, &mut summary)?;
        }
        if checkpoint_due {
            outputs.checkpoint(&mut log, &st, &net, &mut summary)?;
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

        // One optimizer step, wherever the state lives.
        let t0 = Instant::now();
        let lr = learning_rate(st.nimg as f64, opts.batch as f64, opts.lr, opts.decay, opts.rampup_mimg);
        let plan = StepPlan {
            passes: (opts.batch / (opts.batch_gpu * world as u64)) as usize,
            seed: opts.seed,
            sigma_data: c.sigma_data,
            loss_scale: (opts.loss_scaling * opts.batch_gpu as f64 / opts.batch as f64) as f32,
            adam: st.adam.hyper(lr),
            ema_weights: st.ema.weights(st.nimg + opts.batch, opts.batch),
        };
        let out = engine.step(&net, &mut st, &loader, &plan, comm)?;
        st.adam.t = plan.adam.t;
        st.nimg += opts.batch;
        if out.diverged > 0 {
            // Stop before anything non-finite is saved; name the tensor from the host copy.
            engine.refresh(&mut st)?;
            let (name, i) = st.first_nonfinite(&net.specs).unwrap_or_else(|| ("(a parameter)".into(), 0));
            return Err(diverged(run_dir, &st, &name, i, lr));
        }

        let step_sec = t0.elapsed().as_secs_f64();
        total_train_sec += step_sec;
        total_fwd_bwd += out.fwd_bwd;
        summary.steps += 1;
        let loss = out.loss_sum / (opts.batch as f64 * per_image);
        status.record(step_sec, loss, out.nonfinite, lr);
        let rate = opts.batch as f64 / step_sec;
        recent_rate = if recent_rate == 0.0 { rate } else { 0.9 * recent_rate + 0.1 * rate };
        log.ui.progress(&Progress { nimg: st.nimg, start_nimg, stop_nimg, img_per_sec: recent_rate, loss });
    }
    summary.nimg = st.nimg;
    if summary.steps > 0 {
        summary.img_per_sec = (summary.nimg - start_nimg) as f64 / total_train_sec;
        summary.fwd_bwd_sec = total_fwd_bwd / summary.steps as f64;
        summary.other_sec = (total_train_sec - total_fwd_bwd) / summary.steps as f64;
    }
    Ok(summary)
}

/// The seed of a pass's dropout masks: a function of the run's seed and the pass's first
/// image, so a resumed run draws the same masks.
pub(crate) fn dropout_seed(seed: u64, first_image: u64) -> u64 {
    mix(seed ^ DROPOUT, first_image)
}

/// Refuses a step that cannot fit before building any of it (an abort midway names
/// nothing). With the CUDA backend the host keeps only the state (weights, moments, EMAs);
/// the device's part is checked when the device is opened ([`Engine::open`]).
fn check_memory(opts: &TrainOptions, net: &Precond, log: &mut Log) -> Result<StepMemory> {
    let c = &opts.net;
    let n_emas = match &opts.ema {
        EmaOptions::Power { stds } => stds.len(),
        EmaOptions::Traditional { .. } => 1,
    };
    let on_device = opts.device == crate::backend::Device::Cuda;
    let need = StepMemory::estimate(net, opts.batch_gpu, n_emas, if on_device && opts.precision == "bf16" { 2 } else { 4 });
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
    Ok(need)
}

/// The state to train from: the newest valid training state in `run_dir` (newer corrupt
/// ones set aside, a mismatching network or EMA set refused), or a fresh one.
fn resume_or_start(opts: &TrainOptions, net: &Precond, ds: &Dataset, run_dir: &Path, log: &mut Log) -> Result<(TrainState, Option<PathBuf>)> {
    let io = |e, p: &Path| Error::Io { path: p.into(), err: e };
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
    let (mut st, from) = match resume.state {
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
            (st, Some(path))
        }
        None => (fresh_state(opts, net, ds)?, None),
    };
    st.seed = opts.seed;
    st.dataset = ds.source.clone();
    st.dataset_len = ds.len();
    Ok((st, from))
}

/// The state of a new run (a function of the options: every rank builds the same one).
fn fresh_state(opts: &TrainOptions, net: &Precond, ds: &Dataset) -> Result<TrainState> {
    let params = net.init_params(opts.seed);
    let ema = EmaSet::new(&opts.ema, &params)?;
    Ok(TrainState {
        config: opts.net.clone(),
        adam: Adam::new(&net.specs),
        params,
        ema_options: opts.ema.clone(),
        ema,
        nimg: 0,
        seed: opts.seed,
        dataset: ds.source.clone(),
        dataset_len: ds.len(),
        elapsed_sec: 0.0,
    })
}

/// [`resume_or_start`] decided by rank 0 (which alone sets corrupt states aside and
/// checks the state against the options) and told to the others, which load the same
/// state file or build the same fresh state. An error on rank 0 is an error on every rank.
fn state_on_every_rank(opts: &TrainOptions, net: &Precond, ds: &Dataset, run_dir: &Path, log: &mut Log, comm: &dyn Collective) -> Result<TrainState> {
    if comm.world() == 1 {
        return resume_or_start(opts, net, ds, run_dir, log).map(|(st, _)| st);
    }
    // Rank 0's word: "F" (fresh), "R<path>" (resume from it) or "E<error>".
    let mut word = Vec::new();
    let mine = if comm.rank() == 0 {
        let r = resume_or_start(opts, net, ds, run_dir, log);
        word = match &r {
            Ok((_, Some(p))) => [b"R".as_slice(), p.to_string_lossy().as_bytes()].concat(),
            Ok((_, None)) => b"F".to_vec(),
            Err(e) => [b"E".as_slice(), e.to_string().as_bytes()].concat(),
        };
        Some(r)
    } else {
        None
    };
    comm.broadcast(&mut word)?;
    if let Some(r) = mine {
        return r.map(|(st, _)| st);
    }
    let text = String::from_utf8_lossy(word.get(1..).unwrap_or_default()).into_owned();
    let mut st = match word.first() {
        Some(b'F') => fresh_state(opts, net, ds)?,
        Some(b'R') => TrainState::load(Path::new(&text))?,
        Some(b'E') => return Err(Error::Run(format!("rank 0 could not start the run: {text}"))),
        _ => return Err(Error::Run("rank 0 sent no word on the run's state".into())),
    };
    st.seed = opts.seed;
    st.dataset = ds.source.clone();
    st.dataset_len = ds.len();
    Ok(st)
}

/// Every rank says where it runs; rank 0 writes who joined.
/// Every rank says where it runs and what data it reads; rank 0 lists the ranks and
/// refuses to start when a rank's data differs from its own (a different folder behind
/// the same path on another machine would silently train on other images).
fn roll_call(comm: &dyn Collective, ds: &Dataset, log: &mut Log) -> Result<()> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let me = format!("{} (pid {}, {} threads)\n{}", host.trim(), std::process::id(), rayon::current_num_threads(), ds.identity()?);
    let all = comm.gather(me.as_bytes())?;
    if comm.rank() == 0 {
        let split: Vec<(String, String)> = all
            .iter()
            .map(|b| {
                let t = String::from_utf8_lossy(b);
                let (who, data) = t.split_once('\n').unwrap_or((&t, ""));
                (who.to_string(), data.to_string())
            })
            .collect();
        let list: Vec<String> = split.iter().enumerate().map(|(r, (who, _))| format!("rank {r} on {who}")).collect();
        log.line(&format!("Ranks joined ({}, {} processes): {}", comm.engine(), comm.world(), list.join("; ")));
        let ours = &split[0].1;
        let differ: Vec<String> = split.iter().enumerate().filter(|(_, (_, d))| d != ours).map(|(r, (_, d))| format!("rank {r} reads {d}")).collect();
        if !differ.is_empty() {
            return Err(Error::Input(format!(
                "the ranks read different data: rank 0 reads {ours}; {} (every rank must read the same dataset)",
                differ.join("; ")
            )));
        }
    }
    Ok(())
}

/// The reporter of ranks other than 0: they train without output.
pub struct Quiet;
impl Reporter for Quiet {
    fn line(&mut self, _s: &str) {}
}

/// Where the training state lives while the loop runs, and the backend its steps run on:
/// the host's [`TrainState`] itself, or a copy on the CUDA device (weights, Adam moments,
/// EMAs), refreshed into the host's for snapshots, checkpoints, previews and errors.
enum Engine {
    Host(Cpu),
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    Device(crate::backend::gpu::Gpu, DeviceState),
}

impl Engine {
    /// `device`: this process's local rank (which CUDA device it trains on).
    fn open(opts: &TrainOptions, st: &TrainState, need: &StepMemory, device: usize) -> Result<Engine> {
        let precision = opts.precision.parse().map_err(Error::Input)?;
        if opts.device != crate::backend::Device::Cuda {
            // fp32, or bf16 products (validated with the options).
            return Ok(Engine::Host(Cpu::for_precision(precision).map_err(Error::Input)?));
        }
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        {
            let gpu = crate::backend::gpu::Gpu::open(crate::backend::gpu::device_of_local_rank(device))?;
            gpu.set_precision(precision);
            // The step's memory against what the device has free (the host's was checked
            // before the state was built).
            if let Some((free, total)) = gpu.memory_free() {
                let what = format!("device memory ({:.2} GiB in all on {})", total as f64 / (1u64 << 30) as f64, gpu.name());
                need.check(free, &what, opts.batch_gpu, "batch-gpu")?;
            }
            let state = DeviceState::upload(&gpu, st)?;
            Ok(Engine::Device(gpu, state))
        }
        #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
        {
            let _ = (st, need, device);
            Err(Error::Input("this build has no CUDA backend (build with --features cuda)".into()))
        }
    }

    /// One optimizer step ([`train_step`]) on the state where it lives.
    fn step(&mut self, net: &Precond, st: &mut TrainState, loader: &Loader, plan: &StepPlan, comm: &dyn Collective) -> Result<StepOut> {
        match self {
            Engine::Host(cpu) => {
                let refs = StateRefs { params: &mut st.params, m: &mut st.adam.m, v: &mut st.adam.v, emas: st.ema.averages_mut() };
                train_step(cpu, net, refs, loader, plan, comm)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Engine::Device(gpu, d) => {
                let refs = StateRefs { params: &mut d.params, m: &mut d.m, v: &mut d.v, emas: d.emas.iter_mut().collect() };
                train_step(gpu, net, refs, loader, plan, comm)
            }
        }
    }

    /// Brings the host's state up to date (weights, moments, EMAs); nothing on the host.
    fn refresh(&self, st: &mut TrainState) -> Result<()> {
        match self {
            Engine::Host(_) => {
                let _ = st;
                Ok(())
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Engine::Device(gpu, d) => d.download_into(gpu, st),
        }
    }

    /// The current weights when they are not the host state's (None: read `st.params`).
    fn device_params(&self) -> Result<Option<Params>> {
        match self {
            Engine::Host(_) => Ok(None),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Engine::Device(gpu, d) => d.params.download(gpu).map(Some),
        }
    }
}

/// The training state on the device: weights (the gains included), Adam's moments, every
/// average.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
struct DeviceState {
    params: crate::backend::gpu::GpuParams,
    m: crate::backend::gpu::GpuParams,
    v: crate::backend::gpu::GpuParams,
    emas: Vec<crate::backend::gpu::GpuParams>,
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
impl DeviceState {
    fn upload(gpu: &crate::backend::gpu::Gpu, st: &TrainState) -> Result<DeviceState> {
        use crate::backend::gpu::GpuParams;
        Ok(DeviceState {
            params: GpuParams::upload(gpu, &st.params)?,
            m: GpuParams::upload(gpu, &st.adam.m)?,
            v: GpuParams::upload(gpu, &st.adam.v)?,
            emas: st.ema.averages().iter().map(|(_, e)| GpuParams::upload(gpu, e)).collect::<Result<Vec<_>>>()?,
        })
    }

    fn download_into(&self, gpu: &crate::backend::gpu::Gpu, st: &mut TrainState) -> Result<()> {
        st.params = self.params.download(gpu)?;
        st.adam.m = self.m.download(gpu)?;
        st.adam.v = self.v.download(gpu)?;
        for (dst, src) in st.ema.averages_mut().into_iter().zip(&self.emas) {
            *dst = src.download(gpu)?;
        }
        Ok(())
    }
}

/// What the loop writes besides status: EMA snapshots, training states and previews.
struct Outputs<'a> {
    opts: &'a TrainOptions,
    run_dir: &'a Path,
    dtype: Dtype,
    /// Snapshot metadata: the dataset and how data maps to the network's input.
    extra: BTreeMap<String, String>,
    specs: Vec<crate::nn::params::ParamSpec>,
}

impl<'a> Outputs<'a> {
    fn new(opts: &'a TrainOptions, net: &Precond, ds: &Dataset, run_dir: &'a Path) -> Outputs<'a> {
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
        let dtype = if opts.snapshot_dtype == "f32" { Dtype::F32 } else { Dtype::F16 };
        Outputs { opts, run_dir, dtype, extra, specs: net.specs.clone() }
    }

    /// One snapshot per average at the current image count.
    fn snapshots(&self, log: &mut Log, st: &TrainState, summary: &mut Summary) -> Result<()> {
        for (std, ema) in st.ema.averages() {
            let p = write_snapshot(self.run_dir, &self.specs, ema, &self.opts.net, st.nimg, std, self.dtype, &self.extra)?;
            log.line(&format!("Saved {}", p.file_name().unwrap().to_string_lossy()));
            summary.snapshots.push(p);
        }
        log.ui.refresh_figures(self.run_dir);
        Ok(())
    }

    /// The training state (older ones beyond --keep removed), then the preview grid from
    /// the average closest to σ_rel 0.100.
    fn checkpoint(&self, log: &mut Log, st: &TrainState, net: &Precond, summary: &mut Summary) -> Result<()> {
        let p = st.save(&self.specs, self.run_dir)?;
        log.line(&format!("Saved {}", p.file_name().unwrap().to_string_lossy()));
        summary.checkpoints.push(p);
        if self.opts.keep > 0 {
            let states = list_states(self.run_dir)?;
            for old in states.iter().take(states.len().saturating_sub(self.opts.keep)) {
                std::fs::remove_file(old).map_err(|e| Error::Io { path: old.clone(), err: e })?;
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
        if let Some(p) = write_preview(net, pick, self.run_dir, st.nimg, self.opts.preview, self.opts.preview_steps)? {
            log.line(&format!("Saved {}", p.file_name().unwrap().to_string_lossy()));
            summary.previews.push(p);
        }
        Ok(())
    }
}

/// The status line, `stats.jsonl` and `dynamics.jsonl`: what the steps since the last
/// line did.
struct Status<'a> {
    run_dir: &'a Path,
    tick_start: Instant,
    tick_nimg: u64,
    train_sec: f64,
    losses: Vec<f64>,
    nonfinite: u64,
    last_lr: f64,
    stats_file: Option<std::fs::File>,
    /// Training dynamics: a fixed probe of the dataset's first items (seeded noise), the
    /// weights of the previous measurement for the relative update sizes, the file.
    probe: Option<super::dynamics::Probe>,
    dyn_prev: Option<Params>,
    dyn_file: Option<std::fs::File>,
}

impl<'a> Status<'a> {
    fn new(opts: &TrainOptions, net: &Precond, ds: &Dataset, run_dir: &'a Path, start_nimg: u64) -> Result<Status<'a>> {
        let c = &net.config;
        let probe = if opts.dynamics > 0 {
            let n = opts.dynamics.min(ds.raw_len());
            let mut y = Vec::with_capacity(n * c.img_resolution * c.img_resolution * c.img_channels);
            for i in 0..n {
                y.extend(ds.encoded(i, opts.seed)?);
            }
            let shape = [n, c.img_resolution, c.img_resolution, c.img_channels];
            let label_dim = if opts.cond { c.label_dim } else { 0 };
            Some(super::dynamics::Probe::new(Tensor::from_vec(&shape, y), label_dim, opts.seed))
        } else {
            None
        };
        Ok(Status {
            run_dir,
            tick_start: Instant::now(),
            tick_nimg: start_nimg,
            train_sec: 0.0,
            losses: vec![],
            nonfinite: 0,
            last_lr: 0.0,
            stats_file: None,
            probe,
            dyn_prev: None,
            dyn_file: None,
        })
    }

    /// A step's numbers: its time, mean loss per element, non-finite gradient entries and
    /// learning rate.
    fn record(&mut self, step_sec: f64, loss: f64, nonfinite: usize, lr: f64) {
        self.train_sec += step_sec;
        self.losses.push(loss);
        self.nonfinite += nonfinite as u64;
        self.last_lr = lr;
    }

    fn append(file: &mut Option<std::fs::File>, path: &Path, line: &str) -> Result<()> {
        let io = |e| Error::Io { path: path.into(), err: e };
        if file.is_none() {
            *file = Some(std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io)?);
        }
        let f = file.as_mut().unwrap();
        writeln!(f, "{line}").and_then(|_| f.flush()).map_err(io)
    }

    /// Writes the line and the records, and starts the next tick.
    fn report(&mut self, log: &mut Log, st: &TrainState, net: &Precond, engine: &Engine) -> Result<()> {
        let now = Instant::now();
        let tick_sec = now.duration_since(self.tick_start).as_secs_f64();
        let (rss, peak) = memory_gib();
        let kimg_done = (st.nimg - self.tick_nimg) as f64 / 1e3;
        let sec_per_kimg = if kimg_done > 0.0 { self.train_sec / kimg_done } else { 0.0 };
        let n = self.losses.len().max(1) as f64;
        let mean = self.losses.iter().sum::<f64>() / n;
        let std = (self.losses.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / n).sqrt();
        let loss_s = if self.losses.is_empty() { "-".to_string() } else { format!("{mean:.4}") };
        // Training dynamics on the probe (its cost is in the status line and stats).
        let mut dyn_sec = 0.0;
        if let Some(probe) = &self.probe {
            let t0 = Instant::now();
            let device_params = engine.device_params()?;
            let params = device_params.as_ref().unwrap_or(&st.params);
            let d = super::dynamics::measure(net, params, probe, self.dyn_prev.as_ref());
            Self::append(&mut self.dyn_file, &self.run_dir.join("dynamics.jsonl"), &d.to_json(st.nimg as f64 / 1e3).to_string())?;
            self.dyn_prev = Some(device_params.unwrap_or_else(|| st.params.clone()));
            dyn_sec = t0.elapsed().as_secs_f64();
        }
        let line = format!(
            "Status: kimg {:<9.1} time {:<12} sec/kimg {:<7.3} img/s {:<7.1} loss {:<8} lr {:<9.3e} maintenance {:<6.2} cpumem {:<6.2}{}",
            st.nimg as f64 / 1e3,
            format_time(st.elapsed_sec),
            sec_per_kimg,
            if self.train_sec > 0.0 { (st.nimg - self.tick_nimg) as f64 / self.train_sec } else { 0.0 },
            loss_s,
            self.last_lr,
            tick_sec - self.train_sec,
            rss,
            if self.nonfinite > 0 { format!(" nonfinite-grads {}", self.nonfinite) } else { String::new() }
        ) + &if self.probe.is_some() { format!(" dynamics {dyn_sec:.2}") } else { String::new() };
        log.line(&line);
        let mut rec = serde_json::Map::new();
        let mut put = |k: &str, v: f64| {
            rec.insert(k.into(), if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null });
        };
        put("Progress/kimg", st.nimg as f64 / 1e3);
        put("Progress/nimg", st.nimg as f64);
        if !self.losses.is_empty() {
            put("Loss/loss", mean);
            put("Loss/loss_std", std);
        }
        put("Loss/learning_rate", self.last_lr);
        put("Loss/nonfinite_grads", self.nonfinite as f64);
        put("Timing/total_sec", st.elapsed_sec);
        put("Timing/sec_per_tick", tick_sec);
        put("Timing/sec_per_kimg", sec_per_kimg);
        put("Timing/maintenance_sec", tick_sec - self.train_sec);
        if self.probe.is_some() {
            put("Timing/dynamics_sec", dyn_sec);
        }
        put("Resources/cpu_mem_gb", rss);
        put("Resources/peak_cpu_mem_gb", peak);
        put("timestamp", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0));
        Self::append(&mut self.stats_file, &self.run_dir.join("stats.jsonl"), &serde_json::Value::Object(rec).to_string())?;
        self.tick_start = now;
        self.tick_nimg = st.nimg;
        self.train_sec = 0.0;
        self.losses.clear();
        self.nonfinite = 0;
        Ok(())
    }
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
