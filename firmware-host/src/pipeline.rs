//! The per-frame path (preprocess, embed, classify) and the adaptation worker, shared by
//! the agent's threads, the discovery command and the benchmarks, so what is measured is
//! what runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use ndarray::{Array1, Array2, ArrayView1, ArrayView4};
use rand::rngs::StdRng;
use rand::SeedableRng;
use selfclass_runtime::adapt::{AdaptParams, Adapter, StepReport};
use selfclass_runtime::backbone::Backbone;
use selfclass_runtime::bundle::Bundle;
use selfclass_runtime::discover::predict_with_confidence;
use selfclass_runtime::head::Head;
use selfclass_runtime::preprocess::{Frame, Preprocessor};
use selfclass_runtime::replay::ReplayBuffer;

use crate::augment::{AugmentParams, Augmenter, Layout};
use crate::source::CapturedFrame;
use crate::thumb::ThumbEncoder;

/// The default model, relative to the working directory.
pub const DEFAULT_MODEL: &str = "models/fashion-mnist.scb";

/// Temperature of the softmax whose top value is reported as confidence (the method's
/// prediction temperature).
pub use selfclass_runtime::discover::CONFIDENCE_TEMPERATURE;

/// Finds the model file: `path` as given, or for the default path, the repository's
/// `models/` folder when run from elsewhere.
pub fn resolve_model(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        anyhow::bail!(
            "model {}: is a directory; pass --model PATH to a .scb bundle file",
            path.display()
        );
    }
    if path == Path::new(DEFAULT_MODEL) {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(DEFAULT_MODEL);
        if shipped.is_file() {
            return Ok(shipped);
        }
    }
    anyhow::bail!(
        "model {}: no such file; pass --model PATH to a .scb bundle (sc-train writes OUT/model.scb at the end of training; the shipped one is models/fashion-mnist.scb)",
        path.display()
    )
}

/// A loaded model: bundle, optimised network, shipped heads.
pub struct Model {
    pub bundle: Bundle,
    pub backbone: Backbone,
    pub heads: Vec<Head<f32>>,
    pub path: PathBuf,
}

impl Model {
    pub fn load(path: &Path) -> anyhow::Result<Model> {
        let path = resolve_model(path)?;
        let bundle = Bundle::load(&path).with_context(|| {
            format!(
                "model {}: cannot be used; replace it with a bundle written by the trainer",
                path.display()
            )
        })?;
        let backbone = Backbone::from_bundle(&bundle)
            .with_context(|| format!("model {}: its network does not load", path.display()))?;
        let heads = bundle
            .heads()
            .with_context(|| format!("model {}: its heads do not load", path.display()))?;
        Ok(Model { bundle, backbone, heads, path })
    }

    pub fn largest_head(&self) -> usize {
        self.heads.iter().map(Head::classes).max().unwrap_or(1)
    }

    pub fn classifier(&self) -> anyhow::Result<Classifier> {
        Classifier::new(&self.bundle, self.backbone.clone())
    }
}

/// Frame to embedding, with its buffers reused from frame to frame.
pub struct Classifier {
    pre: Preprocessor,
    backbone: Backbone,
    layout: Layout,
    input: Vec<f32>,
}

impl Classifier {
    pub fn new(bundle: &Bundle, backbone: Backbone) -> anyhow::Result<Self> {
        let pre = Preprocessor::new(bundle.preprocess.clone())?;
        let layout = Layout::new(&bundle.preprocess);
        let input = vec![0.0; pre.output_len()];
        Ok(Classifier { pre, backbone, layout, input })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// Preprocesses a frame into the classifier's input buffer, returned.
    pub fn prepare(&mut self, frame: &CapturedFrame) -> anyhow::Result<&[f32]> {
        let raw = Frame::new(frame.width, frame.height, frame.format, &frame.data)
            .with_context(|| format!("frame {}", frame.number))?;
        self.pre.run(&raw, &mut self.input)?;
        Ok(&self.input)
    }

    /// Embeds one preprocessed input (`C x H x W` values).
    pub fn embed_input(&self, input: &[f32]) -> anyhow::Result<Array1<f32>> {
        let (c, h, w) = (self.layout.channels, self.layout.height, self.layout.width);
        let view = ArrayView4::from_shape((1, c, h, w), input)?;
        let z = self.backbone.embed(view)?;
        Ok(z.row(0).to_owned())
    }

    /// Embeds a batch of preprocessed inputs laid end to end.
    pub fn embed_inputs(&self, inputs: &[f32]) -> anyhow::Result<Array2<f32>> {
        let (c, h, w) = (self.layout.channels, self.layout.height, self.layout.width);
        let n = inputs.len() / self.layout.len().max(1);
        let view = ArrayView4::from_shape((n, c, h, w), inputs)?;
        Ok(self.backbone.embed(view)?)
    }

    /// Preprocesses and embeds a frame; the input stays available through [`Classifier::input`].
    pub fn embed_frame(&mut self, frame: &CapturedFrame) -> anyhow::Result<Array1<f32>> {
        self.prepare(frame)?;
        self.embed_input(&self.input)
    }

    /// The last prepared input.
    pub fn input(&self) -> &[f32] {
        &self.input
    }
}

/// Cluster and confidence of one embedding under each head.
pub fn classify(heads: &[Head<f32>], z: ArrayView1<f32>) -> Vec<(u32, f32)> {
    let row = z.insert_axis(ndarray::Axis(0));
    heads.iter().map(|h| predict_with_confidence(h, row, CONFIDENCE_TEMPERATURE)[0]).collect()
}

/// Adaptation parameters sized for a model: both batches four times its largest head
/// (at least 256 pairs), the other settings at their defaults.
pub fn adapt_params_for(largest_head: usize) -> AdaptParams {
    let batch = (4 * largest_head).max(256);
    AdaptParams { batch_size: batch, anchor_batch: batch, ..AdaptParams::default() }
}

/// The replay buffer and the adapter, fed with frames the agent has classified. Owned by
/// the adaptation thread; the benchmark drives it directly.
pub struct AdaptWorker {
    pub replay: ReplayBuffer,
    pub adapter: Adapter,
    classifier_backbone: Backbone,
    augmenter: Augmenter,
    augmented: Vec<f32>,
    thumbs: ThumbEncoder,
    note: Vec<u8>,
    rng: StdRng,
    pub admitted: u64,
}

impl AdaptWorker {
    /// A worker for `model` with an empty (or restored) replay, seeded with the bundle's
    /// anchors when it carries any.
    pub fn new(
        model: &Model,
        mut replay: ReplayBuffer,
        params: AdaptParams,
        seed: u64,
    ) -> anyhow::Result<Self> {
        if let Some((a1, a2)) = model.bundle.anchors()? {
            replay.set_anchors(a1.view(), a2.view())?;
        }
        let adapter = Adapter::new(model.heads.clone(), params)?;
        Ok(AdaptWorker {
            replay,
            adapter,
            classifier_backbone: model.backbone.clone(),
            augmenter: Augmenter::new(
                Layout::new(&model.bundle.preprocess),
                AugmentParams::default(),
            ),
            augmented: vec![0.0; model.bundle.preprocess.input_len()],
            thumbs: ThumbEncoder::new(&model.bundle.preprocess),
            note: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            admitted: 0,
        })
    }

    /// Offers a classified frame (its input and embedding) to the replay; when the
    /// reservoir keeps it, embeds an augmented copy as its second view and keeps a
    /// thumbnail of the input beside the pair.
    pub fn offer(&mut self, input: &[f32], embedding: ArrayView1<f32>) -> anyhow::Result<bool> {
        let Some(slot) = self.replay.admit(&mut self.rng) else { return Ok(false) };
        self.augmenter.augment(input, &mut self.augmented, &mut self.rng);
        let l = self.augmenter.layout();
        let view =
            ArrayView4::from_shape((1, l.channels, l.height, l.width), self.augmented.as_slice())?;
        let second = self.classifier_backbone.embed(view)?;
        self.thumbs.encode(input, &mut self.note);
        self.replay.put_with_note(slot, embedding, second.row(0), Some(&self.note))?;
        self.admitted += 1;
        Ok(true)
    }

    /// One adaptation step, if the replay holds enough pairs.
    pub fn step(&mut self) -> anyhow::Result<Option<StepReport>> {
        Ok(self.adapter.step(&self.replay, &mut self.rng)?)
    }

    /// The heads as adapted so far, ready to share with the inference thread.
    pub fn shared_heads(&self) -> Arc<Vec<Head<f32>>> {
        Arc::new(self.adapter.heads().to_vec())
    }

    /// Replaces the anchors with pairs embedded from training images on this machine (for
    /// bundles that ship none): two augmented views of each image.
    pub fn anchors_from_inputs(&mut self, inputs: &[f32], count: usize) -> anyhow::Result<()> {
        let len = self.augmenter.layout().len();
        let mut views = [Vec::with_capacity(count * len), Vec::with_capacity(count * len)];
        for image in inputs.chunks_exact(len).take(count) {
            for view in views.iter_mut() {
                self.augmenter.augment(image, &mut self.augmented, &mut self.rng);
                view.extend_from_slice(&self.augmented);
            }
        }
        let l = self.augmenter.layout().clone();
        let embed = |v: &[f32]| -> anyhow::Result<Array2<f32>> {
            let n = v.len() / len;
            Ok(self
                .classifier_backbone
                .embed(ArrayView4::from_shape((n, l.channels, l.height, l.width), v)?)?)
        };
        let (a1, a2) = (embed(&views[0])?, embed(&views[1])?);
        self.replay.set_anchors(a1.view(), a2.view())?;
        Ok(())
    }
}
