//! Sampler exactness with closed-form ideal denoisers (issue checks): Gaussian data is
//! reproduced in mean and spread, a two-point data set is landed on exactly.

use edm2::rng::Rng;
use edm2::sample::{sample_with, SamplerOpts};
use edm2::Tensor;

#[test]
fn gaussian_data_is_reproduced() {
    let (mu, s) = (2.0f32, 0.5f32);
    let n = 4000;
    let noise = Tensor::from_vec(&[n, 1], Rng::new(11).normal_vec(n));
    let mut ideal = |x: &Tensor, t: f32| {
        let k = s * s / (s * s + t * t);
        Tensor::from_vec(&x.shape, x.data.iter().map(|v| mu + k * (v - mu)).collect())
    };
    for churn in [0.0, 10.0] {
        let o = SamplerOpts { s_churn: churn, ..Default::default() };
        let mut rng = Rng::new(12);
        let x = sample_with(&mut ideal, &noise, &o, &mut |_| Tensor::from_vec(&[n, 1], rng.normal_vec(n)));
        let mean = x.data.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let sd = (x.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        // Standard errors: mean 0.008, sd 0.0056.
        assert!((mean - mu as f64).abs() < 0.03, "churn {churn}: mean {mean}");
        assert!((sd - s as f64).abs() < 0.03, "churn {churn}: sd {sd}");
    }
}

#[test]
fn two_point_data_is_landed_on() {
    let pts = [-1.0f64, 1.0];
    let n = 256;
    let noise = Tensor::from_vec(&[n, 1], Rng::new(5).normal_vec(n));
    // Ideal denoiser of a mixture of two deltas: posterior mean of the points.
    let mut ideal = |x: &Tensor, t: f32| {
        let t = t as f64;
        let d = x
            .data
            .iter()
            .map(|&v| {
                let l: Vec<f64> = pts.iter().map(|p| -(v as f64 - p).powi(2) / (2.0 * t * t)).collect();
                let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
                (w[0] * pts[0] + w[1] * pts[1]) / (w[0] + w[1])
            })
            .map(|v| v as f32)
            .collect();
        Tensor::from_vec(&x.shape, d)
    };
    let x = sample_with(&mut ideal, &noise, &SamplerOpts::default(), &mut |_| unreachable!());
    let mut counts = [0, 0];
    for &v in &x.data {
        let k = if v < 0.0 { 0 } else { 1 };
        assert!((v as f64 - pts[k]).abs() < 1e-2, "sample {v} is not on a data point");
        counts[k] += 1;
    }
    // Both modes are reached (symmetric noise).
    assert!(counts[0] > 80 && counts[1] > 80, "{counts:?}");
}
