//! From a raw camera frame to the network's input tensor.
//!
//! Three steps, fused so a frame is read once: pick the region (the whole frame, or its
//! centred crop with the input's aspect ratio), resample it to the input size (area
//! averaging when shrinking, so a 640x480 frame does not alias down to 28x28; bilinear
//! when enlarging), and convert the pixel format to the model's channels before scaling
//! to [0, 1] and normalising with the bundle's mean and deviation.
//!
//! ```
//! use selfclass_runtime::bundle::{Preprocess, ResizePolicy};
//! use selfclass_runtime::preprocess::{Frame, PixelFormat, Preprocessor};
//!
//! let spec = Preprocess {
//!     width: 2, height: 2, channels: 1, mean: vec![0.0], std: vec![1.0],
//!     resize: ResizePolicy::Stretch,
//! };
//! let mut pre = Preprocessor::new(spec).unwrap();
//! let pixels = [255u8; 4 * 4 * 3];
//! let frame = Frame::new(4, 4, PixelFormat::Rgb8, &pixels).unwrap();
//! let mut input = vec![0.0; 4];
//! pre.run(&frame, &mut input).unwrap();
//! assert!(input.iter().all(|v| (v - 1.0).abs() < 1e-6));
//! ```

use crate::bundle::{Preprocess, ResizePolicy};
use crate::{Error, Result};

/// Pixel layouts a frame may arrive in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// 8-bit red, green, blue per pixel.
    Rgb8,
    /// 8-bit blue, green, red per pixel (OpenCV's order).
    Bgr8,
    /// 8-bit luminance per pixel.
    Gray8,
    /// Packed 4:2:2: Y0 U Y1 V for each pair of pixels (a common webcam format).
    Yuyv,
}

impl PixelFormat {
    /// Bytes needed for a frame of `width x height`, or `None` if it cannot hold one.
    pub fn frame_bytes(self, width: usize, height: usize) -> Option<usize> {
        let per_pixel = match self {
            PixelFormat::Rgb8 | PixelFormat::Bgr8 => 3,
            PixelFormat::Gray8 => 1,
            PixelFormat::Yuyv => {
                if !width.is_multiple_of(2) {
                    return None;
                }
                2
            }
        };
        width.checked_mul(height)?.checked_mul(per_pixel)
    }
}

/// A borrowed raw frame whose size has been checked against its format.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    width: usize,
    height: usize,
    format: PixelFormat,
    data: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Wraps `data`, checking that it holds exactly one `width x height` frame of `format`.
    pub fn new(width: u32, height: u32, format: PixelFormat, data: &'a [u8]) -> Result<Self> {
        let (w, h) = (width as usize, height as usize);
        if w == 0 || h == 0 {
            return Err(Error::Frame { reason: format!("empty frame of {width}x{height}") });
        }
        match format.frame_bytes(w, h) {
            Some(n) if n == data.len() => Ok(Frame { width: w, height: h, format, data }),
            Some(n) => Err(Error::Frame {
                reason: format!(
                    "{width}x{height} {format:?} needs {n} bytes, got {}; the frame is truncated or mislabelled",
                    data.len()
                ),
            }),
            None => Err(Error::Frame { reason: format!("{width}x{height} cannot be {format:?}") }),
        }
    }

    pub fn width(&self) -> u32 {
        self.width as u32
    }

    pub fn height(&self) -> u32 {
        self.height as u32
    }

    pub fn format(&self) -> PixelFormat {
        self.format
    }

    /// The pixel at (x, y) as RGB in 0..=255.
    #[inline]
    fn rgb(&self, x: usize, y: usize) -> [f32; 3] {
        let d = self.data;
        match self.format {
            PixelFormat::Rgb8 => {
                let i = (y * self.width + x) * 3;
                [d[i] as f32, d[i + 1] as f32, d[i + 2] as f32]
            }
            PixelFormat::Bgr8 => {
                let i = (y * self.width + x) * 3;
                [d[i + 2] as f32, d[i + 1] as f32, d[i] as f32]
            }
            PixelFormat::Gray8 => {
                let v = d[y * self.width + x] as f32;
                [v, v, v]
            }
            PixelFormat::Yuyv => {
                let (luma, u, v) = self.yuv(x, y);
                // BT.601 limited range to full-range RGB.
                let c = 1.164 * (luma - 16.0);
                let (du, dv) = (u - 128.0, v - 128.0);
                let clamp = |x: f32| x.clamp(0.0, 255.0);
                [clamp(c + 1.596 * dv), clamp(c - 0.392 * du - 0.813 * dv), clamp(c + 2.017 * du)]
            }
        }
    }

    #[inline]
    fn yuv(&self, x: usize, y: usize) -> (f32, f32, f32) {
        let pair = (y * self.width + (x & !1)) * 2;
        let d = &self.data[pair..pair + 4];
        let luma = if x.is_multiple_of(2) { d[0] } else { d[2] };
        (luma as f32, d[1] as f32, d[3] as f32)
    }

    /// The pixel at (x, y) as luminance in 0..=255.
    #[inline]
    fn gray(&self, x: usize, y: usize) -> f32 {
        match self.format {
            PixelFormat::Gray8 => self.data[y * self.width + x] as f32,
            PixelFormat::Yuyv => (1.164 * (self.yuv(x, y).0 - 16.0)).clamp(0.0, 255.0),
            _ => {
                let [r, g, b] = self.rgb(x, y);
                0.299 * r + 0.587 * g + 0.114 * b
            }
        }
    }
}

/// Resampling taps along one axis: for each output index, the first source index and the
/// weights of consecutive source pixels from there (summing to one).
#[derive(Debug, Clone, PartialEq)]
struct Taps {
    start: Vec<usize>,
    offsets: Vec<usize>,
    weights: Vec<f32>,
}

impl Taps {
    /// Maps `len` source pixels beginning at `origin` onto `out` output pixels.
    fn new(origin: usize, len: usize, out: usize) -> Taps {
        let scale = len as f64 / out as f64;
        let mut taps =
            Taps { start: Vec::with_capacity(out), offsets: vec![0], weights: Vec::new() };
        for o in 0..out {
            if scale > 1.0 {
                // Area average over [o*scale, (o+1)*scale).
                let (lo, hi) = (o as f64 * scale, (o as f64 + 1.0) * scale);
                let first = lo.floor() as usize;
                let last = (hi.ceil() as usize).min(len);
                taps.start.push(origin + first);
                for i in first..last {
                    let overlap = (hi.min(i as f64 + 1.0) - lo.max(i as f64)).max(0.0);
                    taps.weights.push((overlap / scale) as f32);
                }
            } else {
                // Bilinear between the two nearest source centres.
                let centre = ((o as f64 + 0.5) * scale - 0.5).clamp(0.0, (len - 1) as f64);
                let first = (centre.floor() as usize).min(len - 1);
                let frac = centre - first as f64;
                taps.start.push(origin + first);
                taps.weights.push((1.0 - frac) as f32);
                if first + 1 < len {
                    taps.weights.push(frac as f32);
                }
            }
            taps.offsets.push(taps.weights.len());
        }
        taps
    }

    #[inline]
    fn of(&self, o: usize) -> (usize, &[f32]) {
        (self.start[o], &self.weights[self.offsets[o]..self.offsets[o + 1]])
    }
}

/// Turns frames into model input, reusing its resampling tables while the frame size stays.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: Preprocess,
    cached_for: Option<(usize, usize)>,
    taps_x: Option<Taps>,
    taps_y: Option<Taps>,
    /// Vertically resampled rows: `out_h x crop_w x channels`.
    scratch: Vec<f32>,
}

impl Preprocessor {
    pub fn new(spec: Preprocess) -> Result<Self> {
        spec.validate()?;
        Ok(Preprocessor { spec, cached_for: None, taps_x: None, taps_y: None, scratch: Vec::new() })
    }

    pub fn spec(&self) -> &Preprocess {
        &self.spec
    }

    /// Number of f32 values one frame becomes (`channels x height x width`).
    pub fn output_len(&self) -> usize {
        self.spec.input_len()
    }

    /// Writes the model input for `frame` into `out` (`C x H x W`, channel-major).
    pub fn run(&mut self, frame: &Frame<'_>, out: &mut [f32]) -> Result<()> {
        if out.len() != self.output_len() {
            return Err(Error::invalid(
                "preprocessing",
                format!(
                    "output buffer of {} values for an input of {}",
                    out.len(),
                    self.output_len()
                ),
            ));
        }
        self.prepare(frame.width, frame.height);
        let (Some(tx), Some(ty)) = (&self.taps_x, &self.taps_y) else {
            return Err(Error::invalid("preprocessing", "resampling tables missing"));
        };
        let (out_w, out_h) = (self.spec.width as usize, self.spec.height as usize);
        let channels = self.spec.channels as usize;
        let (x0, crop_w) =
            (tx.start[0], tx.start[out_w - 1] + tx.of(out_w - 1).1.len() - tx.start[0]);

        // Vertical pass: for each output row, the weighted sum of source rows, per column.
        self.scratch.clear();
        self.scratch.resize(out_h * crop_w * channels, 0.0);
        for oy in 0..out_h {
            let (sy, wy) = ty.of(oy);
            let row = &mut self.scratch[oy * crop_w * channels..(oy + 1) * crop_w * channels];
            for (j, &w) in wy.iter().enumerate() {
                let y = sy + j;
                for cx in 0..crop_w {
                    if channels == 1 {
                        row[cx] += w * frame.gray(x0 + cx, y);
                    } else {
                        let rgb = frame.rgb(x0 + cx, y);
                        for (c, v) in rgb.iter().enumerate() {
                            row[cx * 3 + c] += w * v;
                        }
                    }
                }
            }
        }

        // Horizontal pass, scaling and normalisation, written channel-major.
        let plane = out_w * out_h;
        let scale: Vec<f32> = self.spec.std.iter().map(|s| 1.0 / (255.0 * s)).collect();
        let shift: Vec<f32> =
            self.spec.mean.iter().zip(&self.spec.std).map(|(m, s)| m / s).collect();
        for oy in 0..out_h {
            let row = &self.scratch[oy * crop_w * channels..(oy + 1) * crop_w * channels];
            for ox in 0..out_w {
                let (sx, wx) = tx.of(ox);
                for c in 0..channels {
                    let mut acc = 0.0;
                    for (i, &w) in wx.iter().enumerate() {
                        acc += w * row[(sx - x0 + i) * channels + c];
                    }
                    out[c * plane + oy * out_w + ox] = acc * scale[c] - shift[c];
                }
            }
        }
        Ok(())
    }

    /// Builds the resampling tables for a frame size, unless they are already built.
    fn prepare(&mut self, width: usize, height: usize) {
        if self.cached_for == Some((width, height)) {
            return;
        }
        let (out_w, out_h) = (self.spec.width as usize, self.spec.height as usize);
        let (x0, y0, crop_w, crop_h) = match self.spec.resize {
            ResizePolicy::Stretch => (0, 0, width, height),
            ResizePolicy::CenterCrop => {
                // The largest region with the output's aspect ratio, centred.
                let (cw, ch) = if width * out_h > height * out_w {
                    (((height * out_w) as f64 / out_h as f64).round().max(1.0) as usize, height)
                } else {
                    (width, ((width * out_h) as f64 / out_w as f64).round().max(1.0) as usize)
                };
                let (cw, ch) = (cw.min(width), ch.min(height));
                ((width - cw) / 2, (height - ch) / 2, cw, ch)
            }
        };
        self.taps_x = Some(Taps::new(x0, crop_w, out_w));
        self.taps_y = Some(Taps::new(y0, crop_h, out_h));
        self.cached_for = Some((width, height));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(w: u32, h: u32, channels: u8, resize: ResizePolicy) -> Preprocess {
        let c = channels as usize;
        Preprocess { width: w, height: h, channels, mean: vec![0.0; c], std: vec![1.0; c], resize }
    }

    fn run(spec: Preprocess, frame: &Frame<'_>) -> Vec<f32> {
        let mut pre = Preprocessor::new(spec).expect("valid spec");
        let mut out = vec![0.0; pre.output_len()];
        pre.run(frame, &mut out).expect("runs");
        out
    }

    #[test]
    fn same_size_gray_is_an_exact_copy() {
        let pixels: Vec<u8> = (0..28 * 28).map(|i| (i % 256) as u8).collect();
        let frame = Frame::new(28, 28, PixelFormat::Gray8, &pixels).expect("frame");
        let out = run(spec(28, 28, 1, ResizePolicy::Stretch), &frame);
        for (o, p) in out.iter().zip(&pixels) {
            assert!((o - *p as f32 / 255.0).abs() < 1e-6);
        }
    }

    #[test]
    fn halving_averages_two_by_two_blocks() {
        // 4x2 gray frame to 2x1: each output is the mean of a 2x2 block.
        let pixels = [0u8, 100, 200, 50, 100, 200, 0, 150];
        let frame = Frame::new(4, 2, PixelFormat::Gray8, &pixels).expect("frame");
        let out = run(spec(2, 1, 1, ResizePolicy::Stretch), &frame);
        assert!((out[0] * 255.0 - 100.0).abs() < 1e-3, "{}", out[0] * 255.0);
        assert!((out[1] * 255.0 - 100.0).abs() < 1e-3, "{}", out[1] * 255.0);
    }

    #[test]
    fn normalisation_uses_mean_and_std() {
        let pixels = [255u8; 4];
        let frame = Frame::new(2, 2, PixelFormat::Gray8, &pixels).expect("frame");
        let mut s = spec(2, 2, 1, ResizePolicy::Stretch);
        s.mean = vec![0.5];
        s.std = vec![0.25];
        assert!(run(s, &frame).iter().all(|v| (v - 2.0).abs() < 1e-5));
    }

    #[test]
    fn bgr_and_rgb_agree_and_gray_uses_luma() {
        let rgb = [200u8, 100, 50, 200, 100, 50];
        let bgr = [50u8, 100, 200, 50, 100, 200];
        let a = run(
            spec(2, 1, 3, ResizePolicy::Stretch),
            &Frame::new(2, 1, PixelFormat::Rgb8, &rgb).expect("f"),
        );
        let b = run(
            spec(2, 1, 3, ResizePolicy::Stretch),
            &Frame::new(2, 1, PixelFormat::Bgr8, &bgr).expect("f"),
        );
        assert_eq!(a, b);
        assert!((a[0] - 200.0 / 255.0).abs() < 1e-6 && (a[2] - 100.0 / 255.0).abs() < 1e-6);
        let g = run(
            spec(2, 1, 1, ResizePolicy::Stretch),
            &Frame::new(2, 1, PixelFormat::Rgb8, &rgb).expect("f"),
        );
        let luma = (0.299 * 200.0 + 0.587 * 100.0 + 0.114 * 50.0) / 255.0;
        assert!((g[0] - luma).abs() < 1e-5);
    }

    #[test]
    fn yuyv_gray_ramp_converts() {
        // Neutral chroma (128): Y 16 is black, Y 235 is white in BT.601 limited range.
        let yuyv = [16u8, 128, 235, 128];
        let frame = Frame::new(2, 1, PixelFormat::Yuyv, &yuyv).expect("frame");
        let g = run(spec(2, 1, 1, ResizePolicy::Stretch), &frame);
        assert!(g[0].abs() < 1e-3 && (g[1] - 1.0).abs() < 0.01, "{g:?}");
        let c = run(spec(2, 1, 3, ResizePolicy::Stretch), &frame);
        assert!(c[1] > 0.99 && c[3] > 0.99 && c[0] < 0.01, "{c:?}");
    }

    #[test]
    fn centre_crop_ignores_the_sides() {
        // A 6x2 frame whose centre 2x2 is white and sides black: a centre crop to 1x1 is white.
        let mut pixels = vec![0u8; 12];
        for y in 0..2 {
            pixels[y * 6 + 2] = 255;
            pixels[y * 6 + 3] = 255;
        }
        let frame = Frame::new(6, 2, PixelFormat::Gray8, &pixels).expect("frame");
        let crop = run(spec(1, 1, 1, ResizePolicy::CenterCrop), &frame);
        assert!((crop[0] - 1.0).abs() < 1e-5, "{crop:?}");
        let stretch = run(spec(1, 1, 1, ResizePolicy::Stretch), &frame);
        assert!((stretch[0] - 1.0 / 3.0).abs() < 1e-5, "{stretch:?}");
    }

    #[test]
    fn enlarging_interpolates() {
        let pixels = [0u8, 255];
        let frame = Frame::new(2, 1, PixelFormat::Gray8, &pixels).expect("frame");
        let out = run(spec(4, 1, 1, ResizePolicy::Stretch), &frame);
        let want = [0.0, 0.25, 0.75, 1.0];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(Frame::new(4, 4, PixelFormat::Rgb8, &[0u8; 47]).is_err());
        assert!(Frame::new(3, 1, PixelFormat::Yuyv, &[0u8; 6]).is_err());
        assert!(Frame::new(0, 4, PixelFormat::Gray8, &[]).is_err());
        let pixels = [0u8; 4];
        let frame = Frame::new(2, 2, PixelFormat::Gray8, &pixels).expect("frame");
        let mut pre = Preprocessor::new(spec(2, 2, 1, ResizePolicy::Stretch)).expect("spec");
        assert!(pre.run(&frame, &mut [0.0; 3]).is_err());
    }

    #[test]
    fn odd_sizes_and_large_frames_fill_every_output() {
        let pixels = vec![128u8; 641 * 479];
        let frame = Frame::new(641, 479, PixelFormat::Gray8, &pixels).expect("frame");
        for resize in [ResizePolicy::Stretch, ResizePolicy::CenterCrop] {
            let out = run(spec(28, 28, 1, resize), &frame);
            assert!(out.iter().all(|v| (v - 128.0 / 255.0).abs() < 1e-4), "{resize:?}");
        }
    }
}
