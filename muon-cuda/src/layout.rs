//! Row-major GEMMs on column-major cuBLAS: the one place where the operands are swapped.
//!
//! A row-major `r x c` matrix, read as column-major with leading dimension `c`, is its own
//! transpose (`c x r`). So the row-major product `C = op(A) op(B)` (`m x n`) is, to cuBLAS,
//! the column-major `C^T` (`n x m`, `ldc = n`), and `C^T = op(B)^T op(A)^T`. cuBLAS therefore
//! gets `B` as its first operand and `A` as its second, with sizes `(n, m, k)`. Each operand
//! keeps its own transpose flag: the stored `B` already *is* `B^T` to cuBLAS, so `op(B)^T` is
//! "as stored" exactly when `op` is "as stored". Leading dimensions are the row-major column
//! counts, and batch strides are the matrix sizes.

use muon_core::{gemm_dims, Shape, Transpose};

/// Which of the two row-major operands cuBLAS reads first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operand {
    /// The row-major `A`.
    A,
    /// The row-major `B`.
    B,
}

/// The arguments of a column-major `cublas*GemmStridedBatched*` call, in cuBLAS's order,
/// computing a row-major product. Pointers are chosen by [`first`](Self::first) and
/// [`second`](Self::second).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ColumnMajorGemm {
    /// `transa` of cuBLAS (applies to `first`).
    pub transa: Transpose,
    /// `transb` of cuBLAS (applies to `second`).
    pub transb: Transpose,
    /// cuBLAS's `m`: rows of its column-major result, the row-major `n`.
    pub m: usize,
    /// cuBLAS's `n`: the row-major `m`.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// The row-major operand passed as cuBLAS's `A`.
    pub first: Operand,
    /// Its leading dimension.
    pub lda: usize,
    /// Its batch stride in elements.
    pub stride_a: usize,
    /// The row-major operand passed as cuBLAS's `B`.
    pub second: Operand,
    /// Its leading dimension.
    pub ldb: usize,
    /// Its batch stride in elements.
    pub stride_b: usize,
    /// Leading dimension of the result.
    pub ldc: usize,
    /// Batch stride of the result.
    pub stride_c: usize,
    /// Number of products.
    pub batch: usize,
}

/// Maps the row-major `dst = op_a(a) op_b(b)` (checked with [`gemm_dims`]) to the column-major
/// cuBLAS call that computes it. See the module docs for why this is correct.
///
/// # Errors
/// When the shapes do not fit (see [`gemm_dims`]).
pub(crate) fn row_major_gemm(
    dst: Shape,
    a: Shape,
    ta: Transpose,
    b: Shape,
    tb: Transpose,
) -> muon_core::Result<ColumnMajorGemm> {
    let (m, n, k) = gemm_dims(dst, a, ta, b, tb)?;
    Ok(ColumnMajorGemm {
        transa: tb,
        transb: ta,
        m: n,
        n: m,
        k,
        first: Operand::B,
        lda: b.cols,
        stride_a: b.batch_stride(),
        second: Operand::A,
        ldb: a.cols,
        stride_b: a.batch_stride(),
        ldc: dst.cols,
        stride_c: dst.batch_stride(),
        batch: dst.batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reference column-major strided-batched GEMM, as cuBLAS defines it.
    #[allow(clippy::too_many_arguments)]
    fn column_major_gemm(g: &ColumnMajorGemm, a: &[f64], b: &[f64], c: &mut [f64]) {
        // op(X)[i, j] of a column-major matrix with leading dimension `ld`.
        let at = |x: &[f64], ld: usize, t: Transpose, i: usize, j: usize| match t {
            Transpose::No => x[i + j * ld],
            Transpose::Yes => x[j + i * ld],
        };
        for e in 0..g.batch {
            let (ae, be) = (&a[e * g.stride_a..], &b[e * g.stride_b..]);
            for j in 0..g.n {
                for i in 0..g.m {
                    let dot: f64 = (0..g.k)
                        .map(|p| at(ae, g.lda, g.transa, i, p) * at(be, g.ldb, g.transb, p, j))
                        .sum();
                    c[e * g.stride_c + i + j * g.ldc] = dot;
                }
            }
        }
    }

    fn row_major_reference(
        dst: Shape,
        a: Shape,
        ta: Transpose,
        x: &[f64],
        b: Shape,
        tb: Transpose,
        y: &[f64],
    ) -> Vec<f64> {
        let at = |data: &[f64], s: Shape, t: Transpose, e: usize, i: usize, j: usize| {
            let base = e * s.batch_stride();
            match t {
                Transpose::No => data[base + i * s.cols + j],
                Transpose::Yes => data[base + j * s.cols + i],
            }
        };
        let k = a.op(ta).1;
        let mut out = vec![0.0; dst.len()];
        for e in 0..dst.batch {
            for i in 0..dst.rows {
                for j in 0..dst.cols {
                    out[e * dst.batch_stride() + i * dst.cols + j] = (0..k)
                        .map(|p| at(x, a, ta, e, i, p) * at(y, b, tb, e, p, j))
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn swapped_column_major_call_computes_the_row_major_product() {
        use Transpose::{No, Yes};
        let (batch, m, n, k) = (3, 5, 7, 4);
        for (ta, tb) in [(No, No), (No, Yes), (Yes, No), (Yes, Yes)] {
            let a = match ta {
                No => Shape::batched(batch, m, k),
                Yes => Shape::batched(batch, k, m),
            };
            let b = match tb {
                No => Shape::batched(batch, k, n),
                Yes => Shape::batched(batch, n, k),
            };
            let dst = Shape::batched(batch, m, n);
            let x: Vec<f64> = (0..a.len()).map(|i| ((i * 37 % 23) as f64) - 11.0).collect();
            let y: Vec<f64> = (0..b.len()).map(|i| ((i * 29 % 19) as f64) * 0.5 - 4.0).collect();
            let g = row_major_gemm(dst, a, ta, b, tb).unwrap();
            assert_eq!((g.first, g.second), (Operand::B, Operand::A));
            let mut c = vec![f64::NAN; dst.len()];
            column_major_gemm(&g, &y, &x, &mut c);
            assert_eq!(
                c,
                row_major_reference(dst, a, ta, &x, b, tb, &y),
                "ta {ta:?}, tb {tb:?}"
            );
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let err = row_major_gemm(
            Shape::matrix(2, 2),
            Shape::matrix(2, 3),
            Transpose::No,
            Shape::matrix(4, 2),
            Transpose::No,
        )
        .unwrap_err();
        assert!(err.to_string().contains("gemm operand b"), "{err}");
    }
}
