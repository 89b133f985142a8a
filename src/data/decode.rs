//! Decoding one stored item: PNG and JPEG (8-bit, grayscale or RGB) and `.npy` float32
//! latents. Every failure names the file.

use super::RawItem;
use crate::error::{Error, Result};

fn bad(name: &str, m: impl std::fmt::Display) -> Error {
    Error::Data(format!("{name}: {m}"))
}

/// → (data CHW, C, H, W). The format comes from the content, not the file name.
pub fn decode_item(bytes: &[u8], name: &str) -> Result<(RawItem, usize, usize, usize)> {
    if bytes.starts_with(b"\x89PNG") {
        decode_png(bytes, name)
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        decode_jpeg(bytes, name)
    } else if bytes.starts_with(b"\x93NUMPY") {
        decode_npy(bytes, name)
    } else if bytes.is_empty() {
        Err(bad(name, "empty file"))
    } else {
        Err(bad(name, "not a PNG, JPEG or .npy file"))
    }
}

fn hwc_to_chw(px: &[u8], c: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; px.len()];
    for i in 0..h * w {
        for ch in 0..c {
            out[ch * h * w + i] = px[i * c + ch];
        }
    }
    out
}

fn decode_png(bytes: &[u8], name: &str) -> Result<(RawItem, usize, usize, usize)> {
    let mut dec = png::Decoder::new(bytes);
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().map_err(|e| bad(name, format!("corrupt PNG: {e}")))?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| bad(name, format!("corrupt or truncated PNG: {e}")))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let c = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        png::ColorType::GrayscaleAlpha => return Err(bad(name, "grayscale+alpha PNG; convert it to grayscale or RGB")),
        png::ColorType::Rgba => return Err(bad(name, "RGBA PNG (4 channels); convert it to RGB")),
        png::ColorType::Indexed => return Err(bad(name, "palette PNG could not be expanded")),
    };
    buf.truncate(w * h * c);
    Ok((RawItem::U8(hwc_to_chw(&buf, c, h, w)), c, h, w))
}

fn decode_jpeg(bytes: &[u8], name: &str) -> Result<(RawItem, usize, usize, usize)> {
    let mut dec = jpeg_decoder::Decoder::new(bytes);
    let px = dec.decode().map_err(|e| bad(name, format!("corrupt or truncated JPEG: {e}")))?;
    let info = dec.info().ok_or_else(|| bad(name, "JPEG without a frame"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let c = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => 1,
        jpeg_decoder::PixelFormat::RGB24 => 3,
        f => return Err(bad(name, format!("JPEG pixel format {f:?} is not supported (8-bit grayscale or RGB)"))),
    };
    if px.len() != w * h * c {
        return Err(bad(name, "truncated JPEG"));
    }
    Ok((RawItem::U8(hwc_to_chw(&px, c, h, w)), c, h, w))
}

/// `.npy` version 1/2/3, little-endian float32, C order, 3 dimensions `[C, H, W]`.
pub fn decode_npy(bytes: &[u8], name: &str) -> Result<(RawItem, usize, usize, usize)> {
    if bytes.len() < 10 {
        return Err(bad(name, "truncated .npy header"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
        v => return Err(bad(name, format!("unsupported .npy version {v}"))),
    };
    let header = bytes.get(start..start + hlen).ok_or_else(|| bad(name, "truncated .npy header"))?;
    let header = String::from_utf8_lossy(header);
    let field = |key: &str| -> Option<String> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest.to_string())
    };
    let descr = field("descr").unwrap_or_default();
    if !descr.starts_with("'<f4'") {
        return Err(bad(name, format!(".npy dtype {} is not little-endian float32 ('<f4')", descr.split(',').next().unwrap_or(""))));
    }
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err(bad(name, "Fortran-ordered .npy is not supported"));
    }
    let shape_s = field("shape").ok_or_else(|| bad(name, ".npy header has no shape"))?;
    let inner = shape_s.strip_prefix('(').and_then(|s| s.split_once(')')).map(|s| s.0).ok_or_else(|| bad(name, "bad .npy shape"))?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad(name, format!("bad .npy shape ({inner})"))))
        .collect::<Result<_>>()?;
    if shape.len() != 3 {
        return Err(bad(name, format!(".npy shape {shape:?}; latents must be [C, H, W]")));
    }
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|n| *n <= usize::MAX / 4);
    let n = n.ok_or_else(|| bad(name, format!(".npy shape {shape:?} is too large")))?;
    let body = &bytes[start + hlen..];
    if body.len() != 4 * n {
        let what = if body.len() < 4 * n { "truncated" } else { "trailing data after" };
        return Err(bad(name, format!("{what} .npy data: {} bytes for shape {shape:?} ({} expected)", body.len(), 4 * n)));
    }
    let v: Vec<f32> = body[..4 * n].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    Ok((RawItem::F32(v), shape[0], shape[1], shape[2]))
}
