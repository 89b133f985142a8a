//! Shared helpers for the integration tests: golden fixtures (outputs of the official
//! PyTorch implementation, copied from ../shared/golden into tests/data/golden) and
//! comparison metrics.
#![allow(dead_code)]

use edm2::io::safetensors::{self, StFile};
use edm2::{NetConfig, Params, Precond, Tensor};
use std::path::PathBuf;

/// `tests/data/<rel>`, found where the test runs: `$EDM2_TEST_DATA/<rel>` when set, else
/// `tests/data` under the current directory (a test binary carried to another machine,
/// e.g. a GPU one, runs from a copy of the repository), else the source tree it was
/// compiled from.
pub fn test_data(rel: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("EDM2_TEST_DATA") {
        return PathBuf::from(d).join(rel);
    }
    let here = PathBuf::from("tests/data");
    if here.is_dir() {
        return here.join(rel);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

pub fn golden_path(name: &str) -> PathBuf {
    test_data("golden").join(name)
}

pub fn golden(name: &str) -> StFile {
    safetensors::read(golden_path(name)).unwrap_or_else(|e| panic!("{e}"))
}

pub fn tensor(f: &StFile, name: &str) -> Tensor {
    let t = f.require(name).unwrap_or_else(|e| panic!("{e}"));
    Tensor::from_vec(&t.shape, t.data.clone())
}

/// The cond16 network and its golden weights.
pub fn cond16() -> (Precond, Params) {
    let cfg = NetConfig::from_json_str(&std::fs::read_to_string(golden_path("cond16.config.json")).unwrap()).unwrap();
    let net = Precond::new(&cfg).unwrap();
    let p = Params::from_file(&net.specs, &golden("cond16.weights.safetensors")).unwrap();
    (net, p)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
}

pub fn rms(a: &[f32]) -> f64 {
    (a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / a.len().max(1) as f64).sqrt()
}

/// ‖a − b‖₂ / ‖b‖₂
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Max abs error relative to the reference RMS (the forward tolerance metric).
pub fn err_vs_rms(a: &[f32], b: &[f32]) -> f64 {
    max_abs_diff(a, b) / rms(b).max(1e-30)
}

/// NCHW golden → NHWC (4-D), others unchanged.
pub fn to_nhwc(t: &Tensor) -> Tensor {
    if t.shape.len() == 4 {
        t.nchw_to_nhwc()
    } else {
        t.clone()
    }
}

/// The CUDA device for the GPU tests, or `None` (the test is skipped) on a machine without
/// a GPU unless EDM2_REQUIRE_GPU is set. The simulated device (`cuda-sim`) is always there.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub fn device() -> Option<edm2::backend::gpu::Gpu> {
    match edm2::backend::gpu::Gpu::open(0) {
        Ok(g) => {
            // Outputs start as NaN, so an element a kernel leaves unwritten fails the test.
            g.set_poison(true);
            Some(g)
        }
        Err(e) if std::env::var_os("EDM2_REQUIRE_GPU").is_none() => {
            eprintln!("SKIPPED (no usable GPU: {e})");
            None
        }
        Err(e) => panic!("EDM2_REQUIRE_GPU is set but the GPU cannot be opened: {e}"),
    }
}

/// Runs the `edm2` binary of this build → (success, stdout, stderr).
pub fn edm2_bin(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edm2")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A fresh scratch directory `edm2-<prefix>-<pid>-<name>` under the system's temp dir.
pub fn scratch_dir(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edm2-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tensor of the VAE golden io file (`vae/vae_tiny.io.safetensors`) as (shape, f32):
/// the uint8 ones (pixels, the official uint8 decode) widened, read raw because the
/// library's reader takes float tensors only.
pub fn vae_io(name: &str) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(golden_path("vae/vae_tiny.io.safetensors")).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let t = &h[name];
    let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let off = t["data_offsets"].as_array().unwrap();
    let (a, e) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
    let data = &b[8 + n + a..8 + n + e];
    let v = if t["dtype"] == "U8" { data.iter().map(|&x| x as f32).collect() } else { data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
    (shape, v)
}
