//! Cameras, through nokhwa (V4L2 on Linux), behind the `camera` cargo feature.
//!
//! The feature is off by default because nokhwa's V4L2 bindings are generated at build
//! time and need libclang; the default build needs no system package. Without the feature,
//! [`open_camera`] explains how to build with it.
//!
//! Format negotiation, in order of preference: YUYV (the runtime reads it directly, no
//! decoding), 8-bit gray, raw RGB, then MJPEG (decoded on the capture thread), then NV12
//! (luma only). Among a format's modes the agent wants at least 15 frames per second and
//! the smallest frame of at least 160x120 (the network's input is far smaller; a small
//! frame is cheaper to move and resample), then the highest frame rate. Devices that list
//! no capture mode (V4L2 metadata nodes, for example) are not cameras here.

use std::path::PathBuf;

#[cfg(not(feature = "camera"))]
use crate::source::FrameSource;

/// The `/dev/video*` nodes present, for error messages.
pub fn video_nodes() -> Vec<PathBuf> {
    let mut nodes: Vec<PathBuf> = std::fs::read_dir("/dev")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("video"))
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes
}

fn describe_nodes() -> String {
    let nodes = video_nodes();
    if nodes.is_empty() {
        "no /dev/video* device node exists".into()
    } else {
        let names: Vec<String> = nodes.iter().map(|p| p.display().to_string()).collect();
        format!("device nodes present: {}", names.join(", "))
    }
}

/// Opens camera `index` at `channels` (1 or 3) channels.
#[cfg(not(feature = "camera"))]
pub fn open_camera(index: u32, _channels: u8) -> anyhow::Result<Box<dyn FrameSource>> {
    anyhow::bail!(
        "camera {index}: this edge-agent was built without camera support; rebuild with `cargo build --release -p selfclass-firmware-host --features camera` (needs libclang: apt-get install libclang-dev) ({})",
        describe_nodes()
    )
}

/// Lists the capture devices, one line each.
#[cfg(not(feature = "camera"))]
pub fn list_cameras() -> anyhow::Result<Vec<String>> {
    anyhow::bail!(
        "camera support is not built in; rebuild with --features camera ({})",
        describe_nodes()
    )
}

#[cfg(feature = "camera")]
pub use with_nokhwa::{list_cameras, open_camera};

#[cfg(feature = "camera")]
mod with_nokhwa {
    use std::time::Instant;

    use anyhow::Context;
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{
        ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType,
    };
    use nokhwa::Camera;
    use selfclass_runtime::preprocess::PixelFormat;
    use tracing::{debug, info};

    use super::describe_nodes;
    use crate::source::{CapturedFrame, FrameSource};

    fn rank(format: FrameFormat) -> Option<u32> {
        match format {
            FrameFormat::YUYV => Some(0),
            FrameFormat::GRAY => Some(1),
            FrameFormat::RAWRGB => Some(2),
            FrameFormat::MJPEG => Some(3),
            FrameFormat::NV12 => Some(4),
            _ => None,
        }
    }

    /// The preferred mode among `modes` (see the module documentation).
    pub(super) fn choose(modes: &[CameraFormat]) -> Option<CameraFormat> {
        modes
            .iter()
            .filter(|m| rank(m.format()).is_some())
            .min_by_key(|m| {
                let (w, h) = (m.resolution().width(), m.resolution().height());
                let too_slow = m.frame_rate() < 15;
                let too_small = w < 160 || h < 120;
                (too_slow, too_small, rank(m.format()), w * h, std::cmp::Reverse(m.frame_rate()))
            })
            .copied()
    }

    fn any_request() -> RequestedFormat<'static> {
        RequestedFormat::new::<RgbFormat>(RequestedFormatType::AbsoluteHighestFrameRate)
    }

    /// Capture devices: those that open and list at least one mode we can read.
    fn capture_devices() -> Vec<(u32, String, CameraFormat)> {
        let infos = nokhwa::query(ApiBackend::Auto).unwrap_or_default();
        let mut found = Vec::new();
        for info in infos {
            let CameraIndex::Index(index) = info.index().clone() else { continue };
            let Ok(mut camera) = Camera::new(CameraIndex::Index(index), any_request()) else {
                continue;
            };
            let modes = camera.compatible_camera_formats().unwrap_or_default();
            if let Some(mode) = choose(&modes) {
                found.push((index, info.human_name(), mode));
            }
        }
        found
    }

    pub fn list_cameras() -> anyhow::Result<Vec<String>> {
        Ok(capture_devices()
            .into_iter()
            .map(|(i, name, mode)| format!("{i}: {name} (best mode {mode})"))
            .collect())
    }

    pub fn open_camera(index: u32, channels: u8) -> anyhow::Result<Box<dyn FrameSource>> {
        let devices = capture_devices();
        let Some((_, name, mode)) = devices.iter().find(|(i, _, _)| *i == index).cloned() else {
            let listed: Vec<String> = devices.iter().map(|(i, n, _)| format!("{i}: {n}")).collect();
            anyhow::bail!(
                "camera {index}: no such capture device; found {} ({}); {}",
                devices.len(),
                if listed.is_empty() { "none".into() } else { listed.join(", ") },
                describe_nodes()
            );
        };
        let mut camera = Camera::new(
            CameraIndex::Index(index),
            RequestedFormat::new::<RgbFormat>(RequestedFormatType::Exact(mode)),
        )
        .with_context(|| format!("camera {index} ({name}): cannot open it in mode {mode}"))?;
        camera
            .open_stream()
            .with_context(|| format!("camera {index} ({name}): cannot start streaming"))?;
        info!(camera = index, %name, %mode, "camera streaming");
        Ok(Box::new(CameraSource {
            camera,
            name,
            mode,
            channels,
            times: Vec::new(),
            measured_fps: None,
            next: 0,
        }))
    }

    struct CameraSource {
        camera: Camera,
        name: String,
        mode: CameraFormat,
        channels: u8,
        /// Arrival times of the last frames, for the measured rate.
        times: Vec<Instant>,
        measured_fps: Option<f64>,
        next: u64,
    }

    // SAFETY: the V4L2 backend's state is a file descriptor and its mapped buffers, which
    // belong to the process, not to a thread. The source is moved to the capture thread
    // once and used from that thread alone; nothing else keeps a reference to the camera.
    unsafe impl Send for CameraSource {}

    impl FrameSource for CameraSource {
        fn next_into(&mut self, frame: &mut CapturedFrame) -> anyhow::Result<bool> {
            let buffer = self
                .camera
                .frame()
                .with_context(|| format!("camera {}: reading a frame", self.name))?;
            let now = Instant::now();
            self.times.push(now);
            if self.times.len() > 60 {
                self.times.remove(0);
            }
            if let (Some(first), n) = (self.times.first(), self.times.len()) {
                let span = now.duration_since(*first).as_secs_f64();
                if n >= 10 && span > 0.0 {
                    let fps = (n - 1) as f64 / span;
                    if self.measured_fps.is_none() {
                        info!(
                            measured_fps = format!("{fps:.1}"),
                            nominal_fps = self.mode.frame_rate(),
                            "camera frame rate"
                        );
                    }
                    self.measured_fps = Some(fps);
                }
            }
            let (w, h) = (buffer.resolution().width(), buffer.resolution().height());
            let bytes = buffer.buffer();
            frame.width = w;
            frame.height = h;
            frame.label = None;
            frame.item = self.next;
            self.next += 1;
            frame.data.clear();
            match buffer.source_frame_format() {
                FrameFormat::YUYV => {
                    frame.format = PixelFormat::Yuyv;
                    frame.data.extend_from_slice(bytes);
                }
                FrameFormat::GRAY => {
                    frame.format = PixelFormat::Gray8;
                    frame.data.extend_from_slice(bytes);
                }
                FrameFormat::RAWRGB => {
                    frame.format = PixelFormat::Rgb8;
                    frame.data.extend_from_slice(bytes);
                }
                FrameFormat::NV12 => {
                    frame.format = PixelFormat::Gray8;
                    let luma = (w * h) as usize;
                    anyhow::ensure!(bytes.len() >= luma, "camera {}: short NV12 frame", self.name);
                    frame.data.extend_from_slice(&bytes[..luma]);
                }
                FrameFormat::MJPEG => {
                    let image =
                        image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
                            .with_context(|| {
                                format!("camera {}: a broken MJPEG frame", self.name)
                            })?;
                    frame.width = image.width();
                    frame.height = image.height();
                    if self.channels == 1 {
                        frame.format = PixelFormat::Gray8;
                        frame.data.extend_from_slice(image.to_luma8().as_raw());
                    } else {
                        frame.format = PixelFormat::Rgb8;
                        frame.data.extend_from_slice(image.to_rgb8().as_raw());
                    }
                }
                other => {
                    anyhow::bail!("camera {}: delivers {other}, which is not supported", self.name)
                }
            }
            debug!(frame = frame.item, "camera frame");
            Ok(true)
        }

        fn describe(&self) -> String {
            format!("camera {} in mode {}", self.name, self.mode)
        }

        fn native_fps(&self) -> Option<f64> {
            self.measured_fps.or(Some(self.mode.frame_rate() as f64))
        }

        fn is_live(&self) -> bool {
            true
        }
    }
}
