//! Newton-Schulz orthogonalization: an approximation of the polar factor `U V^T` of a matrix
//! `N = U S V^T`, made of matrix products alone (docs/DESIGN.md §2).
//!
//! ```text
//! X_0 = N / (norm_scale * ||N||_F + eps)       singular values now <= 1
//! for k in 0..steps:
//!     S = X X^T                               symmetric, min(A,B) square
//!     P = b_k S + c_k S S                      symmetric
//!     X = a_k X + P X
//! ```
//!
//! For a tall matrix (A > B) the iteration runs on `X^T`, so the Gram matrix is the small one.
//! Instead of transposing, the same recurrence is written on `X` itself: `S = X^T X` and
//! `X = a X + X P` (using `P^T = P`), which a GEMM expresses with transpose flags alone.

use alloc::vec::Vec;

use crate::{check_shape, Backend, Error, Real, Result, Shape, Transpose};

/// Keller Jordan's fixed quintic, used by Moonlight: `(a, b, c)` for every step. It does not
/// converge to 1; after 5 steps singular values lie roughly in [0.68, 1.13], by design.
pub const QUINTIC: [[f64; 3]; 1] = [[3.4445, -4.7750, 2.0315]];

/// The Polar Express 5-step schedule as modded-nanogpt uses it (Amsel et al., 2025; generator
/// l = 1e-3, cushion 0.02, safety 0.02). Pair with `norm_scale = 1.02`, `eps = 1e-6`.
pub const POLAR_EXPRESS: [[f64; 3]; 5] = [
    [8.156554524902461, -22.48329292557795, 15.878769915207462],
    [4.042929935166739, -2.808917465908714, 0.5000178451051316],
    [3.8916678022926607, -2.772484153217685, 0.5060648178503393],
    [3.285753657755655, -2.3681294933425376, 0.46449024233003106],
    [2.3465413258596377, -1.7097828382687081, 0.42323551169305323],
];

/// microsoft/dion's fallback 5-step schedule.
pub const DION: [[f64; 3]; 5] = [
    [4.0848, -6.8946, 2.9270],
    [3.9505, -6.3029, 2.6377],
    [3.7418, -5.5913, 2.3037],
    [2.8769, -3.1427, 1.2046],
    [2.8366, -3.0525, 1.2012],
];

/// How to run Newton-Schulz: the coefficient schedule is data, not code.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NewtonSchulz {
    /// `(a_k, b_k, c_k)` per step; steps past the end reuse the last entry, so a one-entry
    /// schedule is a fixed polynomial.
    pub coefficients: Vec<[f64; 3]>,
    /// Number of iterations.
    pub steps: usize,
    /// Added to the scaled norm before dividing.
    pub eps: f64,
    /// Multiplies the Frobenius norm: `X_0 = N / (norm_scale * ||N||_F + eps)`.
    pub norm_scale: f64,
}

impl Default for NewtonSchulz {
    /// Moonlight's choice: the fixed quintic, 5 steps, eps 1e-7.
    fn default() -> Self {
        Self::quintic()
    }
}

impl NewtonSchulz {
    /// The fixed quintic [`QUINTIC`], 5 steps, `eps = 1e-7`.
    pub fn quintic() -> Self {
        NewtonSchulz {
            coefficients: QUINTIC.to_vec(),
            steps: 5,
            eps: 1e-7,
            norm_scale: 1.0,
        }
    }

    /// The [`POLAR_EXPRESS`] schedule, 5 steps, `X_0 = N / (1.02 ||N||_F + 1e-6)`.
    pub fn polar_express() -> Self {
        NewtonSchulz {
            coefficients: POLAR_EXPRESS.to_vec(),
            steps: 5,
            eps: 1e-6,
            norm_scale: 1.02,
        }
    }

    /// microsoft/dion's [`DION`] schedule, 5 steps, `eps = 1e-7`.
    pub fn dion() -> Self {
        NewtonSchulz {
            coefficients: DION.to_vec(),
            steps: 5,
            eps: 1e-7,
            norm_scale: 1.0,
        }
    }

    /// The coefficients of step `k`.
    pub fn coefficients_at(&self, k: usize) -> [f64; 3] {
        let last = self.coefficients.len().saturating_sub(1);
        self.coefficients[k.min(last)]
    }

    /// Nominal flops of one run on an `A x B` matrix: per step `2 m m n` (S) + `2 m m m`
    /// (S S) + `2 m m n` (P X), with `m = min(A,B)`, `n = max(A,B)`. Benchmarks score
    /// throughput with this count even where a backend exploits symmetry.
    pub fn flops(&self, shape: Shape) -> f64 {
        let (m, n) = (shape.min_side() as f64, shape.max_side() as f64);
        shape.batch as f64 * self.steps as f64 * (4.0 * m * m * n + 2.0 * m * m * m)
    }

    /// Checks that the configuration can work.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: &str| Err(Error::InvalidConfig(msg.into()));
        if self.coefficients.is_empty() {
            return bad("newton_schulz.coefficients is empty");
        }
        if self.coefficients.iter().flatten().any(|c| !c.is_finite()) {
            return bad("newton_schulz.coefficients has a non-finite entry");
        }
        if self.steps == 0 {
            return bad("newton_schulz.steps must be at least 1");
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("newton_schulz.eps must be finite and > 0");
        }
        if !(self.norm_scale.is_finite() && self.norm_scale >= 1.0) {
            return bad("newton_schulz.norm_scale must be finite and >= 1 (so singular values start <= 1)");
        }
        Ok(())
    }
}

/// Buffers for Newton-Schulz on one shape, created once and reused every step.
///
/// Put the input in [`x`](Self::x) (shape of the parameter), call [`newton_schulz`], read the
/// output from `x`. The two Gram-sized buffers are `batch x m x m`, `m = min(A, B)`.
pub struct NsWorkspace<B: Backend> {
    /// Input, then output, of the iteration (the parameter's shape).
    pub x: B::Matrix,
    next: B::Matrix,
    gram: B::Matrix,
    poly: B::Matrix,
}

/// The buffers of an [`NsWorkspace`], for a backend's own [`Backend::newton_schulz`].
pub struct NsBuffers<'a, M> {
    /// Input, then output (the parameter's shape).
    pub x: &'a mut M,
    /// Scratch of the parameter's shape: the next iterate.
    pub next: &'a mut M,
    /// Scratch of shape `batch x m x m`: the Gram matrix `S`.
    pub gram: &'a mut M,
    /// Scratch of shape `batch x m x m`: the polynomial `P` of `S`.
    pub poly: &'a mut M,
}

impl<B: Backend> NsWorkspace<B> {
    /// Allocates the buffers for stacks of shape `shape`.
    pub fn new(backend: &B, shape: Shape) -> Result<Self> {
        if shape.is_empty() {
            return Err(Error::EmptyMatrix {
                what: alloc::format!("Newton-Schulz input of shape {shape}"),
            });
        }
        let m = shape.min_side();
        let small = Shape::batched(shape.batch, m, m);
        Ok(NsWorkspace {
            x: backend.zeros(shape)?,
            next: backend.zeros(shape)?,
            gram: backend.zeros(small)?,
            poly: backend.zeros(small)?,
        })
    }

    /// The shape this workspace serves.
    pub fn shape(&self) -> Shape {
        B::shape(&self.x)
    }

    /// Checks that Newton-Schulz can run here with `config`: the configuration is valid
    /// ([`NewtonSchulz::validate`]), and the buffers still fit one another (`x` is a public
    /// field, and an `x` of another shape than the workspace was made for has no room in its
    /// scratch). Every Newton-Schulz routine calls it first, so a bad call is an error rather
    /// than a panic or a silently partial result.
    pub fn check(&self, config: &NewtonSchulz) -> Result<()> {
        config.validate()?;
        let shape = B::shape(&self.next);
        check_shape(
            "Newton-Schulz input `ws.x` (the workspace's shape)",
            shape,
            self.shape(),
        )?;
        let m = shape.min_side();
        let small = Shape::batched(shape.batch, m, m);
        check_shape("Newton-Schulz Gram scratch", small, B::shape(&self.gram))?;
        check_shape("Newton-Schulz polynomial scratch", small, B::shape(&self.poly))
    }

    /// All four buffers at once. A backend's Newton-Schulz must leave its result in `x`;
    /// the other three are scratch whose contents need not survive.
    pub fn buffers(&mut self) -> NsBuffers<'_, B::Matrix> {
        NsBuffers {
            x: &mut self.x,
            next: &mut self.next,
            gram: &mut self.gram,
            poly: &mut self.poly,
        }
    }
}

/// Runs Newton-Schulz in place on `ws.x`, for each matrix of the stack: afterwards `ws.x`
/// approximates the polar factor of its input. Allocates nothing.
///
/// # Errors
/// [`Error::InvalidConfig`] for a configuration [`NewtonSchulz::validate`] refuses, and
/// [`Error::ShapeMismatch`] when `ws.x` was replaced by a matrix of another shape (see
/// [`NsWorkspace::check`]); nothing is changed then.
///
/// This is [`Backend::newton_schulz`]: [`newton_schulz_generic`] unless the backend has its
/// own.
pub fn newton_schulz<B: Backend>(backend: &B, config: &NewtonSchulz, ws: &mut NsWorkspace<B>) -> Result<()> {
    backend.newton_schulz(config, ws)
}

/// Newton-Schulz written on the trait's primitives, one operation at a time over the whole
/// stack: the default of [`Backend::newton_schulz`], and the reference a backend's own
/// version is tested against.
pub fn newton_schulz_generic<B: Backend>(
    backend: &B,
    config: &NewtonSchulz,
    ws: &mut NsWorkspace<B>,
) -> Result<()> {
    ws.check(config)?;
    let e = |v: f64| B::Elem::from_f64(v);
    let shape = ws.shape();
    backend.normalize_frobenius(&mut ws.x, e(config.norm_scale), e(config.eps))?;
    // Wide (A <= B): S = X X^T, X = a X + P X.  Tall: S = X^T X, X = a X + X P.
    let wide = shape.rows <= shape.cols;
    let gram_op = if wide { Transpose::No } else { Transpose::Yes };
    for k in 0..config.steps {
        let [a, b, c] = config.coefficients_at(k);
        backend.gram(&mut ws.gram, &ws.x, gram_op)?;
        backend.copy(&mut ws.poly, &ws.gram)?;
        backend.symmetric_square(&mut ws.poly, e(c), &ws.gram, e(b))?;
        backend.copy(&mut ws.next, &ws.x)?;
        let (one, no) = (B::Elem::ONE, Transpose::No);
        if wide {
            backend.gemm(&mut ws.next, one, &ws.poly, no, &ws.x, no, e(a))?;
        } else {
            backend.gemm(&mut ws.next, one, &ws.x, no, &ws.poly, no, e(a))?;
        }
        core::mem::swap(&mut ws.x, &mut ws.next);
    }
    Ok(())
}

/// Newton-Schulz on the primitives with `a_k X` folded into the product, `X = (a_k I + P) X`,
/// for a backend that can add a scalar to the diagonal of each matrix of a stack
/// (`add_diagonal(p, a)` sets `p_e = p_e + a I` for every `e`). Against
/// [`newton_schulz_generic`] it saves a copy of `X` per step and lets the last product
/// overwrite its destination (`beta = 0`); results agree to rounding. Backends call it from
/// their [`Backend::newton_schulz`].
pub fn newton_schulz_folded<B: Backend>(
    backend: &B,
    config: &NewtonSchulz,
    ws: &mut NsWorkspace<B>,
    add_diagonal: impl Fn(&mut B::Matrix, B::Elem) -> Result<()>,
) -> Result<()> {
    ws.check(config)?;
    let e = |v: f64| B::Elem::from_f64(v);
    let shape = ws.shape();
    let wide = shape.rows <= shape.cols;
    let gram_op = if wide { Transpose::No } else { Transpose::Yes };
    let b = ws.buffers();
    backend.normalize_frobenius(b.x, e(config.norm_scale), e(config.eps))?;
    for k in 0..config.steps {
        let [a, bk, c] = config.coefficients_at(k);
        backend.gram(b.gram, b.x, gram_op)?;
        backend.copy(b.poly, b.gram)?;
        backend.symmetric_square(b.poly, e(c), b.gram, e(bk))?;
        add_diagonal(b.poly, e(a))?;
        let (one, zero, no) = (B::Elem::ONE, B::Elem::ZERO, Transpose::No);
        if wide {
            backend.gemm(b.next, one, b.poly, no, b.x, no, zero)?;
        } else {
            backend.gemm(b.next, one, b.x, no, b.poly, no, zero)?;
        }
        core::mem::swap(b.x, b.next);
    }
    Ok(())
}
