//! Multi-tensor launches (`kernels/optim.cu`): Adam, the EMA lerp and gradient
//! accumulation over every tensor of a step in one launch each, instead of one launch per
//! tensor (EDM2-XS has ~200 parameter tensors: with two EMAs that was ~600 launches a
//! step for these three updates alone). The element updates are the per-tensor kernels'
//! own, so the results are the same bits (tested).

use super::{check, ffi, same_len, Gpu, GpuBuf};
use crate::error::{Error, Result};

/// Elements per chunk: the unit a block takes from the flat index space of all tensors.
/// Large enough that the binary search for a chunk's tensor costs nothing, small enough
/// that a few large weights still spread over every SM.
pub const CHUNK: usize = 1 << 15;

/// The table of one launch: `EDM2_MT_ROW` u64 per tensor (see `kernels/edm2.h`).
struct Table {
    rows: Vec<u64>,
    n_chunks: u64,
    chunk: usize,
}

impl Table {
    fn new(chunk: usize) -> Result<Table> {
        if chunk == 0 || chunk % 4 != 0 || i32::try_from(chunk).is_err() {
            return Err(Error::Input(format!("multi-tensor chunk {chunk}: a positive multiple of 4 below 2^31")));
        }
        Ok(Table { rows: Vec::new(), n_chunks: 0, chunk })
    }

    fn push(&mut self, operands: [u64; 4], len: usize, arg: f32) {
        let chunks = len.div_ceil(self.chunk) as u64;
        self.push_chunks(operands, len, arg.to_bits() as u64, chunks);
    }

    /// A tensor that owns `chunks` chunks of its own size (rows, for the row kernels).
    fn push_chunks(&mut self, operands: [u64; 4], len: usize, arg: u64, chunks: u64) {
        self.push_chunks_extra(operands, len, arg, chunks, &[]);
    }

    /// [`Table::push_chunks`] with operands in the slots from `EDM2_MT_EXTRA` on.
    fn push_chunks_extra(&mut self, operands: [u64; 4], len: usize, arg: u64, chunks: u64, extra: &[u64]) {
        let first = self.n_chunks;
        self.n_chunks += chunks;
        let mut row = [0u64; ffi::EDM2_MT_ROW as usize];
        row[..4].copy_from_slice(&operands);
        row[ffi::EDM2_MT_LEN as usize] = len as u64;
        row[ffi::EDM2_MT_ARG as usize] = arg;
        row[ffi::EDM2_MT_FIRST_CHUNK as usize] = first;
        row[ffi::EDM2_MT_EXTRA as usize..][..extra.len()].copy_from_slice(extra);
        self.rows.extend_from_slice(&row);
    }

    fn n_rows(&self) -> usize {
        self.rows.len() / ffi::EDM2_MT_ROW as usize
    }

    /// Uploads the table (asynchronously; the launch queued next waits for it) and calls
    /// `launch(rows, n_rows, n_chunks, chunk)`, or nothing when there is no element.
    fn launch(self, gpu: &Gpu, name: &'static str, launch: impl FnOnce(*const u64, i32, i64, i32) -> i32) -> Result<()> {
        if self.n_chunks == 0 {
            return Ok(());
        }
        let n_rows = i32::try_from(self.n_rows()).map_err(|_| Error::Input(format!("{name}: too many tensors")))?;
        let table = gpu.upload(&self.rows)?;
        check(name, launch(table.ptr(gpu) as *const u64, n_rows, self.n_chunks as i64, self.chunk as i32))
    }
}

fn addr<T: super::DeviceScalar>(p: *const T) -> u64 {
    p as usize as u64
}

/// One tensor of [`adam`]: the weight, its gradient and its two moments.
pub struct AdamTensor<'a> {
    pub p: &'a mut GpuBuf<f32>,
    pub g: &'a GpuBuf<f32>,
    pub m: &'a mut GpuBuf<f32>,
    pub v: &'a mut GpuBuf<f32>,
}

/// [`super::kernels::adam`] on every tensor of `tensors`, one launch: the same update,
/// the same non-finite counts (added to `nonfinite[0]`, `nonfinite[1]`).
#[allow(clippy::too_many_arguments)]
pub fn adam(
    gpu: &Gpu,
    tensors: Vec<AdamTensor>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    t: u64,
    nonfinite: &mut GpuBuf<u32>,
    chunk: usize,
) -> Result<()> {
    super::kernels::expect_len("adam_multi", "nonfinite", nonfinite.len(), 2)?;
    let mut table = Table::new(chunk)?;
    for AdamTensor { p, g, m, v } in tensors {
        for (name, l) in [("adam_multi g", g.len()), ("adam_multi m", m.len()), ("adam_multi v", v.len())] {
            same_len(name, p.len(), l)?;
        }
        let n = p.len();
        table.push([addr(p.ptr_mut(gpu)), addr(g.ptr(gpu)), addr(m.ptr_mut(gpu)), addr(v.ptr_mut(gpu))], n, 0.0);
    }
    let (step, bc2) = super::kernels::adam_coefficients(lr, beta1, beta2, t);
    let (s, counts) = (gpu.stream()?, nonfinite.ptr_mut(gpu));
    table.launch(gpu, "adam_multi", |rows, n_rows, n_chunks, chunk| unsafe {
        ffi::edm2_adam_multi_f32(rows, n_rows, n_chunks, chunk, beta1 as f32, beta2 as f32, bc2, eps as f32, step, counts, s)
    })
}

/// `e ← lerp(e, p, w)` for every `(e, p, w)` of `tensors` (several EMAs at once: each
/// tensor carries its own w), one launch; the same bits as [`super::kernels::ema_lerp`].
pub fn ema_lerp(gpu: &Gpu, tensors: Vec<(&mut GpuBuf<f32>, &GpuBuf<f32>, f32)>, chunk: usize) -> Result<()> {
    let mut table = Table::new(chunk)?;
    for (e, p, w) in tensors {
        same_len("ema_lerp_multi", e.len(), p.len())?;
        let n = e.len();
        table.push([addr(e.ptr_mut(gpu)), addr(p.ptr(gpu)), 0, 0], n, w);
    }
    let s = gpu.stream()?;
    table.launch(gpu, "ema_lerp_multi", |rows, n_rows, n_chunks, chunk| unsafe {
        ffi::edm2_ema_lerp_multi_f32(rows, n_rows, n_chunks, chunk, s)
    })
}

/// `a ← a + b` for every `(a, b)` of `tensors`, one launch (gradient accumulation).
pub fn add(gpu: &Gpu, tensors: Vec<(&mut GpuBuf<f32>, &GpuBuf<f32>)>, chunk: usize) -> Result<()> {
    let mut table = Table::new(chunk)?;
    for (a, b) in tensors {
        same_len("add_multi", a.len(), b.len())?;
        let n = a.len();
        table.push([addr(a.ptr_mut(gpu)), addr(b.ptr(gpu)), 0, 0], n, 0.0);
    }
    let s = gpu.stream()?;
    table.launch(gpu, "add_multi", |rows, n_rows, n_chunks, chunk| unsafe { ffi::edm2_add_multi_f32(rows, n_rows, n_chunks, chunk, s) })
}

/// Forced weight normalization (paper Eq. 47's `normalize`, in place) of every `(weight,
/// row length)` of `tensors` in one launch: the same bits as
/// [`super::kernels::normalize_rows_inplace`] per weight.
pub fn normalize_rows(gpu: &Gpu, tensors: Vec<(&mut GpuBuf<f32>, usize)>) -> Result<()> {
    let mut table = Table::new(4)?;
    for (w, k) in tensors {
        if k == 0 || w.len() % k != 0 || i32::try_from(k).is_err() {
            return Err(Error::Input(format!("normalize_rows_multi: {} values are not rows of {k}", w.len())));
        }
        let n = w.len();
        table.push_chunks([addr(w.ptr_mut(gpu)), 0, 0, 0], n, k as u64, (n / k) as u64);
    }
    let s = gpu.stream()?;
    table.launch(gpu, "normalize_rows_multi", |rows, n_rows, n_chunks, _| unsafe {
        ffi::edm2_normalize_rows_multi_f32(rows, n_rows, n_chunks, s)
    })
}

/// [`super::kernels::effective_weight`] of every `(weight, geometry, gain)` of `weights` in
/// one launch (paper Eq. 47; one block per output row of all of them): the same bits,
/// the bf16 operands included (the data gradient's only with `backward`: a pass whose
/// backward will run).
pub fn effective_weights(
    gpu: &Gpu,
    weights: Vec<(&GpuBuf<f32>, super::kernels::ConvGeom, super::kernels::Gain)>,
    backward: bool,
) -> Result<Vec<super::kernels::GpuEffWeight>> {
    let name = "effective_weight_multi";
    let mut table = Table::new(4)?;
    let mut out = Vec::with_capacity(weights.len());
    for (w, geom, gain) in weights {
        let (mut eff, gain_at) = super::kernels::effective_weight_buffers(gpu, name, w, geom, gain, backward)?;
        let (wb, wf) = eff.bf16_ptrs(gpu);
        let int = |v: usize| i32::try_from(v).map_err(|_| Error::Input(format!("{name}: {v} does not fit an int")));
        let (taps, in_ch, out_ch) = (int(geom.taps())? as u64, int(geom.in_ch)?, int(geom.out_ch)? as u64);
        let arg = taps | ((eff.gain.to_bits() as u64) << 32);
        let ops = [addr(w.ptr(gpu)), addr(eff.w.ptr_mut(gpu)), addr(eff.denom.ptr_mut(gpu)), addr(gain_at)];
        table.push_chunks_extra(ops, in_ch as usize, arg, out_ch, &[addr(wb), addr(wf), out_ch]);
        out.push(eff);
    }
    let s = gpu.stream()?;
    table.launch(gpu, name, |rows, n_rows, n_chunks, _| unsafe { ffi::edm2_effective_weight_multi_f32(rows, n_rows, n_chunks, s) })?;
    Ok(out)
}

/// One layer of [`effective_weight_backward`]: the stored weight `w`, the gradient `d_eff`
/// of its effective weight (OHWI), the gradient buffer `dw` (OIHW) and, for a learned gain,
/// the gain's device buffer and the per-row gain gradients to write.
pub struct EffBackward<'a> {
    pub w: &'a GpuBuf<f32>,
    pub geom: super::kernels::ConvGeom,
    /// The fixed gain the effective weight was made with (when `gain_at` is None).
    pub gain: f32,
    pub gain_at: Option<&'a GpuBuf<f32>>,
    pub d_eff: &'a GpuBuf<f32>,
    pub dw: &'a mut GpuBuf<f32>,
    pub row_dgain: Option<&'a mut GpuBuf<f32>>,
    pub accumulate: bool,
}

/// [`super::kernels::effective_weight_backward`] of every layer of `layers` in one launch
/// (one block per output row of all of them): the same bits.
pub fn effective_weight_backward(gpu: &Gpu, layers: Vec<EffBackward>) -> Result<()> {
    let name = "effective_weight_backward_multi";
    let mut table = Table::new(4)?;
    for l in layers {
        let g = l.geom;
        g.validate(name)?;
        let k = super::kernels::expect_len;
        k(name, "w", l.w.len(), g.numel())?;
        k(name, "d_eff", l.d_eff.len(), g.numel())?;
        k(name, "dw", l.dw.len(), g.numel())?;
        let rows = match l.row_dgain {
            Some(r) => {
                k(name, "row_dgain", r.len(), g.out_ch)?;
                addr(r.ptr_mut(gpu))
            }
            None => 0,
        };
        let gain_at = match l.gain_at {
            Some(b) => {
                k(name, "gain", b.len(), 1)?;
                addr(b.ptr(gpu))
            }
            None => 0,
        };
        let int = |v: usize| i32::try_from(v).map_err(|_| Error::Input(format!("{name}: {v} does not fit an int")));
        let (taps, in_ch, out_ch) = (int(g.taps())? as u64, int(g.in_ch)?, int(g.out_ch)? as u64);
        int(g.fan_in())?;
        let arg = taps | ((l.gain.to_bits() as u64) << 32);
        let ops = [addr(l.w.ptr(gpu)), addr(l.d_eff.ptr(gpu)), addr(l.dw.ptr_mut(gpu)), rows];
        table.push_chunks_extra(ops, in_ch as usize, arg, out_ch, &[gain_at, l.accumulate as u64]);
    }
    let s = gpu.stream()?;
    table.launch(gpu, name, |rows, n_rows, n_chunks, _| unsafe { ffi::edm2_effective_weight_backward_multi_f32(rows, n_rows, n_chunks, s) })
}

/// `out[0] +=` the sum of `x` for every `(x, out)` of `sums` in one launch: the same bits as
/// [`super::kernels::sum_add_into`] of each. Each `out` must appear once.
pub fn sum_add(gpu: &Gpu, sums: Vec<(&GpuBuf<f32>, &mut GpuBuf<f32>)>) -> Result<()> {
    let name = "sum_add_multi";
    let mut table = Table::new(4)?;
    for (x, out) in sums {
        super::kernels::expect_len(name, "out", out.len(), 1)?;
        // One chunk per vector: its block walks all of it.
        table.push_chunks([addr(x.ptr(gpu)), addr(out.ptr_mut(gpu)), 0, 0], x.len(), 0, 1);
    }
    let s = gpu.stream()?;
    table.launch(gpu, name, |rows, n_rows, _, _| unsafe { ffi::edm2_sum_add_multi_f32(rows, n_rows, s) })
}
