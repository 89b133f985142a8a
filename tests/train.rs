//! `edm2 train` end to end: exact resume, learning on the built-in data, datasets (folder,
//! zip, latents) and every bad-data error, CLI validation, snapshots/states/keep, Ctrl-C.

mod common;
use common::*;
use edm2::data::loader::{epoch_order, make_batch, StreamOptions};
use edm2::data::{DataOptions, Dataset, LATENT_RAW_MEAN, LATENT_RAW_STD};
use edm2::io::safetensors::{self, Dtype};
use edm2::train::ema::TraditionalEma;
use edm2::{Mode, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

fn edm2(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edm2")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edm2-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny net with every layer kind the loop must handle: attention, dropout, labels.
fn tiny_config(dir: &Path, channels: usize, dropout: f32) -> String {
    let p = dir.join("tiny.json");
    std::fs::write(
        &p,
        format!(
            r#"{{"img_resolution": 32, "img_channels": 1, "label_dim": 10, "model_channels": {channels}, "channel_mult": [1, 2],
               "num_blocks": 1, "attn_resolutions": [16], "channels_per_head": {channels}, "dropout": {dropout}, "use_fp16": false}}"#
        ),
    )
    .unwrap();
    p.to_str().unwrap().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn exact_resume_is_bit_identical() {
    let d = tmp("resume");
    let cfg = tiny_config(&d, 8, 0.1);
    let (a, b) = (d.join("straight"), d.join("sliced"));
    let common = [
        "--max-size", "300", "--batch", "16", "--batch-gpu", "8", "--duration", "2048", "--status", "512", "--snapshot", "1024",
        "--checkpoint", "0", "--preview", "0", "--seed", "5", "--lr", "0.02", "--rampup", "500", "--decay", "20", "--xflip",
    ];
    let run = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["train", cfg.as_str(), "--outdir", s(dir)];
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        let (ok, out, err) = edm2(&args);
        assert!(ok, "{out}\n{err}");
        out
    };
    run(&a, &[]);
    let first = run(&b, &["--slice", "1024"]);
    assert!(first.contains("Slice done"), "{first}");
    assert!(b.join("training-state-0000001.safetensors").exists());
    let second = run(&b, &["--slice", "1024"]);
    assert!(second.contains("Resuming from") && second.contains("Training finished at 2 kimg"), "{second}");
    let fa = safetensors::read(a.join("training-state-0000002.safetensors")).unwrap();
    let fb = safetensors::read(b.join("training-state-0000002.safetensors")).unwrap();
    assert_eq!(fa.tensors.len(), fb.tensors.len());
    let mut nets = 0;
    for ((na, ta), (nb, tb)) in fa.tensors.iter().zip(&fb.tensors) {
        assert_eq!(na, nb);
        let same = ta.data.iter().zip(&tb.data).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{na} differs after resume (max diff {})", max_abs_diff(&ta.data, &tb.data));
        nets += na.starts_with("ema/") as usize;
    }
    assert!(nets > 0, "the state holds the EMAs");
    for k in ["edm2.nimg", "edm2.adam_step", "edm2.config", "edm2.ema"] {
        assert_eq!(fa.metadata[k], fb.metadata[k], "{k}");
    }
    assert_eq!(fa.metadata["edm2.nimg"], "2048");
    assert_eq!(fa.metadata["edm2.adam_step"], "128");
    // The snapshot written by the resumed invocation equals the straight run's.
    let sa = std::fs::read(a.join("network-snapshot-0000002-0.100.safetensors")).unwrap();
    let sb = std::fs::read(b.join("network-snapshot-0000002-0.100.safetensors")).unwrap();
    assert!(sa == sb, "snapshots differ");
    // A resumed run keeps appending to the run's stats.
    let lines = std::fs::read_to_string(b.join("stats.jsonl")).unwrap().lines().count();
    assert_eq!(lines, 5, "status at 0, 512, 1024 (first invocation), 1536, 2048 (second)");
    // A different network in the same run directory is refused.
    let (ok, _, err) = edm2(&["train", cfg.as_str(), "--outdir", s(&b), "--channels", "16", "--duration", "4096", "--batch", "16"]);
    assert!(!ok && err.contains("different network"), "{err}");
}

#[test]
fn gradient_accumulation_matches_the_full_batch() {
    let d = tmp("accum");
    let cfg = tiny_config(&d, 8, 0.0);
    let run = |dir: &str, bg: &str| {
        let out = d.join(dir);
        let (ok, o, e) = edm2(&[
            "train", cfg.as_str(), "--outdir", s(&out), "--max-size", "64", "--batch", "16", "--batch-gpu", bg, "--duration", "32",
            "--status", "0", "--snapshot", "0", "--preview", "0", "--rampup", "0", "--lr", "0.001", "--ls", "4",
        ]);
        assert!(ok, "{o}\n{e}");
        let f = safetensors::read(out.join("training-state-0000000.safetensors")).unwrap();
        let v = |n: &str| f.require(n).unwrap().data.clone();
        (v("optim/exp_avg/unet.enc.16x16_block0.conv_res0.weight"), v("optim/exp_avg/logvar_linear.weight"), v("optim/exp_avg/unet.out_gain"))
    };
    let (full_a, full_b, full_c) = run("full", "16");
    let (acc_a, acc_b, acc_c) = run("acc", "4");
    // Two steps (at init the output gain is 0, so the first step's gradient reaches only
    // the gain and the logvar branch; Adam moves each by ±lr, the same in both runs):
    // Adam's first moment is then 0.09·g₁ + 0.1·g₂, so this compares gradients.
    assert!(rel_l2(&acc_c, &full_c) < 1e-5, "{}", rel_l2(&acc_c, &full_c));
    assert!(rel_l2(&acc_a, &full_a) < 1e-5, "{}", rel_l2(&acc_a, &full_a));
    assert!(rel_l2(&acc_b, &full_b) < 1e-5, "{}", rel_l2(&acc_b, &full_b));
    assert!(rms(&full_a) > 0.0);
}

/// λ(σ)·‖D − y‖² per element (no logvar term), averaged over held-out images.
fn weighted_error(net: &edm2::LoadedNet, images: &Tensor, labels: &Tensor, sigma: f32) -> f64 {
    let n = images.shape[0];
    let mut rng = edm2::rng::Rng::new(77);
    let noisy: Vec<f32> = images.data.iter().map(|y| y + sigma * rng.normal() as f32).collect();
    let x = Tensor::from_vec(&images.shape, noisy);
    let out = net.net.forward(&net.params, &x, &vec![sigma; n], Some(labels), &Mode::eval(), false);
    let w = edm2::train::loss::loss_weight(sigma, 0.5) as f64;
    out.d.data.iter().zip(&images.data).map(|(d, y)| w * ((d - y) as f64).powi(2)).sum::<f64>() / images.numel() as f64
}

#[test]
fn learns_on_the_builtin_data() {
    let d = tmp("learn");
    let cfg = tiny_config(&d, 16, 0.0);
    let out = d.join("run");
    let (ok, o, e) = edm2(&[
        "train", cfg.as_str(), "--outdir", s(&out), "--max-size", "2000", "--batch", "32", "--duration", "4096", "--status", "1024",
        "--snapshot", "4096", "--checkpoint", "0", "--preview", "0", "--lr", "0.01", "--rampup", "500", "--decay", "0",
        "--ema-std", "0.05",
    ]);
    assert!(ok, "{o}\n{e}");
    // Held out: items 9000.. of the built-in split (training used the first 2000).
    let ds = Dataset::open(None, &DataOptions::default()).unwrap();
    let n = 64;
    let mut px = Vec::new();
    let mut labels = Tensor::zeros(&[n, 10]);
    for i in 0..n {
        px.extend(ds.encoded(9000 + i, 0).unwrap());
        labels.data[i * 10 + ds.label(9000 + i).unwrap() as usize] = 1.0;
    }
    let images = Tensor::from_vec(&[n, 32, 32, 1], px);
    let untrained = edm2::load_net(out.join("network-snapshot-0000000-0.050.safetensors"), None).unwrap();
    let trained = edm2::load_net(out.join("network-snapshot-0000004-0.050.safetensors"), None).unwrap();
    for sigma in [0.2f32, 1.0, 5.0] {
        let (e0, e1) = (weighted_error(&untrained, &images, &labels, sigma), weighted_error(&trained, &images, &labels, sigma));
        eprintln!("σ {sigma}: untrained {e0:.4}, trained {e1:.4} ({:.0}% lower)", 100.0 * (1.0 - e1 / e0));
        assert!(e1 <= 0.8 * e0, "σ {sigma}: trained error {e1} is not 20% below the untrained {e0}");
    }
}

fn write_png(path: &Path, w: u32, h: u32, color: png::ColorType, seed: u8) {
    let c = match color {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        _ => unreachable!(),
    };
    let px: Vec<u8> = (0..w * h * c).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, w, h);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(&px).unwrap();
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, buf).unwrap();
}

/// The official dataset tool's layout: 00000/img00000000.png … with dataset.json labels.
fn image_folder(dir: &Path, n: usize, side: u32, classes: usize) {
    let mut labels = Vec::new();
    for i in 0..n {
        let name = format!("00000/img{i:08}.png");
        write_png(&dir.join(&name), side, side, png::ColorType::Rgb, i as u8);
        labels.push(serde_json::json!([name, i % classes]));
    }
    std::fs::write(dir.join("dataset.json"), serde_json::json!({ "labels": labels }).to_string()).unwrap();
}

fn zip_folder(dir: &Path, zip_path: &Path) {
    let f = std::fs::File::create(zip_path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let mut files = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            for e2 in std::fs::read_dir(&p).unwrap() {
                files.push(e2.unwrap().path());
            }
        } else {
            files.push(p);
        }
    }
    files.sort();
    for p in files {
        let rel = p.strip_prefix(dir).unwrap().to_string_lossy().replace('\\', "/");
        z.start_file(rel, zip::write::SimpleFileOptions::default()).unwrap();
        std::io::Write::write_all(&mut z, &std::fs::read(&p).unwrap()).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn folder_zip_and_latent_datasets() {
    let d = tmp("datasets");
    let folder = d.join("imgs");
    image_folder(&folder, 6, 16, 3);
    let zip = d.join("imgs.zip");
    zip_folder(&folder, &zip);
    let a = Dataset::open(Some(s(&folder)), &DataOptions::default()).unwrap();
    let b = Dataset::open(Some(s(&zip)), &DataOptions { xflip: true, max_size: None, ..Default::default() }).unwrap();
    assert_eq!((a.len(), a.resolution, a.raw_channels, a.label_dim()), (6, 16, 3, 3));
    assert_eq!((b.len(), b.raw_len()), (12, 6));
    a.verify(&|_, _| {}).unwrap();
    b.verify(&|_, _| {}).unwrap();
    for i in 0..6 {
        let (x, y) = (a.encoded(i, 0).unwrap(), b.encoded(i, 0).unwrap());
        assert_eq!(x, y, "zip and folder agree");
        assert_eq!(a.label(i), Some((i % 3) as u32));
        // Mirrored copy: pixel (y, x) of item i+6 is pixel (y, 15−x) of item i.
        let f = b.encoded(i + 6, 0).unwrap();
        for (yy, xx, c) in [(0, 0, 0), (3, 5, 2), (15, 15, 1)] {
            assert_eq!(f[(yy * 16 + xx) * 3 + c], x[(yy * 16 + 15 - xx) * 3 + c]);
        }
    }
    // Pixels: x/127.5 − 1, HWC (first pixel of item 0, channel 1 = byte 1 of the file).
    assert_eq!(a.encoded(0, 0).unwrap()[1], 31.0 / 127.5 - 1.0);

    // Training on the zip: conditional by default, label_dim from the labels.
    let cfg = d.join("small.json");
    std::fs::write(&cfg, r#"{"img_resolution": 16, "img_channels": 3, "label_dim": 0, "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "use_fp16": false}"#).unwrap();
    let out = d.join("run");
    let (ok, o, e) = edm2(&["train", s(&cfg), "--data", s(&zip), "--outdir", s(&out), "--batch", "4", "--duration", "8", "--xflip"]);
    assert!(ok, "{o}\n{e}");
    let opts: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("training_options.json")).unwrap()).unwrap();
    assert_eq!(opts["cond"], true);
    assert_eq!(opts["net"]["label_dim"], 3);
    assert_eq!(opts["net"]["img_resolution"], 16);
    let snap = edm2::load_net(out.join("network-snapshot-0000000-0.100.safetensors"), None).unwrap();
    assert_eq!(snap.net.config.label_dim, 3);
    assert!(out.join("preview-0000000.png").exists());
    assert!(o.contains("edm2 generate --net"), "{o}");
    // Unconditional on request.
    let (ok, o, e) = edm2(&["train", s(&cfg), "--data", s(&zip), "--outdir", s(&d.join("u")), "--batch", "4", "--duration", "4", "--cond=false", "-n"]);
    assert!(ok && o.contains("\"cond\": false"), "{o}\n{e}");

    // Latents: [8, H, W] = mean ‖ std; with std 0 the item is mean·scale + bias exactly.
    let lat = d.join("latents");
    std::fs::create_dir_all(&lat).unwrap();
    for i in 0..4 {
        let mut v = vec![0.0f32; 8 * 8 * 8];
        for (k, x) in v.iter_mut().enumerate().take(4 * 64) {
            *x = (k as f32 * 0.37 + i as f32).sin() * 3.0;
        }
        if i > 0 {
            v[4 * 64..].iter_mut().for_each(|x| *x = 0.5);
        }
        edm2::io::npy::write(&lat.join(format!("img-mean-std-{i:08}.npy")), &v, &[8, 8, 8]).unwrap();
    }
    let ds = Dataset::open(Some(s(&lat)), &DataOptions::default()).unwrap();
    assert_eq!((ds.net_channels(), ds.resolution, ds.labels.is_some()), (4, 8, false));
    let x0 = ds.encoded(0, 1).unwrap();
    for (k, ch) in [(0usize, 0usize), (9, 1), (63, 3)] {
        // HWC index k*4+ch ↔ CHW (ch, k).
        let mean = (((ch * 64 + k) as f32) * 0.37).sin() * 3.0;
        let scale = 0.5 / LATENT_RAW_STD[ch];
        assert!((x0[k * 4 + ch] - (mean * scale - LATENT_RAW_MEAN[ch] * scale)).abs() < 1e-6);
    }
    // With std > 0 the noise is drawn per use (seeded), so items differ between draws.
    assert_ne!(ds.encoded(1, 1).unwrap(), ds.encoded(1, 2).unwrap());
    let cfg4 = d.join("lat.json");
    std::fs::write(&cfg4, r#"{"img_resolution": 8, "img_channels": 4, "label_dim": 0, "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "use_fp16": false}"#).unwrap();
    let (ok, o, e) = edm2(&["train", s(&cfg4), "--data", s(&lat), "--outdir", s(&d.join("latrun")), "--batch", "2", "--duration", "4"]);
    assert!(ok, "{o}\n{e}");
    let snap = edm2::load_net(d.join("latrun").join("network-snapshot-0000000-0.050.safetensors"), None).unwrap();
    assert_eq!(snap.net.config.img_channels, 4);
}

#[test]
fn bad_data_is_a_clear_error_before_training() {
    let d = tmp("bad");
    let case = |name: &str, setup: &dyn Fn(&Path), extra: &[&str], expect: &[&str]| {
        let dir = d.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        setup(&dir);
        let out = d.join(format!("{name}-run"));
        let mut args = vec!["train", "--data", s(&dir), "--outdir", s(&out), "--preset", "cpu-xs16"];
        args.extend_from_slice(extra);
        let (ok, o, e) = edm2(&args);
        assert!(!ok, "{name}: should fail\n{o}");
        for x in expect {
            assert!(e.contains(x), "{name}: '{x}' not in: {e}");
        }
        assert!(!e.contains("panicked"), "{name}: {e}");
        assert!(!out.join("training-state-0000000.safetensors").exists() && !out.join("network-snapshot-0000000-0.050.safetensors").exists());
    };
    let png_bytes = |w, h| {
        let p = d.join("tmp.png");
        write_png(&p, w, h, png::ColorType::Rgb, 1);
        std::fs::read(p).unwrap()
    };
    case("empty", &|_| {}, &[], &["no images"]);
    case("corrupt", &|p| {
        write_png(&p.join("a.png"), 16, 16, png::ColorType::Rgb, 0);
        let mut b = png_bytes(16, 16);
        for x in b[40..].iter_mut() {
            *x ^= 0x5A;
        }
        std::fs::write(p.join("b.png"), b).unwrap();
    }, &[], &["b.png", "PNG"]);
    case("truncated", &|p| {
        write_png(&p.join("a.png"), 16, 16, png::ColorType::Rgb, 0);
        let b = png_bytes(16, 16);
        std::fs::write(p.join("b.png"), &b[..b.len() / 2]).unwrap();
    }, &[], &["b.png", "truncated"]);
    case("not-an-image", &|p| {
        write_png(&p.join("a.png"), 16, 16, png::ColorType::Rgb, 0);
        std::fs::write(p.join("b.jpg"), b"hello").unwrap();
    }, &[], &["b.jpg", "not a PNG"]);
    case("mixed-sizes", &|p| {
        write_png(&p.join("a.png"), 16, 16, png::ColorType::Rgb, 0);
        write_png(&p.join("b.png"), 32, 32, png::ColorType::Rgb, 0);
    }, &[], &["b.png", "same size"]);
    case("mixed-channels", &|p| {
        write_png(&p.join("a.png"), 16, 16, png::ColorType::Rgb, 0);
        write_png(&p.join("b.png"), 16, 16, png::ColorType::Grayscale, 0);
    }, &[], &["b.png", "channels"]);
    case("non-square", &|p| write_png(&p.join("a.png"), 16, 8, png::ColorType::Rgb, 0), &[], &["a.png", "not square"]);
    case("rgba", &|p| write_png(&p.join("a.png"), 16, 16, png::ColorType::Rgba, 0), &[], &["a.png", "RGBA"]);
    case("missing-label", &|p| {
        image_folder(p, 3, 16, 2);
        write_png(&p.join("00000/img00000009.png"), 16, 16, png::ColorType::Rgb, 0);
    }, &[], &["img00000009.png", "no label"]);
    case("extra-label", &|p| {
        image_folder(p, 3, 16, 2);
        std::fs::remove_file(p.join("00000/img00000001.png")).unwrap();
    }, &[], &["img00000001.png", "not an image file"]);
    case("duplicate-label", &|p| {
        image_folder(p, 2, 16, 2);
        let l = serde_json::json!({"labels": [["00000/img00000000.png", 0], ["00000/img00000001.png", 1], ["00000/img00000001.png", 0]]});
        std::fs::write(p.join("dataset.json"), l.to_string()).unwrap();
    }, &[], &["img00000001.png", "more than once"]);
    case("huge-label", &|p| {
        image_folder(p, 1, 16, 1);
        std::fs::write(p.join("dataset.json"), "{\"labels\": [[\"00000/img00000000.png\", 4000000000]]}").unwrap();
    }, &[], &["dataset.json", "4000000000"]);
    case("bad-json", &|p| {
        image_folder(p, 2, 16, 2);
        std::fs::write(p.join("dataset.json"), "{\"labels\": [[\"00000/img00000000.png\", \"cat\"]]}").unwrap();
    }, &[], &["dataset.json", "labels[0]"]);
    case("indivisible", &|p| write_png(&p.join("a.png"), 15, 15, png::ColorType::Rgb, 0), &[], &["15", "divisible"]);
    case("cond-unlabelled", &|p| write_png(&p.join("a.png"), 16, 16, png::ColorType::Rgb, 0), &["--cond"], &["--cond", "no labels"]);
    // A zip that is not one.
    let z = d.join("bad.zip");
    std::fs::write(&z, b"PK\x03\x04 not really").unwrap();
    let (ok, _, e) = edm2(&["train", "--data", s(&z), "--outdir", s(&d.join("z")), "-n"]);
    assert!(!ok && e.contains("bad.zip") && e.contains("zip"), "{e}");
    let (ok, _, e) = edm2(&["train", "--data", s(&d.join("nope")), "-n"]);
    assert!(!ok && e.contains("nope") && e.contains("no such"), "{e}");
}

#[test]
fn cli_validates_counts_and_rounds_preset_defaults() {
    let d = tmp("cli");
    let out = d.join("run");
    let bad = |args: &[&str], expect: &str| {
        let mut a = vec!["train", "--outdir", s(&out), "-n"];
        a.extend_from_slice(args);
        let (ok, _, e) = edm2(&a);
        assert!(!ok && e.contains(expect), "{args:?}: '{expect}' not in: {e}");
    };
    bad(&["--batch", "100", "--snapshot", "1000"], "--snapshot 1000 = 1000 images is not a multiple of 1024");
    bad(&["--batch", "100", "--snapshot", "1Ki"], "not a multiple of the batch (100)");
    bad(&["--batch", "64", "--snapshot", "3Ki", "--checkpoint", "1600"], "--checkpoint 1600");
    bad(&["--batch", "64", "--duration", "1000"], "--duration 1000");
    bad(&["--batch", "64", "--slice", "100"], "--slice 100");
    bad(&["--batch", "64", "--batch-gpu", "24"], "--batch-gpu 24");
    bad(&["--duration", "8Mb"], "image count");
    bad(&["--lr=-1"], "--lr -1 must be positive");
    bad(&["--lr", "0"], "--lr 0 must be positive");
    bad(&["--ema-std", "0.5"], "--ema-std 0.5");
    bad(&["--ema-std", "0.05,0.0501"], "0.050 twice");
    bad(&["--rampup", "1.5"], "image count");
    bad(&["--preset", "nope"], "unknown preset");
    bad(&["--dropout", "1.5"], "--dropout");
    bad(&["--cond=maybe"], "not a boolean");
    bad(&["--device", "cuda"], "CUDA");
    // Preset defaults are rounded to the user's batch: 8Mi snapshots → multiple of lcm(100, 1024).
    let (ok, o, e) = edm2(&["train", "--preset", "edm2-img64-s", "--batch", "100", "--outdir", s(&out), "-n"]);
    assert!(ok, "{e}");
    let json: serde_json::Value = serde_json::from_str(&o[o.find('{').unwrap()..=o.rfind('}').unwrap()]).unwrap();
    assert_eq!(json["snapshot"].as_u64().unwrap() % 25600, 0);
    assert_eq!(json["checkpoint"].as_u64().unwrap() % 25600, 0);
    assert_eq!(json["duration"].as_u64().unwrap() % 100, 0);
    assert_eq!(json["status"].as_u64().unwrap() % 100, 0);
    assert_eq!((json["lr"].as_f64().unwrap(), json["decay"].as_f64().unwrap(), json["rampup_mimg"].as_f64().unwrap()), (0.01, 35000.0, 10.0));
    assert_eq!((json["P_mean"].as_f64().unwrap(), json["P_std"].as_f64().unwrap()), (-0.8, 1.6));
    assert_eq!(json["net"]["model_channels"], 192);
    assert_eq!(json["net"]["img_channels"], 1, "from the dataset");
    assert!(!out.exists(), "a dry run writes nothing");
    // The default: cpu-fmnist on the built-in data, run directory named after both.
    let (ok, o, _) = edm2(&["train", "-n", "--P_mean", "-1.2", "--rampup", "1Mi"]);
    assert!(ok && o.starts_with("Run directory: training-runs/cpu-fmnist-fmnist10k"), "{o}");
    assert!(o.contains("\"P_mean\": -1.2") && o.contains("\"rampup_mimg\": 1.048576"), "{o}");
    // The preset's duration ends on a snapshot.
    let json: serde_json::Value = serde_json::from_str(&o[o.find('{').unwrap()..=o.rfind('}').unwrap()]).unwrap();
    assert_eq!(json["duration"].as_u64().unwrap() % json["snapshot"].as_u64().unwrap(), 0);
}

#[test]
fn snapshots_states_keep_and_previews() {
    let d = tmp("files");
    let cfg = tiny_config(&d, 8, 0.0);
    let out = d.join("run");
    let (ok, o, e) = edm2(&[
        "train", cfg.as_str(), "--outdir", s(&out), "--max-size", "100", "--batch", "32", "--duration", "3Ki", "--status", "1Ki",
        "--snapshot", "1Ki", "--checkpoint", "1Ki", "--keep", "2", "--snapshot-dtype", "f32", "--preview", "4", "--preview-steps", "3",
        "--ema-std", "0.05,0.1,0.2",
    ]);
    assert!(ok, "{o}\n{e}");
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let expected_snaps: Vec<String> = [0u64, 1024, 2048, 3072]
        .iter()
        .flat_map(|n| ["0.050", "0.100", "0.200"].map(|s| format!("network-snapshot-{:07}-{s}.safetensors", n / 1000)))
        .collect();
    for n in &expected_snaps {
        assert!(names.contains(n), "{n} missing: {names:?}");
    }
    let states: Vec<&String> = names.iter().filter(|n| n.starts_with("training-state-")).collect();
    assert_eq!(states, ["training-state-0000002.safetensors", "training-state-0000003.safetensors"], "--keep 2");
    for p in ["preview-0000001.png", "preview-0000002.png", "preview-0000003.png", "stats.jsonl", "log.txt", "training_options.json"] {
        assert!(names.iter().any(|n| n == p), "{p} missing");
    }
    assert!(!names.iter().any(|n| n.contains(".tmp")), "no temporary files left: {names:?}");
    let h = safetensors::read_header(out.join("network-snapshot-0000003-0.200.safetensors")).unwrap();
    assert_eq!(h.metadata["edm2.nimg"], "3072");
    assert_eq!(h.metadata["edm2.ema_std"], "0.200");
    assert_eq!(h.metadata["edm2.format"], "net");
    assert!(h.metadata["edm2.dataset"].contains("Fashion-MNIST"));
    assert!(h.tensors.iter().all(|t| t.1.dtype == Dtype::F32));
    let stats: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("stats.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(stats.len(), 4);
    assert_eq!(stats[3]["Progress/kimg"], 3.072);
    assert!(stats[3]["Loss/loss"].as_f64().unwrap().is_finite());
    assert!(stats[3]["Timing/sec_per_kimg"].as_f64().unwrap() > 0.0);
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert_eq!(log.matches("Status: kimg").count(), 4, "{log}");
    // The 0.100 EMA at 3072 equals the training state's second EMA (f32 snapshots).
    let st = safetensors::read(out.join("training-state-0000003.safetensors")).unwrap();
    let snap = safetensors::read(out.join("network-snapshot-0000003-0.100.safetensors")).unwrap();
    let name = "unet.enc.32x32_block0.conv_res0.weight";
    assert_eq!(st.require(&format!("ema/1/{name}")).unwrap().data, snap.require(name).unwrap().data);
    // Running the finished run again does nothing.
    let (ok, o, _) = edm2(&["train", cfg.as_str(), "--outdir", s(&out), "--max-size", "100", "--batch", "32", "--duration", "3Ki", "--ema-std", "0.05,0.1,0.2"]);
    assert!(ok && o.contains("Nothing to train"), "{o}");
    // The snapshots feed post-hoc EMA.
    let (ok, o, e) = edm2(&["phema", "--indir", s(&out), "--outstd", "0.15", "--outdir", s(&d.join("ph"))]);
    assert!(ok, "{o}\n{e}");
    assert!(d.join("ph/phema-0000003-0.150.safetensors").exists());
}

#[test]
fn traditional_ema_option() {
    let e = TraditionalEma { halflife_mimg: 0.5, rampup_ratio: Some(0.09), ema: edm2::Params { values: vec![] } };
    // Ramp-up: half-life = min(500000, 1000·0.09) = 90 images.
    assert!((e.beta(1000, 10) - 0.5f64.powf(10.0 / 90.0)).abs() < 1e-15);
    assert!((e.beta(100_000_000, 10) - 0.5f64.powf(10.0 / 500_000.0)).abs() < 1e-15);
    let d = tmp("trad");
    let cfg = tiny_config(&d, 8, 0.0);
    let out = d.join("run");
    let (ok, o, e) = edm2(&["train", cfg.as_str(), "--outdir", s(&out), "--max-size", "64", "--batch", "16", "--duration", "32", "--ema-halflife", "0.001"]);
    assert!(ok, "{o}\n{e}");
    assert!(out.join("network-snapshot-0000000.safetensors").exists());
    let h = safetensors::read_header(out.join("network-snapshot-0000000.safetensors")).unwrap();
    assert!(!h.metadata.contains_key("edm2.ema_std"));
}

#[test]
fn data_order_and_noise_are_functions_of_seed_and_image_index() {
    let ds = Dataset::open(None, &DataOptions { xflip: false, max_size: Some(50), ..Default::default() }).unwrap();
    let o = |batch| StreamOptions { seed: 3, batch, label_dim: 10, p_mean: -0.4, p_std: 1.0 };
    let mut order = epoch_order(50, 3, 0);
    assert_ne!(order, (0..50).collect::<Vec<u32>>(), "shuffled");
    order.sort();
    assert_eq!(order, (0..50).collect::<Vec<u32>>(), "a permutation");
    assert_ne!(epoch_order(50, 3, 0), epoch_order(50, 3, 1), "a new order each epoch");
    // Passes of 8 at 40 and 48 (crossing the epoch boundary at 50) = one pass of 16 at 40.
    let whole = make_batch(&ds, &o(16), 40, &mut None).unwrap();
    let a = make_batch(&ds, &o(8), 40, &mut None).unwrap();
    let b = make_batch(&ds, &o(8), 48, &mut None).unwrap();
    let per = 32 * 32;
    assert_eq!(&whole.noisy.data[..8 * per], &a.noisy.data[..]);
    assert_eq!(&whole.noisy.data[8 * per..], &b.noisy.data[..]);
    assert_eq!(&whole.sigma[8..], &b.sigma[..]);
    assert_eq!(&whole.labels.as_ref().unwrap().data[80..], &b.labels.as_ref().unwrap().data[..]);
    // σ ~ exp(N(P_mean, P_std²)): check the log-moments over many draws.
    let big = make_batch(&ds, &o(2000), 0, &mut None).unwrap();
    let logs: Vec<f64> = big.sigma.iter().map(|s| (*s as f64).ln()).collect();
    let m = logs.iter().sum::<f64>() / 2000.0;
    let sd = (logs.iter().map(|l| (l - m) * (l - m)).sum::<f64>() / 2000.0).sqrt();
    assert!((m + 0.4).abs() < 0.07 && (sd - 1.0).abs() < 0.05, "mean {m} std {sd}");
    // noisy − clean = σ·n with n standard normal.
    let k = 7;
    let n: Vec<f64> = (0..per).map(|j| ((big.noisy.data[k * per + j] - big.images.data[k * per + j]) / big.sigma[k]) as f64).collect();
    let nm = n.iter().sum::<f64>() / per as f64;
    let nv = n.iter().map(|x| (x - nm) * (x - nm)).sum::<f64>() / per as f64;
    assert!(nm.abs() < 0.1 && (nv - 1.0).abs() < 0.1, "{nm} {nv}");
}

#[test]
fn ctrl_c_finishes_the_step_and_checkpoints() {
    use std::io::BufRead;
    let d = tmp("sigint");
    let cfg = tiny_config(&d, 8, 0.0);
    let out = d.join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edm2"))
        .args(["train", cfg.as_str(), "--outdir", s(&out), "--max-size", "64", "--batch", "16", "--duration", "1Mi", "--preview", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut seen = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        seen += &l;
        seen.push('\n');
        if l.starts_with("Training from") {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    for l in lines {
        seen += &l.unwrap();
        seen.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}\n{seen}");
    assert!(seen.contains("Interrupted"), "{seen}");
    let states = edm2::train::state::list_states(&out).unwrap();
    assert_eq!(states.len(), 1, "{seen}");
    let h = safetensors::read_header(&states[0]).unwrap();
    let nimg: u64 = h.metadata["edm2.nimg"].parse().unwrap();
    assert!(nimg > 0 && nimg % 16 == 0, "{nimg}");
}

#[test]
fn debian_fashion_mnist_split() {
    // CI installs Debian's dataset-fashion-mnist and sets EDM2_REQUIRE_DEBIAN_FMNIST=1.
    if !Path::new(edm2::data::FMNIST_DEBIAN_DIR).exists() {
        assert!(std::env::var("EDM2_REQUIRE_DEBIAN_FMNIST").is_err(), "{} is missing", edm2::data::FMNIST_DEBIAN_DIR);
        eprintln!("skipped: {} is not installed", edm2::data::FMNIST_DEBIAN_DIR);
        return;
    }
    let ds = Dataset::open(Some("fashion-mnist"), &DataOptions::default()).unwrap();
    assert_eq!((ds.len(), ds.resolution, ds.net_channels(), ds.label_dim()), (60000, 32, 1, 10));
    // Balanced classes: 6000 each.
    let mut counts = [0usize; 10];
    ds.labels.as_ref().unwrap().iter().for_each(|&l| counts[l as usize] += 1);
    assert_eq!(counts, [6000; 10]);
    // The 2-pixel black border of the 28 → 32 padding.
    let x = ds.encoded(123, 0).unwrap();
    assert!(x[..64].iter().all(|&v| v == -1.0) && x.iter().any(|&v| v > 0.0));
    let (ok, o, e) = edm2(&["train", "--data", "fashion-mnist", "-n"]);
    assert!(ok && o.contains("training-runs/cpu-fmnist-fmnist") && o.contains("60000 items"), "{o}\n{e}");
}
