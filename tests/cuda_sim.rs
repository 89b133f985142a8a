//! The CUDA kernels run in the simulation harness (feature `cuda-sim`): the harness's own
//! semantics (a removed barrier must be caught; warp shuffles) and every kernel against
//! the CPU backend on random inputs with poisoned outputs, at sizes with partial blocks.
#![cfg(feature = "cuda-sim")]

mod common;
use common::*;
use edm2::backend::cpu::ops;
use edm2::backend::sim;
use edm2::rng::Rng;
use std::sync::Mutex;

/// The schedule is global state of the simulated device: tests take turns.
static DEVICE: Mutex<()> = Mutex::new(());

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.normal() * 2.0) as f32).collect()
}

#[test]
fn harness_catches_a_missing_barrier() {
    let _g = DEVICE.lock().unwrap();
    let x: Vec<f32> = (0..256).map(|i| (i % 7) as f32 + 0.5).collect();
    let exact: f32 = x.iter().sum();
    let mut wrong = 0;
    for reverse in [false, true] {
        sim::set_reverse_schedule(reverse);
        assert_eq!(sim::selftest_block_sum(&x, false).unwrap(), exact, "with barriers, reverse={reverse}");
        if sim::selftest_block_sum(&x, true).unwrap() != exact {
            wrong += 1;
        }
    }
    sim::set_reverse_schedule(false);
    assert!(wrong > 0, "the reduction without its barrier gave the right sum under both schedules");
}

#[test]
fn harness_warp_shuffles() {
    let _g = DEVICE.lock().unwrap();
    let x: [f32; 64] = std::array::from_fn(|i| (i * i % 11) as f32);
    for reverse in [false, true] {
        sim::set_reverse_schedule(reverse);
        let out = sim::selftest_warp_sum(&x).unwrap();
        assert_eq!(out, [x[..32].iter().sum::<f32>(), x[32..].iter().sum::<f32>()], "reverse={reverse}");
    }
    sim::set_reverse_schedule(false);
}

#[test]
fn elementwise_kernels_match_the_cpu_backend() {
    let _g = DEVICE.lock().unwrap();
    for n in [1usize, 255, 1000, 4099] {
        let x = random(n, n as u64);
        let dy = random(n, n as u64 + 1);
        let (mut y_cpu, mut y_gpu) = (vec![0.0; n], vec![f32::NAN; n]);
        ops::mp_silu(&x, &mut y_cpu);
        sim::mp_silu(&x, &mut y_gpu).unwrap();
        assert!(rel_l2(&y_gpu, &y_cpu) < 1e-5, "mp_silu n={n}: {}", rel_l2(&y_gpu, &y_cpu));
        let (mut d_cpu, mut d_gpu) = (vec![0.0; n], vec![f32::NAN; n]);
        ops::mp_silu_backward(&x, &dy, &mut d_cpu);
        sim::mp_silu_backward(&x, &dy, &mut d_gpu).unwrap();
        assert!(rel_l2(&d_gpu, &d_cpu) < 1e-5, "mp_silu_backward n={n}");
        let (mut a_cpu, mut a_gpu) = (x.clone(), x.clone());
        ops::mp_sum_inplace(&mut a_cpu, &dy, 0.3);
        sim::mp_sum(&mut a_gpu, &dy, 0.3).unwrap();
        assert!(rel_l2(&a_gpu, &a_cpu) < 1e-6, "mp_sum n={n}");
    }
    assert!(sim::mp_silu(&[1.0, 2.0], &mut [0.0]).is_err(), "length mismatch is an error");
}

#[test]
fn sum_reduction_matches_f64() {
    let _g = DEVICE.lock().unwrap();
    for n in [1usize, 31, 256, 257, 5000, 70_000] {
        let x = random(n, 7 + n as u64);
        let exact: f64 = x.iter().map(|&v| v as f64).sum();
        let scale: f64 = x.iter().map(|&v| v.abs() as f64).sum();
        let got = sim::sum(&x).unwrap() as f64;
        assert!((got - exact).abs() <= 1e-6 * scale, "n={n}: {got} vs {exact}");
        // Deterministic: the same bits again, and under the other schedule.
        sim::set_reverse_schedule(true);
        assert_eq!(sim::sum(&x).unwrap().to_bits(), (got as f32).to_bits());
        sim::set_reverse_schedule(false);
    }
}

#[test]
fn adam_and_ema_kernels_match_the_cpu_backend_bit_for_bit() {
    use edm2::nn::params::{ParamKind, ParamSpec, Params};
    use edm2::train::adam::Adam;
    let _g = DEVICE.lock().unwrap();
    let n = 3001;
    let specs = vec![ParamSpec { name: "w".into(), shape: vec![n], kind: ParamKind::Param, is_mp_weight: false }];
    let p0 = random(n, 1);
    let (mut cpu_p, mut cpu) = (Params { values: vec![p0.clone()] }, Adam::new(&specs));
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    for t in 1..=3u64 {
        let mut g = random(n, 10 + t);
        g[5] = f32::NAN;
        g[77] = f32::INFINITY;
        let bad = sim::adam(&mut p, &g, &mut m, &mut v, 0.01, 0.9, 0.99, 1e-8, t).unwrap();
        let mut grads = Params { values: vec![g] };
        let cpu_bad = Adam::sanitize(&mut grads);
        cpu.step(&specs, &mut cpu_p, &grads, 0.01);
        assert_eq!((bad, cpu_bad), (2, 2));
        assert_eq!(p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), cpu_p.values[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "step {t}");
        assert_eq!(m, cpu.m.values[0]);
        assert_eq!(v, cpu.v.values[0]);
    }
    // The power-function EMA update (both lerp branches).
    for w in [0.3f32, 0.9] {
        let mut e = random(n, 3);
        let want: Vec<f32> = e.iter().zip(&p).map(|(&a, &b)| edm2::train::ema::torch_lerp(a, b, w)).collect();
        sim::ema_lerp(&mut e, &p, w).unwrap();
        assert_eq!(e, want, "w={w}");
    }
}
