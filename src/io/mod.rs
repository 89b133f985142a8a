//! File formats: safetensors (weights, inputs and outputs of `denoise`, snapshots), and
//! the atomic write every output file goes through.

pub mod image;
pub mod npy;
pub mod safetensors;

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Writes atomically: a temporary file in the same directory, fsync, then rename, so a
/// crash never leaves a truncated file under the final name.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let io = |e| Error::Io { path: path.into(), err: e };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let fname = path.file_name().ok_or_else(|| Error::Input(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp{}", fname.to_string_lossy(), std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

