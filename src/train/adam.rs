//! Adam as PyTorch implements it (β = (0.9, 0.99), ε added to `sqrt(v̂)`, no weight
//! decay), with non-finite gradient entries zeroed first (DESIGN.md §2).

use crate::nn::params::{ParamKind, ParamSpec, Params};
use rayon::prelude::*;

#[derive(Clone, Debug)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub m: Params,
    pub v: Params,
    /// Steps taken so far.
    pub t: u64,
}

impl Adam {
    pub fn new(specs: &[ParamSpec]) -> Self {
        Adam { beta1: 0.9, beta2: 0.99, eps: 1e-8, m: Params::zeros(specs), v: Params::zeros(specs), t: 0 }
    }

    /// Replaces NaN/±inf gradient entries by zero; returns how many there were.
    pub fn sanitize(grads: &mut Params) -> usize {
        let mut count = 0;
        for v in grads.values.iter_mut() {
            for g in v.iter_mut() {
                if !g.is_finite() {
                    *g = 0.0;
                    count += 1;
                }
            }
        }
        count
    }

    /// One step on every parameter (buffers untouched):
    /// `m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²; p ← p − lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + ε)`.
    /// Returns how many entries of p, m or v the update left non-finite (a diverged run).
    pub fn step(&mut self, specs: &[ParamSpec], params: &mut Params, grads: &Params, lr: f64) -> usize {
        let h = self.hyper(lr);
        self.t = h.t;
        adam_update(specs, params, grads, &mut self.m, &mut self.v, &h)
    }

    /// The coefficients of the next step ([`Adam::t`] + 1) at learning rate `lr`.
    pub fn hyper(&self, lr: f64) -> AdamHyper {
        AdamHyper { lr, beta1: self.beta1, beta2: self.beta2, eps: self.eps, t: self.t + 1 }
    }
}

/// What one Adam step needs besides the tensors: the learning rate, the moments' decay
/// rates, ε and the step number `t` (counted from 1) of the bias corrections.
#[derive(Clone, Copy, Debug)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub t: u64,
}

/// [`Adam::step`] on moments held outside an [`Adam`] (the training step's, wherever the
/// state lives). Returns the number of p, m, v entries the update left non-finite, as the
/// device kernel counts them.
pub fn adam_update(specs: &[ParamSpec], params: &mut Params, grads: &Params, m: &mut Params, v: &mut Params, h: &AdamHyper) -> usize {
    let _prof = crate::profile::scope("adam");
    let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
    let bc1 = 1.0 - h.beta1.powi(h.t as i32);
    let bc2_sqrt = (1.0 - h.beta2.powi(h.t as i32)).sqrt();
    let step_size = (h.lr / bc1) as f32;
    let (bc2_sqrt, eps) = (bc2_sqrt as f32, h.eps as f32);
    let mut bad = 0usize;
    for (i, s) in specs.iter().enumerate() {
        if s.kind != ParamKind::Param {
            continue;
        }
        let (p, g, m, v) = (&mut params.values[i], &grads.values[i], &mut m.values[i], &mut v.values[i]);
        bad += p
            .par_chunks_mut(1 << 14)
            .zip(g.par_chunks(1 << 14))
            .zip(m.par_chunks_mut(1 << 14))
            .zip(v.par_chunks_mut(1 << 14))
            .map(|(((p, g), m), v)| adam_kernel(p, g, m, v, [b1, b2, bc2_sqrt, eps, step_size]))
            .sum::<usize>();
    }
    bad
}

crate::multiversion! {
    /// The elementwise Adam update on one slice; `c` = [β1, β2, sqrt(1−β2ᵗ), ε, lr/(1−β1ᵗ)].
    /// Returns how many entries it left non-finite (p, m or v).
    fn adam_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: [f32; 5]) -> usize {
        let [b1, b2, bc2_sqrt, eps, step_size] = c;
        let mut bad = 0u32;
        for j in 0..p.len() {
            m[j] = b1 * m[j] + (1.0 - b1) * g[j];
            v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
            let denom = v[j].sqrt() / bc2_sqrt + eps;
            p[j] -= step_size * m[j] / denom;
            bad += !(p[j].is_finite() && m[j].is_finite() && v[j].is_finite()) as u32;
        }
        bad as usize
    }
}
