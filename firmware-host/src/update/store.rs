//! The device's update state, all in `STATE/update/`, and the crash-safe steps that change it.
//!
//! | file | what |
//! |---|---|
//! | `current.scb` | the installed model: the one the agent runs |
//! | `previous.scb` | the model installed before it, kept for a rollback |
//! | `state.json` | the version floor (anti-rollback), the last event, the last rollback |
//! | `probation.json` | present while an installed model is on probation |
//! | `incoming.part`, `incoming.manifest` | a transfer in progress and the offer it follows |
//!
//! Every step either writes a temporary file, flushes it and renames it over its name, or
//! renames a complete file over another, and then flushes the directory. So after a crash at
//! any moment `current.scb` is a complete bundle, old or new, and [`Store::open`] finishes
//! or undoes what was interrupted:
//!
//! - an install writes `probation.json` naming the new file's SHA-256 *before* it renames
//!   the new file over `current.scb`; finding that marker at start with `current.scb`
//!   matching it means the agent died during the probation (or right before it), so the
//!   store goes back to `previous.scb`; finding it with `current.scb` not matching means
//!   the rename never happened, and the marker is dropped;
//! - a rollback is one rename of `previous.scb` over `current.scb`;
//! - an interrupted transfer is checked chunk by chunk against its offer and cut back to
//!   the last good chunk, so the sender resumes from there.
//!
//! The version floor only rises: it is raised to a bundle's version before that bundle is
//! installed, so neither a failed probation nor a rollback order re-opens the door to
//! pushing that version (or an older one) again.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use selfclass_runtime::bundle::Bundle;
use selfclass_runtime::fsutil::atomic_write;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{Result, UpdateError};
use super::protocol::{Manifest, ModelInfo, TransferProgress};
use super::{hex, now_unix_ms};

const CURRENT: &str = "current.scb";
const PREVIOUS: &str = "previous.scb";
const PREVIOUS_TMP: &str = ".previous.scb.tmp";
const STATE: &str = "state.json";
const MARKER: &str = "probation.json";
const STAGED: &str = "incoming.part";
const STAGED_MANIFEST: &str = "incoming.manifest";
const REJECTED: &str = "rejected.scb";

/// What `state.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct StoredState {
    version_floor: u64,
    last_event: Option<String>,
    rolled_back: Option<RollbackNote>,
}

/// The last rollback, shown by `fleet status` until the next install.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackNote {
    pub from_version: u64,
    pub reason: String,
}

/// What `probation.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ProbationMarker {
    version: u64,
    file_sha256: String,
    previous_version: Option<u64>,
    started_unix_ms: u64,
}

struct Staged {
    manifest: Manifest,
    chunks_stored: u32,
    file: File,
}

/// The update state of one device.
pub struct Store {
    device: String,
    dir: PathBuf,
    state: StoredState,
    current: Option<ModelInfo>,
    previous: Option<ModelInfo>,
    staged: Option<Staged>,
}

impl Store {
    /// Opens (creating if needed) the update state under `state_dir`, finishing or undoing
    /// whatever a crash interrupted. `seed` is installed when the device has no model yet.
    /// Returns the store and what recovery did, one line per action, for the log.
    pub fn open(
        device: &str,
        state_dir: &Path,
        seed: Option<&Path>,
    ) -> Result<(Store, Vec<String>)> {
        let dir = state_dir.join("update");
        fs::create_dir_all(&dir)
            .map_err(|e| UpdateError::io(device, "creating update directory", &dir, e))?;
        let mut notes = Vec::new();
        let mut store = Store {
            device: device.to_string(),
            dir,
            state: StoredState::default(),
            current: None,
            previous: None,
            staged: None,
        };
        store.remove_stale_temporaries()?;
        store.state = store.read_state(&mut notes);
        store.current = store.inspect(CURRENT, &mut notes)?;
        store.previous = store.inspect(PREVIOUS, &mut notes)?;
        store.recover_probation(&mut notes)?;

        if store.current.is_none() && store.previous.is_some() {
            store.rename(PREVIOUS, CURRENT)?;
            store.sync_dir()?;
            store.current = store.previous.take();
            notes.push("no installed model; the previous one is installed again".into());
        }
        if store.current.is_none() {
            if let Some(seed) = seed {
                store.install_seed(seed)?;
                // The normal first start of a device: not a warning.
                tracing::info!(device, model = %seed.display(), "update state: installed the shipped model");
            }
        }
        if let Some(current) = store.current {
            if current.version > store.state.version_floor {
                store.state.version_floor = current.version;
                store.save_state()?;
            }
        }
        store.recover_transfer(&mut notes)?;
        Ok((store, notes))
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// Path of the installed model.
    pub fn current_path(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    pub fn current(&self) -> Option<ModelInfo> {
        self.current
    }

    pub fn previous(&self) -> Option<ModelInfo> {
        self.previous
    }

    /// Pushed bundles must have a version above this.
    pub fn version_floor(&self) -> u64 {
        self.state.version_floor
    }

    pub fn last_event(&self) -> Option<&str> {
        self.state.last_event.as_deref()
    }

    pub fn rolled_back(&self) -> Option<&RollbackNote> {
        self.state.rolled_back.as_ref()
    }

    /// The installed model, decoded.
    pub fn current_bundle(&self) -> Result<Bundle> {
        Bundle::load(&self.current_path()).map_err(|e| UpdateError::runtime(&self.device, e))
    }

    /// The transfer in progress, if any.
    pub fn transfer(&self) -> Option<TransferProgress> {
        self.staged.as_ref().map(|s| TransferProgress {
            model_version: s.manifest.model_version,
            chunks_stored: s.chunks_stored,
            chunks: s.manifest.chunk_sha256.len() as u32,
        })
    }

    /// Opens a transfer for `manifest`, or resumes it if it is the one already staged.
    /// Returns the index of the next chunk wanted.
    pub fn begin_transfer(&mut self, manifest: &Manifest) -> Result<u32> {
        if let Some(staged) = &self.staged {
            if &staged.manifest == manifest {
                return Ok(staged.chunks_stored);
            }
        }
        self.discard_transfer()?;
        let encoded = postcard::to_allocvec(manifest)
            .map_err(|e| UpdateError::protocol(&self.device, format!("encoding an offer: {e}")))?;
        atomic_write(&self.dir.join(STAGED_MANIFEST), &encoded)
            .map_err(|e| UpdateError::runtime(&self.device, e))?;
        let path = self.dir.join(STAGED);
        let file = File::create(&path)
            .map_err(|e| UpdateError::io(&self.device, "creating transfer file", &path, e))?;
        self.staged = Some(Staged { manifest: manifest.clone(), chunks_stored: 0, file });
        Ok(0)
    }

    /// Stores one chunk after checking it against the offer. A chunk already stored is
    /// accepted again (its acknowledgement may have been lost with a cut connection).
    /// Returns the index of the next chunk wanted.
    pub fn store_chunk(&mut self, transfer: &[u8; 32], index: u32, data: &[u8]) -> Result<u32> {
        let device = self.device.clone();
        let what = format!("chunk {index} of transfer {}", &hex(transfer)[..16]);
        let staged = match &mut self.staged {
            Some(s) if &s.manifest.file_sha256 == transfer => s,
            _ => {
                return Err(UpdateError::refused(
                    &device,
                    what,
                    "no such transfer is open; send a signed offer first",
                ))
            }
        };
        let count = staged.manifest.chunk_sha256.len() as u32;
        if index >= count {
            return Err(UpdateError::refused(
                &device,
                what,
                format!("the transfer has {count} chunks"),
            ));
        }
        let range = staged.manifest.chunk_range(index);
        if data.len() as u64 != range.end - range.start {
            return Err(UpdateError::refused(
                &device,
                what,
                format!(
                    "{} bytes where the offer announced {}",
                    data.len(),
                    range.end - range.start
                ),
            ));
        }
        if Sha256::digest(data).as_slice() != staged.manifest.chunk_sha256[index as usize] {
            return Err(UpdateError::refused(
                &device,
                what,
                "the chunk does not match its digest in the offer (damaged in transit)",
            ));
        }
        if index < staged.chunks_stored {
            return Ok(staged.chunks_stored);
        }
        if index > staged.chunks_stored {
            return Err(UpdateError::refused(
                &device,
                what,
                format!("chunk {} is the next one wanted", staged.chunks_stored),
            ));
        }
        let path = self.dir.join(STAGED);
        staged
            .file
            .write_all(data)
            .map_err(|e| UpdateError::io(&device, "writing transfer file", &path, e))?;
        staged.chunks_stored += 1;
        if staged.chunks_stored == count {
            staged
                .file
                .sync_all()
                .map_err(|e| UpdateError::io(&device, "flushing transfer file", &path, e))?;
        }
        Ok(staged.chunks_stored)
    }

    /// The completely transferred file with SHA-256 `file_sha256`, checked whole. A file
    /// that does not match is discarded, so the next offer starts afresh.
    pub fn staged_file(&mut self, file_sha256: &[u8; 32]) -> Result<(Manifest, Vec<u8>)> {
        let what = format!("install of file {}", &hex(file_sha256)[..16]);
        let staged = match &self.staged {
            Some(s) if &s.manifest.file_sha256 == file_sha256 => s,
            _ => {
                return Err(UpdateError::refused(
                    &self.device,
                    what,
                    "no transfer of that file is held; offer and send it first",
                ))
            }
        };
        let count = staged.manifest.chunk_sha256.len() as u32;
        if staged.chunks_stored != count {
            return Err(UpdateError::refused(
                &self.device,
                what,
                format!("the transfer holds {} of {count} chunks", staged.chunks_stored),
            ));
        }
        let manifest = staged.manifest.clone();
        let path = self.dir.join(STAGED);
        let bytes = fs::read(&path)
            .map_err(|e| UpdateError::io(&self.device, "reading transfer file", &path, e))?;
        if bytes.len() as u64 != manifest.size_bytes
            || Sha256::digest(&bytes).as_slice() != file_sha256
        {
            self.discard_transfer()?;
            return Err(UpdateError::refused(
                &self.device,
                what,
                "the transferred file does not match the digest of the whole file; send it again",
            ));
        }
        Ok((manifest, bytes))
    }

    /// Drops the transfer in progress, if any.
    pub fn discard_transfer(&mut self) -> Result<()> {
        self.staged = None;
        for name in [STAGED, STAGED_MANIFEST] {
            self.remove_if_present(name)?;
        }
        Ok(())
    }

    /// Installs the staged file (already checked whole, decoded and verified by the
    /// caller) as the current model and puts it on probation; the old current model
    /// becomes the previous one.
    pub fn install(&mut self, installed: ModelInfo) -> Result<()> {
        if self.staged.as_ref().map(|s| s.manifest.file_sha256) != Some(installed.file_sha256) {
            return Err(UpdateError::refused(
                &self.device,
                format!("install of v{}", installed.version),
                "the transfer it came from is gone",
            ));
        }
        // The floor first: once the new file can be current, its version can never be
        // pushed again.
        self.state.version_floor = self.state.version_floor.max(installed.version);
        self.state.rolled_back = None;
        self.save_state()?;

        if self.current.is_some() {
            self.remove_if_present(PREVIOUS_TMP)?;
            let (from, to) = (self.dir.join(CURRENT), self.dir.join(PREVIOUS_TMP));
            if fs::hard_link(&from, &to).is_err() {
                copy_synced(&from, &to).map_err(|e| {
                    UpdateError::io(&self.device, "keeping the previous model", &to, e)
                })?;
            }
            self.rename(PREVIOUS_TMP, PREVIOUS)?;
            self.sync_dir()?;
            self.previous = self.current;
        }

        let marker = ProbationMarker {
            version: installed.version,
            file_sha256: hex(&installed.file_sha256),
            previous_version: self.previous.map(|p| p.version),
            started_unix_ms: now_unix_ms(),
        };
        self.write_json(MARKER, &marker)?;

        if let Some(staged) = &self.staged {
            let path = self.dir.join(STAGED);
            staged
                .file
                .sync_all()
                .map_err(|e| UpdateError::io(&self.device, "flushing transfer file", &path, e))?;
        }
        self.rename(STAGED, CURRENT)?;
        self.sync_dir()?;
        self.staged = None;
        self.remove_if_present(STAGED_MANIFEST)?;
        self.current = Some(installed);
        self.state.last_event = Some(format!("installed v{}; on probation", installed.version));
        self.save_state()
    }

    /// Ends a probation that passed: the installed model stays.
    pub fn commit(&mut self) -> Result<()> {
        self.remove_if_present(MARKER)?;
        if let Some(current) = self.current {
            self.state.last_event = Some(format!("v{} passed probation", current.version));
        }
        self.save_state()
    }

    /// Goes back to the previous model. Returns the versions (from, to).
    pub fn rollback(&mut self, reason: &str) -> Result<(u64, u64)> {
        let from = self.current.map_or(0, |c| c.version);
        let Some(previous) = self.previous else {
            return Err(UpdateError::refused(
                &self.device,
                format!("rollback from v{from}"),
                "no previous model is kept on this device",
            ));
        };
        self.rename(PREVIOUS, CURRENT)?;
        self.sync_dir()?;
        self.remove_if_present(MARKER)?;
        self.current = Some(previous);
        self.previous = None;
        self.state.rolled_back =
            Some(RollbackNote { from_version: from, reason: reason.to_string() });
        self.state.last_event =
            Some(format!("rolled back from v{from} to v{}: {reason}", previous.version));
        self.save_state()?;
        Ok((from, previous.version))
    }

    /// Moves an installed model that cannot run at all out of the way when there is
    /// nothing to roll back to, so the next start does not try it again.
    pub fn reject_current(&mut self, reason: &str) -> Result<()> {
        if self.current.is_none() {
            return Ok(());
        }
        self.rename(CURRENT, REJECTED)?;
        self.sync_dir()?;
        self.remove_if_present(MARKER)?;
        let from = self.current.take().map_or(0, |c| c.version);
        self.state.rolled_back =
            Some(RollbackNote { from_version: from, reason: reason.to_string() });
        self.state.last_event = Some(format!("v{from} rejected, no model left to run: {reason}"));
        self.save_state()
    }

    // ---- recovery ------------------------------------------------------------------------

    fn remove_stale_temporaries(&self) -> Result<()> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| UpdateError::io(&self.device, "listing", &self.dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| {
                    UpdateError::io(&self.device, "removing stale temporary", &path, e)
                })?;
            }
        }
        Ok(())
    }

    fn read_state(&self, notes: &mut Vec<String>) -> StoredState {
        let path = self.dir.join(STATE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                // Written atomically, so this takes a damaged disk; the floor falls back to
                // the installed version below.
                notes.push(format!(
                    "{} is unreadable ({e}); starting from the installed model",
                    path.display()
                ));
                StoredState::default()
            }),
            Err(_) => StoredState::default(),
        }
    }

    /// Decodes a model file; one that does not decode is moved aside (it cannot be run).
    fn inspect(&self, name: &str, notes: &mut Vec<String>) -> Result<Option<ModelInfo>> {
        let path = self.dir.join(name);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(UpdateError::io(&self.device, "reading model", &path, e)),
        };
        match Bundle::from_bytes(&bytes, &path.display().to_string()) {
            Ok(bundle) => {
                Ok(Some(ModelInfo { version: bundle.model_version, file_sha256: sha256(&bytes) }))
            }
            Err(e) => {
                notes.push(format!("{e}; moved to {REJECTED}"));
                self.rename(name, REJECTED)?;
                self.sync_dir()?;
                Ok(None)
            }
        }
    }

    fn recover_probation(&mut self, notes: &mut Vec<String>) -> Result<()> {
        let path = self.dir.join(MARKER);
        let marker: Option<ProbationMarker> = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).ok(),
            Err(_) => return Ok(()),
        };
        let interrupted = match (&marker, self.current) {
            (Some(m), Some(current)) => m.file_sha256 == hex(&current.file_sha256),
            // An unreadable marker: the install it guarded may have finished; the installed
            // model has not proven itself either way.
            (None, Some(_)) => true,
            (_, None) => false,
        };
        if interrupted && self.previous.is_some() {
            let version = self.current.map_or(0, |c| c.version);
            let reason = format!(
                "the agent stopped during the probation of v{version} (crash, kill or power loss)"
            );
            let (from, to) = self.rollback(&reason)?;
            notes.push(format!("rolled back from v{from} to v{to}: {reason}"));
        } else {
            if interrupted {
                notes.push("the agent stopped during a probation, and no previous model is kept; keeping the installed one".into());
            }
            self.remove_if_present(MARKER)?;
        }
        Ok(())
    }

    /// Re-checks a transfer an earlier run left, keeping the chunks that still match.
    fn recover_transfer(&mut self, notes: &mut Vec<String>) -> Result<()> {
        let manifest_path = self.dir.join(STAGED_MANIFEST);
        let staged_path = self.dir.join(STAGED);
        let manifest: Option<Manifest> =
            fs::read(&manifest_path).ok().and_then(|b| postcard::from_bytes(&b).ok());
        let (Some(manifest), true) = (manifest, staged_path.exists()) else {
            return self.discard_transfer();
        };
        let mut file =
            OpenOptions::new().read(true).write(true).open(&staged_path).map_err(|e| {
                UpdateError::io(&self.device, "opening transfer file", &staged_path, e)
            })?;
        let mut good = 0u32;
        let mut buffer = Vec::new();
        for (index, expected) in manifest.chunk_sha256.iter().enumerate() {
            let range = manifest.chunk_range(index as u32);
            buffer.resize((range.end - range.start) as usize, 0);
            if file.read_exact(&mut buffer).is_err()
                || Sha256::digest(&buffer).as_slice() != expected
            {
                break;
            }
            good += 1;
        }
        let keep = manifest.chunk_range(good).start.min(manifest.size_bytes);
        file.set_len(keep)
            .and_then(|()| file.sync_all())
            .map_err(|e| UpdateError::io(&self.device, "cutting transfer file", &staged_path, e))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&staged_path)
            .map_err(|e| UpdateError::io(&self.device, "opening transfer file", &staged_path, e))?;
        notes.push(format!(
            "kept a transfer of v{}: {good} of {} chunks",
            manifest.model_version,
            manifest.chunk_sha256.len()
        ));
        self.staged = Some(Staged { manifest, chunks_stored: good, file });
        Ok(())
    }

    fn install_seed(&mut self, seed: &Path) -> Result<()> {
        let bytes = fs::read(seed)
            .map_err(|e| UpdateError::io(&self.device, "reading shipped model", seed, e))?;
        let bundle = Bundle::from_bytes(&bytes, &seed.display().to_string())
            .map_err(|e| UpdateError::runtime(&self.device, e))?;
        atomic_write(&self.current_path(), &bytes)
            .map_err(|e| UpdateError::runtime(&self.device, e))?;
        self.current =
            Some(ModelInfo { version: bundle.model_version, file_sha256: sha256(&bytes) });
        self.state.last_event =
            Some(format!("installed the shipped model v{}", bundle.model_version));
        self.save_state()
    }

    // ---- file steps ----------------------------------------------------------------------

    fn save_state(&self) -> Result<()> {
        self.write_json(STATE, &self.state)
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| UpdateError::protocol(&self.device, format!("encoding {name}: {e}")))?;
        atomic_write(&self.dir.join(name), &bytes)
            .map_err(|e| UpdateError::runtime(&self.device, e))
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (from_path, to_path) = (self.dir.join(from), self.dir.join(to));
        fs::rename(&from_path, &to_path)
            .map_err(|e| UpdateError::io(&self.device, "renaming into place", &to_path, e))
    }

    fn remove_if_present(&self, name: &str) -> Result<()> {
        let path = self.dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(UpdateError::io(&self.device, "removing", &path, e)),
        }
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| UpdateError::io(&self.device, "flushing directory", &self.dir, e))
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn copy_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::copy(from, to)?;
    File::open(to)?.sync_all()
}
