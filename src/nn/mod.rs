//! The network, described once: config → module tree with the official names, with a
//! forward and an explicit backward per layer.

pub mod layers;
pub mod params;
pub mod unet;
pub mod vae;

pub use layers::{Mode, MpConv};
pub use params::{ParamKind, ParamSpec, Params};
pub use unet::{precond_coefs, ForwardOut, Precond};
