//! Embedding, RMSNorm and softmax cross-entropy on the host.

use muon_core::{check_shape, Result, Shape};
use rayon::prelude::*;

use super::{
    check_indices, check_len, dims, f, floored, gather_rows, lane_max, lane_sum, same, t, vectorized,
    CpuReal, HostBackend, MIN_ROWS,
};
use crate::ops::TokenOps;

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
                        let ms = lane_sum([xr, xr]) / w as f64;
                        let rs = 1.0 / (ms + eps).sqrt();
                        *r = t(rs);
                        for ((o, &xv), &gv) in o.iter_mut().zip(xr).zip(g) {
                            *o = t(f(xv) * rs * f(gv));
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
        // dx = r * (dxhat - xhat * mean(dxhat * xhat)).
        dx.as_mut_slice()
            .par_chunks_mut(w)
            .with_min_len(MIN_ROWS)
            .zip(dout.as_slice().par_chunks(w))
            .zip(x.as_slice().par_chunks(w))
            .zip(rstd.as_slice().par_iter())
            .for_each(|(((dxr, dor), xr), &r)| {
                vectorized(
                    #[inline(always)]
                    || {
                        let r = f(r);
                        let mean = lane_sum([dor, g, xr]) * r / w as f64;
                        for (((dxv, &d), &xv), &gv) in dxr.iter_mut().zip(dor).zip(xr).zip(g) {
                            *dxv += t(r * (f(d) * f(gv) - f(xv) * r * mean));
                        }
                    },
                )
            });
        // dgain[c] += sum_n dout[n,c] * xhat[n,c]: serial over rows, parallel over nothing (it
        // is N*W work, small next to the GEMMs).
        let dg = dgain.as_mut_slice();
        vectorized(
            #[inline(always)]
            || {
                for ((dor, xr), &r) in dout
                    .as_slice()
                    .chunks_exact(w)
                    .zip(x.as_slice().chunks_exact(w))
                    .zip(rstd.as_slice())
                {
                    for ((dgv, &d), &xv) in dg.iter_mut().zip(dor).zip(xr) {
                        *dgv += d * xv * r;
                    }
                }
            },
        );
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
