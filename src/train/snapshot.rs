//! Files a training run writes (DESIGN.md §5): EMA snapshots
//! `network-snapshot-{kimg:07}-{σ_rel:.3f}.safetensors` with the `edm2.*` metadata, and
//! image counts with the official binary suffixes.

use crate::config::NetConfig;
use crate::error::{Error, Result};
use crate::io::safetensors::Dtype;
use crate::nn::{Params, ParamSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Parses an image count: a plain integer or one with the official binary suffixes
/// `Ki` (2^10), `Mi` (2^20), `Gi` (2^30) — e.g. `8Mi` = 8388608.
pub fn parse_nimg(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("Ki") {
        (n, 1u64 << 10)
    } else if let Some(n) = t.strip_suffix("Mi") {
        (n, 1 << 20)
    } else if let Some(n) = t.strip_suffix("Gi") {
        (n, 1 << 30)
    } else {
        (t, 1)
    };
    let v: u64 = num
        .parse()
        .map_err(|_| Error::Input(format!("'{s}' is not an image count (an integer, optionally with Ki, Mi or Gi)")))?;
    v.checked_mul(mult).ok_or_else(|| Error::Input(format!("image count '{s}' is too large")))
}

/// `network-snapshot-{kimg:07}-{std:.3f}.safetensors`, kimg = nimg // 1000.
pub fn snapshot_name(nimg: u64, std: f64) -> String {
    format!("network-snapshot-{:07}-{std:.3}.safetensors", nimg / 1000)
}

/// `network-snapshot-{kimg:07}.safetensors`: the official name of a traditional-EMA
/// snapshot (no σ_rel suffix).
pub fn snapshot_name_traditional(nimg: u64) -> String {
    format!("network-snapshot-{:07}.safetensors", nimg / 1000)
}

/// Writes one EMA snapshot atomically (temporary file + rename), f16 by default in the
/// training loop, with `edm2.format=net`, `edm2.config`, the exact `edm2.nimg` and
/// `edm2.ema_std`. Returns its path.
pub fn write_snapshot(
    dir: &Path,
    specs: &[ParamSpec],
    ema: &Params,
    config: &NetConfig,
    nimg: u64,
    std: Option<f64>,
    dtype: Dtype,
    extra: &BTreeMap<String, String>,
) -> Result<PathBuf> {
    let path = dir.join(match std {
        Some(s) => snapshot_name(nimg, s),
        None => snapshot_name_traditional(nimg),
    });
    let mut meta = extra.clone();
    meta.insert("edm2.format".into(), "net".into());
    meta.insert("edm2.config".into(), config.to_json());
    meta.insert("edm2.nimg".into(), nimg.to_string());
    if let Some(s) = std {
        meta.insert("edm2.ema_std".into(), format!("{s:.3}"));
    }
    ema.save(specs, &path, &meta, dtype)?;
    Ok(path)
}
