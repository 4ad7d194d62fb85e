//! The runtime against a network exported by PyTorch: both engines (selfclass's kernels
//! and tract) must reproduce the embeddings PyTorch computed (stored beside the model), and
//! the f16 bundle made from it must stay small and agree with the f32 network.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array4, Axis};
use selfclass_runtime::backbone::{Backbone, Engine};
use selfclass_runtime::bundle::{Bundle, Provenance};
use selfclass_runtime::head::Head;
use selfclass_runtime::idx;
use selfclass_runtime::testing::fashion_preprocess;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/fashion-mnist-sample").join(name)
}

/// The first `n` sample test images, normalised as the network was trained.
fn test_images(n: usize) -> Array4<f32> {
    let images = idx::read_images(&sample("t10k-images-idx3-ubyte.gz")).expect("sample images");
    let n = n.min(images.count);
    Array4::from_shape_fn((n, 1, 28, 28), |(i, _, y, x)| {
        (images.image(i)[y * 28 + x] as f32 / 255.0 - 0.286) / 0.353
    })
}

#[test]
fn both_engines_reproduce_pytorch_embeddings() {
    let io: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data("ref_net_io.json")).expect("io json"))
            .expect("json");
    let floats = |key: &str| -> Vec<f32> {
        io[key]
            .as_array()
            .expect("array")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect()
    };
    let input = Array4::from_shape_vec((4, 1, 28, 28), floats("input")).expect("input shape");
    let want = Array2::from_shape_vec((4, 128), floats("output")).expect("output shape");

    for engine in [Engine::Auto, Engine::Tract] {
        let net = Backbone::from_onnx_file_with(&data("ref_net.onnx"), engine).expect("loads");
        let name = net.engine();
        assert_eq!(net.input_chw(), (1, 28, 28));
        assert_eq!(net.embedding_dim(), 128);
        let got = net.embed(input.view()).expect("runs");
        let worst = (&got - &want).iter().fold(0f32, |m, d| m.max(d.abs()));
        assert!(worst < 1e-4, "{name}: largest difference from PyTorch {worst}");

        // Any batch size, one image at a time too.
        let single = net.embed(input.slice(ndarray::s![2..3, .., .., ..])).expect("batch of one");
        let worst = (&single.row(0) - &want.row(2)).iter().fold(0f32, |m, d| m.max(d.abs()));
        assert!(worst < 1e-4, "{name}: single image differs by {worst}");
    }
}

/// Ten heads' worth of class prototypes: embeddings of ten sample training images of
/// different classes, scaled like a trained head (|w| = 10).
fn prototype_head(net: &Backbone) -> Head<f32> {
    let images = idx::read_images(&sample("train-images-idx3-ubyte.gz")).expect("train images");
    let labels = idx::read_labels(&sample("train-labels-idx1-ubyte.gz")).expect("train labels");
    let picks: Vec<usize> =
        (0..10u8).map(|c| labels.iter().position(|&l| l == c).expect("class present")).collect();
    let batch = Array4::from_shape_fn((10, 1, 28, 28), |(i, _, y, x)| {
        (images.image(picks[i])[y * 28 + x] as f32 / 255.0 - 0.286) / 0.353
    });
    let z = net.embed(batch.view()).expect("embeds");
    Head::from_weights(z * 10.0).expect("head")
}

#[test]
fn f16_bundle_is_small_and_agrees_with_f32() {
    let onnx = std::fs::read(data("ref_net.onnx")).expect("onnx");
    let f32_net = Backbone::from_onnx_bytes(&onnx, "ref_net.onnx").expect("f32 network");
    let head = prototype_head(&f32_net);
    let provenance = Provenance { dataset: "reference fixture".into(), ..Provenance::default() };
    let bundle =
        Bundle::from_onnx(&onnx, std::slice::from_ref(&head), fashion_preprocess(), provenance)
            .expect("bundle");
    let bytes = bundle.to_bytes().expect("encodes");
    let ratio = bytes.len() as f64 / onnx.len() as f64;

    let loaded = Bundle::from_bytes(&bytes, "memory").expect("decodes");
    let f16_net = Backbone::from_bundle(&loaded).expect("f16 network");
    let f16_head = &loaded.heads().expect("heads")[0];

    let images = test_images(1000);
    let (mut agree, mut total) = (0usize, 0usize);
    for chunk in images.axis_chunks_iter(Axis(0), 250) {
        let a = head.predict(f32_net.embed(chunk).expect("f32").view());
        let b = f16_head.predict(f16_net.embed(chunk).expect("f16").view());
        agree += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        total += a.len();
    }
    let agreement = agree as f64 / total as f64;
    println!(
        "f16 bundle: {} bytes against {} bytes of f32 ONNX ({:.1}%); predictions agree on {agree}/{total} test images ({:.2}%)",
        bytes.len(),
        onnx.len(),
        100.0 * ratio,
        100.0 * agreement
    );
    assert!(ratio <= 0.55, "bundle is {:.1}% of the f32 network", 100.0 * ratio);
    assert!(agreement >= 0.995, "f16 and f32 agree on only {:.2}%", 100.0 * agreement);
}
