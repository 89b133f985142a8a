//! [`Backend`] on the CPU: every op is the CPU kernel of the same name, so the network
//! description computes exactly what it computed before it was generic (bit for bit).
//! Nothing here fails: the `Result`s are always `Ok`.

use super::{attention, conv, ops};
use crate::backend::{Backend, ConvGeom, Nhwc};
use crate::error::Result;
use crate::nn::params::{ParamId, Params};

/// The CPU backend (rayon threads, fp32, the reference), or — made with
/// [`Cpu::with_bf16_products`] — its bf16 mode: the products of the convolutions and of
/// the attention in bf16 with fp32 accumulation ([`super::bf16`]), everything else fp32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu {
    bf16: bool,
}

/// The fp32 CPU backend as a value: `&Cpu` reads as it did when `Cpu` was a unit struct
/// (a braced struct leaves the value namespace free for this constant).
#[allow(non_upper_case_globals)]
pub const Cpu: Cpu = Cpu { bf16: false };

impl Cpu {
    /// The bf16 mode, or why this machine cannot run it (no AVX512-BF16, or the AVX-512
    /// path is switched off by `EDM2_CPU_ISA`).
    pub fn with_bf16_products() -> std::result::Result<Cpu, String> {
        if super::bf16::available() {
            Ok(Cpu { bf16: true })
        } else {
            Err(format!(
                "--precision bf16 on the CPU needs AVX512-BF16 (vdpbf16ps) and the avx512 kernel path; this CPU ({}) runs the {} path without it",
                super::simd::cpu_model(),
                super::simd::isa().name()
            ))
        }
    }

    /// A note for the user where the bf16 mode will not pay on this processor: its
    /// measured bf16 dot rate (`vdpbf16ps`) under 1.2x its fp32 FMA rate (the bf16 mode's
    /// conversions cost ~10% of a step, so below that it is no faster). Measured on the
    /// worker threads in about 0.1 s. None where it pays or cannot run. Seen on a 2-core
    /// AVX-512 Xeon without AMX (2026-12-07): 0.49x, the bf16 mode 1.5x slower than fp32.
    pub fn bf16_slower_note() -> Option<String> {
        if super::amx::available() {
            // The convolutions run on the tiles (`amx`), several times the FMA rate.
            return None;
        }
        let bf = super::simd::bf16_dot_peak_gflops(0.03)?;
        let f = super::simd::fma_peak_gflops(0.03)?;
        (bf < 1.2 * f).then(|| {
            format!(
                "note: this processor runs bf16 dot products (vdpbf16ps) at {bf:.0} GFLOP/s against {f:.0} GFLOP/s of fp32 FMAs ({:.2}x, measured just now): --precision bf16 will be {} fp32 here",
                bf / f,
                if bf < f { "slower than" } else { "no faster than" }
            )
        })
    }

    /// The backend for a precision: fp32, or bf16 where [`Cpu::with_bf16_products`] allows.
    pub fn for_precision(p: crate::backend::Precision) -> std::result::Result<Cpu, String> {
        match p {
            crate::backend::Precision::Fp32 => Ok(Cpu),
            crate::backend::Precision::Bf16 => Cpu::with_bf16_products(),
        }
    }

    /// True in the bf16 mode.
    pub fn bf16_products(&self) -> bool {
        self.bf16
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Params = Params;
    type Eff = conv::EffWeight;
    type Attn = attention::AttnCache;
    type Mask = Vec<bool>;

    fn alloc(&self, n: usize) -> Result<Vec<f32>> {
        Ok(super::zeroed(n))
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(super::zeroed(n))
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn download(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(b.clone())
    }
    fn copy(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(b.clone())
    }

    fn zero_grads(&self, p: &Params) -> Result<Params> {
        Ok(Params { values: p.values.iter().map(|v| vec![0.0; v.len()]).collect() })
    }
    fn force_normalize(&self, p: &mut Params, id: ParamId, row_len: usize) -> Result<()> {
        ops::normalize_rows_inplace(&mut p.values[id], row_len);
        Ok(())
    }

    fn effective(&self, p: &Params, id: ParamId, geom: ConvGeom, gain: Option<ParamId>) -> Result<conv::EffWeight> {
        let gain = gain.map_or(1.0, |g| p.scalar(g));
        let mut eff = conv::effective_weight(&p.values[id], geom.out_ch, geom.in_ch, geom.k, gain);
        if self.bf16 {
            conv::add_bf16_products(&mut eff);
        }
        Ok(eff)
    }
    fn conv_forward(&self, eff: &conv::EffWeight, x: &Vec<f32>, s: Nhwc, y: &mut Vec<f32>) -> Result<()> {
        conv::conv_forward(eff, x, s.n, s.h, s.w, y);
        Ok(())
    }
    fn conv_backward(
        &self,
        p: &Params,
        id: ParamId,
        eff: &conv::EffWeight,
        x: &Vec<f32>,
        s: Nhwc,
        dy: &Vec<f32>,
        dx: Option<&mut Vec<f32>>,
        gain: Option<ParamId>,
        g: &mut Params,
    ) -> Result<()> {
        let numel = eff.out_ch * eff.fan_in();
        let mut d_eff = vec![0.0f32; numel];
        conv::conv_backward(eff, x, s.n, s.h, s.w, dy, dx.map(|d| d.as_mut_slice()), &mut d_eff);
        let mut dw = vec![0.0f32; numel];
        let dgain = conv::effective_weight_backward(&p.values[id], eff, &d_eff, &mut dw);
        for (gv, d) in g.values[id].iter_mut().zip(&dw) {
            *gv += d;
        }
        if let Some(gid) = gain {
            g.values[gid][0] += dgain;
        }
        Ok(())
    }

    fn mp_silu(&self, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        ops::mp_silu(x, y);
        Ok(())
    }
    fn mp_silu_backward(&self, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) -> Result<()> {
        ops::mp_silu_backward(x, dy, dx);
        Ok(())
    }
    fn mp_silu_backward_acc(&self, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) -> Result<()> {
        ops::mp_silu_backward_acc(x, dy, dx);
        Ok(())
    }
    fn axpby(&self, a: &mut Vec<f32>, b: &Vec<f32>, wa: f32, wb: f32) -> Result<()> {
        ops::axpby(a, b, wa, wb);
        Ok(())
    }
    fn add(&self, a: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        ops::add_inplace(a, b);
        Ok(())
    }
    fn scale(&self, a: &mut Vec<f32>, k: f32) -> Result<()> {
        ops::scale_inplace(a, k);
        Ok(())
    }
    fn scaled(&self, a: &Vec<f32>, k: f32) -> Result<Vec<f32>> {
        Ok(ops::scaled(a, k))
    }
    fn add_scalar(&self, a: &mut Vec<f32>, v: f32) -> Result<()> {
        a.iter_mut().for_each(|x| *x += v);
        Ok(())
    }
    fn normalize_rows(&self, x: &Vec<f32>, k: usize, y: &mut Vec<f32>) -> Result<()> {
        ops::normalize_rows(x, k, y);
        Ok(())
    }
    fn normalize_rows_backward(&self, x: &Vec<f32>, k: usize, dy: &Vec<f32>, dx: &mut Vec<f32>) -> Result<()> {
        ops::normalize_rows_backward(x, k, dy, dx);
        Ok(())
    }
    fn downsample2(&self, x: &Vec<f32>, s: Nhwc, y: &mut Vec<f32>) -> Result<()> {
        ops::downsample2(x, s.n, s.h, s.w, s.c, y);
        Ok(())
    }
    fn downsample2_backward(&self, dy: &Vec<f32>, s: Nhwc, dx: &mut Vec<f32>) -> Result<()> {
        ops::downsample2_backward(dy, s.n, s.h, s.w, s.c, dx);
        Ok(())
    }
    fn upsample2(&self, x: &Vec<f32>, s: Nhwc, y: &mut Vec<f32>) -> Result<()> {
        ops::upsample2(x, s.n, s.h, s.w, s.c, y);
        Ok(())
    }
    fn upsample2_backward(&self, dy: &Vec<f32>, s: Nhwc, dx: &mut Vec<f32>) -> Result<()> {
        ops::upsample2_backward(dy, s.n, s.h, s.w, s.c, dx);
        Ok(())
    }
    fn modulate_silu(&self, h: &Vec<f32>, s: &Vec<f32>, c: usize, pixels: usize, y: &mut Vec<f32>) -> Result<()> {
        ops::modulate_silu(h, s, c, pixels, y);
        Ok(())
    }
    fn modulate_silu_backward(
        &self,
        h: &Vec<f32>,
        s: &Vec<f32>,
        dy: &Vec<f32>,
        c: usize,
        pixels: usize,
        dh: &mut Vec<f32>,
        ds: &mut Vec<f32>,
    ) -> Result<()> {
        ops::modulate_silu_backward(h, s, dy, c, pixels, dh, ds);
        Ok(())
    }
    fn dropout(&self, x: &mut Vec<f32>, p: f32, seed: u64) -> Result<()> {
        ops::dropout_inplace(x, p, seed);
        Ok(())
    }
    fn clip(&self, x: &mut Vec<f32>, limit: f32) -> Result<Option<Vec<bool>>> {
        // The mask is only built when something is clipped, which is rare.
        let any = ops::any_abs_above(x, limit);
        let mask = any.then(|| x.iter().map(|v| v.abs() > limit).collect::<Vec<bool>>());
        ops::clip_inplace(x, limit);
        Ok(mask)
    }
    fn clip_backward(&self, dy: &mut Vec<f32>, mask: &Vec<bool>) -> Result<()> {
        for (g, &m) in dy.iter_mut().zip(mask) {
            if m {
                *g = 0.0;
            }
        }
        Ok(())
    }
    fn attention_forward(&self, qkv: &Vec<f32>, n: usize, p: usize, c: usize, heads: usize, y: &mut Vec<f32>) -> Result<attention::AttnCache> {
        Ok(attention::attention_forward_in(self.bf16, qkv, n, p, c, heads, y))
    }
    fn attention_backward(
        &self,
        qkv: &Vec<f32>,
        cache: &attention::AttnCache,
        _y: &Vec<f32>,
        dy: &Vec<f32>,
        n: usize,
        p: usize,
        c: usize,
        heads: usize,
        dqkv: &mut Vec<f32>,
    ) -> Result<()> {
        attention::attention_backward_in(self.bf16, qkv, cache, dy, n, p, c, heads, dqkv);
        Ok(())
    }
    fn mp_cat(&self, a: &Vec<f32>, na: usize, b: &Vec<f32>, nb: usize, t: f32, out: &mut Vec<f32>) -> Result<()> {
        ops::mp_cat(a, na, b, nb, t, out);
        Ok(())
    }
    fn mp_cat_backward(&self, dout: &Vec<f32>, na: usize, nb: usize, t: f32, da: &mut Vec<f32>, db: &mut Vec<f32>) -> Result<()> {
        ops::mp_cat_backward(dout, na, nb, t, da, db);
        Ok(())
    }
    fn mp_fourier(&self, x: &[f32], p: &Params, freqs: ParamId, phases: ParamId) -> Result<Vec<f32>> {
        Ok(ops::mp_fourier(x, &p.values[freqs], &p.values[phases]))
    }
    fn scale_images(&self, x: &mut Vec<f32>, k: &[f32]) -> Result<()> {
        let per = x.len() / k.len().max(1);
        for (b, &kb) in k.iter().enumerate() {
            x[b * per..(b + 1) * per].iter_mut().for_each(|v| *v *= kb);
        }
        Ok(())
    }
    fn precond_input(&self, x: &Vec<f32>, c_in: &[f32], ch: usize, out: &mut Vec<f32>) -> Result<()> {
        let pixels = x.len() / ch / c_in.len().max(1);
        for (b, &c) in c_in.iter().enumerate() {
            for px in 0..pixels {
                let (src, dst) = ((b * pixels + px) * ch, (b * pixels + px) * (ch + 1));
                for k in 0..ch {
                    out[dst + k] = c * x[src + k];
                }
                out[dst + ch] = 1.0;
            }
        }
        Ok(())
    }
    fn precond_output(&self, x: &Vec<f32>, f: &Vec<f32>, c_skip: &[f32], c_out: &[f32], d: &mut Vec<f32>) -> Result<()> {
        let per = x.len() / c_skip.len().max(1);
        for b in 0..c_skip.len() {
            for i in b * per..(b + 1) * per {
                d[i] = c_skip[b] * x[i] + c_out[b] * f[i];
            }
        }
        Ok(())
    }
}
