//! The CUDA kernels against the CPU backend, through the same safe wrappers and device
//! buffers the CUDA backend uses. With `--features cuda-sim` they run in the simulation
//! harness (CI), under both thread schedules; with `--features cuda` on a real GPU (skipped
//! without one unless EDM2_REQUIRE_GPU=1). Inputs are random (never zeros), outputs are
//! poisoned before the kernel runs, sizes leave partial blocks.
#![cfg(any(feature = "cuda", feature = "cuda-sim"))]

mod common;
use common::*;
use edm2::backend::cpu::ops;
use edm2::backend::gpu::{kernels as k, Gpu, GpuBuf};
use edm2::rng::Rng;
use std::sync::Mutex;

/// The schedule is global state of the simulated device: tests take turns.
static DEVICE: Mutex<()> = Mutex::new(());

/// The device, or `None` (test skipped) on a machine without a GPU unless
/// EDM2_REQUIRE_GPU is set. The simulated device is always there.
fn device() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) if std::env::var_os("EDM2_REQUIRE_GPU").is_none() => {
            eprintln!("SKIPPED (no usable GPU: {e})");
            None
        }
        Err(e) => panic!("EDM2_REQUIRE_GPU is set but the GPU cannot be opened: {e}"),
    }
}

/// Runs `f` under every thread schedule the device has (forward and reverse on the
/// simulated device; the hardware's own on a GPU).
fn each_schedule(mut f: impl FnMut(&str)) {
    #[cfg(feature = "cuda-sim")]
    for reverse in [false, true] {
        k::set_reverse_schedule(reverse);
        f(if reverse { "reverse schedule" } else { "forward schedule" });
        k::set_reverse_schedule(false);
    }
    #[cfg(not(feature = "cuda-sim"))]
    f("gpu");
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.normal() * 2.0) as f32).collect()
}

fn up(gpu: &Gpu, x: &[f32]) -> GpuBuf<f32> {
    gpu.upload(x).unwrap()
}

fn down(gpu: &Gpu, x: &GpuBuf<f32>) -> Vec<f32> {
    gpu.download(x).unwrap()
}

#[cfg(feature = "cuda-sim")]
#[test]
fn harness_catches_a_missing_barrier() {
    let _g = DEVICE.lock().unwrap();
    let gpu = Gpu::open(0).unwrap();
    let x: Vec<f32> = (0..256).map(|i| (i % 7) as f32 + 0.5).collect();
    let exact: f32 = x.iter().sum();
    let xb = up(&gpu, &x);
    let mut wrong = 0;
    each_schedule(|sched| {
        assert_eq!(k::selftest_block_sum(&gpu, &xb, false).unwrap(), exact, "with barriers, {sched}");
        if k::selftest_block_sum(&gpu, &xb, true).unwrap() != exact {
            wrong += 1;
        }
    });
    assert!(wrong > 0, "the reduction without its barrier gave the right sum under both schedules");
}

#[test]
fn warp_shuffles() {
    let _g = DEVICE.lock().unwrap();
    let Some(gpu) = device() else { return };
    let x: Vec<f32> = (0..64).map(|i| (i * i % 11) as f32).collect();
    let xb = up(&gpu, &x);
    each_schedule(|sched| {
        let out = k::selftest_warp_sum(&gpu, &xb).unwrap();
        assert_eq!(out, [x[..32].iter().sum::<f32>(), x[32..].iter().sum::<f32>()], "{sched}");
    });
}

#[test]
fn elementwise_kernels_match_the_cpu_backend() {
    let _g = DEVICE.lock().unwrap();
    let Some(gpu) = device() else { return };
    each_schedule(|sched| {
        for n in [1usize, 255, 1000, 4099] {
            let x = random(n, n as u64);
            let dy = random(n, n as u64 + 1);
            let (xb, dyb) = (up(&gpu, &x), up(&gpu, &dy));
            let mut y_cpu = vec![0.0; n];
            ops::mp_silu(&x, &mut y_cpu);
            let mut yb = gpu.alloc(n).unwrap();
            k::mp_silu(&gpu, &xb, &mut yb).unwrap();
            let y = down(&gpu, &yb);
            assert!(rel_l2(&y, &y_cpu) < 1e-5, "mp_silu n={n} {sched}: {}", rel_l2(&y, &y_cpu));
            let mut d_cpu = vec![0.0; n];
            ops::mp_silu_backward(&x, &dy, &mut d_cpu);
            let mut db = gpu.alloc(n).unwrap();
            k::mp_silu_backward(&gpu, &xb, &dyb, &mut db).unwrap();
            assert!(rel_l2(&down(&gpu, &db), &d_cpu) < 1e-5, "mp_silu_backward n={n} {sched}");
            let mut a_cpu = x.clone();
            ops::mp_sum_inplace(&mut a_cpu, &dy, 0.3);
            let mut ab = up(&gpu, &x);
            k::mp_sum(&gpu, &mut ab, &dyb, 0.3).unwrap();
            assert!(rel_l2(&down(&gpu, &ab), &a_cpu) < 1e-6, "mp_sum n={n} {sched}");
        }
    });
    let (a, mut b) = (up(&gpu, &[1.0, 2.0]), gpu.alloc(1).unwrap());
    assert!(k::mp_silu(&gpu, &a, &mut b).is_err(), "a length mismatch is an error");
}

#[test]
fn sum_reduction_matches_f64_and_is_deterministic() {
    let _g = DEVICE.lock().unwrap();
    let Some(gpu) = device() else { return };
    for n in [1usize, 31, 256, 257, 5000, 70_000] {
        let x = random(n, 7 + n as u64);
        let exact: f64 = x.iter().map(|&v| v as f64).sum();
        let scale: f64 = x.iter().map(|&v| v.abs() as f64).sum();
        let xb = up(&gpu, &x);
        let first = k::sum(&gpu, &xb).unwrap();
        assert!((first as f64 - exact).abs() <= 1e-6 * scale, "n={n}: {first} vs {exact}");
        // A fixed reduction tree: the same bits again, under every schedule.
        each_schedule(|sched| assert_eq!(k::sum(&gpu, &xb).unwrap().to_bits(), first.to_bits(), "n={n} {sched}"));
    }
}

#[test]
fn adam_and_ema_kernels_match_the_cpu_backend() {
    use edm2::nn::params::{ParamKind, ParamSpec, Params};
    use edm2::train::adam::Adam;
    let _g = DEVICE.lock().unwrap();
    let Some(gpu) = device() else { return };
    // Bit for bit in the simulation (same operation order, no contraction); on a GPU
    // nvcc contracts a·b+c into FMAs: a few ulps.
    let same = |a: &[f32], b: &[f32], what: &str| {
        if cfg!(feature = "cuda-sim") {
            assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{what}");
        } else {
            assert!(rel_l2(a, b) < 1e-6, "{what}: {}", rel_l2(a, b));
        }
    };
    let n = 3001;
    let specs = vec![ParamSpec { name: "w".into(), shape: vec![n], kind: ParamKind::Param, is_mp_weight: false }];
    let p0 = random(n, 1);
    let (mut cpu_p, mut cpu) = (Params { values: vec![p0.clone()] }, Adam::new(&specs));
    let (mut p, mut m, mut v) = (up(&gpu, &p0), gpu.alloc_zeros(n).unwrap(), gpu.alloc_zeros(n).unwrap());
    for t in 1..=3u64 {
        let mut g = random(n, 10 + t);
        g[5] = f32::NAN;
        g[77] = f32::INFINITY;
        let bad = k::adam(&gpu, &mut p, &up(&gpu, &g), &mut m, &mut v, 0.01, 0.9, 0.99, 1e-8, t).unwrap();
        let mut grads = Params { values: vec![g] };
        let cpu_bad = Adam::sanitize(&mut grads);
        cpu.step(&specs, &mut cpu_p, &grads, 0.01);
        assert_eq!((bad, cpu_bad), (2, 2));
        same(&down(&gpu, &p), &cpu_p.values[0], &format!("adam p, step {t}"));
        same(&down(&gpu, &m), &cpu.m.values[0], &format!("adam m, step {t}"));
        same(&down(&gpu, &v), &cpu.v.values[0], &format!("adam v, step {t}"));
    }
    // The power-function EMA update (both lerp branches).
    let pv = down(&gpu, &p);
    for w in [0.3f32, 0.9] {
        let e0 = random(n, 3);
        let want: Vec<f32> = e0.iter().zip(&pv).map(|(&a, &b)| edm2::train::ema::torch_lerp(a, b, w)).collect();
        let mut e = up(&gpu, &e0);
        k::ema_lerp(&gpu, &mut e, &p, w).unwrap();
        same(&down(&gpu, &e), &want, &format!("ema w={w}"));
    }
}
