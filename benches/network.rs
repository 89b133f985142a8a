//! Criterion benchmarks: the whole network (forward, forward+backward) on cpu-s32 at
//! batch 32, and per-layer microbenchmarks (MP-conv 3x3 and 1x1, cosine attention).
//! Throughput is reported in images/s (network) and in elements (layers); GFLOP/s =
//! 2·MACs / time, printed once per benchmark.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edm2::backend::cpu::{attention, conv};
use edm2::rng::Rng;
use edm2::train::loss::edm2_loss;
use edm2::{Mode, NetConfig, Precond, Tensor};
use std::time::Duration;

fn network(c: &mut Criterion) {
    let cfg = NetConfig::resolve("cpu-s32").unwrap();
    let net = Precond::new(&cfg).unwrap();
    let mut p = net.init_params(0);
    for (s, v) in net.specs.iter().zip(p.values.iter_mut()) {
        if s.shape.is_empty() {
            v[0] = 0.5;
        }
    }
    let n = 32;
    let mut rng = Rng::new(1);
    let x = Tensor::from_vec(&[n, 32, 32, 3], rng.normal_vec(n * 32 * 32 * 3));
    let sigma: Vec<f32> = (0..n).map(|i| 0.01 * 1.3f32.powi(i as i32)).collect();
    let gmac = net.macs_per_image() as f64 * n as f64 / 1e9;
    let mut g = c.benchmark_group("cpu-s32-batch32");
    g.sample_size(10).measurement_time(Duration::from_secs(20)).warm_up_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("forward", |b| b.iter(|| net.forward(&p, &x, &sigma, None, &Mode::eval(), false).d));
    eprintln!("forward = {:.2} GFLOP (2·MAC) per batch", 2.0 * gmac);
    let mut pt = p.clone();
    net.force_normalize(&mut pt);
    g.bench_function("forward_backward", |b| {
        b.iter(|| {
            let mode = Mode::train(1);
            let out = net.forward(&pt, &x, &sigma, None, &mode, false);
            let l = edm2_loss(&out.d, &out.logvar, &x, &sigma, 0.5);
            net.backward(&pt, out.cache.unwrap(), &l.dd, &l.dlogvar, &mode)
        })
    });
    g.finish();
}

fn layers(c: &mut Criterion) {
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("layers");
    g.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    // The cpu-s32 32x32 level: batch 32, 64 -> 64 channels.
    for (k, ci, co, h) in [(3usize, 64usize, 64usize, 32usize), (3, 128, 128, 16), (1, 128, 384, 16)] {
        let n = 32;
        let w = rng.normal_vec(co * ci * k * k);
        let x = rng.normal_vec(n * h * h * ci);
        let eff = conv::effective_weight(&w, co, ci, k, 1.0);
        let mut y = vec![0.0; n * h * h * co];
        let macs = (n * h * h * co * ci * k * k) as u64;
        g.throughput(Throughput::Elements(2 * macs));
        g.bench_function(format!("mpconv{k}x{k}_{ci}to{co}_{h}x{h}_b{n}_fwd (elements = FLOPs)"), |b| {
            b.iter(|| conv::conv_forward(&eff, &x, n, h, h, &mut y))
        });
        let dy = rng.normal_vec(y.len());
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; w.len()];
        g.throughput(Throughput::Elements(4 * macs));
        g.bench_function(format!("mpconv{k}x{k}_{ci}to{co}_{h}x{h}_b{n}_bwd (elements = FLOPs)"), |b| {
            b.iter(|| conv::conv_backward(&eff, &x, n, h, h, &dy, Some(&mut dx), &mut dw))
        });
    }
    // Attention at 16x16, 128 channels, 2 heads, batch 32.
    let (n, p, ch, heads) = (32, 256, 128, 2);
    let qkv = rng.normal_vec(n * p * 3 * ch);
    let mut y = vec![0.0; n * p * ch];
    g.throughput(Throughput::Elements((2 * 2 * n * p * p * ch) as u64));
    g.bench_function("attention_16x16_128ch_2heads_b32_fwd (elements = FLOPs)", |b| {
        b.iter(|| attention::attention_forward(&qkv, n, p, ch, heads, &mut y))
    });
    g.finish();
}

criterion_group!(benches, network, layers);
criterion_main!(benches);
