//! Writing images: samples → 8-bit pixels (DESIGN.md §5: `clip(x·127.5 + 128, 0, 255)`,
//! truncated), PNG files and grids (atomic writes).

use crate::error::{Error, Result};
use std::path::Path;

/// One NCHW sample (C·H·W values) → 8-bit pixels in HWC order.
pub fn to_pixels(x: &[f32], c: usize, h: usize, w: usize) -> Vec<u8> {
    let mut px = vec![0u8; c * h * w];
    for ch in 0..c {
        for i in 0..h * w {
            px[i * c + ch] = (x[ch * h * w + i] * 127.5 + 128.0).clamp(0.0, 255.0) as u8;
        }
    }
    px
}

/// An 8-bit grayscale (c = 1) or RGB (c = 3) PNG, HWC pixels.
pub fn write_png(path: &Path, px: &[u8], c: usize, h: usize, w: usize) -> Result<()> {
    let color = match c {
        1 => png::ColorType::Grayscale,
        3 => png::ColorType::Rgb,
        _ => return Err(Error::Input(format!("{}: cannot write {c}-channel pixels as PNG", path.display()))),
    };
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, w as u32, h as u32);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let enc_err = |e: png::EncodingError| Error::Input(format!("{}: PNG encoding failed: {e}", path.display()));
        enc.write_header().map_err(enc_err)?.write_image_data(px).map_err(enc_err)?;
    }
    super::write_atomic(path, &buf)
}

/// Tiles equally sized square HWC images (side `r`, `c` channels) into a near-square
/// grid, row by row → (pixels, height, width).
pub fn grid(images: &[Vec<u8>], c: usize, r: usize) -> (Vec<u8>, usize, usize) {
    let cols = (images.len() as f64).sqrt().ceil().max(1.0) as usize;
    let rows = images.len().div_ceil(cols);
    let (gw, gh) = (cols * r, rows * r);
    let mut g = vec![0u8; gw * gh * c];
    for (k, px) in images.iter().enumerate() {
        let (gy, gx) = (k / cols * r, k % cols * r);
        for y in 0..r {
            let dst = ((gy + y) * gw + gx) * c;
            g[dst..dst + r * c].copy_from_slice(&px[y * r * c..(y + 1) * r * c]);
        }
    }
    (g, gh, gw)
}
