//! selfclass's own engine for convolutional embedding networks: a chain of 2-D
//! convolutions and dense layers (bias and ReLU or leaky ReLU fused), global average
//! pooling and L2 normalisation, run with register-tiled x86-64 kernels
//! ([`kernel`]) on channels-last buffers.
//!
//! [`lower::lower`] builds one from the graph tract has parsed and simplified; any graph
//! outside that shape, or a processor without the kernels, stays with tract's plan.
//! The backbone checks a lowered network against tract's plan before using it.
//!
//! The kernels are x86-64 only; elsewhere no network is ever lowered (the code still
//! compiles there, so it stays checked on every target).

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

pub(crate) mod kernel;
pub(crate) mod lower;
pub(crate) mod team;

use std::sync::Mutex;

use kernel::{Activation, Isa, Tile, NR};
use team::Team;

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
    GlobalPool {
        scale: f32,
    },
    /// `x / max(|x|, eps)` over the channels.
    Normalize {
        eps: f32,
    },
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
    /// How each convolution walks its input (`None` for other layers).
    schedules: Vec<Option<Schedule>>,
    isa: Isa,
}

/// What a convolution's tiles read, fixed by its shape and its input's geometry.
#[derive(Debug)]
struct Schedule {
    /// Offset of each tap (or each kernel row, when its taps merge into one run) from a
    /// pixel's receptive-field origin.
    taps: Vec<usize>,
    /// Entries of `taps` per kernel row.
    per_row: usize,
    /// Contiguous values read at each tap.
    run: usize,
    /// Output rows grouped by the kernel rows that fall inside the image.
    bands: Vec<Band>,
}

impl Schedule {
    fn new(conv: &Conv, gin: Geometry, oh: usize) -> Schedule {
        let (pw, c) = (gin.padded().1, gin.c);
        // Without dilation along rows, a kernel row's taps are one run of `kw * c` values
        // (the packed weights are in the same order), so the kernel loops over rows.
        let (taps, run): (Vec<usize>, usize) = if conv.dilation.1 == 1 {
            let rows = (0..conv.kernel.0).map(|ky| ky * conv.dilation.0 * pw * c).collect();
            (rows, conv.kernel.1 * c)
        } else {
            let taps = (0..conv.kernel.0)
                .flat_map(|ky| {
                    (0..conv.kernel.1)
                        .map(move |kx| (ky * conv.dilation.0 * pw + kx * conv.dilation.1) * c)
                })
                .collect();
            (taps, c)
        };
        let per_row = taps.len() / conv.kernel.0;
        // Rows whose receptive fields reach into the zero padding skip the kernel rows
        // that land there: a band's tiles multiply only rows `lo..hi`.
        let mut bands: Vec<Band> = Vec::new();
        for y in 0..oh {
            let inside = |ky: &usize| {
                let row = y * conv.stride.0 + ky * conv.dilation.0;
                row >= gin.pad[0] && row < gin.pad[0] + gin.h
            };
            let lo = (0..conv.kernel.0).find(inside).unwrap_or(0);
            let hi = (0..conv.kernel.0).rev().find(inside).map_or(lo, |k| k + 1);
            match bands.iter_mut().find(|b| (b.lo, b.hi) == (lo, hi)) {
                Some(band) => band.rows.push(y),
                None => bands.push(Band { lo, hi, rows: vec![y] }),
            }
        }
        Schedule { taps, per_row, run, bands }
    }
}

/// Buffers of one run, kept from call to call: one set per thread, each sized for one
/// chunk of images.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    sets: Vec<Vec<Vec<f32>>>,
}

/// Bytes of activations a chunk of images may use: about half this processor family's
/// per-core L2 cache, so a chunk's layers pass their buffers on in cache.
const CHUNK_BYTES: usize = 512 * 1024;

impl ConvNet {
    /// The chain `layers` on `c x h x w` images, with the kernels for `isa`. `None` when a
    /// stage does not fit the shape before it.
    pub(crate) fn new(
        layers: Vec<Layer>,
        (c, h, w): (usize, usize, usize),
        isa: Isa,
    ) -> Option<ConvNet> {
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
                    let sizes = [conv.cin, conv.cout, kh, kw, dh, dw, conv.stride.0, conv.stride.1];
                    if sizes.contains(&0)
                        || conv.cin != shape.0
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
        let schedules = layers
            .iter()
            .enumerate()
            .map(|(i, layer)| match layer {
                Layer::Conv(conv) => Some(Schedule::new(conv, geometry[i], geometry[i + 1].h)),
                _ => None,
            })
            .collect();
        Some(ConvNet { layers, geometry, schedules, isa })
    }

    pub(crate) fn isa(&self) -> Isa {
        self.isa
    }

    /// Whether each image's output is one vector (one pixel), not an image.
    pub(crate) fn output_is_vector(&self) -> bool {
        let g = self.geometry[self.geometry.len() - 1];
        (g.h, g.w) == (1, 1)
    }

    /// Values per output row.
    pub(crate) fn output_len(&self) -> usize {
        let g = self.geometry[self.geometry.len() - 1];
        g.c * g.h * g.w
    }

    /// Images per chunk: batches run chunk by chunk through all layers.
    fn chunk_images(&self) -> usize {
        let per_image: usize = self.geometry.iter().map(|g| g.image_len() * 4).sum();
        (CHUNK_BYTES / per_image.max(1)).max(1)
    }

    /// Runs `n` images (`input`, `N x C x H x W` in standard layout) into `out`
    /// (`n x output_len`). With a `team`, a batch of at least two chunks per thread runs
    /// whole chunks on each thread; a smaller one splits each layer between the threads.
    pub(crate) fn run(
        &self,
        input: &[f32],
        n: usize,
        out: &mut [f32],
        work: &mut Workspace,
        team: Option<&Team>,
    ) {
        let first = self.geometry[0];
        let (in_len, out_len) = (first.c * first.h * first.w, self.output_len());
        assert_eq!(input.len(), n * in_len);
        assert_eq!(out.len(), n * out_len);
        let chunk = self.chunk_images().min(n.max(1));
        let threads = team.map_or(1, Team::threads);
        while work.sets.len() < threads {
            work.sets.push(Vec::new());
        }
        for set in &mut work.sets {
            let fits = set.len() == self.geometry.len()
                && set.iter().zip(&self.geometry).all(|(b, g)| b.len() >= chunk * g.image_len());
            if !fits {
                *set = self.geometry.iter().map(|g| vec![0.0; chunk * g.image_len()]).collect();
            }
        }
        let jobs: Vec<(&[f32], &mut [f32])> =
            input.chunks(chunk * in_len).zip(out.chunks_mut(chunk * out_len)).collect();
        match team {
            Some(team) if threads > 1 && jobs.len() >= 2 * threads => {
                let per_thread = jobs.len().div_ceil(threads);
                let mut jobs = jobs.into_iter();
                let shares: Vec<Mutex<_>> = work
                    .sets
                    .iter_mut()
                    .take(threads)
                    .map(|set| {
                        Mutex::new((set, jobs.by_ref().take(per_thread).collect::<Vec<_>>()))
                    })
                    .collect();
                team.run(&|t| {
                    let mut share = shares[t].lock().unwrap_or_else(|p| p.into_inner());
                    let (set, mine) = &mut *share;
                    for (input, out) in mine.iter_mut() {
                        self.forward(input, out, set, None);
                    }
                });
            }
            _ => {
                for (input, out) in jobs {
                    self.forward(input, out, &mut work.sets[0], team);
                }
            }
        }
    }

    /// One chunk of images through every layer; with a `team`, each convolution's work is
    /// shared between its threads.
    fn forward(
        &self,
        input: &[f32],
        out: &mut [f32],
        buffers: &mut [Vec<f32>],
        team: Option<&Team>,
    ) {
        let first = self.geometry[0];
        let n = input.len() / (first.c * first.h * first.w);
        let plane = first.h * first.w;
        let buf = &mut buffers[0];
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
            let (done, rest) = buffers.split_at_mut(i + 1);
            let (src, dst) = (&done[i], &mut rest[0]);
            let (gin, gout) = (self.geometry[i], self.geometry[i + 1]);
            match layer {
                Layer::Conv(conv) => {
                    let schedule = self.schedules[i].as_ref().expect("a convolution's schedule");
                    self.conv(conv, schedule, n, src, gin, dst, gout, team)
                }
                Layer::GlobalPool { scale } => {
                    for image in 0..n {
                        let o = gout.at(image, 0, 0);
                        let sums = &mut dst[o..o + gin.c];
                        sums.fill(0.0);
                        for y in 0..gin.h {
                            for x in 0..gin.w {
                                let at = gin.at(image, y, x);
                                sums.iter_mut()
                                    .zip(&src[at..at + gin.c])
                                    .for_each(|(s, v)| *s += v);
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
        let last = &buffers[self.geometry.len() - 1];
        out.copy_from_slice(&last[..out.len()]);
    }

    /// One convolution: tiles of output pixels by panels of output channels, panel by
    /// panel (each panel's weights stay in cache across its tiles), split in contiguous
    /// runs over the team's threads.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &self,
        conv: &Conv,
        schedule: &Schedule,
        n: usize,
        src: &[f32],
        gin: Geometry,
        dst: &mut [f32],
        gout: Geometry,
        team: Option<&Team>,
    ) {
        let Schedule { taps, per_row, run, bands } = schedule;
        let (per_row, run, c) = (*per_row, *run, gin.c);
        let ow = gout.w;
        let threads = team.map_or(1, Team::threads);
        // Shared between threads, tiles are small enough that each thread gets two or more.
        let max = self.isa.max_pixels().min((n * gout.h * ow).div_ceil(2 * threads)).max(1);
        let band_tiles: Vec<usize> =
            bands.iter().map(|band| (n * band.rows.len() * ow).div_ceil(max)).collect();
        let panels = conv.cout.div_ceil(NR);
        // Every tile, top of the image first: (band, tile in band).
        let tiles: Vec<(usize, usize)> = band_tiles
            .iter()
            .enumerate()
            .flat_map(|(b, &count)| (0..count).map(move |t| (b, t)))
            .collect();
        let panel_len = conv.panel_len();
        let row_len = conv.kernel.1 * c * NR;
        let (ph, pw) = gin.padded();
        let out_len = dst.len();
        let out = SharedOut(dst.as_mut_ptr());
        // Tiles `tiles` by panels `panels`, panel by panel (a panel's weights stay in cache
        // across the tiles).
        let work = |tiles: &[(usize, usize)], panels: std::ops::Range<usize>| {
            let mut origins = [0usize; kernel::MAX_PIXELS];
            let mut targets = [0usize; kernel::MAX_PIXELS];
            for (panel, &(b, tile)) in panels.flat_map(|p| tiles.iter().map(move |t| (p, t))) {
                let (band, parts) = (&bands[b], band_tiles[b]);
                let pixels = n * band.rows.len() * ow;
                let (start, end) = (tile * pixels / parts, (tile + 1) * pixels / parts);
                for (k, p) in (start..end).enumerate() {
                    let (image, r, x) =
                        (p / (band.rows.len() * ow), p / ow % band.rows.len(), p % ow);
                    let y = band.rows[r];
                    // Receptive-field origin in padded coordinates is (y * sh, x * sw).
                    origins[k] = ((image * ph + y * conv.stride.0) * pw + x * conv.stride.1) * c;
                    targets[k] = gout.at(image, y, x) + panel * NR;
                }
                let m = end - start;
                let weights = &conv.panels[panel * panel_len..(panel + 1) * panel_len];
                let tile = Tile {
                    input: src,
                    pixels: &origins[..m],
                    taps: &taps[band.lo * per_row..band.hi * per_row],
                    cin: run,
                    weights: &weights[band.lo * row_len..],
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
        // Threads take contiguous runs of tiles of about equal work, so each computes the
        // same part of the image in every layer and mostly reads what it wrote itself
        // (passing activations between cores costs more than a small layer's arithmetic).
        // With fewer tiles than threads (a dense layer on one image), they take panels.
        let costs: Vec<usize> = tiles
            .iter()
            .map(|&(b, t)| {
                let (band, parts) = (&bands[b], band_tiles[b]);
                let pixels = n * band.rows.len() * ow;
                let m = (t + 1) * pixels / parts - t * pixels / parts;
                m * (band.hi - band.lo).max(1)
            })
            .collect();
        let cuts = balanced_cuts(&costs, threads);
        match team {
            Some(team) if threads > 1 && tiles.len() >= threads => {
                team.run(&|t| work(&tiles[cuts[t]..cuts[t + 1]], 0..panels));
            }
            Some(team) if threads > 1 => {
                team.run(&|t| work(&tiles, t * panels / threads..(t + 1) * panels / threads));
            }
            _ => work(&tiles, 0..panels),
        }
    }
}

/// Where to cut a run of items of the given costs into `parts` contiguous runs of about
/// equal cost: part `t` is `cuts[t]..cuts[t + 1]`, each cut at the item boundary nearest
/// to `t / parts` of the total.
fn balanced_cuts(costs: &[usize], parts: usize) -> Vec<usize> {
    let total: usize = costs.iter().sum();
    let mut cuts = vec![0; parts + 1];
    let mut done = 0;
    for (i, cost) in costs.iter().enumerate() {
        let before = done;
        done += cost;
        for (t, cut) in cuts.iter_mut().enumerate().skip(1) {
            let goal = t * total / parts;
            if before < goal && done >= goal {
                *cut = if goal - before < done - goal { i } else { i + 1 };
            }
        }
    }
    cuts[parts] = costs.len();
    cuts
}

/// Output rows of a convolution whose receptive fields cover the same kernel rows
/// `lo..hi` inside the image.
#[derive(Debug)]
struct Band {
    lo: usize,
    hi: usize,
    rows: Vec<usize>,
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

#[cfg(test)]
mod tests;
