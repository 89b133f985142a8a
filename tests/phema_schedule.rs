//! Power-function EMA math, the EMA update and the learning-rate schedule against the
//! official implementation (`golden/phema.json`, `golden/lr_schedule.json`).

mod common;
use common::*;
use edm2::nn::params::{ParamKind, ParamSpec, Params};
use edm2::phema;
use edm2::train::{ema::PowerEma, schedule::learning_rate};
use serde_json::Value;

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden_path(name)).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

#[test]
fn std_exp_conversions() {
    let j = json("phema.json");
    for (s, e) in f64s(&j["std_to_exp"]["std"]).iter().zip(f64s(&j["std_to_exp"]["exp"])) {
        let g = phema::std_to_exp(*s).unwrap();
        assert!(rel(g, e) < 1e-12, "std_to_exp({s}) = {g} vs {e}");
        assert!(rel(phema::exp_to_std(g), *s) < 1e-12);
    }
    for (e, s) in f64s(&j["exp_to_std_extra"]["exp"]).iter().zip(f64s(&j["exp_to_std_extra"]["std"])) {
        assert!(rel(phema::exp_to_std(*e), s) < 1e-12);
    }
    for bad in [0.0, -0.1, 0.2887, 0.3, f64::NAN] {
        assert!(phema::std_to_exp(bad).is_err(), "{bad} must be rejected");
    }
}

#[test]
fn betas_and_ema_trace() {
    let j = json("phema.json");
    for c in j["power_function_beta"].as_array().unwrap() {
        let g = phema::std_to_exp(c["std"].as_f64().unwrap()).unwrap();
        let b = phema::power_function_beta(g, c["t_next"].as_f64().unwrap(), c["t_delta"].as_f64().unwrap());
        let want = c["beta"].as_f64().unwrap();
        assert!((b - want).abs() <= 1e-12 * want.max(1e-6), "{c}: {b}");
    }
    // The official PowerFunctionEMA on a 3-parameter net, bit for bit in f32.
    let t = &j["power_function_ema_trace"];
    let stds = f64s(&t["stds"]);
    let batch = t["batch_size"].as_u64().unwrap();
    let specs = vec![ParamSpec { name: "p".into(), shape: vec![3], kind: ParamKind::Param, is_mp_weight: false }];
    let mut ema = PowerEma::new(&stds, &Params::zeros(&specs)).unwrap();
    for step in t["steps"].as_array().unwrap() {
        let net = Params { values: vec![f64s(&step["net_p"]).iter().map(|&v| v as f32).collect()] };
        let betas = ema.update(&specs, &net, step["cur_nimg"].as_u64().unwrap(), batch);
        for (k, b) in f64s(&step["beta"]).iter().enumerate() {
            assert!((betas[k] - b).abs() <= 1e-12 * b.max(1e-6));
            let want: Vec<f32> = f64s(&step["ema_p"][k]).iter().map(|&v| v as f32).collect();
            assert_eq!(ema.emas[k].values[0], want, "step {} std {}", step["cur_nimg"], stds[k]);
        }
    }
}

#[test]
fn posthoc_coefficients_match_official() {
    let j = json("phema.json");
    for c in j["solve_posthoc_coefficients"].as_array().unwrap() {
        let (in_ofs, in_std) = (f64s(&c["in_ofs"]), f64s(&c["in_std"]));
        let out_std = f64s(&c["out_std"]);
        let out_ofs = vec![c["out_ofs"].as_f64().unwrap(); out_std.len()];
        let x = phema::solve_posthoc_coefficients(&in_ofs, &in_std, &out_ofs, &out_std).unwrap();
        let want: Vec<Vec<f64>> = c["coefs"].as_array().unwrap().iter().map(f64s).collect();
        let mut worst = 0.0f64;
        for (i, row) in want.iter().enumerate() {
            for (k, w) in row.iter().enumerate() {
                worst = worst.max((x[i][k] - w).abs());
            }
        }
        // The systems are ill-conditioned; both solvers are LU with partial pivoting in f64.
        eprintln!("{}: max abs coefficient difference {worst:e}", c["name"]);
        assert!(worst < 1e-9, "{}: max abs coefficient difference {worst:e}", c["name"]);
        for k in 0..out_std.len() {
            let s: f64 = x.iter().map(|r| r[k]).sum();
            assert!((s - 1.0).abs() < 1e-12);
        }
        if let Some(kimg) = c.get("in_kimg") {
            for (k, n) in f64s(kimg).iter().zip(&in_ofs) {
                assert_eq!(phema::kimg_to_nimg(*k as u64) as f64, *n);
            }
        }
    }
}

#[test]
fn learning_rate_schedule_matches_official() {
    let j = json("lr_schedule.json");
    let cases = j["cases"].as_array().unwrap();
    assert!(cases.len() > 10);
    for c in cases {
        let f = |k: &str| c[k].as_f64().unwrap();
        let lr = learning_rate(f("cur_nimg"), f("batch_size"), f("ref_lr"), f("ref_batches"), f("rampup_Mimg"));
        assert!((lr - f("lr")).abs() <= 1e-15 + 1e-12 * f("lr"), "{c}: {lr}");
    }
    // The Adam fixture's learning rate (golden README).
    assert!((learning_rate(512000.0, 128.0, 0.01, 1000.0, 1.0) - 0.00256).abs() < 1e-15);
}
