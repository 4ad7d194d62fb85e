//! The one error type of the trainer library.

use std::path::PathBuf;

/// Result alias used throughout the trainer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading data, training, evaluating or exporting.
/// Each variant says what was being done and on which file, so one line tells the user
/// what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data set that is missing, truncated or not in a format we read.
    #[error("data set {path}: {reason}")]
    Data { path: PathBuf, reason: String },

    /// A file could not be read or written.
    #[error("{action} {path}: {cause}")]
    Io { action: &'static str, path: PathBuf, cause: std::io::Error },

    /// Settings that do not fit together (checked before any training starts).
    #[error("invalid settings: {0}")]
    Config(String),

    /// A checkpoint that cannot be used with the requested model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A tensor operation failed; `op` names what the trainer was doing.
    #[error("{op}: {cause}")]
    Tensor { op: &'static str, cause: candle_core::Error },

    /// The device library refused an input (loss, head, metrics, bundle).
    #[error("{op}: {cause}")]
    Runtime { op: &'static str, cause: selfclass_runtime::Error },

    /// The ONNX export could not be built or does not agree with the trainer.
    #[error("export: {0}")]
    Export(String),
}

impl Error {
    /// A data-set error for `path`.
    pub fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Data { path: path.into(), reason: reason.into() }
    }

    /// An I/O error for `path` while doing `action` ("reading", "writing", ...).
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.into(), cause: source }
    }

    /// A settings error.
    pub fn config(reason: impl Into<String>) -> Self {
        Error::Config(reason.into())
    }

    /// A checkpoint error for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.into(), reason: reason.into() }
    }
}

/// Attaches the name of the operation to a candle or runtime error.
pub trait Context<T> {
    /// Wraps the error with `op`, the thing the trainer was doing.
    fn ctx(self, op: &'static str) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, candle_core::Error> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|cause| Error::Tensor { op, cause })
    }
}

impl<T> Context<T> for std::result::Result<T, selfclass_runtime::Error> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|cause| Error::Runtime { op, cause })
    }
}
