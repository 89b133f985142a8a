//! The EDM2 U-Net and the EDM preconditioning wrapper (`Precond`), built from one
//! [`NetConfig`] with the official module names, run forward and backward.

use super::layers::{spatial, Act, Block, EmbGrad, BlockCache, BlockOpts, EffJob, EffSet, Flavor, Mode, MpConv, Resample};
use super::params::{ParamId, ParamKind, ParamSpec, Params, Registry};
use crate::backend::cpu::{ops, Cpu};
use crate::backend::Backend;
use crate::config::NetConfig;
use crate::error::Result;
use crate::tensor::Tensor;

/// An encoder entry: the first 3x3 conv or a block. Every entry's output is a skip.
#[derive(Clone, Debug)]
pub enum EncLayer {
    Conv(MpConv),
    Block(Block),
}

/// MP-Fourier features with fixed `freqs`/`phases` buffers.
#[derive(Clone, Debug)]
pub struct MpFourier {
    pub freqs: ParamId,
    pub phases: ParamId,
    pub channels: usize,
}

impl MpFourier {
    fn new(reg: &mut Registry, name: &str, channels: usize) -> Self {
        let freqs = reg.add(format!("{name}.freqs"), vec![channels], ParamKind::Buffer, false);
        let phases = reg.add(format!("{name}.phases"), vec![channels], ParamKind::Buffer, false);
        MpFourier { freqs, phases, channels }
    }
    pub fn forward<B: Backend>(&self, be: &B, p: &B::Params, x: &[f32]) -> Result<Tensor<B::Buf>> {
        let _prof = crate::profile::scope("total:forward");
        Ok(Tensor::with_buf(&[x.len(), self.channels], be.mp_fourier(x, p, self.freqs, self.phases)?))
    }
}

#[derive(Clone, Debug)]
pub struct UNet {
    pub out_gain: ParamId,
    pub emb_fourier: MpFourier,
    pub emb_noise: MpConv,
    pub emb_label: Option<MpConv>,
    /// (official name without the `unet.enc.` prefix, layer)
    pub enc: Vec<(String, EncLayer)>,
    /// (official name without the `unet.dec.` prefix, block, takes a skip)
    pub dec: Vec<(String, Block, bool)>,
    pub out_conv: MpConv,
    pub label_balance: f32,
    pub concat_balance: f32,
}

/// The whole network: `Precond` (EDM preconditioning + uncertainty head) around `UNet`.
#[derive(Clone, Debug)]
pub struct Precond {
    pub config: NetConfig,
    pub specs: Vec<ParamSpec>,
    pub unet: UNet,
    pub logvar_fourier: MpFourier,
    pub logvar_linear: MpConv,
}

/// Activations kept by a recording forward pass.
pub struct PrecondCache<B: Backend = Cpu> {
    c_out: Vec<f32>,
    emb_fourier: Tensor<B::Buf>,
    labels_scaled: Option<Tensor<B::Buf>>,
    emb_pre: Tensor<B::Buf>,
    emb: Tensor<B::Buf>,
    x_cat: Tensor<B::Buf>,
    enc: Vec<EncCache<B>>,
    dec: Vec<(BlockCache<B>, Option<(usize, usize)>)>,
    out_in: Tensor<B::Buf>,
    effs: TopEffs<B>,
    logvar_fourier: Tensor<B::Buf>,
}

enum EncCache<B: Backend> {
    Conv(B::Eff),
    Block(BlockCache<B>),
}

struct TopEffs<B: Backend> {
    emb_noise: B::Eff,
    emb_label: Option<B::Eff>,
    out: B::Eff,
    logvar: B::Eff,
}

/// Output of [`Precond::forward`]: `D` NHWC, `logvar` per image, optional cache.
pub struct ForwardOut<B: Backend = Cpu> {
    pub d: Tensor<B::Buf>,
    /// The uncertainty head's logvar, one per image (on the device for the CUDA backend:
    /// the training loss reads it there).
    pub logvar: B::Buf,
    /// The raw U-Net output `F_x` (NHWC).
    pub f_x: Tensor<B::Buf>,
    /// Intermediate activations by official name (`act.enc.<name>`, `emb`, ...), filled
    /// only when `collect_intermediates` is set.
    pub intermediates: Vec<(String, Tensor<B::Buf>)>,
    pub cache: Option<PrecondCache<B>>,
}

/// Preconditioning coefficients (EDM, DESIGN.md §1), computed in f32 as the official code.
pub fn precond_coefs(sigma: f32, sigma_data: f32) -> (f32, f32, f32, f32) {
    let sd2 = sigma_data * sigma_data;
    let s2 = sigma * sigma;
    let c_skip = sd2 / (s2 + sd2);
    let c_out = sigma * sigma_data / (s2 + sd2).sqrt();
    let c_in = 1.0 / (sd2 + s2).sqrt();
    let c_noise = sigma.ln() / 4.0;
    (c_skip, c_out, c_in, c_noise)
}

impl Precond {
    /// Builds the module tree for `config` (validated) with the official names.
    pub fn new(config: &NetConfig) -> crate::error::Result<Self> {
        config.validate()?;
        let cfg = config;
        let mut reg = Registry::default();
        let cblock = cfg.cblock();
        let (cnoise, cemb) = (cfg.cnoise(), cfg.cemb());
        let opts = BlockOpts {
            channels_per_head: cfg.channels_per_head,
            dropout: cfg.dropout,
            res_balance: cfg.res_balance,
            attn_balance: cfg.attn_balance,
            clip_act: cfg.clip_act,
        };
        let out_gain = reg.add("unet.out_gain".into(), vec![], ParamKind::Param, false);
        let emb_fourier = MpFourier::new(&mut reg, "unet.emb_fourier", cnoise);
        let emb_noise = MpConv::new(&mut reg, "unet.emb_noise", cnoise, cemb, 0);
        let emb_label = (cfg.label_dim != 0).then(|| MpConv::new(&mut reg, "unet.emb_label", cfg.label_dim, cemb, 0));
        let mut index = 0;
        let mut enc = Vec::new();
        let mut cout = cfg.img_channels + 1;
        for (level, &channels) in cblock.iter().enumerate() {
            let res = cfg.img_resolution >> level;
            if level == 0 {
                let cin = cout;
                cout = channels;
                let name = format!("{res}x{res}_conv");
                enc.push((name.clone(), EncLayer::Conv(MpConv::new(&mut reg, &format!("unet.enc.{name}"), cin, cout, 3))));
            } else {
                let name = format!("{res}x{res}_down");
                let b = Block::new(&mut reg, &format!("unet.enc.{name}"), cout, cout, cemb, Flavor::Enc, Resample::Down, false, opts, index);
                index += 1;
                enc.push((name, EncLayer::Block(b)));
            }
            for idx in 0..cfg.num_blocks {
                let cin = cout;
                cout = channels;
                let name = format!("{res}x{res}_block{idx}");
                let attn = cfg.attn_resolutions.contains(&res);
                let b = Block::new(&mut reg, &format!("unet.enc.{name}"), cin, cout, cemb, Flavor::Enc, Resample::Keep, attn, opts, index);
                index += 1;
                enc.push((name, EncLayer::Block(b)));
            }
        }
        let mut skips: Vec<usize> = enc
            .iter()
            .map(|(_, l)| match l {
                EncLayer::Conv(m) => m.out_ch,
                EncLayer::Block(b) => b.out_ch,
            })
            .collect();
        let mut dec = Vec::new();
        for (level, &channels) in cblock.iter().enumerate().rev() {
            let res = cfg.img_resolution >> level;
            let mut mk = |reg: &mut Registry, name: String, cin: usize, cout: usize, rs: Resample, attn: bool, skip: bool| {
                let b = Block::new(reg, &format!("unet.dec.{name}"), cin, cout, cemb, Flavor::Dec, rs, attn, opts, index);
                index += 1;
                dec.push((name, b, skip));
            };
            if level == cblock.len() - 1 {
                mk(&mut reg, format!("{res}x{res}_in0"), cout, cout, Resample::Keep, true, false);
                mk(&mut reg, format!("{res}x{res}_in1"), cout, cout, Resample::Keep, false, false);
            } else {
                mk(&mut reg, format!("{res}x{res}_up"), cout, cout, Resample::Up, false, false);
            }
            for idx in 0..=cfg.num_blocks {
                let cin = cout + skips.pop().unwrap();
                cout = channels;
                let attn = cfg.attn_resolutions.contains(&res);
                mk(&mut reg, format!("{res}x{res}_block{idx}"), cin, cout, Resample::Keep, attn, true);
            }
        }
        let out_conv = MpConv::new(&mut reg, "unet.out_conv", cout, cfg.img_channels, 3);
        let logvar_fourier = MpFourier::new(&mut reg, "logvar_fourier", cfg.logvar_channels);
        let logvar_linear = MpConv::new(&mut reg, "logvar_linear", cfg.logvar_channels, 1, 0);
        Ok(Precond {
            config: cfg.clone(),
            specs: reg.specs,
            unet: UNet {
                out_gain,
                emb_fourier,
                emb_noise,
                emb_label,
                enc,
                dec,
                out_conv,
                label_balance: cfg.label_balance,
                concat_balance: cfg.concat_balance,
            },
            logvar_fourier,
            logvar_linear,
        })
    }

    /// Number of trainable parameters (buffers excluded).
    pub fn num_params(&self) -> usize {
        self.specs.iter().filter(|s| s.kind == ParamKind::Param).map(|s| s.numel()).sum()
    }

    /// Fresh weights as the official init: weights and gains... weights `randn`, Fourier
    /// freqs `2π·randn`, phases `2π·rand`, gains 0 (so a fresh net outputs `c_skip·x`).
    pub fn init_params(&self, seed: u64) -> Params {
        let mut rng = crate::rng::Rng::new(seed);
        let mut p = Params::zeros(&self.specs);
        for (s, v) in self.specs.iter().zip(p.values.iter_mut()) {
            if s.is_mp_weight {
                *v = rng.normal_vec(s.numel());
            } else if s.name.ends_with(".freqs") {
                v.iter_mut().for_each(|x| *x = (2.0 * std::f64::consts::PI * rng.normal()) as f32);
            } else if s.name.ends_with(".phases") {
                v.iter_mut().for_each(|x| *x = (2.0 * std::f64::consts::PI * rng.uniform()) as f32);
            }
        }
        p
    }

    /// Forced weight normalization (paper Eq. 47, DESIGN.md §1): overwrite every MP weight
    /// of the *training* copy with `normalize(W)`. Call once before each training forward;
    /// never on EMA copies.
    pub fn force_normalize(&self, p: &mut Params) {
        self.force_normalize_on(&Cpu, p).expect("the CPU backend does not fail")
    }

    /// [`Precond::force_normalize`] on any backend.
    pub fn force_normalize_on<B: Backend>(&self, be: &B, p: &mut B::Params) -> Result<()> {
        let _prof = crate::profile::scope("force_normalize");
        let weights: Vec<_> = self.specs.iter().enumerate().filter(|(_, s)| s.is_mp_weight).map(|(id, s)| (id, s.shape[1..].iter().product::<usize>())).collect();
        be.force_normalize_all(p, &weights)
    }

    /// Checks an NHWC input batch against the config.
    pub fn check_input(&self, x: &Tensor, sigma: &[f32], labels: Option<&Tensor>) -> crate::error::Result<()> {
        let c = &self.config;
        let want = [x.shape.first().copied().unwrap_or(0), c.img_resolution, c.img_resolution, c.img_channels];
        if x.shape.len() != 4 || x.shape[1..] != want[1..] {
            return Err(crate::Error::Input(format!(
                "x has (NHWC) shape {:?}; this network takes [N, {}, {}, {}] (NCHW [N, {}, {}, {}])",
                x.shape, want[1], want[2], want[3], want[3], want[1], want[2]
            )));
        }
        if sigma.len() != x.shape[0] {
            return Err(crate::Error::Input(format!("sigma has {} entries for a batch of {}", sigma.len(), x.shape[0])));
        }
        if let Some(i) = sigma.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(crate::Error::Input(format!("sigma[{i}] = {} is not a positive finite number", sigma[i])));
        }
        if let Some(l) = labels {
            if c.label_dim == 0 {
                return Err(crate::Error::Input("class_labels given but the network is unconditional (label_dim 0)".into()));
            }
            if l.shape != [x.shape[0], c.label_dim] {
                return Err(crate::Error::Input(format!(
                    "class_labels has shape {:?}, expected [{}, {}]",
                    l.shape, x.shape[0], c.label_dim
                )));
            }
        }
        Ok(())
    }

    /// `D(x; σ, labels)` and `logvar` on the CPU backend. `x`: NHWC `[N, R, R, C]`. A
    /// conditional net without labels uses all-zero labels, as the official code does.
    pub fn forward(
        &self,
        p: &Params,
        x: &Tensor,
        sigma: &[f32],
        labels: Option<&Tensor>,
        mode: &Mode,
        collect_intermediates: bool,
    ) -> ForwardOut {
        self.forward_on(&Cpu, p, x, sigma, labels, mode, collect_intermediates).expect("the CPU backend does not fail")
    }

    /// Explicit backward of a recorded forward on the CPU backend: `dd` = dL/dD (NHWC),
    /// `dlogvar` = dL/dlogvar. Returns the gradient of every parameter (buffers stay
    /// zero). Gradients are taken at the values in `p` — after `force_normalize` in
    /// training, as the official code does.
    pub fn backward(&self, p: &Params, cache: PrecondCache, dd: &Tensor, dlogvar: &[f32], mode: &Mode) -> Params {
        self.backward_on(&Cpu, p, cache, dd, &dlogvar.to_vec(), mode).expect("the CPU backend does not fail")
    }

    /// [`Precond::forward`] on any backend (the one network description).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_on<B: Backend>(
        &self,
        be: &B,
        p: &B::Params,
        x: &Tensor<B::Buf>,
        sigma: &[f32],
        labels: Option<&Tensor<B::Buf>>,
        mode: &Mode,
        collect_intermediates: bool,
    ) -> Result<ForwardOut<B>> {
        let cfg = &self.config;
        let n = x.shape[0];
        let u = &self.unet;
        let mut inter: Vec<(String, Tensor<B::Buf>)> = Vec::new();
        let copy = |t: &Tensor<B::Buf>| -> Result<Tensor<B::Buf>> { Ok(Tensor::with_buf(&t.shape, be.copy(&t.data)?)) };
        let coefs: Vec<_> = sigma.iter().map(|&s| precond_coefs(s, cfg.sigma_data)).collect();
        let c_noise: Vec<f32> = coefs.iter().map(|c| c.3).collect();
        // Every effective weight of the pass in one batch where the backend prefers that.
        let mut effs = EffSet::prepare(be, p, &self.effective_plan(), mode.record)?;
        // Embedding.
        let emb_fourier = u.emb_fourier.forward(be, p, &c_noise)?;
        let eff_noise = effs.take(be, p, &u.emb_noise, None)?;
        let emb_noise = u.emb_noise.forward(be, &eff_noise, &emb_fourier)?;
        let mut emb_pre = copy(&emb_noise)?;
        let mut labels_scaled = None;
        let mut eff_label = None;
        if let Some(m) = &u.emb_label {
            let mut l = match labels {
                // In the embedding's storage type (fp32 in both precisions).
                Some(l) => Tensor::with_buf(&l.shape, be.convert_like(&l.data, &emb_fourier.data)?),
                None => Tensor::with_buf(&[n, cfg.label_dim], be.zeros_like(&emb_fourier.data, n * cfg.label_dim)?),
            };
            be.scale(&mut l.data, (cfg.label_dim as f32).sqrt())?;
            let e = effs.take(be, p, m, None)?;
            let el = m.forward(be, &e, &l)?;
            if collect_intermediates {
                inter.push(("emb_label".into(), copy(&el)?));
            }
            let (wa, wb) = ops::mp_sum_coefs(u.label_balance);
            be.axpby(&mut emb_pre.data, &el.data, wa, wb)?;
            labels_scaled = Some(l);
            eff_label = Some(e);
        }
        let mut emb = be.alloc_like(&emb_pre.data, emb_pre.len_of_shape())?;
        be.mp_silu(&emb_pre.data, &mut emb)?;
        let emb = Tensor::with_buf(&emb_pre.shape, emb);
        if collect_intermediates {
            inter.push(("c_noise".into(), Tensor::with_buf(&[n], be.upload(&c_noise)?)));
            inter.push(("emb_fourier".into(), copy(&emb_fourier)?));
            inter.push(("emb_noise".into(), copy(&emb_noise)?));
            inter.push(("emb".into(), copy(&emb)?));
        }
        // Input: [c_in·x, 1] along channels (the constant channel last).
        let (r, ci) = (cfg.img_resolution, cfg.img_channels);
        let c_in: Vec<f32> = coefs.iter().map(|c| c.2).collect();
        let mut x_cat = be.alloc(n * r * r * (ci + 1))?;
        be.precond_input(&x.data, &c_in, ci, &mut x_cat)?;
        let x_cat = Tensor::with_buf(&[n, r, r, ci + 1], x_cat);
        if collect_intermediates {
            // x_in = c_in·x: the first channels of the network input.
            let mut x_in = copy(x)?;
            be.scale_images(&mut x_in.data, &c_in)?;
            inter.push(("x_in".into(), x_in));
        }
        // Every block's emb_linear(emb) at once (the CUDA backend: one launch), handed to the
        // blocks in order (encoder, then decoder).
        let blocks = self.blocks();
        let emb_effs = blocks.iter().map(|b| effs.take(be, p, &b.emb_linear, Some(b.emb_gain))).collect::<Result<Vec<_>>>()?;
        let group: Vec<_> = emb_effs.iter().zip(&blocks).map(|(e, b)| (e, b.emb_linear.geom())).collect();
        let emb_outs = be.linear_group_forward(&group, &emb.data, n)?;
        let mut emb_ins = emb_outs.into_iter().zip(emb_effs).zip(&blocks).map(|((y, e), b)| (Tensor::with_buf(&[n, b.out_ch], y), e));
        // Encoder. Every output is a skip: the skip stack owns it and the next layer
        // borrows it, so no activation is copied.
        let mut skips: Vec<Tensor<B::Buf>> = Vec::new();
        let mut enc_caches = Vec::new();
        for (name, layer) in &u.enc {
            let input = skips.last().unwrap_or(&x_cat);
            let y = match layer {
                EncLayer::Conv(m) => {
                    let e = effs.take(be, p, m, None)?;
                    let y = m.forward(be, &e, input)?;
                    if mode.record {
                        enc_caches.push(EncCache::Conv(e));
                    }
                    y
                }
                EncLayer::Block(b) => {
                    let mut branch = None;
                    let (y, c) = b.forward_keeping_branch(be, p, Act::Borrowed(input), &emb, mode, collect_intermediates.then_some(&mut branch), &mut effs, emb_ins.next())?;
                    if let Some(c) = c {
                        enc_caches.push(EncCache::Block(c));
                    }
                    if let Some(t) = branch {
                        inter.push((format!("branch.enc.{name}"), t));
                    }
                    y
                }
            };
            if collect_intermediates {
                inter.push((format!("act.enc.{name}"), copy(&y)?));
            }
            skips.push(y);
        }
        // Decoder: the first block reads the last encoder output (still a skip) in place.
        let mut dec_caches = Vec::new();
        let mut h: Option<Tensor<B::Buf>> = None;
        for (name, b, takes_skip) in &u.dec {
            let mut split = None;
            if *takes_skip {
                let cur = match h.take() {
                    Some(t) => t,
                    None => copy(skips.last().expect("encoder output"))?,
                };
                let s = skips.pop().expect("skip stack matches the decoder");
                let (na, nb) = (cur.c(), s.c());
                let (nn, hh, ww) = spatial(&cur);
                let mut cat = be.alloc(nn * hh * ww * (na + nb))?;
                be.mp_cat(&cur.data, na, &s.data, nb, u.concat_balance, &mut cat)?;
                h = Some(Tensor::with_buf(&[nn, hh, ww, na + nb], cat));
                split = Some((na, nb));
            }
            // The previous block's output (or the concatenation) is handed over: the block
            // keeps it for the backward without a copy. The last encoder output stays a skip.
            let input = match h.take() {
                Some(t) => Act::Owned(t),
                None => Act::Borrowed(skips.last().expect("encoder output")),
            };
            let mut branch = None;
            let (y, c) = b.forward_keeping_branch(be, p, input, &emb, mode, collect_intermediates.then_some(&mut branch), &mut effs, emb_ins.next())?;
            if let Some(c) = c {
                dec_caches.push((c, split));
            }
            if let Some(t) = branch {
                inter.push((format!("branch.dec.{name}"), t));
            }
            if collect_intermediates {
                inter.push((format!("act.dec.{name}"), copy(&y)?));
            }
            h = Some(y);
        }
        let h = h.expect("the decoder has blocks");
        let eff_out = effs.take(be, p, &u.out_conv, Some(u.out_gain))?;
        let f_x = u.out_conv.forward(be, &eff_out, &h)?;
        // D = c_skip·x + c_out·F
        let c_skip: Vec<f32> = coefs.iter().map(|c| c.0).collect();
        let c_out: Vec<f32> = coefs.iter().map(|c| c.1).collect();
        let mut d = be.alloc_output(x.len_of_shape())?;
        be.precond_output(&x.data, &f_x.data, &c_skip, &c_out, &mut d)?;
        let d = Tensor::with_buf(&x.shape, d);
        // Uncertainty head.
        let lf = self.logvar_fourier.forward(be, p, &c_noise)?;
        let eff_lv = effs.take(be, p, &self.logvar_linear, None)?;
        debug_assert!(effs.is_spent(), "effective_plan made weights the forward pass did not use");
        let logvar = self.logvar_linear.forward(be, &eff_lv, &lf)?.data;
        if collect_intermediates {
            inter.push(("logvar_fourier".into(), copy(&lf)?));
        }
        let cache = if mode.record {
            Some(PrecondCache {
                c_out,
                emb_fourier,
                labels_scaled,
                emb_pre,
                emb,
                x_cat,
                enc: enc_caches,
                dec: dec_caches,
                out_in: h,
                effs: TopEffs { emb_noise: eff_noise, emb_label: eff_label, out: eff_out, logvar: eff_lv },
                logvar_fourier: lf,
            })
        } else {
            None
        };
        Ok(ForwardOut { d, logvar, f_x, intermediates: inter, cache })
    }

    /// [`Precond::backward`] on any backend.
    pub fn backward_on<B: Backend>(
        &self,
        be: &B,
        p: &B::Params,
        cache: PrecondCache<B>,
        dd: &Tensor<B::Buf>,
        dlogvar: &B::Buf,
        mode: &Mode,
    ) -> Result<B::Params> {
        let mut g = be.zero_grads(p)?;
        self.backward_into(be, p, cache, dd, dlogvar, mode, &mut g)?;
        Ok(g)
    }

    /// [`Precond::backward_on`] adding the gradients into `g` (every parameter's gradient is
    /// added exactly once): gradient accumulation over passes without a separate sum.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into<B: Backend>(
        &self,
        be: &B,
        p: &B::Params,
        cache: PrecondCache<B>,
        dd: &Tensor<B::Buf>,
        dlogvar: &B::Buf,
        mode: &Mode,
        g: &mut B::Params,
    ) -> Result<()> {
        let _prof = crate::profile::scope("total:backward");
        // The effective-weight part of every layer's weight gradient at the end, together
        // where the backend batches it.
        be.defer_weight_grads(g);
        let u = &self.unet;
        let c = cache;
        let n = dd.shape[0];
        // Uncertainty head.
        let dlv = Tensor::with_buf(&[n, 1], be.convert_like(dlogvar, &c.logvar_fourier.data)?);
        self.logvar_linear.backward(be, p, &c.effs.logvar, &c.logvar_fourier, &dlv, false, None, g)?;
        // dF = c_out·dD
        // dD is fp32 like D; the U-Net's gradients are in its activations' storage type.
        let mut df = Tensor::with_buf(&dd.shape, be.convert_like(&dd.data, &c.out_in.data)?);
        be.scale_images(&mut df.data, &c.c_out)?;
        let mut dh = u.out_conv.backward(be, p, &c.effs.out, &c.out_in, &df, true, Some(u.out_gain), g)?.unwrap();
        let mut demb = Tensor::with_buf(&c.emb.shape, be.zeros_like(&c.emb.data, c.emb.len_of_shape())?);
        let mut emb_grads: Vec<(&Block, EmbGrad<B>)> = Vec::new();
        // Decoder in reverse; skip gradients collected per encoder output.
        let mut dskips: Vec<Option<Tensor<B::Buf>>> = (0..u.enc.len()).map(|_| None).collect();
        let mut skip_idx = u.enc.len();
        let mut dec_caches = c.dec;
        let mut pops = Vec::new();
        for (_, _, takes) in &u.dec {
            if *takes {
                skip_idx -= 1;
                pops.push(Some(skip_idx));
            } else {
                pops.push(None);
            }
        }
        for (i, (_, b, _)) in u.dec.iter().enumerate().rev() {
            let (bc, split) = dec_caches.pop().unwrap();
            let (dx, e) = b.backward_leaving_emb(be, p, &c.emb, bc, dh, mode, g)?;
            emb_grads.push((b, e));
            dh = match split {
                Some((na, nb)) => {
                    let (nn, hh, ww) = spatial(&dx);
                    let mut da = be.zeros(nn * hh * ww * na)?;
                    let mut ds = be.zeros(nn * hh * ww * nb)?;
                    be.mp_cat_backward(&dx.data, na, nb, u.concat_balance, &mut da, &mut ds)?;
                    dskips[pops[i].unwrap()] = Some(Tensor::with_buf(&[nn, hh, ww, nb], ds));
                    Tensor::with_buf(&[nn, hh, ww, na], da)
                }
                None => dx,
            };
        }
        // Encoder in reverse: each output's gradient = its skip's + the next layer's input's.
        let mut enc_caches = c.enc;
        for (i, (_, layer)) in u.enc.iter().enumerate().rev() {
            if let Some(ds) = dskips[i].take() {
                be.add(&mut dh.data, &ds.data)?;
            }
            let lc = enc_caches.pop().unwrap();
            match (layer, lc) {
                (EncLayer::Conv(m), EncCache::Conv(e)) => {
                    m.backward(be, p, &e, &c.x_cat, &dh, false, None, g)?;
                }
                (EncLayer::Block(b), EncCache::Block(bc)) => {
                    let (dx, e) = b.backward_leaving_emb(be, p, &c.emb, bc, dh, mode, g)?;
                    emb_grads.push((b, e));
                    dh = dx;
                }
                _ => unreachable!("encoder cache order"),
            }
        }
        // Every block's emb_linear backward at once, their emb gradients added in the order
        // the blocks' backward ran (decoder, then encoder, each from its end).
        let layers: Vec<_> = emb_grads.iter().map(|(b, e)| (b.emb_linear.weight, b.emb_linear.geom(), &e.eff, &e.ds.data, Some(b.emb_gain))).collect();
        be.linear_group_backward(p, &layers, &c.emb.data, n, &mut demb.data, g)?;
        // Embedding: emb = mp_silu(mp_sum(emb_noise, emb_label, t)).
        let mut de_pre = be.zeros_like(&c.emb_pre.data, c.emb_pre.len_of_shape())?;
        be.mp_silu_backward(&c.emb_pre.data, &demb.data, &mut de_pre)?;
        let de_pre = Tensor::with_buf(&c.emb_pre.shape, de_pre);
        let mut d_noise = Tensor::with_buf(&de_pre.shape, be.copy(&de_pre.data)?);
        if let (Some(m), Some(e), Some(l)) = (&u.emb_label, &c.effs.emb_label, &c.labels_scaled) {
            let (wa, wb) = ops::mp_sum_coefs(u.label_balance);
            be.scale(&mut d_noise.data, wa)?;
            let mut d_label = de_pre;
            be.scale(&mut d_label.data, wb)?;
            m.backward(be, p, e, l, &d_label, false, None, g)?;
        }
        u.emb_noise.backward(be, p, &c.effs.emb_noise, &c.emb_fourier, &d_noise, false, None, g)?;
        be.finish_weight_grads(p, g)
    }

    /// Forward cost per image in the convention of the official `count_flops.py` (and the
    /// paper's "Gflops" column): conv/matmul counted as MACs, elementwise ops as their
    /// output size times a per-op factor (silu and softmax 3, lerp and clamp 2), weight
    /// normalization included, the uncertainty head not (the official count does not
    /// request logvar). Broken down by the official op names; a handful of scalar ops on
    /// σ are left out.
    pub fn flop_count(&self) -> FlopCount {
        let cfg = &self.config;
        let u = &self.unet;
        let mut fc = FlopCount::default();
        // Weight normalization of one MP layer, done twice as in a training-mode trace
        // (forced + traditional; the reference figures in golden/torch_cpu_baseline.json
        // and the 45.75 G for XS are counted that way): vector_norm, eps add per
        // row, divide; then the scale, and a 0-dim divide when the gain is learned.
        let layer = |fc: &mut FlopCount, m: &MpConv, pixels: usize, learned_gain: bool| {
            let numel = (m.out_ch * m.in_ch * m.k.max(1) * m.k.max(1)) as u64;
            fc.add("aten::linalg_vector_norm", 2 * numel);
            fc.add("aten::add", 2 * m.out_ch as u64);
            fc.add("aten::div", 2 * numel + learned_gain as u64);
            fc.add("aten::mul", numel);
            fc.add(if m.k == 0 { "aten::matmul" } else { "aten::_convolution" }, m.macs(pixels));
            fc.gemm_macs += m.macs(pixels);
        };
        let silu = |fc: &mut FlopCount, n: usize| {
            fc.add("aten::silu", 3 * n as u64);
            fc.add("aten::div", n as u64);
        };
        let mp_sum = |fc: &mut FlopCount, n: usize| {
            fc.add("aten::lerp", 2 * n as u64);
            fc.add("aten::div", n as u64);
        };
        // normalize over groups of `k` of `n` elements.
        let normalize = |fc: &mut FlopCount, n: usize, k: usize| {
            fc.add("aten::linalg_vector_norm", n as u64);
            fc.add("aten::add", (n / k) as u64);
            fc.add("aten::div", n as u64);
        };
        // Embedding.
        let (cnoise, cemb) = (cfg.cnoise(), cfg.cemb());
        for op in ["aten::outer", "aten::add", "aten::cos", "aten::mul"] {
            fc.add(op, cnoise as u64);
        }
        layer(&mut fc, &u.emb_noise, 1, false);
        if let Some(m) = &u.emb_label {
            fc.add("aten::mul", cfg.label_dim as u64);
            layer(&mut fc, m, 1, false);
            mp_sum(&mut fc, cemb);
        }
        silu(&mut fc, cemb);
        let block = |fc: &mut FlopCount, b: &Block, res_in: usize| -> usize {
            let res = match b.resample {
                Resample::Keep => res_in,
                Resample::Down => res_in / 2,
                Resample::Up => res_in * 2,
            };
            let px = res * res;
            let co = b.out_ch;
            if b.resample != Resample::Keep {
                // Depthwise 2x2 (transposed) convolution: 4 MACs per output element.
                fc.add("aten::_convolution", 4 * (px * b.in_ch) as u64);
            }
            if b.resample == Resample::Up {
                fc.add("aten::mul", 4); // the filter times 4
            }
            if b.flavor == Flavor::Enc {
                if let Some(m) = &b.conv_skip {
                    layer(fc, m, px, false);
                }
                normalize(fc, co * px, co); // pixel norm
            }
            silu(fc, b.conv_res0.in_ch * px);
            layer(fc, &b.conv_res0, px, false);
            layer(fc, &b.emb_linear, 1, true);
            fc.add("aten::add", co as u64); // c = emb_linear(..) + 1
            fc.add("aten::mul", (co * px) as u64); // modulation
            silu(fc, co * px);
            layer(fc, &b.conv_res1, px, false);
            if b.flavor == Flavor::Dec {
                if let Some(m) = &b.conv_skip {
                    layer(fc, m, px, false);
                }
            }
            mp_sum(fc, co * px);
            if let (Some(q), Some(pj)) = (&b.attn_qkv, &b.attn_proj) {
                layer(fc, q, px, false);
                let h = b.num_heads;
                normalize(fc, 3 * co * px, co / h);
                fc.add("aten::div", (co * px) as u64); // k / sqrt(Ch)
                fc.add("aten::matmul", 2 * (co * px * px) as u64); // q·k and w·v
                fc.gemm_macs += 2 * (co * px * px) as u64;
                fc.add("aten::softmax", 3 * (h * px * px) as u64);
                layer(fc, pj, px, false);
                mp_sum(fc, co * px);
            }
            if b.clip_act.is_some() {
                fc.add("aten::clamp_", 2 * (co * px) as u64);
            }
            res
        };
        let mut res = cfg.img_resolution;
        for (_, l) in &u.enc {
            match l {
                EncLayer::Conv(m) => layer(&mut fc, m, res * res, false),
                EncLayer::Block(b) => res = block(&mut fc, b, res),
            }
        }
        for (_, b, takes_skip) in &u.dec {
            if *takes_skip {
                fc.add("aten::mul", (b.in_ch * res * res) as u64); // mp_cat scaling
            }
            res = block(&mut fc, b, res);
        }
        layer(&mut fc, &u.out_conv, res * res, true);
        // Preconditioning: c_in·x, then c_skip·x + c_out·F.
        let img = (cfg.img_channels * cfg.img_resolution * cfg.img_resolution) as u64;
        fc.add("aten::mul", 3 * img);
        fc.add("aten::add", img);
        fc
    }

    /// Memory one training pass keeps per image, in bytes, with activations of
    /// `act_bytes` each: what the forward records for the backward (per block: its
    /// inputs, the two convolutions' inputs and outputs, the modulation and residual
    /// sums, attention's q/k/v and fp32 probabilities, the clip mask), the encoder outputs
    /// held for the decoder's skips and their gradients, and a few tensors of the
    /// largest level live at once in the backward. An estimate from the network
    /// description (checked against the measured peak in the tests), not an accounting.
    pub fn activation_bytes_per_image(&self, act_bytes: usize) -> u64 {
        let cfg = &self.config;
        let u = &self.unet;
        // Per block → (output resolution, activations, fp32 probabilities, mask bytes, widest).
        // In u128: a config at its size limits must not overflow (see NetConfig::validate).
        let block = |b: &Block, res_in: usize| -> (usize, u128, u128, u128, u128) {
            let res = match b.resample {
                Resample::Keep => res_in,
                Resample::Down => res_in / 2,
                Resample::Up => res_in * 2,
            };
            let px = (res * res) as u128;
            let (ci, co, c0) = (b.in_ch as u128, b.out_ch as u128, b.conv_res0.in_ch as u128);
            let mut e = 2 * c0 * px + 3 * co * px; // x_main, a0; h0, s, y1
            if b.flavor == Flavor::Enc {
                e += co * px; // pixel-norm input
                if b.conv_skip.is_some() {
                    e += ci * px; // the skip convolution's input
                }
            }
            let mut f = 0;
            if b.attn_qkv.is_some() {
                e += 5 * co * px; // x2, qkv, ya
                f = b.num_heads as u128 * px * px;
            }
            let m = if b.clip_act.is_some() { co * px } else { 0 };
            (res, e, f, m, ci.max(co) * px)
        };
        let (mut elems, mut fp32, mut mask, mut widest) = (0u128, 0u128, 0u128, 0u128);
        let mut add = |res: &mut usize, b: &Block| {
            let (r, e, f, m, w) = block(b, *res);
            *res = r;
            elems += e;
            fp32 += f;
            mask += m;
            widest = widest.max(w);
        };
        let mut res = cfg.img_resolution;
        let mut skips = 0u128;
        let mut inputs = 0u128;
        for (_, l) in &u.enc {
            match l {
                EncLayer::Conv(m) => {
                    inputs += (m.in_ch * res * res) as u128;
                    skips += (m.out_ch * res * res) as u128;
                }
                EncLayer::Block(b) => {
                    add(&mut res, b);
                    skips += (b.out_ch * res * res) as u128;
                }
            }
        }
        for (_, b, _) in &u.dec {
            add(&mut res, b);
        }
        let mut elems = elems + inputs;
        // Encoder outputs for the skips and, in the backward, their gradients; four
        // tensors of the widest level live at once; x, the target, D and dD in fp32.
        elems += 2 * skips + 4 * widest;
        let img = (cfg.img_channels * cfg.img_resolution * cfg.img_resolution) as u128;
        u64::try_from(elems * act_bytes as u128 + fp32 * 4 + mask + 4 * img * 4).unwrap_or(u64::MAX)
    }

    /// Every block, encoder then decoder, in the order of the forward pass.
    pub fn blocks(&self) -> Vec<&Block> {
        let u = &self.unet;
        let enc = u.enc.iter().filter_map(|(_, l)| match l {
            EncLayer::Block(b) => Some(b),
            EncLayer::Conv(_) => None,
        });
        enc.chain(u.dec.iter().map(|(_, b, _)| b)).collect()
    }

    /// The effective weights one forward pass uses, in its order: what [`EffSet`] makes in
    /// one batch on a backend that batches them.
    pub fn effective_plan(&self) -> Vec<EffJob> {
        let u = &self.unet;
        let mut plan = vec![(u.emb_noise.weight, u.emb_noise.geom(), None)];
        if let Some(m) = &u.emb_label {
            plan.push((m.weight, m.geom(), None));
        }
        for (_, layer) in &u.enc {
            match layer {
                EncLayer::Conv(m) => plan.push((m.weight, m.geom(), None)),
                EncLayer::Block(b) => b.effective_plan(&mut plan),
            }
        }
        for (_, b, _) in &u.dec {
            b.effective_plan(&mut plan);
        }
        plan.push((u.out_conv.weight, u.out_conv.geom(), Some(u.out_gain)));
        plan.push((self.logvar_linear.weight, self.logvar_linear.geom(), None));
        plan
    }

    /// Forward multiply-accumulates per image of the MP convolutions, linear layers and
    /// attention products (~97% of [`Precond::flop_count`]); twice this is the "2·MAC"
    /// FLOP count of torch's flop counter in golden/torch_cpu_baseline.json.
    pub fn macs_per_image(&self) -> u64 {
        self.flop_count().gemm_macs
    }
}

/// Forward cost per image by official op name (see [`Precond::flop_count`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlopCount {
    pub by_op: std::collections::BTreeMap<&'static str, u64>,
    /// MACs of the MP layers and attention products only (no resampling filters).
    pub gemm_macs: u64,
}

impl FlopCount {
    fn add(&mut self, op: &'static str, n: u64) {
        *self.by_op.entry(op).or_insert(0) += n;
    }
    /// Multiply-accumulates of convolutions (resampling included), linear layers and
    /// attention products.
    pub fn macs(&self) -> u64 {
        ["aten::_convolution", "aten::matmul"].iter().map(|k| self.by_op.get(k).copied().unwrap_or(0)).sum()
    }
    /// The official total ("GMAC" in the paper's table when divided by 1e9).
    pub fn total(&self) -> u64 {
        self.by_op.values().sum()
    }
}
