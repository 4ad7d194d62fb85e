//! Dense matrix products through the `gemm` crate, whose kernels are picked at run time for
//! the processor (AVX-512, AVX2+FMA, NEON and others).
//!
//! [`mat_mul`] is the adaptation step's product on ndarray views (the same contract as
//! `ndarray::linalg::general_mat_mul`); [`strided`] is the same product on plain slices with
//! explicit strides, for callers that keep their own layouts (the trainer's convolutions).

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, NdFloat};

/// Strides `(row, column)` of a matrix, in elements.
pub type Strides = (usize, usize);

/// `c = alpha a b + beta c` for `a` of shape `m x k`, `b` of shape `k x n`, `c` of shape
/// `m x n`, any (non-negative) strides. With `beta` zero, `c` is only written, never read,
/// so it may hold anything beforehand (NaN included). The product is always formed: with
/// `alpha` zero, a non-finite operand still makes `c` non-finite.
///
/// Panics if the shapes do not chain, as `general_mat_mul` does: shapes are the caller's
/// invariant, never input from outside the process.
pub fn mat_mul<F: NdFloat>(
    alpha: F,
    a: &ArrayView2<F>,
    b: &ArrayView2<F>,
    beta: F,
    c: &mut ArrayViewMut2<F>,
) {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert!(
        k == k2 && c.dim() == (m, n),
        "mat_mul: shapes {:?} x {:?} into {:?}",
        a.dim(),
        b.dim(),
        c.dim()
    );
    let positive = |s: &[isize]| s.iter().all(|&x| x >= 0);
    if !(positive(a.strides()) && positive(b.strides()) && positive(c.strides())) {
        // Reversed axes: rare enough for ndarray's own product to serve them.
        general_mat_mul(alpha, a, b, beta, c);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.map_inplace(|x| *x = if beta == F::zero() { F::zero() } else { *x * beta });
        return;
    }
    let pair = |s: &[isize]| [s[0], s[1]];
    let (a_s, b_s, c_s) = (pair(a.strides()), pair(b.strides()), pair(c.strides()));
    // SAFETY: ndarray guarantees that every index within a view's shape addresses an
    // element of its allocation through its (here non-negative) strides; the shapes were
    // checked to chain above; `c` is borrowed mutably, so it aliases neither operand.
    unsafe {
        product(m, n, k, c.as_mut_ptr(), &c_s, a.as_ptr(), &a_s, b.as_ptr(), &b_s, alpha, beta)
    }
}

/// `c = a b` on row-major storage with explicit strides: element `(i, j)` of a matrix with
/// strides `(rs, cs)` sits at `i * rs + j * cs` of its slice. `a` is `m x k`, `b` is
/// `k x n`, `c` is `m x n`, and `c` is only written.
///
/// Panics if a slice is too short for its shape and strides (or their extent overflows), or
/// if the destination's strides make two of its elements the same.
#[allow(clippy::too_many_arguments)]
pub fn strided(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    c_strides: Strides,
    a: &[f32],
    a_strides: Strides,
    b: &[f32],
    b_strides: Strides,
) {
    // One past the last element addressed, or `None` when that overflows.
    let last = |(rs, cs): Strides, rows: usize, cols: usize| -> Option<usize> {
        if rows == 0 || cols == 0 {
            return Some(0);
        }
        (rows - 1).checked_mul(rs)?.checked_add((cols - 1).checked_mul(cs)?)?.checked_add(1)
    };
    let fits = |len: usize, strides: Strides, rows: usize, cols: usize| {
        last(strides, rows, cols).is_some_and(|end| end <= len)
    };
    assert!(fits(c.len(), c_strides, m, n), "matmul: destination too small");
    assert!(fits(a.len(), a_strides, m, k), "matmul: left operand too small");
    assert!(fits(b.len(), b_strides, k, n), "matmul: right operand too small");
    // Distinct destination elements: along each axis longer than one, a non-zero stride,
    // and one axis's stride past the other axis's whole extent.
    let (rs, cs) = c_strides;
    let distinct = (m <= 1 || rs > 0)
        && (n <= 1 || cs > 0)
        && (m <= 1 || n <= 1 || rs > (n - 1) * cs || cs > (m - 1) * rs);
    assert!(distinct, "matmul: destination strides {c_strides:?} overlap for {m}x{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                c[i * c_strides.0 + j * c_strides.1] = 0.0;
            }
        }
        return;
    }
    // Every stride times its axis length fits in the slice's length, so in `isize` too
    // (slices never exceed `isize::MAX` bytes); an unused axis's stride may not.
    let signed = |(rs, cs): Strides, rows: usize, cols: usize| {
        let s = |stride: usize, len: usize| if len <= 1 { 0 } else { stride as isize };
        [s(rs, rows), s(cs, cols)]
    };
    // SAFETY: the asserts above check that every element the strides address lies inside
    // its slice; `c` is borrowed mutably, so it aliases neither operand.
    unsafe {
        product(
            m,
            n,
            k,
            c.as_mut_ptr(),
            &signed(c_strides, m, n),
            a.as_ptr(),
            &signed(a_strides, m, k),
            b.as_ptr(),
            &signed(b_strides, k, n),
            1.0,
            0.0,
        )
    }
}

/// `c = alpha a b + beta c` (`c` not read when `beta` is zero), single-threaded: callers
/// that want parallelism split their work above this level.
///
/// # Safety
/// Every element `(i, j)` within the shapes, addressed through the strides (row, column, in
/// elements), must lie inside the allocation its pointer points into; `c` must alias
/// neither `a` nor `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn product<F: NdFloat>(
    m: usize,
    n: usize,
    k: usize,
    c: *mut F,
    c_strides: &[isize],
    a: *const F,
    a_strides: &[isize],
    b: *const F,
    b_strides: &[isize],
    alpha: F,
    beta: F,
) {
    let read_c = beta != F::zero();
    // gemm's convention: dst = alpha_g dst + beta_g lhs rhs, with column stride first.
    gemm::gemm(
        m,
        n,
        k,
        c,
        c_strides[1],
        c_strides[0],
        read_c,
        a,
        a_strides[1],
        a_strides[0],
        b,
        b_strides[1],
        b_strides[0],
        beta,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::uniform_matrix;
    use ndarray::{s, Array2};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Against ndarray's product, over transposed, sliced and accumulating cases, in f64
    /// and f32 (the two types the runtime uses).
    #[test]
    fn agrees_with_ndarray_on_every_layout() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(m, k, n) in &[(1, 1, 1), (150, 128, 256), (7, 33, 5), (64, 3, 129), (3, 0, 4)] {
            let a = uniform_matrix(&mut rng, (m, k));
            let bt = uniform_matrix(&mut rng, (n, k));
            let c0 = uniform_matrix(&mut rng, (m, n));
            for &(alpha, beta) in &[(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)] {
                let mut want = c0.clone();
                general_mat_mul(alpha, &a, &bt.t(), beta, &mut want);
                let mut got =
                    if beta == 0.0 { Array2::from_elem((m, n), f64::NAN) } else { c0.clone() };
                mat_mul(alpha, &a.view(), &bt.t(), beta, &mut got.view_mut());
                let err = (&got - &want).iter().fold(0.0f64, |e, x| e.max(x.abs()));
                assert!(err < 1e-12, "f64 {m}x{k}x{n} alpha {alpha} beta {beta}: {err}");

                let a32 = a.mapv(|x| x as f32);
                let b32 = bt.t().mapv(|x| x as f32);
                let mut got32 = c0.mapv(|x| x as f32);
                mat_mul(alpha as f32, &a32.view(), &b32.view(), beta as f32, &mut got32.view_mut());
                let err =
                    (&got32.mapv(f64::from) - &want).iter().fold(0.0f64, |e, x| e.max(x.abs()));
                assert!(err < 1e-4 * (k as f64 + 1.0), "f32 {m}x{k}x{n}: {err}");
            }
        }
        // A strided destination: every other column of a wider matrix, the rest untouched.
        let a = uniform_matrix(&mut rng, (5, 6));
        let b = uniform_matrix(&mut rng, (6, 4));
        let mut wide = Array2::<f64>::from_elem((5, 8), 3.0);
        mat_mul(1.0, &a.view(), &b.view(), 0.0, &mut wide.slice_mut(s![.., ..;2]));
        let want = a.dot(&b);
        for i in 0..5 {
            for j in 0..4 {
                assert!((wide[(i, 2 * j)] - want[(i, j)]).abs() < 1e-12);
                assert_eq!(wide[(i, 2 * j + 1)], 3.0);
            }
        }
        // Reversed axes take ndarray's path and give the same product.
        let mut got = Array2::<f64>::zeros((5, 4));
        let a_rev = a.slice(s![..;-1, ..]);
        mat_mul(1.0, &a_rev, &b.view(), 0.0, &mut got.view_mut());
        let err = (&got - &a_rev.dot(&b)).iter().fold(0.0f64, |e, x| e.max(x.abs()));
        assert!(err < 1e-12);
    }

    #[test]
    fn strided_reads_and_writes_through_the_strides() {
        let mut rng = StdRng::seed_from_u64(8);
        let a = uniform_matrix(&mut rng, (4, 3)).mapv(|x| x as f32);
        let b = uniform_matrix(&mut rng, (3, 5)).mapv(|x| x as f32);
        // b stored transposed (column-major), c written transposed.
        let bt: Vec<f32> = b.t().iter().copied().collect();
        let mut c = vec![f32::NAN; 20];
        strided((4, 5, 3), &mut c, (1, 4), a.as_slice().unwrap(), (3, 1), &bt, (1, 3));
        let want = a.dot(&b);
        for i in 0..4 {
            for j in 0..5 {
                assert!((c[i + 4 * j] - want[(i, j)]).abs() < 1e-5);
            }
        }
    }

    #[test]
    #[should_panic(expected = "destination too small")]
    fn strided_refuses_a_short_destination() {
        let a = [1.0f32; 6];
        let mut c = [0.0f32; 3];
        strided((2, 2, 3), &mut c, (2, 1), &a, (3, 1), &a, (2, 1));
    }

    /// A stride whose extent wraps around `usize` is refused, not wrapped into range.
    #[test]
    #[should_panic(expected = "destination too small")]
    fn strided_refuses_a_stride_that_overflows() {
        let a = [1.0f32; 2];
        let mut c = [0.0f32; 1];
        strided((2, 1, 1), &mut c, (usize::MAX, 1), &a, (1, 1), &a, (1, 1));
    }

    #[test]
    #[should_panic(expected = "overlap")]
    fn strided_refuses_a_destination_whose_elements_overlap() {
        let a = [1.0f32; 4];
        let mut c = [0.0f32; 4];
        strided((2, 2, 1), &mut c, (1, 1), &a, (1, 1), &a, (2, 1));
    }
}
