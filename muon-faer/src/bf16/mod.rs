//! bf16 matrix products on the CPU's dot-product units: inputs rounded to bf16 (round to
//! nearest even), f32 accumulation, f32 output.
//!
//! Three ways to run one, chosen at run time ([`Bf16Kernel`]):
//! - **AMX** (Intel Sapphire Rapids and later): TDPBF16PS on 16 x 16 f32 tiles, 32 x 32 blocks
//!   of C (four tiles) per step of 32 `k`. Linux must grant the process the tile-data state
//!   (asked once, at detection); each product loads the tile configuration on its thread
//!   and releases the tiles when it ends.
//! - **AVX512-BF16** (AMD Zen 4/5, Intel Cooper Lake and later): VDPBF16PS in a 6 x 64
//!   register tile.
//! - Where neither exists the backend runs its f32 products.
//!
//! The blocked drivers and the packing are safe code (`driver`, `pack`), generic over their
//! micro-kernels, so the same loops also run scalar models of the instructions (`model`): the
//! AMX path's logic is tested on every machine that way, and each real path against its model
//! where the CPU has it. The `unsafe` code (detection, the kernels, the `asm!`) is in `arch`.
//!
//! Packing buffers come from a pool the backend keeps (one buffer per thread, allocated on the
//! first bf16 product): after that nothing allocates.

pub(crate) mod arch;
mod driver;
mod model;
mod pack;
mod timer;

use std::fmt;
use std::sync::{Mutex, OnceLock, PoisonError, TryLockError};

use faer::MatMut;
use muon_core::{Error, Result, Transpose};

use crate::matmul::{part_range, plan, split_items, Plan, Product};
use crate::team::{Team, MAX_PARTS};

pub(crate) use driver::{Skip, Triangle};
pub(crate) use pack::KView;
#[cfg(feature = "product-timer")]
pub use timer::{start_product_timer, stop_product_timer, ProductTiming};

/// Which unit runs the backend's bf16 products ([`Faer::with_bf16_kernel`](crate::Faer::with_bf16_kernel)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Bf16Kernel {
    /// The fastest this machine has: AMX, else AVX512-BF16; the f32 products where it has
    /// neither.
    #[default]
    Auto,
    /// Intel AMX (AMX-TILE and AMX-BF16, and the OS's tile-data permission).
    Amx,
    /// AVX512-BF16 (with AVX512F, BW and VL).
    Avx512Bf16,
    /// The AMX path's blocking and packing with the tile instructions carried out by a scalar
    /// model of their documented semantics: any CPU, slowly. For testing where there is no AMX.
    AmxModel,
    /// The AVX512-BF16 path's blocking and packing with a scalar model of VDPBF16PS: any CPU,
    /// slowly.
    Avx512Bf16Model,
}

impl Bf16Kernel {
    /// Every kernel, `Auto` first.
    pub const ALL: [Bf16Kernel; 5] = [
        Bf16Kernel::Auto,
        Bf16Kernel::Amx,
        Bf16Kernel::Avx512Bf16,
        Bf16Kernel::AmxModel,
        Bf16Kernel::Avx512Bf16Model,
    ];

    /// A short name for reports: `"auto"`, `"amx"`, `"avx512bf16"`, `"amx-model"`,
    /// `"avx512bf16-model"`.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Auto => "auto",
            Bf16Kernel::Amx => "amx",
            Bf16Kernel::Avx512Bf16 => "avx512bf16",
            Bf16Kernel::AmxModel => "amx-model",
            Bf16Kernel::Avx512Bf16Model => "avx512bf16-model",
        }
    }

    /// `Ok` if this machine runs the kernel, else an error saying what it lacks (the CPU
    /// feature, or the OS's permission). `Auto` and the models always run.
    pub fn check(self) -> Result<()> {
        let s = arch::support();
        let why = match self {
            Bf16Kernel::Amx => s.amx.as_ref().err(),
            Bf16Kernel::Avx512Bf16 => s.avx512.as_ref().err(),
            _ => None,
        };
        match why {
            Some(reason) => Err(Error::Backend(format!("bf16 kernel {}: {reason}", self.name()))),
            None => Ok(()),
        }
    }

    /// The kernel `Auto` runs on this machine (`Amx` or `Avx512Bf16`), or `None` when it has
    /// neither and bf16 products fall back to f32.
    pub fn detect() -> Option<Bf16Kernel> {
        Path::resolve(Bf16Kernel::Auto).map(Path::kernel)
    }
}

impl fmt::Display for Bf16Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel this machine runs, holding the proof of its features.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Path {
    Amx(arch::Amx),
    Avx512(arch::Avx512Bf16),
    AmxModel,
    Avx512Model,
}

impl Path {
    /// The path `kernel` takes here (`None`: not available, or `Auto` with nothing to run).
    pub(crate) fn resolve(kernel: Bf16Kernel) -> Option<Path> {
        let s = arch::support();
        match kernel {
            Bf16Kernel::Auto => s
                .amx
                .as_ref()
                .ok()
                .map(|&t| Path::Amx(t))
                .or_else(|| s.avx512.as_ref().ok().map(|&t| Path::Avx512(t))),
            Bf16Kernel::Amx => s.amx.as_ref().ok().map(|&t| Path::Amx(t)),
            Bf16Kernel::Avx512Bf16 => s.avx512.as_ref().ok().map(|&t| Path::Avx512(t)),
            Bf16Kernel::AmxModel => Some(Path::AmxModel),
            Bf16Kernel::Avx512Bf16Model => Some(Path::Avx512Model),
        }
    }

    pub(crate) fn kernel(self) -> Bf16Kernel {
        match self {
            Path::Amx(_) => Bf16Kernel::Amx,
            Path::Avx512(_) => Bf16Kernel::Avx512Bf16,
            Path::AmxModel => Bf16Kernel::AmxModel,
            Path::Avx512Model => Bf16Kernel::Avx512Bf16Model,
        }
    }

    /// `c = alpha A B^T + beta c` on this path (see `driver::register_product`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn product(
        self,
        a: &KView<'_>,
        b: &KView<'_>,
        c: MatMut<'_, f32>,
        alpha: f32,
        beta: f32,
        skip: Skip,
        buf: &mut [u32],
    ) {
        match self {
            Path::Amx(t) => arch::amx_product(t, a, b, c, alpha, beta, skip, buf),
            Path::Avx512(t) => arch::avx512_product(t, a, b, c, alpha, beta, skip, buf),
            Path::AmxModel => driver::tile_product(model::AmxModel, a, b, c, alpha, beta, skip, buf),
            Path::Avx512Model => {
                driver::register_product(model::Vdpbf16psModel, a, b, c, alpha, beta, skip, buf)
            }
        }
    }
}

/// Packing buffers, one per thread that can run a product at once (the team's, and one more
/// for a caller outside it), all allocated on the first use so none is allocated later.
pub(crate) struct PackPool {
    count: usize,
    buffers: OnceLock<Box<[Mutex<Vec<u32>>]>>,
}

impl PackPool {
    pub(crate) fn new(threads: usize) -> Self {
        PackPool {
            count: threads + 1,
            buffers: OnceLock::new(),
        }
    }

    /// Runs `f` with a free buffer (waiting for one only if more threads than the pool has
    /// buffers run products at once).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut [u32]) -> R) -> R {
        let buffers = self.buffers.get_or_init(|| {
            (0..self.count)
                .map(|_| Mutex::new(vec![0u32; driver::BUFFER_LANES]))
                .collect()
        });
        for slot in buffers.iter() {
            match slot.try_lock() {
                Ok(mut guard) => return f(&mut guard),
                // A product that panicked left only scratch data behind.
                Err(TryLockError::Poisoned(p)) => return f(&mut p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let mut guard = buffers[0].lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }
}

/// Everything a bf16 product needs: the team, the buffers, the path.
#[derive(Clone, Copy)]
pub(crate) struct Bf16<'a> {
    pub(crate) team: &'a Team,
    pub(crate) pool: &'a PackPool,
    pub(crate) path: Path,
}

/// The team's [`plan`] for a bf16 product, except that an item it splits is cut into one
/// block per thread, not 2-4: each block packs the whole of the other operand, which weighs
/// more next to the bf16 kernels than next to faer's f32 ones. On a Zen 5 at 2 threads, a
/// 2048^3 product went from 675 to 757 GFLOP/s and Newton-Schulz on 2048x2048 from 325 to 263
/// ms. The price: a core taken by another process delays the whole product instead of taking
/// fewer blocks. Results do not change (the bf16 drivers give the same bits in any blocks).
fn bf16_plan(threads: usize, batch: usize, item_flops: f64, len: usize) -> Plan {
    match plan(threads, batch, item_flops, len) {
        Plan::InsideItems(_) => Plan::InsideItems(threads),
        other => other,
    }
}

/// The A operand of item `e` of a stacked product, as a `KView` (`m x k`).
fn a_view<'a>(p: &Product<'a, f32>, e: usize, m: usize, k: usize) -> KView<'a> {
    let n = p.a_shape.batch_stride();
    KView::new(&p.a[e * n..(e + 1) * n], m, k, p.ta == Transpose::No)
}

/// The B operand of item `e`, as `op(B)^T` (`n x k`).
fn b_view<'a>(p: &Product<'a, f32>, e: usize, n: usize, k: usize) -> KView<'a> {
    let s = p.b_shape.batch_stride();
    KView::new(&p.b[e * s..(e + 1) * s], n, k, p.tb == Transpose::Yes)
}

/// A row-major `rows x cols` slice as a faer view.
fn view_mut(data: &mut [f32], rows: usize, cols: usize) -> MatMut<'_, f32> {
    MatMut::from_row_major_slice_mut(data, rows, cols)
}

impl Bf16<'_> {
    /// One product on the calling thread, with a buffer from the pool.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block(
        &self,
        a: &KView<'_>,
        b: &KView<'_>,
        c: MatMut<'_, f32>,
        alpha: f32,
        beta: f32,
        skip: Skip,
    ) {
        self.pool
            .with(|buf| self.path.product(a, b, c, alpha, beta, skip, buf));
    }

    /// `dst = alpha op(a) op(b) + beta dst` for every item (`dst`: `batch x m x n`), split
    /// across the team as `matmul::gemm` splits its f32 products.
    pub(crate) fn gemm(&self, dst: &mut [f32], m: usize, n: usize, k: usize, prod: Product<'_, f32>) {
        let batch = prod.a_shape.batch;
        let stride = m * n;
        let (alpha, beta) = (prod.alpha, prod.beta);
        let item = |d: &mut [f32], e: usize| {
            let (a, b) = (a_view(&prod, e, m, k), b_view(&prod, e, n, k));
            self.block(&a, &b, view_mut(d, m, n), alpha, beta, Skip::NONE);
        };
        let flops = 2.0 * (m * n * k) as f64;
        match bf16_plan(self.team.threads(), batch, flops, m.max(n)) {
            Plan::Serial => {
                for (e, d) in dst.chunks_exact_mut(stride.max(1)).enumerate().take(batch) {
                    item(d, e);
                }
            }
            Plan::OverStack(parts) => {
                let mut runs = split_items(dst, stride, batch, parts);
                self.team.for_each_part(&mut runs[..parts], &|run| {
                    if let Some((first, data)) = run.take() {
                        for (i, d) in data.chunks_exact_mut(stride).enumerate() {
                            item(d, first + i);
                        }
                    }
                });
            }
            Plan::InsideItems(parts) => {
                for (e, d) in dst.chunks_exact_mut(stride).enumerate() {
                    let (a, b) = (a_view(&prod, e, m, k), b_view(&prod, e, n, k));
                    // Split the longer side of the output, so every block stays GEMM-shaped.
                    let by_rows = m >= n;
                    let len = if by_rows { m } else { n };
                    let mut blocks = [const { None }; MAX_PARTS];
                    let mut rest = view_mut(d, m, n);
                    for (p, slot) in blocks.iter_mut().enumerate().take(parts) {
                        let (start, end) = part_range(len, parts, p);
                        let (head, tail) = if by_rows {
                            rest.split_at_row_mut(end - start)
                        } else {
                            rest.split_at_col_mut(end - start)
                        };
                        *slot = Some((start, end, head));
                        rest = tail;
                    }
                    self.team.for_each_part(&mut blocks[..parts], &|block| {
                        if let Some((start, end, out)) = block.take() {
                            if by_rows {
                                self.block(&a.subrows(start, end - start), &b, out, alpha, beta, Skip::NONE);
                            } else {
                                self.block(&a, &b.subrows(start, end - start), out, alpha, beta, Skip::NONE);
                            }
                        }
                    });
                }
            }
        }
    }

    /// The lower triangle (diagonal included) of `dst = alpha lhs rhs^T + beta dst`, square
    /// `dst`, cut into `parts` row bands of equal area for the team (`None`: this thread).
    pub(crate) fn lower(
        &self,
        team: Option<(&Team, usize)>,
        dst: MatMut<'_, f32>,
        lhs: &KView<'_>,
        rhs: &KView<'_>,
        alpha: f32,
        beta: f32,
    ) {
        let m = dst.nrows();
        // Rows [start, end) need columns [0, end): the band's own diagonal block and what is
        // left of it; its tiles wholly above the diagonal are skipped.
        let band = |out: MatMut<'_, f32>, start: usize, end: usize| {
            if end > start {
                let out = out.subcols_mut(0, end);
                let rhs = rhs.subrows(0, end);
                self.block(
                    &lhs.subrows(start, end - start),
                    &rhs,
                    out,
                    alpha,
                    beta,
                    Skip::lower_c(start),
                );
            }
        };
        let Some((team, parts)) = team.filter(|&(_, parts)| parts > 1) else {
            band(dst, 0, m);
            return;
        };
        // Rows [0, r) of a lower triangle hold a share (r/m)^2 of its area.
        let cut = |p: usize| ((m as f64) * (p as f64 / parts as f64).sqrt()).round() as usize;
        let mut bands = [const { None }; MAX_PARTS];
        let mut rest = dst;
        for (p, slot) in bands.iter_mut().enumerate().take(parts) {
            let (start, end) = (cut(p), if p + 1 == parts { m } else { cut(p + 1) });
            let (head, tail) = rest.split_at_row_mut(end - start);
            *slot = Some((start, end, head));
            rest = tail;
        }
        team.for_each_part(&mut bands[..parts], &|b| {
            if let Some((start, end, out)) = b.take() {
                band(out, start, end);
            }
        });
    }

    /// `dst = alpha op(x) op(x)^T + beta dst` or `alpha s s + beta dst` on every item of a
    /// stack of symmetric `m x m` outputs: the lower triangle, then mirrored.
    pub(crate) fn symmetric(&self, dst: &mut [f32], m: usize, k: usize, prod: Product<'_, f32>) {
        let batch = prod.a_shape.batch;
        let stride = m * m;
        let item = |d: &mut [f32], e: usize, team: Option<(&Team, usize)>| {
            let (a, b) = (a_view(&prod, e, m, k), b_view(&prod, e, m, k));
            self.lower(team, view_mut(d, m, m), &a, &b, prod.alpha, prod.beta);
            crate::matmul::mirror_lower(d, m);
        };
        match bf16_plan(self.team.threads(), batch, (m * m * k) as f64, m) {
            Plan::Serial => {
                for (e, d) in dst.chunks_exact_mut(stride.max(1)).enumerate().take(batch) {
                    item(d, e, None);
                }
            }
            Plan::OverStack(parts) => {
                let mut runs = split_items(dst, stride, batch, parts);
                self.team.for_each_part(&mut runs[..parts], &|run| {
                    if let Some((first, data)) = run.take() {
                        for (i, d) in data.chunks_exact_mut(stride).enumerate() {
                            item(d, first + i, None);
                        }
                    }
                });
            }
            Plan::InsideItems(parts) => {
                for (e, d) in dst.chunks_exact_mut(stride).enumerate() {
                    item(d, e, Some((self.team, parts)));
                }
            }
        }
    }
}
