//! Command-line interface. Flags use the official EDM2 spellings where one exists.

pub mod bench;
pub mod checks;
pub mod denoise;
pub mod dynamics;
pub mod generate;
pub mod info;
pub mod launch;
pub mod phema;
pub mod plot;
pub mod train;
pub mod vae;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "edm2", version, about = "EDM2 diffusion: magnitude-preserving U-Net, training, post-hoc EMA, sampling", long_about = None)]
pub struct Cli {
    /// Worker threads (default: all cores). Results are bit-identical at a fixed count.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train (or resume) a network: EDM2 loss, Adam, power-function EMA snapshots.
    /// Ctrl-C (or SIGTERM/SIGHUP) finishes the step, writes a checkpoint and exits 0.
    Train(train::Args),
    /// Print a network's module tree, parameter count and forward GMACs per image.
    Info(info::Args),
    /// Run the denoiser D(x; sigma) on a batch stored in a safetensors file.
    Denoise(denoise::Args),
    /// Time a training step and a forward pass (median after warm-up).
    Bench(bench::Args),
    /// Sample images with the EDM sampler (optionally guided by a second network).
    Generate(generate::Args),
    /// Post-hoc EMA: reconstruct networks of any EMA length from training snapshots.
    Phema(phema::Args),
    /// Decode latents (.npy, as latent networks sample them) to PNG images with the
    /// Stability VAE (the official StabilityVAEEncoder.decode).
    Decode(vae::DecodeArgs),
    /// Encode an image dataset into a latent dataset (the official dataset_tool encode
    /// layout) with the Stability VAE, so latent networks can be trained on it.
    Encode(vae::EncodeArgs),
    /// Per-layer activation and weight magnitudes and the loss by noise level of a saved
    /// network on a fixed probe batch (the paper's training-dynamics view).
    Dynamics(dynamics::Args),
    /// Figures of a training run (loss, learning rate, per-block activation and weight
    /// magnitudes, update sizes, loss by noise level) as PNGs in RUN_DIR/plots.
    Plot(plot::Args),
}

/// Worker threads at most (a thousand-core machine is far past any we run on).
const MAX_THREADS: usize = 4096;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(t) = cli.threads {
        anyhow::ensure!(t <= MAX_THREADS, "--threads {t}: at most {MAX_THREADS}");
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global()?;
    }
    match cli.cmd {
        Command::Train(a) => train::run(a, cli.threads.is_some()),
        Command::Info(a) => info::run(a),
        Command::Denoise(a) => denoise::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Phema(a) => phema::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Decode(a) => vae::run_decode(a),
        Command::Encode(a) => vae::run_encode(a),
        Command::Dynamics(a) => dynamics::run(a),
        Command::Plot(a) => plot::run(a),
    }
}
