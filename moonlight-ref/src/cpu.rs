//! [`ModelOps`] on the CPU, for every backend whose matrices are host slices
//! ([`muon_core::HostMatrix`]): [`muon_core::Portable`] (any [`Real`], f64 for gradient checks)
//! and [`muon_faer::Faer`] (f32 for training, f64 too).
//!
//! The slice-level kernels are written once, generic over the element type, in [`kernels`];
//! a macro implements the trait for each backend by delegation. Row-wise work runs on rayon
//! (rows of attention scores over batch x heads, token rows, expert row ranges); every
//! reduction runs serially inside one task, so results do not depend on the thread count.
//! Transcendentals and row reductions are computed in `f64`.

use muon_core::{HostMatrix, Portable, Real, Result, Transpose};

use crate::ops::ModelOps;

/// The element types of the host kernels: [`Real`] plus the exponential in the element's own
/// precision and a single-threaded faer product.
///
/// `f32` uses its own inlined exponential ([`exp_f32`]) rather than libm's `expf`: the SwiGLU
/// sigmoids and softmax exponentials dominate the non-GEMM time, and an inlined polynomial
/// neither pays a call per element nor depends on the thread's AVX state (after a faer
/// product leaves the AVX upper halves dirty, libm's `expf` ran ~25x slower on this machine,
/// 4 ns -> 100+ ns per call, which once made the softmax the bottleneck; every faer product
/// here is now followed by `muon_faer::clear_avx_upper_state`).
pub trait CpuReal: Real {
    /// Softmax outputs below this are stored as exact zeros (1e-30 in f32, 1e-300 in f64):
    /// near-subnormal probabilities make later products with them (the LM head's and
    /// attention's GEMMs, forward and backward) subnormal, and each subnormal result takes a
    /// microcode assist on x86; a long run without weight decay slowed 4x as its predictions
    /// sharpened. A probability that small changes no sum it enters.
    const PROB_FLOOR: Self;

    /// `e^self`.
    fn exp(self) -> Self;

    /// One single-threaded product on row-major slices, with faer's kernels:
    /// `c = alpha * op(a) op(b)` (or `c += ...` with `accumulate`), where `a` is stored
    /// `a_rows x a_cols`, `b` `b_rows x b_cols`, and `c` is `m x n`.
    fn matmul(
        c: &mut [Self],
        m: usize,
        n: usize,
        a: (&[Self], usize, usize, Transpose),
        b: (&[Self], usize, usize, Transpose),
        alpha: Self,
        accumulate: bool,
    );
}

fn faer_view<T>(data: &[T], rows: usize, cols: usize, op: Transpose) -> faer::MatRef<'_, T> {
    let m = faer::MatRef::from_row_major_slice(data, rows, cols);
    match op {
        Transpose::No => m,
        Transpose::Yes => m.transpose(),
    }
}

macro_rules! impl_cpu_real {
    ($t:ty, $exp:path, $floor:expr) => {
        impl CpuReal for $t {
            const PROB_FLOOR: Self = $floor;

            #[inline]
            fn exp(self) -> Self {
                $exp(self)
            }

            fn matmul(
                c: &mut [Self],
                m: usize,
                n: usize,
                a: (&[Self], usize, usize, Transpose),
                b: (&[Self], usize, usize, Transpose),
                alpha: Self,
                accumulate: bool,
            ) {
                let accum = if accumulate {
                    faer::Accum::Add
                } else {
                    faer::Accum::Replace
                };
                faer::linalg::matmul::matmul(
                    faer::MatMut::from_row_major_slice_mut(c, m, n),
                    accum,
                    faer_view(a.0, a.1, a.2, a.3),
                    faer_view(b.0, b.1, b.2, b.3),
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

/// Runs one faer product per element type on every thread of the current rayon pool (the
/// global one outside any pool). faer's x86 kernels create a thread-local workspace on a
/// thread's first product; without this, that allocation falls inside whichever later
/// training step first lands a product on the thread, which under load can be any step.
pub fn warm_up_threads() {
    fn product<T: CpuReal>() {
        const N: usize = 32; // above faer's small-matrix path, so the x86 kernels run
        let (a, mut c) = ([T::ONE; N * N], [T::ZERO; N * N]);
        T::matmul(
            &mut c,
            N,
            N,
            (&a, N, N, Transpose::No),
            (&a, N, N, Transpose::No),
            T::ONE,
            false,
        );
    }
    rayon::broadcast(|_| {
        product::<f32>();
        product::<f64>();
    });
}

/// `e^x` in `f32` (Cephes `expf`: range reduction by `ln 2` in two parts, a degree-6
/// polynomial; within 2 ulp of the exact value on `[-87, 88]`). Below -87.3 it returns
/// ~1e-38 instead of a subnormal (the callers add it to 1 or normalize by a sum that includes
/// `e^0`), above 88 it saturates near `f32::MAX`; NaN stays NaN.
#[inline]
pub fn exp_f32(x: f32) -> f32 {
    // `clamp` passes NaN through (unlike min/max).
    let x = x.clamp(-87.3, 88.0);
    // round(x / ln 2) without `floor` (a libm call on baseline x86-64): truncate, then step
    // down where truncation rounded a negative value up.
    let t = x * std::f32::consts::LOG2_E + 0.5;
    let n = t as i32;
    let n = (if n as f32 > t { n - 1 } else { n }) as f32;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Slice-level kernels shared by the host backends. Shapes are checked with `assert!`: the
/// model issues well-formed calls, a violation is a bug.
pub mod kernels {
    use super::CpuReal as Real;
    use muon_core::{HostMatrix, Transpose};
    use rayon::prelude::*;

    /// Rows handed to one rayon task at least: keeps tiny problems on one thread.
    const MIN_ROWS: usize = 16;

    #[inline]
    fn f<T: Real>(x: T) -> f64 {
        x.to_f64()
    }
    #[inline]
    fn t<T: Real>(x: f64) -> T {
        T::from_f64(x)
    }

    /// `(rows, cols)` of a plain (batch 1) matrix.
    #[track_caller]
    fn dims<T: Real>(m: &HostMatrix<T>, what: &str) -> (usize, usize) {
        let s = m.shape();
        assert!(s.batch == 1, "{what}: expected a plain matrix, got {s}");
        (s.rows, s.cols)
    }

    #[track_caller]
    fn same<T: Real>(a: &HostMatrix<T>, b: &HostMatrix<T>, what: &str) {
        assert!(
            a.shape() == b.shape(),
            "{what}: shapes differ ({} vs {})",
            a.shape(),
            b.shape()
        );
    }

    pub fn fill<T: Real>(dst: &mut HostMatrix<T>, value: T) {
        dst.as_mut_slice().fill(value);
    }

    /// The embedding lookup is a row gather: row `tokens[i]` of the table into row `i`.
    pub fn embedding_forward<T: Real>(out: &mut HostMatrix<T>, table: &HostMatrix<T>, tokens: &[u32]) {
        gather_rows(out, table, tokens);
    }

    pub fn embedding_backward<T: Real>(dtable: &mut HostMatrix<T>, dout: &HostMatrix<T>, tokens: &[u32]) {
        let (n, c) = dims(dout, "embedding dout");
        let (v, c2) = dims(dtable, "embedding dtable");
        assert!(c == c2 && tokens.len() == n, "embedding_backward: shapes");
        // Serial: two tokens may share a row of the table.
        let dt = dtable.as_mut_slice();
        for (row, &tok) in dout.as_slice().chunks_exact(c).zip(tokens) {
            let tok = tok as usize;
            assert!(tok < v, "token {tok} out of the vocabulary ({v})");
            for (d, &g) in dt[tok * c..(tok + 1) * c].iter_mut().zip(row) {
                *d += g;
            }
        }
    }

    pub fn rmsnorm_forward<T: Real>(
        out: &mut HostMatrix<T>,
        rstd: &mut HostMatrix<T>,
        x: &HostMatrix<T>,
        gain: &HostMatrix<T>,
        eps: f64,
    ) {
        same(out, x, "rmsnorm_forward");
        let (n, w) = dims(x, "rmsnorm x");
        assert!(dims(gain, "rmsnorm gain") == (1, w) && dims(rstd, "rmsnorm rstd") == (1, n));
        let g = gain.as_slice();
        out.as_mut_slice()
            .par_chunks_mut(w)
            .with_min_len(MIN_ROWS)
            .zip(x.as_slice().par_chunks(w))
            .zip(rstd.as_mut_slice().par_iter_mut())
            .for_each(|((o, xr), r)| {
                let ms = xr.iter().map(|&v| f(v) * f(v)).sum::<f64>() / w as f64;
                let rs = 1.0 / (ms + eps).sqrt();
                *r = t(rs);
                for ((o, &xv), &gv) in o.iter_mut().zip(xr).zip(g) {
                    *o = t(f(xv) * rs * f(gv));
                }
            });
    }

    pub fn rmsnorm_backward<T: Real>(
        dx: &mut HostMatrix<T>,
        dgain: &mut HostMatrix<T>,
        dout: &HostMatrix<T>,
        x: &HostMatrix<T>,
        gain: &HostMatrix<T>,
        rstd: &HostMatrix<T>,
    ) {
        same(dx, x, "rmsnorm_backward dx");
        same(dout, x, "rmsnorm_backward dout");
        same(dgain, gain, "rmsnorm_backward dgain");
        let (_, w) = dims(x, "rmsnorm x");
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
                let r = f(r);
                let mut dot = 0.0;
                for ((&d, &xv), &gv) in dor.iter().zip(xr).zip(g) {
                    dot += f(d) * f(gv) * f(xv) * r;
                }
                let mean = dot / w as f64;
                for (((dxv, &d), &xv), &gv) in dxr.iter_mut().zip(dor).zip(xr).zip(g) {
                    *dxv += t(r * (f(d) * f(gv) - f(xv) * r * mean));
                }
            });
        // dgain[c] += sum_n dout[n,c] * xhat[n,c]: serial over rows, parallel over nothing (it
        // is N*W work, small next to the GEMMs).
        let dg = dgain.as_mut_slice();
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
    }

    pub fn copy_columns<T: Real>(
        dst: &mut HostMatrix<T>,
        dst_col: usize,
        src: &HostMatrix<T>,
        src_col: usize,
        width: usize,
        accumulate: bool,
    ) {
        let (n, wd) = dims(dst, "copy_columns dst");
        let (n2, ws) = dims(src, "copy_columns src");
        assert!(
            n == n2 && dst_col + width <= wd && src_col + width <= ws,
            "copy_columns: shapes"
        );
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
    }

    /// `(B, T, H)` of a heads stack `[B*H, T, D]` against a token matrix `[B*T, S]`.
    #[track_caller]
    fn head_dims<T: Real>(heads: &HostMatrix<T>, tokens: &HostMatrix<T>) -> (usize, usize, usize) {
        let hs = heads.shape();
        let (n, _) = dims(tokens, "token rows");
        let seq = hs.rows;
        assert!(
            seq > 0 && n.is_multiple_of(seq),
            "heads {hs} do not tile {n} token rows"
        );
        let b = n / seq;
        assert!(
            b > 0 && hs.batch.is_multiple_of(b),
            "heads {hs} do not tile {b} sequences"
        );
        (b, seq, hs.batch / b)
    }

    pub fn split_heads<T: Real>(
        dst: &mut HostMatrix<T>,
        dst_col: usize,
        src: &HostMatrix<T>,
        src_col: usize,
        head_stride: usize,
        width: usize,
    ) {
        let (_, seq, h) = head_dims(dst, src);
        let dd = dst.shape().cols;
        let s_cols = src.shape().cols;
        assert!(dst_col + width <= dd, "split_heads: dst columns");
        assert!(
            (h - 1) * head_stride + src_col + width <= s_cols,
            "split_heads: src columns"
        );
        let s = src.as_slice();
        dst.as_mut_slice()
            .par_chunks_mut(seq * dd)
            .enumerate()
            .for_each(|(bh, m)| {
                let (b, hh) = (bh / h, bh % h);
                let c0 = hh * head_stride + src_col;
                for (ti, row) in m.chunks_exact_mut(dd).enumerate() {
                    let sr = &s[(b * seq + ti) * s_cols..][c0..c0 + width];
                    row[dst_col..dst_col + width].copy_from_slice(sr);
                }
            });
    }

    #[allow(clippy::too_many_arguments)]
    pub fn merge_heads<T: Real>(
        dst: &mut HostMatrix<T>,
        dst_col: usize,
        head_stride: usize,
        src: &HostMatrix<T>,
        src_col: usize,
        width: usize,
        accumulate: bool,
    ) {
        let (_, seq, h) = head_dims(src, dst);
        let ds = src.shape().cols;
        let d_cols = dst.shape().cols;
        assert!(src_col + width <= ds, "merge_heads: src columns");
        assert!(
            (h - 1) * head_stride + dst_col + width <= d_cols,
            "merge_heads: dst columns"
        );
        let s = src.as_slice();
        let blocks = if head_stride == 0 { 1 } else { h };
        dst.as_mut_slice()
            .par_chunks_mut(d_cols)
            .with_min_len(MIN_ROWS)
            .enumerate()
            .for_each(|(n, row)| {
                let (b, ti) = (n / seq, n % seq);
                if !accumulate {
                    for hh in 0..blocks {
                        let c0 = hh * head_stride + dst_col;
                        row[c0..c0 + width].fill(T::ZERO);
                    }
                }
                for hh in 0..h {
                    let c0 = hh * head_stride + dst_col;
                    let sr = &s[((b * h + hh) * seq + ti) * ds..][src_col..src_col + width];
                    row[c0..c0 + width].iter_mut().zip(sr).for_each(|(d, &v)| *d += v);
                }
            });
    }

    pub fn rope_table<T: Real>(table: &mut HostMatrix<T>, theta: f64) {
        let (_, d) = dims(table, "rope table");
        assert!(d % 2 == 0, "rope table width {d} must be even");
        let half = d / 2;
        for (pos, row) in table.as_mut_slice().chunks_exact_mut(d).enumerate() {
            for i in 0..half {
                let freq = theta.powf(-2.0 * i as f64 / d as f64);
                let angle = pos as f64 * freq;
                row[i] = t(angle.cos());
                row[half + i] = t(angle.sin());
            }
        }
    }

    pub fn rope<T: Real>(x: &mut HostMatrix<T>, col: usize, table: &HostMatrix<T>, inverse: bool) {
        let xs = x.shape();
        let (tr, d) = dims(table, "rope table");
        assert!(
            xs.rows <= tr && col + d <= xs.cols,
            "rope: x {xs}, table {tr}x{d}, col {col}"
        );
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
    }

    /// A probability, or zero below [`CpuReal::PROB_FLOOR`]; NaN stays NaN.
    #[inline]
    fn floored<T: Real>(p: T) -> T {
        if p < T::PROB_FLOOR {
            T::ZERO
        } else {
            p
        }
    }

    pub fn causal_softmax_forward<T: Real>(scores: &mut HostMatrix<T>) {
        let s = scores.shape();
        assert!(s.rows == s.cols, "causal softmax on {s}: matrices must be square");
        let seq = s.rows;
        scores
            .as_mut_slice()
            .par_chunks_mut(seq)
            .with_min_len(MIN_ROWS)
            .enumerate()
            .for_each(|(r, row)| {
                let i = r % seq;
                let (live, masked) = row.split_at_mut(i + 1);
                let max = live
                    .iter()
                    .copied()
                    .fold(live[0], |m, v| if v > m { v } else { m });
                let mut sum = 0.0;
                for v in live.iter_mut() {
                    let e = (*v - max).exp();
                    sum += f(e);
                    *v = e;
                }
                let inv: T = t(1.0 / sum);
                live.iter_mut().for_each(|v| *v = floored(*v * inv));
                masked.fill(T::ZERO);
            });
    }

    pub fn causal_softmax_backward<T: Real>(grad: &mut HostMatrix<T>, probs: &HostMatrix<T>) {
        same(grad, probs, "causal_softmax_backward");
        let seq = probs.shape().cols;
        grad.as_mut_slice()
            .par_chunks_mut(seq)
            .with_min_len(MIN_ROWS)
            .zip(probs.as_slice().par_chunks(seq))
            .enumerate()
            .for_each(|(r, (g, p))| {
                // Row i has probabilities only up to i; past it P = 0 and so is dS.
                let i = r % seq;
                let (live, masked) = g.split_at_mut(i + 1);
                let dot: f64 = live.iter().zip(p).map(|(&g, &p)| f(g) * f(p)).sum();
                let dot: T = t(dot);
                live.iter_mut().zip(p).for_each(|(g, &p)| *g = p * (*g - dot));
                masked.fill(T::ZERO);
            });
    }

    #[inline]
    fn sigmoid<T: Real>(x: T) -> T {
        T::ONE / (T::ONE + (-x).exp())
    }

    pub fn swiglu_forward<T: Real>(out: &mut HostMatrix<T>, gate: &HostMatrix<T>, up: &HostMatrix<T>) {
        same(out, gate, "swiglu_forward gate");
        same(out, up, "swiglu_forward up");
        out.as_mut_slice()
            .par_chunks_mut(1024)
            .zip(gate.as_slice().par_chunks(1024))
            .zip(up.as_slice().par_chunks(1024))
            .for_each(|((o, g), u)| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            });
    }

    pub fn swiglu_backward<T: Real>(
        dgate: &mut HostMatrix<T>,
        dup: &mut HostMatrix<T>,
        dout: &HostMatrix<T>,
        gate: &HostMatrix<T>,
        up: &HostMatrix<T>,
    ) {
        for (m, what) in [(&*dgate, "dgate"), (&*dup, "dup"), (dout, "dout"), (up, "up")] {
            same(m, gate, what);
        }
        dgate
            .as_mut_slice()
            .par_chunks_mut(1024)
            .zip(dup.as_mut_slice().par_chunks_mut(1024))
            .zip(dout.as_slice().par_chunks(1024))
            .zip(gate.as_slice().par_chunks(1024))
            .zip(up.as_slice().par_chunks(1024))
            .for_each(|((((dg, du), d), g), u)| {
                for i in 0..dg.len() {
                    let (gv, uv, dv) = (g[i], u[i], d[i]);
                    let s = sigmoid(gv);
                    // d silu(g)/dg = s + g s (1 - s)
                    dg[i] = dv * uv * (s + gv * s * (T::ONE - s));
                    du[i] = dv * gv * s;
                }
            });
    }

    pub fn router_forward<T: Real>(
        scores: &mut HostMatrix<T>,
        gates: &mut HostMatrix<T>,
        experts: &mut [u32],
        logits: &HostMatrix<T>,
        bias: &HostMatrix<T>,
        scaling: f64,
    ) {
        same(scores, logits, "router_forward");
        let (n, e) = dims(logits, "router logits");
        let (n2, k) = dims(gates, "router gates");
        assert!(n == n2 && k <= e && experts.len() == n * k && dims(bias, "router bias") == (1, e));
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
    }

    pub fn router_backward<T: Real>(
        dlogits: &mut HostMatrix<T>,
        dgates: &HostMatrix<T>,
        scores: &HostMatrix<T>,
        experts: &[u32],
        scaling: f64,
    ) {
        same(dlogits, scores, "router_backward");
        let (n, e) = dims(scores, "router scores");
        let (n2, k) = dims(dgates, "router dgates");
        assert!(n == n2 && experts.len() == n * k);
        dlogits
            .as_mut_slice()
            .par_chunks_mut(e)
            .with_min_len(MIN_ROWS)
            .zip(dgates.as_slice().par_chunks(k))
            .zip(scores.as_slice().par_chunks(e))
            .zip(experts.par_chunks(k))
            .for_each(|(((dl, dg), s), ex)| {
                dl.fill(T::ZERO);
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
    }

    pub fn router_seq_aux<T: Real>(
        loss: &mut HostMatrix<T>,
        frac: &mut HostMatrix<T>,
        dlogits: &mut HostMatrix<T>,
        scores: &HostMatrix<T>,
        experts: &[u32],
        seq: usize,
        alpha: f64,
    ) {
        same(dlogits, scores, "router_seq_aux");
        let (n, e) = dims(scores, "router scores");
        assert!(
            seq > 0 && n % seq == 0,
            "router_seq_aux: {n} tokens are not sequences of {seq}"
        );
        let batch = n / seq;
        assert!(dims(frac, "aux load fractions") == (batch, e) && dims(loss, "aux loss") == (1, 1));
        assert!(
            experts.len().is_multiple_of(n.max(1)),
            "router_seq_aux: experts per token"
        );
        let k = experts.len() / n.max(1);
        let s = scores.as_slice();
        let mut total = 0.0;
        for ((fb, dl), (sb, ex)) in frac
            .as_mut_slice()
            .chunks_exact_mut(e)
            .zip(dlogits.as_mut_slice().chunks_exact_mut(seq * e))
            .zip(s.chunks_exact(seq * e).zip(experts.chunks_exact(seq * k)))
        {
            // f_i: the share of this sequence's selections that went to expert i, times E / K.
            fb.fill(T::ZERO);
            for &j in ex {
                fb[j as usize] += T::ONE;
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
    }

    pub fn moe_dispatch(
        counts: &mut [u32],
        offsets: &mut [u32],
        slot_row: &mut [u32],
        row_token: &mut [u32],
        experts: &[u32],
        top_k: usize,
    ) {
        let e = counts.len();
        let r = experts.len();
        assert!(offsets.len() == e + 1 && slot_row.len() == r && row_token.len() == r && top_k > 0);
        assert!(
            r.is_multiple_of(top_k),
            "moe_dispatch: {r} slots are not a multiple of top_k {top_k}"
        );
        counts.fill(0);
        for &x in experts {
            assert!((x as usize) < e, "expert {x} out of {e}");
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
    }

    pub fn gather_rows<T: Real>(dst: &mut HostMatrix<T>, src: &HostMatrix<T>, rows: &[u32]) {
        let (r, c) = dims(dst, "gather dst");
        let (n, c2) = dims(src, "gather src");
        assert!(c == c2 && rows.len() == r, "gather_rows: shapes");
        let s = src.as_slice();
        dst.as_mut_slice()
            .par_chunks_mut(c)
            .with_min_len(MIN_ROWS)
            .zip(rows)
            .for_each(|(d, &i)| {
                let i = i as usize;
                assert!(i < n, "gather_rows: row {i} of {n}");
                d.copy_from_slice(&s[i * c..(i + 1) * c]);
            });
    }

    pub fn scatter_add_slots<T: Real>(dsrc: &mut HostMatrix<T>, dgrouped: &HostMatrix<T>, slot_row: &[u32]) {
        let (n, c) = dims(dsrc, "scatter dsrc");
        let (r, c2) = dims(dgrouped, "scatter dgrouped");
        assert!(
            c == c2 && slot_row.len() == r && n > 0 && r % n == 0,
            "scatter_add_slots: shapes"
        );
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
    }

    pub fn moe_combine<T: Real>(
        out: &mut HostMatrix<T>,
        grouped: &HostMatrix<T>,
        gates: &HostMatrix<T>,
        slot_row: &[u32],
    ) {
        let (n, c) = dims(out, "combine out");
        let (r, c2) = dims(grouped, "combine grouped");
        let (n2, k) = dims(gates, "combine gates");
        assert!(
            c == c2 && n == n2 && r == n * k && slot_row.len() == r,
            "moe_combine: shapes"
        );
        let gr = grouped.as_slice();
        out.as_mut_slice()
            .par_chunks_mut(c)
            .with_min_len(MIN_ROWS)
            .zip(gates.as_slice().par_chunks(k))
            .zip(slot_row.par_chunks(k))
            .for_each(|((o, g), rows)| {
                for (&gv, &row) in g.iter().zip(rows) {
                    let row = row as usize;
                    o.iter_mut()
                        .zip(&gr[row * c..(row + 1) * c])
                        .for_each(|(o, &v)| *o += gv * v);
                }
            });
    }

    pub fn moe_combine_backward<T: Real>(
        dgrouped: &mut HostMatrix<T>,
        dgates: &mut HostMatrix<T>,
        dout: &HostMatrix<T>,
        grouped: &HostMatrix<T>,
        gates: &HostMatrix<T>,
        slot_row: &[u32],
    ) {
        same(dgrouped, grouped, "moe_combine_backward grouped");
        same(dgates, gates, "moe_combine_backward gates");
        let (n, c) = dims(dout, "combine dout");
        let (n2, k) = dims(gates, "combine gates");
        assert!(n == n2 && slot_row.len() == n * k && grouped.shape().rows == n * k);
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
                for (dg, &row) in dg.iter_mut().zip(rows) {
                    let row = row as usize;
                    let dot: f64 = d
                        .iter()
                        .zip(&gr[row * c..(row + 1) * c])
                        .map(|(&a, &b)| f(a) * f(b))
                        .sum();
                    *dg = t(dot);
                }
            });
        // dgrouped: every grouped row is one slot; find it through the inverse map, serially
        // (a scatter of whole rows; N*K*C copies).
        let dgr = dgrouped.as_mut_slice();
        let d = dout.as_slice();
        for (slot, &row) in slot_row.iter().enumerate() {
            let (row, n_i) = (row as usize, slot / k);
            let gv = g[slot];
            dgr[row * c..(row + 1) * c]
                .iter_mut()
                .zip(&d[n_i * c..(n_i + 1) * c])
                .for_each(|(o, &v)| *o = gv * v);
        }
    }

    #[allow(clippy::too_many_arguments)]
    /// Applies BLAS `beta` to `d` before a product: returns whether the product must add to
    /// `d` (`false`: overwrite, and `d` is never read, so NaN in it does not leak through).
    fn scale_for_beta<T: Real>(d: &mut [T], beta: T) -> bool {
        if beta == T::ZERO {
            false
        } else {
            if beta != T::ONE {
                d.iter_mut().for_each(|v| *v *= beta);
            }
            true
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gemm<T: Real>(
        dst: &mut HostMatrix<T>,
        alpha: T,
        a: &HostMatrix<T>,
        w: &HostMatrix<T>,
        transpose_w: Transpose,
        offsets: &[u32],
        beta: T,
    ) {
        let (r, n) = dims(dst, "grouped dst");
        let (r2, k) = dims(a, "grouped a");
        let ws = w.shape();
        let (wk, wn) = ws.op(transpose_w);
        assert!(
            r == r2 && wk == k && wn == n && offsets.len() == ws.batch + 1,
            "grouped_gemm: shapes"
        );
        assert!(
            offsets[ws.batch] as usize == r,
            "grouped_gemm: offsets cover {} of {r} rows",
            offsets[ws.batch]
        );
        let (asl, wsl) = (a.as_slice(), w.as_slice());
        let d = dst.as_mut_slice();
        let threads = rayon::current_num_threads().max(1);
        for e in 0..ws.batch {
            let (lo, hi) = (offsets[e] as usize, offsets[e + 1] as usize);
            if lo == hi {
                continue;
            }
            let we = &wsl[e * ws.batch_stride()..(e + 1) * ws.batch_stride()];
            // Row blocks of this expert's range, one faer product each, across the threads.
            let chunk = (hi - lo).div_ceil(threads).max(16);
            d[lo * n..hi * n]
                .par_chunks_mut(chunk * n)
                .zip(asl[lo * k..hi * k].par_chunks(chunk * k))
                .for_each(|(dc, ac)| {
                    let rows = ac.len() / k.max(1);
                    let accumulate = scale_for_beta(dc, beta);
                    let wop = (we, ws.rows, ws.cols, transpose_w);
                    T::matmul(dc, rows, n, (ac, rows, k, Transpose::No), wop, alpha, accumulate);
                });
        }
    }

    pub fn grouped_gemm_weight_grad<T: Real>(
        dw: &mut HostMatrix<T>,
        alpha: T,
        x: &HostMatrix<T>,
        y: &HostMatrix<T>,
        offsets: &[u32],
        beta: T,
    ) {
        let ws = dw.shape();
        let (r, p) = dims(x, "weight grad x");
        let (r2, q) = dims(y, "weight grad y");
        assert!(
            r == r2 && ws.rows == p && ws.cols == q && offsets.len() == ws.batch + 1,
            "grouped weight grad"
        );
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
                        dwe.fill(T::ZERO);
                    }
                    return;
                }
                let rows = hi - lo;
                let xe = (&xs[lo * p..hi * p], rows, p, Transpose::Yes);
                let ye = (&ys[lo * q..hi * q], rows, q, Transpose::No);
                T::matmul(dwe, p, q, xe, ye, alpha, accumulate);
            });
    }

    pub fn router_bias_update<T: Real>(bias: &mut HostMatrix<T>, counts: &[u32], rate: f64) {
        let (_, e) = dims(bias, "router bias");
        assert!(
            counts.len() == e,
            "router_bias_update: {} counts for {e} experts",
            counts.len()
        );
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
    }

    pub fn cross_entropy_forward<T: Real>(
        probs: &mut HostMatrix<T>,
        loss: &mut HostMatrix<T>,
        logits: &HostMatrix<T>,
        targets: &[u32],
    ) {
        same(probs, logits, "cross_entropy_forward");
        let (n, v) = dims(logits, "logits");
        assert!(
            targets.len() == n && loss.shape().len() == 1,
            "cross_entropy_forward: shapes"
        );
        probs
            .as_mut_slice()
            .par_chunks_mut(v)
            .with_min_len(4)
            .zip(logits.as_slice().par_chunks(v))
            .for_each(|(p, l)| {
                let max = l.iter().copied().fold(l[0], |m, v| if v > m { v } else { m });
                let mut sum = 0.0;
                for (p, &x) in p.iter_mut().zip(l) {
                    let e = (x - max).exp();
                    sum += f(e);
                    *p = e;
                }
                let inv: T = t(1.0 / sum);
                p.iter_mut().for_each(|p| *p = floored(*p * inv));
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
            assert!(tg < v, "target {tg} out of the vocabulary ({v})");
            let pt = f(p[tg]);
            total += if pt > 1e-30 {
                -pt.ln()
            } else {
                let max = l.iter().map(|&x| f(x)).fold(f64::NEG_INFINITY, f64::max);
                max + l.iter().map(|&x| (f(x) - max).exp()).sum::<f64>().ln() - f(l[tg])
            };
        }
        loss.as_mut_slice()[0] = t(total / n as f64);
    }

    pub fn cross_entropy_backward<T: Real>(
        dlogits: &mut HostMatrix<T>,
        probs: &HostMatrix<T>,
        targets: &[u32],
        scale: f64,
    ) {
        same(dlogits, probs, "cross_entropy_backward");
        let (n, v) = dims(probs, "probs");
        assert!(targets.len() == n, "cross_entropy_backward: shapes");
        dlogits
            .as_mut_slice()
            .par_chunks_mut(v)
            .with_min_len(4)
            .zip(probs.as_slice().par_chunks(v))
            .zip(targets.par_iter())
            .for_each(|((d, p), &tg)| {
                for (j, (d, &p)) in d.iter_mut().zip(p).enumerate() {
                    let onehot = if j == tg as usize { 1.0 } else { 0.0 };
                    *d = t(scale * (f(p) - onehot));
                }
            });
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux); `None` elsewhere.
fn host_available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[track_caller]
fn same_len(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(muon_core::Error::Backend(format!("{what}: {a} elements vs {b}")));
    }
    Ok(())
}

/// Implements [`ModelOps`] for a backend whose `Matrix` is `HostMatrix<$t>`, by delegation
/// to [`kernels`].
macro_rules! impl_host_model_ops {
    ([$($gen:tt)*] $backend:ty, $t:ty) => {
        impl<$($gen)*> ModelOps for $backend {
            type Indices = Vec<u32>;

            fn indices_zeros(&self, len: usize) -> Result<Vec<u32>> {
                Ok(vec![0; len])
            }
            fn indices_len(idx: &Vec<u32>) -> usize {
                idx.len()
            }
            fn indices_upload(&self, dst: &mut Vec<u32>, src: &[u32]) -> Result<()> {
                same_len("indices_upload", dst.len(), src.len())?;
                dst.copy_from_slice(src);
                Ok(())
            }
            fn indices_download(&self, src: &Vec<u32>, dst: &mut [u32]) -> Result<()> {
                same_len("indices_download", src.len(), dst.len())?;
                dst.copy_from_slice(src);
                Ok(())
            }
            fn available_memory(&self) -> Option<u64> {
                host_available_memory()
            }
            fn fill(&self, dst: &mut HostMatrix<$t>, value: $t) -> Result<()> {
                kernels::fill(dst, value);
                Ok(())
            }
            fn embedding_forward(&self, out: &mut HostMatrix<$t>, table: &HostMatrix<$t>, tokens: &Vec<u32>) -> Result<()> {
                kernels::embedding_forward(out, table, tokens);
                Ok(())
            }
            fn embedding_backward(&self, dtable: &mut HostMatrix<$t>, dout: &HostMatrix<$t>, tokens: &Vec<u32>) -> Result<()> {
                kernels::embedding_backward(dtable, dout, tokens);
                Ok(())
            }
            fn rmsnorm_forward(
                &self, out: &mut HostMatrix<$t>, rstd: &mut HostMatrix<$t>, x: &HostMatrix<$t>,
                gain: &HostMatrix<$t>, eps: f64,
            ) -> Result<()> {
                kernels::rmsnorm_forward(out, rstd, x, gain, eps);
                Ok(())
            }
            fn rmsnorm_backward(
                &self, dx: &mut HostMatrix<$t>, dgain: &mut HostMatrix<$t>, dout: &HostMatrix<$t>,
                x: &HostMatrix<$t>, gain: &HostMatrix<$t>, rstd: &HostMatrix<$t>,
            ) -> Result<()> {
                kernels::rmsnorm_backward(dx, dgain, dout, x, gain, rstd);
                Ok(())
            }
            fn copy_columns(
                &self, dst: &mut HostMatrix<$t>, dst_col: usize, src: &HostMatrix<$t>, src_col: usize,
                width: usize, accumulate: bool,
            ) -> Result<()> {
                kernels::copy_columns(dst, dst_col, src, src_col, width, accumulate);
                Ok(())
            }
            fn split_heads(
                &self, dst: &mut HostMatrix<$t>, dst_col: usize, src: &HostMatrix<$t>, src_col: usize,
                head_stride: usize, width: usize,
            ) -> Result<()> {
                kernels::split_heads(dst, dst_col, src, src_col, head_stride, width);
                Ok(())
            }
            fn merge_heads(
                &self, dst: &mut HostMatrix<$t>, dst_col: usize, head_stride: usize, src: &HostMatrix<$t>,
                src_col: usize, width: usize, accumulate: bool,
            ) -> Result<()> {
                kernels::merge_heads(dst, dst_col, head_stride, src, src_col, width, accumulate);
                Ok(())
            }
            fn rope_table(&self, table: &mut HostMatrix<$t>, theta: f64) -> Result<()> {
                kernels::rope_table(table, theta);
                Ok(())
            }
            fn rope(&self, x: &mut HostMatrix<$t>, col: usize, table: &HostMatrix<$t>, inverse: bool) -> Result<()> {
                kernels::rope(x, col, table, inverse);
                Ok(())
            }
            fn causal_softmax_forward(&self, scores: &mut HostMatrix<$t>) -> Result<()> {
                kernels::causal_softmax_forward(scores);
                Ok(())
            }
            fn causal_softmax_backward(&self, grad: &mut HostMatrix<$t>, probs: &HostMatrix<$t>) -> Result<()> {
                kernels::causal_softmax_backward(grad, probs);
                Ok(())
            }
            fn swiglu_forward(&self, out: &mut HostMatrix<$t>, gate: &HostMatrix<$t>, up: &HostMatrix<$t>) -> Result<()> {
                kernels::swiglu_forward(out, gate, up);
                Ok(())
            }
            fn swiglu_backward(
                &self, dgate: &mut HostMatrix<$t>, dup: &mut HostMatrix<$t>, dout: &HostMatrix<$t>,
                gate: &HostMatrix<$t>, up: &HostMatrix<$t>,
            ) -> Result<()> {
                kernels::swiglu_backward(dgate, dup, dout, gate, up);
                Ok(())
            }
            fn router_forward(
                &self, scores: &mut HostMatrix<$t>, gates: &mut HostMatrix<$t>, experts: &mut Vec<u32>,
                logits: &HostMatrix<$t>, bias: &HostMatrix<$t>, scaling: f64,
            ) -> Result<()> {
                kernels::router_forward(scores, gates, experts, logits, bias, scaling);
                Ok(())
            }
            fn router_backward(
                &self, dlogits: &mut HostMatrix<$t>, dgates: &HostMatrix<$t>, scores: &HostMatrix<$t>,
                experts: &Vec<u32>, scaling: f64,
            ) -> Result<()> {
                kernels::router_backward(dlogits, dgates, scores, experts, scaling);
                Ok(())
            }
            fn router_seq_aux(
                &self, loss: &mut HostMatrix<$t>, frac: &mut HostMatrix<$t>, dlogits: &mut HostMatrix<$t>,
                scores: &HostMatrix<$t>, experts: &Vec<u32>, seq: usize, alpha: f64,
            ) -> Result<()> {
                kernels::router_seq_aux(loss, frac, dlogits, scores, experts, seq, alpha);
                Ok(())
            }
            fn moe_dispatch(
                &self, counts: &mut Vec<u32>, offsets: &mut Vec<u32>, slot_row: &mut Vec<u32>,
                row_token: &mut Vec<u32>, experts: &Vec<u32>, top_k: usize,
            ) -> Result<()> {
                kernels::moe_dispatch(counts, offsets, slot_row, row_token, experts, top_k);
                Ok(())
            }
            fn gather_rows(&self, dst: &mut HostMatrix<$t>, src: &HostMatrix<$t>, rows: &Vec<u32>) -> Result<()> {
                kernels::gather_rows(dst, src, rows);
                Ok(())
            }
            fn scatter_add_slots(
                &self, dsrc: &mut HostMatrix<$t>, dgrouped: &HostMatrix<$t>, slot_row: &Vec<u32>,
            ) -> Result<()> {
                kernels::scatter_add_slots(dsrc, dgrouped, slot_row);
                Ok(())
            }
            fn moe_combine(
                &self, out: &mut HostMatrix<$t>, grouped: &HostMatrix<$t>, gates: &HostMatrix<$t>,
                slot_row: &Vec<u32>,
            ) -> Result<()> {
                kernels::moe_combine(out, grouped, gates, slot_row);
                Ok(())
            }
            fn moe_combine_backward(
                &self, dgrouped: &mut HostMatrix<$t>, dgates: &mut HostMatrix<$t>, dout: &HostMatrix<$t>,
                grouped: &HostMatrix<$t>, gates: &HostMatrix<$t>, slot_row: &Vec<u32>,
            ) -> Result<()> {
                kernels::moe_combine_backward(dgrouped, dgates, dout, grouped, gates, slot_row);
                Ok(())
            }
            fn grouped_gemm(
                &self, dst: &mut HostMatrix<$t>, alpha: $t, a: &HostMatrix<$t>, w: &HostMatrix<$t>,
                transpose_w: Transpose, offsets: &Vec<u32>, beta: $t,
            ) -> Result<()> {
                kernels::grouped_gemm(dst, alpha, a, w, transpose_w, offsets, beta);
                Ok(())
            }
            fn grouped_gemm_weight_grad(
                &self, dw: &mut HostMatrix<$t>, alpha: $t, x: &HostMatrix<$t>, y: &HostMatrix<$t>,
                offsets: &Vec<u32>, beta: $t,
            ) -> Result<()> {
                kernels::grouped_gemm_weight_grad(dw, alpha, x, y, offsets, beta);
                Ok(())
            }
            fn router_bias_update(&self, bias: &mut HostMatrix<$t>, counts: &Vec<u32>, rate: f64) -> Result<()> {
                kernels::router_bias_update(bias, counts, rate);
                Ok(())
            }
            fn cross_entropy_forward(
                &self, probs: &mut HostMatrix<$t>, loss: &mut HostMatrix<$t>, logits: &HostMatrix<$t>,
                targets: &Vec<u32>,
            ) -> Result<()> {
                kernels::cross_entropy_forward(probs, loss, logits, targets);
                Ok(())
            }
            fn cross_entropy_backward(
                &self, dlogits: &mut HostMatrix<$t>, probs: &HostMatrix<$t>, targets: &Vec<u32>, scale: f64,
            ) -> Result<()> {
                kernels::cross_entropy_backward(dlogits, probs, targets, scale);
                Ok(())
            }
        }
    };
}

impl_host_model_ops!([T: CpuReal] Portable<T>, T);
impl_host_model_ops!([T: muon_faer::Elem + CpuReal] muon_faer::Faer<T>, T);

#[cfg(test)]
mod tests {
    use super::{exp_f32, kernels};
    use muon_core::{HostMatrix, Shape};

    #[test]
    fn softmaxes_store_no_subnormal_probabilities() {
        // Logits 100 apart: e^-100 ~ 4e-44 is subnormal in f32 (and exp_f32 floors it at
        // ~1e-38); it must come out as 0, the other probabilities as usual.
        let logits =
            HostMatrix::from_vec(Shape::matrix(2, 3), vec![0.0f32, -100.0, -1.0, 5.0, 5.0, -95.0]).unwrap();
        let mut probs = HostMatrix::zeros(Shape::matrix(2, 3));
        let mut loss = HostMatrix::zeros(Shape::matrix(1, 1));
        kernels::cross_entropy_forward(&mut probs, &mut loss, &logits, &[1, 0]);
        let p = probs.as_slice();
        assert!(p.iter().all(|&v| v == 0.0 || v > 1e-30), "{p:?}");
        assert_eq!((p[1], p[5]), (0.0, 0.0));
        assert!((p[0] - 1.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6 && (p[3] - 0.5).abs() < 1e-6);
        // The loss of the flushed target still comes from the logits: -log softmax = 100 + ...
        let exact = 0.5 * (100.0 + (1.0 + (-1.0f64).exp()).ln() + 2.0f64.ln());
        assert!(
            (loss.as_slice()[0] as f64 - exact).abs() < 1e-4,
            "{:?}",
            loss.as_slice()
        );
        let mut scores =
            HostMatrix::from_vec(Shape::batched(1, 2, 2), vec![0.0f32, 7.0, 0.0, -100.0]).unwrap();
        kernels::causal_softmax_forward(&mut scores);
        assert_eq!(scores.as_slice(), &[1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn exp_f32_is_within_a_few_ulp_of_the_exact_exponential() {
        let mut worst = 0.0f64;
        let mut x = -87.0f64;
        while x <= 88.0 {
            let got = exp_f32(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        // 2 ulp of f32 = 2.4e-7 relative.
        assert!(worst < 2.4e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-1e9) >= 0.0 && exp_f32(-1e9) < 1e-37);
        assert!(exp_f32(1e9).is_finite());
    }
}
