//! The embedding network: image batch in, L2-normalised embeddings out.
//!
//! tract parses and simplifies the ONNX graph. When the simplified graph is a chain of
//! convolutions and dense layers with global average pooling and L2 normalisation (what
//! the trainer exports), and the processor has AVX-512 or AVX2 with FMA, the network runs
//! on selfclass's own register-tiled convolution kernels ([`Engine::Auto`]); the lowered
//! network is checked against tract's plan on probe images before it is used, and any
//! other graph, processor or disagreement keeps tract's plan.
//!
//! With tract, the network is optimised once for a batch of one image and a batch runs
//! image by image through that plan (one image lets tract gather each convolution's
//! patches as its kernels read them; a larger batch materialises the whole patch matrix).
//! With selfclass's kernels, a batch runs layer by layer in chunks of images sized to
//! stay in cache, each chunk's pixels tiled together.
//! Either way the buffers a call computes into are kept and reused, one set per
//! concurrent caller.
//!
//! ```no_run
//! use ndarray::Array4;
//! use selfclass_runtime::backbone::Backbone;
//!
//! let net = Backbone::from_onnx_file("ref_net.onnx".as_ref())?;
//! let (c, h, w) = net.input_chw();
//! let embeddings = net.embed(Array4::zeros((2, c, h, w)).view())?;
//! assert_eq!(embeddings.nrows(), 2);
//! # Ok::<(), selfclass_runtime::Error>(())
//! ```

use std::path::Path;
use std::sync::{Arc, Mutex};

use ndarray::{Array2, Array4, ArrayView4, Axis};
use prost::Message;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

use crate::bundle::Bundle;
use crate::convnet::team::{processors, Team};
use crate::convnet::{self, kernel::Isa, ConvNet, Workspace};
use crate::{Error, Result};

type Plan = Arc<TypedRunnableModel>;

/// Thread teams, each under its thread count.
type Teams = Vec<(usize, Arc<Team>)>;

/// Which engine runs the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// selfclass's convolution kernels where the graph and the processor allow them and
    /// they agree with tract's plan on probe images; tract's plan otherwise.
    #[default]
    Auto,
    /// tract's plan always.
    Tract,
}

/// Largest difference allowed between the two engines on a probe image's embedding
/// (unit vectors): both compute in f32, summing in different orders.
const PROBE_TOLERANCE: f32 = 1e-4;

/// An optimised embedding network.
#[derive(Debug, Clone)]
pub struct Backbone {
    runner: Runner,
    input_chw: (usize, usize, usize),
    embedding_dim: usize,
    origin: String,
}

#[derive(Debug, Clone)]
enum Runner {
    /// tract's plan for one image, with run states handed back by finished calls.
    Tract { plan: Plan, idle: Arc<Mutex<Vec<TypedSimpleState>>> },
    /// selfclass's kernels, with workspaces handed back by finished calls and a team of
    /// threads per thread count used (no more threads than processors).
    Kernels { net: Arc<ConvNet>, idle: Arc<Mutex<Vec<Workspace>>>, teams: Arc<Mutex<Teams>> },
}

impl Backbone {
    /// The network of a model bundle, for the input size its preprocessing declares.
    pub fn from_bundle(bundle: &Bundle) -> Result<Backbone> {
        Backbone::from_bundle_with(bundle, Engine::Auto)
    }

    /// Like [`Backbone::from_bundle`], run by `engine`.
    pub fn from_bundle_with(bundle: &Bundle, engine: Engine) -> Result<Backbone> {
        let p = &bundle.preprocess;
        let chw = (p.channels as usize, p.height as usize, p.width as usize);
        Backbone::from_proto(&bundle.network_proto()?, Some(chw), "in bundle", engine)
    }

    /// A plain ONNX file as PyTorch exports it: one image input (`N x C x H x W`, fixed or
    /// dynamic batch) and one embedding output.
    pub fn from_onnx_file(path: &Path) -> Result<Backbone> {
        Backbone::from_onnx_file_with(path, Engine::Auto)
    }

    /// Like [`Backbone::from_onnx_file`], run by `engine`.
    pub fn from_onnx_file_with(path: &Path, engine: Engine) -> Result<Backbone> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading ONNX network", path, e))?;
        Backbone::from_onnx_bytes_with(&bytes, &path.display().to_string(), engine)
    }

    /// Like [`Backbone::from_onnx_file`], from bytes; `origin` names them in errors.
    pub fn from_onnx_bytes(bytes: &[u8], origin: &str) -> Result<Backbone> {
        Backbone::from_onnx_bytes_with(bytes, origin, Engine::Auto)
    }

    /// Like [`Backbone::from_onnx_bytes`], run by `engine`.
    pub fn from_onnx_bytes_with(bytes: &[u8], origin: &str, engine: Engine) -> Result<Backbone> {
        let proto = ModelProto::decode(bytes)
            .map_err(|e| Error::inference(origin, format!("not an ONNX model: {e}")))?;
        Backbone::from_proto(&proto, None, origin, engine)
    }

    fn from_proto(
        proto: &ModelProto,
        chw: Option<(usize, usize, usize)>,
        origin: &str,
        engine: Engine,
    ) -> Result<Backbone> {
        // The graph comes from a file; a malformed one must be an error, even where the
        // engine's own checks would abort instead of returning one.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Backbone::build(proto, chw, origin, engine)
        }))
        .unwrap_or_else(|_| {
            Err(Error::inference(
                origin,
                "the inference engine failed on this graph; the network is malformed",
            ))
        })
    }

    fn build(
        proto: &ModelProto,
        chw: Option<(usize, usize, usize)>,
        origin: &str,
        engine: Engine,
    ) -> Result<Backbone> {
        let fail = |stage: &str, e: &dyn std::fmt::Display| {
            Error::inference(
                origin,
                format!("{stage}: {e}; the network is not a valid image-to-embedding ONNX model"),
            )
        };
        let chw = match chw {
            Some(chw) => chw,
            None => declared_input_chw(proto).map_err(|e| Error::inference(origin, e))?,
        };
        let mut model =
            tract_onnx::onnx().model_for_proto_model(proto).map_err(|e| fail("parsing", &e))?;
        let inputs = model.input_outlets().map_err(|e| fail("inputs", &e))?.len();
        let outputs = model.output_outlets().map_err(|e| fail("outputs", &e))?.len();
        if inputs != 1 || outputs != 1 {
            return Err(Error::inference(
                origin,
                format!("{inputs} inputs and {outputs} outputs; expected one of each"),
            ));
        }
        let shape: TVec<TDim> = tvec![1.to_dim(), chw.0.to_dim(), chw.1.to_dim(), chw.2.to_dim()];
        model
            .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
            .map_err(|e| fail("setting the input shape", &e))?;
        let simplified = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(|e| fail("optimising", &e))?;
        let lowered = match (engine, Isa::detect()) {
            (Engine::Tract, _) => None,
            (Engine::Auto, None) => {
                tracing::debug!(
                    origin,
                    "no convolution kernels for this processor; tract runs the network"
                );
                None
            }
            (Engine::Auto, Some(isa)) => match convnet::lower::lower(&simplified, chw, isa) {
                Ok(net) => Some(net),
                Err(why) => {
                    tracing::debug!(origin, why, "tract runs the network");
                    None
                }
            },
        };
        let plan = simplified
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| fail("planning", &e))?;

        let mut backbone = Backbone {
            runner: Runner::Tract { plan, idle: Arc::default() },
            input_chw: chw,
            embedding_dim: 0,
            origin: origin.to_string(),
        };
        // One all-zero image gives the embedding size; the random ones are only needed to
        // compare the engines.
        let probes = probe_images(chw, if lowered.is_some() { 3 } else { 1 });
        let expected = backbone.run(probes.view(), None)?;
        backbone.embedding_dim = expected.ncols();
        if let Some(net) = lowered {
            let kernels = Backbone {
                runner: Runner::Kernels {
                    net: Arc::new(net),
                    idle: Arc::default(),
                    teams: Arc::default(),
                },
                ..backbone.clone()
            };
            let got = kernels.run(probes.view(), None)?;
            // A value that is NaN on one side only is a disagreement too (skipping kernel
            // rows on the padding drops `0 x NaN` where tract keeps it).
            let gap = if got.dim() == expected.dim() {
                got.iter().zip(expected.iter()).fold(0.0f32, |m, (a, b)| {
                    match (a.is_nan(), b.is_nan()) {
                        (true, true) => m,
                        (false, false) => m.max((a - b).abs()),
                        _ => f32::INFINITY,
                    }
                })
            } else {
                f32::INFINITY
            };
            if gap <= PROBE_TOLERANCE {
                return Ok(kernels);
            }
            tracing::warn!(
                origin,
                gap,
                "selfclass's kernels disagree with tract on probe images; tract runs the network"
            );
        }
        Ok(backbone)
    }

    /// What runs the network: `"selfclass-avx512"`, `"selfclass-avx2"` or `"tract"`.
    pub fn engine(&self) -> &'static str {
        match &self.runner {
            Runner::Tract { .. } => "tract",
            Runner::Kernels { net, .. } => match net.isa() {
                Isa::Avx512 => "selfclass-avx512",
                Isa::Avx2Fma => "selfclass-avx2",
            },
        }
    }

    /// Channels, height and width of one input image.
    pub fn input_chw(&self) -> (usize, usize, usize) {
        self.input_chw
    }

    /// Dimension of the embeddings.
    pub fn embedding_dim(&self) -> usize {
        self.embedding_dim
    }

    /// Embeds a batch of preprocessed images (`N x C x H x W`), returning `N x D`.
    pub fn embed(&self, images: ArrayView4<f32>) -> Result<Array2<f32>> {
        let (_, c, h, w) = images.dim();
        if (c, h, w) != self.input_chw {
            return Err(Error::invalid(
                "embedding",
                format!("images of {c}x{h}x{w}, the network takes {:?}", self.input_chw),
            ));
        }
        if images.is_empty() {
            return Ok(Array2::zeros((0, self.embedding_dim)));
        }
        self.run(images, None)
    }

    /// Like [`Backbone::embed`], on up to `threads` threads at once (rows keep their
    /// order): selfclass's kernels split each layer's work between them; with tract the
    /// batch is split into parts.
    pub fn embed_threads(&self, images: ArrayView4<f32>, threads: usize) -> Result<Array2<f32>> {
        let n = images.dim().0;
        let threads = threads.min(processors());
        if threads <= 1 || n == 0 {
            return self.embed(images);
        }
        if let Runner::Kernels { teams, .. } = &self.runner {
            let (_, c, h, w) = images.dim();
            if (c, h, w) != self.input_chw {
                return self.embed(images);
            }
            let team = {
                let mut teams = teams.lock().unwrap_or_else(|p| p.into_inner());
                match teams.iter().find(|(asked, _)| *asked == threads) {
                    Some((_, team)) => team.clone(),
                    None => {
                        let team = Team::new(threads).map(Arc::new).ok_or_else(|| {
                            Error::inference(&self.origin, format!("starting {threads} threads"))
                        })?;
                        teams.push((threads, team.clone()));
                        team
                    }
                }
            };
            return self.run(images, Some(&team));
        }
        let threads = threads.min(n);
        let chunk = n.div_ceil(threads);
        let parts: Vec<Result<Array2<f32>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = images
                .axis_chunks_iter(Axis(0), chunk)
                .map(|part| {
                    std::thread::Builder::new().spawn_scoped(scope, move || self.embed(part))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        Err(Error::inference(&self.origin, "an embedding thread panicked"))
                    }),
                    Err(e) => Err(Error::inference(
                        &self.origin,
                        format!("starting an embedding thread: {e}"),
                    )),
                })
                .collect()
        });
        let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        ndarray::concatenate(Axis(0), &views)
            .map_err(|e| Error::inference(&self.origin, format!("joining the parts: {e}")))
    }

    /// Embeds `images` (of the network's input size) into one `N x D` array.
    fn run(&self, images: ArrayView4<f32>, team: Option<&Team>) -> Result<Array2<f32>> {
        match &self.runner {
            Runner::Tract { plan, idle } => self.run_tract(plan, idle, images),
            Runner::Kernels { net, idle, .. } => {
                let n = images.dim().0;
                let input = images.as_standard_layout();
                let input = input.as_slice().ok_or_else(|| {
                    Error::inference(&self.origin, "images not in one contiguous block")
                })?;
                let mut out = Array2::zeros((n, net.output_len()));
                let work = idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let mut work = work.unwrap_or_default();
                let slice = out.as_slice_mut().ok_or_else(|| {
                    Error::inference(&self.origin, "output not in one contiguous block")
                })?;
                // The kernels check their bounds by assertion; should one ever fail, the
                // call is an error and its workspace is dropped.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    net.run(input, n, slice, &mut work, team)
                }))
                .map_err(|_| {
                    Error::inference(&self.origin, "the embedding kernels failed on this batch")
                })?;
                idle.lock().unwrap_or_else(|p| p.into_inner()).push(work);
                Ok(out)
            }
        }
    }

    /// Embeds `images` one by one through tract's plan.
    fn run_tract(
        &self,
        plan: &Plan,
        idle: &Mutex<Vec<TypedSimpleState>>,
        images: ArrayView4<f32>,
    ) -> Result<Array2<f32>> {
        let fail =
            |what: &str, e: TractError| Error::inference(&self.origin, format!("{what}: {e}"));
        let state = idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut state = match state {
            Some(state) => state,
            None => TypedSimpleState::new(plan).map_err(|e| fail("planning", e))?,
        };
        let mut out: Option<Array2<f32>> = None;
        for (i, image) in images.axis_chunks_iter(Axis(0), 1).enumerate() {
            let input: Tensor = image.as_standard_layout().into_owned().into();
            let outputs = state.run(tvec![input.into()]).map_err(|e| fail("running", e))?;
            let view = outputs[0].to_plain_array_view::<f32>().map_err(|e| fail("output", e))?;
            let out = out.get_or_insert_with(|| Array2::zeros((images.dim().0, view.len())));
            if view.len() != out.ncols() {
                return Err(Error::inference(
                    &self.origin,
                    format!("output of shape {:?} for one image", view.shape()),
                ));
            }
            out.row_mut(i).iter_mut().zip(view.iter()).for_each(|(o, &v)| *o = v);
        }
        idle.lock().unwrap_or_else(|p| p.into_inner()).push(state);
        Ok(out.unwrap_or_else(|| Array2::zeros((0, self.embedding_dim))))
    }
}

/// `count` images the two engines are compared on when a network loads: all zeros, then
/// fixed pseudo-random values in [-2, 2] (wider than preprocessed pixels).
fn probe_images((c, h, w): (usize, usize, usize), count: usize) -> Array4<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    Array4::from_shape_fn((count, c, h, w), |(n, ..)| {
        if n == 0 {
            return 0.0;
        }
        state =
            state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    })
}

/// The `C x H x W` an ONNX model declares for its one non-weight input.
fn declared_input_chw(proto: &ModelProto) -> std::result::Result<(usize, usize, usize), String> {
    let graph = proto.graph.as_ref().ok_or("the model has no graph")?;
    let input = graph
        .input
        .iter()
        .find(|i| !graph.initializer.iter().any(|t| t.name == i.name))
        .ok_or("the model has no image input")?;
    use tract_onnx::pb::{tensor_shape_proto::dimension::Value, type_proto::Value as TypeValue};
    let dims: Vec<Option<usize>> = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(TypeValue::TensorType(t)) => t
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(Value::DimValue(v)) if v > 0 => Some(v as usize),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    match dims.as_slice() {
        [_, Some(c), Some(h), Some(w)] => Ok((*c, *h, *w)),
        _ => Err(format!(
            "input {} does not declare a fixed N x C x H x W shape; wrap it in a bundle that states the input size",
            input.name
        )),
    }
}
