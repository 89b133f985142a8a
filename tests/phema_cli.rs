//! `edm2 phema` end to end on snapshots written here in the DESIGN.md §5 format.

mod common;
use common::*;
use edm2::io::safetensors::{self, Dtype};
use edm2::phema;
use std::collections::BTreeMap;
use std::process::Command;

fn edm2(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edm2")).args(args).output().expect("run edm2");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Writes snapshots of the cond16 net (random weights per snapshot) and returns them.
fn make_snapshots(dir: &std::path::Path) -> Vec<(u64, f64, edm2::Params)> {
    std::fs::create_dir_all(dir).unwrap();
    let (net, _) = cond16();
    let mut out = Vec::new();
    let mut seed = 10;
    let first = net.init_params(seed);
    for kimg in [0u64, 50, 100, 150] {
        for std in [0.05, 0.1] {
            seed += 1;
            let mut p = net.init_params(seed);
            // One run: the fixed buffers (Fourier freqs/phases) are the same in every snapshot.
            for (k, spec) in net.specs.iter().enumerate() {
                if spec.kind == edm2::nn::ParamKind::Buffer {
                    p.values[k] = first.values[k].clone();
                }
            }
            let nimg = phema::kimg_to_nimg(kimg);
            let meta = BTreeMap::from([
                ("edm2.format".to_string(), "net".to_string()),
                ("edm2.config".to_string(), net.config.to_json()),
                ("edm2.nimg".to_string(), nimg.to_string()),
                ("edm2.ema_std".to_string(), format!("{std:.3}")),
            ]);
            let path = dir.join(format!("network-snapshot-{kimg:07}-{std:.3}.safetensors"));
            p.save(&net.specs, &path, &meta, Dtype::F32).unwrap();
            out.push((nimg, std, p));
        }
    }
    std::fs::write(dir.join("training-state-0000150.safetensors"), b"not a snapshot").unwrap();
    std::fs::write(dir.join("log.txt"), b"ignored").unwrap();
    out
}

#[test]
fn reconstructs_weighted_sums_with_official_coefficients() {
    let root = std::env::temp_dir().join(format!("edm2-phema-{}", std::process::id()));
    let indir = root.join("run");
    let snaps = make_snapshots(&indir);
    let outdir = root.join("out");
    let json = root.join("coefs.json");
    let (ok, out, err) = edm2(&[
        "phema", "--indir", indir.to_str().unwrap(), "--outstd", "0.07,0.12", "--outkimg", "100",
        "--outdir", outdir.to_str().unwrap(), "--json", json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("phema-0000100-0.070.safetensors") && out.contains("phema-0000100-0.120.safetensors"), "{out}");
    // Inputs: nimg 0 dropped, later than kimg 100 dropped → kimg 50 and 100, two stds each.
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let inputs = doc["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 4);
    let out_nimg = phema::kimg_to_nimg(100);
    let used: Vec<&(u64, f64, edm2::Params)> = snaps.iter().filter(|s| s.0 > 0 && s.0 <= out_nimg).collect();
    let in_ofs: Vec<f64> = used.iter().map(|s| s.0 as f64).collect();
    let in_std: Vec<f64> = used.iter().map(|s| s.1).collect();
    let coefs = phema::solve_posthoc_coefficients(&in_ofs, &in_std, &[out_nimg as f64; 2], &[0.07, 0.12]).unwrap();
    for (i, inp) in inputs.iter().enumerate() {
        assert_eq!(inp["nimg"].as_u64().unwrap(), used[i].0);
        assert!(std::path::Path::new(inp["file"].as_str().unwrap()).exists());
        for j in 0..2 {
            assert!((doc["coefficients"][i][j].as_f64().unwrap() - coefs[i][j]).abs() < 1e-12);
        }
    }
    let (net, _) = cond16();
    for (j, std) in [0.07, 0.12].iter().enumerate() {
        let loaded = edm2::load_net(outdir.join(format!("phema-0000100-{std:.3}.safetensors")), None).unwrap();
        assert_eq!(loaded.metadata["edm2.nimg"], out_nimg.to_string());
        assert_eq!(loaded.metadata["edm2.ema_std"], format!("{std:.3}"));
        for (k, spec) in net.specs.iter().enumerate() {
            let want: Vec<f32> = if spec.kind == edm2::nn::ParamKind::Buffer {
                used[0].2.values[k].clone() // copied, not averaged
            } else {
                (0..spec.numel()).map(|e| used.iter().enumerate().map(|(i, s)| coefs[i][j] * s.2.values[k][e] as f64).sum::<f64>() as f32).collect()
            };
            let e = max_abs_diff(&loaded.params.values[k], &want);
            assert!(e < 1e-4 * (1.0 + rms(&want)), "{} std {std}: {e}", spec.name);
        }
    }
    // --list prints the matrix and writes nothing.
    let (ok, out, _) = edm2(&["phema", "--indir", indir.to_str().unwrap(), "--outstd", "0.1", "--list"]);
    assert!(ok && out.contains("network-snapshot-0000150-0.100.safetensors"), "{out}");
    // Clear errors.
    for (args, msg) in [
        (vec!["--outstd", "0.3", "--list"], "outside"),
        (vec!["--outstd", "0.1", "--outkimg", "77", "--list"], "no snapshot at kimg 77"),
        (vec!["--outstd", "0.1"], "--outdir is required"),
        (vec!["--outstd", "abc", "--list"], "not a number"),
    ] {
        let mut a = vec!["phema", "--indir", indir.to_str().unwrap()];
        a.extend(args);
        let (ok, _, err) = edm2(&a);
        assert!(!ok && err.contains(msg), "{a:?}: {err}");
    }
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, _, err) = edm2(&["phema", "--indir", empty.to_str().unwrap(), "--outstd", "0.1", "--list"]);
    assert!(!ok && err.contains("no network-snapshot"), "{err}");
    let _ = safetensors::read_header(outdir.join("phema-0000100-0.070.safetensors")).unwrap();
}
