//! The one error type of the update side and the fleet tool.
//!
//! Every message starts with the device it concerns (`local` for the operator's own files)
//! and then names the thing and the cause, so a line in a rollout table or a device log is
//! enough to act on.

use std::path::PathBuf;

/// Result alias of the update module.
pub type Result<T, E = UpdateError> = std::result::Result<T, E>;

/// Names the operator's machine in messages about its own files.
pub const LOCAL: &str = "local";

/// Everything that can go wrong while pushing, installing or rolling back a model.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// A file or directory could not be read or written.
    #[error("{device}: {action} {path}: {cause}")]
    Io { device: String, action: &'static str, path: PathBuf, cause: std::io::Error },

    /// A connection to a device failed, timed out or was cut.
    #[error("{device} ({address}): {action}: {cause}")]
    Network { device: String, address: String, action: &'static str, cause: std::io::Error },

    /// A frame that breaks the protocol: too long, undecodable, or the wrong answer.
    #[error("{device}: protocol: {reason}")]
    Protocol { device: String, reason: String },

    /// The device (or this side, before sending) refused a request; `what` names it.
    #[error("{device}: {what} refused: {reason}")]
    Refused { device: String, what: String, reason: String },

    /// An error the device reported; its message already names the device.
    #[error("{message}")]
    Remote { device: String, message: String },

    /// A signing key, public key or trust store that cannot be used.
    #[error("{device}: key {path}: {reason}")]
    Key { device: String, path: PathBuf, reason: String },

    /// A fleet inventory that cannot be used.
    #[error("inventory {path}: {reason}")]
    Inventory { path: PathBuf, reason: String },

    /// A bundle or network error from the runtime library (its message names the file).
    #[error("{device}: {cause}")]
    Runtime { device: String, cause: selfclass_runtime::Error },

    /// The running agent could not use a model, or a probation failed.
    #[error("{device}: {what}: {reason}")]
    Model { device: String, what: String, reason: String },
}

impl UpdateError {
    pub(crate) fn io(
        device: &str,
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        UpdateError::Io { device: device.to_string(), action, path: path.into(), cause: source }
    }

    pub(crate) fn refused(
        device: &str,
        what: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        UpdateError::Refused {
            device: device.to_string(),
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn protocol(device: &str, reason: impl Into<String>) -> Self {
        UpdateError::Protocol { device: device.to_string(), reason: reason.into() }
    }

    pub(crate) fn key(device: &str, path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        UpdateError::Key { device: device.to_string(), path: path.into(), reason: reason.into() }
    }

    pub(crate) fn runtime(device: &str, source: selfclass_runtime::Error) -> Self {
        UpdateError::Runtime { device: device.to_string(), cause: source }
    }

    pub(crate) fn model(device: &str, what: impl Into<String>, reason: impl Into<String>) -> Self {
        UpdateError::Model { device: device.to_string(), what: what.into(), reason: reason.into() }
    }

    /// Whether trying the same request again may succeed: a cut connection or a time-out,
    /// as opposed to a refusal that will be the same next time.
    pub fn is_transient(&self) -> bool {
        matches!(self, UpdateError::Network { .. })
    }
}
