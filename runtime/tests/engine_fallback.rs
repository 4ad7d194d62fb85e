//! Graphs that selfclass's kernels must leave to tract, and thread counts that must not
//! cost threads: regressions from a review of the convolution engine.

use ndarray::Array4;
use prost::Message;
use selfclass_runtime::backbone::Backbone;
use selfclass_runtime::onnx::float_value_info;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, ModelProto,
    NodeProto, OperatorSetIdProto, TensorProto,
};

/// A node: op, inputs, integer-list attributes, output.
type Node<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a [i64])], &'a str);

/// A graph of `nodes` on a `1 x h x w`
/// image input, with f32 constants `consts` (name, dims, values) and output `out`.
fn graph(
    (h, w): (usize, usize),
    consts: &[(&str, Vec<i64>, Vec<f32>)],
    nodes: &[Node],
    out: (&str, &[Option<usize>]),
) -> Vec<u8> {
    let node = nodes
        .iter()
        .map(|(op, inputs, attrs, output)| NodeProto {
            op_type: op.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: output.to_string(),
            attribute: attrs
                .iter()
                .map(|(name, ints)| AttributeProto {
                    name: name.to_string(),
                    ints: ints.to_vec(),
                    r#type: AttributeType::Ints as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let initializer = consts
        .iter()
        .map(|(name, dims, values)| TensorProto {
            name: name.to_string(),
            dims: dims.clone(),
            data_type: DataType::Float as i32,
            float_data: values.clone(),
            ..Default::default()
        })
        .collect();
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(GraphProto {
            name: "fallback".into(),
            node,
            initializer,
            input: vec![float_value_info("image", &[None, Some(1), Some(h), Some(w)])],
            output: vec![float_value_info(out.0, out.1)],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Convolution `w` (4 channels, 3x1 kernel, two rows of top padding on a one-row image),
/// then global average pooling and flattening: a vector of 4 per image.
fn pooled_conv(w: Vec<f32>) -> Vec<u8> {
    graph(
        (1, 4),
        &[("w", vec![4, 1, 3, 1], w), ("b", vec![4], vec![0.1, 0.2, 0.3, 0.4])],
        &[
            (
                "Conv",
                &["image", "w", "b"],
                &[("kernel_shape", &[3, 1]), ("pads", &[2, 0, 0, 0])],
                "c",
            ),
            ("Relu", &["c"], &[], "r"),
            ("GlobalAveragePool", &["r"], &[], "p"),
            ("Flatten", &["p"], &[], "z"),
        ],
        ("z", &[None, Some(4)]),
    )
}

#[test]
fn a_nan_only_tract_sees_keeps_the_network_on_tract() {
    let runs_on_kernels = Backbone::from_onnx_bytes(&pooled_conv(vec![0.5; 12]), "finite")
        .expect("loads")
        .engine()
        .starts_with("selfclass-");
    // Kernel rows 0 and 1 only ever meet padding: the kernels skip them, tract multiplies
    // their NaN weights by zero. The probe check must see the NaN and keep tract.
    let mut w = vec![0.5; 12];
    w[0] = f32::NAN;
    let net = Backbone::from_onnx_bytes(&pooled_conv(w), "nan").expect("loads");
    assert_eq!(net.engine(), "tract", "the finite twin runs on the kernels: {runs_on_kernels}");
    let z = net.embed(Array4::ones((1, 1, 1, 4)).view()).expect("runs");
    assert!(z[[0, 0]].is_nan(), "tract keeps the NaN: {z}");
}

#[test]
fn an_image_output_stays_with_tract() {
    // The kernels keep images channels-last; an image output has to come from tract.
    let bytes = graph(
        (3, 3),
        &[("w", vec![2, 1, 1, 1], vec![1.0, -1.0])],
        &[("Conv", &["image", "w"], &[("kernel_shape", &[1, 1])], "y")],
        ("y", &[None, Some(2), Some(3), Some(3)]),
    );
    let net = Backbone::from_onnx_bytes(&bytes, "image output").expect("loads");
    assert_eq!(net.engine(), "tract");
    let x = Array4::from_shape_fn((1, 1, 3, 3), |(_, _, y, x)| (y * 3 + x) as f32);
    let z = net.embed(x.view()).expect("runs");
    assert_eq!(z.row(0).to_vec()[..3], [0.0, 1.0, 2.0]);
}

#[cfg(target_os = "linux")]
#[test]
fn asking_for_many_thread_counts_starts_no_more_threads_than_processors() {
    // The engine's worker threads, by name (the kernel keeps 15 characters of it); other
    // tests of this binary start and end their own threads meanwhile.
    let threads = || {
        std::fs::read_dir("/proc/self/task")
            .expect("task list")
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("selfclass-embed"))
            .count()
    };
    let net = Backbone::from_onnx_bytes(&pooled_conv(vec![0.5; 12]), "threads").expect("loads");
    let x = Array4::ones((8, 1, 1, 4));
    let want = net.embed(x.view()).expect("one thread");
    let before = threads();
    for n in 2..40 {
        assert_eq!(net.embed_threads(x.view(), n).expect("threads"), want);
    }
    let processors = std::thread::available_parallelism().map_or(1, |p| p.get());
    let started = threads().saturating_sub(before);
    assert!(started < processors, "{started} threads started on {processors} processors");
}
