//! The CUDA backend (feature `cuda`). Empty until the CUDA issue lands: the kernels,
//! build.rs and cudarc plumbing plug in here behind the same network description.
