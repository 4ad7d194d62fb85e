//! Comparison 1: the default model's embedding network, selfclass against onnxruntime,
//! with the same thread count, at batch 1 and batch 64. selfclass runs the engine it
//! picks for this processor (its own convolution kernels where it has them); tract's plan
//! is timed beside it in the same rounds as a reference row.

use anyhow::{Context as _, Result};
use ndarray::Array4;
use rand::{rngs::StdRng, Rng, SeedableRng};
use selfclass_runtime::backbone::{Backbone, Engine};
use selfclass_runtime::bundle::Bundle;
use serde_json::json;

use crate::context::{interleave, Context, Section};
use crate::peers::{script, Peer};
use crate::stats::{ratios, time_block, Summary};
use crate::table::{Figure, Row, Target, Unit};

const NAME: &str = "1 embedding";

/// Embeds `images` with `threads` threads.
fn embed(net: &Backbone, images: &Array4<f32>, threads: usize) -> Result<()> {
    let out = net.embed_threads(images.view(), threads)?;
    anyhow::ensure!(out.nrows() == images.dim().0, "embedding returned {} rows", out.nrows());
    Ok(())
}

pub fn run(ctx: &Context) -> Result<Section> {
    let bundle = Bundle::load(&ctx.model)?;
    let onnx = ctx.work.join("default-model.onnx");
    std::fs::write(&onnx, bundle.network_onnx_bytes()?)
        .with_context(|| format!("writing {}", onnx.display()))?;
    let net = Backbone::from_bundle(&bundle)?;
    let tract = Backbone::from_bundle_with(&bundle, Engine::Tract)?;
    let (c, h, w) = net.input_chw();

    let mut peer = Peer::spawn(&ctx.venv, &script(&ctx.bench_dir, "ort_embed.py"), "onnxruntime")?;
    peer.call(&json!({"cmd": "load", "model": onnx, "threads": [1, 2]}))?;

    let mut section = Section::default();
    let mut rng = StdRng::seed_from_u64(0);
    for threads in [1usize, 2] {
        for (batch, iters) in [(1usize, 200usize), (64, 10)] {
            let images = Array4::from_shape_fn((batch, c, h, w), |_| rng.gen_range(0.0f32..1.0));
            let iters = ctx.effort.iters(iters);
            let (mut ours, mut theirs, mut stock) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..ctx.effort.rounds {
                stock.push(time_block(3, iters, || embed(&tract, &images, threads))?);
                let (a, b) = interleave(
                    round,
                    || time_block(3, iters, || embed(&net, &images, threads)),
                    || {
                        peer.median_s(&json!({"cmd": "time", "threads": threads, "batch": batch,
                                              "warmup": 3, "iters": iters}))
                    },
                )?;
                ours.push(a);
                theirs.push(b);
            }
            tracing::info!(threads, batch, ours = ?ours, onnxruntime = ?theirs, "embedding");
            let target = if batch == 1 { 1.0 } else { 1.25 };
            let case =
                format!("batch {batch}, {threads} thread{}", if threads > 1 { "s" } else { "" });
            section.rows.push(Row {
                comparison: NAME.into(),
                case: case.clone(),
                ours: Figure::new(Summary::of(&ours).context("no timing")?, Unit::Seconds),
                peer: Some((
                    "onnxruntime".into(),
                    Figure::new(Summary::of(&theirs).context("no timing")?, Unit::Seconds),
                )),
                ratio: Summary::of(&ratios(&ours, &theirs)),
                target: Some(Target { max_ratio: target }),
            });
            section.rows.push(Row {
                comparison: NAME.into(),
                case: format!("{case}, tract's plan (reference)"),
                ours: Figure::new(Summary::of(&stock).context("no timing")?, Unit::Seconds),
                peer: Some((
                    "onnxruntime".into(),
                    Figure::new(Summary::of(&theirs).context("no timing")?, Unit::Seconds),
                )),
                ratio: Summary::of(&ratios(&stock, &theirs)),
                target: None,
            });
        }
    }
    section.notes.push(format!(
        "Network: the default model's embedding network ({}, input {c}x{h}x{w}), written as an \
         f32 ONNX file for onnxruntime; time per call of a whole batch, onnxruntime with \
         `intra_op_num_threads` set to the thread count, sequential execution, all graph \
         optimisations. selfclass's engine on this machine: `{}`; the rows marked \
         *tract's plan* time the same network on tract (`Engine::Tract`) in the same rounds.",
        ctx.relative(&ctx.model).display(),
        net.engine()
    ));
    Ok(section)
}
