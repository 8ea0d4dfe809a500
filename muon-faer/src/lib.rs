//! # muon-faer
//!
//! The CPU backend of muon-rs: [`Faer`] implements [`muon_core::Backend`] on
//! [`HostMatrix`] stacks with faer's GEMM kernels, for `f32` and `f64`.
//!
//! - Matrix products run faer's sequential kernels; the backend splits the work across its own
//!   team of threads: over the stack when a stack of expert matrices is large enough to keep
//!   every thread busy, inside each product otherwise (see the `matmul` module docs).
//! - The symmetric products of Newton-Schulz ([`Backend::gram`], `S S` in
//!   [`Backend::symmetric_square`]) compute one triangle (faer's triangular `matmul`) and
//!   mirror it: about a third fewer flops per Newton-Schulz step on a square matrix.
//! - Elementwise passes are fused (momentum + Nesterov, the decoupled update) and split across
//!   threads for large buffers. Reductions accumulate in `f64` in a fixed order.
//! - After a warm-up call per shape nothing allocates: faer's packing buffers are thread-local,
//!   and the team hands out work through fixed arrays on the stack (the reason it is not rayon,
//!   whose injector queue allocates every 63 jobs). `tests/alloc.rs` checks it.
//! - faer's x86 kernels leave the upper halves of the AVX registers dirty, which slows every
//!   later SSE instruction on the thread (glibc's `expf` ran ~30x slower); the backend issues
//!   `vzeroupper` after each product. Code that calls faer directly should call
//!   [`clear_avx_upper_state`] after it too.
//! - `X^T X` of a tall input with a Gram side of 768 or more goes through a transposed copy
//!   in a scratch buffer the backend keeps (faer reads the strided original at half speed).
//!
//! ## Example
//!
//! Orthogonalize a 64 x 96 matrix with Moonlight's Newton-Schulz and check its singular
//! values landed in the quintic's band, then take an optimizer step:
//!
//! ```
//! use muon_core::{newton_schulz, Backend, HybridConfig, HybridOptimizer, HostMatrix,
//!                 NewtonSchulz, NsWorkspace, ParamRole, ParamSpec, Shape, Transpose};
//! use muon_faer::Faer;
//!
//! # fn main() -> muon_core::Result<()> {
//! let cpu = Faer::<f32>::with_threads(2);
//! let shape = Shape::matrix(64, 96);
//! let data: Vec<f32> = (0..shape.len()).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
//!
//! let mut ws = NsWorkspace::new(&cpu, shape)?;
//! cpu.upload(&mut ws.x, &data)?;
//! newton_schulz(&cpu, &NewtonSchulz::quintic(), &mut ws)?;
//!
//! // O O^T has eigenvalues sigma^2; its trace over 64 is their mean, near 1.
//! let mut gram = cpu.zeros(Shape::matrix(64, 64))?;
//! cpu.gram(&mut gram, &ws.x, Transpose::No)?;
//! let trace: f32 = (0..64).map(|i| gram.as_slice()[i * 64 + i]).sum();
//! assert!((0.6..1.3).contains(&(trace / 64.0)), "mean sigma^2 {}", trace / 64.0);
//!
//! // A Muon step on that matrix as a parameter.
//! let specs = vec![ParamSpec::new("w", shape, ParamRole::Hidden)];
//! let mut opt = HybridOptimizer::new(&cpu, specs, HybridConfig::default())?;
//! let mut params = vec![HostMatrix::zeros(shape)];
//! let grads = vec![HostMatrix::from_vec(shape, data)?];
//! let report = opt.step(&cpu, &mut params, &grads, 0.01)?;
//! assert_eq!(report.step, 1);
//! # Ok(())
//! # }
//! ```
//!
//! ## Data-parallel ranks
//!
//! [`ThreadGroup`] runs the ranks of muon-core's `DistributedOptimizer` (the report's ZeRO-1
//! Distributed Muon) as threads of one process: the reference the GPU's NCCL group is tested
//! against, and a way to check a data-parallel engine on one machine.
//!
//! With the `mpi` feature, `MpiGroup` runs them as the processes of an MPI job (`mpirun -np
//! N`, one rank per process, across the machines of a CPU cluster), through the `mpi` crate
//! (rsmpi 0.8; tested with Open MPI 4.1). It gives `ThreadGroup`'s results to the bit (the
//! sums of a reduce-scatter run in rank order, in Rust), and every collective has a deadline,
//! so a rank whose peers are gone fails with an error instead of hanging.
//!
//! ## Threads
//!
//! [`Faer::new`] uses every core [`std::thread::available_parallelism`] reports;
//! [`Faer::with_threads`] and [`Faer::set_threads`] pick a count (1 = the caller's thread
//! alone). The team's workers spin for 200 us after a job, then sleep; a backend handle is
//! cheap to clone and clones share the team.

#![warn(missing_docs)]

mod collective;
mod elementwise;
mod matmul;
#[cfg(feature = "mpi")]
mod mpi_group;
mod ns;
mod team;

use std::fmt;
use std::sync::{Arc, Mutex};

use faer::Accum;
use muon_core::{
    check_shape, check_slot, gemm_dims, AdamWCoefficients, Backend, Error, HostMatrix, NewtonSchulz,
    NsWorkspace, Real, Result, Shape, Transpose,
};

use crate::matmul::Product;
use crate::team::Team;

pub use crate::collective::{ThreadGroup, Traffic};
#[cfg(feature = "mpi")]
pub use crate::mpi_group::MpiGroup;
pub use crate::team::{clear_avx_upper_state, MAX_THREADS};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// The element types faer's kernels serve here: `f32` and `f64`.
pub trait Elem: Real + faer::traits::RealField + sealed::Sealed {}
impl Elem for f32 {}
impl Elem for f64 {}

/// The faer CPU backend for element type `T` (`f32` or `f64`).
///
/// A handle to a team of threads; clones share it. All methods take `&self` and calls from
/// several threads on one handle are serialized.
pub struct Faer<T> {
    team: Arc<Team>,
    /// A transposed copy of a tall input for its Gram product (see `matmul::symmetric`);
    /// grown on first use, then reused.
    scratch: Arc<Mutex<Vec<T>>>,
}

impl<T> Clone for Faer<T> {
    fn clone(&self) -> Self {
        Faer {
            team: Arc::clone(&self.team),
            scratch: Arc::clone(&self.scratch),
        }
    }
}

impl<T> fmt::Debug for Faer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faer")
            .field("threads", &self.team.threads())
            .finish()
    }
}

impl<T: Elem> Default for Faer<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Elem> Faer<T> {
    /// A backend using every core the OS reports (`available_parallelism`).
    pub fn new() -> Self {
        Self::with_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// A backend running on `threads` threads, the caller's included, clamped to
    /// `1..=`[`MAX_THREADS`]. If the OS refuses to start a thread, it runs on those it got.
    pub fn with_threads(threads: usize) -> Self {
        Faer {
            team: new_team(threads),
            scratch: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The number of threads work is split across.
    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    /// Changes the thread count (clamped like [`with_threads`](Self::with_threads)): starts a
    /// new team for this handle; clones made before keep the old one.
    pub fn set_threads(&mut self, threads: usize) {
        if threads.clamp(1, MAX_THREADS) != self.team.threads() {
            self.team = new_team(threads);
        }
    }
}

/// A team whose threads have each run a faer product once: faer keeps its packing buffers in
/// thread-locals created on a thread's first product, and with dynamic scheduling that first
/// product could otherwise fall inside any later call.
fn new_team(threads: usize) -> Arc<Team> {
    fn product<T: Elem>() {
        const N: usize = 32;
        let (a, mut c) = ([T::ONE; N * N], [T::ZERO; N * N]);
        let a = faer::MatRef::from_row_major_slice(&a, N, N);
        let c = faer::MatMut::from_row_major_slice_mut(&mut c, N, N);
        faer::linalg::matmul::matmul(c, Accum::Replace, a, a, T::ONE, faer::Par::Seq);
        clear_avx_upper_state();
    }
    let team = Team::new(threads);
    team.run_everywhere(&|| {
        product::<f32>();
        product::<f64>();
    });
    Arc::new(team)
}

impl<T: Elem> Backend for Faer<T> {
    type Elem = T;
    type Matrix = HostMatrix<T>;

    fn shape(m: &HostMatrix<T>) -> Shape {
        m.shape()
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
        let (m, n, k) = gemm_dims(dst.shape(), a.shape(), ta, b.shape(), tb)?;
        if dst.shape().is_empty() {
            return Ok(());
        }
        let prod = Product {
            a: a.as_slice(),
            a_shape: a.shape(),
            ta,
            b: b.as_slice(),
            b_shape: b.shape(),
            tb,
            alpha,
            beta,
        };
        matmul::gemm(&self.team, dst.as_mut_slice(), m, n, k, prod);
        Ok(())
    }

    fn axpby(&self, dst: &mut HostMatrix<T>, alpha: T, x: &HostMatrix<T>, beta: T) -> Result<()> {
        check_shape("axpby operand", dst.shape(), x.shape())?;
        elementwise::axpby(&self.team, dst.as_mut_slice(), alpha, x.as_slice(), beta);
        Ok(())
    }

    fn sum_squares(&self, x: &HostMatrix<T>, out: &mut HostMatrix<T>, index: usize) -> Result<()> {
        check_slot("sum_squares", out.shape(), index)?;
        out.as_mut_slice()[index] = T::from_f64(elementwise::sum_squares(&self.team, x.as_slice()));
        Ok(())
    }

    fn normalize_frobenius(&self, x: &mut HostMatrix<T>, norm_scale: T, eps: T) -> Result<()> {
        let stride = x.shape().batch_stride();
        elementwise::normalize_frobenius(&self.team, x.as_mut_slice(), stride, norm_scale, eps);
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
        check_shape("adamw direction", grad.shape(), dir.shape())?;
        check_shape("adamw first moment", grad.shape(), m.shape())?;
        check_shape("adamw second moment", grad.shape(), v.shape())?;
        elementwise::adamw_direction(
            &self.team,
            dir.as_mut_slice(),
            grad.as_slice(),
            m.as_mut_slice(),
            v.as_mut_slice(),
            c,
        );
        Ok(())
    }

    fn copy(&self, dst: &mut HostMatrix<T>, x: &HostMatrix<T>) -> Result<()> {
        check_shape("copy source", dst.shape(), x.shape())?;
        elementwise::copy(&self.team, dst.as_mut_slice(), x.as_slice());
        Ok(())
    }

    fn gram(&self, dst: &mut HostMatrix<T>, x: &HostMatrix<T>, op: Transpose) -> Result<()> {
        let xs = x.shape();
        let (m, k) = xs.op(op);
        check_shape("gram destination", Shape::batched(xs.batch, m, m), dst.shape())?;
        if dst.shape().is_empty() {
            return Ok(());
        }
        let prod = Product {
            a: x.as_slice(),
            a_shape: xs,
            ta: op,
            b: x.as_slice(),
            b_shape: xs,
            tb: op.flip(),
            alpha: T::ONE,
            beta: T::ZERO,
        };
        matmul::symmetric(&self.team, dst.as_mut_slice(), m, k, prod, &self.scratch);
        Ok(())
    }

    fn symmetric_square(&self, dst: &mut HostMatrix<T>, alpha: T, s: &HostMatrix<T>, beta: T) -> Result<()> {
        let ss = s.shape();
        if ss.rows != ss.cols {
            return Err(Error::Backend(format!(
                "symmetric_square of a non-square {ss} matrix"
            )));
        }
        check_shape("symmetric_square destination", ss, dst.shape())?;
        if ss.is_empty() {
            return Ok(());
        }
        let prod = Product {
            a: s.as_slice(),
            a_shape: ss,
            ta: Transpose::No,
            b: s.as_slice(),
            b_shape: ss,
            tb: Transpose::No,
            alpha,
            beta,
        };
        matmul::symmetric(
            &self.team,
            dst.as_mut_slice(),
            ss.rows,
            ss.rows,
            prod,
            &self.scratch,
        );
        Ok(())
    }

    fn newton_schulz(&self, config: &NewtonSchulz, ws: &mut NsWorkspace<Self>) -> Result<()> {
        ns::newton_schulz(self, config, ws)
    }

    fn momentum_nesterov(
        &self,
        momentum: &mut HostMatrix<T>,
        grad: &HostMatrix<T>,
        mu: T,
        nesterov: bool,
        out: &mut HostMatrix<T>,
    ) -> Result<()> {
        check_shape("momentum", grad.shape(), momentum.shape())?;
        check_shape("momentum output", grad.shape(), out.shape())?;
        elementwise::momentum_nesterov(
            &self.team,
            momentum.as_mut_slice(),
            grad.as_slice(),
            mu,
            nesterov,
            out.as_mut_slice(),
        );
        Ok(())
    }

    fn apply_update(
        &self,
        param: &mut HostMatrix<T>,
        update: &HostMatrix<T>,
        step: T,
        decay: T,
    ) -> Result<()> {
        check_shape("update", param.shape(), update.shape())?;
        // The trait's default, `axpby(param, -step, update, 1 - decay)`, in one pass.
        elementwise::axpby(
            &self.team,
            param.as_mut_slice(),
            -step,
            update.as_slice(),
            T::ONE - decay,
        );
        Ok(())
    }
}
