//! `edm2 bench`: median training-step and forward times on random data.

use anyhow::Result;
use edm2::backend::{resolve_device, Device};
use edm2::data::loader::Batch;
use edm2::dist::Solo;
use edm2::train::adam::AdamHyper;
use edm2::train::step::{train_step, SameBatch, StateRefs, StepOps, StepOut, StepPlan};
use edm2::{Mode, NetConfig, Precond, Tensor};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Preset or JSON config.
    #[arg(long, default_value = "cpu-s32")]
    pub config: String,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Timed iterations of each measurement (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Print a JSON summary as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda, or auto (cuda when this build has the CUDA backend and a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Also time one full sampling run (32 Heun steps = 63 evaluations) at this batch.
    #[arg(long)]
    pub sampling: bool,
    /// Arithmetic: fp32 (exact comparison between the backends), or bf16. On the CUDA
    /// backend bf16 stores activations as bf16, products with fp32 accumulation (fp32
    /// weights, input x and output D); on a CPU with AVX512-BF16 it runs the convolutions'
    /// products in bf16 with fp32 accumulation (activations fp32).
    #[arg(long, value_parser = ["fp32", "bf16"], default_value = "fp32")]
    pub precision: String,
    /// Measure only the training step or only the forward pass (e.g. for peak memory).
    #[arg(long, value_parser = ["train", "forward", "both"], default_value = "both")]
    pub only: String,
    /// On a GPU with --precision bf16: after the steps, time every convolution shape and
    /// direction they ran (the kernel the tuning kept) against cuBLAS's bf16 GEMM of the
    /// same M, N, K, and print TFLOP/s, % of 790 (an H100/H200's dense bf16 rate), ours /
    /// cuBLAS and, for 1x1 convolutions, the relative L2 difference (`vs_cublas` in --json).
    #[arg(long)]
    pub vs_cublas: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// The benchmark's network and batch (the same on every device).
struct Setup {
    cfg: NetConfig,
    net: Precond,
    params: edm2::Params,
    images: Tensor,
    labels: Option<Tensor>,
    sigma: Vec<f32>,
    noisy: Tensor,
    /// For further draws (the sampling benchmark's noise).
    rng: edm2::rng::Rng,
}

/// Fresh weights with every gain at 0.5 (so the whole network is exercised), random
/// images, one label per image, log-normal σ and the noisy images.
/// `free`: the device's free memory when benchmarking there (else the host's is checked).
fn setup(a: &Args, free: Option<u64>) -> Result<Setup> {
    anyhow::ensure!(a.batch > 0 && a.iters > 0, "--batch and --iters must be positive");
    let cfg = NetConfig::resolve(&a.config)?;
    let net = Precond::new(&cfg)?;
    // The step must fit before anything of its size is allocated (here and on the device).
    // (The CPU's bf16 mode keeps fp32 activations.)
    let act_bytes = if a.precision == "bf16" && free.is_some() { 2 } else { 4 };
    let need = edm2::train::memory::StepMemory::estimate(&net, a.batch as u64, 0, act_bytes);
    match free {
        Some(f) => need.check(f, "device memory", a.batch as u64, "batch")?,
        None => {
            if let Some(avail) = edm2::train::memory::host_available() {
                need.check(avail, "memory on this machine", a.batch as u64, "batch")?;
            }
        }
    }
    let mut params = net.init_params(0);
    for (s, v) in net.specs.iter().zip(params.values.iter_mut()) {
        if s.shape.is_empty() {
            v[0] = 0.5;
        }
    }
    let (n, r, c) = (a.batch, cfg.img_resolution, cfg.img_channels);
    let mut rng = edm2::rng::Rng::new(1);
    let images = Tensor::from_vec(&[n, r, r, c], rng.normal_vec(n * r * r * c));
    let labels = (cfg.label_dim > 0).then(|| {
        let mut l = Tensor::zeros(&[n, cfg.label_dim]);
        for b in 0..n {
            l.data[b * cfg.label_dim + b % cfg.label_dim] = 1.0;
        }
        l
    });
    let sigma: Vec<f32> = (0..n).map(|_| ((rng.normal() * 1.2 - 0.4).exp()) as f32).collect();
    let mut noisy = images.clone();
    let per = r * r * c;
    for b in 0..n {
        for i in 0..per {
            noisy.data[b * per + i] += sigma[b] * rng.normal() as f32;
        }
    }
    Ok(Setup { cfg, net, params, images, labels, sigma, noisy, rng })
}

/// The benchmark's inputs as the one pass of every step.
fn fixed_batch(images: &Tensor, noisy: &Tensor, sigma: &[f32], labels: &Option<Tensor>) -> SameBatch {
    SameBatch(Batch { start: 0, images: images.clone(), noisy: noisy.clone(), sigma: sigma.to_vec(), labels: labels.clone() })
}

/// `train`'s optimizer step (`train::step::train_step`: forced weight norm, forward, loss,
/// backward, Adam with the non-finite counts, the one read of the totals) on fixed inputs:
/// one pass, no EMAs, lr 1e-4, Adam step `t`.
fn bench_step<B: StepOps>(be: &B, net: &Precond, params: &mut B::Params, m: &mut B::Params, v: &mut B::Params, batch: &SameBatch, t: u64) -> Result<StepOut> {
    let plan = StepPlan {
        passes: 1,
        seed: 7,
        sigma_data: net.config.sigma_data,
        loss_scale: 1.0,
        adam: AdamHyper { lr: 1e-4, beta1: 0.9, beta2: 0.99, eps: 1e-8, t },
        ema_weights: vec![],
    };
    Ok(train_step(be, net, StateRefs { params, m, v, emas: vec![] }, batch, &plan, &Solo)?)
}

pub fn run(a: Args) -> Result<()> {
    let device = resolve_device(a.device)?;
    if device == Device::Cuda {
        return bench_cuda(&a);
    }
    if a.vs_cublas {
        anyhow::bail!("--vs-cublas compares our GPU convolutions with cuBLAS: it needs --device cuda");
    }
    let cpu = edm2::backend::cpu::Cpu::for_precision(a.precision.parse().map_err(anyhow::Error::msg)?).map_err(anyhow::Error::msg)?;
    let Setup { cfg, net, mut params, images, labels, sigma, noisy, mut rng } = setup(&a, None)?;
    let (n, r, c) = (a.batch, cfg.img_resolution, cfg.img_channels);
    let batch = fixed_batch(&images, &noisy, &sigma, &labels);
    let (mut m, mut v) = (edm2::Params::zeros(&net.specs), edm2::Params::zeros(&net.specs));
    let mut t = 0;
    let mut train_step = |params: &mut edm2::Params| -> Result<f64> {
        t += 1;
        Ok(bench_step(&cpu, &net, params, &mut m, &mut v, &batch, t)?.loss_sum / n as f64)
    };
    eprintln!(
        "bench {} batch {n} on {} threads, {} kernels{} ({})",
        a.config,
        rayon::current_num_threads(),
        edm2::backend::cpu::simd::isa().name(),
        if cpu.bf16_products() { format!(", bf16 products ({})", edm2::backend::cpu::amx::products_name()) } else { String::new() },
        edm2::backend::cpu::simd::cpu_model()
    );
    edm2::profile::enable_from_env();
    let mut train_ms = Vec::new();
    let (do_train, do_fwd) = (a.only != "forward", a.only != "train");
    for i in 0..=a.iters {
        if !do_train {
            break;
        }
        let t = Instant::now();
        let l = train_step(&mut params)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!("  train step {i}: {ms:.1} ms (loss {l:.4}){}", if i == 0 { " [warm-up]" } else { "" });
        if i > 0 {
            train_ms.push(ms);
        } else {
            edm2::profile::reset();
        }
    }
    if std::env::var("EDM2_PROFILE").is_ok() {
        eprintln!("profile of {} training steps:\n{}", a.iters, edm2::profile::report());
        edm2::profile::reset();
    }
    let mut fwd_ms = Vec::new();
    for i in 0..=a.iters {
        if !do_fwd {
            break;
        }
        let t = Instant::now();
        let out = net.forward_on(&cpu, &params, &noisy, &sigma, labels.as_ref(), &Mode::eval(), false)?;
        std::hint::black_box(&out.d);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!("  forward {i}: {ms:.1} ms{}", if i == 0 { " [warm-up]" } else { "" });
        if i > 0 {
            fwd_ms.push(ms);
        } else {
            edm2::profile::reset();
        }
    }
    if std::env::var("EDM2_PROFILE").is_ok() {
        eprintln!("profile of {} forward passes:\n{}", a.iters, edm2::profile::report());
    }
    let sampling_ips = if a.sampling {
        let noise = Tensor::from_vec(&[n, r, r, c], rng.normal_vec(n * r * r * c));
        let t = Instant::now();
        let mut k = 0;
        let mut eval = |x: &Tensor, sig: &[f32]| -> edm2::error::Result<Tensor> {
            Ok(net.forward_on(&cpu, &params, x, sig, labels.as_ref(), &Mode::eval(), false)?.d)
        };
        let x = edm2::sample::edm_sampler_on(&mut eval, None, &noise, &Default::default(), &mut |_| unreachable!(), &mut |_| {
            k += 1;
            eprint!("\r  sampling: evaluation {k}/63");
        })?;
        std::hint::black_box(&x);
        let s = t.elapsed().as_secs_f64();
        eprintln!();
        println!("sampling:   {:.1} s for {n} images (63 evaluations) = {:.3} img/s", s, n as f64 / s);
        Some(n as f64 / s)
    } else {
        None
    };
    let macs = net.macs_per_image() as f64;
    // (median, min, max) of a series, None when it was not measured.
    let stats = |v: &mut Vec<f64>| (!v.is_empty()).then(|| {
        let (lo, hi) = (v.iter().cloned().fold(f64::MAX, f64::min), v.iter().cloned().fold(0.0, f64::max));
        (median(v), lo, hi)
    });
    let (ts, fs) = (stats(&mut train_ms), stats(&mut fwd_ms));
    // Convention of achieved_gflops_train in golden/torch_cpu_baseline.json: 3 × 2·MAC.
    let ips = |ms: f64| n as f64 / (ms / 1e3);
    if let Some((t, lo, hi)) = ts {
        let g = 3.0 * 2.0 * macs * ips(t) / 1e9;
        println!("train step: median {t:.1} ms (min {lo:.1}, max {hi:.1}) = {:.2} img/s, {g:.1} GFLOP/s", ips(t));
    }
    if let Some((f, lo, hi)) = fs {
        let g = 2.0 * macs * ips(f) / 1e9;
        println!("forward:    median {f:.1} ms (min {lo:.1}, max {hi:.1}) = {:.2} img/s, {g:.1} GFLOP/s", ips(f));
    }
    // The machine's ceiling on this path, for the fraction the step reaches.
    let peak = edm2::backend::cpu::simd::fma_peak_gflops(0.3);
    if let (Some(p), Some((t, _, _))) = (peak, ts) {
        println!("FMA peak of this machine ({} threads, {}): {p:.1} GFLOP/s; the train step reaches {:.1}% of it", rayon::current_num_threads(), edm2::backend::cpu::simd::isa().name(), 100.0 * 6.0 * macs * ips(t) / 1e9 / p);
    }
    // In the bf16 mode the convolutions' ceiling is the bf16 dot rate instead.
    let bf16_peak = if a.precision == "bf16" { edm2::backend::cpu::simd::bf16_dot_peak_gflops(0.3) } else { None };
    if let (Some(p), Some((t, _, _))) = (bf16_peak, ts) {
        println!(
            "bf16 dot peak of this machine (vdpbf16ps): {p:.1} GFLOP/s ({:.2}x the FMA peak); the train step reaches {:.1}% of it",
            p / peak.unwrap_or(p),
            100.0 * 6.0 * macs * ips(t) / 1e9 / p
        );
    }
    let amx_peak = if a.precision == "bf16" { edm2::backend::cpu::amx::peak_gflops(0.3) } else { None };
    if let (Some(p), Some((t, _, _))) = (amx_peak, ts) {
        println!(
            "AMX tile peak of this machine (tdpbf16ps, operands in L1): {p:.1} GFLOP/s ({:.2}x the FMA peak); the train step reaches {:.1}% of it",
            p / peak.unwrap_or(p),
            100.0 * 6.0 * macs * ips(t) / 1e9 / p
        );
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "fma_peak_gflops": peak,
                "bf16_dot_peak_gflops": bf16_peak,
                "amx_peak_gflops": amx_peak,
                "bf16_products": (a.precision == "bf16").then(edm2::backend::cpu::amx::products_name),
                "train_step_ms": ts.map(|s| s.0), "forward_ms": fs.map(|s| s.0),
                "images_per_s_train": ts.map(|s| ips(s.0)), "images_per_s_forward": fs.map(|s| ips(s.0)),
                "gflops_per_s_train": ts.map(|s| 6.0 * macs * ips(s.0) / 1e9),
                "train_step_ms_min": ts.map(|s| s.1), "train_step_ms_max": ts.map(|s| s.2),
                "forward_ms_min": fs.map(|s| s.1), "forward_ms_max": fs.map(|s| s.2),
                "threads": rayon::current_num_threads(),
                "images_per_s_sampling": sampling_ips,
                "cpu_isa": edm2::backend::cpu::simd::isa().name(),
                "cpu_model": edm2::backend::cpu::simd::cpu_model(),
                "precision": a.precision,
            })
        );
    }
    Ok(())
}

/// `bench --device cuda`: the same training step (forced weight norm, forward, loss,
/// backward, Adam) and forward on the CUDA backend.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn bench_cuda(a: &Args) -> Result<()> {
    use edm2::backend::gpu::{launches, Gpu, GpuParams};
    use edm2::backend::Backend;
    let gpu = Gpu::open(0)?;
    gpu.set_precision(a.precision.parse().map_err(anyhow::Error::msg)?);
    let Setup { cfg, net, params, images, labels, sigma, noisy, mut rng } = setup(a, gpu.memory_free().map(|f| f.0))?;
    let n = a.batch;
    let mut gp = GpuParams::upload(&gpu, &params)?;
    let xd = Tensor::with_buf(&noisy.shape, gpu.upload_input(&noisy.data)?);
    let ld = labels.as_ref().map(|l| gpu.upload_act(&l.data).map(|b| Tensor::with_buf(&l.shape, b))).transpose()?;
    // `train`'s step, the batch's upload included (the EMAs, one more launch, aside).
    let batch = fixed_batch(&images, &noisy, &sigma, &labels);
    let (mut m, mut v) = (gpu.zero_grads(&gp)?, gpu.zero_grads(&gp)?);
    let mut t = 0;
    let mut train_step = |gp: &mut GpuParams| -> Result<f32> {
        t += 1;
        Ok((bench_step(&gpu, &net, gp, &mut m, &mut v, &batch, t)?.loss_sum / n as f64) as f32)
    };
    let tc = gpu.tensor_core_conv() && a.precision == "bf16";
    eprintln!("bench {} batch {n} on {} ({}{})", a.config, gpu.name(), a.precision, if tc { ", tensor-core conv forward" } else { "" });
    // EDM2_PROFILE=1: the GPU backend waits for every kernel and books its time
    // (backend::gpu::check), so the table below is a per-kernel profile of the steps.
    edm2::profile::enable_from_env();
    let mut train_ms = Vec::new();
    // (kernel launches, host waits) of the last training step.
    let mut step_counts: Option<(u64, u64)> = None;
    for i in 0..=a.iters {
        if a.only == "forward" {
            break;
        }
        let (t, l0, w0) = (Instant::now(), launches(), gpu.waits());
        let l = train_step(&mut gp)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        step_counts = Some((launches() - l0, gpu.waits() - w0));
        eprintln!("  train step {i}: {ms:.1} ms (loss {l:.4}){}", if i == 0 { " [warm-up]" } else { "" });
        if i > 0 {
            train_ms.push(ms);
        } else {
            edm2::profile::reset();
        }
    }
    if edm2::profile::enabled() && !train_ms.is_empty() {
        eprintln!("profile of {} training steps:\n{}", a.iters, edm2::profile::report());
        edm2::profile::reset();
    }
    let mut fwd_ms = Vec::new();
    for i in 0..=a.iters {
        if a.only == "train" {
            break;
        }
        let t = Instant::now();
        let out = net.forward_on(&gpu, &gp, &xd, &sigma, ld.as_ref(), &Mode::eval(), false)?;
        gpu.synchronize()?;
        std::hint::black_box(&out.d);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!("  forward {i}: {ms:.1} ms{}", if i == 0 { " [warm-up]" } else { "" });
        if i > 0 {
            fwd_ms.push(ms);
        }
    }
    // One whole sampling run as `generate --device cuda` does it: the sampler's state on
    // the device (edm2::sample::device), one download at the end.
    let sampling_ips = if a.sampling {
        let (r, c) = (cfg.img_resolution, cfg.img_channels);
        let noise = Tensor::from_vec(&[n, r, r, c], rng.normal_vec(n * r * r * c));
        let mut k = 0;
        let t = Instant::now();
        let x = edm2::sample::device::edm_sampler_gpu(&gpu, (&net, &gp), None, &noise, ld.as_ref(), &Default::default(), &mut |_| unreachable!(), &mut |_| {
            k += 1;
            eprint!("\r  sampling: evaluation {k}/63");
        })?;
        std::hint::black_box(&x);
        let s = t.elapsed().as_secs_f64();
        eprintln!();
        println!("sampling:   {:.2} s for {n} images (63 evaluations) = {:.2} img/s", s, n as f64 / s);
        Some(n as f64 / s)
    } else {
        None
    };
    let ips = |ms: f64| n as f64 / (ms / 1e3);
    let macs = net.macs_per_image() as f64;
    if !train_ms.is_empty() {
        let t = median(&mut train_ms);
        println!("train step: median {t:.1} ms = {:.2} img/s, {:.1} GFLOP/s", ips(t), 6.0 * macs * ips(t) / 1e9);
    }
    if !fwd_ms.is_empty() {
        let f = median(&mut fwd_ms);
        println!("forward:    median {f:.1} ms = {:.2} img/s, {:.1} GFLOP/s", ips(f), 2.0 * macs * ips(f) / 1e9);
    }
    if let Some((l, w)) = step_counts {
        println!("per training step: {l} kernel launches, {w} host waits");
    }
    let convs = conv_choices_report(&gpu);
    let vs_cublas = if a.vs_cublas { vs_cublas_report(&gpu)? } else { Vec::new() };
    let memory = gpu.memory_in_use();
    let buffer_bytes = gpu.pool_stats().allocated_bytes;
    println!("device buffers: {:.3} GiB allocated by the buffer pool", buffer_bytes as f64 / (1u64 << 30) as f64);
    if let Some(m) = memory {
        println!("device memory in use: {:.2} GiB (buffers kept for reuse, CUDA context included)", m as f64 / (1u64 << 30) as f64);
    }
    if a.json {
        let (t, f) = ((!train_ms.is_empty()).then(|| median(&mut train_ms)), (!fwd_ms.is_empty()).then(|| median(&mut fwd_ms)));
        println!(
            "{}",
            serde_json::json!({"device": gpu.name(), "precision": a.precision, "tensor_core_conv": tc, "train_step_ms": t, "forward_ms": f,
                "images_per_s_train": t.map(ips), "images_per_s_forward": f.map(ips),
                "images_per_s_sampling": sampling_ips, "device_memory_bytes": memory, "device_buffer_bytes": buffer_bytes,
                "launches_per_step": step_counts.map(|c| c.0), "host_waits_per_step": step_counts.map(|c| c.1),
                "conv_policy": gpu.conv_policy().name(), "conv_algos": convs, "vs_cublas": vs_cublas})
        );
    }
    Ok(())
}

/// Prints which kernel ran each convolution shape (and, where tuned, every variant's time
/// and rate) and returns the same as JSON rows for `bench --json`.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn conv_choices_report(gpu: &edm2::backend::gpu::Gpu) -> Vec<serde_json::Value> {
    let choices = gpu.conv_choices();
    if !choices.is_empty() {
        println!("convolution kernels (EDM2_CONV_ALGO policy: {}):", gpu.conv_policy().name());
    }
    let tflops = |macs: f64, ms: f64| 2.0 * macs / (ms * 1e-3) / 1e12;
    choices
        .iter()
        .map(|c| {
            let k = &c.key;
            let shape = format!("n{} {}x{} {}->{} k{}{}", k.n, k.h, k.w, k.cin, k.cout, k.k, if k.bf16 { " bf16" } else { " fp32" });
            let times: Vec<String> =
                c.timings_ms.iter().map(|&(a, ms)| format!("{} {:.3} ms ({:.1} TFLOP/s)", a.name(), ms, tflops(k.macs(), ms))).collect();
            println!("  {:<7} {shape:<32} {:<10} {}", k.dir.name(), c.algo.name(), times.join(", "));
            serde_json::json!({"direction": k.dir.name(), "n": k.n, "h": k.h, "w": k.w, "cin": k.cin, "cout": k.cout, "k": k.k,
                "bf16": k.bf16, "algo": c.algo.name(),
                "timings_ms": c.timings_ms.iter().map(|&(a, ms)| (a.name().to_string(), serde_json::json!(ms))).collect::<serde_json::Map<_, _>>()})
        })
        .collect()
}

/// `bench --vs-cublas`: ours against cuBLAS on every bf16 convolution shape of the step
/// (src/backend/gpu/conv_bench.rs), printed and as JSON rows.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn vs_cublas_report(gpu: &edm2::backend::gpu::Gpu) -> Result<Vec<serde_json::Value>> {
    use edm2::backend::gpu::conv_bench::{compare_with_cublas, print_table};
    let keys: Vec<_> = gpu.conv_choices().iter().map(|c| c.key).collect();
    let rows = compare_with_cublas(gpu, &keys, 10, None)?;
    print_table(&rows, 10, 790.0);
    Ok(rows
        .iter()
        .map(|r| {
            let k = &r.key;
            serde_json::json!({"direction": k.dir.name(), "n": k.n, "h": k.h, "w": k.w, "cin": k.cin, "cout": k.cout, "k": k.k,
                "m": r.m, "gemm_n": r.n, "gemm_k": r.k, "algo": r.algo.name(), "ours_ms": r.ours_ms, "cublas_ms": r.cublas_ms,
                "ours_tflops": r.tflops(r.ours_ms), "cublas_tflops": r.tflops(r.cublas_ms), "rel_l2": r.rel_l2})
        })
        .collect())
}

#[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
fn bench_cuda(_a: &Args) -> Result<()> {
    unreachable!("resolve_device never picks cuda without the CUDA backend")
}
