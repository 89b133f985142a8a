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

/// Training states in `dir`, oldest first (by the kimg in the name).
pub fn list_states(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io { path: dir.into(), err: e }),
    };
    let mut out: Vec<(u64, PathBuf)> = Vec::new();
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some(k) = name.strip_prefix("training-state-").and_then(|s| s.strip_suffix(".safetensors")) {
            if let Ok(k) = k.parse::<u64>() {
                out.push((k, ent.path()));
            }
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

impl TrainState {
    pub fn save(&self, specs: &[ParamSpec], dir: &Path) -> Result<PathBuf> {
        let path = dir.join(state_name(self.nimg));
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
        let take = |prefix: &str, s: &ParamSpec| -> Result<Vec<f32>> {
            let name = format!("{prefix}{}", s.name);
            let t = f.require(&name)?;
            if t.shape != s.shape {
                return Err(Error::Shape { path: path.into(), name, expected: s.shape.clone(), found: t.shape.clone() });
            }
            if t.dtype != Dtype::F32 {
                return Err(bad(format!("{name} is {}, training states are F32", t.dtype.name())));
            }
            Ok(t.data.clone())
        };
        let all = |prefix: &str| -> Result<Params> { Ok(Params { values: specs.iter().map(|s| take(prefix, s)).collect::<Result<_>>()? }) };
        let moments = |prefix: &str| -> Result<Params> {
            let values = specs
                .iter()
                .map(|s| if s.kind == ParamKind::Param { take(prefix, s) } else { Ok(vec![0.0; s.numel()]) })
                .collect::<Result<_>>()?;
            Ok(Params { values })
        };
        let params = all("net/")?;
        let mut adam = Adam::new(specs);
        adam.m = moments("optim/exp_avg/")?;
        adam.v = moments("optim/exp_avg_sq/")?;
        adam.t = num("edm2.adam_step")?;
        let mut ema = EmaSet::new(&ema_options, &params)?;
        for (k, e) in ema.averages_mut().into_iter().enumerate() {
            *e = all(&format!("ema/{k}/"))?;
        }
        Ok(TrainState {
            config,
            params,
            adam,
            ema_options,
            ema,
            nimg: num("edm2.nimg")?,
            seed: num("edm2.seed")?,
            dataset: meta("edm2.dataset")?.clone(),
            dataset_len: num("edm2.dataset_len")? as usize,
            elapsed_sec: meta("edm2.elapsed_sec")?.parse().unwrap_or(0.0),
        })
    }
}
