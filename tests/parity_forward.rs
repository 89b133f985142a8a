//! Forward parity with the official implementation on the golden `cond16` fixture:
//! D, logvar, F_x and every intermediate (eval mode), labels and no labels, and the
//! clipping fixture.

mod common;
use common::*;
use edm2::{Mode, Tensor};

fn run(fixture: &str, override_gains: bool) -> (edm2::nn::ForwardOut, edm2::io::safetensors::StFile) {
    let (net, mut p) = cond16();
    let f = golden(fixture);
    if override_gains {
        for (i, s) in net.specs.iter().enumerate() {
            if let Some(t) = f.get(&format!("override.{}", s.name)) {
                p.values[i] = t.data.clone();
            }
        }
    }
    let x = tensor(&f, "x").nchw_to_nhwc();
    let sigma = tensor(&f, "sigma").data;
    let labels = tensor(&f, "class_labels");
    let out = net.forward(&p, &x, &sigma, Some(&labels), &Mode::eval(), true);
    (out, f)
}

#[test]
fn forward_d_logvar_and_intermediates_match_official() {
    let (out, f) = run("cond16.forward.safetensors", false);
    let d_ref = tensor(&f, "D");
    let d = out.d.nhwc_to_nchw();
    let e = err_vs_rms(&d.data, &d_ref.data);
    assert!(e <= 1e-4, "D: max abs err / rms = {e:e}");
    let lv_ref = tensor(&f, "logvar");
    let e = err_vs_rms(&out.logvar, &lv_ref.data);
    assert!(e <= 1e-4, "logvar: {e:e}");
    let fx = out.f_x.nhwc_to_nchw();
    let e = err_vs_rms(&fx.data, &tensor(&f, "F_x").data);
    assert!(e <= 1e-4, "F_x: {e:e}");
    let mut checked = 0;
    for (name, t) in &out.intermediates {
        let Some(r) = f.get(name) else { continue };
        let mine = if t.shape.len() == 4 { t.nhwc_to_nchw() } else { t.clone() };
        assert_eq!(mine.shape, r.shape, "{name} shape");
        let e = err_vs_rms(&mine.data, &r.data);
        assert!(e <= 1e-4, "{name}: max abs err / rms = {e:e}");
        checked += 1;
    }
    // c_noise, emb_fourier, emb_noise, emb_label, emb, x_in, logvar_fourier, 11 blocks.
    assert!(checked >= 18, "only {checked} intermediates compared");
}

#[test]
fn forward_without_labels_uses_zero_labels() {
    let (net, p) = cond16();
    let f = golden("cond16.forward.safetensors");
    let x = tensor(&f, "x").nchw_to_nhwc();
    let sigma = tensor(&f, "sigma").data;
    let out = net.forward(&p, &x, &sigma, None, &Mode::eval(), false);
    let r = tensor(&f, "D_nolabel");
    let e = err_vs_rms(&out.d.nhwc_to_nchw().data, &r.data);
    assert!(e <= 1e-4, "D_nolabel: {e:e}");
    // Not the same as with labels: the labels matter.
    assert!(max_abs_diff(&r.data, &tensor(&f, "D").data) > 1e-3);
}

#[test]
fn forward_with_clipped_activations_matches_official() {
    let (out, f) = run("cond16.forward_clip.safetensors", true);
    let d_ref = tensor(&f, "D");
    let e = rel_l2(&out.d.nhwc_to_nchw().data, &d_ref.data);
    assert!(e <= 1e-5, "D (clip fixture) rel L2 = {e:e}");
    let e = rel_l2(&out.f_x.nhwc_to_nchw().data, &tensor(&f, "F_x").data);
    assert!(e <= 1e-5, "F_x (clip fixture) rel L2 = {e:e}");
    let _ = Tensor::zeros(&[1]);
}

/// The effective-weight plan (what the CUDA backend makes in one launch per forward) names
/// every MP weight of the network once, with its stored shape's geometry, and a gain
/// parameter exactly for the layers the official code scales by a learned gain
/// (`emb_linear` of each block with its `emb_gain`, `out_conv` with `out_gain`).
#[test]
fn effective_weight_plan_covers_every_mp_weight_once() {
    for cfg in ["cpu-xs16", "cpu-s32"] {
        let net = edm2::Precond::new(&edm2::NetConfig::resolve(cfg).unwrap()).unwrap();
        let plan = net.effective_plan();
        let mut seen = std::collections::HashSet::new();
        for &(id, g, gain) in &plan {
            assert!(seen.insert(id), "{cfg}: {} twice", net.specs[id].name);
            let spec = &net.specs[id];
            assert!(spec.is_mp_weight, "{cfg}: {} is not an MP weight", spec.name);
            let want = if g.k == 0 { vec![g.out_ch, g.in_ch] } else { vec![g.out_ch, g.in_ch, g.k, g.k] };
            assert_eq!(spec.shape, want, "{cfg}: {}", spec.name);
            let gain_name = gain.map(|p| net.specs[p].name.clone());
            let expected = if spec.name.ends_with("emb_linear.weight") {
                Some(spec.name.replace("emb_linear.weight", "emb_gain"))
            } else if spec.name == "unet.out_conv.weight" {
                Some("unet.out_gain".to_string())
            } else {
                None
            };
            assert_eq!(gain_name, expected, "{cfg}: {}", spec.name);
        }
        let mp = net.specs.iter().filter(|s| s.is_mp_weight).count();
        assert_eq!(seen.len(), mp, "{cfg}: every MP weight in the plan");
    }
}
