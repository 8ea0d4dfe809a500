//! [`ModelOps`](crate::ops::ModelOps) on the CPU, for every backend whose matrices are host
//! slices ([`HostMatrix`]): [`Portable`] (any [`CpuReal`], f64 for gradient checks) and
//! [`muon_faer::Faer`] (f32 for training, f64 too). Both are a [`HostBackend`], and each op
//! family of [`crate::ops`] is implemented once for every host backend, in one file per family:
//! `base.rs` (index buffers, fill, memory, warm-up), `token.rs` (embedding, RMSNorm,
//! cross-entropy), `attention.rs` (column blocks, RoPE, causal softmax, the attention core on
//! heads in their token rows) and `ffn.rs` (SwiGLU and the MoE layer).
//!
//! Row-wise work runs on rayon (token rows, attention one sequence per task, expert row
//! ranges); every reduction runs inside one task in a fixed order (eight lanes, then the
//! lanes summed), so results do not depend on the thread count. Row reductions (and the
//! router's few numbers per token) are computed in `f64`, the elementwise passes over
//! activations in the element type. The hot loops run compiled for the widest vectors the
//! CPU has (`simd.rs`: [`vectorized`]), with the same bits at every width.
//!
//! Every op checks its operands before touching them: a wrong shape is an
//! [`Error::ShapeMismatch`] naming the operand, an index buffer of the wrong length an
//! [`Error::CountMismatch`], an index out of range (a token outside the vocabulary, an
//! expert, a row) an [`Error::Backend`] naming the buffer and the position; nothing is
//! written then. The checks allocate nothing unless they fail.

mod attention;
mod base;
mod ffn;
mod simd;
mod token;

pub use simd::{set_simd_level, simd_level, vectorized, SimdLevel};

use muon_core::{check_shape, Backend, Error, HostMatrix, Portable, Precision, Real, Result, Shape};
pub use muon_faer::{Stored, StoredMut, Structure};

/// A backend whose matrices are [`HostMatrix`] stacks of a [`CpuReal`]: every op family is
/// implemented once for all of them.
///
/// Its [`Backend::gemm`] runs in the backend's [`Precision`]; the products the kernels issue
/// themselves on rayon's threads (the grouped expert GEMMs' row blocks, one per task) go
/// through [`product_on_thread`](Self::product_on_thread), so they run in it too.
pub trait HostBackend:
    Backend<Elem: CpuReal, Matrix = HostMatrix<<Self as Backend>::Elem>> + Clone + Send + Sync
{
    /// This backend with its products in `precision` (sharing its threads), or an error
    /// naming the precision it cannot run.
    fn host_in_precision(&self, precision: Precision) -> Result<Self>;

    /// The precision its products run in.
    fn host_precision(&self) -> Precision;

    /// Whether [`product_on_thread`](Self::product_on_thread) gives the same bits for a
    /// product cut into blocks of rows as for the whole: then callers may cut by the thread
    /// count (fewer, taller products) without making results depend on it.
    fn row_blocks_exact(&self) -> bool;

    /// One product on the calling thread, as [`CpuReal::matmul`] has it, in the backend's
    /// precision; `structure` names a triangle of zeros in `op(a)` or of `c` nobody reads,
    /// which a backend may skip (muon-faer's bf16 kernels do; the needed elements' bits are
    /// those of the full product).
    fn product_on_thread(
        &self,
        c: StoredMut<'_, Self::Elem>,
        a: Stored<'_, Self::Elem>,
        b: Stored<'_, Self::Elem>,
        alpha: Self::Elem,
        accumulate: bool,
        structure: Structure,
    );
}

impl<T: CpuReal> HostBackend for Portable<T> {
    fn host_in_precision(&self, precision: Precision) -> Result<Self> {
        match precision {
            Precision::F32 => Ok(*self),
            other => Err(Error::Backend(format!(
                "the portable backend runs its products in its element type only, not {other}: \
                 use muon-faer's Faer for {other}"
            ))),
        }
    }

    fn host_precision(&self) -> Precision {
        Precision::F32
    }

    fn row_blocks_exact(&self) -> bool {
        false
    }

    fn product_on_thread(
        &self,
        c: StoredMut<'_, T>,
        a: Stored<'_, T>,
        b: Stored<'_, T>,
        alpha: T,
        accumulate: bool,
        _: Structure,
    ) {
        T::matmul(c, a, b, alpha, accumulate);
    }
}

impl<T: muon_faer::Elem + CpuReal> HostBackend for muon_faer::Faer<T> {
    fn host_in_precision(&self, precision: Precision) -> Result<Self> {
        Ok(self.clone().with_precision(precision))
    }

    fn host_precision(&self) -> Precision {
        self.precision()
    }

    fn row_blocks_exact(&self) -> bool {
        muon_faer::Faer::row_blocks_exact(self)
    }

    fn product_on_thread(
        &self,
        c: StoredMut<'_, T>,
        a: Stored<'_, T>,
        b: Stored<'_, T>,
        alpha: T,
        accumulate: bool,
        structure: Structure,
    ) {
        muon_faer::Faer::product_on_thread(self, c, a, b, alpha, accumulate, structure);
    }
}

/// The element types of the host kernels: [`Real`] plus the exponential in the element's own
/// precision and a single-threaded faer product.
///
/// `f32` uses its own inlined exponential ([`exp_f32`]) rather than libm's `expf`: the SwiGLU
/// sigmoids and softmax exponentials dominate the non-GEMM time, and an inlined polynomial
/// neither pays a call per element nor depends on the thread's AVX state (after a faer
/// product leaves the AVX upper halves dirty, libm's `expf` ran ~25x slower on x86-64, 4 ns ->
/// 100+ ns per call, which once made the softmax the bottleneck; every faer product here is
/// now followed by `muon_faer::clear_avx_upper_state`).
pub trait CpuReal: Real {
    /// Softmax outputs below this are stored as exact zeros (1e-30 in f32, 1e-300 in f64):
    /// near-subnormal probabilities make later products with them (the LM head's and
    /// attention's GEMMs, forward and backward) subnormal, and each subnormal result takes a
    /// microcode assist on x86; a long run without weight decay slowed 4x as its predictions
    /// sharpened. A probability that small changes no sum it enters.
    const PROB_FLOOR: Self;

    /// `e^self`.
    fn exp(self) -> Self;

    /// One single-threaded product on row-major operands as stored, with faer's kernels:
    /// `c = alpha * op(a) op(b)` (or `c += ...` with `accumulate`).
    fn matmul(
        c: StoredMut<'_, Self>,
        a: Stored<'_, Self>,
        b: Stored<'_, Self>,
        alpha: Self,
        accumulate: bool,
    );
}

macro_rules! impl_cpu_real {
    ($t:ty, $exp:path, $floor:expr) => {
        impl CpuReal for $t {
            const PROB_FLOOR: Self = $floor;

            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }

            fn matmul(
                c: StoredMut<'_, Self>,
                a: Stored<'_, Self>,
                b: Stored<'_, Self>,
                alpha: Self,
                accumulate: bool,
            ) {
                let accum = if accumulate {
                    faer::Accum::Add
                } else {
                    faer::Accum::Replace
                };
                faer::linalg::matmul::matmul(
                    c.view_mut(),
                    accum,
                    a.view(),
                    b.view(),
                    alpha,
                    faer::Par::Seq,
                );
                // faer's x86 kernels return with the AVX upper halves dirty, which makes
                // legacy-SSE code on this thread (libm among it) pay a transition penalty.
                muon_faer::clear_avx_upper_state();
            }
        }
    };
}
impl_cpu_real!(f32, exp_f32, 1e-30);
impl_cpu_real!(f64, f64::exp, 1e-300);

/// `e^x` in `f32` (Cephes `expf`: range reduction by `ln 2` in two parts, a degree-6
/// polynomial; within 2 ulp of the exact value on `[-87, 88]`). Below -87.3 it returns
/// ~1e-38 instead of a subnormal (the callers add it to 1 or normalize by a sum that includes
/// `e^0`), above 88 it saturates near `f32::MAX`; NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // `clamp` passes NaN through (unlike min/max).
    let x = x.clamp(-87.3, 88.0);
    // n = floor(x / ln 2 + 1/2), without `floor` (a libm call on baseline x86-64) and without
    // `as i32` (whose saturating conversion the compiler does one lane at a time, which kept
    // the callers' loops from vectorizing): adding 1.5 * 2^23 rounds t to an integer (to
    // nearest even) in the low bits of the sum, then a step down where that rounded up.
    // |t| < 128 here, far inside the trick's 2^22.
    const ROUND: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + 0.5;
    let sum = t + ROUND;
    let rounded = sum - ROUND;
    let up = rounded > t;
    let n = if up { rounded - 1.0 } else { rounded };
    let n_bits = (sum.to_bits() as i32)
        .wrapping_sub(ROUND.to_bits() as i32)
        .wrapping_sub(up as i32);
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits((n_bits.wrapping_add(127) as u32) << 23)
}

// ----- shared by the families -----

/// Rows handed to one rayon task at least: keeps tiny problems on one thread.
const MIN_ROWS: usize = 16;

#[inline(always)]
fn f<T: CpuReal>(x: T) -> f64 {
    x.to_f64()
}
#[inline(always)]
fn t<T: CpuReal>(x: f64) -> T {
    T::from_f64(x)
}

/// Lanes of the row reductions: independent accumulators the compiler keeps in vector
/// registers. A single running sum would serialize the loop (each add waits for the last, and
/// the compiler may not reorder float adds), so every reduction here sums in this fixed
/// order instead: the same bits on every machine and thread count.
const LANES: usize = 8;

/// The largest value of a non-empty row, as `fold(x[0], max)` would give it (NaNs are skipped
/// unless `x[0]` is one; the maximum of the others does not depend on the order).
#[inline(always)]
fn lane_max<T: CpuReal>(x: &[T]) -> T {
    let pick = |m: T, v: T| if v > m { v } else { m };
    let mut lanes = [x[0]; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = pick(*m, v);
        }
    }
    let m = lanes.into_iter().fold(x[0], pick);
    tail.iter().copied().fold(m, pick)
}

/// `sum_j prod_i x_i[j]` in f64 over the shortest factor (`sum_j x[j]` for one factor, a dot
/// product for two), accumulated over [`LANES`] lanes.
#[inline(always)]
fn lane_sum<T: CpuReal, const N: usize>(factors: [&[T]; N]) -> f64 {
    let len = factors.iter().map(|x| x.len()).min().unwrap_or(0);
    let factors = factors.map(|x| &x[..len]);
    // `1.0 * a` is `a` and `(1.0 * a) * b` is `a * b` exactly: one and two factors round as a
    // plain sum and a plain dot product do.
    let term = |j: usize| factors.iter().fold(1.0, |p, x| p * f(x[j]));
    let full = len / LANES * LANES;
    let mut lanes = [0.0f64; LANES];
    for c in (0..full).step_by(LANES) {
        // Each factor's chunk as an array: indices below `LANES` need no bounds checks, which
        // kept the loop scalar.
        let chunks = factors.map(|x| -> &[T; LANES] { x[c..c + LANES].try_into().expect("LANES long") });
        for (l, s) in lanes.iter_mut().enumerate() {
            *s += chunks.iter().fold(1.0, |p, x| p * f(x[l]));
        }
    }
    lanes.iter().sum::<f64>() + (full..len).map(term).sum::<f64>()
}

/// A probability, or zero below [`CpuReal::PROB_FLOOR`]; NaN stays NaN.
#[inline(always)]
fn floored<T: CpuReal>(p: T) -> T {
    if p < T::PROB_FLOOR {
        T::ZERO
    } else {
        p
    }
}

/// `(rows, cols)` of a plain (batch 1) matrix with at least one column: the row-wise loops cut
/// the storage into rows.
fn dims<T: CpuReal>(m: &HostMatrix<T>, what: &str) -> Result<(usize, usize)> {
    let s = m.shape();
    check_shape(what, Shape::matrix(s.rows, s.cols), s)?;
    if s.cols == 0 {
        return Err(Error::EmptyMatrix { what: what.into() });
    }
    Ok((s.rows, s.cols))
}

/// Checks that `found` has the shape of `expected`.
fn same<T: CpuReal>(what: &str, expected: &HostMatrix<T>, found: &HostMatrix<T>) -> Result<()> {
    check_shape(what, expected.shape(), found.shape())
}

/// Checks the length of an index buffer.
fn check_len(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::CountMismatch {
            what,
            expected,
            found,
        })
    }
}

/// Checks that every index in `idx` is below `bound` (a vocabulary, an expert count, a row
/// count).
fn check_indices(what: &str, idx: &[u32], bound: usize) -> Result<()> {
    // The largest index (a reduction the compiler vectorizes); the position only on failure.
    if (idx.iter().copied().fold(0, u32::max) as usize) < bound {
        return Ok(());
    }
    match idx.iter().position(|&i| i as usize >= bound) {
        None => Ok(()),
        Some(p) => Err(Error::Backend(format!(
            "{what}[{p}] = {} is out of range: it must be below {bound}",
            idx[p]
        ))),
    }
}

/// `dst[r] = src[rows[r]]`: the body of both `FfnOps::gather_rows` and
/// `TokenOps::embedding_forward` (a lookup is a gather of table rows). `names` names the
/// operands in errors: `(dst, src, rows)`.
fn gather_rows<T: CpuReal>(
    dst: &mut HostMatrix<T>,
    src: &HostMatrix<T>,
    rows: &[u32],
    names: (&str, &str, &'static str),
) -> Result<()> {
    use rayon::prelude::*;
    let (r, c) = dims(dst, names.0)?;
    let (n, _) = dims(src, names.1)?;
    check_shape(names.1, Shape::matrix(n, c), src.shape())?;
    check_len(names.2, r, rows.len())?;
    check_indices(names.2, rows, n)?;
    let s = src.as_slice();
    dst.as_mut_slice()
        .par_chunks_mut(c)
        .with_min_len(MIN_ROWS)
        .zip(rows)
        .for_each(|(d, &i)| {
            let i = i as usize;
            d.copy_from_slice(&s[i * c..(i + 1) * c]);
        });
    Ok(())
}

#[cfg(test)]
mod tests;
