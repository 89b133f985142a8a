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
    pub fn step(&mut self, specs: &[ParamSpec], params: &mut Params, grads: &Params, lr: f64) {
        let _prof = crate::profile::scope("adam");
        self.t += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - self.beta2.powi(self.t as i32)).sqrt();
        let step_size = (lr / bc1) as f32;
        let (bc2_sqrt, eps) = (bc2_sqrt as f32, self.eps as f32);
        for (i, s) in specs.iter().enumerate() {
            if s.kind != ParamKind::Param {
                continue;
            }
            let (p, g, m, v) = (&mut params.values[i], &grads.values[i], &mut self.m.values[i], &mut self.v.values[i]);
            p.par_chunks_mut(1 << 14)
                .zip(g.par_chunks(1 << 14))
                .zip(m.par_chunks_mut(1 << 14))
                .zip(v.par_chunks_mut(1 << 14))
                .for_each(|(((p, g), m), v)| adam_kernel(p, g, m, v, [b1, b2, bc2_sqrt, eps, step_size]));
        }
    }
}

crate::multiversion! {
    /// The elementwise Adam update on one slice; `c` = [β1, β2, sqrt(1−β2ᵗ), ε, lr/(1−β1ᵗ)].
    fn adam_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: [f32; 5]) {
        let [b1, b2, bc2_sqrt, eps, step_size] = c;
        for j in 0..p.len() {
            m[j] = b1 * m[j] + (1.0 - b1) * g[j];
            v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
            let denom = v[j].sqrt() / bc2_sqrt + eps;
            p[j] -= step_size * m[j] / denom;
        }
    }
}
