//! Where frames come from: the shipped demo sample, an image folder, an IDX file, a Y4M
//! stream (file or standard input) and, with the `camera` feature, a camera.
//!
//! Every source fills a caller-owned [`CapturedFrame`], so the capture loop recycles its
//! buffers instead of allocating per frame. Sources deliver frames in the pixel format the
//! model needs (gray for one-channel models, RGB for three) where they can choose it.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use selfclass_runtime::idx;
use selfclass_runtime::preprocess::PixelFormat;

use crate::y4m::Y4mReader;

/// The Fashion-MNIST sample test images (1,000, with labels) compiled into the program, so
/// `--source demo` needs no file at run time.
const DEMO_IMAGES: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/fashion-mnist-sample/t10k-images-idx3-ubyte.gz"
));
const DEMO_LABELS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/fashion-mnist-sample/t10k-labels-idx1-ubyte.gz"
));

/// One frame with what is known about it.
#[derive(Debug, Clone)]
pub struct CapturedFrame {
    /// Capture sequence number from 0; gaps in the predictions' numbers are drops.
    pub number: u64,
    pub captured_at: Instant,
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    pub data: Vec<u8>,
    /// Ground-truth class, when the source has labels.
    pub label: Option<u32>,
    /// Index of the item within its source (image number, file number).
    pub item: u64,
}

impl Default for CapturedFrame {
    fn default() -> Self {
        CapturedFrame {
            number: 0,
            captured_at: Instant::now(),
            width: 0,
            height: 0,
            format: PixelFormat::Gray8,
            data: Vec::new(),
            label: None,
            item: 0,
        }
    }
}

/// A stream of frames.
pub trait FrameSource: Send {
    /// Fills `frame` (all but `number` and `captured_at`) with the next frame; `Ok(false)`
    /// when the source has ended.
    fn next_into(&mut self, frame: &mut CapturedFrame) -> anyhow::Result<bool>;

    /// Says what the source is, for the log.
    fn describe(&self) -> String;

    /// The rate the source runs at by itself, if it has one (cameras, Y4M headers).
    fn native_fps(&self) -> Option<f64> {
        None
    }

    /// Whether the source is live (a camera or a pipe): it cannot wait for the consumer.
    fn is_live(&self) -> bool {
        false
    }
}

/// What `--source` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    Demo,
    Stdin,
    Path(PathBuf),
}

impl SourceSpec {
    pub fn parse(text: &str) -> SourceSpec {
        match text {
            "demo" => SourceSpec::Demo,
            "-" => SourceSpec::Stdin,
            other => SourceSpec::Path(PathBuf::from(other)),
        }
    }
}

/// Opens the source `spec` names, delivering frames with `channels` (1 or 3) channels.
pub fn open(
    spec: &SourceSpec,
    channels: u8,
    loop_demo: bool,
) -> anyhow::Result<Box<dyn FrameSource>> {
    Ok(match spec {
        SourceSpec::Demo => Box::new(IdxSource::demo(loop_demo)?),
        SourceSpec::Stdin => Box::new(Y4mSource::new(
            BufReader::new(std::io::stdin()),
            "standard input".into(),
            channels,
            true,
        )?),
        SourceSpec::Path(path) => {
            let meta = std::fs::metadata(path).with_context(|| {
                format!("source {}: cannot open it; give an image folder, an IDX file, a .y4m file, '-' or 'demo'", path.display())
            })?;
            if meta.is_dir() {
                Box::new(FolderSource::new(path, channels)?)
            } else if looks_like_y4m(path)? {
                let file = std::fs::File::open(path)
                    .with_context(|| format!("source {}: cannot open it", path.display()))?;
                Box::new(Y4mSource::new(
                    BufReader::new(file),
                    path.display().to_string(),
                    channels,
                    false,
                )?)
            } else {
                Box::new(IdxSource::from_file(path)?)
            }
        }
    })
}

fn looks_like_y4m(path: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 9];
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("source {}: cannot open it", path.display()))?;
    let n = file
        .read(&mut magic)
        .with_context(|| format!("source {}: cannot read it", path.display()))?;
    Ok(&magic[..n] == b"YUV4MPEG2")
}

/// The labels file that goes with an IDX images file (`...-images-idx3-ubyte[.gz]` beside
/// `...-labels-idx1-ubyte[.gz]`), if there is one.
pub fn labels_beside(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let labels = name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1");
    if labels == name {
        return None;
    }
    let path = images.with_file_name(labels);
    path.is_file().then_some(path)
}

/// Gray images from IDX files (Fashion-MNIST layout), optionally looped.
pub struct IdxSource {
    images: idx::IdxImages,
    labels: Option<Vec<u8>>,
    next: usize,
    looped: bool,
    origin: String,
}

impl IdxSource {
    /// The compiled-in demo sample, looped when `looped`.
    pub fn demo(looped: bool) -> anyhow::Result<Self> {
        let images = idx::images_from_bytes(DEMO_IMAGES, "demo images")?;
        let labels = idx::labels_from_bytes(DEMO_LABELS, "demo labels")?;
        Ok(IdxSource {
            images,
            labels: Some(labels),
            next: 0,
            looped,
            origin: "demo: 1,000 Fashion-MNIST test images".into(),
        })
    }

    /// An IDX images file and the labels file beside it, when there is one.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let images = idx::read_images(path).with_context(|| {
            format!("source {}: not an image folder, Y4M stream or IDX images file", path.display())
        })?;
        let labels = match labels_beside(path) {
            Some(lp) => {
                let labels = idx::read_labels(&lp)?;
                if labels.len() != images.count {
                    bail!("labels {} hold {} labels for {} images; use the labels file of the same set", lp.display(), labels.len(), images.count);
                }
                Some(labels)
            }
            None => None,
        };
        Ok(IdxSource { images, labels, next: 0, looped: false, origin: path.display().to_string() })
    }

    pub fn len(&self) -> usize {
        self.images.count
    }

    pub fn is_empty(&self) -> bool {
        self.images.count == 0
    }

    pub fn has_labels(&self) -> bool {
        self.labels.is_some()
    }
}

impl FrameSource for IdxSource {
    fn next_into(&mut self, frame: &mut CapturedFrame) -> anyhow::Result<bool> {
        if self.next >= self.images.count {
            if !self.looped || self.images.count == 0 {
                return Ok(false);
            }
            self.next = 0;
        }
        let i = self.next;
        self.next += 1;
        frame.width = self.images.cols as u32;
        frame.height = self.images.rows as u32;
        frame.format = PixelFormat::Gray8;
        frame.data.clear();
        frame.data.extend_from_slice(self.images.image(i));
        frame.label = self.labels.as_ref().map(|l| l[i] as u32);
        frame.item = i as u64;
        Ok(true)
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} images of {}x{})",
            self.origin, self.images.count, self.images.cols, self.images.rows
        )
    }
}

/// PNG and JPEG files of a folder in name order. A folder of sub-folders is a labelled
/// set: each sub-folder is a class (classes numbered in name order).
pub struct FolderSource {
    files: Vec<(PathBuf, Option<u32>)>,
    class_names: Vec<String>,
    next: usize,
    channels: u8,
    origin: String,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("source {}: cannot list the folder", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    Ok(entries)
}

impl FolderSource {
    pub fn new(dir: &Path, channels: u8) -> anyhow::Result<Self> {
        let entries = sorted_entries(dir)?;
        let mut files: Vec<(PathBuf, Option<u32>)> = entries
            .iter()
            .filter(|p| p.is_file() && is_image(p))
            .map(|p| (p.clone(), None))
            .collect();
        let mut class_names = Vec::new();
        if files.is_empty() {
            for sub in entries.iter().filter(|p| p.is_dir()) {
                let images: Vec<PathBuf> = sorted_entries(sub)?
                    .into_iter()
                    .filter(|p| p.is_file() && is_image(p))
                    .collect();
                if images.is_empty() {
                    continue;
                }
                let class = class_names.len() as u32;
                class_names.push(
                    sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                );
                files.extend(images.into_iter().map(|p| (p, Some(class))));
            }
        }
        if files.is_empty() {
            // A folder of IDX files (the layout the trainer reads): name the images file.
            let idx = entries.iter().find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains("images-idx3-ubyte") && !n.starts_with("train"))
            });
            if let Some(idx) = idx.or_else(|| {
                entries.iter().find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.contains("-idx3-ubyte"))
                })
            }) {
                bail!(
                    "source {}: the folder holds IDX files, not PNG or JPEG images; name the images file itself, e.g. --source {}",
                    dir.display(),
                    idx.display()
                );
            }
            bail!(
                "source {}: the folder holds no PNG or JPEG image (nor sub-folders of them); put images in it or name another source",
                dir.display()
            );
        }
        Ok(FolderSource {
            files,
            class_names,
            next: 0,
            channels,
            origin: dir.display().to_string(),
        })
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Sub-folder names, when the folder is labelled.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }
}

/// Decodes an image file into `frame` as gray or RGB.
pub fn load_image_into(path: &Path, channels: u8, frame: &mut CapturedFrame) -> anyhow::Result<()> {
    let image = image::ImageReader::open(path)
        .with_context(|| format!("image {}: cannot open it", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("image {}: cannot read it", path.display()))?
        .decode()
        .with_context(|| format!("image {}: cannot decode it; the file is damaged or not a PNG/JPEG, replace or remove it", path.display()))?;
    frame.width = image.width();
    frame.height = image.height();
    frame.data.clear();
    if channels == 1 {
        frame.format = PixelFormat::Gray8;
        frame.data.extend_from_slice(image.to_luma8().as_raw());
    } else {
        frame.format = PixelFormat::Rgb8;
        frame.data.extend_from_slice(image.to_rgb8().as_raw());
    }
    Ok(())
}

impl FrameSource for FolderSource {
    fn next_into(&mut self, frame: &mut CapturedFrame) -> anyhow::Result<bool> {
        let Some((path, label)) = self.files.get(self.next) else { return Ok(false) };
        load_image_into(path, self.channels, frame)?;
        frame.label = *label;
        frame.item = self.next as u64;
        self.next += 1;
        Ok(true)
    }

    fn describe(&self) -> String {
        let labelled = if self.class_names.is_empty() {
            String::new()
        } else {
            format!(", labelled by {} sub-folders", self.class_names.len())
        };
        format!("{} ({} images{labelled})", self.origin, self.files.len())
    }
}

/// Frames of a Y4M stream.
pub struct Y4mSource<R> {
    reader: Y4mReader<R>,
    origin: String,
    channels: u8,
    live: bool,
    next: u64,
}

impl<R: std::io::BufRead + Send> Y4mSource<R> {
    pub fn new(input: R, origin: String, channels: u8, live: bool) -> anyhow::Result<Self> {
        let reader = Y4mReader::new(input).with_context(|| format!("source {origin}"))?;
        Ok(Y4mSource { reader, origin, channels, live, next: 0 })
    }
}

impl<R: std::io::BufRead + Send> FrameSource for Y4mSource<R> {
    fn next_into(&mut self, frame: &mut CapturedFrame) -> anyhow::Result<bool> {
        let header = *self.reader.header();
        let more = if self.channels == 1 {
            frame.format = PixelFormat::Gray8;
            self.reader.next_gray(&mut frame.data)
        } else {
            frame.format = PixelFormat::Rgb8;
            self.reader.next_rgb(&mut frame.data)
        }
        .with_context(|| format!("source {}", self.origin))?;
        frame.width = header.width;
        frame.height = header.height;
        frame.label = None;
        frame.item = self.next;
        self.next += 1;
        Ok(more)
    }

    fn describe(&self) -> String {
        let h = self.reader.header();
        let fps = h.fps.map_or("unknown rate".into(), |f| format!("{f:.2} frames/s"));
        format!("Y4M {} ({}x{}, {:?}, {fps})", self.origin, h.width, h.height, h.chroma)
    }

    fn native_fps(&self) -> Option<f64> {
        self.reader.header().fps
    }

    fn is_live(&self) -> bool {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_loops_over_labelled_images() {
        let mut demo = IdxSource::demo(true).expect("demo");
        assert_eq!(demo.len(), 1000);
        let mut frame = CapturedFrame::default();
        for _ in 0..1001 {
            assert!(demo.next_into(&mut frame).expect("frame"));
        }
        assert_eq!((frame.item, frame.width, frame.height, frame.data.len()), (0, 28, 28, 784));
        assert_eq!(frame.label, Some(9), "the first test image is an ankle boot");
        let mut once = IdxSource::demo(false).expect("demo");
        let mut count = 0;
        while once.next_into(&mut frame).expect("frame") {
            count += 1;
        }
        assert_eq!(count, 1000);
    }

    #[test]
    fn labelled_folders_number_classes_in_name_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (class, names) in [("b-shirts", ["2.png", "1.png"]), ("a-boots", ["x.png", "y.jpg"])] {
            std::fs::create_dir(dir.path().join(class)).expect("mkdir");
            for (i, name) in names.iter().enumerate() {
                let img = image::GrayImage::from_pixel(4, 3, image::Luma([i as u8 * 100]));
                img.save(dir.path().join(class).join(name)).expect("save");
            }
        }
        std::fs::write(dir.path().join("notes.txt"), "not an image").expect("write");
        let mut folder = FolderSource::new(dir.path(), 1).expect("folder");
        assert_eq!(folder.class_names(), &["a-boots".to_string(), "b-shirts".to_string()]);
        let mut frame = CapturedFrame::default();
        let mut seen = Vec::new();
        while folder.next_into(&mut frame).expect("frame") {
            seen.push((frame.label, frame.width, frame.height));
        }
        assert_eq!(seen, vec![(Some(0), 4, 3), (Some(0), 4, 3), (Some(1), 4, 3), (Some(1), 4, 3)]);
    }

    #[test]
    fn a_broken_image_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("bad.png"), b"\x89PNG\r\n\x1a\nbroken").expect("write");
        let mut folder = FolderSource::new(dir.path(), 1).expect("folder");
        let err = folder.next_into(&mut CapturedFrame::default()).unwrap_err();
        assert!(format!("{err:#}").contains("bad.png"), "{err:#}");
    }

    #[test]
    fn empty_folders_and_missing_paths_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = open(&SourceSpec::Path(dir.path().into()), 1, false).err().expect("error");
        assert!(format!("{err:#}").contains("no PNG or JPEG"), "{err:#}");
        let err = open(&SourceSpec::Path("/no/such/thing".into()), 1, false).err().expect("error");
        assert!(format!("{err:#}").contains("/no/such/thing"), "{err:#}");
        // A folder in the trainer's IDX layout: the error names the test images file.
        for name in ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        let err = open(&SourceSpec::Path(dir.path().into()), 1, false).err().expect("error");
        assert!(format!("{err:#}").contains("t10k-images-idx3-ubyte.gz"), "{err:#}");
    }
}
