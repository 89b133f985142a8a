//! Training-state checkpoints `training-state-{kimg:07}.safetensors` (DESIGN.md §5): all
//! in f32, so that a resumed run continues bit for bit.
//!
//! Tensors: `net/{name}` (every parameter and buffer), `optim/exp_avg/{name}` and
//! `optim/exp_avg_sq/{name}` (Adam moments of the parameters), `ema/{k}/{name}` (the k-th
//! tracked average). Metadata: `edm2.format = training-state`, `edm2.config`, `edm2.nimg`,
//! `edm2.adam_step`, `edm2.ema` (JSON of the EMA options), `edm2.seed`, `edm2.dataset`,
//! `edm2.dataset_len`, `edm2.elapsed_sec`. The data order and every random draw are
//! functions of (seed, nimg) (`data::loader`), so nothing else is needed to resume.

use super::adam::Adam;
use super::ema::{EmaOptions, EmaSet};
use crate::config::NetConfig;
use crate::error::{Error, Result};
use crate::io::safetensors::{self, Dtype};
use crate::nn::params::{ParamKind, ParamSpec, Params};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct TrainState {
    pub config: NetConfig,
    pub params: Params,
    pub adam: Adam,
    pub ema_options: EmaOptions,
    pub ema: EmaSet,
    pub nimg: u64,
    pub seed: u64,
    pub dataset: String,
    pub dataset_len: usize,
    pub elapsed_sec: f64,
}

pub fn state_name(nimg: u64) -> String {
    format!("training-state-{:07}.safetensors", nimg / 1000)
}

/// `training-state-{kimg:07}-{nimg}.safetensors`: the name of a state whose plain name is
/// already taken by a state of another image count (a run interrupted less than 1000
/// images after a periodic checkpoint has the same kimg): no state ever replaces another.
pub fn state_name_exact(nimg: u64) -> String {
    format!("training-state-{:07}-{nimg}.safetensors", nimg / 1000)
}

/// (kimg, exact image count or 0) of a training-state file name; None for other files.
fn parse_state_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("training-state-")?.strip_suffix(".safetensors")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match rest.split_once('-') {
        None if digits(rest) => Some((rest.parse().ok()?, 0)),
        Some((k, n)) if digits(k) && digits(n) => {
            let (k, n): (u64, u64) = (k.parse().ok()?, n.parse().ok()?);
            (n / 1000 == k).then_some((k, n))
        }
        _ => None,
    }
}

/// Training states in `dir`, oldest first: by kimg, and within a kimg the plain name
/// before the exact ones (those are written only when the plain name holds an earlier
/// state, see [`state_name_exact`]).
pub fn list_states(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io { path: dir.into(), err: e }),
    };
    let mut out: Vec<((u64, u64), PathBuf)> = Vec::new();
    for ent in rd.flatten() {
        if let Some(key) = parse_state_name(&ent.file_name().to_string_lossy()) {
            out.push((key, ent.path()));
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// The image count stored in a state file's metadata (None when it cannot be read).
fn stored_nimg(path: &Path) -> Option<u64> {
    safetensors::read_header(path).ok()?.metadata.get("edm2.nimg")?.parse().ok()
}

/// Where a state of `nimg` images goes in `dir`: its plain name, unless a state of
/// another image count (or an unreadable file) has it.
pub fn state_path(dir: &Path, nimg: u64) -> PathBuf {
    let plain = dir.join(state_name(nimg));
    if !plain.exists() || stored_nimg(&plain) == Some(nimg) {
        plain
    } else {
        dir.join(state_name_exact(nimg))
    }
}

/// Keeps a bad file under a new name (`NAME.corrupt`, `NAME.corrupt.1`, …) so that it is
/// never read again as a state and never deleted. Returns the new path.
pub fn set_aside(path: &Path) -> Result<PathBuf> {
    let base = path.as_os_str().to_string_lossy().into_owned();
    let mut k = 0;
    loop {
        let cand = PathBuf::from(if k == 0 { format!("{base}.corrupt") } else { format!("{base}.corrupt.{k}") });
        if !cand.exists() {
            std::fs::rename(path, &cand).map_err(|e| Error::Io { path: path.into(), err: e })?;
            return Ok(cand);
        }
        k += 1;
    }
}

impl TrainState {
    /// Writes the state (atomically) to [`state_path`]: never over a state of another
    /// image count.
    pub fn save(&self, specs: &[ParamSpec], dir: &Path) -> Result<PathBuf> {
        let path = state_path(dir, self.nimg);
        let mut names: Vec<String> = Vec::new();
        let mut refs: Vec<(usize, &[usize], &[f32])> = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            names.push(format!("net/{}", s.name));
            refs.push((names.len() - 1, &s.shape, &self.params.values[i]));
        }
        for (i, s) in specs.iter().enumerate().filter(|(_, s)| s.kind == ParamKind::Param) {
            names.push(format!("optim/exp_avg/{}", s.name));
            refs.push((names.len() - 1, &s.shape, &self.adam.m.values[i]));
            names.push(format!("optim/exp_avg_sq/{}", s.name));
            refs.push((names.len() - 1, &s.shape, &self.adam.v.values[i]));
        }
        for (k, (_, ema)) in self.ema.averages().into_iter().enumerate() {
            for (i, s) in specs.iter().enumerate() {
                names.push(format!("ema/{k}/{}", s.name));
                refs.push((names.len() - 1, &s.shape, &ema.values[i]));
            }
        }
        let list: Vec<(&str, &[usize], &[f32])> = refs.iter().map(|(n, s, v)| (names[*n].as_str(), *s, *v)).collect();
        let mut meta = BTreeMap::new();
        meta.insert("edm2.format".into(), "training-state".into());
        meta.insert("edm2.config".into(), self.config.to_json());
        meta.insert("edm2.nimg".into(), self.nimg.to_string());
        meta.insert("edm2.adam_step".into(), self.adam.t.to_string());
        meta.insert("edm2.ema".into(), serde_json::to_string(&self.ema_options).expect("ema options serialize"));
        meta.insert("edm2.seed".into(), self.seed.to_string());
        meta.insert("edm2.dataset".into(), self.dataset.clone());
        meta.insert("edm2.dataset_len".into(), self.dataset_len.to_string());
        meta.insert("edm2.elapsed_sec".into(), format!("{:.3}", self.elapsed_sec));
        safetensors::write(&path, &list, &meta, Dtype::F32)?;
        Ok(path)
    }

    /// The first tensor holding a NaN or ±inf: the weights, the Adam moments, then the
    /// EMAs, as (name in the state file, flat index).
    pub fn first_nonfinite(&self, specs: &[ParamSpec]) -> Option<(String, usize)> {
        use rayon::prelude::*;
        let find = |v: &[f32]| v.par_iter().position_first(|x| !x.is_finite());
        let mut groups: Vec<(String, &Params)> = vec![("net/".into(), &self.params), ("optim/exp_avg/".into(), &self.adam.m), ("optim/exp_avg_sq/".into(), &self.adam.v)];
        for (k, (_, e)) in self.ema.averages().into_iter().enumerate() {
            groups.push((format!("ema/{k}/"), e));
        }
        for (prefix, p) in groups {
            for (s, v) in specs.iter().zip(&p.values) {
                if let Some(i) = find(v) {
                    return Some((format!("{prefix}{}", s.name), i));
                }
            }
        }
        None
    }

    /// Loads a state written by [`TrainState::save`]; every missing piece is an error
    /// naming the file.
    pub fn load(path: &Path) -> Result<TrainState> {
        let f = safetensors::read(path)?;
        let bad = |m: String| Error::Input(format!("{}: {m}", path.display()));
        let meta = |k: &str| f.metadata.get(k).ok_or_else(|| bad(format!("not a training state (no {k} in its metadata)")));
        if meta("edm2.format")? != "training-state" {
            return Err(bad(format!("edm2.format is '{}', not 'training-state'", meta("edm2.format")?)));
        }
        let num = |k: &str| -> Result<u64> { meta(k)?.parse().map_err(|_| bad(format!("{k} is not an integer"))) };
        let config = NetConfig::from_json_str(meta("edm2.config")?)?;
        let ema_options: EmaOptions = serde_json::from_str(meta("edm2.ema")?).map_err(|e| bad(format!("edm2.ema: {e}")))?;
        let net = crate::nn::Precond::new(&config)?;
        let specs = &net.specs;
        // The tensors the metadata implies, counted before anything is allocated from it
        // (an `edm2.ema` listing millions of averages must not allocate millions of copies).
        let n_emas = match &ema_options {
            EmaOptions::Power { stds } => stds.len(),
            EmaOptions::Traditional { .. } => 1,
        };
        if n_emas == 0 {
            return Err(Error::Malformed { path: path.into(), reason: "edm2.ema lists no averages".into() });
        }
        let n_params = specs.iter().filter(|s| s.kind == ParamKind::Param).count();
        let expected = specs.len() as u128 * (1 + n_emas as u128) + 2 * n_params as u128;
        if f.tensors.len() as u128 != expected {
            return Err(Error::Malformed {
                path: path.into(),
                reason: format!(
                    "{} tensors, but its network and {n_emas} EMA(s) (edm2.config, edm2.ema) make {expected}",
                    f.tensors.len()
                ),
            });
        }
        let (adam_step, nimg, seed) = (num("edm2.adam_step")?, num("edm2.nimg")?, num("edm2.seed")?);
        let dataset = meta("edm2.dataset")?.clone();
        let dataset_len = num("edm2.dataset_len")? as usize;
        let elapsed_sec = meta("edm2.elapsed_sec")?.parse().unwrap_or(0.0);
        // Tensors are moved out of the parsed file, not copied (a resume holds one state).
        let mut tensors: std::collections::HashMap<String, safetensors::StTensor> = f.tensors.into_iter().collect();
        let mut take = |prefix: &str, s: &ParamSpec| -> Result<Vec<f32>> {
            let name = format!("{prefix}{}", s.name);
            let t = tensors.remove(&name).ok_or_else(|| Error::MissingTensor { path: path.into(), name: name.clone() })?;
            if t.shape != s.shape {
                return Err(Error::Shape { path: path.into(), name, expected: s.shape.clone(), found: t.shape });
            }
            if t.dtype != Dtype::F32 {
                return Err(Error::Malformed { path: path.into(), reason: format!("{name} is {}, training states are F32", t.dtype.name()) });
            }
            Ok(t.data)
        };
        let mut all = |prefix: &str| -> Result<Params> { Ok(Params { values: specs.iter().map(|s| take(prefix, s)).collect::<Result<_>>()? }) };
        let params = all("net/")?;
        let mut emas = Vec::with_capacity(n_emas);
        for k in 0..n_emas {
            emas.push(all(&format!("ema/{k}/"))?);
        }
        let mut moments = |prefix: &str| -> Result<Params> {
            let values = specs
                .iter()
                .map(|s| if s.kind == ParamKind::Param { take(prefix, s) } else { Ok(vec![0.0; s.numel()]) })
                .collect::<Result<_>>()?;
            Ok(Params { values })
        };
        let mut adam = Adam::new(specs);
        adam.m = moments("optim/exp_avg/")?;
        adam.v = moments("optim/exp_avg_sq/")?;
        adam.t = adam_step;
        // The EMA set starts from the first average (cheap: a copy of one parameter set),
        // then takes the file's.
        let mut ema = EmaSet::new(&ema_options, &emas[0])?;
        for (e, v) in ema.averages_mut().into_iter().zip(emas) {
            *e = v;
        }
        Ok(TrainState { config, params, adam, ema_options, ema, nimg, seed, dataset, dataset_len, elapsed_sec })
    }
}
