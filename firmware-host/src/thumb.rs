//! Thumbnails of the frames the replay keeps, stored as the pairs' notes, so that
//! `edge-agent discover --state DIR` can draw contact sheets of what the device saw.
//!
//! A thumbnail is made from the network's input (what the model saw, after resizing and
//! cropping), undoing the bundle's normalisation, box-averaged down to at most
//! [`THUMB_SIDE`] pixels a side: 784 bytes for a 28x28 grayscale model, at most 3 KiB for
//! colour. Its bytes: `SCT1`, channels (u8), width and height (u16 little-endian), then the
//! pixels row by row, channels interleaved.

use selfclass_runtime::bundle::Preprocess;

/// Longest side of a stored thumbnail, in pixels.
pub const THUMB_SIDE: usize = 32;
const MAGIC: &[u8; 4] = b"SCT1";
const HEADER: usize = 4 + 1 + 2 + 2;

/// Makes thumbnails from a model's preprocessed inputs.
#[derive(Debug, Clone)]
pub struct ThumbEncoder {
    channels: usize,
    width: usize,
    height: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// Input pixels per thumbnail pixel along each side.
    factor: usize,
}

impl ThumbEncoder {
    pub fn new(preprocess: &Preprocess) -> Self {
        let (width, height) = (preprocess.width as usize, preprocess.height as usize);
        ThumbEncoder {
            channels: preprocess.channels as usize,
            width,
            height,
            mean: preprocess.mean.clone(),
            std: preprocess.std.clone(),
            factor: width.max(height).div_ceil(THUMB_SIDE).max(1),
        }
    }

    /// Writes the thumbnail of `input` (channels x height x width, normalised) into `out`.
    pub fn encode(&self, input: &[f32], out: &mut Vec<u8>) {
        let (c, h, w, f) = (self.channels, self.height, self.width, self.factor);
        let (tw, th) = (w.div_ceil(f), h.div_ceil(f));
        out.clear();
        out.extend_from_slice(MAGIC);
        out.push(c as u8);
        out.extend_from_slice(&(tw as u16).to_le_bytes());
        out.extend_from_slice(&(th as u16).to_le_bytes());
        for ty in 0..th {
            for tx in 0..tw {
                for ch in 0..c {
                    let plane = &input[ch * h * w..(ch + 1) * h * w];
                    let (mut sum, mut count) = (0.0f32, 0usize);
                    for y in ty * f..((ty + 1) * f).min(h) {
                        for x in tx * f..((tx + 1) * f).min(w) {
                            sum += plane[y * w + x];
                            count += 1;
                        }
                    }
                    let value = (sum / count as f32) * self.std[ch] + self.mean[ch];
                    out.push((value * 255.0).round().clamp(0.0, 255.0) as u8);
                }
            }
        }
    }
}

/// Reads a thumbnail back; `None` for bytes that are not one.
pub fn decode(bytes: &[u8]) -> Option<image::DynamicImage> {
    if bytes.len() < HEADER || &bytes[..4] != MAGIC {
        return None;
    }
    let channels = bytes[4] as usize;
    let width = u16::from_le_bytes([bytes[5], bytes[6]]) as u32;
    let height = u16::from_le_bytes([bytes[7], bytes[8]]) as u32;
    let pixels = bytes[HEADER..].to_vec();
    if pixels.len() != width as usize * height as usize * channels {
        return None;
    }
    match channels {
        1 => image::GrayImage::from_raw(width, height, pixels).map(image::DynamicImage::ImageLuma8),
        3 => image::RgbImage::from_raw(width, height, pixels).map(image::DynamicImage::ImageRgb8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use selfclass_runtime::bundle::ResizePolicy;

    fn preprocess(channels: u8, side: u32) -> Preprocess {
        Preprocess {
            width: side,
            height: side,
            channels,
            mean: vec![0.25; channels as usize],
            std: vec![0.5; channels as usize],
            resize: ResizePolicy::Stretch,
        }
    }

    #[test]
    fn a_small_gray_input_comes_back_pixel_for_pixel() {
        let p = preprocess(1, 28);
        // Pixel value v/255 normalised as the model sees it: (v/255 - 0.25) / 0.5.
        let pixels: Vec<u8> = (0..28 * 28).map(|i| (i * 7 % 256) as u8).collect();
        let input: Vec<f32> = pixels.iter().map(|&v| (v as f32 / 255.0 - 0.25) / 0.5).collect();
        let mut note = Vec::new();
        ThumbEncoder::new(&p).encode(&input, &mut note);
        assert_eq!(note.len(), HEADER + 28 * 28);
        let image = decode(&note).expect("decodes").into_luma8();
        assert_eq!(image.dimensions(), (28, 28));
        assert_eq!(image.into_raw(), pixels);
    }

    #[test]
    fn a_large_colour_input_is_averaged_down_to_the_thumbnail_side() {
        let p = preprocess(3, 96);
        // Channel 0 white, 1 black, 2 a left-right split.
        let plane = 96 * 96;
        let mut input = vec![0.0f32; 3 * plane];
        let norm = |v: f32| (v - 0.25) / 0.5;
        for i in 0..plane {
            input[i] = norm(1.0);
            input[plane + i] = norm(0.0);
            input[2 * plane + i] = norm(if i % 96 < 48 { 1.0 } else { 0.0 });
        }
        let mut note = Vec::new();
        ThumbEncoder::new(&p).encode(&input, &mut note);
        let image = decode(&note).expect("decodes").into_rgb8();
        assert_eq!(image.dimensions(), (32, 32));
        assert_eq!(image.get_pixel(0, 0).0, [255, 0, 255]);
        assert_eq!(image.get_pixel(31, 31).0, [255, 0, 0]);
    }

    #[test]
    fn bytes_that_are_not_a_thumbnail_decode_to_none() {
        let mut note = Vec::new();
        ThumbEncoder::new(&preprocess(1, 4)).encode(&[0.0; 16], &mut note);
        assert!(decode(&note).is_some());
        assert!(decode(&note[..note.len() - 1]).is_none());
        assert!(decode(b"SCT").is_none());
        let mut wrong = note.clone();
        wrong[0] = b'X';
        assert!(decode(&wrong).is_none());
        wrong = note.clone();
        wrong[4] = 2;
        assert!(decode(&wrong).is_none());
    }
}
