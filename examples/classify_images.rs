//! Classifies the images of an IDX file with a bundle through the device library alone,
//! and scores the clusters against the labels when a labels file is given.
//!
//! ```text
//! cargo run --release --example classify_images -- \
//!     [--model models/fashion-mnist.scb] \
//!     [--images tests/data/fashion-mnist-sample/t10k-images-idx3-ubyte.gz] \
//!     [--labels tests/data/fashion-mnist-sample/t10k-labels-idx1-ubyte.gz] [--show 5]
//! ```

use std::path::PathBuf;

use anyhow::Context;
use selfclass_runtime::bundle::Bundle;
use selfclass_runtime::{idx, metrics};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str, default: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map_or_else(|| default.to_string(), String::clone)
    };
    let sample = "tests/data/fashion-mnist-sample";
    let model = PathBuf::from(value("--model", "models/fashion-mnist.scb"));
    let images = PathBuf::from(value("--images", &format!("{sample}/t10k-images-idx3-ubyte.gz")));
    let labels = value("--labels", &format!("{sample}/t10k-labels-idx1-ubyte.gz"));
    let show: usize = value("--show", "5").parse().context("--show takes a number")?;

    let bundle = Bundle::load(&model)?;
    let images = idx::read_images(&images)?;
    let classified = selfclass::classify_idx(&bundle, &images, 256)?;
    let classes = bundle.classes_per_head();
    println!("{} images, {} heads of {classes:?} classes", images.count, classes.len());
    for i in 0..show.min(images.count) {
        let clusters: Vec<u32> = classified.clusters.iter().map(|c| c[i]).collect();
        println!("image {i}: clusters {clusters:?}");
    }
    if !labels.is_empty() {
        let labels: Vec<u32> =
            idx::read_labels(labels.as_ref())?.into_iter().map(u32::from).collect();
        anyhow::ensure!(
            labels.len() == images.count,
            "{} labels for {} images",
            labels.len(),
            images.count
        );
        for (head, clusters) in classified.clusters.iter().enumerate() {
            let s = metrics::score(&labels, clusters)?;
            println!(
                "head {head} ({} classes): ACC {:.3} NMI {:.3} AMI {:.3} ARI {:.3}",
                classes[head], s.acc, s.nmi, s.ami, s.ari
            );
        }
    }
    Ok(())
}
