//! Fixtures for tests and examples of the crates built on the runtime.

use crate::bundle::{Bundle, Preprocess, Provenance, ResizePolicy};
use crate::head::Head;
use ndarray::{Array1, Array2};
use prost::Message;
use rand::Rng;
use tract_onnx::pb::{
    tensor_proto::DataType, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
};

use crate::onnx::float_value_info;

/// A matrix of the given shape with entries drawn uniformly from [-1, 1).
pub fn uniform_matrix<R: Rng + ?Sized>(rng: &mut R, shape: (usize, usize)) -> Array2<f64> {
    Array2::from_shape_fn(shape, |_| rng.gen_range(-1.0..1.0))
}

/// A tiny embedding network as ONNX bytes: a 1x4x4 image (symbolic batch `N`) flattened
/// and multiplied by a fixed 16x8 matrix, giving 8-dimensional embeddings. It loads in
/// milliseconds. With `op` other than `MatMul` the graph is well formed but the engine
/// cannot run it, which is what a model that "does not load" looks like.
pub fn tiny_onnx(op: &str) -> Vec<u8> {
    let weights: Vec<f32> = (0..16 * 8).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
    let node = |op_type: &str, inputs: &[&str], output: &str| NodeProto {
        op_type: op_type.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: output.into(),
        ..Default::default()
    };
    let graph = GraphProto {
        name: "tiny".into(),
        node: vec![node("Flatten", &["image"], "flat"), node(op, &["flat", "w"], "embedding")],
        initializer: vec![TensorProto {
            name: "w".into(),
            dims: vec![16, 8],
            data_type: DataType::Float as i32,
            float_data: weights,
            ..Default::default()
        }],
        input: vec![float_value_info("image", &[None, Some(1), Some(4), Some(4)])],
        output: vec![float_value_info("embedding", &[None, Some(8)])],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// An unsigned bundle of [`tiny_onnx`] with one head of three classes and `anchor_rows`
/// anchor pairs (view 2 is the negative of view 1; more rows make a larger file).
pub fn tiny_bundle(op: &str, anchor_rows: usize) -> Bundle {
    let head = Head::new(
        Array2::from_shape_fn((3, 8), |(c, d)| ((c * 8 + d) as f32 * 0.7).cos()),
        Array1::from(vec![1.0, 1.5, 2.0]),
    )
    .expect("a valid head");
    let preprocess = Preprocess {
        width: 4,
        height: 4,
        channels: 1,
        mean: vec![0.5],
        std: vec![0.25],
        resize: ResizePolicy::Stretch,
    };
    let provenance = Provenance { dataset: "tiny".into(), epochs: 3, ..Provenance::default() };
    let mut bundle =
        Bundle::from_onnx(&tiny_onnx(op), &[head], preprocess, provenance).expect("a bundle");
    if anchor_rows > 0 {
        bundle
            .set_anchors(&tiny_anchors(anchor_rows, 1.0), &tiny_anchors(anchor_rows, -1.0))
            .expect("anchors");
    }
    bundle
}

/// The anchors of [`tiny_bundle`]: view 1 with `sign` 1, view 2 with `sign` -1.
pub fn tiny_anchors(rows: usize, sign: f32) -> Array2<f32> {
    Array2::from_shape_fn((rows, 8), |(r, d)| sign * ((r * 8 + d) as f32 * 0.01).sin())
}

/// The Fashion-MNIST preprocessing the reference network was exported with.
pub fn fashion_preprocess() -> Preprocess {
    Preprocess {
        width: 28,
        height: 28,
        channels: 1,
        mean: vec![0.286],
        std: vec![0.353],
        resize: ResizePolicy::Stretch,
    }
}
