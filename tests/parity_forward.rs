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
