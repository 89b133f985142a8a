//! The whole network — forced weight normalization, forward in training mode (dropout,
//! attention, labels, clipping) and the explicit backward — run by the one network
//! description on the CUDA backend, against the same description on the CPU backend.
//! With `--features cuda-sim` on the simulated device (CI); with `--features cuda` on a
//! GPU (skipped without one unless EDM2_REQUIRE_GPU=1). fp32 mode: D, logvar and every
//! parameter gradient within 1e-4 relative L2 (the CUDA issue's bound).
#![cfg(any(feature = "cuda", feature = "cuda-sim"))]

mod common;
use common::{device, rel_l2};
use edm2::backend::gpu::{Gpu, GpuParams};
use edm2::nn::layers::Mode;
use edm2::rng::Rng;
use edm2::{NetConfig, Precond, Tensor};

/// Every layer kind: 8x8 RGB, two levels (down/up resampling), attention at 4x4 with two
/// heads, labels, dropout, and a clip limit low enough to clip.
fn tiny() -> NetConfig {
    let mut c = NetConfig::with_defaults(8, 3, 10);
    c.model_channels = 16;
    c.channel_mult = vec![1, 2];
    c.num_blocks = 1;
    c.attn_resolutions = vec![4];
    c.channels_per_head = 16;
    c.dropout = 0.1;
    c.clip_act = Some(1.5);
    c.logvar_channels = 8;
    c.use_fp16 = false;
    c
}

#[test]
fn network_forward_and_backward_match_the_cpu_backend() {
    let Some(gpu) = device() else { return };
    // On the simulated device: under both thread schedules, with the same bits.
    #[cfg(feature = "cuda-sim")]
    {
        edm2::backend::gpu::kernels::set_reverse_schedule(true);
        let reverse = network_on_device(&gpu);
        edm2::backend::gpu::kernels::set_reverse_schedule(false);
        let forward = network_on_device(&gpu);
        assert!(reverse == forward, "the network's result depends on the thread schedule");
    }
    #[cfg(not(feature = "cuda-sim"))]
    network_on_device(&gpu);
}

#[test]
fn denoise_on_the_device_matches_the_cpu() {
    let Some(_gpu) = device() else { return };
    let net = Precond::new(&tiny()).unwrap();
    let mut params = net.init_params(9);
    for (s, v) in net.specs.iter().zip(params.values.iter_mut()) {
        if s.shape.is_empty() {
            v[0] = 0.7;
        }
    }
    let loaded = edm2::LoadedNet { net, params, metadata: Default::default() };
    let mut rng = Rng::new(10);
    let x = Tensor::from_vec(&[3, 3, 8, 8], rng.normal_vec(3 * 3 * 8 * 8));
    let sigma = [0.05f32, 1.0, 40.0];
    let (d_cpu, lv_cpu) = edm2::denoise(&loaded, &x, &sigma, None).unwrap();
    let (d_dev, lv_dev) = edm2::api::denoise_on(&loaded, &x, &sigma, None, edm2::backend::Device::Cuda).unwrap();
    assert_eq!(d_dev.shape, d_cpu.shape);
    // c_skip·x dominates D at small σ: compare D − c_skip·x as well, through F_x's scale.
    assert!(rel_l2(&d_dev.data, &d_cpu.data) < 1e-5, "D: {:.2e}", rel_l2(&d_dev.data, &d_cpu.data));
    let resid = |d: &[f32]| -> Vec<f32> {
        d.iter().zip(&x.data).enumerate().map(|(i, (v, xv))| v - edm2::nn::unet::precond_coefs(sigma[i / 192], 0.5).0 * xv).collect()
    };
    let e = rel_l2(&resid(&d_dev.data), &resid(&d_cpu.data));
    assert!(e < 1e-4, "c_out·F: {e:.2e}");
    assert!(rel_l2(&lv_dev, &lv_cpu) < 1e-5);
}

#[test]
fn network_in_bf16_mode_stays_within_the_bf16_bounds() {
    use edm2::backend::gpu::Precision;
    let Some(gpu) = device() else { return };
    gpu.set_precision(Precision::Bf16);
    let (d_err, g_err, worst) = network_errors(&gpu);
    eprintln!("bf16: D {d_err:.2e}, all gradients {g_err:.2e}, worst parameter {} {:.2e}", worst.1, worst.0);
    assert!(d_err < 2e-2 && d_err > 1e-6, "bf16 D: rel L2 {d_err:.2e}");
    assert!(g_err < 5e-2, "bf16 gradients: rel L2 {g_err:.2e}");
}

/// One training step's results on the CPU and on the device (all on the host).
struct Step {
    specs: Vec<edm2::nn::ParamSpec>,
    /// (CPU, device) of: the force-normalized weights, D, F_x, logvar, the gradients.
    weights: (edm2::Params, edm2::Params),
    d: (Vec<f32>, Vec<f32>),
    f_x: (Vec<f32>, Vec<f32>),
    logvar: (Vec<f32>, Vec<f32>),
    grads: (edm2::Params, edm2::Params),
}

/// Forced weight normalization, a training-mode forward (dropout) and the backward of a
/// random dD on the CPU and on `gpu`, from the same weights (gains non-zero so that
/// every branch contributes) and inputs.
fn training_step(gpu: &Gpu, cfg: &NetConfig) -> Step {
    let net = Precond::new(cfg).unwrap();
    let mut params = net.init_params(5);
    let mut rng = Rng::new(6);
    for (s, v) in net.specs.iter().zip(params.values.iter_mut()) {
        if s.shape.is_empty() {
            v[0] = 0.3 + rng.uniform() as f32;
        }
    }
    let n = 2;
    let x = Tensor::from_vec(&[n, 8, 8, 3], rng.normal_vec(n * 8 * 8 * 3));
    let sigma = [0.3f32, 2.5];
    let labels = (cfg.label_dim > 0).then(|| {
        let mut l = Tensor::zeros(&[n, cfg.label_dim]);
        l.data[3] = 1.0;
        l.data[cfg.label_dim + 7] = 1.0;
        l
    });
    let dd = rng.normal_vec(x.numel());
    let dlogvar = rng.normal_vec(n);
    let mode = Mode::train(1234);

    let mut p_cpu = params.clone();
    net.force_normalize(&mut p_cpu);
    let out = net.forward(&p_cpu, &x, &sigma, labels.as_ref(), &mode, false);
    let (d_cpu, f_cpu, lv_cpu) = (out.d.data.clone(), out.f_x.data.clone(), out.logvar.clone());
    let g_cpu = net.backward(&p_cpu, out.cache.unwrap(), &Tensor::from_vec(&x.shape, dd.clone()), &dlogvar, &mode);

    let mut gp = GpuParams::upload(gpu, &params).unwrap();
    net.force_normalize_on(gpu, &mut gp).unwrap();
    // As training runs it: the input x and D (and so dD) in fp32, the activations in the
    // device's precision.
    let xd = Tensor::with_buf(&x.shape, gpu.upload_input(&x.data).unwrap());
    let ld = labels.as_ref().map(|l| Tensor::with_buf(&l.shape, gpu.upload_act(&l.data).unwrap()));
    let od = net.forward_on(gpu, &gp, &xd, &sigma, ld.as_ref(), &mode, false).unwrap();
    assert_eq!(od.d.data.dtype(), edm2::backend::gpu::Dtype::F32, "D is fp32 in every precision");
    assert_eq!(od.f_x.data.dtype(), gpu.act_dtype(), "F_x is an activation");
    let (d_dev, f_dev) = (gpu.download_act(&od.d.data).unwrap(), gpu.download_act(&od.f_x.data).unwrap());
    let ddd = Tensor::with_buf(&x.shape, gpu.upload_input(&dd).unwrap());
    let lv_dev = gpu.download_act(&od.logvar).unwrap();
    let g_dev = net.backward_on(gpu, &gp, od.cache.unwrap(), &ddd, &gpu.upload_input(&dlogvar).unwrap(), &mode).unwrap().download(gpu).unwrap();
    Step {
        specs: net.specs.clone(),
        weights: (p_cpu, gp.download(gpu).unwrap()),
        d: (d_cpu, d_dev),
        f_x: (f_cpu, f_dev),
        logvar: (lv_cpu, lv_dev),
        grads: (g_cpu, g_dev),
    }
}

/// Relative L2 errors of (D, all gradients concatenated, the worst parameter) on the
/// device against the CPU backend, for the tiny network's training step.
fn network_errors(gpu: &Gpu) -> (f64, f64, (f64, String)) {
    let mut cfg = tiny();
    // No clipping: a value within bf16 rounding of the limit would switch its gradient
    // off on one backend only (a discontinuity, not an arithmetic error).
    cfg.clip_act = None;
    cfg.label_dim = 0;
    let st = training_step(gpu, &cfg);
    let (g_cpu, g_dev) = &st.grads;
    let mut worst = (0.0, String::new());
    for ((s, a), b) in st.specs.iter().zip(&g_dev.values).zip(&g_cpu.values) {
        if b.iter().any(|v| *v != 0.0) && rel_l2(a, b) > worst.0 {
            worst = (rel_l2(a, b), s.name.clone());
        }
        if std::env::var_os("EDM2_DEBUG_ERRORS").is_some() {
            eprintln!("{:50} {:.2e}  norm {:.3e}", s.name, rel_l2(a, b), common::rms(b) * (b.len() as f64).sqrt());
        }
    }
    (rel_l2(&st.d.1, &st.d.0), rel_l2(&g_dev.values.concat(), &g_cpu.values.concat()), worst)
}

/// The fp32 training step on the device checked against the CPU; returns everything the
/// device computed (D, F_x, logvar, gradients) for comparisons between runs.
fn network_on_device(gpu: &Gpu) -> Vec<Vec<f32>> {
    let st = training_step(gpu, &tiny());
    for ((s, a), b) in st.specs.iter().zip(&st.weights.1.values).zip(&st.weights.0.values) {
        assert!(rel_l2(a, b) < 1e-5, "forced weight norm of {}: {:.2e}", s.name, rel_l2(a, b));
    }
    let e = rel_l2(&st.d.1, &st.d.0);
    eprintln!("D: rel L2 {e:.2e}");
    assert!(e < 1e-4, "D: rel L2 {e:.2e}");
    // D is mostly c_skip·x: check the network's own output too.
    assert!(rel_l2(&st.f_x.1, &st.f_x.0) < 1e-4, "F_x: rel L2 {:.2e}", rel_l2(&st.f_x.1, &st.f_x.0));
    assert!(rel_l2(&st.logvar.1, &st.logvar.0) < 1e-4, "logvar {:?} vs {:?}", st.logvar.1, st.logvar.0);
    let (g_cpu, g_dev) = &st.grads;
    let mut worst = (0.0f64, String::new());
    for ((s, a), b) in st.specs.iter().zip(&g_dev.values).zip(&g_cpu.values) {
        if b.iter().all(|v| *v == 0.0) {
            assert!(a.iter().all(|v| *v == 0.0), "{}: the CPU gradient is zero, the device's is not", s.name);
            continue;
        }
        let e = rel_l2(a, b);
        if e > worst.0 {
            worst = (e, s.name.clone());
        }
        assert!(e < 1e-4, "gradient of {}: rel L2 {e:.2e}", s.name);
    }
    eprintln!("worst parameter gradient: {} at {:.2e}", worst.1, worst.0);
    let params = st.specs.iter().filter(|s| s.kind == edm2::nn::params::ParamKind::Param).count();
    let with_grad = st.specs.iter().zip(&g_cpu.values).filter(|(s, g)| s.kind == edm2::nn::params::ParamKind::Param && g.iter().any(|v| *v != 0.0)).count();
    assert!(with_grad + 2 >= params, "most parameters get a gradient ({with_grad} of {params})");
    let mut all = vec![st.d.1, st.f_x.1, st.logvar.1];
    all.extend(g_dev.values.iter().cloned());
    all
}

#[test]
fn sampling_on_the_device_matches_the_cpu() {
    use edm2::api::DeviceNet;
    use edm2::sample::{edm_sampler, edm_sampler_on, SamplerOpts};
    let Some(_gpu) = device() else { return };
    let net = Precond::new(&tiny()).unwrap();
    let mut params = net.init_params(11);
    for (s, v) in net.specs.iter().zip(params.values.iter_mut()) {
        if s.shape.is_empty() {
            v[0] = 0.6;
        }
    }
    let loaded = edm2::LoadedNet { net, params, metadata: Default::default() };
    // Autoguidance by a second (differently initialized) net: both run on the device.
    let gparams = loaded.net.init_params(12);
    let guide = edm2::LoadedNet { net: Precond::new(&tiny()).unwrap(), params: gparams, metadata: Default::default() };
    let mut rng = Rng::new(13);
    let noise = Tensor::from_vec(&[2, 8, 8, 3], rng.normal_vec(2 * 8 * 8 * 3));
    let mut labels = Tensor::zeros(&[2, 10]);
    labels.data[1] = 1.0;
    labels.data[10 + 4] = 1.0;
    let o = SamplerOpts { num_steps: 4, guidance: 1.7, ..Default::default() };
    let want = edm_sampler((&loaded.net, &loaded.params), Some((&guide.net, &guide.params)), &noise, Some(&labels), &o, &mut |_| unreachable!(), &mut |_| {});
    // fp32 within 1e-4; bf16 activations (`generate --precision bf16`) within the bf16
    // bound on D (the sampler's state stays fp32).
    use edm2::backend::{Device, Precision};
    for (precision, bound) in [(Precision::Fp32, 1e-4), (Precision::Bf16, 2e-2)] {
        let dn = DeviceNet::with_precision(&loaded, Device::Cuda, precision).unwrap();
        let dg = DeviceNet::with_precision(&guide, Device::Cuda, precision).unwrap();
        let mut evals = 0;
        let got = edm_sampler_on(
            &mut |x, s| dn.forward_nhwc(x, s, Some(&labels)).map(|o| o.0),
            Some(&mut |x, s| dg.forward_nhwc(x, s, Some(&labels)).map(|o| o.0)),
            &noise,
            &o,
            &mut |_| unreachable!(),
            &mut |_| evals += 1,
        )
        .unwrap();
        assert_eq!(evals, 7, "4 Heun steps = 7 evaluations");
        let e = rel_l2(&got.data, &want.data);
        eprintln!("sampling ({precision}): rel L2 {e:.2e} against the CPU");
        assert!(e < bound, "samples ({precision}): rel L2 {e:.2e}");
        assert!(precision == Precision::Fp32 || e > 1e-6, "bf16 samples as exact as fp32?");
        // The sampler's state on the device (kernels/sampler.cu), the guide beside the
        // net on one device handle: the host sampler's bits over the same device
        // networks, and one wait for the whole run (the final download).
        let dgb = DeviceNet::beside(&guide, &dn).unwrap();
        let waits = dn.host_waits();
        let mut evals = 0;
        let on_device = dn.sample(Some(&dgb), &noise, Some(&labels), &o, &mut |_| unreachable!(), &mut |_| evals += 1).unwrap();
        assert_eq!(evals, 7);
        assert_eq!(dn.host_waits() - waits, 1, "device sampling waits once ({precision})");
        assert!(bits_equal(&on_device.data, &got.data), "device sampler != host sampler ({precision})");
    }
    // Churn (the added noise) and no guide: the device sampler against the host one.
    let o = SamplerOpts { num_steps: 3, s_churn: 10.0, ..Default::default() };
    let churn = |k: usize| Tensor::from_vec(&[2, 8, 8, 3], Rng::new(100 + k as u64).normal_vec(2 * 8 * 8 * 3));
    let dn = DeviceNet::new(&loaded, Device::Cuda).unwrap();
    let host = edm_sampler_on(&mut |x, s| dn.forward_nhwc(x, s, Some(&labels)).map(|o| o.0), None, &noise, &o, &mut { churn }, &mut |_| {}).unwrap();
    let on_device = dn.sample(None, &noise, Some(&labels), &o, &mut { churn }, &mut |_| {}).unwrap();
    assert!(bits_equal(&on_device.data, &host.data), "device sampler with churn != host sampler");
    assert!(rel_l2(&host.data, &want.data) > 1e-3, "the churned run differs from the unchurned one");
    // A guide on another device handle: the host sampler runs (same result).
    let o = SamplerOpts { num_steps: 2, guidance: 1.5, ..Default::default() };
    let dg = DeviceNet::new(&guide, Device::Cuda).unwrap();
    let apart = dn.sample(Some(&dg), &noise, Some(&labels), &o, &mut |_| unreachable!(), &mut |_| {}).unwrap();
    let dgb = DeviceNet::beside(&guide, &dn).unwrap();
    let beside = dn.sample(Some(&dgb), &noise, Some(&labels), &o, &mut |_| unreachable!(), &mut |_| {}).unwrap();
    assert!(bits_equal(&apart.data, &beside.data), "guide apart != guide beside");
    // On the CPU bf16 means bf16 products, which need AVX512-BF16 (tests/cpu_bf16.rs).
    let cpu_bf16 = DeviceNet::with_precision(&loaded, Device::Cpu, Precision::Bf16);
    assert_eq!(cpu_bf16.is_ok(), edm2::backend::cpu::bf16::available(), "bf16 on the CPU: only with AVX512-BF16");
}

#[test]
fn training_on_the_device_matches_the_cpu() {
    let Some(_gpu) = device() else { return };
    let dir = std::env::temp_dir().join(format!("edm2-gpu-train-{}", std::process::id()));
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // 16 random 8x8 RGB images; 3 steps of 2 accumulated passes with loss scaling, so
    // the device-resident weights, Adam moments and EMAs are compared after real updates.
    let mut rng = Rng::new(21);
    for i in 0..16 {
        let px: Vec<u8> = (0..8 * 8 * 3).map(|_| (rng.uniform() * 255.0) as u8).collect();
        edm2::io::image::write_png(&data.join(format!("{i:03}.png")), &px, 3, 8, 8).unwrap();
    }
    let mut cfg = tiny();
    cfg.label_dim = 0;
    let cfg_path = dir.join("tiny.json");
    std::fs::write(&cfg_path, cfg.to_json()).unwrap();
    let run = |device: &str, extra: &[&str]| {
        let out = dir.join(format!("{device}{}", extra.join("")));
        // EDM2_BIN: the binary carried beside this test to a GPU machine (gpu-check.sh),
        // where the path cargo compiled in does not exist.
        let bin = std::env::var("EDM2_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edm2").to_string());
        let o = std::process::Command::new(bin)
            .args(["train", cfg_path.to_str().unwrap(), "--data", data.to_str().unwrap(), "--outdir", out.to_str().unwrap()])
            .args(["--batch", "4", "--batch-gpu", "2", "--ls", "4", "--duration", "12", "--status", "0", "--snapshot", "0", "--preview", "0"])
            .args(["--rampup", "0", "--lr", "0.002", "--seed", "3", "--device", device])
            .args(extra)
            .output()
            .unwrap();
        let (so, se) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{so}\n{se}");
        let state = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("training-state-"))
            .expect("a training state");
        (edm2::io::safetensors::read(state).unwrap(), se.to_string())
    };
    let (cpu, _) = run("cpu", &[]);
    let (dev, err) = run("cuda", &[]);
    assert!(err.contains("device: cuda"), "the device is reported: {err}");
    assert_eq!(cpu.metadata["edm2.adam_step"], "3");
    assert_eq!(dev.metadata["edm2.adam_step"], "3");
    let mut checked = 0;
    for ((na, ta), (nb, tb)) in cpu.tensors.iter().zip(&dev.tensors) {
        assert_eq!(na, nb);
        let e = rel_l2(&tb.data, &ta.data);
        assert!(e < 1e-4 || ta.data.iter().all(|v| *v == 0.0) && tb.data.iter().all(|v| *v == 0.0), "{na}: rel L2 {e:.2e}");
        checked += 1;
    }
    assert!(checked > 100, "weights, Adam moments and EMAs compared ({checked})");
    // bf16 activations: the same run, its gradients within the bf16 bound. Adam's first
    // moment is a fixed linear combination of the three steps' gradients, so it carries
    // their error (the weights themselves move by ~lr per step whatever the gradient).
    let (b16, _) = run("cuda", &["--precision", "bf16"]);
    assert_eq!(b16.metadata["edm2.adam_step"], "3");
    let moments = |f: &edm2::io::safetensors::StFile| -> Vec<f32> {
        f.tensors.iter().filter(|(n, _)| n.starts_with("optim/exp_avg/")).flat_map(|(_, t)| t.data.iter().copied()).collect()
    };
    let (m_cpu, m_b16) = (moments(&cpu), moments(&b16));
    assert!(!m_cpu.is_empty() && m_cpu.len() == m_b16.len());
    let e = rel_l2(&m_b16, &m_cpu);
    let worst = cpu
        .tensors
        .iter()
        .zip(&b16.tensors)
        .filter(|((n, t), _)| n.starts_with("optim/exp_avg/") && t.data.iter().any(|v| *v != 0.0))
        .map(|((n, a), (_, b))| (rel_l2(&b.data, &a.data), n.clone()))
        .fold((0.0, String::new()), |w, x| if x.0 > w.0 { x } else { w });
    eprintln!("train --precision bf16: Adam first moments rel L2 {e:.2e} against the CPU (worst tensor {} {:.2e})", worst.1, worst.0);
    assert!(e < 5e-2 && e > 1e-6, "bf16 training gradients: rel L2 {e:.2e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_repeated_training_step_allocates_no_device_memory() {
    use edm2::backend::gpu::{kernels as k, multi_tensor as mt};
    let Some(gpu) = device() else { return };
    let net = Precond::new(&tiny()).unwrap();
    let params = net.init_params(31);
    let mut gp = GpuParams::upload(&gpu, &params).unwrap();
    let mut moments: Vec<_> = gp.values.iter().map(|v| (gpu.alloc_zeros::<f32>(v.len()).unwrap(), gpu.alloc_zeros::<f32>(v.len()).unwrap())).collect();
    let mut rng = Rng::new(32);
    let x = Tensor::from_vec(&[2, 8, 8, 3], rng.normal_vec(2 * 8 * 8 * 3));
    let labels = Tensor::from_vec(&[2, 10], (0..20).map(|i| (i % 7 == 0) as u8 as f32).collect());
    let sigma = [0.4f32, 3.0];
    // What `train --device cuda` does per step: uploads, forced WN, forward, loss, backward,
    // Adam.
    let mut step = |t: u64| {
        let xd = Tensor::with_buf(&x.shape, gpu.upload_input(&x.data).unwrap());
        let yd = gpu.upload(&x.data).unwrap();
        let ld = Tensor::with_buf(&labels.shape, gpu.upload_act(&labels.data).unwrap());
        let launches = edm2::backend::gpu::launches();
        net.force_normalize_on(&gpu, &mut gp).unwrap();
        assert_eq!(edm2::backend::gpu::launches() - launches, 1, "the forced weight normalization of all weights is one launch");
        let waits = gpu.waits();
        let mode = Mode::train(t);
        let out = net.forward_on(&gpu, &gp, &xd, &sigma, Some(&ld), &mode, false).unwrap();
        let l = k::edm2_loss(&gpu, &out.d.data, &yd, &out.logvar, &sigma, 0.5, 1.0).unwrap();
        let dd = Tensor::with_buf(&out.d.shape, l.dd);
        let g = net.backward_on(&gpu, &gp, out.cache.unwrap(), &dd, &l.dlogvar, &mode).unwrap();
        // (The first pass of a tuned device times the conv variants of each shape: it waits.)
        if t > 1 || gpu.conv_policy() != edm2::backend::gpu::conv_algo::ConvPolicy::Tune {
            assert_eq!(gpu.waits(), waits, "forward, loss and backward read nothing back: the host never waits for the device in a pass");
        }
        let mut nonfinite = gpu.alloc_zeros::<u32>(2).unwrap();
        let tensors = gp.values.iter_mut().zip(&g.values).zip(moments.iter_mut()).map(|((p, g), (m, v))| mt::AdamTensor { p, g, m, v }).collect();
        let launches = edm2::backend::gpu::launches();
        mt::adam(&gpu, tensors, 1e-3, 0.9, 0.99, 1e-8, t, &mut nonfinite, mt::CHUNK).unwrap();
        assert_eq!(edm2::backend::gpu::launches() - launches, 1, "Adam on all parameters is one launch");
    };
    step(1);
    let first = gpu.pool_stats();
    step(2);
    let second = gpu.pool_stats();
    assert!(first.allocated > 0 && second.reused > first.reused, "{first:?} -> {second:?}");
    assert_eq!(second.allocated, first.allocated, "the second step allocated device memory ({first:?} -> {second:?})");
}

#[test]
fn a_device_training_step_waits_for_the_device_once() {
    let Some(_gpu) = device() else { return };
    let dir = std::env::temp_dir().join(format!("edm2-gpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("tiny.json");
    std::fs::write(&cfg_path, tiny().to_json()).unwrap();
    let bin = std::env::var("EDM2_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edm2").to_string());
    let o = std::process::Command::new(bin)
        .args(["bench", "--device", "cuda", "--config", cfg_path.to_str().unwrap(), "--batch", "2", "--iters", "1", "--only", "train", "--json"])
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "bench failed:\n{so}\n{se}");
    let json: serde_json::Value = serde_json::from_str(so.lines().last().unwrap()).unwrap();
    // The loss and Adam's non-finite counts come back in one read at the end of the step;
    // the gains stay on the device.
    assert_eq!(json["host_waits_per_step"], 1, "{so}");
    let launches = json["launches_per_step"].as_u64().unwrap();
    eprintln!("tiny config, batch 2: {launches} launches per training step");
    assert!(launches > 20, "launches are counted: {launches}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The same f32 values bit for bit.
fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
