//! selfclass trainer: learns classes and representations from unlabelled images with the
//! Self-Classifier method, and writes the compact bundles that devices run.
//!
//! The pieces, in the order a run uses them: [`data`] reads IDX files and image folders,
//! [`augment`] draws random views on a background thread, [`model`] is the network (with
//! the fast CPU layers of [`kernels`]), [`train`] runs the loop with the runtime's loss and
//! [`optim`]'s update rules, [`eval`] scores clusters and embeddings, and [`export`] writes
//! the ONNX network and the `.scb` bundle.

pub mod augment;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod kernels;
pub mod model;
pub mod optim;
pub mod train;

pub use error::{Error, Result};
