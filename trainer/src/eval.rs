//! Embedding whole data sets, clustering scores against labels, and the k-nearest-neighbour
//! accuracy of the embeddings.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::Context;
use crate::model::{Mode, Model};
use crate::{Error, Result};
use selfclass_runtime::discover::CONFIDENCE_TEMPERATURE;

/// Images embedded per forward pass during evaluation.
const EVAL_CHUNK: usize = 500;

/// Normalised float tensor of images `start..end` of `data`.
pub fn images_tensor(
    model: &Model,
    data: &Dataset,
    range: std::ops::Range<usize>,
    mean: &[f32],
    std: &[f32],
) -> Result<Tensor> {
    let len = data.image_len();
    let pixels = &data.pixels[range.start * len..range.end * len];
    let mut values = vec![0f32; pixels.len()];
    for (image, out) in pixels.chunks(len).zip(values.chunks_mut(len)) {
        crate::augment::normalise(image, data.channels, mean, std, out);
    }
    Tensor::from_vec(values, (range.len(), data.channels, data.height, data.width), &model.device)
        .ctx("input tensor")
}

/// Inference-mode embeddings of every image of `data` (`N x dim`).
pub fn embed_dataset(
    model: &mut Model,
    data: &Dataset,
    mean: &[f32],
    std: &[f32],
) -> Result<Tensor> {
    let mut parts = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let end = (start + EVAL_CHUNK).min(data.len());
        let x = images_tensor(model, data, start..end, mean, std)?;
        parts.push(model.embed(&x, Mode::Eval)?);
        start = end;
    }
    Tensor::cat(&parts, 0).ctx("embed data set")
}

/// Per head: the cluster of every row, and the confidence of each.
pub type HeadPredictions = (Vec<Vec<u32>>, Vec<Vec<f32>>);

/// Arg-max class of every head for embeddings `z`, and per head the confidence of that
/// choice: its softmax probability at [`CONFIDENCE_TEMPERATURE`], as the device reports it.
pub fn predict(model: &Model, z: &Tensor) -> Result<HeadPredictions> {
    let logits = model.logits(z)?;
    let clusters = logits
        .iter()
        .map(|l| l.argmax(D::Minus1).and_then(|a| a.to_vec1::<u32>()).ctx("predict"))
        .collect::<Result<Vec<_>>>()?;
    let confidence = logits
        .iter()
        .map(|l| {
            (l / CONFIDENCE_TEMPERATURE)
                .and_then(|l| candle_nn::ops::softmax_last_dim(&l))
                .and_then(|p| p.max(D::Minus1))
                .and_then(|p| p.to_vec1::<f32>())
                .ctx("confidence")
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((clusters, confidence))
}

/// Index of the head to report by default: the one with as many classes as the labels
/// have, else the first.
pub fn default_head(model: &Model, labels: Option<&[u32]>) -> usize {
    let classes =
        labels.map(|l| l.iter().copied().max().map_or(0, |m| m as usize + 1)).unwrap_or(0);
    model.config.heads.iter().position(|&k| k == classes).unwrap_or(0)
}

/// Scores of one head's clusters against labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadScores {
    /// Which head (index into the model's heads).
    pub head: usize,
    /// Classes of that head.
    pub head_classes: usize,
    /// Hungarian-matched accuracy.
    pub acc: f64,
    /// Normalised mutual information.
    pub nmi: f64,
    /// Adjusted mutual information.
    pub ami: f64,
    /// Adjusted Rand index.
    pub ari: f64,
    /// Images scored.
    pub n: usize,
    /// Distinct clusters predicted.
    pub clusters_used: usize,
}

/// Scores the clusters of head `head` against `labels`.
pub fn score_head(
    model: &Model,
    clusters: &[Vec<u32>],
    labels: &[u32],
    head: usize,
) -> Result<HeadScores> {
    let predicted = clusters.get(head).ok_or_else(|| {
        Error::config(format!("head {head} does not exist: the model has {} heads", clusters.len()))
    })?;
    let s = selfclass_runtime::metrics::score(labels, predicted).ctx("clustering scores")?;
    Ok(HeadScores {
        head,
        head_classes: model.config.heads[head],
        acc: s.acc,
        nmi: s.nmi,
        ami: s.ami,
        ari: s.ari,
        n: s.n,
        clusters_used: s.clusters_used,
    })
}

/// Weighted k-nearest-neighbour accuracy: each query takes the labels of its `k` most
/// similar bank embeddings, weighted by `exp(similarity / 0.07)`.
pub fn knn_accuracy(
    bank: &Tensor,
    bank_labels: &[u32],
    queries: &Tensor,
    query_labels: &[u32],
    k: usize,
) -> Result<f64> {
    let op = "knn accuracy";
    let classes = bank_labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let k = k.min(bank_labels.len()).max(1);
    let bank_t = bank.t().ctx(op)?;
    let mut correct = 0usize;
    let mut start = 0;
    let total = query_labels.len();
    while start < total {
        let end = (start + EVAL_CHUNK).min(total);
        let sims = queries
            .narrow(0, start, end - start)
            .and_then(|q| q.matmul(&bank_t))
            .and_then(|s| s.to_vec2::<f32>())
            .ctx(op)?;
        for (row, &label) in sims.iter().zip(&query_labels[start..end]) {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
            let mut votes = vec![0f64; classes.max(1)];
            for &i in &order[..k] {
                votes[bank_labels[i] as usize] += ((row[i] as f64) / 0.07).exp();
            }
            let best =
                votes.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(c, _)| c);
            correct += usize::from(best as u32 == label);
        }
        start = end;
    }
    Ok(correct as f64 / total.max(1) as f64)
}
