//! SwiGLU and the MoE layer (router, balance loss, dispatch, gather/scatter, combine, grouped
//! products, router-bias update) on the host.

use muon_core::{check_shape, Error, Real, Result, Shape, Transpose};
use rayon::prelude::*;

use super::{
    check_indices, check_len, dims, f, gather_rows, lane_sum, same, t, vectorized, CpuReal, HostBackend,
    Stored, StoredMut, Structure, MIN_ROWS,
};
use crate::ops::FfnOps;

/// Rows of an expert's range per product of [`FfnOps::grouped_gemm`] in f32: fixed, so the
/// results do not depend on the thread count; tall enough for faer's kernels to run at speed.
/// (In bf16, where blocks do not change the bits, one block per thread and at least this.)
const GROUPED_GEMM_ROWS: usize = 64;

#[inline(always)]
fn sigmoid<T: CpuReal>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// Applies BLAS `beta` to `d` before a product: returns whether the product must add to
/// `d` (`false`: overwrite, and `d` is never read, so NaN in it does not leak through).
fn scale_for_beta<T: CpuReal>(d: &mut [T], beta: T) -> bool {
    if beta == T::ZERO {
        false
    } else {
        if beta != T::ONE {
            d.iter_mut().for_each(|v| *v *= beta);
        }
        true
    }
}

/// Checks the expert row ranges of a grouped product: `offsets` never decreases and ends at
/// `rows` (with `exact`) or at most there.
fn check_offsets(what: &str, offsets: &[u32], rows: usize, exact: bool) -> Result<()> {
    if let Some(e) = offsets.windows(2).position(|w| w[0] > w[1]) {
        return Err(Error::Backend(format!(
            "{what}: expert {e}'s rows {}..{} run backwards",
            offsets[e],
            offsets[e + 1]
        )));
    }
    let last = offsets.last().map_or(0, |&o| o as usize);
    if last > rows || (exact && last != rows) {
        return Err(Error::Backend(format!(
            "{what}: the expert ranges cover {last} of {rows} rows"
        )));
    }
    Ok(())
}

impl<B: HostBackend> FfnOps for B {
    fn swiglu_forward(&self, out: &mut Self::Matrix, gate: &Self::Matrix, up: &Self::Matrix) -> Result<()> {
        same("swiglu_forward gate", out, gate)?;
        same("swiglu_forward up", out, up)?;
        out.as_mut_slice()
            .par_chunks_mut(1024)
            .zip(gate.as_slice().par_chunks(1024))
            .zip(up.as_slice().par_chunks(1024))
            .for_each(|((o, g), u)| {
                vectorized(
                    #[inline(always)]
                    || {
                        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                            *o = g * sigmoid(g) * u;
                        }
                    },
                )
            });
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dgate: &mut Self::Matrix,
        dup: &mut Self::Matrix,
        dout: &Self::Matrix,
        gate: &Self::Matrix,
        up: &Self::Matrix,
    ) -> Result<()> {
        same("swiglu_backward dgate", gate, dgate)?;
        same("swiglu_backward dup", gate, dup)?;
        same("swiglu_backward dout", gate, dout)?;
        same("swiglu_backward up", gate, up)?;
        let one = Self::Elem::ONE;
        dgate
            .as_mut_slice()
            .par_chunks_mut(1024)
            .zip(dup.as_mut_slice().par_chunks_mut(1024))
            .zip(dout.as_slice().par_chunks(1024))
            .zip(gate.as_slice().par_chunks(1024))
            .zip(up.as_slice().par_chunks(1024))
            .for_each(|((((dg, du), d), g), u)| {
                vectorized(
                    #[inline(always)]
                    || {
                        for ((((dg, du), &dv), &gv), &uv) in dg.iter_mut().zip(du).zip(d).zip(g).zip(u) {
                            let s = sigmoid(gv);
                            // d silu(g)/dg = s + g s (1 - s)
                            *dg = dv * uv * (s + gv * s * (one - s));
                            *du = dv * gv * s;
                        }
                    },
                )
            });
        Ok(())
    }

    fn router_forward(
        &self,
        scores: &mut Self::Matrix,
        gates: &mut Self::Matrix,
        experts: &mut Self::Indices,
        logits: &Self::Matrix,
        bias: &Self::Matrix,
        scaling: f64,
    ) -> Result<()> {
        same("router_forward scores", logits, scores)?;
        let (n, e) = dims(logits, "router_forward logits")?;
        let (_, k) = dims(gates, "router_forward gates")?;
        check_shape("router_forward gates", Shape::matrix(n, k), gates.shape())?;
        if k > e {
            return Err(Error::Backend(format!(
                "router_forward: {k} gates per token but only {e} experts"
            )));
        }
        check_len("router_forward experts", n * k, experts.len())?;
        check_shape("router_forward bias", Shape::vector(e), bias.shape())?;
        let b = bias.as_slice();
        scores
            .as_mut_slice()
            .par_chunks_mut(e)
            .with_min_len(MIN_ROWS)
            .zip(logits.as_slice().par_chunks(e))
            .zip(gates.as_mut_slice().par_chunks_mut(k))
            .zip(experts.par_chunks_mut(k))
            .for_each(|(((s, l), g), ex)| {
                for (s, &l) in s.iter_mut().zip(l) {
                    *s = sigmoid(l);
                }
                // Top-k of s + b by repeated selection (k is small), ties to the lower index.
                for slot in 0..k {
                    let mut best = usize::MAX;
                    let mut best_v = f64::NEG_INFINITY;
                    for j in 0..e {
                        if ex[..slot].contains(&(j as u32)) {
                            continue;
                        }
                        let v = f(s[j]) + f(b[j]);
                        if best == usize::MAX || v > best_v {
                            best = j;
                            best_v = v;
                        }
                    }
                    ex[slot] = best as u32;
                }
                let sum: f64 = ex.iter().map(|&j| f(s[j as usize])).sum();
                for (g, &j) in g.iter_mut().zip(ex.iter()) {
                    *g = t(scaling * f(s[j as usize]) / sum);
                }
            });
        Ok(())
    }

    fn router_backward(
        &self,
        dlogits: &mut Self::Matrix,
        dgates: &Self::Matrix,
        scores: &Self::Matrix,
        experts: &Self::Indices,
        scaling: f64,
    ) -> Result<()> {
        same("router_backward dlogits", scores, dlogits)?;
        let (n, e) = dims(scores, "router_backward scores")?;
        let (_, k) = dims(dgates, "router_backward dgates")?;
        check_shape("router_backward dgates", Shape::matrix(n, k), dgates.shape())?;
        check_len("router_backward experts", n * k, experts.len())?;
        check_indices("router_backward experts", experts, e)?;
        dlogits
            .as_mut_slice()
            .par_chunks_mut(e)
            .with_min_len(MIN_ROWS)
            .zip(dgates.as_slice().par_chunks(k))
            .zip(scores.as_slice().par_chunks(e))
            .zip(experts.par_chunks(k))
            .for_each(|(((dl, dg), s), ex)| {
                dl.fill(Self::Elem::ZERO);
                // g_i = scaling * s_i / S with S = sum of the selected s_j:
                // dL/ds_i = scaling * (dg_i - sum_j dg_j g_j / scaling) / S.
                let sum: f64 = ex.iter().map(|&j| f(s[j as usize])).sum();
                let dot: f64 = dg
                    .iter()
                    .zip(ex)
                    .map(|(&d, &j)| f(d) * f(s[j as usize]))
                    .sum::<f64>()
                    / sum;
                for (&d, &j) in dg.iter().zip(ex) {
                    let j = j as usize;
                    let sj = f(s[j]);
                    let ds = scaling * (f(d) - dot) / sum;
                    // s = sigmoid(l): ds/dl = s (1 - s)
                    dl[j] = t(ds * sj * (1.0 - sj));
                }
            });
        Ok(())
    }

    fn router_seq_aux(
        &self,
        loss: &mut Self::Matrix,
        frac: &mut Self::Matrix,
        dlogits: &mut Self::Matrix,
        scores: &Self::Matrix,
        experts: &Self::Indices,
        seq: usize,
        alpha: f64,
    ) -> Result<()> {
        same("router_seq_aux dlogits", scores, dlogits)?;
        let (n, e) = dims(scores, "router_seq_aux scores")?;
        if seq == 0 || !n.is_multiple_of(seq) {
            return Err(Error::Backend(format!(
                "router_seq_aux: {n} tokens are not sequences of {seq}"
            )));
        }
        let batch = n / seq;
        check_shape("router_seq_aux frac", Shape::matrix(batch, e), frac.shape())?;
        check_shape("router_seq_aux loss", Shape::matrix(1, 1), loss.shape())?;
        let k = experts.len() / n.max(1);
        if k == 0 || experts.len() != n * k {
            return Err(Error::Backend(format!(
                "router_seq_aux: {} expert choices are not K per token of {n}",
                experts.len()
            )));
        }
        check_indices("router_seq_aux experts", experts, e)?;
        let s = scores.as_slice();
        let mut total = 0.0;
        for ((fb, dl), (sb, ex)) in frac
            .as_mut_slice()
            .chunks_exact_mut(e)
            .zip(dlogits.as_mut_slice().chunks_exact_mut(seq * e))
            .zip(s.chunks_exact(seq * e).zip(experts.chunks_exact(seq * k)))
        {
            // f_i: the share of this sequence's selections that went to expert i, times E / K.
            fb.fill(Self::Elem::ZERO);
            for &j in ex {
                fb[j as usize] += Self::Elem::ONE;
            }
            let norm = e as f64 / (k * seq) as f64;
            fb.iter_mut().for_each(|v| *v = t(f(*v) * norm));
            // loss_b = sum_t sum_i f_i s'_ti / seq, s'_ti = s_ti / S_t; with g_i = alpha f_i /
            // (B seq), dL/ds_tj = (g_j - sum_i g_i s'_ti) / S_t, then ds/dl = s (1 - s).
            let g = alpha / (batch * seq) as f64;
            for (st, dt) in sb.chunks_exact(e).zip(dl.chunks_exact_mut(e)) {
                let sum: f64 = st.iter().map(|&v| f(v)).sum();
                let weighted: f64 = st
                    .iter()
                    .zip(fb.iter())
                    .map(|(&v, &fi)| f(fi) * f(v))
                    .sum::<f64>()
                    / sum;
                total += weighted;
                for ((d, &v), &fi) in dt.iter_mut().zip(st).zip(fb.iter()) {
                    let sv = f(v);
                    *d = t(g * (f(fi) - weighted) / sum * sv * (1.0 - sv));
                }
            }
        }
        loss.as_mut_slice()[0] = t(alpha * total / (batch * seq) as f64);
        Ok(())
    }

    fn moe_dispatch(
        &self,
        counts: &mut Self::Indices,
        offsets: &mut Self::Indices,
        slot_row: &mut Self::Indices,
        row_token: &mut Self::Indices,
        experts: &Self::Indices,
        top_k: usize,
    ) -> Result<()> {
        let e = counts.len();
        let r = experts.len();
        check_len("moe_dispatch offsets", e + 1, offsets.len())?;
        check_len("moe_dispatch slot_row", r, slot_row.len())?;
        check_len("moe_dispatch row_token", r, row_token.len())?;
        if top_k == 0 || !r.is_multiple_of(top_k) {
            return Err(Error::Backend(format!(
                "moe_dispatch: {r} slots are not a multiple of top_k {top_k}"
            )));
        }
        check_indices("moe_dispatch experts", experts, e)?;
        counts.fill(0);
        for &x in experts.iter() {
            counts[x as usize] += 1;
        }
        offsets[0] = 0;
        for i in 0..e {
            offsets[i + 1] = offsets[i] + counts[i];
        }
        // Stable counting sort: reuse `counts` as the cursor, then restore it.
        for (slot, &x) in experts.iter().enumerate() {
            let x = x as usize;
            // counts[x] slots of expert x remain: this one takes the first free row.
            let pos = offsets[x + 1] - counts[x];
            slot_row[slot] = pos;
            row_token[pos as usize] = (slot / top_k) as u32;
            counts[x] -= 1;
        }
        for i in 0..e {
            counts[i] = offsets[i + 1] - offsets[i];
        }
        Ok(())
    }

    fn gather_rows(&self, dst: &mut Self::Matrix, src: &Self::Matrix, rows: &Self::Indices) -> Result<()> {
        gather_rows(
            dst,
            src,
            rows,
            ("gather_rows dst", "gather_rows src", "gather_rows rows"),
        )
    }

    fn scatter_add_slots(
        &self,
        dsrc: &mut Self::Matrix,
        dgrouped: &Self::Matrix,
        slot_row: &Self::Indices,
    ) -> Result<()> {
        let (n, c) = dims(dsrc, "scatter_add_slots dsrc")?;
        let (r, _) = dims(dgrouped, "scatter_add_slots dgrouped")?;
        check_shape(
            "scatter_add_slots dgrouped",
            Shape::matrix(r, c),
            dgrouped.shape(),
        )?;
        check_len("scatter_add_slots slot_row", r, slot_row.len())?;
        if n == 0 || r == 0 || !r.is_multiple_of(n) {
            return Err(Error::Backend(format!(
                "scatter_add_slots: {r} grouped rows are not K per token of {n}"
            )));
        }
        check_indices("scatter_add_slots slot_row", slot_row, r)?;
        let k = r / n;
        let g = dgrouped.as_slice();
        dsrc.as_mut_slice()
            .par_chunks_mut(c)
            .with_min_len(MIN_ROWS)
            .zip(slot_row.par_chunks(k))
            .for_each(|(d, rows)| {
                for &row in rows {
                    let row = row as usize;
                    d.iter_mut()
                        .zip(&g[row * c..(row + 1) * c])
                        .for_each(|(d, &v)| *d += v);
                }
            });
        Ok(())
    }

    fn moe_combine(
        &self,
        out: &mut Self::Matrix,
        grouped: &Self::Matrix,
        gates: &Self::Matrix,
        slot_row: &Self::Indices,
    ) -> Result<()> {
        let (n, c) = dims(out, "moe_combine out")?;
        let (_, k) = dims(gates, "moe_combine gates")?;
        check_shape("moe_combine gates", Shape::matrix(n, k), gates.shape())?;
        check_shape("moe_combine grouped", Shape::matrix(n * k, c), grouped.shape())?;
        check_len("moe_combine slot_row", n * k, slot_row.len())?;
        check_indices("moe_combine slot_row", slot_row, n * k)?;
        let gr = grouped.as_slice();
        out.as_mut_slice()
            .par_chunks_mut(c)
            .with_min_len(MIN_ROWS)
            .zip(gates.as_slice().par_chunks(k))
            .zip(slot_row.par_chunks(k))
            .for_each(|((o, g), rows)| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (&gv, &row) in g.iter().zip(rows) {
                            let row = row as usize;
                            o.iter_mut()
                                .zip(&gr[row * c..(row + 1) * c])
                                .for_each(|(o, &v)| *o += gv * v);
                        }
                    },
                )
            });
        Ok(())
    }

    fn moe_combine_backward(
        &self,
        dgrouped: &mut Self::Matrix,
        dgates: &mut Self::Matrix,
        dout: &Self::Matrix,
        grouped: &Self::Matrix,
        gates: &Self::Matrix,
        slot_row: &Self::Indices,
    ) -> Result<()> {
        let (n, c) = dims(dout, "moe_combine_backward dout")?;
        let (_, k) = dims(gates, "moe_combine_backward gates")?;
        check_shape("moe_combine_backward gates", Shape::matrix(n, k), gates.shape())?;
        same("moe_combine_backward dgates", gates, dgates)?;
        check_shape(
            "moe_combine_backward grouped",
            Shape::matrix(n * k, c),
            grouped.shape(),
        )?;
        same("moe_combine_backward dgrouped", grouped, dgrouped)?;
        check_len("moe_combine_backward slot_row", n * k, slot_row.len())?;
        check_indices("moe_combine_backward slot_row", slot_row, n * k)?;
        let gr = grouped.as_slice();
        let g = gates.as_slice();
        // dgates: parallel over tokens.
        dgates
            .as_mut_slice()
            .par_chunks_mut(k)
            .with_min_len(MIN_ROWS)
            .zip(dout.as_slice().par_chunks(c))
            .zip(slot_row.par_chunks(k))
            .for_each(|((dg, d), rows)| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (dg, &row) in dg.iter_mut().zip(rows) {
                            let row = row as usize;
                            *dg = t(lane_sum([d, &gr[row * c..(row + 1) * c]]));
                        }
                    },
                )
            });
        // dgrouped: every grouped row is one slot; find it through the inverse map, serially
        // (a scatter of whole rows; N*K*C copies).
        let dgr = dgrouped.as_mut_slice();
        let d = dout.as_slice();
        vectorized(
            #[inline(always)]
            || {
                for (slot, &row) in slot_row.iter().enumerate() {
                    let (row, n_i) = (row as usize, slot / k);
                    let gv = g[slot];
                    dgr[row * c..(row + 1) * c]
                        .iter_mut()
                        .zip(&d[n_i * c..(n_i + 1) * c])
                        .for_each(|(o, &v)| *o = gv * v);
                }
            },
        );
        Ok(())
    }

    fn grouped_gemm(
        &self,
        dst: &mut Self::Matrix,
        alpha: Self::Elem,
        a: &Self::Matrix,
        w: &Self::Matrix,
        transpose_w: Transpose,
        offsets: &Self::Indices,
        beta: Self::Elem,
    ) -> Result<()> {
        let (r, n) = dims(dst, "grouped_gemm dst")?;
        let (_, k) = dims(a, "grouped_gemm a")?;
        check_shape("grouped_gemm a", Shape::matrix(r, k), a.shape())?;
        let ws = w.shape();
        let (wk, wn) = ws.op(transpose_w);
        let (want, got) = (Shape::batched(ws.batch, k, n), Shape::batched(ws.batch, wk, wn));
        check_shape("grouped_gemm w (after transpose)", want, got)?;
        check_len("grouped_gemm offsets", ws.batch + 1, offsets.len())?;
        check_offsets("grouped_gemm offsets", offsets, r, true)?;
        let (asl, wsl) = (a.as_slice(), w.as_slice());
        let d = dst.as_mut_slice();
        let (exact, threads) = (self.row_blocks_exact(), rayon::current_num_threads());
        for e in 0..ws.batch {
            let (lo, hi) = (offsets[e] as usize, offsets[e + 1] as usize);
            if lo == hi {
                continue;
            }
            let we = &wsl[e * ws.batch_stride()..(e + 1) * ws.batch_stride()];
            // Row blocks of this expert's range, one product each, across the threads. In
            // f32 the blocks are fixed, not one per thread: faer rounds a product of few rows
            // differently from a taller one, so blocks that followed the thread count would
            // make the results depend on it. Where blocks do not change the bits (bf16), one
            // block per thread: each block packs the expert's weights once (64-row blocks
            // packed them 8 times over on `small`, and ran at ~215 GFLOP/s against ~290).
            let rows = if exact {
                (hi - lo).div_ceil(threads).max(GROUPED_GEMM_ROWS)
            } else {
                GROUPED_GEMM_ROWS
            };
            d[lo * n..hi * n]
                .par_chunks_mut(rows * n)
                .zip(asl[lo * k..hi * k].par_chunks(rows * k))
                .for_each(|(dc, ac)| {
                    let rows = ac.len() / k.max(1);
                    let accumulate = scale_for_beta(dc, beta);
                    let (aop, wop) = (
                        Stored::new(ac, rows, k, Transpose::No),
                        Stored::new(we, ws.rows, ws.cols, transpose_w),
                    );
                    let dc = StoredMut::new(dc, rows, n);
                    self.product_on_thread(dc, aop, wop, alpha, accumulate, Structure::Full);
                });
        }
        Ok(())
    }

    fn grouped_gemm_weight_grad(
        &self,
        dw: &mut Self::Matrix,
        alpha: Self::Elem,
        x: &Self::Matrix,
        y: &Self::Matrix,
        offsets: &Self::Indices,
        beta: Self::Elem,
    ) -> Result<()> {
        let ws = dw.shape();
        let (r, p) = dims(x, "grouped_gemm_weight_grad x")?;
        let (_, q) = dims(y, "grouped_gemm_weight_grad y")?;
        check_shape("grouped_gemm_weight_grad y", Shape::matrix(r, q), y.shape())?;
        check_shape("grouped_gemm_weight_grad dw", Shape::batched(ws.batch, p, q), ws)?;
        check_len("grouped_gemm_weight_grad offsets", ws.batch + 1, offsets.len())?;
        check_offsets("grouped_gemm_weight_grad offsets", offsets, r, false)?;
        let (xs, ys) = (x.as_slice(), y.as_slice());
        // One faer product per expert, the experts across the threads.
        dw.as_mut_slice()
            .par_chunks_mut(p * q)
            .enumerate()
            .for_each(|(e, dwe)| {
                let (lo, hi) = (offsets[e] as usize, offsets[e + 1] as usize);
                let accumulate = scale_for_beta(dwe, beta);
                if lo == hi {
                    if !accumulate {
                        dwe.fill(Self::Elem::ZERO);
                    }
                    return;
                }
                let rows = hi - lo;
                let xe = Stored::new(&xs[lo * p..hi * p], rows, p, Transpose::Yes);
                let ye = Stored::new(&ys[lo * q..hi * q], rows, q, Transpose::No);
                let dwe = StoredMut::new(dwe, p, q);
                self.product_on_thread(dwe, xe, ye, alpha, accumulate, Structure::Full);
            });
        Ok(())
    }

    fn router_bias_update(&self, bias: &mut Self::Matrix, counts: &Self::Indices, rate: f64) -> Result<()> {
        let (_, e) = dims(bias, "router_bias_update bias")?;
        check_len("router_bias_update counts", e, counts.len())?;
        let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / e as f64;
        for (b, &c) in bias.as_mut_slice().iter_mut().zip(counts) {
            let diff = mean - c as f64;
            let sign = if diff > 0.0 {
                1.0
            } else if diff < 0.0 {
                -1.0
            } else {
                0.0
            };
            *b = t(f(*b) + rate * sign);
        }
        Ok(())
    }
}
