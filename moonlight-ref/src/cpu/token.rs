//! Embedding, RMSNorm and softmax cross-entropy on the host.

use muon_core::{check_shape, Result, Shape};
use rayon::prelude::*;

use super::{
    check_indices, check_len, dims, f, floored, gather_rows, lane_max, lane_sum, same, t, vectorized,
    CpuReal, HostBackend, MIN_ROWS,
};
use crate::ops::TokenOps;

/// Columns of RMSNorm's gain gradient per task when several threads share its backward.
const DGAIN_COLUMNS: usize = 64;

impl<B: HostBackend> TokenOps for B {
    fn embedding_forward(
        &self,
        out: &mut Self::Matrix,
        table: &Self::Matrix,
        tokens: &Self::Indices,
    ) -> Result<()> {
        // The lookup is a row gather: row `tokens[i]` of the table into row `i`.
        let names = (
            "embedding_forward out",
            "embedding_forward table",
            "embedding_forward tokens",
        );
        gather_rows(out, table, tokens, names)
    }

    fn embedding_backward(
        &self,
        dtable: &mut Self::Matrix,
        dout: &Self::Matrix,
        tokens: &Self::Indices,
    ) -> Result<()> {
        let (n, c) = dims(dout, "embedding_backward dout")?;
        let (v, _) = dims(dtable, "embedding_backward dtable")?;
        check_shape("embedding_backward dtable", Shape::matrix(v, c), dtable.shape())?;
        check_len("embedding_backward tokens", n, tokens.len())?;
        check_indices("embedding_backward tokens", tokens, v)?;
        // Serial: two tokens may share a row of the table.
        let dt = dtable.as_mut_slice();
        for (row, &tok) in dout.as_slice().chunks_exact(c).zip(tokens) {
            let tok = tok as usize;
            for (d, &g) in dt[tok * c..(tok + 1) * c].iter_mut().zip(row) {
                *d += g;
            }
        }
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        out: &mut Self::Matrix,
        rstd: &mut Self::Matrix,
        x: &Self::Matrix,
        gain: &Self::Matrix,
        eps: f64,
    ) -> Result<()> {
        same("rmsnorm_forward out", x, out)?;
        let (n, w) = dims(x, "rmsnorm_forward x")?;
        check_shape("rmsnorm_forward gain", Shape::vector(w), gain.shape())?;
        check_shape("rmsnorm_forward rstd", Shape::vector(n), rstd.shape())?;
        let g = gain.as_slice();
        out.as_mut_slice()
            .par_chunks_mut(w)
            .with_min_len(MIN_ROWS)
            .zip(x.as_slice().par_chunks(w))
            .zip(rstd.as_mut_slice().par_iter_mut())
            .for_each(|((o, xr), r)| {
                vectorized(
                    #[inline(always)]
                    || {
                        // The mean square in f64 (a sum of `w` terms), the scaling in the
                        // element type, as the reference implementation does it.
                        let ms = lane_sum([xr, xr]) / w as f64;
                        let rs: B::Elem = t(1.0 / (ms + eps).sqrt());
                        *r = rs;
                        for ((o, &xv), &gv) in o.iter_mut().zip(xr).zip(g) {
                            *o = xv * rs * gv;
                        }
                    },
                )
            });
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut Self::Matrix,
        dgain: &mut Self::Matrix,
        dout: &Self::Matrix,
        x: &Self::Matrix,
        gain: &Self::Matrix,
        rstd: &Self::Matrix,
    ) -> Result<()> {
        same("rmsnorm_backward dx", x, dx)?;
        same("rmsnorm_backward dout", x, dout)?;
        let (n, w) = dims(x, "rmsnorm_backward x")?;
        check_shape("rmsnorm_backward gain", Shape::vector(w), gain.shape())?;
        same("rmsnorm_backward dgain", gain, dgain)?;
        check_shape("rmsnorm_backward rstd", Shape::vector(n), rstd.shape())?;
        let g = gain.as_slice();
        // With xhat = x * r and dxhat = dout * g:
        // dx = r * (dxhat - xhat * mean(dxhat * xhat)), and dgain[c] += sum_n dout[n,c] xhat[n,c]
        // summed over the rows in order (each column's sum the same bits however it is split).
        #[inline(always)]
        fn dx_row<T: CpuReal>(dxr: &mut [T], dor: &[T], xr: &[T], g: &[T], r: T) {
            let mean: T = t(lane_sum([dor, g, xr]) * f(r) / dor.len() as f64);
            let rm = r * mean;
            for (((dxv, &d), &xv), &gv) in dxr.iter_mut().zip(dor).zip(xr).zip(g) {
                *dxv += r * (d * gv - xv * rm);
            }
        }
        #[inline(always)]
        fn dgain_row<T: CpuReal>(dg: &mut [T], dor: &[T], xr: &[T], r: T) {
            for ((dgv, &d), &xv) in dg.iter_mut().zip(dor).zip(xr) {
                *dgv += d * xv * r;
            }
        }
        let (dxs, dos, xs, rs) = (dx.as_mut_slice(), dout.as_slice(), x.as_slice(), rstd.as_slice());
        let dg = dgain.as_mut_slice();
        if rayon::current_num_threads() == 1 {
            // One pass: each row's terms of dgain while the row is still in cache.
            vectorized(
                #[inline(always)]
                || {
                    let rows = dxs
                        .chunks_exact_mut(w)
                        .zip(dos.chunks_exact(w))
                        .zip(xs.chunks_exact(w));
                    for (((dxr, dor), xr), &r) in rows.zip(rs) {
                        dx_row(dxr, dor, xr, g, r);
                        dgain_row(dg, dor, xr, r);
                    }
                },
            );
            return Ok(());
        }
        dxs.par_chunks_mut(w)
            .with_min_len(MIN_ROWS)
            .zip(dos.par_chunks(w))
            .zip(xs.par_chunks(w))
            .zip(rs.par_iter())
            .for_each(|(((dxr, dor), xr), &r)| {
                vectorized(
                    #[inline(always)]
                    || dx_row(dxr, dor, xr, g, r),
                )
            });
        // dgain across the threads by blocks of columns, each over every row in order.
        dg.par_chunks_mut(DGAIN_COLUMNS).enumerate().for_each(|(b, dgb)| {
            let c0 = b * DGAIN_COLUMNS;
            vectorized(
                #[inline(always)]
                || {
                    let rows = dos.chunks_exact(w).zip(xs.chunks_exact(w)).zip(rs);
                    for ((dor, xr), &r) in rows {
                        dgain_row(dgb, &dor[c0..], &xr[c0..], r);
                    }
                },
            )
        });
        Ok(())
    }

    fn cross_entropy_forward(
        &self,
        probs: &mut Self::Matrix,
        loss: &mut Self::Matrix,
        logits: &Self::Matrix,
        targets: &Self::Indices,
    ) -> Result<()> {
        same("cross_entropy_forward probs", logits, probs)?;
        let (n, v) = dims(logits, "cross_entropy_forward logits")?;
        check_shape("cross_entropy_forward loss", Shape::matrix(1, 1), loss.shape())?;
        check_len("cross_entropy_forward targets", n, targets.len())?;
        check_indices("cross_entropy_forward targets", targets, v)?;
        probs
            .as_mut_slice()
            .par_chunks_mut(v)
            .with_min_len(4)
            .zip(logits.as_slice().par_chunks(v))
            .for_each(|(p, l)| {
                vectorized(
                    #[inline(always)]
                    || {
                        let max = lane_max(l);
                        for (p, &x) in p.iter_mut().zip(l) {
                            *p = (x - max).exp();
                        }
                        let inv: Self::Elem = t(1.0 / lane_sum([&*p]));
                        p.iter_mut().for_each(|p| *p = floored(*p * inv));
                    },
                )
            });
        // -log p[target], serially in f64: a probability rounded to the element type has a
        // relative error ~eps, which the log turns into an absolute error ~eps. Where it is so
        // small that rounding loses it (p < 1e-30: f32 underflows near 1e-38), the row's
        // log-sum-exp is computed exactly from the logits instead.
        let mut total = 0.0;
        let rows = probs
            .as_slice()
            .chunks_exact(v)
            .zip(logits.as_slice().chunks_exact(v));
        for ((p, l), &tg) in rows.zip(targets) {
            let tg = tg as usize;
            let pt = f(p[tg]);
            total += if pt > 1e-30 {
                -pt.ln()
            } else {
                let max = l.iter().map(|&x| f(x)).fold(f64::NEG_INFINITY, f64::max);
                max + l.iter().map(|&x| (f(x) - max).exp()).sum::<f64>().ln() - f(l[tg])
            };
        }
        loss.as_mut_slice()[0] = t(total / n as f64);
        Ok(())
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut Self::Matrix,
        probs: &Self::Matrix,
        targets: &Self::Indices,
        scale: f64,
    ) -> Result<()> {
        same("cross_entropy_backward dlogits", probs, dlogits)?;
        let (n, v) = dims(probs, "cross_entropy_backward probs")?;
        check_len("cross_entropy_backward targets", n, targets.len())?;
        check_indices("cross_entropy_backward targets", targets, v)?;
        dlogits
            .as_mut_slice()
            .par_chunks_mut(v)
            .with_min_len(4)
            .zip(probs.as_slice().par_chunks(v))
            .zip(targets.par_iter())
            .for_each(|((d, p), &tg)| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (j, (d, &p)) in d.iter_mut().zip(p).enumerate() {
                            let onehot = if j == tg as usize { 1.0 } else { 0.0 };
                            *d = t(scale * (f(p) - onehot));
                        }
                    },
                )
            });
        Ok(())
    }
}
