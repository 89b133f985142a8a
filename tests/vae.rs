//! The Stability VAE (`nn::vae`) against the official code's outputs
//! (`tests/data/golden/vae/`: diffusers' AutoencoderKL at reduced widths with the real
//! module tree, run through the official `StabilityVAEEncoder`).

mod common;
use common::{golden_path, rel_l2};
use edm2::backend::cpu::Cpu;
use edm2::error::Error;
use edm2::io::safetensors::{self, StFile};
use edm2::nn::vae::{LatentCodec, Parts, Vae, VaeConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;

const BOTH: Parts = Parts { encoder: true, decoder: true };

fn vae_path() -> PathBuf {
    golden_path("vae/vae_tiny.safetensors")
}

/// The fixture's tensors as raw little-endian bytes (it also holds uint8 tensors, which
/// the model reader rightly refuses), by name: (shape, bytes).
fn io_raw() -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let b = std::fs::read(golden_path("vae/vae_tiny.io.safetensors")).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let data = &b[8 + n..];
    let mut out = BTreeMap::new();
    for (k, v) in h.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        let shape = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let off = v["data_offsets"].as_array().unwrap();
        let (a, e) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
        out.insert(k.clone(), (shape, data[a..e].to_vec()));
    }
    out
}

fn f32s(t: &(Vec<usize>, Vec<u8>)) -> Vec<f32> {
    t.1.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn load(parts: Parts) -> Vae<Cpu> {
    Vae::load(&Cpu, &vae_path(), parts).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn config_is_read_from_the_file() {
    let v = load(BOTH);
    assert_eq!(v.config.block_out_channels, [32, 64, 64, 64]);
    assert_eq!((v.config.layers_per_block, v.config.latent_channels, v.config.norm_num_groups), (2, 4, 32));
    assert_eq!(v.config.downscale(), 8);
    // The real model's config parses to its widths.
    let p = golden_path("vae/sd_vae_ft_mse.config.json");
    let real = VaeConfig::parse(&p, &std::fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(real.block_out_channels, [128, 256, 512, 512]);
    assert_eq!(real.downscale(), 8);
}

#[test]
fn latent_normalization_is_the_official_one() {
    let io = io_raw();
    let codec = LatentCodec::default();
    assert_eq!(codec.scale, f32s(&io["scale"]));
    assert_eq!(codec.bias, f32s(&io["bias"]));
}

#[test]
fn encoder_matches_the_official_encode_pixels() {
    let io = io_raw();
    let (shape, px) = &io["pixels"];
    let (n, h, w) = (shape[0], shape[2], shape[3]);
    let v = load(Parts { encoder: true, decoder: false });
    let raw = LatentCodec::default().encode_pixels(&Cpu, &v, px, n, h, w).unwrap();
    let want = f32s(&io["raw_latents"]);
    let e = rel_l2(&raw, &want);
    eprintln!("raw latents rel L2 {e:.3e}");
    assert!(e < 1e-5, "raw latents rel L2 {e:.3e}");
    // Mean and std separately, against the posterior the fixture kept.
    let (mean, logvar) = (f32s(&io["posterior_mean"]), f32s(&io["posterior_logvar"]));
    let hw = (h / 8) * (w / 8);
    let (mut m, mut s) = (Vec::new(), Vec::new());
    for b in 0..n {
        m.extend_from_slice(&raw[b * 8 * hw..(b * 8 + 4) * hw]);
        s.extend_from_slice(&raw[(b * 8 + 4) * hw..(b * 8 + 8) * hw]);
    }
    let std_want: Vec<f32> = logvar.iter().map(|l| (0.5 * l.clamp(-30.0, 20.0)).exp()).collect();
    assert!(rel_l2(&m, &mean) < 1e-5, "mean {:.3e}", rel_l2(&m, &mean));
    assert!(rel_l2(&s, &std_want) < 1e-5, "std {:.3e}", rel_l2(&s, &std_want));
}

#[test]
fn decoder_matches_the_official_decode() {
    let io = io_raw();
    let (shape, _) = &io["final_latents"];
    let (n, h, w) = (shape[0], shape[2], shape[3]);
    let final_latents = f32s(&io["final_latents"]);
    let codec = LatentCodec::default();
    // The un-normalization alone.
    let want_in = f32s(&io["decoder_input"]);
    for (i, (&z, &want)) in final_latents.iter().zip(&want_in).enumerate() {
        let c = (i / (h * w)) % 4;
        let got = (z - codec.bias[c]) / codec.scale[c];
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "decoder input {i}: {got} vs {want}");
    }
    let v = load(Parts { encoder: false, decoder: true });
    let (px, y) = codec.decode(&Cpu, &v, &final_latents, n, h, w).unwrap();
    let e = rel_l2(&y, &f32s(&io["decoded_float"]));
    eprintln!("decoded float rel L2 {e:.3e}");
    assert!(e < 1e-5, "decoded float rel L2 {e:.3e}");
    let want_px = &io["decoded_uint8"].1;
    assert_eq!(px.len(), want_px.len());
    let off: Vec<i32> = px.iter().zip(want_px).map(|(&a, &b)| (a as i32 - b as i32).abs()).collect();
    let over1 = off.iter().filter(|&&d| d > 1).count();
    let any = off.iter().filter(|&&d| d > 0).count();
    assert_eq!(over1, 0, "uint8 values off by more than one level");
    eprintln!("uint8: {any} of {} values differ by one level", px.len());
    assert!((any as f64) < 1e-3 * px.len() as f64, "{any} of {} uint8 values differ", px.len());
}

#[test]
fn older_attention_names_load_to_the_same_network() {
    let file = safetensors::read(vae_path()).unwrap();
    let mut old = file.clone();
    for (name, t) in &mut old.tensors {
        for (new, legacy) in [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")] {
            *name = name.replace(new, legacy);
        }
        // Some conversions keep the projections as 1x1 convolutions.
        if name.contains(".query.weight") {
            t.shape.extend([1, 1]);
        }
    }
    assert!(old.get("decoder.mid_block.attentions.0.proj_attn.weight").is_some());
    let cfg = load(BOTH).config;
    let io = io_raw();
    let z = f32s(&io["final_latents"]);
    let codec = LatentCodec::default();
    let a = Vae::from_file(&Cpu, cfg.clone(), &file, BOTH).unwrap();
    let b = Vae::from_file(&Cpu, cfg, &old, BOTH).unwrap();
    let ya = codec.decode(&Cpu, &a, &z, 3, 8, 8).unwrap().1;
    let yb = codec.decode(&Cpu, &b, &z, 3, 8, 8).unwrap().1;
    assert_eq!(ya, yb);
}

fn load_err(file: &StFile, cfg: VaeConfig) -> String {
    match Vae::from_file(&Cpu, cfg, file, BOTH) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn weights_that_disagree_with_the_config_are_errors_naming_the_tensor() {
    let file = safetensors::read(vae_path()).unwrap();
    let cfg = load(BOTH).config;
    // A missing tensor.
    let mut f = file.clone();
    f.tensors.retain(|(n, _)| n != "decoder.up_blocks.3.resnets.0.conv_shortcut.bias");
    let m = load_err(&f, cfg.clone());
    assert!(m.contains("decoder.up_blocks.3.resnets.0.conv_shortcut.bias") && m.contains("missing"), "{m}");
    // A config with fewer layers than the file: the extra tensors are named.
    let m = load_err(&file, VaeConfig { layers_per_block: 1, ..cfg.clone() });
    assert!(m.contains("decoder.up_blocks.0.resnets.2.") && m.contains("wrong config.json"), "{m}");
    // Wider blocks than the file.
    let m = load_err(&file, VaeConfig { block_out_channels: vec![64, 64, 64, 64], ..cfg.clone() });
    assert!(m.contains("encoder.conv_in.weight") && m.contains("expected [64, 3, 3, 3]"), "{m}");
    // Inputs of the wrong geometry.
    let v = load(BOTH);
    let e = LatentCodec::default().decode(&Cpu, &v, &[0.0; 3 * 4 * 8 * 7], 3, 8, 8);
    assert!(matches!(e, Err(Error::Input(_))));
    let e = LatentCodec::default().encode_pixels(&Cpu, &v, &[0; 3 * 3 * 60 * 60], 3, 60, 60).unwrap_err().to_string();
    assert!(e.contains("multiples of 8"), "{e}");
}

#[test]
fn bad_configs_are_errors_naming_the_file() {
    let p = std::path::Path::new("x/config.json");
    for (text, part) in [
        ("{", "not valid JSON"),
        (r#"{"block_out_channels": [32, 48], "norm_num_groups": 32}"#, "multiple of norm_num_groups"),
        (r#"{"block_out_channels": [32], "act_fn": "gelu"}"#, "act_fn"),
        (r#"{"block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"]}"#, "down_block_types"),
        (r#"{"block_out_channels": [32], "layers_per_block": 100}"#, "layers_per_block"),
        (r#"{"norm_num_groups": 32}"#, "block_out_channels"),
    ] {
        let m = VaeConfig::parse(p, text).unwrap_err().to_string();
        assert!(m.contains("x/config.json") && m.contains(part), "{text}: {m}");
    }
}
