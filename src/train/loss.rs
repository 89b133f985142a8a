//! The uncertainty-weighted EDM2 loss (paper Eq. 21, DESIGN.md §2), with its gradient.

use crate::tensor::Tensor;

/// `λ(σ) = (σ² + σd²) / (σ·σd)²`.
pub fn loss_weight(sigma: f32, sigma_data: f32) -> f32 {
    (sigma * sigma + sigma_data * sigma_data) / ((sigma * sigma_data) * (sigma * sigma_data))
}

pub struct LossOut {
    /// `Σ loss / N` — the value that is back-propagated.
    pub total: f64,
    /// Per-sample sums of the elementwise loss.
    pub per_sample: Vec<f64>,
    /// dL/dD (same layout as `d`).
    pub dd: Tensor,
    /// dL/dlogvar per sample.
    pub dlogvar: Vec<f32>,
}

/// Elementwise `λ/exp(u)·(D − y)² + u`, summed and divided by the batch size.
/// `d`, `images`: same shape, batch first; `logvar`, `sigma`: per sample.
pub fn edm2_loss(d: &Tensor, logvar: &[f32], images: &Tensor, sigma: &[f32], sigma_data: f32) -> LossOut {
    let n = d.shape[0];
    let per = d.numel() / n;
    let mut dd = Tensor::zeros(&d.shape);
    let mut per_sample = vec![0.0f64; n];
    let mut dlogvar = vec![0.0f32; n];
    for b in 0..n {
        let w = loss_weight(sigma[b], sigma_data) / logvar[b].exp();
        let mut sum = 0.0f64;
        let mut dsum = 0.0f64;
        for i in b * per..(b + 1) * per {
            let r = d.data[i] - images.data[i];
            let l = w * r * r;
            sum += (l + logvar[b]) as f64;
            dsum += (1.0 - l) as f64;
            dd.data[i] = 2.0 * w * r / n as f32;
        }
        per_sample[b] = sum;
        dlogvar[b] = (dsum / n as f64) as f32;
    }
    LossOut { total: per_sample.iter().sum::<f64>() / n as f64, per_sample, dd, dlogvar }
}
