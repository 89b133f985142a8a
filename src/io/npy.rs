//! `.npy` (version 1.0, little-endian float32, C order): the format of latents and raw
//! samples. Reading lives with the datasets (`data::decode::decode_npy`).

use crate::error::Result;
use std::path::Path;

/// The bytes of a float32 `.npy` file of the given shape (header padded to 64 bytes).
pub fn serialize(x: &[f32], shape: &[usize]) -> Vec<u8> {
    let dims = shape.iter().map(|d| format!("{d},")).collect::<String>();
    let dims = if shape.len() == 1 { dims } else { dims.trim_end_matches(',').replace(',', ", ") };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut buf = b"\x93NUMPY\x01\x00".to_vec();
    buf.extend_from_slice(&(header.len() as u16).to_le_bytes());
    buf.extend_from_slice(header.as_bytes());
    x.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
    buf
}

/// Writes a float32 `.npy` file atomically.
pub fn write(path: &Path, x: &[f32], shape: &[usize]) -> Result<()> {
    super::write_atomic(path, &serialize(x, shape))
}
