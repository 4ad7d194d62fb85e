//! Fast CPU kernels for the layers that dominate a training step: 2-D convolution and
//! batch normalisation (optionally fused with ReLU), as candle custom ops with
//! hand-written backward passes.
//!
//! candle's stock CPU convolution runs its backward pass through a transposed convolution
//! that is an order of magnitude slower than the forward pass. Here both directions are
//! one im2col (or col2im) pass plus one large matrix product from the `gemm` crate (through
//! [`selfclass_runtime::matmul`]), which is what candle itself uses for `matmul`. Batch normalisation is fused into two passes
//! over the activations (statistics, then normalise-scale-shift-ReLU) instead of the half
//! dozen full-size temporaries that composing it from elementary tensor ops creates.
//!
//! On a non-CPU device the model uses candle's stock operations instead (see
//! [`crate::model`]); the tests here check both paths against each other.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use selfclass_runtime::matmul::strided;

type CResult<T> = candle_core::Result<T>;

/// Geometry of a square-kernel convolution without dilation or groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Kernel height and width.
    pub kernel: usize,
    /// Step between output positions, in input pixels.
    pub stride: usize,
    /// Zeros added on every side of the input.
    pub padding: usize,
}

impl ConvGeometry {
    /// Output size along one axis for an input of `size` pixels.
    pub fn output_size(&self, size: usize) -> usize {
        (size + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> CResult<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// Shapes of one convolution call, resolved from the input and weight shapes.
#[derive(Debug, Clone, Copy)]
struct ConvShapes {
    batch: usize,
    in_channels: usize,
    in_h: usize,
    in_w: usize,
    out_channels: usize,
    out_h: usize,
    out_w: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl ConvShapes {
    fn new(input: &[usize], weight: &[usize], geometry: ConvGeometry) -> CResult<Self> {
        let (&[batch, in_channels, in_h, in_w], &[out_channels, w_in, kh, kw]) = (input, weight)
        else {
            candle_core::bail!("conv2d: input {input:?} and weight {weight:?} must both be 4-D");
        };
        if w_in != in_channels || kh != geometry.kernel || kw != geometry.kernel {
            candle_core::bail!(
                "conv2d: weight {weight:?} does not fit input {input:?} with kernel {}",
                geometry.kernel
            );
        }
        if in_h + 2 * geometry.padding < geometry.kernel
            || in_w + 2 * geometry.padding < geometry.kernel
        {
            candle_core::bail!("conv2d: input {input:?} smaller than kernel {}", geometry.kernel);
        }
        Ok(ConvShapes {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            out_h: geometry.output_size(in_h),
            out_w: geometry.output_size(in_w),
            kernel: geometry.kernel,
            stride: geometry.stride,
            padding: geometry.padding,
        })
    }

    /// Columns of the patch matrix: one per (input channel, kernel row, kernel column).
    fn patch_len(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }

    fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Input coordinate read by output coordinate `o` and kernel offset `k`, if inside.
    fn source(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        let at = (o * self.stride + k) as isize - self.padding as isize;
        (at >= 0 && (at as usize) < size).then_some(at as usize)
    }

    /// The output coordinates `lo..hi` whose input coordinate for kernel offset `k` lies
    /// inside `0..size`.
    fn valid_range(&self, k: usize, size: usize, out: usize) -> (usize, usize) {
        let (stride, pad) = (self.stride as isize, self.padding as isize);
        let first = (pad - k as isize).max(0);
        let lo = (first + stride - 1) / stride;
        let last = size as isize - 1 + pad - k as isize;
        let hi = if last < 0 { 0 } else { (last / stride + 1).min(out as isize) };
        (lo as usize, (hi.max(lo)) as usize)
    }

    /// Images per work unit: enough that one unit's matrix product has a few hundred
    /// columns (efficient for `gemm`), few enough that its patch matrix stays in cache.
    fn group(&self) -> usize {
        (512 / self.out_pixels().max(1)).clamp(1, self.batch.max(1))
    }

    fn in_image_len(&self) -> usize {
        self.in_channels * self.in_h * self.in_w
    }

    fn out_image_len(&self) -> usize {
        self.out_channels * self.out_pixels()
    }

    /// The patch matrix of a group of images: `patch_len` rows (input channel, kernel row,
    /// kernel column) by `images * out_pixels` columns (image, output row, output column).
    fn im2col(&self, images: &[f32], cols: &mut Vec<f32>) {
        let count = images.len() / self.in_image_len();
        let width = count * self.out_pixels();
        cols.clear();
        cols.resize(self.patch_len() * width, 0.0);
        let plane = self.in_h * self.in_w;
        for c in 0..self.in_channels {
            for ky in 0..self.kernel {
                for kx in 0..self.kernel {
                    let r = (c * self.kernel + ky) * self.kernel + kx;
                    let row = &mut cols[r * width..(r + 1) * width];
                    for b in 0..count {
                        let src = &images[b * self.in_image_len() + c * plane..][..plane];
                        for oy in 0..self.out_h {
                            let Some(iy) = self.source(oy, ky, self.in_h) else { continue };
                            let dst = &mut row[(b * self.out_h + oy) * self.out_w..][..self.out_w];
                            let line = &src[iy * self.in_w..(iy + 1) * self.in_w];
                            let (lo, hi) = self.valid_range(kx, self.in_w, self.out_w);
                            if lo >= hi {
                                continue;
                            }
                            let start = lo * self.stride + kx - self.padding;
                            if self.stride == 1 {
                                dst[lo..hi].copy_from_slice(&line[start..start + hi - lo]);
                            } else {
                                for (d, s) in dst[lo..hi]
                                    .iter_mut()
                                    .zip(line[start..].iter().step_by(self.stride))
                                {
                                    *d = *s;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds a group's patch-matrix gradient back onto its NCHW input gradient.
    fn col2im(&self, cols: &[f32], images: &mut [f32]) {
        let count = images.len() / self.in_image_len();
        let width = count * self.out_pixels();
        let plane = self.in_h * self.in_w;
        for c in 0..self.in_channels {
            for ky in 0..self.kernel {
                for kx in 0..self.kernel {
                    let r = (c * self.kernel + ky) * self.kernel + kx;
                    let row = &cols[r * width..(r + 1) * width];
                    for b in 0..count {
                        let dst = &mut images[b * self.in_image_len() + c * plane..][..plane];
                        for oy in 0..self.out_h {
                            let Some(iy) = self.source(oy, ky, self.in_h) else { continue };
                            let src = &row[(b * self.out_h + oy) * self.out_w..][..self.out_w];
                            let line = &mut dst[iy * self.in_w..(iy + 1) * self.in_w];
                            let (lo, hi) = self.valid_range(kx, self.in_w, self.out_w);
                            if lo >= hi {
                                continue;
                            }
                            let start = lo * self.stride + kx - self.padding;
                            if self.stride == 1 {
                                for (d, s) in
                                    line[start..start + hi - lo].iter_mut().zip(&src[lo..hi])
                                {
                                    *d += s;
                                }
                            } else {
                                for (d, s) in
                                    line[start..].iter_mut().step_by(self.stride).zip(&src[lo..hi])
                                {
                                    *d += s;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The f32 values of a contiguous CPU tensor, borrowed for `f`.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> CResult<R>) -> CResult<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(contiguous_f32(cpu, layout, "kernel input")?),
        _ => candle_core::bail!("the fast kernels run on the CPU only"),
    }
}

/// Copies a group's `out_channels x (images * pixels)` product into NCHW images, or back.
fn regroup(rows: &mut [f32], images: &mut [f32], channels: usize, pixels: usize, to_images: bool) {
    let count = images.len() / (channels * pixels);
    let width = count * pixels;
    for c in 0..channels {
        for b in 0..count {
            let row = &mut rows[c * width + b * pixels..][..pixels];
            let image = &mut images[(b * channels + c) * pixels..][..pixels];
            if to_images {
                image.copy_from_slice(row);
            } else {
                row.copy_from_slice(image);
            }
        }
    }
}

/// Convolution of an NCHW input with an `out x in x k x k` weight, no bias.
#[derive(Debug, Clone, Copy)]
pub struct Conv2dOp {
    /// Kernel size, stride and padding.
    pub geometry: ConvGeometry,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "im2col-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let shapes = ConvShapes::new(l1.dims(), l2.dims(), self.geometry)?;
        let input = contiguous_f32(s1, l1, "conv2d input")?;
        let weight = contiguous_f32(s2, l2, "conv2d weight")?;
        let (patch, out_c, pixels) = (shapes.patch_len(), shapes.out_channels, shapes.out_pixels());
        let group = shapes.group();
        let mut out = vec![0f32; shapes.batch * shapes.out_image_len()];
        out.par_chunks_mut(group * shapes.out_image_len())
            .zip(input.par_chunks(group * shapes.in_image_len()))
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(cols, product), (out_images, in_images)| {
                    shapes.im2col(in_images, cols);
                    let width = cols.len() / patch;
                    product.clear();
                    product.resize(out_c * width, 0.0);
                    // (out_c x patch) weight times (patch x width) patches.
                    strided(
                        (out_c, width, patch),
                        product,
                        (width, 1),
                        weight,
                        (patch, 1),
                        cols,
                        (width, 1),
                    );
                    regroup(product, out_images, out_c, pixels, true);
                },
            );
        let shape = Shape::from((shapes.batch, out_c, shapes.out_h, shapes.out_w));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let shapes = ConvShapes::new(input.dims(), weight.dims(), self.geometry)?;
        let (patch, out_c, pixels) = (shapes.patch_len(), shapes.out_channels, shapes.out_pixels());
        let group = shapes.group();
        let groups = shapes.batch.div_ceil(group);
        // The network's input needs no gradient: skipping it saves a third of the first
        // layer's backward pass.
        let need_input = input.track_op();
        let mut partial_weight = vec![0f32; groups * out_c * patch];
        let mut grad_input =
            vec![0f32; if need_input { shapes.batch * shapes.in_image_len() } else { 0 }];
        with_values(input, |x| {
            with_values(weight, |w| {
                with_values(grad, |dy| {
                    let work = |(g, partial): (usize, &mut [f32]), dx: Option<&mut [f32]>| {
                        let (first, last) = (g * group, ((g + 1) * group).min(shapes.batch));
                        let mut cols = Vec::new();
                        shapes.im2col(
                            &x[first * shapes.in_image_len()..last * shapes.in_image_len()],
                            &mut cols,
                        );
                        let width = cols.len() / patch;
                        let mut dy_rows = vec![0f32; out_c * width];
                        let mut dy_images = dy
                            [first * shapes.out_image_len()..last * shapes.out_image_len()]
                            .to_vec();
                        regroup(&mut dy_rows, &mut dy_images, out_c, pixels, false);
                        // d weight (out_c x patch) = dy (out_c x width) times patches^T.
                        strided(
                            (out_c, patch, width),
                            partial,
                            (patch, 1),
                            &dy_rows,
                            (width, 1),
                            &cols,
                            (1, width),
                        );
                        if let Some(dx) = dx {
                            // d patches (patch x width) = weight^T (patch x out_c) times dy.
                            strided(
                                (patch, width, out_c),
                                &mut cols,
                                (width, 1),
                                w,
                                (1, patch),
                                &dy_rows,
                                (width, 1),
                            );
                            shapes.col2im(&cols, dx);
                        }
                    };
                    let partials = partial_weight.par_chunks_mut(out_c * patch).enumerate();
                    if need_input {
                        partials
                            .zip(grad_input.par_chunks_mut(group * shapes.in_image_len()))
                            .for_each(|(p, dx)| work(p, Some(dx)));
                    } else {
                        partials.for_each(|p| work(p, None));
                    }
                    Ok(())
                })
            })
        })?;
        // Sum the per-group weight gradients in a fixed order, so runs are reproducible.
        let mut grad_weight = vec![0f32; out_c * patch];
        for partial in partial_weight.chunks(out_c * patch) {
            grad_weight.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
        }
        let grad_weight = Tensor::from_vec(grad_weight, weight.shape(), weight.device())?;
        let grad_input = if need_input {
            Some(Tensor::from_vec(grad_input, input.shape(), input.device())?)
        } else {
            None
        };
        Ok((grad_input, Some(grad_weight)))
    }
}

/// Per-channel batch statistics of the last training forward pass, for running averages.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Mean of each channel over batch and space.
    pub mean: Vec<f32>,
    /// Biased variance of each channel over batch and space.
    pub variance: Vec<f32>,
    /// Values per channel the statistics were taken over.
    pub count: usize,
    /// `1 / sqrt(variance + eps)`, kept for the backward pass.
    pub inv_std: Vec<f32>,
}

/// Training-mode batch normalisation of an NCHW (or NC, as NC11) tensor with learned scale
/// and shift, optionally followed by ReLU. The batch statistics are written to `stats` so
/// the layer can update its running averages and the backward pass need not recompute
/// them: give every call its own `stats`.
#[derive(Debug, Clone)]
pub struct BatchNormOp {
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Whether ReLU follows the normalisation.
    pub relu: bool,
    /// Where the forward pass leaves the batch statistics.
    pub stats: Arc<Mutex<BatchStats>>,
}

/// Channel count, values per channel per image, and images of an NCHW shape.
fn channel_layout(dims: &[usize]) -> CResult<(usize, usize, usize)> {
    match dims {
        [n, c] => Ok((*c, 1, *n)),
        [n, c, rest @ ..] => Ok((*c, rest.iter().product(), *n)),
        _ => candle_core::bail!("batch norm: expected at least 2 dimensions, got {dims:?}"),
    }
}

/// Sum of `f(i)` over `0..len` with eight independent f32 lanes (so the compiler can
/// vectorise it), returned in f64.
#[inline(always)]
fn lane_sum(len: usize, f: impl Fn(usize) -> f32) -> f64 {
    let mut lanes = [0f32; 8];
    let full = len / 8 * 8;
    for base in (0..full).step_by(8) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f(base + l);
        }
    }
    let tail: f32 = (full..len).map(&f).sum();
    lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
}

/// Mean, biased variance and inverse standard deviation of every channel (two passes;
/// f32 lanes within one image's plane, f64 across planes).
fn channel_moments(
    x: &[f32],
    channels: usize,
    spatial: usize,
    batch: usize,
    eps: f32,
) -> Vec<(f32, f32, f32)> {
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let count = (spatial * batch) as f64;
            let plane = |b: usize| &x[(b * channels + c) * spatial..][..spatial];
            let sum: f64 = (0..batch)
                .map(|b| {
                    let p = plane(b);
                    lane_sum(spatial, |i| p[i])
                })
                .sum();
            let mean = (sum / count) as f32;
            let squares: f64 = (0..batch)
                .map(|b| {
                    let p = plane(b);
                    lane_sum(spatial, |i| (p[i] - mean) * (p[i] - mean))
                })
                .sum();
            let variance = squares / count;
            (mean, variance as f32, (1.0 / (variance + eps as f64).sqrt()) as f32)
        })
        .collect()
}

/// Applies `y = x * scale[c] + shift[c]` (then ReLU if asked) to every value of channel `c`.
fn scale_shift(x: &[f32], scale: &[f32], shift: &[f32], spatial: usize, relu: bool) -> Vec<f32> {
    let channels = scale.len();
    let image = channels * spatial;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(image).zip(x.par_chunks(image)).for_each(|(out_image, in_image)| {
        for c in 0..channels {
            let (a, b) = (scale[c], shift[c]);
            let src = &in_image[c * spatial..(c + 1) * spatial];
            let dst = &mut out_image[c * spatial..(c + 1) * spatial];
            if relu {
                dst.iter_mut().zip(src).for_each(|(d, &v)| *d = (v * a + b).max(0.0));
            } else {
                dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v * a + b);
            }
        }
    });
    out
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "fused-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (channels, spatial, batch) = channel_layout(l1.dims())?;
        let x = contiguous_f32(s1, l1, "batch norm input")?;
        let gamma = contiguous_f32(s2, l2, "batch norm scale")?;
        let beta = contiguous_f32(s3, l3, "batch norm shift")?;
        if gamma.len() != channels || beta.len() != channels {
            candle_core::bail!(
                "batch norm: {channels} channels but {} scales, {} shifts",
                gamma.len(),
                beta.len()
            );
        }
        let moments = channel_moments(x, channels, spatial, batch, self.eps);
        let scale: Vec<f32> = moments.iter().zip(gamma).map(|(m, g)| g * m.2).collect();
        let shift: Vec<f32> =
            moments.iter().zip(beta).zip(&scale).map(|((m, b), s)| b - m.0 * s).collect();
        let out = scale_shift(x, &scale, &shift, spatial, self.relu);
        if let Ok(mut stats) = self.stats.lock() {
            stats.mean = moments.iter().map(|m| m.0).collect();
            stats.variance = moments.iter().map(|m| m.1).collect();
            stats.count = spatial * batch;
            stats.inv_std = moments.iter().map(|m| m.2).collect();
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (channels, spatial, batch) = channel_layout(x.dims())?;
        let (mean, inv_std) = match self.stats.lock() {
            Ok(stats) if stats.mean.len() == channels => {
                (stats.mean.clone(), stats.inv_std.clone())
            }
            _ => candle_core::bail!("batch norm backward: no statistics from the forward pass"),
        };
        let gamma_values = gamma.to_vec1::<f32>()?;
        let relu = self.relu;
        let count = (spatial * batch) as f64;
        let (dx, sums) = with_values(x, |x| {
            with_values(res, |y| {
                with_values(grad, |dy| {
                    // ReLU passes the gradient only where its output was positive.
                    let plane = |b: usize, c: usize| {
                        let start = (b * channels + c) * spatial;
                        (
                            &x[start..start + spatial],
                            &y[start..start + spatial],
                            &dy[start..start + spatial],
                        )
                    };
                    let masked = |y: f32, d: f32| if relu && y <= 0.0 { 0.0 } else { d };
                    // Per channel: sums of dy and of dy * (x - mean), in f32 lanes per plane.
                    let sums: Vec<(f64, f64)> = (0..channels)
                        .into_par_iter()
                        .map(|c| {
                            let (mut sum_dy, mut sum_dy_xc) = (0f64, 0f64);
                            for b in 0..batch {
                                let (xs, ys, ds) = plane(b, c);
                                let (mut l1, mut l2) = ([0f32; 8], [0f32; 8]);
                                let chunks = xs
                                    .chunks_exact(8)
                                    .zip(ys.chunks_exact(8))
                                    .zip(ds.chunks_exact(8));
                                for ((xc, yc), dc) in chunks {
                                    for l in 0..8 {
                                        let d = masked(yc[l], dc[l]);
                                        l1[l] += d;
                                        l2[l] += d * (xc[l] - mean[c]);
                                    }
                                }
                                let tail = spatial / 8 * 8;
                                for i in tail..spatial {
                                    let d = masked(ys[i], ds[i]);
                                    l1[0] += d;
                                    l2[0] += d * (xs[i] - mean[c]);
                                }
                                sum_dy += l1.iter().map(|&v| v as f64).sum::<f64>();
                                sum_dy_xc += l2.iter().map(|&v| v as f64).sum::<f64>();
                            }
                            (sum_dy, sum_dy_xc * inv_std[c] as f64)
                        })
                        .collect();
                    // dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat)).
                    let mean_dy: Vec<f32> = sums.iter().map(|s| (s.0 / count) as f32).collect();
                    let mean_dy_xhat: Vec<f32> =
                        sums.iter().map(|s| (s.1 / count) as f32).collect();
                    let image = channels * spatial;
                    let mut dx = vec![0f32; x.len()];
                    dx.par_chunks_mut(image).enumerate().for_each(|(b, out_image)| {
                        for c in 0..channels {
                            let k = gamma_values[c] * inv_std[c];
                            let (m, s, md, mdx) =
                                (mean[c], inv_std[c], mean_dy[c], mean_dy_xhat[c]);
                            let (xs, ys, ds) = plane(b, c);
                            let dst = &mut out_image[c * spatial..(c + 1) * spatial];
                            for (((d, &xv), &yv), &dv) in dst.iter_mut().zip(xs).zip(ys).zip(ds) {
                                *d = k * (masked(yv, dv) - md - (xv - m) * s * mdx);
                            }
                        }
                    });
                    Ok((dx, sums))
                })
            })
        })?;

        let device = x.device();
        let dx = Tensor::from_vec(dx, x.shape(), device)?;
        let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
        let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        let dgamma = Tensor::from_vec(dgamma, gamma.shape(), device)?;
        let dbeta = Tensor::from_vec(dbeta, gamma.shape(), device)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Inference-mode batch normalisation folded to a per-channel scale and shift, optionally
/// followed by ReLU. No backward pass: it is only used for embedding.
#[derive(Debug, Clone)]
pub struct ScaleShiftOp {
    /// Multiplies channel `c`.
    pub scale: Vec<f32>,
    /// Then added to channel `c`.
    pub shift: Vec<f32>,
    /// Whether ReLU follows.
    pub relu: bool,
}

impl CustomOp1 for ScaleShiftOp {
    fn name(&self) -> &'static str {
        "scale-shift"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (channels, spatial, _) = channel_layout(layout.dims())?;
        if channels != self.scale.len() {
            candle_core::bail!("scale-shift: {channels} channels but {} scales", self.scale.len());
        }
        let x = contiguous_f32(storage, layout, "scale-shift input")?;
        let out = scale_shift(x, &self.scale, &self.shift, spatial, self.relu);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).expect("shape")
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0));
        d.and_then(|d| d.to_scalar::<f32>()).expect("difference")
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs()
            .and_then(|a| a.flatten_all())
            .and_then(|a| a.max(0))
            .and_then(|a| a.to_scalar::<f32>())
            .expect("max")
    }

    /// Our convolution against candle's stock conv2d, forward and backward, for the layer
    /// shapes the networks use (first layer, stride 2, 1x1 shortcut, odd sizes). Both are
    /// f32 sums of up to 1,152 products of values in [-1, 1] in different orders, so they
    /// may differ by a few ulps of the largest partial sum: 1e-4 relative to the largest
    /// magnitude is ample and still catches any indexing mistake (which errs by O(1)).
    #[test]
    fn conv_matches_stock_conv2d_forward_and_backward() {
        let cases = [
            ([3, 1, 9, 9], 4, 3, 1, 1),
            ([2, 5, 8, 8], 6, 3, 2, 1),
            ([2, 4, 7, 7], 3, 1, 2, 0),
            ([1, 3, 6, 5], 2, 3, 1, 0),
        ];
        for (seed, (input_shape, out_c, kernel, stride, padding)) in cases.into_iter().enumerate() {
            let x = Var::from_tensor(&random(&input_shape, seed as u64)).expect("var");
            let w_shape = [out_c, input_shape[1], kernel, kernel];
            let w = Var::from_tensor(&random(&w_shape, 100 + seed as u64)).expect("var");
            let geometry = ConvGeometry { kernel, stride, padding };

            let ours = x.apply_op2(&w, Conv2dOp { geometry }).expect("ours");
            let stock = x.conv2d(&w, padding, stride, 1, 1).expect("stock");
            assert_eq!(ours.dims(), stock.dims());
            let tol = 1e-4 * max_abs(&stock).max(1.0);
            assert!(max_abs_diff(&ours, &stock) <= tol, "forward case {seed}");

            let upstream = random(ours.dims(), 200 + seed as u64);
            let g_ours = (&ours * &upstream)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            let g_stock = (&stock * &upstream)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            for (name, var) in [("input", &x), ("weight", &w)] {
                let a = g_ours.get(var).expect("our gradient");
                let b = g_stock.get(var).expect("stock gradient");
                let tol = 1e-4 * max_abs(b).max(1.0);
                assert!(max_abs_diff(a, b) <= tol, "{name} gradient, case {seed}");
            }
        }
    }

    /// The fused batch norm against the textbook formula built from stock tensor ops, with
    /// and without ReLU, on an NCHW and an NC input. Tolerance 1e-4: both are f32 with
    /// statistics over at most 128 values.
    #[test]
    fn batch_norm_matches_composed_ops() {
        for (shape, relu) in
            [(vec![4usize, 3, 5, 6], true), (vec![8, 5], false), (vec![3, 2, 4, 4], false)]
        {
            let channels = shape[1];
            let x = Var::from_tensor(&random(&shape, 1)).expect("var");
            let gamma =
                Var::from_tensor(&(random(&[channels], 2) + 1.5).expect("shift")).expect("var");
            let beta = Var::from_tensor(&random(&[channels], 3)).expect("var");
            let op = BatchNormOp { eps: 1e-5, relu, stats: Arc::default() };
            let ours = x.apply_op3(&gamma, &beta, op).expect("ours");

            let mut bshape = vec![1usize; shape.len()];
            bshape[1] = channels;
            let axes: Vec<usize> = (0..shape.len()).filter(|&a| a != 1).collect();
            let mean = x.mean_keepdim(axes.clone()).expect("mean");
            let centred = x.broadcast_sub(&mean).expect("centre");
            let var = centred.sqr().and_then(|s| s.mean_keepdim(axes)).expect("var");
            let norm = centred
                .broadcast_div(&(var + 1e-5).and_then(|v| v.sqrt()).expect("std"))
                .expect("div");
            let g = gamma.reshape(bshape.clone()).expect("g");
            let b = beta.reshape(bshape).expect("b");
            let mut stock =
                norm.broadcast_mul(&g).and_then(|t| t.broadcast_add(&b)).expect("affine");
            if relu {
                stock = stock.relu().expect("relu");
            }
            assert!(max_abs_diff(&ours, &stock) < 1e-4, "forward {shape:?}");

            let upstream = random(&shape, 4);
            let g_ours = (&ours * &upstream)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            let g_stock = (&stock * &upstream)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            for (name, var) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
                let a = g_ours.get(var).expect("ours");
                let b = g_stock.get(var).expect("stock");
                assert!(max_abs_diff(a, b) < 1e-4, "{name} gradient {shape:?}");
            }
        }
    }
}
