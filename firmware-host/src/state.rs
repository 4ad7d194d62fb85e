//! The state directory: what the agent learned on the device, kept across restarts.
//!
//! Two files, each written atomically (temporary file, fsync, rename, fsync of the
//! directory) so a crash at any moment leaves the previous version or the new one:
//!
//! - `replay.bin`: the replay buffer's stream pairs ([`ReplayBuffer::to_bytes`]);
//! - `heads.bin`: the adapted heads and counters, tagged with the digest of the model they
//!   were adapted from, in a frame of magic, length and SHA-256.
//!
//! Each file is checked on its own at start. A file that fails its check (damaged, from
//! an incompatible version, of another embedding size) is renamed aside to
//! `NAME.rejected-UNIXSECONDS` with a warning, never deleted, and the agent starts that
//! part fresh. Heads adapted from another model are not damaged: when the model changes
//! (an update, a rollback) they are parked as `heads-MODELDIGEST.bin`, and taken back when
//! that model runs again, so a rollback resumes the old model's adaptation. The
//! [`MAX_PARKED_HEADS`] most recent are kept.

use std::path::{Path, PathBuf};

use anyhow::Context;
use selfclass_runtime::adapt::AdaptSnapshot;
use selfclass_runtime::fsutil::atomic_write;
use selfclass_runtime::replay::ReplayBuffer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const HEADS_MAGIC: &[u8; 8] = b"SCHEADS1";
const REPLAY_FILE: &str = "replay.bin";
const HEADS_FILE: &str = "heads.bin";
/// Heads of other models kept in a state directory.
pub const MAX_PARKED_HEADS: usize = 4;

/// The adapted heads with the identity of the model they belong to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadsState {
    pub model_digest: [u8; 32],
    pub model_version: u64,
    pub snapshot: AdaptSnapshot,
}

impl HeadsState {
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let body = postcard::to_allocvec(self).context("encoding the heads state")?;
        let mut out = Vec::with_capacity(body.len() + 48);
        out.extend_from_slice(HEADS_MAGIC);
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        Ok(out)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 48 || &bytes[..8] != HEADS_MAGIC {
            return Err("not a heads state file (too short or wrong magic)".into());
        }
        let (framed, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(framed).as_slice() != digest {
            return Err("digest mismatch: the file is damaged".into());
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&framed[8..16]);
        if u64::from_le_bytes(len) != (framed.len() - 16) as u64 {
            return Err("length field disagrees with the file size".into());
        }
        postcard::from_bytes(&framed[16..]).map_err(|e| format!("does not decode: {e}"))
    }
}

/// A state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// What was found at start.
#[derive(Debug, Default)]
pub struct Restored {
    pub replay: Option<ReplayBuffer>,
    pub heads: Option<HeadsState>,
    /// Files renamed aside, with why.
    pub rejected: Vec<(PathBuf, String)>,
    /// Heads of another model parked under their model's name, with that model's version.
    pub parked: Option<(PathBuf, u64)>,
    /// Parked heads of this model that were taken back.
    pub unparked: Option<PathBuf>,
}

impl StateDir {
    /// Opens (creating if needed) a state directory.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "state directory {}: cannot create it; choose a writable --state path",
                dir.display()
            )
        })?;
        Ok(StateDir { dir: dir.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn replay_path(&self) -> PathBuf {
        self.dir.join(REPLAY_FILE)
    }

    pub fn heads_path(&self) -> PathBuf {
        self.dir.join(HEADS_FILE)
    }

    /// Writes both files atomically.
    pub fn save(&self, replay: &ReplayBuffer, heads: &HeadsState) -> anyhow::Result<()> {
        atomic_write(&self.replay_path(), &replay.to_bytes())?;
        atomic_write(&self.heads_path(), &heads.to_bytes()?)?;
        Ok(())
    }

    /// Reads what is there, checking it against the model (`digest`, embedding `dim`).
    /// Never fails on bad content: such files are renamed aside and reported.
    pub fn restore(&self, model_digest: &[u8; 32], dim: usize) -> anyhow::Result<Restored> {
        let mut restored = Restored::default();

        let replay_path = self.replay_path();
        if let Some(bytes) = read_if_present(&replay_path)? {
            match ReplayBuffer::from_bytes(&bytes, &replay_path.display().to_string()) {
                Ok(r) if r.dim() == dim => restored.replay = Some(r),
                Ok(r) => {
                    let why =
                        format!("holds embeddings of dimension {}, the model makes {dim}", r.dim());
                    restored.rejected.push((self.set_aside(&replay_path)?, why));
                }
                Err(e) => restored.rejected.push((self.set_aside(&replay_path)?, e.to_string())),
            }
        }

        let heads_path = self.heads_path();
        if let Some(bytes) = read_if_present(&heads_path)? {
            match HeadsState::from_bytes(&bytes) {
                Ok(h) if &h.model_digest == model_digest => restored.heads = Some(h),
                Ok(h) => {
                    let parked = self.parked_path(&h.model_digest);
                    std::fs::rename(&heads_path, &parked).with_context(|| {
                        format!("state file {}: cannot park it", heads_path.display())
                    })?;
                    restored.parked = Some((parked, h.model_version));
                }
                Err(why) => restored.rejected.push((self.set_aside(&heads_path)?, why)),
            }
        }
        if restored.heads.is_none() {
            let parked = self.parked_path(model_digest);
            if let Some(bytes) = read_if_present(&parked)? {
                match HeadsState::from_bytes(&bytes) {
                    Ok(h) if &h.model_digest == model_digest => {
                        std::fs::rename(&parked, &heads_path).with_context(|| {
                            format!("state file {}: cannot take it back", parked.display())
                        })?;
                        restored.heads = Some(h);
                        restored.unparked = Some(parked);
                    }
                    Ok(_) => {
                        let why = "is named for another model than it holds".to_string();
                        restored.rejected.push((self.set_aside(&parked)?, why));
                    }
                    Err(why) => restored.rejected.push((self.set_aside(&parked)?, why)),
                }
            }
        }
        self.prune_parked()?;
        Ok(restored)
    }

    /// Where heads adapted from the model with `digest` wait while another model runs.
    pub fn parked_path(&self, digest: &[u8; 32]) -> PathBuf {
        let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("heads-{name}.bin"))
    }

    /// Deletes all but the [`MAX_PARKED_HEADS`] most recently parked heads.
    fn prune_parked(&self) -> anyhow::Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Ok(()) };
        let mut parked: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("heads-") && n.ends_with(".bin") && n.len() == 26
                })
            })
            .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        parked.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
        for (_, path) in parked.into_iter().skip(MAX_PARKED_HEADS) {
            std::fs::remove_file(&path)
                .with_context(|| format!("state file {}: cannot remove it", path.display()))?;
        }
        Ok(())
    }

    /// Renames a rejected file aside; returns its new name.
    fn set_aside(&self, path: &Path) -> anyhow::Result<PathBuf> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut aside = self.dir.join(format!("{name}.rejected-{stamp}"));
        let mut n = 1;
        while aside.exists() {
            aside = self.dir.join(format!("{name}.rejected-{stamp}-{n}"));
            n += 1;
        }
        std::fs::rename(path, &aside)
            .with_context(|| format!("state file {}: cannot rename it aside", path.display()))?;
        Ok(aside)
    }
}

fn read_if_present(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("state file {}: cannot read it", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;
    use rand::{rngs::StdRng, SeedableRng};
    use selfclass_runtime::adapt::HeadValues;

    fn sample_state() -> (ReplayBuffer, HeadsState) {
        let mut replay = ReplayBuffer::new(2, 8).expect("replay");
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..5 {
            replay
                .offer(&mut rng, array![0.6f32, 0.8].view(), array![0.8f32, 0.6].view())
                .expect("offer");
        }
        let heads = HeadsState {
            model_digest: [7; 32],
            model_version: 3,
            snapshot: AdaptSnapshot {
                steps: 12,
                rollbacks: 1,
                heads: vec![HeadValues { classes: 1, dim: 2, v: vec![1.0, 0.0], g: vec![2.0] }],
            },
        };
        (replay, heads)
    }

    #[test]
    fn saves_and_restores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(&dir.path().join("state")).expect("open");
        let (replay, heads) = sample_state();
        state.save(&replay, &heads).expect("save");
        let back = state.restore(&[7; 32], 2).expect("restore");
        assert_eq!(back.replay.expect("replay").len(), 5);
        assert_eq!(back.heads.expect("heads"), heads);
        assert!(back.rejected.is_empty());
    }

    #[test]
    fn heads_follow_their_model_through_an_update_and_a_rollback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("open");
        let (replay, heads) = sample_state();
        state.save(&replay, &heads).expect("save");
        // Model [8; 32] installed: the heads of [7; 32] wait aside, nothing is rejected.
        let back = state.restore(&[8; 32], 2).expect("restore");
        assert!(back.heads.is_none() && back.rejected.is_empty());
        assert!(back.parked.is_some());
        let mut newer = heads.clone();
        newer.model_digest = [8; 32];
        newer.snapshot.steps = 99;
        state.save(&replay, &newer).expect("save");
        // Rolled back to [7; 32]: its own heads come back, the others are parked.
        let back = state.restore(&[7; 32], 2).expect("restore");
        assert_eq!(back.heads.as_ref(), Some(&heads));
        assert_eq!(back.unparked, Some(state.parked_path(&[7; 32])));
        assert!(state.parked_path(&[8; 32]).exists() && state.heads_path().exists());
        // At most MAX_PARKED_HEADS are kept.
        for d in 10..20u8 {
            let mut other = heads.clone();
            other.model_digest = [d; 32];
            state.save(&replay, &other).expect("save");
            state.restore(&[d + 100; 32], 2).expect("restore");
        }
        let parked = std::fs::read_dir(dir.path())
            .expect("list")
            .filter(|e| {
                e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with("heads-"))
            })
            .count();
        assert_eq!(parked, MAX_PARKED_HEADS);
    }

    #[test]
    fn damaged_or_foreign_files_are_set_aside_not_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("open");
        let (replay, heads) = sample_state();
        state.save(&replay, &heads).expect("save");
        let mut bytes = std::fs::read(state.replay_path()).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(state.replay_path(), &bytes).expect("damage");

        let back = state.restore(&[9; 32], 2).expect("restore never fails on content");
        assert!(back.replay.is_none() && back.heads.is_none());
        assert_eq!(back.rejected.len(), 1);
        assert!(back.rejected[0].1.contains("digest"), "{:?}", back.rejected);
        for (path, _) in &back.rejected {
            assert!(path.exists(), "{} kept", path.display());
        }
        // The heads of model [7; 32] are parked, not rejected.
        let (parked, version) = back.parked.expect("parked");
        assert_eq!((parked.clone(), version), (state.parked_path(&[7; 32]), 3));
        assert!(parked.exists());
        assert!(!state.replay_path().exists() && !state.heads_path().exists());
        std::fs::remove_file(&parked).expect("remove");

        // A truncated heads file, and an empty one.
        for bytes in [&b""[..], &heads.to_bytes().expect("bytes")[..30]] {
            std::fs::write(state.heads_path(), bytes).expect("write");
            let back = state.restore(&[7; 32], 2).expect("restore");
            assert!(back.heads.is_none() && back.rejected.len() == 1);
        }
    }
}
