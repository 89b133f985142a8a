//! Checkpoint IO: official names and layouts, f32/f16/bf16, metadata round trip, and a
//! clear error (never a panic) for every kind of bad file.

mod common;
use common::*;
use edm2::io::safetensors::{self, Dtype};
use edm2::{Error, NetConfig, Params, Precond};
use std::collections::BTreeMap;

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("edm2-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_net(net: &Precond, p: &Params, path: &std::path::Path, dtype: Dtype, skip: Option<&str>, extra: bool) {
    let mut list: Vec<(&str, &[usize], &[f32])> = net
        .specs
        .iter()
        .zip(&p.values)
        .filter(|(s, _)| Some(s.name.as_str()) != skip)
        .map(|(s, v)| (s.name.as_str(), s.shape.as_slice(), v.as_slice()))
        .collect();
    let junk = [1.0f32, 2.0];
    if extra {
        list.push(("unet.enc.bogus.weight", &[2], &junk));
    }
    safetensors::write(path, &list, &BTreeMap::new(), dtype).unwrap();
}

#[test]
fn round_trip_in_f32_f16_bf16_with_metadata() {
    let (net, p) = cond16();
    let dir = tmpdir("rt");
    for (dtype, tol) in [(Dtype::F32, 0.0), (Dtype::F16, 1e-3), (Dtype::BF16, 8e-3)] {
        let path = dir.join(format!("net-{}.safetensors", dtype.name()));
        let meta = BTreeMap::from([
            ("edm2.format".to_string(), "net".to_string()),
            ("edm2.config".to_string(), net.config.to_json()),
            ("edm2.nimg".to_string(), "12345".to_string()),
        ]);
        p.save(&net.specs, &path, &meta, dtype).unwrap();
        // No --config needed: the file carries it.
        let loaded = edm2::load_net(&path, None).unwrap();
        assert_eq!(loaded.net.config, net.config);
        assert_eq!(loaded.metadata.get("edm2.nimg").map(String::as_str), Some("12345"));
        for (a, b) in loaded.params.values.iter().zip(&p.values) {
            let e = rel_l2(a, b);
            assert!(e <= tol, "{}: rel err {e}", dtype.name());
        }
        let f = safetensors::read(&path).unwrap();
        assert!(f.tensors.iter().all(|(_, t)| t.dtype == dtype));
    }
}

fn expect_err(path: &std::path::Path, cfg: &NetConfig) -> Error {
    match edm2::load_net(path, Some(cfg)) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e,
    }
}

#[test]
fn bad_files_give_errors_naming_tensor_and_file() {
    let (net, p) = cond16();
    let cfg = net.config.clone();
    let dir = tmpdir("bad");
    let good = dir.join("good.safetensors");
    write_net(&net, &p, &good, Dtype::F32, None, false);
    assert!(edm2::load_net(&good, Some(&cfg)).is_ok());

    let missing = dir.join("missing.safetensors");
    write_net(&net, &p, &missing, Dtype::F32, Some("unet.dec.8x8_in0.attn_qkv.weight"), false);
    let e = expect_err(&missing, &cfg);
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    assert!(e.to_string().contains("unet.dec.8x8_in0.attn_qkv.weight") && e.to_string().contains("missing.safetensors"), "{e}");

    let extra = dir.join("extra.safetensors");
    write_net(&net, &p, &extra, Dtype::F32, None, true);
    let e = expect_err(&extra, &cfg);
    assert!(matches!(e, Error::ExtraTensor { .. }) && e.to_string().contains("unet.enc.bogus.weight"), "{e}");

    // Wrong shape: a config with other channels.
    let mut other = cfg.clone();
    other.model_channels = 16;
    let e = expect_err(&good, &other);
    assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("good.safetensors"), "{e}");

    // Unsupported dtype.
    let bytes = std::fs::read(&good).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + hlen].to_vec()).unwrap();
    let i64h = header.replacen("\"F32\"", "\"I64\"", 1);
    let mut b2 = bytes[..8].to_vec();
    b2.extend_from_slice(i64h.as_bytes());
    b2.extend_from_slice(&bytes[8 + hlen..]);
    let dt = dir.join("dtype.safetensors");
    std::fs::write(&dt, &b2).unwrap();
    let e = expect_err(&dt, &cfg);
    assert!(matches!(e, Error::Dtype { .. }) || matches!(e, Error::Malformed { .. }), "{e}");
    assert!(e.to_string().contains("dtype.safetensors"), "{e}");

    // Truncated in the data and in the header; garbage; empty.
    for (name, data) in [
        ("trunc_data", bytes[..bytes.len() - 100].to_vec()),
        ("trunc_header", bytes[..20].to_vec()),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        ("empty", vec![]),
    ] {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, &data).unwrap();
        let e = expect_err(&path, &cfg);
        assert!(matches!(e, Error::Malformed { .. }), "{name}: {e}");
        assert!(e.to_string().contains(&format!("{name}.safetensors")), "{e}");
    }

    // A non-finite weight.
    let mut bad = p.clone();
    bad.values[5][3] = f32::NAN;
    let nan = dir.join("nan.safetensors");
    write_net(&net, &bad, &nan, Dtype::F32, None, false);
    let e = expect_err(&nan, &cfg);
    assert!(e.to_string().contains("non-finite") && e.to_string().contains(&net.specs[5].name), "{e}");

    // Missing file.
    let e = expect_err(&dir.join("nope.safetensors"), &cfg);
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("nope.safetensors"), "{e}");

    // No metadata and no config.
    match edm2::load_net(&good, None) {
        Err(e) => assert!(e.to_string().contains("--config"), "{e}"),
        Ok(_) => panic!("loaded without a config"),
    }
}

#[test]
fn config_json_forms() {
    let s = std::fs::read_to_string(golden_path("cond16.config.json")).unwrap();
    let wrapped = NetConfig::from_json_str(&s).unwrap();
    let flat = NetConfig::from_json_str(&wrapped.to_json()).unwrap();
    assert_eq!(wrapped, flat);
    assert_eq!(wrapped.channels_per_head, 16);
    assert_eq!(wrapped.logvar_channels, 16);
    // Official defaults fill in.
    let min = NetConfig::from_json_str(r#"{"img_resolution": 64, "img_channels": 4, "label_dim": 1000, "model_channels": 128}"#).unwrap();
    assert_eq!(Precond::new(&min).unwrap().num_params(), 124_713_253);
    // Unknown keys and bad values are errors that say what is wrong.
    let e = NetConfig::from_json_str(r#"{"img_resolution": 16, "img_channels": 3, "label_dim": 0, "bogus": 1}"#).unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = NetConfig::from_json_str(r#"{"img_resolution": 20, "img_channels": 3, "label_dim": 0}"#).unwrap_err();
    assert!(e.to_string().contains("divisible"), "{e}");
    assert!(NetConfig::resolve("no-such-preset").unwrap_err().to_string().contains("cpu-s32"));
}

#[test]
fn preset_parameter_counts() {
    // Official parameter counts (golden/torch_cpu_baseline.json, paper Table 2).
    for (name, count) in [("edm2-img512-xs", 124_713_253usize), ("cpu-s32", 7_079_254), ("cpu-xs16", 723_691)] {
        let net = Precond::new(&NetConfig::resolve(name).unwrap()).unwrap();
        assert_eq!(net.num_params(), count, "{name}");
    }
    // Paper: S/M/L/XL/XXL = 280/498/778/1119/1523 M.
    for (name, m) in [("edm2-img512-s", 280.0), ("edm2-img512-m", 498.0), ("edm2-img512-l", 778.0), ("edm2-img512-xl", 1119.0), ("edm2-img512-xxl", 1523.0)] {
        let net = Precond::new(&NetConfig::resolve(name).unwrap()).unwrap();
        let got = net.num_params() as f64 / 1e6;
        assert!((got - m).abs() / m < 0.005, "{name}: {got} M vs paper {m} M");
    }
}

#[test]
fn flop_counts_match_official_count_flops() {
    // golden/torch_cpu_baseline.json: fwd_flops_per_image_edm2_count_flops.
    for (name, official) in [("cpu-s32", 1_893_899_015u64), ("cpu-xs16", 82_633_451), ("edm2-img512-xs", 45_747_332_728)] {
        let net = Precond::new(&NetConfig::resolve(name).unwrap()).unwrap();
        let fc = net.flop_count();
        let rel = (fc.total() as f64 - official as f64) / official as f64;
        eprintln!("{name}: ours {} vs official {official}: {rel:+.2e}\n{:?}", fc.total(), fc.by_op);
        // Only a few scalar ops on sigma are not modelled.
        assert!(rel.abs() < 1e-5, "{name}: {rel:e}");
    }
    // The 2·MAC convention of torch's flop counter (fwd_flops_per_image_torch_2mac), used
    // for GFLOP/s. Torch also counts the 2x2 resampling filters (< 0.05%); we do not.
    for (name, official) in [("cpu-s32", 3_681_503_744u64), ("cpu-xs16", 155_292_928), ("edm2-img512-xs", 89_907_437_568)] {
        let net = Precond::new(&NetConfig::resolve(name).unwrap()).unwrap();
        let rel = (2.0 * net.macs_per_image() as f64 - official as f64) / official as f64;
        assert!(rel <= 0.0 && rel > -1e-3, "{name}: {rel:e}");
    }
}
