//! The matrix trait a backend implements.
//!
//! Everything Muon and AdamW do is written once, generically, in terms of the handful of
//! primitives below. The design fits a GPU whose matrices never leave the device:
//!
//! - Matrices are opaque handles (`Self::Matrix`); the generic code never reads an element.
//! - Reductions do not return numbers to the host. [`Backend::frobenius_norm`] writes into a slot
//!   of a small device-side matrix, and [`Backend::normalize_frobenius`] divides by the norm
//!   on the device. The optimizer reads one small vector back per step (the gradients' squared
//!   norms, to refuse a non-finite step before anything changes).
//! - Layout is row-major; a column-major BLAS (cuBLAS) computes a row-major `C = A B` as the
//!   column-major `C^T = B^T A^T` by swapping the operands, which keeps transpose flags free.
//! - Methods take `&self`: a backend is a handle (a cuBLAS handle and stream, a thread pool)
//!   and all work on it is ordered, like work queued on one CUDA stream.
//!
//! Required: allocation, host transfers, [`gemm`](Backend::gemm), [`axpby`](Backend::axpby),
//! two reductions and the AdamW elementwise update. Provided, with defaults a backend may
//! override to go faster: the symmetric products of Newton-Schulz, the fused momentum step,
//! and Newton-Schulz as a whole (to keep each matrix of a stack in cache for all its steps, or
//! to fuse what the primitives cannot).

use crate::{newton_schulz_generic, NewtonSchulz, NsWorkspace, Real, Result, Shape, Transpose};

/// Per-step constants of the AdamW elementwise update (see [`Backend::adamw_direction`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWCoefficients<T> {
    /// First-moment decay, beta1.
    pub beta1: T,
    /// Second-moment decay, beta2.
    pub beta2: T,
    /// Denominator guard.
    pub eps: T,
    /// `1 - beta1^t` for step `t` (starting at 1).
    pub bias_correction1: T,
    /// `1 - beta2^t`.
    pub bias_correction2: T,
}

/// A place where dense row-major matrix stacks live and the primitives of Muon run.
///
/// Every operand is a stack of `batch` matrices (see [`Shape`]); batched operations apply to
/// each matrix of the stack independently, like a strided-batched GEMM. Scalars `alpha` and
/// `beta` follow BLAS: `beta == 0` means the destination is overwritten, never read (so NaN in
/// uninitialized memory does not leak through).
///
/// Shapes are checked, never assumed: a method given operands of the wrong shapes returns
/// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) naming the operand (or, for a
/// `frobenius_norm` slot out of range, [`Error::Backend`](crate::Error::Backend)) and changes
/// nothing. [`gemm_dims`](crate::gemm_dims), [`check_shape`](crate::check_shape) and
/// [`check_slot`](crate::check_slot) implement the checks; a backend calls them before it
/// launches any work. The generic code in this crate only issues well-formed calls, so the
/// checks cost nothing but a comparison, and a backend that users call directly cannot be
/// made to panic or read out of bounds by a bad shape.
pub trait Backend {
    /// Element type of parameters, gradients and optimizer state.
    type Elem: Real;
    /// A dense row-major stack of matrices owned by this backend (host or device memory).
    type Matrix;

    /// The shape of `m`.
    fn shape(m: &Self::Matrix) -> Shape;

    /// A new stack of the given shape, filled with zeros.
    fn zeros(&self, shape: Shape) -> Result<Self::Matrix>;

    /// Copies `src` (row-major, `shape.len()` elements) into `dst`.
    fn upload(&self, dst: &mut Self::Matrix, src: &[Self::Elem]) -> Result<()>;

    /// Copies `src` into `dst` (row-major, `shape.len()` elements). On a GPU this waits for
    /// the queued work that writes `src`.
    fn download(&self, src: &Self::Matrix, dst: &mut [Self::Elem]) -> Result<()>;

    /// `dst = alpha * op(a) op(b) + beta * dst`, for each matrix of the stacks.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        dst: &mut Self::Matrix,
        alpha: Self::Elem,
        a: &Self::Matrix,
        transpose_a: Transpose,
        b: &Self::Matrix,
        transpose_b: Transpose,
        beta: Self::Elem,
    ) -> Result<()>;

    /// `dst = alpha * x + beta * dst`, elementwise over same-shape stacks.
    fn axpby(
        &self,
        dst: &mut Self::Matrix,
        alpha: Self::Elem,
        x: &Self::Matrix,
        beta: Self::Elem,
    ) -> Result<()>;

    /// Writes the Frobenius norm `sqrt(sum of squares)` of all elements of `x` (over the
    /// whole stack) into element `index` of `out`, leaving `out`'s other elements alone.
    /// Accumulate the squares in `f64` (or scaled): the norm of finite elements is then finite
    /// unless it exceeds the element type's range itself (an `f32` gradient with an entry of
    /// 1e20 has a squared norm past `f32::MAX` but a norm of 1e20). NaN or Inf in `x` gives a
    /// non-finite norm, which the optimizer reports as a non-finite gradient.
    fn frobenius_norm(&self, x: &Self::Matrix, out: &mut Self::Matrix, index: usize) -> Result<()>;

    /// Scales each matrix `x_e` of the stack to `x_e / (norm_scale * ||x_e||_F + eps)`,
    /// without leaving the device.
    fn normalize_frobenius(
        &self,
        x: &mut Self::Matrix,
        norm_scale: Self::Elem,
        eps: Self::Elem,
    ) -> Result<()>;

    /// The AdamW moment update and direction, elementwise:
    ///
    /// ```text
    /// m   = beta1 * m + (1 - beta1) * g
    /// v   = beta2 * v + (1 - beta2) * g^2
    /// dir = (m / bias_correction1) / (sqrt(v / bias_correction2) + eps)
    /// ```
    fn adamw_direction(
        &self,
        dir: &mut Self::Matrix,
        grad: &Self::Matrix,
        m: &mut Self::Matrix,
        v: &mut Self::Matrix,
        c: &AdamWCoefficients<Self::Elem>,
    ) -> Result<()>;

    // ----- Provided methods: defaults on the primitives, for backends to specialize. -----

    /// `dst = x` (same shapes).
    fn copy(&self, dst: &mut Self::Matrix, x: &Self::Matrix) -> Result<()> {
        self.axpby(dst, Self::Elem::ONE, x, Self::Elem::ZERO)
    }

    /// The Gram matrix `dst = op(x) op(x)^T`, which is symmetric: with `Transpose::No` it is
    /// `x x^T` (rows x rows), with `Transpose::Yes` it is `x^T x` (cols x cols). A backend may
    /// compute one triangle and mirror it (BLAS `syrk`); `dst` must end up full.
    fn gram(&self, dst: &mut Self::Matrix, x: &Self::Matrix, op: Transpose) -> Result<()> {
        let (one, zero) = (Self::Elem::ONE, Self::Elem::ZERO);
        self.gemm(dst, one, x, op, x, op.flip(), zero)
    }

    /// `dst = alpha * s s + beta * dst` for a symmetric `s`; the result is symmetric when
    /// `dst` was. A backend may compute one triangle and mirror it; `dst` must end up full.
    fn symmetric_square(
        &self,
        dst: &mut Self::Matrix,
        alpha: Self::Elem,
        s: &Self::Matrix,
        beta: Self::Elem,
    ) -> Result<()> {
        self.gemm(dst, alpha, s, Transpose::No, s, Transpose::No, beta)
    }

    /// Runs Newton-Schulz in place on `ws.x` (see [`newton_schulz`](crate::newton_schulz)).
    ///
    /// The default, [`newton_schulz_generic`], issues the primitives above one operation at
    /// a time for the whole stack. A backend may override it, for example to run all steps of
    /// one small matrix of a stack while it sits in cache, or to fold `a_k X` into the product
    /// (`X = (a_k I + P) X`) instead of copying `X`. An override must agree with the default
    /// to the backend's rounding, which is how backends test it, and must return the same
    /// errors before doing any work: call [`NsWorkspace::check`] first.
    fn newton_schulz(&self, config: &NewtonSchulz, ws: &mut NsWorkspace<Self>) -> Result<()>
    where
        Self: Sized,
    {
        newton_schulz_generic(self, config, ws)
    }

    /// The Muon momentum step, with its Nesterov look-ahead written to `out`:
    ///
    /// ```text
    /// momentum = mu * momentum + grad
    /// out      = mu * momentum + grad   (nesterov)    or    momentum   (not nesterov)
    /// ```
    ///
    /// A GPU backend fuses this into one kernel.
    fn momentum_nesterov(
        &self,
        momentum: &mut Self::Matrix,
        grad: &Self::Matrix,
        mu: Self::Elem,
        nesterov: bool,
        out: &mut Self::Matrix,
    ) -> Result<()> {
        self.axpby(momentum, Self::Elem::ONE, grad, mu)?;
        if nesterov {
            self.copy(out, grad)?;
            self.axpby(out, mu, momentum, Self::Elem::ONE)
        } else {
            self.copy(out, momentum)
        }
    }

    /// The decoupled update `param = (1 - lr * wd) * param - step * update`, where `step` is
    /// `lr` times the update scale. A GPU backend fuses this into one kernel.
    fn apply_update(
        &self,
        param: &mut Self::Matrix,
        update: &Self::Matrix,
        step: Self::Elem,
        decay: Self::Elem,
    ) -> Result<()> {
        self.axpby(param, -step, update, Self::Elem::ONE - decay)
    }
}
