//! The process group of GPU ranks on NCCL (issue 20 item 2), through cudarc's `nccl`
//! module (libnccl loaded at run time like the driver: a machine without it gets an error
//! only when it asks for several GPU processes).
//!
//! Start-up as torchrun's: rank 0 makes the NCCL unique id and hands it to the others over
//! `MASTER_ADDR:MASTER_PORT` ([`super::rendezvous`]); then every rank opens its device
//! (`LOCAL_RANK`) and joins the communicator. The gradients are summed on the device in
//! one grouped all-reduce (NCCL fuses the per-tensor calls of a group), on a stream of
//! the group's own that waits for the backward and that the optimizer waits for. The few
//! host values (loss sums, the stop vote, rank 0's choices, the roll call) go through the
//! same communicator via small device buffers.
//!
//! Not done: overlapping the all-reduce with the backward (the reduction starts after the
//! last pass); a dead peer inside an NCCL call is not detected by this process (the
//! `--nproc-per-node` launcher, torchrun and Slurm end the job when a rank dies).

use super::{rendezvous, Collective, RECORD};
use crate::backend::gpu::{Gpu, GpuBuf};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, ReduceOp};
use std::sync::Arc;

pub struct NcclGroup {
    comm: Comm,
    stream: Arc<CudaStream>,
    local_rank: usize,
}

fn nccl_err(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> Error + '_ {
    move |e| Error::Cuda(format!("NCCL, {what}: {e:?}"))
}

fn driver_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

impl NcclGroup {
    /// Meets the other ranks at `m`, then builds the communicator on device `local_rank`.
    pub fn init(m: &rendezvous::Meeting, local_rank: usize) -> Result<NcclGroup> {
        // SAFETY: probes for the libraries; with dynamic loading a missing one would
        // panic at the first call instead.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::DeviceUnavailable(format!(
                "rank {} of {}: the NVIDIA driver library (libcuda.so.1) was not found; several GPU processes need it",
                m.rank, m.world
            )));
        }
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(Error::DeviceUnavailable(format!(
                "rank {} of {}: NCCL (libnccl.so.2) was not found: summing gradients across GPU processes needs it \
                 (pip install nvidia-nccl-cu13 and add its lib directory to LD_LIBRARY_PATH, or install NCCL from NVIDIA)",
                m.rank, m.world
            )));
        }
        let devices = CudaContext::device_count().map_err(driver_err("counting CUDA devices"))?.max(0) as usize;
        let device = crate::backend::gpu::device_of_local_rank(local_rank);
        if device >= devices {
            return Err(Error::DeviceUnavailable(format!(
                "rank {} of {}: its local rank {local_rank} asks for CUDA device {device}, but this process sees {devices} \
                 (CUDA_VISIBLE_DEVICES)",
                m.rank, m.world
            )));
        }
        // The device first: a rank that fails after the meeting would leave the others
        // waiting in ncclCommInitRank.
        let ctx = CudaContext::new(device).map_err(driver_err("creating the CUDA context"))?;
        // The backend orders its work on one stream without per-buffer events; this
        // group orders against it explicitly (`sum_device`).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_err("creating the NCCL stream"))?;
        // Rank 0's id, every rank's after the meeting (the only bytes that go over TCP).
        let mine = if m.rank == 0 { Id::new().map_err(nccl_err("making the unique id"))?.internal().map(|c| c as u8).to_vec() } else { vec![] };
        let id = rendezvous::exchange(m, &mine)?;
        let id: [u8; 128] = id.try_into().map_err(|v: Vec<u8>| Error::Run(format!("rank {}: rank 0 sent a {}-byte NCCL id (expected 128)", m.rank, v.len())))?;
        let comm = Comm::from_rank(stream.clone(), m.rank, m.world, Id::uninit(id.map(|b| b as std::ffi::c_char)))
            .map_err(nccl_err("joining the communicator (ncclCommInitRank)"))?;
        Ok(NcclGroup { comm, stream, local_rank })
    }

    fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("waiting for NCCL"))
    }

    /// `x` ← its sum over the ranks, through a device buffer.
    fn sum_host<T: cudarc::nccl::safe::NcclType + cudarc::driver::DeviceRepr + Copy>(&self, x: &mut [T]) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let mut d = self.stream.clone_htod(x).map_err(driver_err("uploading for NCCL"))?;
        self.comm.all_reduce_in_place(&mut d, &ReduceOp::Sum).map_err(nccl_err("all-reduce"))?;
        self.stream.memcpy_dtoh(&d, x).map_err(driver_err("downloading from NCCL"))?;
        self.sync()
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world_size()
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn sum_f32(&self, x: &mut [f32]) -> Result<()> {
        self.sum_host(x)
    }
    fn sum_f64(&self, x: &mut [f64]) -> Result<()> {
        self.sum_host(x)
    }
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let mut n = [bytes.len() as u64];
        let mut dn = self.stream.clone_htod(&n).map_err(driver_err("uploading for NCCL"))?;
        self.comm.broadcast_in_place(&mut dn, 0).map_err(nccl_err("broadcast"))?;
        self.stream.memcpy_dtoh(&dn, &mut n).map_err(driver_err("downloading from NCCL"))?;
        self.sync()?;
        // What rank 0 broadcasts is small (options, a path): bound it all the same.
        let n = usize::try_from(n[0]).ok().filter(|&n| n <= 1 << 30).ok_or_else(|| Error::Run(format!("NCCL broadcast of {} bytes", n[0])))?;
        bytes.resize(n.max(1), 0);
        let mut d = self.stream.clone_htod(&bytes[..]).map_err(driver_err("uploading for NCCL"))?;
        self.comm.broadcast_in_place(&mut d, 0).map_err(nccl_err("broadcast"))?;
        self.stream.memcpy_dtoh(&d, &mut bytes[..]).map_err(driver_err("downloading from NCCL"))?;
        self.sync()?;
        bytes.truncate(n);
        Ok(())
    }
    fn gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        // Fixed records, gathered on every rank.
        let send = self.stream.clone_htod(&super::record(bytes)).map_err(driver_err("uploading for NCCL"))?;
        let mut recv = self.stream.alloc_zeros::<u8>((RECORD + 2) * self.world()).map_err(driver_err("allocating for NCCL"))?;
        self.comm.all_gather(&send, &mut recv).map_err(nccl_err("all-gather"))?;
        let all = self.stream.clone_dtoh(&recv).map_err(driver_err("downloading from NCCL"))?;
        self.sync()?;
        if self.rank() != 0 {
            return Ok(vec![]);
        }
        Ok(super::from_records(&all))
    }
    fn engine(&self) -> &'static str {
        "NCCL"
    }
    fn abort(&self, code: i32) -> ! {
        // The communicator is aborted when the process ends (the driver frees it); the
        // other ranks see the loss of this one in their next NCCL call or through the
        // launcher.
        std::process::exit(code)
    }

    fn sum_device(&self, gpu: &Gpu, bufs: &mut [GpuBuf<f32>]) -> Result<()> {
        let compute = gpu.compute_stream();
        // The reduction waits for the backward that wrote the gradients ...
        self.stream.join(compute).map_err(driver_err("ordering NCCL after the backward"))?;
        group_start().map_err(nccl_err("group start"))?;
        let mut failed = None;
        for b in bufs.iter_mut() {
            if let Err(e) = self.comm.all_reduce_in_place(b.storage_for_collective(), &ReduceOp::Sum) {
                failed = Some(e);
                break;
            }
        }
        group_end().map_err(nccl_err("group end"))?;
        if let Some(e) = failed {
            return Err(nccl_err("all-reduce of the gradients")(e));
        }
        // ... and the optimizer waits for the reduction.
        compute.join(&self.stream).map_err(driver_err("ordering the optimizer after NCCL"))
    }
}
