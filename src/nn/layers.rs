//! The magnitude-preserving layers: MP-Conv/MP-Linear and the EDM2 `Block`, each with a
//! forward that records what its explicit backward needs.

use super::params::{ParamId, ParamKind, Params, Registry};
use crate::backend::cpu::{attention, conv, ops};
use crate::tensor::Tensor;
use std::borrow::Cow;

/// Forward-pass mode.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    /// Training mode: dropout is active (forced weight normalization is applied to the
    /// stored weights by the caller before the forward, see `Precond::force_normalize`).
    pub train: bool,
    /// Seed for dropout masks of this forward pass.
    pub dropout_seed: u64,
    /// Keep the activations the backward needs.
    pub record: bool,
}

impl Mode {
    pub fn eval() -> Self {
        Mode { train: false, dropout_seed: 0, record: false }
    }
    pub fn train(dropout_seed: u64) -> Self {
        Mode { train: true, dropout_seed, record: true }
    }
}

/// MP-Conv (k = 1 or 3) or MP-Linear (k = 0) without bias (paper §2.4, Eq. 47).
#[derive(Clone, Debug)]
pub struct MpConv {
    pub name: String,
    pub weight: ParamId,
    pub in_ch: usize,
    pub out_ch: usize,
    pub k: usize,
}

impl MpConv {
    pub fn new(reg: &mut Registry, name: &str, in_ch: usize, out_ch: usize, k: usize) -> Self {
        let shape = if k == 0 { vec![out_ch, in_ch] } else { vec![out_ch, in_ch, k, k] };
        let weight = reg.add(format!("{name}.weight"), shape, ParamKind::Param, true);
        MpConv { name: name.into(), weight, in_ch, out_ch, k }
    }

    pub fn effective(&self, p: &Params, gain: f32) -> conv::EffWeight {
        conv::effective_weight(&p.values[self.weight], self.out_ch, self.in_ch, self.k, gain)
    }

    /// `x`: NHWC `[N, H, W, in]` (or `[N, in]` for linear) → `[N, H, W, out]`.
    pub fn forward(&self, eff: &conv::EffWeight, x: &Tensor) -> Tensor {
        let (n, h, w) = spatial(x);
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = self.out_ch;
        let mut y = Tensor::zeros(&shape);
        conv::conv_forward(eff, &x.data, n, h, w, &mut y.data);
        y
    }

    /// Accumulates the weight gradient into `grads[weight]`; returns (dx, dgain).
    pub fn backward(
        &self,
        p: &Params,
        eff: &conv::EffWeight,
        x: &Tensor,
        dy: &Tensor,
        want_dx: bool,
        grads: &mut Params,
    ) -> (Option<Tensor>, f32) {
        let (n, h, w) = spatial(x);
        let numel = eff.out_ch * eff.fan_in();
        let mut d_eff = vec![0.0f32; numel];
        let mut dx = if want_dx { Some(Tensor::zeros(&x.shape)) } else { None };
        conv::conv_backward(eff, &x.data, n, h, w, &dy.data, dx.as_mut().map(|t| t.data.as_mut_slice()), &mut d_eff);
        let mut dw = vec![0.0f32; numel];
        let dgain = conv::effective_weight_backward(&p.values[self.weight], eff, &d_eff, &mut dw);
        for (g, d) in grads.values[self.weight].iter_mut().zip(&dw) {
            *g += d;
        }
        (dx, dgain)
    }

    /// Multiply-accumulates per image for an input of `pixels` pixels.
    pub fn macs(&self, pixels: usize) -> u64 {
        (pixels * self.out_ch * self.in_ch * self.k.max(1) * self.k.max(1)) as u64
    }
}

/// (N, H, W) of an NHWC tensor; a `[N, C]` tensor is N pixels of 1x1.
pub fn spatial(x: &Tensor) -> (usize, usize, usize) {
    match x.shape.len() {
        2 => (x.shape[0], 1, 1),
        4 => (x.shape[0], x.shape[1], x.shape[2]),
        _ => panic!("unexpected activation rank {:?}", x.shape),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Enc,
    Dec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Keep,
    Down,
    Up,
}

/// The EDM2 residual block (paper Fig. 21), encoder or decoder flavour.
#[derive(Clone, Debug)]
pub struct Block {
    pub name: String,
    pub in_ch: usize,
    pub out_ch: usize,
    pub flavor: Flavor,
    pub resample: Resample,
    pub num_heads: usize,
    pub emb_gain: ParamId,
    pub conv_res0: MpConv,
    pub emb_linear: MpConv,
    pub conv_res1: MpConv,
    pub conv_skip: Option<MpConv>,
    pub attn_qkv: Option<MpConv>,
    pub attn_proj: Option<MpConv>,
    pub dropout: f32,
    pub res_balance: f32,
    pub attn_balance: f32,
    pub clip_act: Option<f32>,
    /// Index of this block among all blocks (decorrelates dropout masks).
    pub index: usize,
}

/// Block hyper-parameters shared by all blocks of a network.
#[derive(Clone, Copy, Debug)]
pub struct BlockOpts {
    pub channels_per_head: usize,
    pub dropout: f32,
    pub res_balance: f32,
    pub attn_balance: f32,
    pub clip_act: Option<f32>,
}

/// What [`Block::backward`] needs from the forward.
pub struct BlockCache {
    x_in_shape: Vec<usize>,
    /// enc with conv_skip: its input (after resampling).
    x_res: Option<Tensor>,
    /// enc: conv_skip output (pixel-norm input) if any; else the resampled input.
    pn_in: Option<Tensor>,
    /// Input of mp_silu before conv_res0 (= the main path x).
    x_main: Tensor,
    a0: Tensor,
    h0: Tensor,
    s: Vec<f32>,
    y1: Tensor,
    /// Input of the attention (kept only when the block has attention).
    x2: Option<Tensor>,
    qkv: Option<Tensor>,
    attn: Option<attention::AttnCache>,
    ya: Option<Tensor>,
    clipped: Option<Vec<bool>>,
    effs: BlockEffs,
}

struct BlockEffs {
    skip: Option<conv::EffWeight>,
    res0: conv::EffWeight,
    emb: conv::EffWeight,
    res1: conv::EffWeight,
    qkv: Option<conv::EffWeight>,
    proj: Option<conv::EffWeight>,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reg: &mut Registry,
        name: &str,
        in_ch: usize,
        out_ch: usize,
        emb_ch: usize,
        flavor: Flavor,
        resample: Resample,
        attention: bool,
        opts: BlockOpts,
        index: usize,
    ) -> Self {
        let num_heads = if attention { out_ch / opts.channels_per_head } else { 0 };
        // Registration order = the official state_dict order.
        let emb_gain = reg.add(format!("{name}.emb_gain"), vec![], ParamKind::Param, false);
        let res0_in = if flavor == Flavor::Enc { out_ch } else { in_ch };
        let conv_res0 = MpConv::new(reg, &format!("{name}.conv_res0"), res0_in, out_ch, 3);
        let emb_linear = MpConv::new(reg, &format!("{name}.emb_linear"), emb_ch, out_ch, 0);
        let conv_res1 = MpConv::new(reg, &format!("{name}.conv_res1"), out_ch, out_ch, 3);
        let conv_skip = (in_ch != out_ch).then(|| MpConv::new(reg, &format!("{name}.conv_skip"), in_ch, out_ch, 1));
        let attn_qkv = (num_heads != 0).then(|| MpConv::new(reg, &format!("{name}.attn_qkv"), out_ch, out_ch * 3, 1));
        let attn_proj = (num_heads != 0).then(|| MpConv::new(reg, &format!("{name}.attn_proj"), out_ch, out_ch, 1));
        Block {
            name: name.into(),
            in_ch,
            out_ch,
            flavor,
            resample,
            num_heads,
            emb_gain,
            conv_res0,
            emb_linear,
            conv_res1,
            conv_skip,
            attn_qkv,
            attn_proj,
            dropout: opts.dropout,
            res_balance: opts.res_balance,
            attn_balance: opts.attn_balance,
            clip_act: opts.clip_act,
            index,
        }
    }

    fn dropout_seed(&self, mode: &Mode) -> u64 {
        mode.dropout_seed ^ ((self.index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// `x`: NHWC `[N, H, W, in]`, `emb`: `[N, emb]`.
    /// The input is borrowed: in eval mode no activation is copied; a recording forward
    /// copies into its cache only what the backward reads.
    pub fn forward(&self, p: &Params, x: &Tensor, emb: &Tensor, mode: &Mode) -> (Tensor, Option<BlockCache>) {
        let x_in_shape = x.shape.clone();
        let (n, h, w, c) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        // 1. resample
        let xr: Cow<Tensor> = match self.resample {
            Resample::Keep => Cow::Borrowed(x),
            Resample::Down => {
                let mut y = Tensor::zeros(&[n, h / 2, w / 2, c]);
                ops::downsample2(&x.data, n, h, w, c, &mut y.data);
                Cow::Owned(y)
            }
            Resample::Up => {
                let mut y = Tensor::zeros(&[n, h * 2, w * 2, c]);
                ops::upsample2(&x.data, n, h, w, c, &mut y.data);
                Cow::Owned(y)
            }
        };
        let eff_skip = self.conv_skip.as_ref().map(|m| m.effective(p, 1.0));
        // 2. encoder: conv_skip then pixel norm. No activation is copied: each tensor is
        // either consumed or kept for the backward.
        let (x_main, pn_in, x_res): (Cow<Tensor>, _, _) = if self.flavor == Flavor::Enc {
            let (pn_in, x_res) = match (&self.conv_skip, &eff_skip) {
                (Some(m), Some(e)) => (Cow::Owned(m.forward(e, &xr)), Some(xr)),
                _ => (xr, None),
            };
            let mut xm = Tensor::zeros(&pn_in.shape);
            ops::normalize_rows(&pn_in.data, self.out_ch, &mut xm.data);
            (Cow::Owned(xm), Some(pn_in), x_res)
        } else {
            (xr, None, None)
        };
        // 3. residual branch
        let mut a0 = Tensor::zeros(&x_main.shape);
        ops::mp_silu(&x_main.data, &mut a0.data);
        let eff0 = self.conv_res0.effective(p, 1.0);
        let h0 = self.conv_res0.forward(&eff0, &a0);
        let eff_emb = self.emb_linear.effective(p, p.scalar(self.emb_gain));
        let mut s = self.emb_linear.forward(&eff_emb, emb).data;
        s.iter_mut().for_each(|v| *v += 1.0);
        let (_, hh, hw) = spatial(&h0);
        let mut y1 = Tensor::zeros(&h0.shape);
        ops::modulate_silu(&h0.data, &s, self.out_ch, hh * hw, &mut y1.data);
        if mode.train && self.dropout > 0.0 {
            ops::dropout_inplace(&mut y1.data, self.dropout, self.dropout_seed(mode));
        }
        let eff1 = self.conv_res1.effective(p, 1.0);
        let mut x2 = self.conv_res1.forward(&eff1, &y1);
        // 4–5. x = mp_sum(skip(x), y, res_balance), computed into y's buffer (y itself is
        // not needed by the backward).
        let (wa, wb) = ops::mp_sum_coefs(self.res_balance);
        match (self.flavor, &self.conv_skip, &eff_skip) {
            (Flavor::Dec, Some(m), Some(e)) => {
                let xs = m.forward(e, &x_main);
                ops::axpby(&mut x2.data, &xs.data, wb, wa);
            }
            _ => ops::axpby(&mut x2.data, &x_main.data, wb, wa),
        }
        // 6. attention, its mp_sum computed into the projection's buffer.
        let (mut x3, x2, qkv, attn, ya, eff_qkv, eff_proj) = if self.num_heads > 0 {
            let (mq, mp) = (self.attn_qkv.as_ref().unwrap(), self.attn_proj.as_ref().unwrap());
            let eq = mq.effective(p, 1.0);
            let qkv = mq.forward(&eq, &x2);
            let (an, ah, aw) = spatial(&x2);
            let mut ya = Tensor::zeros(&x2.shape);
            let cache = attention::attention_forward(&qkv.data, an, ah * aw, self.out_ch, self.num_heads, &mut ya.data);
            let ep = mp.effective(p, 1.0);
            let mut x3 = mp.forward(&ep, &ya);
            let (wa, wb) = ops::mp_sum_coefs(self.attn_balance);
            ops::axpby(&mut x3.data, &x2.data, wb, wa);
            (x3, Some(x2), Some(qkv), Some(cache), Some(ya), Some(eq), Some(ep))
        } else {
            (x2, None, None, None, None, None, None)
        };
        // 7. clip
        let clipped = match self.clip_act {
            Some(limit) => {
                let any = ops::any_abs_above(&x3.data, limit);
                let mask = any.then(|| x3.data.iter().map(|v| v.abs() > limit).collect::<Vec<bool>>());
                ops::clip_inplace(&mut x3.data, limit);
                mask
            }
            None => None,
        };
        let cache = mode.record.then(|| BlockCache {
            x_in_shape,
            x_res: x_res.map(Cow::into_owned),
            pn_in: pn_in.map(Cow::into_owned),
            x_main: x_main.into_owned(),
            a0,
            h0,
            s,
            y1,
            x2,
            qkv,
            attn,
            ya,
            clipped,
            effs: BlockEffs { skip: eff_skip, res0: eff0, emb: eff_emb, res1: eff1, qkv: eff_qkv, proj: eff_proj },
        });
        (x3, cache)
    }

    /// Backward: `dy` w.r.t. the block output → (dx w.r.t. the block input, d_emb).
    /// Parameter gradients are accumulated into `grads`.
    pub fn backward(
        &self,
        p: &Params,
        emb: &Tensor,
        cache: BlockCache,
        mut dy: Tensor,
        mode: &Mode,
        grads: &mut Params,
    ) -> (Tensor, Tensor) {
        let c = cache;
        // 7. clip: no gradient where the value was clipped.
        if let Some(mask) = &c.clipped {
            for (g, &m) in dy.data.iter_mut().zip(mask) {
                if m {
                    *g = 0.0;
                }
            }
        }
        // 6. attention: x3 = wa·x2 + wb·proj(attn(qkv(x2)))
        let mut dx2 = dy;
        if self.num_heads > 0 {
            let (wa, wb) = ops::mp_sum_coefs(self.attn_balance);
            let dyp = Tensor::from_vec(&dx2.shape, ops::scaled(&dx2.data, wb));
            ops::scale_inplace(&mut dx2.data, wa);
            let (mq, mp) = (self.attn_qkv.as_ref().unwrap(), self.attn_proj.as_ref().unwrap());
            let ya = c.ya.as_ref().unwrap();
            let (dya, _) = mp.backward(p, c.effs.proj.as_ref().unwrap(), ya, &dyp, true, grads);
            let dya = dya.unwrap();
            let qkv = c.qkv.as_ref().unwrap();
            let x2 = c.x2.as_ref().unwrap();
            let (an, ah, aw) = spatial(x2);
            let mut dqkv = Tensor::zeros(&qkv.shape);
            attention::attention_backward(
                &qkv.data,
                c.attn.as_ref().unwrap(),
                &dya.data,
                an,
                ah * aw,
                self.out_ch,
                self.num_heads,
                &mut dqkv.data,
            );
            let (dxq, _) = mq.backward(p, c.effs.qkv.as_ref().unwrap(), x2, &dqkv, true, grads);
            ops::add_inplace(&mut dx2.data, &dxq.unwrap().data);
        }
        // 5. x2 = wa·skip(x_main) + wb·h1
        let (wa, wb) = ops::mp_sum_coefs(self.res_balance);
        let dh1 = Tensor::from_vec(&dx2.shape, ops::scaled(&dx2.data, wb));
        let mut dxs = dx2;
        ops::scale_inplace(&mut dxs.data, wa);
        // 4. decoder conv_skip
        let mut dx_main = if self.flavor == Flavor::Dec {
            match &self.conv_skip {
                Some(m) => m.backward(p, c.effs.skip.as_ref().unwrap(), &c.x_main, &dxs, true, grads).0.unwrap(),
                None => dxs,
            }
        } else {
            dxs
        };
        // 3. residual branch
        let (dy1, _) = self.conv_res1.backward(p, &c.effs.res1, &c.y1, &dh1, true, grads);
        let mut dy1 = dy1.unwrap();
        if mode.train && self.dropout > 0.0 {
            // Same mask and scale as the forward.
            ops::dropout_inplace(&mut dy1.data, self.dropout, self.dropout_seed(mode));
        }
        let (_, hh, hw) = spatial(&c.h0);
        let mut dh0 = Tensor::zeros(&c.h0.shape);
        let mut ds = vec![0.0f32; c.s.len()];
        ops::modulate_silu_backward(&c.h0.data, &c.s, &dy1.data, self.out_ch, hh * hw, &mut dh0.data, &mut ds);
        let ds = Tensor::from_vec(&[emb.shape[0], self.out_ch], ds);
        let (demb, dgain) = self.emb_linear.backward(p, &c.effs.emb, emb, &ds, true, grads);
        grads.values[self.emb_gain][0] += dgain;
        let (da0, _) = self.conv_res0.backward(p, &c.effs.res0, &c.a0, &dh0, true, grads);
        ops::mp_silu_backward_acc(&c.x_main.data, &da0.unwrap().data, &mut dx_main.data);
        // 2. encoder: pixel norm, conv_skip
        let dxr = if self.flavor == Flavor::Enc {
            let pn_in = c.pn_in.as_ref().unwrap();
            let mut dpn = Tensor::zeros(&pn_in.shape);
            ops::normalize_rows_backward(&pn_in.data, self.out_ch, &dx_main.data, &mut dpn.data);
            match &self.conv_skip {
                Some(m) => m.backward(p, c.effs.skip.as_ref().unwrap(), c.x_res.as_ref().unwrap(), &dpn, true, grads).0.unwrap(),
                None => dpn,
            }
        } else {
            dx_main
        };
        // 1. resample
        let s = &c.x_in_shape;
        let dx = match self.resample {
            Resample::Keep => dxr,
            Resample::Down => {
                let mut d = Tensor::zeros(s);
                ops::downsample2_backward(&dxr.data, s[0], s[1], s[2], s[3], &mut d.data);
                d
            }
            Resample::Up => {
                let mut d = Tensor::zeros(s);
                ops::upsample2_backward(&dxr.data, s[0], s[1], s[2], s[3], &mut d.data);
                d
            }
        };
        (dx, demb.unwrap())
    }
}
