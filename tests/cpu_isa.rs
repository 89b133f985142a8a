//! The CPU kernel paths (`EDM2_CPU_ISA=avx512|avx2|portable`): the AVX-512 tiles do the
//! same products in the same order per output element as the AVX2 ones, so a training
//! run (forward, both conv gradients, 1x1 GEMMs, Adam, EMA) gives the same bits on both;
//! and the path that ran is reported.

use edm2::backend::cpu::simd::{best_isa, CpuIsa};
use edm2::io::safetensors;
use std::path::Path;
use std::process::Command;

fn train(dir: &Path, isa: &str) -> Vec<(String, Vec<u32>)> {
    let cfg = dir.join("net.json");
    // Widths 16 and 48: one-panel and two-panel AVX-512 tiles; 32x32 and 16x16 rows.
    std::fs::write(
        &cfg,
        r#"{"img_resolution": 32, "img_channels": 1, "label_dim": 10, "model_channels": 16, "channel_mult": [1, 3],
            "num_blocks": 1, "attn_resolutions": [16], "channels_per_head": 16, "dropout": 0.0, "use_fp16": false}"#,
    )
    .unwrap();
    let out = dir.join(format!("run-{isa}"));
    let o = Command::new(env!("CARGO_BIN_EXE_edm2"))
        .env("EDM2_CPU_ISA", isa)
        .args(["--threads", "2", "train", cfg.to_str().unwrap(), "--outdir", out.to_str().unwrap(), "--max-size", "64"])
        .args(["--batch", "16", "--duration", "64", "--status", "0", "--snapshot", "0", "--checkpoint", "0", "--preview", "0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = safetensors::read(out.join("training-state-0000000.safetensors")).unwrap();
    f.tensors.into_iter().map(|(n, t)| (n, t.data.iter().map(|v| v.to_bits()).collect())).collect()
}

#[test]
fn avx512_and_avx2_paths_give_the_same_bits() {
    if best_isa() != CpuIsa::Avx512 {
        eprintln!("skipped: this CPU has no AVX-512 (the AVX2 path is tested by every other test here)");
        return;
    }
    let d = std::env::temp_dir().join(format!("edm2-isa-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let (a, b) = (train(&d, "avx2"), train(&d, "avx512"));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs between the AVX2 and AVX-512 paths");
    }
}

#[test]
fn the_path_that_ran_is_reported() {
    let o = Command::new(env!("CARGO_BIN_EXE_edm2")).env("EDM2_CPU_ISA", "portable").args(["info", "--config", "cpu-xs16"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("(portable kernels;"), "{out}");
    let o = Command::new(env!("CARGO_BIN_EXE_edm2")).args(["bench", "--config", "cpu-xs16", "--batch", "2", "--iters", "1", "--json"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["cpu_isa"], best_isa().name(), "{out}");
    if best_isa() != CpuIsa::Portable {
        assert!(v["fma_peak_gflops"].as_f64().unwrap() > v["gflops_per_s_train"].as_f64().unwrap(), "{out}");
    }
}
