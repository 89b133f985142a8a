//! Which kernel runs each convolution: per direction and shape, the fastest of the
//! compiled variants, found by timing every applicable one once (as PyTorch's
//! `cudnn.benchmark` does) and kept for the rest of the process, so that every later call
//! of that shape runs the same kernel (deterministic afterwards).
//!
//! The variants ([`ConvAlgo`]): conv.cu's SIMT kernels (fp32 or bf16 activations) and, for
//! bf16 activations, the tensor-core kernels of conv_tc.cu / conv_tc_backward.cu — the
//! simple 64x64 tile (any shape) and the pipelined tiles of tc_pipe.cuh (channels aligned).
//!
//! `EDM2_CONV_ALGO` sets the policy ([`ConvPolicy`]):
//! - `tune` (the default on a GPU): time every applicable variant on the first call of a
//!   shape (one warm-up, then [`TUNE_REPS`] back-to-back launches between two events), keep
//!   the fastest (a variant that fails to launch is left out); the call's own result is then computed by that variant, so it does not
//!   depend on which ran last while timing.
//! - `heuristic` (the default in the simulator, where a time says nothing about a GPU): the
//!   tensor-core kernels with the tile `EDM2_CONV_TC_TILE` names (`auto`: chosen from the
//!   shape inside the kernel) — what ran before tuning existed.
//! - a variant's name (`simt`, `tc-simple`, `tc-128x128`, `tc-128x64`, `tc-64x64`,
//!   `tc-auto`): that variant wherever it applies; where it does not (a pipelined tile on
//!   channels that are not multiples of its K step, a tensor-core kernel on fp32
//!   activations), the heuristic's choice for the shape.
//!
//! `EDM2_TENSOR_CORE_CONV=0` keeps every convolution on the SIMT kernels, as before.
//! [`Gpu::conv_choices`] lists what ran for each shape (and the times, where tuned):
//! `bench --json` reports it as `conv_algos`.

use super::kernels::TcTile;
use super::Gpu;
use crate::backend::{ConvGeom, Nhwc};
use crate::error::{Error, Result};

/// Back-to-back launches per variant timed together when tuning (after one warm-up
/// launch): the host enqueues while the device runs, as in a step, so a variant's extra
/// small launches cost what they cost there.
pub const TUNE_REPS: usize = 3;

/// The direction of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvDir {
    Forward,
    /// The gradient with respect to the input.
    Data,
    /// The gradient with respect to the (effective) weight.
    Weight,
}

impl ConvDir {
    pub fn name(self) -> &'static str {
        match self {
            ConvDir::Forward => "forward",
            ConvDir::Data => "data",
            ConvDir::Weight => "weight",
        }
    }
}

/// A compiled convolution kernel (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvAlgo {
    Simt,
    TcSimple,
    TcAuto,
    Tc128x128,
    Tc128x64,
    Tc64x64,
}

impl ConvAlgo {
    pub const ALL: [ConvAlgo; 6] = [
        ConvAlgo::Simt,
        ConvAlgo::TcSimple,
        ConvAlgo::TcAuto,
        ConvAlgo::Tc128x128,
        ConvAlgo::Tc128x64,
        ConvAlgo::Tc64x64,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ConvAlgo::Simt => "simt",
            ConvAlgo::TcSimple => "tc-simple",
            ConvAlgo::TcAuto => "tc-auto",
            ConvAlgo::Tc128x128 => "tc-128x128",
            ConvAlgo::Tc128x64 => "tc-128x64",
            ConvAlgo::Tc64x64 => "tc-64x64",
        }
    }

    /// The tensor-core tile (None: the SIMT kernel).
    pub fn tile(self) -> Option<TcTile> {
        match self {
            ConvAlgo::Simt => None,
            ConvAlgo::TcSimple => Some(TcTile::Simple),
            ConvAlgo::TcAuto => Some(TcTile::Auto),
            ConvAlgo::Tc128x128 => Some(TcTile::T128x128),
            ConvAlgo::Tc128x64 => Some(TcTile::T128x64),
            ConvAlgo::Tc64x64 => Some(TcTile::T64x64),
        }
    }

    fn from_tile(t: TcTile) -> ConvAlgo {
        match t {
            TcTile::Simple => ConvAlgo::TcSimple,
            TcTile::Auto => ConvAlgo::TcAuto,
            TcTile::T128x128 => ConvAlgo::Tc128x128,
            TcTile::T128x64 => ConvAlgo::Tc128x64,
            TcTile::T64x64 => ConvAlgo::Tc64x64,
        }
    }

    /// Whether this is one of the pipelined tiles (which need aligned channels).
    fn pipelined(self) -> bool {
        !matches!(self, ConvAlgo::Simt | ConvAlgo::TcSimple)
    }
}

/// How the kernel of a convolution is chosen (`EDM2_CONV_ALGO`; module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPolicy {
    Tune,
    /// The tensor-core kernels with this tile (`EDM2_CONV_TC_TILE`).
    Heuristic(TcTile),
    Forced(ConvAlgo),
}

impl ConvPolicy {
    /// From `EDM2_CONV_ALGO` (and `EDM2_CONV_TC_TILE`); unset: tuning on a GPU, the
    /// heuristic in the simulator or where `EDM2_CONV_TC_TILE` names a tile. An unknown
    /// value is an error naming the variable and the accepted values.
    pub fn from_env() -> Result<ConvPolicy> {
        let tile = TcTile::from_env()?;
        let tile_set = std::env::var_os("EDM2_CONV_TC_TILE").is_some();
        match std::env::var_os("EDM2_CONV_ALGO") {
            None if tile_set || cfg!(not(feature = "cuda")) => Ok(ConvPolicy::Heuristic(tile)),
            None => Ok(ConvPolicy::Tune),
            Some(v) => ConvPolicy::parse(&v.to_string_lossy(), tile),
        }
    }

    /// A value of `EDM2_CONV_ALGO` (`tile`: the heuristic's, from `EDM2_CONV_TC_TILE`).
    pub fn parse(v: &str, tile: TcTile) -> Result<ConvPolicy> {
        match v {
            "tune" => Ok(ConvPolicy::Tune),
            "heuristic" => Ok(ConvPolicy::Heuristic(tile)),
            _ => ConvAlgo::ALL.into_iter().find(|a| a.name() == v).map(ConvPolicy::Forced).ok_or_else(|| {
                let names: Vec<_> = ConvAlgo::ALL.iter().map(|a| a.name()).collect();
                Error::Input(format!("EDM2_CONV_ALGO={v:?}: expected tune, heuristic or one of {}", names.join(", ")))
            }),
        }
    }

    pub fn name(self) -> String {
        match self {
            ConvPolicy::Tune => "tune".into(),
            ConvPolicy::Heuristic(t) => format!("heuristic ({})", t.name()),
            ConvPolicy::Forced(a) => a.name().into(),
        }
    }
}

/// One convolution shape in one direction (the activations' dtype is implied: fp32 ones
/// have only the SIMT kernel, so only bf16 shapes are ever tuned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvKey {
    pub dir: ConvDir,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub bf16: bool,
}

impl ConvKey {
    pub fn new(dir: ConvDir, geom: ConvGeom, s: Nhwc, bf16: bool) -> ConvKey {
        ConvKey { dir, n: s.n, h: s.h, w: s.w, cin: geom.in_ch, cout: geom.out_ch, k: geom.k, bf16 }
    }

    /// Multiply-adds of the convolution (the same in every direction).
    pub fn macs(&self) -> f64 {
        (self.n * self.h * self.w) as f64 * (self.cin * self.cout * self.k.max(1) * self.k.max(1)) as f64
    }
}

/// What ran for one shape: the variant, and each candidate's best time where it was tuned.
#[derive(Clone, Debug)]
pub struct ConvChoice {
    pub key: ConvKey,
    pub algo: ConvAlgo,
    /// (variant, mean ms of [`TUNE_REPS`] back-to-back launches); empty unless tuned.
    pub timings_ms: Vec<(ConvAlgo, f64)>,
}

/// The choices made so far, in the order the shapes were first seen.
#[derive(Default)]
pub(super) struct ConvChoices {
    order: Vec<ConvChoice>,
    index: std::collections::HashMap<ConvKey, usize>,
}

/// The variants that can run `key`: the SIMT kernel always; with tensor cores on and
/// bf16 activations, the simple tile and, where `pipe_ok`, the three pipelined tiles.
pub fn candidates(key: &ConvKey, tensor_cores: bool, pipe_ok: bool) -> Vec<ConvAlgo> {
    let mut c = vec![ConvAlgo::Simt];
    if tensor_cores && key.bf16 {
        c.push(ConvAlgo::TcSimple);
        if pipe_ok {
            c.extend([ConvAlgo::Tc128x128, ConvAlgo::Tc128x64, ConvAlgo::Tc64x64]);
        }
    }
    c
}

impl Gpu {
    /// The variant that runs convolution `key`, chosen by the policy among `cands` (from
    /// [`candidates`]; `pipe_ok` as given to it). Under [`ConvPolicy::Tune`] the first call
    /// of a shape runs `run` on every candidate (warm-up + timed launches): `run` must
    /// overwrite its output, and the caller then runs the returned variant once more for
    /// the result.
    pub(super) fn conv_algo(
        &self,
        key: ConvKey,
        cands: &[ConvAlgo],
        pipe_ok: bool,
        run: &mut dyn FnMut(ConvAlgo) -> Result<()>,
    ) -> Result<ConvAlgo> {
        let tc = cands.len() > 1;
        let cached = self.conv_choices.borrow().index.get(&key).map(|&i| self.conv_choices.borrow().order[i].algo);
        if let Some(a) = cached {
            // A pipelined tile kept for aligned buffers, now given a view that is not:
            // the simple tile for this call (what the tile function would fall back to).
            return Ok(if a.pipelined() && !pipe_ok { ConvAlgo::TcSimple } else { a });
        }
        let heuristic = |tile: TcTile| {
            let a = ConvAlgo::from_tile(tile);
            if !tc {
                ConvAlgo::Simt
            } else if a.pipelined() && !pipe_ok {
                ConvAlgo::TcSimple
            } else {
                a
            }
        };
        let mut timings_ms = Vec::new();
        let algo = match self.conv_policy() {
            ConvPolicy::Heuristic(tile) => heuristic(tile),
            ConvPolicy::Forced(a) => {
                let applies = if a == ConvAlgo::TcAuto { tc && pipe_ok } else { cands.contains(&a) };
                if applies {
                    a
                } else {
                    heuristic(TcTile::Auto)
                }
            }
            ConvPolicy::Tune if cands.len() == 1 => cands[0],
            ConvPolicy::Tune => {
                // A variant that cannot launch on this shape (e.g. a grid past the
                // hardware's limit) is left out; an error only if none can.
                let mut first_err = None;
                for &a in cands {
                    let timed = run(a).and_then(|()| self.time_ms(&mut || (0..TUNE_REPS).try_for_each(|_| run(a))));
                    match timed {
                        Ok(ms) => timings_ms.push((a, ms / TUNE_REPS as f64)),
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                // The first of equal times: the order of `cands` breaks ties.
                match timings_ms.iter().fold(None, |b: Option<(ConvAlgo, f64)>, &(a, t)| match b {
                    Some((_, bt)) if bt <= t => b,
                    _ => Some((a, t)),
                }) {
                    Some((a, _)) => a,
                    None => return Err(first_err.expect("a candidate ran or failed")),
                }
            }
        };
        let mut c = self.conv_choices.borrow_mut();
        let i = c.order.len();
        c.order.push(ConvChoice { key, algo, timings_ms });
        c.index.insert(key, i);
        Ok(algo)
    }

    /// The variant chosen for each convolution shape so far (first seen first).
    pub fn conv_choices(&self) -> Vec<ConvChoice> {
        self.conv_choices.borrow().order.clone()
    }

    /// How convolution kernels are chosen ([`ConvPolicy`]; `EDM2_CONV_ALGO` at open).
    pub fn conv_policy(&self) -> ConvPolicy {
        self.conv_policy.get()
    }

    /// Sets the policy and forgets the choices made so far.
    pub fn set_conv_policy(&self, p: ConvPolicy) {
        self.conv_policy.set(p);
        *self.conv_choices.borrow_mut() = ConvChoices::default();
    }
}
