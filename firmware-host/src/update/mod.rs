//! Model updates: the device's update listener and the library behind the `fleet` tool.
//!
//! On a device, [`UpdateServer::spawn`] opens the update state in `STATE/update/`, recovers
//! from whatever an earlier run left (a cut transfer, an install or a probation that a
//! crash interrupted), has the agent activate the installed model through its
//! [`ModelHost`], and listens for `fleet`. The agent embeds it in a few lines:
//!
//! ```no_run
//! use std::sync::Arc;
//! use selfclass_firmware_host::update::{Health, ModelHost, UpdateConfig, UpdateServer};
//!
//! struct Agent;
//! impl ModelHost for Agent {
//!     fn activate(
//!         &self,
//!         path: &std::path::Path,
//!         bundle: &selfclass_runtime::bundle::Bundle,
//!     ) -> Result<(), String> {
//!         // Build the backbone and heads from `bundle` and swap them into the frame loop.
//!         Ok(())
//!     }
//!     fn health(&self) -> Health {
//!         Health { frames_seen: 0, collapse_events: 0 }
//!     }
//! }
//!
//! let config = UpdateConfig::new("cam-01", "0.0.0.0:7700".parse()?, "/var/lib/selfclass".into(), "/etc/selfclass/trust".into());
//! let server = UpdateServer::spawn(config, Arc::new(Agent))?;
//! println!("update listener on {}", server.local_addr());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! On the operator's side, [`client`] talks to one device and [`rollout`] pushes a model
//! to an inventory of devices in stages.
//!
//! The protocol, the authentication and the install steps are described in
//! [`protocol`], [`auth`] and [`store`].

pub mod auth;
pub mod client;
pub mod edge;
pub mod error;
pub mod protocol;
pub mod rollout;
pub mod server;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use auth::{FleetKey, TrustStore};
pub use error::{Result, UpdateError};
pub use server::UpdateServer;

/// What the update side needs from the running agent.
///
/// `activate` is called with the installed model at start, with a new model after an
/// install, and with the previous model after a rollback; it must make the agent use that
/// model from the next frame on, or fail without changing what runs. `health` returns
/// counters that only grow; probation compares them over its window.
pub trait ModelHost: Send + Sync + 'static {
    fn activate(
        &self,
        path: &Path,
        bundle: &selfclass_runtime::bundle::Bundle,
    ) -> Result<(), String>;
    fn health(&self) -> Health;
}

/// Monotonic counters of the running agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// Frames classified since the agent started.
    pub frames_seen: u64,
    /// Times the adaptation's collapse guard fired since the agent started.
    pub collapse_events: u64,
}

/// How a freshly installed model proves itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probation {
    /// The model must run at least this long...
    pub window: Duration,
    /// ...and classify at least this many frames, with no collapse-guard event.
    pub min_frames: u64,
    /// Without `min_frames` frames by then, the model is taken as hanging and rolled back.
    pub max_wait: Duration,
}

impl Default for Probation {
    fn default() -> Self {
        Probation {
            window: Duration::from_secs(30),
            min_frames: 30,
            max_wait: Duration::from_secs(120),
        }
    }
}

/// Bounds on what a peer can make the device read, store or hold open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Offers of larger bundles are refused before any byte of them is read.
    pub max_bundle_bytes: u64,
    /// Frames longer than this are refused after reading their length, before allocating.
    pub max_frame_bytes: u32,
    /// Chunk sizes a sender may choose.
    pub min_chunk_bytes: u32,
    pub max_chunk_bytes: u32,
    /// Connections served at once; more are answered with an error and closed.
    pub max_connections: usize,
    /// A connection idle this long (mid-frame or between frames) is closed.
    pub io_timeout: Duration,
    /// Signed orders made further than this from the device's clock are refused.
    pub max_clock_skew: Duration,
    /// A challenge nonce is accepted this long after it was issued.
    pub nonce_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bundle_bytes: 64 << 20,
            max_frame_bytes: 2 << 20,
            min_chunk_bytes: 1 << 10,
            max_chunk_bytes: 1 << 20,
            max_connections: 16,
            io_timeout: Duration::from_secs(30),
            max_clock_skew: Duration::from_secs(300),
            nonce_lifetime: Duration::from_secs(60),
        }
    }
}

/// Configuration of a device's update listener.
#[derive(Debug, Clone)]
pub struct UpdateConfig {
    /// The name orders must carry; the inventory's name of this device.
    pub device_name: String,
    pub listen: SocketAddr,
    /// The agent's state directory; updates live in its `update/` folder.
    pub state_dir: PathBuf,
    /// Directory of trusted `*.pub` keys.
    pub trust_dir: PathBuf,
    /// The model to install when the device has none yet (the one it shipped with).
    pub seed_model: Option<PathBuf>,
    pub limits: Limits,
    pub probation: Probation,
}

impl UpdateConfig {
    /// A configuration with default limits and probation.
    pub fn new(
        device_name: &str,
        listen: SocketAddr,
        state_dir: PathBuf,
        trust_dir: PathBuf,
    ) -> Self {
        UpdateConfig {
            device_name: device_name.to_string(),
            listen,
            state_dir,
            trust_dir,
            seed_model: None,
            limits: Limits::default(),
            probation: Probation::default(),
        }
    }
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 32 bytes that 64 hexadecimal digits spell, or `None`.
pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Milliseconds since the Unix epoch by the local clock (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 9) as u8);
        assert_eq!(parse_hex32(&hex(&bytes)), Some(bytes));
        assert_eq!(parse_hex32("zz"), None);
        assert_eq!(parse_hex32(&"é".repeat(32)), None);
    }
}
