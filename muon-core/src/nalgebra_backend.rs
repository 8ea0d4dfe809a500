//! The backend trait on nalgebra matrices (feature `nalgebra`), and the f64 oracles the tests
//! compare every backend with: the exact polar factor `U V^T` and singular values from an SVD.

use alloc::vec::Vec;
use core::marker::PhantomData;

use nalgebra::{DMatrix, RealField};

use crate::{
    check_shape, check_slot, gemm_dims, AdamWCoefficients, Backend, Error, Real, Result, Shape, Transpose,
};

/// A stack of nalgebra matrices (each `rows x cols`).
#[derive(Clone, Debug, PartialEq)]
pub struct NalgebraMatrix<T: RealField + Copy> {
    shape: Shape,
    /// The matrices of the stack.
    pub items: Vec<DMatrix<T>>,
}

impl<T: Real + RealField> NalgebraMatrix<T> {
    /// Wraps same-shape matrices as a stack; errors when the list is empty or shapes differ.
    pub fn from_items(items: Vec<DMatrix<T>>) -> Result<Self> {
        let Some(first) = items.first() else {
            return Err(Error::EmptyMatrix {
                what: "an empty list of nalgebra matrices".into(),
            });
        };
        let shape = Shape::batched(items.len(), first.nrows(), first.ncols());
        if items.iter().any(|m| m.shape() != first.shape()) {
            return Err(Error::Backend(
                "nalgebra stack: matrices of different shapes".into(),
            ));
        }
        Ok(NalgebraMatrix { shape, items })
    }
}

/// The nalgebra backend for element type `T`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Nalgebra<T>(PhantomData<T>);

impl<T> Nalgebra<T> {
    /// The backend (it holds no state).
    pub const fn new() -> Self {
        Nalgebra(PhantomData)
    }
}

fn op<T: RealField + Copy>(m: &DMatrix<T>, t: Transpose) -> DMatrix<T> {
    match t {
        Transpose::No => m.clone(),
        Transpose::Yes => m.transpose(),
    }
}

fn length_error(what: &str, shape: Shape, len: usize) -> Error {
    Error::Backend(alloc::format!("{what}: a {shape} matrix and {len} elements"))
}

impl<T: Real + RealField> Backend for Nalgebra<T> {
    type Elem = T;
    type Matrix = NalgebraMatrix<T>;

    fn shape(m: &Self::Matrix) -> Shape {
        m.shape
    }

    fn zeros(&self, shape: Shape) -> Result<Self::Matrix> {
        let items = (0..shape.batch)
            .map(|_| DMatrix::zeros(shape.rows, shape.cols))
            .collect();
        Ok(NalgebraMatrix { shape, items })
    }

    fn upload(&self, dst: &mut Self::Matrix, src: &[T]) -> Result<()> {
        if src.len() != dst.shape.len() {
            return Err(length_error("upload", dst.shape, src.len()));
        }
        let n = dst.shape.batch_stride();
        for (item, chunk) in dst.items.iter_mut().zip(src.chunks_exact(n.max(1))) {
            *item = DMatrix::from_row_slice(dst.shape.rows, dst.shape.cols, chunk);
        }
        Ok(())
    }

    fn download(&self, src: &Self::Matrix, dst: &mut [T]) -> Result<()> {
        if dst.len() != src.shape.len() {
            return Err(length_error("download", src.shape, dst.len()));
        }
        let cols = src.shape.cols;
        for (e, item) in src.items.iter().enumerate() {
            for i in 0..src.shape.rows {
                for j in 0..cols {
                    dst[e * src.shape.batch_stride() + i * cols + j] = item[(i, j)];
                }
            }
        }
        Ok(())
    }

    fn gemm(
        &self,
        dst: &mut Self::Matrix,
        alpha: T,
        a: &Self::Matrix,
        ta: Transpose,
        b: &Self::Matrix,
        tb: Transpose,
        beta: T,
    ) -> Result<()> {
        gemm_dims(dst.shape, a.shape, ta, b.shape, tb)?;
        for ((c, a), b) in dst.items.iter_mut().zip(&a.items).zip(&b.items) {
            let product = op(a, ta) * op(b, tb) * alpha;
            *c = if beta == <T as Real>::ZERO {
                product
            } else {
                product + &*c * beta
            };
        }
        Ok(())
    }

    fn axpby(&self, dst: &mut Self::Matrix, alpha: T, x: &Self::Matrix, beta: T) -> Result<()> {
        check_shape("axpby source", dst.shape, x.shape)?;
        for (d, x) in dst.items.iter_mut().zip(&x.items) {
            *d = if beta == <T as Real>::ZERO {
                x * alpha
            } else {
                x * alpha + &*d * beta
            };
        }
        Ok(())
    }

    fn frobenius_norm(&self, x: &Self::Matrix, out: &mut Self::Matrix, index: usize) -> Result<()> {
        let sum: f64 = x
            .items
            .iter()
            .flat_map(|m| m.iter())
            .map(|v| v.to_f64() * v.to_f64())
            .sum();
        check_slot("frobenius_norm", out.shape, index)?;
        let cols = out.shape.cols;
        out.items[index / out.shape.batch_stride()]
            [(index % out.shape.batch_stride() / cols, index % cols)] =
            <T as Real>::from_f64(libm::sqrt(sum));
        Ok(())
    }

    fn normalize_frobenius(&self, x: &mut Self::Matrix, norm_scale: T, eps: T) -> Result<()> {
        for m in &mut x.items {
            let sum: f64 = m.iter().map(|v| v.to_f64() * v.to_f64()).sum();
            let inv = 1.0 / (norm_scale.to_f64() * libm::sqrt(sum) + eps.to_f64());
            *m *= <T as Real>::from_f64(inv);
        }
        Ok(())
    }

    fn adamw_direction(
        &self,
        dir: &mut Self::Matrix,
        grad: &Self::Matrix,
        m: &mut Self::Matrix,
        v: &mut Self::Matrix,
        c: &AdamWCoefficients<T>,
    ) -> Result<()> {
        check_shape("adamw direction", grad.shape, dir.shape)?;
        check_shape("adamw first moment", grad.shape, m.shape)?;
        check_shape("adamw second moment", grad.shape, v.shape)?;
        let one = <T as Real>::ONE;
        for (((d, g), m), v) in dir
            .items
            .iter_mut()
            .zip(&grad.items)
            .zip(&mut m.items)
            .zip(&mut v.items)
        {
            *m = &*m * c.beta1 + g * (one - c.beta1);
            *v = &*v * c.beta2 + g.component_mul(g) * (one - c.beta2);
            *d = m.zip_map(v, |m, v| {
                (m / c.bias_correction1) / (Real::sqrt(v / c.bias_correction2) + c.eps)
            });
        }
        Ok(())
    }
}

/// The exact polar factor `U V^T` of `m` (thin SVD, f64): what Newton-Schulz approximates.
pub fn polar_factor(m: &DMatrix<f64>) -> DMatrix<f64> {
    let svd = m.clone().svd(true, true);
    let (u, v_t) = (
        svd.u.expect("u was requested"),
        svd.v_t.expect("v_t was requested"),
    );
    u * v_t
}

/// The singular values of `m` (f64), in descending order.
pub fn singular_values(m: &DMatrix<f64>) -> Vec<f64> {
    let mut s: Vec<f64> = m.singular_values().iter().copied().collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}
