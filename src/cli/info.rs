//! `edm2 info`: module tree, parameter count (buffers excluded), forward GMACs per image.

use anyhow::{bail, Result};
use edm2::nn::unet::EncLayer;
use edm2::{NetConfig, Precond};

#[derive(clap::Args)]
pub struct Args {
    /// Preset name (e.g. edm2-img512-xs, cpu-s32) or JSON file of Precond kwargs.
    #[arg(long)]
    pub config: Option<String>,
    /// A net file (safetensors with edm2.config metadata) to describe instead.
    #[arg(long)]
    pub net: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = match (&a.config, &a.net) {
        (Some(c), _) => NetConfig::resolve(c)?,
        (None, Some(n)) => edm2::load_net(n, None)?.net.config,
        (None, None) => bail!("give --config PRESET|FILE or --net FILE (presets: {})", edm2::config::preset_names().join(", ")),
    };
    let net = Precond::new(&cfg)?;
    println!(
        "cpu: {} ({} kernels{}; EDM2_CPU_ISA=avx512|avx2|portable overrides)",
        edm2::backend::cpu::simd::cpu_model(),
        edm2::backend::cpu::simd::isa().name(),
        match (edm2::backend::cpu::bf16::available(), edm2::backend::cpu::amx::available()) {
            (true, true) => ", --precision bf16 available on AMX tiles (EDM2_DISABLE_AMX=1: AVX512-BF16)",
            (true, false) => ", --precision bf16 available (AVX512-BF16)",
            _ => "",
        }
    );
    println!("config: {}", cfg.to_json());
    println!("module tree (official names):");
    let u = &net.unet;
    println!("  unet.emb_fourier      MPFourier({})", u.emb_fourier.channels);
    println!("  unet.emb_noise        MPLinear({} -> {})", u.emb_noise.in_ch, u.emb_noise.out_ch);
    if let Some(m) = &u.emb_label {
        println!("  unet.emb_label        MPLinear({} -> {})", m.in_ch, m.out_ch);
    }
    for (name, l) in &u.enc {
        match l {
            EncLayer::Conv(m) => println!("  unet.enc.{name:<14} MPConv3x3({} -> {})", m.in_ch, m.out_ch),
            EncLayer::Block(b) => println!("  unet.enc.{name:<14} {}", describe(b)),
        }
    }
    for (name, b, _) in &u.dec {
        println!("  unet.dec.{name:<14} {}", describe(b));
    }
    println!("  unet.out_conv         MPConv3x3({} -> {})", u.out_conv.in_ch, u.out_conv.out_ch);
    println!("  logvar_fourier        MPFourier({})", net.logvar_fourier.channels);
    println!("  logvar_linear         MPLinear({} -> 1)", net.logvar_linear.in_ch);
    let params = net.num_params();
    let fc = net.flop_count();
    println!("parameters: {} ({:.2} M)", group(params as u64), params as f64 / 1e6);
    println!(
        "forward GMAC per image: {:.2} (the paper's and the official count_flops convention: MACs plus elementwise ops; \
         convolutions, linear layers and attention products alone: {:.2})",
        fc.total() as f64 / 1e9,
        fc.gemm_macs as f64 / 1e9
    );
    Ok(())
}

fn describe(b: &edm2::nn::layers::Block) -> String {
    let rs = match b.resample {
        edm2::nn::layers::Resample::Keep => "",
        edm2::nn::layers::Resample::Down => ", down",
        edm2::nn::layers::Resample::Up => ", up",
    };
    let fl = if b.flavor == edm2::nn::layers::Flavor::Enc { "enc" } else { "dec" };
    let attn = if b.num_heads > 0 { format!(", attention {} heads", b.num_heads) } else { String::new() };
    let skip = if b.conv_skip.is_some() { ", conv_skip" } else { "" };
    format!("Block[{fl}]({} -> {}{rs}{skip}{attn})", b.in_ch, b.out_ch)
}

/// 124713253 → "124,713,253".
pub fn group(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
