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

/// Keeps freed activation buffers in the process heap instead of returning them to the
/// system, so the next step reuses them without page faults (a training step allocates
/// and frees the same large buffers every time; unmapping and re-faulting them cost about
/// a tenth of a step on the CPU). Call once at start-up; a no-op outside glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before any thread
    // allocates concurrently and takes plain integers.
    unsafe {
        // The largest mmap threshold glibc accepts on 64-bit systems is 32 MiB.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
