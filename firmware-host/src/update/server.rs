//! The device's update listener: serves `fleet`, installs models and watches probations.
//!
//! One thread accepts connections and one thread serves each (up to
//! [`Limits::max_connections`](super::Limits)); all of them share the [`Store`] behind one
//! lock, so requests from several operators never interleave inside an install. After an
//! install a watcher thread compares the agent's [`Health`] counters over the probation
//! window and either commits the model or rolls it back.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::RngCore;
use selfclass_runtime::bundle::Bundle;
use tracing::{debug, error, info, warn};

use super::auth::{key_id, TrustStore};
use super::error::{Result, UpdateError};
use super::protocol::{
    read_frame, write_frame, Action, Chunk, DeviceState, DeviceStatus, HealthReport, Manifest,
    ModelInfo, Order, Request, Response, SignedOrder, WireError, MAX_CHUNKS,
};
use super::store::{sha256, Store};
use super::{now_unix_ms, Health, ModelHost, UpdateConfig};

/// Challenge nonces kept at once; the oldest is forgotten first.
const MAX_NONCES: usize = 256;

/// A running update listener. Dropping it stops the listener (connections in progress
/// finish their current request).
pub struct UpdateServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept_thread: Option<JoinHandle<()>>,
}

struct Shared {
    config: UpdateConfig,
    host: Arc<dyn ModelHost>,
    trust: TrustStore,
    inner: Mutex<Inner>,
    stopping: AtomicBool,
    connections: AtomicUsize,
}

struct Inner {
    store: Store,
    nonces: VecDeque<([u8; 32], Instant)>,
    probation: Option<ProbationRun>,
    /// Bumped whenever a probation starts or is cancelled, so a stale watcher stops.
    generation: u64,
}

struct ProbationRun {
    version: u64,
    started: Instant,
    baseline: Health,
    latest: Health,
}

impl UpdateServer {
    /// Opens the update state (recovering from a crash), activates the installed model
    /// through `host`, and starts listening on `config.listen`.
    ///
    /// A device whose installed model does not load falls back to the previous one; with
    /// none, it keeps listening without a model so that a push can repair it.
    pub fn spawn(config: UpdateConfig, host: Arc<dyn ModelHost>) -> Result<UpdateServer> {
        let device = config.device_name.clone();
        let trust = TrustStore::load(&config.trust_dir, &device)?;
        // The port first: a listener that cannot start changes nothing on the device.
        let listener = TcpListener::bind(config.listen).map_err(|e| UpdateError::Network {
            device: device.clone(),
            address: config.listen.to_string(),
            action: "listening for updates (is another agent on this port?)",
            cause: e,
        })?;
        let (store, notes) = Store::open(&device, &config.state_dir, config.seed_model.as_deref())?;
        for note in notes {
            warn!(device = %device, "update state: {note}");
        }
        let shared = Arc::new(Shared {
            config,
            host,
            trust,
            inner: Mutex::new(Inner {
                store,
                nonces: VecDeque::new(),
                probation: None,
                generation: 0,
            }),
            stopping: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        });
        {
            let mut inner = shared.lock();
            shared.activate_installed(&mut inner);
        }

        let local_addr = listener.local_addr().map_err(|e| UpdateError::Network {
            device: device.clone(),
            address: shared.config.listen.to_string(),
            action: "reading the listening address",
            cause: e,
        })?;
        info!(device = %device, "update listener on {local_addr}, trusting keys in {}", shared.trust.dir().display());
        let accept_shared = Arc::clone(&shared);
        let accept_thread = std::thread::Builder::new()
            .name("update-accept".into())
            .spawn(move || accept_loop(&accept_shared, &listener))
            .map_err(|e| UpdateError::io(&device, "starting the update thread", "-", e))?;
        Ok(UpdateServer { shared, local_addr, accept_thread: Some(accept_thread) })
    }

    /// The address the listener is bound to (with the real port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Path of the installed model.
    pub fn model_path(&self) -> std::path::PathBuf {
        self.shared.lock().store.current_path()
    }

    /// What `fleet status` would show.
    pub fn status(&self) -> DeviceStatus {
        self.shared.status()
    }

    /// Stops accepting connections and waits for the accepting thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let wake = match self.local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.local_addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), self.local_addr.port())
            }
            _ => self.local_addr,
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for UpdateServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!(device = %shared.config.device_name, "accepting an update connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let limits = shared.config.limits;
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            let message = format!(
                "{}: connection refused: {} connections are served already; try again later",
                shared.config.device_name, limits.max_connections
            );
            let mut stream = stream;
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ =
                write_frame(&mut stream, &Response::Error { message }, &shared.config.device_name);
            continue;
        }
        let connection_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new().name("update-conn".into()).spawn(move || {
            serve_connection(&connection_shared, stream);
            connection_shared.connections.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            warn!(device = %shared.config.device_name, "starting a connection thread: {e}");
        }
    }
}

fn serve_connection(shared: &Arc<Shared>, stream: TcpStream) {
    let device = shared.config.device_name.clone();
    let limits = shared.config.limits;
    let peer = stream.peer_addr().map_or_else(|_| "unknown peer".to_string(), |a| a.to_string());
    let configured = stream
        .set_read_timeout(Some(limits.io_timeout))
        .and_then(|()| stream.set_write_timeout(Some(limits.io_timeout)))
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.try_clone());
    let write_half = match configured {
        Ok(s) => s,
        Err(e) => {
            warn!(device = %device, "setting up the connection from {peer}: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut writer = BufWriter::new(write_half);
    debug!(device = %device, "update connection from {peer}");
    loop {
        let response = match read_frame::<Request>(&mut reader, limits.max_frame_bytes, &device) {
            Ok(None) => break,
            Ok(Some(request)) => shared.handle(request, &peer),
            Err(WireError::Io(e)) => {
                debug!(device = %device, "connection from {peer} ended: {e}");
                break;
            }
            Err(WireError::Invalid(e)) => {
                warn!(device = %device, "from {peer}: {e}");
                let _ =
                    write_frame(&mut writer, &Response::Error { message: e.to_string() }, &device);
                break;
            }
        };
        if let Err(e) = write_frame(&mut writer, &response, &device) {
            debug!(device = %device, "answering {peer}: {e:?}");
            break;
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in one connection must not take the update side down for good; the store
        // is consistent between calls because every step in it is atomic.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn device(&self) -> &str {
        &self.config.device_name
    }

    fn handle(self: &Arc<Self>, request: Request, peer: &str) -> Response {
        let result = match request {
            Request::Status => Ok(Response::Status(Box::new(self.status()))),
            Request::Challenge => Ok(self.challenge()),
            Request::Order(signed) => self.order(&signed, peer),
            Request::Chunk(chunk) => self.chunk(&chunk),
        };
        result.unwrap_or_else(|e| {
            warn!(device = %self.device(), "request from {peer}: {e}");
            Response::Error { message: e.to_string() }
        })
    }

    fn status(&self) -> DeviceStatus {
        let health = self.host.health();
        let inner = self.lock();
        let store = &inner.store;
        let state = if let Some(run) = &inner.probation {
            DeviceState::Probation {
                version: run.version,
                elapsed_ms: run.started.elapsed().as_millis() as u64,
                window_ms: self.config.probation.window.as_millis() as u64,
                frames: run.latest.frames_seen.saturating_sub(run.baseline.frames_seen),
            }
        } else if store.current().is_none() {
            DeviceState::NoModel
        } else if let Some(note) = store.rolled_back() {
            DeviceState::RolledBack { from_version: note.from_version, reason: note.reason.clone() }
        } else {
            DeviceState::Running
        };
        DeviceStatus {
            device: self.device().to_string(),
            installed: store.current(),
            previous: store.previous(),
            version_floor: store.version_floor(),
            state,
            health: Some(HealthReport {
                frames_seen: health.frames_seen,
                collapse_events: health.collapse_events,
                checked_unix_ms: now_unix_ms(),
            }),
            last_event: store.last_event().map(str::to_string),
            transfer: store.transfer(),
        }
    }

    fn challenge(&self) -> Response {
        let mut nonce = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut inner = self.lock();
        if inner.nonces.len() >= MAX_NONCES {
            inner.nonces.pop_front();
        }
        inner.nonces.push_back((nonce, Instant::now()));
        Response::Challenge { nonce, device_unix_ms: now_unix_ms() }
    }

    /// Checks everything that makes an order valid here and now: a trusted signature, this
    /// device's name, a nonce this device issued and nobody used, and a time close to the
    /// device's clock. The nonce is consumed only by an order whose signature holds, so a
    /// stranger cannot burn the nonces of an operator.
    fn open_order(&self, inner: &mut Inner, signed: &SignedOrder) -> Result<Order> {
        let device = self.device();
        let order = self.trust.open_order(signed, device)?;
        let what = format!("order signed by key {}", key_id(&signed.public_key));
        if order.device != device {
            return Err(UpdateError::refused(
                device,
                what,
                format!("it is for device {}", order.device),
            ));
        }
        let limits = self.config.limits;
        let position =
            inner.nonces.iter().position(|(n, _)| *n == order.nonce).ok_or_else(|| {
                UpdateError::refused(
                    device,
                    &what,
                    "its nonce was not issued here or was used already (a replayed or stale order)",
                )
            })?;
        let issued = inner.nonces.remove(position).map(|(_, at)| at);
        if issued.is_some_and(|at| at.elapsed() > limits.nonce_lifetime) {
            return Err(UpdateError::refused(
                device,
                &what,
                format!("its nonce expired ({} s lifetime)", limits.nonce_lifetime.as_secs()),
            ));
        }
        let now = now_unix_ms();
        let skew_ms = now.abs_diff(order.issued_unix_ms);
        if skew_ms > limits.max_clock_skew.as_millis() as u64 {
            return Err(UpdateError::refused(
                device,
                &what,
                format!(
                    "it was made {} s away from this device's clock (limit {} s); check both clocks",
                    skew_ms / 1000,
                    limits.max_clock_skew.as_secs()
                ),
            ));
        }
        Ok(order)
    }

    fn order(self: &Arc<Self>, signed: &SignedOrder, peer: &str) -> Result<Response> {
        let mut inner = self.lock();
        let order = self.open_order(&mut inner, signed)?;
        let signer = key_id(&signed.public_key);
        match order.action {
            Action::Offer(manifest) => {
                self.check_offer(&inner, &manifest)?;
                let next_chunk = inner.store.begin_transfer(&manifest)?;
                info!(
                    device = %self.device(),
                    "transfer of v{} ({} bytes) from {peer}, key {signer}, from chunk {next_chunk}",
                    manifest.model_version, manifest.size_bytes
                );
                Ok(Response::Accepted { next_chunk, chunks: manifest.chunk_sha256.len() as u32 })
            }
            Action::Install { file_sha256 } => self.install(&mut inner, &file_sha256),
            Action::Rollback { reason } => {
                inner.probation = None;
                inner.generation += 1;
                let reason = format!("rollback ordered with key {signer} from {peer}: {reason}");
                let (from_version, to_version) = inner.store.rollback(&reason)?;
                info!(device = %self.device(), "rolled back from v{from_version} to v{to_version}: {reason}");
                self.activate_installed(&mut inner);
                Ok(Response::RolledBack { from_version, to_version })
            }
        }
    }

    fn check_offer(&self, inner: &Inner, manifest: &Manifest) -> Result<()> {
        let device = self.device();
        let limits = self.config.limits;
        let what =
            format!("offer of model v{} ({} bytes)", manifest.model_version, manifest.size_bytes);
        let refuse = |reason: String| Err(UpdateError::refused(device, &what, reason));
        if manifest.size_bytes == 0 || manifest.size_bytes > limits.max_bundle_bytes {
            return refuse(format!(
                "the size is outside 1..={} bytes, this device's limit; nothing was read",
                limits.max_bundle_bytes
            ));
        }
        if !(limits.min_chunk_bytes..=limits.max_chunk_bytes).contains(&manifest.chunk_bytes) {
            return refuse(format!(
                "chunks of {} bytes; this device takes {}..={}",
                manifest.chunk_bytes, limits.min_chunk_bytes, limits.max_chunk_bytes
            ));
        }
        let chunks = Manifest::chunk_count(manifest.size_bytes, manifest.chunk_bytes);
        if chunks > u64::from(MAX_CHUNKS) || chunks != manifest.chunk_sha256.len() as u64 {
            return refuse(format!(
                "{} chunk digests for {chunks} chunks (at most {MAX_CHUNKS}); use larger chunks",
                manifest.chunk_sha256.len()
            ));
        }
        let floor = inner.store.version_floor();
        if manifest.model_version <= floor {
            return refuse(format!(
                "version {} is not above this device's version floor {floor} (older or equal bundles are refused: anti-rollback)",
                manifest.model_version
            ));
        }
        Ok(())
    }

    fn chunk(&self, chunk: &Chunk) -> Result<Response> {
        let mut inner = self.lock();
        let next_chunk = inner.store.store_chunk(&chunk.transfer, chunk.index, &chunk.data)?;
        Ok(Response::ChunkStored { next_chunk })
    }

    fn install(self: &Arc<Self>, inner: &mut Inner, file_sha256: &[u8; 32]) -> Result<Response> {
        let device = self.device().to_string();
        if let Some(run) = &inner.probation {
            return Err(UpdateError::refused(
                &device,
                "install",
                format!("v{} is still on probation; wait for it to end", run.version),
            ));
        }
        let (manifest, bytes) = inner.store.staged_file(file_sha256)?;
        let what = format!("model bundle v{}", manifest.model_version);
        let checked = self.check_bundle(inner, &bytes, &manifest, &what);
        let bundle = match checked {
            Ok(bundle) => bundle,
            Err(e) => {
                // A file that fails these checks will fail them again: drop it.
                inner.store.discard_transfer()?;
                return Err(e);
            }
        };
        let installed = ModelInfo { version: bundle.model_version, file_sha256: sha256(&bytes) };
        let old = inner.store.current().map(|c| c.version);
        inner.store.install(installed)?;
        info!(
            device = %device,
            "installed v{} (was {}); probation of {} s",
            installed.version,
            old.map_or("none".to_string(), |v| format!("v{v}")),
            self.config.probation.window.as_secs_f32()
        );

        // Counted from before the switch, so nothing the new model does escapes the window
        // (an event of the old model in between counts against the new one: the safe side).
        let baseline = self.host.health();
        let path = inner.store.current_path();
        if let Err(reason) = self.host.activate(&path, &bundle) {
            let reason = format!("v{} does not load: {reason}", installed.version);
            self.fail_probation(inner, &reason);
            return Err(UpdateError::model(&device, format!("install of {what}"), reason));
        }
        inner.generation += 1;
        inner.probation = Some(ProbationRun {
            version: installed.version,
            started: Instant::now(),
            baseline,
            latest: baseline,
        });
        let generation = inner.generation;
        let watcher = Arc::clone(self);
        std::thread::Builder::new()
            .name("update-probation".into())
            .spawn(move || watcher.watch_probation(generation))
            .map_err(|e| UpdateError::io(&device, "starting the probation watcher", "-", e))?;
        Ok(Response::Installed {
            version: installed.version,
            probation_ms: self.config.probation.window.as_millis() as u64,
        })
    }

    /// Decodes the transferred file and checks signature and version.
    fn check_bundle(
        &self,
        inner: &Inner,
        bytes: &[u8],
        manifest: &Manifest,
        what: &str,
    ) -> Result<Bundle> {
        let device = self.device();
        let bundle =
            Bundle::from_bytes(bytes, &format!("{device}: uploaded v{}", manifest.model_version))
                .map_err(|e| {
                UpdateError::refused(device, what, format!("the file is not a valid bundle ({e})"))
            })?;
        self.trust.verify_bundle(&bundle, device, what)?;
        if bundle.model_version != manifest.model_version {
            return Err(UpdateError::refused(
                device,
                what,
                format!(
                    "the signed bundle says version {}, the offer said {}",
                    bundle.model_version, manifest.model_version
                ),
            ));
        }
        let floor = inner.store.version_floor();
        if bundle.model_version <= floor {
            return Err(UpdateError::refused(
                device,
                what,
                format!(
                    "version {} is not above this device's version floor {floor} (anti-rollback)",
                    bundle.model_version
                ),
            ));
        }
        Ok(bundle)
    }

    fn watch_probation(&self, generation: u64) {
        let probation = self.config.probation;
        let max_wait = probation.max_wait.max(probation.window);
        let tick =
            (probation.window / 20).clamp(Duration::from_millis(5), Duration::from_millis(500));
        loop {
            std::thread::sleep(tick);
            if self.stopping.load(Ordering::SeqCst) {
                // The marker stays: the next start treats the unfinished probation as failed.
                return;
            }
            let health = self.host.health();
            let mut inner = self.lock();
            if inner.generation != generation {
                return;
            }
            let Some(run) = inner.probation.as_mut() else { return };
            run.latest = health;
            let frames = health.frames_seen.saturating_sub(run.baseline.frames_seen);
            let collapses = health.collapse_events.saturating_sub(run.baseline.collapse_events);
            let elapsed = run.started.elapsed();
            let version = run.version;
            let verdict = if collapses > 0 {
                Some(Err(format!(
                    "the collapse guard fired {collapses} time(s) during the probation of v{version}, after {frames} frames"
                )))
            } else if elapsed >= probation.window && frames >= probation.min_frames {
                Some(Ok(frames))
            } else if elapsed >= max_wait {
                Some(Err(format!(
                    "v{version} classified {frames} frames in {:.1} s of probation, {} were needed",
                    elapsed.as_secs_f32(),
                    probation.min_frames
                )))
            } else {
                None
            };
            match verdict {
                None => continue,
                Some(Ok(frames)) => {
                    inner.probation = None;
                    match inner.store.commit() {
                        Ok(()) => {
                            info!(device = %self.device(), "v{version} passed probation ({frames} frames)")
                        }
                        Err(e) => error!(device = %self.device(), "committing v{version}: {e}"),
                    }
                    return;
                }
                Some(Err(reason)) => {
                    self.fail_probation(&mut inner, &reason);
                    return;
                }
            }
        }
    }

    /// Goes back to the previous model after a failed probation (or a model that does not
    /// load) and activates it; with no previous model, sets the failed one aside.
    fn fail_probation(&self, inner: &mut Inner, reason: &str) {
        inner.probation = None;
        inner.generation += 1;
        let device = self.device();
        if inner.store.previous().is_none() {
            error!(device = %device, "{reason}; no previous model to go back to");
            if let Err(e) = inner.store.reject_current(reason) {
                error!(device = %device, "setting the failed model aside: {e}");
            }
            return;
        }
        match inner.store.rollback(reason) {
            Ok((from, to)) => {
                warn!(device = %device, "rolled back from v{from} to v{to}: {reason}");
                self.activate_installed(inner);
            }
            Err(e) => error!(device = %device, "rolling back after \"{reason}\": {e}"),
        }
    }

    /// Has the agent run the installed model, falling back to the previous one (and then
    /// to none) when it does not load.
    fn activate_installed(&self, inner: &mut Inner) {
        let device = self.device().to_string();
        loop {
            let Some(current) = inner.store.current() else {
                warn!(device = %device, "no model installed; waiting for a push");
                return;
            };
            let path = inner.store.current_path();
            let loaded = inner
                .store
                .current_bundle()
                .map_err(|e| e.to_string())
                .and_then(|bundle| self.host.activate(&path, &bundle));
            let reason = match loaded {
                Ok(()) => {
                    info!(device = %device, "running model v{} from {}", current.version, path.display());
                    return;
                }
                Err(reason) => format!("v{} does not load: {reason}", current.version),
            };
            error!(device = %device, "{reason}");
            let fallback = if inner.store.previous().is_some() {
                inner.store.rollback(&reason).map(|_| ())
            } else {
                inner.store.reject_current(&reason)
            };
            if let Err(e) = fallback {
                error!(device = %device, "falling back after \"{reason}\": {e}");
                return;
            }
        }
    }
}
