//! selfclass runtime: the device library of the Self-Classifier method.
//!
//! A camera frame becomes a class prediction in four steps: [`preprocess`] turns the raw
//! frame into the model's input tensor, [`backbone`] runs the ONNX embedding network (on
//! selfclass's own convolution kernels where the graph and the processor allow, with
//! tract otherwise) and returns L2-normalised embeddings, [`head`] maps each embedding to
//! class logits with weight-normalised linear heads, and the arg-max of the logits is the
//! cluster.
//! [`loss`] holds the uniform-prior loss with its exact gradient that both the server
//! trainer and on-device adaptation use; [`bundle`] is the one-file model format;
//! [`metrics`] scores clusterings against labels.
//!
//! On the device, [`replay`] keeps embedding pairs of what the camera saw (and anchor
//! pairs from the server), [`adapt`] trains the heads on them with the same loss under a
//! collapse guard, and [`discover`] summarises the clusters in a set of embeddings.

pub mod adapt;
pub mod backbone;
pub mod bundle;
mod convnet;
pub mod discover;
pub mod error;
pub mod fsutil;
pub mod head;
pub mod idx;
pub mod loss;
pub mod matmul;
pub mod metrics;
pub mod onnx;
pub mod preprocess;
pub mod replay;
#[doc(hidden)]
pub mod testing;

pub use error::{Error, Result};
