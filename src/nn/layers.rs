//! The magnitude-preserving layers: MP-Conv/MP-Linear and the EDM2 `Block`, each with a
//! forward that records what its explicit backward needs.

use super::params::{ParamId, ParamKind, Registry};
use crate::backend::cpu::ops;
use crate::backend::{Backend, ConvGeom, Nhwc};
use crate::error::Result;
use crate::tensor::Tensor;

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

    pub fn geom(&self) -> ConvGeom {
        ConvGeom { out_ch: self.out_ch, in_ch: self.in_ch, k: self.k }
    }

    /// The effective weight `normalize(W)·gain/sqrt(fan_in)` (paper Eq. 47); `gain`: the
    /// layer's learned gain parameter, or None for 1.
    pub fn effective<B: Backend>(&self, be: &B, p: &B::Params, gain: Option<ParamId>) -> Result<B::Eff> {
        be.effective(p, self.weight, self.geom(), gain)
    }

    /// `x`: NHWC `[N, H, W, in]` (or `[N, in]` for linear) → `[N, H, W, out]`.
    pub fn forward<B: Backend>(&self, be: &B, eff: &B::Eff, x: &Tensor<B::Buf>) -> Result<Tensor<B::Buf>> {
        let s = self.input_shape(x);
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = self.out_ch;
        let mut y = be.alloc_like(&x.data, s.pixels() * self.out_ch)?;
        be.conv_forward(eff, &x.data, s, &mut y)?;
        Ok(Tensor::with_buf(&shape, y))
    }

    /// Accumulates the weight gradient into `grads[weight]` and, when the layer's gain is the
    /// scalar parameter `gain`, the gain's gradient into `grads[gain]`; returns dx if wanted.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Params,
        eff: &B::Eff,
        x: &Tensor<B::Buf>,
        dy: &Tensor<B::Buf>,
        want_dx: bool,
        gain: Option<ParamId>,
        grads: &mut B::Params,
    ) -> Result<Option<Tensor<B::Buf>>> {
        let s = self.input_shape(x);
        let mut dx = if want_dx { Some(be.alloc_like(&x.data, s.numel())?) } else { None };
        be.conv_backward(p, self.weight, eff, &x.data, s, &dy.data, dx.as_mut(), gain, grads)?;
        Ok(dx.map(|d| Tensor::with_buf(&x.shape, d)))
    }

    /// [`MpConv::backward`] adding dx into `dx` (which has `x`'s shape).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_acc<B: Backend>(
        &self,
        be: &B,
        p: &B::Params,
        eff: &B::Eff,
        x: &Tensor<B::Buf>,
        dy: &Tensor<B::Buf>,
        dx: &mut Tensor<B::Buf>,
        gain: Option<ParamId>,
        grads: &mut B::Params,
    ) -> Result<()> {
        let s = self.input_shape(x);
        be.conv_backward_acc(p, self.weight, eff, &x.data, s, &dy.data, &mut dx.data, gain, grads)
    }

    fn input_shape<D>(&self, x: &Tensor<D>) -> Nhwc {
        let (n, h, w) = spatial(x);
        Nhwc { n, h, w, c: self.in_ch }
    }

    /// Multiply-accumulates per image for an input of `pixels` pixels.
    pub fn macs(&self, pixels: usize) -> u64 {
        (pixels * self.out_ch * self.in_ch * self.k.max(1) * self.k.max(1)) as u64
    }
}

/// (N, H, W) of an NHWC tensor; a `[N, C]` tensor is N pixels of 1x1.
pub fn spatial<D>(x: &Tensor<D>) -> (usize, usize, usize) {
    match x.shape.len() {
        2 => (x.shape[0], 1, 1),
        4 => (x.shape[0], x.shape[1], x.shape[2]),
        _ => panic!("unexpected activation rank {:?}", x.shape),
    }
}

/// The NHWC shape of a rank-4 activation.
pub fn nhwc<D>(x: &Tensor<D>) -> Nhwc {
    Nhwc { n: x.shape[0], h: x.shape[1], w: x.shape[2], c: x.shape[3] }
}

/// A borrowed activation or one computed here (no copy unless a cache must own it).
pub enum Act<'a, D> {
    Borrowed(&'a Tensor<D>),
    Owned(Tensor<D>),
}

impl<D> Act<'_, D> {
    pub fn get(&self) -> &Tensor<D> {
        match self {
            Act::Borrowed(t) => t,
            Act::Owned(t) => t,
        }
    }
    /// The activation, owned (a borrowed one is copied).
    pub fn into_owned<B: Backend<Buf = D>>(self, be: &B) -> Result<Tensor<D>> {
        match self {
            Act::Borrowed(t) => Ok(Tensor::with_buf(&t.shape, be.copy(&t.data)?)),
            Act::Owned(t) => Ok(t),
        }
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

/// One effective weight to make: (stored weight, geometry, gain parameter).
pub type EffJob = (ParamId, ConvGeom, Option<ParamId>);

/// The effective weights of one forward pass. Where the backend makes them better in one
/// batch ([`Backend::batches_effective`]: the CUDA backend, one launch for all instead of
/// one per layer) they are made up front from the network's plan and handed out as the
/// layers ask; otherwise (the CPU: less memory live at once) each is made where it is used.
/// A layer asking for one the plan did not make (or made otherwise) gets it made then: the
/// plan only saves launches, it cannot change a value.
pub struct EffSet<B: Backend> {
    ready: std::collections::HashMap<ParamId, (ConvGeom, Option<ParamId>, B::Eff)>,
}

impl<B: Backend> EffSet<B> {
    /// Nothing made ahead: each weight where it is used.
    pub fn lazy() -> Self {
        EffSet { ready: Default::default() }
    }

    /// The weights of `plan` made now where the backend batches them, else [`EffSet::lazy`];
    /// `backward`: whether the pass records for a backward.
    pub fn prepare(be: &B, p: &B::Params, plan: &[EffJob], backward: bool) -> Result<Self> {
        if !be.batches_effective() || plan.is_empty() {
            return Ok(Self::lazy());
        }
        let made = be.effective_all(p, plan, backward)?;
        Ok(EffSet { ready: plan.iter().zip(made).map(|(&(id, g, gain), e)| (id, (g, gain, e))).collect() })
    }

    /// Whether every weight made ahead was handed out (the plan and the pass agree).
    pub fn is_spent(&self) -> bool {
        self.ready.is_empty()
    }

    /// Layer `m`'s effective weight with gain parameter `gain`.
    pub fn take(&mut self, be: &B, p: &B::Params, m: &MpConv, gain: Option<ParamId>) -> Result<B::Eff> {
        match self.ready.remove(&m.weight) {
            Some((g, gn, e)) if g == m.geom() && gn == gain => Ok(e),
            _ => m.effective(be, p, gain),
        }
    }
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
pub struct BlockCache<B: Backend> {
    x_in_shape: Vec<usize>,
    /// enc with conv_skip: its input (after resampling).
    x_res: Option<Tensor<B::Buf>>,
    /// enc: conv_skip output (pixel-norm input) if any; else the resampled input.
    pn_in: Option<Tensor<B::Buf>>,
    /// Input of mp_silu before conv_res0 (= the main path x).
    x_main: Tensor<B::Buf>,
    a0: Tensor<B::Buf>,
    h0: Tensor<B::Buf>,
    s: Tensor<B::Buf>,
    y1: Tensor<B::Buf>,
    /// Input of the attention (kept only when the block has attention).
    x2: Option<Tensor<B::Buf>>,
    qkv: Option<Tensor<B::Buf>>,
    attn: Option<B::Attn>,
    ya: Option<Tensor<B::Buf>>,
    clipped: Option<B::Mask>,
    effs: BlockEffs<B>,
}

struct BlockEffs<B: Backend> {
    skip: Option<B::Eff>,
    res0: B::Eff,
    emb: B::Eff,
    res1: B::Eff,
    qkv: Option<B::Eff>,
    proj: Option<B::Eff>,
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
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Params,
        x: &Tensor<B::Buf>,
        emb: &Tensor<B::Buf>,
        mode: &Mode,
    ) -> Result<(Tensor<B::Buf>, Option<BlockCache<B>>)> {
        self.forward_keeping_branch(be, p, Act::Borrowed(x), emb, mode, None, &mut EffSet::lazy(), None)
    }

    /// The effective weights [`Block::forward`] uses, in its order (see [`EffSet`]).
    pub fn effective_plan(&self, out: &mut Vec<EffJob>) {
        let mut add = |m: &MpConv, gain| out.push((m.weight, m.geom(), gain));
        if let Some(m) = &self.conv_skip {
            add(m, None);
        }
        add(&self.conv_res0, None);
        add(&self.emb_linear, Some(self.emb_gain));
        add(&self.conv_res1, None);
        if let (Some(q), Some(pr)) = (&self.attn_qkv, &self.attn_proj) {
            add(q, None);
            add(pr, None);
        }
    }

    /// [`Block::forward`], also keeping a copy of the residual branch's output (`conv_res1`,
    /// before the mp_sum with the skip) in `branch` when one is given: what the paper's
    /// training-dynamics plots show next to the block output. An input given as
    /// [`Act::Owned`] (one the caller no longer needs) is kept for the backward without a copy.
    /// `emb_out`: `emb_linear(emb)` and its effective weight where the caller made them (all
    /// blocks' at once: [`Backend::linear_group_forward`]); None: made here.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_keeping_branch<B: Backend>(
        &self,
        be: &B,
        p: &B::Params,
        x: Act<'_, B::Buf>,
        emb: &Tensor<B::Buf>,
        mode: &Mode,
        branch: Option<&mut Option<Tensor<B::Buf>>>,
        effs: &mut EffSet<B>,
        emb_out: Option<(Tensor<B::Buf>, B::Eff)>,
    ) -> Result<(Tensor<B::Buf>, Option<BlockCache<B>>)> {
        let x_in_shape = x.get().shape.clone();
        let sx = nhwc(x.get());
        // 1. resample
        let xr: Act<B::Buf> = match self.resample {
            Resample::Keep => x,
            Resample::Down => {
                let mut y = be.alloc(sx.numel() / 4)?;
                be.downsample2(&x.get().data, sx, &mut y)?;
                Act::Owned(Tensor::with_buf(&[sx.n, sx.h / 2, sx.w / 2, sx.c], y))
            }
            Resample::Up => {
                let mut y = be.alloc(sx.numel() * 4)?;
                be.upsample2(&x.get().data, sx, &mut y)?;
                Act::Owned(Tensor::with_buf(&[sx.n, sx.h * 2, sx.w * 2, sx.c], y))
            }
        };
        let eff_skip = self.conv_skip.as_ref().map(|m| effs.take(be, p, m, None)).transpose()?;
        // 2. encoder: conv_skip then pixel norm. No activation is copied: each tensor is
        // either consumed or kept for the backward.
        // The pixel norm writes the residual branch's mp_silu of its output too (3.).
        let (x_main, pn_in, x_res, a0): (Act<B::Buf>, _, _, _) = if self.flavor == Flavor::Enc {
            let (pn_in, x_res) = match (&self.conv_skip, &eff_skip) {
                (Some(m), Some(e)) => (Act::Owned(m.forward(be, e, xr.get())?), Some(xr)),
                _ => (xr, None),
            };
            let pn = pn_in.get();
            let (mut xm, mut a0) = (be.alloc(pn.len_of_shape())?, be.alloc(pn.len_of_shape())?);
            be.normalize_rows_silu(&pn.data, self.out_ch, &mut xm, &mut a0)?;
            (Act::Owned(Tensor::with_buf(&pn.shape, xm)), Some(pn_in), x_res, Some(a0))
        } else {
            (xr, None, None, None)
        };
        // 3. residual branch
        let xm = x_main.get();
        let a0 = match a0 {
            Some(a0) => a0,
            None => {
                let mut a0 = be.alloc(xm.len_of_shape())?;
                be.mp_silu(&xm.data, &mut a0)?;
                a0
            }
        };
        let a0 = Tensor::with_buf(&xm.shape, a0);
        let eff0 = effs.take(be, p, &self.conv_res0, None)?;
        let h0 = self.conv_res0.forward(be, &eff0, &a0)?;
        // c = emb_linear(emb) + 1: the + 1 is part of the modulation op.
        let (s, eff_emb) = match emb_out {
            Some(made) => made,
            None => {
                let eff = effs.take(be, p, &self.emb_linear, Some(self.emb_gain))?;
                (self.emb_linear.forward(be, &eff, emb)?, eff)
            }
        };
        let (_, hh, hw) = spatial(&h0);
        let mut y1 = be.alloc(h0.len_of_shape())?;
        be.modulate_silu(&h0.data, &s.data, self.out_ch, hh * hw, &mut y1)?;
        if mode.train && self.dropout > 0.0 {
            be.dropout(&mut y1, self.dropout, self.dropout_seed(mode))?;
        }
        let y1 = Tensor::with_buf(&h0.shape, y1);
        let eff1 = effs.take(be, p, &self.conv_res1, None)?;
        let mut x2 = self.conv_res1.forward(be, &eff1, &y1)?;
        if let Some(slot) = branch {
            *slot = Some(Tensor::with_buf(&x2.shape, be.copy(&x2.data)?));
        }
        // 4–5. x = mp_sum(skip(x), y, res_balance), computed into y's buffer (y itself is
        // not needed by the backward). 7. The clip goes with the block's last mp_sum: this
        // one without attention.
        let (wa, wb) = ops::mp_sum_coefs(self.res_balance);
        let clip_res = if self.num_heads > 0 { None } else { self.clip_act };
        let clipped_res = match (self.flavor, &self.conv_skip, &eff_skip) {
            (Flavor::Dec, Some(m), Some(e)) => {
                let xs = m.forward(be, e, xm)?;
                be.axpby_clip(&mut x2.data, &xs.data, wb, wa, clip_res)?
            }
            _ => be.axpby_clip(&mut x2.data, &xm.data, wb, wa, clip_res)?,
        };
        // 6. attention, its mp_sum (and the clip, 7) computed into the projection's buffer.
        let (x3, x2, qkv, attn, ya, eff_qkv, eff_proj, clipped) = if self.num_heads > 0 {
            let (mq, mp) = (self.attn_qkv.as_ref().unwrap(), self.attn_proj.as_ref().unwrap());
            let eq = effs.take(be, p, mq, None)?;
            let qkv = mq.forward(be, &eq, &x2)?;
            let (an, ah, aw) = spatial(&x2);
            let mut ya = be.alloc(x2.len_of_shape())?;
            let cache = be.attention_forward(&qkv.data, an, ah * aw, self.out_ch, self.num_heads, &mut ya)?;
            let ya = Tensor::with_buf(&x2.shape, ya);
            let ep = effs.take(be, p, mp, None)?;
            let mut x3 = mp.forward(be, &ep, &ya)?;
            let (wa, wb) = ops::mp_sum_coefs(self.attn_balance);
            let clipped = be.axpby_clip(&mut x3.data, &x2.data, wb, wa, self.clip_act)?;
            (x3, Some(x2), Some(qkv), Some(cache), Some(ya), Some(eq), Some(ep), clipped)
        } else {
            (x2, None, None, None, None, None, None, clipped_res)
        };
        let cache = if mode.record {
            Some(BlockCache {
                x_in_shape,
                x_res: x_res.map(|t| t.into_owned(be)).transpose()?,
                pn_in: pn_in.map(|t| t.into_owned(be)).transpose()?,
                x_main: x_main.into_owned(be)?,
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
            })
        } else {
            None
        };
        Ok((x3, cache))
    }

    /// Backward: `dy` w.r.t. the block output → dx w.r.t. the block input; the gradient
    /// w.r.t. `emb` is added into `demb` (the embedding feeds every block). Parameter
    /// gradients are accumulated into `grads`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Params,
        emb: &Tensor<B::Buf>,
        cache: BlockCache<B>,
        dy: Tensor<B::Buf>,
        mode: &Mode,
        grads: &mut B::Params,
        demb: &mut Tensor<B::Buf>,
    ) -> Result<Tensor<B::Buf>> {
        let (dx, e) = self.backward_leaving_emb(be, p, emb, cache, dy, mode, grads)?;
        self.emb_linear.backward_acc(be, p, &e.eff, emb, &e.ds, demb, Some(self.emb_gain), grads)?;
        Ok(dx)
    }

    /// [`Block::backward`] but for its `emb_linear`, whose backward it leaves to the caller
    /// (all blocks' together: [`Backend::linear_group_backward`]).
    pub fn backward_leaving_emb<B: Backend>(
        &self,
        be: &B,
        p: &B::Params,
        emb: &Tensor<B::Buf>,
        cache: BlockCache<B>,
        dy: Tensor<B::Buf>,
        mode: &Mode,
        grads: &mut B::Params,
    ) -> Result<(Tensor<B::Buf>, EmbGrad<B>)> {
        let c = cache;
        // 7. clip: no gradient where the value was clipped (zeroed by the first split below,
        // the backward of the mp_sum the clip went with).
        let mut clip_mask = c.clipped.as_ref();
        // 6. attention: x3 = wa·x2 + wb·proj(attn(qkv(x2)))
        let mut dx2 = dy;
        if self.num_heads > 0 {
            let (wa, wb) = ops::mp_sum_coefs(self.attn_balance);
            let dyp = Tensor::with_buf(&dx2.shape, be.split_scaled_masked(&mut dx2.data, wa, wb, clip_mask.take())?);
            let (mq, mp) = (self.attn_qkv.as_ref().unwrap(), self.attn_proj.as_ref().unwrap());
            let ya = c.ya.as_ref().unwrap();
            let dya = mp.backward(be, p, c.effs.proj.as_ref().unwrap(), ya, &dyp, true, None, grads)?.unwrap();
            let qkv = c.qkv.as_ref().unwrap();
            let x2 = c.x2.as_ref().unwrap();
            let (an, ah, aw) = spatial(x2);
            let mut dqkv = be.alloc(qkv.len_of_shape())?; // overwritten by the backward
            be.attention_backward(&qkv.data, c.attn.as_ref().unwrap(), &ya.data, &dya.data, an, ah * aw, self.out_ch, self.num_heads, &mut dqkv)?;
            let dqkv = Tensor::with_buf(&qkv.shape, dqkv);
            let dxq = mq.backward(be, p, c.effs.qkv.as_ref().unwrap(), x2, &dqkv, true, None, grads)?;
            be.add(&mut dx2.data, &dxq.unwrap().data)?;
        }
        // 5. x2 = wa·skip(x_main) + wb·h1
        let (wa, wb) = ops::mp_sum_coefs(self.res_balance);
        let mut dxs = dx2;
        let dh1 = Tensor::with_buf(&dxs.shape, be.split_scaled_masked(&mut dxs.data, wa, wb, clip_mask.take())?);
        // 4. decoder conv_skip
        let mut dx_main = if self.flavor == Flavor::Dec {
            match &self.conv_skip {
                Some(m) => m.backward(be, p, c.effs.skip.as_ref().unwrap(), &c.x_main, &dxs, true, None, grads)?.unwrap(),
                None => dxs,
            }
        } else {
            dxs
        };
        // 3. residual branch
        let mut dy1 = self.conv_res1.backward(be, p, &c.effs.res1, &c.y1, &dh1, true, None, grads)?.unwrap();
        if mode.train && self.dropout > 0.0 {
            // Same mask and scale as the forward.
            be.dropout(&mut dy1.data, self.dropout, self.dropout_seed(mode))?;
        }
        let (_, hh, hw) = spatial(&c.h0);
        let mut dh0 = be.zeros(c.h0.len_of_shape())?;
        let mut ds = be.zeros_like(&c.s.data, c.s.len_of_shape())?;
        be.modulate_silu_backward(&c.h0.data, &c.s.data, &dy1.data, self.out_ch, hh * hw, &mut dh0, &mut ds)?;
        let dh0 = Tensor::with_buf(&c.h0.shape, dh0);
        let ds = Tensor::with_buf(&[emb.shape[0], self.out_ch], ds);
        let da0 = self.conv_res0.backward(be, p, &c.effs.res0, &c.a0, &dh0, true, None, grads)?;
        let da0 = da0.unwrap();
        // 2. encoder: pixel norm (its output fed the skip and the branch's mp_silu: both
        // gradients join in the norm's backward), conv_skip
        let dxr = if self.flavor == Flavor::Enc {
            let pn_in = c.pn_in.as_ref().unwrap();
            let mut dpn = be.alloc(pn_in.len_of_shape())?;
            be.normalize_rows_backward_silu(&pn_in.data, self.out_ch, &mut dx_main.data, &c.x_main.data, &da0.data, &mut dpn)?;
            let dpn = Tensor::with_buf(&pn_in.shape, dpn);
            match &self.conv_skip {
                Some(m) => m.backward(be, p, c.effs.skip.as_ref().unwrap(), c.x_res.as_ref().unwrap(), &dpn, true, None, grads)?.unwrap(),
                None => dpn,
            }
        } else {
            be.mp_silu_backward_acc(&c.x_main.data, &da0.data, &mut dx_main.data)?;
            dx_main
        };
        // 1. resample
        let s = &c.x_in_shape;
        let sx = Nhwc { n: s[0], h: s[1], w: s[2], c: s[3] };
        let dx = match self.resample {
            Resample::Keep => dxr,
            Resample::Down => {
                let mut d = be.zeros(sx.numel())?;
                be.downsample2_backward(&dxr.data, sx, &mut d)?;
                Tensor::with_buf(s, d)
            }
            Resample::Up => {
                let mut d = be.zeros(sx.numel())?;
                be.upsample2_backward(&dxr.data, sx, &mut d)?;
                Tensor::with_buf(s, d)
            }
        };
        Ok((dx, EmbGrad { ds, eff: c.effs.emb }))
    }
}

/// What [`Block::backward_leaving_emb`] leaves to its caller: the gradient w.r.t. the
/// block's `emb_linear` output and that layer's effective weight.
pub struct EmbGrad<B: Backend> {
    pub ds: Tensor<B::Buf>,
    pub eff: B::Eff,
}
