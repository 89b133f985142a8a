//! Unit ops against the official implementation (`golden/ops.safetensors`) and the
//! paper's central claim — magnitude preservation — as a statistical test.

mod common;
use common::*;
use edm2::backend::cpu::{conv, ops};
use edm2::rng::Rng;

#[test]
fn normalize_matches_official() {
    let f = golden("ops.safetensors");
    let x = tensor(&f, "normalize.x"); // [3, 4, 2, 2], one all-zero sample
    // Default dims (all but batch): rows of 16 in NCHW = rows of 16 in any layout.
    let mut y = vec![0.0; x.numel()];
    ops::normalize_rows(&x.data, 16, &mut y);
    assert!(max_abs_diff(&y, &tensor(&f, "normalize.all").data) <= 1e-6);
    assert!(x.data[..16].iter().all(|v| *v == 0.0) || x.data[16..32].iter().all(|v| *v == 0.0) || x.data[32..].iter().all(|v| *v == 0.0));
    // dim=1 (channels) = pixel norm: rows of 4 in NHWC.
    let xh = x.nchw_to_nhwc();
    let mut yh = edm2::Tensor::zeros(&xh.shape);
    ops::normalize_rows(&xh.data, 4, &mut yh.data);
    assert!(max_abs_diff(&yh.nhwc_to_nchw().data, &tensor(&f, "normalize.dim1").data) <= 1e-6);
}

#[test]
fn elementwise_ops_match_official() {
    let f = golden("ops.safetensors");
    let x = tensor(&f, "mp_silu.x");
    let mut y = vec![0.0; x.numel()];
    ops::mp_silu(&x.data, &mut y);
    assert!(max_abs_diff(&y, &tensor(&f, "mp_silu.y").data) <= 1e-6);

    let (a, b, c) = (tensor(&f, "mp.a"), tensor(&f, "mp.b"), tensor(&f, "mp.c"));
    for t in ["0.3", "0.5"] {
        let mut s = a.data.clone();
        ops::mp_sum_inplace(&mut s, &b.data, t.parse().unwrap());
        assert!(max_abs_diff(&s, &tensor(&f, &format!("mp_sum.t{t}")).data) <= 1e-6, "mp_sum t={t}");
        let (ah, ch) = (a.nchw_to_nhwc(), c.nchw_to_nhwc());
        let mut out = edm2::Tensor::zeros(&[2, 4, 4, 8]);
        ops::mp_cat(&ah.data, 3, &ch.data, 5, t.parse().unwrap(), &mut out.data);
        assert!(max_abs_diff(&out.nhwc_to_nchw().data, &tensor(&f, &format!("mp_cat.a_c.t{t}")).data) <= 1e-6, "mp_cat t={t}");
    }

    let x = tensor(&f, "resample.x").nchw_to_nhwc(); // [2, 6, 6, 3]
    let mut down = edm2::Tensor::zeros(&[2, 3, 3, 3]);
    ops::downsample2(&x.data, 2, 6, 6, 3, &mut down.data);
    assert!(max_abs_diff(&down.nhwc_to_nchw().data, &tensor(&f, "resample.down").data) <= 1e-6);
    let mut up = edm2::Tensor::zeros(&[2, 12, 12, 3]);
    ops::upsample2(&x.data, 2, 6, 6, 3, &mut up.data);
    assert!(max_abs_diff(&up.nhwc_to_nchw().data, &tensor(&f, "resample.up").data) <= 1e-6);

    let y = ops::mp_fourier(&tensor(&f, "fourier.x").data, &tensor(&f, "fourier.freqs").data, &tensor(&f, "fourier.phases").data);
    assert!(max_abs_diff(&y, &tensor(&f, "fourier.y").data) <= 1e-5);
}

#[test]
fn mp_conv_matches_official() {
    let f = golden("ops.safetensors");
    let w = tensor(&f, "mpconv_fc.w");
    let x = tensor(&f, "mpconv_fc.x");
    let eff = conv::effective_weight(&w.data, 5, 6, 0, 0.7);
    let mut y = vec![0.0; 15];
    conv::conv_forward(&eff, &x.data, 3, 1, 1, &mut y);
    assert!(err_vs_rms(&y, &tensor(&f, "mpconv_fc.y_gain0.7").data) <= 1e-6);

    let w = tensor(&f, "mpconv_3x3.w");
    let x = tensor(&f, "mpconv_3x3.x").nchw_to_nhwc();
    let eff = conv::effective_weight(&w.data, 3, 4, 3, 1.0);
    let mut y = edm2::Tensor::zeros(&[2, 5, 5, 3]);
    conv::conv_forward(&eff, &x.data, 2, 5, 5, &mut y.data);
    assert!(err_vs_rms(&y.nhwc_to_nchw().data, &tensor(&f, "mpconv_3x3.y_gain1").data) <= 1e-6);
}

/// Unit-variance inputs keep unit RMS through mp_silu, mp_sum, mp_cat and MP-Conv with
/// normalized weights (paper §2.4). With 2^16–2^18 samples the sampling error of the
/// RMS is < 1%, so ±3% cannot fail by chance and catches any wrong constant.
#[test]
fn magnitude_preservation() {
    let mut rng = Rng::new(123);
    let n = 1 << 16;
    let a = rng.normal_vec(n);
    let b = rng.normal_vec(n);
    let near1 = |what: &str, v: &[f32]| {
        let r = rms(v);
        assert!((r - 1.0).abs() < 0.03, "{what}: RMS {r}");
    };
    near1("input", &a);
    let mut y = vec![0.0; n];
    ops::mp_silu(&a, &mut y);
    near1("mp_silu", &y);
    for t in [0.1, 0.3, 0.5, 0.9] {
        let mut s = a.clone();
        ops::mp_sum_inplace(&mut s, &b, t);
        near1(&format!("mp_sum t={t}"), &s);
        let (na, nb) = (24, 40);
        let px = 2048;
        let aa = rng.normal_vec(px * na);
        let bb = rng.normal_vec(px * nb);
        let mut out = vec![0.0; px * (na + nb)];
        ops::mp_cat(&aa, na, &bb, nb, t, &mut out);
        near1(&format!("mp_cat t={t}"), &out);
    }
    // MP-Conv: random (unnormalized, large) weights, unit-variance input.
    for (k, ci, co) in [(3usize, 32usize, 48usize), (1, 64, 32), (0, 256, 128)] {
        let fan = ci * k.max(1) * k.max(1);
        let w: Vec<f32> = rng.normal_vec(co * fan).iter().map(|v| 7.0 * v).collect();
        let eff = conv::effective_weight(&w, co, ci, k, 1.0);
        let (bn, h) = if k == 0 { (2048, 1) } else { (4, 16) };
        let x = rng.normal_vec(bn * h * h * ci);
        let mut y = vec![0.0; bn * h * h * co];
        conv::conv_forward(&eff, &x, bn, h, h, &mut y);
        // Zero padding at the border lowers the 3x3 RMS slightly: compare the interior.
        if k == 3 {
            let mut inner = Vec::new();
            for b_ in 0..bn {
                for yy in 1..h - 1 {
                    for xx in 1..h - 1 {
                        let o = ((b_ * h + yy) * h + xx) * co;
                        inner.extend_from_slice(&y[o..o + co]);
                    }
                }
            }
            near1("mp_conv 3x3 (interior)", &inner);
        } else {
            near1(&format!("mp_conv k={k}"), &y);
        }
    }
}

/// The vectorizable exp used by SiLU and softmax: within 2 ulp of the f64 value over the
/// whole finite range, exact limits outside.
#[test]
fn fast_exp_accuracy() {
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x < 88.5 {
        let got = ops::fast_exp(x) as f64;
        let want = (x as f64).exp();
        let ulp = (want as f32).abs() * f32::EPSILON;
        worst = worst.max((got - want).abs() / ulp as f64);
        x += 0.000_37;
    }
    assert!(worst <= 2.0, "fast_exp error {worst} ulp");
    assert_eq!(ops::fast_exp(-200.0), 0.0);
    assert_eq!(ops::fast_exp(200.0), f32::INFINITY);
    assert_eq!(ops::fast_exp(0.0), 1.0);
}

/// The attention's fp32 products on the register tiles (`gemm16::gemm_ab`, `gemm_abt`,
/// `gemm_atb`) against f64 sums: ragged shapes (37 rows: tiles of 12 and a remainder;
/// 48 columns: a two-panel and a one-panel tile; K = 40, not a multiple of 16, and the
/// transpose of A in 16x16 blocks with partial blocks). Within fp32 rounding of the sum
/// of |products|; skipped without AVX2 (the `gemm` crate runs them there).
#[test]
fn fp32_tile_products_match_f64_sums() {
    use edm2::backend::cpu::gemm16;
    if !gemm16::usable(16) {
        eprintln!("skipped: no AVX2");
        return;
    }
    let (m, n, k) = (37, 48, 40);
    let mut rng = Rng::new(91);
    let (a, bt, b, at) = (rng.normal_vec(m * k), rng.normal_vec(n * k), rng.normal_vec(k * n), rng.normal_vec(k * m));
    let mut c = [vec![0.0f32; m * n], vec![0.0f32; m * n], vec![0.0f32; m * n]];
    gemm16::gemm_abt(m, n, k, &a, &bt, &mut c[0]);
    gemm16::gemm_ab(m, n, k, &a, &b, &mut c[1]);
    gemm16::gemm_atb(m, n, k, &at, &b, &mut c[2]);
    for i in 0..m {
        for j in 0..n {
            let mut want = [0.0f64; 3];
            let mut scale = [0.0f64; 3];
            for kk in 0..k {
                let t = [
                    a[i * k + kk] as f64 * bt[j * k + kk] as f64,
                    a[i * k + kk] as f64 * b[kk * n + j] as f64,
                    at[kk * m + i] as f64 * b[kk * n + j] as f64,
                ];
                for v in 0..3 {
                    want[v] += t[v];
                    scale[v] += t[v].abs();
                }
            }
            for v in 0..3 {
                let got = c[v][i * n + j] as f64;
                assert!((got - want[v]).abs() <= 1e-6 * scale[v], "product {v} [{i},{j}]: {got} vs {}", want[v]);
            }
        }
    }
}

/// `cpu::zeroed` (parallel writes of large buffers) gives zeros also in memory that held
/// other values before (the binary reuses freed memory), for f32 and u32, large and small.
#[test]
fn zeroed_buffers_are_zero_after_reuse() {
    for n in [7, 1 << 16, (1 << 20) + 3] {
        drop(vec![1.5f32; n]);
        let z: Vec<f32> = edm2::backend::cpu::zeroed(n);
        assert!(z.len() == n && z.iter().all(|v| v.to_bits() == 0), "f32, n = {n}");
        drop(vec![u32::MAX; n]);
        let z: Vec<u32> = edm2::backend::cpu::zeroed(n);
        assert!(z.len() == n && z.iter().all(|v| *v == 0), "u32, n = {n}");
    }
}
