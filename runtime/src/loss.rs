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
//! Each second normalisation divides by the sums of the first softmax (two exponentials per
//! logit in all); where such a sum is small enough that the exponentials under it may have
//! underflowed, that sample's target or that class's prediction is taken in log space
//! instead (a normalised softmax is the softmax of the log-softmax along the other axis),
//! so every quantity stays exact and finite for logits of any finite size and for batches
//! whose rows are all identical. The gradient flows through the target as well as the
//! prediction: the method has no stop-gradient.
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

/// Work buffers of [`class_major_loss`], kept by callers that evaluate the loss step after
/// step: once they have grown to a step's shapes, a step allocates nothing.
#[derive(Debug, Clone)]
pub(crate) struct LossWork<F> {
    views: Vec<ViewTerms<F>>,
    /// d loss / d target and d loss / d log-prediction of the view being differentiated
    /// (`C x N`).
    d_target: Vec<F>,
    d_log_pred: Vec<F>,
    /// Per sample, over classes: `sum_c target * d_target` and `sum_c d row_log`.
    target_dots: Vec<F>,
    row_log_totals: Vec<F>,
    /// Per class, over the batch: `sum_n target * d_target` and `sum_n d_log_pred`.
    class_dots: Vec<F>,
    log_pred_totals: Vec<F>,
    /// One column of the logits, for the rare samples whose target needs the slow path.
    column: Vec<F>,
}

/// What the forward pass keeps of one view, for every pair the view takes part in. The
/// `C x N` buffers are stored class by class (row-major, the transpose of the logits), so
/// reductions over the batch run along contiguous memory and reductions over the classes
/// run element-wise across rows: both vectorise, whatever the number of classes.
///
/// Only two exponentials per logit are taken (the column softmax and the row softmax); the
/// two second normalisations divide by sums. Where such a sum is so small that the
/// exponentials under it may have underflowed (below [`Consts::tiny`]), that one column or
/// row is redone in log space, so every quantity stays exact and finite.
#[derive(Debug, Clone)]
struct ViewTerms<F> {
    /// The target this view gives: the column softmax, each sample renormalised over classes.
    target: Vec<F>,
    /// The column-normalised row softmax (the prediction without its factor `N / C`).
    pred: Vec<F>,
    /// Per sample: `sum_c col_softmax`, so that `col_softmax = target * col_total`.
    col_total: Vec<F>,
    /// Per sample: the log-normaliser of the row softmax, `row_log = x / Tr - row_lse`.
    row_lse: Vec<F>,
    /// Per class: `sum_n row_softmax`, so that `row_softmax = pred * pred_total`.
    pred_total: Vec<F>,
    /// Per class: `ln pred_total - ln(N / C)`, so that
    /// `log_pred = x / Tr - row_lse - pred_shift`.
    pred_shift: Vec<F>,
    /// Per class: the log-normaliser of the column softmax, `col_log = x / Tc - col_lse`.
    col_lse: Vec<F>,
    /// Per sample: reciprocals of the row softmax's and of `col_total`'s sums (scratch).
    inv_row_sum: Vec<F>,
    inv_col_total: Vec<F>,
}

// Written out: deriving `Default` would ask it of `F`.
impl<F> Default for LossWork<F> {
    fn default() -> Self {
        LossWork {
            views: Vec::new(),
            d_target: Vec::new(),
            d_log_pred: Vec::new(),
            target_dots: Vec::new(),
            row_log_totals: Vec::new(),
            class_dots: Vec::new(),
            log_pred_totals: Vec::new(),
            column: Vec::new(),
        }
    }
}

impl<F> Default for ViewTerms<F> {
    fn default() -> Self {
        ViewTerms {
            target: Vec::new(),
            pred: Vec::new(),
            col_total: Vec::new(),
            row_lse: Vec::new(),
            pred_total: Vec::new(),
            pred_shift: Vec::new(),
            col_lse: Vec::new(),
            inv_row_sum: Vec::new(),
            inv_col_total: Vec::new(),
        }
    }
}

/// Constants of one evaluation.
#[derive(Debug, Clone, Copy)]
struct Consts<F> {
    inv_col_t: F,
    inv_row_t: F,
    /// `ln(N / C)`: the uniform prior's scale, in log space.
    ln_ratio: F,
    /// Sums below this take the log-space path: the square root of the smallest normal
    /// number, so that anything an exponential lost to underflow or to the f32 polynomial's
    /// clamp is negligible next to a sum above it.
    tiny: F,
}

/// Resizes `buf` to `len` without touching the elements it keeps (they are overwritten).
fn fit<F: NdFloat>(buf: &mut Vec<F>, len: usize) {
    buf.resize(len, F::zero());
}

impl<F: NdFloat> ViewTerms<F> {
    fn fit(&mut self, classes: usize, batch: usize) {
        for buf in [&mut self.target, &mut self.pred] {
            fit(buf, classes * batch);
        }
        for buf in [&mut self.col_total, &mut self.row_lse, &mut self.inv_row_sum] {
            fit(buf, batch);
        }
        fit(&mut self.inv_col_total, batch);
        for buf in [&mut self.pred_total, &mut self.pred_shift, &mut self.col_lse] {
            fit(buf, classes);
        }
    }
}

/// `e^x` for every element, in place. f32 takes a branch-free polynomial the compiler
/// vectorises (relative error below 3e-7, inputs clamped to [-87, 88] so results stay
/// finite and normal); other types use the standard library's `exp`.
#[inline(always)]
fn exp_slice<F: NdFloat>(xs: &mut [F]) {
    match as_f32(xs) {
        Some(xs) => exp_f32(xs),
        None => xs.iter_mut().for_each(|x| *x = x.exp()),
    }
}

/// `xs` as f32, when `F` is f32.
#[inline(always)]
fn as_f32<F: NdFloat>(xs: &mut [F]) -> Option<&mut [f32]> {
    if std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>() {
        // SAFETY: `F` is `f32` (same type id), so the slice already is a `[f32]`.
        Some(unsafe { &mut *(xs as *mut [F] as *mut [f32]) })
    } else {
        None
    }
}

/// [`exp_slice`] on a vector (for the test of the polynomial against the standard library).
#[cfg(test)]
#[allow(clippy::ptr_arg)]
pub(crate) fn exp_in_place<F: NdFloat>(xs: &mut Vec<F>) {
    exp_slice(xs);
}

/// `e^x` for f32, with fused multiply-adds where the processor has them.
#[inline(always)]
fn exp_f32(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the processor has FMA, checked just above.
        unsafe { exp_f32_fma(xs) };
        return;
    }
    exp_f32_lanes::<false>(xs);
}

/// [`exp_f32_lanes`] with fused multiply-adds (inlined into callers compiled for wider
/// vectors, which then get those too).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
#[inline]
unsafe fn exp_f32_fma(xs: &mut [f32]) {
    exp_f32_lanes::<true>(xs);
}

/// `e^x = 2^k e^r` with `k = round(x / ln 2)` and `|r| <= ln(2) / 2`; `e^r` by its
/// degree-6 Taylor polynomial (truncation below 1.3e-7 relative), `2^k` built from bits.
/// `FMA` evaluates each `a * b + c` with one rounding (only where the processor has it:
/// elsewhere `mul_add` is a slow library call).
#[inline(always)]
fn exp_f32_lanes<const FMA: bool>(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k * LN2_HI is exact for |k| < 2^8.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    for x in xs.iter_mut() {
        let v = if *x < -87.0 { -87.0 } else { *x };
        let v = if v > 88.0 { 88.0 } else { v };
        let mad = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
        let t = mad(v, LOG2E, SHIFTER);
        let k = t - SHIFTER;
        let r = mad(-k, LN2_LO, mad(-k, LN2_HI, v));
        let p = [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0]
            .into_iter()
            .fold(1.0 / 720.0, |acc, coeff| mad(acc, r, coeff));
        let k_int = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
        *x = p * f32::from_bits(((k_int + 127) << 23) as u32);
    }
}

/// [`evaluate`] compiled for AVX-512 or for AVX2 and FMA when the processor has them (16
/// or 8 f32 lanes instead of SSE2's 4): everything it calls is inlined into it, so all of
/// the loss's loops get those instructions.
fn evaluate_simd<F: NdFloat>(
    work: &mut LossWork<F>,
    e: &Evaluation<F>,
    grads: &mut [&mut [F]],
) -> F {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f")
            && has!("avx512vl")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("fma")
        {
            // SAFETY: the processor has every feature the function is compiled for.
            return unsafe { evaluate_avx512(work, e, grads) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: as above.
            return unsafe { evaluate_avx2(work, e, grads) };
        }
    }
    evaluate(work, e, grads)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn evaluate_avx512<F: NdFloat>(
    work: &mut LossWork<F>,
    e: &Evaluation<F>,
    grads: &mut [&mut [F]],
) -> F {
    evaluate(work, e, grads)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn evaluate_avx2<F: NdFloat>(
    work: &mut LossWork<F>,
    e: &Evaluation<F>,
    grads: &mut [&mut [F]],
) -> F {
    evaluate(work, e, grads)
}

/// Forward pass over every view, then each view's backward pass; returns the loss.
#[inline(always)]
fn evaluate<F: NdFloat>(work: &mut LossWork<F>, e: &Evaluation<F>, grads: &mut [&mut [F]]) -> F {
    for (terms, x) in work.views.iter_mut().zip(e.views) {
        terms.forward(x, e.classes, e.batch, &e.k, &mut work.column);
    }
    let mut loss = F::zero();
    for (a, grad) in grads.iter_mut().enumerate() {
        loss += work.backward(a, e, grad);
    }
    loss
}

/// Accumulator lanes of the reductions below: independent partial results the compiler can
/// keep in vector registers.
const LANES: usize = 16;

/// Sum of `xs`, in [`LANES`] interleaved partial sums.
#[inline(always)]
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
#[inline(always)]
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
#[inline(always)]
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

/// `acc += a * b` element-wise; returns `sum(a * b)`.
#[inline(always)]
fn accumulate_products<F: NdFloat>(acc: &mut [F], a: &[F], b: &[F]) -> F {
    let mut lanes = [F::zero(); LANES];
    let whole = acc.len().min(a.len()).min(b.len()) / LANES * LANES;
    let chunks = acc[..whole].chunks_exact_mut(LANES).zip(a.chunks_exact(LANES));
    for ((acc, a), b) in chunks.zip(b.chunks_exact(LANES)) {
        for i in 0..LANES {
            let p = a[i] * b[i];
            acc[i] += p;
            lanes[i] += p;
        }
    }
    let mut rest = F::zero();
    for ((acc, &a), &b) in acc[whole..].iter_mut().zip(&a[whole..]).zip(&b[whole..]) {
        *acc += a * b;
        rest += a * b;
    }
    lanes.iter().fold(rest, |s, &v| s + v)
}

/// `xs` as `x * scale - shift`, then `e^` of that, in `out`; returns the sum of `out`.
#[inline(always)]
fn exp_shifted<F: NdFloat>(out: &mut [F], xs: &[F], scale: F, shift: F) -> F {
    out.iter_mut().zip(xs).for_each(|(o, &x)| *o = x * scale - shift);
    exp_slice(out);
    sum(out)
}

/// Softmax in place of `xs` (any finite values), returning its log-normaliser
/// `ln sum e^x`.
#[inline(always)]
fn softmax_in_place<F: NdFloat>(xs: &mut [F]) -> F {
    let m = max(xs);
    xs.iter_mut().for_each(|x| *x -= m);
    exp_slice(xs);
    let total = sum(xs);
    let inv = total.recip();
    xs.iter_mut().for_each(|x| *x *= inv);
    m + total.ln()
}

impl<F: NdFloat> ViewTerms<F> {
    /// The forward pass over one view's logits `x` (`C x N`, class by class).
    #[inline(always)]
    fn forward(&mut self, x: &[F], classes: usize, batch: usize, k: &Consts<F>, column: &mut [F]) {
        self.fit(classes, batch);
        // Each class's largest logit over the batch, each sample's over the classes.
        self.row_lse.iter_mut().for_each(|m| *m = F::neg_infinity());
        for (c, row) in x.chunks_exact(batch).enumerate() {
            self.col_lse[c] = max(row);
            self.row_lse.iter_mut().zip(row).for_each(|(m, &v)| *m = if v > *m { v } else { *m });
        }
        // scale > 0, so the largest scaled value is the scaled largest value.
        self.row_lse.iter_mut().for_each(|m| *m *= k.inv_row_t);

        // The column softmax (over the batch, in `target` for now) and the row softmax's
        // exponentials (in `pred`), summed over classes per sample as they come.
        self.col_total.iter_mut().for_each(|t| *t = F::zero());
        self.inv_row_sum.iter_mut().for_each(|t| *t = F::zero());
        let rows = x.chunks_exact(batch).zip(self.target.chunks_exact_mut(batch));
        for ((c, (row, soft)), exps) in rows.enumerate().zip(self.pred.chunks_exact_mut(batch)) {
            let top = self.col_lse[c] * k.inv_col_t;
            let total = exp_shifted(soft, row, k.inv_col_t, top);
            self.col_lse[c] = top + total.ln();
            let inv = total.recip();
            for (t, s) in self.col_total.iter_mut().zip(soft.iter_mut()) {
                *s *= inv;
                *t += *s;
            }
            exps.iter_mut().zip(row).zip(&self.row_lse).for_each(|((e, &v), &m)| {
                *e = v * k.inv_row_t - m;
            });
            exp_slice(exps);
            self.inv_row_sum.iter_mut().zip(exps.iter()).for_each(|(s, &e)| *s += e);
        }
        for (lse, s) in self.row_lse.iter_mut().zip(self.inv_row_sum.iter_mut()) {
            *lse += s.ln();
            *s = s.recip();
        }

        // Samples whose column softmax all but vanished get their target in log space.
        for (n, (total, inv)) in self.col_total.iter_mut().zip(&mut self.inv_col_total).enumerate()
        {
            if *total >= k.tiny {
                *inv = total.recip();
            } else {
                *total = rescue_target(&mut self.target, x, &self.col_lse, n, batch, k, column);
                *inv = F::one();
            }
        }

        // Second normalisations: the target over classes, the prediction over the batch.
        let rows = x.chunks_exact(batch).zip(self.target.chunks_exact_mut(batch));
        for ((c, (row, target)), pred) in rows.enumerate().zip(self.pred.chunks_exact_mut(batch)) {
            target.iter_mut().zip(&self.inv_col_total).for_each(|(t, &inv)| *t *= inv);
            let total = dot(pred, &self.inv_row_sum);
            let ln_total = if total >= k.tiny {
                let inv = total.recip();
                pred.iter_mut().zip(&self.inv_row_sum).for_each(|(p, &s)| *p *= s * inv);
                self.pred_total[c] = total;
                total.ln()
            } else {
                // The class is all but absent from the batch: its prediction in log space.
                pred.iter_mut().zip(row).zip(&self.row_lse).for_each(|((p, &v), &lse)| {
                    *p = v * k.inv_row_t - lse;
                });
                let ln_total = softmax_in_place(pred);
                self.pred_total[c] = ln_total.exp();
                ln_total
            };
            self.pred_shift[c] = ln_total - k.ln_ratio;
        }
    }
}

/// The target of sample `n` in log space (softmax over classes of the column log-softmax),
/// written into `target`'s column `n`; returns that column's `sum_c col_softmax`.
#[inline(always)]
fn rescue_target<F: NdFloat>(
    target: &mut [F],
    x: &[F],
    col_lse: &[F],
    n: usize,
    batch: usize,
    k: &Consts<F>,
    column: &mut [F],
) -> F {
    for (c, v) in column.iter_mut().enumerate() {
        *v = x[c * batch + n] * k.inv_col_t - col_lse[c];
    }
    let ln_total = softmax_in_place(column);
    for (c, &v) in column.iter().enumerate() {
        target[c * batch + n] = v;
    }
    ln_total.exp()
}

/// `dst (+)= coeff * log_pred` for one class row of a view: `first` writes, later calls add.
#[inline(always)]
fn add_log_pred<F: NdFloat>(
    dst: &mut [F],
    logits: &[F],
    terms: &ViewTerms<F>,
    class: usize,
    coeff: F,
    k: &Consts<F>,
    first: bool,
) {
    let shift = terms.pred_shift[class];
    let values =
        logits.iter().zip(&terms.row_lse).map(|(&v, &lse)| coeff * (v * k.inv_row_t - lse - shift));
    if first {
        dst.iter_mut().zip(values).for_each(|(d, v)| *d = v);
    } else {
        dst.iter_mut().zip(values).for_each(|(d, v)| *d += v);
    }
}

/// `dst (+)= coeff * src`: `first` writes, later calls add.
#[inline(always)]
fn add_scaled<F: NdFloat>(dst: &mut [F], src: &[F], coeff: F, first: bool) {
    if first {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = coeff * s);
    } else {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d += coeff * s);
    }
}

/// What [`LossWork::backward`] needs to know of the evaluation.
struct Evaluation<'a, F> {
    views: &'a [&'a [F]],
    params: &'a LossParams,
    classes: usize,
    batch: usize,
    k: Consts<F>,
    /// `1 / (pairs * N)`: every pair's weight in the loss, per sample.
    pair_weight: F,
    /// What the gradients are multiplied by.
    grad_scale: F,
}

impl<F: NdFloat> LossWork<F> {
    fn fit(&mut self, views: usize, classes: usize, batch: usize) {
        self.views.resize_with(views, ViewTerms::default);
        fit(&mut self.d_target, classes * batch);
        fit(&mut self.d_log_pred, classes * batch);
        fit(&mut self.target_dots, batch);
        fit(&mut self.row_log_totals, batch);
        fit(&mut self.class_dots, classes);
        fit(&mut self.log_pred_totals, classes);
        fit(&mut self.column, classes);
    }

    /// View `a`'s d loss / d target and d loss / d log-prediction (the sums over the pairs
    /// it is in, as target and as prediction), into `d_target` and `d_log_pred`.
    #[inline(always)]
    fn upstream(&mut self, a: usize, e: &Evaluation<F>) {
        let (n, coeff) = (e.batch, -e.pair_weight);
        let rows = self.d_target.chunks_exact_mut(n).zip(self.d_log_pred.chunks_exact_mut(n));
        for (c, (dt, dl)) in rows.enumerate() {
            let (mut first_t, mut first_l) = (true, true);
            for (b, (logits, terms)) in e.views.iter().zip(&self.views).enumerate() {
                if e.params.pair_counts(a, b) {
                    add_log_pred(dt, &logits[c * n..(c + 1) * n], terms, c, coeff, &e.k, first_t);
                    first_t = false;
                }
                if e.params.pair_counts(b, a) {
                    add_scaled(dl, &terms.target[c * n..(c + 1) * n], coeff, first_l);
                    first_l = false;
                }
            }
            if first_t {
                dt.iter_mut().for_each(|d| *d = F::zero());
            }
            if first_l {
                dl.iter_mut().for_each(|d| *d = F::zero());
            }
        }
    }

    /// The gradient with respect to view `a`'s logits, through both softmax chains, into
    /// `grad` (`C x N`, times the evaluation's scale); returns view `a`'s share of the loss.
    ///
    /// Target side: `target = softmax over classes of col_log`, `col_log = log-softmax over
    /// the batch of x / Tc`:
    ///   `d col_log = target (dt - U_n)` with `U_n = sum_c target dt`;
    ///   `d x += (d col_log - col_softmax B_c) / Tc` with `B_c = sum_n d col_log`.
    /// Prediction side: `log_pred = ln(N/C) + log-softmax over the batch of row_log`,
    /// `row_log = log-softmax over classes of x / Tr`:
    ///   `d row_log = dl - pred L_c` with `L_c = sum_n dl`;
    ///   `d x += (d row_log - row_softmax Q_n) / Tr` with `Q_n = sum_c d row_log`.
    /// With `col_softmax = target col_total` and `row_softmax = pred pred_total`, that is
    ///   `d x = target (dt - U_n - col_total_n B_c) / Tc + (dl - pred (L_c + pred_total_c Q_n)) / Tr`.
    #[inline(always)]
    fn backward(&mut self, a: usize, e: &Evaluation<F>, grad: &mut [F]) -> F {
        self.upstream(a, e);
        let n = e.batch;
        let t = &self.views[a];
        self.target_dots.iter_mut().for_each(|u| *u = F::zero());
        self.row_log_totals.iter_mut().for_each(|q| *q = F::zero());
        for c in 0..e.classes {
            let span = c * n..(c + 1) * n;
            let (dt, dl) = (&self.d_target[span.clone()], &self.d_log_pred[span.clone()]);
            let (target, pred) = (&t.target[span.clone()], &t.pred[span]);
            self.class_dots[c] = accumulate_products(&mut self.target_dots, target, dt);
            let total = sum(dl);
            self.log_pred_totals[c] = total;
            let q = self.row_log_totals.iter_mut().zip(dl).zip(pred);
            q.for_each(|((q, &d), &p)| *q += d - p * total);
        }
        let loss = sum(&self.class_dots);

        let (col_scale, row_scale) = (e.grad_scale * e.k.inv_col_t, e.grad_scale * e.k.inv_row_t);
        for (c, g) in grad.chunks_exact_mut(n).enumerate().take(e.classes) {
            let span = c * n..(c + 1) * n;
            let (dt, dl) = (&self.d_target[span.clone()], &self.d_log_pred[span.clone()]);
            let (target, pred) = (&t.target[span.clone()], &t.pred[span]);
            let b = self.class_dots[c] - dot(target, &self.target_dots);
            let (l, p_total) = (self.log_pred_totals[c], t.pred_total[c]);
            let target_side = target.iter().zip(dt).zip(&self.target_dots).zip(&t.col_total);
            let pred_side = pred.iter().zip(dl).zip(&self.row_log_totals);
            for ((g, (((&y, &dt), &u), &ct)), ((&p, &dl), &q)) in
                g.iter_mut().zip(target_side).zip(pred_side)
            {
                *g = y * (dt - u - ct * b) * col_scale + (dl - p * (l + p_total * q)) * row_scale;
            }
        }
        loss
    }
}

/// The uniform-prior loss of one head over `views` (each `C x N`, class by class, the
/// transpose of the logits) and its gradient: `grads[v]` (`C x N`) is set to `grad_scale`
/// times d loss / d view `v`. Returns the loss (not scaled). The logits are not checked for
/// finiteness: a non-finite logit gives a non-finite loss.
pub(crate) fn class_major_loss<F: NdFloat>(
    views: &[&[F]],
    shape: (usize, usize),
    params: &LossParams,
    grad_scale: F,
    work: &mut LossWork<F>,
    grads: &mut [&mut [F]],
) -> Result<F> {
    let tiny = F::min_positive_value().sqrt();
    class_major_loss_with(views, shape, params, grad_scale, work, grads, tiny)
}

/// [`class_major_loss`] with the threshold below which sums take the log-space path (a
/// test sets it to infinity to check that path against the fast one).
fn class_major_loss_with<F: NdFloat>(
    views: &[&[F]],
    (classes, batch): (usize, usize),
    params: &LossParams,
    grad_scale: F,
    work: &mut LossWork<F>,
    grads: &mut [&mut [F]],
    tiny: F,
) -> Result<F> {
    let len = classes * batch;
    if len == 0
        || views.len() != grads.len()
        || views.iter().map(|v| v.len()).chain(grads.iter().map(|g| g.len())).any(|l| l != len)
    {
        return Err(Error::invalid(
            "uniform-prior loss",
            format!(
                "{} views and {} gradients for {classes} classes x {batch} samples",
                views.len(),
                grads.len()
            ),
        ));
    }
    let pairs = (0..views.len())
        .flat_map(|a| (0..views.len()).map(move |b| (a, b)))
        .filter(|&(a, b)| params.pair_counts(a, b))
        .count();
    if pairs == 0 {
        return Err(Error::invalid(
            "uniform-prior loss",
            format!(
                "{} views with {} global give no pair to compare",
                views.len(),
                params.global_views
            ),
        ));
    }
    let real = |x: f64| F::from(x).unwrap_or_else(F::one);
    let k = Consts {
        inv_col_t: real(1.0 / params.col_temperature),
        inv_row_t: real(1.0 / params.row_temperature),
        ln_ratio: real(batch as f64 / classes as f64).ln(),
        tiny,
    };
    let e = Evaluation {
        views,
        params,
        classes,
        batch,
        k,
        pair_weight: real(1.0 / (pairs * batch) as f64),
        grad_scale,
    };
    work.fit(views.len(), classes, batch);
    Ok(evaluate_simd(work, &e, grads))
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

/// The uniform-prior loss of one head over any number of views, with its gradient.
///
/// `views[v]` holds the logits of view `v` (`N x C`, the same shape for every view); the
/// first `params.global_views` views are global, the rest local crops.
pub fn uniform_prior_loss<F: NdFloat>(
    views: &[ArrayView2<F>],
    params: &LossParams,
) -> Result<LossAndGrad<F>> {
    params.validate()?;
    let (n, c) = check_views(views)?;
    let class_major: Vec<Vec<F>> = views.iter().map(transposed).collect();
    let inputs: Vec<&[F]> = class_major.iter().map(Vec::as_slice).collect();
    let mut grads: Vec<Vec<F>> = views.iter().map(|_| vec![F::zero(); n * c]).collect();
    let mut outputs: Vec<&mut [F]> = grads.iter_mut().map(Vec::as_mut_slice).collect();
    let mut work = LossWork::default();
    let loss = class_major_loss(&inputs, (c, n), params, F::one(), &mut work, &mut outputs)?;
    let grads = grads
        .into_iter()
        .map(|g| {
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

    /// The class-by-class core on the transposes of `xs`, with `work` and output buffers
    /// passed in, and the log-space threshold `tiny`; returns the loss and the gradients
    /// back in the logits' `N x C` layout.
    fn core_loss(
        xs: &[Array2<f64>],
        params: &LossParams,
        work: &mut LossWork<f64>,
        tiny: f64,
    ) -> (f64, Vec<Array2<f64>>) {
        let (n, c) = xs[0].dim();
        let class_major: Vec<Vec<f64>> = xs.iter().map(|x| transposed(&x.view())).collect();
        let inputs: Vec<&[f64]> = class_major.iter().map(Vec::as_slice).collect();
        // Stale values in the outputs must be overwritten, not accumulated into.
        let mut grads = vec![vec![f64::NAN; n * c]; xs.len()];
        let mut outputs: Vec<&mut [f64]> = grads.iter_mut().map(Vec::as_mut_slice).collect();
        let loss = class_major_loss_with(&inputs, (c, n), params, 0.5, work, &mut outputs, tiny)
            .expect("valid views");
        let grads = grads
            .into_iter()
            .map(|g| Array2::from_shape_vec((c, n), g).expect("shape").reversed_axes() * 2.0)
            .collect();
        (loss, grads)
    }

    fn assert_close(what: &str, got: f64, want: f64, tol: f64) {
        assert!((got - want).abs() <= tol * (1.0 + want.abs()), "{what}: {got} vs {want}");
    }

    #[test]
    fn reused_buffers_give_the_reference_loss_and_gradients() {
        let mut rng = StdRng::seed_from_u64(17);
        let mut work = LossWork::default();
        let tiny = f64::MIN_POSITIVE.sqrt();
        // Shapes that grow and shrink, so buffers are reused at other sizes.
        for &(n, c, views, identical) in &[
            (40, 10, 2, false),
            (12, 3, 3, false),
            (64, 16, 2, true),
            (33, 7, 2, false),
            (80, 20, 4, true),
            (8, 2, 2, false),
        ] {
            let params = LossParams::default();
            let xs: Vec<Array2<f64>> = (0..views)
                .map(|_| {
                    if identical {
                        let row = random_logits(&mut rng, 1, c, 1.0);
                        row.broadcast((n, c)).expect("broadcast").to_owned()
                    } else {
                        random_logits(&mut rng, n, c, 1.0)
                    }
                })
                .collect();
            let want = loss_of(&xs, &params);
            let (loss, grads) = core_loss(&xs, &params, &mut work, tiny);
            assert_close("loss", loss, want.loss, 1e-13);
            assert_close("direct definition", loss, direct_loss(&xs, &params), 1e-10);
            for (g, w) in grads.iter().zip(&want.grads) {
                for (&a, &b) in g.iter().zip(w) {
                    assert_close("gradient", a, b, 1e-13);
                }
            }
        }
    }

    #[test]
    fn log_space_path_agrees_with_the_fast_path() {
        let mut rng = StdRng::seed_from_u64(23);
        for &(n, c, scale) in &[(16, 4, 1.0), (32, 10, 3.0), (6, 3, 0.2)] {
            let params = LossParams::default();
            let xs: Vec<_> = (0..2).map(|_| random_logits(&mut rng, n, c, scale)).collect();
            let (fast, fast_grads) =
                core_loss(&xs, &params, &mut LossWork::default(), f64::MIN_POSITIVE.sqrt());
            // An infinite threshold sends every sample and class through the log-space path.
            let (slow, slow_grads) =
                core_loss(&xs, &params, &mut LossWork::default(), f64::INFINITY);
            assert_close("loss", slow, fast, 1e-12);
            for (g, w) in slow_grads.iter().zip(&fast_grads) {
                for (&a, &b) in g.iter().zip(w) {
                    assert_close("gradient", a, b, 1e-12);
                }
            }
        }
        // Logits so spread that both paths are taken within one view: finite throughout,
        // and the gradient still matches central differences.
        let xs: Vec<_> = (0..2).map(|_| random_logits(&mut rng, 5, 3, 60.0)).collect();
        let out = loss_of(&xs, &LossParams::default());
        assert!(out.loss.is_finite());
        check_gradient(&xs, &LossParams::default());
    }
}
