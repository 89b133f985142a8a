//! The process group of a data-parallel run (issue 20): which rank this process is, and the
//! few collective operations training needs — the sum of the step's gradients and loss
//! over ranks, the stop vote, rank 0's choices broadcast, the start-up roll call.
//!
//! One process per device. On CPUs the engine is MPI (Open MPI through the `mpi` crate,
//! cargo feature `mpi`): `edm2 train --nproc-per-node N` starts N workers with `mpirun`,
//! and a worker started by `mpirun` or by `srun` (Slurm with PMIx) joins its job. Without
//! a launcher's environment a process trains alone ([`Solo`]) and nothing here costs
//! anything.

use crate::error::{Error, Result};

#[cfg(feature = "cuda")]
mod nccl_group;
pub mod rendezvous;

/// The ranks of a run and their collective operations. Every rank must call the
/// collective methods in the same order.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// `x` ← the elementwise sum of every rank's `x` (the same bits on every rank).
    fn sum_f32(&self, x: &mut [f32]) -> Result<()>;
    fn sum_f64(&self, x: &mut [f64]) -> Result<()>;
    /// Rank 0's `bytes` on every rank.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// Every rank's `bytes` (at most [`RECORD`] of them) on rank 0, in rank order; empty
    /// elsewhere.
    fn gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// The engine's name, for the log.
    fn engine(&self) -> &'static str;
    /// Ends every rank now with `code` (after an error on this one: the others may be
    /// waiting in a collective, and an orderly shutdown would wait for them forever).
    fn abort(&self, code: i32) -> !;

    /// This process's device among its machine's (the launcher's local rank).
    fn local_rank(&self) -> usize {
        0
    }

    /// Each device buffer ← its sum over the ranks. This default goes through the host
    /// (download, [`Collective::sum_f32`], upload: correct on any engine, e.g. GPU ranks
    /// under mpirun); NCCL overrides it with one grouped all-reduce on the device.
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn sum_device(&self, gpu: &crate::backend::gpu::Gpu, bufs: &mut [crate::backend::gpu::GpuBuf<f32>]) -> Result<()> {
        for b in bufs.iter_mut() {
            let mut host = gpu.download(b)?;
            self.sum_f32(&mut host)?;
            *b = gpu.upload(&host)?;
        }
        Ok(())
    }

    /// Whether any rank says yes (a stop request on one rank stops all after the same step).
    fn any(&self, yes: bool) -> Result<bool> {
        let mut v = [yes as u8 as f64];
        self.sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }
}

/// Bytes of one rank's [`Collective::gather`] record.
pub const RECORD: usize = 256;

/// A rank's [`Collective::gather`] bytes as the fixed record the engines gather: two length
/// bytes, then the bytes (at most [`RECORD`]), zero-padded.
#[cfg(any(feature = "mpi", feature = "cuda"))]
fn record(bytes: &[u8]) -> Vec<u8> {
    let n = bytes.len().min(RECORD);
    let mut rec = vec![0u8; RECORD + 2];
    rec[..2].copy_from_slice(&(n as u16).to_le_bytes());
    rec[2..2 + n].copy_from_slice(&bytes[..n]);
    rec
}

/// The bytes of each rank from their gathered [`record`]s, in rank order.
#[cfg(any(feature = "mpi", feature = "cuda"))]
fn from_records(all: &[u8]) -> Vec<Vec<u8>> {
    all.chunks(RECORD + 2).map(|r| r[2..2 + (u16::from_le_bytes([r[0], r[1]]) as usize).min(RECORD)].to_vec()).collect()
}

/// A run of one process.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn sum_f32(&self, _x: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _x: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _bytes: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes[..bytes.len().min(RECORD)].to_vec()])
    }
    fn engine(&self) -> &'static str {
        "none"
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// What the launcher's environment says about this process: None when no launcher of
/// several processes started it.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// Which launcher's variables said so.
    pub by: &'static str,
}

/// Reads the launchers' variables: Open MPI's `OMPI_COMM_WORLD_{RANK,SIZE}`, Slurm's
/// `SLURM_PROCID`/`SLURM_STEP_NUM_TASKS` (inside an `srun` step), torchrun's
/// `RANK`/`WORLD_SIZE`. A partial or inconsistent set is an error naming the variables.
pub fn launch_from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
    let sets: [(&'static str, &str, &str); 3] =
        [("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("Slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"), ("torchrun", "RANK", "WORLD_SIZE")];
    for (by, rank_var, size_var) in sets {
        let (r, n) = (get(rank_var), get(size_var));
        if r.is_none() && n.is_none() {
            continue;
        }
        let num = |var: &str, v: Option<String>| -> Result<usize> {
            let v = v.ok_or_else(|| Error::Input(format!("{by}: {var} is not set but {} is", if var == rank_var { size_var } else { rank_var })))?;
            v.trim().parse::<usize>().map_err(|_| Error::Input(format!("{by}: {var}={v:?} is not a process count or index")))
        };
        let (rank, world) = (num(rank_var, r)?, num(size_var, n)?);
        if world == 0 || rank >= world {
            return Err(Error::Input(format!("{by}: {rank_var}={rank} is not a rank of {size_var}={world}")));
        }
        if world == 1 {
            // The one worker of `--nproc-per-node 1 --device cuda` (a one-rank NCCL
            // group, on purpose); any other job of one (e.g. `srun -n1` around torchrun or
            // --nproc-per-node) is no group, and the workers' own launcher may say more.
            if by == "torchrun" && get("EDM2_LAUNCHER").is_some() {
                return Ok(Some(Launch { rank, world, by }));
            }
            continue;
        }
        return Ok(Some(Launch { rank, world, by }));
    }
    Ok(None)
}

/// Who started the process, for messages: edm2's own GPU launcher sets torchrun's variables.
fn launcher_name(l: &Launch, get: &dyn Fn(&str) -> Option<String>) -> &'static str {
    if l.by == "torchrun" && get("EDM2_LAUNCHER").is_some() {
        "edm2's --nproc-per-node launcher"
    } else {
        l.by
    }
}

/// The process's device among its machine's: torchrun's `LOCAL_RANK`, Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_RANK` or Slurm's `SLURM_LOCALID` (0 without any).
pub fn local_rank_from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<usize> {
    for var in ["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"] {
        if let Some(v) = get(var) {
            return v.trim().parse::<usize>().ok().filter(|&r| r < 4096).ok_or_else(|| Error::Input(format!("{var}={v:?} is not a local rank")));
        }
    }
    Ok(0)
}

/// The process group this process belongs to: [`Solo`] without a launcher, else the
/// engine's (an error when this build or this launcher has none). `gpu`: the ranks train
/// on CUDA devices, so NCCL is the engine where the launcher gives a meeting place
/// (torchrun's `MASTER_ADDR`/`MASTER_PORT`, also under Slurm).
pub fn join(gpu: bool) -> Result<Box<dyn Collective>> {
    let get = |k: &str| std::env::var(k).ok();
    let Some(l) = launch_from_env(&get)? else { return Ok(Box::new(Solo)) };
    if gpu && (l.by == "torchrun" || (l.by == "Slurm" && get("MASTER_ADDR").is_some())) {
        let meeting = rendezvous::Meeting::from_env(&get, l.rank, l.world)?;
        let local = local_rank_from_env(&get)?;
        #[cfg(feature = "cuda")]
        return Ok(Box::new(nccl_group::NcclGroup::init(&meeting, local)?));
        #[cfg(not(feature = "cuda"))]
        return Err(Error::Input(format!(
            "{} started this process as rank {} of {} (device {local}, meeting at {}:{}) for GPUs, but this edm2 was built without \
             CUDA: build it with `--features cuda`",
            launcher_name(&l, &get),
            l.rank,
            l.world,
            meeting.addr,
            meeting.port
        )));
    }
    if l.by == "torchrun" {
        return Err(Error::Input(format!(
            "{} started this process as rank {} of {}: its environment is for GPUs (NCCL, --device cuda), but this process \
             trains on the CPU; on CPUs launch with `edm2 train --nproc-per-node N`, `mpirun -np N edm2 train ...` or `srun`",
            launcher_name(&l, &get),
            l.rank,
            l.world
        )));
    }
    #[cfg(feature = "mpi")]
    {
        let g = mpi_group::MpiGroup::init()?;
        if (g.rank(), g.world()) != (l.rank, l.world) {
            return Err(Error::Input(format!(
                "{} says rank {} of {}, but MPI says rank {} of {}: the launcher and the MPI library disagree",
                l.by,
                l.rank,
                l.world,
                g.rank(),
                g.world()
            )));
        }
        Ok(Box::new(g))
    }
    #[cfg(not(feature = "mpi"))]
    Err(Error::Input(format!(
        "{} started this process as rank {} of {}, but this edm2 was built without MPI: build it with `cargo build --release \
         --features mpi` (Debian: apt-get install libopenmpi-dev openmpi-bin)",
        l.by, l.rank, l.world
    )))
}

#[cfg(feature = "mpi")]
mod mpi_group {
    use super::{Collective, RECORD};
    use crate::error::{Error, Result};
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    /// Elements per all-reduce call: bounds the scratch buffer of a large tensor.
    const BUCKET: usize = 1 << 22;

    pub struct MpiGroup {
        world: SimpleCommunicator,
        // Dropping it finalizes MPI, which waits for every rank: not while unwinding.
        universe: std::mem::ManuallyDrop<mpi::environment::Universe>,
    }

    impl MpiGroup {
        pub fn init() -> Result<MpiGroup> {
            let universe = mpi::initialize().ok_or_else(|| Error::Run("MPI was initialized twice in this process".into()))?;
            Ok(MpiGroup { world: universe.world(), universe: std::mem::ManuallyDrop::new(universe) })
        }
    }

    impl Drop for MpiGroup {
        fn drop(&mut self) {
            if std::thread::panicking() {
                // A panic on one rank while the others wait in a collective: end them all.
                self.world.abort(101);
            }
            // SAFETY: dropped once, here, and not used after.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.universe) };
        }
    }

    fn sum<T: Equivalence + Copy + Default>(world: &SimpleCommunicator, x: &mut [T]) {
        let mut out = vec![T::default(); x.len().min(BUCKET)];
        for chunk in x.chunks_mut(BUCKET) {
            let out = &mut out[..chunk.len()];
            world.all_reduce_into(&*chunk, out, SystemOperation::sum());
            chunk.copy_from_slice(out);
        }
    }

    impl Collective for MpiGroup {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn world(&self) -> usize {
            self.world.size() as usize
        }
        fn sum_f32(&self, x: &mut [f32]) -> Result<()> {
            sum(&self.world, x);
            Ok(())
        }
        fn sum_f64(&self, x: &mut [f64]) -> Result<()> {
            sum(&self.world, x);
            Ok(())
        }
        fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
            let root = self.world.process_at_rank(0);
            let mut n = bytes.len() as u64;
            root.broadcast_into(&mut n);
            bytes.resize(n as usize, 0);
            root.broadcast_into(&mut bytes[..]);
            Ok(())
        }
        fn gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
            let rec = super::record(bytes);
            let root = self.world.process_at_rank(0);
            if self.rank() != 0 {
                root.gather_into(&rec[..]);
                return Ok(vec![]);
            }
            let mut all = vec![0u8; (RECORD + 2) * self.world()];
            root.gather_into_root(&rec[..], &mut all[..]);
            Ok(super::from_records(&all))
        }
        fn local_rank(&self) -> usize {
            // Checked when the process joined (`join` reads the same variables).
            super::local_rank_from_env(&|k| std::env::var(k).ok()).unwrap_or(0)
        }
        fn engine(&self) -> &'static str {
            "MPI"
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<Launch>> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        launch_from_env(&move |k| m.get(k).cloned())
    }

    #[test]
    fn launcher_environments_are_read_and_bad_ones_refused() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4")]).unwrap(), Some(Launch { rank: 1, world: 4, by: "Open MPI" }));
        assert_eq!(env(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "2")]).unwrap(), Some(Launch { rank: 0, world: 2, by: "Slurm" }));
        assert_eq!(env(&[("RANK", "3"), ("WORLD_SIZE", "8")]).unwrap(), Some(Launch { rank: 3, world: 8, by: "torchrun" }));
        // One process is no group, and does not hide a launcher inside it; but the one
        // worker of edm2's GPU launcher is a group of one.
        assert_eq!(env(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        assert_eq!(env(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("EDM2_LAUNCHER", "x")]).unwrap(), Some(Launch { rank: 0, world: 1, by: "torchrun" }));
        assert_eq!(
            env(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1"), ("RANK", "2"), ("WORLD_SIZE", "4")]).unwrap(),
            Some(Launch { rank: 2, world: 4, by: "torchrun" })
        );
        let local = |p: &[(&str, &str)]| {
            let m: HashMap<String, String> = p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            local_rank_from_env(&move |k| m.get(k).cloned())
        };
        assert_eq!(local(&[]).unwrap(), 0);
        assert_eq!(local(&[("LOCAL_RANK", "3"), ("SLURM_LOCALID", "1")]).unwrap(), 3);
        assert_eq!(local(&[("SLURM_LOCALID", "1")]).unwrap(), 1);
        assert!(local(&[("LOCAL_RANK", "-1")]).unwrap_err().to_string().contains("LOCAL_RANK=\"-1\""));
        for (bad, says) in [
            (vec![("RANK", "4"), ("WORLD_SIZE", "4")], "RANK=4 is not a rank of WORLD_SIZE=4"),
            (vec![("WORLD_SIZE", "4")], "RANK is not set but WORLD_SIZE is"),
            (vec![("OMPI_COMM_WORLD_RANK", "x"), ("OMPI_COMM_WORLD_SIZE", "2")], "OMPI_COMM_WORLD_RANK=\"x\""),
            (vec![("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "0")], "is not a rank of"),
        ] {
            let e = env(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn one_process_collectives_are_identities() {
        let s = Solo;
        let mut x = [1.5f32, -2.0];
        s.sum_f32(&mut x).unwrap();
        assert_eq!(x, [1.5, -2.0]);
        assert!(s.any(true).unwrap() && !s.any(false).unwrap());
        assert_eq!(s.gather(b"abc").unwrap(), vec![b"abc".to_vec()]);
    }
}
