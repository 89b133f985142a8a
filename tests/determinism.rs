//! Bit-identical results from run to run at a fixed thread count (the training issue's
//! exact-resume test depends on it): forward, loss, every gradient, Adam.

use edm2::rng::Rng;
use edm2::train::loss::edm2_loss;
use edm2::{Mode, NetConfig, Precond, Tensor};

fn step(net: &Precond, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let cfg = &net.config;
    let mut p = net.init_params(seed);
    for (s, v) in net.specs.iter().zip(p.values.iter_mut()) {
        if s.shape.is_empty() {
            v[0] = 0.7;
        }
    }
    let n = 6;
    let r = cfg.img_resolution;
    let c = cfg.img_channels;
    let mut rng = Rng::new(seed + 1);
    let images = Tensor::from_vec(&[n, r, r, c], rng.normal_vec(n * r * r * c));
    let sigma: Vec<f32> = (0..n).map(|i| 0.05 * 3f32.powi(i as i32)).collect();
    let mut x = images.clone();
    for (i, v) in x.data.iter_mut().enumerate() {
        *v += sigma[i / (r * r * c)] * rng.normal() as f32;
    }
    let mut labels = Tensor::zeros(&[n, cfg.label_dim]);
    for b in 0..n {
        labels.data[b * cfg.label_dim + b % cfg.label_dim] = 1.0;
    }
    net.force_normalize(&mut p);
    let mode = Mode::train(77);
    let out = net.forward(&p, &x, &sigma, Some(&labels), &mode, false);
    let l = edm2_loss(&out.d, &out.logvar, &images, &sigma, cfg.sigma_data);
    let g = net.backward(&p, out.cache.unwrap(), &l.dd, &l.dlogvar, &mode);
    let mut adam = edm2::train::adam::Adam::new(&net.specs);
    adam.step(&net.specs, &mut p, &g, 1e-3);
    (out.d.data, out.logvar, g.values.into_iter().chain(p.values).collect())
}

#[test]
fn forward_backward_adam_are_bit_identical() {
    let mut cfg = NetConfig::resolve("cpu-xs16").unwrap();
    cfg.dropout = 0.1;
    let net = Precond::new(&cfg).unwrap();
    let a = step(&net, 3);
    let b = step(&net, 3);
    // Compare bit patterns (NaN-safe, -0.0 ≠ 0.0).
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert_eq!(bits(&a.0), bits(&b.0), "D differs between runs");
    assert_eq!(bits(&a.1), bits(&b.1), "logvar differs between runs");
    for (i, (x, y)) in a.2.iter().zip(&b.2).enumerate() {
        assert_eq!(bits(x), bits(y), "gradient/param tensor {i} differs between runs");
    }
    // A different seed gives different numbers (the comparison is not vacuous).
    let c = step(&net, 4);
    assert_ne!(bits(&a.0), bits(&c.0));
}
