//! The update listener as `edge-agent` runs it (`--listen ADDR --trust DIR`).
//!
//! The agent runs the installed model (`STATE/update/current.scb`, seeded from `--model` at
//! the first start). When `fleet` installs a model or orders a rollback, the new model is
//! loaded once here to prove it loads, the current run is stopped, and the agent starts a
//! new run on it. The probation counts the frames the source delivers and the times the
//! adaptation's collapse guard restores the last good heads ([`EdgeUpdates::collapse_counter`],
//! handed to the run's `AgentConfig`): a model whose classes collapse on the live stream fails
//! its probation and the device goes back to the previous one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use selfclass_runtime::bundle::Bundle;

use super::{Health, ModelHost, Probation, Result, UpdateConfig, UpdateServer};
use crate::pipeline::Model;
use crate::source::{CapturedFrame, FrameSource};

/// What `edge-agent` passes on from its command line.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    pub listen: SocketAddr,
    pub trust_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The shipped model (`--model`), installed when the device has none.
    pub seed_model: PathBuf,
    /// The inventory's name of this device; `None`: the host name.
    pub device_name: Option<String>,
    pub probation: Probation,
}

/// A running update listener and the agent's side of it.
pub struct EdgeUpdates {
    server: UpdateServer,
    host: Arc<EdgeHost>,
}

struct EdgeHost {
    /// The agent's stop flag: set to end the current run when the model changes.
    stop: Arc<AtomicBool>,
    restart: AtomicBool,
    running: AtomicBool,
    frames: Arc<AtomicU64>,
    collapses: Arc<AtomicU64>,
}

impl EdgeUpdates {
    /// Starts the listener; `stop` is the flag that ends a run of the agent.
    pub fn start(options: EdgeOptions, stop: Arc<AtomicBool>) -> Result<EdgeUpdates> {
        let device_name = options.device_name.unwrap_or_else(host_name);
        let mut config =
            UpdateConfig::new(&device_name, options.listen, options.state_dir, options.trust_dir);
        config.seed_model = Some(options.seed_model);
        config.probation = options.probation;
        let host = Arc::new(EdgeHost {
            stop,
            restart: AtomicBool::new(false),
            running: AtomicBool::new(false),
            frames: Arc::new(AtomicU64::new(0)),
            collapses: Arc::new(AtomicU64::new(0)),
        });
        let server = UpdateServer::spawn(config, Arc::clone(&host) as Arc<dyn ModelHost>)?;
        host.running.store(true, Ordering::SeqCst);
        Ok(EdgeUpdates { server, host })
    }

    /// The model to run now.
    pub fn model_path(&self) -> PathBuf {
        self.server.model_path()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Wraps the frame source so the probation sees the frames go by.
    pub fn count_frames(&self, source: Box<dyn FrameSource>) -> Box<dyn FrameSource> {
        Box::new(CountingSource { inner: source, frames: Arc::clone(&self.host.frames) })
    }

    /// The counter the run's collapse guard adds to (`AgentConfig::collapse_events`); it only
    /// grows, across runs, and the probation compares it with its value at the install.
    pub fn collapse_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.host.collapses)
    }

    /// After a run ended: whether it ended because the model changed. If so the stop flag
    /// is cleared and the caller starts a new run on [`EdgeUpdates::model_path`].
    pub fn take_restart(&self) -> bool {
        if self.host.restart.swap(false, Ordering::SeqCst) {
            self.host.stop.store(false, Ordering::SeqCst);
            return true;
        }
        false
    }
}

impl ModelHost for EdgeHost {
    fn activate(&self, path: &Path, _bundle: &Bundle) -> std::result::Result<(), String> {
        // Everything the run will do to load it, so a model that cannot run fails here and
        // the update side rolls back before the agent stops.
        Model::load(path).map_err(|e| format!("{e:#}"))?;
        if self.running.load(Ordering::SeqCst) {
            self.restart.store(true, Ordering::SeqCst);
            self.stop.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn health(&self) -> Health {
        Health {
            frames_seen: self.frames.load(Ordering::SeqCst),
            collapse_events: self.collapses.load(Ordering::SeqCst),
        }
    }
}

struct CountingSource {
    inner: Box<dyn FrameSource>,
    frames: Arc<AtomicU64>,
}

impl FrameSource for CountingSource {
    fn next_into(&mut self, frame: &mut CapturedFrame) -> anyhow::Result<bool> {
        let more = self.inner.next_into(frame)?;
        if more {
            self.frames.fetch_add(1, Ordering::SeqCst);
        }
        Ok(more)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn native_fps(&self) -> Option<f64> {
        self.inner.native_fps()
    }

    fn is_live(&self) -> bool {
        self.inner.is_live()
    }
}

/// The kernel's host name, the default device name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "edge-agent".to_string())
}
