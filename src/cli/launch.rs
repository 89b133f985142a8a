//! `edm2 train --nproc-per-node N`: N worker processes of this program on this machine,
//! started by Open MPI's `mpirun` (the engine of the CPU path, `edm2::dist`), and waited
//! for. The workers read their rank from mpirun's environment.
//!
//! Signals: mpirun ends the whole job on SIGINT/SIGTERM, without the checkpoint a Ctrl-C
//! promises. So mpirun runs in its own process group (the terminal's Ctrl-C reaches only
//! this launcher), and the launcher turns a first Ctrl-C or SIGTERM into SIGUSR1, which
//! mpirun forwards to every worker: each finishes the step, rank 0 writes the checkpoint.
//! A second one ends the job at once.
//!
//! On GPUs (`--device cuda`) the launcher starts the workers itself, as torchrun does: one
//! per device, with torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), NCCL as the engine. The workers
//! share a process group of their own and get the same SIGUSR1 on a first Ctrl-C; when one
//! of them fails, the launcher ends the others (they may be waiting for it inside NCCL)
//! and names it.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// SIGUSR1 on Linux (x86-64 and arm64).
pub const SIGUSR1: i32 = 10;
const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn geteuid() -> u32;
}

/// The command line without `--nproc-per-node N` / `--nproc-per-node=N`.
pub fn worker_args(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--nproc-per-node" {
            skip = true;
        } else if !s.starts_with("--nproc-per-node=") {
            out.push(a.clone());
        }
    }
    out
}

/// Starts `n` workers (this program, these arguments) under mpirun and returns when they
/// are done: Ok when all of them exited 0.
pub fn run_workers(n: usize, threads_given: bool) -> Result<()> {
    if !cfg!(feature = "mpi") {
        bail!(
            "--nproc-per-node {n}: this edm2 was built without MPI; build it with `cargo build --release --features mpi` \
             (Debian: apt-get install libopenmpi-dev openmpi-bin)"
        );
    }
    let exe = std::env::current_exe().context("finding this program's path for the workers")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mpirun = std::env::var_os("EDM2_MPIRUN").unwrap_or_else(|| "mpirun".into());
    let mut cmd = std::process::Command::new(&mpirun);
    cmd.arg("-np").arg(n.to_string()).args(["--oversubscribe", "--bind-to", "none"]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } == 0 {
        // Open MPI refuses root unless told (containers and CI run as root).
        cmd.arg("--allow-run-as-root");
    }
    // The cores shared out among the workers, unless the user chose a count.
    if !threads_given && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
        cmd.env("RAYON_NUM_THREADS", (cores / n).max(1).to_string()).args(["-x", "RAYON_NUM_THREADS"]);
    }
    cmd.arg(&exe).args(worker_args(&args));
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("--nproc-per-node {n} starts the workers with Open MPI's mpirun, which is not installed (Debian: apt-get install openmpi-bin)")
        }
        Err(e) => return Err(e).with_context(|| format!("starting {}", mpirun.to_string_lossy())),
    };
    static PID: AtomicI32 = AtomicI32::new(0);
    static ASKED: AtomicBool = AtomicBool::new(false);
    PID.store(child.id() as i32, Ordering::SeqCst);
    let _ = ctrlc::set_handler(|| {
        let pid = PID.load(Ordering::SeqCst);
        if ASKED.swap(true, Ordering::SeqCst) {
            eprintln!("\nSecond interrupt: ending the workers without a checkpoint.");
            // SAFETY: signals mpirun, our child.
            unsafe { kill(pid, SIGTERM) };
        } else {
            eprintln!("\nInterrupt: the workers finish this step and write a checkpoint (Ctrl-C again to quit now).");
            // SAFETY: as above; mpirun forwards SIGUSR1 to every worker.
            unsafe { kill(pid, SIGUSR1) };
        }
    });
    let status = child.wait().context("waiting for mpirun")?;
    if !status.success() {
        bail!("the {n} workers did not all finish: mpirun ended with {status} (the failing rank's error is above)");
    }
    Ok(())
}

/// Starts `n` workers (this program, these arguments) on this machine's first `n` CUDA
/// devices with torchrun's variables, and waits for them: Ok when all of them exited 0.
pub fn run_gpu_workers(n: usize) -> Result<()> {
    use std::os::unix::process::CommandExt;
    // (A build without a GPU backend never gets here: --device cuda is refused first.)
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    if let Some(seen) = edm2::backend::gpu::visible_devices() {
        if seen < n {
            bail!("--nproc-per-node {n} --device cuda: one worker per GPU, but this machine shows {seen} (CUDA_VISIBLE_DEVICES)");
        }
    }
    let exe = std::env::current_exe().context("finding this program's path for the workers")?;
    let args = worker_args(&std::env::args_os().skip(1).collect::<Vec<_>>());
    // A port free now (the user's MASTER_PORT if set); rank 0 listens on it.
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p,
        Err(_) => std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .context("finding a free port for the workers to meet on")?
            .port()
            .to_string(),
    };
    let mut children: Vec<(usize, std::process::Child)> = Vec::with_capacity(n);
    let mut group = 0;
    for rank in 0..n {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env("EDM2_LAUNCHER", "--nproc-per-node")
            .process_group(group);
        // An outer job of one (`srun -n1 edm2 train --nproc-per-node 8`) must not speak for
        // the workers.
        for var in ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"] {
            cmd.env_remove(var);
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                end_all(&mut children);
                return Err(e).with_context(|| format!("starting worker {rank} of {n}"));
            }
        };
        if group == 0 {
            group = child.id() as i32;
        }
        children.push((rank, child));
    }
    static GROUP: AtomicI32 = AtomicI32::new(0);
    static ASKED: AtomicBool = AtomicBool::new(false);
    GROUP.store(group, Ordering::SeqCst);
    let _ = ctrlc::set_handler(|| {
        let g = GROUP.load(Ordering::SeqCst);
        if ASKED.swap(true, Ordering::SeqCst) {
            eprintln!("\nSecond interrupt: ending the workers without a checkpoint.");
            // SAFETY: signals the workers' process group (a negative pid).
            unsafe { kill(-g, SIGTERM) };
        } else {
            eprintln!("\nInterrupt: the workers finish this step and write a checkpoint (Ctrl-C again to quit now).");
            // SAFETY: as above.
            unsafe { kill(-g, SIGUSR1) };
        }
    });
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = children.remove(i);
                    if !status.success() && failed.is_none() {
                        failed = Some((rank, status));
                    }
                }
                Ok(None) => i += 1,
                Err(e) => {
                    end_all(&mut children);
                    return Err(e).context("waiting for the workers");
                }
            }
        }
        if let Some((rank, status)) = failed {
            if !children.is_empty() {
                eprintln!("worker {rank} of {n} ended with {status}: ending the other workers");
                end_all(&mut children);
            }
            bail!("the {n} GPU workers did not all finish: rank {rank} ended with {status} (its error is above)");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}

/// Two SIGTERMs to every worker left (a worker takes the first as "stop after this step",
/// the second as "now"), SIGKILL to those still running 10 s later; waits for all.
fn end_all(children: &mut Vec<(usize, std::process::Child)>) {
    for round in 0..2 {
        if round == 1 {
            // Apart, so that the two are not merged into one pending signal.
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        for (_, c) in children.iter() {
            // SAFETY: signals our own child.
            unsafe { kill(c.id() as i32, SIGTERM) };
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None))) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            // SAFETY: as above.
            unsafe { kill(c.id() as i32, SIGKILL) };
        }
        let _ = c.wait();
    }
    children.clear();
}

#[cfg(test)]
mod tests {
    use super::worker_args;
    use std::ffi::OsString;

    #[test]
    fn the_workers_get_the_command_line_without_the_process_count() {
        let v = |s: &[&str]| s.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(worker_args(&v(&["train", "--nproc-per-node", "4", "--batch", "64"])), v(&["train", "--batch", "64"]));
        assert_eq!(worker_args(&v(&["--threads", "1", "train", "--nproc-per-node=2"])), v(&["--threads", "1", "train"]));
    }
}
