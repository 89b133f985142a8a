//! # edm2
//!
//! The EDM2 diffusion recipe (Karras et al., *Analyzing and Improving the Training
//! Dynamics of Diffusion Models*, CVPR 2024) in Rust: the magnitude-preserving U-Net
//! with the official parameter names and layouts, an exact fp32 CPU backend with an
//! explicit backward for every layer, and safetensors checkpoint IO.
//!
//! ```
//! use edm2::{NetConfig, Precond, Mode, Tensor};
//! let cfg = NetConfig::resolve("cpu-xs16").unwrap();
//! let net = Precond::new(&cfg).unwrap();
//! let params = net.init_params(0);
//! // One 16x16 RGB image (NHWC) at sigma = 1.
//! let x = Tensor::zeros(&[1, 16, 16, 3]);
//! let out = net.forward(&params, &x, &[1.0], None, &Mode::eval(), false);
//! assert_eq!(out.d.shape, vec![1, 16, 16, 3]);
//! ```

pub mod api;
pub mod backend;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod io;
pub mod nn;
pub mod phema;
pub mod profile;
pub mod rng;
pub mod sample;
pub mod tensor;
pub mod train;

pub use api::{denoise, load_net, LoadedNet};
pub use config::NetConfig;
pub use error::{Error, Result};
pub use nn::{Mode, Params, Precond};
pub use tensor::Tensor;
