//! Parameters and buffers of a network, in the official `state_dict` order and names.

use crate::error::{Error, Result};
use crate::io::safetensors::{self, Dtype, StFile};
use std::collections::BTreeMap;
use std::path::Path;

pub type ParamId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Trained by the optimizer and counted in the parameter count.
    Param,
    /// Fixed (the Fourier frequencies and phases): copied, never averaged or trained.
    Buffer,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    /// True for MP-Conv / MP-Linear weights: the tensors forced weight normalization
    /// overwrites in training mode.
    pub is_mp_weight: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Collects specs while the module tree is built.
#[derive(Default, Debug, Clone)]
pub struct Registry {
    pub specs: Vec<ParamSpec>,
}

impl Registry {
    pub fn add(&mut self, name: String, shape: Vec<usize>, kind: ParamKind, is_mp_weight: bool) -> ParamId {
        self.specs.push(ParamSpec { name, shape, kind, is_mp_weight });
        self.specs.len() - 1
    }
}

/// Values for every spec (parameters and buffers), indexed by [`ParamId`]. Gradients use
/// the same type (buffers' entries stay zero).
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub values: Vec<Vec<f32>>,
}

impl Params {
    pub fn zeros(specs: &[ParamSpec]) -> Self {
        Params { values: specs.iter().map(|s| vec![0.0; s.numel()]).collect() }
    }

    pub fn scalar(&self, id: ParamId) -> f32 {
        self.values[id][0]
    }

    /// Loads every spec from a safetensors file: a missing or extra tensor, or a wrong
    /// shape, is an error naming the tensor and the file. f32/f16/bf16 are accepted.
    pub fn from_file(specs: &[ParamSpec], file: &StFile) -> Result<Self> {
        let mut values = Vec::with_capacity(specs.len());
        for s in specs {
            let t = file.require(&s.name)?;
            if t.shape != s.shape {
                return Err(Error::Shape {
                    path: file.path.clone(),
                    name: s.name.clone(),
                    expected: s.shape.clone(),
                    found: t.shape.clone(),
                });
            }
            if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                return Err(Error::Input(format!(
                    "{}: tensor '{}' holds a non-finite value ({}) at flat index {i}",
                    file.path.display(),
                    s.name,
                    t.data[i]
                )));
            }
            values.push(t.data.clone());
        }
        for (name, _) in &file.tensors {
            if !specs.iter().any(|s| &s.name == name) {
                return Err(Error::ExtraTensor { path: file.path.clone(), name: name.clone() });
            }
        }
        Ok(Params { values })
    }

    /// Writes all specs in order with the given metadata (atomic).
    pub fn save(&self, specs: &[ParamSpec], path: &Path, metadata: &BTreeMap<String, String>, dtype: Dtype) -> Result<()> {
        let list: Vec<(&str, &[usize], &[f32])> =
            specs.iter().zip(&self.values).map(|(s, v)| (s.name.as_str(), s.shape.as_slice(), v.as_slice())).collect();
        safetensors::write(path, &list, metadata, dtype)
    }
}
