//! Matrix products on stacks: plain GEMM, the symmetric Gram product and the square of a
//! symmetric matrix, each on faer's sequential kernels, split across the team.
//!
//! How a product over a stack of `E` matrices is split across `p` threads (see [`plan`]):
//! - over the stack (each matrix is a part; threads claim whole matrices and run sequential
//!   GEMMs) when there are at least `p` matrices and they divide evenly, are many (`>= 4p`),
//!   or are too small to split well;
//! - otherwise each matrix large enough is cut into 2 (4 from a side of 1024) blocks of its
//!   output per thread, claimed dynamically; each block packs its own copy of the shared
//!   operand, which costs `O(mk)` next to the block's `O(mnk / blocks)` product;
//! - calls under 4 MFLOP in all run on the caller's thread.
//!
//! Symmetric outputs compute their lower triangle only (faer's triangular `matmul` with
//! `BlockStructure::TriangularLower`, about half the flops) and mirror it into the upper one.

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::matmul::{self as fm};
use faer::{Accum, MatMut, MatRef, Par};
use std::sync::Mutex;

use muon_core::{Shape, Transpose};

use crate::team::{clear_avx_upper_state, Team, MAX_PARTS};
use crate::Elem;

/// Below this many flops a whole call runs on one thread: waking a parked worker costs a few
/// microseconds, about what a core does in this many flops (~10 us at ~100 GFLOP/s).
const PARALLEL_MIN_FLOPS: f64 = 1.0e6;
/// A single matrix product is split across threads only above this many flops (each half
/// then still outlasts a wake-up). Measured on 2 Zen 3 cores against the earlier 4e6 / 8e6:
/// Newton-Schulz on the single matrices of a small model (128x192 to 192x288) ~1.2x faster
/// at two threads, no shape slower beyond the machine's noise.
const SPLIT_MIN_FLOPS: f64 = 2.0e6;

/// A row-major `rows x cols` matrix (one item of a stack) as a faer view, transposed if asked:
/// how code calling faer's kernels directly on [`HostMatrix`](muon_core::HostMatrix) storage
/// hands them its operands.
pub fn view<T>(data: &[T], rows: usize, cols: usize, op: Transpose) -> MatRef<'_, T> {
    Stored::new(data, rows, cols, op).view()
}

/// A mutable row-major `rows x cols` matrix as a faer view (the destination of a product).
pub fn view_mut<T>(data: &mut [T], rows: usize, cols: usize) -> MatMut<'_, T> {
    StoredMut::new(data, rows, cols).view_mut()
}

/// An operand of [`Faer::product_on_thread`](crate::Faer::product_on_thread) as it is
/// stored: a row-major `rows x cols` matrix whose rows start `ld` elements apart (`ld >= cols`:
/// a block of columns of a wider matrix, such as one attention head's columns of a
/// token-rows matrix), used as it is or transposed.
#[derive(Clone, Copy, Debug)]
pub struct Stored<'a, T> {
    /// The elements, from the first row's first.
    pub data: &'a [T],
    /// Stored rows.
    pub rows: usize,
    /// Stored columns.
    pub cols: usize,
    /// Elements from one stored row to the next.
    pub ld: usize,
    /// Whether the product reads it transposed.
    pub op: Transpose,
}

impl<'a, T> Stored<'a, T> {
    /// A dense `rows x cols` matrix (`ld == cols`).
    pub fn new(data: &'a [T], rows: usize, cols: usize, op: Transpose) -> Self {
        Stored {
            data,
            rows,
            cols,
            ld: cols,
            op,
        }
    }

    /// The same matrix with its rows `ld` elements apart.
    pub fn with_ld(self, ld: usize) -> Self {
        Stored { ld, ..self }
    }

    /// The same stored matrix, read the other way round.
    pub fn transposed(self) -> Self {
        let op = match self.op {
            Transpose::No => Transpose::Yes,
            Transpose::Yes => Transpose::No,
        };
        Stored { op, ..self }
    }

    /// `(rows, cols)` of `op(self)`.
    pub fn op_shape(&self) -> (usize, usize) {
        match self.op {
            Transpose::No => (self.rows, self.cols),
            Transpose::Yes => (self.cols, self.rows),
        }
    }

    /// `op(self)` as a faer view.
    ///
    /// # Panics
    /// If `ld < cols` or `data` ends before the last element.
    pub fn view(&self) -> MatRef<'a, T> {
        check_strided("Stored", self.data.len(), self.rows, self.cols, self.ld);
        let m = MatRef::from_row_major_slice_with_stride(self.data, self.rows, self.cols, self.ld);
        match self.op {
            Transpose::No => m,
            Transpose::Yes => m.transpose(),
        }
    }
}

/// The destination of [`Faer::product_on_thread`](crate::Faer::product_on_thread): a
/// row-major `rows x cols` matrix whose rows start `ld` elements apart.
#[derive(Debug)]
pub struct StoredMut<'a, T> {
    /// The elements, from the first row's first.
    pub data: &'a mut [T],
    /// Rows (`m` of the product).
    pub rows: usize,
    /// Columns (`n` of the product).
    pub cols: usize,
    /// Elements from one stored row to the next.
    pub ld: usize,
}

impl<'a, T> StoredMut<'a, T> {
    /// A dense `rows x cols` matrix (`ld == cols`).
    pub fn new(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        StoredMut {
            data,
            rows,
            cols,
            ld: cols,
        }
    }

    /// The same matrix with its rows `ld` elements apart.
    pub fn with_ld(self, ld: usize) -> Self {
        StoredMut { ld, ..self }
    }

    /// As a faer view.
    ///
    /// # Panics
    /// If `ld < cols` or `data` ends before the last element.
    pub fn view_mut(self) -> MatMut<'a, T> {
        check_strided("StoredMut", self.data.len(), self.rows, self.cols, self.ld);
        // The transpose of a column-major `cols x rows` view: faer 0.24's
        // `from_row_major_slice_with_stride_mut` swaps the two strides (a column-major view).
        MatMut::from_column_major_slice_with_stride_mut(self.data, self.cols, self.rows, self.ld)
            .transpose_mut()
    }
}

/// Panics unless a `rows x cols` matrix with rows `ld` apart fits in `len` elements.
pub(crate) fn check_strided(what: &str, len: usize, rows: usize, cols: usize, ld: usize) {
    let needed = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1).saturating_mul(ld).saturating_add(cols)
    };
    assert!(
        ld >= cols && len >= needed,
        "{what}: {len} elements for {rows} x {cols} with rows {ld} apart"
    );
}

/// `[start, end)` of part `p` when `n` things are dealt into `parts` near-equal parts.
pub(crate) fn part_range(n: usize, parts: usize, p: usize) -> (usize, usize) {
    let (q, r) = (n / parts, n % parts);
    let start = p * q + p.min(r);
    (start, start + q + usize::from(p < r))
}

/// Splits a stack's storage into `parts` runs of whole matrices: `(first item, storage)`.
pub(crate) fn split_items<T>(
    mut data: &mut [T],
    stride: usize,
    items: usize,
    parts: usize,
) -> [Option<(usize, &mut [T])>; MAX_PARTS] {
    let mut out = [const { None }; MAX_PARTS];
    for (p, slot) in out.iter_mut().enumerate().take(parts) {
        let (start, end) = part_range(items, parts, p);
        let (head, tail) = std::mem::take(&mut data).split_at_mut((end - start) * stride);
        *slot = Some((start, head));
        data = tail;
    }
    out
}

/// How a product over a stack is run: on the caller's thread, with the stack's matrices as
/// the parts threads claim (`OverStack(parts)`, runs of whole matrices), or with each matrix
/// cut into `InsideItems(parts)` blocks.
pub(crate) enum Plan {
    Serial,
    OverStack(usize),
    InsideItems(usize),
}

/// `len`: the output side a split would cut.
pub(crate) fn plan(threads: usize, batch: usize, item_flops: f64, len: usize) -> Plan {
    let total = item_flops * batch as f64;
    if threads <= 1 || total < PARALLEL_MIN_FLOPS {
        return Plan::Serial;
    }
    // Blocks of at least 32 rows keep the kernels efficient; more blocks than threads let a
    // thread that runs late (a shared core) take fewer of them.
    let blocks = (threads * if len >= 1024 { 4 } else { 2 })
        .min(len / 32)
        .min(MAX_PARTS);
    let split = item_flops >= SPLIT_MIN_FLOPS && blocks >= threads;
    if batch >= threads && (batch.is_multiple_of(threads) || batch >= 4 * threads || !split) {
        Plan::OverStack(batch.min(MAX_PARTS))
    } else if split {
        Plan::InsideItems(blocks)
    } else if batch >= 2 {
        Plan::OverStack(batch.min(MAX_PARTS))
    } else {
        Plan::Serial
    }
}

/// The operands of one stacked product, as the backend received them (already checked).
#[derive(Clone, Copy)]
pub(crate) struct Product<'a, T> {
    pub a: &'a [T],
    pub a_shape: Shape,
    pub ta: Transpose,
    pub b: &'a [T],
    pub b_shape: Shape,
    pub tb: Transpose,
    pub alpha: T,
    /// BLAS `beta`: each block of the destination is scaled just before its product, while
    /// it is in cache, rather than in a separate pass over the whole stack.
    pub beta: T,
}

/// Applies BLAS `beta` to a block of the destination and returns faer's accumulate flag:
/// `beta == 0` overwrites (never reads), `beta == 1` adds, anything else scales then adds.
fn prepare<T: Elem>(mut dst: MatMut<'_, T>, beta: T) -> Accum {
    if beta == T::ZERO {
        return Accum::Replace;
    }
    if beta != T::ONE {
        // Row by row over contiguous slices (our views are row-major): vectorizes, and walks
        // memory in order.
        for i in 0..dst.nrows() {
            match dst.as_mut().row_mut(i).try_as_row_major_mut() {
                Some(row) => row.as_slice_mut().iter_mut().for_each(|x| *x *= beta),
                None => faer::zip!(dst.as_mut().row_mut(i)).for_each(|faer::unzip!(x)| *x *= beta),
            }
        }
    }
    Accum::Add
}

impl<T: Elem> Product<'_, T> {
    fn a_item(&self, e: usize) -> MatRef<'_, T> {
        let n = self.a_shape.batch_stride();
        view(
            &self.a[e * n..(e + 1) * n],
            self.a_shape.rows,
            self.a_shape.cols,
            self.ta,
        )
    }

    fn b_item(&self, e: usize) -> MatRef<'_, T> {
        let n = self.b_shape.batch_stride();
        view(
            &self.b[e * n..(e + 1) * n],
            self.b_shape.rows,
            self.b_shape.cols,
            self.tb,
        )
    }
}

/// `dst = alpha op(a) op(b) (+ dst)` for every item, `dst` of shape `batch x m x n`.
pub(crate) fn gemm<T: Elem>(team: &Team, dst: &mut [T], m: usize, n: usize, k: usize, prod: Product<'_, T>) {
    let batch = prod.a_shape.batch;
    let stride = m * n;
    let item = |dst: &mut [T], e: usize| {
        let mut out = view_mut(dst, m, n);
        let accum = prepare(out.as_mut(), prod.beta);
        fm::matmul(out, accum, prod.a_item(e), prod.b_item(e), prod.alpha, Par::Seq);
        clear_avx_upper_state();
    };
    let flops = 2.0 * (m * n * k) as f64;
    match plan(team.threads(), batch, flops, m.max(n)) {
        Plan::Serial => {
            for (e, d) in dst.chunks_exact_mut(stride.max(1)).enumerate().take(batch) {
                item(d, e);
            }
        }
        Plan::OverStack(parts) => {
            let mut runs = split_items(dst, stride, batch, parts);
            team.for_each_part(&mut runs[..parts], &|run| {
                if let Some((first, data)) = run.take() {
                    for (i, d) in data.chunks_exact_mut(stride).enumerate() {
                        item(d, first + i);
                    }
                }
            });
        }
        Plan::InsideItems(parts) => {
            for (e, d) in dst.chunks_exact_mut(stride).enumerate() {
                let (a, b) = (prod.a_item(e), prod.b_item(e));
                let mut blocks = [const { None }; MAX_PARTS];
                // Split the longer side of the output, so every block stays GEMM-shaped.
                let mut rest = view_mut(d, m, n);
                let by_rows = m >= n;
                let len = if by_rows { m } else { n };
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
                team.for_each_part(&mut blocks[..parts], &|block| {
                    if let Some((start, end, mut out)) = block.take() {
                        let accum = prepare(out.as_mut(), prod.beta);
                        let (lhs, rhs) = if by_rows {
                            (a.subrows(start, end - start), b)
                        } else {
                            (a, b.subcols(start, end - start))
                        };
                        fm::matmul(out, accum, lhs, rhs, prod.alpha, Par::Seq);
                        clear_avx_upper_state();
                    }
                });
            }
        }
    }
}

/// The lower triangle (diagonal included) of `dst = alpha lhs rhs (+ dst)`, square `dst`,
/// cut into `parts` row bands of equal area for the team (`None`: on this thread).
pub(crate) fn lower_product<T: Elem>(
    team: Option<(&Team, usize)>,
    dst: MatMut<'_, T>,
    beta: T,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    alpha: T,
) {
    let m = dst.nrows();
    let band = |out: MatMut<'_, T>, start: usize, end: usize| {
        // Rows [start, end): a rectangle left of the diagonal block, then the block's lower
        // triangle; the part right of it belongs to the upper triangle.
        let (mut left, right) = out.split_at_col_mut(start);
        let (mut diag, _) = right.split_at_col_mut(end - start);
        // Scaling the whole diagonal block is harmless: its upper part is mirrored over.
        let accum = prepare(diag.as_mut(), beta);
        prepare(left.as_mut(), beta);
        if end == start {
            return;
        }
        let lhs_band = lhs.subrows(start, end - start);
        if start > 0 {
            fm::matmul(left, accum, lhs_band, rhs.subcols(0, start), alpha, Par::Seq);
            clear_avx_upper_state();
        }
        triangular::matmul(
            diag,
            BlockStructure::TriangularLower,
            accum,
            lhs_band,
            BlockStructure::Rectangular,
            rhs.subcols(start, end - start),
            BlockStructure::Rectangular,
            alpha,
            Par::Seq,
        );
        clear_avx_upper_state();
    };
    let Some((team, parts)) = team.filter(|&(_, parts)| parts > 1) else {
        band(dst, 0, m);
        return;
    };
    // Rows [0, r) of a lower triangle hold a share (r/m)^2 of its area: cut at m sqrt(p/parts).
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

/// Copies the lower triangle of a square row-major matrix onto its upper triangle. Works in
/// 16 x 16 tiles through a buffer on the stack, so both the reads (rows of the lower tile)
/// and the writes (rows of the upper tile) are contiguous.
pub(crate) fn mirror_lower<T: Copy + Default>(d: &mut [T], m: usize) {
    const B: usize = 16;
    let mut tile = [[T::default(); B]; B];
    for i0 in (0..m).step_by(B) {
        let bi = B.min(m - i0);
        for i in i0..i0 + bi {
            for j in i + 1..i0 + bi {
                d[i * m + j] = d[j * m + i];
            }
        }
        for j0 in (i0 + B..m).step_by(B) {
            let bj = B.min(m - j0);
            for r in 0..bj {
                let src = &d[(j0 + r) * m + i0..][..bi];
                for (c, &v) in src.iter().enumerate() {
                    tile[c][r] = v;
                }
            }
            for (c, row) in tile.iter().enumerate().take(bi) {
                d[(i0 + c) * m + j0..][..bj].copy_from_slice(&row[..bj]);
            }
        }
    }
}

/// `dst = alpha op(x) op(x)^T (+ dst)` or `dst = alpha s s (+ dst)` on every item of a stack
/// of symmetric `m x m` outputs: the lower triangle from faer, then mirrored.
pub(crate) fn symmetric<T: Elem>(
    team: &Team,
    dst: &mut [T],
    m: usize,
    k: usize,
    prod: Product<'_, T>,
    scratch: &Mutex<Vec<T>>,
) {
    let batch = prod.a_shape.batch;
    let stride = m * m;
    let item = |d: &mut [T], e: usize, team: Option<(&Team, usize)>| {
        lower_product(
            team,
            view_mut(d, m, m),
            prod.beta,
            prod.a_item(e),
            prod.b_item(e),
            prod.alpha,
        );
        mirror_lower(d, m);
    };
    // `X^T X` of a tall row-major `X` with a wide Gram side reads `X` down its columns with a
    // stride of `m` elements; when that stride is large (4 KiB at m = 1024) faer's packing runs
    // at half speed (154 vs 338 GFLOP/s at 1024 x 1024, one thread). Transposing `X` into a
    // scratch buffer (kept across calls) and forming `X' X'^T` costs one pass over `X`.
    let via_transpose = prod.ta == Transpose::Yes && m >= TRANSPOSED_GRAM_MIN;
    let item_via_transpose = |d: &mut [T], e: usize, team: Option<(&Team, usize)>| {
        let mut buf = scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buf.len() < m * k {
            buf.resize(m * k, T::ZERO);
        }
        let xt = &mut buf[..m * k];
        let n = prod.a_shape.batch_stride();
        transpose_into(&prod.a[e * n..(e + 1) * n], k, m, xt);
        let lhs = view(xt, m, k, Transpose::No);
        lower_product(
            team,
            view_mut(d, m, m),
            prod.beta,
            lhs,
            lhs.transpose(),
            prod.alpha,
        );
        mirror_lower(d, m);
    };
    // Nominal flops of the lower triangle.
    let flops = (m * m * k) as f64;
    match plan(team.threads(), batch, flops, m) {
        Plan::Serial => {
            for (e, d) in dst.chunks_exact_mut(stride.max(1)).enumerate().take(batch) {
                if via_transpose {
                    item_via_transpose(d, e, None);
                } else {
                    item(d, e, None);
                }
            }
        }
        Plan::OverStack(parts) => {
            let mut runs = split_items(dst, stride, batch, parts);
            team.for_each_part(&mut runs[..parts], &|run| {
                if let Some((first, data)) = run.take() {
                    for (i, d) in data.chunks_exact_mut(stride).enumerate() {
                        item(d, first + i, None);
                    }
                }
            });
        }
        Plan::InsideItems(parts) => {
            for (e, d) in dst.chunks_exact_mut(stride).enumerate() {
                if via_transpose {
                    item_via_transpose(d, e, Some((team, parts)));
                } else {
                    item(d, e, Some((team, parts)));
                }
            }
        }
    }
}

/// Gram sides from which a tall `X^T X` goes through a transposed copy of `X` (see
/// [`symmetric`]); below it the strided reads stay in cache and cost nothing.
pub(crate) const TRANSPOSED_GRAM_MIN: usize = 768;

/// Writes the transpose of the row-major `rows x cols` matrix `src` into `dst` (`cols x rows`),
/// in 16 x 16 tiles through a stack buffer so reads and writes are both contiguous.
pub(crate) fn transpose_into<T: Copy + Default>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    const B: usize = 16;
    let mut tile = [[T::default(); B]; B];
    for r0 in (0..rows).step_by(B) {
        let br = B.min(rows - r0);
        for c0 in (0..cols).step_by(B) {
            let bc = B.min(cols - c0);
            for r in 0..br {
                for (c, &v) in src[(r0 + r) * cols + c0..][..bc].iter().enumerate() {
                    tile[c][r] = v;
                }
            }
            for (c, row) in tile.iter().enumerate().take(bc) {
                dst[(c0 + c) * rows + r0..][..br].copy_from_slice(&row[..br]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_range_in_order() {
        for n in [0, 1, 5, 64, 65] {
            for parts in 1..6 {
                let mut next = 0;
                for p in 0..parts {
                    let (s, e) = part_range(n, parts, p);
                    assert_eq!(s, next);
                    assert!(e - s <= n / parts + 1);
                    next = e;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn transpose_into_transposes() {
        for (rows, cols) in [(1, 1), (1, 40), (40, 1), (17, 33), (32, 16)] {
            let src: Vec<usize> = (0..rows * cols).collect();
            let mut dst = vec![0; rows * cols];
            transpose_into(&src, rows, cols, &mut dst);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(dst[j * rows + i], src[i * cols + j]);
                }
            }
        }
    }

    #[test]
    fn mirror_copies_lower_to_upper() {
        for m in [1, 2, 31, 33, 70] {
            let mut d: Vec<f64> = (0..m * m).map(|i| i as f64).collect();
            mirror_lower(&mut d, m);
            for i in 0..m {
                for j in 0..m {
                    let (lo_i, lo_j) = if j > i { (j, i) } else { (i, j) };
                    assert_eq!(d[i * m + j], (lo_i * m + lo_j) as f64);
                }
            }
        }
    }
}
