//! Shapes of (stacks of) row-major matrices.

use alloc::format;
use core::fmt;

use crate::{Error, Result};

/// Whether a GEMM operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transpose {
    /// Use the operand as stored.
    No,
    /// Use the operand's transpose.
    Yes,
}

impl Transpose {
    /// The opposite flag.
    pub fn flip(self) -> Self {
        match self {
            Transpose::No => Transpose::Yes,
            Transpose::Yes => Transpose::No,
        }
    }
}

/// The shape of a stack of `batch` same-shape matrices, each `rows x cols`.
///
/// Storage is dense and row-major: element `(e, i, j)` sits at offset
/// `e * batch_stride() + i * cols + j`. A plain matrix has `batch == 1`; a vector
/// (a norm gain, a bias) is `1 x 1 x n`; the `E` experts of an MoE layer are `E x A x B`,
/// which Muon treats as `E` independent matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Shape {
    /// Number of stacked matrices (1 for a plain matrix).
    pub batch: usize,
    /// Rows of each matrix (`A` in the Muon formulas).
    pub rows: usize,
    /// Columns of each matrix (`B` in the Muon formulas).
    pub cols: usize,
}

impl Shape {
    /// One `rows x cols` matrix.
    pub const fn matrix(rows: usize, cols: usize) -> Self {
        Shape { batch: 1, rows, cols }
    }

    /// A stack of `batch` matrices, each `rows x cols`.
    pub const fn batched(batch: usize, rows: usize, cols: usize) -> Self {
        Shape { batch, rows, cols }
    }

    /// A vector of `n` elements, stored as one `1 x n` matrix.
    pub const fn vector(n: usize) -> Self {
        Shape::matrix(1, n)
    }

    /// Elements in the whole stack (saturating: an absurd shape fails to allocate rather
    /// than wrapping around to a small length).
    pub const fn len(&self) -> usize {
        self.batch.saturating_mul(self.rows).saturating_mul(self.cols)
    }

    /// `true` when the stack holds no element.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distance in elements between consecutive matrices of the stack.
    pub const fn batch_stride(&self) -> usize {
        self.rows * self.cols
    }

    /// The shape of one matrix of the stack after `op`.
    pub const fn op(&self, op: Transpose) -> (usize, usize) {
        match op {
            Transpose::No => (self.rows, self.cols),
            Transpose::Yes => (self.cols, self.rows),
        }
    }

    /// `true` for a genuine matrix (both sides longer than one), the kind Muon is for.
    pub const fn is_matrix(&self) -> bool {
        self.rows > 1 && self.cols > 1
    }

    /// The side of the Gram matrix that Newton-Schulz forms: `min(rows, cols)`.
    pub const fn min_side(&self) -> usize {
        if self.rows < self.cols {
            self.rows
        } else {
            self.cols
        }
    }

    /// `max(rows, cols)`.
    pub const fn max_side(&self) -> usize {
        if self.rows < self.cols {
            self.cols
        } else {
            self.rows
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.batch == 1 {
            write!(f, "{}x{}", self.rows, self.cols)
        } else {
            write!(f, "{}x{}x{}", self.batch, self.rows, self.cols)
        }
    }
}

/// Checks that a backend operand has the shape it must have: the shape half of the
/// [`Backend`](crate::Backend) contract (a wrong shape is an [`Error::ShapeMismatch`] naming
/// the operand, never a panic).
pub fn check_shape(what: &str, expected: Shape, found: Shape) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what: what.into(),
            expected,
            found,
        })
    }
}

/// Checks that `index` is an element of a stack of shape `out` (the slot
/// [`Backend::frobenius_norm`](crate::Backend::frobenius_norm) writes).
pub fn check_slot(what: &str, out: Shape, index: usize) -> Result<()> {
    if index < out.len() {
        Ok(())
    } else {
        Err(Error::Backend(format!(
            "{what}: slot {index} of a {}-element output",
            out.len()
        )))
    }
}

/// Checks the operand shapes of `dst = alpha * op(a) op(b) + beta * dst` and returns the
/// per-matrix GEMM sizes `(m, n, k)`. Backends call it before launching their kernels.
///
/// # Errors
/// [`Error::ShapeMismatch`] naming the operand: `a` when its batch count differs from the
/// destination's, `b` (after its transpose) when its batch count or inner dimension is wrong,
/// the destination when `op(a) op(b)` has another shape.
///
/// ```
/// use muon_core::{gemm_dims, Shape, Transpose};
/// let (a, b) = (Shape::matrix(2, 3), Shape::matrix(4, 3));
/// assert_eq!(gemm_dims(Shape::matrix(2, 4), a, Transpose::No, b, Transpose::Yes), Ok((2, 4, 3)));
/// assert!(gemm_dims(Shape::matrix(2, 4), a, Transpose::No, b, Transpose::No).is_err());
/// ```
pub fn gemm_dims(
    dst: Shape,
    a: Shape,
    ta: Transpose,
    b: Shape,
    tb: Transpose,
) -> Result<(usize, usize, usize)> {
    let (m, k) = a.op(ta);
    let (k2, n) = b.op(tb);
    check_shape("gemm operand a", Shape::batched(dst.batch, a.rows, a.cols), a)?;
    let (expected, found) = (Shape::batched(dst.batch, k, n), Shape::batched(b.batch, k2, n));
    check_shape("gemm operand b (after transpose)", expected, found)?;
    check_shape("gemm destination", Shape::batched(dst.batch, m, n), dst)?;
    Ok((m, n, k))
}
