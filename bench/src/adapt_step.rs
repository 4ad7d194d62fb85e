//! Comparison 2 and the first half of 5: the head adaptation step (uniform-prior loss,
//! its gradient, one Adam update), selfclass against the same step in PyTorch on the CPU,
//! and how its time grows with the replay batch and the number of classes.

use anyhow::{Context as _, Result};
use ndarray::Array2;
use rand::{rngs::StdRng, Rng, SeedableRng};
use selfclass_runtime::adapt::{AdaptParams, Adapter, Batch, GuardParams};
use selfclass_runtime::bundle::Bundle;
use selfclass_runtime::head::{l2_normalize_rows, Head};
use serde_json::json;

use crate::context::{interleave, Context, Section};
use crate::peers::{script, Peer};
use crate::plot::{Chart, Series};
use crate::stats::{ratios, time_block, Summary};
use crate::table::{Figure, Row, Target, Unit};

const NAME: &str = "2 adaptation step";
const BATCH: usize = 256;

/// Two views of a batch of L2-normalised embeddings, the second a perturbed first.
fn views(rng: &mut StdRng, n: usize, dim: usize) -> (Array2<f32>, Array2<f32>) {
    let mut a = Array2::from_shape_fn((n, dim), |_| rng.gen_range(-1.0f32..1.0));
    let mut b = &a + &Array2::from_shape_fn((n, dim), |_| rng.gen_range(-0.1f32..0.1));
    l2_normalize_rows(&mut a);
    l2_normalize_rows(&mut b);
    (a, b)
}

fn random_heads(rng: &mut StdRng, classes: &[usize], dim: usize) -> Result<Vec<Head<f32>>> {
    classes
        .iter()
        .map(|&c| {
            Head::from_weights(Array2::from_shape_fn((c, dim), |_| rng.gen_range(-1.0f32..1.0)))
                .map_err(Into::into)
        })
        .collect()
}

/// An adapter that only steps: no anchors, no guard.
fn adapter(heads: Vec<Head<f32>>) -> Result<Adapter> {
    let largest = heads.iter().map(Head::classes).max().unwrap_or(1);
    let params = AdaptParams {
        batch_size: 4 * largest,
        anchor_batch: 0,
        guard: GuardParams { check_every: 0, ..GuardParams::default() },
        ..AdaptParams::default()
    };
    Ok(Adapter::new(heads, params)?)
}

/// Median seconds of selfclass's step on a batch of `n` pairs, on `threads` threads.
fn ours(
    heads: Vec<Head<f32>>,
    n: usize,
    threads: usize,
    iters: usize,
    rng: &mut StdRng,
) -> Result<f64> {
    let dim = heads[0].dim();
    let mut adapter = adapter(heads)?;
    adapter.set_threads(threads);
    let batch = Batch { stream: views(rng, n, dim), anchors: None };
    time_block(3, iters, || adapter.step_on(&batch).map(|_| ()))
        .context("selfclass adaptation step")
}

/// `iters` steps of the default heads on a batch of [`BATCH`] pairs, for a profiler.
pub fn profile(bundle: &Bundle, iters: usize) -> Result<()> {
    let heads = bundle.heads()?;
    let dim = heads.first().context("the model has no head")?.dim();
    let mut rng = StdRng::seed_from_u64(1);
    let batch = Batch { stream: views(&mut rng, BATCH, dim), anchors: None };
    let mut adapter = adapter(heads)?;
    for _ in 0..iters {
        adapter.step_on(&batch)?;
    }
    Ok(())
}

fn theirs(
    peer: &mut Peer,
    classes: &[usize],
    n: usize,
    threads: usize,
    iters: usize,
) -> Result<f64> {
    peer.median_s(&json!({"cmd": "time", "dim": 128, "classes": classes, "batch": n,
                          "threads": threads, "warmup": 3, "iters": iters}))
}

pub fn run(ctx: &Context) -> Result<Section> {
    let bundle = Bundle::load(&ctx.model)?;
    let heads = bundle.heads()?;
    let classes: Vec<usize> = heads.iter().map(Head::classes).collect();
    let dim = heads.first().context("the model has no head")?.dim();
    anyhow::ensure!(dim == 128, "the peer is written for 128-d embeddings, the model has {dim}");
    let mut peer = Peer::spawn(&ctx.venv, &script(&ctx.bench_dir, "torch_adapt.py"), "pytorch")?;
    let mut rng = StdRng::seed_from_u64(1);
    let mut section = Section::default();

    let iters = ctx.effort.iters(100);
    for threads in [1usize, 2] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for round in 0..ctx.effort.rounds {
            let (x, y) = interleave(
                round,
                || ours(heads.clone(), BATCH, threads, iters, &mut rng),
                || theirs(&mut peer, &classes, BATCH, threads, iters),
            )?;
            a.push(x);
            b.push(y);
        }
        tracing::info!(threads, ours = ?a, pytorch = ?b, "adaptation step");
        section.rows.push(Row {
            comparison: NAME.into(),
            case: format!("batch {BATCH}x2 views, heads {classes:?}; {threads} thread(s) each"),
            ours: Figure::new(Summary::of(&a).context("no timing")?, Unit::Seconds),
            peer: Some((
                "PyTorch".into(),
                Figure::new(Summary::of(&b).context("no timing")?, Unit::Seconds),
            )),
            ratio: Summary::of(&ratios(&a, &b)),
            target: Some(Target { max_ratio: 0.2 }),
        });
    }
    section.notes.push(
        "The step: logits of both views through every weight-normalised head, the \
         uniform-prior loss of both ordered view pairs averaged over heads, its exact gradient \
         with respect to every head's directions and scales, one Adam update (selfclass: \
         `Adapter::step_on` with no anchors; PyTorch: autograd and `torch.optim.Adam`, \
         `bench/peers/torch_adapt.py`). Both sides get the same threads: PyTorch through \
         `torch.set_num_threads`, selfclass through `Adapter::set_threads` (at 2, the heads \
         are split in two groups of about equal rows that run at the same time). The \
         scaling charts run selfclass on one thread."
            .into(),
    );

    scaling(ctx, &mut peer, &classes, dim, &mut rng, &mut section)?;
    Ok(section)
}

/// Step time against replay batch (several head sets) and against classes (one head).
fn scaling(
    ctx: &Context,
    peer: &mut Peer,
    default_classes: &[usize],
    dim: usize,
    rng: &mut StdRng,
    section: &mut Section,
) -> Result<()> {
    let batches: &[usize] =
        if ctx.effort.quick { &[64, 256, 1024] } else { &[64, 128, 256, 512, 1024, 2048] };
    let sets: Vec<(String, Vec<usize>)> = vec![
        (format!("heads {default_classes:?}"), default_classes.to_vec()),
        ("one head, 10 classes".into(), vec![10]),
        ("one head, 80 classes".into(), vec![80]),
        ("one head, 320 classes".into(), vec![320]),
    ];
    let mut series = Vec::new();
    for (name, classes) in &sets {
        let mut points = Vec::new();
        for &n in batches {
            if n < classes.iter().max().copied().unwrap_or(1) {
                continue;
            }
            let iters = ctx.effort.iters((20_000 / n).clamp(5, 100));
            let t = ours(random_heads(rng, classes, dim)?, n, 1, iters, rng)?;
            points.push((n as f64, t * 1e3));
        }
        series.push(Series { name: format!("selfclass, {name}"), points });
    }
    let mut torch = Vec::new();
    for &n in batches {
        let iters = ctx.effort.iters((20_000 / n).clamp(5, 100));
        torch.push((n as f64, theirs(peer, default_classes, n, 1, iters)? * 1e3));
    }
    series.push(Series {
        name: format!("PyTorch 1 thread, heads {default_classes:?}"),
        points: torch,
    });
    let by_batch = Chart {
        title: "Adaptation step time against replay batch".into(),
        x_label: "stream pairs per step (two views each)".into(),
        y_label: "ms per step".into(),
        log2_x: true,
        series,
    };
    section.add_chart(&ctx.plots, "adapt-step-by-batch.png", by_batch)?;

    let class_counts: &[usize] =
        if ctx.effort.quick { &[10, 80, 640] } else { &[10, 20, 40, 80, 160, 320, 640] };
    let (mut ours_pts, mut torch_pts) = (Vec::new(), Vec::new());
    for &c in class_counts {
        let iters = ctx.effort.iters(50);
        ours_pts.push((c as f64, ours(random_heads(rng, &[c], dim)?, BATCH, 1, iters, rng)? * 1e3));
        torch_pts.push((c as f64, theirs(peer, &[c], BATCH, 1, iters)? * 1e3));
    }
    let by_classes = Chart {
        title: format!("Adaptation step time against classes (one head, batch {BATCH})"),
        x_label: "classes".into(),
        y_label: "ms per step".into(),
        log2_x: true,
        series: vec![
            Series { name: "selfclass".into(), points: ours_pts },
            Series { name: "PyTorch 1 thread".into(), points: torch_pts },
        ],
    };
    section.add_chart(&ctx.plots, "adapt-step-by-classes.png", by_classes)?;
    Ok(())
}
