//! The augmented second view of a kept frame, and the camera-like shift of the adaptation
//! benchmark.
//!
//! Both work on the preprocessed input tensor (`C x H x W`, normalised with the bundle's
//! mean and deviation): they undo the normalisation, change the image in [0, 1] pixel
//! space, and normalise again. Working at the network's input size keeps a second view as
//! cheap as the first (a 28x28 warp is a few microseconds).

use rand::Rng;
use selfclass_runtime::bundle::Preprocess;

/// Ranges of the random augmentation that makes a frame's second view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentParams {
    /// Largest rotation either way, degrees.
    pub max_rotation_deg: f32,
    /// Scale drawn from `1 +- max_scale`.
    pub max_scale: f32,
    /// Largest shift either way, in input pixels.
    pub max_shift_px: f32,
    pub flip_probability: f32,
    /// Contrast factor drawn from this range (about the image's mean).
    pub contrast: (f32, f32),
    /// Brightness offset drawn from `+- brightness`.
    pub brightness: f32,
    /// Gamma drawn log-uniformly from this range.
    pub gamma: (f32, f32),
    pub blur_probability: f32,
    /// Standard deviation of added Gaussian noise, drawn up to this value.
    pub max_noise: f32,
}

impl Default for AugmentParams {
    fn default() -> Self {
        AugmentParams {
            max_rotation_deg: 12.0,
            max_scale: 0.1,
            max_shift_px: 2.0,
            flip_probability: 0.5,
            contrast: (0.4, 1.2),
            brightness: 0.15,
            gamma: (0.6, 1.6),
            blur_probability: 0.5,
            max_noise: 0.06,
        }
    }
}

/// The camera-like shift of the adaptation benchmark, applied identically in kind to every
/// frame (each frame draws its own rotation and noise).
///
/// Pixel values `x` in [0, 1] become `0.15 + 0.7 * x^gamma` (contrast squeezed to
/// 0.15..0.85, gamma 1.5, as an over-exposed, washed-out sensor gives), then a 3x3 Gaussian
/// blur (sigma about 0.85 px, a soft lens), then Gaussian noise of deviation 0.04 (sensor
/// noise), and the object is rotated by a uniform angle within +-12 degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CameraShift {
    pub low: f32,
    pub high: f32,
    pub gamma: f32,
    pub blur: bool,
    pub noise: f32,
    pub max_rotation_deg: f32,
}

impl Default for CameraShift {
    fn default() -> Self {
        CameraShift {
            low: 0.15,
            high: 0.85,
            gamma: 1.5,
            blur: true,
            noise: 0.04,
            max_rotation_deg: 12.0,
        }
    }
}

/// Normalisation constants of one tensor layout.
#[derive(Debug, Clone)]
pub struct Layout {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Layout {
    pub fn new(spec: &Preprocess) -> Self {
        Layout {
            channels: spec.channels as usize,
            height: spec.height as usize,
            width: spec.width as usize,
            mean: spec.mean.clone(),
            std: spec.std.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn to_pixels(&self, input: &[f32], out: &mut Vec<f32>) {
        let plane = self.height * self.width;
        out.clear();
        out.extend(input.iter().enumerate().map(|(i, &v)| {
            let c = i / plane;
            (v * self.std[c] + self.mean[c]).clamp(0.0, 1.0)
        }));
    }

    fn to_input(&self, pixels: &[f32], out: &mut [f32]) {
        let plane = self.height * self.width;
        for (i, (o, &p)) in out.iter_mut().zip(pixels).enumerate() {
            let c = i / plane;
            *o = (p.clamp(0.0, 1.0) - self.mean[c]) / self.std[c];
        }
    }
}

/// Makes augmented copies of input tensors, reusing its scratch buffers.
#[derive(Debug, Clone)]
pub struct Augmenter {
    layout: Layout,
    params: AugmentParams,
    pixels: Vec<f32>,
    warped: Vec<f32>,
}

impl Augmenter {
    pub fn new(layout: Layout, params: AugmentParams) -> Self {
        Augmenter { layout, params, pixels: Vec::new(), warped: Vec::new() }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Writes a random augmentation of `input` into `out` (both `C x H x W`, normalised).
    pub fn augment<R: Rng + ?Sized>(&mut self, input: &[f32], out: &mut [f32], rng: &mut R) {
        let p = self.params;
        let l = &self.layout;
        l.to_pixels(input, &mut self.pixels);

        let angle = rng.gen_range(-p.max_rotation_deg..=p.max_rotation_deg).to_radians();
        let scale = 1.0 + rng.gen_range(-p.max_scale..=p.max_scale);
        let shift = (
            rng.gen_range(-p.max_shift_px..=p.max_shift_px),
            rng.gen_range(-p.max_shift_px..=p.max_shift_px),
        );
        let flip = rng.gen::<f32>() < p.flip_probability;
        warp(l, &self.pixels, &mut self.warped, angle, scale, shift, flip);

        let contrast = rng.gen_range(p.contrast.0..=p.contrast.1);
        let brightness = rng.gen_range(-p.brightness..=p.brightness);
        let gamma = (rng.gen_range(p.gamma.0.ln()..=p.gamma.1.ln())).exp();
        let mean = self.warped.iter().sum::<f32>() / self.warped.len().max(1) as f32;
        for v in self.warped.iter_mut() {
            let x = ((*v - mean) * contrast + mean + brightness).clamp(0.0, 1.0);
            *v = x.powf(gamma);
        }
        if rng.gen::<f32>() < p.blur_probability {
            blur3(l, &mut self.warped, &mut self.pixels);
        }
        let noise = rng.gen_range(0.0..=p.max_noise);
        if noise > 0.0 {
            for v in self.warped.iter_mut() {
                *v += noise * gaussian(rng);
            }
        }
        l.to_input(&self.warped, out);
    }
}

/// Applies the benchmark's [`CameraShift`] to `input`, writing `out`.
pub fn apply_shift<R: Rng + ?Sized>(
    layout: &Layout,
    shift: &CameraShift,
    input: &[f32],
    out: &mut [f32],
    rng: &mut R,
) {
    let (mut pixels, mut warped) = (Vec::new(), Vec::new());
    layout.to_pixels(input, &mut pixels);
    let angle = rng.gen_range(-shift.max_rotation_deg..=shift.max_rotation_deg).to_radians();
    warp(layout, &pixels, &mut warped, angle, 1.0, (0.0, 0.0), false);
    for v in warped.iter_mut() {
        *v = shift.low + (shift.high - shift.low) * v.clamp(0.0, 1.0).powf(shift.gamma);
    }
    if shift.blur {
        blur3(layout, &mut warped, &mut pixels);
    }
    for v in warped.iter_mut() {
        *v += shift.noise * gaussian(rng);
    }
    layout.to_input(&warped, out);
}

/// A standard normal draw (Box-Muller).
fn gaussian<R: Rng + ?Sized>(rng: &mut R) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Rotation by `angle` and scaling by `scale` about the centre, then a shift, with
/// bilinear sampling; samples outside the image repeat the edge (no black corners that the
/// network would read as content).
fn warp(
    l: &Layout,
    src: &[f32],
    dst: &mut Vec<f32>,
    angle: f32,
    scale: f32,
    shift: (f32, f32),
    flip: bool,
) {
    let (w, h) = (l.width, l.height);
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    let (sin, cos) = angle.sin_cos();
    dst.clear();
    dst.resize(src.len(), 0.0);
    for c in 0..l.channels {
        let plane = &src[c * w * h..(c + 1) * w * h];
        for y in 0..h {
            for x in 0..w {
                // Inverse map: where in the source does output pixel (x, y) come from?
                let xo = if flip { w as f32 - 1.0 - x as f32 } else { x as f32 } - cx - shift.0;
                let yo = y as f32 - cy - shift.1;
                let sx = (cos * xo + sin * yo) / scale + cx;
                let sy = (-sin * xo + cos * yo) / scale + cy;
                dst[c * w * h + y * w + x] = bilinear(plane, w, h, sx, sy);
            }
        }
    }
}

fn bilinear(plane: &[f32], w: usize, h: usize, x: f32, y: f32) -> f32 {
    let x = x.clamp(0.0, (w - 1) as f32);
    let y = y.clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let top = plane[y0 * w + x0] * (1.0 - fx) + plane[y0 * w + x1] * fx;
    let bottom = plane[y1 * w + x0] * (1.0 - fx) + plane[y1 * w + x1] * fx;
    top * (1.0 - fy) + bottom * fy
}

/// 3x3 Gaussian blur with weights (1 2 1)/4 on each axis (sigma about 0.85 px), edges
/// repeated; `scratch` is reused.
fn blur3(l: &Layout, image: &mut [f32], scratch: &mut Vec<f32>) {
    let (w, h) = (l.width, l.height);
    scratch.clear();
    scratch.resize(image.len(), 0.0);
    let at = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    for c in 0..l.channels {
        let base = c * w * h;
        for y in 0..h {
            for x in 0..w {
                let row = base + y * w;
                let (xl, xr) = (at(x as isize - 1, w), at(x as isize + 1, w));
                scratch[row + x] =
                    0.25 * image[row + xl] + 0.5 * image[row + x] + 0.25 * image[row + xr];
            }
        }
        for y in 0..h {
            let (yu, yd) = (at(y as isize - 1, h), at(y as isize + 1, h));
            for x in 0..w {
                image[base + y * w + x] = 0.25 * scratch[base + yu * w + x]
                    + 0.5 * scratch[base + y * w + x]
                    + 0.25 * scratch[base + yd * w + x];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};
    use selfclass_runtime::bundle::ResizePolicy;

    fn layout(w: u32, h: u32) -> Layout {
        Layout::new(&Preprocess {
            width: w,
            height: h,
            channels: 1,
            mean: vec![0.25],
            std: vec![0.5],
            resize: ResizePolicy::Stretch,
        })
    }

    fn normalise(l: &Layout, pixels: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; pixels.len()];
        l.to_input(pixels, &mut out);
        out
    }

    #[test]
    fn identity_warp_and_a_quarter_turn() {
        let l = layout(3, 3);
        let src: Vec<f32> = (0..9).map(|i| i as f32 / 8.0).collect();
        let mut dst = Vec::new();
        warp(&l, &src, &mut dst, 0.0, 1.0, (0.0, 0.0), false);
        assert!(src.iter().zip(&dst).all(|(a, b)| (a - b).abs() < 1e-6));
        // A quarter turn: output (x, y) samples source (y, 2 - x), exactly on the grid.
        warp(&l, &src, &mut dst, std::f32::consts::FRAC_PI_2, 1.0, (0.0, 0.0), false);
        for y in 0..3 {
            for x in 0..3 {
                assert!((dst[y * 3 + x] - src[(2 - x) * 3 + y]).abs() < 1e-5, "{dst:?}");
            }
        }
        // Flipping twice is the identity.
        let mut once = Vec::new();
        let mut twice = Vec::new();
        warp(&l, &src, &mut once, 0.0, 1.0, (0.0, 0.0), true);
        warp(&l, &once, &mut twice, 0.0, 1.0, (0.0, 0.0), true);
        assert!(src.iter().zip(&twice).all(|(a, b)| (a - b).abs() < 1e-6));
        assert!((once[0] - src[2]).abs() < 1e-6);
    }

    #[test]
    fn blur_keeps_flat_images_and_spreads_a_point() {
        let l = layout(5, 5);
        let mut flat = vec![0.5f32; 25];
        let mut scratch = Vec::new();
        blur3(&l, &mut flat, &mut scratch);
        assert!(flat.iter().all(|v| (v - 0.5).abs() < 1e-6));
        let mut point = vec![0.0f32; 25];
        point[12] = 1.0;
        blur3(&l, &mut point, &mut scratch);
        assert!(
            (point[12] - 0.25).abs() < 1e-6
                && (point[11] - 0.125).abs() < 1e-6
                && (point[6] - 0.0625).abs() < 1e-6
        );
        assert!((point.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn the_shift_squeezes_contrast() {
        let l = layout(8, 8);
        let pixels: Vec<f32> = (0..64).map(|i| if i % 2 == 0 { 0.0 } else { 1.0 }).collect();
        let input = normalise(&l, &pixels);
        let mut out = vec![0.0; 64];
        let shift = CameraShift {
            noise: 0.0,
            max_rotation_deg: 0.0,
            blur: false,
            ..CameraShift::default()
        };
        apply_shift(&l, &shift, &input, &mut out, &mut StdRng::seed_from_u64(1));
        let mut back = Vec::new();
        l.to_pixels(&out, &mut back);
        assert!((back[0] - 0.15).abs() < 1e-5 && (back[1] - 0.85).abs() < 1e-5, "{:?}", &back[..2]);
    }

    #[test]
    fn augmentation_changes_the_image_but_keeps_its_range() {
        let l = layout(28, 28);
        let pixels: Vec<f32> = (0..784).map(|i| ((i % 28) as f32 / 27.0).powi(2)).collect();
        let input = normalise(&l, &pixels);
        let mut aug = Augmenter::new(l.clone(), AugmentParams::default());
        let mut rng = StdRng::seed_from_u64(2);
        let (mut a, mut b) = (vec![0.0; 784], vec![0.0; 784]);
        aug.augment(&input, &mut a, &mut rng);
        aug.augment(&input, &mut b, &mut rng);
        assert!(a.iter().zip(&input).any(|(x, y)| (x - y).abs() > 0.05));
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 0.05), "two draws differ");
        let (lo, hi) = ((0.0 - 0.25) / 0.5, (1.0 - 0.25) / 0.5);
        assert!(a.iter().all(|&v| v >= lo - 1e-6 && v <= hi + 1e-6));
    }
}
