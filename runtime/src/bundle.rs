//! The model bundle: one `.scb` file holding everything a device needs to classify.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 8 | magic `SCBUNDLE` |
//! | 8 | 2 | format version ([`FORMAT_VERSION`]) |
//! | 10 | 2 | reserved, zero |
//! | 12 | 8 | body length `L` in bytes, at most [`MAX_BODY_BYTES`] |
//! | 20 | L | body: the [`Bundle`] fields, encoded with postcard |
//! | 20+L | 32 | SHA-256 of bytes `0 .. 20+L` |
//! | 52+L | 1 | signature kind: 0 none, 1 ed25519 |
//! | 53+L | 96 | with kind 1: the signer's public key (32) and the signature of the digest (64) |
//!
//! The signature sits outside the digest, so signing a bundle does not change what it
//! signs. Every float of the network, the heads and the anchors is stored as f16, which
//! halves the file against the f32 ONNX network; [`Bundle::network_proto`] widens them back
//! to f32 for the inference engine.
//!
//! ```no_run
//! use selfclass_runtime::bundle::Bundle;
//!
//! let bundle = Bundle::load("models/fashion-mnist.scb".as_ref())?;
//! println!("model v{} with heads {:?}", bundle.model_version, bundle.classes_per_head());
//! # Ok::<(), selfclass_runtime::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use half::f16;
use ndarray::{Array1, Array2};
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_onnx::pb::{tensor_proto::DataType, ModelProto, TensorProto};

use crate::head::Head;
use crate::{Error, Result};

/// The eight bytes every bundle starts with.
pub const MAGIC: &[u8; 8] = b"SCBUNDLE";
/// The format version this runtime writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bodies larger than this are refused before anything is allocated for them.
pub const MAX_BODY_BYTES: u64 = 256 << 20;
const HEADER_BYTES: usize = 20;
const DIGEST_BYTES: usize = 32;
const SIGNATURE_BLOCK_BYTES: usize = 32 + 64;
/// Float initialisers of at least this many elements are stored as f16; smaller ones
/// (epsilons, shapes) stay in the graph as they are.
const MIN_F16_ELEMENTS: usize = 16;

/// How a raw frame is fitted to the network's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResizePolicy {
    /// Scale the whole frame to the input size, changing its aspect ratio if needed.
    Stretch,
    /// Cut the largest centred region with the input's aspect ratio, then scale it.
    CenterCrop,
}

/// What the network expects as input, and how to get there from a frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Input width and height in pixels.
    pub width: u32,
    pub height: u32,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: u8,
    /// Per-channel mean and standard deviation applied to pixel values scaled to [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub resize: ResizePolicy,
}

impl Preprocess {
    /// Checks the values once, so a bad bundle fails at load and not at the first frame.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::invalid("preprocessing", reason));
        if !(1..=4096).contains(&self.width) || !(1..=4096).contains(&self.height) {
            return bad(format!("input size {}x{} is outside 1..=4096", self.width, self.height));
        }
        if self.channels != 1 && self.channels != 3 {
            return bad(format!("{} channels; only 1 or 3 are supported", self.channels));
        }
        let c = self.channels as usize;
        if self.mean.len() != c || self.std.len() != c {
            return bad(format!(
                "{} means and {} deviations for {c} channels",
                self.mean.len(),
                self.std.len()
            ));
        }
        if self.mean.iter().any(|m| !m.is_finite())
            || self
                .std
                .iter()
                .any(|s| s.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || !s.is_finite())
        {
            return bad("means must be finite and deviations positive".into());
        }
        Ok(())
    }

    /// Number of f32 values of one input image.
    pub fn input_len(&self) -> usize {
        self.width as usize * self.height as usize * self.channels as usize
    }
}

/// Where a model came from and how good it was when it left the server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Data set name, e.g. `fashion-mnist`.
    pub dataset: String,
    pub train_images: u64,
    pub epochs: u32,
    pub seed: u64,
    /// The command line that produced the model.
    pub command_line: String,
    /// Evaluation figures by name, e.g. `test_acc`, `test_nmi`.
    pub metrics: BTreeMap<String, f64>,
    /// Seconds since the Unix epoch.
    pub created_unix_s: u64,
    /// Program and version that wrote the bundle, e.g. `sc-train 0.1.0`.
    pub producer: String,
}

/// An ed25519 signature over the bundle's digest, with the key that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    pub public_key: [u8; 32],
    pub signature: [u8; 64],
}

/// Floats stored as little-endian f16 bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct F16Blob(#[serde(with = "serde_bytes")] Vec<u8>);

impl F16Blob {
    fn from_f32(values: &[f32]) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * 2);
        for &v in values {
            bytes.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
        }
        F16Blob(bytes)
    }

    fn len(&self) -> usize {
        self.0.len() / 2
    }

    fn to_f32(&self) -> Vec<f32> {
        self.0
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WeightRecord {
    name: String,
    dims: Vec<u64>,
    data: F16Blob,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NetworkRecord {
    /// The ONNX model with its large float initialisers taken out (they are in `weights`).
    #[serde(with = "serde_bytes")]
    graph: Vec<u8>,
    weights: Vec<WeightRecord>,
    embedding_dim: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct HeadRecord {
    classes: u32,
    dim: u32,
    v: F16Blob,
    g: F16Blob,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AnchorRecord {
    count: u32,
    dim: u32,
    view1: F16Blob,
    view2: F16Blob,
}

/// The postcard-encoded body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Body {
    model_version: u64,
    preprocess: Preprocess,
    network: NetworkRecord,
    heads: Vec<HeadRecord>,
    anchors: Option<AnchorRecord>,
    provenance: Provenance,
}

/// A decoded, validated model bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    /// Monotonic model version: devices refuse to go below the highest they installed.
    pub model_version: u64,
    pub preprocess: Preprocess,
    pub provenance: Provenance,
    network: NetworkRecord,
    heads: Vec<HeadRecord>,
    anchors: Option<AnchorRecord>,
    /// Present once the bundle has been signed.
    pub signature: Option<Signature>,
}

impl Bundle {
    /// Builds a bundle from an f32 ONNX embedding network (one image input, one
    /// L2-normalised embedding output) and the heads that classify its embeddings.
    pub fn from_onnx(
        onnx: &[u8],
        heads: &[Head<f32>],
        preprocess: Preprocess,
        provenance: Provenance,
    ) -> Result<Bundle> {
        preprocess.validate()?;
        let mut proto = ModelProto::decode(onnx)
            .map_err(|e| Error::inference("ONNX input", format!("not an ONNX model: {e}")))?;
        let graph = proto
            .graph
            .as_mut()
            .ok_or_else(|| Error::inference("ONNX input", "the model has no graph"))?;

        let mut weights = Vec::new();
        for tensor in graph.initializer.iter_mut() {
            if let Some(values) = large_float_values(tensor)? {
                weights.push(WeightRecord {
                    name: tensor.name.clone(),
                    dims: tensor.dims.iter().map(|&d| d as u64).collect(),
                    data: F16Blob::from_f32(&values),
                });
                tensor.float_data.clear();
                tensor.raw_data.clear();
            }
        }
        let outputs = graph.output.len();
        let inputs = graph
            .input
            .iter()
            .filter(|i| !graph.initializer.iter().any(|t| t.name == i.name))
            .count();
        if outputs != 1 || inputs != 1 {
            return Err(Error::inference(
                "ONNX input",
                format!("expected one image input and one embedding output, found {inputs} and {outputs}"),
            ));
        }
        let graph_bytes = proto.encode_to_vec();
        let embedding_dim = heads.first().map_or(0, |h| h.dim()) as u32;

        let mut bundle = Bundle {
            model_version: 1,
            preprocess,
            provenance,
            network: NetworkRecord { graph: graph_bytes, weights, embedding_dim },
            heads: Vec::new(),
            anchors: None,
            signature: None,
        };
        bundle.set_heads(heads)?;
        Ok(bundle)
    }

    /// Replaces the heads (for example after on-device adaptation).
    pub fn set_heads(&mut self, heads: &[Head<f32>]) -> Result<()> {
        if heads.is_empty() {
            return Err(Error::invalid("bundle heads", "a bundle needs at least one head"));
        }
        let dim = heads[0].dim();
        if let Some(h) = heads.iter().find(|h| h.dim() != dim) {
            return Err(Error::invalid(
                "bundle heads",
                format!("heads take embeddings of {} and {} dimensions", dim, h.dim()),
            ));
        }
        self.heads = heads
            .iter()
            .map(|h| HeadRecord {
                classes: h.classes() as u32,
                dim: h.dim() as u32,
                v: F16Blob::from_f32(&h.v.iter().copied().collect::<Vec<_>>()),
                g: F16Blob::from_f32(&h.g.to_vec()),
            })
            .collect();
        self.network.embedding_dim = dim as u32;
        Ok(())
    }

    /// The heads, widened to f32.
    pub fn heads(&self) -> Result<Vec<Head<f32>>> {
        self.heads
            .iter()
            .map(|r| {
                let v = Array2::from_shape_vec((r.classes as usize, r.dim as usize), r.v.to_f32())
                    .map_err(|e| Error::bundle("heads", e.to_string()))?;
                Head::new(v, Array1::from(r.g.to_f32()))
            })
            .collect()
    }

    /// Number of classes of each head, in order.
    pub fn classes_per_head(&self) -> Vec<usize> {
        self.heads.iter().map(|h| h.classes as usize).collect()
    }

    /// Dimension of the embeddings the network produces and the heads take.
    pub fn embedding_dim(&self) -> usize {
        self.network.embedding_dim as usize
    }

    /// Stores pairs of embeddings (two views of the same training image per row) that a
    /// device mixes into its replay so adaptation keeps what the server taught.
    pub fn set_anchors(&mut self, view1: &Array2<f32>, view2: &Array2<f32>) -> Result<()> {
        if view1.dim() != view2.dim() || view1.ncols() != self.embedding_dim() {
            return Err(Error::invalid(
                "bundle anchors",
                format!(
                    "views of shapes {:?} and {:?} for embeddings of dimension {}",
                    view1.dim(),
                    view2.dim(),
                    self.embedding_dim()
                ),
            ));
        }
        let flat = |a: &Array2<f32>| a.iter().copied().collect::<Vec<_>>();
        self.anchors = Some(AnchorRecord {
            count: view1.nrows() as u32,
            dim: view1.ncols() as u32,
            view1: F16Blob::from_f32(&flat(view1)),
            view2: F16Blob::from_f32(&flat(view2)),
        });
        Ok(())
    }

    /// The anchor embedding pairs, if the bundle carries any.
    pub fn anchors(&self) -> Result<Option<(Array2<f32>, Array2<f32>)>> {
        let Some(a) = &self.anchors else { return Ok(None) };
        let shape = (a.count as usize, a.dim as usize);
        let view = |blob: &F16Blob| {
            Array2::from_shape_vec(shape, blob.to_f32())
                .map_err(|e| Error::bundle("anchors", e.to_string()))
        };
        Ok(Some((view(&a.view1)?, view(&a.view2)?)))
    }

    /// The ONNX network with every weight widened back to f32, ready for the inference
    /// engine.
    pub fn network_proto(&self) -> Result<ModelProto> {
        let mut proto = ModelProto::decode(self.network.graph.as_slice())
            .map_err(|e| Error::bundle("network", format!("graph does not decode: {e}")))?;
        let graph =
            proto.graph.as_mut().ok_or_else(|| Error::bundle("network", "graph is missing"))?;
        for record in &self.network.weights {
            let tensor =
                graph.initializer.iter_mut().find(|t| t.name == record.name).ok_or_else(|| {
                    Error::bundle(
                        "network",
                        format!("weight {} has no slot in the graph", record.name),
                    )
                })?;
            tensor.data_type = DataType::Float as i32;
            tensor.raw_data = record.data.to_f32().iter().flat_map(|v| v.to_le_bytes()).collect();
        }
        Ok(proto)
    }

    /// The network as f32 ONNX bytes (what the bundle was made from, up to f16 rounding).
    pub fn network_onnx_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.network_proto()?.encode_to_vec())
    }

    /// Encodes the bundle into its file form.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let body = Body {
            model_version: self.model_version,
            preprocess: self.preprocess.clone(),
            network: self.network.clone(),
            heads: self.heads.clone(),
            anchors: self.anchors.clone(),
            provenance: self.provenance.clone(),
        };
        let body =
            postcard::to_allocvec(&body).map_err(|e| Error::bundle("encoding", e.to_string()))?;
        let mut out = Vec::with_capacity(
            HEADER_BYTES + body.len() + DIGEST_BYTES + 1 + SIGNATURE_BLOCK_BYTES,
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        match &self.signature {
            None => out.push(0),
            Some(sig) => {
                out.push(1);
                out.extend_from_slice(&sig.public_key);
                out.extend_from_slice(&sig.signature);
            }
        }
        Ok(out)
    }

    /// The SHA-256 digest the file carries (and a signature signs).
    pub fn digest(&self) -> Result<[u8; 32]> {
        let bytes = self.to_bytes()?;
        let (_, digest, _) = split(&bytes, "bundle")?;
        Ok(digest)
    }

    /// Decodes and validates a bundle. `origin` names it in error messages (a path, say).
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Bundle> {
        let (body, _, signature) = split(bytes, origin)?;
        let body: Body = postcard::from_bytes(body).map_err(|e| {
            Error::bundle(origin, format!("body does not decode ({e}); the file is damaged or was written by an incompatible version"))
        })?;
        validate_body(&body).map_err(|reason| Error::bundle(origin, reason))?;
        Ok(Bundle {
            model_version: body.model_version,
            preprocess: body.preprocess,
            provenance: body.provenance,
            network: body.network,
            heads: body.heads,
            anchors: body.anchors,
            signature,
        })
    }

    /// Reads a bundle file. Files larger than any valid bundle are refused unread.
    pub fn load(path: &Path) -> Result<Bundle> {
        let origin = path.display().to_string();
        let size =
            std::fs::metadata(path).map_err(|e| Error::io("opening model bundle", path, e))?.len();
        let limit =
            MAX_BODY_BYTES + (HEADER_BYTES + DIGEST_BYTES + 1 + SIGNATURE_BLOCK_BYTES) as u64;
        if size > limit {
            return Err(Error::bundle(
                origin,
                format!("file is {size} bytes, more than any bundle can be ({limit})"),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading model bundle", path, e))?;
        Bundle::from_bytes(&bytes, &origin)
    }

    /// Writes the bundle atomically: a crash leaves the old file or the new one.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fsutil::atomic_write(path, &self.to_bytes()?)
    }
}

/// Splits a bundle file into body, digest and signature, checking everything that can be
/// checked without decoding the body.
fn split<'a>(bytes: &'a [u8], origin: &str) -> Result<(&'a [u8], [u8; 32], Option<Signature>)> {
    let fail = |reason: String| Err(Error::bundle(origin, reason));
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return fail("not a selfclass model bundle (the file does not start with SCBUNDLE)".into());
    }
    if bytes.len() < HEADER_BYTES {
        return fail(format!(
            "truncated: {} bytes, the header alone is {HEADER_BYTES}; copy the file again",
            bytes.len()
        ));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return fail(format!("format version {version}, this runtime reads version {FORMAT_VERSION}; use a runtime that matches the trainer that wrote it"));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[12..20]);
    let body_len = u64::from_le_bytes(len_bytes);
    if body_len > MAX_BODY_BYTES {
        return fail(format!(
            "declares a body of {body_len} bytes, above the {MAX_BODY_BYTES}-byte limit"
        ));
    }
    let body_end = HEADER_BYTES + body_len as usize;
    let digest_end = body_end + DIGEST_BYTES;
    if bytes.len() < digest_end + 1 {
        return fail(format!(
            "truncated: {} bytes where the header promises at least {}; copy the file again",
            bytes.len(),
            digest_end + 1
        ));
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&bytes[body_end..digest_end]);
    if Sha256::digest(&bytes[..body_end]).as_slice() != digest {
        return fail("digest mismatch: the file is corrupt; copy it again from its source".into());
    }
    let signature = match (bytes[digest_end], bytes.len() - digest_end - 1) {
        (0, 0) => None,
        (1, SIGNATURE_BLOCK_BYTES) => {
            let mut public_key = [0u8; 32];
            let mut signature = [0u8; 64];
            public_key.copy_from_slice(&bytes[digest_end + 1..digest_end + 33]);
            signature.copy_from_slice(&bytes[digest_end + 33..]);
            Some(Signature { public_key, signature })
        }
        (kind, rest) => {
            return fail(format!(
                "bad signature block (kind {kind}, {rest} bytes); the file is damaged"
            ))
        }
    };
    Ok((&bytes[HEADER_BYTES..body_end], digest, signature))
}

/// Checks that every length in a decoded body agrees with the data it describes.
fn validate_body(body: &Body) -> std::result::Result<(), String> {
    body.preprocess.validate().map_err(|e| e.to_string())?;
    if body.heads.is_empty() {
        return Err("no classifier head".into());
    }
    let dim = body.network.embedding_dim as u64;
    for (i, h) in body.heads.iter().enumerate() {
        let expected = h.classes as u64 * h.dim as u64;
        if h.classes == 0
            || h.dim as u64 != dim
            || h.v.len() as u64 != expected
            || h.g.len() as u64 != h.classes as u64
        {
            return Err(format!(
                "head {i} is inconsistent ({} classes, dimension {}, {} weights, {} scales, network dimension {dim})",
                h.classes,
                h.dim,
                h.v.len(),
                h.g.len()
            ));
        }
    }
    for w in &body.network.weights {
        let elements = w.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        if elements != Some(w.data.len() as u64) || w.data.0.len() % 2 != 0 {
            return Err(format!(
                "weight {} has dims {:?} but {} values",
                w.name,
                w.dims,
                w.data.len()
            ));
        }
    }
    if let Some(a) = &body.anchors {
        let expected = a.count as u64 * a.dim as u64;
        if a.dim as u64 != dim
            || a.view1.len() as u64 != expected
            || a.view2.len() as u64 != expected
        {
            return Err(format!(
                "anchors are inconsistent ({} pairs of dimension {})",
                a.count, a.dim
            ));
        }
    }
    Ok(())
}

/// The values of a float initialiser large enough to store as f16, or `None` for any other.
fn large_float_values(tensor: &TensorProto) -> Result<Option<Vec<f32>>> {
    if tensor.data_type != DataType::Float as i32 {
        return Ok(None);
    }
    if tensor.data_location == Some(1) || !tensor.external_data.is_empty() {
        return Err(Error::inference(
            "ONNX input",
            format!(
                "weight {} is stored outside the model file; export with all weights inside",
                tensor.name
            ),
        ));
    }
    let values: Vec<f32> = if !tensor.raw_data.is_empty() {
        if !tensor.raw_data.len().is_multiple_of(4) {
            return Err(Error::inference(
                "ONNX input",
                format!("weight {} has a ragged byte length", tensor.name),
            ));
        }
        tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        tensor.float_data.clone()
    };
    Ok((values.len() >= MIN_F16_ELEMENTS).then_some(values))
}
