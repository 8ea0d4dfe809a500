//! Column blocks, RoPE, the causal softmax and the attention core on the host, on heads that
//! stay in their token rows: a head is read and written in place as a block of columns with
//! the row stride of its matrix.

use muon_core::{check_shape, Error, HostMatrix, Real, Result, Shape, Transpose};
use rayon::iter::Either;
use rayon::prelude::*;

use super::{
    dims, floored, lane_max, lane_sum, same, t, vectorized, CpuReal, HostBackend, Stored, StoredMut,
    Structure, MIN_ROWS,
};
use crate::ops::{AttentionOps, HeadCols, HeadLayout, Qkv, QkvGrads};

/// Checks that the column block `col..col + width` lies inside `cols` columns.
fn check_columns(what: &str, col: usize, width: usize, cols: usize) -> Result<()> {
    if col.checked_add(width).is_some_and(|end| end <= cols) {
        Ok(())
    } else {
        Err(Error::Backend(format!(
            "{what}: columns {col}..{col}+{width} do not fit in {cols}"
        )))
    }
}

/// The side `T` of a stack of square `[M, T, T]` score matrices.
fn square_side(what: &str, s: Shape) -> Result<usize> {
    check_shape(what, Shape::batched(s.batch, s.rows, s.rows), s)?;
    if s.rows == 0 {
        return Err(Error::EmptyMatrix { what: what.into() });
    }
    Ok(s.rows)
}

impl<B: HostBackend> AttentionOps for B {
    fn copy_columns(
        &self,
        dst: &mut Self::Matrix,
        dst_col: usize,
        src: &Self::Matrix,
        src_col: usize,
        width: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (n, wd) = dims(dst, "copy_columns dst")?;
        let (_, ws) = dims(src, "copy_columns src")?;
        check_shape("copy_columns src", Shape::matrix(n, ws), src.shape())?;
        check_columns("copy_columns dst", dst_col, width, wd)?;
        check_columns("copy_columns src", src_col, width, ws)?;
        dst.as_mut_slice()
            .par_chunks_mut(wd)
            .with_min_len(MIN_ROWS)
            .zip(src.as_slice().par_chunks(ws))
            .for_each(|(d, s)| {
                let (d, s) = (&mut d[dst_col..dst_col + width], &s[src_col..src_col + width]);
                if accumulate {
                    d.iter_mut().zip(s).for_each(|(d, &s)| *d += s);
                } else {
                    d.copy_from_slice(s);
                }
            });
        Ok(())
    }

    fn rope_table(&self, table: &mut Self::Matrix, theta: f64) -> Result<()> {
        let (_, d) = dims(table, "rope_table table")?;
        if d % 2 != 0 {
            return Err(Error::Backend(format!("rope_table: width {d} must be even")));
        }
        let half = d / 2;
        for (pos, row) in table.as_mut_slice().chunks_exact_mut(d).enumerate() {
            for i in 0..half {
                let freq = theta.powf(-2.0 * i as f64 / d as f64);
                let angle = pos as f64 * freq;
                row[i] = t(angle.cos());
                row[half + i] = t(angle.sin());
            }
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Self::Matrix,
        seq: usize,
        heads: usize,
        cols: HeadCols,
        table: &Self::Matrix,
        inverse: bool,
    ) -> Result<()> {
        let (n, width) = dims(x, "rope x")?;
        let (tr, d) = dims(table, "rope table")?;
        let fits = heads > 0 && (cols.stride > 0 || heads == 1) && cols.width == d && d % 2 == 0;
        if !fits || seq == 0 || seq > tr || !n.is_multiple_of(seq) {
            return Err(Error::Backend(format!(
                "rope: {heads} heads at {cols:?} of x {n}x{width} in sequences of {seq}, table \
                 {tr}x{d}: needs a table row per position, blocks of the table's (even) width, \
                 and a stride when several heads"
            )));
        }
        check_columns("rope x (last head)", cols.start(heads - 1), d, width)?;
        let half = d / 2;
        let tab = table.as_slice();
        let sign: B::Elem = t(if inverse { -1.0 } else { 1.0 });
        x.as_mut_slice()
            .par_chunks_mut(width)
            .with_min_len(MIN_ROWS)
            .enumerate()
            .for_each(|(r, row)| {
                let pos = r % seq;
                let (cos, sin) = tab[pos * d..(pos + 1) * d].split_at(half);
                vectorized(
                    #[inline(always)]
                    || {
                        for h in 0..heads {
                            let (lo, hi) = row[cols.start(h)..][..d].split_at_mut(half);
                            // In the element type, as the reference implementation rotates.
                            for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
                                let (x, y, s) = (*a, *b, sign * s);
                                *a = x * c - y * s;
                                *b = x * s + y * c;
                            }
                        }
                    },
                )
            });
        Ok(())
    }

    fn causal_softmax_forward(&self, scores: &mut Self::Matrix) -> Result<()> {
        let seq = square_side("causal_softmax_forward scores", scores.shape())?;
        scores
            .as_mut_slice()
            .par_chunks_mut(seq)
            .with_min_len(MIN_ROWS)
            .enumerate()
            .for_each(|(r, row)| {
                vectorized(
                    #[inline(always)]
                    || softmax_row(row, r % seq),
                )
            });
        Ok(())
    }

    fn causal_softmax_backward(&self, grad: &mut Self::Matrix, probs: &Self::Matrix) -> Result<()> {
        same("causal_softmax_backward grad", probs, grad)?;
        let seq = square_side("causal_softmax_backward probs", probs.shape())?;
        grad.as_mut_slice()
            .par_chunks_mut(seq)
            .with_min_len(MIN_ROWS)
            .zip(probs.as_slice().par_chunks(seq))
            .enumerate()
            .for_each(|(r, (g, p))| {
                vectorized(
                    #[inline(always)]
                    || softmax_backward_row(g, p, r % seq),
                )
            });
        Ok(())
    }

    fn attention_core_forward(
        &self,
        probs: &mut Self::Matrix,
        keys: &mut Self::Matrix,
        out: &mut Self::Matrix,
        x: Qkv<'_, Self::Matrix>,
        layout: &HeadLayout,
        scale: Self::Elem,
    ) -> Result<()> {
        let what = "attention_core_forward";
        let g = Geometry::of(what, layout, probs, keys, &x)?;
        g.tokens(what, "out", out, layout.out)?;
        let (seq, one, out_ld) = (g.seq, Self::Elem::ONE, out.shape().cols);
        // One task per sequence, which owns that sequence's rows of every matrix; each head's
        // scores stay in cache from the first product through the softmax to the second.
        probs
            .as_mut_slice()
            .par_chunks_mut(g.heads * seq * seq)
            .zip(keys.as_mut_slice().par_chunks_mut(seq * 2 * g.qk))
            .zip(out.as_mut_slice().par_chunks_mut(seq * out_ld))
            .zip(g.sequences(&x))
            .for_each(|(((p, scratch), o), x)| {
                let k_scratch = &mut scratch[..seq * g.qk];
                for (h, p) in p.chunks_exact_mut(seq * seq).enumerate() {
                    // S = scale Q K^T, P = causal_softmax(S) in place, O = P V. The softmax
                    // reads S on and below the diagonal only, and P is zero above it: a backend
                    // may skip both triangles (the bf16 kernels skip whole tiles and pairs of `k`).
                    let s = StoredMut::new(&mut *p, seq, seq);
                    let (q, k) = (g.q(&x, h, Transpose::No), g.keys(&x, h, &mut *k_scratch));
                    self.product_on_thread(s, q, k.transposed(), scale, false, Structure::LowerC);
                    vectorized(
                        #[inline(always)]
                        || {
                            for (i, row) in p.chunks_exact_mut(seq).enumerate() {
                                softmax_row(row, i);
                            }
                        },
                    );
                    let o = g.head_mut(o, out_ld, layout.out, h);
                    let (p, v) = (
                        Stored::new(&*p, seq, seq, Transpose::No),
                        g.v(&x, h, Transpose::No),
                    );
                    self.product_on_thread(o, p, v, one, false, Structure::LowerA);
                }
            });
        Ok(())
    }

    fn attention_core_backward(
        &self,
        grads: QkvGrads<'_, Self::Matrix>,
        dprobs: &mut Self::Matrix,
        keys: &mut Self::Matrix,
        d_out: &Self::Matrix,
        probs: &Self::Matrix,
        x: Qkv<'_, Self::Matrix>,
        layout: &HeadLayout,
        scale: Self::Elem,
    ) -> Result<()> {
        let what = "attention_core_backward";
        let g = Geometry::of(what, layout, probs, keys, &x)?;
        same("attention_core_backward dprobs", probs, dprobs)?;
        g.tokens(what, "d_out", d_out, layout.out)?;
        let QkvGrads {
            dq,
            dk,
            dk_shared,
            dv,
        } = grads;
        g.tokens(what, "dq", dq, layout.q)?;
        g.tokens(what, "dk", dk, layout.k)?;
        if let Some(dv) = &dv {
            g.tokens(what, "dv", dv, layout.v)?;
        } else {
            g.tokens(what, "dk (holding dv)", dk, layout.v)?;
        }
        match (&dk_shared, layout.k_shared) {
            (Some(m), Some(cols)) => g.tokens(what, "dk_shared", m, cols)?,
            (None, None) => {}
            (given, shared) => {
                return Err(Error::Backend(format!(
                    "{what}: dk_shared is {} but the layout {} shared keys",
                    if given.is_some() { "given" } else { "missing" },
                    if shared.is_some() { "has" } else { "has no" },
                )))
            }
        }
        let (seq, one) = (g.seq, Self::Elem::ONE);
        let (ld_dq, ld_dk, ld_out) = (dq.shape().cols, dk.shape().cols, d_out.shape().cols);
        let ld_dv = dv.as_ref().map_or(ld_dk, |m| m.shape().cols);
        let ld_shared = dk_shared.as_ref().map_or(0, |m| m.shape().cols);
        dprobs
            .as_mut_slice()
            .par_chunks_mut(g.heads * seq * seq)
            .zip(keys.as_mut_slice().par_chunks_mut(seq * 2 * g.qk))
            .zip(sequences_mut(dq, seq))
            .zip(sequences_mut(dk, seq))
            .zip(optional_sequences_mut(dk_shared, seq, g.batch))
            .zip(optional_sequences_mut(dv, seq, g.batch))
            .zip(d_out.as_slice().par_chunks(seq * ld_out))
            .zip(probs.as_slice().par_chunks(g.heads * seq * seq))
            .zip(g.sequences(&x))
            .for_each(
                |((((((((ds, scratch), dq), dk), mut dks), mut dv), d_o), p), x)| {
                    let (k_scratch, dk_scratch) = scratch.split_at_mut(seq * g.qk);
                    for (h, (ds, p)) in ds
                        .chunks_exact_mut(seq * seq)
                        .zip(p.chunks_exact(seq * seq))
                        .enumerate()
                    {
                        let k = g.keys(&x, h, &mut *k_scratch);
                        let (no, yes) = (Transpose::No, Transpose::Yes);
                        let dout = g.block(d_o, ld_out, layout.out, h, no);
                        // O = P V: dV = P^T dO, dP = dO V^T. P (so dS) is lower triangular and the
                        // softmax's backward reads dP on and below the diagonal only: P^T and dS^T
                        // are upper triangular.
                        let dvh = match dv.as_deref_mut() {
                            Some(dv) => g.head_mut(dv, ld_dv, layout.v, h),
                            None => g.head_mut(dk, ld_dv, layout.v, h),
                        };
                        let p_t = Stored::new(p, seq, seq, yes);
                        self.product_on_thread(dvh, p_t, dout, one, false, Structure::UpperA);
                        let v_t = g.v(&x, h, yes);
                        self.product_on_thread(
                            StoredMut::new(&mut *ds, seq, seq),
                            dout,
                            v_t,
                            one,
                            false,
                            Structure::LowerC,
                        );
                        vectorized(
                            #[inline(always)]
                            || {
                                for (i, (g, pr)) in
                                    ds.chunks_exact_mut(seq).zip(p.chunks_exact(seq)).enumerate()
                                {
                                    softmax_backward_row(g, pr, i);
                                }
                            },
                        );
                        // S = scale Q K^T: dQ = scale dS K, dK = scale dS^T Q.
                        let (ds, ds_t) = (Stored::new(&*ds, seq, seq, no), Stored::new(&*ds, seq, seq, yes));
                        let dqh = g.head_mut(dq, ld_dq, layout.q, h);
                        self.product_on_thread(dqh, ds, k, scale, false, Structure::LowerA);
                        let q = g.q(&x, h, no);
                        match (dks.as_deref_mut(), layout.k_shared) {
                            (Some(dks), Some(shared)) => {
                                // Both blocks at once into the scratch, then each to its place: the
                                // own block stored, the shared one summed over the heads in order.
                                let dkh = StoredMut::new(&mut *dk_scratch, seq, g.qk);
                                self.product_on_thread(dkh, ds_t, q, scale, false, Structure::UpperA);
                                let own = layout.k.width;
                                vectorized(
                                    #[inline(always)]
                                    || {
                                        for (t, src) in dk_scratch.chunks_exact(g.qk).enumerate() {
                                            let (src_own, src_shared) = src.split_at(own);
                                            copy(&mut dk[t * ld_dk + layout.k.start(h)..][..own], src_own);
                                            let sum = &mut dks[t * ld_shared + shared.col..][..shared.width];
                                            if h == 0 {
                                                copy(sum, src_shared);
                                            } else {
                                                sum.iter_mut().zip(src_shared).for_each(|(s, &v)| *s += v);
                                            }
                                        }
                                    },
                                );
                            }
                            _ => {
                                let dkh = g.head_mut(dk, ld_dk, layout.k, h);
                                self.product_on_thread(dkh, ds_t, q, scale, false, Structure::UpperA);
                            }
                        }
                    }
                },
            );
        Ok(())
    }
}

/// One sequence's rows of each input of the core.
struct QkvRows<'a, T> {
    q: &'a [T],
    k: &'a [T],
    k_shared: Option<&'a [T]>,
    v: &'a [T],
}

/// The sizes of attention's core, read off its operands and checked against all of them:
/// `batch` sequences of `seq` positions, `heads` heads with queries and keys `qk` wide.
struct Geometry<'l> {
    layout: &'l HeadLayout,
    batch: usize,
    seq: usize,
    heads: usize,
    qk: usize,
    /// Row strides (the matrices' widths) of q, k, the shared keys and v.
    ld_q: usize,
    ld_k: usize,
    ld_shared: usize,
    ld_v: usize,
}

impl<'l> Geometry<'l> {
    fn of<T: CpuReal>(
        what: &str,
        layout: &'l HeadLayout,
        probs: &HostMatrix<T>,
        keys: &HostMatrix<T>,
        x: &Qkv<'_, HostMatrix<T>>,
    ) -> Result<Self> {
        let heads = layout.heads;
        let ps = probs.shape();
        expect_shape(what, "probs", Shape::batched(ps.batch, ps.rows, ps.rows), ps)?;
        let seq = ps.rows;
        if seq == 0 || heads == 0 || !ps.batch.is_multiple_of(heads) {
            return Err(Error::Backend(format!(
                "{what}: probs {ps} do not hold whole sequences of {heads} heads of one or more positions"
            )));
        }
        let own = layout.k.width;
        let qk = layout.q.width;
        let shared = layout.k_shared.map_or(0, |c| c.width);
        let shared_ok = layout.k_shared.is_none_or(|c| c.stride == 0)
            && layout.k_shared.is_some() == x.k_shared.is_some();
        if qk == 0
            || own + shared != qk
            || layout.v.width == 0
            || layout.v.width != layout.out.width
            || !shared_ok
        {
            return Err(Error::Backend(format!(
                "{what}: layout {layout:?} with{} shared keys: the keys' blocks must add up to \
                 the queries' width, a shared block have stride 0 and a matrix, and the values be \
                 as wide as the output",
                if x.k_shared.is_some() { "" } else { "out" }
            )));
        }
        let g = Geometry {
            layout,
            batch: ps.batch / heads,
            seq,
            heads,
            qk,
            ld_q: x.q.shape().cols,
            ld_k: x.k.shape().cols,
            ld_shared: x.k_shared.map_or(0, |m| m.shape().cols),
            ld_v: x.v.shape().cols,
        };
        expect_shape(what, "keys", Shape::batched(g.batch, seq, 2 * qk), keys.shape())?;
        g.tokens(what, "q", x.q, layout.q)?;
        g.tokens(what, "k", x.k, layout.k)?;
        if let (Some(m), Some(cols)) = (x.k_shared, layout.k_shared) {
            g.tokens(what, "k_shared", m, cols)?;
        }
        g.tokens(what, "v", x.v, layout.v)?;
        Ok(g)
    }

    /// Checks that `m` has a row per token and every head's block of `cols` inside it.
    fn tokens<T: CpuReal>(&self, what: &str, name: &str, m: &HostMatrix<T>, cols: HeadCols) -> Result<()> {
        let s = m.shape();
        expect_shape(what, name, Shape::matrix(self.batch * self.seq, s.cols), s)?;
        let last = cols
            .stride
            .checked_mul(self.heads - 1)
            .and_then(|o| o.checked_add(cols.col));
        let fits = last
            .and_then(|l| l.checked_add(cols.width))
            .is_some_and(|end| end <= s.cols);
        if fits {
            Ok(())
        } else {
            Err(Error::Backend(format!(
                "{what} {name}: {} heads at {cols:?} do not fit in {} columns",
                self.heads, s.cols
            )))
        }
    }

    /// The inputs' rows, sequence by sequence.
    fn sequences<'a, T: CpuReal>(
        &self,
        x: &Qkv<'a, HostMatrix<T>>,
    ) -> impl IndexedParallelIterator<Item = QkvRows<'a, T>> + use<'a, T> {
        let seq = self.seq;
        let rows = move |m: &'a HostMatrix<T>| m.as_slice().par_chunks(seq * m.shape().cols);
        let shared = match x.k_shared {
            Some(m) => Either::Left(rows(m).map(Some)),
            None => Either::Right(rayon::iter::repeat_n((), self.batch).map(|()| None)),
        };
        rows(x.q)
            .zip(rows(x.k))
            .zip(shared)
            .zip(rows(x.v))
            .map(|(((q, k), k_shared), v)| QkvRows { q, k, k_shared, v })
    }

    /// Head `h`'s block `cols` of one sequence's rows of a matrix `ld` wide.
    fn block<'a, T>(
        &self,
        rows: &'a [T],
        ld: usize,
        cols: HeadCols,
        h: usize,
        op: Transpose,
    ) -> Stored<'a, T> {
        Stored::new(&rows[cols.start(h)..], self.seq, cols.width, op).with_ld(ld)
    }

    /// Head `h`'s queries.
    fn q<'a, T>(&self, x: &QkvRows<'a, T>, h: usize, op: Transpose) -> Stored<'a, T> {
        self.block(x.q, self.ld_q, self.layout.q, h, op)
    }

    /// Head `h`'s values.
    fn v<'a, T>(&self, x: &QkvRows<'a, T>, h: usize, op: Transpose) -> Stored<'a, T> {
        self.block(x.v, self.ld_v, self.layout.v, h, op)
    }

    /// Head `h`'s block `cols` of one sequence's rows of an output `ld` wide.
    fn head_mut<'a, T>(&self, rows: &'a mut [T], ld: usize, cols: HeadCols, h: usize) -> StoredMut<'a, T> {
        StoredMut::new(&mut rows[cols.start(h)..], self.seq, cols.width).with_ld(ld)
    }

    /// Head `h`'s keys `[T, Dqk]`: its own block in place, or, with a shared block, both
    /// gathered into `scratch`. The shared columns are the same for every head: they are
    /// copied with head 0 and left in place for the sequence's other heads.
    fn keys<'a, T: CpuReal>(&self, x: &QkvRows<'a, T>, h: usize, scratch: &'a mut [T]) -> Stored<'a, T> {
        let (own, ld_own, ld_shared) = (self.layout.k, self.ld_k, self.ld_shared);
        match (x.k_shared, self.layout.k_shared) {
            (Some(shared_rows), Some(shared)) => {
                vectorized(
                    #[inline(always)]
                    || {
                        for (t, dst) in scratch.chunks_exact_mut(self.qk).take(self.seq).enumerate() {
                            let (d_own, d_shared) = dst.split_at_mut(own.width);
                            if let Some(ahead) = x.k.get((t + PREFETCH_ROWS) * ld_own + own.start(h)..) {
                                muon_faer::prefetch(&ahead[..own.width.min(ahead.len())]);
                            }
                            copy(d_own, &x.k[t * ld_own + own.start(h)..][..own.width]);
                            if h == 0 {
                                copy(
                                    d_shared,
                                    &shared_rows[t * ld_shared + shared.col..][..shared.width],
                                );
                            }
                        }
                    },
                );
                Stored::new(&*scratch, self.seq, self.qk, Transpose::No)
            }
            _ => self.block(x.k, ld_own, own, h, Transpose::No),
        }
    }
}

/// How many rows ahead the gathering of a head's keys asks for the rows it will read: its
/// block is a few cache lines of each row, a stride apart, which the hardware's prefetchers
/// fetch late.
const PREFETCH_ROWS: usize = 8;

/// `dst = src` element by element: for the few dozen elements of a head's row a loop the
/// compiler unrolls beats a call to `memcpy`.
#[inline(always)]
fn copy<T: Copy>(dst: &mut [T], src: &[T]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s);
}

/// One sequence's rows of each item of a token-rows matrix, in parallel.
fn sequences_mut<T: CpuReal>(m: &mut HostMatrix<T>, seq: usize) -> rayon::slice::ChunksMut<'_, T> {
    let per = seq * m.shape().cols;
    m.as_mut_slice().par_chunks_mut(per)
}

/// [`sequences_mut`] of a matrix that may be absent: then `None` for each of the `batch`.
fn optional_sequences_mut<T: CpuReal>(
    m: Option<&mut HostMatrix<T>>,
    seq: usize,
    batch: usize,
) -> impl IndexedParallelIterator<Item = Option<&mut [T]>> {
    match m {
        Some(m) => Either::Left(sequences_mut(m, seq).map(Some)),
        None => Either::Right(rayon::iter::repeat_n((), batch).map(|()| None)),
    }
}

/// [`check_shape`] with the operand named `"{what} {name}"`, the name built only for the
/// error: a step allocates nothing.
fn expect_shape(what: &str, name: &str, want: Shape, got: Shape) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        check_shape(&format!("{what} {name}"), want, got)
    }
}

/// Elements the row-wise softmax loops round their live length up to: a whole number of
/// 512-bit vectors of f32. The loops then run no scalar tail, which for rows of a few dozen
/// elements cost as much as the vectorized part (a scalar exponential per leftover element).
const ROW_BLOCK: usize = 16;

/// Row `i` of a causal score matrix, in place: `softmax(s[0..=i])`, zeros after `i`.
#[inline(always)]
fn softmax_row<T: CpuReal>(row: &mut [T], i: usize) {
    let live = i + 1;
    let (block, rest) = row.split_at_mut(live.next_multiple_of(ROW_BLOCK).min(row.len()));
    // Three passes the compiler vectorizes (max, exp, sum over lanes) instead of one whose
    // running f64 sum serializes the exponentials. The exponential runs over the whole block,
    // past `i` too (finite scores of the product, or what the buffer held: never read), then
    // those are zeroed, so the sum and the scaling cover the block with no tail.
    let max = lane_max(&block[..live]);
    block.iter_mut().for_each(|v| *v = (*v - max).exp());
    block[live..].fill(T::ZERO);
    let inv: T = t(1.0 / lane_sum([&*block]));
    block.iter_mut().for_each(|v| *v = floored(*v * inv));
    rest.fill(T::ZERO);
}

/// Row `i` of the softmax's backward, in place: `g` holds dL/dP on entry and dL/dS on exit.
#[inline(always)]
fn softmax_backward_row<T: CpuReal>(g: &mut [T], p: &[T], i: usize) {
    // Row i has probabilities only up to i; past it P = 0 and so is dS. Over the rounded-up
    // block, P's zeros add nothing to the dot product (dP there is finite: computed, or the
    // buffer's earlier values) and the block's tail is zeroed after.
    let live = i + 1;
    let end = live.next_multiple_of(ROW_BLOCK).min(g.len());
    let (block, rest) = g.split_at_mut(end);
    let dot: T = t(lane_sum([&*block, &p[..end]]));
    block.iter_mut().zip(p).for_each(|(g, &p)| *g = p * (*g - dot));
    block[live..].fill(T::ZERO);
    rest.fill(T::ZERO);
}
