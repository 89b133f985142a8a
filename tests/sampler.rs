//! The EDM sampler against the official `edm_sampler` run on the cond16 fixture
//! (golden/cond16.sample.*): the σ schedule, the σ of every denoiser call, guidance 1,
//! autoguidance with a second network (1.7) and stochastic churn with the recorded noise.

mod common;
use common::*;
use edm2::sample::{edm_sampler, sigma_steps, SamplerOpts};
use edm2::{NetConfig, Params, Precond, Tensor};

fn opts() -> SamplerOpts {
    SamplerOpts { num_steps: 8, ..Default::default() }
}

#[test]
fn sigma_schedule_in_float32() {
    let f = golden("cond16.sample.safetensors");
    let want = tensor(&f, "t_steps").data;
    assert_eq!(sigma_steps(&opts()), want);
    assert_eq!(sigma_steps(&opts())[0], 79.99998474121094f32);
}

fn run(guide: bool, churn: bool) -> (Tensor, Vec<f32>) {
    let (net, p) = cond16();
    let f = golden("cond16.sample.safetensors");
    let noise = tensor(&f, "noise").nchw_to_nhwc();
    let labels = tensor(&f, "class_labels");
    let gcfg = NetConfig::from_json_str(&std::fs::read_to_string(golden_path("cond16.config.json")).unwrap()).unwrap();
    let gnet = Precond::new(&gcfg).unwrap();
    let gp = Params::from_file(&gnet.specs, &golden("cond16_gnet.weights.safetensors")).unwrap();
    let mut o = opts();
    if guide {
        o.guidance = 1.7;
    }
    if churn {
        o.s_churn = 2.0;
        o.s_min = 0.05;
        o.s_max = 50.0;
        o.s_noise = 1.003;
    }
    let cn = tensor(&f, "churn_noise"); // [5, 4, 3, 16, 16]
    let per = cn.numel() / 5;
    let mut churn_noise = |k: usize| Tensor::from_vec(&[4, 3, 16, 16], cn.data[k * per..(k + 1) * per].to_vec()).nchw_to_nhwc();
    let mut sigmas = Vec::new();
    let x = edm_sampler((&net, &p), guide.then_some((&gnet, &gp)), &noise, Some(&labels), &o, &mut churn_noise, &mut |s| sigmas.push(s));
    (x.nhwc_to_nchw(), sigmas)
}

#[test]
fn heun_guidance_1_matches_official() {
    let f = golden("cond16.sample.safetensors");
    let (x, sigmas) = run(false, false);
    assert_eq!(sigmas, tensor(&f, "calls_sigma_g1").data, "σ of each denoiser call");
    let want = tensor(&f, "x_g1");
    let e = max_abs_diff(&x.data, &want.data);
    // The official float32 run differs from its own float64 run by 3.2e-6.
    assert!(e < 2e-5, "x_g1 max abs diff {e:e}");
}

#[test]
fn autoguidance_matches_official() {
    let f = golden("cond16.sample.safetensors");
    let (x, sigmas) = run(true, false);
    assert_eq!(sigmas.len(), 15);
    let e = rel_l2(&x.data, &tensor(&f, "x_g17").data);
    assert!(e < 1e-5, "x_g17 rel L2 {e:e}");
    // Guidance changes the result (the comparison is not vacuous).
    assert!(rel_l2(&x.data, &tensor(&f, "x_g1").data) > 1e-3);
}

#[test]
fn stochastic_churn_matches_official() {
    let f = golden("cond16.sample.safetensors");
    let (x, _) = run(false, true);
    let e = rel_l2(&x.data, &tensor(&f, "x_churn").data);
    assert!(e < 1e-5, "x_churn rel L2 {e:e}");
}
