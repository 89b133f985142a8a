//! The latent pipeline end to end through the binary, on the small VAE of the golden
//! fixtures: `encode` an image folder into a latent dataset, `train` a latent network on
//! it, `generate --vae` images, and `decode` the kept latents to the same images.

mod common;
use common::{golden_path, rel_l2};
use edm2::backend::cpu::Cpu;
use edm2::data::{DataOptions, Dataset, RawItem};
use edm2::nn::vae::{LatentCodec, Parts, Vae};
use std::path::{Path, PathBuf};

fn edm2(args: &[&str]) -> (bool, String, String) {
    common::edm2_bin(args)
}

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("vae", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `n` smooth 64x64 RGB images (different per item) with labels `i % 2`.
fn image_folder(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut labels = Vec::new();
    for i in 0..n {
        let mut px = vec![0u8; 64 * 64 * 3];
        for (k, v) in px.iter_mut().enumerate() {
            let (y, x, c) = (k / 192, (k / 3) % 64, k % 3);
            *v = (128.0 + 120.0 * ((x as f32 * 0.11 + y as f32 * 0.07 * (c + 1) as f32 + i as f32).sin())) as u8;
        }
        let name = format!("img{i}.png");
        edm2::io::image::write_png(&dir.join(&name), &px, 3, 64, 64).unwrap();
        labels.push(serde_json::json!([name, i % 2]));
    }
    std::fs::write(dir.join("dataset.json"), serde_json::json!({ "labels": labels }).to_string()).unwrap();
}

fn png_pixels(p: &Path) -> (u32, u32, Vec<u8>) {
    let dec = png::Decoder::new(std::fs::File::open(p).unwrap());
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    (info.width, info.height, buf[..info.buffer_size()].to_vec())
}

#[test]
fn encode_train_generate_decode() {
    let d = tmp("pipeline");
    let vae = golden_path("vae/vae_tiny.safetensors");
    let imgs = d.join("imgs");
    image_folder(&imgs, 4);

    // encode → a zip in the official layout, labels carried over.
    let lat = d.join("latents.zip");
    let (ok, o, e) = edm2(&["encode", "--vae", s(&vae), "--source", s(&imgs), "--dest", s(&lat), "--batch", "3"]);
    assert!(ok, "{o}\n{e}");
    assert!(!d.join("latents.zip.partial").exists(), "the working folder is removed");
    let ds = Dataset::open(Some(s(&lat)), &DataOptions::default()).unwrap();
    assert_eq!((ds.len(), ds.net_channels(), ds.resolution, ds.label_dim()), (4, 4, 8, 2));
    assert!(ds.item_name(3).ends_with("latents.zip:00000/img-mean-std-00000003.npy"), "{}", ds.item_name(3));
    // Item 2 is what the library's encoder gives for that image.
    let pixels = Dataset::open(Some(s(&imgs)), &DataOptions::default()).unwrap();
    let RawItem::U8(px) = pixels.load_raw(2).unwrap() else { panic!("pixels") };
    let v = Vae::load(&Cpu, &vae, Parts { encoder: true, decoder: false }).unwrap();
    let want = LatentCodec::default().encode_pixels(&Cpu, &v, &px, 1, 64, 64).unwrap();
    let RawItem::F32(got) = ds.load_raw(2).unwrap() else { panic!("latents") };
    assert!(rel_l2(&got, &want) < 1e-6, "{}", rel_l2(&got, &want));
    assert_eq!(ds.label(2), Some(0));

    // Into a folder, resumed: items already there are kept, the rest encoded.
    let latdir = d.join("latdir");
    let (ok, o, e) = edm2(&["encode", "--vae", s(&vae), "--source", s(&imgs), "--dest", s(&latdir), "--max-images", "2"]);
    assert!(ok, "{o}\n{e}");
    let (ok, o, e) = edm2(&["encode", "--vae", s(&vae), "--source", s(&imgs), "--dest", s(&latdir)]);
    assert!(ok && e.contains("2 of 4 latents exist"), "{o}\n{e}");
    let b = Dataset::open(Some(s(&latdir)), &DataOptions::default()).unwrap();
    for i in 0..4 {
        assert_eq!(b.encoded(i, 7).unwrap(), ds.encoded(i, 7).unwrap(), "item {i}: folder and zip agree");
    }

    // A few steps of a class-conditional latent network on it.
    let cfg = d.join("lat.json");
    std::fs::write(&cfg, r#"{"img_resolution": 8, "img_channels": 4, "label_dim": 0, "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "use_fp16": false}"#).unwrap();
    let run = d.join("run");
    let (ok, o, e) = edm2(&["train", s(&cfg), "--data", s(&lat), "--outdir", s(&run), "--batch", "2", "--duration", "4"]);
    assert!(ok, "{o}\n{e}");
    let snap = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("network-snapshot-"))
        .expect("a snapshot");

    // generate --vae: 64x64 RGB PNGs, latents kept with --latents.
    let out = d.join("gen");
    let grid = d.join("grid.png");
    let (ok, o, e) = edm2(&[
        "generate", "--net", s(&snap), "--vae", s(&vae), "--latents", "--seeds", "0-2", "--steps", "4", "--batch", "2", "--outdir", s(&out),
        "--grid", s(&grid), "--device", "cpu",
    ]);
    assert!(ok, "{o}\n{e}");
    assert!(e.contains("VAE decoding"), "the time split is reported: {e}");
    let (w, h, gen0) = png_pixels(&out.join("000000.png"));
    assert_eq!((w, h), (64, 64));
    assert!(out.join("000002.npy").exists() && out.join("000002.png").exists());
    let (gw, gh, _) = png_pixels(&grid);
    assert_eq!((gw % 64, gh % 64), (0, 0));

    // decode the kept latents: the same images.
    let dec = d.join("dec");
    let (ok, o, e) = edm2(&["decode", "--vae", s(&vae), "--source", s(&out), "--dest", s(&dec)]);
    assert!(ok, "{o}\n{e}");
    for i in 0..3 {
        let a = png_pixels(&out.join(format!("00000{i}.png"))).2;
        let b = png_pixels(&dec.join(format!("00000{i}.png"))).2;
        assert_eq!(a, b, "image {i}: generate --vae and decode agree");
    }
    assert_ne!(gen0, png_pixels(&out.join("000001.png")).2, "different seeds, different images");
    // A second decode skips what exists.
    let (ok, _, e) = edm2(&["decode", "--vae", s(&vae), "--source", s(&out), "--dest", s(&dec)]);
    assert!(ok && e.contains("3 of 3 images exist"), "{e}");
}

#[test]
fn bad_vae_arguments_are_clear_errors() {
    let d = tmp("bad");
    let imgs = d.join("imgs");
    image_folder(&imgs, 1);
    // No config beside a weights file.
    let lone = d.join("model.safetensors");
    std::fs::copy(golden_path("vae/vae_tiny.safetensors"), &lone).unwrap();
    let (ok, _, e) = edm2(&["encode", "--vae", s(&lone), "--source", s(&imgs), "--dest", s(&d.join("o"))]);
    assert!(!ok && e.contains("model.safetensors") && e.contains("config.json"), "{e}");
    // A directory without the diffusers files.
    let (ok, _, e) = edm2(&["decode", "--vae", s(&d), "--source", s(&imgs), "--dest", s(&d.join("o2"))]);
    assert!(!ok && e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    // Latents of the wrong channel count.
    let bad = d.join("bad.npy");
    edm2::io::npy::write(&bad, &[0.0; 3 * 8 * 8], &[3, 8, 8]).unwrap();
    let vae = golden_path("vae/vae_tiny.safetensors");
    let (ok, _, e) = edm2(&["decode", "--vae", s(&vae), "--source", s(&bad), "--dest", s(&d.join("o3"))]);
    assert!(!ok && e.contains("bad.npy") && e.contains("3 channels"), "{e}");
    // Images whose side is not a multiple of 8.
    let odd = d.join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    edm2::io::image::write_png(&odd.join("a.png"), &[7; 3 * 12 * 12], 3, 12, 12).unwrap();
    let (ok, _, e) = edm2(&["encode", "--vae", s(&vae), "--source", s(&odd), "--dest", s(&d.join("o4"))]);
    assert!(!ok && e.contains("multiples of 8"), "{e}");
}
