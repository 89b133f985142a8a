//! Times the bf16 convolution kernels (forward, data and weight gradient) of one layer
//! shape on the path this machine takes (AMX tiles where present; `EDM2_DISABLE_AMX=1`
//! for the `vdpbf16ps` path): `cargo run --release --example amx_layers -- N H W CIN COUT K`.
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
    let [n, h, w, i, o, k] = a[..] else { panic!("usage: N H W CIN COUT K") };
    let mut rng = edm2::rng::Rng::new(1);
    let wt = rng.normal_vec(o * i * k * k);
    let x = rng.normal_vec(n * h * w * i);
    let dy = rng.normal_vec(n * h * w * o);
    let mut eff = conv::effective_weight(&wt, o, i, k, 1.0);
    conv::add_bf16_products(&mut eff);
    let (mut y, mut dx, mut de) = (vec![0.0f32; n * h * w * o], vec![0.0f32; n * h * w * i], vec![0.0f32; o * i * k * k]);
    let gflop = 2.0 * (n * h * w * o * i * k * k) as f64 / 1e9;
    let time = |f: &mut dyn FnMut()| {
        f();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    edm2::profile::enable_from_env();
    let tf = time(&mut || conv::conv_forward(&eff, &x, n, h, w, &mut y));
    let tb = time(&mut || conv::conv_backward(&eff, &x, n, h, w, &dy, Some(&mut dx), &mut de));
    let tw = time(&mut || conv::conv_backward(&eff, &x, n, h, w, &dy, None, &mut de));
    if edm2::profile::enabled() {
        println!("{}", edm2::profile::report());
    }
    println!(
        "{n}x{h}x{w} {i}->{o} k{k}: forward {:.2} ms ({:.0} GFLOP/s), backward {:.2} ms (weight grad alone {:.2} ms, {:.0} GFLOP/s; data grad ~{:.0} GFLOP/s)",
        tf * 1e3, gflop / tf, tb * 1e3, tw * 1e3, gflop / tw, gflop / (tb - tw)
    );
}
