//! Head refit: the last stage of a run. With the backbone trained and frozen, every head is
//! fitted again from several random starts on embeddings of augmented views of the training
//! images, with the same uniform-prior loss, and the start that ends with the lowest loss is
//! kept (the head trained with the backbone is one of the candidates, so the loss never gets
//! worse). No label is used.
//!
//! Why: the loss is not convex in a head's weights, and a head trained jointly with the
//! backbone settles into one of several balanced partitions of the embedding space. On
//! Fashion-MNIST, heads fitted from different starts on the same frozen embeddings span
//! about 0.53 to 0.71 in ACC, and their final loss ranks them roughly: the lowest-loss
//! starts are among the most accurate (the model card has the figures). Each fit is cheap (a few seconds on a
//! laptop core) next to an epoch of training.

use candle_core::Tensor;
use ndarray::{Array1, Array2, Axis};
use rand::{seq::SliceRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use selfclass_runtime::adapt::{
    objective, AdaptParams, Adapter, Batch, GuardParams, ObjectiveWeights,
};
use selfclass_runtime::head::Head;
use selfclass_runtime::loss::LossParams;
use serde::{Deserialize, Serialize};

use crate::augment::{draw_view, mix_seed};
use crate::data::Dataset;
use crate::error::Context;
use crate::model::{Mode, Model};
use crate::optim::Schedule;
use crate::train::CheckpointState;
use crate::{Error, Result};

/// Images embedded per forward pass while drawing the refit's views.
const EMBED_CHUNK: usize = 500;
/// Seed stream of the refit, apart from those of training.
const REFIT_STREAM: u64 = 0x5e_f17;

/// How the heads are refitted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RefitConfig {
    /// Random starts per head (0: no refit).
    pub restarts: usize,
    /// Passes over the training images per start.
    pub epochs: usize,
    /// Augmented views embedded per training image; each step pairs two of them.
    pub views: usize,
    /// Peak Adam step size (cosine decay to 0).
    pub lr: f64,
}

impl Default for RefitConfig {
    fn default() -> Self {
        RefitConfig { restarts: 16, epochs: 10, views: 4, lr: 1e-2 }
    }
}

impl RefitConfig {
    /// Checks the settings before any work.
    pub fn validate(&self) -> Result<()> {
        if self.restarts > MAX_RESTARTS {
            return Err(Error::config(format!(
                "--refit-restarts {} is more than {MAX_RESTARTS}",
                self.restarts
            )));
        }
        if self.restarts == 0 {
            return Ok(());
        }
        if self.epochs == 0 {
            return Err(Error::config("--refit-epochs must be at least 1"));
        }
        if !(2..=MAX_VIEWS).contains(&self.views) {
            return Err(Error::config(format!(
                "--refit-views {} is outside 2 to {MAX_VIEWS} (each step pairs two views)",
                self.views
            )));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::config(format!("--refit-lr must be positive, got {}", self.lr)));
        }
        Ok(())
    }
}

/// Most random starts per head.
pub const MAX_RESTARTS: usize = 1000;
/// Most views per image (their embeddings are held in memory: views x images x dim floats).
pub const MAX_VIEWS: usize = 32;

/// What the refit did to one head; printed as part of one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadRefit {
    /// Classes of the head.
    pub classes: usize,
    /// Final loss of every candidate: first the run's current head (as trained with the
    /// backbone, or as an earlier refit left it), then the random starts in order.
    pub losses: Vec<f64>,
    /// Index into `losses` of the candidate kept.
    pub chosen: usize,
    /// When a labelled held-out set was given: every candidate's ACC and NMI on it, in
    /// the order of `losses`. Reported only; the choice never looks at labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<CandidateScores>,
}

/// Held-out scores of the candidates of one head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateScores {
    pub acc: Vec<f64>,
    pub nmi: Vec<f64>,
}

/// Embeddings of a labelled held-out set, for reporting.
pub struct HeldOut {
    /// `N x dim`, as the model embeds them in inference mode.
    pub z: Array2<f32>,
    pub labels: Vec<u32>,
}

impl HeldOut {
    /// ACC and NMI of `head`'s arg-max clusters.
    fn score(&self, head: &Head<f32>) -> Result<(f64, f64)> {
        let clusters: Vec<u32> =
            head.predict(self.z.view()).into_iter().map(|c| c as u32).collect();
        let s = selfclass_runtime::metrics::score(&self.labels, &clusters).ctx("refit scores")?;
        Ok((s.acc, s.nmi))
    }
}

/// The record of a refit, saved in the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefitRecord {
    /// The settings used.
    pub config: RefitConfig,
    /// One entry per head.
    pub heads: Vec<HeadRefit>,
    /// Seconds taken, embedding included.
    pub seconds: f64,
    /// The command that ran the refit (empty when unknown).
    #[serde(default)]
    pub command_line: String,
}

/// Everything a fit needs besides the starting head.
struct FitData<'a> {
    /// `views[v]` holds view `v` of every training image, `N x dim`.
    views: &'a [Array2<f32>],
    batch_size: usize,
    weights: ObjectiveWeights,
}

/// Refits every head of `model` on `data` (the training images) and keeps, per head, the
/// candidate with the lowest loss. `state` gives the run's settings and normalisation;
/// `held_out`, when given, is scored for the report.
pub fn refit_heads(
    model: &mut Model,
    state: &CheckpointState,
    data: &Dataset,
    refit: &RefitConfig,
    held_out: Option<&HeldOut>,
    progress: bool,
) -> Result<RefitRecord> {
    refit.validate()?;
    let started = std::time::Instant::now();
    let config = &state.config;
    if data.len() < config.batch_size {
        return Err(Error::config(format!(
            "the head refit needs at least one batch ({}) of training images, got {}",
            config.batch_size,
            data.len()
        )));
    }
    let views = embed_views(model, state, data, refit.views, progress)?;
    let fit = FitData {
        views: &views,
        batch_size: config.batch_size,
        weights: ObjectiveWeights {
            anchor_weight: 0.0,
            pull: 0.0,
            distill: 0.0,
            loss: LossParams {
                row_temperature: config.row_temperature,
                col_temperature: config.col_temperature,
                global_views: 2,
            },
        },
    };
    let bar = bar(progress, (model.heads.len() * (refit.restarts + 1)) as u64, "refit heads");
    let mut record = RefitRecord {
        config: *refit,
        heads: Vec::new(),
        seconds: 0.0,
        command_line: String::new(),
    };
    for index in 0..model.heads.len() {
        let trained = head_of(model, index)?;
        let classes = trained.classes();
        // Candidate 0 is the run's current head (as trained, or an earlier refit's), scored
        // as it is; the others start at random.
        let candidates: Vec<(Head<f32>, f64)> = (0..=refit.restarts)
            .into_par_iter()
            .map(|start| {
                let head = if start == 0 {
                    trained.clone()
                } else {
                    let seed = mix_seed(&[config.seed, REFIT_STREAM, index as u64, start as u64]);
                    fit_head(random_head(classes, trained.dim(), seed)?, &fit, refit, seed)?
                };
                let loss = score(&head, &fit)?;
                bar.inc(1);
                Ok((head, loss))
            })
            .collect::<Result<_>>()?;
        let losses: Vec<f64> = candidates.iter().map(|(_, l)| *l).collect();
        let chosen = lowest(&losses);
        tracing::info!(head = index, classes, chosen, loss = losses[chosen], "head refitted");
        set_head(model, index, &candidates[chosen].0)?;
        let held_out = match held_out {
            Some(set) => {
                let scores =
                    candidates.iter().map(|(h, _)| set.score(h)).collect::<Result<Vec<_>>>()?;
                Some(CandidateScores {
                    acc: scores.iter().map(|s| s.0).collect(),
                    nmi: scores.iter().map(|s| s.1).collect(),
                })
            }
            None => None,
        };
        record.heads.push(HeadRefit { classes, losses, chosen, held_out });
    }
    bar.finish_and_clear();
    record.seconds = started.elapsed().as_secs_f64();
    Ok(record)
}

/// Index of the smallest finite value (the first on ties; 0 if none is finite).
fn lowest(values: &[f64]) -> usize {
    values
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

fn bar(progress: bool, len: u64, what: &'static str) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(what);
    bar
}

/// Embeds `views` global views of every training image (the run's augmentations, seeded by
/// the run's seed), with the network in inference mode.
fn embed_views(
    model: &mut Model,
    state: &CheckpointState,
    data: &Dataset,
    views: usize,
    progress: bool,
) -> Result<Vec<Array2<f32>>> {
    let config = &state.config;
    let mut augment = config.augment.clone();
    augment.mean = state.mean.clone();
    augment.std = state.std.clone();
    let shape = (data.channels, data.height, data.width);
    let image_len = data.image_len();
    let chunks = data.len().div_ceil(EMBED_CHUNK);
    let bar = bar(progress, (views * chunks) as u64, "embed views");
    let mut out = Vec::with_capacity(views);
    for view in 0..views {
        let mut rows = Vec::with_capacity(data.len() * config.model.dim);
        for chunk in 0..chunks {
            let range = chunk * EMBED_CHUNK..((chunk + 1) * EMBED_CHUNK).min(data.len());
            let mut pixels = vec![0f32; range.len() * image_len];
            pixels.par_chunks_mut(image_len).zip(range.clone()).for_each(|(out, i)| {
                let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[
                    config.seed,
                    REFIT_STREAM,
                    i as u64,
                    view as u64,
                ]));
                draw_view(
                    data.image(i),
                    shape,
                    data.height,
                    augment.global_scale,
                    &augment,
                    &mut rng,
                    out,
                );
            });
            let x = Tensor::from_vec(
                pixels,
                (range.len(), data.channels, data.height, data.width),
                &model.device,
            )
            .ctx("refit views")?;
            let z = model.embed(&x, Mode::Eval)?;
            rows.extend(z.flatten_all().and_then(|z| z.to_vec1::<f32>()).ctx("refit views")?);
            bar.inc(1);
        }
        out.push(
            Array2::from_shape_vec((data.len(), config.model.dim), rows)
                .map_err(|e| Error::config(format!("refit views: {e}")))?,
        );
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Head `index` of `model` as the device library's head.
fn head_of(model: &Model, index: usize) -> Result<Head<f32>> {
    let head = &model.heads[index];
    let v = head.v.as_tensor().to_vec2::<f32>().ctx("read head")?;
    let g = head.g.as_tensor().to_vec1::<f32>().ctx("read head")?;
    let (classes, dim) = (v.len(), v.first().map_or(0, Vec::len));
    let v = Array2::from_shape_vec((classes, dim), v.concat())
        .map_err(|e| Error::config(format!("read head: {e}")))?;
    Head::new(v, Array1::from(g)).ctx("read head")
}

/// Writes `head` into head `index` of `model`.
fn set_head(model: &mut Model, index: usize, head: &Head<f32>) -> Result<()> {
    let target = &model.heads[index];
    let device = target.v.device().clone();
    let v = Tensor::from_slice(
        head.v.as_standard_layout().as_slice().unwrap_or(&[]),
        head.v.dim(),
        &device,
    )
    .ctx("write head")?;
    let g = Tensor::from_slice(head.g.as_slice().unwrap_or(&[]), head.g.len(), &device)
        .ctx("write head")?;
    target.v.set(&v).ctx("write head")?;
    target.g.set(&g).ctx("write head")
}

/// A head initialised as the trainer initialises one: directions uniform in
/// `±1/sqrt(dim)`, scales equal to their norms.
fn random_head(classes: usize, dim: usize, seed: u64) -> Result<Head<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let bound = 1.0 / (dim as f32).sqrt();
    let v = Array2::from_shape_fn((classes, dim), |_| rng.gen_range(-bound..bound));
    let g = v.map_axis(Axis(1), |row| row.dot(&row).sqrt());
    Head::new(v, g).ctx("refit start")
}

/// Two random distinct views of the rows `rows`.
fn pair(fit: &FitData, rows: &[usize], rng: &mut ChaCha8Rng) -> Batch<f32> {
    let a = rng.gen_range(0..fit.views.len());
    let b = (a + rng.gen_range(1..fit.views.len())) % fit.views.len();
    Batch {
        stream: (fit.views[a].select(Axis(0), rows), fit.views[b].select(Axis(0), rows)),
        anchors: None,
    }
}

/// Adam with cosine decay from `refit.lr` on the uniform-prior loss of random view pairs,
/// stepped by the device library's own adapter (no anchors, no pull, no guard).
fn fit_head(head: Head<f32>, fit: &FitData, refit: &RefitConfig, seed: u64) -> Result<Head<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9);
    let n = fit.views[0].nrows();
    let steps_per_epoch = n / fit.batch_size;
    let schedule = Schedule {
        lr: refit.lr,
        warmup_steps: 1,
        total_steps: refit.epochs * steps_per_epoch,
        final_fraction: 0.0,
    };
    let params = AdaptParams {
        learning_rate: refit.lr,
        batch_size: fit.batch_size,
        anchor_batch: 0,
        anchor_weight: 0.0,
        pull: 0.0,
        distill: 0.0,
        loss: fit.weights.loss,
        guard: GuardParams { check_every: 0, ..GuardParams::default() },
        ..AdaptParams::default()
    };
    let mut adapter = Adapter::new(vec![head], params).ctx("refit start")?;
    let mut order: Vec<usize> = (0..n).collect();
    for epoch in 0..refit.epochs {
        order.shuffle(&mut rng);
        for (step, rows) in order.chunks_exact(fit.batch_size).enumerate() {
            adapter.set_learning_rate(schedule.lr_at(epoch * steps_per_epoch + step));
            adapter.step_on(&pair(fit, rows, &mut rng)).map_err(|e| {
                Error::config(format!("a refit start diverged ({e}); lower --refit-lr"))
            })?;
        }
    }
    Ok(adapter.heads()[0].clone())
}

/// Mean loss of `head` over the training images in order, views 0 and 1, one batch at a time.
fn score(head: &Head<f32>, fit: &FitData) -> Result<f64> {
    let n = fit.views[0].nrows();
    let one = std::slice::from_ref(head);
    let mut total = 0.0;
    let mut batches = 0;
    for start in (0..n.saturating_sub(fit.batch_size - 1)).step_by(fit.batch_size) {
        let rows = start..start + fit.batch_size;
        let batch = Batch {
            stream: (
                fit.views[0].slice(ndarray::s![rows.clone(), ..]).to_owned(),
                fit.views[1].slice(ndarray::s![rows, ..]).to_owned(),
            ),
            anchors: None,
        };
        let (parts, _) = objective(one, one, &batch, &fit.weights).ctx("refit score")?;
        total += parts.stream;
        batches += 1;
    }
    Ok(total / batches.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Well-separated clusters on the unit sphere, four noisy views of each point.
    fn clustered_views(clusters: usize, per: usize, dim: usize, seed: u64) -> Vec<Array2<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centres = Array2::from_shape_fn((clusters, dim), |_| rng.gen_range(-1.0f32..1.0));
        let labels: Vec<usize> = (0..clusters * per).map(|i| i % clusters).collect();
        (0..4)
            .map(|_| {
                let mut z = Array2::from_shape_fn((labels.len(), dim), |(i, d)| {
                    centres[[labels[i], d]] + rng.gen_range(-0.3f32..0.3)
                });
                selfclass_runtime::head::l2_normalize_rows(&mut z);
                z
            })
            .collect()
    }

    fn fit_data(views: &[Array2<f32>], batch_size: usize) -> FitData<'_> {
        FitData {
            views,
            batch_size,
            weights: ObjectiveWeights {
                anchor_weight: 0.0,
                pull: 0.0,
                distill: 0.0,
                loss: LossParams::default(),
            },
        }
    }

    #[test]
    fn fitting_lowers_the_loss_of_a_random_start() {
        let views = clustered_views(4, 64, 16, 1);
        let fit = fit_data(&views, 64);
        let refit = RefitConfig { restarts: 1, epochs: 5, views: 4, lr: 1e-2 };
        let start = random_head(4, 16, 7).unwrap();
        let before = score(&start, &fit).unwrap();
        let after = score(&fit_head(start, &fit, &refit, 7).unwrap(), &fit).unwrap();
        assert!(after < before - 0.1, "loss {before} -> {after}");
    }

    #[test]
    fn fits_are_reproducible() {
        let views = clustered_views(3, 40, 8, 2);
        let fit = fit_data(&views, 40);
        let refit = RefitConfig { restarts: 1, epochs: 2, views: 4, lr: 1e-2 };
        let a = fit_head(random_head(3, 8, 5).unwrap(), &fit, &refit, 5).unwrap();
        let b = fit_head(random_head(3, 8, 5).unwrap(), &fit, &refit, 5).unwrap();
        assert_eq!(a.v, b.v);
        assert_eq!(a.g, b.g);
    }

    #[test]
    fn the_lowest_finite_loss_is_chosen() {
        assert_eq!(lowest(&[0.5, 0.2, f64::NAN, 0.3]), 1);
        assert_eq!(lowest(&[f64::NAN, f64::INFINITY, 0.9]), 2);
        assert_eq!(lowest(&[f64::NAN]), 0);
    }

    #[test]
    fn settings_are_checked() {
        assert!(RefitConfig { views: 1, ..RefitConfig::default() }.validate().is_err());
        assert!(RefitConfig { epochs: 0, ..RefitConfig::default() }.validate().is_err());
        assert!(RefitConfig { lr: -1.0, ..RefitConfig::default() }.validate().is_err());
        assert!(RefitConfig { restarts: 0, epochs: 0, ..RefitConfig::default() }
            .validate()
            .is_ok());
    }
}
