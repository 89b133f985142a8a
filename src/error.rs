//! Typed errors of the library. The program edge wraps them in `anyhow`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // `err` (not `source`): the message already includes it, so error chains do not
    // print it twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: tensor '{name}' is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: unexpected tensor '{name}' (not a parameter or buffer of this network; wrong --config?)")]
    ExtraTensor { path: PathBuf, name: String },
    #[error("{path}: tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tensor '{name}' has dtype {dtype}; supported: F32, F16, BF16")]
    Dtype { path: PathBuf, name: String, dtype: String },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("{0}")]
    DeviceUnavailable(String),
    /// A CUDA driver call or kernel launch failed (names the operation or kernel).
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A training run that cannot go on: its directory is in use, it has no valid state
    /// to resume from, it does not fit in memory, or it diverged (the message says which).
    #[error("{0}")]
    Run(String),
    /// Bad training data: the message names the dataset and, where one is at fault, the file.
    #[error("dataset: {0}")]
    Data(String),
}

pub type Result<T> = std::result::Result<T, Error>;
