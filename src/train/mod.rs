//! Training: the EDM2 loss, Adam, the learning-rate schedule, power-function and
//! traditional EMAs, snapshots, training-state checkpoints and the loop (`run`).

pub mod adam;
pub mod dynamics;
pub mod ema;
pub mod loss;
pub mod memory;
pub mod schedule;
pub mod run;
pub mod rundir;
pub mod snapshot;
pub mod state;
pub mod step;
