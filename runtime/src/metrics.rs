//! Clustering metrics: score predicted clusters against ground-truth labels.
//!
//! Everything is computed from one [`Contingency`] table (classes × clusters counts),
//! built once by [`contingency`]. [`score`] returns all four scores at once:
//!
//! * **ACC**: Hungarian-matched accuracy, the largest number of samples that a one-to-one
//!   matching of clusters to classes gets right, divided by `n`. Clusters or classes left
//!   without a partner count as wrong.
//! * **NMI**: mutual information normalised by the arithmetic mean of the two entropies.
//! * **AMI**: mutual information adjusted for chance with the exact expected mutual
//!   information under the hypergeometric (fixed marginals) model, arithmetic mean.
//! * **ARI**: the adjusted Rand index of Hubert and Arabie.
//!
//! NMI, AMI and ARI follow scikit-learn's `normalized_mutual_info_score`,
//! `adjusted_mutual_info_score` and `adjusted_rand_score` (default arguments), including
//! their conventions in the degenerate cases: one class and one cluster scores 1 on every
//! metric; exactly one side with a single group scores NMI = AMI = 0; identical
//! partitions (up to renaming, all singletons included) score 1. All logarithms are
//! natural; the scores do not depend on the base.
//!
//! ```
//! use selfclass_runtime::metrics::score;
//!
//! let labels = [0, 0, 1, 1, 2, 2];
//! let clusters = [5, 5, 3, 3, 3, 9];
//! let s = score(&labels, &clusters)?;
//! assert_eq!((s.n, s.classes, s.clusters_used), (6, 3, 3));
//! // Matching 0↔5, 1↔3, 2↔9 gets 5 of the 6 samples right.
//! assert!((s.acc - 5.0 / 6.0).abs() < 1e-12);
//! assert!(s.nmi > 0.0 && s.nmi < 1.0 && s.ari <= 1.0);
//!
//! // A perfect clustering scores 1 whatever the cluster ids are.
//! let s = score(&[0, 0, 1, 2], &[7, 7, 4, 1])?;
//! assert_eq!((s.acc, s.nmi, s.ami, s.ari), (1.0, 1.0, 1.0, 1.0));
//! # Ok::<(), selfclass_runtime::Error>(())
//! ```

use pathfinding::prelude::{kuhn_munkres, Matrix};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Largest block of the contingency table, in cells, that Hungarian matching will take on.
///
/// Matching runs separately on every connected block of the table (classes and clusters
/// linked by a shared sample); a block with `r ≤ c` rows/columns needs `r·c` weights in
/// memory and about `r²·c` steps. Blocks with a single class or a single cluster are
/// solved directly whatever their size. Beyond this limit [`Contingency::matched_count`]
/// returns [`Error::InvalidInput`] instead of exhausting memory.
pub const MAX_MATCHING_CELLS: usize = 1 << 24;

/// All scores of one clustering against its ground-truth labels, see [`score`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClusteringScores {
    /// Hungarian-matched accuracy in `[0, 1]`.
    pub acc: f64,
    /// Normalised mutual information (arithmetic mean), in `[0, 1]`.
    pub nmi: f64,
    /// Adjusted mutual information (arithmetic mean): 1 for identical partitions, about 0
    /// for chance agreement, may be negative; at most 1.
    pub ami: f64,
    /// Adjusted Rand index: 1 for identical partitions, about 0 for chance agreement,
    /// may be negative (not below -1); at most 1.
    pub ari: f64,
    /// Number of samples scored.
    pub n: usize,
    /// Number of distinct cluster ids that occur in the predictions.
    pub clusters_used: usize,
    /// Number of distinct class labels that occur in the ground truth.
    pub classes: usize,
}

/// One non-zero cell of a [`Contingency`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    /// Row: index into [`Contingency::classes`].
    pub class: usize,
    /// Column: index into [`Contingency::clusters`].
    pub cluster: usize,
    /// Number of samples with that class and that cluster; always at least 1.
    pub count: u64,
}

/// The contingency table of a clustering: how many samples of each ground-truth class
/// landed in each predicted cluster.
///
/// Only ids that occur are kept: rows are the distinct labels in increasing order,
/// columns the distinct cluster ids in increasing order, so gaps in the id ranges (labels
/// `{0, 5, 9}`) cost nothing. The table is stored sparsely (at most `n` non-zero cells),
/// so even all-singleton clusterings of large `n` are cheap. Every row and every column
/// has at least one non-zero cell, and `n ≥ 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contingency {
    classes: Vec<u32>,
    clusters: Vec<u32>,
    class_sizes: Vec<u64>,
    cluster_sizes: Vec<u64>,
    /// Non-zero cells, sorted by class index then cluster index.
    cells: Vec<Cell>,
    n: usize,
}

/// Builds the contingency table of `clusters` (predicted cluster ids) against `labels`
/// (ground-truth classes); sample `i` has class `labels[i]` and cluster `clusters[i]`.
///
/// Label and cluster ids are arbitrary `u32` values; they need not be contiguous nor
/// share a range. Runs in `O(n log n)` time and `O(n)` memory.
///
/// # Errors
/// [`Error::InvalidInput`] if the slices are empty or differ in length.
pub fn contingency(labels: &[u32], clusters: &[u32]) -> Result<Contingency> {
    const OP: &str = "metrics::contingency";
    if labels.len() != clusters.len() {
        return Err(Error::invalid(
            OP,
            format!(
                "{} ground-truth labels but {} cluster assignments; they must pair up",
                labels.len(),
                clusters.len()
            ),
        ));
    }
    if labels.is_empty() {
        return Err(Error::invalid(OP, "no samples: a clustering of nothing cannot be scored"));
    }

    let class_ids = distinct_sorted(labels);
    let cluster_ids = distinct_sorted(clusters);

    let mut pairs: Vec<(usize, usize)> = labels
        .iter()
        .zip(clusters)
        .map(|(label, cluster)| {
            (position_of(&class_ids, *label), position_of(&cluster_ids, *cluster))
        })
        .collect();
    pairs.sort_unstable();

    let mut cells: Vec<Cell> = Vec::new();
    for (class, cluster) in pairs {
        match cells.last_mut() {
            Some(last) if last.class == class && last.cluster == cluster => last.count += 1,
            _ => cells.push(Cell { class, cluster, count: 1 }),
        }
    }

    let mut class_sizes = vec![0_u64; class_ids.len()];
    let mut cluster_sizes = vec![0_u64; cluster_ids.len()];
    for cell in &cells {
        class_sizes[cell.class] += cell.count;
        cluster_sizes[cell.cluster] += cell.count;
    }

    Ok(Contingency {
        classes: class_ids,
        clusters: cluster_ids,
        class_sizes,
        cluster_sizes,
        cells,
        n: labels.len(),
    })
}

/// Scores `clusters` (predicted cluster ids) against `labels` (ground-truth classes):
/// Hungarian ACC, NMI, AMI and ARI from a single contingency table.
///
/// Equivalent to [`contingency`] followed by [`Contingency::scores`].
///
/// # Errors
/// [`Error::InvalidInput`] if the slices are empty or differ in length, or (see
/// [`MAX_MATCHING_CELLS`]) if the matching problem is too large to solve.
pub fn score(labels: &[u32], clusters: &[u32]) -> Result<ClusteringScores> {
    contingency(labels, clusters)?.scores()
}

impl Contingency {
    /// Number of samples, at least 1.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The distinct ground-truth labels in increasing order (the rows).
    pub fn classes(&self) -> &[u32] {
        &self.classes
    }

    /// The distinct predicted cluster ids in increasing order (the columns).
    pub fn clusters(&self) -> &[u32] {
        &self.clusters
    }

    /// Number of samples of each class, aligned with [`Contingency::classes`].
    pub fn class_sizes(&self) -> &[u64] {
        &self.class_sizes
    }

    /// Number of samples in each cluster, aligned with [`Contingency::clusters`].
    pub fn cluster_sizes(&self) -> &[u64] {
        &self.cluster_sizes
    }

    /// The non-zero cells, sorted by class index then cluster index.
    pub fn cells(&self) -> &[Cell] {
        &self.cells
    }

    /// Number of samples with class `label` and cluster `cluster` (ids, not indices);
    /// 0 for ids that do not occur.
    pub fn count(&self, label: u32, cluster: u32) -> u64 {
        let (Ok(class), Ok(cluster)) =
            (self.classes.binary_search(&label), self.clusters.binary_search(&cluster))
        else {
            return 0;
        };
        self.cells
            .binary_search_by(|cell| (cell.class, cell.cluster).cmp(&(class, cluster)))
            .map_or(0, |at| self.cells[at].count)
    }

    /// Whether the clustering is the ground truth up to renaming: every class sits in
    /// exactly one cluster and every cluster holds exactly one class.
    pub fn is_perfect_match(&self) -> bool {
        // Each row and each column has at least one cell, so as many cells as rows and as
        // columns means exactly one per row and per column.
        self.cells.len() == self.classes.len() && self.cells.len() == self.clusters.len()
    }

    /// Largest number of samples that a one-to-one matching of clusters to classes
    /// classifies correctly (Hungarian algorithm, `pathfinding::kuhn_munkres`). Works for
    /// any number of clusters and classes; unmatched clusters or classes contribute 0.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if a connected block of the table exceeds
    /// [`MAX_MATCHING_CELLS`].
    pub fn matched_count(&self) -> Result<u64> {
        self.matched_count_within(MAX_MATCHING_CELLS)
    }

    /// Hungarian-matched accuracy: [`Contingency::matched_count`] divided by `n`, in
    /// `[0, 1]`.
    ///
    /// # Errors
    /// As [`Contingency::matched_count`].
    pub fn accuracy(&self) -> Result<f64> {
        Ok(self.matched_count()? as f64 / self.n as f64)
    }

    /// Mutual information between classes and clusters, in nats, clamped at 0 against
    /// rounding; exactly 0 when either side has a single group.
    pub fn mutual_information(&self) -> f64 {
        if self.classes.len() == 1 || self.clusters.len() == 1 {
            return 0.0;
        }
        let n = self.n as f64;
        let ln_n = n.ln();
        let mi: f64 = self
            .cells
            .iter()
            .map(|cell| {
                let count = cell.count as f64;
                let a = self.class_sizes[cell.class] as f64;
                let b = self.cluster_sizes[cell.cluster] as f64;
                count / n * (count.ln() + ln_n - a.ln() - b.ln())
            })
            .sum();
        mi.max(0.0)
    }

    /// Entropy of the ground-truth classes, in nats.
    pub fn class_entropy(&self) -> f64 {
        entropy(&self.class_sizes, self.n)
    }

    /// Entropy of the predicted clusters, in nats.
    pub fn cluster_entropy(&self) -> f64 {
        entropy(&self.cluster_sizes, self.n)
    }

    /// Expected mutual information, in nats, of two random partitions with the same
    /// group sizes as this table (hypergeometric model, Vinh, Epps & Bailey 2010):
    ///
    /// `E[MI] = Σ_i Σ_j Σ_k (k/n) ln(n k / (a_i b_j)) · P(k | a_i, b_j, n)` with
    /// `P(k) = a! b! (n−a)! (n−b)! / (n! k! (a−k)! (b−k)! (n−a−b+k)!)` and
    /// `k` from `max(1, a+b−n)` to `min(a, b)`.
    ///
    /// Evaluated exactly in `f64` with a table of `ln k!` for `k ≤ n`; pairs of groups
    /// with equal sizes are summed once, so the cost is about
    /// `(distinct class sizes) × n` terms at worst (well under a second for `n` = 100,000).
    /// 0 when either side has a single group.
    pub fn expected_mutual_information(&self) -> f64 {
        if self.classes.len() == 1 || self.clusters.len() == 1 {
            return 0.0;
        }
        let n = self.n;
        let ln_fact = log_factorials(n);
        let ln_n = (n as f64).ln();
        let class_groups = size_multiplicities(&self.class_sizes);
        let cluster_groups = size_multiplicities(&self.cluster_sizes);

        let mut emi = 0.0;
        for &(a, a_times) in &class_groups {
            for &(b, b_times) in &cluster_groups {
                // Sizes are at most n, which is a usize, so these fit.
                let (a, b) = (a as usize, b as usize);
                let shared = ln_fact[a] + ln_fact[b] + ln_fact[n - a] + ln_fact[n - b] - ln_fact[n];
                let ln_ab = (a as f64).ln() + (b as f64).ln();
                let lowest = (a + b).saturating_sub(n).max(1);
                let highest = a.min(b);
                let mut pair_sum = 0.0;
                for k in lowest..=highest {
                    let ln_p = shared
                        - ln_fact[k]
                        - ln_fact[a - k]
                        - ln_fact[b - k]
                        - ln_fact[n + k - a - b];
                    let k_f = k as f64;
                    pair_sum += k_f / n as f64 * (ln_n + k_f.ln() - ln_ab) * ln_p.exp();
                }
                emi += (a_times * b_times) as f64 * pair_sum;
            }
        }
        emi
    }

    /// Normalised mutual information, `MI / ((H(classes) + H(clusters)) / 2)`, in `[0, 1]`
    /// (scikit-learn's `normalized_mutual_info_score`, arithmetic mean).
    ///
    /// 1 for one class and one cluster and for any perfect match; 0 when the mutual
    /// information is 0 (in particular when exactly one side has a single group).
    pub fn nmi(&self) -> f64 {
        if self.is_perfect_match() {
            return 1.0;
        }
        let mi = self.mutual_information();
        if mi <= 0.0 {
            return 0.0;
        }
        let mean_entropy = 0.5 * (self.class_entropy() + self.cluster_entropy());
        (mi / mean_entropy).clamp(0.0, 1.0)
    }

    /// Adjusted mutual information, `(MI − E[MI]) / (mean(H) − E[MI])` with the
    /// arithmetic mean of the two entropies (scikit-learn's `adjusted_mutual_info_score`
    /// default) and [`Contingency::expected_mutual_information`].
    ///
    /// 1 for one class and one cluster and for any perfect match (all singletons
    /// included, where `MI = E[MI]`); 0 when exactly one side has a single group. As in
    /// scikit-learn, numerator and denominator are kept at least machine epsilon away
    /// from zero, sign preserved, so the ratio is always finite.
    pub fn ami(&self) -> f64 {
        if self.is_perfect_match() {
            return 1.0;
        }
        if self.classes.len() == 1 || self.clusters.len() == 1 {
            return 0.0;
        }
        let mi = self.mutual_information();
        let emi = self.expected_mutual_information();
        let mean_entropy = 0.5 * (self.class_entropy() + self.cluster_entropy());
        away_from_zero(mi - emi) / away_from_zero(mean_entropy - emi)
    }

    /// Adjusted Rand index (Hubert & Arabie 1985), computed from exact pair counts
    /// (scikit-learn's `adjusted_rand_score`). 1 when the two partitions put the same
    /// pairs together (one class and one cluster, perfect matches, all singletons); at
    /// most 1; may be negative.
    pub fn ari(&self) -> f64 {
        let same_both: u128 = self.cells.iter().map(|cell| square(cell.count)).sum();
        let same_class: u128 = self.class_sizes.iter().map(|&size| square(size)).sum();
        let same_cluster: u128 = self.cluster_sizes.iter().map(|&size| square(size)).sum();
        let n = self.n as u128;
        // Ordered pairs of distinct samples (each unordered pair counted twice, which
        // cancels in the ratio): together in both, only in the class, only in the
        // cluster, in neither.
        let together = same_both - n;
        let only_class = same_class - same_both;
        let only_cluster = same_cluster - same_both;
        if only_class == 0 && only_cluster == 0 {
            return 1.0;
        }
        // n² − A − B + S ≥ 0 always; computed in this order to stay non-negative.
        let apart = (n * n + same_both) - same_class - same_cluster;
        adjusted_rand(together, only_class, only_cluster, apart)
    }

    /// All scores of this table; see [`score`].
    ///
    /// # Errors
    /// As [`Contingency::matched_count`].
    pub fn scores(&self) -> Result<ClusteringScores> {
        Ok(ClusteringScores {
            acc: self.accuracy()?,
            nmi: self.nmi(),
            ami: self.ami(),
            ari: self.ari(),
            n: self.n,
            clusters_used: self.clusters.len(),
            classes: self.classes.len(),
        })
    }

    /// [`Contingency::matched_count`] with an explicit block-size limit.
    fn matched_count_within(&self, max_cells: usize) -> Result<u64> {
        const OP: &str = "metrics::matched_count";
        let rows = self.classes.len();
        let cols = self.clusters.len();

        // Connected blocks: node r < rows is class r, node rows + c is cluster c. A
        // maximum matching never pairs across blocks (those weights are 0), so blocks are
        // matched independently; all-singleton tables become many 1×1 blocks.
        let mut parent: Vec<usize> = (0..rows + cols).collect();
        for cell in &self.cells {
            let x = find_root(&mut parent, cell.class);
            let y = find_root(&mut parent, rows + cell.cluster);
            if x != y {
                parent[x] = y;
            }
        }

        // Number the blocks and give every class and cluster its position in its block.
        let mut block_of_root = vec![usize::MAX; rows + cols];
        let mut block_shape: Vec<(usize, usize)> = Vec::new();
        let mut local = vec![0_usize; rows + cols];
        for (node, position) in local.iter_mut().enumerate() {
            let root = find_root(&mut parent, node);
            if block_of_root[root] == usize::MAX {
                block_of_root[root] = block_shape.len();
                block_shape.push((0, 0));
            }
            let shape = &mut block_shape[block_of_root[root]];
            let counter = if node < rows { &mut shape.0 } else { &mut shape.1 };
            *position = *counter;
            *counter += 1;
        }
        let mut block_cells: Vec<Vec<Cell>> = vec![Vec::new(); block_shape.len()];
        for cell in &self.cells {
            let root = find_root(&mut parent, cell.class);
            block_cells[block_of_root[root]].push(*cell);
        }

        let mut matched: u64 = 0;
        for ((block_rows, block_cols), cells) in block_shape.into_iter().zip(block_cells) {
            if block_rows == 1 || block_cols == 1 {
                // A single class or cluster can be matched only once: take the best cell.
                matched += cells.iter().map(|cell| cell.count).max().unwrap_or(0);
                continue;
            }
            let too_big = block_rows.checked_mul(block_cols).is_none_or(|size| size > max_cells);
            if too_big {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "a connected block of {block_rows} classes × {block_cols} clusters \
                         exceeds the Hungarian matching limit of {max_cells} cells"
                    ),
                ));
            }
            // kuhn_munkres needs rows ≤ columns: put the smaller side on the rows.
            let transpose = block_rows > block_cols;
            let (height, width) =
                if transpose { (block_cols, block_rows) } else { (block_rows, block_cols) };
            let mut weights = Matrix::new(height, width, 0_i64);
            for cell in &cells {
                let r = local[cell.class];
                let c = local[rows + cell.cluster];
                let at = if transpose { (c, r) } else { (r, c) };
                weights[at] = i64::try_from(cell.count)
                    .map_err(|_| Error::invalid(OP, "a cell count does not fit in i64"))?;
            }
            let (best, _) = kuhn_munkres(&weights);
            matched += u64::try_from(best)
                .map_err(|_| Error::invalid(OP, "matching returned a negative total"))?;
        }
        Ok(matched)
    }
}

/// The distinct values of `ids`, sorted.
fn distinct_sorted(ids: &[u32]) -> Vec<u32> {
    let mut distinct = ids.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    distinct
}

/// Index of `id` in the sorted `distinct`, which contains it.
fn position_of(distinct: &[u32], id: u32) -> usize {
    match distinct.binary_search(&id) {
        Ok(at) | Err(at) => at,
    }
}

/// Shannon entropy in nats of a partition of `n` samples into groups of `sizes`.
fn entropy(sizes: &[u64], n: usize) -> f64 {
    if sizes.len() <= 1 {
        return 0.0;
    }
    let n = n as f64;
    let ln_n = n.ln();
    let h: f64 = sizes
        .iter()
        .map(|&size| {
            let p = size as f64 / n;
            -p * ((size as f64).ln() - ln_n)
        })
        .sum();
    h.max(0.0)
}

/// `ln k!` for `k = 0..=n`, each accurate to a few units in the last place: the running
/// sum of `ln k` carries its rounding error separately (compensated summation).
fn log_factorials(n: usize) -> Vec<f64> {
    let mut table = Vec::with_capacity(n + 1);
    table.push(0.0);
    let mut sum = 0.0_f64;
    let mut lost = 0.0_f64;
    for k in 1..=n {
        let term = (k as f64).ln();
        let next = sum + term;
        lost += if sum.abs() >= term.abs() { (sum - next) + term } else { (term - next) + sum };
        sum = next;
        table.push(sum + lost);
    }
    table
}

/// Distinct values of `sizes` with how often each occurs.
fn size_multiplicities(sizes: &[u64]) -> Vec<(u64, u64)> {
    let mut sorted = sizes.to_vec();
    sorted.sort_unstable();
    let mut groups: Vec<(u64, u64)> = Vec::new();
    for size in sorted {
        match groups.last_mut() {
            Some((value, times)) if *value == size => *times += 1,
            _ => groups.push((size, 1)),
        }
    }
    groups
}

/// `x`, moved to `±f64::EPSILON` if it is closer to zero than that (sign kept, zero
/// counts as positive).
fn away_from_zero(x: f64) -> f64 {
    if x < 0.0 {
        x.min(-f64::EPSILON)
    } else {
        x.max(f64::EPSILON)
    }
}

fn square(x: u64) -> u128 {
    u128::from(x) * u128::from(x)
}

/// `2 (TP·TN − FN·FP) / ((TP + FN)(FN + TN) + (TP + FP)(FP + TN))` from pair counts, in
/// exact integer arithmetic when it fits in `u128`, in `f64` otherwise. The denominator
/// is positive whenever `FN` or `FP` is.
fn adjusted_rand(tp: u128, fn_: u128, fp: u128, tn: u128) -> f64 {
    let exact = || -> Option<f64> {
        let agree = tp.checked_mul(tn)?;
        let disagree = fn_.checked_mul(fp)?;
        let left = tp.checked_add(fn_)?.checked_mul(fn_.checked_add(tn)?)?;
        let right = tp.checked_add(fp)?.checked_mul(fp.checked_add(tn)?)?;
        let denominator = left.checked_add(right)?;
        // The numerator is signed: halve the denominator instead of doubling it.
        let numerator = if agree >= disagree {
            (agree - disagree) as f64
        } else {
            -((disagree - agree) as f64)
        };
        Some(numerator / (denominator as f64 / 2.0))
    };
    exact().unwrap_or_else(|| {
        let (tp, fn_, fp, tn) = (tp as f64, fn_ as f64, fp as f64, tn as f64);
        2.0 * (tp * tn - fn_ * fp) / ((tp + fn_) * (fn_ + tn) + (tp + fp) * (fp + tn))
    })
}

/// Root of `node` in the union-find forest `parent`, halving paths on the way.
fn find_root(parent: &mut [usize], mut node: usize) -> usize {
    while parent[node] != node {
        parent[node] = parent[parent[node]];
        node = parent[node];
    }
    node
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Tolerance against the scikit-learn / SciPy reference values of
    // runtime/tests/data/metrics_expected.py. Both sides evaluate the same formulas in f64
    // but sum in different orders and take log-factorials differently (SciPy's gammaln
    // vs our compensated table), so they agree to about 1e-13 at these sizes; 1e-9 leaves
    // room for that rounding while any real formula or convention difference shows up as
    // 1e-3 or more.
    const TOLERANCE: f64 = 1e-9;

    struct Expected {
        acc: f64,
        nmi: f64,
        ami: f64,
        ari: f64,
    }

    fn assert_scores(name: &str, labels: &[u32], clusters: &[u32], expected: Expected) {
        let got = match score(labels, clusters) {
            Ok(got) => got,
            Err(err) => panic!("{name}: {err}"),
        };
        for (metric, value, want) in [
            ("acc", got.acc, expected.acc),
            ("nmi", got.nmi, expected.nmi),
            ("ami", got.ami, expected.ami),
            ("ari", got.ari, expected.ari),
        ] {
            assert!(
                (value - want).abs() <= TOLERANCE,
                "{name}: {metric} = {value:.17}, scikit-learn says {want:.17}"
            );
        }
        assert_eq!(got.n, labels.len(), "{name}: n");
    }

    /// The 64-bit LCG of metrics_expected.py (`generated`), same constants and draws.
    fn generated(
        n: usize,
        classes: u64,
        clusters: u64,
        agree_percent: u64,
        seed: u64,
    ) -> (Vec<u32>, Vec<u32>) {
        let mut state = seed;
        let mut draw = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            state >> 33
        };
        let mut labels = Vec::with_capacity(n);
        let mut preds = Vec::with_capacity(n);
        for _ in 0..n {
            let label = draw() % classes;
            let pred = if draw() % 100 < agree_percent {
                (label * 7 + 3) % clusters
            } else {
                draw() % clusters
            };
            labels.push(label as u32);
            preds.push(pred as u32);
        }
        (labels, preds)
    }

    // Values below: scikit-learn 1.9.1, SciPy 1.17.1, NumPy 2.4.6.

    #[test]
    fn expected_perfect_match_with_permuted_ids() {
        let labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3];
        let clusters = [7, 7, 7, 2, 2, 0, 0, 0, 0, 5];
        assert_scores(
            "perfect_permuted",
            &labels,
            &clusters,
            Expected { acc: 1.0, nmi: 1.0, ami: 1.0, ari: 1.0 },
        );
    }

    #[test]
    fn expected_more_clusters_than_classes() {
        let labels = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2];
        let clusters = [0, 0, 3, 3, 1, 1, 1, 4, 2, 2, 2, 0];
        assert_scores(
            "more_clusters",
            &labels,
            &clusters,
            Expected {
                acc: 0.6666666666666666,
                nmi: 0.7106439048058983,
                ami: 0.5549815381739633,
                ari: 0.46774193548387094,
            },
        );
    }

    #[test]
    fn expected_fewer_clusters_than_classes() {
        let labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3];
        let clusters = [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0];
        assert_scores(
            "fewer_clusters",
            &labels,
            &clusters,
            Expected {
                acc: 0.5,
                nmi: 0.36056805531517044,
                ami: 0.23349903549580026,
                ari: 0.16374269005847952,
            },
        );
    }

    #[test]
    fn expected_one_cluster() {
        let labels = [0, 0, 1, 1, 1, 2, 3, 3];
        let clusters = [4, 4, 4, 4, 4, 4, 4, 4];
        assert_scores(
            "one_cluster",
            &labels,
            &clusters,
            Expected { acc: 0.375, nmi: 0.0, ami: 0.0, ari: 0.0 },
        );
    }

    #[test]
    fn expected_sparse_ids() {
        let labels = [0, 0, 0, 5, 5, 5, 5, 9, 9, 9, 0, 5];
        let clusters = [100, 100, 4, 1, 1, 1, 4, 4, 4, 100, 100, 1];
        assert_scores(
            "sparse_ids",
            &labels,
            &clusters,
            Expected {
                acc: 0.75,
                nmi: 0.49953637291750164,
                ami: 0.36308840328293635,
                ari: 0.36177474402730375,
            },
        );
    }

    #[test]
    fn expected_anti_correlated() {
        assert_scores(
            "anti_correlated",
            &[0, 0, 1, 1],
            &[0, 1, 0, 1],
            Expected { acc: 0.5, nmi: 0.0, ami: -0.49999999999999944, ari: -0.5 },
        );
    }

    #[test]
    fn expected_all_singletons() {
        assert_scores(
            "all_singletons",
            &[0, 1, 2, 3, 4, 5],
            &[5, 3, 1, 0, 2, 4],
            Expected { acc: 1.0, nmi: 1.0, ami: 1.0, ari: 1.0 },
        );
    }

    #[test]
    fn expected_one_class_one_cluster() {
        assert_scores(
            "one_class_one_cluster",
            &[3, 3, 3, 3, 3],
            &[8, 8, 8, 8, 8],
            Expected { acc: 1.0, nmi: 1.0, ami: 1.0, ari: 1.0 },
        );
        assert_scores(
            "single_sample",
            &[3],
            &[8],
            Expected { acc: 1.0, nmi: 1.0, ami: 1.0, ari: 1.0 },
        );
    }

    #[test]
    fn expected_one_class_many_clusters() {
        assert_scores(
            "one_class_many_clusters",
            &[2, 2, 2, 2, 2, 2],
            &[0, 1, 1, 2, 3, 3],
            Expected { acc: 0.3333333333333333, nmi: 0.0, ami: 0.0, ari: 0.0 },
        );
    }

    #[test]
    fn expected_random_200_numpy_seed_20240611() {
        // numpy.random.default_rng(20240611): labels = integers(0, 5, 200), then
        // clusters = integers(0, 7, 200).
        let labels = [
            2, 0, 2, 4, 1, 2, 4, 4, 1, 1, 4, 0, 3, 3, 0, 2, 0, 4, 1, 3, 1, 0, 3, 2, 4, 3, 4, 3, 1,
            1, 0, 3, 1, 2, 3, 4, 1, 2, 2, 0, 0, 4, 2, 3, 1, 0, 2, 4, 1, 4, 1, 1, 1, 4, 2, 1, 4, 3,
            2, 0, 4, 1, 3, 1, 4, 4, 2, 0, 1, 1, 4, 2, 4, 4, 1, 2, 4, 0, 2, 2, 2, 2, 1, 0, 0, 2, 3,
            2, 2, 1, 3, 1, 1, 3, 2, 3, 2, 3, 3, 4, 1, 3, 4, 2, 1, 1, 4, 1, 0, 0, 3, 0, 0, 3, 4, 3,
            0, 1, 2, 2, 2, 4, 0, 4, 3, 0, 2, 3, 4, 0, 2, 3, 0, 2, 2, 1, 1, 3, 3, 2, 3, 3, 3, 4, 1,
            1, 2, 3, 4, 1, 0, 2, 4, 1, 3, 2, 3, 3, 0, 2, 2, 4, 2, 0, 3, 1, 4, 0, 3, 0, 1, 2, 3, 2,
            3, 2, 1, 1, 2, 0, 1, 0, 4, 2, 3, 1, 0, 1, 0, 4, 1, 3, 2, 2, 3, 3, 1, 2, 1, 0,
        ];
        let clusters = [
            1, 6, 4, 3, 0, 2, 2, 3, 0, 2, 1, 3, 3, 0, 3, 2, 6, 4, 2, 4, 2, 0, 0, 4, 0, 5, 2, 5, 0,
            1, 0, 2, 0, 1, 2, 6, 5, 2, 0, 5, 4, 5, 1, 0, 0, 4, 6, 3, 0, 1, 5, 3, 3, 3, 5, 4, 1, 4,
            0, 4, 0, 1, 0, 0, 1, 4, 3, 2, 3, 4, 0, 2, 0, 2, 6, 3, 3, 1, 1, 2, 4, 0, 6, 3, 3, 1, 1,
            5, 5, 4, 4, 5, 3, 6, 6, 4, 2, 6, 0, 1, 4, 6, 4, 3, 6, 3, 3, 0, 3, 0, 4, 2, 6, 5, 4, 0,
            2, 6, 3, 0, 3, 2, 5, 4, 2, 4, 2, 6, 4, 6, 0, 4, 3, 0, 2, 1, 3, 1, 6, 0, 1, 2, 4, 0, 1,
            2, 2, 0, 0, 4, 4, 3, 4, 4, 1, 5, 4, 0, 4, 2, 3, 1, 5, 1, 1, 6, 2, 3, 2, 1, 3, 2, 4, 6,
            6, 0, 0, 0, 5, 6, 4, 6, 0, 6, 4, 1, 0, 1, 1, 5, 5, 5, 3, 0, 4, 5, 0, 1, 4, 3,
        ];
        assert_scores(
            "random_200",
            &labels,
            &clusters,
            Expected {
                acc: 0.235,
                nmi: 0.039557166257396977,
                ami: 0.003715587899394256,
                ari: 0.0012584772425365308,
            },
        );
    }

    #[test]
    fn expected_generated_5000_samples_30_classes_40_clusters() {
        let (labels, clusters) = generated(5000, 30, 40, 60, 7);
        assert_scores(
            "generated_5000",
            &labels,
            &clusters,
            Expected {
                acc: 0.6022,
                nmi: 0.46142584519742347,
                ami: 0.4420517980777811,
                ari: 0.381349926941776,
            },
        );
    }

    #[test]
    fn expected_generated_100000_samples_100_classes_100_clusters() {
        let (labels, clusters) = generated(100_000, 100, 100, 40, 2024);
        assert_scores(
            "generated_100000",
            &labels,
            &clusters,
            Expected {
                acc: 0.40735,
                nmi: 0.27321743095296996,
                ami: 0.2652475306048954,
                ari: 0.16113913028663288,
            },
        );
    }

    #[test]
    fn rejects_empty_and_mismatched_input() {
        for (labels, clusters) in [(&[][..], &[][..]), (&[1, 2][..], &[1][..]), (&[][..], &[0][..])]
        {
            match score(labels, clusters) {
                Err(Error::InvalidInput { op, reason }) => {
                    assert_eq!(op, "metrics::contingency");
                    assert!(!reason.is_empty());
                }
                other => panic!("{labels:?} vs {clusters:?}: expected InvalidInput, got {other:?}"),
            }
        }
    }

    #[test]
    fn contingency_keeps_only_occurring_ids() -> Result<()> {
        let table = contingency(&[0, 0, 0, 5, 5, 9, 9, 9], &[100, 100, 4, 4, 4, 100, 1, 1])?;
        assert_eq!(table.n(), 8);
        assert_eq!(table.classes(), &[0, 5, 9]);
        assert_eq!(table.clusters(), &[1, 4, 100]);
        assert_eq!(table.class_sizes(), &[3, 2, 3]);
        assert_eq!(table.cluster_sizes(), &[2, 3, 3]);
        assert_eq!(table.count(0, 100), 2);
        assert_eq!(table.count(9, 1), 2);
        assert_eq!(table.count(5, 100), 0);
        assert_eq!(table.count(3, 100), 0);
        assert_eq!(table.count(0, 7), 0);
        assert_eq!(table.cells().len(), 5);
        assert_eq!(table.cells().iter().map(|cell| cell.count).sum::<u64>(), 8);
        assert!(!table.is_perfect_match());
        assert_eq!(table.matched_count()?, 6);
        Ok(())
    }

    #[test]
    fn matching_is_independent_of_orientation() -> Result<()> {
        // 2 classes × 4 clusters and its transpose must match the same count.
        let labels = [0, 0, 0, 1, 1, 1, 1, 0];
        let clusters = [0, 1, 1, 2, 2, 3, 0, 0];
        assert_eq!(contingency(&labels, &clusters)?.matched_count()?, 4);
        assert_eq!(contingency(&clusters, &labels)?.matched_count()?, 4);
        Ok(())
    }

    #[test]
    fn large_singleton_tables_are_cheap() -> Result<()> {
        let n: u32 = 100_000;
        let ids: Vec<u32> = (0..n).collect();
        let s = score(&ids, &ids)?;
        assert_eq!((s.acc, s.nmi, s.ami, s.ari), (1.0, 1.0, 1.0, 1.0));

        // Pairs of singleton classes merged into one cluster: 50,000 blocks of 2×1.
        let merged: Vec<u32> = ids.iter().map(|id| id / 2).collect();
        let s = score(&ids, &merged)?;
        assert_eq!(s.acc, 0.5);
        // No pair of samples shares a class, so no pair agrees: ARI 0.
        assert_eq!(s.ari, 0.0);
        // MI = H(clusters) = ln(n/2), H(classes) = ln n.
        let half = f64::from(n / 2).ln();
        let want_nmi = half / (0.5 * (f64::from(n).ln() + half));
        assert!((s.nmi - want_nmi).abs() < 1e-12, "{} vs {want_nmi}", s.nmi);
        assert!(s.ami.is_finite() && s.ami <= 1.0);

        // One class spread over n singleton clusters: one 1×n block, no matrix built.
        let s = score(&vec![7; n as usize], &ids)?;
        assert_eq!(s.acc, 1.0 / f64::from(n));
        assert_eq!((s.nmi, s.ami, s.ari), (0.0, 0.0, 0.0));
        Ok(())
    }

    #[test]
    fn oversized_matching_block_is_an_error_not_a_panic() -> Result<()> {
        let table = contingency(&[0, 0, 1, 1, 2], &[0, 1, 1, 2, 2])?;
        assert_eq!(table.matched_count_within(9)?, 3);
        match table.matched_count_within(8) {
            Err(Error::InvalidInput { op: "metrics::matched_count", .. }) => Ok(()),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn scores_round_trip_through_serde() -> Result<()> {
        let s = score(&[0, 0, 1, 1, 2], &[1, 1, 0, 2, 2])?;
        let json = serde_json::to_string(&s).map_err(|e| Error::invalid("test", e.to_string()))?;
        let back: ClusteringScores =
            serde_json::from_str(&json).map_err(|e| Error::invalid("test", e.to_string()))?;
        assert_eq!(back, s);
        Ok(())
    }

    /// Up to 80 samples over 6 classes and 8 clusters, with a permutation of the
    /// cluster ids 0..8.
    fn clustering_with_relabelling() -> impl Strategy<Value = (Vec<u32>, Vec<u32>, Vec<u32>)> {
        (1_usize..80).prop_flat_map(|n| {
            (
                proptest::collection::vec(0_u32..6, n),
                proptest::collection::vec(0_u32..8, n),
                Just((0_u32..8).collect::<Vec<u32>>()).prop_shuffle(),
            )
        })
    }

    fn close(a: f64, b: f64) -> bool {
        // Relabelling reorders the columns, hence the floating-point sums.
        (a - b).abs() <= 1e-12
    }

    proptest! {
        #[test]
        fn scores_are_bounded_and_invariant(
            (labels, clusters, permutation) in clustering_with_relabelling()
        ) {
            let s = score(&labels, &clusters).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!((0.0..=1.0).contains(&s.acc), "acc {}", s.acc);
            prop_assert!((0.0..=1.0).contains(&s.nmi), "nmi {}", s.nmi);
            prop_assert!(s.ari <= 1.0 && s.ari >= -1.0, "ari {}", s.ari);
            prop_assert!(s.ami.is_finite() && s.ami <= 1.0 + 1e-12, "ami {}", s.ami);

            let relabelled: Vec<u32> =
                clusters.iter().map(|&c| permutation[c as usize]).collect();
            let r = score(&labels, &relabelled).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(r.acc, s.acc);
            prop_assert_eq!((r.n, r.classes, r.clusters_used), (s.n, s.classes, s.clusters_used));
            prop_assert!(close(r.nmi, s.nmi), "nmi {} vs {}", r.nmi, s.nmi);
            prop_assert!(close(r.ami, s.ami), "ami {} vs {}", r.ami, s.ami);
            prop_assert!(close(r.ari, s.ari), "ari {} vs {}", r.ari, s.ari);

            // All four scores are symmetric in ground truth and prediction.
            let t = score(&clusters, &labels).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(t.acc, s.acc);
            prop_assert!(close(t.nmi, s.nmi) && close(t.ami, s.ami) && close(t.ari, s.ari));
        }
    }
}
