//! The selfclass workspace's end-to-end tests (`tests/`) and examples (`examples/`), and
//! the one thing both need: classifying a set of images with a bundle through the device
//! library alone, the way an application embedding selfclass would.
//!
//! ```no_run
//! use std::path::Path;
//! let bundle = selfclass_runtime::bundle::Bundle::load(Path::new("models/fashion-mnist.scb"))?;
//! let images = selfclass_runtime::idx::read_images(Path::new("t10k-images-idx3-ubyte.gz"))?;
//! let classified = selfclass::classify_idx(&bundle, &images, 256)?;
//! println!("image 0 is in cluster {} of the first head", classified.clusters[0][0]);
//! # Ok::<(), anyhow::Error>(())
//! ```

use anyhow::Context;
use ndarray::{Array2, ArrayView4};
use selfclass_runtime::backbone::Backbone;
use selfclass_runtime::bundle::Bundle;
use selfclass_runtime::idx::IdxImages;
use selfclass_runtime::preprocess::{Frame, PixelFormat, Preprocessor};

/// What [`classify_idx`] found.
#[derive(Debug, Clone)]
pub struct Classified {
    /// `n x D` unit-length embeddings, one row per image.
    pub embeddings: Array2<f32>,
    /// Per head, the cluster of every image.
    pub clusters: Vec<Vec<u32>>,
}

/// Embeds every image of an IDX set (grayscale frames of any size: the bundle's own
/// preprocessing resizes and normalises them) in batches of `batch`, and runs every head.
pub fn classify_idx(
    bundle: &Bundle,
    images: &IdxImages,
    batch: usize,
) -> anyhow::Result<Classified> {
    anyhow::ensure!(batch > 0, "a batch of 0 images");
    let backbone = Backbone::from_bundle(bundle).context("loading the bundle's network")?;
    let mut preprocessor = Preprocessor::new(bundle.preprocess.clone())?;
    let (c, h, w) = backbone.input_chw();
    let per_image = preprocessor.output_len();
    let mut inputs = vec![0.0f32; batch * per_image];
    let mut parts = Vec::new();
    for start in (0..images.count).step_by(batch) {
        let n = batch.min(images.count - start);
        for (i, out) in inputs.chunks_exact_mut(per_image).take(n).enumerate() {
            let pixels = images.image(start + i);
            let frame =
                Frame::new(images.cols as u32, images.rows as u32, PixelFormat::Gray8, pixels)?;
            preprocessor.run(&frame, out).with_context(|| format!("image {}", start + i))?;
        }
        let view = ArrayView4::from_shape((n, c, h, w), &inputs[..n * per_image])?;
        parts.push(backbone.embed(view).with_context(|| format!("images {start}..{}", start + n))?);
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    let embeddings = if views.is_empty() {
        Array2::zeros((0, backbone.embedding_dim()))
    } else {
        ndarray::concatenate(ndarray::Axis(0), &views)?
    };
    let clusters = bundle
        .heads()?
        .iter()
        .map(|head| head.predict(embeddings.view()).into_iter().map(|k| k as u32).collect())
        .collect();
    Ok(Classified { embeddings, clusters })
}
