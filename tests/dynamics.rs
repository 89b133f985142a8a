//! The training-dynamics measurements (`train::dynamics`): the recorded magnitudes equal
//! ones computed directly from a forward pass and from the weights, forced-normalized
//! weights measure 1, update sizes are what was applied, the numbers repeat, and `train`
//! / `edm2 dynamics` write them.

mod common;
use common::cond16;
use edm2::nn::layers::Mode;
use edm2::train::dynamics::{measure, Probe, SIGMA_BUCKETS};
use std::path::{Path, PathBuf};

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

#[test]
fn measurements_equal_direct_computation_and_repeat() {
    let (net, mut p) = cond16();
    let probe = Probe::synthetic(&net, 16, 3);
    assert_eq!(probe.sigma[..8], SIGMA_BUCKETS);
    let d = measure(&net, &p, &probe, None);
    // Activations: the RMS of each block output of the same eval forward.
    let out = net.forward(&p, &probe.x, &probe.sigma, probe.labels.as_ref(), &Mode::eval(), true);
    let blocks: Vec<_> = out.intermediates.iter().filter(|(n, _)| n.starts_with("act.")).collect();
    assert_eq!(d.activations.len(), blocks.len());
    assert!(d.activations.len() >= 4);
    for ((name, v), (full, t)) in d.activations.iter().zip(&blocks) {
        assert_eq!(format!("act.{name}"), *full);
        assert_eq!(*v, rms(&t.data), "{name}");
    }
    // Residual branches: one per block with a residual branch, and for the first encoder
    // block (no resampling, no conv_skip, no attention) the mp_sum undone by hand:
    // out = wa·normalize(in) + wb·branch (paper Eq. 88 with res_balance t).
    assert!(d.branches.len() >= 6 && d.branches.iter().all(|(n, _)| d.activations.iter().any(|(a, _)| a == n)));
    let inter = |n: &str| &out.intermediates.iter().find(|(m, _)| m == n).unwrap_or_else(|| panic!("{n}")).1;
    let (xin, xout) = (inter("act.enc.16x16_conv"), inter("act.enc.16x16_block0"));
    let c = *xin.shape.last().unwrap();
    let mut xm = vec![0.0; xin.data.len()];
    edm2::backend::cpu::ops::normalize_rows(&xin.data, c, &mut xm);
    let (wa, wb) = edm2::backend::cpu::ops::mp_sum_coefs(net.config.res_balance);
    let branch: Vec<f32> = xout.data.iter().zip(&xm).map(|(&o, &m)| (o - wa * m) / wb).collect();
    let got = d.branches.iter().find(|(n, _)| n == "enc.16x16_block0").unwrap().1;
    assert!((got - rms(&branch)).abs() < 1e-5 * got, "branch RMS {got} vs {}", rms(&branch));
    // Weights: every magnitude-preserving weight, its RMS.
    let mp: Vec<_> = net.specs.iter().enumerate().filter(|(_, s)| s.is_mp_weight).collect();
    assert_eq!(d.weights.len(), mp.len());
    for (w, (id, s)) in d.weights.iter().zip(&mp) {
        assert_eq!(w.name, s.name);
        assert_eq!(w.rms, rms(&p.values[*id]));
        assert!(w.rel_update.is_none());
    }
    // Loss by σ: one per bucket, λ(σ)·mse of D against the clean probe.
    assert_eq!(d.loss_by_sigma.len(), 8);
    let per = probe.y.data.len() / 16;
    let (s, l) = d.loss_by_sigma[4];
    assert_eq!(s, 1.0);
    let sd = net.config.sigma_data as f64;
    let lambda = (1.0 + sd * sd) / (sd * sd);
    let mse = |i: usize| {
        out.d.data[i * per..(i + 1) * per].iter().zip(&probe.y.data[i * per..(i + 1) * per]).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>()
            / per as f64
    };
    assert!((l - lambda * (mse(4) + mse(12)) / 2.0).abs() < 1e-12 * l.abs().max(1.0));
    // Deterministic.
    assert_eq!(measure(&net, &p, &probe, None), d);
    // Forced-normalized weights measure 1; an update of 1% measures 0.01.
    net.force_normalize(&mut p);
    let prev = p.clone();
    let d = measure(&net, &p, &probe, None);
    for w in &d.weights {
        assert!((w.rms - 1.0).abs() < 1e-3, "{}: {}", w.name, w.rms);
    }
    for (id, _) in &mp {
        p.values[*id].iter_mut().for_each(|v| *v *= 1.01);
    }
    let d = measure(&net, &p, &probe, Some(&prev));
    for w in &d.weights {
        assert!((w.rel_update.unwrap() - 0.01).abs() < 1e-6, "{}: {:?}", w.name, w.rel_update);
    }
    let rec = d.to_json(1.5);
    assert_eq!(rec["kimg"], 1.5);
    assert_eq!(rec["loss_by_sigma"].as_array().unwrap().len(), 8);
    assert!(rec["rel_update"].as_object().unwrap().len() == mp.len());
}

fn edm2(args: &[&str]) -> (bool, String, String) {
    common::edm2_bin(args)
}

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("dyn", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_records_dynamics_at_each_status_line_and_the_command_reads_networks() {
    let d = tmp("train");
    let cfg = d.join("tiny.json");
    std::fs::write(&cfg, r#"{"img_resolution": 32, "img_channels": 1, "label_dim": 10, "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [16], "channels_per_head": 8, "use_fp16": false}"#).unwrap();
    let run = d.join("run");
    let (ok, o, e) = edm2(&["train", s(&cfg), "--outdir", s(&run), "--batch", "16", "--duration", "64", "--status", "16", "--dynamics", "8"]);
    assert!(ok, "{o}\n{e}");
    let status = o.lines().filter(|l| l.starts_with("Status:")).count();
    assert!(status >= 4 && o.contains(" dynamics "), "{o}");
    let text = std::fs::read_to_string(run.join("dynamics.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), status, "one record per status line");
    assert!(recs[0].get("rel_update").is_none() && recs[1]["rel_update"].as_object().unwrap().len() > 4);
    let kimg: Vec<f64> = recs.iter().map(|r| r["kimg"].as_f64().unwrap()).collect();
    assert!(kimg.windows(2).all(|w| w[0] < w[1]), "{kimg:?}");
    // Figures: train refreshed them at its snapshot; `edm2 plot` redraws them.
    for name in ["loss", "activations", "branches", "weights", "updates", "loss_by_sigma"] {
        let p = run.join("plots").join(format!("{name}.png"));
        let r = png::Decoder::new(std::fs::File::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).read_info().unwrap();
        assert_eq!((r.info().width, r.info().height), (1200, 800), "{name}");
    }
    let figs = d.join("figs");
    let (ok, o, e) = edm2(&["plot", s(&run), "--out", s(&figs)]);
    assert!(ok && o.lines().count() == 6 && figs.join("branches.png").exists(), "{o}\n{e}");
    let (ok, _, e) = edm2(&["plot", s(&d)]);
    assert!(!ok && e.contains("no stats.jsonl or dynamics.jsonl"), "{e}");
    // Off on request.
    let run2 = d.join("off");
    let (ok, o, e) = edm2(&["train", s(&cfg), "--outdir", s(&run2), "--batch", "16", "--duration", "32", "--status", "16", "--dynamics", "0"]);
    assert!(ok && !o.contains(" dynamics "), "{o}\n{e}");
    assert!(!run2.join("dynamics.jsonl").exists());
    // `edm2 dynamics` on a snapshot: the same numbers as the library on its weights.
    let snap = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("network-snapshot-"))
        .expect("a snapshot");
    let (ok, o, e) = edm2(&["dynamics", "--net", s(&snap), "--json", "--probe", "8", "--seed", "5"]);
    assert!(ok, "{o}\n{e}");
    let rec: serde_json::Value = serde_json::from_str(o.trim()).unwrap();
    let net = edm2::load_net(&snap, None).unwrap();
    let want = measure(&net.net, &net.params, &Probe::synthetic(&net.net, 8, 5), None).to_json(rec["kimg"].as_f64().unwrap());
    assert_eq!(rec, want);
    // A training state works too, and the table form names the blocks.
    let state = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("training-state-"))
        .expect("a training state");
    let (ok, o, e) = edm2(&["dynamics", "--net", s(&state), "--data", "builtin", "--probe", "8"]);
    assert!(ok && o.contains("enc.32x32_block0") && o.contains("branch") && o.contains("σ = 1"), "{o}\n{e}");
}
