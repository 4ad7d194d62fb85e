//! The embedding network, run with tract: image batch in, L2-normalised embeddings out.
//!
//! The network is optimised once for a batch of one image, and a batch runs image by image
//! through that plan: with one image, tract gathers each convolution's patches as its
//! matrix kernels read them (lazy im2col), while with a larger batch it materialises the
//! whole patch matrix first. Measured on the default model (28 px, one thread, x86-64
//! AVX-512): 430 µs per image alone, 450 µs in batches of 2 to 16, 600 µs in a batch of 64.
//! Run states (the buffers a plan computes into) are kept and reused from call to call, one
//! per concurrent caller.
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

use ndarray::{Array2, ArrayView4, Axis};
use prost::Message;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

use crate::bundle::Bundle;
use crate::{Error, Result};

type Plan = Arc<TypedRunnableModel>;

/// An optimised embedding network.
#[derive(Debug, Clone)]
pub struct Backbone {
    /// The plan for one image.
    plan: Plan,
    /// Run states of `plan` handed back by finished calls.
    idle: Arc<Mutex<Vec<TypedSimpleState>>>,
    input_chw: (usize, usize, usize),
    embedding_dim: usize,
    origin: String,
}

impl Backbone {
    /// The network of a model bundle, for the input size its preprocessing declares.
    pub fn from_bundle(bundle: &Bundle) -> Result<Backbone> {
        let p = &bundle.preprocess;
        let chw = (p.channels as usize, p.height as usize, p.width as usize);
        Backbone::from_proto(&bundle.network_proto()?, Some(chw), "in bundle")
    }

    /// A plain ONNX file as PyTorch exports it: one image input (`N x C x H x W`, fixed or
    /// dynamic batch) and one embedding output.
    pub fn from_onnx_file(path: &Path) -> Result<Backbone> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading ONNX network", path, e))?;
        Backbone::from_onnx_bytes(&bytes, &path.display().to_string())
    }

    /// Like [`Backbone::from_onnx_file`], from bytes; `origin` names them in errors.
    pub fn from_onnx_bytes(bytes: &[u8], origin: &str) -> Result<Backbone> {
        let proto = ModelProto::decode(bytes)
            .map_err(|e| Error::inference(origin, format!("not an ONNX model: {e}")))?;
        Backbone::from_proto(&proto, None, origin)
    }

    fn from_proto(
        proto: &ModelProto,
        chw: Option<(usize, usize, usize)>,
        origin: &str,
    ) -> Result<Backbone> {
        // The graph comes from a file; a malformed one must be an error, even where the
        // engine's own checks would abort instead of returning one.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Backbone::build(proto, chw, origin)
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
        let plan = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(|e| fail("optimising", &e))?
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| fail("planning", &e))?;

        let mut backbone = Backbone {
            plan,
            idle: Arc::default(),
            input_chw: chw,
            embedding_dim: 0,
            origin: origin.to_string(),
        };
        let probe = backbone.run(ndarray::Array4::zeros((1, chw.0, chw.1, chw.2)).view())?;
        backbone.embedding_dim = probe.ncols();
        Ok(backbone)
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
        self.run(images)
    }

    /// Like [`Backbone::embed`], with the batch split into up to `threads` parts that run
    /// at the same time, each on its own thread (rows keep their order).
    pub fn embed_threads(&self, images: ArrayView4<f32>, threads: usize) -> Result<Array2<f32>> {
        let n = images.dim().0;
        let threads = threads.clamp(1, n.max(1));
        if threads == 1 {
            return self.embed(images);
        }
        let chunk = n.div_ceil(threads);
        let parts: Vec<Result<Array2<f32>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = images
                .axis_chunks_iter(Axis(0), chunk)
                .map(|part| scope.spawn(move || self.embed(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::inference(&self.origin, "an embedding thread panicked"))
                    })
                })
                .collect()
        });
        let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        ndarray::concatenate(Axis(0), &views)
            .map_err(|e| Error::inference(&self.origin, format!("joining the parts: {e}")))
    }

    /// Embeds `images` one by one through the plan, into one `N x D` array.
    fn run(&self, images: ArrayView4<f32>) -> Result<Array2<f32>> {
        let fail =
            |what: &str, e: TractError| Error::inference(&self.origin, format!("{what}: {e}"));
        let state = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut state = match state {
            Some(state) => state,
            None => TypedSimpleState::new(&self.plan).map_err(|e| fail("planning", e))?,
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
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(state);
        Ok(out.unwrap_or_else(|| Array2::zeros((0, self.embedding_dim))))
    }
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
