//! The two engines of the embedding network on real data: selfclass's kernels (where the
//! processor has them) must reproduce tract's embeddings of the shipped model, on any
//! batch size and thread count, and graphs outside their chain must stay with tract.

use std::path::{Path, PathBuf};

use ndarray::{s, Array4};
use selfclass_runtime::backbone::{Backbone, Engine};
use selfclass_runtime::bundle::Bundle;
use selfclass_runtime::idx;
use selfclass_runtime::testing::tiny_onnx;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The sample test images, preprocessed as the shipped model's bundle says.
fn sample_images(bundle: &Bundle, n: usize) -> Array4<f32> {
    let images =
        idx::read_images(&repo("tests/data/fashion-mnist-sample/t10k-images-idx3-ubyte.gz"))
            .expect("sample images");
    let n = n.min(images.count);
    let (mean, std) = (bundle.preprocess.mean[0], bundle.preprocess.std[0]);
    Array4::from_shape_fn((n, 1, 28, 28), |(i, _, y, x)| {
        (images.image(i)[y * 28 + x] as f32 / 255.0 - mean) / std
    })
}

/// Whether this processor has the kernels (x86-64 with AVX2 and FMA, or AVX-512).
fn has_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") || (has!("avx2") && has!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[test]
fn kernels_reproduce_tract_on_the_shipped_model() {
    let bundle = Bundle::load(&repo("models/fashion-mnist.scb")).expect("shipped model");
    let ours = Backbone::from_bundle(&bundle).expect("auto engine");
    let tract = Backbone::from_bundle_with(&bundle, Engine::Tract).expect("tract engine");
    assert_eq!(tract.engine(), "tract");
    if has_kernels() {
        assert!(ours.engine().starts_with("selfclass-"), "engine {}", ours.engine());
    } else {
        assert_eq!(ours.engine(), "tract");
    }
    let images = sample_images(&bundle, 100);
    let want = tract.embed(images.view()).expect("tract embeds");
    let got = ours.embed(images.view()).expect("kernels embed");
    let worst = (&got - &want).iter().fold(0f32, |m, d| m.max(d.abs()));
    assert!(worst < 1e-5, "the engines differ by {worst}");

    // Threads, batch sizes and image order change no value.
    for threads in [2, 3] {
        assert_eq!(ours.embed_threads(images.view(), threads).expect("threads"), got);
    }
    for (start, end) in [(0, 1), (7, 8), (3, 40), (40, 100)] {
        let part = ours.embed(images.slice(s![start..end, .., .., ..])).expect("part");
        assert_eq!(part, got.slice(s![start..end, ..]), "images {start}..{end}");
    }
    assert_eq!(ours.embed(images.slice(s![..0, .., .., ..])).expect("empty").nrows(), 0);
}

#[test]
fn pytorch_export_runs_on_the_kernels_too() {
    let net = Backbone::from_onnx_file(&repo("runtime/tests/data/ref_net.onnx")).expect("loads");
    assert_eq!(net.engine().starts_with("selfclass-"), has_kernels(), "engine {}", net.engine());
}

#[test]
fn graphs_outside_the_chain_stay_with_tract() {
    // Flattening a 4x4 image is a reshape of a whole image, which the kernels do not do.
    let net = Backbone::from_onnx_bytes(&tiny_onnx("MatMul"), "tiny").expect("loads");
    assert_eq!(net.engine(), "tract");
    let z = net.embed(Array4::ones((2, 1, 4, 4)).view()).expect("runs");
    assert_eq!(z.dim(), (2, 8));
}
