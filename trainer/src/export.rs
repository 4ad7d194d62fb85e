//! Export: the embedding network as a plain ONNX graph (batch norm folded into the
//! preceding convolution or linear layer), and the `.scb` bundle devices load.
//!
//! The graph has one input `image` (`N x C x H x W`, f32, `N` dynamic) and one output
//! `embedding` (`N x D`, L2-normalised), opset 17, and uses only Conv, Relu, Add,
//! GlobalAveragePool, Flatten, Gemm, LeakyRelu, Mul, ReduceSum, Sqrt, Max and Div.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{Array1, Array2, Array4};
use prost::Message;
use selfclass_runtime::backbone::Backbone as TractBackbone;
use selfclass_runtime::bundle::{Bundle, Preprocess, Provenance, ResizePolicy};
use selfclass_runtime::discover::{predict_with_confidence, CONFIDENCE_TEMPERATURE};
use selfclass_runtime::head::Head;
use selfclass_runtime::onnx::float_value_info;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, ModelProto,
    NodeProto, OperatorSetIdProto, TensorProto,
};

use crate::augment::make_batch;
use crate::data::Dataset;
use crate::error::Context;
use crate::model::{Backbone, BatchNorm, ConvBn, Linear, Model, LEAKY_SLOPE, NORM_EPS};
use crate::train::CheckpointState;
use crate::{Error, Result};

/// ONNX operator set the graph declares.
pub const OPSET: i64 = 17;

#[derive(Default)]
struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: usize,
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

impl GraphBuilder {
    fn fresh(&mut self, stem: &str) -> String {
        self.names += 1;
        format!("{stem}_{}", self.names)
    }

    fn weight(&mut self, stem: &str, dims: &[usize], values: Vec<f32>) -> String {
        let name = self.fresh(stem);
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            float_data: values,
            ..Default::default()
        });
        name
    }

    fn int64s(&mut self, stem: &str, values: &[i64]) -> String {
        let name = self.fresh(stem);
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: vec![values.len() as i64],
            data_type: DataType::Int64 as i32,
            int64_data: values.to_vec(),
            ..Default::default()
        });
        name
    }

    fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        let output = self.fresh(&op.to_ascii_lowercase());
        self.node_named(op, inputs, attributes, &output);
        output
    }

    fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
        output: &str,
    ) {
        self.nodes.push(NodeProto {
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            attribute,
            ..Default::default()
        });
    }

    /// Conv with batch norm folded in, then ReLU if the layer has one.
    fn conv_bn(&mut self, input: &str, layer: &ConvBn) -> Result<String> {
        let (scale, shift) = layer.bn.folded()?;
        let dims = layer.weight.dims().to_vec();
        let mut w = layer
            .weight
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .ctx("export conv")?;
        let per_out = w.len() / dims[0];
        for (o, chunk) in w.chunks_mut(per_out).enumerate() {
            chunk.iter_mut().for_each(|v| *v *= scale[o]);
        }
        let w = self.weight("conv_w", &dims, w);
        let b = self.weight("conv_b", &[dims[0]], shift);
        let g = layer.geometry;
        let (k, s, p) = (g.kernel as i64, g.stride as i64, g.padding as i64);
        let attrs = vec![
            ints("kernel_shape", &[k, k]),
            ints("strides", &[s, s]),
            ints("pads", &[p, p, p, p]),
        ];
        let y = self.node("Conv", &[input, &w, &b], attrs);
        Ok(if layer.relu { self.node("Relu", &[&y], vec![]) } else { y })
    }

    /// Gemm with an optional following batch norm folded into its rows.
    fn linear(&mut self, input: &str, layer: &Linear, bn: Option<&BatchNorm>) -> Result<String> {
        let dims = layer.weight.dims().to_vec();
        let mut w = layer
            .weight
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .ctx("export linear")?;
        let mut b = layer.bias.as_tensor().to_vec1::<f32>().ctx("export linear")?;
        if let Some(bn) = bn {
            let (scale, shift) = bn.folded()?;
            for (o, row) in w.chunks_mut(dims[1]).enumerate() {
                row.iter_mut().for_each(|v| *v *= scale[o]);
                b[o] = b[o] * scale[o] + shift[o];
            }
        }
        let w = self.weight("fc_w", &dims, w);
        let b = self.weight("fc_b", &[dims[0]], b);
        Ok(self.node("Gemm", &[input, &w, &b], vec![int("transB", 1)]))
    }
}

/// The model's embedding network (inference mode) as an f32 ONNX graph for inputs of
/// `(channels, height, width)`.
pub fn onnx_model(model: &Model, (c, h, w): (usize, usize, usize)) -> Result<ModelProto> {
    let mut g = GraphBuilder::default();
    let mut x = "image".to_string();
    match &model.backbone {
        Backbone::Plain(layers) => {
            for layer in layers {
                x = g.conv_bn(&x, layer)?;
            }
        }
        Backbone::Resnet { stem, blocks } => {
            x = g.conv_bn(&x, stem)?;
            for block in blocks {
                let shortcut = match &block.shortcut {
                    Some(s) => g.conv_bn(&x, s)?,
                    None => x.clone(),
                };
                let y = g.conv_bn(&x, &block.first)?;
                let y = g.conv_bn(&y, &block.second)?;
                let sum = g.node("Add", &[&y, &shortcut], vec![]);
                x = g.node("Relu", &[&sum], vec![]);
            }
        }
    }
    let pooled = g.node("GlobalAveragePool", &[&x], vec![]);
    let flat = g.node("Flatten", &[&pooled], vec![int("axis", 1)]);
    let hidden = g.linear(&flat, &model.fc1, Some(&model.bn1))?;
    let hidden = g.node("LeakyRelu", &[&hidden], vec![float("alpha", LEAKY_SLOPE)]);
    let z = g.linear(&hidden, &model.fc2, None)?;
    let squares = g.node("Mul", &[&z, &z], vec![]);
    let axes = g.int64s("axes", &[1]);
    let sum = g.node("ReduceSum", &[&squares, &axes], vec![int("keepdims", 1)]);
    let norm = g.node("Sqrt", &[&sum], vec![]);
    let eps = g.weight("eps", &[], vec![NORM_EPS]);
    let floor = g.node("Max", &[&norm, &eps], vec![]);
    g.node_named("Div", &[&z, &floor], vec![], "embedding");

    let graph = GraphProto {
        name: "selfclass_embedding".into(),
        node: g.nodes,
        initializer: g.initializers,
        input: vec![float_value_info("image", &[None, Some(c), Some(h), Some(w)])],
        output: vec![float_value_info("embedding", &[None, Some(model.config.dim)])],
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "sc-train".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    })
}

/// The ONNX graph of [`onnx_model`], encoded.
pub fn onnx_bytes(model: &mut Model, input_chw: (usize, usize, usize)) -> Result<Vec<u8>> {
    Ok(onnx_model(model, input_chw)?.encode_to_vec())
}

/// The model's heads as the runtime's head type.
pub fn runtime_heads(model: &Model) -> Result<Vec<Head<f32>>> {
    model
        .heads
        .iter()
        .map(|h| {
            let (classes, dim) = h.v.dims2().ctx("export heads")?;
            let v =
                h.v.as_tensor()
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .ctx("export heads")?;
            let g = h.g.as_tensor().to_vec1::<f32>().ctx("export heads")?;
            let v = Array2::from_shape_vec((classes, dim), v)
                .map_err(|e| Error::Export(e.to_string()))?;
            Head::new(v, Array1::from(g)).ctx("export heads")
        })
        .collect()
}

/// Inference-mode embeddings of two augmented views of the first `count` training images,
/// for the bundle's replay anchors.
pub fn anchor_pairs(
    model: &mut Model,
    state: &CheckpointState,
    data: &Dataset,
    count: usize,
) -> Result<(Array2<f32>, Array2<f32>)> {
    let count = count.min(data.len());
    let dim = model.config.dim;
    let (mut first, mut second) =
        (Vec::with_capacity(count * dim), Vec::with_capacity(count * dim));
    let chunk = 500;
    let augment = crate::augment::AugmentConfig { local_crops: 0, ..state.config.augment.clone() };
    let mut start = 0;
    while start < count {
        let end = (start + chunk).min(count);
        let indices: Vec<usize> = (start..end).collect();
        let batch =
            make_batch(data, &indices, &augment, state.config.seed, usize::MAX, start / chunk);
        let x = candle_core::Tensor::from_vec(
            batch.globals,
            (2 * indices.len(), data.channels, data.height, data.width),
            &model.device,
        )
        .ctx("anchors")?;
        let z = model.embed(&x, crate::model::Mode::Eval)?;
        let n = indices.len();
        first.extend(
            z.narrow(0, 0, n)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .ctx("anchors")?,
        );
        second.extend(
            z.narrow(0, n, n)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .ctx("anchors")?,
        );
        start = end;
    }
    let to_array = |v: Vec<f32>| {
        Array2::from_shape_vec((count, dim), v).map_err(|e| Error::Export(e.to_string()))
    };
    Ok((to_array(first)?, to_array(second)?))
}

/// Builds the bundle of a trained model: network, heads, preprocessing, provenance with the
/// last epoch's scores, and (when `anchors > 0` and `data` has images) replay anchors.
pub fn build_bundle(
    model: &mut Model,
    state: &CheckpointState,
    data: &Dataset,
    anchors: usize,
    command_line: &str,
) -> Result<Bundle> {
    let chw = state.input_chw;
    let onnx = onnx_bytes(model, chw)?;
    let preprocess = Preprocess {
        width: chw.2 as u32,
        height: chw.1 as u32,
        channels: chw.0 as u8,
        mean: state.mean.clone(),
        std: state.std.clone(),
        resize: ResizePolicy::Stretch,
    };
    let mut metrics = BTreeMap::new();
    if let Some(last) = state.history.last() {
        metrics.insert("train_loss".to_string(), last.loss);
        if let Some(knn) = last.knn_acc {
            metrics.insert("test_knn_acc".to_string(), knn);
        }
        if let Some(t) = &last.test {
            metrics.insert("test_acc".to_string(), t.acc);
            metrics.insert("test_nmi".to_string(), t.nmi);
            metrics.insert("test_ami".to_string(), t.ami);
            metrics.insert("test_ari".to_string(), t.ari);
            metrics.insert("test_head".to_string(), t.head as f64);
        }
    }
    metrics.insert("train_seconds".to_string(), state.elapsed_s);
    let provenance = Provenance {
        dataset: state.dataset.clone(),
        train_images: state.train_images as u64,
        epochs: state.epochs_done as u32,
        seed: state.config.seed,
        command_line: command_line.to_string(),
        metrics,
        created_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        producer: format!("sc-train {}", env!("CARGO_PKG_VERSION")),
    };
    let heads = runtime_heads(model)?;
    let mut bundle =
        Bundle::from_onnx(&onnx, &heads, preprocess, provenance).ctx("building bundle")?;
    if anchors > 0 && !data.is_empty() {
        let (first, second) = anchor_pairs(model, state, data, anchors)?;
        bundle.set_anchors(&first, &second).ctx("bundle anchors")?;
    }
    Ok(bundle)
}

/// What a model says about every image of a data set.
#[derive(Debug, Clone)]
pub struct Predictions {
    /// Classes of each head.
    pub head_classes: Vec<usize>,
    /// Per head, the arg-max class of every image.
    pub clusters: Vec<Vec<u32>>,
    /// Per head, the softmax probability of the chosen class at the device's confidence
    /// temperature, per image.
    pub confidence: Vec<Vec<f32>>,
}

/// Head outputs of a bundle, run with the device runtime, for every image of `data`.
pub fn predict_with_bundle(path: &Path, data: &Dataset) -> Result<Predictions> {
    let bundle = Bundle::load(path).ctx("loading bundle")?;
    let p = &bundle.preprocess;
    if (p.channels as usize, p.height as usize, p.width as usize)
        != (data.channels, data.height, data.width)
    {
        return Err(Error::data(
            &data.origin,
            format!(
                "images are {}x{}x{}, the model takes {}x{}x{}",
                data.channels, data.height, data.width, p.channels, p.height, p.width
            ),
        ));
    }
    let net = TractBackbone::from_bundle(&bundle).ctx("loading network")?;
    let heads = bundle.heads().ctx("bundle heads")?;
    let mut clusters = vec![Vec::with_capacity(data.len()); heads.len()];
    let mut confidence = vec![Vec::with_capacity(data.len()); heads.len()];
    let chunk = 256;
    let len = data.image_len();
    let mut start = 0;
    while start < data.len() {
        let end = (start + chunk).min(data.len());
        let mut values = vec![0f32; (end - start) * len];
        for (i, out) in (start..end).zip(values.chunks_mut(len)) {
            crate::augment::normalise(data.image(i), data.channels, &p.mean, &p.std, out);
        }
        let x =
            Array4::from_shape_vec((end - start, data.channels, data.height, data.width), values)
                .map_err(|e| Error::Export(e.to_string()))?;
        let z = net.embed(x.view()).ctx("embedding")?;
        for (h, head) in heads.iter().enumerate() {
            for (cluster, p) in predict_with_confidence(head, z.view(), CONFIDENCE_TEMPERATURE) {
                clusters[h].push(cluster);
                confidence[h].push(p);
            }
        }
        start = end;
    }
    Ok(Predictions {
        head_classes: heads.iter().map(Head::classes).collect(),
        clusters,
        confidence,
    })
}

/// Checks that the device runtime, running the exported graph, gives the trainer's
/// inference embeddings for `x` within `tolerance`; returns the largest difference.
pub fn check_agreement(model: &mut Model, x: &Array4<f32>, tolerance: f32) -> Result<f32> {
    let (n, c, h, w) = x.dim();
    let onnx = onnx_bytes(model, (c, h, w))?;
    let net = TractBackbone::from_onnx_bytes(&onnx, "export").ctx("loading exported network")?;
    let theirs = net.embed(x.view()).ctx("running exported network")?;
    let input = candle_core::Tensor::from_slice(
        x.as_slice().unwrap_or(&x.iter().copied().collect::<Vec<_>>()),
        (n, c, h, w),
        &model.device,
    )
    .ctx("agreement input")?;
    let ours = model.embed(&input, crate::model::Mode::Eval)?.to_vec2::<f32>().ctx("agreement")?;
    let mut worst = 0f32;
    for (row_ours, row_theirs) in ours.iter().zip(theirs.rows()) {
        for (a, b) in row_ours.iter().zip(row_theirs.iter()) {
            worst = worst.max((a - b).abs());
        }
    }
    if worst > tolerance {
        return Err(Error::Export(format!(
            "exported network differs from the trainer by {worst} (> {tolerance})"
        )));
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackboneConfig, Mode, ModelConfig};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_images(n: usize, c: usize, size: usize, seed: u64) -> Array4<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array4::from_shape_fn((n, c, size, size), |_| rng.gen_range(-1.5..1.5))
    }

    /// The device runtime running the exported graph (batch norm folded, f32) reproduces
    /// the trainer's inference embeddings within 1e-4, for both backbone families. A few
    /// training-mode passes first make the running statistics far from their initial 0/1,
    /// so a folding mistake would show.
    #[test]
    fn tract_on_the_export_matches_the_trainer() {
        let configs = [
            ModelConfig {
                in_channels: 1,
                backbone: BackboneConfig::Plain { widths: vec![8, 16, 16] },
                hidden: 32,
                dim: 16,
                heads: vec![4, 6],
            },
            ModelConfig {
                in_channels: 3,
                backbone: BackboneConfig::Resnet { width: 8, blocks: vec![1, 1] },
                hidden: 32,
                dim: 16,
                heads: vec![5],
            },
        ];
        for (i, config) in configs.into_iter().enumerate() {
            let c = config.in_channels;
            let mut model = Model::new(config, i as u64, &Device::Cpu).expect("model");
            for step in 0..3 {
                let x = random_images(8, c, 14, 10 + step);
                let x = Tensor::from_slice(
                    x.as_slice().expect("standard layout"),
                    (8, c, 14, 14),
                    &Device::Cpu,
                )
                .expect("tensor");
                model.embed(&x.affine(2.0, 0.5).expect("scale"), Mode::Train).expect("train pass");
            }
            let x = random_images(5, c, 14, 99);
            let worst = check_agreement(&mut model, &x, 1e-4).expect("agreement");
            assert!(worst < 1e-4, "case {i}: {worst}");
        }
    }

    #[test]
    fn graph_has_one_image_input_and_one_embedding_output() {
        let model = Model::new(ModelConfig::reference(1), 0, &Device::Cpu).expect("model");
        let proto = onnx_model(&model, (1, 28, 28)).expect("export");
        let graph = proto.graph.expect("graph");
        assert_eq!(graph.input.len(), 1);
        assert_eq!(graph.input[0].name, "image");
        assert_eq!(graph.output.len(), 1);
        assert_eq!(graph.output[0].name, "embedding");
        assert_eq!(proto.opset_import[0].version, 17);
        assert!(!graph.node.iter().any(|n| n.op_type == "BatchNormalization"));
    }
}
