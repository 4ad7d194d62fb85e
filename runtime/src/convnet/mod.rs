//! selfclass's own engine for convolutional embedding networks: a chain of 2-D
//! convolutions and dense layers (bias and ReLU or leaky ReLU fused), global average
//! pooling and L2 normalisation, run with register-tiled x86-64 kernels
//! ([`kernel`]) on channels-last buffers.
//!
//! [`lower::lower`] builds one from the graph tract has parsed and simplified; any graph
//! outside that shape, or a processor without the kernels, stays with tract's plan.
//! The backbone checks a lowered network against tract's plan before using it.

pub(crate) mod kernel;
pub(crate) mod lower;

use std::sync::Arc;

use kernel::{Activation, Isa, Tile, NR};

/// A convolution (a dense layer is one on a 1x1 image) with packed weights.
#[derive(Debug, Clone)]
pub(crate) struct Conv {
    pub cin: usize,
    pub cout: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub dilation: (usize, usize),
    /// Zero padding: top, left, bottom, right.
    pub pad: [usize; 4],
    /// `[panel][tap][cin][NR]`, zero beyond `cout`.
    pub panels: Vec<f32>,
    /// `cout` rounded up to whole panels.
    pub bias: Vec<f32>,
    pub activation: Activation,
}

impl Conv {
    /// A convolution from `O x I x KH x KW` weights and `O` biases.
    pub(crate) fn new(
        weights: &[f32],
        bias: &[f32],
        (cout, cin, kh, kw): (usize, usize, usize, usize),
        stride: (usize, usize),
        dilation: (usize, usize),
        pad: [usize; 4],
    ) -> Conv {
        assert_eq!(weights.len(), cout * cin * kh * kw);
        assert_eq!(bias.len(), cout);
        let panels_n = cout.div_ceil(NR);
        let taps = kh * kw;
        let mut panels = vec![0.0; panels_n * taps * cin * NR];
        for o in 0..cout {
            let (p, j) = (o / NR, o % NR);
            for i in 0..cin {
                for t in 0..taps {
                    panels[((p * taps + t) * cin + i) * NR + j] = weights[(o * cin + i) * taps + t];
                }
            }
        }
        let mut padded_bias = vec![0.0; panels_n * NR];
        padded_bias[..cout].copy_from_slice(bias);
        Conv {
            cin,
            cout,
            kernel: (kh, kw),
            stride,
            dilation,
            pad,
            panels,
            bias: padded_bias,
            activation: Activation::Identity,
        }
    }

    fn panel_len(&self) -> usize {
        self.kernel.0 * self.kernel.1 * self.cin * NR
    }

    /// Multiplies output channel `o`'s weights and bias by `scale[o]`.
    pub(crate) fn scale_outputs(&mut self, scale: &[f32]) {
        let len = self.panel_len();
        for (o, &s) in scale.iter().enumerate().take(self.cout) {
            let (p, j) = (o / NR, o % NR);
            for v in self.panels[p * len..(p + 1) * len].iter_mut().skip(j).step_by(NR) {
                *v *= s;
            }
            self.bias[o] *= s;
        }
    }

    fn output_hw(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let span = |n: usize, pad: usize, k: usize, d: usize, s: usize| {
            (n + pad - (d * (k - 1) + 1)) / s + 1
        };
        (
            span(h, self.pad[0] + self.pad[2], self.kernel.0, self.dilation.0, self.stride.0),
            span(w, self.pad[1] + self.pad[3], self.kernel.1, self.dilation.1, self.stride.1),
        )
    }
}

/// One stage of the chain.
#[derive(Debug, Clone)]
pub(crate) enum Layer {
    Conv(Conv),
    /// Sum over all pixels, times `scale` (`1 / (H W)` for the mean).
    GlobalPool { scale: f32 },
    /// `x / max(|x|, eps)` over the channels.
    Normalize { eps: f32 },
}

/// The channels-last buffer a stage reads: `n` images of `h x w x c` with zero borders.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    /// Top, left, bottom, right.
    pad: [usize; 4],
}

impl Geometry {
    fn padded(&self) -> (usize, usize) {
        (self.h + self.pad[0] + self.pad[2], self.w + self.pad[1] + self.pad[3])
    }

    fn image_len(&self) -> usize {
        let (ph, pw) = self.padded();
        ph * pw * self.c
    }

    /// Offset of pixel `(y, x)` of image `n`, in unpadded coordinates.
    fn at(&self, n: usize, y: usize, x: usize) -> usize {
        let (ph, pw) = self.padded();
        ((n * ph + y + self.pad[0]) * pw + x + self.pad[1]) * self.c
    }
}

/// A lowered network, ready to run.
#[derive(Debug)]
pub(crate) struct ConvNet {
    layers: Vec<Layer>,
    /// Input geometry of each layer, then the output's.
    geometry: Vec<Geometry>,
    isa: Isa,
}

/// Buffers of one run, kept from call to call; sized for the largest batch seen.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    images: usize,
    buffers: Vec<Vec<f32>>,
}

impl ConvNet {
    /// The chain `layers` on `c x h x w` images, with the kernels for `isa`. `None` when a
    /// stage does not fit the shape before it.
    pub(crate) fn new(layers: Vec<Layer>, (c, h, w): (usize, usize, usize), isa: Isa) -> Option<ConvNet> {
        let mut geometry = Vec::with_capacity(layers.len() + 1);
        let mut shape = (c, h, w);
        for layer in &layers {
            let pad = match layer {
                Layer::Conv(conv) => conv.pad,
                _ => [0; 4],
            };
            geometry.push(Geometry { c: shape.0, h: shape.1, w: shape.2, pad });
            shape = match layer {
                Layer::Conv(conv) => {
                    let (kh, kw) = conv.kernel;
                    let (dh, dw) = conv.dilation;
                    if conv.cin != shape.0
                        || shape.1 + conv.pad[0] + conv.pad[2] < dh * (kh - 1) + 1
                        || shape.2 + conv.pad[1] + conv.pad[3] < dw * (kw - 1) + 1
                    {
                        return None;
                    }
                    let (oh, ow) = conv.output_hw((shape.1, shape.2));
                    (conv.cout, oh, ow)
                }
                Layer::GlobalPool { .. } => (shape.0, 1, 1),
                Layer::Normalize { .. } => {
                    if (shape.1, shape.2) != (1, 1) {
                        return None;
                    }
                    shape
                }
            };
        }
        geometry.push(Geometry { c: shape.0, h: shape.1, w: shape.2, pad: [0; 4] });
        Some(ConvNet { layers, geometry, isa })
    }

    pub(crate) fn isa(&self) -> Isa {
        self.isa
    }

    /// Values per output row.
    pub(crate) fn output_len(&self) -> usize {
        let g = self.geometry[self.geometry.len() - 1];
        g.c * g.h * g.w
    }

    /// Runs `n` images (`input`, `N x C x H x W` in standard layout) into `out`
    /// (`n x output_len`), on `pool` when given.
    pub(crate) fn run(
        &self,
        input: &[f32],
        n: usize,
        out: &mut [f32],
        work: &mut Workspace,
        pool: Option<&rayon::ThreadPool>,
    ) {
        let first = self.geometry[0];
        assert_eq!(input.len(), n * first.c * first.h * first.w);
        assert_eq!(out.len(), n * self.output_len());
        if work.images < n || work.buffers.len() != self.geometry.len() {
            work.buffers = self.geometry.iter().map(|g| vec![0.0; n * g.image_len()]).collect();
            work.images = n;
        }
        let plane = first.h * first.w;
        let buf = &mut work.buffers[0];
        for (image, src) in input.chunks_exact(first.c * plane).enumerate() {
            for (c, channel) in src.chunks_exact(plane).enumerate() {
                for (y, row) in channel.chunks_exact(first.w).enumerate() {
                    let at = first.at(image, y, 0) + c;
                    for (x, &v) in row.iter().enumerate() {
                        buf[at + x * first.c] = v;
                    }
                }
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let (done, rest) = work.buffers.split_at_mut(i + 1);
            let (src, dst) = (&done[i], &mut rest[0]);
            let (gin, gout) = (self.geometry[i], self.geometry[i + 1]);
            match layer {
                Layer::Conv(conv) => self.conv(conv, n, src, gin, dst, gout, pool),
                Layer::GlobalPool { scale } => {
                    for image in 0..n {
                        let o = gout.at(image, 0, 0);
                        let sums = &mut dst[o..o + gin.c];
                        sums.fill(0.0);
                        for y in 0..gin.h {
                            for x in 0..gin.w {
                                let at = gin.at(image, y, x);
                                sums.iter_mut().zip(&src[at..at + gin.c]).for_each(|(s, v)| *s += v);
                            }
                        }
                        sums.iter_mut().for_each(|s| *s *= *scale);
                    }
                }
                Layer::Normalize { eps } => {
                    for image in 0..n {
                        let at = gin.at(image, 0, 0);
                        let x = &src[at..at + gin.c];
                        let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(*eps);
                        let o = gout.at(image, 0, 0);
                        dst[o..o + gin.c].iter_mut().zip(x).for_each(|(d, v)| *d = v / norm);
                    }
                }
            }
        }
        let last = &work.buffers[self.geometry.len() - 1];
        out.copy_from_slice(&last[..out.len()]);
    }

    /// One convolution: tiles of output pixels by panels of output channels, panel by
    /// panel (each panel's weights stay in cache across its tiles), split in contiguous
    /// runs over the pool's threads.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &self,
        conv: &Conv,
        n: usize,
        src: &[f32],
        gin: Geometry,
        dst: &mut [f32],
        gout: Geometry,
        pool: Option<&rayon::ThreadPool>,
    ) {
        let (pw, c) = (gin.padded().1, gin.c);
        let taps: Vec<usize> = (0..conv.kernel.0)
            .flat_map(|ky| {
                (0..conv.kernel.1).map(move |kx| {
                    (ky * conv.dilation.0 * pw + kx * conv.dilation.1) * c
                })
            })
            .collect();
        let (oh, ow) = (gout.h, gout.w);
        let pixels = n * oh * ow;
        let max = self.isa.max_pixels();
        let tiles = pixels.div_ceil(max);
        let panels = conv.cout.div_ceil(NR);
        let items = tiles * panels;
        let panel_len = conv.panel_len();
        let out_len = dst.len();
        let out = SharedOut(dst.as_mut_ptr());
        let work = |range: std::ops::Range<usize>| {
            let mut origins = [0usize; kernel::MAX_PIXELS];
            let mut targets = [0usize; kernel::MAX_PIXELS];
            for item in range {
                let (panel, tile) = (item / tiles, item % tiles);
                let (start, end) = (tile * pixels / tiles, (tile + 1) * pixels / tiles);
                for (k, p) in (start..end).enumerate() {
                    let (image, y, x) = (p / (oh * ow), p % (oh * ow) / ow, p % ow);
                    // Receptive-field origin in padded coordinates is (y * sh, x * sw).
                    let (ph, pw) = gin.padded();
                    origins[k] =
                        ((image * ph + y * conv.stride.0) * pw + x * conv.stride.1) * c;
                    targets[k] = gout.at(image, y, x) + panel * NR;
                }
                let m = end - start;
                let tile = Tile {
                    input: src,
                    pixels: &origins[..m],
                    taps: &taps,
                    cin: c,
                    weights: &conv.panels[panel * panel_len..(panel + 1) * panel_len],
                    bias: &conv.bias[panel * NR..(panel + 1) * NR],
                    activation: conv.activation,
                    lanes: (conv.cout - panel * NR).min(NR),
                    out_pixels: &targets[..m],
                };
                // SAFETY: the ISA was checked when the network was built; items write
                // disjoint (pixel, panel) blocks of `dst`, and `run` checks every offset.
                unsafe { kernel::run(self.isa, &tile, out.get(), out_len) };
            }
        };
        let threads = pool.map_or(1, |p| p.current_num_threads()).min(items).max(1);
        match pool {
            Some(pool) if threads > 1 => pool.scope(|s| {
                for t in 0..threads {
                    let work = &work;
                    s.spawn(move |_| work(t * items / threads..(t + 1) * items / threads));
                }
            }),
            _ => work(0..items),
        }
    }
}

/// The output buffer, shared by threads that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: threads only write disjoint blocks through it, while the buffer's owner waits.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// A rayon pool for `threads` threads, shared by clones of a network.
pub(crate) fn pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("selfclass-embed-{i}"))
        .build()
        .ok()
        .map(Arc::new)
}
