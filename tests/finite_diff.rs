//! Finite-difference checks of every explicit backward: for a random direction `v`,
//! `(L(x + εv) − L(x − εv)) / 2ε` must match `⟨∇L, v⟩`, where `L = Σ r ⊙ f(x)` for a fixed
//! random `r`. Losses are accumulated in f64; ε is chosen for f32 forward passes.

use edm2::backend::cpu::{attention, conv, ops, Cpu};
use edm2::nn::layers::{Block, BlockOpts, Flavor, Mode, Resample};
use edm2::nn::params::Registry;
use edm2::rng::Rng;
use edm2::{NetConfig, Params, Precond, Tensor};

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn axpy(x: &[f32], v: &[f32], e: f32) -> Vec<f32> {
    x.iter().zip(v).map(|(a, b)| a + e * b).collect()
}

/// Checks the directional derivative of `loss` at `x` along a random `v` against `grad·v`.
fn check(what: &str, x: &[f32], grad: &[f32], eps: f32, tol: f64, loss: impl Fn(&[f32]) -> f64, seed: u64) {
    let v = Rng::new(seed).normal_vec(x.len());
    let (lp, lm) = (loss(&axpy(x, &v, eps)), loss(&axpy(x, &v, -eps)));
    let fd = (lp - lm) / (2.0 * eps as f64);
    let an = dot(grad, &v);
    // Floor for tiny derivatives: f32 rounding of the loss itself (~2e-7 relative over a
    // whole network) divided by the step.
    let floor = 2e-7 * lp.abs().max(lm.abs()) / eps as f64;
    let err = ((fd - an).abs() - floor).max(0.0) / an.abs().max(1e-3);
    eprintln!("{what}: fd {fd:.4e} an {an:.4e} floor {floor:.1e}");
    assert!(err <= tol, "{what}: finite difference {fd:.6e} vs analytic {an:.6e} (rel err {err:.2e})");
}

#[test]
fn normalize_rows_backward() {
    let mut rng = Rng::new(1);
    let (rows, k) = (7, 24);
    let x = rng.normal_vec(rows * k);
    let r = rng.normal_vec(rows * k);
    let f = |x: &[f32]| {
        let mut y = vec![0.0; x.len()];
        ops::normalize_rows(x, k, &mut y);
        dot(&y, &r)
    };
    let mut dx = vec![0.0; x.len()];
    ops::normalize_rows_backward(&x, k, &r, &mut dx);
    check("normalize", &x, &dx, 1e-2, 2e-3, f, 2);
}

#[test]
fn mp_silu_and_modulation_backward() {
    let mut rng = Rng::new(3);
    let (n, px, c) = (3, 10, 8);
    let h = rng.normal_vec(n * px * c);
    let s: Vec<f32> = rng.normal_vec(n * c).iter().map(|v| 1.0 + 0.5 * v).collect();
    let r = rng.normal_vec(n * px * c);
    let fwd = |h: &[f32], s: &[f32]| {
        let mut y = vec![0.0; h.len()];
        ops::modulate_silu(h, s, c, px, &mut y);
        dot(&y, &r)
    };
    let mut dh = vec![0.0; h.len()];
    let mut ds = vec![0.0; s.len()];
    ops::modulate_silu_backward(&h, &s, &r, c, px, &mut dh, &mut ds);
    check("modulate_silu dh", &h, &dh, 1e-2, 2e-3, |hh| fwd(hh, &s), 4);
    check("modulate_silu ds", &s, &ds, 1e-2, 2e-3, |ss| fwd(&h, ss), 5);
    // Plain mp_silu.
    let mut dx = vec![0.0; h.len()];
    ops::mp_silu_backward(&h, &r, &mut dx);
    let f = |x: &[f32]| {
        let mut y = vec![0.0; x.len()];
        ops::mp_silu(x, &mut y);
        dot(&y, &r)
    };
    check("mp_silu", &h, &dx, 1e-2, 2e-3, f, 6);
}

/// Linear ops: the backward is the exact adjoint, ⟨A x, y⟩ = ⟨x, Aᵀ y⟩.
#[test]
fn linear_ops_backward_is_adjoint() {
    let mut rng = Rng::new(7);
    let (n, h, w, c) = (2, 6, 4, 5);
    let x = rng.normal_vec(n * h * w * c);
    // down
    let yd = rng.normal_vec(n * h / 2 * w / 2 * c);
    let mut ax = vec![0.0; yd.len()];
    ops::downsample2(&x, n, h, w, c, &mut ax);
    let mut aty = vec![0.0; x.len()];
    ops::downsample2_backward(&yd, n, h, w, c, &mut aty);
    assert!((dot(&ax, &yd) - dot(&x, &aty)).abs() < 1e-4 * dot(&ax, &ax).sqrt() * dot(&yd, &yd).sqrt());
    // up
    let yu = rng.normal_vec(n * h * 2 * w * 2 * c);
    let mut ax = vec![0.0; yu.len()];
    ops::upsample2(&x, n, h, w, c, &mut ax);
    ops::upsample2_backward(&yu, n, h, w, c, &mut aty);
    assert!((dot(&ax, &yu) - dot(&x, &aty)).abs() < 1e-4 * dot(&ax, &ax).sqrt() * dot(&yu, &yu).sqrt());
    // mp_cat
    let (na, nb, px) = (3, 5, 11);
    let a = rng.normal_vec(px * na);
    let b = rng.normal_vec(px * nb);
    let y = rng.normal_vec(px * (na + nb));
    let mut cat = vec![0.0; y.len()];
    ops::mp_cat(&a, na, &b, nb, 0.3, &mut cat);
    let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; b.len()]);
    ops::mp_cat_backward(&y, na, nb, 0.3, &mut da, &mut db);
    assert!((dot(&cat, &y) - dot(&a, &da) - dot(&b, &db)).abs() < 1e-4);
    // im2col / col2im
    let k = 9 * c;
    let mut patches = vec![0.0; n * h * w * k];
    edm2::backend::cpu::conv::im2col3(&x, n, h, w, c, &mut patches);
    let yp = rng.normal_vec(patches.len());
    let mut back = vec![0.0; x.len()];
    edm2::backend::cpu::conv::col2im3(&yp, n, h, w, c, &mut back);
    assert!((dot(&patches, &yp) - dot(&x, &back)).abs() < 1e-3);
}

fn conv_case(k: usize, n: usize, h: usize, w: usize, ci: usize, co: usize, gain: f32) {
    let mut rng = Rng::new(10 + k as u64);
    let fan = ci * k.max(1) * k.max(1);
    let wt = rng.normal_vec(co * fan);
    let x = rng.normal_vec(n * h * w * ci);
    let r = rng.normal_vec(n * h * w * co);
    let fwd = |wt: &[f32], x: &[f32], g: f32| {
        let eff = conv::effective_weight(wt, co, ci, k, g);
        let mut y = vec![0.0; n * h * w * co];
        conv::conv_forward(&eff, x, n, h, w, &mut y);
        dot(&y, &r)
    };
    let eff = conv::effective_weight(&wt, co, ci, k, gain);
    let mut dx = vec![0.0; x.len()];
    let mut d_eff = vec![0.0; wt.len()];
    conv::conv_backward(&eff, &x, n, h, w, &r, Some(&mut dx), &mut d_eff);
    let mut dw = vec![0.0; wt.len()];
    let dgain = conv::effective_weight_backward(&wt, &eff, &d_eff, &mut dw);
    check(&format!("conv{k} dx"), &x, &dx, 1e-2, 2e-3, |xx| fwd(&wt, xx, gain), 11);
    check(&format!("conv{k} dW"), &wt, &dw, 1e-2, 2e-3, |ww| fwd(ww, &x, gain), 12);
    check(&format!("conv{k} dgain"), &[gain], &[dgain], 1e-2, 2e-3, |g| fwd(&wt, &x, g[0]), 13);
}

#[test]
fn mp_conv_backward() {
    conv_case(3, 2, 5, 7, 6, 5, 0.8);
    conv_case(1, 2, 4, 3, 7, 9, 1.3);
    conv_case(0, 6, 1, 1, 10, 4, -0.6);
}

#[test]
fn attention_backward() {
    let mut rng = Rng::new(20);
    let (n, p, c, heads) = (2, 9, 12, 3);
    let qkv = rng.normal_vec(n * p * 3 * c);
    let r = rng.normal_vec(n * p * c);
    let f = |q: &[f32]| {
        let mut y = vec![0.0; n * p * c];
        attention::attention_forward(q, n, p, c, heads, &mut y);
        dot(&y, &r)
    };
    let mut y = vec![0.0; n * p * c];
    let cache = attention::attention_forward(&qkv, n, p, c, heads, &mut y);
    let mut dqkv = vec![0.0; qkv.len()];
    attention::attention_backward(&qkv, &cache, &r, n, p, c, heads, &mut dqkv);
    check("attention", &qkv, &dqkv, 1e-2, 3e-3, f, 21);
}

fn param_vec(p: &Params) -> Vec<f32> {
    p.values.iter().flatten().copied().collect()
}

fn unflatten(like: &Params, flat: &[f32]) -> Params {
    let mut out = like.clone();
    let mut o = 0;
    for v in out.values.iter_mut() {
        let l = v.len();
        v.copy_from_slice(&flat[o..o + l]);
        o += l;
    }
    out
}

fn block_case(flavor: Flavor, resample: Resample, in_ch: usize, out_ch: usize, attention: bool, dropout: f32) {
    let mut reg = Registry::default();
    let opts = BlockOpts { channels_per_head: 4, dropout, res_balance: 0.3, attn_balance: 0.3, clip_act: Some(256.0) };
    let emb_ch = 6;
    let b = Block::new(&mut reg, "blk", in_ch, out_ch, emb_ch, flavor, resample, attention, opts, 0);
    assert_eq!(b.num_heads > 0, attention);
    let mut rng = Rng::new(30);
    let mut p = Params::zeros(&reg.specs);
    for v in p.values.iter_mut() {
        *v = rng.normal_vec(v.len());
    }
    let (n, h) = (2, 4);
    let x = Tensor::from_vec(&[n, h, h, in_ch], rng.normal_vec(n * h * h * in_ch));
    let emb = Tensor::from_vec(&[n, emb_ch], rng.normal_vec(n * emb_ch));
    let mode = Mode::train(99);
    let (y, cache) = b.forward(&Cpu, &p, &x, &emb, &mode).unwrap();
    let r = rng.normal_vec(y.numel());
    let mut g = Params::zeros(&reg.specs);
    // The block adds its emb gradient into what the blocks before it left there.
    let start = rng.normal_vec(emb.numel());
    let mut acc = Tensor::from_vec(&emb.shape, start.clone());
    let dx = b.backward(&Cpu, &p, &emb, cache.unwrap(), Tensor::from_vec(&y.shape, r.clone()), &mode, &mut g, &mut acc).unwrap();
    let demb = Tensor::from_vec(&emb.shape, acc.data.iter().zip(&start).map(|(a, s)| a - s).collect());
    let loss = |p: &Params, x: &Tensor, emb: &Tensor| {
        let (y, _) = b.forward(&Cpu, p, x, emb, &Mode { record: false, ..mode }).unwrap();
        dot(&y.data, &r)
    };
    let what = format!("block {flavor:?} {resample:?} {in_ch}->{out_ch} attn={attention} dropout={dropout}");
    check(&format!("{what} dx"), &x.data, &dx.data, 1e-2, 3e-3, |xx| loss(&p, &Tensor::from_vec(&x.shape, xx.to_vec()), &emb), 31);
    check(&format!("{what} demb"), &emb.data, &demb.data, 1e-2, 3e-3, |e| loss(&p, &x, &Tensor::from_vec(&emb.shape, e.to_vec())), 32);
    let flat = param_vec(&p);
    check(&format!("{what} dparams"), &flat, &param_vec(&g), 1e-2, 3e-3, |f| loss(&unflatten(&p, f), &x, &emb), 33);
}

#[test]
fn block_backward() {
    block_case(Flavor::Enc, Resample::Keep, 8, 8, false, 0.0);
    block_case(Flavor::Enc, Resample::Keep, 6, 8, true, 0.0);
    block_case(Flavor::Enc, Resample::Down, 8, 8, false, 0.0);
    block_case(Flavor::Dec, Resample::Keep, 12, 8, true, 0.0);
    block_case(Flavor::Dec, Resample::Up, 8, 8, false, 0.0);
    block_case(Flavor::Dec, Resample::Keep, 8, 8, true, 0.25);
}

/// The whole network, on a configuration not in the golden files: unconditional,
/// attention at two resolutions, 8 channels per head, three levels, dropout in training.
#[test]
fn precond_backward_on_unseen_config() {
    let mut cfg = NetConfig::with_defaults(8, 2, 0);
    cfg.model_channels = 8;
    cfg.channel_mult = vec![1, 2, 2];
    cfg.num_blocks = 1;
    cfg.attn_resolutions = vec![8, 4];
    cfg.channels_per_head = 8;
    cfg.dropout = 0.1;
    cfg.logvar_channels = 8;
    let net = Precond::new(&cfg).unwrap();
    let mut p = net.init_params(5);
    let mut rng = Rng::new(6);
    for (s, v) in net.specs.iter().zip(p.values.iter_mut()) {
        if s.shape.is_empty() {
            v[0] = 0.3 + rng.uniform() as f32;
        }
    }
    net.force_normalize(&mut p);
    let n = 3;
    let images = Tensor::from_vec(&[n, 8, 8, 2], rng.normal_vec(n * 128));
    let sigma = vec![0.1f32, 1.0, 7.0];
    let mut x = images.clone();
    for (i, v) in x.data.iter_mut().enumerate() {
        *v += sigma[i / 128] * rng.normal() as f32;
    }
    let mode = Mode::train(1234);
    let loss_at = |p: &Params| {
        let out = net.forward(p, &x, &sigma, None, &Mode { record: false, ..mode }, false);
        edm2::train::loss::edm2_loss(&out.d, &out.logvar, &images, &sigma, 0.5).total
    };
    let out = net.forward(&p, &x, &sigma, None, &mode, false);
    let l = edm2::train::loss::edm2_loss(&out.d, &out.logvar, &images, &sigma, 0.5);
    let g = net.backward(&p, out.cache.unwrap(), &l.dd, &l.dlogvar, &mode);
    let flat = param_vec(&p);
    // Directional derivative over all parameters at once, and per tensor for a few.
    // Buffers (Fourier freqs/phases) are fixed: perturbing them is not part of the check.
    let restore_buffers = |mut q: Params| {
        for (i, s) in net.specs.iter().enumerate() {
            if s.kind == edm2::nn::ParamKind::Buffer {
                q.values[i] = p.values[i].clone();
            }
        }
        q
    };
    check("precond all params", &flat, &param_vec(&g), 1e-2, 5e-3, |f| loss_at(&restore_buffers(unflatten(&p, f))), 40);
    for (i, s) in net.specs.iter().enumerate() {
        if !(s.name.contains("attn_qkv") || s.name.ends_with("emb_gain") || s.name == "unet.out_gain" || s.name == "logvar_linear.weight") {
            continue;
        }
        let base = p.values[i].clone();
        check(&format!("precond {}", s.name), &base, &g.values[i], 1e-2, 5e-3, |f| {
            let mut q = p.clone();
            q.values[i] = f.to_vec();
            loss_at(&q)
        }, 41 + i as u64);
    }
}

/// Naive 'same' 3x3 convolution in f64 (NHWC input, OIHW weight) — the definition.
fn conv3x3_naive(x: &[f32], n: usize, h: usize, w: usize, ci: usize, wt: &[f32], co: usize) -> Vec<f64> {
    let mut y = vec![0.0f64; n * h * w * co];
    for b in 0..n {
        for yy in 0..h {
            for xx in 0..w {
                for o in 0..co {
                    let mut s = 0.0f64;
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (sy, sx) = (yy as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                            if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                continue;
                            }
                            for c in 0..ci {
                                s += x[((b * h + sy as usize) * w + sx as usize) * ci + c] as f64
                                    * wt[((o * ci + c) * 3 + ky) * 3 + kx] as f64;
                            }
                        }
                    }
                    y[((b * h + yy) * w + xx) * co + o] = s;
                }
            }
        }
    }
    y
}

/// The direct AVX2 kernel (taken when channels are multiples of 16) and the im2col path
/// against the naive definition, forward and data gradient, at shapes with partial
/// pixel tiles and 1-pixel-wide images; the weight gradient by finite differences.
#[test]
fn conv3x3_paths_match_definition() {
    let mut rng = Rng::new(77);
    for &(n, h, w, ci, co) in &[(2, 5, 7, 16, 32), (1, 1, 1, 16, 16), (1, 3, 1, 32, 16), (2, 1, 9, 16, 48), (1, 4, 2, 16, 16), (2, 6, 13, 3, 16), (1, 4, 4, 5, 7)] {
        let wt = rng.normal_vec(co * ci * 9);
        let x = rng.normal_vec(n * h * w * ci);
        let eff = conv::effective_weight(&wt, co, ci, 3, 1.0);
        // The definition uses the effective weight in OIHW.
        let eff_ohwi = eff.ohwi();
        let mut w_oihw = vec![0.0f32; wt.len()];
        for o in 0..co {
            for c in 0..ci {
                for tap in 0..9 {
                    w_oihw[(o * ci + c) * 9 + tap] = eff_ohwi[(o * 9 + tap) * ci + c];
                }
            }
        }
        let mut y = vec![f32::NAN; n * h * w * co];
        conv::conv_forward(&eff, &x, n, h, w, &mut y);
        let yr = conv3x3_naive(&x, n, h, w, ci, &w_oihw, co);
        let err = y.iter().zip(&yr).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-4, "forward {n}x{h}x{w} {ci}->{co}: {err}");
        // Data gradient = adjoint: ⟨conv(x), g⟩ = ⟨x, dx(g)⟩.
        let g = rng.normal_vec(y.len());
        let mut dx = vec![f32::NAN; x.len()];
        let mut d_eff = vec![0.0; wt.len()];
        conv::conv_backward(&eff, &x, n, h, w, &g, Some(&mut dx), &mut d_eff);
        let lhs: f64 = yr.iter().zip(&g).map(|(a, b)| a * *b as f64).sum();
        let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0), "data gradient {n}x{h}x{w} {ci}->{co}: {lhs} vs {rhs}");
        // Weight gradient: d_eff[o, tap, c] = Σ_p g[p, o] x[p + tap, c].
        let mut dw_ref = vec![0.0f64; wt.len()];
        for b in 0..n {
            for yy in 0..h {
                for xx in 0..w {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (sy, sx) = (yy as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                            if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                continue;
                            }
                            for o in 0..co {
                                for c in 0..ci {
                                    dw_ref[(o * 9 + ky * 3 + kx) * ci + c] += g[((b * h + yy) * w + xx) * co + o] as f64
                                        * x[((b * h + sy as usize) * w + sx as usize) * ci + c] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        let err = d_eff.iter().zip(&dw_ref).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-3, "weight gradient {n}x{h}x{w} {ci}->{co}: {err}");
    }
}
