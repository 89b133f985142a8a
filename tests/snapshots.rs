//! Training-run files: image counts with binary suffixes, and EMA snapshots written by a
//! short run of the real pieces (forced weight normalization, loss, backward, Adam with
//! the official schedule, power-function EMA) that `edm2 phema` then reconstructs from.

mod common;
use common::*;
use edm2::io::safetensors::Dtype;
use edm2::train::{adam::Adam, ema::PowerEma, loss::edm2_loss, schedule::learning_rate, snapshot};
use edm2::{Mode, Tensor};
use std::collections::BTreeMap;

#[test]
fn image_counts() {
    assert_eq!(snapshot::parse_nimg("8Mi").unwrap(), 8 << 20);
    assert_eq!(snapshot::parse_nimg("2048Mi").unwrap(), 2048 << 20);
    assert_eq!(snapshot::parse_nimg("3Gi").unwrap(), 3 << 30);
    assert_eq!(snapshot::parse_nimg("64Ki").unwrap(), 65536);
    assert_eq!(snapshot::parse_nimg("1000").unwrap(), 1000);
    for bad in ["", "8M", "1.5Mi", "-3", "Mi", "99999999999999999999Gi"] {
        let e = snapshot::parse_nimg(bad).unwrap_err().to_string();
        assert!(e.contains("image count"), "{bad}: {e}");
    }
    assert_eq!(snapshot::snapshot_name(8 << 20, 0.05), "network-snapshot-0008388-0.050.safetensors");
}

#[test]
fn short_run_snapshots_feed_phema() {
    let (net, mut p) = cond16();
    let dir = std::env::temp_dir().join(format!("edm2-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = golden("cond16.grad.safetensors");
    let images = tensor(&f, "images").nchw_to_nhwc();
    let labels = tensor(&f, "class_labels");
    let n = images.shape[0] as u64;
    let mut adam = Adam::new(&net.specs);
    let mut ema = PowerEma::new(&[0.05, 0.1], &p).unwrap();
    let mut rng = edm2::rng::Rng::new(9);
    let mut nimg = 0u64;
    let mut written = Vec::new();
    for step in 0..6 {
        let sigma: Vec<f32> = (0..n).map(|_| (rng.normal() * 1.0 - 0.4).exp() as f32).collect();
        let noise: Vec<f32> = images.data.iter().enumerate().map(|(i, v)| v + sigma[i / (images.numel() / n as usize)] * rng.normal() as f32).collect();
        let x = Tensor::from_vec(&images.shape, noise);
        net.force_normalize(&mut p);
        let mode = Mode::train(step);
        let out = net.forward(&p, &x, &sigma, Some(&labels), &mode, false);
        let l = edm2_loss(&out.d, &out.logvar, &images, &sigma, 0.5);
        let mut g = net.backward(&p, out.cache.unwrap(), &l.dd, &l.dlogvar, &mode);
        Adam::sanitize(&mut g);
        adam.step(&net.specs, &mut p, &g, learning_rate(nimg as f64, n as f64, 0.01, 100.0, 0.0));
        nimg += n * 500; // pretend each step is a large batch, so snapshots land on distinct kimg
        ema.update(&net.specs, &p, nimg, n * 500);
        if step % 2 == 1 {
            for (k, std) in [0.05, 0.1].iter().enumerate() {
                let path = snapshot::write_snapshot(&dir, &net.specs, &ema.emas[k], &net.config, nimg, Some(*std), Dtype::F16, &BTreeMap::new()).unwrap();
                written.push(path);
            }
        }
    }
    assert_eq!(written.len(), 6);
    let loaded = edm2::load_net(&written[5], None).unwrap();
    assert_eq!(loaded.metadata["edm2.nimg"], nimg.to_string());
    assert_eq!(loaded.metadata["edm2.ema_std"], "0.100");
    // f16 storage of the EMA (the default snapshot dtype).
    let e = rel_l2(&loaded.params.values[5], &ema.emas[1].values[5]);
    assert!(e < 1e-3, "f16 snapshot rel err {e}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edm2"))
        .args(["phema", "--indir", dir.to_str().unwrap(), "--outstd", "0.07", "--outdir", dir.join("phema").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec = edm2::load_net(dir.join("phema").join(format!("phema-{:07}-0.070.safetensors", nimg / 1000)), None).unwrap();
    assert_eq!(rec.metadata["edm2.nimg"], nimg.to_string());
    // Written in the inputs' dtype (f16).
    let h = edm2::io::safetensors::read_header(dir.join("phema").join(format!("phema-{:07}-0.070.safetensors", nimg / 1000))).unwrap();
    assert!(h.tensors.iter().all(|t| t.1.dtype == Dtype::F16));
}
