//! `edm2 phema`: post-hoc EMA reconstruction from training snapshots (the official
//! reconstruct_phema.py flag names).

use anyhow::{bail, Context, Result};
use edm2::io::safetensors::Dtype;
use edm2::phema::reconstruct;
use edm2::NetConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Directory with network-snapshot-<kimg>-<std>.safetensors files (others are ignored).
    #[arg(long)]
    pub indir: PathBuf,
    /// Comma-separated EMA lengths σ_rel to reconstruct, each in (0, 0.2887), e.g. 0.05,0.1.
    #[arg(long)]
    pub outstd: String,
    /// Training time of the outputs in kimg (default: the latest snapshot; must be one).
    #[arg(long)]
    pub outkimg: Option<u64>,
    /// Where to write phema-<kimg>-<std>.safetensors (required unless --list).
    #[arg(long)]
    pub outdir: Option<PathBuf>,
    /// Print the coefficient matrix and write nothing.
    #[arg(long)]
    pub list: bool,
    /// Also write the inputs, outputs and coefficients as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Output dtype (default: the inputs').
    #[arg(long, value_parser = ["f16", "f32", "bf16"])]
    pub dtype: Option<String>,
    /// Network config, for snapshots without edm2.config metadata.
    #[arg(long)]
    pub config: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let stds: Vec<f64> = a
        .outstd
        .split(',')
        .map(|s| s.trim().parse::<f64>().with_context(|| format!("--outstd: '{s}' is not a number")))
        .collect::<Result<_>>()?;
    if !a.list && a.outdir.is_none() {
        bail!("--outdir is required (or --list to only print the coefficients)");
    }
    if let Some(d) = &a.outdir {
        super::checks::output_dir("outdir", d)?;
    }
    if let Some(j) = &a.json {
        super::checks::output_file("json", j)?;
    }
    let plan = reconstruct::plan(&a.indir, &stds, a.outkimg)?;
    eprintln!(
        "{} snapshots used, reconstructing σ_rel {:?} at kimg {} (nimg {})",
        plan.inputs.len(),
        plan.out_std,
        plan.out_kimg,
        plan.out_nimg
    );
    if let Some(j) = &a.json {
        let doc = serde_json::to_string_pretty(&reconstruct::plan_json(&plan))?;
        edm2::io::write_atomic(j, doc.as_bytes())?;
    }
    if a.list {
        print!("{:<48}", "input \\ output std");
        plan.out_std.iter().for_each(|s| print!(" {s:>10.3}"));
        println!();
        for (s, row) in plan.inputs.iter().zip(&plan.coefs) {
            let name = s.path.file_name().unwrap().to_string_lossy();
            print!("{name:<48}");
            row.iter().for_each(|c| print!(" {c:>10.6}"));
            println!();
        }
        return Ok(());
    }
    let dtype = a.dtype.as_deref().map(|d| match d {
        "f16" => Dtype::F16,
        "bf16" => Dtype::BF16,
        _ => Dtype::F32,
    });
    let cfg = a.config.as_deref().map(NetConfig::resolve).transpose()?;
    let outdir = a.outdir.unwrap();
    let paths = reconstruct::write_outputs(&plan, &outdir, dtype, cfg.as_ref(), &mut |i, n| {
        eprint!("\r  reading snapshots [{i}/{n}]");
        if i == n {
            eprintln!();
        }
    })?;
    for p in paths {
        println!("{}", p.display());
    }
    Ok(())
}
