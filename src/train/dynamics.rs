//! The paper's view of training dynamics (Karras et al. 2024, §2–3 and Fig. 2/3): how the
//! magnitudes of each block's activations and of each weight tensor move during training,
//! how big the updates are relative to the weights, and the loss at each noise level.
//! Measured on a fixed probe batch (fixed images, σ per image from fixed buckets, noise
//! from the seed) in eval mode, so two measurements — of one run over time, or of two
//! checkpoints — are comparable and repeat bit for bit.

use crate::nn::layers::Mode;
use crate::nn::{Params, Precond};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The noise levels of the probe: one bucket per value, log-spaced over the range where
/// the EDM2 training distribution (P_mean −0.4, P_std 1.0) puts its weight, plus the tails.
pub const SIGMA_BUCKETS: [f32; 8] = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0];

/// A fixed probe batch: clean images `y` and noisy inputs `x = y + σ·n` (NHWC), σ of image
/// `i` = `SIGMA_BUCKETS[i % 8]`, labels (conditional nets) class `i % label_dim`.
pub struct Probe {
    pub y: Tensor,
    pub x: Tensor,
    pub sigma: Vec<f32>,
    pub labels: Option<Tensor>,
}

impl Probe {
    /// From clean NHWC images `y` `[n, r, r, c]` (as the network sees data: pixels in
    /// [−1, 1] or normalized latents); the noise of image `i` is `Rng::new(seed ^ i)`.
    pub fn new(y: Tensor, label_dim: usize, seed: u64) -> Probe {
        let n = y.shape[0];
        let per = y.data.len() / n.max(1);
        let sigma: Vec<f32> = (0..n).map(|i| SIGMA_BUCKETS[i % SIGMA_BUCKETS.len()]).collect();
        let mut x = y.clone();
        for (i, img) in x.data.chunks_mut(per).enumerate() {
            let noise = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).normal_vec(per);
            for (v, e) in img.iter_mut().zip(noise) {
                *v += sigma[i] * e;
            }
        }
        let labels = (label_dim > 0).then(|| {
            let mut l = Tensor::zeros(&[n, label_dim]);
            for i in 0..n {
                l.data[i * label_dim + i % label_dim] = 1.0;
            }
            l
        });
        Probe { y, x, sigma, labels }
    }

    /// Synthetic clean images for a network without its data: N(0, σ_data²) per value
    /// from `Rng::new(seed)` — the scale of the data the network was trained on.
    pub fn synthetic(net: &Precond, n: usize, seed: u64) -> Probe {
        let c = &net.config;
        let shape = [n, c.img_resolution, c.img_resolution, c.img_channels];
        let count = shape.iter().product();
        let y: Vec<f32> = Rng::new(seed).normal_vec(count).iter().map(|v| v * c.sigma_data).collect();
        Probe::new(Tensor::from_vec(&shape, y), c.label_dim, seed)
    }
}

/// One measurement: per block (official module names, encoder then decoder order), the
/// RMS of its output and, for the residual blocks, of its residual branch (`conv_res1`'s
/// output before the mp_sum with the skip); per magnitude-preserving weight tensor, the RMS of the stored
/// weight and, against an earlier parameter set, `‖W − W_prev‖ / ‖W_prev‖`; per σ
/// bucket, the EDM-weighted denoising error `λ(σ)·mean((D − y)²)`,
/// `λ(σ) = (σ² + σ_data²)/(σ·σ_data)²` (1 for a perfect D, ≈ 1 for D = y·c_skip at
/// the start of training).
#[derive(Clone, Debug, PartialEq)]
pub struct Dynamics {
    pub activations: Vec<(String, f64)>,
    pub branches: Vec<(String, f64)>,
    pub weights: Vec<WeightStat>,
    pub loss_by_sigma: Vec<(f32, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WeightStat {
    pub name: String,
    pub rms: f64,
    pub rel_update: Option<f64>,
}

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// Measures `net` with parameters `p` on `probe` (eval mode, CPU backend); `prev`: the
/// parameters of the previous measurement, for the relative update sizes.
pub fn measure(net: &Precond, p: &Params, probe: &Probe, prev: Option<&Params>) -> Dynamics {
    let out = net.forward(p, &probe.x, &probe.sigma, probe.labels.as_ref(), &Mode::eval(), true);
    let of = |prefix: &str| -> Vec<(String, f64)> {
        out.intermediates.iter().filter_map(|(name, t)| name.strip_prefix(prefix).map(|n| (n.to_string(), rms(&t.data)))).collect()
    };
    let (activations, branches) = (of("act."), of("branch."));
    let weights = net
        .specs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_mp_weight)
        .map(|(id, s)| {
            let w = &p.values[id];
            let rel_update = prev.map(|q| {
                let (d, base) = w.iter().zip(&q.values[id]).fold((0.0f64, 0.0f64), |(d, b), (&a, &o)| {
                    let diff = a as f64 - o as f64;
                    (d + diff * diff, b + o as f64 * o as f64)
                });
                (d / base.max(f64::MIN_POSITIVE)).sqrt()
            });
            WeightStat { name: s.name.clone(), rms: rms(w), rel_update }
        })
        .collect();
    let sd = net.config.sigma_data as f64;
    let per = probe.y.data.len() / probe.sigma.len().max(1);
    let loss_by_sigma = SIGMA_BUCKETS
        .iter()
        .filter_map(|&s| {
            let idx: Vec<usize> = (0..probe.sigma.len()).filter(|&i| probe.sigma[i] == s).collect();
            if idx.is_empty() {
                return None;
            }
            let sig = s as f64;
            let lambda = (sig * sig + sd * sd) / (sig * sd).powi(2);
            let mse = idx
                .iter()
                .map(|&i| {
                    let (d, y) = (&out.d.data[i * per..(i + 1) * per], &probe.y.data[i * per..(i + 1) * per]);
                    d.iter().zip(y).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / per as f64
                })
                .sum::<f64>()
                / idx.len() as f64;
            Some((s, lambda * mse))
        })
        .collect();
    Dynamics { activations, branches, weights, loss_by_sigma }
}

impl Dynamics {
    /// One JSON record (a line of `dynamics.jsonl`): `kimg`, `act` {block: rms}, `branch`
    /// {block: rms of its residual branch}, `weight_rms` {tensor: rms}, `rel_update` {tensor: ratio} (when known) and
    /// `loss_by_sigma` [[σ, loss], ...].
    pub fn to_json(&self, kimg: f64) -> serde_json::Value {
        let map = |v: &[(String, f64)]| -> serde_json::Map<String, serde_json::Value> { v.iter().map(|(n, x)| (n.clone(), serde_json::json!(x))).collect() };
        let (act, branch) = (map(&self.activations), map(&self.branches));
        let wr: serde_json::Map<String, serde_json::Value> = self.weights.iter().map(|w| (w.name.clone(), serde_json::json!(w.rms))).collect();
        let up: serde_json::Map<String, serde_json::Value> =
            self.weights.iter().filter_map(|w| w.rel_update.map(|u| (w.name.clone(), serde_json::json!(u)))).collect();
        let mut rec = serde_json::json!({
            "kimg": kimg,
            "act": act,
            "branch": branch,
            "weight_rms": wr,
            "loss_by_sigma": self.loss_by_sigma.iter().map(|(s, l)| serde_json::json!([s, l])).collect::<Vec<_>>(),
        });
        if !up.is_empty() {
            rec["rel_update"] = serde_json::Value::Object(up);
        }
        rec
    }
}
