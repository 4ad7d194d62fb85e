//! The wire protocol between `fleet` and a device: length-prefixed postcard frames over TCP.
//!
//! A frame is a little-endian `u32` length followed by that many bytes: one byte of protocol
//! version ([`PROTOCOL_VERSION`]) and a postcard-encoded [`Request`] or [`Response`]. The
//! reader checks the length against its limit before it allocates anything, so a peer that
//! announces a 4 GiB frame costs four bytes of reading.
//!
//! One request, one response, in order. Requests that change state are [`SignedOrder`]s
//! (an [`Order`] signed with a fleet key, bound to a nonce the device issued and to the
//! time it was made) or [`Chunk`]s, which only fill a transfer that a signed
//! [`Action::Offer`] opened and are checked against the chunk digests that offer carried.

use std::io::{ErrorKind, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{Result, UpdateError};

/// Bumped whenever a message changes shape; both ends refuse other versions.
pub const PROTOCOL_VERSION: u8 = 1;

/// Prefix of every signed order, so an order signature can never pass for a signature of
/// anything else (a bundle digest, another protocol).
pub const ORDER_DOMAIN: &[u8] = b"selfclass fleet order v1\0";

/// Most chunks one transfer may have; the offer that lists their digests stays small.
pub const MAX_CHUNKS: u32 = 4096;

/// What `fleet` asks of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// The device's versions, state and health. Needs no signature and changes nothing.
    Status,
    /// A fresh single-use nonce for the next signed order.
    Challenge,
    /// A state-changing order: offer a transfer, install it, or roll back.
    Order(SignedOrder),
    /// One piece of the transfer a signed offer opened.
    Chunk(Chunk),
}

/// What a device answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Boxed: the other answers are a few bytes.
    Status(Box<DeviceStatus>),
    Challenge {
        nonce: [u8; 32],
        device_unix_ms: u64,
    },
    /// The offer was accepted; send chunks from `next_chunk` on (0 for a new transfer, more
    /// when an interrupted one resumes).
    Accepted {
        next_chunk: u32,
        chunks: u32,
    },
    ChunkStored {
        next_chunk: u32,
    },
    /// The model is installed and on probation for about `probation_ms`.
    Installed {
        version: u64,
        probation_ms: u64,
    },
    RolledBack {
        from_version: u64,
        to_version: u64,
    },
    /// A refusal or failure; the message names the device, the thing and the cause.
    Error {
        message: String,
    },
}

/// A piece of a transfer; `transfer` is the SHA-256 of the whole file being sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub transfer: [u8; 32],
    pub index: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// An encoded [`Order`] with the fleet key that signed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedOrder {
    /// The postcard encoding of the order; the signature covers [`ORDER_DOMAIN`] and these
    /// bytes exactly, so the device checks what was signed before decoding anything else.
    #[serde(with = "serde_bytes")]
    pub order: Vec<u8>,
    pub public_key: [u8; 32],
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// A state-changing order for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The device name the order is for; another device refuses it.
    pub device: String,
    /// A nonce from the device's [`Request::Challenge`]; each is accepted once.
    pub nonce: [u8; 32],
    /// When the order was made, by the operator's clock.
    pub issued_unix_ms: u64,
    pub action: Action,
}

/// What an order asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Open (or resume) the transfer of a bundle file.
    Offer(Manifest),
    /// Install the completely transferred file with this SHA-256.
    Install { file_sha256: [u8; 32] },
    /// Go back to the model installed before the current one.
    Rollback { reason: String },
}

/// Describes a bundle file before it is sent, so the device can refuse it unread and
/// check every chunk as it arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub model_version: u64,
    pub size_bytes: u64,
    pub file_sha256: [u8; 32],
    pub chunk_bytes: u32,
    /// SHA-256 of each chunk, in order; the last chunk may be shorter than `chunk_bytes`.
    pub chunk_sha256: Vec<[u8; 32]>,
}

impl Manifest {
    /// Number of chunks a file of `size_bytes` has with chunks of `chunk_bytes`.
    pub fn chunk_count(size_bytes: u64, chunk_bytes: u32) -> u64 {
        size_bytes.div_ceil(u64::from(chunk_bytes.max(1)))
    }

    /// Byte range of chunk `index` in the file.
    pub fn chunk_range(&self, index: u32) -> std::ops::Range<u64> {
        let start = u64::from(index) * u64::from(self.chunk_bytes);
        let end = (start + u64::from(self.chunk_bytes)).min(self.size_bytes);
        start..end
    }
}

/// A model as a device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub version: u64,
    /// SHA-256 of the whole bundle file.
    pub file_sha256: [u8; 32],
}

/// Where a device stands in its update cycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceState {
    /// No model installed yet.
    NoModel,
    /// Running a model that passed its probation (or was there before updates began).
    Running,
    /// Running a freshly installed model that has not proven itself yet.
    Probation { version: u64, elapsed_ms: u64, window_ms: u64, frames: u64 },
    /// The last install or order ended in a rollback; running the previous model.
    RolledBack { from_version: u64, reason: String },
}

/// Counters of the running model, as the agent reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub frames_seen: u64,
    pub collapse_events: u64,
    pub checked_unix_ms: u64,
}

/// A transfer the device holds, complete or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferProgress {
    pub model_version: u64,
    pub chunks_stored: u32,
    pub chunks: u32,
}

/// Everything `fleet status` shows about one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub device: String,
    pub installed: Option<ModelInfo>,
    pub previous: Option<ModelInfo>,
    /// Pushed bundles must be above this version (anti-rollback).
    pub version_floor: u64,
    pub state: DeviceState,
    pub health: Option<HealthReport>,
    pub last_event: Option<String>,
    pub transfer: Option<TransferProgress>,
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(
    writer: &mut impl Write,
    message: &T,
    device: &str,
) -> Result<(), WireError> {
    let body = postcard::to_allocvec(message)
        .map_err(|e| WireError::Invalid(UpdateError::protocol(device, format!("encoding: {e}"))))?;
    let len = u32::try_from(1 + body.len()).map_err(|_| {
        WireError::Invalid(UpdateError::protocol(device, "a frame above 4 GiB cannot be sent"))
    })?;
    // One buffer, one write: the length and the payload leave in the same segment.
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.push(PROTOCOL_VERSION);
    frame.extend_from_slice(&body);
    writer.write_all(&frame).map_err(WireError::Io)?;
    writer.flush().map_err(WireError::Io)
}

/// Reads one frame of at most `max_bytes`. `Ok(None)` means the peer closed the
/// connection cleanly between frames.
pub fn read_frame<T: DeserializeOwned>(
    reader: &mut impl Read,
    max_bytes: u32,
    device: &str,
) -> Result<Option<T>, WireError> {
    let mut len_bytes = [0u8; 4];
    match reader.read_exact(&mut len_bytes) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(WireError::Io(e)),
    }
    let len = u32::from_le_bytes(len_bytes);
    if len > max_bytes {
        return Err(WireError::Invalid(UpdateError::protocol(
            device,
            format!("a frame of {len} bytes is above the {max_bytes}-byte limit; refused unread"),
        )));
    }
    if len == 0 {
        return Err(WireError::Invalid(UpdateError::protocol(device, "an empty frame")));
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload).map_err(WireError::Io)?;
    if payload[0] != PROTOCOL_VERSION {
        return Err(WireError::Invalid(UpdateError::protocol(
            device,
            format!(
                "protocol version {} where {PROTOCOL_VERSION} was expected; update fleet and the agent together",
                payload[0]
            ),
        )));
    }
    postcard::from_bytes(&payload[1..]).map(Some).map_err(|e| {
        WireError::Invalid(UpdateError::protocol(device, format!("a frame does not decode: {e}")))
    })
}

/// A frame-level failure: the connection broke, or the peer sent something invalid.
#[derive(Debug)]
pub enum WireError {
    Io(std::io::Error),
    Invalid(UpdateError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Request::Status, "cam").expect("write");
        let back: Request =
            read_frame(&mut wire.as_slice(), 64, "cam").expect("read").expect("frame");
        assert_eq!(back, Request::Status);
    }

    #[test]
    fn an_oversized_length_is_refused_before_reading() {
        // Only the length prefix exists: the reader must refuse it without waiting for data.
        let wire = u32::MAX.to_le_bytes();
        match read_frame::<Request>(&mut wire.as_slice(), 1024, "cam-7") {
            Err(WireError::Invalid(e)) => {
                let text = e.to_string();
                assert!(
                    text.starts_with("cam-7:") && text.contains("above the 1024-byte limit"),
                    "{text}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn another_protocol_version_is_named() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Request::Challenge, "cam").expect("write");
        wire[4] = 9;
        match read_frame::<Request>(&mut wire.as_slice(), 64, "cam") {
            Err(WireError::Invalid(e)) => assert!(e.to_string().contains("protocol version 9")),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn chunk_ranges_cover_the_file() {
        let m = Manifest {
            model_version: 1,
            size_bytes: 10,
            file_sha256: [0; 32],
            chunk_bytes: 4,
            chunk_sha256: vec![[0; 32]; 3],
        };
        assert_eq!(Manifest::chunk_count(10, 4), 3);
        assert_eq!(m.chunk_range(0), 0..4);
        assert_eq!(m.chunk_range(2), 8..10);
    }
}
