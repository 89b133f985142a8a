//! The training data stream, produced ahead of compute on its own thread.
//!
//! Everything random is a pure function of the run's seed and the global image index
//! `g` (= images seen before this one), so a resumed run sees exactly the batches an
//! uninterrupted one would — whatever `--batch-gpu` is:
//! - order: epoch `e = g / N` is a Fisher–Yates shuffle by `Rng::new(mix(seed ^ ORDER, e))`
//!   (the official `InfiniteSampler` likewise keys its shuffle on (seed, epoch));
//! - the loss's noise level and noise (DESIGN.md §2): `Rng::new(mix(seed ^ NOISE, g))` draws
//!   `ln σ ~ N(P_mean, P_std²)` first, then the C·H·W standard normals (HWC order);
//! - latents' `mean + std·n`: `Rng::new(mix(seed ^ LATENT, g))`.

use super::Dataset;
use crate::error::{Error, Result};
use crate::rng::{mix, Rng};
use crate::tensor::Tensor;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

const ORDER: u64 = 0x0DE2_0DE2_0DE2_0DE2;
const NOISE: u64 = 0x5EED_0F_5160_0000;
const LATENT: u64 = 0x1A7E_1A7E_1A7E_1A7E;

/// One forward/backward pass worth of training examples.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Global index of the first image (images seen before it).
    pub start: u64,
    /// Clean images y, NHWC.
    pub images: Tensor,
    /// y + σ·n, NHWC.
    pub noisy: Tensor,
    pub sigma: Vec<f32>,
    /// One-hot classes `[N, label_dim]` when conditional.
    pub labels: Option<Tensor>,
}

/// What the stream needs to know besides the dataset.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub seed: u64,
    pub batch: usize,
    /// 0: unconditional (labels not used even if the dataset has them).
    pub label_dim: usize,
    pub p_mean: f64,
    pub p_std: f64,
}

/// The shuffled order of epoch `e`.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..len as u32).collect();
    let mut rng = Rng::new(mix(seed ^ ORDER, epoch));
    for i in (1..len).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Builds the pass that starts at global index `start` (pure function: used by the
/// loader thread and directly by tests).
pub fn make_batch(ds: &Dataset, o: &StreamOptions, start: u64, order_cache: &mut Option<(u64, Vec<u32>)>) -> Result<Batch> {
    let (c, r) = (ds.net_channels(), ds.resolution);
    let per = c * r * r;
    let n = o.batch;
    let len = ds.len() as u64;
    let mut images = vec![0.0f32; n * per];
    let mut noisy = vec![0.0f32; n * per];
    let mut sigma = vec![0.0f32; n];
    let mut labels = (o.label_dim > 0).then(|| Tensor::zeros(&[n, o.label_dim]));
    for k in 0..n {
        let g = start + k as u64;
        let epoch = g / len;
        if order_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            *order_cache = Some((epoch, epoch_order(ds.len(), o.seed, epoch)));
        }
        let item = order_cache.as_ref().unwrap().1[(g % len) as usize] as usize;
        let y = ds.encoded(item, mix(o.seed ^ LATENT, g))?;
        let mut rng = Rng::new(mix(o.seed ^ NOISE, g));
        let s = (rng.normal() * o.p_std + o.p_mean).exp() as f32;
        sigma[k] = s;
        for (j, &v) in y.iter().enumerate() {
            noisy[k * per + j] = v + s * rng.normal() as f32;
        }
        images[k * per..(k + 1) * per].copy_from_slice(&y);
        if let Some(l) = labels.as_mut() {
            let cls = ds.label(item).unwrap_or(0) as usize;
            if cls >= o.label_dim {
                return Err(Error::Data(format!("{}: class {cls} ≥ the network's label_dim {}", ds.item_name(item), o.label_dim)));
            }
            l.data[k * o.label_dim + cls] = 1.0;
        }
    }
    Ok(Batch {
        start,
        images: Tensor::from_vec(&[n, r, r, c], images),
        noisy: Tensor::from_vec(&[n, r, r, c], noisy),
        sigma,
        labels,
    })
}

/// Passes from `start` on, `batch` images each, prepared `depth` passes ahead on a thread.
/// A rank of a data-parallel run takes every `world`-th pass from the `rank`-th on
/// ([`Loader::start_rank`]): the passes one process would run, dealt out in turn.
pub struct Loader {
    rx: Receiver<Result<Batch>>,
    _thread: std::thread::JoinHandle<()>,
}

impl Loader {
    pub fn start(ds: Arc<Dataset>, o: StreamOptions, start: u64, depth: usize) -> Loader {
        Loader::start_rank(ds, o, start, depth, 0, 1)
    }

    /// The passes of rank `rank` of `world`: those starting at `start + (rank + k·world)·batch`.
    pub fn start_rank(ds: Arc<Dataset>, o: StreamOptions, start: u64, depth: usize, rank: usize, world: usize) -> Loader {
        let (tx, rx) = sync_channel(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("edm2-loader".into())
            .spawn(move || {
                let mut cache = None;
                let mut g = start + (rank * o.batch) as u64;
                loop {
                    let b = make_batch(&ds, &o, g, &mut cache);
                    let failed = b.is_err();
                    if tx.send(b).is_err() || failed {
                        return; // the trainer is gone, or the error is delivered
                    }
                    g += (world.max(1) * o.batch) as u64;
                }
            })
            .expect("spawning the loader thread");
        Loader { rx, _thread: thread }
    }

    /// The next pass (blocks until it is ready).
    pub fn next(&self) -> Result<Batch> {
        self.rx.recv().map_err(|_| Error::Data("the data loader stopped unexpectedly".into()))?
    }
}
