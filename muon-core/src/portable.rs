//! A portable pure-Rust backend on plain slices: correct, simple, `no_std`, not fast.
//!
//! It is the reference the fast backends are tested against, and lets the core run with no
//! other crate. Reductions accumulate in `f64`.

use alloc::vec;
use alloc::vec::Vec;
use core::marker::PhantomData;

use crate::{
    check_shape, check_slot, gemm_dims, AdamWCoefficients, Backend, Error, Real, Result, Shape, Transpose,
};

/// A dense row-major stack of matrices in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMatrix<T> {
    shape: Shape,
    data: Vec<T>,
}

impl<T: Real> HostMatrix<T> {
    /// A stack of zeros.
    ///
    /// # Panics
    /// Aborts like any `Vec` when memory runs out; backends use [`try_zeros`](Self::try_zeros).
    pub fn zeros(shape: Shape) -> Self {
        HostMatrix {
            shape,
            data: vec![T::ZERO; shape.len()],
        }
    }

    /// A stack of zeros, or an error naming the size when the memory cannot be had.
    pub fn try_zeros(shape: Shape) -> Result<Self> {
        let mut data = Vec::new();
        data.try_reserve_exact(shape.len()).map_err(|_| {
            Error::Backend(alloc::format!(
                "out of memory allocating a {shape} matrix ({} bytes)",
                shape.len().saturating_mul(core::mem::size_of::<T>())
            ))
        })?;
        data.resize(shape.len(), T::ZERO);
        Ok(HostMatrix { shape, data })
    }

    /// Wraps row-major `data`; errors when its length is not `shape.len()`.
    pub fn from_vec(shape: Shape, data: Vec<T>) -> Result<Self> {
        if data.len() != shape.len() {
            return Err(Error::Backend(alloc::format!(
                "a {shape} matrix needs {} elements, got {}",
                shape.len(),
                data.len()
            )));
        }
        Ok(HostMatrix { shape, data })
    }

    /// Copies row-major `src` into this stack; errors when the lengths differ.
    pub fn copy_from_host(&mut self, src: &[T]) -> Result<()> {
        if src.len() != self.data.len() {
            return Err(Error::Backend(alloc::format!(
                "upload of {} elements into a {} matrix",
                src.len(),
                self.shape
            )));
        }
        self.data.copy_from_slice(src);
        Ok(())
    }

    /// Copies this stack, row-major, into `dst`; errors when the lengths differ.
    pub fn copy_to_host(&self, dst: &mut [T]) -> Result<()> {
        if dst.len() != self.data.len() {
            return Err(Error::Backend(alloc::format!(
                "download of a {} matrix into {} elements",
                self.shape,
                dst.len()
            )));
        }
        dst.copy_from_slice(&self.data);
        Ok(())
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The elements, row-major.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }

    /// The elements, row-major, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// The elements as bytes, row-major, each in the machine's byte order (little-endian on
    /// x86-64 and ARM64): what a checkpoint writes or a byte-oriented transport sends.
    ///
    /// ```
    /// use muon_core::{HostMatrix, Shape};
    /// let m = HostMatrix::from_vec(Shape::vector(2), vec![1.0f32, -2.0])?;
    /// assert_eq!(m.as_bytes().len(), 8);
    /// assert_eq!(m.as_bytes()[..4], 1.0f32.to_ne_bytes());
    /// # Ok::<(), muon_core::Error>(())
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.data)
    }

    /// The elements as mutable bytes (see [`as_bytes`](Self::as_bytes)): reading a tensor from
    /// a file or a transport is `m.as_bytes_mut().copy_from_slice(bytes)`, whatever the
    /// alignment of `bytes`. Every bit pattern is a valid element.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.data)
    }

    /// Matrix `e` of the stack, row-major.
    ///
    /// # Panics
    /// When `e` is not below the stack's `batch`, like slice indexing.
    pub fn item(&self, e: usize) -> &[T] {
        let n = self.shape.batch_stride();
        &self.data[e * n..(e + 1) * n]
    }
}

/// The portable backend for element type `T` (`Portable::<f32>::new()`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Portable<T>(PhantomData<T>);

impl<T> Portable<T> {
    /// The backend (it holds no state).
    pub const fn new() -> Self {
        Portable(PhantomData)
    }
}

impl<T: Real> Backend for Portable<T> {
    type Elem = T;
    type Matrix = HostMatrix<T>;

    fn shape(m: &HostMatrix<T>) -> Shape {
        m.shape
    }

    fn zeros(&self, shape: Shape) -> Result<HostMatrix<T>> {
        HostMatrix::try_zeros(shape)
    }

    fn upload(&self, dst: &mut HostMatrix<T>, src: &[T]) -> Result<()> {
        dst.copy_from_host(src)
    }

    fn download(&self, src: &HostMatrix<T>, dst: &mut [T]) -> Result<()> {
        src.copy_to_host(dst)
    }

    fn gemm(
        &self,
        dst: &mut HostMatrix<T>,
        alpha: T,
        a: &HostMatrix<T>,
        ta: Transpose,
        b: &HostMatrix<T>,
        tb: Transpose,
        beta: T,
    ) -> Result<()> {
        let (m, n, k) = gemm_dims(dst.shape, a.shape, ta, b.shape, tb)?;
        let (a_cols, b_cols) = (a.shape.cols, b.shape.cols);
        // op(x)[i, j] of one row-major matrix with `cols` columns.
        let at = |x: &[T], cols: usize, t: Transpose, i: usize, j: usize| match t {
            Transpose::No => x[i * cols + j],
            Transpose::Yes => x[j * cols + i],
        };
        for e in 0..dst.shape.batch {
            let (ae, be) = (a.item(e), b.item(e));
            let stride = dst.shape.batch_stride();
            let c = &mut dst.data[e * stride..(e + 1) * stride];
            for i in 0..m {
                let row = &mut c[i * n..(i + 1) * n];
                if beta == T::ZERO {
                    row.fill(T::ZERO);
                } else {
                    row.iter_mut().for_each(|v| *v *= beta);
                }
                for p in 0..k {
                    let aip = alpha * at(ae, a_cols, ta, i, p);
                    for (j, v) in row.iter_mut().enumerate() {
                        *v += aip * at(be, b_cols, tb, p, j);
                    }
                }
            }
        }
        Ok(())
    }

    fn axpby(&self, dst: &mut HostMatrix<T>, alpha: T, x: &HostMatrix<T>, beta: T) -> Result<()> {
        check_shape("axpby source", dst.shape, x.shape)?;
        for (d, &s) in dst.data.iter_mut().zip(&x.data) {
            *d = if beta == T::ZERO {
                alpha * s
            } else {
                alpha * s + beta * *d
            };
        }
        Ok(())
    }

    fn frobenius_norm(&self, x: &HostMatrix<T>, out: &mut HostMatrix<T>, index: usize) -> Result<()> {
        let sum: f64 = x.data.iter().map(|v| v.to_f64() * v.to_f64()).sum();
        check_slot("frobenius_norm", out.shape, index)?;
        out.data[index] = T::from_f64(libm::sqrt(sum));
        Ok(())
    }

    fn normalize_frobenius(&self, x: &mut HostMatrix<T>, norm_scale: T, eps: T) -> Result<()> {
        let stride = x.shape.batch_stride();
        for item in x.data.chunks_exact_mut(stride.max(1)) {
            let sum: f64 = item.iter().map(|v| v.to_f64() * v.to_f64()).sum();
            let inv = 1.0 / (norm_scale.to_f64() * libm::sqrt(sum) + eps.to_f64());
            let inv = T::from_f64(inv);
            item.iter_mut().for_each(|v| *v *= inv);
        }
        Ok(())
    }

    fn adamw_direction(
        &self,
        dir: &mut HostMatrix<T>,
        grad: &HostMatrix<T>,
        m: &mut HostMatrix<T>,
        v: &mut HostMatrix<T>,
        c: &AdamWCoefficients<T>,
    ) -> Result<()> {
        check_shape("adamw direction", grad.shape, dir.shape)?;
        check_shape("adamw first moment", grad.shape, m.shape)?;
        check_shape("adamw second moment", grad.shape, v.shape)?;
        let one = T::ONE;
        for i in 0..grad.data.len() {
            let g = grad.data[i];
            m.data[i] = c.beta1 * m.data[i] + (one - c.beta1) * g;
            v.data[i] = c.beta2 * v.data[i] + (one - c.beta2) * g * g;
            let m_hat = m.data[i] / c.bias_correction1;
            let v_hat = v.data[i] / c.bias_correction2;
            dir.data[i] = m_hat / (v_hat.sqrt() + c.eps);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte views against the standard library's own conversion, element by element.
    fn bytes_round_trip<T: Real>(values: &[T], to_bytes: impl Fn(T) -> Vec<u8>) {
        let shape = Shape::matrix(2, values.len() / 2);
        let m = HostMatrix::from_vec(shape, values.to_vec()).unwrap();
        let expected: Vec<u8> = values.iter().flat_map(|&v| to_bytes(v)).collect();
        assert_eq!(m.as_bytes(), &expected[..]);

        // Written through the bytes from an unaligned buffer, read back as elements.
        let mut unaligned = vec![0u8; expected.len() + 1];
        unaligned[1..].copy_from_slice(&expected);
        let mut back = HostMatrix::<T>::zeros(shape);
        back.as_bytes_mut().copy_from_slice(&unaligned[1..]);
        assert_eq!(back, m);
    }

    #[test]
    fn byte_views_match_native_byte_order() {
        bytes_round_trip(&[1.0f32, -2.5, f32::MIN_POSITIVE, 3.0e38], |v| {
            v.to_ne_bytes().to_vec()
        });
        bytes_round_trip(&[1.0f64, -2.5, f64::MIN_POSITIVE, 1e300], |v| {
            v.to_ne_bytes().to_vec()
        });
    }
}
