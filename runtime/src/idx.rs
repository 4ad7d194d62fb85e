//! IDX files (the MNIST and Fashion-MNIST layout), gzipped or not.
//!
//! An IDX file is a big-endian header (two zero bytes, a type code, the number of
//! dimensions, then each dimension as u32) followed by the data. Only unsigned bytes
//! (type 0x08) are read: images as `count x rows x cols`, labels as `count`.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Largest IDX payload read (a guard against absurd headers, far above any real set).
const MAX_IDX_BYTES: u64 = 4 << 30;

/// Images of an IDX file, row-major u8, `count` images of `rows x cols`.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }
}

/// Reads a whole IDX file, decompressing it if it is gzipped (by its magic bytes, not its
/// name), and returns its dimensions and data.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = std::fs::read(path).map_err(|e| Error::io("reading IDX file", path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .take(MAX_IDX_BYTES + 1024)
            .read_to_end(&mut out)
            .map_err(|e| Error::io("decompressing IDX file", path, e))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|reason| {
        Error::invalid(
            "IDX file",
            format!("{}: {reason}; expected an MNIST-layout IDX file", path.display()),
        )
    })
}

fn parse_idx(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<u8>), String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (bad magic)".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "element type 0x{:02x}; only unsigned bytes (0x08) are supported",
            bytes[2]
        ));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 || bytes.len() < 4 + 4 * ndim {
        return Err("truncated header".into());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let total = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or("dimensions overflow")?;
    let data = &bytes[4 + 4 * ndim..];
    if total > MAX_IDX_BYTES || data.len() as u64 != total {
        return Err(format!(
            "header promises {total} bytes of data ({dims:?}) but the file holds {}",
            data.len()
        ));
    }
    Ok((dims, data.to_vec()))
}

/// Reads an IDX image file (`count x rows x cols`).
pub fn read_images(path: &Path) -> Result<IdxImages> {
    let (dims, pixels) = read_idx(path)?;
    match dims.as_slice() {
        [count, rows, cols] if *rows > 0 && *cols > 0 => {
            Ok(IdxImages { count: *count, rows: *rows, cols: *cols, pixels })
        }
        _ => Err(Error::invalid(
            "IDX file",
            format!("{}: dimensions {dims:?} are not count x rows x cols images", path.display()),
        )),
    }
}

/// Reads an IDX label file (`count`).
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let (dims, labels) = read_idx(path)?;
    if dims.len() != 1 {
        return Err(Error::invalid(
            "IDX file",
            format!("{}: dimensions {dims:?} are not a label vector", path.display()),
        ));
    }
    Ok(labels)
}

/// Like [`read_images`], from a file's bytes (gzipped or not) already in memory, such as a
/// sample compiled into a program; `origin` names them in errors.
pub fn images_from_bytes(raw: &[u8], origin: &str) -> Result<IdxImages> {
    let (dims, pixels) = idx_from_bytes(raw, origin)?;
    match dims.as_slice() {
        [count, rows, cols] if *rows > 0 && *cols > 0 => {
            Ok(IdxImages { count: *count, rows: *rows, cols: *cols, pixels })
        }
        _ => Err(Error::invalid(
            "IDX file",
            format!("{origin}: dimensions {dims:?} are not count x rows x cols images"),
        )),
    }
}

/// Like [`read_labels`], from a file's bytes already in memory.
pub fn labels_from_bytes(raw: &[u8], origin: &str) -> Result<Vec<u8>> {
    let (dims, labels) = idx_from_bytes(raw, origin)?;
    if dims.len() != 1 {
        return Err(Error::invalid(
            "IDX file",
            format!("{origin}: dimensions {dims:?} are not a label vector"),
        ));
    }
    Ok(labels)
}

fn idx_from_bytes(raw: &[u8], origin: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    let mut inflated = Vec::new();
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(raw)
            .take(MAX_IDX_BYTES + 1024)
            .read_to_end(&mut inflated)
            .map_err(|e| Error::invalid("IDX file", format!("{origin}: decompressing: {e}")))?;
        inflated.as_slice()
    } else {
        raw
    };
    parse_idx(bytes).map_err(|reason| {
        Error::invalid("IDX file", format!("{origin}: {reason}; expected an MNIST-layout IDX file"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/fashion-mnist-sample").join(name)
    }

    #[test]
    fn reads_the_shipped_sample() {
        let images = read_images(&sample("t10k-images-idx3-ubyte.gz")).expect("images");
        let labels = read_labels(&sample("t10k-labels-idx1-ubyte.gz")).expect("labels");
        assert_eq!((images.count, images.rows, images.cols), (1000, 28, 28));
        assert_eq!(labels.len(), 1000);
        // Fashion-MNIST's first test image is an ankle boot (class 9).
        assert_eq!(labels[0], 9);
        assert!(labels.iter().all(|&l| l < 10));
    }

    #[test]
    fn rejects_truncated_and_foreign_files() {
        let mut bytes = vec![0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7]);
        assert!(parse_idx(&bytes).unwrap_err().contains("promises 8 bytes"));
        assert!(parse_idx(b"\x89PNG").is_err());
        assert!(parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0]).is_err());
        let huge =
            [0u8, 0, 8, 3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(parse_idx(&huge).is_err());
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = read_images(Path::new("/no/such/images.gz")).unwrap_err();
        assert!(err.to_string().contains("/no/such/images.gz"));
    }
}
