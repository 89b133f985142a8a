//! Compute backends. The CPU backend is always built; the CUDA backend is behind the
//! `cuda` cargo feature.

pub mod cpu;
#[cfg(feature = "cuda-sim")]
pub mod sim;
#[cfg(feature = "cuda")]
pub mod cuda;

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

/// Checks that `device` can run here; the CUDA backend is not implemented yet.
pub fn ensure_available(device: Device) -> Result<(), crate::Error> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda => Err(crate::Error::DeviceUnavailable(
            "the CUDA backend is not available yet in this build of edm2 (it is being \
             developed behind the `cuda` cargo feature); use --device cpu"
                .into(),
        )),
    }
}
