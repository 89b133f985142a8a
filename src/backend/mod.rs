//! Compute backends. The CPU backend is always built; the CUDA backend is behind the
//! `cuda` cargo feature.

pub mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod gpu;

/// Which device a command runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            _ => Err(format!("unknown device '{s}' (expected cpu or cuda)")),
        }
    }
}

/// Checks that `device` can run here. `cuda` needs a build with the `cuda` feature, a
/// driver and a device; the network does not run on it yet (the CUDA issue), so even then
/// the answer is a clear error.
pub fn ensure_available(device: Device) -> Result<(), crate::Error> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            let gpu = gpu::Gpu::open(0)?;
            Err(crate::Error::DeviceUnavailable(format!(
                "found {}, but the network does not run on the CUDA backend yet (its kernels are \
                 being written and tested kernel by kernel); use --device cpu",
                gpu.name()
            )))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(crate::Error::DeviceUnavailable(
            "this edm2 was built without the CUDA backend (cargo build --release --features cuda); \
             use --device cpu"
                .into(),
        )),
    }
}
