//! Does on-device adaptation help? Streams the Fashion-MNIST test images through the
//! agent's pipeline under a camera-like shift, adapts on the first half of the stream and
//! scores the 10-class head on the second half before and after, and on the clean test
//! images after.
//!
//! ```text
//! cargo run --release -p selfclass-firmware-host --example adaptation_shift -- \
//!     [--model models/fashion-mnist.scb] [--data /usr/share/datasets/fashion-mnist] \
//!     [--seed 1] [--frames-per-step 2] [--learning-rate 0.001] [--pull 1] [--distill 1]
//! ```
//!
//! The shift ([`CameraShift`]): pixel values `x` in [0, 1] become `0.15 + 0.7 x^1.5`
//! (contrast squeezed to 0.15..0.85 with gamma 1.5), then a 3x3 Gaussian blur, then
//! Gaussian noise of deviation 0.04, and every image is rotated by its own uniform angle
//! within +-12 degrees. The stream is the 10,000 test images in a seeded random order;
//! the first 5,000 are seen by the agent (classified, offered to the replay, adapted on),
//! the last 5,000 are scored.
//!
//! The path is the agent's: frames go through `Classifier` (preprocessing and the bundle's
//! network) and `AdaptWorker` (reservoir replay with augmented second views, the bundle's
//! anchors, Adam on the heads with the pull, distillation and collapse guard). The only
//! difference is that steps are interleaved with frames at a fixed ratio instead of a time
//! budget, so runs are reproducible. Pass `--fixture` to run on the reference network when
//! no trained model exists (its random features make the figures meaningless, but the
//! harness runs).

use std::path::PathBuf;

use anyhow::Context;
use ndarray::{Array2, ArrayView2, Axis};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use selfclass_firmware_host::augment::{apply_shift, CameraShift};
use selfclass_firmware_host::fixture::reference_bundle;
use selfclass_firmware_host::pipeline::{adapt_params_for, AdaptWorker, Model, DEFAULT_MODEL};
use selfclass_firmware_host::source::CapturedFrame;
use selfclass_runtime::head::Head;
use selfclass_runtime::idx;
use selfclass_runtime::metrics::{score, ClusteringScores};
use selfclass_runtime::preprocess::PixelFormat;
use selfclass_runtime::replay::ReplayBuffer;

struct Options {
    model: Option<PathBuf>,
    fixture: bool,
    data: PathBuf,
    seed: u64,
    frames_per_step: usize,
    extra_steps: usize,
    learning_rate: Option<f64>,
    pull: Option<f64>,
    distill: Option<f64>,
    anchor_weight: Option<f64>,
    anchors: usize,
    replay_capacity: usize,
}

fn options() -> anyhow::Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value =
        |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let parse = |flag: &str| -> anyhow::Result<Option<f64>> {
        value(flag).map(|v| v.parse::<f64>().with_context(|| format!("{flag} {v}"))).transpose()
    };
    Ok(Options {
        model: value("--model").map(PathBuf::from),
        fixture: args.iter().any(|a| a == "--fixture"),
        data: PathBuf::from(
            value("--data").unwrap_or_else(|| "/usr/share/datasets/fashion-mnist".into()),
        ),
        seed: parse("--seed")?.map_or(1, |s| s as u64),
        frames_per_step: parse("--frames-per-step")?.map_or(2, |s| s.max(1.0) as usize),
        extra_steps: parse("--extra-steps")?.map_or(0, |s| s as usize),
        learning_rate: parse("--learning-rate")?,
        pull: parse("--pull")?,
        distill: parse("--distill")?,
        anchor_weight: parse("--anchor-weight")?,
        anchors: parse("--anchors")?.map_or(3000, |s| s as usize),
        replay_capacity: parse("--replay-capacity")?.map_or(4096, |s| s as usize),
    })
}

/// Preprocessed inputs of images (`count x 784` values end to end) through the agent's
/// preprocessing.
fn inputs_of(model: &Model, images: &idx::IdxImages, order: &[usize]) -> anyhow::Result<Vec<f32>> {
    let mut classifier = model.classifier()?;
    let mut out = Vec::with_capacity(order.len() * classifier.layout().len());
    let mut frame = CapturedFrame {
        width: images.cols as u32,
        height: images.rows as u32,
        format: PixelFormat::Gray8,
        ..CapturedFrame::default()
    };
    for &i in order {
        frame.data.clear();
        frame.data.extend_from_slice(images.image(i));
        out.extend_from_slice(classifier.prepare(&frame)?);
    }
    Ok(out)
}

fn embed_all(model: &Model, inputs: &[f32]) -> anyhow::Result<Array2<f32>> {
    let classifier = model.classifier()?;
    let len = classifier.layout().len();
    let chunks: Vec<Array2<f32>> = inputs
        .chunks(512 * len)
        .map(|c| classifier.embed_inputs(c))
        .collect::<anyhow::Result<_>>()?;
    let views: Vec<_> = chunks.iter().map(|c| c.view()).collect();
    Ok(ndarray::concatenate(Axis(0), &views)?)
}

fn scores(
    head: &Head<f32>,
    z: ArrayView2<f32>,
    labels: &[u32],
) -> anyhow::Result<ClusteringScores> {
    let clusters: Vec<u32> = head.predict(z).into_iter().map(|c| c as u32).collect();
    Ok(score(labels, &clusters)?)
}

fn main() -> anyhow::Result<()> {
    let opt = options()?;
    let dir = tempfile::tempdir()?;
    let model_path = if opt.fixture {
        let path = dir.path().join("reference.scb");
        reference_bundle(0)?.save(&path)?;
        path
    } else {
        opt.model.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL))
    };
    let model = Model::load(&model_path).context(
        "the benchmark needs the trained model; pass --model PATH, or --fixture to try the harness",
    )?;
    let head_index = model.heads.iter().position(|h| h.classes() == 10).unwrap_or(0);
    println!(
        "model {} (heads {:?}); scoring head {head_index}",
        model.path.display(),
        model.bundle.classes_per_head()
    );

    let read = |name: &str| -> PathBuf { opt.data.join(name) };
    let test = idx::read_images(&read("t10k-images-idx3-ubyte.gz"))
        .context("Fashion-MNIST test images (--data)")?;
    let test_labels: Vec<u32> =
        idx::read_labels(&read("t10k-labels-idx1-ubyte.gz"))?.into_iter().map(u32::from).collect();

    // The stream: every test image once, in a seeded order, with the shift applied.
    let mut rng = StdRng::seed_from_u64(opt.seed);
    let mut order: Vec<usize> = (0..test.count).collect();
    order.shuffle(&mut rng);
    let half = order.len() / 2;
    let clean_inputs = inputs_of(&model, &test, &(0..test.count).collect::<Vec<_>>())?;
    let stream_clean = inputs_of(&model, &test, &order)?;
    let classifier = model.classifier()?;
    let layout = classifier.layout().clone();
    let shift = CameraShift::default();
    let mut shifted = vec![0.0; stream_clean.len()];
    for (src, dst) in
        stream_clean.chunks_exact(layout.len()).zip(shifted.chunks_exact_mut(layout.len()))
    {
        apply_shift(&layout, &shift, src, dst, &mut rng);
    }
    let stream_labels: Vec<u32> = order.iter().map(|&i| test_labels[i]).collect();

    let z_clean = embed_all(&model, &clean_inputs)?;
    let z_shifted = embed_all(&model, &shifted)?;
    let (z_first, z_second) = z_shifted.view().split_at(Axis(0), half);
    let labels_second = &stream_labels[half..];

    let shipped = &model.heads[head_index];
    let clean_before = scores(shipped, z_clean.view(), &test_labels)?;
    let shifted_before = scores(shipped, z_second, labels_second)?;
    let clean_stream_second = embed_all(&model, &stream_clean[half * layout.len()..])?;
    let unshifted_second = scores(shipped, clean_stream_second.view(), labels_second)?;

    // Adaptation on the first half, as the agent does it.
    let mut params = adapt_params_for(model.largest_head());
    if let Some(v) = opt.learning_rate {
        params.learning_rate = v;
    }
    if let Some(v) = opt.pull {
        params.pull = v;
    }
    if let Some(v) = opt.distill {
        params.distill = v;
    }
    if let Some(v) = opt.anchor_weight {
        params.anchor_weight = v;
    }
    let replay = ReplayBuffer::new(model.bundle.embedding_dim(), opt.replay_capacity)?;
    let mut worker = AdaptWorker::new(&model, replay, params, opt.seed)?;
    let anchor_source = if worker.replay.anchor_count() > 0 {
        format!("{} anchor pairs shipped in the bundle", worker.replay.anchor_count())
    } else {
        let train = idx::read_images(&read("train-images-idx3-ubyte.gz"))
            .context("Fashion-MNIST training images (--data)")?;
        let picks: Vec<usize> = (0..train.count.min(opt.anchors)).collect();
        let inputs = inputs_of(&model, &train, &picks)?;
        worker.anchors_from_inputs(&inputs, picks.len())?;
        format!(
            "{} anchor pairs embedded here from training images (the bundle ships none)",
            worker.replay.anchor_count()
        )
    };
    let started = std::time::Instant::now();
    let mut rollbacks_seen = 0;
    for (i, z) in z_first.rows().into_iter().enumerate() {
        let input = &shifted[i * layout.len()..(i + 1) * layout.len()];
        worker.offer(input, z)?;
        if (i + 1) % opt.frames_per_step == 0 {
            worker.step()?;
        }
    }
    for _ in 0..opt.extra_steps {
        worker.step()?;
    }
    rollbacks_seen += worker.adapter.rollbacks();
    let adapt_s = started.elapsed().as_secs_f64();
    let adapted = &worker.adapter.heads()[head_index];
    let shifted_after = scores(adapted, z_second, labels_second)?;
    let clean_after = scores(adapted, z_clean.view(), &test_labels)?;

    println!(
        "shift: contrast 0.15..0.85, gamma 1.5, 3x3 Gaussian blur, noise 0.04, rotation +-12 deg"
    );
    println!(
        "adaptation: {} frames seen, {} steps ({} rollbacks) in {adapt_s:.1} s; {anchor_source}",
        half,
        worker.adapter.steps(),
        rollbacks_seen
    );
    println!("params: {:?}", worker.adapter.params());
    println!();
    println!("                                  ACC     NMI");
    println!(
        "second half, unshifted          {:.4}  {:.4}",
        unshifted_second.acc, unshifted_second.nmi
    );
    println!(
        "second half, shifted, before    {:.4}  {:.4}",
        shifted_before.acc, shifted_before.nmi
    );
    println!("second half, shifted, after     {:.4}  {:.4}", shifted_after.acc, shifted_after.nmi);
    println!("clean test (10,000), before     {:.4}  {:.4}", clean_before.acc, clean_before.nmi);
    println!("clean test (10,000), after      {:.4}  {:.4}", clean_after.acc, clean_after.nmi);
    println!();
    let cost = unshifted_second.acc - shifted_before.acc;
    let gain = shifted_after.acc - shifted_before.acc;
    let clean_drop = clean_before.acc - clean_after.acc;
    println!("shift costs the unadapted model {:.1} points (needs >= 15)", 100.0 * cost);
    println!("adaptation gains {:.1} points on the shifted stream (target >= 20)", 100.0 * gain);
    println!("clean ACC falls {:.1} points (target <= 1)", 100.0 * clean_drop);
    Ok(())
}
