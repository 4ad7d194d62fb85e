//! The uniform-prior cross-entropy of Self-Classifier, with its exact gradient.
//!
//! For a pair of views of the same batch, the *target* comes from view `a` and the
//! *prediction* from view `b`, both `N x C` logit matrices of one classifier head:
//!
//! - target: a softmax down each column (over the batch, temperature `col_temperature`),
//!   then each row normalised to sum to one;
//! - prediction: a softmax along each row (over the classes, temperature
//!   `row_temperature`), then each column normalised to sum to one and scaled by `N / C`,
//!   which is what puts the uniform prior on the classes;
//! - the pair's loss is `-(1/N) sum_{n,c} target[n,c] * ln(prediction[n,c])`.
//!
//! Both normalisations are done in log space (a normalised softmax is the softmax of the
//! log-softmax along the other axis), so every quantity stays finite for logits of any
//! finite size and for batches whose rows are all identical. The gradient flows through
//! the target as well as the prediction: the method has no stop-gradient.
//!
//! With several views, every ordered pair `(target view, prediction view)` of distinct views
//! counts, except pairs of two local views; the loss is the mean over counted pairs, and
//! [`multi_head_loss`] averages that over heads.
//!
//! ```
//! use ndarray::array;
//! use selfclass_runtime::loss::{uniform_prior_loss, LossParams};
//!
//! let view1 = array![[2.0f64, 0.0], [0.0, 2.0], [1.0, 0.5], [0.2, 0.1]];
//! let view2 = array![[1.5f64, 0.1], [0.3, 1.8], [0.9, 0.4], [0.0, 0.3]];
//! let out = uniform_prior_loss(&[view1.view(), view2.view()], &LossParams::default()).unwrap();
//! assert!(out.loss.is_finite());
//! assert_eq!(out.grads[0].dim(), (4, 2));
//! ```

use ndarray::{Array2, ArrayView2, NdFloat};

#[cfg(test)]
use ndarray::Axis;

use crate::{Error, Result};

/// Temperatures and view layout of the loss.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossParams {
    /// Temperature of the row softmax that gives the prediction (paper: 0.1).
    pub row_temperature: f64,
    /// Temperature of the column softmax over the batch that gives the target (paper: 0.05).
    pub col_temperature: f64,
    /// How many of the views, counted from the first, are global views; the rest are local
    /// crops, and pairs of two local crops are skipped.
    pub global_views: usize,
}

impl Default for LossParams {
    fn default() -> Self {
        LossParams { row_temperature: 0.1, col_temperature: 0.05, global_views: 2 }
    }
}

impl LossParams {
    /// Checks the parameters once, so a bad setting fails before any work starts.
    pub fn validate(&self) -> Result<()> {
        let positive = |t: f64| t.is_finite() && t > 0.0;
        if !positive(self.row_temperature) || !positive(self.col_temperature) {
            return Err(Error::invalid(
                "loss parameters",
                format!(
                    "temperatures must be finite and positive, got row {} and column {}",
                    self.row_temperature, self.col_temperature
                ),
            ));
        }
        if self.global_views == 0 {
            return Err(Error::invalid("loss parameters", "at least one global view is needed"));
        }
        Ok(())
    }

    /// Whether the ordered pair (target view `a`, prediction view `b`) counts.
    fn pair_counts(&self, a: usize, b: usize) -> bool {
        a != b && (a < self.global_views || b < self.global_views)
    }
}

/// The loss of one head and its gradient with respect to every view's logits.
#[derive(Debug, Clone)]
pub struct LossAndGrad<F> {
    /// Mean over the counted view pairs.
    pub loss: F,
    /// `grads[v]` is d loss / d logits of view `v`, the same shape as that view.
    pub grads: Vec<Array2<F>>,
}

/// Per-view quantities shared by every pair the view takes part in. All are stored class
/// by class (`C x N` row-major, the transpose of the logits), so that reductions over the
/// batch run along contiguous memory and reductions over the classes run element-wise
/// across rows: both vectorise, whatever the number of classes.
struct ViewTerms<F> {
    /// Row-normalised column softmax: the target this view gives.
    target: Vec<F>,
    /// Column softmax of the scaled logits (needed by the target's backward pass).
    col_softmax: Vec<F>,
    /// ln of (N/C times the column-normalised row softmax): the log-prediction.
    log_pred: Vec<F>,
    /// The column-normalised row softmax (needed by the prediction's backward pass).
    pred: Vec<F>,
    /// The plain row softmax (needed by the prediction's backward pass).
    row_softmax: Vec<F>,
}

/// `e^x` for every element, in place. f32 buffers take a branch-free polynomial the
/// compiler vectorises (relative error below 3e-7, inputs clamped to [-87, 88] so results
/// stay finite and normal); other types use the standard library's `exp`.
// A `Vec` rather than a slice: that is what can be checked to hold f32 without `unsafe`.
#[allow(clippy::ptr_arg)]
pub(crate) fn exp_in_place<F: NdFloat>(xs: &mut Vec<F>) {
    if let Some(xs) = (xs as &mut dyn std::any::Any).downcast_mut::<Vec<f32>>() {
        exp_f32(xs);
    } else {
        xs.iter_mut().for_each(|x| *x = x.exp());
    }
}

/// `e^x` for f32, with the widest vector instructions this processor has.
fn exp_f32(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the processor has AVX2 and FMA, checked just above.
        unsafe { exp_f32_avx2(xs) };
        return;
    }
    exp_f32_portable(xs);
}

/// [`exp_f32_portable`] compiled for AVX2 and FMA (8 lanes instead of SSE2's 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_f32_avx2(xs: &mut [f32]) {
    exp_f32_portable(xs);
}

/// `e^x = 2^k e^r` with `k = round(x / ln 2)` and `|r| <= ln(2) / 2`; `e^r` by its
/// degree-6 Taylor polynomial (truncation below 1.3e-7 relative), `2^k` built from bits.
#[inline(always)]
fn exp_f32_portable(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k * LN2_HI is exact for |k| < 2^8.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    for x in xs.iter_mut() {
        let v = if *x < -87.0 { -87.0 } else { *x };
        let v = if v > 88.0 { 88.0 } else { v };
        let t = v * LOG2E + SHIFTER;
        let k = t - SHIFTER;
        let r = v - k * LN2_HI - k * LN2_LO;
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
        let k_int = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
        *x = p * f32::from_bits(((k_int + 127) << 23) as u32);
    }
}

/// Accumulator lanes of the reductions below: independent partial results the compiler can
/// keep in one vector register.
const LANES: usize = 8;

/// Sum of `xs`, in [`LANES`] interleaved partial sums.
fn sum<F: NdFloat>(xs: &[F]) -> F {
    let mut acc = [F::zero(); LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder().iter().fold(F::zero(), |s, &v| s + v);
    for chunk in chunks {
        acc.iter_mut().zip(chunk).for_each(|(a, &v)| *a += v);
    }
    acc.iter().fold(rest, |s, &v| s + v)
}

/// Largest element of `xs` (`-inf` when empty).
fn max<F: NdFloat>(xs: &[F]) -> F {
    let mut acc = [F::neg_infinity(); LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder().iter().fold(F::neg_infinity(), |m, &v| if v > m { v } else { m });
    for chunk in chunks {
        acc.iter_mut().zip(chunk).for_each(|(a, &v)| *a = if v > *a { v } else { *a });
    }
    acc.iter().fold(rest, |m, &v| if v > m { v } else { m })
}

/// Dot product of `a` and `b`.
fn dot<F: NdFloat>(a: &[F], b: &[F]) -> F {
    let mut acc = [F::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest = ca.remainder().iter().zip(cb.remainder()).fold(F::zero(), |s, (&x, &y)| s + x * y);
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().fold(rest, |s, &v| s + v)
}

/// Softmax and log-softmax of `scale * x` along each contiguous row of `width` elements
/// (rows of `x` are `width` long), written into `soft` and `log`.
fn softmax_along<F: NdFloat>(x: &[F], width: usize, scale: F, soft: &mut Vec<F>, log: &mut Vec<F>) {
    log.clear();
    for row in x.chunks_exact(width) {
        let m = max(row) * scale;
        log.extend(row.iter().map(|&v| v * scale - m));
    }
    soft.clear();
    soft.extend_from_slice(log);
    exp_in_place(soft);
    for (lrow, srow) in log.chunks_exact_mut(width).zip(soft.chunks_exact_mut(width)) {
        let total = sum(srow);
        let (ln, inv) = (total.ln(), total.recip());
        lrow.iter_mut().for_each(|l| *l -= ln);
        srow.iter_mut().for_each(|s| *s *= inv);
    }
}

/// Softmax and log-softmax of `scale * x` across rows (for each position of a row of
/// `width` elements, over all rows), written into `soft` and `log`.
fn softmax_across<F: NdFloat>(
    x: &[F],
    width: usize,
    scale: F,
    soft: &mut Vec<F>,
    log: &mut Vec<F>,
) {
    let mut top = vec![F::neg_infinity(); width];
    for row in x.chunks_exact(width) {
        top.iter_mut().zip(row).for_each(|(m, &v)| *m = if v > *m { v } else { *m });
    }
    // scale > 0, so the largest scaled value is the scaled largest value.
    top.iter_mut().for_each(|m| *m *= scale);
    log.clear();
    for row in x.chunks_exact(width) {
        log.extend(row.iter().zip(&top).map(|(&v, &m)| v * scale - m));
    }
    soft.clear();
    soft.extend_from_slice(log);
    exp_in_place(soft);
    let totals = sums_across(soft, width);
    let ln_sum: Vec<F> = totals.iter().map(|s| s.ln()).collect();
    let inv_sum: Vec<F> = totals.iter().map(|s| s.recip()).collect();
    for (lrow, srow) in log.chunks_exact_mut(width).zip(soft.chunks_exact_mut(width)) {
        lrow.iter_mut().zip(&ln_sum).for_each(|(l, &ln)| *l -= ln);
        srow.iter_mut().zip(&inv_sum).for_each(|(s, &inv)| *s *= inv);
    }
}

/// For each position of a row of `width` elements, the sum over all rows.
fn sums_across<F: NdFloat>(x: &[F], width: usize) -> Vec<F> {
    let mut sums = vec![F::zero(); width];
    for row in x.chunks_exact(width) {
        sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
    }
    sums
}

/// The sum of each contiguous row of `width` elements.
fn sums_along<F: NdFloat>(x: &[F], width: usize) -> Vec<F> {
    x.chunks_exact(width).map(sum).collect()
}

/// `x` (`rows x cols`, any layout) transposed into a row-major `cols x rows` buffer.
fn transposed<F: NdFloat>(x: &ArrayView2<F>) -> Vec<F> {
    let (rows, cols) = x.dim();
    let mut out = vec![F::zero(); rows * cols];
    for (r, row) in x.rows().into_iter().enumerate() {
        // Rows of the logits are contiguous in practice; read them as slices then.
        match row.as_slice() {
            Some(values) => {
                values.iter().enumerate().for_each(|(c, &v)| out[c * rows + r] = v);
            }
            None => row.iter().enumerate().for_each(|(c, &v)| out[c * rows + r] = v),
        }
    }
    out
}

impl<F: NdFloat> ViewTerms<F> {
    /// The terms of one view's logits (`N x C`).
    fn new(logits: &ArrayView2<F>, params: &LossParams) -> Self {
        let (n, c) = logits.dim();
        let inv_col_t = F::from(1.0 / params.col_temperature).unwrap_or_else(F::one);
        let inv_row_t = F::from(1.0 / params.row_temperature).unwrap_or_else(F::one);
        let scale_ln = (F::from(n).unwrap_or_else(F::one) / F::from(c).unwrap_or_else(F::one)).ln();
        // Class by class: each row holds one class's logits over the batch.
        let x = transposed(logits);
        let buf = || Vec::with_capacity(n * c);

        // Target: softmax over classes of the log-softmax over the batch.
        let (mut col_softmax, mut col_log) = (buf(), buf());
        softmax_along(&x, n, inv_col_t, &mut col_softmax, &mut col_log);
        let (mut target, mut scratch) = (buf(), buf());
        softmax_across(&col_log, n, F::one(), &mut target, &mut scratch);

        // Prediction: log-softmax over the batch of the log-softmax over classes, + ln(N/C).
        let (mut row_softmax, mut row_log) = (buf(), buf());
        softmax_across(&x, n, inv_row_t, &mut row_softmax, &mut row_log);
        let (mut pred, mut log_pred) = (col_log, scratch);
        softmax_along(&row_log, n, F::one(), &mut pred, &mut log_pred);
        log_pred.iter_mut().for_each(|v| *v += scale_ln);

        ViewTerms { target, col_softmax, log_pred, pred, row_softmax }
    }
}

/// The gradient with respect to one view's logits, class by class (`C x N`), from
/// d loss / d target (`dt`) and d loss / d log-prediction (`dl`), through both softmax
/// chains; `n` is the batch size.
fn view_backward<F: NdFloat>(
    t: &ViewTerms<F>,
    dt: &[F],
    dl: &[F],
    n: usize,
    inv_col_t: F,
    inv_row_t: F,
) -> Vec<F> {
    // Target side: target = softmax over classes of col_log, col_log = log-softmax over
    // the batch of x / col_t:
    //   d col_log = target * (dt - sum over classes of (target * dt))
    //   d x      += (d col_log - col_softmax * (sum over the batch of d col_log)) / col_t
    let mut d_col_log: Vec<F> = t.target.iter().zip(dt).map(|(&y, &d)| y * d).collect();
    let dots = sums_across(&d_col_log, n);
    for (row, trow) in d_col_log.chunks_exact_mut(n).zip(t.target.chunks_exact(n)) {
        row.iter_mut().zip(trow).zip(&dots).for_each(|((v, &y), &dot)| *v -= y * dot);
    }
    let batch_totals = sums_along(&d_col_log, n);
    // Prediction side: log_pred = ln(N/C) + log-softmax over the batch of row_log,
    // row_log = log-softmax over classes of x / row_t:
    //   d row_log = dl - pred * (sum over the batch of dl)
    //   d x      += (d row_log - row_softmax * (sum over classes of d row_log)) / row_t
    let dl_totals = sums_along(dl, n);
    let mut d_row_log: Vec<F> = Vec::with_capacity(dl.len());
    for ((row, prow), &total) in dl.chunks_exact(n).zip(t.pred.chunks_exact(n)).zip(&dl_totals) {
        d_row_log.extend(row.iter().zip(prow).map(|(&d, &p)| d - p * total));
    }
    let class_totals = sums_across(&d_row_log, n);

    let mut grad = d_col_log;
    let rows = grad
        .chunks_exact_mut(n)
        .zip(t.col_softmax.chunks_exact(n))
        .zip(d_row_log.chunks_exact(n).zip(t.row_softmax.chunks_exact(n)))
        .zip(&batch_totals);
    for (((g, cs), (drl, rs)), &bt) in rows {
        for ((((g, &cs), &drl), &rs), &ct) in
            g.iter_mut().zip(cs).zip(drl).zip(rs).zip(&class_totals)
        {
            *g = (*g - cs * bt) * inv_col_t + (drl - rs * ct) * inv_row_t;
        }
    }
    grad
}

/// The uniform-prior loss of one head over any number of views, with its gradient.
///
/// `views[v]` holds the logits of view `v` (`N x C`, the same shape for every view); the
/// first `params.global_views` views are global, the rest local crops.
pub fn uniform_prior_loss<F: NdFloat>(
    views: &[ArrayView2<F>],
    params: &LossParams,
) -> Result<LossAndGrad<F>> {
    params.validate()?;
    let shape = check_views(views)?;
    let (n, c) = shape;
    let terms: Vec<ViewTerms<F>> = views.iter().map(|v| ViewTerms::new(v, params)).collect();

    let pairs: Vec<(usize, usize)> = (0..views.len())
        .flat_map(|a| (0..views.len()).map(move |b| (a, b)))
        .filter(|&(a, b)| params.pair_counts(a, b))
        .collect();
    if pairs.is_empty() {
        return Err(Error::invalid(
            "uniform-prior loss",
            format!(
                "{} views with {} global give no pair to compare",
                views.len(),
                params.global_views
            ),
        ));
    }

    let pair_weight = F::one() / F::from(pairs.len()).unwrap_or_else(F::one);
    let per_sample = F::one() / F::from(n).unwrap_or_else(F::one);
    // d(pair loss)/d(target) and d(pair loss)/d(log_pred), accumulated per view first, so
    // each view's backward pass through its softmaxes runs once however many pairs it is in.
    let mut d_target: Vec<Vec<F>> = views.iter().map(|_| vec![F::zero(); n * c]).collect();
    let mut d_log_pred: Vec<Vec<F>> = views.iter().map(|_| vec![F::zero(); n * c]).collect();
    let mut loss = F::zero();
    let weight = pair_weight * per_sample;

    for &(a, b) in &pairs {
        let target = &terms[a].target;
        let log_pred = &terms[b].log_pred;
        loss -= weight * dot(target, log_pred);
        d_target[a].iter_mut().zip(log_pred).for_each(|(d, &l)| *d -= weight * l);
        d_log_pred[b].iter_mut().zip(target).for_each(|(d, &t)| *d -= weight * t);
    }

    let inv_col_t = F::from(1.0 / params.col_temperature).unwrap_or_else(F::one);
    let inv_row_t = F::from(1.0 / params.row_temperature).unwrap_or_else(F::one);
    let grads = terms
        .iter()
        .zip(d_target.iter().zip(&d_log_pred))
        .map(|(t, (dt, dl))| {
            let g = view_backward(t, dt, dl, n, inv_col_t, inv_row_t);
            // Back from class by class to the logits' `N x C`.
            Array2::from_shape_vec((c, n), g)
                .map(|g| g.reversed_axes().as_standard_layout().into_owned())
                .map_err(|e| Error::invalid("uniform-prior loss", e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;

    Ok(LossAndGrad { loss, grads })
}

/// The loss averaged over several heads: `heads[h][v]` holds head `h`'s logits for view `v`.
/// Returns the mean loss and, per head and view, its gradient (already divided by the
/// number of heads).
pub fn multi_head_loss<F: NdFloat>(
    heads: &[Vec<ArrayView2<F>>],
    params: &LossParams,
) -> Result<(F, Vec<Vec<Array2<F>>>)> {
    if heads.is_empty() {
        return Err(Error::invalid("uniform-prior loss", "no head given"));
    }
    let head_weight = F::one() / F::from(heads.len()).unwrap_or_else(F::one);
    let mut total = F::zero();
    let mut all_grads = Vec::with_capacity(heads.len());
    for views in heads {
        let LossAndGrad { loss, mut grads } = uniform_prior_loss(views, params)?;
        total += loss * head_weight;
        grads.iter_mut().for_each(|g| g.mapv_inplace(|v| v * head_weight));
        all_grads.push(grads);
    }
    Ok((total, all_grads))
}

fn check_views<F: NdFloat>(views: &[ArrayView2<F>]) -> Result<(usize, usize)> {
    let Some(first) = views.first() else {
        return Err(Error::invalid("uniform-prior loss", "no view given"));
    };
    let shape = first.dim();
    if shape.0 == 0 || shape.1 == 0 {
        return Err(Error::invalid(
            "uniform-prior loss",
            format!("empty logits of shape {shape:?}"),
        ));
    }
    for (v, view) in views.iter().enumerate() {
        if view.dim() != shape {
            return Err(Error::invalid(
                "uniform-prior loss",
                format!("view {v} has shape {:?}, view 0 has {shape:?}", view.dim()),
            ));
        }
        let all_finite = view.rows().into_iter().all(|row| match row.as_slice() {
            Some(values) => values.iter().all(|x| x.is_finite()),
            None => row.iter().all(|x| x.is_finite()),
        });
        if !all_finite {
            return Err(Error::invalid(
                "uniform-prior loss",
                format!("view {v} holds a non-finite logit"),
            ));
        }
    }
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random_logits(rng: &mut StdRng, n: usize, c: usize, scale: f64) -> Array2<f64> {
        Array2::from_shape_fn((n, c), |_| rng.gen_range(-1.0..1.0) * scale)
    }

    /// The loss written directly from its definition, with no log-space tricks: the values
    /// the optimised version must reproduce where the direct form does not underflow.
    fn direct_loss(views: &[Array2<f64>], params: &LossParams) -> f64 {
        let (n, c) = views[0].dim();
        let target = |x: &Array2<f64>| {
            let mut e = x.mapv(|v| (v / params.col_temperature).exp());
            let col = e.sum_axis(Axis(0));
            e /= &col;
            let row = e.sum_axis(Axis(1)).insert_axis(Axis(1));
            e / &row
        };
        let pred = |x: &Array2<f64>| {
            let mut e = x.mapv(|v| (v / params.row_temperature).exp());
            let row = e.sum_axis(Axis(1)).insert_axis(Axis(1));
            e /= &row;
            let col = e.sum_axis(Axis(0));
            e / &col * (n as f64 / c as f64)
        };
        let (mut total, mut pairs) = (0.0, 0);
        for a in 0..views.len() {
            for b in 0..views.len() {
                if !params.pair_counts(a, b) {
                    continue;
                }
                let (t, p) = (target(&views[a]), pred(&views[b]));
                total -= (&t * &p.mapv(f64::ln)).sum() / n as f64;
                pairs += 1;
            }
        }
        total / pairs as f64
    }

    fn loss_of(views: &[Array2<f64>], params: &LossParams) -> LossAndGrad<f64> {
        let refs: Vec<_> = views.iter().map(|v| v.view()).collect();
        uniform_prior_loss(&refs, params).expect("valid views")
    }

    /// Central differences with step 1e-5 in f64: truncation error O(h^2) ~ 1e-10 times the
    /// third derivative, rounding ~ 1e-16 / 1e-5; 1e-6 relative leaves a wide margin.
    fn check_gradient(views: &[Array2<f64>], params: &LossParams) {
        let analytic = loss_of(views, params).grads;
        let h = 1e-5;
        for v in 0..views.len() {
            for idx in 0..views[v].len() {
                let (r, c) = (idx / views[v].ncols(), idx % views[v].ncols());
                let mut plus = views.to_vec();
                plus[v][[r, c]] += h;
                let mut minus = views.to_vec();
                minus[v][[r, c]] -= h;
                let numeric =
                    (loss_of(&plus, params).loss - loss_of(&minus, params).loss) / (2.0 * h);
                let got = analytic[v][[r, c]];
                let tol = 1e-6 * (1.0 + numeric.abs());
                assert!(
                    (got - numeric).abs() <= tol,
                    "view {v} [{r},{c}]: analytic {got} vs numeric {numeric}"
                );
            }
        }
    }

    #[test]
    fn hand_worked_two_by_two_case() {
        // Temperatures 1 and logits [[ln 3, 0], [0, 0]] in both views:
        // target = [[3/5, 2/5], [1/3, 2/3]], prediction (with N/C = 1) = [[3/5, 1/3], [2/5, 2/3]].
        let x = array![[3f64.ln(), 0.0], [0.0, 0.0]];
        let params = LossParams { row_temperature: 1.0, col_temperature: 1.0, global_views: 2 };
        let out = loss_of(&[x.clone(), x], &params);
        let expected = -0.5
            * (0.6 * 0.6f64.ln()
                + 0.4 * (1.0f64 / 3.0).ln()
                + (1.0 / 3.0) * 0.4f64.ln()
                + (2.0 / 3.0) * (2.0f64 / 3.0).ln());
        assert!((out.loss - expected).abs() < 1e-14, "{} vs {expected}", out.loss);
    }

    #[test]
    fn uniform_logits_give_ln_classes() {
        // All-equal logits: target and prediction are both uniform 1/C per row.
        let x = Array2::<f64>::zeros((6, 4));
        let out = loss_of(&[x.clone(), x], &LossParams::default());
        assert!((out.loss - 4f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn matches_the_direct_definition() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(n, c, views, global) in &[(8, 3, 2, 2), (16, 5, 4, 2), (5, 7, 3, 1), (12, 4, 3, 3)] {
            let params = LossParams { global_views: global, ..LossParams::default() };
            let xs: Vec<_> = (0..views).map(|_| random_logits(&mut rng, n, c, 0.3)).collect();
            let got = loss_of(&xs, &params).loss;
            let want = direct_loss(&xs, &params);
            assert!((got - want).abs() < 1e-10 * (1.0 + want.abs()), "{got} vs {want}");
        }
    }

    #[test]
    fn gradient_matches_central_differences() {
        let mut rng = StdRng::seed_from_u64(11);
        for &(n, c, views, global, scale) in
            &[(6, 3, 2, 2, 1.0), (8, 4, 4, 2, 0.5), (5, 6, 3, 1, 2.0), (4, 2, 2, 2, 0.05)]
        {
            let params = LossParams { global_views: global, ..LossParams::default() };
            let xs: Vec<_> = (0..views).map(|_| random_logits(&mut rng, n, c, scale)).collect();
            check_gradient(&xs, &params);
        }
    }

    #[test]
    fn gradient_matches_with_other_temperatures() {
        let mut rng = StdRng::seed_from_u64(3);
        let params = LossParams { row_temperature: 0.7, col_temperature: 0.2, global_views: 2 };
        let xs: Vec<_> = (0..3).map(|_| random_logits(&mut rng, 7, 5, 1.0)).collect();
        check_gradient(&xs, &params);
    }

    #[test]
    fn finite_for_huge_logits() {
        let mut rng = StdRng::seed_from_u64(5);
        let xs: Vec<_> = (0..2).map(|_| random_logits(&mut rng, 32, 10, 1e4)).collect();
        let out = loss_of(&xs, &LossParams::default());
        assert!(out.loss.is_finite());
        assert!(out.grads.iter().all(|g| g.iter().all(|v| v.is_finite())));

        let xs32: Vec<Array2<f32>> = xs.iter().map(|x| x.mapv(|v| v as f32)).collect();
        let refs: Vec<_> = xs32.iter().map(|v| v.view()).collect();
        let out32 = uniform_prior_loss(&refs, &LossParams::default()).expect("valid");
        assert!(out32.loss.is_finite());
        assert!(out32.grads.iter().all(|g| g.iter().all(|v| v.is_finite())));
    }

    #[test]
    fn finite_for_a_batch_of_identical_samples() {
        let row = array![[3.0f64, -1.0, 0.5, 2.0]];
        let x = row.broadcast((64, 4)).expect("broadcast").to_owned();
        let out = loss_of(&[x.clone(), x.clone()], &LossParams::default());
        assert!(out.loss.is_finite());
        assert!(out.grads.iter().all(|g| g.iter().all(|v| v.is_finite())));
        check_gradient(
            &[x.slice(ndarray::s![..6, ..]).to_owned(), x.slice(ndarray::s![..6, ..]).to_owned()],
            &LossParams::default(),
        );
    }

    #[test]
    fn f32_agrees_with_f64() {
        let mut rng = StdRng::seed_from_u64(9);
        let xs: Vec<_> = (0..2).map(|_| random_logits(&mut rng, 64, 10, 1.0)).collect();
        let want = loss_of(&xs, &LossParams::default());
        let xs32: Vec<Array2<f32>> = xs.iter().map(|x| x.mapv(|v| v as f32)).collect();
        let refs: Vec<_> = xs32.iter().map(|v| v.view()).collect();
        let got = uniform_prior_loss(&refs, &LossParams::default()).expect("valid");
        assert!((got.loss as f64 - want.loss).abs() < 1e-4);
        for (g, w) in got.grads.iter().zip(&want.grads) {
            for (a, b) in g.iter().zip(w.iter()) {
                assert!((*a as f64 - b).abs() < 1e-5 + 1e-3 * b.abs());
            }
        }
    }

    #[test]
    fn multi_head_averages_heads() {
        let mut rng = StdRng::seed_from_u64(1);
        let h1: Vec<_> = (0..2).map(|_| random_logits(&mut rng, 8, 3, 1.0)).collect();
        let h2: Vec<_> = (0..2).map(|_| random_logits(&mut rng, 8, 6, 1.0)).collect();
        let params = LossParams::default();
        let (l1, l2) = (loss_of(&h1, &params), loss_of(&h2, &params));
        let heads =
            vec![h1.iter().map(|v| v.view()).collect(), h2.iter().map(|v| v.view()).collect()];
        let (loss, grads) = multi_head_loss(&heads, &params).expect("valid");
        assert!((loss - 0.5 * (l1.loss + l2.loss)).abs() < 1e-12);
        assert!((&grads[1][0] - &(&l2.grads[0] * 0.5)).iter().all(|d| d.abs() < 1e-12));
    }

    #[test]
    fn rejects_bad_input() {
        let a = Array2::<f64>::zeros((4, 3));
        let b = Array2::<f64>::zeros((4, 2));
        let params = LossParams::default();
        assert!(uniform_prior_loss::<f64>(&[], &params).is_err());
        assert!(uniform_prior_loss(&[a.view(), b.view()], &params).is_err());
        let mut nan = a.clone();
        nan[[0, 0]] = f64::NAN;
        assert!(uniform_prior_loss(&[a.view(), nan.view()], &params).is_err());
        let bad = LossParams { row_temperature: 0.0, ..params };
        assert!(uniform_prior_loss(&[a.view(), a.view()], &bad).is_err());
        let one_global = LossParams { global_views: 1, ..params };
        assert!(uniform_prior_loss(&[a.view()], &one_global).is_err());
    }

    #[test]
    fn fast_exp_matches_the_standard_library() {
        let mut worst = 0.0f64;
        let inputs: Vec<f32> = (-8700..=8800).map(|i| i as f32 * 0.01).collect();
        let mut got = inputs.clone();
        exp_in_place(&mut got);
        for (&x, &y) in inputs.iter().zip(&got) {
            let want = (x as f64).exp();
            worst = worst.max(((y as f64) - want).abs() / want);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        let mut edges = vec![0.0f32, -1e30, 1e30, -87.5];
        exp_in_place(&mut edges);
        assert_eq!(edges[0], 1.0);
        assert!(edges.iter().all(|v| v.is_finite() && *v > 0.0), "{edges:?}");
        let mut wide = vec![-1.0f64, 0.5];
        exp_in_place(&mut wide);
        assert_eq!(wide, vec![(-1.0f64).exp(), 0.5f64.exp()]);
    }
}
