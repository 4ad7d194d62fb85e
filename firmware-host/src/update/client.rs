//! The operator's side of the protocol: one connection to one device.
//!
//! [`push`] carries one model to one device from start to verdict: it offers the file,
//! sends the chunks the device still lacks (reconnecting and resuming after a cut), orders
//! the install, and follows the probation until the device commits the model or rolls it
//! back.

use std::io::{BufReader, BufWriter};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use selfclass_runtime::bundle::Bundle;

use super::auth::FleetKey;
use super::error::{Result, UpdateError, LOCAL};
use super::now_unix_ms;
use super::protocol::{
    read_frame, write_frame, Action, Chunk, DeviceState, DeviceStatus, Manifest, Order, Request,
    Response, WireError, MAX_CHUNKS,
};
use super::store::sha256;

/// Frames from a device are small except for status; anything larger is refused.
const MAX_RESPONSE_BYTES: u32 = 1 << 20;

/// Time limits of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// A request whose answer takes longer fails (an install that loads a large model
    /// answers only once the model is loaded).
    pub io: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(60) }
    }
}

/// An open connection to one device.
pub struct DeviceClient {
    device: String,
    address: String,
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl DeviceClient {
    /// Connects to `address` (`host:port`), naming the device `device` in every error.
    pub fn connect(device: &str, address: &str, timeouts: Timeouts) -> Result<DeviceClient> {
        let network = |action, source| UpdateError::Network {
            device: device.to_string(),
            address: address.to_string(),
            action,
            cause: source,
        };
        let mut last_error =
            std::io::Error::new(std::io::ErrorKind::NotFound, "the address resolves to nothing");
        let addresses = address.to_socket_addrs().map_err(|e| network("resolving", e))?;
        for socket_address in addresses {
            match TcpStream::connect_timeout(&socket_address, timeouts.connect) {
                Ok(stream) => {
                    let write_half = stream
                        .set_read_timeout(Some(timeouts.io))
                        .and_then(|()| stream.set_write_timeout(Some(timeouts.io)))
                        .and_then(|()| stream.set_nodelay(true))
                        .and_then(|()| stream.try_clone())
                        .map_err(|e| network("setting up the connection", e))?;
                    return Ok(DeviceClient {
                        device: device.to_string(),
                        address: address.to_string(),
                        reader: BufReader::new(stream),
                        writer: BufWriter::new(write_half),
                    });
                }
                Err(e) => last_error = e,
            }
        }
        Err(network("connecting", last_error))
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    fn network_error(&self, action: &'static str, source: std::io::Error) -> UpdateError {
        UpdateError::Network {
            device: self.device.clone(),
            address: self.address.clone(),
            action,
            cause: source,
        }
    }

    /// Sends one request and reads its answer; a device's error answer becomes
    /// [`UpdateError::Remote`].
    pub fn call(&mut self, request: &Request) -> Result<Response> {
        write_frame(&mut self.writer, request, &self.device).map_err(|e| match e {
            WireError::Io(e) => self.network_error("sending a request", e),
            WireError::Invalid(e) => e,
        })?;
        let response = read_frame::<Response>(&mut self.reader, MAX_RESPONSE_BYTES, &self.device)
            .map_err(|e| match e {
                WireError::Io(e) => self.network_error("reading the answer", e),
                WireError::Invalid(e) => e,
            })?
            .ok_or_else(|| {
                self.network_error(
                    "reading the answer",
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the device closed the connection",
                    ),
                )
            })?;
        match response {
            Response::Error { message } => {
                Err(UpdateError::Remote { device: self.device.clone(), message })
            }
            other => Ok(other),
        }
    }

    /// The device's status; needs no key.
    pub fn status(&mut self) -> Result<DeviceStatus> {
        match self.call(&Request::Status)? {
            Response::Status(status) => Ok(*status),
            other => Err(self.unexpected("status", &other)),
        }
    }

    /// Fetches a nonce, signs `action` for this device with it and sends the order.
    pub fn order(&mut self, key: &FleetKey, action: Action) -> Result<Response> {
        let nonce = match self.call(&Request::Challenge)? {
            Response::Challenge { nonce, .. } => nonce,
            other => return Err(self.unexpected("challenge", &other)),
        };
        let order =
            Order { device: self.device.clone(), nonce, issued_unix_ms: now_unix_ms(), action };
        let signed = key.sign_order(&order)?;
        self.call(&Request::Order(signed))
    }

    /// Orders the device back to its previous model; returns the versions (from, to).
    pub fn rollback(&mut self, key: &FleetKey, reason: &str) -> Result<(u64, u64)> {
        match self.order(key, Action::Rollback { reason: reason.to_string() })? {
            Response::RolledBack { from_version, to_version } => Ok((from_version, to_version)),
            other => Err(self.unexpected("rollback", &other)),
        }
    }

    fn unexpected(&self, request: &str, response: &Response) -> UpdateError {
        let name = match response {
            Response::Status(_) => "a status",
            Response::Challenge { .. } => "a challenge",
            Response::Accepted { .. } => "an acceptance",
            Response::ChunkStored { .. } => "a chunk receipt",
            Response::Installed { .. } => "an install receipt",
            Response::RolledBack { .. } => "a rollback receipt",
            Response::Error { .. } => "an error",
        };
        UpdateError::protocol(&self.device, format!("{name} in answer to a {request} request"))
    }
}

/// A bundle file ready to send: its bytes and the manifest a device checks them against.
#[derive(Debug, Clone)]
pub struct Package {
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
    /// Names the file in messages.
    pub origin: String,
}

impl Package {
    /// Cuts `bytes` (a bundle file, signed or not: the device is the judge) into chunks of
    /// about `chunk_bytes`; larger chunks are used where the file would need more than
    /// [`MAX_CHUNKS`].
    pub fn from_bytes(bytes: Vec<u8>, chunk_bytes: u32, origin: &str) -> Result<Package> {
        let bundle =
            Bundle::from_bytes(&bytes, origin).map_err(|e| UpdateError::runtime(LOCAL, e))?;
        Package::from_parts(bytes, bundle.model_version, chunk_bytes, origin)
    }

    /// Like [`Package::from_bytes`], without decoding the file: `model_version` is taken as
    /// given. The device still checks everything; tests send damaged files this way.
    pub fn from_parts(
        bytes: Vec<u8>,
        model_version: u64,
        chunk_bytes: u32,
        origin: &str,
    ) -> Result<Package> {
        let size_bytes = bytes.len() as u64;
        let floor = size_bytes.div_ceil(u64::from(MAX_CHUNKS)).max(1);
        let chunk_bytes = u64::from(chunk_bytes.max(1)).max(floor);
        let chunk_bytes = u32::try_from(chunk_bytes).map_err(|_| {
            UpdateError::refused(
                LOCAL,
                format!("sending {origin}"),
                "the file is too large to send",
            )
        })?;
        let chunk_sha256 = bytes.chunks(chunk_bytes as usize).map(sha256).collect();
        let manifest = Manifest {
            model_version,
            size_bytes,
            file_sha256: sha256(&bytes),
            chunk_bytes,
            chunk_sha256,
        };
        Ok(Package { bytes, manifest, origin: origin.to_string() })
    }

    /// Reads a bundle file.
    pub fn load(path: &Path, chunk_bytes: u32) -> Result<Package> {
        let bytes =
            std::fs::read(path).map_err(|e| UpdateError::io(LOCAL, "reading model", path, e))?;
        Package::from_bytes(bytes, chunk_bytes, &path.display().to_string())
    }

    pub fn version(&self) -> u64 {
        self.manifest.model_version
    }

    fn chunk(&self, index: u32) -> Chunk {
        let range = self.manifest.chunk_range(index);
        Chunk {
            transfer: self.manifest.file_sha256,
            index,
            data: self.bytes[range.start as usize..range.end as usize].to_vec(),
        }
    }
}

/// How hard [`push`] tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushOptions {
    pub timeouts: Timeouts,
    /// Connections tried in all, counting the first; a cut transfer resumes on the next.
    pub attempts: u32,
    pub retry_delay: Duration,
    /// How long to follow the probation before giving up on a verdict.
    pub probation_timeout: Duration,
    pub poll_interval: Duration,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            timeouts: Timeouts::default(),
            attempts: 5,
            retry_delay: Duration::from_millis(500),
            probation_timeout: Duration::from_secs(600),
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// Where a push stands, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushPhase {
    Connecting { attempt: u32 },
    Transferring { chunks_sent: u32, chunks: u32 },
    Installing,
    Probation { elapsed_ms: u64, window_ms: u64 },
}

/// What a push did to one device.
#[derive(Debug)]
pub struct PushReport {
    pub device: String,
    /// The version the device ran before, if it could be asked.
    pub old_version: Option<u64>,
    /// The version it runs now, as far as known.
    pub new_version: Option<u64>,
    /// Set when a transfer continued where an earlier connection left it.
    pub resumed_from_chunk: Option<u32>,
    pub connections: u32,
    /// The device ran this version already; nothing was sent.
    pub already_current: bool,
    pub error: Option<UpdateError>,
}

impl PushReport {
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }
}

/// Pushes `package` to one device and waits for the verdict of its probation.
pub fn push(
    device: &str,
    address: &str,
    key: &FleetKey,
    package: &Package,
    options: &PushOptions,
    progress: &dyn Fn(PushPhase),
) -> PushReport {
    let mut report = PushReport {
        device: device.to_string(),
        old_version: None,
        new_version: None,
        resumed_from_chunk: None,
        connections: 0,
        already_current: false,
        error: None,
    };
    if let Err(e) = push_inner(&mut report, address, key, package, options, progress) {
        report.error = Some(e);
    }
    report
}

fn push_inner(
    report: &mut PushReport,
    address: &str,
    key: &FleetKey,
    package: &Package,
    options: &PushOptions,
    progress: &dyn Fn(PushPhase),
) -> Result<()> {
    let version = package.version();
    let device = report.device.clone();
    let mut installed = false;
    // Set once an install order went out: from then on a lost answer is looked up in the
    // device's state instead of offering the file again.
    let mut install_sent = false;
    while !installed {
        report.connections += 1;
        progress(PushPhase::Connecting { attempt: report.connections });
        let attempt = (|| -> Result<bool> {
            let mut client = DeviceClient::connect(&device, address, options.timeouts)?;
            let status = client.status()?;
            if report.old_version.is_none() {
                report.old_version = status.installed.map(|m| m.version);
            }
            if install_sent && install_happened(&status, version) {
                return Ok(true);
            }
            if status.installed.is_some_and(|m| m.file_sha256 == package.manifest.file_sha256)
                && status.state == DeviceState::Running
            {
                report.already_current = true;
                return Ok(true);
            }
            transfer_and_install(&mut client, report, key, package, &mut install_sent, progress)?;
            Ok(true)
        })();
        match attempt {
            Ok(_) => installed = true,
            Err(e) if e.is_transient() && report.connections < options.attempts => {
                tracing::debug!("{e}; reconnecting");
                std::thread::sleep(options.retry_delay);
            }
            Err(e) => return Err(e),
        }
    }
    if report.already_current {
        report.new_version = Some(version);
        return Ok(());
    }
    follow_probation(report, address, version, options, progress)
}

/// Whether the device's status shows that the install of `version` this push ordered took
/// place (its answer may have been lost with a connection).
fn install_happened(status: &DeviceStatus, version: u64) -> bool {
    match &status.state {
        DeviceState::Probation { version: v, .. } => *v == version,
        DeviceState::RolledBack { from_version, .. } => *from_version == version,
        DeviceState::Running => status.installed.is_some_and(|m| m.version == version),
        DeviceState::NoModel => false,
    }
}

fn transfer_and_install(
    client: &mut DeviceClient,
    report: &mut PushReport,
    key: &FleetKey,
    package: &Package,
    install_sent: &mut bool,
    progress: &dyn Fn(PushPhase),
) -> Result<()> {
    let device = client.device().to_string();
    let (mut next, chunks) = match client.order(key, Action::Offer(package.manifest.clone()))? {
        Response::Accepted { next_chunk, chunks } => (next_chunk, chunks),
        other => return Err(client.unexpected("offer", &other)),
    };
    if chunks != package.manifest.chunk_sha256.len() as u32 || next > chunks {
        return Err(UpdateError::protocol(
            &device,
            format!("accepted {chunks} chunks from {next}"),
        ));
    }
    if next > 0 {
        report.resumed_from_chunk = Some(next);
        tracing::info!("{device}: resuming the transfer at chunk {next} of {chunks}");
    }
    while next < chunks {
        progress(PushPhase::Transferring { chunks_sent: next, chunks });
        let stored = match client.call(&Request::Chunk(package.chunk(next)))? {
            Response::ChunkStored { next_chunk } => next_chunk,
            other => return Err(client.unexpected("chunk", &other)),
        };
        if stored <= next {
            return Err(UpdateError::protocol(&device, format!("chunk {next} was not taken")));
        }
        next = stored;
    }
    progress(PushPhase::Transferring { chunks_sent: chunks, chunks });
    progress(PushPhase::Installing);
    *install_sent = true;
    match client.order(key, Action::Install { file_sha256: package.manifest.file_sha256 })? {
        Response::Installed { .. } => Ok(()),
        other => Err(client.unexpected("install", &other)),
    }
}

fn follow_probation(
    report: &mut PushReport,
    address: &str,
    version: u64,
    options: &PushOptions,
    progress: &dyn Fn(PushPhase),
) -> Result<()> {
    let device = report.device.clone();
    let started = Instant::now();
    let mut client: Option<DeviceClient> = None;
    let mut failures = 0;
    loop {
        let asked = match client.as_mut() {
            Some(open) => open.status(),
            None => DeviceClient::connect(&device, address, options.timeouts).and_then(|mut c| {
                let status = c.status();
                client = Some(c);
                status
            }),
        };
        let status = match asked {
            Ok(status) => status,
            Err(e) if e.is_transient() && failures + 1 < options.attempts => {
                failures += 1;
                client = None;
                std::thread::sleep(options.retry_delay);
                continue;
            }
            Err(e) => return Err(e),
        };
        report.new_version = status.installed.map(|m| m.version);
        match &status.state {
            DeviceState::Probation { version: v, elapsed_ms, window_ms, .. } if *v == version => {
                progress(PushPhase::Probation { elapsed_ms: *elapsed_ms, window_ms: *window_ms });
            }
            DeviceState::Running if report.new_version == Some(version) => return Ok(()),
            DeviceState::RolledBack { from_version, reason } if *from_version == version => {
                return Err(UpdateError::model(
                    &device,
                    format!("probation of v{version}"),
                    format!(
                        "failed and the device went back to {}: {reason}",
                        report.new_version.map_or("no model".into(), |v| format!("v{v}"))
                    ),
                ));
            }
            other => {
                return Err(UpdateError::model(
                    &device,
                    format!("install of v{version}"),
                    format!("the device reports {other:?} running {:?}", report.new_version),
                ));
            }
        }
        if started.elapsed() > options.probation_timeout {
            return Err(UpdateError::model(
                &device,
                format!("probation of v{version}"),
                format!("no verdict after {} s", options.probation_timeout.as_secs()),
            ));
        }
        std::thread::sleep(options.poll_interval);
    }
}
