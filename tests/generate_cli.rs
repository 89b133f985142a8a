//! `edm2 generate` end to end: the official sampler runs reproduced from given noise,
//! seeds that give the same image whatever the batch size, PNG output, resumability.

mod common;
use common::*;
use edm2::io::safetensors::{self, Dtype};
use std::collections::BTreeMap;
use std::process::Command;

fn edm2(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edm2")).args(args).output().expect("run edm2");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn root() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("edm2-gen-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn given_noise_reproduces_official_sampler_runs() {
    let f = golden("cond16.sample.safetensors");
    let dir = root();
    let noise_file = dir.join("noise.safetensors");
    let (noise, labels, churn) = (tensor(&f, "noise"), tensor(&f, "class_labels"), tensor(&f, "churn_noise"));
    safetensors::write(
        &noise_file,
        &[("noise", &noise.shape, &noise.data), ("class_labels", &labels.shape, &labels.data), ("churn_noise", &churn.shape, &churn.data)],
        &BTreeMap::new(),
        Dtype::F32,
    )
    .unwrap();
    let (w, g, c) = (golden_path("cond16.weights.safetensors"), golden_path("cond16_gnet.weights.safetensors"), golden_path("cond16.config.json"));
    let cases: [(&str, Vec<&str>); 3] = [
        ("x_g1", vec![]),
        ("x_g17", vec!["--gnet", g.to_str().unwrap(), "--guidance", "1.7"]),
        ("x_churn", vec!["--S_churn", "2", "--S_min", "0.05", "--S_max", "50", "--S_noise", "1.003"]),
    ];
    for (name, extra) in cases {
        let raw = dir.join(format!("{name}.safetensors"));
        let out = dir.join(name);
        let mut args = vec![
            "generate", "--net", w.to_str().unwrap(), "--config", c.to_str().unwrap(), "--noise", noise_file.to_str().unwrap(),
            "--steps", "8", "--batch", "3", "--outdir", out.to_str().unwrap(), "--save-raw", raw.to_str().unwrap(),
        ];
        args.extend(extra);
        let (ok, _, err) = edm2(&args);
        assert!(ok, "{name}: {err}");
        let got = safetensors::read(&raw).unwrap();
        let s = got.require("samples").unwrap();
        assert_eq!(s.shape, vec![4, 3, 16, 16]);
        let e = rel_l2(&s.data, &tensor(&f, name).data);
        assert!(e < 1e-5, "{name}: rel L2 {e:e}");
        for i in 0..4 {
            assert!(out.join(format!("{i:06}.png")).exists(), "{name}: image {i}");
        }
    }
}

#[test]
fn seeds_are_batch_independent_and_outputs_resumable() {
    let dir = root();
    let (w, c) = (golden_path("cond16.weights.safetensors"), golden_path("cond16.config.json"));
    let run = |batch: &str, out: &str, raw: &str| {
        let (o, r) = (dir.join(out), dir.join(raw));
        let (ok, _, err) = edm2(&[
            "generate", "--net", w.to_str().unwrap(), "--config", c.to_str().unwrap(), "--seeds", "5-14,1001",
            "--steps", "4", "--batch", batch, "--outdir", o.to_str().unwrap(), "--subdirs", "--save-raw", r.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        safetensors::read(&r).unwrap().require("samples").unwrap().data.clone()
    };
    let a = run("1", "b1", "b1.safetensors");
    let b = run("7", "b3", "b3.safetensors");
    assert_eq!(a, b, "a seed must give the same image whatever the batch size");
    assert!(dir.join("b1/000000/000005.png").exists() && dir.join("b1/001000/001001.png").exists());
    // Existing images are skipped (no --save-raw/--grid): nothing to do the second time.
    let o = dir.join("b3");
    let (ok, _, err) = edm2(&[
        "generate", "--net", w.to_str().unwrap(), "--config", c.to_str().unwrap(), "--seeds", "5-14,1001", "--steps", "4",
        "--outdir", o.to_str().unwrap(), "--subdirs",
    ]);
    assert!(ok && err.contains("0 images (others exist)") && !err.contains("step 1/"), "{err}");
    let (ok, _, err) = edm2(&[
        "generate", "--net", w.to_str().unwrap(), "--config", c.to_str().unwrap(), "--seeds", "5-14,1001", "--steps", "4",
        "--outdir", o.to_str().unwrap(), "--subdirs", "--grid", dir.join("grid.png").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let png = std::fs::read(dir.join("grid.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // Guidance without a guiding network is an error.
    let (ok, _, err) = edm2(&["generate", "--net", w.to_str().unwrap(), "--config", c.to_str().unwrap(), "--guidance", "2"]);
    assert!(!ok && err.contains("--gnet"), "{err}");
    let (ok, _, err) = edm2(&["generate", "--net", w.to_str().unwrap(), "--config", c.to_str().unwrap(), "--seeds", "9-3"]);
    assert!(!ok && err.contains("seed range"), "{err}");
}

/// With the simulated GPU (feature cuda-sim): `generate --device cuda` guided, its
/// sampler's state on the device (kernels/sampler.cu) with the guide beside the net,
/// against the same command on the CPU (3 steps: a simulated run is slow; measured
/// 6.5e-6 apart).
#[test]
#[cfg(feature = "cuda-sim")]
fn guided_generation_on_the_device_matches_the_cpu() {
    let dir = root();
    let (w, g, c) = (golden_path("cond16.weights.safetensors"), golden_path("cond16_gnet.weights.safetensors"), golden_path("cond16.config.json"));
    let run = |device: &str| {
        let (out, raw) = (dir.join(format!("dev-{device}")), dir.join(format!("dev-{device}.safetensors")));
        let (ok, _, err) = edm2(&[
            "generate", "--net", w.to_str().unwrap(), "--config", c.to_str().unwrap(), "--gnet", g.to_str().unwrap(), "--guidance", "1.7",
            "--seeds", "0-3", "--steps", "3", "--batch", "4", "--outdir", out.to_str().unwrap(), "--save-raw", raw.to_str().unwrap(), "--device", device,
        ]);
        assert!(ok, "{device}: {err}");
        safetensors::read(&raw).unwrap().require("samples").unwrap().data.clone()
    };
    let (cpu, cuda) = (run("cpu"), run("cuda"));
    let e = rel_l2(&cuda, &cpu);
    eprintln!("guided generation on the simulated GPU: rel L2 {e:.2e} against the CPU");
    // fp32 on both; the device's forward sums in another order (tests/gpu_network.rs's
    // sampling bound).
    assert!(e < 1e-4, "rel L2 {e:e}");
}
