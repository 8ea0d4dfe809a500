//! Column blocks, the token-rows/heads layouts, RoPE and the causal softmax on the host.

use muon_core::{check_shape, Error, HostMatrix, Real, Result, Shape, Transpose};
use rayon::prelude::*;

use super::{
    dims, f, floored, lane_max, lane_sum, same, t, vectorized, CpuReal, HostBackend, Structure, MIN_ROWS,
};
use crate::ops::AttentionOps;

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

/// `(B, T, H)` of a heads stack `[B*H, T, D]` against a token matrix `[B*T, S]`.
fn head_dims<T: CpuReal>(
    what: &str,
    heads: &HostMatrix<T>,
    tokens: &HostMatrix<T>,
) -> Result<(usize, usize, usize)> {
    let hs = heads.shape();
    let (n, _) = dims(tokens, what)?;
    if hs.cols == 0 {
        return Err(Error::EmptyMatrix { what: what.into() });
    }
    let seq = hs.rows;
    if seq == 0 || !n.is_multiple_of(seq) {
        return Err(Error::Backend(format!(
            "{what}: heads {hs} do not tile {n} token rows"
        )));
    }
    let b = n / seq;
    if b == 0 || hs.batch == 0 || !hs.batch.is_multiple_of(b) {
        return Err(Error::Backend(format!(
            "{what}: heads {hs} do not tile {b} sequences"
        )));
    }
    Ok((b, seq, hs.batch / b))
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

    fn split_heads(
        &self,
        dst: &mut Self::Matrix,
        dst_col: usize,
        src: &Self::Matrix,
        src_col: usize,
        head_stride: usize,
        width: usize,
    ) -> Result<()> {
        let (_, seq, h) = head_dims("split_heads", dst, src)?;
        let dd = dst.shape().cols;
        let s_cols = src.shape().cols;
        check_columns("split_heads dst", dst_col, width, dd)?;
        let last_head = (h - 1).saturating_mul(head_stride).saturating_add(src_col);
        check_columns("split_heads src (last head)", last_head, width, s_cols)?;
        let s = src.as_slice();
        dst.as_mut_slice()
            .par_chunks_mut(seq * dd)
            .enumerate()
            .for_each(|(bh, m)| {
                let (b, hh) = (bh / h, bh % h);
                let c0 = hh * head_stride + src_col;
                vectorized(
                    #[inline(always)]
                    || {
                        for (ti, row) in m.chunks_exact_mut(dd).enumerate() {
                            let sr = &s[(b * seq + ti) * s_cols..][c0..c0 + width];
                            row[dst_col..dst_col + width].copy_from_slice(sr);
                        }
                    },
                )
            });
        Ok(())
    }

    fn merge_heads(
        &self,
        dst: &mut Self::Matrix,
        dst_col: usize,
        head_stride: usize,
        src: &Self::Matrix,
        src_col: usize,
        width: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (_, seq, h) = head_dims("merge_heads", src, dst)?;
        let ds = src.shape().cols;
        let d_cols = dst.shape().cols;
        check_columns("merge_heads src", src_col, width, ds)?;
        let last_head = (h - 1).saturating_mul(head_stride).saturating_add(dst_col);
        check_columns("merge_heads dst (last head)", last_head, width, d_cols)?;
        let s = src.as_slice();
        let blocks = if head_stride == 0 { 1 } else { h };
        dst.as_mut_slice()
            .par_chunks_mut(d_cols)
            .with_min_len(MIN_ROWS)
            .enumerate()
            .for_each(|(n, row)| {
                let (b, ti) = (n / seq, n % seq);
                vectorized(
                    #[inline(always)]
                    || {
                        // Overwriting: the first head that lands on a block is stored, not added
                        // to a zero (one pass over the row instead of two).
                        for hh in 0..h {
                            let c0 = hh * head_stride + dst_col;
                            let sr = &s[((b * h + hh) * seq + ti) * ds..][src_col..src_col + width];
                            let d = &mut row[c0..c0 + width];
                            if accumulate || hh >= blocks {
                                d.iter_mut().zip(sr).for_each(|(d, &v)| *d += v);
                            } else {
                                d.copy_from_slice(sr);
                            }
                        }
                    },
                )
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

    fn rope(&self, x: &mut Self::Matrix, col: usize, table: &Self::Matrix, inverse: bool) -> Result<()> {
        let xs = x.shape();
        let (tr, d) = dims(table, "rope table")?;
        if xs.rows > tr || col.checked_add(d).is_none_or(|end| end > xs.cols) {
            return Err(Error::Backend(format!(
                "rope: x {xs}, table {tr}x{d}, col {col}: needs a table row per position and \
                 the rotated columns inside x"
            )));
        }
        let half = d / 2;
        let tab = table.as_slice();
        let (seq, cols) = (xs.rows, xs.cols);
        let sign = if inverse { -1.0 } else { 1.0 };
        x.as_mut_slice()
            .par_chunks_mut(cols)
            .with_min_len(MIN_ROWS)
            .enumerate()
            .for_each(|(r, row)| {
                let pos = r % seq;
                let (cos, sin) = tab[pos * d..(pos + 1) * d].split_at(half);
                let v = &mut row[col..col + d];
                for i in 0..half {
                    let (a, b) = (f(v[i]), f(v[half + i]));
                    let (c, s) = (f(cos[i]), sign * f(sin[i]));
                    v[i] = t(a * c - b * s);
                    v[half + i] = t(a * s + b * c);
                }
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
        out: &mut Self::Matrix,
        q: &Self::Matrix,
        k: &Self::Matrix,
        v: &Self::Matrix,
        scale: Self::Elem,
    ) -> Result<()> {
        let h = HeadShapes::of("attention_core_forward", q, v)?;
        h.check(
            "attention_core_forward",
            &[("k", k, h.qk), ("out", out, h.dv)],
            probs,
        )?;
        let (seq, qk, dv) = (h.seq, h.qk, h.dv);
        let one = Self::Elem::ONE;
        // One task per head: its scores (T x T) stay in cache from the first product through
        // the softmax to the second, instead of three passes over the whole stack.
        probs
            .as_mut_slice()
            .par_chunks_mut(seq * seq)
            .zip(out.as_mut_slice().par_chunks_mut(seq * dv))
            .zip(q.as_slice().par_chunks(seq * qk))
            .zip(k.as_slice().par_chunks(seq * qk))
            .zip(v.as_slice().par_chunks(seq * dv))
            .for_each(|((((p, o), q), k), v)| {
                let stored = |x, cols, op| (x, seq, cols, op);
                let (no, yes) = (Transpose::No, Transpose::Yes);
                // S = scale Q K^T, P = causal_softmax(S) in place, O = P V. The softmax reads S
                // on and below the diagonal only, and P is zero above it: a backend may skip
                // both triangles (the bf16 kernels skip whole tiles and pairs of `k`).
                let (q, k, v) = (stored(q, qk, no), stored(k, qk, yes), stored(v, dv, no));
                self.product_on_thread(p, seq, seq, q, k, scale, false, Structure::LowerC);
                vectorized(
                    #[inline(always)]
                    || {
                        for (i, row) in p.chunks_exact_mut(seq).enumerate() {
                            softmax_row(row, i);
                        }
                    },
                );
                let p = stored(&*p, seq, no);
                self.product_on_thread(o, seq, dv, p, v, one, false, Structure::LowerA);
            });
        Ok(())
    }

    fn attention_core_backward(
        &self,
        dq: &mut Self::Matrix,
        dk: &mut Self::Matrix,
        dv: &mut Self::Matrix,
        dprobs: &mut Self::Matrix,
        d_out: &Self::Matrix,
        probs: &Self::Matrix,
        q: &Self::Matrix,
        k: &Self::Matrix,
        v: &Self::Matrix,
        scale: Self::Elem,
    ) -> Result<()> {
        let h = HeadShapes::of("attention_core_backward", q, v)?;
        let w = "attention_core_backward";
        h.check(w, &[("k", k, h.qk), ("dq", dq, h.qk), ("dk", dk, h.qk)], probs)?;
        h.check(w, &[("dv", dv, h.dv), ("d_out", d_out, h.dv)], dprobs)?;
        let (seq, qk, dvw) = (h.seq, h.qk, h.dv);
        let one = Self::Elem::ONE;
        dprobs
            .as_mut_slice()
            .par_chunks_mut(seq * seq)
            .zip(dq.as_mut_slice().par_chunks_mut(seq * qk))
            .zip(dk.as_mut_slice().par_chunks_mut(seq * qk))
            .zip(dv.as_mut_slice().par_chunks_mut(seq * dvw))
            .zip(d_out.as_slice().par_chunks(seq * dvw))
            .zip(probs.as_slice().par_chunks(seq * seq))
            .zip(q.as_slice().par_chunks(seq * qk))
            .zip(k.as_slice().par_chunks(seq * qk))
            .zip(v.as_slice().par_chunks(seq * dvw))
            .for_each(|((((((((ds, dq), dk), dv), d_o), p), q), k), v)| {
                let stored = |x, cols, op| (x, seq, cols, op);
                let (no, yes) = (Transpose::No, Transpose::Yes);
                // O = P V: dV = P^T dO, dP = dO V^T. P (so dS) is lower triangular and the
                // softmax's backward reads dP on and below the diagonal only: P^T and dS^T are
                // upper triangular.
                let (p_t, d_o, v_t) = (stored(p, seq, yes), stored(d_o, dvw, no), stored(v, dvw, yes));
                self.product_on_thread(dv, seq, dvw, p_t, d_o, one, false, Structure::UpperA);
                self.product_on_thread(ds, seq, seq, d_o, v_t, one, false, Structure::LowerC);
                vectorized(
                    #[inline(always)]
                    || {
                        for (i, (g, pr)) in ds.chunks_exact_mut(seq).zip(p.chunks_exact(seq)).enumerate() {
                            softmax_backward_row(g, pr, i);
                        }
                    },
                );
                // S = scale Q K^T: dQ = scale dS K, dK = scale dS^T Q.
                let (ds, ds_t) = (stored(&*ds, seq, no), stored(&*ds, seq, yes));
                let (k, q) = (stored(k, qk, no), stored(q, qk, no));
                self.product_on_thread(dq, seq, qk, ds, k, scale, false, Structure::LowerA);
                self.product_on_thread(dk, seq, qk, ds_t, q, scale, false, Structure::UpperA);
            });
        Ok(())
    }
}

/// The sizes of attention's head stacks: `M` heads of `T` positions, `Dqk` query/key and `Dv`
/// value columns.
struct HeadShapes {
    heads: usize,
    seq: usize,
    qk: usize,
    dv: usize,
}

impl HeadShapes {
    /// Read off the queries `[M, T, Dqk]` and the values `[M, T, Dv]`.
    fn of<T: CpuReal>(what: &str, q: &HostMatrix<T>, v: &HostMatrix<T>) -> Result<Self> {
        let (qs, vs) = (q.shape(), v.shape());
        if qs.rows == 0 || qs.cols == 0 || vs.cols == 0 {
            return Err(Error::EmptyMatrix {
                what: format!("{what} q {qs} or v {vs}"),
            });
        }
        expect_shape(what, "v", Shape::batched(qs.batch, qs.rows, vs.cols), vs)?;
        Ok(HeadShapes {
            heads: qs.batch,
            seq: qs.rows,
            qk: qs.cols,
            dv: vs.cols,
        })
    }

    /// Checks that each named stack is `[M, T, cols]` and `square` is `[M, T, T]`.
    fn check<T: CpuReal>(
        &self,
        what: &str,
        stacks: &[(&str, &HostMatrix<T>, usize)],
        square: &HostMatrix<T>,
    ) -> Result<()> {
        for &(name, m, cols) in stacks {
            expect_shape(what, name, Shape::batched(self.heads, self.seq, cols), m.shape())?;
        }
        let want = Shape::batched(self.heads, self.seq, self.seq);
        expect_shape(what, "scores", want, square.shape())
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

/// Row `i` of a causal score matrix, in place: `softmax(s[0..=i])`, zeros after `i`.
#[inline(always)]
fn softmax_row<T: CpuReal>(row: &mut [T], i: usize) {
    let (live, masked) = row.split_at_mut(i + 1);
    // Three passes the compiler vectorizes (max, exp, sum over lanes) instead of one whose
    // running f64 sum serializes the exponentials.
    let max = lane_max(live);
    live.iter_mut().for_each(|v| *v = (*v - max).exp());
    let inv: T = t(1.0 / lane_sum([&*live]));
    live.iter_mut().for_each(|v| *v = floored(*v * inv));
    masked.fill(T::ZERO);
}

/// Row `i` of the softmax's backward, in place: `g` holds dL/dP on entry and dL/dS on exit.
#[inline(always)]
fn softmax_backward_row<T: CpuReal>(g: &mut [T], p: &[T], i: usize) {
    // Row i has probabilities only up to i; past it P = 0 and so is dS.
    let (live, masked) = g.split_at_mut(i + 1);
    let dot: T = t(lane_sum([&*live, &p[..i + 1]]));
    live.iter_mut().zip(p).for_each(|(g, &p)| *g = p * (*g - dot));
    masked.fill(T::ZERO);
}
