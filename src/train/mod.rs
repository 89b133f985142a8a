//! Training pieces: the EDM2 loss and the Adam step (the loop itself is the training
//! issue's).

pub mod adam;
pub mod loss;
