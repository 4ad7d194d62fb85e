//! Image data sets: IDX files (the MNIST and Fashion-MNIST layout, gzipped or not) and
//! folders of PNG or JPEG images. Labels, when a set has them, are only ever used to
//! report how well the learned clusters match; training never sees them.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Which part of a data set to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Split {
    /// The training images (`train-*` IDX files, or a `train/` folder or a flat folder).
    Train,
    /// The held-out images (`t10k-*` IDX files, or a `test/` folder).
    Test,
}

impl Split {
    fn idx_prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }

    fn folder_name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "test" | "t10k" => Ok(Split::Test),
            other => Err(Error::config(format!("unknown split {other:?}: use train or test"))),
        }
    }
}

/// Images held as 8-bit pixels, channel-major per image (`N x C x H x W`).
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Pixels of all images, one after another.
    pub pixels: Vec<u8>,
    /// Channels per image (1 or 3).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// One label per image when the set has labels.
    pub labels: Option<Vec<u32>>,
    /// Label names by index (folder names), when known.
    pub class_names: Vec<String>,
    /// Where the images came from, for messages and model cards.
    pub origin: PathBuf,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.len() / self.image_len().max(1)
    }

    /// Whether the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Pixels of image `index`.
    pub fn image(&self, index: usize) -> &[u8] {
        let len = self.image_len();
        &self.pixels[index * len..(index + 1) * len]
    }

    /// The first `count` images (all of them if there are fewer).
    pub fn take(&self, count: usize) -> Dataset {
        let count = count.min(self.len());
        Dataset {
            pixels: self.pixels[..count * self.image_len()].to_vec(),
            labels: self.labels.as_ref().map(|l| l[..count].to_vec()),
            class_names: self.class_names.clone(),
            origin: self.origin.clone(),
            ..*self
        }
    }

    /// Loads `split` from `path`: an IDX images file (its labels file is found beside it by
    /// the standard name), a directory holding the standard IDX names, or an image folder.
    pub fn load(path: &Path, split: Split) -> Result<Dataset> {
        if !path.exists() {
            return Err(Error::data(path, "no such file or directory"));
        }
        if path.is_file() {
            return load_idx_pair(path, labels_file_beside(path));
        }
        if let Some(images) = find_idx(path, split, "images-idx3-ubyte") {
            return load_idx_pair(&images, find_idx(path, split, "labels-idx1-ubyte"));
        }
        load_image_folder(path, split)
    }
}

fn find_idx(dir: &Path, split: Split, kind: &str) -> Option<PathBuf> {
    let prefix = split.idx_prefix();
    [
        format!("{prefix}-{kind}"),
        format!("{prefix}-{kind}.gz"),
        format!("{prefix}-{}", kind.replacen('-', ".", 1)),
    ]
    .into_iter()
    .map(|name| dir.join(name))
    .find(|p| p.is_file())
}

fn labels_file_beside(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let labels = name.replace("images-idx3", "labels-idx1");
    if labels == name {
        return None;
    }
    let plain = labels.trim_end_matches(".gz").to_string();
    [labels, format!("{plain}.gz"), plain]
        .into_iter()
        .map(|n| images.with_file_name(n))
        .find(|p| p.is_file())
}

fn read_maybe_gzipped(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::data(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes: returns its dimensions and its data.
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::data(path, "not an IDX file (bad magic number)"));
    }
    if bytes[2] != 0x08 {
        return Err(Error::data(
            path,
            format!(
                "IDX element type 0x{:02x}: only unsigned bytes (0x08) are supported",
                bytes[2]
            ),
        ));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(Error::data(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match expected {
        Some(n) if bytes.len() - header == n => Ok((dims, bytes[header..].to_vec())),
        Some(n) => Err(Error::data(
            path,
            format!(
                "dimensions {dims:?} need {n} bytes of data, the file has {}",
                bytes.len() - header
            ),
        )),
        None => Err(Error::data(path, format!("dimensions {dims:?} overflow"))),
    }
}

fn load_idx_pair(images: &Path, labels: Option<PathBuf>) -> Result<Dataset> {
    let (dims, pixels) = parse_idx(images, &read_maybe_gzipped(images)?)?;
    let (channels, height, width) = match dims[..] {
        [_, h, w] => (1, h, w),
        [_, c, h, w] if c == 1 || c == 3 => (c, h, w),
        _ => {
            return Err(Error::data(
                images,
                format!("image dimensions {dims:?}: expected N x H x W or N x C x H x W"),
            ))
        }
    };
    let count = dims[0];
    let labels = match labels {
        Some(path) => {
            let (label_dims, values) = parse_idx(&path, &read_maybe_gzipped(&path)?)?;
            if label_dims != [count] {
                return Err(Error::data(
                    &path,
                    format!("{label_dims:?} labels for {count} images"),
                ));
            }
            Some(values.into_iter().map(u32::from).collect())
        }
        None => None,
    };
    if count == 0 {
        return Err(Error::data(images, "no images"));
    }
    Ok(Dataset {
        pixels,
        channels,
        height,
        width,
        labels,
        class_names: Vec::new(),
        origin: images.to_path_buf(),
    })
}

fn is_image_file(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("listing", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    Ok(entries)
}

/// Loads a folder of images. With `train/` and `test/` sub-folders those are the splits;
/// otherwise the whole folder is the training split. Inside a split, sub-folders are
/// classes (their names become labels); images directly inside make an unlabelled set.
/// Every image is resized to the size of the first one, and converted to grey when the
/// first one is grey, to RGB otherwise.
fn load_image_folder(root: &Path, split: Split) -> Result<Dataset> {
    let split_dir = root.join(split.folder_name());
    let dir = if split_dir.is_dir() {
        split_dir
    } else if split == Split::Train {
        root.to_path_buf()
    } else {
        return Err(Error::data(
            root,
            "no test/ folder and no t10k-* IDX files for the test split",
        ));
    };

    let entries = sorted_entries(&dir)?;
    let class_dirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    let mut files: Vec<(PathBuf, Option<u32>)> = Vec::new();
    let mut class_names = Vec::new();
    if class_dirs.is_empty() {
        files.extend(entries.iter().filter(|p| is_image_file(p)).map(|p| (p.clone(), None)));
    } else {
        for (label, class_dir) in class_dirs.iter().enumerate() {
            class_names.push(
                class_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            );
            for file in sorted_entries(class_dir)?.into_iter().filter(|p| is_image_file(p)) {
                files.push((file, Some(label as u32)));
            }
        }
    }
    if files.is_empty() {
        return Err(Error::data(&dir, "no IDX files and no PNG or JPEG images found"));
    }

    let open = |path: &Path| {
        image::open(path).map_err(|e| Error::data(path, format!("cannot decode image: {e}")))
    };
    let first = open(&files[0].0)?;
    let (width, height) = (first.width() as usize, first.height() as usize);
    let channels = if first.color().has_color() { 3 } else { 1 };
    let mut pixels = Vec::with_capacity(files.len() * channels * height * width);
    for (path, _) in &files {
        let img = open(path)?;
        let img = if img.width() as usize != width || img.height() as usize != height {
            img.resize_exact(width as u32, height as u32, image::imageops::FilterType::Triangle)
        } else {
            img
        };
        if channels == 1 {
            pixels.extend_from_slice(img.to_luma8().as_raw());
        } else {
            let rgb = img.to_rgb8();
            let raw = rgb.as_raw();
            for c in 0..3 {
                pixels.extend(raw.iter().skip(c).step_by(3));
            }
        }
    }
    let labels = if class_dirs.is_empty() {
        None
    } else {
        Some(files.iter().map(|f| f.1.unwrap_or(0)).collect())
    };
    Ok(Dataset { pixels, channels, height, width, labels, class_names, origin: dir })
}

/// Writes an IDX file of unsigned bytes with the given dimensions, gzipped when `gzip`.
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8], gzip: bool) -> Result<()> {
    let mut bytes = vec![0u8, 0, 0x08, dims.len() as u8];
    for &d in dims {
        bytes.extend_from_slice(&(d as u32).to_be_bytes());
    }
    bytes.extend_from_slice(data);
    let out = if gzip {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&bytes).map_err(|e| Error::io("compressing", path, e))?;
        enc.finish().map_err(|e| Error::io("compressing", path, e))?
    } else {
        bytes
    };
    std::fs::write(path, out).map_err(|e| Error::io("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_round_trip_gzipped_and_plain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|v| v as u8).collect();
        write_idx(&dir.path().join("train-images-idx3-ubyte.gz"), &[2, 3, 4], &pixels, true)
            .expect("write");
        write_idx(&dir.path().join("train-labels-idx1-ubyte"), &[2], &[7, 1], false)
            .expect("write");
        let set = Dataset::load(dir.path(), Split::Train).expect("load");
        assert_eq!((set.len(), set.channels, set.height, set.width), (2, 1, 3, 4));
        assert_eq!(set.image(1), &pixels[12..]);
        assert_eq!(set.labels, Some(vec![7, 1]));
        // The images file alone finds its labels beside it.
        let alone = Dataset::load(&dir.path().join("train-images-idx3-ubyte.gz"), Split::Train)
            .expect("load");
        assert_eq!(alone.labels, Some(vec![7, 1]));
    }

    #[test]
    fn rejects_truncated_and_mislabelled_idx() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("train-images-idx3-ubyte");
        std::fs::write(&path, [0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3])
            .expect("write");
        let err = Dataset::load(dir.path(), Split::Train).expect_err("truncated");
        assert!(err.to_string().contains("need 8 bytes"), "{err}");

        write_idx(&path, &[2, 2, 2], &[0; 8], false).expect("write");
        write_idx(&dir.path().join("train-labels-idx1-ubyte"), &[3], &[0; 3], false)
            .expect("write");
        let err = Dataset::load(dir.path(), Split::Train).expect_err("label count");
        assert!(err.to_string().contains("labels for 2 images"), "{err}");

        let err = Dataset::load(&dir.path().join("missing"), Split::Train).expect_err("missing");
        assert!(err.to_string().contains("no such file"), "{err}");
    }

    #[test]
    fn image_folder_with_classes() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (class, shade) in [("cats", 10u8), ("dogs", 200u8)] {
            let class_dir = dir.path().join("train").join(class);
            std::fs::create_dir_all(&class_dir).expect("mkdir");
            for i in 0..2u8 {
                let img = image::GrayImage::from_pixel(5, 4, image::Luma([shade + i]));
                img.save(class_dir.join(format!("{i}.png"))).expect("save");
            }
        }
        let set = Dataset::load(dir.path(), Split::Train).expect("load");
        assert_eq!((set.len(), set.channels, set.height, set.width), (4, 1, 4, 5));
        assert_eq!(set.labels, Some(vec![0, 0, 1, 1]));
        assert_eq!(set.class_names, vec!["cats", "dogs"]);
        assert_eq!(set.image(3)[0], 201);
        assert!(Dataset::load(dir.path(), Split::Test).is_err());
    }
}
