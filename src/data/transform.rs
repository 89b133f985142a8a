//! The official dataset tool's crop/resize transforms (`dataset_tool.py convert
//! --transform=... --resolution=WxH`), bit-exact, so that `edm2 encode` makes from raw
//! ImageNet the same pixels the official pipeline feeds its VAE.
//!
//! The tool resizes with Pillow (`Image.resize`), whose 8-bit path is a two-pass separable
//! resampling in fixed point: per output pixel a window of input pixels weighted by a
//! filter stretched by the scale factor, the weights normalized to sum 1, rounded to
//! integers with 22 fractional bits, summed in 32-bit integers from a half-unit start and
//! clipped to 0..=255; the horizontal pass first, then the vertical one on its 8-bit result.
//! [`resize`] follows that arithmetic step by step (the filters in f64 in the same order
//! of operations) and is checked against Pillow's output in `tests/transform.rs`.
//!
//! Images here are planar (CHW, u8), as [`super::RawItem::U8`] stores them: every channel
//! is resampled on its own with the same weights, which is what Pillow's interleaved
//! loops compute too.

use crate::error::{Error, Result};

/// Pillow's resampling filters that the official transforms use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BOX`: the mean over the pixels a target pixel covers.
    Box,
    /// `Image.BICUBIC`: Keys' cubic convolution with a = -0.5.
    Bicubic,
    /// `Image.LANCZOS`: sinc windowed by sinc(x/3), support 3.
    Lanczos,
}

impl Filter {
    /// Half-width of the filter at scale 1, in input pixels.
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Fractional bits of the fixed-point weights: 32 bits less 8 for the value and 2 for
/// sums that overshoot (negative lobes make partial sums leave 0..1).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The weights of one pass: for output index `o`, input indices `start[o]..start[o] +
/// count[o]` weighted by `k[o * ksize ..]`, in fixed point.
struct Weights {
    start: Vec<usize>,
    count: Vec<usize>,
    ksize: usize,
    k: Vec<i32>,
}

/// The weights resampling `in_size` samples to `out_size` (Pillow's coefficient
/// computation for the whole input, box = 0..in_size).
fn weights(in_size: usize, out_size: usize, filter: Filter) -> Weights {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv = 1.0 / filterscale;
    let mut w = Weights { start: Vec::with_capacity(out_size), count: Vec::with_capacity(out_size), ksize, k: vec![0; out_size * ksize] };
    let mut row = vec![0f64; ksize];
    for o in 0..out_size {
        let center = (o as f64 + 0.5) * scale;
        // Truncation toward zero, as C's (int) cast: the window's rounded ends.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64).max(lo as i64) as usize;
        let n = (hi - lo).min(ksize);
        let mut total = 0.0;
        for (x, r) in row.iter_mut().enumerate().take(n) {
            let v = filter.weight(((x + lo) as f64 - center + 0.5) * inv);
            *r = v;
            total += v;
        }
        for (x, &r) in row.iter().enumerate().take(n) {
            let v = if total != 0.0 { r / total } else { r };
            let scaled = v * (1u32 << PRECISION_BITS) as f64;
            w.k[o * ksize + x] = if v < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
        }
        w.start.push(lo);
        w.count.push(n);
    }
    w
}

/// A weighted sum in fixed point back to 8 bits, clipped.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resamples a planar u8 image `c`x`h`x`w` to `c`x`out_h`x`out_w` as Pillow's
/// `Image.resize((out_w, out_h), filter)` does (same size: a copy).
pub fn resize(px: &[u8], c: usize, h: usize, w: usize, out_w: usize, out_h: usize, filter: Filter) -> Vec<u8> {
    assert_eq!(px.len(), c * h * w, "resize: pixel count does not match {c}x{h}x{w}");
    let half = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass (only when the width changes), over the rows the vertical pass reads.
    let vert = (out_h != h).then(|| weights(h, out_h, filter));
    let (row0, row1) = match &vert {
        Some(v) => (v.start[0], v.start[out_h - 1] + v.count[out_h - 1]),
        None => (0, h),
    };
    let (tmp, tw, th, off) = if out_w != w {
        let hw = weights(w, out_w, filter);
        let rows = row1 - row0;
        let mut t = vec![0u8; c * rows * out_w];
        for ch in 0..c {
            for y in 0..rows {
                let src = &px[(ch * h + row0 + y) * w..][..w];
                let dst = &mut t[(ch * rows + y) * out_w..][..out_w];
                for (o, d) in dst.iter_mut().enumerate() {
                    let k = &hw.k[o * hw.ksize..][..hw.count[o]];
                    let s = &src[hw.start[o]..][..hw.count[o]];
                    let acc = s.iter().zip(k).fold(half, |a, (&p, &q)| a.wrapping_add(p as i32 * q));
                    *d = clip8(acc);
                }
            }
        }
        (std::borrow::Cow::Owned(t), out_w, rows, row0)
    } else {
        (std::borrow::Cow::Borrowed(px), w, h, 0)
    };
    let Some(v) = vert else {
        return tmp.into_owned();
    };
    let mut out = vec![0u8; c * out_h * tw];
    let mut acc = vec![0i32; tw];
    for ch in 0..c {
        let plane = &tmp[ch * th * tw..][..th * tw];
        for o in 0..out_h {
            acc.fill(half);
            let k = &v.k[o * v.ksize..][..v.count[o]];
            for (j, &q) in k.iter().enumerate() {
                let src = &plane[(v.start[o] - off + j) * tw..][..tw];
                for (a, &p) in acc.iter_mut().zip(src) {
                    *a = a.wrapping_add(p as i32 * q);
                }
            }
            for (d, &a) in out[(ch * out_h + o) * tw..][..tw].iter_mut().zip(&acc) {
                *d = clip8(a);
            }
        }
    }
    out
}

/// The rectangle `y0..y0+ch`, `x0..x0+cw` of a planar image.
fn crop(px: &[u8], c: usize, h: usize, w: usize, y0: usize, x0: usize, ch: usize, cw: usize) -> Vec<u8> {
    debug_assert!(y0 + ch <= h && x0 + cw <= w);
    let mut out = Vec::with_capacity(c * ch * cw);
    for p in 0..c {
        for y in y0..y0 + ch {
            out.extend_from_slice(&px[(p * h + y) * w + x0..][..cw]);
        }
    }
    out
}

/// `--transform` of the official dataset tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transform {
    /// The largest centered square, resized to the resolution (Lanczos).
    #[value(name = "center-crop")]
    CenterCrop,
    /// A centered band of the resolution's aspect, resized (Lanczos) and placed in the
    /// middle of a black square of side W; images narrower than W or shorter than the band
    /// are skipped.
    #[value(name = "center-crop-wide")]
    CenterCropWide,
    /// ADM's ImageNet crop (Dhariwal & Nichol), the one EDM2's ImageNet-512 data uses:
    /// halve with a box filter while the short side is at least twice the resolution,
    /// resize the short side to it (bicubic), take the centered square.
    #[value(name = "center-crop-dhariwal")]
    CenterCropDhariwal,
}

/// Python's `round` (ties to even) of a non-negative value, as an index.
fn round_half_even(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

/// The official tool's transform of one planar image (`c`x`h`x`w`) to `(out_w, out_h)`:
/// `None` as transform with a resolution scales to it (Lanczos; unchanged when equal);
/// neither leaves the image as it is. → `Ok(None)` where the tool skips the image
/// (center-crop-wide on an image too small), else `(pixels, height, width)`.
pub fn apply(
    transform: Option<Transform>,
    resolution: Option<(usize, usize)>,
    px: &[u8],
    c: usize,
    h: usize,
    w: usize,
) -> Result<Option<(Vec<u8>, usize, usize)>> {
    let need = |t: &str| Error::Data(format!("--transform {t} needs --resolution WxH"));
    Ok(Some(match (transform, resolution) {
        (None, None) => (px.to_vec(), h, w),
        (None, Some((ow, oh))) => {
            if (ow, oh) == (w, h) {
                (px.to_vec(), h, w)
            } else {
                (resize(px, c, h, w, ow, oh, Filter::Lanczos), oh, ow)
            }
        }
        (Some(Transform::CenterCrop), r) => {
            let (ow, oh) = r.ok_or_else(|| need("center-crop"))?;
            let s = h.min(w);
            let sq = crop(px, c, h, w, (h - s) / 2, (w - s) / 2, s, s);
            (resize(&sq, c, s, s, ow, oh, Filter::Lanczos), oh, ow)
        }
        (Some(Transform::CenterCropWide), r) => {
            let (ow, oh) = r.ok_or_else(|| need("center-crop-wide"))?;
            if oh > ow {
                return Err(Error::Data(format!("--transform center-crop-wide needs a resolution no taller than wide, not {ow}x{oh}")));
            }
            // int(np.round(width * h / w)): the band's height at the target aspect.
            let band = round_half_even(ow as f64 * h as f64 / w as f64);
            if w < ow || band < oh {
                return Ok(None);
            }
            let band = band.min(h);
            let strip = crop(px, c, h, w, (h - band) / 2, 0, band, w);
            let img = resize(&strip, c, band, w, ow, oh, Filter::Lanczos);
            // A black canvas of side ow with the band in its middle rows.
            let mut canvas = vec![0u8; c * ow * ow];
            let top = (ow - oh) / 2;
            for p in 0..c {
                for y in 0..oh {
                    canvas[(p * ow + top + y) * ow..][..ow].copy_from_slice(&img[(p * oh + y) * ow..][..ow]);
                }
            }
            (canvas, ow, ow)
        }
        (Some(Transform::CenterCropDhariwal), r) => {
            let (ow, oh) = r.ok_or_else(|| need("center-crop-dhariwal"))?;
            if ow != oh {
                return Err(Error::Data(format!("--transform center-crop-dhariwal needs a square --resolution, not {ow}x{oh}")));
            }
            let size = ow;
            let (mut img, mut ih, mut iw) = (std::borrow::Cow::Borrowed(px), h, w);
            while ih.min(iw) >= 2 * size {
                let (nw, nh) = (iw / 2, ih / 2);
                img = std::borrow::Cow::Owned(resize(&img, c, ih, iw, nw, nh, Filter::Box));
                (ih, iw) = (nh, nw);
            }
            let scale = size as f64 / ih.min(iw) as f64;
            let (nw, nh) = (round_half_even(iw as f64 * scale), round_half_even(ih as f64 * scale));
            if nw < size || nh < size {
                return Err(Error::Data(format!("center-crop-dhariwal: {iw}x{ih} scaled to {nw}x{nh}, smaller than {size}")));
            }
            let img = if (nw, nh) == (iw, ih) { img.into_owned() } else { resize(&img, c, ih, iw, nw, nh, Filter::Bicubic) };
            (crop(&img, c, nh, nw, (nh - size) / 2, (nw - size) / 2, size, size), size, size)
        }
    }))
}

/// `WxH` (the official `--resolution` syntax) → (W, H).
pub fn parse_resolution(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("'{s}': expected WxH with positive integers, e.g. 512x512");
    let (a, b) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (w, h) = (a.trim().parse::<usize>().map_err(|_| bad())?, b.trim().parse::<usize>().map_err(|_| bad())?);
    if w == 0 || h == 0 || w > super::decode::MAX_SIDE || h > super::decode::MAX_SIDE {
        return Err(format!("'{s}': sides must be 1..={}", super::decode::MAX_SIDE));
    }
    Ok((w, h))
}
