//! On-device adaptation of the classifier heads.
//!
//! The embedding network stays frozen; only the heads' directions `v` and scales `g` move,
//! by Adam steps on an objective of four parts, each averaged over heads:
//!
//! 1. **stream loss**: the uniform-prior loss ([`crate::loss`]) over a batch of stream pairs
//!    from the replay buffer, the method's own objective on what the device sees;
//! 2. **anchor loss**: the same loss over a separate batch of anchor pairs (training-set
//!    embeddings shipped in the bundle). The two batches are scored *apart*, because the
//!    uniform prior holds within each population (the stream is balanced over classes in
//!    the long run, and so is the training set) but says nothing about their mixture;
//! 3. **pull**: `pull/2 * |W - W0|^2` on the effective weights (`W = g v/|v|`) toward the
//!    shipped heads `W0`, so the heads move only as far as the data asks (off by default:
//!    see [`AdaptParams::default`]);
//! 4. **distillation**: cross-entropy from the shipped heads' class probabilities on the
//!    anchors to the current ones, which keeps each cluster's meaning (its id) fixed on
//!    the data the server saw.
//!
//! A collapse guard watches, on a probe of stream embeddings, the number of clusters each
//! head uses and the entropy of its predicted class marginal. When either falls below its
//! floor (fractions of what the shipped heads score on the same kind of data), the last
//! heads that passed are restored, the optimiser's moments are cleared, the step size is
//! halved, and the rollback is logged.
//!
//! ```
//! use ndarray::Array2;
//! use rand::{rngs::StdRng, Rng, SeedableRng};
//! use selfclass_runtime::adapt::{AdaptParams, Adapter};
//! use selfclass_runtime::head::Head;
//! use selfclass_runtime::replay::ReplayBuffer;
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let head = Head::from_weights(Array2::from_shape_fn((3, 4), |_| rng.gen_range(-1.0f32..1.0)))?;
//! let params = AdaptParams { batch_size: 12, anchor_batch: 0, ..AdaptParams::default() };
//! let mut adapter = Adapter::new(vec![head], params)?;
//! let mut replay = ReplayBuffer::new(4, 64)?;
//! for _ in 0..64 {
//!     let z = ndarray::Array1::from_shape_fn(4, |_| rng.gen_range(-1.0f32..1.0));
//!     replay.offer(&mut rng, z.view(), z.view())?;
//! }
//! let report = adapter.step(&replay, &mut rng)?.expect("enough data for a step");
//! assert!(report.loss.is_finite());
//! assert_eq!(adapter.steps(), 1);
//! # Ok::<(), selfclass_runtime::Error>(())
//! ```

use ndarray::{s, Array1, Array2, ArrayView2, ArrayViewMut2, Axis, NdFloat};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::head::{argmax, Head};
use crate::loss::{class_major_loss, LossParams, LossWork};
use crate::matmul::mat_mul;
use crate::replay::ReplayBuffer;
use crate::{Error, Result};

/// Floors of the collapse guard, as fractions of what the shipped heads score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GuardParams {
    /// Check every this many steps (0 turns the guard off).
    pub check_every: u64,
    /// Stream pairs in the probe the guard scores.
    pub probe_size: usize,
    /// A head collapses when its normalised marginal entropy (1 = all classes equally
    /// likely) falls below this fraction of the shipped head's on the first probe.
    pub min_entropy_ratio: f64,
    /// ... or when it uses fewer than this fraction of the clusters the shipped head used.
    pub min_clusters_ratio: f64,
}

impl Default for GuardParams {
    fn default() -> Self {
        GuardParams {
            check_every: 10,
            probe_size: 1024,
            min_entropy_ratio: 0.8,
            min_clusters_ratio: 0.6,
        }
    }
}

/// Hyper-parameters of adaptation, checked by [`AdaptParams::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptParams {
    /// Adam step size.
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Stream pairs per step; at least four times the largest head's classes, so every
    /// class can be represented in the batch the uniform prior balances.
    pub batch_size: usize,
    /// Anchor pairs per step (0: no anchor loss and no distillation); when not 0, at
    /// least four times the largest head's classes.
    pub anchor_batch: usize,
    /// Weight of the anchor loss against the stream loss (weight 1).
    pub anchor_weight: f64,
    /// Strength of the L2 pull toward the shipped heads' effective weights.
    pub pull: f64,
    /// Weight of the distillation term on the anchors.
    pub distill: f64,
    pub loss: LossParams,
    pub guard: GuardParams,
}

impl Default for AdaptParams {
    fn default() -> Self {
        AdaptParams {
            // Tuned on the adaptation benchmark (firmware-host/README.md): a pull of even
            // 0.1 halved the gain on the shifted stream, while distillation alone kept
            // clean accuracy; the pull stays available for devices that want it.
            learning_rate: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            batch_size: 512,
            anchor_batch: 512,
            anchor_weight: 1.0,
            pull: 0.0,
            distill: 0.3,
            loss: LossParams::default(),
            guard: GuardParams::default(),
        }
    }
}

impl AdaptParams {
    /// Checks the parameters against the heads they will train, once, before any step.
    pub fn validate(&self, largest_head: usize) -> Result<()> {
        let bad = |reason: String| Err(Error::invalid("adaptation parameters", reason));
        self.loss.validate()?;
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !positive(self.learning_rate) {
            return bad(format!("learning rate {} must be positive", self.learning_rate));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!("Adam betas {} and {} must be in [0, 1)", self.beta1, self.beta2));
        }
        let min_batch = 4 * largest_head;
        if self.batch_size < min_batch {
            return bad(format!(
                "batch of {} stream pairs; at least {min_batch} (four times the largest head's {largest_head} classes)",
                self.batch_size
            ));
        }
        if self.anchor_batch != 0 && self.anchor_batch < min_batch {
            return bad(format!(
                "anchor batch of {}; 0 or at least {min_batch} (four times the largest head)",
                self.anchor_batch
            ));
        }
        if ![self.anchor_weight, self.pull, self.distill].into_iter().all(non_negative) {
            return bad("anchor weight, pull and distillation must be finite and >= 0".into());
        }
        let g = &self.guard;
        if !(0.0..=1.0).contains(&g.min_entropy_ratio)
            || !(0.0..=1.0).contains(&g.min_clusters_ratio)
            || (g.check_every > 0 && g.probe_size == 0)
        {
            return bad("guard ratios must be in [0, 1] and its probe non-empty".into());
        }
        Ok(())
    }
}

/// One step's batch: stream pairs and, optionally, anchor pairs (two views each).
#[derive(Debug, Clone)]
pub struct Batch<F> {
    pub stream: (Array2<F>, Array2<F>),
    pub anchors: Option<(Array2<F>, Array2<F>)>,
}

/// The weights of the objective's four parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectiveWeights {
    pub anchor_weight: f64,
    pub pull: f64,
    pub distill: f64,
    pub loss: LossParams,
}

impl From<&AdaptParams> for ObjectiveWeights {
    fn from(p: &AdaptParams) -> Self {
        ObjectiveWeights {
            anchor_weight: p.anchor_weight,
            pull: p.pull,
            distill: p.distill,
            loss: p.loss,
        }
    }
}

/// The objective's value, by part.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct ObjectiveParts {
    pub stream: f64,
    pub anchor: f64,
    pub pull: f64,
    pub distill: f64,
}

impl ObjectiveParts {
    pub fn total(&self) -> f64 {
        self.stream + self.anchor + self.pull + self.distill
    }
}

/// Gradient of the objective with respect to one head's `v` and `g`.
#[derive(Debug, Clone)]
pub struct ParamGrads<F> {
    pub v: Array2<F>,
    pub g: Array1<F>,
}

/// The adaptation objective and its exact gradient with respect to every head's `v` and
/// `g`. `shipped` are the heads as the bundle delivered them (the pull's and the
/// distillation's reference); generic so it can be checked in f64.
pub fn objective<F: NdFloat>(
    heads: &[Head<F>],
    shipped: &[Head<F>],
    batch: &Batch<F>,
    weights: &ObjectiveWeights,
) -> Result<(ObjectiveParts, Vec<ParamGrads<F>>)> {
    objective_with(&mut ObjectiveWork::default(), heads, shipped, batch, weights)
}

/// Buffers of the objective's uniform-prior part, kept across steps by the [`Adapter`], so
/// that a step allocates none of its large temporaries once they have grown to its shapes.
#[derive(Debug, Clone)]
struct ObjectiveWork<F> {
    /// The heads' effective weights stacked into one `sum(C) x D` matrix.
    stacked: Array2<F>,
    /// d objective / d `stacked`.
    d_stacked: Array2<F>,
    /// Per view: every head's logits, class by class (`sum(C) x N` row-major), and
    /// d loss / d those logits in the same layout.
    logits: [Vec<F>; 2],
    d_logits: [Vec<F>; 2],
    /// One per head, so that each keeps its shapes from step to step.
    loss: Vec<LossWork<F>>,
    /// Threads a step may use (1 or 2: see [`ObjectiveWork::pair_loss`]).
    threads: usize,
}

// Written out: deriving `Default` would ask it of `F`.
impl<F: NdFloat> Default for ObjectiveWork<F> {
    fn default() -> Self {
        ObjectiveWork {
            stacked: Array2::zeros((0, 0)),
            d_stacked: Array2::zeros((0, 0)),
            logits: [Vec::new(), Vec::new()],
            d_logits: [Vec::new(), Vec::new()],
            loss: Vec::new(),
            threads: 1,
        }
    }
}

impl<F: NdFloat> ObjectiveWork<F> {
    /// Stacks the heads' effective weights and clears their gradient; returns where each
    /// head's rows start.
    fn stack(&mut self, heads: &[Head<F>]) -> Result<Vec<usize>> {
        let dim = heads[0].dim();
        if let Some(h) = heads.iter().find(|h| h.dim() != dim) {
            return Err(Error::invalid(
                "adaptation objective",
                format!("heads of dimensions {dim} and {}", h.dim()),
            ));
        }
        let total: usize = heads.iter().map(Head::classes).sum();
        if self.stacked.dim() != (total, dim) {
            self.stacked = Array2::zeros((total, dim));
            self.d_stacked = Array2::zeros((total, dim));
        }
        let mut offsets = Vec::with_capacity(heads.len());
        let mut at = 0;
        for head in heads {
            head.write_weights(self.stacked.slice_mut(s![at..at + head.classes(), ..]));
            offsets.push(at);
            at += head.classes();
        }
        self.d_stacked.fill(F::zero());
        Ok(offsets)
    }

    /// The uniform-prior loss of a batch of pairs, averaged over heads, times `weight`; its
    /// gradient with respect to the stacked weights (times `weight`) is added to
    /// `d_stacked`. Each view's logits for every head come from one matrix product,
    /// `stacked z^T`, already class by class, and the gradient from one more,
    /// `d_logits z`; no gradient with respect to the frozen embeddings is formed.
    ///
    /// With `threads` above 1 the heads are split in two groups of about equal rows, whose
    /// products and losses run at the same time: they share no memory.
    fn pair_loss(
        &mut self,
        heads: &[Head<F>],
        offsets: &[usize],
        views: &(Array2<F>, Array2<F>),
        weight: F,
        params: &LossParams,
    ) -> Result<F> {
        let (total, dim) = self.stacked.dim();
        let batch = views.0.nrows();
        if views.0.dim() != (batch, dim) || views.1.dim() != (batch, dim) || batch == 0 {
            return Err(Error::invalid(
                "adaptation objective",
                format!(
                    "views of shapes {:?} and {:?} for heads of dimension {dim}",
                    views.0.dim(),
                    views.1.dim()
                ),
            ));
        }
        for buf in self.logits.iter_mut().chain(&mut self.d_logits) {
            buf.resize(total * batch, F::zero());
        }
        self.loss.resize_with(heads.len(), LossWork::default);
        let head_weight = F::one() / F::from(heads.len()).unwrap_or_else(F::one);
        let shared = Shared { views, weight, head_weight, params };

        // The first head of the second group: where the rows come closest to half.
        let split = if self.threads > 1 && heads.len() > 1 {
            (1..heads.len()).min_by_key(|&h| offsets[h].abs_diff(total - offsets[h])).unwrap_or(1)
        } else {
            heads.len()
        };
        let rows = offsets.get(split).copied().unwrap_or(total);
        let (stacked_a, stacked_b) = self.stacked.view().split_at(Axis(0), rows);
        let (d_stacked_a, d_stacked_b) = self.d_stacked.view_mut().split_at(Axis(0), rows);
        let [l0, l1] = &mut self.logits;
        let [d0, d1] = &mut self.d_logits;
        let (l0a, l0b) = l0.split_at_mut(rows * batch);
        let (l1a, l1b) = l1.split_at_mut(rows * batch);
        let (d0a, d0b) = d0.split_at_mut(rows * batch);
        let (d1a, d1b) = d1.split_at_mut(rows * batch);
        let (loss_a, loss_b) = self.loss.split_at_mut(split);
        let first = HeadGroup {
            heads: &heads[..split],
            stacked: stacked_a,
            d_stacked: d_stacked_a,
            logits: [l0a, l1a],
            d_logits: [d0a, d1a],
            loss: loss_a,
        };
        if split == heads.len() {
            return first.loss(&shared);
        }
        let second = HeadGroup {
            heads: &heads[split..],
            stacked: stacked_b,
            d_stacked: d_stacked_b,
            logits: [l0b, l1b],
            d_logits: [d0b, d1b],
            loss: loss_b,
        };
        let (a, b) = rayon::join(|| first.loss(&shared), || second.loss(&shared));
        Ok(a? + b?)
    }
}

/// What every group of heads of one [`ObjectiveWork::pair_loss`] reads.
struct Shared<'a, F> {
    views: &'a (Array2<F>, Array2<F>),
    weight: F,
    head_weight: F,
    params: &'a LossParams,
}

/// Consecutive heads and their rows of the stacked weights, logits and gradients.
struct HeadGroup<'a, F> {
    heads: &'a [Head<F>],
    stacked: ArrayView2<'a, F>,
    d_stacked: ArrayViewMut2<'a, F>,
    /// Per view, class by class (`rows x N`).
    logits: [&'a mut [F]; 2],
    d_logits: [&'a mut [F]; 2],
    loss: &'a mut [LossWork<F>],
}

impl<F: NdFloat> HeadGroup<'_, F> {
    /// The group's share of [`ObjectiveWork::pair_loss`]: its heads' losses (each times
    /// the head weight, summed, times the pair weight) and their gradient, added to its
    /// rows of `d_stacked`.
    fn loss(mut self, shared: &Shared<F>) -> Result<F> {
        let (rows, batch) = (self.stacked.nrows(), shared.views.0.nrows());
        let shape_error =
            |e: ndarray::ShapeError| Error::invalid("adaptation objective", e.to_string());
        let views = [&shared.views.0, &shared.views.1];
        for (z, logits) in views.into_iter().zip(&mut self.logits) {
            let mut out = ArrayViewMut2::from_shape((rows, batch), logits).map_err(shape_error)?;
            mat_mul(F::one(), &self.stacked, &z.t(), F::zero(), &mut out);
        }
        let mut loss = F::zero();
        let mut at = 0;
        for (head, work) in self.heads.iter().zip(self.loss.iter_mut()) {
            let span = at * batch..(at + head.classes()) * batch;
            at += head.classes();
            let [l0, l1] = &self.logits;
            let [d0, d1] = &mut self.d_logits;
            let head_loss = class_major_loss(
                &[&l0[span.clone()], &l1[span.clone()]],
                (head.classes(), batch),
                shared.params,
                shared.head_weight,
                work,
                &mut [&mut d0[span.clone()], &mut d1[span]],
            )?;
            loss += head_loss * shared.head_weight;
        }
        for (z, d_logits) in views.into_iter().zip(&self.d_logits) {
            let d = ArrayView2::from_shape((rows, batch), d_logits).map_err(shape_error)?;
            mat_mul(shared.weight, &d, &z.view(), F::one(), &mut self.d_stacked);
        }
        Ok(loss * shared.weight)
    }
}

/// [`objective`] with its buffers kept in `work` from call to call.
fn objective_with<F: NdFloat>(
    work: &mut ObjectiveWork<F>,
    heads: &[Head<F>],
    shipped: &[Head<F>],
    batch: &Batch<F>,
    weights: &ObjectiveWeights,
) -> Result<(ObjectiveParts, Vec<ParamGrads<F>>)> {
    if heads.is_empty() || heads.len() != shipped.len() {
        return Err(Error::invalid(
            "adaptation objective",
            format!("{} heads against {} shipped heads", heads.len(), shipped.len()),
        ));
    }
    let f = |x: f64| F::from(x).unwrap_or_else(F::zero);
    let real = |x: F| x.to_f64().unwrap_or(f64::NAN);
    let head_weight = 1.0 / heads.len() as f64;
    let mut parts = ObjectiveParts::default();

    // 1 and 2: the uniform-prior loss, stream and anchors scored apart; the gradient with
    // respect to the stacked weights accumulates over both.
    let offsets = work.stack(heads)?;
    parts.stream = real(work.pair_loss(heads, &offsets, &batch.stream, F::one(), &weights.loss)?);
    if let Some(anchors) = &batch.anchors {
        if weights.anchor_weight > 0.0 {
            let weight = f(weights.anchor_weight);
            parts.anchor = real(work.pair_loss(heads, &offsets, anchors, weight, &weights.loss)?);
        }
    }
    let mut grads: Vec<ParamGrads<F>> = heads
        .iter()
        .zip(&offsets)
        .map(|(head, &at)| {
            let d_w = work.d_stacked.slice(s![at..at + head.classes(), ..]).to_owned();
            let (v, g) = head.weight_grad_to_params(d_w);
            ParamGrads { v, g }
        })
        .collect();

    // 3: pull toward the shipped effective weights.
    if weights.pull > 0.0 {
        for ((head, reference), grad) in heads.iter().zip(shipped).zip(&mut grads) {
            let diff = head.weights() - reference.weights();
            parts.pull += 0.5
                * weights.pull
                * head_weight
                * diff.iter().map(|d| (*d * *d).to_f64().unwrap_or(0.0)).sum::<f64>();
            let (dv, dg) = head.weight_grad_to_params(diff * f(weights.pull * head_weight));
            grad.v += &dv;
            grad.g += &dg;
        }
    }

    // 4: distillation on the anchors, both views, at the prediction temperature.
    if let (Some(anchors), true) = (&batch.anchors, weights.distill > 0.0) {
        let inv_t = f(1.0 / weights.loss.row_temperature);
        for ((head, reference), grad) in heads.iter().zip(shipped).zip(&mut grads) {
            for z in [&anchors.0, &anchors.1] {
                let n = z.nrows().max(1) as f64;
                let scale = weights.distill * head_weight * 0.5 / n;
                let target = softmax_rows(&reference.logits(z.view()).mapv(|x| x * inv_t));
                let log_p = log_softmax_rows(&head.logits(z.view()).mapv(|x| x * inv_t));
                parts.distill -= scale
                    * (&target * &log_p).iter().map(|x| x.to_f64().unwrap_or(0.0)).sum::<f64>();
                // d/d logits of -sum q ln softmax(x / T) is (p - q) / T.
                let d_logits = (log_p.mapv(F::exp) - &target) * (inv_t * f(scale));
                let hg = head.backward(z.view(), d_logits.view());
                grad.v += &hg.v;
                grad.g += &hg.g;
            }
        }
    }
    Ok((parts, grads))
}

fn log_softmax_rows<F: NdFloat>(x: &Array2<F>) -> Array2<F> {
    let mut out = x.clone();
    for mut row in out.rows_mut() {
        let max = row.fold(F::neg_infinity(), |m, &v| m.max(v));
        let log_sum = row.fold(F::zero(), |s, &v| s + (v - max).exp()).ln() + max;
        row.mapv_inplace(|v| v - log_sum);
    }
    out
}

fn softmax_rows<F: NdFloat>(x: &Array2<F>) -> Array2<F> {
    log_softmax_rows(x).mapv(F::exp)
}

/// Whether every element of `xs` is finite; reads them all, without stopping early, so
/// the check vectorises.
fn all_finite<'a, D: ndarray::Dimension>(xs: &'a ndarray::Array<f32, D>) -> bool {
    xs.iter().fold(true, |ok: bool, x: &'a f32| ok & x.is_finite())
}

/// How spread out one head's predictions are over a set of embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Classes that are the arg-max of at least one embedding.
    pub clusters_used: usize,
    /// Entropy of the mean predicted class distribution (softmax at the prediction
    /// temperature), divided by `ln C`: 1 when every class is equally likely overall, 0
    /// when one class takes everything.
    pub entropy: f64,
}

/// The [`Health`] of `head` on the embeddings `z`.
pub fn health(head: &Head<f32>, z: ArrayView2<f32>, row_temperature: f64) -> Health {
    let logits = head.logits(z);
    let classes = head.classes();
    let mut used = vec![false; classes];
    for row in logits.rows() {
        used[argmax(row)] = true;
    }
    let inv_t = (1.0 / row_temperature) as f32;
    let probs = softmax_rows(&logits.mapv(|x| x * inv_t));
    let marginal = probs.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(classes));
    let entropy: f64 =
        marginal.iter().filter(|&&p| p > 0.0).map(|&p| -(p as f64) * (p as f64).ln()).sum();
    let max_entropy = (classes as f64).ln();
    Health {
        clusters_used: used.iter().filter(|&&u| u).count(),
        entropy: if max_entropy > 0.0 { entropy / max_entropy } else { 1.0 },
    }
}

/// What one adaptation step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepReport {
    pub step: u64,
    /// The objective before the update.
    pub loss: f64,
    pub parts: ObjectiveParts,
    /// Set when the guard ran on this step.
    pub guard: Option<GuardOutcome>,
}

/// The collapse guard's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum GuardOutcome {
    Healthy,
    /// The heads collapsed on head `head` and were restored to the last good ones.
    RolledBack {
        head: usize,
        clusters_used: usize,
        entropy: f64,
    },
}

#[derive(Debug, Clone)]
struct AdamMoments {
    m_v: Array2<f32>,
    s_v: Array2<f32>,
    m_g: Array1<f32>,
    s_g: Array1<f32>,
}

impl AdamMoments {
    fn zeros(head: &Head<f32>) -> Self {
        AdamMoments {
            m_v: Array2::zeros(head.v.raw_dim()),
            s_v: Array2::zeros(head.v.raw_dim()),
            m_g: Array1::zeros(head.g.raw_dim()),
            s_g: Array1::zeros(head.g.raw_dim()),
        }
    }
}

/// What must survive a restart: the adapted heads and the counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptSnapshot {
    pub steps: u64,
    pub rollbacks: u64,
    /// Per head: classes, dimension, `v` row-major, `g`.
    pub heads: Vec<HeadValues>,
}

/// A head's parameters in plain vectors, for serialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadValues {
    pub classes: u32,
    pub dim: u32,
    pub v: Vec<f32>,
    pub g: Vec<f32>,
}

impl HeadValues {
    pub fn from_head(head: &Head<f32>) -> Self {
        HeadValues {
            classes: head.classes() as u32,
            dim: head.dim() as u32,
            v: head.v.iter().copied().collect(),
            g: head.g.to_vec(),
        }
    }

    pub fn to_head(&self) -> Result<Head<f32>> {
        let v = Array2::from_shape_vec((self.classes as usize, self.dim as usize), self.v.clone())
            .map_err(|e| Error::invalid("stored head", e.to_string()))?;
        Head::new(v, Array1::from(self.g.clone()))
    }
}

/// Trains the heads on replayed embeddings, step by step, with a collapse guard.
#[derive(Debug, Clone)]
pub struct Adapter {
    params: AdaptParams,
    shipped: Vec<Head<f32>>,
    heads: Vec<Head<f32>>,
    last_good: Vec<Head<f32>>,
    moments: Vec<AdamMoments>,
    /// Adam's step count since the moments were last cleared (for bias correction).
    adam_t: i32,
    /// Multiplies the learning rate; halved at every rollback, down to 1/64.
    lr_scale: f64,
    steps: u64,
    rollbacks: u64,
    baseline: Option<Vec<Health>>,
    /// The objective's buffers, kept from step to step.
    work: ObjectiveWork<f32>,
}

impl Adapter {
    /// An adapter starting from the shipped heads.
    pub fn new(shipped: Vec<Head<f32>>, params: AdaptParams) -> Result<Self> {
        if shipped.is_empty() {
            return Err(Error::invalid("adapter", "no head to adapt"));
        }
        let largest = shipped.iter().map(Head::classes).max().unwrap_or(0);
        params.validate(largest)?;
        let moments = shipped.iter().map(AdamMoments::zeros).collect();
        Ok(Adapter {
            params,
            heads: shipped.clone(),
            last_good: shipped.clone(),
            shipped,
            moments,
            adam_t: 0,
            lr_scale: 1.0,
            steps: 0,
            rollbacks: 0,
            baseline: None,
            work: ObjectiveWork::default(),
        })
    }

    /// Continues from a snapshot taken by [`Adapter::snapshot`]; its heads must have the
    /// shipped heads' shapes.
    pub fn restore(&mut self, snapshot: &AdaptSnapshot) -> Result<()> {
        let heads: Vec<Head<f32>> =
            snapshot.heads.iter().map(HeadValues::to_head).collect::<Result<_>>()?;
        let same_shapes = heads.len() == self.shipped.len()
            && heads.iter().zip(&self.shipped).all(|(a, b)| a.v.dim() == b.v.dim());
        if !same_shapes {
            return Err(Error::invalid(
                "adapter state",
                "its heads do not have the shapes of the model's heads (state from another model?)",
            ));
        }
        self.last_good = heads.clone();
        self.heads = heads;
        self.steps = snapshot.steps;
        self.rollbacks = snapshot.rollbacks;
        Ok(())
    }

    /// The current heads and counters.
    pub fn snapshot(&self) -> AdaptSnapshot {
        AdaptSnapshot {
            steps: self.steps,
            rollbacks: self.rollbacks,
            heads: self.heads.iter().map(HeadValues::from_head).collect(),
        }
    }

    pub fn params(&self) -> &AdaptParams {
        &self.params
    }

    /// Sets the Adam step size from the next step on, for callers that follow a schedule
    /// (the trainer's head refit decays it over its passes).
    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.params.learning_rate = learning_rate;
    }

    /// Threads a step may use: 1 (the default) runs it on the caller's thread; 2 or more
    /// split the heads in two groups that run at the same time on rayon's global pool (one
    /// thread per core, started on the first such step), for devices with a core to spare
    /// beside inference. Steps agree with one thread's to rounding (the products are split
    /// by rows and the loss is summed in another order).
    pub fn set_threads(&mut self, threads: usize) {
        self.work.threads = threads.max(1);
    }

    /// The heads as adapted so far.
    pub fn heads(&self) -> &[Head<f32>] {
        &self.heads
    }

    /// The heads the bundle shipped.
    pub fn shipped(&self) -> &[Head<f32>] {
        &self.shipped
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn rollbacks(&self) -> u64 {
        self.rollbacks
    }

    /// The shipped heads' health on the first probe, once the guard has run.
    pub fn baseline(&self) -> Option<&[Health]> {
        self.baseline.as_deref()
    }

    /// Draws a batch from `replay` and takes one optimiser step; `None` (and no step)
    /// while the replay holds fewer stream pairs than a batch.
    pub fn step<R: Rng + ?Sized>(
        &mut self,
        replay: &ReplayBuffer,
        rng: &mut R,
    ) -> Result<Option<StepReport>> {
        if replay.len() < self.params.batch_size {
            return Ok(None);
        }
        let stream = replay.sample_stream(self.params.batch_size, rng);
        let anchors = (self.params.anchor_batch > 0
            && replay.anchor_count() >= self.params.anchor_batch)
            .then(|| replay.sample_anchors(self.params.anchor_batch, rng));
        let batch = Batch { stream, anchors };
        let mut report = self.step_on(&batch)?;

        let every = self.params.guard.check_every;
        if self.steps.checked_rem(every) == Some(0) {
            let (probe, _) = replay.sample_stream(self.params.guard.probe_size, rng);
            report.guard = Some(self.check(probe.view()));
        }
        Ok(Some(report))
    }

    /// One optimiser step on a given batch (no guard).
    pub fn step_on(&mut self, batch: &Batch<f32>) -> Result<StepReport> {
        let weights = ObjectiveWeights::from(&self.params);
        let (parts, grads) =
            objective_with(&mut self.work, &self.heads, &self.shipped, batch, &weights)?;
        let loss = parts.total();
        if !loss.is_finite() || !grads.iter().all(|g| all_finite(&g.v) && all_finite(&g.g)) {
            return Err(Error::invalid(
                "adaptation step",
                "the objective or its gradient is not finite",
            ));
        }
        self.adam_t += 1;
        let p = &self.params;
        let t = self.adam_t;
        let lr = (p.learning_rate * self.lr_scale) as f32;
        let (b1, b2) = (p.beta1 as f32, p.beta2 as f32);
        let correction1 = 1.0 - b1.powi(t);
        let correction2 = 1.0 - b2.powi(t);
        let eps = 1e-8f32;
        for ((head, grad), m) in self.heads.iter_mut().zip(&grads).zip(&mut self.moments) {
            let update = |param: &mut f32, g: f32, m: &mut f32, s: &mut f32| {
                *m = b1 * *m + (1.0 - b1) * g;
                *s = b2 * *s + (1.0 - b2) * g * g;
                let m_hat = *m / correction1;
                let s_hat = *s / correction2;
                *param -= lr * m_hat / (s_hat.sqrt() + eps);
            };
            ndarray::Zip::from(&mut head.v)
                .and(&grad.v)
                .and(&mut m.m_v)
                .and(&mut m.s_v)
                .for_each(|param, &g, m, s| update(param, g, m, s));
            ndarray::Zip::from(&mut head.g)
                .and(&grad.g)
                .and(&mut m.m_g)
                .and(&mut m.s_g)
                .for_each(|param, &g, m, s| update(param, g, m, s));
        }
        self.steps += 1;
        Ok(StepReport { step: self.steps, loss, parts, guard: None })
    }

    /// Runs the collapse guard on a probe of stream embeddings: records the current heads
    /// as the last good ones when they pass, restores the last good ones when they fail.
    pub fn check(&mut self, probe: ArrayView2<f32>) -> GuardOutcome {
        if probe.nrows() == 0 {
            return GuardOutcome::Healthy;
        }
        let t = self.params.loss.row_temperature;
        let baseline = self
            .baseline
            .get_or_insert_with(|| self.shipped.iter().map(|h| health(h, probe, t)).collect())
            .clone();
        let g = &self.params.guard;
        for (i, (head, base)) in self.heads.iter().zip(&baseline).enumerate() {
            let now = health(head, probe, t);
            let min_clusters = (g.min_clusters_ratio * base.clusters_used as f64).ceil() as usize;
            if now.entropy < g.min_entropy_ratio * base.entropy || now.clusters_used < min_clusters
            {
                tracing::warn!(
                    head = i,
                    clusters_used = now.clusters_used,
                    min_clusters,
                    entropy = now.entropy,
                    min_entropy = g.min_entropy_ratio * base.entropy,
                    "adaptation collapsed; restored the last good heads"
                );
                self.heads = self.last_good.clone();
                self.moments = self.heads.iter().map(AdamMoments::zeros).collect();
                self.adam_t = 0;
                self.lr_scale = (self.lr_scale * 0.5).max(1.0 / 64.0);
                self.rollbacks += 1;
                return GuardOutcome::RolledBack {
                    head: i,
                    clusters_used: now.clusters_used,
                    entropy: now.entropy,
                };
            }
        }
        self.last_good = self.heads.clone();
        GuardOutcome::Healthy
    }

    /// Replaces the current heads without touching the last good ones (for tests and for
    /// tools that inject heads to check the guard).
    pub fn set_heads_unchecked(&mut self, heads: Vec<Head<f32>>) -> Result<()> {
        if heads.len() != self.heads.len()
            || heads.iter().zip(&self.heads).any(|(a, b)| a.v.dim() != b.v.dim())
        {
            return Err(Error::invalid("adapter", "heads of other shapes"));
        }
        self.heads = heads;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::l2_normalize_rows;
    use crate::metrics::score;
    use ndarray::Array1;
    use rand::{rngs::StdRng, SeedableRng};

    fn random_head(rng: &mut StdRng, classes: usize, dim: usize) -> Head<f64> {
        let v = Array2::from_shape_fn((classes, dim), |_| rng.gen_range(-1.0..1.0));
        let g = Array1::from_shape_fn(classes, |_| rng.gen_range(0.5..3.0));
        Head::new(v, g).expect("valid")
    }

    fn random_unit_rows(rng: &mut StdRng, n: usize, dim: usize) -> Array2<f64> {
        let mut z = Array2::from_shape_fn((n, dim), |_| rng.gen_range(-1.0..1.0));
        l2_normalize_rows(&mut z);
        z
    }

    /// Central differences in f64 with step 1e-6: truncation error ~1e-12 times the third
    /// derivative and rounding ~1e-16/1e-6 = 1e-10, so 1e-6 relative has ample margin.
    #[test]
    fn objective_gradient_matches_central_differences() {
        let mut rng = StdRng::seed_from_u64(21);
        let dim = 5;
        let shipped = vec![random_head(&mut rng, 3, dim), random_head(&mut rng, 4, dim)];
        let heads: Vec<Head<f64>> = shipped
            .iter()
            .map(|h| {
                let mut h = h.clone();
                h.v.mapv_inplace(|x| x + 0.3 * (x * 7.0).sin());
                h.g.mapv_inplace(|x| x * 1.2);
                h
            })
            .collect();
        let batch = Batch {
            stream: (random_unit_rows(&mut rng, 16, dim), random_unit_rows(&mut rng, 16, dim)),
            anchors: Some((
                random_unit_rows(&mut rng, 16, dim),
                random_unit_rows(&mut rng, 16, dim),
            )),
        };
        let weights = ObjectiveWeights {
            anchor_weight: 0.7,
            pull: 0.4,
            distill: 0.9,
            loss: LossParams { row_temperature: 0.5, col_temperature: 0.3, global_views: 2 },
        };
        let value =
            |hs: &[Head<f64>]| objective(hs, &shipped, &batch, &weights).expect("ok").0.total();
        let (parts, grads) = objective(&heads, &shipped, &batch, &weights).expect("ok");
        assert!(
            parts.stream > 0.0 && parts.anchor > 0.0 && parts.pull > 0.0 && parts.distill > 0.0
        );
        let h = 1e-6;
        for (k, head) in heads.iter().enumerate() {
            for idx in 0..head.v.len() {
                let (r, c) = (idx / dim, idx % dim);
                let (mut plus, mut minus) = (heads.clone(), heads.clone());
                plus[k].v[[r, c]] += h;
                minus[k].v[[r, c]] -= h;
                let numeric = (value(&plus) - value(&minus)) / (2.0 * h);
                let got = grads[k].v[[r, c]];
                assert!(
                    (got - numeric).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "head {k} v[{r},{c}]: {got} vs {numeric}"
                );
            }
            for c in 0..head.g.len() {
                let (mut plus, mut minus) = (heads.clone(), heads.clone());
                plus[k].g[c] += h;
                minus[k].g[c] -= h;
                let numeric = (value(&plus) - value(&minus)) / (2.0 * h);
                let got = grads[k].g[c];
                assert!(
                    (got - numeric).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "head {k} g[{c}]: {got} vs {numeric}"
                );
            }
        }
    }

    #[test]
    fn pull_and_distillation_vanish_at_the_shipped_heads() {
        let mut rng = StdRng::seed_from_u64(5);
        let shipped = vec![random_head(&mut rng, 3, 4)];
        let z = random_unit_rows(&mut rng, 12, 4);
        let batch = Batch { stream: (z.clone(), z.clone()), anchors: Some((z.clone(), z)) };
        let weights = ObjectiveWeights {
            anchor_weight: 0.0,
            pull: 1.0,
            distill: 1.0,
            loss: LossParams::default(),
        };
        let (parts, _) = objective(&shipped, &shipped, &batch, &weights).expect("ok");
        assert_eq!(parts.pull, 0.0);
        // Cross-entropy of a distribution with itself is its entropy, not zero; check the
        // gradient of that term alone vanishes instead.
        let only_distill = ObjectiveWeights { pull: 0.0, ..weights };
        let no_stream = Batch { stream: batch.stream.clone(), anchors: batch.anchors.clone() };
        let (_, with) = objective(&shipped, &shipped, &no_stream, &only_distill).expect("ok");
        let (_, without) = objective(
            &shipped,
            &shipped,
            &no_stream,
            &ObjectiveWeights { distill: 0.0, ..only_distill },
        )
        .expect("ok");
        let diff = (&with[0].v - &without[0].v).iter().fold(0f64, |m, d| m.max(d.abs()));
        assert!(diff < 1e-12, "distillation gradient at the shipped heads: {diff}");
    }

    /// Four well-separated blobs in 8 dimensions, labelled.
    /// Item `i` belongs to blob `i % 4`; the two views are independent noisy draws.
    fn blobs(rng: &mut StdRng, n: usize, noise: f32) -> (Array2<f32>, Array2<f32>, Vec<u32>) {
        let centre = |c: usize, d: usize| match d {
            d if d == 2 * c => 1.0f32,
            d if d == 2 * c + 1 => 0.5,
            _ => 0.0,
        };
        let mut view = || {
            let mut z = Array2::from_shape_fn((n, 8), |(i, d)| {
                centre(i % 4, d) + noise * rng.gen_range(-1.0f32..1.0)
            });
            l2_normalize_rows(&mut z);
            z
        };
        let (v1, v2) = (view(), view());
        (v1, v2, (0..n).map(|i| (i % 4) as u32).collect())
    }

    #[test]
    fn adaptation_learns_clusters_a_random_head_misses() {
        let mut rng = StdRng::seed_from_u64(8);
        let (v1, v2, labels) = blobs(&mut rng, 400, 0.3);
        let w = Array2::from_shape_fn((4, 8), |_| rng.gen_range(-0.1f32..0.1));
        let head = Head::from_weights(w).expect("head");
        let before =
            score(&labels, &head.predict(v1.view()).iter().map(|&c| c as u32).collect::<Vec<_>>())
                .expect("score");

        let params = AdaptParams {
            learning_rate: 0.02,
            batch_size: 64,
            anchor_batch: 0,
            pull: 0.0,
            distill: 0.0,
            ..AdaptParams::default()
        };
        let mut adapter = Adapter::new(vec![head], params).expect("adapter");
        let mut replay = ReplayBuffer::new(8, 400).expect("replay");
        for (a, b) in v1.rows().into_iter().zip(v2.rows()) {
            replay.offer(&mut rng, a, b).expect("offer");
        }
        for _ in 0..300 {
            adapter.step(&replay, &mut rng).expect("step");
        }
        let after = score(
            &labels,
            &adapter.heads()[0].predict(v1.view()).iter().map(|&c| c as u32).collect::<Vec<_>>(),
        )
        .expect("score");
        assert!(
            after.acc > 0.95 && after.acc > before.acc + 0.2,
            "ACC {} -> {}",
            before.acc,
            after.acc
        );
    }

    #[test]
    fn a_strong_pull_keeps_the_heads_near_the_shipped_ones() {
        let mut rng = StdRng::seed_from_u64(9);
        let (v1, v2, _) = blobs(&mut rng, 200, 0.3);
        let w = Array2::from_shape_fn((4, 8), |_| rng.gen_range(-1.0f32..1.0));
        let head = Head::from_weights(w).expect("head");
        let drift = |pull: f64| {
            let params = AdaptParams {
                learning_rate: 0.02,
                batch_size: 64,
                anchor_batch: 0,
                pull,
                distill: 0.0,
                ..AdaptParams::default()
            };
            let mut adapter = Adapter::new(vec![head.clone()], params).expect("adapter");
            let batch = Batch { stream: (v1.clone(), v2.clone()), anchors: None };
            for _ in 0..100 {
                adapter.step_on(&batch).expect("step");
            }
            (&adapter.heads()[0].weights() - &head.weights())
                .iter()
                .map(|d| d * d)
                .sum::<f32>()
                .sqrt()
        };
        let free = drift(0.0);
        let pulled = drift(1000.0);
        assert!(pulled < 0.5 * free, "pull 1000 drifted {pulled}, no pull {free}");
    }

    #[test]
    fn guard_restores_the_last_good_heads_on_collapse() {
        let mut rng = StdRng::seed_from_u64(10);
        let (v1, _, _) = blobs(&mut rng, 200, 0.2);
        let centres = Array2::from_shape_fn((4, 8), |(c, d)| if d == 2 * c { 1.0f32 } else { 0.0 });
        let good = Head::from_weights(centres * 10.0).expect("head");
        let params = AdaptParams { batch_size: 16, anchor_batch: 0, ..AdaptParams::default() };
        let mut adapter = Adapter::new(vec![good.clone()], params).expect("adapter");
        assert_eq!(adapter.check(v1.view()), GuardOutcome::Healthy);
        let base = adapter.baseline().expect("baseline")[0];
        assert_eq!(base.clusters_used, 4);
        assert!(base.entropy > 0.95);

        // Every class direction the same: one cluster takes everything.
        let collapsed = Head::from_weights(Array2::from_shape_fn((4, 8), |(c, d)| {
            if d == 0 {
                10.0 + c as f32 * 0.01
            } else {
                0.0
            }
        }))
        .expect("head");
        adapter.set_heads_unchecked(vec![collapsed]).expect("same shapes");
        let outcome = adapter.check(v1.view());
        assert!(matches!(outcome, GuardOutcome::RolledBack { head: 0, .. }), "{outcome:?}");
        assert_eq!(adapter.heads()[0], good);
        assert_eq!(adapter.rollbacks(), 1);
        assert_eq!(adapter.check(v1.view()), GuardOutcome::Healthy);
    }

    #[test]
    fn snapshots_round_trip_and_refuse_other_shapes() {
        let mut rng = StdRng::seed_from_u64(11);
        let head =
            Head::from_weights(Array2::from_shape_fn((4, 8), |_| rng.gen_range(-1.0f32..1.0)))
                .expect("head");
        let params = AdaptParams { batch_size: 16, anchor_batch: 0, ..AdaptParams::default() };
        let mut adapter = Adapter::new(vec![head.clone()], params).expect("adapter");
        let (v1, v2, _) = blobs(&mut rng, 64, 0.3);
        adapter.step_on(&Batch { stream: (v1, v2), anchors: None }).expect("step");
        let snap = adapter.snapshot();
        let mut other = Adapter::new(vec![head], params).expect("adapter");
        other.restore(&snap).expect("restores");
        assert_eq!(other.heads(), adapter.heads());
        assert_eq!(other.steps(), 1);

        let small = Head::from_weights(Array2::from_shape_fn((3, 8), |_| 1.0f32)).expect("head");
        let mut mismatched = Adapter::new(vec![small], params).expect("adapter");
        assert!(mismatched.restore(&snap).is_err());
    }

    #[test]
    fn parameters_are_checked_before_any_step() {
        let head = Head::from_weights(Array2::from_shape_fn((10, 4), |(c, d)| (c + d) as f32))
            .expect("head");
        let small_batch = AdaptParams { batch_size: 39, anchor_batch: 0, ..AdaptParams::default() };
        let err = Adapter::new(vec![head.clone()], small_batch).unwrap_err();
        assert!(err.to_string().contains("at least 40"), "{err}");
        let small_anchor =
            AdaptParams { batch_size: 40, anchor_batch: 8, ..AdaptParams::default() };
        assert!(Adapter::new(vec![head.clone()], small_anchor).is_err());
        let bad_lr = AdaptParams { batch_size: 40, learning_rate: -1.0, ..AdaptParams::default() };
        assert!(Adapter::new(vec![head], bad_lr).is_err());
    }

    /// The uniform-prior part of the objective composed from the public pieces, head by
    /// head: `Head::logits`, `multi_head_loss` on `N x C` logits and `Head::backward`.
    fn reference_prior_part<F: NdFloat>(
        heads: &[Head<F>],
        views: &(Array2<F>, Array2<F>),
        weight: F,
        params: &LossParams,
    ) -> (F, Vec<ParamGrads<F>>) {
        let logits: Vec<Vec<Array2<F>>> = heads
            .iter()
            .map(|h| vec![h.logits(views.0.view()), h.logits(views.1.view())])
            .collect();
        let per_head: Vec<Vec<ArrayView2<F>>> =
            logits.iter().map(|l| l.iter().map(|x| x.view()).collect()).collect();
        let (loss, d_logits) = crate::loss::multi_head_loss(&per_head, params).expect("valid");
        let grads = heads
            .iter()
            .zip(&d_logits)
            .map(|(head, d)| {
                let (a, b) = (
                    head.backward(views.0.view(), d[0].view()),
                    head.backward(views.1.view(), d[1].view()),
                );
                ParamGrads { v: (&a.v + &b.v) * weight, g: (&a.g + &b.g) * weight }
            })
            .collect();
        (loss * weight, grads)
    }

    /// Checks the buffered objective against [`reference_prior_part`] on stream and anchor
    /// batches of several sizes, one work buffer per thread count reused throughout; `tol`
    /// is relative to the largest gradient entry.
    fn check_buffered_objective<F: NdFloat>(heads: &[Head<F>], batches: &[Batch<F>], tol: f64) {
        let weights = ObjectiveWeights {
            anchor_weight: 0.6,
            pull: 0.0,
            distill: 0.0,
            loss: LossParams::default(),
        };
        // One thread, and the heads split over two; one work buffer per thread count,
        // reused over every batch.
        for threads in [1, 2] {
            let mut work = ObjectiveWork { threads, ..ObjectiveWork::default() };
            check_batches(&mut work, heads, batches, &weights, tol);
        }
    }

    fn check_batches<F: NdFloat>(
        work: &mut ObjectiveWork<F>,
        heads: &[Head<F>],
        batches: &[Batch<F>],
        weights: &ObjectiveWeights,
        tol: f64,
    ) {
        let real = |x: F| x.to_f64().unwrap_or(f64::NAN);
        for batch in batches {
            let (parts, grads) = objective_with(work, heads, heads, batch, weights).expect("ok");
            let (stream, mut want) =
                reference_prior_part(heads, &batch.stream, F::one(), &weights.loss);
            let mut want_loss = real(stream);
            if let Some(anchors) = &batch.anchors {
                let w = F::from(weights.anchor_weight).expect("weight");
                let (anchor, extra) = reference_prior_part(heads, anchors, w, &weights.loss);
                want_loss += real(anchor);
                for (a, b) in want.iter_mut().zip(&extra) {
                    a.v += &b.v;
                    a.g += &b.g;
                }
            }
            assert!(
                (parts.total() - want_loss).abs() < tol * (1.0 + want_loss.abs()),
                "loss {} vs {want_loss}",
                parts.total()
            );
            for (got, want) in grads.iter().zip(&want) {
                let pairs = got.v.iter().zip(&want.v).chain(got.g.iter().zip(&want.g));
                let scale = want.v.iter().chain(&want.g).fold(0.0f64, |m, x| m.max(real(*x).abs()));
                for (&a, &b) in pairs {
                    assert!(
                        (real(a) - real(b)).abs() <= tol * scale,
                        "gradient {} vs {}",
                        real(a),
                        real(b)
                    );
                }
            }
        }
    }

    fn batches_of(rng: &mut StdRng, dim: usize, sizes: &[(usize, bool)]) -> Vec<Batch<f64>> {
        sizes
            .iter()
            .map(|&(n, identical)| {
                let mut view = || {
                    if identical {
                        let row = random_unit_rows(rng, 1, dim);
                        row.broadcast((n, dim)).expect("broadcast").to_owned()
                    } else {
                        random_unit_rows(rng, n, dim)
                    }
                };
                let stream = (view(), view());
                let anchors = (n % 2 == 0).then(|| (view(), view()));
                Batch { stream, anchors }
            })
            .collect()
    }

    #[test]
    fn buffered_objective_matches_the_per_head_composition() {
        let mut rng = StdRng::seed_from_u64(31);
        let dim = 12;
        let heads: Vec<Head<f64>> =
            [3, 5, 10, 20].iter().map(|&c| random_head(&mut rng, c, dim)).collect();
        // Batch sizes that change from call to call, with batches of identical rows.
        let sizes = [(80, false), (96, false), (80, true), (120, false), (81, true)];
        let batches = batches_of(&mut rng, dim, &sizes);
        check_buffered_objective(&heads, &batches, 1e-12);

        let heads32: Vec<Head<f32>> = heads
            .iter()
            .map(|h| Head::new(h.v.mapv(|x| x as f32), h.g.mapv(|x| x as f32)).expect("head"))
            .collect();
        let to32 = |x: &Array2<f64>| x.mapv(|v| v as f32);
        let batches32: Vec<Batch<f32>> = batches
            .iter()
            .map(|b| Batch {
                stream: (to32(&b.stream.0), to32(&b.stream.1)),
                anchors: b.anchors.as_ref().map(|(a, c)| (to32(a), to32(c))),
            })
            .collect();
        check_buffered_objective(&heads32, &batches32, 1e-4);
    }

    /// Two threads take the same steps as one, to rounding.
    #[test]
    fn two_threads_adapt_like_one() {
        let mut rng = StdRng::seed_from_u64(32);
        let dim = 16;
        let heads: Vec<Head<f32>> = [10, 20, 40, 80]
            .iter()
            .map(|&c| {
                let h = random_head(&mut rng, c, dim);
                Head::new(h.v.mapv(|x| x as f32), h.g.mapv(|x| x as f32)).expect("head")
            })
            .collect();
        let batches: Vec<Batch<f32>> = batches_of(&mut rng, dim, &[(320, false); 5])
            .iter()
            .map(|b| Batch {
                stream: (b.stream.0.mapv(|v| v as f32), b.stream.1.mapv(|v| v as f32)),
                anchors: None,
            })
            .collect();
        let params = AdaptParams { batch_size: 320, anchor_batch: 0, ..AdaptParams::default() };
        let mut one = Adapter::new(heads.clone(), params).expect("adapter");
        let mut two = Adapter::new(heads, params).expect("adapter");
        two.set_threads(2);
        for batch in &batches {
            let (a, b) = (one.step_on(batch).expect("step"), two.step_on(batch).expect("step"));
            assert!((a.loss - b.loss).abs() < 1e-5 * a.loss.abs(), "loss {} vs {}", a.loss, b.loss);
        }
        for (a, b) in one.heads().iter().zip(two.heads()) {
            let diff = (&a.weights() - &b.weights()).iter().fold(0f32, |m, d| m.max(d.abs()));
            assert!(diff < 1e-5, "heads differ by {diff}");
        }
    }
}
