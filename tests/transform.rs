//! The official dataset tool's crop/resize transforms against Pillow: every case of
//! `tests/data/pil_transforms.json` (written by `scripts/pil_transform_fixture.py` from the
//! official `dataset_tool.make_transform` and Pillow's `Image.resize`) must match bit for
//! bit; then `edm2 encode --transform` end to end on a folder of mixed-size images.

mod common;
use common::{golden_path, rel_l2, test_data};
use edm2::backend::cpu::Cpu;
use edm2::data::transform::{apply, resize, Filter, Transform};
use edm2::data::{DataOptions, Dataset, RawItem};
use edm2::nn::vae::{LatentCodec, Parts, Vae};
use std::path::Path;

/// The fixture's synthetic image (same formula as the script): a wrapping gradient plus
/// hashed noise, planar [c, h, w].
fn synthetic(h: usize, w: usize, c: usize) -> Vec<u8> {
    let mut out = vec![0u8; c * h * w];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let m = 0xFFFF_FFFFu64;
                let hash = ((x as u64 * 73856093) & m) ^ ((y as u64 * 19349663) & m) ^ ((ch as u64 * 83492791) & m);
                out[(ch * h + y) * w + x] = ((x as u64 * 3 + y as u64 * 5 + ch as u64 * 70 + (hash >> 26)) & 255) as u8;
            }
        }
    }
    out
}

fn transform_named(name: &str) -> Option<Transform> {
    match name {
        "center-crop" => Some(Transform::CenterCrop),
        "center-crop-wide" => Some(Transform::CenterCropWide),
        "center-crop-dhariwal" => Some(Transform::CenterCropDhariwal),
        other => panic!("unknown transform {other}"),
    }
}

#[test]
fn transforms_match_pillow_bit_for_bit() {
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(test_data("pil_transforms.json")).unwrap()).unwrap();
    let blob = std::fs::read(test_data("pil_transforms.bin")).unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 18);
    let u = |c: &serde_json::Value, k: &str| c[k].as_u64().unwrap() as usize;
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (w, h, c) = (u(case, "w"), u(case, "h"), u(case, "c"));
        let input = synthetic(h, w, c);
        if case["kind"] == "jpeg" {
            continue; // jpeg_decoding_is_close_to_pillows
        }
        let got = match case["kind"].as_str().unwrap() {
            "resize" => {
                let filter = match case["filter"].as_str().unwrap() {
                    "box" => Filter::Box,
                    "bicubic" => Filter::Bicubic,
                    "lanczos" => Filter::Lanczos,
                    f => panic!("{f}"),
                };
                let (ow, oh) = (u(case, "out_w_req"), u(case, "out_h_req"));
                Some((resize(&input, c, h, w, ow, oh, filter), oh, ow))
            }
            _ => {
                let t = case["transform"].as_str().and_then(transform_named);
                apply(t, Some((u(case, "res_w"), u(case, "res_h"))), &input, c, h, w).unwrap()
            }
        };
        if case["skipped"].as_bool() == Some(true) {
            if got.is_some() {
                failures.push(format!("{name}: the official tool skips this image"));
            }
            continue;
        }
        let Some((px, oh, ow)) = got else {
            failures.push(format!("{name}: skipped, but the official tool keeps it"));
            continue;
        };
        let (wh, ww) = (u(case, "out_h"), u(case, "out_w"));
        if (oh, ow) != (wh, ww) {
            failures.push(format!("{name}: {ow}x{oh}, Pillow {ww}x{wh}"));
            continue;
        }
        let want = &blob[u(case, "offset")..][..c * wh * ww];
        let off = px.iter().zip(want).filter(|(a, b)| a != b).count();
        let worst = px.iter().zip(want).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
        if off > 0 {
            failures.push(format!("{name}: {off} of {} values differ (at most by {worst})", want.len()));
        }
    }
    assert!(failures.is_empty(), "Pillow {}: {failures:#?}", meta["pillow"]);
}

/// JPEG decoding is not part of the transforms: our decoder (the jpeg-decoder crate) and
/// Pillow's (libjpeg-turbo) may round the inverse DCT and the chroma upsampling apart.
/// This bounds how far apart on a Pillow-written 4:2:0 JPEG: measured (Pillow 13.0,
/// jpeg-decoder 0.3) 565 of 8235 values differ, none by more than 3 levels.
#[test]
fn jpeg_decoding_is_close_to_pillows() {
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(test_data("pil_transforms.json")).unwrap()).unwrap();
    let blob = std::fs::read(test_data("pil_transforms.bin")).unwrap();
    let case = meta["cases"].as_array().unwrap().iter().find(|c| c["kind"] == "jpeg").expect("the jpeg case");
    let u = |k: &str| case[k].as_u64().unwrap() as usize;
    let jpeg = &blob[u("jpeg_offset")..][..u("jpeg_len")];
    let want = &blob[u("offset")..][..3 * u("h") * u("w")];
    let (item, c, h, w) = edm2::data::decode::decode_item(jpeg, "fixture.jpg").unwrap();
    let RawItem::U8(got) = item else { panic!("pixels") };
    assert_eq!((c, h, w), (3, u("h"), u("w")));
    let off = got.iter().zip(want).filter(|(a, b)| a != b).count();
    let worst = got.iter().zip(want).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
    eprintln!("jpeg: {off} of {} values differ from Pillow's, at most by {worst}", want.len());
    assert!(worst <= 3 && off * 10 <= want.len(), "jpeg: {off} of {} values differ from Pillow's, at most by {worst}", want.len());
}

#[test]
fn transform_arguments_are_checked() {
    let px = synthetic(10, 20, 3);
    let e = apply(Some(Transform::CenterCrop), None, &px, 3, 10, 20).unwrap_err().to_string();
    assert!(e.contains("--resolution"), "{e}");
    let e = apply(Some(Transform::CenterCropDhariwal), Some((8, 6)), &px, 3, 10, 20).unwrap_err().to_string();
    assert!(e.contains("square"), "{e}");
    // Neither: unchanged; a resolution equal to the size: unchanged (Pillow's copy).
    assert_eq!(apply(None, None, &px, 3, 10, 20).unwrap().unwrap(), (px.clone(), 10, 20));
    assert_eq!(apply(None, Some((20, 10)), &px, 3, 10, 20).unwrap().unwrap(), (px.clone(), 10, 20));
    for bad in ["512", "0x4", "ax4", "4x", "100000x4"] {
        assert!(edm2::data::transform::parse_resolution(bad).is_err(), "{bad}");
    }
    assert_eq!(edm2::data::transform::parse_resolution("512x256"), Ok((512, 256)));
}

/// Writes `px` (planar) as an interleaved PNG.
fn write_planar_png(p: &Path, px: &[u8], c: usize, h: usize, w: usize) {
    let mut hwc = vec![0u8; px.len()];
    for ch in 0..c {
        for i in 0..h * w {
            hwc[i * c + ch] = px[ch * h * w + i];
        }
    }
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    edm2::io::image::write_png(p, &hwc, c, h, w).unwrap();
}

#[test]
fn encode_with_transform_end_to_end() {
    let d = common::scratch_dir("transform", "encode");
    let src = d.join("raw");
    // ImageNet's layout: class folders, no dataset.json, images of any size; one grayscale.
    let items = [("n01/a.png", 3, 30, 41), ("n01/b.png", 1, 23, 17), ("n02/c.png", 3, 40, 40), ("n03/d.png", 3, 20, 90)];
    for (name, c, h, w) in items {
        write_planar_png(&src.join(name), &synthetic(h, w, c), c, h, w);
    }
    let vae = golden_path("vae/vae_tiny.safetensors");
    let dest = d.join("lat");
    let (ok, o, e) = common::edm2_bin(&[
        "encode", "--vae", vae.to_str().unwrap(), "--source", src.to_str().unwrap(), "--dest", dest.to_str().unwrap(), "--transform",
        "center-crop-dhariwal", "--resolution", "16x16", "--device", "cpu",
    ]);
    assert!(ok, "{o}\n{e}");
    let ds = Dataset::open(Some(dest.to_str().unwrap()), &DataOptions::default()).unwrap();
    assert_eq!((ds.len(), ds.resolution), (4, 2));
    // Labels from the class folders, in sorted order.
    assert_eq!((0..4).map(|i| ds.label(i).unwrap()).collect::<Vec<_>>(), vec![0, 0, 1, 2]);
    // Item 1 (grayscale) is the encoding of the transformed image repeated to RGB.
    let (c, h, w) = (1, 23, 17);
    let (t, oh, ow) = apply(Some(Transform::CenterCropDhariwal), Some((16, 16)), &synthetic(h, w, c), c, h, w).unwrap().unwrap();
    assert_eq!((oh, ow), (16, 16));
    let rgb = t.repeat(3);
    let v = Vae::load(&Cpu, &vae, Parts { encoder: true, decoder: false }).unwrap();
    let want = LatentCodec::default().encode_pixels(&Cpu, &v, &rgb, 1, 16, 16).unwrap();
    let RawItem::F32(got) = ds.load_raw(1).unwrap() else { panic!("latents") };
    assert!(rel_l2(&got, &want) < 1e-6, "{}", rel_l2(&got, &want));

    // center-crop-wide skips images too small for it, keeping the others' names (as the
    // official tool numbers items by source index).
    let wide = d.join("wide");
    let (ok, o, e) = common::edm2_bin(&[
        "encode", "--vae", vae.to_str().unwrap(), "--source", src.to_str().unwrap(), "--dest", wide.to_str().unwrap(), "--transform",
        "center-crop-wide", "--resolution", "16x8", "--device", "cpu",
    ]);
    assert!(ok && e.contains("skipped 1 images"), "{o}\n{e}");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(wide.join("dataset.json")).unwrap()).unwrap();
    let names: Vec<&str> = meta["labels"].as_array().unwrap().iter().map(|l| l[0].as_str().unwrap()).collect();
    // d.png (90x20) is too flat for a 16x8 band: round(16 * 20 / 90) = 4 rows < 8.
    assert_eq!(names, ["00000/img-mean-std-00000000.npy", "00000/img-mean-std-00000001.npy", "00000/img-mean-std-00000002.npy"]);

    // Without a transform, mixed sizes are an error naming the image.
    let (ok, _, e) = common::edm2_bin(&[
        "encode", "--vae", vae.to_str().unwrap(), "--source", src.to_str().unwrap(), "--dest", d.join("plain").to_str().unwrap(), "--device",
        "cpu",
    ]);
    assert!(!ok && e.contains("a.png") && e.contains("square"), "{e}");
    let (ok, _, e) = common::edm2_bin(&[
        "encode", "--vae", vae.to_str().unwrap(), "--source", src.to_str().unwrap(), "--dest", d.join("x").to_str().unwrap(), "--transform",
        "center-crop",
    ]);
    assert!(!ok && e.contains("--resolution"), "{e}");
}
