//! File formats: safetensors (weights, inputs and outputs of `denoise`, snapshots).

pub mod safetensors;
