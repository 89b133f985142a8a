//! The CPU backend: fp32, NHWC, rayon threads, GEMMs on the `gemm` crate. It is the
//! reference every other backend is checked against, so every op here is exact fp32
//! arithmetic with deterministic reduction order.

pub mod attention;
pub mod bf16;
mod backend;
pub use backend::Cpu;
pub mod conv;
pub mod conv3x3;
pub mod gemm;
pub mod gemm16;
pub mod microkernel;
#[macro_use]
pub mod simd;
pub mod ops;
pub mod vae_ops;
