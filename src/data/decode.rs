//! Decoding one stored item: PNG and JPEG (8-bit, grayscale or RGB) and `.npy` float32
//! latents. Every failure names the file.
//!
//! What a header claims is checked before anything is allocated from it: against
//! [`MAX_SIDE`] and [`MAX_DECODED_BYTES`] for the first item of a dataset, and against the
//! dataset's geometry ([`Expect`]) for every later one, so a small file that claims a
//! huge image is an error that names it, never an allocation of the claimed size.

use super::{Encoding, RawItem};
use crate::error::{Error, Result};

/// Largest accepted image side. EDM2 trains at 512x512 at most (64x64 latents); 16384 is
/// well above any dataset and below the 65535 that JPEG headers can claim.
pub const MAX_SIDE: usize = 16384;
/// Largest accepted decoded item (pixels: 1 byte per sample, latents: 4). 256 MiB is a
/// 9k x 9k RGB image, many times a real item, and small enough to always be allocatable
/// while the decoders' own working buffers (a few times this at most) stay bounded too.
pub const MAX_DECODED_BYTES: usize = 256 << 20;
/// Largest stored item file read into memory: the decoded limit plus room for a PNG stored
/// uncompressed (a filter byte per row, deflate and chunk framing).
pub const MAX_ITEM_FILE_BYTES: u64 = (MAX_DECODED_BYTES as u64) * 5 / 4;
/// `.npy` headers are a short Python dict literal (numpy pads them to 64 bytes); numpy's
/// own reader refuses long ones too.
pub const MAX_NPY_HEADER: usize = 65536;

/// The geometry every item after a dataset's first must have (from the first item).
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub channels: usize,
    pub resolution: usize,
    pub encoding: Encoding,
    /// The first item's name, for the error message.
    pub first: &'a str,
}

fn bad(name: &str, m: impl std::fmt::Display) -> Error {
    Error::Data(format!("{name}: {m}"))
}

/// → (data CHW, C, H, W), bounded by the absolute limits only (a dataset's first item).
/// The format comes from the content, not the file name.
pub fn decode_item(bytes: &[u8], name: &str) -> Result<(RawItem, usize, usize, usize)> {
    decode_expecting(bytes, name, None)
}

/// [`decode_item`] for an item that must match `expect`: a header claiming another size,
/// channel count or encoding is refused before any pixel is decoded.
pub fn decode_expecting(bytes: &[u8], name: &str, expect: Option<&Expect>) -> Result<(RawItem, usize, usize, usize)> {
    if bytes.starts_with(b"\x89PNG") {
        decode_png(bytes, name, expect)
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        decode_jpeg(bytes, name, expect)
    } else if bytes.starts_with(b"\x93NUMPY") {
        decode_npy_expecting(bytes, name, expect)
    } else if bytes.is_empty() {
        Err(bad(name, "empty file"))
    } else {
        Err(bad(name, "not a PNG, JPEG or .npy file"))
    }
}

/// Checks what a header claims (C, H, W) before decoding.
fn check_claim(name: &str, what: &str, (c, h, w): (usize, usize, usize), encoding: Encoding, expect: Option<&Expect>) -> Result<()> {
    if c == 0 || h == 0 || w == 0 {
        return Err(bad(name, format!("{what} header claims an empty {c}x{h}x{w} (CxHxW) item")));
    }
    if let Some(e) = expect {
        if e.encoding != encoding {
            return Err(bad(name, format!("mixes images and latents: a {what} file, but the dataset's first item {} is not", e.first)));
        }
        if (c, h, w) != (e.channels, e.resolution, e.resolution) {
            return Err(bad(
                name,
                format!(
                    "{what} header claims {c}x{h}x{w} (CxHxW, {w}x{h} pixels), but the dataset's first item {} is {}x{}x{}; \
                     all items must have the same size and channels",
                    e.first, e.channels, e.resolution, e.resolution
                ),
            ));
        }
        return Ok(());
    }
    let sample = if encoding == Encoding::Latents { 4 } else { 1 };
    let bytes = (c as u128) * (h as u128) * (w as u128) * sample;
    if h > MAX_SIDE || w > MAX_SIDE || bytes > MAX_DECODED_BYTES as u128 {
        return Err(bad(
            name,
            format!(
                "{what} header claims {w}x{h} pixels (WxH) x {c} channels ({bytes} bytes decoded); the limit is {MAX_SIDE} per side \
                 and {} MiB per item",
                MAX_DECODED_BYTES >> 20
            ),
        ));
    }
    Ok(())
}

/// A zeroed buffer whose size came from a file: allocation failure is an error.
fn zeroed<T: Clone + Default>(name: &str, n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| bad(name, format!("cannot allocate {n} elements")))?;
    v.resize(n, T::default());
    Ok(v)
}

fn hwc_to_chw(name: &str, px: &[u8], c: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    let mut out = zeroed(name, px.len())?;
    for i in 0..h * w {
        for ch in 0..c {
            out[ch * h * w + i] = px[i * c + ch];
        }
    }
    Ok(out)
}

fn decode_png(bytes: &[u8], name: &str, expect: Option<&Expect>) -> Result<(RawItem, usize, usize, usize)> {
    // The limit covers the decoder's own buffers (metadata chunks, rows); ours is checked below.
    let mut dec = png::Decoder::new_with_limits(bytes, png::Limits { bytes: 64 << 20 });
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().map_err(|e| match (e, png_ihdr_dims(bytes)) {
        // A row of the claimed width is over the decoder's limit: say what was claimed.
        (png::DecodingError::LimitsExceeded, Some((w, h))) => bad(
            name,
            format!("PNG header claims {w}x{h} pixels (WxH); the limit is {MAX_SIDE} per side and {} MiB per item", MAX_DECODED_BYTES >> 20),
        ),
        (e, _) => bad(name, format!("corrupt PNG: {e}")),
    })?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    let c = match reader.output_color_type().0 {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        png::ColorType::GrayscaleAlpha => return Err(bad(name, "grayscale+alpha PNG; convert it to grayscale or RGB")),
        png::ColorType::Rgba => return Err(bad(name, "RGBA PNG (4 channels); convert it to RGB")),
        png::ColorType::Indexed => return Err(bad(name, "palette PNG could not be expanded")),
    };
    check_claim(name, "PNG", (c, h, w), Encoding::Pixels, expect)?;
    let need = reader.output_buffer_size();
    if need != w * h * c {
        return Err(bad(name, format!("PNG output of {need} bytes for {w}x{h}x{c}")));
    }
    let mut buf = zeroed(name, need)?;
    let info = reader.next_frame(&mut buf).map_err(|e| bad(name, format!("corrupt or truncated PNG: {e}")))?;
    if (info.width as usize, info.height as usize) != (w, h) {
        return Err(bad(name, format!("PNG frame is {}x{}, its header says {w}x{h}", info.width, info.height)));
    }
    Ok((RawItem::U8(hwc_to_chw(name, &buf, c, h, w)?), c, h, w))
}

/// Width and height from an IHDR chunk in its required place (right after the signature).
fn png_ihdr_dims(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let be = |r: std::ops::Range<usize>| Some(u32::from_be_bytes(bytes.get(r)?.try_into().ok()?));
    Some((be(16..20)?, be(20..24)?))
}

fn decode_jpeg(bytes: &[u8], name: &str, expect: Option<&Expect>) -> Result<(RawItem, usize, usize, usize)> {
    let mut dec = jpeg_decoder::Decoder::new(bytes);
    dec.read_info().map_err(|e| bad(name, format!("corrupt or truncated JPEG: {e}")))?;
    let info = dec.info().ok_or_else(|| bad(name, "JPEG without a frame"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let c = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => 1,
        jpeg_decoder::PixelFormat::RGB24 => 3,
        f => return Err(bad(name, format!("JPEG pixel format {f:?} is not supported (8-bit grayscale or RGB)"))),
    };
    check_claim(name, "JPEG", (c, h, w), Encoding::Pixels, expect)?;
    // Belt and braces: the decoder itself refuses a larger output.
    dec.set_max_decoding_buffer_size(MAX_DECODED_BYTES);
    let px = dec.decode().map_err(|e| bad(name, format!("corrupt or truncated JPEG: {e}")))?;
    if px.len() != w * h * c {
        return Err(bad(name, "truncated JPEG"));
    }
    Ok((RawItem::U8(hwc_to_chw(name, &px, c, h, w)?), c, h, w))
}

/// `.npy` version 1/2/3, little-endian float32, C order, 3 dimensions `[C, H, W]`.
pub fn decode_npy(bytes: &[u8], name: &str) -> Result<(RawItem, usize, usize, usize)> {
    decode_npy_expecting(bytes, name, None)
}

fn decode_npy_expecting(bytes: &[u8], name: &str, expect: Option<&Expect>) -> Result<(RawItem, usize, usize, usize)> {
    if bytes.len() < 10 {
        return Err(bad(name, "truncated .npy header"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
        v => return Err(bad(name, format!("unsupported .npy version {v}"))),
    };
    if hlen > MAX_NPY_HEADER {
        return Err(bad(name, format!(".npy header length {hlen} is over the limit of {MAX_NPY_HEADER} bytes")));
    }
    let header = bytes.get(start..start + hlen).ok_or_else(|| bad(name, format!("truncated .npy header ({hlen} bytes claimed)")))?;
    let header = String::from_utf8_lossy(header);
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        Some(header[at..].trim_start().strip_prefix(':')?.trim_start())
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
    let mut shape = Vec::new();
    for s in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        // A 3-d shape is all we take; stop before collecting a hostile list of dimensions.
        if shape.len() == 3 {
            return Err(bad(name, format!(".npy shape ({inner}); latents must be [C, H, W]")));
        }
        shape.push(s.parse::<usize>().map_err(|_| bad(name, format!("bad .npy shape ({inner})")))?);
    }
    if shape.len() != 3 {
        return Err(bad(name, format!(".npy shape {shape:?}; latents must be [C, H, W]")));
    }
    let (c, h, w) = (shape[0], shape[1], shape[2]);
    check_claim(name, ".npy", (c, h, w), Encoding::Latents, expect)?;
    let n = c * h * w; // bounded by check_claim (or equal to the expected size)
    let body = &bytes[start + hlen..];
    if body.len() != 4 * n {
        let what = if body.len() < 4 * n { "truncated" } else { "trailing data after" };
        return Err(bad(name, format!("{what} .npy data: {} bytes for shape {shape:?} ({} expected)", body.len(), 4 * n)));
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| bad(name, format!("cannot allocate {n} floats")))?;
    v.extend(body.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())));
    Ok((RawItem::F32(v), c, h, w))
}
