//! Weight-normalised linear classifier heads.
//!
//! A head maps an L2-normalised embedding `z` (dimension `D`) to `C` class logits with
//! `logits = z W^T`, where each class row of `W` is `w_c = g_c * v_c / |v_c|`. Keeping the
//! direction `v` and the scale `g` apart is what the method trains; it also keeps a head's
//! logits bounded by `|g_c|`, which matters on a device adapting without supervision.
//!
//! ```
//! use ndarray::array;
//! use selfclass_runtime::head::Head;
//!
//! let head = Head::new(array![[3.0f32, 4.0], [0.0, 2.0]], array![1.0f32, 2.0]).unwrap();
//! let z = array![[1.0f32, 0.0]];
//! let logits = head.logits(z.view());
//! assert!((logits[[0, 0]] - 0.6).abs() < 1e-6);
//! assert_eq!(head.predict(z.view())[0], 0);
//! ```

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, NdFloat};

use crate::{Error, Result};

/// Norms below this are treated as this, so a zero direction never divides by zero.
const MIN_NORM: f64 = 1e-12;

/// One weight-normalised linear head without bias.
#[derive(Debug, Clone, PartialEq)]
pub struct Head<F = f32> {
    /// Directions, one row per class: `C x D`.
    pub v: Array2<F>,
    /// Scales, one per class: `C`.
    pub g: Array1<F>,
}

/// Gradients of a head's parameters and of its input.
#[derive(Debug, Clone)]
pub struct HeadGrads<F> {
    pub v: Array2<F>,
    pub g: Array1<F>,
    /// d loss / d embedding, `N x D`.
    pub input: Array2<F>,
}

impl<F: NdFloat> Head<F> {
    /// A head from its directions (`C x D`) and scales (`C`).
    pub fn new(v: Array2<F>, g: Array1<F>) -> Result<Self> {
        if v.nrows() == 0 || v.ncols() == 0 {
            return Err(Error::invalid("head", format!("empty direction matrix {:?}", v.dim())));
        }
        if g.len() != v.nrows() {
            return Err(Error::invalid(
                "head",
                format!("{} scales for {} classes", g.len(), v.nrows()),
            ));
        }
        if v.iter().chain(g.iter()).any(|x| !x.is_finite()) {
            return Err(Error::invalid("head", "non-finite weight"));
        }
        Ok(Head { v, g })
    }

    /// A head whose effective weights are `w` (`C x D`): directions `w`, scales `|w_c|`.
    pub fn from_weights(w: Array2<F>) -> Result<Self> {
        let g = w.map_axis(Axis(1), |row| row.dot(&row).sqrt());
        Head::new(w, g)
    }

    /// Number of classes `C`.
    pub fn classes(&self) -> usize {
        self.v.nrows()
    }

    /// Embedding dimension `D`.
    pub fn dim(&self) -> usize {
        self.v.ncols()
    }

    fn norms(&self) -> Array1<F> {
        let floor = F::from(MIN_NORM).unwrap_or_else(F::epsilon);
        self.v.map_axis(Axis(1), |row| row.dot(&row).sqrt().max(floor))
    }

    /// The effective weight matrix `W` (`C x D`).
    pub fn weights(&self) -> Array2<F> {
        let mut w = Array2::zeros(self.v.raw_dim());
        self.write_weights(w.view_mut());
        w
    }

    /// Writes the effective weights `w_c = g_c v_c / |v_c|` into `out` (`C x D`).
    ///
    /// # Panics
    /// If `out` is not `C x D`.
    pub fn write_weights(&self, mut out: ArrayViewMut2<F>) {
        let floor = F::from(MIN_NORM).unwrap_or_else(F::epsilon);
        for ((mut w, v), &g) in out.rows_mut().into_iter().zip(self.v.rows()).zip(&self.g) {
            let scale = g / v.dot(&v).sqrt().max(floor);
            w.zip_mut_with(&v, |w, &v| *w = v * scale);
        }
    }

    /// Logits `z W^T` for a batch of embeddings `z` (`N x D`).
    pub fn logits(&self, z: ArrayView2<F>) -> Array2<F> {
        z.dot(&self.weights().t())
    }

    /// The arg-max class of each row of `z`.
    pub fn predict(&self, z: ArrayView2<F>) -> Vec<usize> {
        self.logits(z).rows().into_iter().map(argmax).collect()
    }

    /// Backward pass: given `d loss / d logits` (`N x C`) for input `z`, the gradients of
    /// `v`, `g` and `z`.
    pub fn backward(&self, z: ArrayView2<F>, d_logits: ArrayView2<F>) -> HeadGrads<F> {
        let w = self.weights();
        let d_w = d_logits.t().dot(&z); // C x D
        let input = d_logits.dot(&w); // N x D
        let (v, g) = self.weight_grad_to_params(d_w);
        HeadGrads { v, g, input }
    }

    /// Maps a gradient with respect to the effective weights `W` (`C x D`) onto `v` and
    /// `g`, reusing `d_w`'s buffer for `v`'s gradient.
    pub fn weight_grad_to_params(&self, d_w: Array2<F>) -> (Array2<F>, Array1<F>) {
        let norms = self.norms();
        // w_c = g_c v_c / |v_c|:
        //   dg_c = (dw_c . v_c) / |v_c|
        //   dv_c = (g_c / |v_c|) (dw_c - (dw_c . v_c) v_c / |v_c|^2)
        let proj = (&d_w * &self.v).sum_axis(Axis(1));
        let g_grad = &proj / &norms;
        let mut v_grad = d_w;
        for (c, mut row) in v_grad.rows_mut().into_iter().enumerate() {
            let n = norms[c];
            let along = proj[c] / (n * n);
            row.scaled_add(-along, &self.v.row(c));
            row.mapv_inplace(|x| x * self.g[c] / n);
        }
        (v_grad, g_grad)
    }
}

/// Index of the largest value (the first on ties; NaN never wins).
pub fn argmax<F: NdFloat>(row: ArrayView1<F>) -> usize {
    let mut best = 0;
    let mut best_value = F::neg_infinity();
    for (i, &x) in row.iter().enumerate() {
        if x > best_value {
            best = i;
            best_value = x;
        }
    }
    best
}

/// Scales each row of `z` to unit L2 norm (rows of zeros stay zero).
pub fn l2_normalize_rows<F: NdFloat>(z: &mut Array2<F>) {
    let floor = F::from(1e-12).unwrap_or_else(F::epsilon);
    for mut row in z.rows_mut() {
        let norm = row.dot(&row).sqrt().max(floor);
        row.mapv_inplace(|x| x / norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::uniform_matrix;
    use ndarray::array;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn hand_worked_forward() {
        // v rows (3,4) and (0,2) have norms 5 and 2; g = (1, 2) gives W = [[0.6, 0.8], [0, 2]].
        let head = Head::new(array![[3.0f64, 4.0], [0.0, 2.0]], array![1.0, 2.0]).expect("valid");
        let w = head.weights();
        assert!((&w - &array![[0.6, 0.8], [0.0, 2.0]]).iter().all(|d| d.abs() < 1e-15));
        let logits = head.logits(array![[0.0, 1.0], [1.0, 0.0]].view());
        assert!((&logits - &array![[0.8, 2.0], [0.6, 0.0]]).iter().all(|d| d.abs() < 1e-15));
        assert_eq!(head.predict(array![[0.0, 1.0], [1.0, 0.0]].view()), vec![1, 0]);
    }

    #[test]
    fn backward_matches_central_differences() {
        let mut rng = StdRng::seed_from_u64(2);
        let head = Head::new(uniform_matrix(&mut rng, (4, 5)), array![0.5, 1.5, -0.7, 2.0])
            .expect("valid");
        let z = uniform_matrix(&mut rng, (3, 5));
        let upstream = uniform_matrix(&mut rng, (3, 4));
        // A linear functional of the logits, so d f / d logits = upstream.
        let f = |h: &Head<f64>, z: &Array2<f64>| (&h.logits(z.view()) * &upstream).sum();
        let grads = head.backward(z.view(), upstream.view());
        let h = 1e-6;
        let tol = |x: f64| 1e-7 * (1.0 + x.abs());
        for idx in 0..head.v.len() {
            let (r, c) = (idx / 5, idx % 5);
            let (mut p, mut m) = (head.clone(), head.clone());
            p.v[[r, c]] += h;
            m.v[[r, c]] -= h;
            let numeric = (f(&p, &z) - f(&m, &z)) / (2.0 * h);
            assert!((grads.v[[r, c]] - numeric).abs() < tol(numeric), "v[{r},{c}]");
        }
        for c in 0..4 {
            let (mut p, mut m) = (head.clone(), head.clone());
            p.g[c] += h;
            m.g[c] -= h;
            let numeric = (f(&p, &z) - f(&m, &z)) / (2.0 * h);
            assert!((grads.g[c] - numeric).abs() < tol(numeric), "g[{c}]");
        }
        for idx in 0..z.len() {
            let (r, c) = (idx / 5, idx % 5);
            let (mut p, mut m) = (z.clone(), z.clone());
            p[[r, c]] += h;
            m[[r, c]] -= h;
            let numeric = (f(&head, &p) - f(&head, &m)) / (2.0 * h);
            assert!((grads.input[[r, c]] - numeric).abs() < tol(numeric), "z[{r},{c}]");
        }
    }

    #[test]
    fn from_weights_round_trips() {
        let w = array![[0.6f32, 0.8], [0.0, -2.0]];
        let head = Head::from_weights(w.clone()).expect("valid");
        assert!((&head.weights() - &w).iter().all(|d| d.abs() < 1e-6));
    }

    #[test]
    fn rejects_mismatched_or_non_finite_weights() {
        assert!(Head::new(array![[1.0f32, 0.0]], array![1.0, 2.0]).is_err());
        assert!(Head::new(array![[f32::NAN, 0.0]], array![1.0]).is_err());
        assert!(Head::new(Array2::<f32>::zeros((0, 3)), Array1::zeros(0)).is_err());
    }

    #[test]
    fn normalises_rows() {
        let mut z = array![[3.0f32, 4.0], [0.0, 0.0]];
        l2_normalize_rows(&mut z);
        assert_eq!(z, array![[0.6, 0.8], [0.0, 0.0]]);
    }
}
