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
//!   [`clear_avx_upper_state`] after it too; [`view`] and [`view_mut`] give it faer views of
//!   row-major storage.
//! - `X^T X` of a tall input with a Gram side of 768 or more goes through a transposed copy
//!   in a scratch buffer the backend keeps (faer reads the strided original at half speed).
//! - With [`Precision::Bf16`] ([`Faer::with_precision`]) the products of a `Faer<f32>` round
//!   their inputs to bf16 and accumulate in f32 on the CPU's matrix units: Intel AMX or
//!   AVX512-BF16, detected at run time ([`Bf16Kernel`]); the f32 kernels where it has neither.
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

mod bf16;
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
    check_shape, check_slot, gemm_dims, AdamWCoefficients, Backend, HostMatrix, NewtonSchulz, NsWorkspace,
    Real, Result, Shape, Transpose,
};

use crate::bf16::{Bf16, PackPool, Path};
use crate::matmul::Product;
use crate::team::Team;

pub use crate::bf16::arch::prefetch;
pub use crate::bf16::Bf16Kernel;
#[cfg(feature = "product-timer")]
pub use crate::bf16::{start_product_timer, stop_product_timer, ProductTiming};
pub use crate::collective::{ThreadGroup, Traffic};
pub use crate::matmul::{view, view_mut, Stored, StoredMut};
#[cfg(feature = "mpi")]
pub use crate::mpi_group::MpiGroup;
pub use crate::team::{clear_avx_upper_state, MAX_THREADS};
pub use muon_core::Precision;

/// What a [`Faer::product_on_thread`] may leave out: a triangle of zeros in `op(a)`, or of
/// `c` that nobody reads (causal attention: the scores `Q K^T` are read on and below the
/// diagonal only, the probabilities `P` are lower triangular). A hint the bf16 kernels act
/// on (whole tiles, whole pairs of `k`), with the needed elements' bits unchanged as long as
/// `b` is finite; the f32 products compute everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Structure {
    /// Every element of `c`, every term.
    #[default]
    Full,
    /// Only `c[i][j]` with `j <= i` is needed; the others may be left as they were.
    LowerC,
    /// `op(a)[i][p] == 0` for `p > i` (lower triangular, the diagonal included).
    LowerA,
    /// `op(a)[i][p] == 0` for `p < i` (upper triangular, the diagonal included).
    UpperA,
}

impl Structure {
    /// What the bf16 driver leaves out.
    fn skip(self) -> bf16::Skip {
        use bf16::{Skip, Triangle};
        match self {
            Structure::Full => Skip::NONE,
            Structure::LowerC => Skip::lower_c(0),
            Structure::LowerA => Skip {
                lower_c: None,
                a: Some(Triangle::Lower),
            },
            Structure::UpperA => Skip {
                lower_c: None,
                a: Some(Triangle::Upper),
            },
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// The element types faer's kernels serve here: `f32` and `f64`.
pub trait Elem: Real + faer::traits::RealField + sealed::Sealed {
    /// `s` as `f32` elements when `Self` is `f32` (the bf16 products serve `f32` only).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// `s` as `f32` elements when `Self` is `f32`.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
}
impl Elem for f32 {
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
}
impl Elem for f64 {
    fn as_f32(_: &[f64]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
}

/// The faer CPU backend for element type `T` (`f32` or `f64`).
///
/// A handle to a team of threads; clones share it. All methods take `&self` and calls from
/// several threads on one handle are serialized.
///
/// Its matrix products run in a [`Precision`] ([`with_precision`](Self::with_precision)),
/// `F32` unless set:
/// - `F32`: faer's f32 (or f64) kernels.
/// - `Bf16` (`Faer<f32>` only): inputs rounded to bf16 (nearest even), f32 accumulation and
///   output, on AMX or AVX512-BF16 (see [`Bf16Kernel`]). On a CPU with neither, and on
///   `Faer<f64>`, the products stay in the element type: bf16 is a way to run `f32` work
///   faster, and a machine without the units would only run it slower.
/// - `Tf32` runs as `F32`: a CPU has no TF32 units, and rounding inputs to TF32 in software
///   would cost time and buy nothing (f32 is at least as accurate). A configuration written
///   for a GPU thus runs unchanged here.
///
/// Elementwise work, reductions, momentum, weights and optimizer state stay in `T` whatever
/// the precision.
pub struct Faer<T> {
    team: Arc<Team>,
    /// A transposed copy of a tall input for its Gram product (see `matmul::symmetric`);
    /// grown on first use, then reused.
    scratch: Arc<Mutex<Vec<T>>>,
    /// The bf16 products' packing buffers, one per thread of the team (and a caller's).
    packs: Arc<PackPool>,
    precision: Precision,
    kernel: Bf16Kernel,
}

impl<T> Clone for Faer<T> {
    fn clone(&self) -> Self {
        Faer {
            team: Arc::clone(&self.team),
            scratch: Arc::clone(&self.scratch),
            packs: Arc::clone(&self.packs),
            precision: self.precision,
            kernel: self.kernel,
        }
    }
}

impl<T> fmt::Debug for Faer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faer")
            .field("threads", &self.team.threads())
            .field("precision", &self.precision)
            .field("bf16_kernel", &self.kernel)
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
        let team = new_team(threads);
        Faer {
            packs: Arc::new(PackPool::new(team.threads())),
            team,
            scratch: Arc::new(Mutex::new(Vec::new())),
            precision: Precision::F32,
            kernel: Bf16Kernel::Auto,
        }
    }

    /// The same backend with its products in `precision` (see the type's docs for what each
    /// precision runs as on this machine).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Sets the precision of the products that follow.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The precision set (what it runs as: [`bf16_kernel`](Self::bf16_kernel)).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The same backend with its bf16 products on `kernel` (`Auto` unless set), or an error
    /// naming what this machine lacks for it (the CPU feature, or the OS's permission). The
    /// way to test each path, and to compare them.
    pub fn with_bf16_kernel(mut self, kernel: Bf16Kernel) -> Result<Self> {
        kernel.check()?;
        self.kernel = kernel;
        Ok(self)
    }

    /// The kernel the products run on now: `Some` when the precision is `Bf16`, the element
    /// type `f32` and the machine runs the chosen kernel (never `Auto`: the one it resolved
    /// to); `None` when they run in the element type.
    pub fn bf16_kernel(&self) -> Option<Bf16Kernel> {
        self.bf16_path().map(Path::kernel)
    }

    /// Whether a product cut into blocks of rows (of `c` and `op(a)`) gives the bits of the
    /// whole product, so a caller may choose its blocks freely: true when products run in
    /// bf16 (each element's sum runs over the same fixed blocks of `k` in the same order
    /// whatever its row), false in f32 and f64 (faer's kernels sum a product of few rows in
    /// another order than a taller one).
    pub fn row_blocks_exact(&self) -> bool {
        self.bf16_path().is_some()
    }

    fn bf16_path(&self) -> Option<Path> {
        let f32_elems = T::as_f32(&[]).is_some();
        if self.precision == Precision::Bf16 && f32_elems {
            Path::resolve(self.kernel)
        } else {
            None
        }
    }

    /// A checked product's operands as `f32`, with the bf16 context, when products run in bf16.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn bf16_product<'a>(
        &'a self,
        dst: &'a mut HostMatrix<T>,
        a: &'a HostMatrix<T>,
        ta: Transpose,
        b: &'a HostMatrix<T>,
        tb: Transpose,
        alpha: T,
        beta: T,
    ) -> Option<(Bf16<'a>, Product<'a, f32>, &'a mut [f32])> {
        let bf = self.bf16()?;
        let prod = Product {
            a: T::as_f32(a.as_slice())?,
            a_shape: a.shape(),
            ta,
            b: T::as_f32(b.as_slice())?,
            b_shape: b.shape(),
            tb,
            alpha: alpha.to_f64() as f32,
            beta: beta.to_f64() as f32,
        };
        Some((bf, prod, T::as_f32_mut(dst.as_mut_slice())?))
    }

    /// The bf16 product context, when products run in bf16.
    fn bf16(&self) -> Option<Bf16<'_>> {
        self.bf16_path().map(|path| Bf16 {
            team: &self.team,
            pool: &self.packs,
            path,
        })
    }

    /// One product on the calling thread, not the team, in the backend's precision: for
    /// callers that split their own work across threads (moonlight-ref's grouped expert GEMMs
    /// run fixed row blocks on rayon, its attention one sequence's heads per task).
    /// `c = alpha op(a) op(b)`, or `c += alpha op(a) op(b)` with `accumulate`, on row-major
    /// operands as they are stored, each with its own row stride (a head's block of columns
    /// is read and written in place). In bf16 it takes one of the backend's packing buffers
    /// (the pool is allocated on the first bf16 product, then reused): nothing allocates after
    /// that. Whether cutting `c` into row blocks changes the bits depends on the precision:
    /// [`row_blocks_exact`](Self::row_blocks_exact). `structure` names a triangle of zeros in
    /// `op(a)` or of `c` nobody reads, which the bf16 kernels then skip ([`Structure`]).
    ///
    /// # Panics
    /// If an operand's slice is shorter than its shape and stride, or the shapes do not
    /// chain (`op(a)`: `c.rows x k`, `op(b)`: `k x c.cols`): the caller has checked its
    /// operands (this is a kernel, not an API boundary).
    pub fn product_on_thread(
        &self,
        c: StoredMut<'_, T>,
        a: Stored<'_, T>,
        b: Stored<'_, T>,
        alpha: T,
        accumulate: bool,
        structure: Structure,
    ) {
        let ((am, k), (kb, bn), (m, n)) = (a.op_shape(), b.op_shape(), (c.rows, c.cols));
        assert!(
            am == m && kb == k && bn == n,
            "product_on_thread: {am} x {k} times {kb} x {bn} into {m} x {n}"
        );
        if m == 0 || n == 0 {
            return;
        }
        let (a32, b32) = (T::as_f32(a.data), T::as_f32(b.data));
        if let (Some(bf), Some(a32), Some(b32)) = (self.bf16(), a32, b32) {
            let (rows, cols, ld) = (c.rows, c.cols, c.ld);
            let data = T::as_f32_mut(c.data).expect("f32 like its operands");
            let c32 = StoredMut { data, rows, cols, ld };
            // A as `m x k`, B as `op(B)^T`, `n x k`, in the layouts they are stored in.
            let av = bf16::KView::strided(a32, m, k, a.op == Transpose::No, a.ld);
            let bv = bf16::KView::strided(b32, n, k, b.op == Transpose::Yes, b.ld);
            let beta = if accumulate { 1.0 } else { 0.0 };
            let alpha = alpha.to_f64() as f32;
            bf.block(&av, &bv, c32.view_mut(), alpha, beta, structure.skip());
            return;
        }
        // f32: every element, every term (the structure is a hint; faer's triangular products
        // would change the order of the sums, so the bits, against a full product).
        let accum = if accumulate { Accum::Add } else { Accum::Replace };
        faer::linalg::matmul::matmul(c.view_mut(), accum, a.view(), b.view(), alpha, faer::Par::Seq);
        // faer's x86 kernels leave the AVX upper halves dirty (see the crate docs).
        clear_avx_upper_state();
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
            self.packs = Arc::new(PackPool::new(self.team.threads()));
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
        if let Some((bf, prod, d)) = self.bf16_product(dst, a, ta, b, tb, alpha, beta) {
            bf.gemm(d, m, n, k, prod);
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

    fn frobenius_norm(&self, x: &HostMatrix<T>, out: &mut HostMatrix<T>, index: usize) -> Result<()> {
        check_slot("frobenius_norm", out.shape(), index)?;
        let sum = elementwise::sum_squares(&self.team, x.as_slice());
        out.as_mut_slice()[index] = T::from_f64(sum.sqrt());
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
        let (one, zero) = (T::ONE, T::ZERO);
        if let Some((bf, prod, d)) = self.bf16_product(dst, x, op, x, op.flip(), one, zero) {
            bf.symmetric(d, m, k, prod);
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
        let square = Shape::batched(ss.batch, ss.rows, ss.rows);
        check_shape("symmetric_square operand (square)", square, ss)?;
        check_shape("symmetric_square destination", ss, dst.shape())?;
        if ss.is_empty() {
            return Ok(());
        }
        let no = Transpose::No;
        if let Some((bf, prod, d)) = self.bf16_product(dst, s, no, s, no, alpha, beta) {
            bf.symmetric(d, ss.rows, ss.rows, prod);
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
