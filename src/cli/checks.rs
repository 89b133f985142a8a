//! Argument checks made before any work: a bad number or an unwritable output path is
//! reported at once, naming the flag, instead of after minutes of sampling.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// `v` must be finite (and, with `min`, at least that).
pub fn finite(flag: &str, v: f64, min: Option<f64>) -> Result<f64> {
    if !v.is_finite() {
        bail!("--{flag} {v} must be a finite number");
    }
    if let Some(m) = min {
        if v < m {
            bail!("--{flag} {v} must be at least {m}");
        }
    }
    Ok(v)
}

/// Creates a temporary file in `dir` and removes it: the only sure test that files can be
/// written there (permissions, read-only mounts, a full disk's inode table).
fn probe(flag: &str, dir: &Path) -> Result<()> {
    let p = dir.join(format!(".edm2-write-test{}", std::process::id()));
    std::fs::write(&p, b"").with_context(|| format!("--{flag}: cannot write in {}", dir.display()))?;
    let _ = std::fs::remove_file(&p);
    Ok(())
}

/// An output directory: created if missing; an existing non-directory or an unwritable
/// place is an error naming the flag.
pub fn output_dir(flag: &str, dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--{flag} {}: exists and is not a directory", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("--{flag}: cannot create the directory {}", dir.display()))?;
    probe(flag, dir)
}

/// An output file: not a directory, and its folder exists and is writable (outputs are
/// written atomically through a temporary file beside it).
pub fn output_file(flag: &str, file: &Path) -> Result<()> {
    if file.is_dir() {
        bail!("--{flag} {}: is a directory; give a file name", file.display());
    }
    if file.file_name().is_none() {
        bail!("--{flag} {}: not a file name", file.display());
    }
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("--{flag} {}: the folder {} does not exist", file.display(), dir.display());
    }
    probe(flag, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_outputs_are_named() {
        let d = std::env::temp_dir().join(format!("edm2-checks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("file");
        std::fs::write(&f, b"x").unwrap();
        let e = output_dir("outdir", &f).unwrap_err().to_string();
        assert!(e.contains("--outdir") && e.contains("not a directory"), "{e}");
        assert!(output_dir("outdir", &d.join("new/sub")).is_ok() && d.join("new/sub").is_dir());
        assert!(output_file("grid", &d).unwrap_err().to_string().contains("is a directory"));
        let e = output_file("grid", &d.join("missing/g.png")).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(output_file("grid", &d.join("g.png")).is_ok());
        assert!(finite("guidance", f64::NAN, None).is_err() && finite("S_noise", -1.0, Some(0.0)).is_err());
        assert_eq!(finite("S_noise", 1.5, Some(0.0)).unwrap(), 1.5);
        let _ = std::fs::remove_dir_all(&d);
    }
}
