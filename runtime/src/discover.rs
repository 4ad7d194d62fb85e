//! Offline cluster discovery: which clusters are in a set of embeddings, how big, how sure.
//!
//! Every head is run on every embedding. A head's cluster is *supported* when it holds at
//! least `k = max(min_cluster_size, ceil(n / (2 * C_min)))` items, where `C_min` is the
//! smallest head's number of classes: half the share each cluster would get if the data
//! were spread evenly over the coarsest head's classes. The chosen head is the one with the
//! most supported clusters (ties go to the head with fewer classes), and the number of
//! clusters discovered is its count of supported clusters.
//!
//! The threshold scales with `n`, so a fine head that splits the data into many small
//! clusters does not win by numbers alone; a fine head wins only where the data really
//! holds more large groups than the coarse head can separate.
//!
//! ```
//! use ndarray::array;
//! use selfclass_runtime::discover::{discover, DiscoverParams};
//! use selfclass_runtime::head::Head;
//!
//! let head = Head::from_weights(array![[10.0f32, 0.0], [0.0, 10.0]]).unwrap();
//! let z = array![[1.0f32, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 0.8]];
//! let found = discover(&[head], z.view(), &DiscoverParams { min_cluster_size: 1, ..Default::default() }).unwrap();
//! assert_eq!(found.clusters_found, 2);
//! assert_eq!(found.heads[0].clusters[0].size, 2);
//! ```

use ndarray::{ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use crate::head::{argmax, Head};
use crate::{Error, Result};

/// Settings of [`discover`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DiscoverParams {
    /// Temperature of the softmax whose largest value is a prediction's confidence
    /// (the method's prediction temperature, 0.1).
    pub row_temperature: f64,
    /// Smallest size of a supported cluster, whatever the data's size.
    pub min_cluster_size: usize,
    /// Most confident items listed per cluster.
    pub exemplars: usize,
}

impl Default for DiscoverParams {
    fn default() -> Self {
        DiscoverParams { row_temperature: 0.1, min_cluster_size: 5, exemplars: 16 }
    }
}

/// One cluster of one head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterSummary {
    pub id: u32,
    pub size: usize,
    pub supported: bool,
    /// Mean confidence of the items predicted into this cluster.
    pub mean_confidence: f64,
    /// Indices of the most confident items, most confident first.
    pub exemplars: Vec<usize>,
}

/// What one head makes of the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadSummary {
    pub head: usize,
    pub classes: usize,
    pub clusters_used: usize,
    pub supported: usize,
    pub mean_confidence: f64,
    /// Non-empty clusters, largest first.
    pub clusters: Vec<ClusterSummary>,
    /// Cluster of every item.
    #[serde(skip)]
    pub assignments: Vec<u32>,
    /// Confidence of every item.
    #[serde(skip)]
    pub confidences: Vec<f32>,
}

/// The result of [`discover`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Discovery {
    pub items: usize,
    /// The support threshold `k` used.
    pub min_support: usize,
    /// Index of the chosen head.
    pub chosen_head: usize,
    /// Supported clusters of the chosen head.
    pub clusters_found: usize,
    pub heads: Vec<HeadSummary>,
}

impl Discovery {
    /// The chosen head's summary.
    pub fn chosen(&self) -> &HeadSummary {
        &self.heads[self.chosen_head]
    }
}

/// The temperature at which the programs report a prediction's confidence: the row
/// temperature the models are trained with, so that confidence is the probability the
/// loss itself sees.
pub const CONFIDENCE_TEMPERATURE: f64 = 0.1;

/// Class and confidence (largest softmax probability at `row_temperature`) of each row.
pub fn predict_with_confidence(
    head: &Head<f32>,
    z: ArrayView2<f32>,
    row_temperature: f64,
) -> Vec<(u32, f32)> {
    let inv_t = (1.0 / row_temperature) as f32;
    head.logits(z)
        .rows()
        .into_iter()
        .map(|row| {
            let best = argmax(row);
            let top = row[best] * inv_t;
            // softmax at the arg-max: 1 / sum_c exp((x_c - x_best) / T).
            let denominator: f32 = row.iter().map(|&x| (x * inv_t - top).exp()).sum();
            (best as u32, 1.0 / denominator.max(1.0))
        })
        .collect()
}

/// Runs every head on `z` (`n x D` embeddings) and chooses the number of clusters by the
/// rule in the module documentation.
pub fn discover(
    heads: &[Head<f32>],
    z: ArrayView2<f32>,
    params: &DiscoverParams,
) -> Result<Discovery> {
    let n = z.nrows();
    if heads.is_empty() || n == 0 {
        return Err(Error::invalid(
            "discovery",
            format!("{} heads and {n} items; both must be non-zero", heads.len()),
        ));
    }
    if !(params.row_temperature.is_finite() && params.row_temperature > 0.0) {
        return Err(Error::invalid("discovery", "the temperature must be positive"));
    }
    if let Some(h) = heads.iter().find(|h| h.dim() != z.ncols()) {
        return Err(Error::invalid(
            "discovery",
            format!("embeddings of dimension {} for heads of dimension {}", z.ncols(), h.dim()),
        ));
    }
    let smallest = heads.iter().map(Head::classes).min().unwrap_or(1);
    let min_support = params.min_cluster_size.max(n.div_ceil(2 * smallest));

    let mut summaries = Vec::with_capacity(heads.len());
    for (h, head) in heads.iter().enumerate() {
        // Predict in chunks so the logits of a large set never sit in memory at once.
        let mut predictions = Vec::with_capacity(n);
        for chunk in z.axis_chunks_iter(Axis(0), 4096) {
            predictions.extend(predict_with_confidence(head, chunk, params.row_temperature));
        }
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); head.classes()];
        for (i, &(c, _)) in predictions.iter().enumerate() {
            members[c as usize].push(i);
        }
        let mut clusters: Vec<ClusterSummary> = members
            .into_iter()
            .enumerate()
            .filter(|(_, m)| !m.is_empty())
            .map(|(id, mut m)| {
                let mean = m.iter().map(|&i| predictions[i].1 as f64).sum::<f64>() / m.len() as f64;
                let size = m.len();
                m.sort_by(|&a, &b| predictions[b].1.total_cmp(&predictions[a].1).then(a.cmp(&b)));
                m.truncate(params.exemplars);
                ClusterSummary {
                    id: id as u32,
                    size,
                    supported: size >= min_support,
                    mean_confidence: mean,
                    exemplars: m,
                }
            })
            .collect();
        clusters.sort_by(|a, b| b.size.cmp(&a.size).then(a.id.cmp(&b.id)));
        summaries.push(HeadSummary {
            head: h,
            classes: head.classes(),
            clusters_used: clusters.len(),
            supported: clusters.iter().filter(|c| c.supported).count(),
            mean_confidence: predictions.iter().map(|p| p.1 as f64).sum::<f64>() / n as f64,
            clusters,
            assignments: predictions.iter().map(|p| p.0).collect(),
            confidences: predictions.iter().map(|p| p.1).collect(),
        });
    }
    let chosen_head = summaries
        .iter()
        .max_by(|a, b| {
            a.supported.cmp(&b.supported).then(b.classes.cmp(&a.classes)).then(b.head.cmp(&a.head))
        })
        .map_or(0, |s| s.head);
    Ok(Discovery {
        items: n,
        min_support,
        chosen_head,
        clusters_found: summaries[chosen_head].supported,
        heads: summaries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::l2_normalize_rows;
    use ndarray::Array2;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// `groups` tight groups on the first `groups` axes of an 8-dimensional space.
    fn grouped(rng: &mut StdRng, groups: usize, per_group: usize) -> Array2<f32> {
        let mut z = Array2::from_shape_fn((groups * per_group, 8), |(i, d)| {
            let axis = if d == i / per_group { 1.0 } else { 0.0 };
            axis + 0.05 * rng.gen_range(-1.0f32..1.0)
        });
        l2_normalize_rows(&mut z);
        z
    }

    /// Class `c` points along axis `c % 8`; classes from 8 on are weaker copies that never
    /// win, so a 16-class head sees the same clusters as an 8-class one.
    fn axis_head(classes: usize) -> Head<f32> {
        Head::from_weights(Array2::from_shape_fn((classes, 8), |(c, d)| {
            match (d == c % 8, c < 8) {
                (true, true) => 10.0,
                (true, false) => 9.0,
                _ => 0.0,
            }
        }))
        .expect("head")
    }

    #[test]
    fn confidence_is_the_largest_softmax_probability() {
        let head = Head::from_weights(ndarray::array![[1.0f32, 0.0], [0.0, 1.0]]).expect("head");
        let got = predict_with_confidence(&head, ndarray::array![[1.0f32, 0.0]].view(), 1.0);
        let want = 1.0f32.exp() / (1.0f32.exp() + 1.0);
        assert_eq!(got[0].0, 0);
        assert!((got[0].1 - want).abs() < 1e-6);
    }

    #[test]
    fn finds_the_groups_and_prefers_the_coarse_head_on_ties() {
        let mut rng = StdRng::seed_from_u64(1);
        let z = grouped(&mut rng, 4, 50);
        let heads = [axis_head(8), axis_head(16)];
        let found = discover(&heads, z.view(), &DiscoverParams::default()).expect("runs");
        assert_eq!(found.clusters_found, 4);
        assert_eq!(found.chosen_head, 0, "equal support: the coarser head wins");
        // k = max(5, ceil(200 / 16)) = 13.
        assert_eq!(found.min_support, 13);
        let chosen = found.chosen();
        assert_eq!(chosen.clusters.iter().map(|c| c.size).collect::<Vec<_>>(), vec![50; 4]);
        let c = &chosen.clusters[0];
        assert_eq!(c.exemplars.len(), 16);
        let conf: Vec<f32> = c.exemplars.iter().map(|&i| chosen.confidences[i]).collect();
        assert!(conf.windows(2).all(|w| w[0] >= w[1]), "exemplars by confidence");
    }

    #[test]
    fn a_finer_head_wins_where_the_data_has_more_groups() {
        let mut rng = StdRng::seed_from_u64(3);
        let z = grouped(&mut rng, 8, 40);
        let found = discover(&[axis_head(4), axis_head(8)], z.view(), &DiscoverParams::default())
            .expect("runs");
        assert_eq!((found.chosen_head, found.clusters_found), (1, 8));
    }

    #[test]
    fn small_clusters_do_not_count() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut z = grouped(&mut rng, 3, 60);
        // Three stray items on a fourth axis.
        z.slice_mut(ndarray::s![..3, ..]).assign(
            &grouped(&mut rng, 4, 1).slice(ndarray::s![3.., ..]).broadcast((3, 8)).expect("row"),
        );
        let found = discover(&[axis_head(8)], z.view(), &DiscoverParams::default()).expect("runs");
        assert_eq!(found.heads[0].clusters_used, 4);
        assert_eq!(found.clusters_found, 3);
    }

    #[test]
    fn rejects_bad_input() {
        let z = Array2::<f32>::zeros((4, 8));
        assert!(discover(&[], z.view(), &DiscoverParams::default()).is_err());
        assert!(discover(
            &[axis_head(4)],
            Array2::<f32>::zeros((0, 8)).view(),
            &DiscoverParams::default()
        )
        .is_err());
        assert!(discover(
            &[axis_head(4)],
            Array2::<f32>::zeros((4, 3)).view(),
            &DiscoverParams::default()
        )
        .is_err());
    }
}
