//! Criterion benchmarks of each kernel family, one body run on every backend through the
//! `Backend` trait (the ops the network runs): weight normalization, MP-conv 3x3 and 1x1
//! (forward; backward = data + weight gradient + weight-norm backward), cosine attention
//! (forward, backward) and the elementwise ops. CPU numbers always; CUDA numbers when built
//! with `--features cuda` on a machine with a GPU (the simulated device of `cuda-sim` is
//! not timed: its speed means nothing). Shapes: an EDM2-S 16x16 level at batch 8, or at
//! the batch in EDM2_BENCH_BATCH (a GPU needs a larger one to fill it).
//!
//!     cargo bench --bench kernels                      # CPU
//!     cargo bench --features cuda --bench kernels      # CPU and GPU
//!     EDM2_BENCH_BATCH=64 cargo bench --features cuda --bench kernels -- cuda/

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use edm2::backend::cpu::Cpu;
use edm2::backend::{Backend, ConvGeom, Nhwc};
use edm2::nn::params::{ParamId, ParamKind, ParamSpec, Params};
use edm2::rng::Rng;
use std::time::Duration;

const RES: usize = 16;
const CH: usize = 128;
const HEADS: usize = 2;

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    g
}

/// The kernel families on backend `be` (`name` labels the results: cpu / cuda).
fn families<B: Backend>(c: &mut Criterion, name: &str, be: &B, upload_params: impl Fn(&Params) -> B::Params) {
    #[allow(non_snake_case)]
    let N: usize = std::env::var("EDM2_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(8);
    let mut rng = Rng::new(1);
    let s = Nhwc { n: N, h: RES, w: RES, c: CH };
    let specs = [(CH, CH, 3usize), (CH, CH, 1), (3 * CH, CH, 1)]
        .iter()
        .enumerate()
        .map(|(i, &(o, ii, k))| ParamSpec {
            name: format!("w{i}"),
            shape: if k == 0 { vec![o, ii] } else { vec![o, ii, k, k] },
            kind: ParamKind::Param,
            is_mp_weight: true,
        })
        .collect::<Vec<_>>();
    let host = Params { values: specs.iter().map(|sp| rng.normal_vec(sp.numel())).collect() };
    let p = upload_params(&host);
    let (w3, w1, wqkv): (ParamId, ParamId, ParamId) = (0, 1, 2);
    let g3 = ConvGeom { out_ch: CH, in_ch: CH, k: 3 };
    let g1 = ConvGeom { out_ch: CH, in_ch: CH, k: 1 };
    let x = be.upload(&rng.normal_vec(s.numel())).unwrap();
    let dy = be.upload(&rng.normal_vec(s.numel())).unwrap();
    let sync = || be.synchronize().unwrap();

    let mut g = group(c, &format!("{name}/weight_norm"));
    g.throughput(Throughput::Elements(g3.numel() as u64));
    g.bench_function("effective_3x3_128x128", |b| b.iter(|| { let e = be.effective(&p, w3, g3, None).unwrap(); sync(); e }));
    g.finish();

    let e3 = be.effective(&p, w3, g3, None).unwrap();
    let e1 = be.effective(&p, w1, g1, None).unwrap();
    let mut y = be.alloc(s.numel()).unwrap();
    let mut dx = be.alloc(s.numel()).unwrap();
    let mut grads = be.zero_grads(&p).unwrap();
    for (label, eff, id, geom) in [("conv3x3", &e3, w3, g3), ("conv1x1", &e1, w1, g1)] {
        let mut g = group(c, &format!("{name}/{label}_b{N}_{RES}x{RES}_{CH}"));
        // Throughput in multiply-accumulates.
        g.throughput(Throughput::Elements((s.pixels() * geom.numel()) as u64));
        g.bench_function("forward", |b| b.iter(|| { be.conv_forward(eff, &x, s, &mut y).unwrap(); sync(); }));
        g.bench_function("backward", |b| {
            b.iter(|| { be.conv_backward(&p, id, eff, &x, s, &dy, Some(&mut dx), None, &mut grads).unwrap(); sync(); })
        });
        g.finish();
    }

    let eq = be.effective(&p, wqkv, ConvGeom { out_ch: 3 * CH, in_ch: CH, k: 1 }, None).unwrap();
    let mut qkv = be.alloc(s.numel() * 3).unwrap();
    be.conv_forward(&eq, &x, s, &mut qkv).unwrap();
    let px = RES * RES;
    let mut g = group(c, &format!("{name}/attention_b{N}_{px}px_{CH}ch_{HEADS}heads"));
    g.throughput(Throughput::Elements((2 * N * px * px * CH) as u64));
    let cache = be.attention_forward(&qkv, N, px, CH, HEADS, &mut y).unwrap();
    g.bench_function("forward", |b| b.iter(|| { let c = be.attention_forward(&qkv, N, px, CH, HEADS, &mut y).unwrap(); sync(); c }));
    let mut dqkv = be.alloc(s.numel() * 3).unwrap();
    g.bench_function("backward", |b| {
        b.iter(|| { be.attention_backward(&qkv, &cache, &y, &dy, N, px, CH, HEADS, &mut dqkv).unwrap(); sync(); })
    });
    g.finish();

    let emb = be.upload(&rng.normal_vec(N * CH)).unwrap();
    let mut g = group(c, &format!("{name}/elementwise_b{N}_{RES}x{RES}_{CH}"));
    g.throughput(Throughput::Elements(s.numel() as u64));
    g.bench_function("mp_silu", |b| b.iter(|| { be.mp_silu(&x, &mut y).unwrap(); sync(); }));
    g.bench_function("modulate_silu", |b| b.iter(|| { be.modulate_silu(&x, &emb, CH, px, &mut y).unwrap(); sync(); }));
    g.bench_function("pixel_norm", |b| b.iter(|| { be.normalize_rows(&x, CH, &mut y).unwrap(); sync(); }));
    g.bench_function("mp_sum", |b| b.iter(|| { be.axpby(&mut y, &x, 0.7, 0.3).unwrap(); sync(); }));
    g.finish();
}

fn cpu(c: &mut Criterion) {
    families(c, "cpu", &Cpu, |p| p.clone());
}

#[cfg(feature = "cuda")]
fn cuda(c: &mut Criterion) {
    use edm2::backend::gpu::{Gpu, GpuParams};
    match Gpu::open(0) {
        Ok(gpu) => {
            eprintln!("kernels on {}", gpu.name());
            families(c, "cuda", &gpu, |p| GpuParams::upload(&gpu, p).unwrap());
            conv_bf16(c, &gpu);
            attention_bf16(c, &gpu);
            conv_shapes(c, &gpu);
        }
        Err(e) => eprintln!("cuda benchmarks skipped: {e}"),
    }
}

/// Attention with bf16 activations at EDM2's head width (64), both implementations: the
/// flash kernels (attention_flash.cu, the default) and the fp32 softmax kernels
/// (attention.cu, EDM2_FLASH_ATTENTION=0), at an EDM2-XS 16x16 level (256 pixels, 256
/// channels, 4 heads) and its 8x8 level (64 pixels), batch EDM2_BENCH_BATCH (default 8).
/// Throughput in multiply-accumulates of the two products (2·N·P²·C per direction).
#[cfg(feature = "cuda")]
fn attention_bf16(c: &mut Criterion, gpu: &edm2::backend::gpu::Gpu) {
    use edm2::backend::gpu::Precision;
    #[allow(non_snake_case)]
    let N: usize = std::env::var("EDM2_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(8);
    let mut rng = Rng::new(3);
    gpu.set_precision(Precision::Bf16);
    for (px, ch) in [(256usize, 256usize), (64, 256)] {
        let heads = ch / 64;
        let qkv = gpu.upload_act(&rng.normal_vec(N * px * 3 * ch)).unwrap();
        let dy = gpu.upload_act(&rng.normal_vec(N * px * ch)).unwrap();
        let mut y = gpu.alloc_act(N * px * ch).unwrap();
        let mut dqkv = gpu.alloc_act(N * px * 3 * ch).unwrap();
        let mut g = group(c, &format!("cuda/attention_b{N}_{px}px_{ch}ch_{heads}heads_bf16"));
        g.throughput(Throughput::Elements((2 * N * px * px * ch) as u64));
        let sync = || gpu.synchronize().unwrap();
        for (label, flash) in [("flash", true), ("softmax", false)] {
            gpu.set_flash_attention(flash);
            let cache = gpu.attention_forward(&qkv, N, px, ch, heads, &mut y).unwrap();
            g.bench_function(format!("forward_{label}"), |b| {
                b.iter(|| {
                    let c = gpu.attention_forward(&qkv, N, px, ch, heads, &mut y).unwrap();
                    sync();
                    c
                })
            });
            g.bench_function(format!("backward_{label}"), |b| {
                b.iter(|| {
                    gpu.attention_backward(&qkv, &cache, &y, &dy, N, px, ch, heads, &mut dqkv).unwrap();
                    sync();
                })
            });
        }
        gpu.set_flash_attention(true);
        g.finish();
    }
    gpu.set_precision(Precision::Fp32);
}

/// The 3x3 conv with bf16 activations in all three directions: the SIMT kernels (conv.cu)
/// and the tensor-core ones (conv_tc.cu, conv_tc_backward.cu) with each tile
/// (`EDM2_CONV_TC_TILE`), at the families' shape above and at an EDM2-XS 64x64 level
/// (batch 32, 128 channels: a launch big enough to fill the card).
#[cfg(feature = "cuda")]
fn conv_bf16(c: &mut Criterion, gpu: &edm2::backend::gpu::Gpu) {
    #[allow(non_snake_case)]
    let N: usize = std::env::var("EDM2_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(8);
    conv_bf16_at(
        c,
        gpu,
        Nhwc {
            n: N,
            h: RES,
            w: RES,
            c: CH,
        },
        true,
    );
    conv_bf16_at(
        c,
        gpu,
        Nhwc {
            n: 32,
            h: 64,
            w: 64,
            c: 128,
        },
        false,
    );
}

#[cfg(feature = "cuda")]
fn conv_bf16_at(c: &mut Criterion, gpu: &edm2::backend::gpu::Gpu, s: Nhwc, simt: bool) {
    use edm2::backend::gpu::kernels::{self as k, TcTile};
    use edm2::backend::gpu::{GpuParams, Precision};
    let mut rng = Rng::new(2);
    let g3 = ConvGeom {
        out_ch: s.c,
        in_ch: s.c,
        k: 3,
    };
    let spec = ParamSpec {
        name: "w".into(),
        shape: vec![s.c, s.c, 3, 3],
        kind: ParamKind::Param,
        is_mp_weight: true,
    };
    let p = GpuParams::upload(
        gpu,
        &Params {
            values: vec![rng.normal_vec(spec.numel())],
        },
    )
    .unwrap();
    gpu.set_precision(Precision::Bf16);
    let eff = gpu.effective(&p, 0, g3, None).unwrap();
    let x = gpu.upload_act(&rng.normal_vec(s.numel())).unwrap();
    let mut y = gpu.alloc_act(s.numel()).unwrap();
    let dy = gpu.upload_act(&rng.normal_vec(s.pixels() * s.c)).unwrap();
    let mut dx = gpu.alloc_act(s.numel()).unwrap();
    let mut de = gpu.alloc::<f32>(g3.numel()).unwrap();
    let mut g = group(
        c,
        &format!("cuda/conv3x3_b{}_{}x{}_{}_bf16", s.n, s.h, s.w, s.c),
    );
    g.throughput(Throughput::Elements((s.pixels() * g3.numel()) as u64));
    let sync = || gpu.synchronize().unwrap();
    if simt {
        gpu.set_tensor_core_conv(false);
        g.bench_function("forward_simt", |b| {
            b.iter(|| {
                gpu.conv_forward(&eff, &x, s, &mut y).unwrap();
                sync();
            })
        });
        gpu.set_tensor_core_conv(true);
        g.bench_function("data_grad_simt", |b| {
            b.iter(|| {
                k::conv_backward_data_simt(gpu, &eff, &dy, s, &mut dx).unwrap();
                sync();
            })
        });
        g.bench_function("weight_grad_simt", |b| {
            b.iter(|| {
                k::conv_backward_weight_simt(gpu, g3, &x, s, &dy, &mut de).unwrap();
                sync();
            })
        });
    }
    for tile in TcTile::ALL {
        g.bench_function(format!("forward_tc_{}", tile.name()), |b| {
            b.iter(|| {
                k::conv_forward_tensor_core_tile(gpu, &eff, &x, s, &mut y, tile).unwrap();
                sync();
            })
        });
        g.bench_function(format!("data_grad_tc_{}", tile.name()), |b| {
            b.iter(|| {
                k::conv_backward_data_tensor_core_tile(gpu, &eff, &dy, s, &mut dx, tile).unwrap();
                sync();
            })
        });
    }
    for tile in TcTile::ALL {
        g.bench_function(format!("weight_grad_tc_{}", tile.name()), |b| {
            b.iter(|| {
                k::conv_backward_weight_tensor_core_tile(gpu, g3, &x, s, &dy, &mut de, tile)
                    .unwrap();
                sync();
            })
        });
    }
    g.finish();
    gpu.set_precision(Precision::Fp32);
}

/// `cuda/conv_shapes/`: every convolution shape and direction of EDM2-XS at batch
/// EDM2_CONV_SHAPES_BATCH (default 128), bf16 — ours (the variant the tuning keeps)
/// against cuBLAS's bf16 GEMM of the same M, N, K (src/backend/gpu/conv_bench.rs; the same
/// table as `edm2 bench --vs-cublas`). The shapes come from one forward and backward of
/// the network on the device, which also tunes them. Heavy (the XS step at batch 128:
/// ~25 GB), so it runs only when the filter names it:
/// `cargo bench --features cuda --bench kernels -- cuda/conv_shapes`.
/// Criterion times each shape with CUDA events around back-to-back launches.
#[cfg(feature = "cuda")]
fn conv_shapes(c: &mut Criterion, gpu: &edm2::backend::gpu::Gpu) {
    use edm2::backend::gpu::conv_bench::{compare_with_cublas, print_table};
    use edm2::backend::gpu::{kernels as k, GpuParams, Precision};
    use edm2::nn::layers::Mode;
    use edm2::{NetConfig, Precond, Tensor};
    if !std::env::args().any(|a| a.contains("conv_shapes")) {
        return;
    }
    let n: usize = std::env::var("EDM2_CONV_SHAPES_BATCH").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(128);
    gpu.set_precision(Precision::Bf16);
    let cfg = NetConfig::resolve("edm2-img512-xs").unwrap();
    let net = Precond::new(&cfg).unwrap();
    let gp = GpuParams::upload(gpu, &net.init_params(1)).unwrap();
    let mut rng = Rng::new(4);
    let (r, ch) = (cfg.img_resolution, cfg.img_channels);
    let shape = [n, r, r, ch];
    let x = rng.normal_vec(n * r * r * ch);
    let xd = Tensor::with_buf(&shape, gpu.upload_input(&x).unwrap());
    let yd = gpu.upload(&x).unwrap();
    let labels: Vec<f32> = (0..n * cfg.label_dim).map(|i| (i % cfg.label_dim.max(1) == (i / cfg.label_dim.max(1)) % cfg.label_dim.max(1)) as u8 as f32).collect();
    let ld = (cfg.label_dim > 0).then(|| Tensor::with_buf(&[n, cfg.label_dim], gpu.upload_act(&labels).unwrap()));
    let sigma: Vec<f32> = (0..n).map(|i| 0.05 + 0.3 * i as f32).collect();
    let mode = Mode::train(1);
    {
        let out = net.forward_on(gpu, &gp, &xd, &sigma, ld.as_ref(), &mode, false).unwrap();
        let l = k::edm2_loss(gpu, &out.d.data, &yd, &out.logvar, &sigma, 0.5, 1.0).unwrap();
        let dd = Tensor::with_buf(&out.d.shape, l.dd);
        net.backward_on(gpu, &gp, out.cache.unwrap(), &dd, &l.dlogvar, &mode).unwrap();
    }
    let keys: Vec<_> = gpu.conv_choices().iter().map(|c| c.key).collect();
    let mut g = c.benchmark_group("cuda/conv_shapes");
    g.sample_size(10).measurement_time(Duration::from_millis(500)).warm_up_time(Duration::from_millis(200));
    let timed = |launch: &mut dyn FnMut() -> edm2::error::Result<()>, iters: u64| {
        let ms = gpu.time_ms(&mut || (0..iters).try_for_each(|_| launch())).unwrap();
        Duration::from_secs_f64(ms / 1e3)
    };
    let mut visit = |key: &edm2::backend::gpu::conv_algo::ConvKey,
                     ours: &mut dyn FnMut() -> edm2::error::Result<()>,
                     cublas: &mut dyn FnMut() -> edm2::error::Result<()>| {
        let id = format!("{}_n{}_{}x{}_{}to{}_k{}", key.dir.name(), key.n, key.h, key.w, key.cin, key.cout, key.k);
        g.throughput(Throughput::Elements(key.macs() as u64));
        g.bench_function(format!("{id}/ours"), |b| b.iter_custom(|iters| timed(&mut *ours, iters)));
        g.bench_function(format!("{id}/cublas"), |b| b.iter_custom(|iters| timed(&mut *cublas, iters)));
        Ok(())
    };
    match compare_with_cublas(gpu, &keys, 10, Some(&mut visit)) {
        Ok(rows) => print_table(&rows, 10, 790.0),
        Err(e) => eprintln!("cuda/conv_shapes skipped: {e}"),
    }
    g.finish();
    gpu.set_precision(Precision::Fp32);
}

#[cfg(not(feature = "cuda"))]
fn cuda(_c: &mut Criterion) {}

criterion_group!(benches, cpu, cuda);
criterion_main!(benches);
