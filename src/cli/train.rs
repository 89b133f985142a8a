//! `edm2 train`: the EDM2 training loop with the official flag names
//! (`train_edm2.py`), resumable run directories and the built-in Fashion-MNIST data.

use anyhow::{bail, Context, Result};
use edm2::backend::Device;
use edm2::config::{preset, preset_names, NetConfig, TrainPreset};
use edm2::data::{DataOptions, Dataset};
use edm2::train::ema::EmaOptions;
use edm2::train::run::{format_time, train_ranked, Progress, Reporter, StopReason, TrainOptions};
use edm2::train::snapshot::parse_nimg;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const DEFAULT_PRESET: &str = "cpu-fmnist";
/// Images in a preview grid at most.
const MAX_PREVIEW: usize = 1024;

#[derive(clap::Args)]
#[command(after_long_help = "Image counts (--duration, --batch, --status, ...) are images: a plain integer or with the \
binary suffixes Ki (2^10), Mi (2^20), Gi (2^30), e.g. 8Mi. Values given here must be multiples of the batch; \
--snapshot and --checkpoint also of 1024. A preset's own defaults are rounded to fit.\n\n\
The run directory receives network-snapshot-<kimg>-<std>.safetensors (EMA snapshots for `edm2 phema` and \
`edm2 generate`), training-state-<kimg>.safetensors (exact resume), preview-<kimg>.png, stats.jsonl, log.txt and \
training_options.json. Running the same command again resumes from the newest training state.\n\n\
Examples:\n  edm2 train                                   # cpu-fmnist on the built-in Fashion-MNIST\n  \
edm2 train --data=datasets/img64.zip --preset=edm2-img64-s --outdir=runs/img64-s\n  \
edm2 train --preset cpu-s32 --data imgs/ --batch 32 --duration 1Mi --slice 64Ki")]
pub struct Args {
    /// Network config JSON file (Precond kwargs); same as --config FILE.
    pub file: Option<String>,
    /// Preset name (network + training hyper-parameters) or a config JSON file.
    #[arg(long)]
    pub config: Option<String>,
    /// Configuration preset (default: cpu-fmnist). With a JSON config, supplies the
    /// training hyper-parameters (else cpu-fmnist's).
    #[arg(long)]
    pub preset: Option<String>,
    /// Dataset: a folder or zip of PNG/JPEG images or .npy latents (optional dataset.json
    /// labels), or `fashion-mnist` (the 60k split from Debian's dataset-fashion-mnist).
    /// Default: the built-in Fashion-MNIST test split (10k images, 32x32x1, 10 classes).
    #[arg(long, value_name = "ZIP|DIR|fashion-mnist")]
    pub data: Option<String>,
    /// The run directory itself (default: training-runs/<preset>-<dataset>). Resumes
    /// from the newest training state in it.
    #[arg(long, value_name = "DIR")]
    pub outdir: Option<PathBuf>,
    /// Class-conditional training (default: when the dataset has labels). `--cond`,
    /// `--cond=true|false`.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub cond: Option<bool>,
    /// Training duration in images.
    #[arg(long, value_name = "NIMG")]
    pub duration: Option<String>,
    /// Total batch size (images per optimizer step).
    #[arg(long, value_name = "NIMG")]
    pub batch: Option<String>,
    /// Limit the images per forward/backward pass (gradient accumulation; 0 = the batch,
    /// or with N processes the batch / N).
    #[arg(long = "batch-gpu", value_name = "NIMG")]
    pub batch_gpu: Option<String>,
    /// Channel multiplier (model_channels).
    #[arg(long, value_name = "INT")]
    pub channels: Option<usize>,
    /// Dropout probability.
    #[arg(long, value_name = "FLOAT")]
    pub dropout: Option<f32>,
    /// Mean of ln σ in the loss.
    #[arg(long = "P_mean", value_name = "FLOAT", allow_hyphen_values = true)]
    pub p_mean: Option<f64>,
    /// Standard deviation of ln σ in the loss.
    #[arg(long = "P_std", value_name = "FLOAT")]
    pub p_std: Option<f64>,
    /// Learning rate max. (alpha_ref).
    #[arg(long, value_name = "FLOAT")]
    pub lr: Option<f64>,
    /// Learning-rate decay reference t_ref, in batches (0: none).
    #[arg(long, value_name = "BATCHES")]
    pub decay: Option<f64>,
    /// Learning-rate ramp-up, in images (the paper: 10000000; Ki/Mi/Gi accepted; 0: none).
    #[arg(long, value_name = "NIMG")]
    pub rampup: Option<String>,
    /// Loss scaling.
    #[arg(long, value_name = "FLOAT", default_value_t = 1.0)]
    pub ls: f64,
    /// Interval of status lines (0: none).
    #[arg(long, value_name = "NIMG")]
    pub status: Option<String>,
    /// Interval of EMA snapshots (0: none).
    #[arg(long, value_name = "NIMG")]
    pub snapshot: Option<String>,
    /// Interval of training-state checkpoints (0: only at the end).
    #[arg(long, value_name = "NIMG")]
    pub checkpoint: Option<String>,
    /// Train at most this many images in this invocation, then checkpoint and exit.
    #[arg(long, value_name = "NIMG")]
    pub slice: Option<String>,
    /// Keep only the newest N training states (0: all).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep: usize,
    /// Random seed (weights, data order, noise, dropout).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Power-function EMA lengths σ_rel to track, comma-separated.
    #[arg(long = "ema-std", value_name = "LIST", default_value = "0.050,0.100")]
    pub ema_std: String,
    /// Track a traditional EMA with this half-life (millions of images) instead.
    #[arg(long = "ema-halflife", value_name = "MIMG")]
    pub ema_halflife: Option<f64>,
    /// Ramp-up ratio of the traditional EMA's half-life (0: none).
    #[arg(long = "ema-rampup", value_name = "RATIO", default_value_t = 0.09)]
    pub ema_rampup: f64,
    /// Snapshot dtype.
    #[arg(long = "snapshot-dtype", default_value = "f16", value_parser = ["f16", "f32"])]
    pub snapshot_dtype: String,
    /// Images in the preview grid written at each checkpoint (0: none).
    #[arg(long, default_value_t = 16)]
    pub preview: usize,
    /// Sampler steps of the preview grid.
    #[arg(long = "preview-steps", default_value_t = 16)]
    pub preview_steps: usize,
    /// Mirror augmentation (doubles the dataset).
    #[arg(long)]
    pub xflip: bool,
    /// Use only the first N items of the dataset.
    #[arg(long = "max-size", value_name = "N")]
    pub max_size: Option<usize>,
    /// Skip decoding every item once before training (for huge datasets).
    #[arg(long = "no-verify")]
    pub no_verify: bool,
    /// Accepted for official command lines: mixed precision. On the CUDA backend it selects
    /// --precision bf16; the CPU backend computes in fp32 unless --precision bf16 is given.
    #[arg(long, value_name = "BOOL", value_parser = parse_bool, hide = true)]
    pub fp16: Option<bool>,
    /// Arithmetic: fp32, or bf16. On the CUDA backend bf16 stores activations and their
    /// gradients as bf16, products with fp32 accumulation (fp32 master weights, optimizer
    /// state, EMAs, input x and output D). On a CPU with AVX512-BF16 it runs the
    /// convolutions' products in bf16 with fp32 accumulation (activations, weights and
    /// everything else fp32); other CPUs refuse it. Never the default on the CPU.
    #[arg(long, value_parser = ["fp32", "bf16"])]
    pub precision: Option<String>,
    /// Accepted for official command lines (cuDNN benchmarking); no effect here.
    #[arg(long, value_name = "BOOL", value_parser = parse_bool, hide = true)]
    pub bench: Option<bool>,
    /// Training dynamics (the paper's per-layer magnitudes): at every status line, measure
    /// block activations, weight magnitudes, relative update sizes and the loss by noise
    /// level on a fixed probe of the dataset's first N items and append them to
    /// dynamics.jsonl in the run directory. N = the probe size; 0 turns it off.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub dynamics: usize,
    /// cpu, cuda, or auto (cuda when this build has the CUDA backend and a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Print the training options and the run directory, and exit.
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,
    /// Data-parallel training in N processes on this machine. GPUs (--device cuda): one
    /// worker per device, torchrun's variables, gradients summed by NCCL (libnccl.so.2).
    /// CPUs: MPI (build with `--features mpi`; workers started with Open MPI's mpirun).
    /// --batch is the global batch: each process runs --batch-gpu images per pass, batch /
    /// (batch-gpu x N) passes per step; the result equals one process's up to summation
    /// order. Processes started by torchrun (--no-python), mpirun or srun join their job
    /// without this flag.
    #[arg(long = "nproc-per-node", value_name = "N", default_value_t = 1)]
    pub nproc_per_node: usize,
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "y" | "on" => Ok(true),
        "0" | "false" | "no" | "n" | "off" => Ok(false),
        _ => Err(format!("'{s}' is not a boolean (true/false)")),
    }
}

/// A user-given image count: parsed, positive, and a multiple of `multiple_of` (each
/// listed with its reason).
fn user_nimg(flag: &str, s: &str, multiples: &[(u64, &str)], allow_zero: bool) -> Result<u64> {
    let v = parse_nimg(s).with_context(|| format!("--{flag}"))?;
    if v == 0 {
        if allow_zero {
            return Ok(0);
        }
        bail!("--{flag} must be positive");
    }
    for (m, why) in multiples {
        if v % m != 0 {
            bail!("--{flag} {s} = {v} images is not a multiple of {why} ({m})");
        }
    }
    Ok(v)
}

/// A preset default rounded to the nearest positive multiple of `m` (0 stays 0: disabled).
fn round_to(v: u64, m: u64) -> u64 {
    if v == 0 {
        return 0;
    }
    (((v + m / 2) / m).max(1)) * m
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

struct Terminal {
    bar: bool,
    shown: bool,
}

impl Reporter for Terminal {
    fn line(&mut self, s: &str) {
        if self.shown {
            eprint!("\r\x1b[K");
            self.shown = false;
        }
        println!("{s}");
    }
    /// The run's figures (`edm2 plot`), refreshed at each snapshot and at the end; a
    /// failure to draw them is a warning, never the end of a training run.
    fn refresh_figures(&mut self, run_dir: &std::path::Path) {
        if let Err(e) = super::plot::write_plots(run_dir, &run_dir.join("plots")) {
            self.line(&format!("warning: the figures in {} were not refreshed: {e:#}", run_dir.join("plots").display()));
        }
    }
    fn progress(&mut self, p: &Progress) {
        if !self.bar {
            return;
        }
        let frac = (p.nimg - p.start_nimg) as f64 / (p.stop_nimg - p.start_nimg).max(1) as f64;
        let w = 24;
        let filled = ((frac * w as f64) as usize).min(w);
        let eta = if p.img_per_sec > 0.0 { (p.stop_nimg - p.nimg) as f64 / p.img_per_sec } else { 0.0 };
        eprint!(
            "\r\x1b[K{:>9.1}/{:.1} kimg [{}{}] {:5.1}% {:6.1} img/s ETA {} loss {:.4}",
            p.nimg as f64 / 1e3,
            p.stop_nimg as f64 / 1e3,
            "#".repeat(filled),
            ".".repeat(w - filled),
            100.0 * frac,
            p.img_per_sec,
            format_time(eta),
            p.loss
        );
        let _ = std::io::stderr().flush();
        self.shown = true;
    }
}

/// Resolves flags, preset and dataset into the run's options (no file is written).
pub fn build_options(a: &Args, ds: &Dataset) -> Result<(TrainOptions, String)> {
    let config_arg = a.file.as_deref().or(a.config.as_deref());
    if a.file.is_some() && a.config.is_some() {
        bail!("give the network config either as FILE or as --config, not both");
    }
    let (preset_name, mut net, tp): (String, NetConfig, TrainPreset) = match (config_arg, a.preset.as_deref()) {
        (Some(c), p) if preset(c).is_none() => {
            let net = NetConfig::resolve(c)?;
            let tp_name = p.unwrap_or(DEFAULT_PRESET);
            let tp = preset(tp_name).with_context(|| format!("unknown --preset '{tp_name}'; presets: {}", preset_names().join(", ")))?.train;
            let stem = std::path::Path::new(c).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "config".into());
            (stem, net, tp)
        }
        (c, p) => {
            if let (Some(c), Some(p)) = (c, p) {
                if c != p {
                    bail!("--config {c} and --preset {p} name different presets");
                }
            }
            let name = c.or(p).unwrap_or(DEFAULT_PRESET);
            let pr = preset(name).with_context(|| format!("unknown preset '{name}'; presets: {}", preset_names().join(", ")))?;
            (name.to_string(), pr.net, pr.train)
        }
    };
    let has_labels = ds.labels.is_some();
    let cond = match a.cond {
        Some(true) if !has_labels => bail!("--cond: the dataset {} has no labels (no dataset.json with \"labels\")", ds.source),
        Some(c) => c,
        None => has_labels,
    };
    net.img_resolution = ds.resolution;
    net.img_channels = ds.net_channels();
    net.label_dim = if cond { ds.label_dim() } else { 0 };
    if let Some(c) = a.channels {
        if c == 0 {
            bail!("--channels must be positive");
        }
        net.model_channels = c;
    }
    if let Some(d) = a.dropout {
        if !(0.0..1.0).contains(&d) {
            bail!("--dropout {d} must be in [0, 1)");
        }
        net.dropout = d;
    }
    net.validate().with_context(|| format!("the network for {} ({}x{}x{})", ds.source, ds.resolution, ds.resolution, ds.net_channels()))?;

    let user = |flag: &str, v: &Option<String>, m: &[(u64, &str)], zero: bool| -> Result<Option<u64>> {
        v.as_deref().map(|s| user_nimg(flag, s, m, zero)).transpose()
    };
    let batch = user("batch", &a.batch, &[], false)?.unwrap_or(tp.batch as u64);
    if batch > 1 << 40 {
        bail!("--batch {batch}: at most 2^40 images per step");
    }
    let bm = [(batch, "the batch")];
    let bm1024 = [(batch, "the batch"), (1024, "1024")];
    let batch_gpu = match user("batch-gpu", &a.batch_gpu, &[], true)? {
        None | Some(0) => batch,
        Some(g) if g >= batch => batch,
        Some(g) if batch % g != 0 => bail!("--batch {batch} is not a multiple of --batch-gpu {g}"),
        Some(g) => g,
    };
    let lcm = batch / gcd(batch, 1024) * 1024;
    let status = user("status", &a.status, &bm, true)?.unwrap_or_else(|| round_to(tp.status_img, batch));
    let snapshot = user("snapshot", &a.snapshot, &bm1024, true)?.unwrap_or_else(|| round_to(tp.snapshot_img, lcm));
    let checkpoint = user("checkpoint", &a.checkpoint, &bm1024, true)?.unwrap_or_else(|| round_to(tp.checkpoint_img, lcm));
    // A preset's duration is rounded to whole snapshot intervals, so the run ends on one.
    let duration = user("duration", &a.duration, &bm, false)?.unwrap_or_else(|| round_to(tp.duration_img, if snapshot > 0 { snapshot } else { batch }));
    let slice = user("slice", &a.slice, &bm, false)?;
    let pos = |flag: &str, v: f64| -> Result<f64> {
        if !(v > 0.0 && v.is_finite()) {
            bail!("--{flag} {v} must be positive");
        }
        Ok(v)
    };
    let nonneg = |flag: &str, v: f64| -> Result<f64> {
        if !(v >= 0.0 && v.is_finite()) {
            bail!("--{flag} {v} must be zero or positive");
        }
        Ok(v)
    };
    let ema = match a.ema_halflife {
        Some(h) => EmaOptions::Traditional {
            halflife_mimg: pos("ema-halflife", h)?,
            rampup_ratio: (nonneg("ema-rampup", a.ema_rampup)? > 0.0).then_some(a.ema_rampup),
        },
        None => {
            let stds = a
                .ema_std
                .split(',')
                .map(|s| s.trim().parse::<f64>().with_context(|| format!("--ema-std: '{s}' is not a number")))
                .collect::<Result<Vec<_>>>()?;
            for (k, &s) in stds.iter().enumerate() {
                edm2::phema::std_to_exp(s).with_context(|| format!("--ema-std {s}"))?;
                // Snapshot names carry σ_rel with 3 decimals: two EMAs must not share one.
                if stds[..k].iter().any(|&t| format!("{t:.3}") == format!("{s:.3}")) {
                    bail!("--ema-std lists {s:.3} twice (snapshot names use 3 decimals)");
                }
            }
            EmaOptions::Power { stds }
        }
    };
    if a.preview > 0 && a.preview_steps < 2 {
        bail!("--preview-steps must be at least 2");
    }
    // The preview grid is sampled in one batch at each checkpoint: bound it before the
    // run, not when the first checkpoint is due.
    if a.dynamics > 256 {
        bail!("--dynamics {}: at most 256 probe images", a.dynamics);
    }
    if a.preview > MAX_PREVIEW || a.preview_steps > 10_000 {
        bail!("--preview {} / --preview-steps {}: at most {MAX_PREVIEW} images and 10000 steps", a.preview, a.preview_steps);
    }
    let opts = TrainOptions {
        preset: preset_name.clone(),
        data: a.data.clone(),
        dataset: ds.source.clone(),
        cond,
        xflip: a.xflip,
        max_size: a.max_size,
        net,
        batch,
        batch_gpu,
        duration,
        slice,
        lr: pos("lr", a.lr.unwrap_or(tp.lr))?,
        decay: nonneg("decay", a.decay.unwrap_or(tp.decay_batches))?,
        rampup_mimg: match &a.rampup {
            Some(r) => parse_nimg(r).with_context(|| "--rampup")? as f64 / 1e6,
            None => tp.rampup_mimg,
        },
        p_mean: a.p_mean.unwrap_or(tp.p_mean),
        p_std: pos("P_std", a.p_std.unwrap_or(tp.p_std))?,
        loss_scaling: pos("ls", a.ls)?,
        ema,
        status,
        snapshot,
        checkpoint,
        keep: a.keep,
        seed: a.seed,
        snapshot_dtype: a.snapshot_dtype.clone(),
        preview: a.preview,
        preview_steps: a.preview_steps,
        verify: !a.no_verify,
        precision: "fp32".into(),
        dynamics: a.dynamics,
        device: Device::Cpu,
    };
    if !opts.p_mean.is_finite() {
        bail!("--P_mean must be finite");
    }
    opts.validate()?;
    let run_name = format!("{preset_name}-{}", ds.name);
    Ok((opts, run_name))
}

/// Ctrl-C and termination signals set [`STOP`] (a second Ctrl-C exits at once), and so
/// does SIGUSR1.
fn catch_stop_signals(talk: bool) {
    let _ = ctrlc::set_handler(move || {
        if STOP.swap(true, Ordering::SeqCst) {
            if talk {
                eprintln!("\nSecond interrupt: exiting without a checkpoint.");
            }
            std::process::exit(130);
        }
        if talk {
            eprintln!("\nInterrupt: finishing this step and writing a checkpoint (Ctrl-C again to quit now).");
        }
    });
    catch_launcher_stop();
}

/// SIGUSR1 (the launchers' word for a Ctrl-C) sets STOP: from the start of `run`, so that
/// one arriving while the workers still meet does not end the process (its default action).
fn catch_launcher_stop() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        signal(super::launch::SIGUSR1, stop_on_signal as *const () as usize);
    }
}

/// A rank other than 0: the same training, no output but errors (rank 0 verifies the
/// dataset, takes the run directory's lock and writes everything).
fn run_quiet_rank(opts: &TrainOptions, ds: Dataset, run_dir: &std::path::Path, comm: &dyn edm2::dist::Collective) -> Result<()> {
    catch_stop_signals(false);
    train_ranked(opts, Arc::new(ds), run_dir, None, comm, &STOP, &mut edm2::train::run::Quiet)?;
    Ok(())
}

/// The newest EMA snapshot in a run directory (the 0.100 one where there are several).
fn newest_snapshot(dir: &std::path::Path) -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("network-snapshot-") && n.ends_with(".safetensors"))
        .collect();
    // Newest kimg first; among equal kimg prefer σ_rel 0.100.
    // (`get`: a hostile name may be short or split a multi-byte character there.)
    names.sort_by_key(|n| (std::cmp::Reverse(n.get(17..24).unwrap_or("").to_string()), !n.contains("-0.100.")));
    names.first().map(|n| dir.join(n))
}

/// Ctrl-C, SIGTERM/SIGHUP, and SIGUSR1 (what the `--nproc-per-node` launcher sends the
/// workers through mpirun) ask the run to stop after the current step.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn stop_on_signal(_sig: i32) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn run(a: Args, threads_given: bool) -> Result<()> {
    catch_launcher_stop();
    if a.nproc_per_node == 0 || a.nproc_per_node > 4096 {
        bail!("--nproc-per-node {}: 1 to 4096 processes", a.nproc_per_node);
    }
    let launched = edm2::dist::launch_from_env(&|k| std::env::var(k).ok())?;
    // `--nproc-per-node 1 --device cuda` written out: one worker through the GPU launcher on
    // a one-rank NCCL communicator (what checks that the NCCL path gives the plain result).
    let one_gpu_worker = a.nproc_per_node == 1
        && a.device == Device::Cuda
        && launched.is_none()
        && std::env::var_os("EDM2_LAUNCHER").is_none()
        && std::env::args().any(|s| s == "--nproc-per-node" || s.starts_with("--nproc-per-node="));
    if (a.nproc_per_node > 1 || one_gpu_worker) && !a.dry_run {
        if let Some(l) = launched {
            bail!("--nproc-per-node {}: this process is already rank {} of {} ({}); start the workers one way", a.nproc_per_node, l.rank, l.world, l.by);
        }
        // GPUs: one worker per device, started here the way torchrun does (NCCL meets
        // over MASTER_ADDR/MASTER_PORT); CPUs: workers under mpirun.
        if edm2::backend::resolve_device_saying(a.device, false)? == Device::Cuda {
            return super::launch::run_gpu_workers(a.nproc_per_node);
        }
        return super::launch::run_workers(a.nproc_per_node, threads_given);
    }
    // Rank 0 of several (or the only process) talks; the others train quietly. GPU ranks
    // sum over NCCL where the launcher gives a meeting place.
    let gpu = launched.is_some() && edm2::backend::resolve_device_saying(a.device, false)? == Device::Cuda;
    let comm = edm2::dist::join(gpu)?;
    let r = run_rank(a, comm.as_ref());
    if let (Err(e), true) = (&r, comm.world() > 1) {
        // The other ranks may be waiting for this one in a collective: end them all, now.
        eprintln!("error (rank {} of {}): {e:#}", comm.rank(), comm.world());
        comm.abort(1);
    }
    r
}

fn run_rank(a: Args, comm: &dyn edm2::dist::Collective) -> Result<()> {
    let rank0 = comm.rank() == 0;
    let device = edm2::backend::resolve_device_saying(a.device, rank0)?;
    let ds = Dataset::open(a.data.as_deref(), &DataOptions { xflip: a.xflip, max_size: a.max_size, ..Default::default() })?;
    let (mut opts, run_name) = build_options(&a, &ds)?;
    let world = comm.world() as u64;
    if world > 1 && matches!(a.batch_gpu.as_deref(), None | Some("0")) {
        // The default share of each process, as the official code's batch_gpu: the whole
        // global batch split over the processes in one pass each.
        if opts.batch % world != 0 {
            bail!("--batch {} is not a multiple of the {world} processes (the global batch is split over them)", opts.batch);
        }
        opts.batch_gpu = opts.batch / world;
    }
    opts.device = device;
    opts.precision = match (a.precision.as_deref(), a.fp16, device) {
        (Some("bf16"), _, Device::Cpu) => {
            // bf16 products on a CPU with AVX512-BF16; refused (saying why) elsewhere.
            edm2::backend::cpu::Cpu::with_bf16_products().map_err(anyhow::Error::msg)?;
            if rank0 {
                eprintln!("--precision bf16 on the CPU: the products on {}", edm2::backend::cpu::amx::products_name());
            }
            if let (true, Some(note)) = (rank0, edm2::backend::cpu::Cpu::bf16_slower_note()) {
                eprintln!("{note}");
            }
            "bf16".into()
        }
        (Some(p), _, _) => p.to_string(),
        (None, Some(true), Device::Cuda) => "bf16".into(),
        _ => "fp32".into(),
    };
    let run_dir = a.outdir.clone().unwrap_or_else(|| PathBuf::from("training-runs").join(run_name));
    if !rank0 {
        return run_quiet_rank(&opts, ds, &run_dir, comm);
    }
    println!("Run directory: {}", run_dir.display());
    if a.dry_run {
        println!("{}", serde_json::to_string_pretty(&opts)?);
        println!("Dataset: {} ({} items, {}x{}x{}{})", ds.source, ds.len(), ds.resolution, ds.resolution, ds.net_channels(),
            if opts.cond { format!(", {} classes", opts.net.label_dim) } else { String::new() });
        println!("Dry run: nothing written.");
        return Ok(());
    }
    if device == Device::Cpu && (a.fp16 == Some(true) || a.bench.is_some()) {
        eprintln!("note: --fp16/--bench are accepted for official command lines; the CPU backend trains in fp32");
    } else if a.fp16 == Some(true) && a.precision.is_none() {
        eprintln!("note: --fp16: mixed precision on the CUDA backend is bf16 activations (--precision bf16)");
    }
    let tty = std::io::stderr().is_terminal();
    // A run directory in use is refused before the (possibly long) dataset check; the lock
    // taken here is kept for the run itself (dropping and re-taking it left a window in
    // which the lock file named us but the lock was free).
    let held = if run_dir.is_dir() { Some(edm2::train::rundir::RunDirLock::acquire(&run_dir)?) } else { None };
    if opts.verify {
        let t = std::time::Instant::now();
        let n = ds.raw_len();
        ds.verify(&|done, total| {
            if tty {
                eprint!("\r\x1b[KVerifying dataset: {done}/{total}");
            }
        })?;
        if tty {
            eprint!("\r\x1b[K");
        }
        println!("Verified {n} items in {:.1}s", t.elapsed().as_secs_f64());
    }
    catch_stop_signals(true);
    let mut ui = Terminal { bar: tty, shown: false };
    let s = train_ranked(&opts, Arc::new(ds), &run_dir, held, comm, &STOP, &mut ui)?;
    let what = match s.reason {
        StopReason::Finished => "Training finished",
        StopReason::Sliced => "Slice done (run the same command again to continue)",
        StopReason::Interrupted => "Interrupted (run the same command again to resume)",
        StopReason::AlreadyDone => "Already trained to --duration",
    };
    println!("{what} at {} kimg ({} steps this run, {:.1} img/s).", s.nimg / 1000, s.steps, s.img_per_sec);
    if s.steps > 0 {
        let step = s.fwd_bwd_sec + s.other_sec;
        println!(
            "Mean step: {:.1} ms forward+backward, {:.1} ms other (waiting for data, gradient check, Adam, EMA) = {:.2}% of the step; \
             snapshots, checkpoints and previews not counted.",
            1e3 * s.fwd_bwd_sec,
            1e3 * s.other_sec,
            100.0 * s.other_sec / step.max(1e-12)
        );
    }
    let newest = newest_snapshot(&run_dir);
    if let Some(snap) = newest.as_ref() {
        println!("Outputs in {}:", run_dir.display());
        println!("  EMA snapshots network-snapshot-*.safetensors; training states training-state-*.safetensors; preview-*.png; stats.jsonl; log.txt");
        println!("Sample from the newest snapshot:");
        println!("  edm2 generate --net {} --seeds 0-63 --outdir out --grid out/grid.png", snap.display());
        println!("Post-hoc EMA of another length:");
        println!("  edm2 phema --indir {} --outstd 0.07 --outdir {}", run_dir.display(), run_dir.join("phema").display());
    }
    Ok(())
}
