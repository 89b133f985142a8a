//! Power-function EMA mathematics (paper §3.1 and Appendix C, DESIGN.md §2): the exponent
//! γ of a relative width σ_rel, the per-step β, the inner product of two power-function
//! profiles and the post-hoc reconstruction coefficients. All in f64, as the official
//! `training/phema.py` computes them.
//!
//! ```
//! use edm2::phema;
//! // Snapshots of σ_rel 0.05 and 0.10 every 8 Mi images up to 64 Mi; reconstruct 0.07.
//! let mut ofs = vec![];
//! let mut std = vec![];
//! for k in 1..=8u64 {
//!     for s in [0.05, 0.10] {
//!         ofs.push((k << 23) as f64);
//!         std.push(s);
//!     }
//! }
//! let c = phema::solve_posthoc_coefficients(&ofs, &std, &[(8u64 << 23) as f64], &[0.07]).unwrap();
//! let total: f64 = c.iter().map(|row| row[0]).sum();
//! assert!((total - 1.0).abs() < 1e-12); // each output's coefficients sum to 1
//! ```

pub mod reconstruct;

use crate::error::{Error, Result};

/// Largest valid relative width: σ_rel < 12^(−1/2) (γ > −1).
pub const MAX_STD: f64 = 0.288_675_134_594_812_9;

/// γ for a relative width σ_rel: the largest real root of
/// `γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0` (paper Eq. 118 inverted).
pub fn std_to_exp(std: f64) -> Result<f64> {
    if !(std > 0.0 && std < MAX_STD) {
        return Err(Error::Input(format!("EMA std {std} is outside (0, {MAX_STD:.4}) (σ_rel must be below 12^-1/2)")));
    }
    let t = std.powi(-2);
    let f = |g: f64| ((g + 7.0) * g + (16.0 - t)) * g + (12.0 - t);
    let df = |g: f64| (3.0 * g + 14.0) * g + (16.0 - t);
    // f is increasing and convex to the right of its larger critical point, so Newton from
    // an upper bound of the largest root converges monotonically to it.
    let mut g = t.sqrt() + 8.0;
    for _ in 0..200 {
        let step = f(g) / df(g);
        g -= step;
        if step.abs() <= 1e-15 * g.abs().max(1.0) {
            break;
        }
    }
    Ok(g)
}

/// σ_rel of exponent γ: `sqrt((γ+1) / ((γ+2)² (γ+3)))`.
pub fn exp_to_std(exp: f64) -> f64 {
    ((exp + 1.0) / ((exp + 2.0).powi(2) * (exp + 3.0))).sqrt()
}

/// EMA decay for the step that brings the images seen to `t_next` (this step's `t_delta`
/// images included): `β = (1 − t_delta/t_next)^(γ+1)`; the first step gives β = 0.
pub fn power_function_beta(exp: f64, t_next: f64, t_delta: f64) -> f64 {
    (1.0 - t_delta / t_next).powf(exp + 1.0)
}

/// Inner product of the power-function profiles (t_a, γ_a) and (t_b, γ_b):
/// `(γa+1)(γb+1)(ta/tb)^e / ((γa+γb+1)·max(ta, tb))`, `e = γb` if ta < tb else `−γa`.
pub fn power_function_correlation(ta: f64, ga: f64, tb: f64, gb: f64) -> f64 {
    let e = if ta < tb { gb } else { -ga };
    (ga + 1.0) * (gb + 1.0) * (ta / tb).powf(e) / ((ga + gb + 1.0) * ta.max(tb))
}

/// The EMA profile (weight of the training-time sample `t` = 0..len) of a power-function
/// EMA of width `std` read at time `ofs`: `(t/ofs)^γ·(γ+1)/ofs` for `t ≤ ofs`, else 0,
/// normalized to sum 1.
pub fn power_function_response(ofs: f64, std: f64, len: usize) -> Result<Vec<f64>> {
    let g = std_to_exp(std)?;
    let mut r: Vec<f64> = (0..len)
        .map(|t| {
            let t = t as f64;
            if t <= ofs {
                (t / ofs).powf(g) / ofs * (g + 1.0)
            } else {
                0.0
            }
        })
        .collect();
    let s: f64 = r.iter().sum();
    r.iter_mut().for_each(|v| *v /= s);
    Ok(r)
}

/// Post-hoc EMA coefficients: `coefs[i][j]` is the weight of input snapshot `i` (time
/// `in_ofs[i]`, width `in_std[i]`) in output profile `j`. Solves `A X = B` (Gram matrix of
/// the inputs, cross products with the outputs) by Gaussian elimination with partial
/// pivoting, then normalizes each column to sum to 1 (as the official code).
pub fn solve_posthoc_coefficients(in_ofs: &[f64], in_std: &[f64], out_ofs: &[f64], out_std: &[f64]) -> Result<Vec<Vec<f64>>> {
    let n = in_ofs.len();
    if n == 0 || in_std.len() != n || out_ofs.len() != out_std.len() {
        return Err(Error::Input("post-hoc EMA needs at least one input and matching lengths".into()));
    }
    let ig: Vec<f64> = in_std.iter().map(|&s| std_to_exp(s)).collect::<Result<_>>()?;
    let og: Vec<f64> = out_std.iter().map(|&s| std_to_exp(s)).collect::<Result<_>>()?;
    let m = out_ofs.len();
    let mut a = vec![vec![0.0f64; n]; n];
    let mut b = vec![vec![0.0f64; m]; n];
    for i in 0..n {
        for k in 0..n {
            a[i][k] = power_function_correlation(in_ofs[i], ig[i], in_ofs[k], ig[k]);
        }
        for j in 0..m {
            b[i][j] = power_function_correlation(in_ofs[i], ig[i], out_ofs[j], og[j]);
        }
    }
    // Forward elimination with partial pivoting.
    for col in 0..n {
        let piv = (col..n).max_by(|&x, &y| a[x][col].abs().partial_cmp(&a[y][col].abs()).unwrap()).unwrap();
        if a[piv][col] == 0.0 || !a[piv][col].is_finite() {
            return Err(Error::Input("post-hoc EMA: the snapshot profiles are linearly dependent (duplicate snapshots?)".into()));
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for r in col + 1..n {
            let f = a[r][col] / a[col][col];
            if f == 0.0 {
                continue;
            }
            for c in col..n {
                a[r][c] -= f * a[col][c];
            }
            for j in 0..m {
                b[r][j] -= f * b[col][j];
            }
        }
    }
    // Back substitution.
    let mut x = vec![vec![0.0f64; m]; n];
    for j in 0..m {
        for r in (0..n).rev() {
            let mut s = b[r][j];
            for c in r + 1..n {
                s -= a[r][c] * x[c][j];
            }
            x[r][j] = s / a[r][r];
        }
        let sum: f64 = (0..n).map(|r| x[r][j]).sum();
        for row in x.iter_mut() {
            row[j] /= sum;
        }
    }
    Ok(x)
}

/// nimg recovered from a snapshot's kimg (file name): `(kimg·1000 + 999) // 1024 · 1024`.
pub fn kimg_to_nimg(kimg: u64) -> u64 {
    (kimg * 1000 + 999) / 1024 * 1024
}
