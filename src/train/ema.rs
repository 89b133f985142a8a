//! Power-function EMA of the training weights for several σ_rel at once (paper §3.1):
//! after each step, with `t` = images seen including it, `β = (1 − batch/t)^(γ+1)` and
//! `ema ← lerp(ema, net, 1 − β)` — the first update copies the net. Buffers are copied.

use crate::error::Result;
use crate::nn::params::{ParamKind, ParamSpec, Params};
use crate::phema;

#[derive(Clone, Debug)]
pub struct PowerEma {
    /// σ_rel of each tracked EMA.
    pub stds: Vec<f64>,
    /// γ of each tracked EMA.
    pub exps: Vec<f64>,
    /// The averaged weights, one copy per σ_rel.
    pub emas: Vec<Params>,
}

/// `a.lerp_(b, w)` as PyTorch's CPU kernel evaluates it in f32: `a + w·(b − a)` for
/// |w| < 0.5, else `b − (b − a)·(1 − w)`, each with a fused multiply-add (bit-identical
/// to the official EMA trace in golden/phema.json).
#[inline(always)]
pub fn torch_lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        w.mul_add(b - a, a)
    } else {
        (-(b - a)).mul_add(1.0 - w, b)
    }
}

crate::multiversion! {
    /// `e ← lerp(e, n, w)` over a slice (FMA instructions where the CPU has them).
    fn lerp_slice(e: &mut [f32], n: &[f32], w: f32) {
        for (a, &b) in e.iter_mut().zip(n) {
            *a = torch_lerp(*a, b, w);
        }
    }
}

impl PowerEma {
    /// EMAs starting from `init` (the official code starts them as copies of the net).
    pub fn new(stds: &[f64], init: &Params) -> Result<Self> {
        let exps = stds.iter().map(|&s| phema::std_to_exp(s)).collect::<Result<Vec<_>>>()?;
        Ok(PowerEma { stds: stds.to_vec(), exps, emas: vec![init.clone(); stds.len()] })
    }

    /// One update after a step that brought the images seen to `cur_nimg`. Returns the β
    /// used for each EMA.
    pub fn update(&mut self, specs: &[ParamSpec], net: &Params, cur_nimg: u64, batch_size: u64) -> Vec<f64> {
        let mut betas = Vec::with_capacity(self.emas.len());
        for (ema, &g) in self.emas.iter_mut().zip(&self.exps) {
            let beta = phema::power_function_beta(g, cur_nimg as f64, batch_size as f64);
            let w = (1.0 - beta) as f32;
            for ((e, n), s) in ema.values.iter_mut().zip(&net.values).zip(specs) {
                if s.kind == ParamKind::Buffer {
                    e.copy_from_slice(n);
                    continue;
                }
                lerp_slice(e, n, w);
            }
            betas.push(beta);
        }
        betas
    }
}
