//! One optimizer step of training, written once for every backend (issue 20, item 0).
//!
//! A step: force-normalize the weights (paper Eq. 47), then per pass of `batch_gpu`
//! images forward, the EDM2 loss (Eq. 21, times the loss scaling) and backward adding
//! into the step's gradients; then Adam with non-finite gradient entries zeroed, the EMA
//! updates, and one read of the step's totals. What differs between backends — where the
//! batch lives, the loss kernel, the optimizer and averaging kernels, how totals are kept
//! — is [`StepOps`]; the order of the work is [`train_step`]'s. A data-parallel
//! all-reduce belongs between the passes and Adam, here, once.

use super::adam::{adam_update, AdamHyper};
use super::loss::edm2_loss;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::data::loader::{Batch, Loader};
use crate::dist::Collective;
use crate::error::Result;
use crate::nn::params::{ParamSpec, Params};
use crate::nn::{Mode, Precond};
use crate::tensor::Tensor;
use std::time::Instant;

/// The mutable training state a step updates, wherever it lives (host or device).
pub struct StateRefs<'a, B: Backend> {
    pub params: &'a mut B::Params,
    /// Adam's first and second moments.
    pub m: &'a mut B::Params,
    pub v: &'a mut B::Params,
    /// Every tracked average, in [`super::ema::EmaSet::averages`] order.
    pub emas: Vec<&'a mut B::Params>,
}

/// What a step needs to know besides the state and the data.
pub struct StepPlan {
    /// Passes of `batch_gpu` images (gradient accumulation).
    pub passes: usize,
    /// The run's seed (dropout masks are drawn from it and the pass's first image).
    pub seed: u64,
    pub sigma_data: f32,
    /// Loss scaling times batch_gpu / batch: each pass's share of the step's mean loss.
    pub loss_scale: f32,
    pub adam: AdamHyper,
    /// The lerp weight `1 − β` of each average after this step ([`super::ema::EmaSet::weights`]).
    pub ema_weights: Vec<f32>,
}

/// What one optimizer step reports.
#[derive(Clone, Copy, Debug)]
pub struct StepOut {
    /// Sum of the per-image losses over the batch.
    pub loss_sum: f64,
    /// Non-finite gradient entries (zeroed before Adam).
    pub nonfinite: usize,
    /// Entries of the weights or moments the update left non-finite: the run diverged,
    /// and nothing of this step may be saved.
    pub diverged: usize,
    /// Seconds in the passes (forward, loss, backward) and the final wait for the device;
    /// waiting for the data loader is not counted.
    pub fwd_bwd: f64,
}

/// Where a step's passes come from: the training run's [`Loader`], or one batch again and
/// again ([`SameBatch`], for benchmarks).
pub trait Passes {
    /// The next pass (blocks until it is ready).
    fn next_pass(&self) -> Result<Batch>;
}

impl Passes for Loader {
    fn next_pass(&self) -> Result<Batch> {
        self.next()
    }
}

/// Every pass is this batch (a benchmark's fixed inputs).
pub struct SameBatch(pub Batch);

impl Passes for SameBatch {
    fn next_pass(&self) -> Result<Batch> {
        Ok(self.0.clone())
    }
}

/// One pass's data on a backend.
pub struct StepBatch<B: StepOps> {
    pub x: Tensor<B::Buf>,
    pub images: B::Images,
    pub labels: Option<Tensor<B::Buf>>,
    /// σ per image and the index of the first image (the dropout seed).
    pub sigma: Vec<f32>,
    pub start: u64,
}

/// The training-step operations beyond the network that each backend provides.
pub trait StepOps: Backend {
    /// The clean images of a pass, as the loss reads them.
    type Images;
    /// The step's running totals: loss sum, non-finite gradient entries, non-finite entries
    /// after the update. Read once, by [`StepOps::read_totals`].
    type Totals;

    /// Moves a loader batch to the backend (on a device: queued behind the work before it).
    fn upload_batch(&self, b: Batch) -> Result<StepBatch<Self>>
    where
        Self: Sized;
    fn new_totals(&self) -> Result<Self::Totals>;
    /// The loss of a pass: adds its per-image sums to the totals and returns dL/dD and
    /// dL/dlogvar, both times `scale`.
    #[allow(clippy::too_many_arguments)]
    fn loss(
        &self,
        d: &Tensor<Self::Buf>,
        logvar: &Self::Buf,
        images: &Self::Images,
        sigma: &[f32],
        sigma_data: f32,
        scale: f32,
        totals: &mut Self::Totals,
    ) -> Result<(Tensor<Self::Buf>, Self::Buf)>;
    /// Adam on every parameter (buffers untouched), non-finite gradient entries counted
    /// and zeroed first; the counts go into the totals.
    #[allow(clippy::too_many_arguments)]
    fn adam(
        &self,
        specs: &[ParamSpec],
        params: &mut Self::Params,
        grads: &mut Self::Params,
        m: &mut Self::Params,
        v: &mut Self::Params,
        h: &AdamHyper,
        totals: &mut Self::Totals,
    ) -> Result<()>;
    /// `e ← lerp(e, params, w)` for every average with its weight; buffers equal the net's.
    fn ema_update(&self, specs: &[ParamSpec], emas: Vec<&mut Self::Params>, params: &Self::Params, weights: &[f32]) -> Result<()>;
    /// Waits for the step and returns [loss sum, non-finite gradient entries, diverged entries].
    fn read_totals(&self, totals: Self::Totals) -> Result<[f64; 3]>;
    /// Every gradient ← its sum over the ranks of a data-parallel run.
    fn sum_over_ranks(&self, grads: &mut Self::Params, comm: &dyn Collective) -> Result<()>;
}

/// One optimizer step on `be`: `plan.passes` passes from `loader`, the gradients summed
/// over the ranks of `comm`, Adam, the EMAs. The caller advances the images seen and
/// Adam's step count (the plan holds the new ones). Every rank ends the step with the
/// same state and the same totals.
pub fn train_step<B: StepOps>(be: &B, net: &Precond, s: StateRefs<'_, B>, loader: &dyn Passes, plan: &StepPlan, comm: &dyn Collective) -> Result<StepOut> {
    let StateRefs { params, m, v, emas } = s;
    net.force_normalize_on(be, params)?;
    // The step's gradients: every pass adds into them (backward_into), the gains' too.
    let mut grads = be.zero_grads(params)?;
    let mut totals = be.new_totals()?;
    let mut fwd_bwd = 0.0f64;
    // The next pass's batch is moved to the backend while the work queued before it runs
    // (on a device: the weight normalization, or the previous pass's backward).
    let mut next = Some(be.upload_batch(loader.next_pass()?)?);
    for pass in 0..plan.passes {
        let b = next.take().expect("uploaded before the pass");
        let t = Instant::now();
        let mode = Mode::train(super::run::dropout_seed(plan.seed, b.start));
        let out = net.forward_on(be, params, &b.x, &b.sigma, b.labels.as_ref(), &mode, false)?;
        let (dd, dlogvar) = be.loss(&out.d, &out.logvar, &b.images, &b.sigma, plan.sigma_data, plan.loss_scale, &mut totals)?;
        net.backward_into(be, params, out.cache.expect("training forward records"), &dd, &dlogvar, &mode, &mut grads)?;
        fwd_bwd += t.elapsed().as_secs_f64();
        if pass + 1 < plan.passes {
            next = Some(be.upload_batch(loader.next_pass()?)?);
        }
    }
    // Each pass's loss was scaled by its share of the global batch: the sum over ranks is
    // the one-process gradient (up to summation order).
    if comm.world() > 1 {
        be.sum_over_ranks(&mut grads, comm)?;
    }
    be.adam(&net.specs, params, &mut grads, m, v, &plan.adam, &mut totals)?;
    // Queued before the read-back: after a diverged update nothing of this step is saved,
    // so the EMAs need not wait for the check.
    be.ema_update(&net.specs, emas, params, &plan.ema_weights)?;
    let t = Instant::now();
    let [mut loss_sum, nonfinite, diverged] = be.read_totals(totals)?;
    fwd_bwd += t.elapsed().as_secs_f64();
    // The non-finite counts are the same on every rank (the same summed gradients).
    if comm.world() > 1 {
        let mut l = [loss_sum];
        comm.sum_f64(&mut l)?;
        loss_sum = l[0];
    }
    Ok(StepOut { loss_sum, nonfinite: nonfinite as usize, diverged: diverged as usize, fwd_bwd })
}

/// The host's totals: [loss sum, non-finite gradient entries, diverged entries].
pub struct HostTotals([f64; 3]);

impl StepOps for Cpu {
    type Images = Tensor;
    type Totals = HostTotals;

    fn upload_batch(&self, b: Batch) -> Result<StepBatch<Cpu>> {
        Ok(StepBatch { x: b.noisy, images: b.images, labels: b.labels, sigma: b.sigma, start: b.start })
    }
    fn new_totals(&self) -> Result<HostTotals> {
        Ok(HostTotals([0.0; 3]))
    }
    fn loss(
        &self,
        d: &Tensor,
        logvar: &Vec<f32>,
        images: &Tensor,
        sigma: &[f32],
        sigma_data: f32,
        scale: f32,
        totals: &mut HostTotals,
    ) -> Result<(Tensor, Vec<f32>)> {
        let mut l = edm2_loss(d, logvar, images, sigma, sigma_data);
        // edm2_loss divides by the pass size; the step's loss is the sum over the whole
        // batch divided by the batch, times the loss scaling (official `loss_scaling`).
        if scale != 1.0 {
            crate::backend::cpu::ops::scale_inplace(&mut l.dd.data, scale);
            l.dlogvar.iter_mut().for_each(|v| *v *= scale);
        }
        totals.0[0] += l.per_sample.iter().sum::<f64>();
        Ok((l.dd, l.dlogvar))
    }
    fn adam(
        &self,
        specs: &[ParamSpec],
        params: &mut Params,
        grads: &mut Params,
        m: &mut Params,
        v: &mut Params,
        h: &AdamHyper,
        totals: &mut HostTotals,
    ) -> Result<()> {
        totals.0[1] += super::adam::Adam::sanitize(grads) as f64;
        totals.0[2] += adam_update(specs, params, grads, m, v, h) as f64;
        Ok(())
    }
    fn ema_update(&self, specs: &[ParamSpec], emas: Vec<&mut Params>, params: &Params, weights: &[f32]) -> Result<()> {
        for (e, &w) in emas.into_iter().zip(weights) {
            super::ema::lerp_params(specs, e, params, w);
        }
        Ok(())
    }
    fn read_totals(&self, totals: HostTotals) -> Result<[f64; 3]> {
        Ok(totals.0)
    }
    fn sum_over_ranks(&self, grads: &mut Params, comm: &dyn Collective) -> Result<()> {
        for g in grads.values.iter_mut() {
            comm.sum_f32(g)?;
        }
        Ok(())
    }
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
mod device {
    use super::{AdamHyper, StepBatch, StepOps};
    use crate::dist::Collective;
    use crate::backend::gpu::{kernels as k, multi_tensor as mt, Gpu, GpuAct, GpuBuf, GpuParams};
    use crate::data::loader::Batch;
    use crate::error::Result;
    use crate::nn::params::{ParamKind, ParamSpec};
    use crate::tensor::Tensor;

    /// The device's totals: f64[3] as [`k::step_totals`] keeps them, and Adam's two u32
    /// counters (folded in at the read).
    pub struct DeviceTotals {
        sums: GpuBuf<f64>,
        counts: Option<GpuBuf<u32>>,
    }

    impl StepOps for Gpu {
        type Images = GpuBuf<f32>;
        type Totals = DeviceTotals;

        fn upload_batch(&self, b: Batch) -> Result<StepBatch<Gpu>> {
            let x = Tensor::with_buf(&b.noisy.shape, self.upload_input(&b.noisy.data)?);
            let images = self.upload(&b.images.data)?;
            let labels = b.labels.as_ref().map(|l| self.upload_act(&l.data).map(|d| Tensor::with_buf(&l.shape, d))).transpose()?;
            Ok(StepBatch { x, images, labels, sigma: b.sigma, start: b.start })
        }
        fn new_totals(&self) -> Result<DeviceTotals> {
            Ok(DeviceTotals { sums: self.alloc_zeros::<f64>(3)?, counts: None })
        }
        fn loss(
            &self,
            d: &Tensor<GpuAct>,
            logvar: &GpuAct,
            images: &GpuBuf<f32>,
            sigma: &[f32],
            sigma_data: f32,
            scale: f32,
            totals: &mut DeviceTotals,
        ) -> Result<(Tensor<GpuAct>, GpuAct)> {
            let k::GpuLoss { per_sample, dd, dlogvar } = k::edm2_loss(self, &d.data, images, logvar, sigma, sigma_data, scale)?;
            k::step_totals(self, Some(&per_sample), None, &mut totals.sums)?;
            Ok((Tensor::with_buf(&d.shape, dd), dlogvar))
        }
        /// Every parameter, the gains included, in one launch.
        fn adam(
            &self,
            specs: &[ParamSpec],
            params: &mut GpuParams,
            grads: &mut GpuParams,
            m: &mut GpuParams,
            v: &mut GpuParams,
            h: &AdamHyper,
            totals: &mut DeviceTotals,
        ) -> Result<()> {
            let mut count = self.alloc_zeros::<u32>(2)?;
            let tensors = params
                .values
                .iter_mut()
                .zip(&grads.values)
                .zip(m.values.iter_mut().zip(v.values.iter_mut()))
                .zip(specs)
                .filter(|(_, s)| s.kind == ParamKind::Param)
                .map(|(((p, g), (m, v)), _)| mt::AdamTensor { p, g, m, v })
                .collect();
            mt::adam(self, tensors, h.lr, h.beta1, h.beta2, h.eps, h.t, &mut count, mt::CHUNK)?;
            totals.counts = Some(count);
            Ok(())
        }
        /// All averages in one launch. Buffers never change on the device (they are not
        /// trained), so the averages' copies stay equal without a copy.
        fn ema_update(&self, specs: &[ParamSpec], emas: Vec<&mut GpuParams>, params: &GpuParams, weights: &[f32]) -> Result<()> {
            let params = &params.values;
            let tensors = emas
                .into_iter()
                .zip(weights.iter().copied())
                .flat_map(|(e, w)| e.values.iter_mut().zip(params).zip(specs).map(move |((e, p), s)| (e, p, w, s.kind)))
                .filter(|t| t.3 != ParamKind::Buffer)
                .map(|(e, p, w, _)| (e, p, w))
                .collect();
            mt::ema_lerp(self, tensors, mt::CHUNK)
        }
        /// The one read-back of a step.
        fn read_totals(&self, mut totals: DeviceTotals) -> Result<[f64; 3]> {
            k::step_totals(self, None, totals.counts.as_ref(), &mut totals.sums)?;
            let t = self.download(&totals.sums)?;
            Ok([t[0], t[1], t[2]])
        }
        fn sum_over_ranks(&self, grads: &mut GpuParams, comm: &dyn Collective) -> Result<()> {
            comm.sum_device(self, &mut grads.values)
        }
    }
}

