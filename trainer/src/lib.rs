//! selfclass trainer: learns classes and representations from unlabelled images with the
//! Self-Classifier method, and writes the compact bundles that devices run.
//!
//! The pieces, in the order a run uses them: [`data`] reads IDX files and image folders,
//! [`augment`] draws random views on a background thread, [`model`] is the network (with
//! the fast CPU layers of [`kernels`]), [`train`] runs the loop with the runtime's loss and
//! [`optim`]'s update rules, [`refit`] fits the heads again on the
//! frozen backbone from several starts and keeps the best, [`eval`] scores clusters and embeddings, and [`export`] writes
//! the ONNX network and the `.scb` bundle.

pub mod augment;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod kernels;
pub mod model;
pub mod optim;
pub mod refit;
pub mod train;

pub use error::{Error, Result};

/// Sets the process up for CPU training; call once at start-up, before any thread starts.
///
/// - Freed activation buffers stay in the process heap instead of going back to the
///   system, so the next step reuses them without page faults (a step allocates and frees
///   the same large buffers every time; unmapping and re-faulting them cost about a tenth
///   of a step). A no-op outside glibc.
/// - candle's own pool for elementwise operations is kept to the calling thread unless
///   `CANDLE_NUM_THREADS` says otherwise: the heavy layers run on rayon, and on a small
///   machine the pool's spin-waiting took an eighth of a step's CPU time from them.
pub fn tune_cpu() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds and takes plain integers.
    unsafe {
        // Activations of the first layers exceed the largest mmap threshold glibc accepts
        // (32 MiB), so mmap is switched off altogether: every block comes from the heap.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
