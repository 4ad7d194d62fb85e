//! The one error type of the runtime crate.

use std::path::PathBuf;

/// Result alias used throughout the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the device library. Each variant names the thing that
/// was wrong and, where it helps, what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Arrays or parameters whose shapes or values do not fit the operation.
    #[error("{op}: {reason}")]
    InvalidInput { op: &'static str, reason: String },

    /// A file could not be read or written.
    #[error("{action} {path}: {cause}")]
    Io { action: &'static str, path: PathBuf, cause: std::io::Error },

    /// A model bundle that cannot be used: truncated, corrupt, wrong version, bad digest.
    #[error("model bundle {origin}: {reason}")]
    Bundle { origin: String, reason: String },

    /// The ONNX embedding network failed to load, optimise or run.
    #[error("embedding network {origin}: {reason}")]
    Inference { origin: String, reason: String },

    /// A camera or stream frame that does not match its declared format.
    #[error("frame: {reason}")]
    Frame { reason: String },
}

impl Error {
    pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidInput { op, reason: reason.into() }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io { action, path: path.into(), cause: source }
    }

    pub(crate) fn bundle(origin: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Bundle { origin: origin.into(), reason: reason.into() }
    }

    pub(crate) fn inference(origin: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Inference { origin: origin.into(), reason: reason.into() }
    }
}
