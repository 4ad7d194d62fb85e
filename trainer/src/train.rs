//! The training loop: views from the prefetcher, embeddings and logits in candle, the
//! runtime's uniform-prior loss and its exact gradient, candle's backward pass, an
//! optimiser step; a checkpoint and one JSON line per epoch.
//!
//! The runtime computes the loss and `dL/dlogits` on the host. Backpropagating the
//! surrogate `sum(logits * g)`, with `g` that gradient held constant, gives every parameter
//! exactly `dL/dparameter`, so trainer and device share one implementation of the loss.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, D};
use ndarray::{Array2, ArrayView2};
use selfclass_runtime::loss::{multi_head_loss, LossParams};
use serde::{Deserialize, Serialize};

use crate::augment::{AugmentConfig, Batch, Prefetcher};
use crate::data::Dataset;
use crate::error::Context;
use crate::eval;
use crate::model::{Mode, Model, ModelConfig};
use crate::optim::{Optimizer, OptimizerKind, Schedule};
use crate::{Error, Result};

/// File names inside a run's output directory.
pub const CHECKPOINT_TENSORS: &str = "checkpoint.safetensors";
/// The checkpoint's settings and counters.
pub const CHECKPOINT_STATE: &str = "checkpoint.json";

/// Every setting of a training run. Saved in each checkpoint, so a resumed run continues
/// with exactly the settings it started with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The network.
    pub model: ModelConfig,
    /// How views are drawn.
    pub augment: AugmentConfig,
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step (each gives two global views and the local crops).
    pub batch_size: usize,
    /// Update rule.
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Weight decay (decoupled for AdamW, added to the gradient for SGD).
    pub weight_decay: f64,
    /// Epochs of linear warm-up (fractions allowed).
    pub warmup_epochs: f64,
    /// Final learning rate as a fraction of the peak.
    pub final_lr_fraction: f64,
    /// Temperatures of the loss.
    pub row_temperature: f64,
    /// Column (batch) temperature of the loss.
    pub col_temperature: f64,
    /// Size of the queue of past embeddings for the nearest-neighbour positive; 0 disables.
    pub nn_queue: usize,
    /// Seed of initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Training images embedded as the k-NN memory bank at each evaluation (0 disables).
    pub knn_bank: usize,
    /// Neighbours voting in the k-NN accuracy.
    pub knn_k: usize,
}

impl TrainConfig {
    /// Checks the settings against each other and against the data, before training.
    pub fn validate(&self, data: &Dataset) -> Result<()> {
        self.model.validate()?;
        self.augment.validate(self.model.in_channels)?;
        let largest = self.model.heads.iter().copied().max().unwrap_or(0);
        if self.batch_size < 4 * largest {
            return Err(Error::config(format!(
                "batch {} is smaller than 4 x the largest head ({largest}): the uniform prior needs \
                 several samples per class in every batch; raise --batch or shrink --heads",
                self.batch_size
            )));
        }
        if data.len() < self.batch_size {
            return Err(Error::config(format!(
                "batch {} is larger than the {} training images",
                self.batch_size,
                data.len()
            )));
        }
        if data.channels != self.model.in_channels {
            return Err(Error::config(format!(
                "the data has {} channels, the model expects {}",
                data.channels, self.model.in_channels
            )));
        }
        if data.height.min(data.width) < 8 {
            return Err(Error::config("images must be at least 8 pixels on each side"));
        }
        if self.epochs == 0 || self.lr.is_nan() || self.lr <= 0.0 || self.weight_decay < 0.0 {
            return Err(Error::config(
                "epochs and learning rate must be positive, weight decay not negative",
            ));
        }
        if self.nn_queue > 0 && self.nn_queue < self.batch_size {
            return Err(Error::config("the nearest-neighbour queue must hold at least one batch"));
        }
        LossParams {
            row_temperature: self.row_temperature,
            col_temperature: self.col_temperature,
            global_views: 2,
        }
        .validate()
        .ctx("loss settings")?;
        Ok(())
    }

    fn loss_params(&self) -> LossParams {
        LossParams {
            row_temperature: self.row_temperature,
            col_temperature: self.col_temperature,
            global_views: 2,
        }
    }
}

/// What one epoch did; printed as one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean loss over the epoch's steps.
    pub loss: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
    /// Distinct clusters each head assigned to the second views during the epoch.
    pub clusters_used: Vec<usize>,
    /// Training throughput (images, not views, per second).
    pub images_per_s: f64,
    /// Seconds spent training this epoch (evaluation excluded).
    pub train_s: f64,
    /// Weighted k-NN accuracy of the test embeddings against a bank of training ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_acc: Option<f64>,
    /// Scores of the reported head on the test split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test: Option<eval::HeadScores>,
}

/// Counters and history saved beside the tensors of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Settings of the run.
    pub config: TrainConfig,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Optimiser steps taken.
    pub step: usize,
    /// Embeddings held in the nearest-neighbour queue.
    pub queue_filled: usize,
    /// Next slot the queue overwrites.
    pub queue_next: usize,
    /// Per-image normalisation measured on the training set.
    pub mean: Vec<f32>,
    /// Per-image normalisation measured on the training set.
    pub std: Vec<f32>,
    /// Records of the epochs so far.
    pub history: Vec<EpochRecord>,
    /// Seconds spent in all sessions so far.
    pub elapsed_s: f64,
    /// Channels, height and width of the training images.
    pub input_chw: (usize, usize, usize),
    /// Where the training images came from.
    pub dataset: String,
    /// Number of training images.
    pub train_images: usize,
    /// The command line that started the run.
    pub command_line: String,
    /// The head refit done after the last epoch, once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refit: Option<crate::refit::RefitRecord>,
}

/// A ring of past embeddings for the nearest-neighbour positive.
pub struct NnQueue {
    values: Vec<f32>,
    dim: usize,
    capacity: usize,
    filled: usize,
    next: usize,
}

impl NnQueue {
    /// An empty queue of `capacity` embeddings of `dim` values (capacity 0: disabled).
    pub fn new(capacity: usize, dim: usize) -> Self {
        NnQueue { values: vec![0.0; capacity * dim], dim, capacity, filled: 0, next: 0 }
    }

    fn is_full(&self) -> bool {
        self.capacity > 0 && self.filled == self.capacity
    }

    fn push(&mut self, rows: &[f32]) {
        for row in rows.chunks(self.dim) {
            self.values[self.next * self.dim..(self.next + 1) * self.dim].copy_from_slice(row);
            self.next = (self.next + 1) % self.capacity;
            self.filled = (self.filled + 1).min(self.capacity);
        }
    }

    /// The most similar queued embedding to each row of `z` (constants: no gradient).
    fn nearest(&self, z: &Tensor) -> Result<Tensor> {
        let op = "nearest-neighbour positive";
        let bank =
            Tensor::from_slice(&self.values, (self.capacity, self.dim), z.device()).ctx(op)?;
        let index =
            z.detach().matmul(&bank.t().ctx(op)?).and_then(|s| s.argmax(D::Minus1)).ctx(op)?;
        bank.index_select(&index, 0).ctx(op)
    }
}

/// Mean and standard deviation of each channel over (a sample of) the training images.
pub fn channel_stats(data: &Dataset) -> (Vec<f32>, Vec<f32>) {
    let plane = data.height * data.width;
    let sample = data.len().min(10_000);
    let mut mean = Vec::new();
    let mut std = Vec::new();
    for c in 0..data.channels {
        let (mut sum, mut squares, mut count) = (0f64, 0f64, 0f64);
        for i in 0..sample {
            for &p in &data.image(i)[c * plane..(c + 1) * plane] {
                let v = p as f64 / 255.0;
                sum += v;
                squares += v * v;
                count += 1.0;
            }
        }
        let m = sum / count;
        mean.push(m as f32);
        std.push(((squares / count - m * m).max(1e-6)).sqrt() as f32);
    }
    (mean, std)
}

/// Everything a run needs besides its settings.
pub struct RunInputs {
    /// Training images (labels ignored for training).
    pub train: Arc<Dataset>,
    /// Held-out images for the per-epoch report, when labelled.
    pub test: Option<Dataset>,
    /// Directory for checkpoints and the final bundle.
    pub out_dir: PathBuf,
    /// Continue from the checkpoint in `out_dir`.
    pub resume: bool,
    /// Stop after this many epochs in this session (for tests of `--resume`).
    pub stop_after: Option<usize>,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// The command line, recorded in checkpoints and bundles.
    pub command_line: String,
}

/// The outcome of a run: the trained model and its checkpoint state.
pub struct RunOutput {
    /// The network after the last epoch.
    pub model: Model,
    /// Settings, counters and history.
    pub state: CheckpointState,
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming", path, e))
}

/// Saves a checkpoint (tensors, then the JSON that makes it valid).
fn save_checkpoint(
    out_dir: &Path,
    model: &mut Model,
    optimizer: &Optimizer,
    queue: &NnQueue,
    state: &CheckpointState,
) -> Result<()> {
    let mut tensors = model.state()?;
    tensors.extend(optimizer.state());
    if queue.capacity > 0 {
        let q = Tensor::from_slice(&queue.values, (queue.capacity, queue.dim), &Device::Cpu)
            .ctx("checkpoint")?;
        tensors.insert("queue".into(), q);
    }
    write_checkpoint(out_dir, tensors, state)
}

/// Writes tensors, then the JSON state that makes them a valid checkpoint.
fn write_checkpoint(
    dir: &Path,
    tensors: BTreeMap<String, Tensor>,
    state: &CheckpointState,
) -> Result<()> {
    let tensor_path = dir.join(CHECKPOINT_TENSORS);
    let tmp = dir.join("checkpoint.safetensors.tmp");
    let on_cpu: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| v.to_device(&Device::Cpu).map(|v| (k, v)))
        .collect::<candle_core::Result<_>>()
        .ctx("checkpoint")?;
    candle_core::safetensors::save(&on_cpu, &tmp).ctx("writing checkpoint")?;
    std::fs::rename(&tmp, &tensor_path).map_err(|e| Error::io("renaming", &tensor_path, e))?;
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::config(format!("checkpoint state: {e}")))?;
    write_atomically(&dir.join(CHECKPOINT_STATE), &json)
}

/// Rewrites the checkpoint in `dir` with `model`'s current weights and `state`, keeping
/// the optimiser's moments and the queue it holds (used after the head refit).
pub fn update_checkpoint(dir: &Path, model: &mut Model, state: &CheckpointState) -> Result<()> {
    let mut tensors = read_checkpoint_tensors(dir, &Device::Cpu)?;
    tensors.extend(model.state()?);
    write_checkpoint(dir, tensors, state)
}

/// Reads a checkpoint's JSON state.
pub fn read_checkpoint_state(dir: &Path) -> Result<CheckpointState> {
    let path = dir.join(CHECKPOINT_STATE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::checkpoint(&path, format!("malformed: {e}")))
}

/// Loads a checkpoint's tensors.
pub fn read_checkpoint_tensors(dir: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let path = dir.join(CHECKPOINT_TENSORS);
    if !path.is_file() {
        return Err(Error::checkpoint(&path, "not found"));
    }
    let map = candle_core::safetensors::load(&path, device)
        .map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    Ok(map.into_iter().collect())
}

/// Loads the trained model of a checkpoint directory (or the directory holding it).
pub fn load_model(dir: &Path, device: &Device) -> Result<(Model, CheckpointState)> {
    let state = read_checkpoint_state(dir)?;
    let mut model = Model::new(state.config.model.clone(), state.config.seed, device)?;
    model.load_state(&read_checkpoint_tensors(dir, device)?, &dir.join(CHECKPOINT_TENSORS))?;
    Ok((model, state))
}

/// One optimisation step on a batch; returns the loss and head arg-maxes of the second view.
pub fn train_step(
    model: &mut Model,
    optimizer: &mut Optimizer,
    queue: &mut NnQueue,
    batch: &Batch,
    config: &TrainConfig,
    shape: (usize, usize, usize),
    lr: f64,
) -> Result<(f64, Vec<Vec<u32>>)> {
    let op = "training step";
    let (c, h, w) = shape;
    let b = batch.size;
    let device = model.device.clone();
    let globals = Tensor::from_slice(&batch.globals, (2 * b, c, h, w), &device).ctx(op)?;
    let z = model.embed(&globals, Mode::Train)?;
    let mut views = vec![z.narrow(0, 0, b).ctx(op)?, z.narrow(0, b, b).ctx(op)?];
    let locals = config.augment.local_crops;
    if locals > 0 {
        let s = config.augment.local_size;
        let x = Tensor::from_slice(&batch.locals, (locals * b, c, s, s), &device).ctx(op)?;
        let zl = model.embed(&x, Mode::Train)?;
        for i in 0..locals {
            views.push(zl.narrow(0, i * b, b).ctx(op)?);
        }
    }
    if queue.capacity > 0 {
        let first = views[0].detach();
        if queue.is_full() {
            views[0] = queue.nearest(&first)?;
        }
        queue.push(&first.flatten_all().and_then(|t| t.to_vec1::<f32>()).ctx(op)?);
    }

    let all = Tensor::cat(&views, 0).ctx(op)?;
    let logits = model.logits(&all)?;
    let n_views = views.len();
    let host: Vec<Array2<f64>> = logits
        .iter()
        .map(|l| {
            let (rows, cols) = l.dims2().ctx(op)?;
            let values = l.flatten_all().and_then(|t| t.to_vec1::<f32>()).ctx(op)?;
            Array2::from_shape_vec((rows, cols), values.into_iter().map(f64::from).collect())
                .map_err(|e| Error::config(format!("logits shape: {e}")))
        })
        .collect::<Result<_>>()?;
    let per_head: Vec<Vec<ArrayView2<f64>>> = host
        .iter()
        .map(|m| (0..n_views).map(|v| m.slice(ndarray::s![v * b..(v + 1) * b, ..])).collect())
        .collect();
    let (loss, grads) =
        multi_head_loss(&per_head, &config.loss_params()).ctx("uniform-prior loss")?;

    let mut surrogate: Option<Tensor> = None;
    let mut second_view_clusters = Vec::with_capacity(logits.len());
    for ((l, head_grads), m) in logits.iter().zip(&grads).zip(&host) {
        let cols = m.ncols();
        let mut flat = Vec::with_capacity(n_views * b * cols);
        for g in head_grads {
            flat.extend(g.iter().map(|&v| v as f32));
        }
        let g = Tensor::from_vec(flat, (n_views * b, cols), &device).ctx(op)?;
        let term = (l * g).and_then(|t| t.sum_all()).ctx(op)?;
        surrogate = Some(match surrogate {
            Some(s) => (s + term).ctx(op)?,
            None => term,
        });
        let second = m.slice(ndarray::s![b..2 * b, ..]);
        second_view_clusters.push(
            second.rows().into_iter().map(|r| selfclass_runtime::head::argmax(r) as u32).collect(),
        );
    }
    let surrogate = surrogate.ok_or_else(|| Error::config("no head"))?;
    let grad_store = surrogate.backward().ctx("backward pass")?;
    optimizer.apply(&grad_store, lr)?;
    Ok((loss, second_view_clusters))
}

/// The settings that differ between two configurations, as `name: saved -> given`.
fn differing_settings(saved: &TrainConfig, given: &TrainConfig) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                for (key, va) in x {
                    let vb = y.get(key).unwrap_or(&serde_json::Value::Null);
                    let name = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    walk(&name, va, vb, out);
                }
            }
            _ if a != b => out.push(format!("{path}: {a} -> {b}")),
            _ => {}
        }
    }
    let (Ok(a), Ok(b)) = (serde_json::to_value(saved), serde_json::to_value(given)) else {
        return vec!["settings that cannot be listed".into()];
    };
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out
}

/// Runs (or resumes) training; writes a checkpoint after every epoch and prints one JSON
/// line per epoch to stdout.
pub fn run(config: TrainConfig, inputs: RunInputs, device: &Device) -> Result<RunOutput> {
    let data = inputs.train.clone();
    config.validate(&data)?;
    std::fs::create_dir_all(&inputs.out_dir)
        .map_err(|e| Error::io("creating", &inputs.out_dir, e))?;

    let mut model = Model::new(config.model.clone(), config.seed, device)?;
    let mut optimizer = Optimizer::new(config.optimizer, config.weight_decay, model.params())?;
    let mut queue = NnQueue::new(config.nn_queue, config.model.dim);
    let (mean, std) = (config.augment.mean.clone(), config.augment.std.clone());
    let mut state = CheckpointState {
        config: config.clone(),
        epochs_done: 0,
        step: 0,
        queue_filled: 0,
        queue_next: 0,
        mean: mean.clone(),
        std: std.clone(),
        history: Vec::new(),
        elapsed_s: 0.0,
        input_chw: (data.channels, data.height, data.width),
        dataset: data.origin.display().to_string(),
        train_images: data.len(),
        command_line: inputs.command_line.clone(),
        refit: None,
    };

    if inputs.resume {
        let saved = read_checkpoint_state(&inputs.out_dir)?;
        if saved.config != config {
            let changed = differing_settings(&saved.config, &config).join(", ");
            return Err(Error::checkpoint(
                inputs.out_dir.join(CHECKPOINT_STATE),
                format!(
                    "was written with other settings ({changed}); resume with the same flags, or start a new output directory (the schedule depends on --epochs, so a run cannot be lengthened)"
                ),
            ));
        }
        let tensors = read_checkpoint_tensors(&inputs.out_dir, device)?;
        let origin = inputs.out_dir.join(CHECKPOINT_TENSORS);
        model.load_state(&tensors, &origin)?;
        optimizer.load_state(&tensors, saved.step, &origin)?;
        if queue.capacity > 0 {
            let q = tensors.get("queue").ok_or_else(|| Error::checkpoint(&origin, "no queue"))?;
            queue.values = q.flatten_all().and_then(|t| t.to_vec1::<f32>()).ctx("load queue")?;
            queue.filled = saved.queue_filled;
            queue.next = saved.queue_next;
        }
        tracing::info!(epochs_done = saved.epochs_done, "resuming from checkpoint");
        state = saved;
    }

    let steps_per_epoch = data.len() / config.batch_size;
    let schedule = Schedule {
        lr: config.lr,
        warmup_steps: ((config.warmup_epochs * steps_per_epoch as f64).round() as usize).max(1),
        total_steps: config.epochs * steps_per_epoch,
        final_fraction: config.final_lr_fraction,
    };
    let shape = (data.channels, data.height, data.width);
    let augment = Arc::new(config.augment.clone());
    let knn_bank = config.knn_bank.min(data.len());
    let bank_set =
        if knn_bank > 0 && data.labels.is_some() { Some(data.take(knn_bank)) } else { None };
    let mut epochs_this_session = 0;

    while state.epochs_done < config.epochs {
        if inputs.stop_after.is_some_and(|n| epochs_this_session >= n) {
            break;
        }
        let epoch = state.epochs_done;
        let started = Instant::now();
        let bar = if inputs.progress {
            let bar = indicatif::ProgressBar::new(steps_per_epoch as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(format!("{}/{}", epoch + 1, config.epochs));
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut prefetch = Prefetcher::start(
            data.clone(),
            augment.clone(),
            config.seed,
            epoch,
            config.batch_size,
            0,
            2,
        );
        let mut loss_sum = 0.0;
        let mut steps = 0usize;
        let mut used: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); config.model.heads.len()];
        let mut lr = schedule.lr_at(state.step);
        while let Some(batch) = prefetch.next_batch() {
            lr = schedule.lr_at(state.step);
            let (loss, clusters) =
                train_step(&mut model, &mut optimizer, &mut queue, &batch, &config, shape, lr)?;
            if !loss.is_finite() {
                return Err(Error::config(format!(
                    "the loss became {loss} at step {}: lower --lr",
                    state.step
                )));
            }
            for (set, c) in used.iter_mut().zip(clusters) {
                set.extend(c);
            }
            loss_sum += loss;
            steps += 1;
            state.step += 1;
            bar.inc(1);
            bar.set_message(format!("loss {:.4}", loss_sum / steps as f64));
        }
        bar.finish_and_clear();
        let train_s = started.elapsed().as_secs_f64();

        let mut record = EpochRecord {
            epoch: epoch + 1,
            loss: loss_sum / steps.max(1) as f64,
            lr,
            clusters_used: used.iter().map(BTreeSet::len).collect(),
            images_per_s: (steps * config.batch_size) as f64 / train_s.max(1e-9),
            train_s,
            knn_acc: None,
            test: None,
        };
        if let Some(test) = inputs.test.as_ref().filter(|t| t.labels.is_some()) {
            let labels = test.labels.as_deref().unwrap_or_default();
            let z = eval::embed_dataset(&mut model, test, &mean, &std)?;
            let (clusters, _) = eval::predict(&model, &z)?;
            let head = eval::default_head(&model, Some(labels));
            record.test = Some(eval::score_head(&model, &clusters, labels, head)?);
            if let Some(bank) = &bank_set {
                let zb = eval::embed_dataset(&mut model, bank, &mean, &std)?;
                let bank_labels = bank.labels.as_deref().unwrap_or_default();
                record.knn_acc =
                    Some(eval::knn_accuracy(&zb, bank_labels, &z, labels, config.knn_k)?);
            }
        }

        state.epochs_done += 1;
        state.queue_filled = queue.filled;
        state.queue_next = queue.next;
        state.elapsed_s += started.elapsed().as_secs_f64();
        state.history.push(record.clone());
        save_checkpoint(&inputs.out_dir, &mut model, &optimizer, &queue, &state)?;
        println!("{}", serde_json::to_string(&record).unwrap_or_default());
        tracing::info!(epoch = epoch + 1, loss = record.loss, "epoch done, checkpoint written");
        epochs_this_session += 1;
    }
    Ok(RunOutput { model, state })
}
