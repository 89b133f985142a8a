//! Post-hoc EMA reconstruction from a directory of snapshots (DESIGN.md §2, §5): scan
//! `network-snapshot-<kimg>-<σ>.safetensors`, solve the coefficients at the output time,
//! and build each output net as a weighted sum of the inputs, streaming over them (memory:
//! one input plus the outputs being built). Buffers are copied, not averaged.

use super::{kimg_to_nimg, solve_posthoc_coefficients, std_to_exp};
use crate::config::NetConfig;
use crate::error::{Error, Result};
use crate::io::safetensors::{self, Dtype};
use crate::nn::{ParamKind, Params, Precond};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One input snapshot.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub path: PathBuf,
    pub kimg: u64,
    /// Exact images seen (metadata `edm2.nimg`, else recovered from the kimg).
    pub nimg: u64,
    pub std: f64,
    pub dtype: Dtype,
    pub config: Option<String>,
}

/// Parses `network-snapshot-0001234-0.050.safetensors` → (kimg, σ).
pub fn parse_snapshot_name(name: &str) -> Option<(u64, f64)> {
    let rest = name.strip_prefix("network-snapshot-")?.strip_suffix(".safetensors")?;
    let (kimg, std) = rest.split_once('-')?;
    if kimg.is_empty() || !kimg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((kimg.parse().ok()?, std.parse().ok()?))
}

/// All snapshots in `dir` (other files are ignored), sorted by (nimg, σ).
pub fn scan(dir: &Path) -> Result<Vec<Snapshot>> {
    let io = |e| Error::Io { path: dir.into(), err: e };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((kimg, name_std)) = parse_snapshot_name(&name) else { continue };
        let h = safetensors::read_header(entry.path())?;
        let nimg = match h.metadata.get("edm2.nimg") {
            Some(v) => v.parse().map_err(|_| Error::Input(format!("{}: edm2.nimg '{v}' is not an integer", entry.path().display())))?,
            None => kimg_to_nimg(kimg),
        };
        let std = match h.metadata.get("edm2.ema_std") {
            Some(v) => v.parse().map_err(|_| Error::Input(format!("{}: edm2.ema_std '{v}' is not a number", entry.path().display())))?,
            None => name_std,
        };
        let dtype = h.tensors.first().map(|t| t.1.dtype).unwrap_or(Dtype::F32);
        out.push(Snapshot { path: entry.path(), kimg, nimg, std, dtype, config: h.metadata.get("edm2.config").cloned() });
    }
    out.sort_by(|a, b| (a.nimg, a.std).partial_cmp(&(b.nimg, b.std)).unwrap());
    Ok(out)
}

/// The reconstruction plan: inputs used (row order), outputs, coefficients[input][output].
#[derive(Clone, Debug)]
pub struct Plan {
    pub inputs: Vec<Snapshot>,
    pub out_kimg: u64,
    pub out_nimg: u64,
    pub out_std: Vec<f64>,
    pub coefs: Vec<Vec<f64>>,
}

/// Plans the reconstruction of `out_std` at `out_kimg` (default: the latest snapshot).
pub fn plan(dir: &Path, out_std: &[f64], out_kimg: Option<u64>) -> Result<Plan> {
    if out_std.is_empty() {
        return Err(Error::Input("no output EMA std given".into()));
    }
    for &s in out_std {
        std_to_exp(s)?;
    }
    let all = scan(dir)?;
    if all.is_empty() {
        return Err(Error::Input(format!("{}: no network-snapshot-<kimg>-<std>.safetensors files", dir.display())));
    }
    let out_kimg = out_kimg.unwrap_or_else(|| all.iter().map(|s| s.kimg).max().unwrap());
    let out_nimg = match all.iter().find(|s| s.kimg == out_kimg) {
        Some(s) => s.nimg,
        None => {
            let mut kimgs: Vec<u64> = all.iter().map(|s| s.kimg).collect();
            kimgs.dedup();
            return Err(Error::Input(format!("no snapshot at kimg {out_kimg}; the snapshots have kimg {kimgs:?}")));
        }
    };
    let inputs: Vec<Snapshot> = all.into_iter().filter(|s| s.nimg > 0 && s.nimg <= out_nimg).collect();
    if inputs.is_empty() {
        return Err(Error::Input(format!("no snapshot with 0 < nimg <= {out_nimg}")));
    }
    if let Some(first) = inputs.iter().find_map(|s| s.config.as_ref()) {
        let c0 = NetConfig::from_json_str(first)?;
        for s in &inputs {
            if let Some(c) = &s.config {
                if NetConfig::from_json_str(c)? != c0 {
                    return Err(Error::Input(format!(
                        "{} has a different network config from {}: snapshots of different runs?",
                        s.path.display(),
                        inputs[0].path.display()
                    )));
                }
            }
        }
    }
    let in_ofs: Vec<f64> = inputs.iter().map(|s| s.nimg as f64).collect();
    let in_std: Vec<f64> = inputs.iter().map(|s| s.std).collect();
    let coefs = solve_posthoc_coefficients(&in_ofs, &in_std, &vec![out_nimg as f64; out_std.len()], out_std)?;
    Ok(Plan { inputs, out_kimg, out_nimg, out_std: out_std.to_vec(), coefs })
}

/// Output file name: `phema-{kimg:07}-{σ:.3f}.safetensors`.
pub fn output_name(kimg: u64, std: f64) -> String {
    format!("phema-{kimg:07}-{std:.3}.safetensors")
}

/// Builds and writes every output of `plan` into `outdir` (atomic writes). `dtype`: the
/// inputs' dtype unless given. `progress(i, n)` is called per input. Returns the paths.
pub fn write_outputs(plan: &Plan, outdir: &Path, dtype: Option<Dtype>, config: Option<&NetConfig>, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<PathBuf>> {
    let cfg = match (config, plan.inputs.iter().find_map(|s| s.config.as_ref())) {
        (Some(c), _) => c.clone(),
        (None, Some(c)) => NetConfig::from_json_str(c)?,
        (None, None) => return Err(Error::Config("the snapshots have no edm2.config metadata; pass --config".into())),
    };
    let net = Precond::new(&cfg)?;
    let m = plan.out_std.len();
    let mut outs: Vec<Params> = vec![Params::zeros(&net.specs); m];
    for (i, s) in plan.inputs.iter().enumerate() {
        progress(i, plan.inputs.len());
        let f = safetensors::read(&s.path)?;
        let p = Params::from_file(&net.specs, &f)?;
        for (j, out) in outs.iter_mut().enumerate() {
            let c = plan.coefs[i][j] as f32;
            for ((o, v), spec) in out.values.iter_mut().zip(&p.values).zip(&net.specs) {
                if spec.kind == ParamKind::Buffer {
                    o.copy_from_slice(v);
                } else {
                    o.iter_mut().zip(v).for_each(|(a, b)| *a += c * b);
                }
            }
        }
    }
    progress(plan.inputs.len(), plan.inputs.len());
    std::fs::create_dir_all(outdir).map_err(|e| Error::Io { path: outdir.into(), err: e })?;
    let dtype = dtype.unwrap_or(plan.inputs[0].dtype);
    let mut paths = Vec::new();
    for (j, out) in outs.iter().enumerate() {
        let path = outdir.join(output_name(plan.out_kimg, plan.out_std[j]));
        let meta = BTreeMap::from([
            ("edm2.format".to_string(), "net".to_string()),
            ("edm2.config".to_string(), cfg.to_json()),
            ("edm2.nimg".to_string(), plan.out_nimg.to_string()),
            ("edm2.ema_std".to_string(), format!("{:.3}", plan.out_std[j])),
        ]);
        out.save(&net.specs, &path, &meta, dtype)?;
        paths.push(path);
    }
    Ok(paths)
}

/// The `--json` document: inputs (row order), outputs, coefficients[input][output].
pub fn plan_json(plan: &Plan) -> serde_json::Value {
    serde_json::json!({
        "inputs": plan.inputs.iter().map(|s| serde_json::json!({"file": s.path.to_string_lossy(), "nimg": s.nimg, "std": s.std})).collect::<Vec<_>>(),
        "outputs": plan.out_std.iter().map(|&s| serde_json::json!({"nimg": plan.out_nimg, "std": s})).collect::<Vec<_>>(),
        "coefficients": plan.coefs,
    })
}
