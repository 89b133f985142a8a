//! Times the bf16 convolution kernels (forward, data and weight gradient) of one layer
//! shape on the path this machine takes (AMX tiles where present; `EDM2_DISABLE_AMX=1`
//! for the `vdpbf16ps` path; a seventh argument `1` for the fp32 kernels):
//! `cargo run --release --example amx_layers -- N H W CIN COUT K [MODE]` (MODE 3: the
//! forward alone; `AMX_LAYERS_REPS` repetitions, default 5, e.g. for `perf record`).
use edm2::backend::cpu::conv;
use std::time::Instant;

fn main() {
    // As the binary does (src/main.rs): freed memory kept for reuse, no page faults per call.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: glibc's documented tuning calls, before other threads exist.
        unsafe {
            mallopt(-4, 0); // M_MMAP_MAX
            mallopt(-1, i32::MAX); // M_TRIM_THRESHOLD
            mallopt(-2, 64 << 20); // M_TOP_PAD
        }
    }
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().expect("integer arguments")).collect();
    // A seventh argument 1 times the fp32 kernels instead (no bf16 products); 2 the fp32
    // forward of a plain (VAE) weight: Winograd where it takes the layer, and the direct
    // kernel on the same weight beside it.
    let (dims, mode) = match a[..] {
        [n, h, w, i, o, k] => ([n, h, w, i, o, k], 0),
        [n, h, w, i, o, k, f] => ([n, h, w, i, o, k], f),
        _ => panic!("usage: N H W CIN COUT K [1 | 2 | 3]"),
    };
    let fp32 = mode == 1 || mode == 2;
    let [n, h, w, i, o, k] = dims;
    let mut rng = edm2::rng::Rng::new(1);
    let wt = rng.normal_vec(o * i * k * k);
    let x = rng.normal_vec(n * h * w * i);
    let dy = rng.normal_vec(n * h * w * o);
    let mut eff = conv::effective_weight(&wt, o, i, k, 1.0);
    if !fp32 {
        conv::add_bf16_products(&mut eff);
    }
    let (mut y, mut dx, mut de) = (vec![0.0f32; n * h * w * o], vec![0.0f32; n * h * w * i], vec![0.0f32; o * i * k * k]);
    let gflop = 2.0 * (n * h * w * o * i * k * k) as f64 / 1e9;
    // AMX_LAYERS_REPS=N times each call N times (default 5; more for `perf record`).
    let reps: usize = std::env::var("AMX_LAYERS_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let time = |f: &mut dyn FnMut()| {
        f();
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    edm2::profile::enable_from_env();
    if mode == 2 {
        let direct = conv::plain_weight(&wt, o, i, k);
        let mut wino = conv::plain_weight(&wt, o, i, k);
        conv::add_winograd(&mut wino);
        let mut yw = vec![0.0f32; y.len()];
        let (td, tw) = (time(&mut || conv::conv_forward(&direct, &x, n, h, w, &mut y)), time(&mut || conv::conv_forward(&wino, &x, n, h, w, &mut yw)));
        let (num, den) = y.iter().zip(&yw).fold((0.0f64, 0.0f64), |(a, b), (&d, &v)| (a + ((d - v) as f64).powi(2), b + (d as f64).powi(2)));
        println!(
            "plain {n}x{h}x{w} {i}->{o} k{k}: direct {:.2} ms ({:.0} GFLOP/s), {} {:.2} ms ({:.0} direct-equivalent GFLOP/s, {:.2}x), relative L2 between them {:.1e}",
            td * 1e3,
            gflop / td,
            if wino.winograd.is_some() { "winograd" } else { "direct (not taken)" },
            tw * 1e3,
            gflop / tw,
            td / tw,
            (num / den).sqrt()
        );
        return;
    }
    let tf = time(&mut || conv::conv_forward(&eff, &x, n, h, w, &mut y));
    if mode == 3 {
        // The forward alone (for `perf record` of one kernel).
        println!("{n}x{h}x{w} {i}->{o} k{k}: forward {:.3} ms ({:.0} GFLOP/s)", tf * 1e3, gflop / tf);
        return;
    }
    let tb = time(&mut || conv::conv_backward(&eff, &x, n, h, w, &dy, Some(&mut dx), &mut de));
    let tw = time(&mut || conv::conv_backward(&eff, &x, n, h, w, &dy, None, &mut de));
    if edm2::profile::enabled() {
        println!("{}", edm2::profile::report());
    }
    println!(
        "{}{n}x{h}x{w} {i}->{o} k{k}: forward {:.2} ms ({:.0} GFLOP/s), backward {:.2} ms (weight grad alone {:.2} ms, {:.0} GFLOP/s; data grad ~{:.0} GFLOP/s)",
        if fp32 { "fp32 " } else { "" },
        tf * 1e3,
        gflop / tf, tb * 1e3, tw * 1e3, gflop / tw, gflop / (tb - tw)
    );
}
