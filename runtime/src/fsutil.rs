//! Crash-safe file writes.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Writes `bytes` to `path` so that a crash at any moment leaves either the old file or
/// the new one, never a mix: the data goes to a temporary file in the same directory, is
/// flushed to disk, renamed over `path`, and the directory entry is flushed too.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        Error::invalid("atomic write", format!("{} names no file", path.display()))
    })?;
    let tmp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));

    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io("writing", &tmp, e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io("renaming into place", path, e)
    })?;
    // The rename is durable only once the directory itself is flushed.
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("syncing directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_old_content_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.bin");
        atomic_write(&path, b"old").expect("first write");
        atomic_write(&path, b"new content").expect("second write");
        assert_eq!(fs::read(&path).expect("read"), b"new content");
        let names: Vec<_> = fs::read_dir(dir.path()).expect("list").collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let err = atomic_write(Path::new("/nonexistent-dir-selfclass/x.bin"), b"x").unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir-selfclass"), "{err}");
    }
}
