//! A small but real bundle for tests and for benchmarks run before a trained model exists:
//! the reference network exported from PyTorch (`runtime/tests/data/ref_net.onnx`, random
//! weights) with prototype heads made from the sample's training images, and anchor pairs.
//!
//! Its clusters are far from a trained model's; it exercises every code path with the
//! real network architecture, real images and real sizes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ndarray::{s, Array2, Array4, Axis};
use rand::rngs::StdRng;
use rand::SeedableRng;
use selfclass_runtime::backbone::Backbone;
use selfclass_runtime::bundle::{Bundle, Provenance};
use selfclass_runtime::head::Head;
use selfclass_runtime::idx;
pub use selfclass_runtime::testing::fashion_preprocess;

use crate::augment::{AugmentParams, Augmenter, Layout};

/// The repository's root, seen from this crate.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the reference bundle: heads of 10 and 20 classes (one and two class prototypes
/// per Fashion-MNIST class, scaled to norm 10), and `anchors` pairs of augmented training
/// images.
pub fn reference_bundle(anchors: usize) -> anyhow::Result<Bundle> {
    let root = repo_root();
    let onnx_path = root.join("runtime/tests/data/ref_net.onnx");
    let onnx =
        std::fs::read(&onnx_path).with_context(|| format!("reading {}", onnx_path.display()))?;
    let net = Backbone::from_onnx_bytes(&onnx, "ref_net.onnx")?;
    let sample = root.join("tests/data/fashion-mnist-sample");
    let images = idx::read_images(&sample.join("train-images-idx3-ubyte.gz"))?;
    let labels = idx::read_labels(&sample.join("train-labels-idx1-ubyte.gz"))?;
    let spec = fashion_preprocess();
    let inputs = Array4::from_shape_fn((images.count, 1, 28, 28), |(i, _, y, x)| {
        (images.image(i)[y * 28 + x] as f32 / 255.0 - spec.mean[0]) / spec.std[0]
    });
    let z = net.embed(inputs.view())?;

    let prototypes = |per_class: usize| -> anyhow::Result<Head<f32>> {
        let mut rows = Vec::new();
        for k in 0..per_class {
            for class in 0..10u8 {
                let members: Vec<usize> = labels
                    .iter()
                    .enumerate()
                    .filter(|(_, &l)| l == class)
                    .map(|(i, _)| i)
                    .collect();
                anyhow::ensure!(!members.is_empty(), "class {class} missing from the sample");
                // The mean of the k-th half (or all) of the class's images.
                let chunk = members.len().div_ceil(per_class);
                let part = &members
                    [(k * chunk).min(members.len() - 1)..((k + 1) * chunk).min(members.len())];
                let mut mean = part
                    .iter()
                    .fold(ndarray::Array1::<f32>::zeros(z.ncols()), |acc, &i| acc + z.row(i));
                let norm = mean.dot(&mean).sqrt().max(1e-12);
                mean *= 10.0 / norm;
                rows.push(mean);
            }
        }
        let views: Vec<_> = rows.iter().map(|r| r.view().insert_axis(Axis(0))).collect();
        Ok(Head::from_weights(ndarray::concatenate(Axis(0), &views)?)?)
    };
    let heads = [prototypes(1)?, prototypes(2)?];
    let provenance = Provenance {
        dataset: "reference fixture: random-weight network, prototype heads".into(),
        producer: format!("selfclass-firmware-host {} fixture", env!("CARGO_PKG_VERSION")),
        ..Provenance::default()
    };
    let mut bundle = Bundle::from_onnx(&onnx, &heads, spec.clone(), provenance)?;

    if anchors > 0 {
        let n = anchors.min(images.count);
        let flat = inputs.slice(s![..n, .., .., ..]).iter().copied().collect::<Vec<f32>>();
        let mut augmenter = Augmenter::new(Layout::new(&spec), AugmentParams::default());
        let mut rng = StdRng::seed_from_u64(17);
        let mut views = [Vec::with_capacity(flat.len()), Vec::with_capacity(flat.len())];
        let mut out = vec![0.0; 784];
        for image in flat.chunks_exact(784) {
            for v in views.iter_mut() {
                augmenter.augment(image, &mut out, &mut rng);
                v.extend_from_slice(&out);
            }
        }
        let embed = |v: &Vec<f32>| -> anyhow::Result<Array2<f32>> {
            Ok(net.embed(ndarray::ArrayView4::from_shape((n, 1, 28, 28), v.as_slice())?)?)
        };
        bundle.set_anchors(&embed(&views[0])?, &embed(&views[1])?)?;
    }
    Ok(bundle)
}
