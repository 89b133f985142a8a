//! The `edm2` program end to end: info, denoise on the golden fixture, clear errors.

mod common;
use common::*;
use edm2::io::safetensors::{self, Dtype};
use std::collections::BTreeMap;
use std::process::Command;

fn edm2(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edm2")).args(args).output().expect("run edm2");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("edm2-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn info_reports_params_and_gmac() {
    let (ok, out, err) = edm2(&["info", "--config", "edm2-img512-xs"]);
    assert!(ok, "{err}");
    assert!(out.contains("parameters: 124,713,253"), "{out}");
    assert!(out.contains("forward GMAC per image: 45.75"), "{out}");
    assert!(out.contains("unet.dec.8x8_in0") && out.contains("attention 8 heads"), "{out}");
    let cfg = golden_path("cond16.config.json");
    let (ok, out, _) = edm2(&["info", "--config", cfg.to_str().unwrap()]);
    assert!(ok && out.contains("parameters: 723,579"), "{out}");
    let (ok, _, err) = edm2(&["info", "--config", "edm2-img512-nope"]);
    assert!(!ok && err.contains("presets"), "{err}");
}

#[test]
fn denoise_matches_official_forward() {
    let f = golden("cond16.forward.safetensors");
    let input = tmp("in.safetensors");
    let x = tensor(&f, "x");
    let sigma = tensor(&f, "sigma");
    let labels = tensor(&f, "class_labels");
    // An extra tensor in the input is ignored.
    safetensors::write(
        &input,
        &[("x", &x.shape, &x.data), ("sigma", &sigma.shape, &sigma.data), ("class_labels", &labels.shape, &labels.data), ("note", &[1], &[0.0])],
        &BTreeMap::new(),
        Dtype::F32,
    )
    .unwrap();
    let out = tmp("out.safetensors");
    let weights = golden_path("cond16.weights.safetensors");
    let cfg = golden_path("cond16.config.json");
    let (ok, _, err) = edm2(&[
        "denoise", "--net", weights.to_str().unwrap(), "--config", cfg.to_str().unwrap(),
        "--input", input.to_str().unwrap(), "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let o = safetensors::read(&out).unwrap();
    let d = o.require("D").unwrap();
    assert_eq!(d.shape, vec![4, 3, 16, 16]);
    let e = err_vs_rms(&d.data, &tensor(&f, "D").data);
    assert!(e <= 1e-4, "D {e:e}");
    let lv = o.require("logvar").unwrap();
    assert_eq!(lv.shape, vec![4]);
    assert!(err_vs_rms(&lv.data, &tensor(&f, "logvar").data) <= 1e-4);

    // Without labels: the official zero-label behaviour.
    let input2 = tmp("in2.safetensors");
    safetensors::write(&input2, &[("x", &x.shape, &x.data), ("sigma", &sigma.shape, &sigma.data)], &BTreeMap::new(), Dtype::F32).unwrap();
    let (ok, _, err) = edm2(&[
        "denoise", "--net", weights.to_str().unwrap(), "--config", cfg.to_str().unwrap(),
        "--input", input2.to_str().unwrap(), "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let o = safetensors::read(&out).unwrap();
    assert!(err_vs_rms(&o.require("D").unwrap().data, &tensor(&f, "D_nolabel").data) <= 1e-4);
}

#[test]
fn denoise_errors_are_clear() {
    let weights = golden_path("cond16.weights.safetensors");
    let cfg = golden_path("cond16.config.json");
    let (w, c) = (weights.to_str().unwrap(), cfg.to_str().unwrap());
    let out = tmp("never.safetensors");
    let bad = tmp("bad.safetensors");
    let x = vec![0.5f32; 2 * 3 * 8 * 8];
    safetensors::write(&bad, &[("x", &[2, 3, 8, 8], &x), ("sigma", &[2], &[1.0, 2.0])], &BTreeMap::new(), Dtype::F32).unwrap();
    let (ok, _, err) = edm2(&["denoise", "--net", w, "--config", c, "--input", bad.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!ok && err.contains("[N, 3, 16, 16]") && !err.contains("panicked"), "{err}");
    assert!(!out.exists(), "no output on error");

    let x = vec![0.5f32; 2 * 3 * 16 * 16];
    safetensors::write(&bad, &[("x", &[2, 3, 16, 16], &x), ("sigma", &[3], &[1.0, 2.0, 3.0])], &BTreeMap::new(), Dtype::F32).unwrap();
    let (ok, _, err) = edm2(&["denoise", "--net", w, "--config", c, "--input", bad.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!ok && err.contains("sigma has 3 entries"), "{err}");

    safetensors::write(&bad, &[("x", &[2, 3, 16, 16], &x), ("sigma", &[2], &[1.0, -2.0])], &BTreeMap::new(), Dtype::F32).unwrap();
    let (ok, _, err) = edm2(&["denoise", "--net", w, "--config", c, "--input", bad.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!ok && err.contains("sigma[1]"), "{err}");

    let l = vec![0.0f32; 2 * 7];
    safetensors::write(&bad, &[("x", &[2, 3, 16, 16], &x), ("sigma", &[2], &[1.0, 2.0]), ("class_labels", &[2, 7], &l)], &BTreeMap::new(), Dtype::F32).unwrap();
    let (ok, _, err) = edm2(&["denoise", "--net", w, "--config", c, "--input", bad.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!ok && err.contains("class_labels"), "{err}");

    safetensors::write(&bad, &[("sigma", &[2], &[1.0, 2.0])], &BTreeMap::new(), Dtype::F32).unwrap();
    let (ok, _, err) = edm2(&["denoise", "--net", w, "--config", c, "--input", bad.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!ok && err.contains("'x' is missing") && err.contains("bad.safetensors"), "{err}");

    // A net file without metadata needs --config.
    let (ok, _, err) = edm2(&["denoise", "--net", w, "--input", bad.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!ok && err.contains("--config"), "{err}");

    // --device cuda: the CPU build says it has no CUDA backend; a CUDA build without a GPU
    // says the backend is unavailable; with a GPU (or the simulated one) the bad input
    // file is the error. Each names the way out or the file.
    let (ok, _, err) = edm2(&["denoise", "--net", w, "--config", c, "--input", bad.to_str().unwrap(), "--output", out.to_str().unwrap(), "--device", "cuda"]);
    let clear = if cfg!(any(feature = "cuda", feature = "cuda-sim")) {
        (err.contains("is unavailable") && err.contains("--device cpu")) || (err.contains("'x' is missing") && err.contains("bad.safetensors"))
    } else {
        err.contains("without the CUDA backend") && err.contains("--device cpu")
    };
    assert!(!ok && clear, "{err}");
}

#[test]
fn bench_json_summary() {
    let (ok, out, err) = edm2(&["bench", "--config", "cpu-xs16", "--batch", "2", "--iters", "1", "--json"]);
    assert!(ok, "{err}");
    let last = out.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    for k in ["train_step_ms", "forward_ms", "images_per_s_train", "images_per_s_forward", "gflops_per_s_train"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k} in {last}");
    }
    let ips = v["images_per_s_train"].as_f64().unwrap();
    assert!((ips - 2.0 / (v["train_step_ms"].as_f64().unwrap() / 1e3)).abs() < 1e-6 * ips);
}

/// `bench --vs-cublas` compares GPU kernels with cuBLAS: on the CPU it is refused with a
/// message that says what it needs, before any work.
#[test]
fn bench_vs_cublas_needs_the_gpu() {
    let (ok, _, err) = edm2(&["bench", "--device", "cpu", "--config", "cpu-xs16", "--batch", "2", "--iters", "1", "--vs-cublas"]);
    assert!(!ok && err.contains("--vs-cublas") && err.contains("--device cuda"), "{err}");
}
