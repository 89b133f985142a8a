//! The CUDA kernels against the CPU backend, through the same safe wrappers and device
//! buffers the CUDA backend uses. With `--features cuda-sim` they run in the simulation
//! harness (CI), under both thread schedules; with `--features cuda` on a real GPU (skipped
//! without one unless EDM2_REQUIRE_GPU=1). Inputs are random (never zeros), outputs are
//! poisoned before the kernel runs, sizes leave partial blocks.
#![cfg(any(feature = "cuda", feature = "cuda-sim"))]

mod common;
use common::*;
use edm2::backend::cpu::ops;
use edm2::backend::gpu::{bf16_bits, bf16_value, kernels as k, Dtype, Gpu, GpuAct, GpuBuf, Precision};
use edm2::rng::Rng;
use std::sync::Mutex;

/// The schedule is global state of the simulated device: tests take turns.
static DEVICE: Mutex<()> = Mutex::new(());

/// Runs `f` under every thread schedule the device has (forward and reverse on the
/// simulated device; the hardware's own on a GPU).
fn each_schedule(mut f: impl FnMut(&str)) {
    #[cfg(all(feature = "cuda-sim", not(feature = "cuda-sim-tsan")))]
    for reverse in [false, true] {
        k::set_reverse_schedule(reverse);
        f(if reverse { "reverse schedule" } else { "forward schedule" });
        k::set_reverse_schedule(false);
    }
    // ThreadSanitizer mode: the threads of a block are concurrent OS threads, there is no
    // schedule order to vary, and ThreadSanitizer judges happens-before, not the
    // interleaving that ran: one run (a second doubled the mode's CI time for nothing).
    #[cfg(feature = "cuda-sim-tsan")]
    f("threads");
    #[cfg(not(feature = "cuda-sim"))]
    f("gpu");
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.normal() * 2.0) as f32).collect()
}

/// Runs `f` in both activation precisions (fp32, bf16 storage) under every schedule; the
/// device's precision is set for each run (and back to fp32 after).
fn each_mode(gpu: &Gpu, mut f: impl FnMut(&str)) {
    for p in [Precision::Fp32, Precision::Bf16] {
        gpu.set_precision(p);
        each_schedule(|sched| f(&format!("{p:?} {sched}")));
    }
    gpu.set_precision(Precision::Fp32);
}

/// An activation in the device's current precision.
fn up(gpu: &Gpu, x: &[f32]) -> GpuAct {
    gpu.upload_act(x).unwrap()
}

fn down(gpu: &Gpu, x: &GpuAct) -> Vec<f32> {
    gpu.download_act(x).unwrap()
}

/// An activation buffer of `n` values in the device's current precision.
fn act(gpu: &Gpu, n: usize) -> GpuAct {
    gpu.alloc_act(n).unwrap()
}

/// An fp32 buffer (weights, optimizer state, reduction inputs).
fn up32(gpu: &Gpu, x: &[f32]) -> GpuBuf<f32> {
    gpu.upload(x).unwrap()
}

fn down32(gpu: &Gpu, x: &GpuBuf<f32>) -> Vec<f32> {
    gpu.download(x).unwrap()
}

/// `v` as the device's current activation storage holds it (bf16: rounded to nearest even).
fn stored(gpu: &Gpu, v: &[f32]) -> Vec<f32> {
    match gpu.act_dtype() {
        Dtype::F32 => v.to_vec(),
        Dtype::Bf16 => v.iter().map(|&x| bf16_value(bf16_bits(x))).collect(),
    }
}

#[cfg(feature = "cuda-sim")]
#[test]
fn harness_catches_a_missing_barrier() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::open(0).unwrap();
    let x: Vec<f32> = (0..256).map(|i| (i % 7) as f32 + 0.5).collect();
    let exact: f32 = x.iter().sum();
    let xb = up32(&gpu, &x);
    let mut wrong = 0;
    each_schedule(|sched| {
        assert_eq!(k::selftest_block_sum(&gpu, &xb, false).unwrap(), exact, "with barriers, {sched}");
        if k::selftest_block_sum(&gpu, &xb, true).unwrap() != exact {
            wrong += 1;
        }
    });
    // With concurrent OS threads (cuda-sim-tsan) the wrong sum is up to the OS scheduler;
    // there ThreadSanitizer's report of the race is the check (.ci/run looks for it).
    if !cfg!(feature = "cuda-sim-tsan") {
        assert!(wrong > 0, "the reduction without its barrier gave the right sum under both schedules");
    }
}

/// A lost update inside a barrier segment (64 threads `+=` one shared float). The fiber
/// mode runs one thread at a time, so it always gets 64: this is the kind of race only
/// the race-hunting mode sees, where scripts/tsan-kernels.sh requires ThreadSanitizer to
/// report it (a positive control, like the missing barrier).
#[cfg(feature = "cuda-sim")]
#[test]
fn harness_race_inside_a_barrier_segment() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::open(0).unwrap();
    let sum = k::selftest_shared_increment(&gpu).unwrap();
    if !cfg!(feature = "cuda-sim-tsan") {
        assert_eq!(sum, 64.0, "fibers run one at a time: no update can be lost");
    }
}

#[cfg(feature = "cuda-sim")]
#[test]
fn harness_poisons_shared_memory_per_block() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::open(0).unwrap();
    each_schedule(|sched| {
        let o = k::selftest_shared_poison(&gpu).unwrap();
        assert_eq!(o[..3], [1.0, 1.0, 1.0], "{sched}");
        assert!(o[3].is_nan(), "block 1 read block 0's stale shared memory ({}) instead of poison, {sched}", o[3]);
    });
}

#[test]
fn warp_shuffles() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    let x: Vec<f32> = (0..64).map(|i| (i * i % 11) as f32).collect();
    let xb = up32(&gpu, &x);
    each_schedule(|sched| {
        let out = k::selftest_warp_sum(&gpu, &xb).unwrap();
        assert_eq!(out, [x[..32].iter().sum::<f32>(), x[32..].iter().sum::<f32>()], "{sched}");
    });
}

#[test]
fn elementwise_kernels_match_the_cpu_backend() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    each_mode(&gpu, |sched| {
        for n in [1usize, 255, 1000, 4099] {
            let packed_before = edm2::backend::gpu::packed_launches();
            let x = random(n, n as u64);
            let dy = random(n, n as u64 + 1);
            let (xb, dyb) = (up(&gpu, &x), up(&gpu, &dy));
            let mut y_cpu = vec![0.0; n];
            ops::mp_silu(&x, &mut y_cpu);
            let mut yb = act(&gpu, n);
            k::mp_silu(&gpu, &xb, &mut yb).unwrap();
            close_in(&gpu, &format!("mp_silu n={n} {sched}"), &down(&gpu, &yb), &y_cpu);
            let mut d_cpu = vec![0.0; n];
            ops::mp_silu_backward(&x, &dy, &mut d_cpu);
            let mut db = act(&gpu, n);
            k::mp_silu_backward(&gpu, &xb, &dyb, &mut db, false).unwrap();
            close_in(&gpu, &format!("mp_silu_backward n={n} {sched}"), &down(&gpu, &db), &d_cpu);
            // Accumulating: dx0 + dy·mp_silu'(x) in one launch, rounded once (fp32: the bits
            // of the backward then an add).
            let dx0 = random(n, n as u64 + 2);
            let mut acc_cpu = dx0.clone();
            ops::mp_silu_backward_acc(&x, &dy, &mut acc_cpu);
            let mut accb = up(&gpu, &dx0);
            let before = edm2::backend::gpu::launches();
            k::mp_silu_backward(&gpu, &xb, &dyb, &mut accb, true).unwrap();
            assert_eq!(edm2::backend::gpu::launches() - before, 1, "mp_silu_backward accumulating is one launch");
            close_in(&gpu, &format!("mp_silu_backward accumulate n={n} {sched}"), &down(&gpu, &accb), &acc_cpu);
            if gpu.act_dtype() == Dtype::F32 {
                let mut two = up(&gpu, &dx0);
                k::axpby(&gpu, &mut two, &db, 1.0, 1.0).unwrap();
                assert_eq!(down(&gpu, &accb), down(&gpu, &two), "mp_silu_backward accumulate: the bits of backward + add");
            }
            let mut a_cpu = x.clone();
            ops::mp_sum_inplace(&mut a_cpu, &dy, 0.3);
            let mut ab = up(&gpu, &x);
            k::mp_sum(&gpu, &mut ab, &dyb, 0.3).unwrap();
            close_in(&gpu, &format!("mp_sum n={n} {sched}"), &down(&gpu, &ab), &a_cpu);
            // Every launch above moved 16-byte packs (and the values past the last one
            // alone), except with fewer values than a pack holds.
            let launched = if gpu.act_dtype() == Dtype::F32 { 5 } else { 4 };
            let packed = edm2::backend::gpu::packed_launches() - packed_before;
            assert_eq!(packed, if n >= 8 { launched } else { 0 }, "packed launches n={n} {sched}");
        }
    });
    let (a, mut b) = (up(&gpu, &[1.0, 2.0]), act(&gpu, 1));
    assert!(k::mp_silu(&gpu, &a, &mut b).is_err(), "a length mismatch is an error");
    gpu.set_precision(Precision::Bf16);
    let mut b16 = act(&gpu, 2);
    assert!(k::mp_silu(&gpu, &a, &mut b16).is_err(), "fp32 in, bf16 out is an error (one dtype per launch)");
    gpu.set_precision(Precision::Fp32);
}

/// bf16 activation storage rounds to nearest, ties to even, on the host and in the kernels
/// alike; NaN stays NaN, overflow goes to infinity; widening back to fp32 is exact.
#[test]
fn bf16_storage_rounds_to_nearest_even() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    let ulp = 2f32.powi(-7); // bf16 spacing in [1, 2)
    let cases: [(f32, f32); 9] = [
        (1.0, 1.0),
        (1.0 + ulp / 2.0, 1.0),                   // tie: to the even neighbour (down)
        (1.0 + 1.5 * ulp, 1.0 + 2.0 * ulp),       // tie: to the even neighbour (up)
        (1.0 + 0.51 * ulp, 1.0 + ulp),            // above half: up
        (-(1.0 + 0.49 * ulp), -1.0),              // below half: down, sign kept
        (f32::MAX, f32::INFINITY),                // past the largest bf16 (and halfway): infinity
        (f32::NEG_INFINITY, f32::NEG_INFINITY),
        (1.0e-40, f32::from_bits(0x0001_0000)),   // subnormal: rounded like any value
        (0.0, 0.0),
    ];
    for (x, want) in cases {
        assert_eq!(bf16_value(bf16_bits(x)).to_bits(), want.to_bits(), "host rounding of {x:e}");
    }
    let mut xs: Vec<f32> = cases.iter().map(|c| c.0).collect();
    xs.push(f32::NAN);
    xs.push(f32::from_bits(0x7f80_0001)); // a NaN whose payload is only in the low bits
    xs.extend(random(1000, 99));
    let host: Vec<u16> = xs.iter().map(|&x| bf16_bits(x)).collect();
    let dev = k::scaled_to(&gpu, &up32(&gpu, &xs), Dtype::Bf16, 1.0).unwrap();
    assert_eq!(dev.dtype(), Dtype::Bf16);
    let got: Vec<u16> = gpu.download_act(&dev).unwrap().iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    // NaN stays NaN; its payload is the hardware's (a GPU's arithmetic returns the
    // canonical NaN), so NaNs are compared as NaNs and everything else bit for bit.
    let nan_or_bits = |v: &[u16]| v.iter().map(|&b| if bf16_value(b).is_nan() { None } else { Some(b) }).collect::<Vec<_>>();
    assert_eq!(nan_or_bits(&got), nan_or_bits(&host), "kernel rounding = host rounding");
    let n = cases.len();
    assert!(bf16_value(got[n]).is_nan() && bf16_value(got[n + 1]).is_nan(), "NaN stays NaN");
    // Widening is exact: bf16 → fp32 → the same bits.
    let wide = k::scaled_to(&gpu, &dev, Dtype::F32, 1.0).unwrap();
    let back: Vec<u16> = gpu.download_act(&wide).unwrap().iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    assert_eq!(back, got);
}

#[test]
fn sum_reduction_matches_f64_and_is_deterministic() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    for n in [1usize, 31, 256, 257, 5000, 70_000] {
        let x = random(n, 7 + n as u64);
        let exact: f64 = x.iter().map(|&v| v as f64).sum();
        let scale: f64 = x.iter().map(|&v| v.abs() as f64).sum();
        let xb = up32(&gpu, &x);
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
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
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
    let (mut p, mut m, mut v) = (up32(&gpu, &p0), gpu.alloc_zeros(n).unwrap(), gpu.alloc_zeros(n).unwrap());
    for t in 1..=3u64 {
        let mut g = random(n, 10 + t);
        g[5] = f32::NAN;
        g[77] = f32::INFINITY;
        // The counters accumulate: they start at 5 and 7 here.
        let mut count = gpu.upload(&[5u32, 7]).unwrap();
        k::adam(&gpu, &mut p, &up32(&gpu, &g), &mut m, &mut v, 0.01, 0.9, 0.99, 1e-8, t, &mut count).unwrap();
        let counts = gpu.download(&count).unwrap();
        let bad = counts[0] - 5;
        assert_eq!(counts[1], 7, "a finite update adds no non-finite results");
        let mut grads = Params { values: vec![g] };
        let cpu_bad = Adam::sanitize(&mut grads);
        cpu.step(&specs, &mut cpu_p, &grads, 0.01);
        assert_eq!((bad, cpu_bad), (2, 2));
        same(&down32(&gpu, &p), &cpu_p.values[0], &format!("adam p, step {t}"));
        same(&down32(&gpu, &m), &cpu.m.values[0], &format!("adam m, step {t}"));
        same(&down32(&gpu, &v), &cpu.v.values[0], &format!("adam v, step {t}"));
    }
    // The power-function EMA update (both lerp branches).
    let pv = down32(&gpu, &p);
    {
        // An overflowing update (step size lr/(1−β1ᵗ) = inf in f32) is counted in the
        // second counter: every entry of p goes non-finite.
        let (mut p2, mut m2, mut v2) = (up32(&gpu, &pv), up32(&gpu, &down32(&gpu, &m)), up32(&gpu, &down32(&gpu, &v)));
        let mut count = gpu.alloc_zeros::<u32>(2).unwrap();
        k::adam(&gpu, &mut p2, &up32(&gpu, &random(n, 99)), &mut m2, &mut v2, 1e39, 0.9, 0.99, 1e-8, 4, &mut count).unwrap();
        let bad_p = down32(&gpu, &p2).iter().filter(|x| !x.is_finite()).count();
        assert_eq!(gpu.download(&count).unwrap(), vec![0, bad_p as u32]);
        assert_eq!(bad_p, n);
    }
    for w in [0.3f32, 0.9] {
        let e0 = random(n, 3);
        let want: Vec<f32> = e0.iter().zip(&pv).map(|(&a, &b)| edm2::train::ema::torch_lerp(a, b, w)).collect();
        let mut e = up32(&gpu, &e0);
        k::ema_lerp(&gpu, &mut e, &p, w).unwrap();
        same(&down32(&gpu, &e), &want, &format!("ema w={w}"));
    }
}

#[test]
fn multi_tensor_updates_equal_the_per_tensor_kernels_bit_for_bit() {
    use edm2::backend::gpu::multi_tensor as mt;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    // Odd lengths (the scalar tail after the float4s), a one-element gain, an empty tensor,
    // tensors spanning many chunks; a small chunk so the blocks loop over many of them.
    let sizes = [3001usize, 1, 0, 130, 4, 17, 1024];
    let bits = |b: &GpuBuf<f32>| down32(&gpu, b).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let set = |seed: u64| -> Vec<GpuBuf<f32>> { sizes.iter().enumerate().map(|(i, &n)| up32(&gpu, &random(n, seed + i as u64))).collect() };
    for chunk in [64usize, mt::CHUNK] {
        each_schedule(|sched| {
            let (mut p1, mut m1, mut v1) = (set(1), set(20), set(40));
            for v in v1.iter_mut() {
                let sq: Vec<f32> = down32(&gpu, v).iter().map(|x| x * x).collect();
                *v = up32(&gpu, &sq);
            }
            let (mut p2, mut m2, mut v2) = (set(1), set(20), set(40));
            for (a, b) in v2.iter_mut().zip(&v1) {
                *a = up32(&gpu, &down32(&gpu, b));
            }
            let mut grads: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| random(n, 60 + i as u64)).collect();
            grads[0][7] = f32::NAN;
            grads[3][129] = f32::NEG_INFINITY;
            let g: Vec<GpuBuf<f32>> = grads.iter().map(|x| up32(&gpu, x)).collect();
            let mut c1 = gpu.alloc_zeros::<u32>(2).unwrap();
            let mut c2 = gpu.alloc_zeros::<u32>(2).unwrap();
            for t in 1..=2u64 {
                for i in 0..sizes.len() {
                    k::adam(&gpu, &mut p1[i], &g[i], &mut m1[i], &mut v1[i], 0.01, 0.9, 0.99, 1e-8, t, &mut c1).unwrap();
                }
                let tensors = p2
                    .iter_mut()
                    .zip(&g)
                    .zip(m2.iter_mut().zip(v2.iter_mut()))
                    .map(|((p, g), (m, v))| mt::AdamTensor { p, g, m, v })
                    .collect();
                mt::adam(&gpu, tensors, 0.01, 0.9, 0.99, 1e-8, t, &mut c2, chunk).unwrap();
            }
            for i in 0..sizes.len() {
                assert_eq!(bits(&p2[i]), bits(&p1[i]), "adam_multi p[{i}] chunk {chunk} {sched}");
                assert_eq!(bits(&m2[i]), bits(&m1[i]), "adam_multi m[{i}] chunk {chunk} {sched}");
                assert_eq!(bits(&v2[i]), bits(&v1[i]), "adam_multi v[{i}] chunk {chunk} {sched}");
            }
            assert_eq!(gpu.download(&c2).unwrap(), gpu.download(&c1).unwrap());
            assert_eq!(gpu.download(&c2).unwrap(), vec![4, 0], "two non-finite gradient entries, two steps");
            // Two EMAs of the same weights with different w (both lerp branches), one launch.
            let (mut e1, mut e2) = (set(80), set(90));
            let (mut f1, mut f2) = (set(80), set(90));
            for i in 0..sizes.len() {
                k::ema_lerp(&gpu, &mut e1[i], &p1[i], 0.3).unwrap();
                k::ema_lerp(&gpu, &mut e2[i], &p1[i], 0.7).unwrap();
            }
            let tensors = f1
                .iter_mut()
                .zip(&p1)
                .map(|(e, p)| (e, p, 0.3f32))
                .chain(f2.iter_mut().zip(&p1).map(|(e, p)| (e, p, 0.7f32)))
                .collect();
            mt::ema_lerp(&gpu, tensors, chunk).unwrap();
            for i in 0..sizes.len() {
                assert_eq!(bits(&f1[i]), bits(&e1[i]), "ema_lerp_multi w=0.3 [{i}] chunk {chunk} {sched}");
                assert_eq!(bits(&f2[i]), bits(&e2[i]), "ema_lerp_multi w=0.7 [{i}] chunk {chunk} {sched}");
            }
            // Gradient accumulation.
            let mut acc = set(100);
            let want: Vec<Vec<f32>> = acc.iter().zip(&g).map(|(a, b)| down32(&gpu, a).iter().zip(&down32(&gpu, b)).map(|(x, y)| x + y).collect()).collect();
            mt::add(&gpu, acc.iter_mut().zip(&g).collect(), chunk).unwrap();
            for i in 0..sizes.len() {
                let got = down32(&gpu, &acc[i]);
                assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want[i].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "add_multi [{i}]");
            }
        });
    }
    // Forced weight normalization of several weights (rows of different lengths) at once.
    each_schedule(|sched| {
        let shapes = [(5usize, 7usize), (3, 1), (4, 144), (2, 1152), (9, 20)];
        let ws: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(i, &(r, kk))| random(r * kk, 500 + i as u64)).collect();
        let mut one: Vec<GpuBuf<f32>> = ws.iter().map(|w| up32(&gpu, w)).collect();
        let mut all: Vec<GpuBuf<f32>> = ws.iter().map(|w| up32(&gpu, w)).collect();
        for (b, &(_, kk)) in one.iter_mut().zip(&shapes) {
            k::normalize_rows_inplace(&gpu, b, kk).unwrap();
        }
        mt::normalize_rows(&gpu, all.iter_mut().zip(shapes.iter().map(|s| s.1)).collect()).unwrap();
        for i in 0..shapes.len() {
            assert_eq!(bits(&all[i]), bits(&one[i]), "normalize_rows_multi {:?} {sched}", shapes[i]);
        }
        assert!(mt::normalize_rows(&gpu, vec![(&mut all[0], 6)]).is_err(), "35 values are not rows of 6");
    });
    // One launch for all of them, and a chunk the float4 path cannot use is refused.
    let (mut a, b) = (set(1), set(2));
    let before = edm2::backend::gpu::launches();
    mt::add(&gpu, a.iter_mut().zip(&b).collect(), mt::CHUNK).unwrap();
    assert_eq!(edm2::backend::gpu::launches() - before, 1);
    assert!(mt::add(&gpu, a.iter_mut().zip(&b).collect(), 6).is_err());
}

/// Tolerances against the CPU backend (relative L2), as the CUDA issue asks: fp32 mode
/// 1e-5; bf16 activations 1e-2.
const FP32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

fn close_tol(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output (an unwritten, poisoned element?)");
    let e = rel_l2(got, want);
    assert!(e < tol, "{what}: rel L2 {e:.2e}");
}

/// Within the fp32 tolerance.
fn close(what: &str, got: &[f32], want: &[f32]) {
    close_tol(what, got, want, FP32_TOL)
}

/// Within the tolerance of the device's current activation precision.
fn close_in(gpu: &Gpu, what: &str, got: &[f32], want: &[f32]) {
    close_tol(what, got, want, if gpu.act_dtype() == Dtype::Bf16 { BF16_TOL } else { FP32_TOL })
}

#[test]
fn normalize_rows_and_weight_norm_match_the_cpu_backend() {
    use edm2::backend::cpu::conv;
    use edm2::backend::gpu::kernels::ConvGeom;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    each_mode(&gpu, |sched| {
        // Pixel norm (activations) / forced weight norm (fp32 weights, in place): rows of k,
        // k not a multiple of the block.
        for (rows, kk) in [(37usize, 40usize), (5, 300), (4, 3)] {
            let x = random(rows * kk, 11 + kk as u64);
            let dy = random(rows * kk, 12 + kk as u64);
            let xb = up(&gpu, &x);
            let mut want = vec![0.0; x.len()];
            ops::normalize_rows(&x, kk, &mut want);
            let mut y = act(&gpu, x.len());
            let packed_before = edm2::backend::gpu::packed_launches();
            k::normalize_rows(&gpu, &xb, kk, &mut y).unwrap();
            // A pixel's channels in 16-byte packs where they fill whole packs (40 in both
            // storage types, 300 in fp32's packs of 4), else one value per lane.
            let lanes = if gpu.act_dtype() == Dtype::F32 { 4 } else { 8 };
            let packed = edm2::backend::gpu::packed_launches() - packed_before;
            assert_eq!(packed, u64::from(kk % lanes == 0), "normalize_rows {rows}x{kk} packed {sched}");
            close_in(&gpu, &format!("normalize_rows {rows}x{kk} {sched}"), &down(&gpu, &y), &want);
            let mut inplace = up32(&gpu, &x);
            k::normalize_rows_inplace(&gpu, &mut inplace, kk).unwrap();
            let mut want_inplace = x.clone();
            ops::normalize_rows_inplace(&mut want_inplace, kk);
            close(&format!("normalize_rows_inplace {sched}"), &down32(&gpu, &inplace), &want_inplace);
            ops::normalize_rows_backward(&x, kk, &dy, &mut want);
            let mut dx = act(&gpu, x.len());
            k::normalize_rows_backward(&gpu, &xb, kk, &up(&gpu, &dy), &mut dx).unwrap();
            close_in(&gpu, &format!("normalize_rows_backward {rows}x{kk} {sched}"), &down(&gpu, &dx), &want);
            // An encoder block's fused forms, one launch each: the pixel norm writing the
            // branch's mp_silu too; its backward taking dy + da0·mp_silu'(xm) — the bits of
            // the unfused launches.
            let mut y2 = act(&gpu, x.len());
            let mut a2 = act(&gpu, x.len());
            let l0 = edm2::backend::gpu::launches();
            k::normalize_rows_silu(&gpu, &xb, kk, &mut y2, &mut a2).unwrap();
            assert_eq!(edm2::backend::gpu::launches() - l0, 1);
            let mut a1 = act(&gpu, x.len());
            k::mp_silu(&gpu, &y, &mut a1).unwrap();
            assert_eq!(down(&gpu, &y2), down(&gpu, &y), "normalize_rows_silu y {sched}");
            assert_eq!(down(&gpu, &a2), down(&gpu, &a1), "normalize_rows_silu a {sched}");
            let (xm, da0) = (up(&gpu, &random(x.len(), 13 + kk as u64)), up(&gpu, &random(x.len(), 14 + kk as u64)));
            let mut g1 = up(&gpu, &dy);
            k::mp_silu_backward(&gpu, &xm, &da0, &mut g1, true).unwrap();
            let mut want_dx = act(&gpu, x.len());
            k::normalize_rows_backward(&gpu, &xb, kk, &g1, &mut want_dx).unwrap();
            let mut got_dx = act(&gpu, x.len());
            let l0 = edm2::backend::gpu::launches();
            k::normalize_rows_backward_silu(&gpu, &xb, kk, &up(&gpu, &dy), &xm, &da0, &mut got_dx).unwrap();
            assert_eq!(edm2::backend::gpu::launches() - l0, 1);
            assert_eq!(down(&gpu, &got_dx), down(&gpu, &want_dx), "normalize_rows_backward_silu {rows}x{kk} {sched}");
        }
        // Effective weights of linear, 1x1 and 3x3 layers (32 outputs: the CPU's packed path).
        // Each layer's backward (accumulating, gain on the device) is kept to check the
        // batched form against after the loop.
        use edm2::backend::gpu::multi_tensor;
        let mut singles = Vec::new();
        for (o, i, kk, gain) in [(20usize, 12usize, 0usize, 0.7f32), (36, 20, 1, 1.0), (20, 7, 3, 1.0), (32, 16, 3, 1.0)] {
            let geom = ConvGeom { out_ch: o, in_ch: i, k: kk };
            let w = random(geom.numel(), 100 + o as u64 + kk as u64);
            let cpu = conv::effective_weight(&w, o, i, kk, gain);
            let wb = up32(&gpu, &w);
            // The gain as a value, and as a parameter's device buffer: the same bits.
            let gain_buf = up32(&gpu, &[gain]);
            let eff = k::effective_weight(&gpu, &wb, geom, k::Gain::Value(gain)).unwrap();
            let eff_at = k::effective_weight(&gpu, &wb, geom, k::Gain::At(&gain_buf)).unwrap();
            close(&format!("effective_weight {geom:?} {sched}"), &down32(&gpu, &eff.w), &cpu.ohwi());
            assert_eq!(down32(&gpu, &eff_at.w), down32(&gpu, &eff.w), "effective_weight with the gain on the device {geom:?}");
            close(&format!("effective_weight denom {geom:?} {sched}"), &down32(&gpu, &eff.denom), &cpu.denom);
            let d_eff = random(geom.numel(), 200 + o as u64);
            let mut dw_cpu = vec![0.0; w.len()];
            let dgain_cpu = conv::effective_weight_backward(&w, &cpu, &d_eff, &mut dw_cpu);
            let (mut dw, mut rows) = (gpu.alloc(w.len()).unwrap(), gpu.alloc(o).unwrap());
            k::effective_weight_backward(&gpu, &wb, &eff, None, &up32(&gpu, &d_eff), &mut dw, Some(&mut rows), false).unwrap();
            let dgain = k::sum(&gpu, &rows).unwrap();
            close(&format!("effective_weight_backward dW {geom:?} {sched}"), &down32(&gpu, &dw), &dw_cpu);
            // Accumulating into a gradient buffer (gain on the device, rows summed into it).
            let start = random(w.len(), 300 + o as u64);
            let mut acc = up32(&gpu, &start);
            let mut dgain_acc = up32(&gpu, &[0.25]);
            k::effective_weight_backward(&gpu, &wb, &eff_at, Some(&gain_buf), &up32(&gpu, &d_eff), &mut acc, Some(&mut rows), true).unwrap();
            k::sum_add_into(&gpu, &rows, &mut dgain_acc).unwrap();
            let want: Vec<f32> = start.iter().zip(&down32(&gpu, &dw)).map(|(a, b)| a + b).collect();
            assert_eq!(down32(&gpu, &acc), want, "effective_weight_backward accumulate {geom:?}");
            let dgain_added = down32(&gpu, &dgain_acc)[0] - 0.25;
            assert!((dgain_added - dgain_cpu).abs() <= 2e-5 * dgain_cpu.abs().max(1.0), "sum_add dgain {geom:?}: {dgain_added} vs {dgain_cpu}");
            assert!((dgain - dgain_cpu).abs() <= 1e-5 * dgain_cpu.abs().max(1.0), "dgain {geom:?}: {dgain} vs {dgain_cpu}");
            singles.push((geom, gain, wb, gain_buf, d_eff, start, down32(&gpu, &acc), down32(&gpu, &dgain_acc)[0]));
        }
        // Every layer's effective-weight backward in one launch and their gains' row sums in
        // another: the same bits as one layer at a time (the first layer with a fixed gain
        // and no gain gradient, the others with the gain on the device).
        let d_effs: Vec<GpuBuf<f32>> = singles.iter().map(|t| up32(&gpu, &t.4)).collect();
        let mut dws: Vec<GpuBuf<f32>> = singles.iter().map(|t| up32(&gpu, &t.5)).collect();
        let mut rows: Vec<GpuBuf<f32>> = singles.iter().map(|t| gpu.alloc(t.0.out_ch).unwrap()).collect();
        let layers = singles
            .iter()
            .zip(&d_effs)
            .zip(dws.iter_mut())
            .zip(rows.iter_mut())
            .enumerate()
            .map(|(j, (((t, d_eff), dw), r))| multi_tensor::EffBackward {
                w: &t.2,
                geom: t.0,
                gain: t.1,
                gain_at: (j > 0).then_some(&t.3),
                d_eff,
                dw,
                row_dgain: (j > 0).then_some(r),
                accumulate: true,
            })
            .collect();
        let before = edm2::backend::gpu::launches();
        multi_tensor::effective_weight_backward(&gpu, layers).unwrap();
        let mut dgains: Vec<GpuBuf<f32>> = singles.iter().map(|_| up32(&gpu, &[0.25])).collect();
        multi_tensor::sum_add(&gpu, rows.iter().zip(dgains.iter_mut()).skip(1).collect()).unwrap();
        assert_eq!(edm2::backend::gpu::launches() - before, 2, "all layers' backward and gain sums in two launches");
        for (j, t) in singles.iter().enumerate() {
            assert_eq!(down32(&gpu, &dws[j]), t.6, "effective_weight_backward_multi dW {:?} {sched}", t.0);
            if j > 0 {
                assert_eq!(down32(&gpu, &dgains[j])[0], t.7, "sum_add_multi dgain {:?} {sched}", t.0);
            } else {
                assert_eq!(down32(&gpu, &dgains[j])[0], 0.25, "no gain gradient asked for");
            }
        }
    });
}

/// The backward forms that save launches give the bits of the plain ones: a data gradient
/// added into a buffer (one launch for a linear layer, whose only variant is SIMT; a
/// temporary and an add elsewhere), and weight gradients deferred to one batched launch at
/// the end of a pass (also when a layer comes twice, which finishes the waiting ones
/// first); a deferred set cannot be read before it is finished.
#[test]
fn added_data_gradients_and_deferred_weight_gradients_give_the_plain_bits() {
    use edm2::backend::gpu::kernels::{ConvGeom, Nhwc};
    use edm2::backend::gpu::{launches, GpuParams};
    use edm2::backend::Backend;
    use edm2::nn::params::Params;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    each_mode(&gpu, |sched| {
        // Parameters: a linear weight with its learned gain (emb_linear), a 3x3 weight.
        let host = Params { values: vec![random(24 * 40, 61), vec![0.8], random(32 * 32 * 9, 62)] };
        let p = GpuParams::upload(&gpu, &host).unwrap();
        let linear = (0usize, ConvGeom { out_ch: 24, in_ch: 40, k: 0 }, Nhwc { n: 3, h: 1, w: 1, c: 40 }, Some(1usize));
        let conv = (2usize, ConvGeom { out_ch: 32, in_ch: 32, k: 3 }, Nhwc { n: 2, h: 5, w: 6, c: 32 }, None);
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let mut layers = Vec::new();
        for (j, &(id, geom, s, gain)) in [linear, conv].iter().enumerate() {
            // The linear layers' activations are fp32 in both precisions (the embedding).
            let a = |v: &[f32]| if geom.k == 0 { GpuAct::F32(up32(&gpu, v)) } else { up(&gpu, v) };
            let (x, dy, dx0) = (a(&random(s.numel(), 70 + j as u64)), a(&random(s.pixels() * geom.out_ch, 80 + j as u64)), random(s.numel(), 90 + j as u64));
            let eff = gpu.effective(&p, id, geom, gain).unwrap();
            let mut g_plain = gpu.zero_grads(&p).unwrap();
            let mut dx = a(&dx0);
            gpu.conv_backward(&p, id, &eff, &x, s, &dy, Some(&mut dx), gain, &mut g_plain).unwrap();
            let mut want = a(&dx0);
            k::axpby(&gpu, &mut want, &dx, 1.0, 1.0).unwrap();
            let mut g_add = gpu.zero_grads(&p).unwrap();
            let mut got = a(&dx0);
            let l0 = launches();
            gpu.conv_backward_acc(&p, id, &eff, &x, s, &dy, &mut got, gain, &mut g_add).unwrap();
            let used = launches() - l0;
            assert_eq!(bits(down(&gpu, &got)), bits(down(&gpu, &want)), "conv_backward_acc dx {geom:?} {sched}");
            assert_eq!(bits(g_add.download(&gpu).unwrap().values.concat()), bits(g_plain.download(&gpu).unwrap().values.concat()), "conv_backward_acc grads {geom:?} {sched}");
            if geom.k == 0 {
                // weight gradient, data gradient added in place, effective-weight backward, gain sum
                assert_eq!(used, 4, "a linear layer adds its data gradient in its own kernel");
            }
            layers.push((id, geom, s, gain, eff, x, dy));
        }
        // The pass: linear, conv, linear again (the repeat finishes the waiting ones first).
        let order = [0usize, 1, 0];
        let mut g_plain = gpu.zero_grads(&p).unwrap();
        for &j in &order {
            let (id, _, s, gain, eff, x, dy) = &layers[j];
            gpu.conv_backward(&p, *id, eff, x, *s, dy, None, *gain, &mut g_plain).unwrap();
        }
        let mut g_def = gpu.zero_grads(&p).unwrap();
        gpu.defer_weight_grads(&mut g_def);
        for (n, &j) in order.iter().enumerate() {
            let (id, _, s, gain, eff, x, dy) = &layers[j];
            gpu.conv_backward(&p, *id, eff, x, *s, dy, None, *gain, &mut g_def).unwrap();
            if n == 1 {
                assert!(g_def.download(&gpu).is_err(), "a deferred gradient set is not read before it is finished");
            }
        }
        let l0 = launches();
        gpu.finish_weight_grads(&p, &mut g_def).unwrap();
        assert_eq!(launches() - l0, 2, "the waiting layers finish in two launches");
        let (want, got) = (g_plain.download(&gpu).unwrap(), g_def.download(&gpu).unwrap());
        for (i, (a, b)) in want.values.iter().zip(&got.values).enumerate() {
            assert!(a.iter().any(|&v| v != 0.0), "parameter {i} has a gradient");
            assert_eq!(bits(b.clone()), bits(a.clone()), "deferred gradient of parameter {i} {sched}");
        }
    });
}

/// The blocks' linear layers of one input in one launch each way (`linear_group`): the bits
/// of one call per layer, the data gradients added in the layers' order.
#[test]
fn grouped_linear_layers_give_the_bits_of_one_call_each() {
    use edm2::backend::gpu::kernels::ConvGeom;
    use edm2::backend::gpu::{launches, GpuParams};
    use edm2::backend::Backend;
    use edm2::nn::params::Params;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    each_mode(&gpu, |sched| {
        // Three linear layers of 40 inputs (17, 40 and 33 outputs: partial tiles), the first
        // two with learned gains; a batch of 5.
        let (n, cin, outs) = (5usize, 40usize, [17usize, 40, 33]);
        let mut values = Vec::new();
        for (j, &o) in outs.iter().enumerate() {
            values.push(random(o * cin, 100 + j as u64));
            values.push(vec![0.5 + j as f32]);
        }
        let p = GpuParams::upload(&gpu, &Params { values }).unwrap();
        let geoms: Vec<ConvGeom> = outs.iter().map(|&o| ConvGeom { out_ch: o, in_ch: cin, k: 0 }).collect();
        let gain = |j: usize| (j < 2).then_some(2 * j + 1);
        let effs: Vec<_> = geoms.iter().enumerate().map(|(j, &g)| gpu.effective(&p, 2 * j, g, gain(j)).unwrap()).collect();
        let x = GpuAct::F32(up32(&gpu, &random(n * cin, 110)));
        let group: Vec<_> = effs.iter().zip(&geoms).map(|(e, &g)| (e, g)).collect();
        let l0 = launches();
        let ys = gpu.linear_group_forward(&group, &x, n).unwrap();
        assert_eq!(launches() - l0, 1, "one launch for all layers");
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        for (j, (e, y)) in effs.iter().zip(&ys).enumerate() {
            let mut want = GpuAct::F32(gpu.alloc(n * outs[j]).unwrap());
            gpu.conv_forward(e, &x, edm2::backend::gpu::kernels::Nhwc { n, h: 1, w: 1, c: cin }, &mut want).unwrap();
            assert_eq!(bits(down(&gpu, y)), bits(down(&gpu, &want)), "linear_group forward layer {j} {sched}");
        }
        let dys: Vec<GpuAct> = outs.iter().enumerate().map(|(j, &o)| GpuAct::F32(up32(&gpu, &random(n * o, 120 + j as u64)))).collect();
        let dx0 = random(n * cin, 130);
        let mut g_one = gpu.zero_grads(&p).unwrap();
        let mut dx_one = GpuAct::F32(up32(&gpu, &dx0));
        for j in 0..outs.len() {
            let s = edm2::backend::gpu::kernels::Nhwc { n, h: 1, w: 1, c: cin };
            gpu.conv_backward_acc(&p, 2 * j, &effs[j], &x, s, &dys[j], &mut dx_one, gain(j), &mut g_one).unwrap();
        }
        let mut g_group = gpu.zero_grads(&p).unwrap();
        let mut dx_group = GpuAct::F32(up32(&gpu, &dx0));
        let layers: Vec<_> = (0..outs.len()).map(|j| (2 * j, geoms[j], &effs[j], &dys[j], gain(j))).collect();
        gpu.linear_group_backward(&p, &layers, &x, n, &mut dx_group, &mut g_group).unwrap();
        assert_eq!(bits(down(&gpu, &dx_group)), bits(down(&gpu, &dx_one)), "linear_group data gradient {sched}");
        let (want, got) = (g_one.download(&gpu).unwrap(), g_group.download(&gpu).unwrap());
        for (i, (a, b)) in want.values.iter().zip(&got.values).enumerate() {
            if i != 5 {
                assert!(a.iter().any(|&v| v != 0.0), "parameter {i} has a gradient");
            }
            assert_eq!(bits(b.clone()), bits(a.clone()), "linear_group gradient of parameter {i} {sched}");
        }
    });
}

/// Tuning (conv_algo.rs): the first call of a shape in each direction times every variant
/// that applies and keeps the fastest; later calls run that one alone and give the same
/// bits; a forced variant runs where it applies and the heuristic's elsewhere; fp32
/// activations have the SIMT kernel only. (Host logic over kernels the conv test checks:
/// not repeated under ThreadSanitizer.)
#[cfg(not(feature = "cuda-sim-tsan"))]
#[test]
fn conv_kernels_are_tuned_once_per_shape_and_direction() {
    use edm2::backend::gpu::conv_algo::{ConvAlgo, ConvDir, ConvPolicy};
    use edm2::backend::gpu::kernels::{ConvGeom, Nhwc};
    use edm2::backend::gpu::launches;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    gpu.set_precision(Precision::Bf16);
    // 32 -> 32 channels: every pipelined tile applies in every direction.
    let s = Nhwc { n: 2, h: 6, w: 5, c: 32 };
    let geom = ConvGeom { out_ch: 32, in_ch: 32, k: 3 };
    let eff = k::effective_weight(&gpu, &up32(&gpu, &random(geom.numel(), 41)), geom, k::Gain::Value(1.0)).unwrap();
    let (xb, dyb) = (up(&gpu, &random(s.numel(), 42)), up(&gpu, &random(s.pixels() * 32, 43)));
    let all = |gpu: &Gpu| {
        let mut y = act(gpu, s.pixels() * 32);
        k::conv_forward(gpu, &eff, &xb, s, &mut y).unwrap();
        let mut dx = act(gpu, s.numel());
        k::conv_backward_data(gpu, &eff, &dyb, s, &mut dx).unwrap();
        let mut de = gpu.alloc(geom.numel()).unwrap();
        k::conv_backward_weight(gpu, geom, &xb, s, &dyb, &mut de).unwrap();
        [down(gpu, &y), down(gpu, &dx), down32(gpu, &de)]
    };
    gpu.set_conv_policy(ConvPolicy::Tune);
    let first = all(&gpu);
    let tuned = gpu.conv_choices();
    let names = ["simt", "tc-simple", "tc-128x128", "tc-128x64", "tc-64x64"];
    assert_eq!(tuned.iter().map(|c| c.key.dir).collect::<Vec<_>>(), [ConvDir::Forward, ConvDir::Data, ConvDir::Weight]);
    for c in &tuned {
        assert_eq!(c.timings_ms.iter().map(|t| t.0.name()).collect::<Vec<_>>(), names, "{:?}: every applicable variant timed", c.key);
        assert!(c.timings_ms.iter().all(|t| t.1.is_finite() && t.1 > 0.0), "{c:?}");
        let best = c.timings_ms.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
        assert_eq!(c.algo, best.0, "{c:?}: the fastest is kept");
        assert_eq!((c.key.n, c.key.h, c.key.w, c.key.cin, c.key.cout, c.key.k, c.key.bf16), (2, 6, 5, 32, 32, 3, true));
    }
    // Later calls: no more timing, the kept variant alone (as many launches as calling it
    // directly), the same bits as the first call's result.
    let l0 = launches();
    let again = all(&gpu);
    let dispatched = launches() - l0;
    assert_eq!(gpu.conv_choices().len(), 3);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (a, b) in first.iter().zip(&again) {
        assert_eq!(bits(a), bits(b), "a tuned shape runs the same kernel every call");
    }
    let l0 = launches();
    let tile = |i: usize| tuned[i].algo.tile();
    let mut y = act(&gpu, s.pixels() * 32);
    match tile(0) {
        None => k::conv_forward_simt(&gpu, &eff, &xb, s, &mut y).unwrap(),
        Some(t) => k::conv_forward_tensor_core_tile(&gpu, &eff, &xb, s, &mut y, t).unwrap(),
    }
    let mut dx = act(&gpu, s.numel());
    match tile(1) {
        None => k::conv_backward_data_simt(&gpu, &eff, &dyb, s, &mut dx).unwrap(),
        Some(t) => k::conv_backward_data_tensor_core_tile(&gpu, &eff, &dyb, s, &mut dx, t).unwrap(),
    }
    let mut de = gpu.alloc(geom.numel()).unwrap();
    match tile(2) {
        None => k::conv_backward_weight_simt(&gpu, geom, &xb, s, &dyb, &mut de).unwrap(),
        Some(t) => k::conv_backward_weight_tensor_core_tile(&gpu, geom, &xb, s, &dyb, &mut de, t).unwrap(),
    }
    assert_eq!(launches() - l0, dispatched, "a tuned call launches what its variant does, nothing more");
    for (a, b) in [down(&gpu, &y), down(&gpu, &dx), down32(&gpu, &de)].iter().zip(&first) {
        assert_eq!(bits(a), bits(b), "the first call's result is the kept variant's");
    }
    // Turning the tensor cores off forgets the choices made among them: SIMT from then on.
    gpu.set_tensor_core_conv(false);
    assert!(gpu.conv_choices().is_empty());
    let mut y = act(&gpu, s.pixels() * 32);
    k::conv_forward(&gpu, &eff, &xb, s, &mut y).unwrap();
    assert_eq!(gpu.conv_choices()[0].algo, ConvAlgo::Simt);
    gpu.set_tensor_core_conv(true);

    // Forced: where it applies, else the heuristic's kernel (the simple tile for 20 input
    // channels, which the pipelined forward cannot take); fp32 activations: SIMT only.
    gpu.set_conv_policy(ConvPolicy::Forced(ConvAlgo::Tc64x64));
    let mut y = act(&gpu, s.pixels() * 32);
    k::conv_forward(&gpu, &eff, &xb, s, &mut y).unwrap();
    let s20 = Nhwc { c: 20, ..s };
    let g20 = ConvGeom { in_ch: 20, ..geom };
    let eff20 = k::effective_weight(&gpu, &up32(&gpu, &random(g20.numel(), 44)), g20, k::Gain::Value(1.0)).unwrap();
    let mut y20 = act(&gpu, s.pixels() * 32);
    k::conv_forward(&gpu, &eff20, &up(&gpu, &random(s20.numel(), 45)), s20, &mut y20).unwrap();
    gpu.set_precision(Precision::Fp32);
    let mut y32 = act(&gpu, s.pixels() * 32);
    k::conv_forward(&gpu, &eff, &up(&gpu, &random(s.numel(), 46)), s, &mut y32).unwrap();
    let forced: Vec<_> = gpu.conv_choices().iter().map(|c| (c.key.cin, c.key.bf16, c.algo, c.timings_ms.len())).collect();
    assert_eq!(
        forced,
        [(32, true, ConvAlgo::Tc64x64, 0), (20, true, ConvAlgo::TcSimple, 0), (32, false, ConvAlgo::Simt, 0)]
    );
    gpu.set_conv_policy(ConvPolicy::Tune);
    let mut y32 = act(&gpu, s.pixels() * 32);
    k::conv_forward(&gpu, &eff, &up(&gpu, &random(s.numel(), 46)), s, &mut y32).unwrap();
    let c = &gpu.conv_choices()[0];
    assert_eq!((c.algo, c.timings_ms.len()), (ConvAlgo::Simt, 0), "one candidate: nothing to time");

    // EDM2_CONV_ALGO's values; a wrong one names the variable and the accepted ones.
    assert_eq!(ConvPolicy::parse("tc-128x64", k::TcTile::Auto).unwrap(), ConvPolicy::Forced(ConvAlgo::Tc128x64));
    assert_eq!(ConvPolicy::parse("tune", k::TcTile::Auto).unwrap(), ConvPolicy::Tune);
    assert_eq!(ConvPolicy::parse("heuristic", k::TcTile::Simple).unwrap(), ConvPolicy::Heuristic(k::TcTile::Simple));
    let e = ConvPolicy::parse("tc-64x65", k::TcTile::Auto).unwrap_err().to_string();
    assert!(e.contains("EDM2_CONV_ALGO") && e.contains("tc-64x64") && e.contains("tune"), "{e}");
    gpu.set_conv_policy(ConvPolicy::from_env().unwrap());
}

/// The effective-weight kernel's bf16 operands (bf16 activations, tensor cores on): the
/// weight and its flipped transpose as a host conversion of the fp32 effective weight
/// gives them, and the tensor-core convolutions on them give the same bits as on their own
/// per-call conversions (which they use where the operands are absent), in one launch
/// fewer for the forward and two fewer for the data gradient.
#[test]
fn effective_weight_bf16_operands_match_the_conversions() {
    use edm2::backend::gpu::kernels::{ConvGeom, Nhwc};
    use edm2::backend::gpu::launches;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    gpu.set_precision(Precision::Bf16);
    let s = Nhwc { n: 2, h: 5, w: 6, c: 32 };
    for (o, kk) in [(64usize, 3usize), (32, 1)] {
        let geom = ConvGeom { out_ch: o, in_ch: 32, k: kk };
        let w = up32(&gpu, &random(geom.numel(), 50 + o as u64));
        let gain = up32(&gpu, &[1.7]);
        let with = k::effective_weight(&gpu, &w, geom, k::Gain::At(&gain)).unwrap();
        gpu.set_tensor_core_conv(false);
        let without = k::effective_weight(&gpu, &w, geom, k::Gain::At(&gain)).unwrap();
        gpu.set_tensor_core_conv(true);
        assert!(without.bf16.is_none() && without.bf16_flip.is_none());
        let wb = with.bf16.as_ref().expect("the forward's bf16 operand with tensor cores on");
        let wf = with.bf16_flip.as_ref().expect("the data gradient's bf16 operand with tensor cores on");
        let eff = down32(&gpu, &with.w);
        assert_eq!(eff, down32(&gpu, &without.w), "the fp32 effective weight is unchanged");
        let (taps, i) = (geom.taps(), geom.in_ch);
        let mut flip = vec![0.0f32; eff.len()];
        for oc in 0..o {
            for t in 0..taps {
                for ic in 0..i {
                    flip[(ic * taps + (taps - 1 - t)) * o + oc] = eff[(oc * taps + t) * i + ic];
                }
            }
        }
        let bits = |v: &[f32]| v.iter().map(|&x| bf16_bits(x)).collect::<Vec<u16>>();
        let dbits = |a: &GpuAct| match a {
            GpuAct::Bf16(b) => gpu.download(b).unwrap(),
            GpuAct::F32(_) => panic!("bf16 operands are bf16"),
        };
        let differ = |a: Vec<u16>, b: Vec<u16>| a.iter().zip(&b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len());
        assert_eq!(differ(dbits(wb), bits(&eff)), 0, "k{kk}: bf16 weight values that differ");
        assert_eq!(differ(dbits(wf), bits(&flip)), 0, "k{kk}: bf16 flipped-transpose values that differ");
        let x = up(&gpu, &random(s.numel(), 51));
        let dy = up(&gpu, &random(s.pixels() * o, 52));
        for tile in [k::TcTile::Auto, k::TcTile::T64x64] {
            let mut runs = Vec::new();
            for e in [&with, &without] {
                let l0 = launches();
                let mut y = act(&gpu, s.pixels() * o);
                k::conv_forward_tensor_core_tile(&gpu, e, &x, s, &mut y, tile).unwrap();
                let l1 = launches();
                let mut dx = act(&gpu, s.numel());
                k::conv_backward_data_tensor_core_tile(&gpu, e, &dy, s, &mut dx, tile).unwrap();
                runs.push((down(&gpu, &y), down(&gpu, &dx), l1 - l0, launches() - l1));
            }
            let (a, b) = (&runs[0], &runs[1]);
            let same = |p: &[f32], q: &[f32]| p.iter().zip(q).all(|(u, v)| u.to_bits() == v.to_bits());
            assert!(same(&a.0, &b.0) && same(&a.1, &b.1), "k{kk} {tile:?}: the same bits on the kernel's operands");
            assert_eq!((a.2 + 1, a.3 + 2), (b.2, b.3), "k{kk} {tile:?}: launches (forward, data gradient)");
        }
    }
    gpu.set_precision(Precision::Fp32);
}

/// Every effective weight of a forward in one launch (`multi_tensor::effective_weights`):
/// the same bits as one launch per weight — the fp32 weight, the row denominators and the
/// bf16 operands — for 3x3, 1x1 and linear layers, fixed gains and gain parameters, in
/// both precisions.
#[test]
fn effective_weights_in_one_launch_match_one_per_weight() {
    use edm2::backend::gpu::kernels::ConvGeom;
    use edm2::backend::gpu::{launches, multi_tensor as mt};
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    let geoms = [(48usize, 32usize, 3usize), (32, 20, 3), (64, 32, 1), (16, 40, 0), (7, 3, 3)];
    let ws: Vec<GpuBuf<f32>> = geoms.iter().enumerate().map(|(i, &(o, ii, kk))| up32(&gpu, &random(o * ii * kk.max(1) * kk.max(1), 60 + i as u64))).collect();
    let gain = up32(&gpu, &[0.6]);
    let gains = |i: usize| if i % 2 == 0 { k::Gain::At(&gain) } else { k::Gain::Value(1.0 + i as f32) };
    for p in [Precision::Fp32, Precision::Bf16] {
        gpu.set_precision(p);
        let jobs = geoms.iter().enumerate().map(|(i, &(o, ii, kk))| (&ws[i], ConvGeom { out_ch: o, in_ch: ii, k: kk }, gains(i))).collect();
        let l0 = launches();
        let multi = mt::effective_weights(&gpu, jobs, true).unwrap();
        assert_eq!(launches() - l0, 1, "{p:?}: one launch");
        // Without a backward to come, no data-gradient operand.
        let jobs = geoms.iter().enumerate().map(|(i, &(o, ii, kk))| (&ws[i], ConvGeom { out_ch: o, in_ch: ii, k: kk }, gains(i))).collect();
        assert!(mt::effective_weights(&gpu, jobs, false).unwrap().iter().all(|e| e.bf16_flip.is_none()));
        for (i, (&(o, ii, kk), m)) in geoms.iter().zip(&multi).enumerate() {
            let one = k::effective_weight(&gpu, &ws[i], ConvGeom { out_ch: o, in_ch: ii, k: kk }, gains(i)).unwrap();
            let bits = |b: &GpuBuf<f32>| down32(&gpu, b).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&m.w), bits(&one.w), "{p:?} {i}: effective weight");
            assert_eq!(bits(&m.denom), bits(&one.denom), "{p:?} {i}: denominators");
            assert_eq!(m.gain, one.gain);
            let b16 = |a: &GpuAct| match a {
                GpuAct::Bf16(b) => gpu.download(b).unwrap(),
                GpuAct::F32(_) => panic!("bf16 operands are bf16"),
            };
            // The pipelined kernels' operands where their channel counts suit them.
            let bf16 = p == Precision::Bf16 && kk > 0;
            for (what, a, b, made) in [("forward", &m.bf16, &one.bf16, bf16 && ii % 32 == 0), ("flipped", &m.bf16_flip, &one.bf16_flip, bf16 && o % 32 == 0)] {
                match (a, b) {
                    (Some(a), Some(b)) => assert!(made && b16(a) == b16(b), "{p:?} {i}: {what} bf16 operand"),
                    (None, None) => assert!(!made, "{p:?} {i}: {what} bf16 operand expected"),
                    _ => panic!("{p:?} {i}: {what} bf16 operand made by one path only"),
                }
            }
        }
    }
    gpu.set_precision(Precision::Fp32);
}

/// The tensor-core tiles the conv test runs: all of them, or under ThreadSanitizer (where a
/// simulated thread is an instrumented OS thread: with the 8-warp 128x128 tile as well the
/// conv test took 685 s there) `auto` alone — the 64x64 pipelined tile at the test's
/// sizes (the same template as the others), and the simple kernel where the channels do
/// not suit it.
fn tiles_to_check() -> Vec<k::TcTile> {
    if cfg!(feature = "cuda-sim-tsan") {
        vec![k::TcTile::Auto]
    } else {
        k::TcTile::ALL.to_vec()
    }
}

#[test]
fn conv_kernels_match_the_cpu_backend() {
    use edm2::backend::cpu::conv;
    use edm2::backend::gpu::kernels::{ConvGeom, Nhwc};
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    // Partial 16x16 tiles everywhere: 70 pixels, 20 → 36 channels, 3x3 K = 180.
    let cases = [
        (
            Nhwc {
                n: 2,
                h: 5,
                w: 7,
                c: 20,
            },
            36usize,
            3usize,
        ),
        (
            Nhwc {
                n: 2,
                h: 5,
                w: 7,
                c: 20,
            },
            36,
            1,
        ),
        (
            Nhwc {
                n: 3,
                h: 1,
                w: 1,
                c: 24,
            },
            17,
            0,
        ),
        (
            Nhwc {
                n: 1,
                h: 4,
                w: 4,
                c: 33,
            },
            3,
            3,
        ),
        // Several 64x64 tiles of the tensor-core kernel, K over many steps of 32.
        (
            Nhwc {
                n: 2,
                h: 9,
                w: 8,
                c: 40,
            },
            72,
            3,
        ),
        // 270 pixels: the tensor-core weight gradient splits them into 2 slices of
        // whole K steps (160 + 110), the last one partial.
        (
            Nhwc {
                n: 1,
                h: 10,
                w: 27,
                c: 4,
            },
            8,
            3,
        ),
        // Input channels a multiple of 32: the pipelined tensor-core kernels (tc_pipe.cuh)
        // take them — 3 taps-aligned K steps a tap, partial pixel and channel tiles, an odd
        // output width (no paired stores), 1x1 and linear; 288 pixels = 3 tiles of 128.
        (
            Nhwc {
                n: 2,
                h: 12,
                w: 12,
                c: 64,
            },
            96,
            3,
        ),
        (
            Nhwc {
                n: 2,
                h: 5,
                w: 7,
                c: 32,
            },
            35,
            3,
        ),
        (
            Nhwc {
                n: 1,
                h: 9,
                w: 8,
                c: 64,
            },
            64,
            1,
        ),
        (
            Nhwc {
                n: 3,
                h: 1,
                w: 1,
                c: 32,
            },
            32,
            0,
        ),
    ];
    let mut dtypes = Vec::new();
    each_mode(&gpu, |sched| {
        dtypes.push(gpu.act_dtype());
        for (s, o, kk) in cases {
            let geom = ConvGeom {
                out_ch: o,
                in_ch: s.c,
                k: kk,
            };
            let w = random(geom.numel(), 300 + o as u64);
            let x = random(s.numel(), 301 + kk as u64);
            let dy = random(s.pixels() * o, 302);
            let cpu = conv::effective_weight(&w, o, s.c, kk, 1.0);
            let eff = k::effective_weight(&gpu, &up32(&gpu, &w), geom, k::Gain::Value(1.0)).unwrap();
            let xb = up(&gpu, &x);
            let mut y_cpu = vec![0.0; s.pixels() * o];
            conv::conv_forward(&cpu, &x, s.n, s.h, s.w, &mut y_cpu);
            let mut y = act(&gpu, y_cpu.len());
            k::conv_forward(&gpu, &eff, &xb, s, &mut y).unwrap();
            let what = format!("{s:?}->{o} k{kk} {sched}");
            let y = down(&gpu, &y);
            close_in(&gpu, &format!("conv_forward {what}"), &y, &y_cpu);
            let (mut dx_cpu, mut de_cpu) = (vec![0.0; x.len()], vec![0.0; w.len()]);
            conv::conv_backward(&cpu, &x, s.n, s.h, s.w, &dy, Some(&mut dx_cpu), &mut de_cpu);
            let dyb = up(&gpu, &dy);
            let mut dx = act(&gpu, x.len());
            k::conv_backward_data(&gpu, &eff, &dyb, s, &mut dx).unwrap();
            let dx = down(&gpu, &dx);
            close_in(&gpu, &format!("conv_backward_data {what}"), &dx, &dx_cpu);
            // The weight gradient is fp32 in both modes (fp32 master weights).
            let mut de = gpu.alloc(w.len()).unwrap();
            k::conv_backward_weight(&gpu, geom, &xb, s, &dyb, &mut de).unwrap();
            let de = down32(&gpu, &de);
            close_in(&gpu, &format!("conv_backward_weight {what}"), &de, &de_cpu);
            if gpu.act_dtype() == Dtype::Bf16 {
                // The tensor-core forward (kernels/conv_tc.cu): the same products in
                // another order — within the bf16 bound of the CPU, and all but a few
                // last-place roundings equal to the SIMT kernel's.
                // Every tile: the simple kernel and each pipelined one (which fall back to
                // the simple kernel where the channels do not suit them); the data gradient
                // is the forward kernel on the flipped weight (kernels/conv_tc_backward.cu).
                for tile in tiles_to_check() {
                    let mut yt = act(&gpu, y_cpu.len());
                    k::conv_forward_tensor_core_tile(&gpu, &eff, &xb, s, &mut yt, tile).unwrap();
                    let yt = down(&gpu, &yt);
                    close_in(
                        &gpu,
                        &format!("conv_forward_tensor_core {tile:?} {what}"),
                        &yt,
                        &y_cpu,
                    );
                    let e = rel_l2(&yt, &y);
                    assert!(
                        e < 4e-3,
                        "tensor-core ({tile:?}) vs SIMT bf16 forward {what}: rel L2 {e:.2e}"
                    );
                    let mut dxt = act(&gpu, x.len());
                    k::conv_backward_data_tensor_core_tile(&gpu, &eff, &dyb, s, &mut dxt, tile)
                        .unwrap();
                    let dxt = down(&gpu, &dxt);
                    close_in(
                        &gpu,
                        &format!("conv_backward_data_tensor_core {tile:?} {what}"),
                        &dxt,
                        &dx_cpu,
                    );
                    let e = rel_l2(&dxt, &dx);
                    assert!(
                        e < 4e-3,
                        "tensor-core ({tile:?}) vs SIMT bf16 data gradient {what}: rel L2 {e:.2e}"
                    );
                }
                // The weight gradient on every tile (the pipelined ones take channels in
                // multiples of 8), against the CPU and the SIMT kernel, and its split-K
                // reduction the same bit for bit run to run.
                for tile in tiles_to_check() {
                    let mut det = gpu.alloc(w.len()).unwrap();
                    k::conv_backward_weight_tensor_core_tile(
                        &gpu, geom, &xb, s, &dyb, &mut det, tile,
                    )
                    .unwrap();
                    let det = down32(&gpu, &det);
                    close_in(
                        &gpu,
                        &format!("conv_backward_weight_tensor_core {tile:?} {what}"),
                        &det,
                        &de_cpu,
                    );
                    let e = rel_l2(&det, &de);
                    assert!(
                        e < 1e-4,
                        "tensor-core ({tile:?}) vs SIMT weight gradient {what}: rel L2 {e:.2e}"
                    );
                    let mut again = gpu.alloc(w.len()).unwrap();
                    k::conv_backward_weight_tensor_core_tile(
                        &gpu, geom, &xb, s, &dyb, &mut again, tile,
                    )
                    .unwrap();
                    assert!(
                        down32(&gpu, &again)
                            .iter()
                            .zip(&det)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "split-K is deterministic"
                    );
                }
                // bf16 operands: visibly not fp32 arithmetic, within the bf16 bound; the
                // weight gradient holds values no bf16 can.
                for (name, got, want) in [
                    ("forward", &y, &y_cpu),
                    ("data grad", &dx, &dx_cpu),
                    ("weight grad", &de, &de_cpu),
                ] {
                    assert!(
                        rel_l2(got, want) > 1e-5,
                        "bf16 conv {name} {what}: as exact as fp32?"
                    );
                }
                assert!(
                    de.iter().any(|v| v.to_bits() & 0xFFFF != 0),
                    "the weight gradient stays fp32"
                );
            }
        }
    });
    assert!(
        dtypes.contains(&Dtype::F32) && dtypes.contains(&Dtype::Bf16),
        "both precisions ran: {dtypes:?}"
    );
    // Shapes that do not fit are errors, not crashes.
    let geom = ConvGeom {
        out_ch: 4,
        in_ch: 3,
        k: 3,
    };
    let eff = k::effective_weight(&gpu, &up32(&gpu, &random(geom.numel(), 1)), geom, k::Gain::Value(1.0)).unwrap();
    let s = Nhwc {
        n: 1,
        h: 2,
        w: 2,
        c: 5,
    };
    let mut y = act(&gpu, 16);
    assert!(k::conv_forward(&gpu, &eff, &up(&gpu, &random(20, 2)), s, &mut y).is_err());
}

/// Resampling and MP-cat of `s` (with `nb` channels joining) and their gradients against
/// the CPU backend; with channels in whole 16-byte packs, the packed kernels ran.
fn resample_and_cat(gpu: &Gpu, s: edm2::backend::gpu::kernels::Nhwc, nb: usize, sched: &str) {
    let x = random(s.numel(), 21);
    let xb = up(gpu, &x);
    let packed_before = edm2::backend::gpu::packed_launches();
    let small = random(s.numel() / 4, 22);
    let mut want = vec![0.0; s.numel() / 4];
    ops::downsample2(&x, s.n, s.h, s.w, s.c, &mut want);
    let mut y = act(gpu, want.len());
    k::downsample2(gpu, &xb, s, &mut y).unwrap();
    close_in(gpu, &format!("downsample2 c={} {sched}", s.c), &down(gpu, &y), &want);
    let mut want_dx = vec![0.0; s.numel()];
    ops::downsample2_backward(&small, s.n, s.h, s.w, s.c, &mut want_dx);
    let mut dx = act(gpu, s.numel());
    k::downsample2_backward(gpu, &up(gpu, &small), s, &mut dx).unwrap();
    close_in(gpu, &format!("downsample2_backward c={} {sched}", s.c), &down(gpu, &dx), &want_dx);
    let big = random(s.numel() * 4, 23);
    let mut want_up = vec![0.0; s.numel() * 4];
    ops::upsample2(&x, s.n, s.h, s.w, s.c, &mut want_up);
    let mut yu = act(gpu, want_up.len());
    k::upsample2(gpu, &xb, s, &mut yu).unwrap();
    close_in(gpu, &format!("upsample2 c={} {sched}", s.c), &down(gpu, &yu), &want_up);
    ops::upsample2_backward(&big, s.n, s.h, s.w, s.c, &mut want_dx);
    k::upsample2_backward(gpu, &up(gpu, &big), s, &mut dx).unwrap();
    close_in(gpu, &format!("upsample2_backward c={} {sched}", s.c), &down(gpu, &dx), &want_dx);
    // MP-cat (c + nb channels) and its gradient.
    let (na, nc) = (s.c, s.c + nb);
    let b = random(s.pixels() * nb, 24);
    let mut want_cat = vec![0.0; s.pixels() * nc];
    ops::mp_cat(&x, na, &b, nb, 0.3, &mut want_cat);
    let mut cat = act(gpu, want_cat.len());
    k::mp_cat(gpu, &xb, na, &up(gpu, &b), nb, 0.3, &mut cat).unwrap();
    close_in(gpu, &format!("mp_cat {na}+{nb} {sched}"), &down(gpu, &cat), &want_cat);
    let dcat = random(want_cat.len(), 25);
    let (mut da_cpu, mut db_cpu) = (vec![0.0; x.len()], vec![0.0; b.len()]);
    ops::mp_cat_backward(&dcat, na, nb, 0.3, &mut da_cpu, &mut db_cpu);
    let (mut da, mut db) = (act(gpu, x.len()), act(gpu, b.len()));
    k::mp_cat_backward(gpu, &up(gpu, &dcat), na, nb, 0.3, &mut da, &mut db).unwrap();
    close_in(gpu, &format!("mp_cat_backward a {na}+{nb} {sched}"), &down(gpu, &da), &da_cpu);
    close_in(gpu, &format!("mp_cat_backward b {na}+{nb} {sched}"), &down(gpu, &db), &db_cpu);
    // Six launches above; with c = 16 and nb = 8 every one moves whole packs in both
    // storage types (4 fp32 or 8 bf16 lanes), with c = 7 none does.
    let packed = edm2::backend::gpu::packed_launches() - packed_before;
    assert_eq!(packed, if s.c % 8 == 0 { 6 } else { 0 }, "packed launches, c={} {sched}", s.c);
}

#[test]
fn block_elementwise_kernels_match_the_cpu_backend() {
    use edm2::backend::gpu::kernels::Nhwc;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    // 7 channels: every value one at a time; 16 (and a 16 + 8 mp_cat): 16-byte packs along
    // the channels in both storage types.
    for (c, nb) in [(7usize, 5usize), (16, 8)] {
        let s = Nhwc { n: 2, h: 6, w: 10, c };
        each_mode(&gpu, |sched| resample_and_cat(&gpu, s, nb, sched));
    }
    let s = Nhwc { n: 2, h: 6, w: 10, c: 7 };
    let x = random(s.numel(), 21);
    each_mode(&gpu, |sched| {
        let xb = up(&gpu, &x);
        // Modulation by the embedding, and its gradient (ds is a reduction over pixels).
        let pixels = s.h * s.w;
        let sc = random(s.n * s.c, 26);
        let dy = random(s.numel(), 27);
        let mut want_m = vec![0.0; s.numel()];
        ops::modulate_silu(&x, &sc, s.c, pixels, &mut want_m);
        let scb = up32(&gpu, &sc); // fp32 in both precisions (the embedding path)
        let mut ym = act(&gpu, s.numel());
        k::modulate_silu(&gpu, &xb, &scb, s.c, pixels, &mut ym).unwrap();
        close_in(&gpu, &format!("modulate_silu {sched}"), &down(&gpu, &ym), &want_m);
        let (mut dh_cpu, mut ds_cpu) = (vec![0.0; s.numel()], vec![0.0; sc.len()]);
        ops::modulate_silu_backward(&x, &sc, &dy, s.c, pixels, &mut dh_cpu, &mut ds_cpu);
        let (mut dh, mut ds) = (act(&gpu, s.numel()), gpu.alloc::<f32>(sc.len()).unwrap());
        k::modulate_silu_backward(&gpu, &xb, &scb, &up(&gpu, &dy), s.c, pixels, &mut dh, &mut ds).unwrap();
        close_in(&gpu, &format!("modulate_silu_backward dh {sched}"), &down(&gpu, &dh), &dh_cpu);
        close_in(&gpu, &format!("modulate_silu_backward ds {sched}"), &down32(&gpu, &ds), &ds_cpu);
        if gpu.act_dtype() == Dtype::Bf16 {
            assert!(k::modulate_silu(&gpu, &xb, &up(&gpu, &sc), s.c, pixels, &mut ym).is_err(), "a bf16 modulation is refused");
        }
        // Wider: two channel tiles (the second partial) and pixels not a multiple of the
        // backward's eight lanes.
        let (n2, px2, c2) = (3usize, 37usize, 40usize);
        let (x2, sc2, dy2) = (random(n2 * px2 * c2, 28), random(n2 * c2, 29), random(n2 * px2 * c2, 30));
        let mut want2 = vec![0.0; x2.len()];
        ops::modulate_silu(&x2, &sc2, c2, px2, &mut want2);
        let (x2b, sc2b) = (up(&gpu, &x2), up32(&gpu, &sc2));
        let mut y2 = act(&gpu, x2.len());
        k::modulate_silu(&gpu, &x2b, &sc2b, c2, px2, &mut y2).unwrap();
        close_in(&gpu, &format!("modulate_silu c=40 {sched}"), &down(&gpu, &y2), &want2);
        let (mut dh2_cpu, mut ds2_cpu) = (vec![0.0; x2.len()], vec![0.0; sc2.len()]);
        ops::modulate_silu_backward(&x2, &sc2, &dy2, c2, px2, &mut dh2_cpu, &mut ds2_cpu);
        let (mut dh2, mut ds2) = (act(&gpu, x2.len()), gpu.alloc::<f32>(sc2.len()).unwrap());
        k::modulate_silu_backward(&gpu, &x2b, &sc2b, &up(&gpu, &dy2), c2, px2, &mut dh2, &mut ds2).unwrap();
        close_in(&gpu, &format!("modulate_silu_backward dh c=40 {sched}"), &down(&gpu, &dh2), &dh2_cpu);
        close_in(&gpu, &format!("modulate_silu_backward ds c=40 {sched}"), &down32(&gpu, &ds2), &ds2_cpu);
        // Dropout: the CPU backend's mask, bit for bit.
        // (Exact: on the stored inputs, rounded as the storage rounds.)
        let (xs, dys) = (stored(&gpu, &x), stored(&gpu, &dy));
        let mut want_d = xs.clone();
        ops::dropout_inplace(&mut want_d, 0.25, 0xABCDEF);
        let mut d = up(&gpu, &x);
        k::dropout(&gpu, &mut d, 0.25, 0xABCDEF).unwrap();
        assert_eq!(down(&gpu, &d), stored(&gpu, &want_d), "dropout {sched}");
        // Clip and its gradient mask.
        let mut want_c = xs.clone();
        ops::clip_inplace(&mut want_c, 1.5);
        let (mut cb, mut mask) = (up(&gpu, &x), gpu.alloc::<u8>(x.len()).unwrap());
        k::clip(&gpu, &mut cb, &mut mask, 1.5).unwrap();
        assert_eq!(down(&gpu, &cb), stored(&gpu, &want_c), "clip {sched}");
        let mut g = up(&gpu, &dy);
        k::clip_backward(&gpu, &mut g, &mask).unwrap();
        let want_g: Vec<f32> = dys.iter().zip(&xs).map(|(&g, &v)| if v.abs() > 1.5 { 0.0 } else { g }).collect();
        assert!(want_g.iter().zip(&dys).any(|(a, b)| a != b), "the test clips something");
        assert_eq!(down(&gpu, &g), want_g, "clip_backward {sched}");
        // axpby_clip: the bits and the mask of axpby then clip, in one launch; and
        // split_scaled with the mask: the bits of clip_backward then split_scaled.
        let (mut two, mut one) = (up(&gpu, &x), up(&gpu, &x));
        let b_in = up(&gpu, &dy);
        let (mut mask_two, mut mask_one) = (gpu.alloc::<u8>(x.len()).unwrap(), gpu.alloc::<u8>(x.len()).unwrap());
        k::axpby(&gpu, &mut two, &b_in, 0.7, 0.9).unwrap();
        k::clip(&gpu, &mut two, &mut mask_two, 1.5).unwrap();
        let before = edm2::backend::gpu::launches();
        k::axpby_clip(&gpu, &mut one, &b_in, 0.7, 0.9, 1.5, &mut mask_one).unwrap();
        assert_eq!(edm2::backend::gpu::launches() - before, 1, "axpby_clip is one launch");
        assert_eq!(down(&gpu, &one), down(&gpu, &two), "axpby_clip values {sched}");
        let mask_bits = gpu.download(&mask_one).unwrap();
        assert_eq!(mask_bits, gpu.download(&mask_two).unwrap(), "axpby_clip mask {sched}");
        assert!(mask_bits.iter().any(|&m| m != 0) && mask_bits.iter().any(|&m| m == 0), "the test clips some values, not all");
        let mut g_two = up(&gpu, &dy);
        k::clip_backward(&gpu, &mut g_two, &mask_one).unwrap();
        let y_two = k::split_scaled(&gpu, &mut g_two, 0.6, -0.8, None).unwrap();
        let mut g_one = up(&gpu, &dy);
        let y_one = k::split_scaled(&gpu, &mut g_one, 0.6, -0.8, Some(&mask_one)).unwrap();
        assert_eq!(down(&gpu, &y_one), down(&gpu, &y_two), "split_scaled masked y {sched}");
        assert_eq!(down(&gpu, &g_one), down(&gpu, &g_two), "split_scaled masked x {sched}");
        // MP-Fourier features.
        let (xs, fr, ph) = (random(5, 28), random(16, 29), random(16, 30));
        let want_f = ops::mp_fourier(&xs, &fr, &ph);
        let mut f = act(&gpu, want_f.len());
        k::mp_fourier(&gpu, &up32(&gpu, &xs), &up32(&gpu, &fr), &up32(&gpu, &ph), &mut f).unwrap();
        close_in(&gpu, &format!("mp_fourier {sched}"), &down(&gpu, &f), &want_f);
        // axpby and scale.
        let mut want_a = x.clone();
        ops::axpby(&mut want_a, &dy, 0.6, -0.8);
        let mut a = up(&gpu, &x);
        k::axpby(&gpu, &mut a, &up(&gpu, &dy), 0.6, -0.8).unwrap();
        close_in(&gpu, &format!("axpby {sched}"), &down(&gpu, &a), &want_a);
        k::scale(&gpu, &mut a, 2.0).unwrap();
        close_in(&gpu, &format!("scale {sched}"), &down(&gpu, &a), &want_a.iter().map(|v| v * 2.0).collect::<Vec<_>>());
        // split_scaled: the bits of scaled then scale, in one launch.
        let (xa, xb) = (up(&gpu, &x), up(&gpu, &x));
        let want_y = down(&gpu, &k::scaled(&gpu, &xa, -0.8).unwrap());
        let mut want_x = xa;
        k::scale(&gpu, &mut want_x, 0.6).unwrap();
        let mut got_x = xb;
        let before = edm2::backend::gpu::launches();
        let got_y = k::split_scaled(&gpu, &mut got_x, 0.6, -0.8, None).unwrap();
        assert_eq!(edm2::backend::gpu::launches() - before, 1, "split_scaled is one launch");
        assert_eq!(down(&gpu, &got_y), want_y, "split_scaled y {sched}");
        assert_eq!(down(&gpu, &got_x), down(&gpu, &want_x), "split_scaled x {sched}");
        close_in(&gpu, &format!("split_scaled {sched}"), &want_y, &ops::scaled(&x, -0.8));
    });
}

#[test]
fn attention_kernels_match_the_cpu_backend() {
    use edm2::backend::cpu::attention;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    // 2 images of 3x4 pixels, 2 heads of 16 channels.
    let (n, p, c, heads) = (2usize, 12usize, 32usize, 2usize);
    let qkv = random(n * p * 3 * c, 41);
    let dy = random(n * p * c, 42);
    let mut y_cpu = vec![0.0; n * p * c];
    let cache = attention::attention_forward(&qkv, n, p, c, heads, &mut y_cpu);
    let mut dqkv_cpu = vec![0.0; qkv.len()];
    attention::attention_backward(&qkv, &cache, &dy, n, p, c, heads, &mut dqkv_cpu);
    // bf16 runs both implementations (flash on and off); fp32 always the softmax kernels.
    for flash in [true, false] {
        gpu.set_flash_attention(flash);
        each_mode(&gpu, |sched| {
            if !flash && gpu.act_dtype() == Dtype::F32 {
                return; // fp32 runs the softmax kernels either way: done with flash on
            }
            let qb = up(&gpu, &qkv);
            let mut y = act(&gpu, n * p * c);
            let gc = k::attention_forward(&gpu, &qb, n, p, c, heads, &mut y).unwrap();
            assert_eq!(gc.is_flash(), flash && gpu.act_dtype() == Dtype::Bf16, "which kernels ran ({sched})");
            close_in(&gpu, &format!("attention_forward flash={flash} {sched}"), &down(&gpu, &y), &y_cpu);
            if let Some(w) = gc.softmax() {
                close_in(&gpu, &format!("attention softmax {sched}"), &down32(&gpu, w), &cache.w);
            }
            let mut dq = act(&gpu, qkv.len());
            k::attention_backward(&gpu, &qb, &gc, &y, &up(&gpu, &dy), n, p, c, heads, &mut dq).unwrap();
            close_in(&gpu, &format!("attention_backward flash={flash} {sched}"), &down(&gpu, &dq), &dqkv_cpu);
        });
    }
    gpu.set_flash_attention(true);
    let mut y = act(&gpu, n * p * c);
    assert!(k::attention_forward(&gpu, &up(&gpu, &qkv), n, p, c, 3, &mut y).is_err(), "32 channels do not split into 3 heads");
}

/// The flash kernels at EDM2's head width (64) and at 32, with pixel counts that leave the
/// last 64-row tile partial (70 = 64 + 6) or make one tile of a few rows, so the zero fill
/// and the masks of queries and keys past P matter; their softmax scale differs from the
/// test above's. Against the CPU backend on the bf16-rounded inputs.
#[test]
fn flash_attention_matches_the_cpu_backend_at_full_head_widths() {
    use edm2::backend::cpu::attention;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    gpu.set_precision(Precision::Bf16);
    gpu.set_flash_attention(true);
    for (n, p, c, heads, seed) in [(1usize, 70usize, 128usize, 2usize, 61u64), (2, 5, 64, 2, 62), (1, 130, 64, 1, 63)] {
        // Magnitudes like the network's qkv; the logits of normalized rows stay within ±sqrt(Ch).
        let qkv = stored(&gpu, &random(n * p * 3 * c, seed));
        let dy = stored(&gpu, &random(n * p * c, seed + 100));
        let mut y_cpu = vec![0.0; n * p * c];
        let cache = attention::attention_forward(&qkv, n, p, c, heads, &mut y_cpu);
        let mut dqkv_cpu = vec![0.0; qkv.len()];
        attention::attention_backward(&qkv, &cache, &dy, n, p, c, heads, &mut dqkv_cpu);
        each_schedule(|sched| {
            let what = format!("flash n={n} p={p} c={c} heads={heads} {sched}");
            let qb = up(&gpu, &qkv);
            let mut y = act(&gpu, n * p * c);
            let gc = k::attention_forward(&gpu, &qb, n, p, c, heads, &mut y).unwrap();
            assert!(gc.is_flash() && gc.softmax().is_none(), "{what}: the flash kernels keep no softmax");
            close_in(&gpu, &format!("{what} forward"), &down(&gpu, &y), &y_cpu);
            let mut dq = act(&gpu, qkv.len());
            k::attention_backward(&gpu, &qb, &gc, &y, &up(&gpu, &dy), n, p, c, heads, &mut dq).unwrap();
            close_in(&gpu, &format!("{what} backward"), &down(&gpu, &dq), &dqkv_cpu);
        });
    }
    gpu.set_precision(Precision::Fp32);
}

#[test]
fn vae_kernels_match_the_cpu_backend() {
    use edm2::backend::cpu::vae_ops;
    use edm2::backend::{Backend, Nhwc, VaeOps};
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    // 2 images of 5x3 pixels, 16 channels in 8 groups; an offset mean, so the shifted
    // sums of the GroupNorm statistics matter.
    let s = Nhwc { n: 2, h: 5, w: 3, c: 16 };
    let x: Vec<f32> = random(s.numel(), 51).iter().map(|v| 3.0 + v).collect();
    let (gamma, beta) = (random(s.c, 52), random(s.c, 53));
    let (n, p, c) = (2usize, 15usize, 16usize);
    let qkv = random(n * p * 3 * c, 54);
    each_mode(&gpu, |sched| {
        let (xs, qs) = (stored(&gpu, &x), stored(&gpu, &qkv));
        let xg = up(&gpu, &x);
        let (gg, bg) = (gpu.upload_chan(&gamma).unwrap(), gpu.upload_chan(&beta).unwrap());
        for silu in [false, true] {
            let mut want = vec![0.0; s.numel()];
            vae_ops::group_norm(&xs, s, 8, 1e-6, &gamma, &beta, silu, &mut want);
            let mut y = act(&gpu, s.numel());
            gpu.group_norm(&xg, s, 8, 1e-6, &gg, &bg, silu, &mut y).unwrap();
            close_in(&gpu, &format!("group_norm silu={silu} {sched}"), &down(&gpu, &y), &want);
        }
        let mut want = xs.clone();
        vae_ops::add_channel_bias(&mut want, &beta, s.c);
        let mut y = Backend::copy(&gpu, &xg).unwrap();
        gpu.add_channel_bias(&mut y, &bg, s.c).unwrap();
        close_in(&gpu, &format!("add_channel_bias {sched}"), &down(&gpu, &y), &want);
        let so = Nhwc { h: 2, w: 1, ..s };
        let mut want = vec![0.0; so.numel()];
        vae_ops::subsample2_odd(&xs, s, &mut want);
        let mut y = act(&gpu, so.numel());
        gpu.subsample2_odd(&xg, s, &mut y).unwrap();
        assert_eq!(down(&gpu, &y), want, "subsample2_odd {sched}: a copy");
        let mut want = vec![0.0; n * p * c];
        vae_ops::dot_attention(&qs, n, p, c, &mut want);
        let mut y = act(&gpu, n * p * c);
        gpu.dot_attention(&up(&gpu, &qkv), n, p, c, &mut y).unwrap();
        close_in(&gpu, &format!("dot_attention {sched}"), &down(&gpu, &y), &want);
    });
    let mut y = act(&gpu, s.numel());
    let gg = gpu.upload_chan(&gamma).unwrap();
    assert!(gpu.group_norm(&up(&gpu, &x), s, 5, 1e-6, &gg, &gg, false, &mut y).is_err(), "16 channels do not split into 5 groups");
}

#[test]
fn loss_kernel_matches_the_cpu_backend() {
    use edm2::train::loss::edm2_loss;
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    // 3 images of 3x7x5 (partial reduction blocks), σ over the training range.
    let (n, per) = (3usize, 105usize);
    let d = random(n * per, 51);
    let y = random(n * per, 52);
    let logvar = [0.3f32, -1.2, 2.0];
    let sigma = [0.05f32, 1.0, 30.0];
    let want = edm2_loss(&edm2::Tensor::from_vec(&[n, 7, 5, 3], d.clone()), &logvar, &edm2::Tensor::from_vec(&[n, 7, 5, 3], y.clone()), &sigma, 0.5);
    // D is fp32 in both modes (the network's output); dD follows D. The kernel also takes
    // a bf16 D (checked in the bf16 mode).
    each_mode(&gpu, |sched| {
        for scale in [1.0f32, 0.25] {
            let got = k::edm2_loss(&gpu, &up(&gpu, &d), &up32(&gpu, &y), &up32(&gpu, &logvar), &sigma, 0.5, scale).unwrap();
            assert_eq!(got.dd.dtype(), gpu.act_dtype());
            close_in(&gpu, &format!("loss dD scale {scale} {sched}"), &down(&gpu, &got.dd), &want.dd.data.iter().map(|v| v * scale).collect::<Vec<_>>());
            let per_sample = down32(&gpu, &got.per_sample);
            close_in(&gpu, &format!("loss per image {sched}"), &per_sample, &want.per_sample.iter().map(|&v| v as f32).collect::<Vec<_>>());
            close_in(&gpu, &format!("loss dlogvar {sched}"), &down(&gpu, &got.dlogvar), &want.dlogvar.iter().map(|v| v * scale).collect::<Vec<_>>());
            let tol = if gpu.act_dtype() == Dtype::Bf16 { 1e-2 } else { 1e-5 };
            if gpu.act_dtype() == Dtype::Bf16 {
                // A bf16 logvar is converted to fp32 first.
                let g16 = k::edm2_loss(&gpu, &up(&gpu, &d), &up32(&gpu, &y), &up(&gpu, &logvar), &sigma, 0.5, scale).unwrap();
                close_in(&gpu, &format!("loss dlogvar, bf16 logvar {sched}"), &down(&gpu, &g16.dlogvar), &down(&gpu, &got.dlogvar));
            }
            let total = got.total(&gpu).unwrap();
            assert!((total - want.total).abs() <= tol * want.total.abs(), "total {total} vs {}", want.total);
        }
    });
}

/// Operands of one mma.m16n8k16 as bf16 bits — A 16x16 and B 16x8, row-major — and the
/// product A·B (16x8 row-major). Small integers: every bf16 product and every 16-term sum
/// is exact in fp32, so the result does not depend on the order the hardware (or the
/// emulation) adds in.
fn mma_operands(seed: u64) -> ([u16; 256], [u16; 128], Vec<f32>) {
    let mut r = Rng::new(seed);
    let mut int = || ((r.uniform() * 7.0).floor() - 3.0) as f32;
    let a: Vec<f32> = (0..256).map(|_| int()).collect();
    let b: Vec<f32> = (0..128).map(|_| int()).collect();
    let bits = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect::<Vec<u16>>();
    let want = (0..16).flat_map(|i| (0..8).map(move |j| (i, j))).map(|(i, j)| (0..16).map(|k| a[i * 16 + k] * b[k * 8 + j]).sum()).collect();
    (bits(&a).try_into().unwrap(), bits(&b).try_into().unwrap(), want)
}

#[test]
fn tensor_core_fragments_round_trip() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    let (ab, bb, want) = mma_operands(61);
    each_schedule(|sched| {
        assert_eq!(k::selftest_mma(&gpu, &ab, &bb, false).unwrap(), want, "mma with the PTX fragment layout, {sched}");
        assert_ne!(k::selftest_mma(&gpu, &ab, &bb, true).unwrap(), want, "a wrong B layout must change the result, {sched}");
    });
}

/// ldmatrix and cp.async as a tensor-core kernel uses them: tiles staged with cp.async,
/// fragments loaded with ldmatrix (x4 for A, x2.trans for B) must be exactly the PTX mma
/// fragments (the layout the round-trip test above checks), and the product exact. On the
/// simulated device a missing cp.async wait must show: the harness performs the copies
/// only at the wait, so ldmatrix reads the poisoned shared memory.
#[test]
fn ldmatrix_and_cp_async_load_the_mma_fragments() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    let (ab, bb, want) = mma_operands(62);
    // The fragments of edm2_mma_m16n8k16_bf16 (PTX ISA; g = lane>>2, t = lane&3): A reg r
    // holds row g + 8(r&1), k = 2t + 8(r>>1) and k+1; B reg r holds k = 2t + 8r and k+1 of
    // column g; the lower k in the low half.
    let pair = |lo: u16, hi: u16| lo as u32 | (hi as u32) << 16;
    let want_regs: Vec<u32> = (0..32)
        .flat_map(|lane| {
            let (g, t) = (lane >> 2, lane & 3);
            let fa = (0..4).map(move |r| {
                let (row, k) = (g + 8 * (r & 1), 2 * t + 8 * (r >> 1));
                pair(ab[row * 16 + k], ab[row * 16 + k + 1])
            });
            let fb = (0..2).map(move |r| {
                let k = 2 * t + 8 * r;
                pair(bb[k * 8 + g], bb[(k + 1) * 8 + g])
            });
            fa.chain(fb).collect::<Vec<_>>()
        })
        .collect();
    each_schedule(|sched| {
        let (regs, d) = k::selftest_ldmatrix(&gpu, &ab, &bb, false).unwrap();
        let bad = (0..32 * 6).filter(|&i| regs[i] != want_regs[i]).collect::<Vec<_>>();
        assert!(bad.is_empty(), "{} of 192 fragment registers differ, first lane {} reg {}, {sched}", bad.len(), bad[0] / 6, bad[0] % 6);
        assert_eq!(d, want, "A·B through ldmatrix fragments, {sched}");
        if cfg!(feature = "cuda-sim") {
            let (_, d) = k::selftest_ldmatrix(&gpu, &ab, &bb, true).unwrap();
            assert!(d.iter().any(|v| v.is_nan()), "without the cp.async wait ldmatrix must see poisoned shared memory, {sched}");
        }
    });
}

/// Uploads run on their own stream, so three orders matter: kernels queued after an upload
/// must see its data (the compute stream waits for the copy); an upload that refills a
/// pooled device buffer must not overwrite it while kernels queued earlier still read its
/// last contents (the upload stream waits for the buffer's release event); and a pinned
/// staging buffer must not be refilled before its previous copy has read it (more uploads
/// of one size in flight than there are staging buffers). Each round uploads six buffers
/// of one size, each read by a long chain of kernels, then drops them, with no
/// synchronization. On a GPU the chain (200 passes over 16 MB per upload, ~20 ms a round)
/// outlasts the host's work for a round (copying 6 × 16 MB into staging, ~10 ms), so the
/// host runs ahead and the next round's uploads reuse the buffers and staging of rounds
/// still queued. A kernel reading a wrong upload changes the exact integer sum.
#[test]
fn uploads_are_ordered_against_the_compute_stream() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    let sim = cfg!(feature = "cuda-sim");
    let (n, rounds, per_round, reads) = if sim { (1000, 3, 6, 2) } else { (1 << 22, 12, 6, 200) };
    // Host data made before the loop (so the host only copies while the GPU works): the
    // j-th upload of round r holds 1 + (r·per_round + j) mod 7, so consecutive uploads differ.
    let values: Vec<Vec<f32>> = (1..=7).map(|v| vec![v as f32; n]).collect();
    let mut acc = gpu.alloc_zeros::<f32>(n).unwrap();
    let mut want = 0usize;
    for r in 0..rounds {
        let xs: Vec<_> = (0..per_round).map(|j| up32(&gpu, &values[(r * per_round + j) % 7])).collect();
        for (j, x) in xs.iter().enumerate() {
            want += reads * (1 + (r * per_round + j) % 7);
            for _ in 0..reads {
                k::axpby(&gpu, &mut acc, x, 1.0, 1.0).unwrap();
            }
        }
    }
    let want = want as f32; // exact: every partial sum is an integer < 2^24
    let got = down32(&gpu, &acc);
    let wrong = got.iter().filter(|&&v| v != want).count();
    assert_eq!(wrong, 0, "{wrong} of {n} sums differ from {want} (first {})", got[0]);
}

/// Buffers the upload stream fills and buffers kernels write are pooled apart: a buffer
/// freed by one side is never handed to the other (the streams are not ordered).
#[test]
fn upload_buffers_are_pooled_apart_from_kernel_buffers() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = device() else { return };
    let n = 4099;
    drop(up(&gpu, &random(n, 1)));
    let s0 = gpu.pool_stats();
    let a = gpu.alloc::<f32>(n).unwrap();
    assert_eq!(gpu.pool_stats().allocated, s0.allocated + 1, "a kernel buffer was taken from the upload side");
    drop(a);
    let b = up(&gpu, &random(n, 2));
    assert_eq!(gpu.pool_stats().reused, s0.reused + 1, "the freed upload buffer was not reused by the next upload");
    assert_eq!(down(&gpu, &b), random(n, 2));
    let c = gpu.alloc::<f32>(n).unwrap();
    assert_eq!(gpu.pool_stats().reused, s0.reused + 2, "the freed kernel buffer was not reused by the next allocation");
    drop(c);
}
