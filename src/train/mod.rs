//! Training pieces: the EDM2 loss, Adam, the learning-rate schedule and the power-function
//! EMA (the loop itself is the training issue's).

pub mod adam;
pub mod ema;
pub mod loss;
pub mod schedule;
pub mod snapshot;
