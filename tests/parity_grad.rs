//! Training-mode parity with the official implementation (`cond16.grad`): forced weight
//! normalization, the loss, every parameter's gradient and one Adam step.

mod common;
use common::*;
use edm2::train::{adam::Adam, loss::edm2_loss};
use edm2::Mode;

struct Step {
    net: edm2::Precond,
    p_fwn: edm2::Params,
    grads: edm2::Params,
    loss: edm2::train::loss::LossOut,
    d: edm2::Tensor,
    logvar: Vec<f32>,
}

fn train_step() -> Step {
    let (net, mut p) = cond16();
    let f = golden("cond16.grad.safetensors");
    let images = tensor(&f, "images").nchw_to_nhwc();
    let x_noisy = tensor(&f, "x_noisy").nchw_to_nhwc();
    let sigma = tensor(&f, "sigma").data;
    let labels = tensor(&f, "class_labels");
    net.force_normalize(&mut p);
    let mode = Mode::train(0);
    let out = net.forward(&p, &x_noisy, &sigma, Some(&labels), &mode, false);
    let loss = edm2_loss(&out.d, &out.logvar, &images, &sigma, 0.5);
    let grads = net.backward(&p, out.cache.unwrap(), &loss.dd, &loss.dlogvar, &mode);
    Step { net, p_fwn: p, grads, loss, d: out.d, logvar: out.logvar }
}

#[test]
fn forced_weight_normalization_matches_official() {
    let (net, w0) = cond16();
    let s = train_step();
    let f = golden("cond16.grad.safetensors");
    let mut n = 0;
    for (i, spec) in net.specs.iter().enumerate() {
        if !spec.is_mp_weight {
            assert_eq!(s.p_fwn.values[i], w0.values[i], "{} must not change", spec.name);
            continue;
        }
        // normalize(w0) = w0 / fwn_denom, row-broadcast (bitwise in the official code).
        let denom = tensor(&f, &format!("fwn_denom.{}", spec.name));
        let fan = spec.numel() / spec.shape[0];
        let reference: Vec<f32> = w0.values[i].iter().enumerate().map(|(j, v)| v / denom.data[j / fan]).collect();
        let e = rel_l2(&s.p_fwn.values[i], &reference);
        assert!(e <= 1e-6, "{}: rel L2 {e:e}", spec.name);
        n += 1;
    }
    assert_eq!(n, net.specs.iter().filter(|s| s.is_mp_weight).count());
}

#[test]
fn training_loss_matches_official() {
    let s = train_step();
    let f = golden("cond16.grad.safetensors");
    let d_ref = tensor(&f, "D_train");
    let e = err_vs_rms(&s.d.nhwc_to_nchw().data, &d_ref.data);
    assert!(e <= 1e-4, "D_train {e:e}");
    let e = err_vs_rms(&s.logvar, &tensor(&f, "logvar_train").data);
    assert!(e <= 1e-4, "logvar_train {e:e}");
    let total_ref = tensor(&f, "loss_total").data[0] as f64;
    assert!(((s.loss.total - total_ref) / total_ref).abs() <= 1e-5, "loss_total {} vs {}", s.loss.total, total_ref);
    let per = tensor(&f, "loss_sum_per_sample");
    for (a, b) in s.loss.per_sample.iter().zip(&per.data) {
        assert!(((a - *b as f64) / *b as f64).abs() <= 1e-5, "per-sample loss {a} vs {b}");
    }
}

#[test]
fn every_gradient_matches_official() {
    let s = train_step();
    let f = golden("cond16.grad.safetensors");
    let mut worst = (0.0f64, String::new());
    let mut n = 0;
    for (i, spec) in s.net.specs.iter().enumerate() {
        if spec.kind != edm2::nn::ParamKind::Param {
            continue;
        }
        let r = tensor(&f, &format!("grad.{}", spec.name));
        assert_eq!(r.numel(), spec.numel(), "{}", spec.name);
        let e = rel_l2(&s.grads.values[i], &r.data);
        assert!(e <= 1e-3, "grad.{}: rel L2 {e:e}", spec.name);
        if e > worst.0 {
            worst = (e, spec.name.clone());
        }
        n += 1;
    }
    eprintln!("{n} gradients, worst rel L2 {:e} ({})", worst.0, worst.1);
    assert!(n >= 50);
}

#[test]
fn adam_step_matches_official() {
    let mut s = train_step();
    let f = golden("cond16.grad.safetensors");
    let lr = tensor(&f, "adam_lr").data[0] as f64;
    assert!((lr - 0.00256).abs() < 1e-9);
    let before = s.p_fwn.clone();
    let mut adam = Adam::new(&s.net.specs);
    assert_eq!(Adam::sanitize(&mut s.grads), 0);
    adam.step(&s.net.specs, &mut s.p_fwn, &s.grads, lr);
    for (i, spec) in s.net.specs.iter().enumerate() {
        if spec.kind != edm2::nn::ParamKind::Param {
            continue;
        }
        let r = tensor(&f, &format!("adam.{}", spec.name));
        let upd: Vec<f32> = s.p_fwn.values[i].iter().zip(&before.values[i]).map(|(a, b)| a - b).collect();
        let upd_ref: Vec<f32> = r.data.iter().zip(&before.values[i]).map(|(a, b)| a - b).collect();
        let e = rel_l2(&upd, &upd_ref);
        assert!(e <= 1e-3, "adam update of {}: rel L2 {e:e}", spec.name);
    }
}
