//! Guarding a run directory: one `train` at a time (an advisory lock the kernel drops
//! when its holder dies, so a killed run never leaves a stale lock), partial files of
//! earlier runs cleared at start, and the newest *valid* training state found for resume
//! (a corrupt one is set aside under a new name, never deleted).

use super::state::{list_states, set_aside, TrainState};
use crate::error::{Error, Result};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the run directory.
pub const LOCK_NAME: &str = "train.lock";

/// Held for as long as a run writes to its directory; dropping it (or the process dying)
/// releases the lock. The file itself stays: its content names the last holder.
#[derive(Debug)]
pub struct RunDirLock {
    _file: std::fs::File,
    pub path: PathBuf,
    /// False where the filesystem has no `flock` (some network and FUSE filesystems):
    /// the run goes on unguarded, and says so.
    pub held: bool,
}

impl RunDirLock {
    /// Takes the run directory's lock without waiting; if another process holds it the
    /// error names that process (its pid, host and start time, as it wrote them).
    pub fn acquire(run_dir: &Path) -> Result<RunDirLock> {
        let path = run_dir.join(LOCK_NAME);
        let io = |e| Error::Io { path: path.clone(), err: e };
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::Run(format!(
                    "{} is in use by another edm2 train ({}); wait for it to finish, stop it, or use another --outdir",
                    run_dir.display(),
                    if holder.is_empty() { "a process that has not written its pid yet".to_string() } else { holder.to_string() }
                )));
            }
            // ENOLCK, ENOSYS, EOPNOTSUPP: a filesystem without locks (NFS without lockd,
            // Lustre without -o flock, some FUSE mounts) must not stop training.
            Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported || matches!(e.raw_os_error(), Some(37 | 38 | 95)) => {
                return Ok(RunDirLock { _file: f, path, held: false });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        f.set_len(0).map_err(io)?;
        f.rewind().map_err(io)?;
        write!(f, "pid {} on host '{host}', since unix time {since}", std::process::id()).and_then(|_| f.flush()).map_err(io)?;
        Ok(RunDirLock { _file: f, path, held: true })
    }
}

/// The writer's pid if `name` is a temporary file of [`crate::io::write_atomic`]:
/// `.{name}.tmp{pid}`.
fn partial_file_pid(name: &str) -> Option<u32> {
    let (base, pid) = name.strip_prefix('.')?.rsplit_once(".tmp")?;
    (!base.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.parse().ok()).flatten()
}

/// Whether process `pid` is alive (Linux: /proc; elsewhere assumed alive, so that
/// nothing another process may still be writing is removed).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") && Path::new("/proc/self").exists() {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Time since a directory entry was last modified (zero when unknown: kept).
fn age(ent: &std::fs::DirEntry) -> std::time::Duration {
    ent.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).unwrap_or_default()
}

/// Removes the temporary files that interrupted atomic writes (SIGKILL, a full disk)
/// left in `dir`: those whose writer process is gone (a live writer's file is mid-write,
/// e.g. another `generate` sharing the folder) and that are at least `min_age` old — a
/// folder shared across machines can hold a live writer's file whose pid means nothing
/// here; no writer keeps a temporary file for long. Returns the removed paths.
pub fn remove_partial_files(dir: &Path, min_age: std::time::Duration) -> Result<Vec<PathBuf>> {
    let io = |e, p: &Path| Error::Io { path: p.into(), err: e };
    let mut removed = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(|e| io(e, dir))? {
        let ent = ent.map_err(|e| io(e, dir))?;
        let is_file = ent.file_type().map(|t| t.is_file()).unwrap_or(false);
        match partial_file_pid(&ent.file_name().to_string_lossy()) {
            Some(pid) if is_file && !process_alive(pid) && age(&ent) >= min_age => {
                let p = ent.path();
                std::fs::remove_file(&p).map_err(|e| io(e, &p))?;
                removed.push(p);
            }
            _ => {}
        }
    }
    removed.sort();
    Ok(removed)
}

/// What [`newest_valid_state`] found.
pub struct Resume {
    /// The newest state that loads and holds only finite values, with its path.
    pub state: Option<(PathBuf, TrainState)>,
    /// Corrupt states set aside: (old path, new path, why).
    pub set_aside: Vec<(PathBuf, PathBuf, String)>,
}

/// The newest training state of `run_dir` that loads and holds finite values; newer ones
/// that are damaged (not a valid safetensors file, tensors that do not match its own
/// metadata, non-finite values) are renamed to `*.corrupt` (kept for inspection) with the
/// reason. Anything else is an error naming the file, never a rename: a state that cannot
/// be *read* (permissions, I/O), or a well-formed one this program cannot take (another
/// network or config schema, e.g. written by another version).
pub fn newest_valid_state(run_dir: &Path) -> Result<Resume> {
    let mut out = Resume { state: None, set_aside: Vec::new() };
    for path in list_states(run_dir)?.into_iter().rev() {
        let why = match TrainState::load(&path) {
            Err(e @ (Error::Malformed { .. } | Error::Dtype { .. })) => e.to_string(),
            Err(e) => {
                return Err(Error::Run(format!(
                    "cannot resume from {}: {e}\n(a well-formed training state this run cannot take: another network, or \
                     another edm2 version? Use another --outdir, or move the file away to resume from an older one)",
                    path.display()
                )))
            }
            Ok(st) => {
                let net = crate::nn::Precond::new(&st.config)?;
                match st.first_nonfinite(&net.specs) {
                    None => {
                        out.state = Some((path, st));
                        return Ok(out);
                    }
                    Some((name, i)) => format!("{}: tensor '{name}' holds a non-finite value at flat index {i}", path.display()),
                }
            }
        };
        let new = set_aside(&path)?;
        out.set_aside.push((path, new, why));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_file_names_are_those_of_write_atomic() {
        assert_eq!(partial_file_pid(".training-state-0000064.safetensors.tmp1234"), Some(1234));
        assert_eq!(partial_file_pid(".preview-0000001.png.tmp7"), Some(7));
        for keep in ["training-state-0000064.safetensors", ".tmp12", ".a.tmp", ".a.tmpx1", "a.tmp12", "log.txt", ".hidden", ".a.tmp99999999999"] {
            assert_eq!(partial_file_pid(keep), None, "{keep}");
        }
    }

    #[test]
    fn only_files_of_dead_writers_are_removed() {
        let d = std::env::temp_dir().join(format!("edm2-partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        // Our own pid is alive; a pid above the kernel's maximum (2^22) never is.
        let live = format!(".a.png.tmp{}", std::process::id());
        for f in [live.as_str(), ".b.png.tmp4194304", "c.png"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let removed = remove_partial_files(&d, std::time::Duration::ZERO).unwrap();
        // Too young for a min_age: kept.
        std::fs::write(d.join(".b.png.tmp4194304"), b"x").unwrap();
        assert!(remove_partial_files(&d, std::time::Duration::from_secs(3600)).unwrap().is_empty());
        if cfg!(target_os = "linux") {
            assert_eq!(removed, vec![d.join(".b.png.tmp4194304")]);
            assert!(d.join(&live).exists() && d.join("c.png").exists());
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
