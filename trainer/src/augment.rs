//! Random views of training images, and the background thread that prepares them.
//!
//! Every view is drawn from its own random stream, seeded from (run seed, epoch, position
//! in the epoch, view number): a batch comes out the same whichever thread makes it and
//! whether or not the run was interrupted and resumed.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::{Error, Result};

/// How views are drawn. Fractions are of the image area; intensities are in [0, 1] pixel
/// units before normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    /// Area fraction range of the two global crops.
    pub global_scale: (f32, f32),
    /// Number of local crops per image (0 disables them).
    pub local_crops: usize,
    /// Side of local crops in pixels.
    pub local_size: usize,
    /// Area fraction range of local crops.
    pub local_scale: (f32, f32),
    /// Probability of a horizontal flip.
    pub flip: f32,
    /// Brightness offset drawn from [-b, b].
    pub brightness: f32,
    /// Contrast factor drawn from [1 - c, 1 + c].
    pub contrast: f32,
    /// Probability of a Gaussian blur (sigma drawn from 0.1 to 1.0 pixel).
    pub blur: f32,
    /// Probability of additive Gaussian noise.
    pub noise: f32,
    /// Standard deviation of that noise.
    pub noise_std: f32,
    /// Per-channel mean subtracted after augmentation.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by after augmentation.
    pub std: Vec<f32>,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            global_scale: (0.4, 1.0),
            local_crops: 0,
            local_size: 16,
            local_scale: (0.1, 0.4),
            flip: 0.5,
            brightness: 0.3,
            contrast: 0.4,
            blur: 0.0,
            noise: 0.0,
            noise_std: 0.03,
            mean: vec![0.5],
            std: vec![0.25],
        }
    }
}

impl AugmentConfig {
    /// Checks the ranges once, before any training starts.
    pub fn validate(&self, channels: usize) -> Result<()> {
        let fraction = |(lo, hi): (f32, f32)| lo > 0.0 && lo <= hi && hi <= 1.0;
        if !fraction(self.global_scale) || !fraction(self.local_scale) {
            return Err(Error::config("crop scales must satisfy 0 < min <= max <= 1"));
        }
        if self.local_crops > 0 && self.local_size < 8 {
            return Err(Error::config("local crops need a side of at least 8 pixels"));
        }
        if self.mean.len() != channels
            || self.std.len() != channels
            || self.std.iter().any(|&s| s <= 0.0)
        {
            return Err(Error::config(format!(
                "normalisation needs {channels} means and positive deviations"
            )));
        }
        Ok(())
    }
}

/// A mixing function (splitmix64) to derive independent stream seeds from counters.
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for &p in parts {
        state ^=
            p.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_add(state << 6).wrapping_add(state >> 2);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        state = z ^ (z >> 31);
    }
    state
}

/// Converts 8-bit pixels to normalised floats, unchanged otherwise (evaluation input).
pub fn normalise(pixels: &[u8], channels: usize, mean: &[f32], std: &[f32], out: &mut [f32]) {
    let plane = pixels.len() / channels.max(1);
    for (i, (&p, o)) in pixels.iter().zip(out.iter_mut()).enumerate() {
        let c = i / plane.max(1);
        *o = (p as f32 / 255.0 - mean[c]) / std[c];
    }
}

/// Draws one view of `image` (`C x H x W` bytes) into `out` (`C x size x size`).
pub(crate) fn draw_view(
    image: &[u8],
    (channels, height, width): (usize, usize, usize),
    size: usize,
    scale: (f32, f32),
    config: &AugmentConfig,
    rng: &mut ChaCha8Rng,
    out: &mut [f32],
) {
    // Random resized crop: area fraction and aspect ratio (log-uniform in [3/4, 4/3]).
    let area = rng.gen_range(scale.0..=scale.1);
    let log_ratio = rng.gen_range((0.75f32).ln()..=(4.0f32 / 3.0).ln());
    let ratio = log_ratio.exp();
    let crop_w = ((area * ratio).sqrt()).min(1.0) * width as f32;
    let crop_h = ((area / ratio).sqrt()).min(1.0) * height as f32;
    let x0 = rng.gen_range(0.0..=(width as f32 - crop_w).max(0.0));
    let y0 = rng.gen_range(0.0..=(height as f32 - crop_h).max(0.0));
    let flip = rng.gen::<f32>() < config.flip;
    let brightness = rng.gen_range(-config.brightness..=config.brightness);
    let contrast = rng.gen_range(1.0 - config.contrast..=1.0 + config.contrast);
    let blur_sigma = (rng.gen::<f32>() < config.blur).then(|| rng.gen_range(0.1f32..1.0));
    let noisy = rng.gen::<f32>() < config.noise;

    let plane = size * size;
    for c in 0..channels {
        let src = &image[c * height * width..(c + 1) * height * width];
        let dst = &mut out[c * plane..(c + 1) * plane];
        for v in 0..size {
            let sy = y0 + (v as f32 + 0.5) * crop_h / size as f32 - 0.5;
            for u in 0..size {
                let uu = if flip { size - 1 - u } else { u };
                let sx = x0 + (uu as f32 + 0.5) * crop_w / size as f32 - 0.5;
                dst[v * size + u] = bilinear(src, height, width, sy, sx);
            }
        }
        if let Some(sigma) = blur_sigma {
            gaussian_blur(dst, size, sigma);
        }
        let mean = dst.iter().sum::<f32>() / plane as f32;
        for value in dst.iter_mut() {
            let mut y = (*value - mean) * contrast + mean + brightness;
            if noisy {
                y += config.noise_std * standard_normal(rng);
            }
            *value = (y.clamp(0.0, 1.0) - config.mean[c]) / config.std[c];
        }
    }
}

/// Bilinear sample of an 8-bit plane at (y, x), in [0, 1]; edge pixels extend outwards.
fn bilinear(src: &[u8], height: usize, width: usize, y: f32, x: f32) -> f32 {
    let y = y.clamp(0.0, (height - 1) as f32);
    let x = x.clamp(0.0, (width - 1) as f32);
    let (y0, x0) = (y.floor(), x.floor());
    let (fy, fx) = (y - y0, x - x0);
    let at = |yy: f32, xx: f32| -> f32 {
        let (yy, xx) = ((yy as usize).min(height - 1), (xx as usize).min(width - 1));
        src[yy * width + xx] as f32 / 255.0
    };
    let top = at(y0, x0) * (1.0 - fx) + at(y0, x0 + 1.0) * fx;
    let bottom = at(y0 + 1.0, x0) * (1.0 - fx) + at(y0 + 1.0, x0 + 1.0) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// Separable Gaussian blur with a 5-tap kernel, edges clamped.
fn gaussian_blur(plane: &mut [f32], size: usize, sigma: f32) {
    let taps: Vec<f32> =
        (-2i32..=2).map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = taps.iter().sum();
    let taps: Vec<f32> = taps.iter().map(|t| t / total).collect();
    let clamp = |i: isize| i.clamp(0, size as isize - 1) as usize;
    let mut tmp = vec![0f32; plane.len()];
    for y in 0..size {
        for x in 0..size {
            tmp[y * size + x] = (0..5)
                .map(|k| taps[k] * plane[y * size + clamp(x as isize + k as isize - 2)])
                .sum();
        }
    }
    for y in 0..size {
        for x in 0..size {
            plane[y * size + x] =
                (0..5).map(|k| taps[k] * tmp[clamp(y as isize + k as isize - 2) * size + x]).sum();
        }
    }
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box-Muller; one value per call is enough here.
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// The views of one batch, ready to become tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Index of the batch within its epoch.
    pub index: usize,
    /// Two global views: all first views (`B x C x H x W`), then all second views.
    pub globals: Vec<f32>,
    /// Local crops: crop 0 of every image, then crop 1, ... (`L*B x C x s x s`).
    pub locals: Vec<f32>,
    /// Images in the batch.
    pub size: usize,
}

/// Draws the views of the images `indices` (positions `first_position..` of epoch `epoch`).
pub fn make_batch(
    data: &Dataset,
    indices: &[usize],
    config: &AugmentConfig,
    seed: u64,
    epoch: usize,
    batch_index: usize,
) -> Batch {
    let shape = (data.channels, data.height, data.width);
    let global_len = data.channels * data.height * data.width;
    let local_len = data.channels * config.local_size * config.local_size;
    let b = indices.len();
    let mut globals = vec![0f32; 2 * b * global_len];
    let mut locals = vec![0f32; config.local_crops * b * local_len];
    for (slot, &image_index) in indices.iter().enumerate() {
        let image = data.image(image_index);
        let position = (batch_index * b + slot) as u64;
        for view in 0..2 {
            let mut rng =
                ChaCha8Rng::seed_from_u64(mix_seed(&[seed, epoch as u64, position, view as u64]));
            let out =
                &mut globals[(view * b + slot) * global_len..(view * b + slot + 1) * global_len];
            draw_view(image, shape, data.height, config.global_scale, config, &mut rng, out);
        }
        for crop in 0..config.local_crops {
            let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[
                seed,
                epoch as u64,
                position,
                2 + crop as u64,
            ]));
            let out = &mut locals[(crop * b + slot) * local_len..(crop * b + slot + 1) * local_len];
            draw_view(image, shape, config.local_size, config.local_scale, config, &mut rng, out);
        }
    }
    Batch { index: batch_index, globals, locals, size: b }
}

/// The order in which epoch `epoch` visits the images: a seeded shuffle.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[seed, epoch as u64, u64::MAX])));
    order
}

/// Batches of one epoch, prepared on a background thread while the caller trains.
pub struct Prefetcher {
    receiver: Receiver<Batch>,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts preparing batches `first_batch..batches` of `epoch`, `ahead` at most in flight.
    pub fn start(
        data: Arc<Dataset>,
        config: Arc<AugmentConfig>,
        seed: u64,
        epoch: usize,
        batch_size: usize,
        first_batch: usize,
        ahead: usize,
    ) -> Prefetcher {
        let (sender, receiver) = sync_channel(ahead.max(1));
        let worker = std::thread::spawn(move || {
            let order = epoch_order(data.len(), seed, epoch);
            let batches = data.len() / batch_size;
            for index in first_batch..batches {
                let indices = &order[index * batch_size..(index + 1) * batch_size];
                let batch = make_batch(&data, indices, &config, seed, epoch, index);
                if sender.send(batch).is_err() {
                    return;
                }
            }
        });
        Prefetcher { receiver, worker: Some(worker) }
    }

    /// The next batch, or `None` at the end of the epoch.
    pub fn next_batch(&mut self) -> Option<Batch> {
        self.receiver.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Dropping the receiver first makes a blocked sender return.
        let (_, dummy) = sync_channel(1);
        drop(std::mem::replace(&mut self.receiver, dummy));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_set() -> Dataset {
        let pixels: Vec<u8> = (0..4 * 8 * 8).map(|v| (v * 7 % 256) as u8).collect();
        Dataset {
            pixels,
            channels: 1,
            height: 8,
            width: 8,
            labels: None,
            class_names: vec![],
            origin: "mem".into(),
        }
    }

    #[test]
    fn batches_are_reproducible_and_views_differ() {
        let data = tiny_set();
        let config = AugmentConfig { local_crops: 2, local_size: 8, ..AugmentConfig::default() };
        let a = make_batch(&data, &[0, 1], &config, 5, 3, 1);
        let b = make_batch(&data, &[0, 1], &config, 5, 3, 1);
        assert_eq!(a.globals, b.globals);
        assert_eq!(a.locals, b.locals);
        assert_eq!(a.globals.len(), 2 * 2 * 64);
        assert_eq!(a.locals.len(), 2 * 2 * 64);
        assert_ne!(a.globals[..64], a.globals[128..192], "the two views of image 0 should differ");
        let c = make_batch(&data, &[0, 1], &config, 6, 3, 1);
        assert_ne!(a.globals, c.globals);
    }

    #[test]
    fn constant_image_stays_constant_and_is_normalised() {
        // Whatever the crop, flip and blur, a flat grey image stays flat; with no
        // brightness or contrast change, it comes out as (0.6 - mean) / std.
        let data = Dataset { pixels: vec![153; 64], ..tiny_set() }.take(1);
        let config = AugmentConfig {
            brightness: 0.0,
            contrast: 0.0,
            blur: 1.0,
            mean: vec![0.5],
            std: vec![0.25],
            ..AugmentConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut out = vec![0f32; 36];
        for _ in 0..20 {
            draw_view(data.image(0), (1, 8, 8), 6, (0.2, 1.0), &config, &mut rng, &mut out);
            assert!(out.iter().all(|v| (v - 0.4).abs() < 1e-5), "{out:?}");
        }
    }

    #[test]
    fn epoch_order_is_a_permutation() {
        let mut order = epoch_order(100, 1, 2);
        assert_ne!(order, (0..100).collect::<Vec<_>>());
        order.sort();
        assert_eq!(order, (0..100).collect::<Vec<_>>());
    }
}
