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

/// One average's update `ema ← lerp(ema, net, w)` (w = 1 − β) over the trained tensors;
/// buffers are copied from the net.
pub fn lerp_params(specs: &[ParamSpec], ema: &mut Params, net: &Params, w: f32) {
    for ((e, n), s) in ema.values.iter_mut().zip(&net.values).zip(specs) {
        if s.kind == ParamKind::Buffer {
            e.copy_from_slice(n);
        } else {
            lerp_slice(e, n, w);
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
            lerp_params(specs, ema, net, (1.0 - beta) as f32);
            betas.push(beta);
        }
        betas
    }
}

/// The traditional EMA as an option (official `TraditionalEMA`): half-life
/// `h = min(halflife_Mimg·10⁶, t·rampup_ratio)` images, `β = 0.5^(batch / max(h, 1e-8))`.
#[derive(Clone, Debug)]
pub struct TraditionalEma {
    pub halflife_mimg: f64,
    pub rampup_ratio: Option<f64>,
    pub ema: Params,
}

impl TraditionalEma {
    pub fn beta(&self, cur_nimg: u64, batch_size: u64) -> f64 {
        let mut h = self.halflife_mimg * 1e6;
        if let Some(r) = self.rampup_ratio {
            h = h.min(cur_nimg as f64 * r);
        }
        0.5f64.powf(batch_size as f64 / h.max(1e-8))
    }

    pub fn update(&mut self, specs: &[ParamSpec], net: &Params, cur_nimg: u64, batch_size: u64) -> f64 {
        let beta = self.beta(cur_nimg, batch_size);
        lerp_params(specs, &mut self.ema, net, (1.0 - beta) as f32);
        beta
    }
}

/// What a training run averages: power-function EMAs (the default, for post-hoc EMA) or
/// one traditional EMA.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EmaOptions {
    Power { stds: Vec<f64> },
    Traditional { halflife_mimg: f64, rampup_ratio: Option<f64> },
}

#[derive(Clone, Debug)]
pub enum EmaSet {
    Power(PowerEma),
    Traditional(TraditionalEma),
}

impl EmaSet {
    pub fn new(o: &EmaOptions, init: &Params) -> Result<Self> {
        Ok(match o {
            EmaOptions::Power { stds } => EmaSet::Power(PowerEma::new(stds, init)?),
            EmaOptions::Traditional { halflife_mimg, rampup_ratio } => {
                EmaSet::Traditional(TraditionalEma { halflife_mimg: *halflife_mimg, rampup_ratio: *rampup_ratio, ema: init.clone() })
            }
        })
    }

    pub fn update(&mut self, specs: &[ParamSpec], net: &Params, cur_nimg: u64, batch_size: u64) {
        match self {
            EmaSet::Power(p) => {
                p.update(specs, net, cur_nimg, batch_size);
            }
            EmaSet::Traditional(t) => {
                t.update(specs, net, cur_nimg, batch_size);
            }
        }
    }

    /// The lerp weight `1 − β` of each average (in [`EmaSet::averages`] order) for the
    /// update after a step that brought the images seen to `cur_nimg` — what
    /// [`EmaSet::update`] uses (for the same update done elsewhere, e.g. on a device).
    pub fn weights(&self, cur_nimg: u64, batch_size: u64) -> Vec<f32> {
        match self {
            EmaSet::Power(p) => {
                p.exps.iter().map(|&g| (1.0 - phema::power_function_beta(g, cur_nimg as f64, batch_size as f64)) as f32).collect()
            }
            EmaSet::Traditional(t) => vec![(1.0 - t.beta(cur_nimg, batch_size)) as f32],
        }
    }

    /// Every tracked average with its σ_rel (None for the traditional EMA).
    pub fn averages(&self) -> Vec<(Option<f64>, &Params)> {
        match self {
            EmaSet::Power(p) => p.stds.iter().map(|s| Some(*s)).zip(p.emas.iter()).collect(),
            EmaSet::Traditional(t) => vec![(None, &t.ema)],
        }
    }

    pub fn averages_mut(&mut self) -> Vec<&mut Params> {
        match self {
            EmaSet::Power(p) => p.emas.iter_mut().collect(),
            EmaSet::Traditional(t) => vec![&mut t.ema],
        }
    }
}
