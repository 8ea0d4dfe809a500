//! Newton-Schulz on this backend: the override of `Backend::newton_schulz`.
//!
//! Two changes from `muon_core::newton_schulz_generic`, which issues one primitive at a time
//! for a whole stack:
//! - **`a X` is folded into the product.** `X' = a X + P X = (a I + P) X`: adding `a` to the
//!   diagonal of the small `P` costs `m` additions, where the generic routine copies `X` into
//!   the next buffer and scales it (two passes over the largest operand per step).
//! - **Each matrix of a stack runs all its steps at once.** When the stack would be split over
//!   its matrices anyway (see `matmul::plan`), each thread takes whole matrices through the
//!   full iteration while their `X`, `S` and `P` stay in its L2 cache; the generic routine
//!   streams the whole stack through the caches once per operation (a 64 x 128x352 stack is
//!   30 MB per pass). A stack whose matrices are large enough to split keeps the step-by-step
//!   order, each product split across the team.

use faer::{Accum, Par};
use muon_core::{newton_schulz_folded, NewtonSchulz, NsWorkspace, Real, Result, Shape, Transpose};

use crate::bf16::{Bf16, KView, Skip};
use crate::elementwise::normalize_item;
use crate::matmul::{
    lower_product, mirror_lower, plan, split_items, view, view_mut, Plan, TRANSPOSED_GRAM_MIN,
};
use crate::team::{clear_avx_upper_state, MAX_PARTS};
use crate::{Elem, Faer};

pub(crate) fn newton_schulz<T: Elem>(
    cpu: &Faer<T>,
    config: &NewtonSchulz,
    ws: &mut NsWorkspace<Faer<T>>,
) -> Result<()> {
    // The per-matrix paths below index the buffers by the workspace's shape.
    ws.check(config)?;
    let shape = ws.shape();
    let (m, n) = (shape.min_side(), shape.max_side());
    // A tall X with a wide Gram side would be read down its columns at half speed; the
    // step-by-step path transposes it into a scratch buffer first (see `matmul::symmetric`).
    let bf16 = cpu.bf16();
    // (The bf16 products pack their operands themselves and read a tall X down its columns
    // at full speed.)
    let strided_tall = shape.rows > shape.cols && m >= TRANSPOSED_GRAM_MIN && bf16.is_none();
    let item_flops = 2.0 * (m * m * n) as f64;
    match plan(cpu.team.threads(), shape.batch, item_flops, n) {
        Plan::InsideItems(_) => step_by_step(cpu, config, ws),
        _ if strided_tall => step_by_step(cpu, config, ws),
        Plan::Serial => {
            let b = ws.buffers();
            let (x, next) = (b.x.as_mut_slice(), b.next.as_mut_slice());
            run_of_matrices(
                config,
                shape,
                x,
                next,
                b.gram.as_mut_slice(),
                b.poly.as_mut_slice(),
                bf16.as_ref(),
            );
            finish(config, ws);
            Ok(())
        }
        Plan::OverStack(parts) => {
            let b = ws.buffers();
            let (xs, ss, batch) = (shape.batch_stride(), m * m, shape.batch);
            let mut x = split_items(b.x.as_mut_slice(), xs, batch, parts);
            let mut next = split_items(b.next.as_mut_slice(), xs, batch, parts);
            let mut gram = split_items(b.gram.as_mut_slice(), ss, batch, parts);
            let mut poly = split_items(b.poly.as_mut_slice(), ss, batch, parts);
            let mut runs = [const { None }; MAX_PARTS];
            for (p, run) in runs.iter_mut().enumerate().take(parts) {
                let [x, next, gram, poly] = [&mut x, &mut next, &mut gram, &mut poly].map(|s| s[p].take());
                *run = Some((x, next, gram, poly));
            }
            cpu.team.for_each_part(&mut runs[..parts], &|run| {
                if let Some((Some((_, x)), Some((_, next)), Some((_, gram)), Some((_, poly)))) = run.take() {
                    run_of_matrices(config, shape, x, next, gram, poly, bf16.as_ref());
                }
            });
            finish(config, ws);
            Ok(())
        }
    }
}

/// [`one_matrix`] on each matrix of a run of consecutive matrices of the stack (the slices
/// hold whole matrices: `x`, `next` of the parameter's shape, `gram`, `poly` of `m x m`), in
/// bf16 when `bf16` is given (and the elements are `f32`).
fn run_of_matrices<T: Elem>(
    config: &NewtonSchulz,
    shape: Shape,
    x: &mut [T],
    next: &mut [T],
    gram: &mut [T],
    poly: &mut [T],
    bf16: Option<&Bf16<'_>>,
) {
    if let (Some(bf), Some(x), Some(next), Some(gram), Some(poly)) = (
        bf16,
        T::as_f32_mut(x),
        T::as_f32_mut(next),
        T::as_f32_mut(gram),
        T::as_f32_mut(poly),
    ) {
        for_each_item(shape, x, next, gram, poly, |x, next, gram, poly| {
            one_matrix_bf16(bf, config, shape, x, next, gram, poly)
        });
        return;
    }
    for_each_item(shape, x, next, gram, poly, |x, next, gram, poly| {
        one_matrix(config, shape, x, next, gram, poly)
    });
}

/// Calls `f` on the buffers of each matrix of a run.
fn for_each_item<T>(
    shape: Shape,
    x: &mut [T],
    next: &mut [T],
    gram: &mut [T],
    poly: &mut [T],
    mut f: impl FnMut(&mut [T], &mut [T], &mut [T], &mut [T]),
) {
    let (xs, ss) = (shape.batch_stride(), shape.min_side().pow(2));
    let items = x
        .chunks_exact_mut(xs)
        .zip(next.chunks_exact_mut(xs))
        .zip(gram.chunks_exact_mut(ss).zip(poly.chunks_exact_mut(ss)));
    for ((x, next), (gram, poly)) in items {
        f(x, next, gram, poly);
    }
}

/// After an odd number of steps each matrix's result sits in its `next` slice: swap the
/// buffers (not the data), as the step-by-step path does after every step.
fn finish<T: Elem>(config: &NewtonSchulz, ws: &mut NsWorkspace<Faer<T>>) {
    if config.steps % 2 == 1 {
        let b = ws.buffers();
        std::mem::swap(b.x, b.next);
    }
}

/// The whole iteration on one matrix of a stack, on the calling thread. Leaves the result in
/// `x` after an even number of steps, in `next` after an odd number.
fn one_matrix<'a, T: Elem>(
    config: &NewtonSchulz,
    shape: Shape,
    mut x: &'a mut [T],
    mut next: &'a mut [T],
    gram: &mut [T],
    poly: &mut [T],
) {
    let e = T::from_f64;
    let (rows, cols, m) = (shape.rows, shape.cols, shape.min_side());
    let wide = rows <= cols;
    normalize_item(x, e(config.norm_scale), e(config.eps));
    for k in 0..config.steps {
        let [a, b, c] = config.coefficients_at(k);
        // S = X X^T (wide) or X^T X (tall): the lower triangle, mirrored.
        let xv = view(x, rows, cols, Transpose::No);
        let lhs = if wide { xv } else { xv.transpose() };
        lower_product(None, view_mut(gram, m, m), T::ZERO, lhs, lhs.transpose(), T::ONE);
        mirror_lower(gram, m);
        // P = a I + b S + c S S.
        poly.copy_from_slice(gram);
        let s = view(gram, m, m, Transpose::No);
        lower_product(None, view_mut(poly, m, m), e(b), s, s, e(c));
        mirror_lower(poly, m);
        add_to_diagonal(poly, m, e(a));
        // X' = P X (wide) or X P (tall).
        let (xv, p) = (
            view(x, rows, cols, Transpose::No),
            view(poly, m, m, Transpose::No),
        );
        let (lhs, rhs) = if wide { (p, xv) } else { (xv, p) };
        faer::linalg::matmul::matmul(
            view_mut(next, rows, cols),
            Accum::Replace,
            lhs,
            rhs,
            T::ONE,
            Par::Seq,
        );
        clear_avx_upper_state();
        std::mem::swap(&mut x, &mut next);
    }
}

/// [`one_matrix`] with bf16 products. `S` and `P` are exactly symmetric (mirrored), so they
/// are read as `k x rows` matrices, the storage the packing reads fastest.
fn one_matrix_bf16<'a>(
    bf: &Bf16<'_>,
    config: &NewtonSchulz,
    shape: Shape,
    mut x: &'a mut [f32],
    mut next: &'a mut [f32],
    gram: &mut [f32],
    poly: &mut [f32],
) {
    let (rows, cols, m, n) = (shape.rows, shape.cols, shape.min_side(), shape.max_side());
    let wide = rows <= cols;
    normalize_item(x, config.norm_scale as f32, config.eps as f32);
    for k in 0..config.steps {
        let [a, b, c] = config.coefficients_at(k).map(|v| v as f32);
        // S = X X^T (wide, X is m x n) or X^T X (tall, X is n x m): op(X) as m x k = n.
        let xv = KView::new(x, m, n, wide);
        bf.lower(None, view_mut(gram, m, m), &xv, &xv, 1.0, 0.0);
        mirror_lower(gram, m);
        // P = a I + b S + c S S.
        poly.copy_from_slice(gram);
        let s = KView::new(gram, m, m, false);
        bf.lower(None, view_mut(poly, m, m), &s, &s, c, b);
        mirror_lower(poly, m);
        add_to_diagonal(poly, m, a);
        let p = KView::new(poly, m, m, false);
        if wide {
            // X' = P X: B = X (m x n) seen as n x k = m.
            bf.block(
                &p,
                &KView::new(x, n, m, false),
                view_mut(next, m, n),
                1.0,
                0.0,
                Skip::NONE,
            );
        } else {
            // X' = X P: A = X (n x m, k = m along its rows), B = P.
            bf.block(
                &KView::new(x, n, m, true),
                &p,
                view_mut(next, n, m),
                1.0,
                0.0,
                Skip::NONE,
            );
        }
        std::mem::swap(&mut x, &mut next);
    }
}

/// One step at a time over the whole stack, every product split across the team: muon-core's
/// routine with `a X` folded into the product.
fn step_by_step<T: Elem>(cpu: &Faer<T>, config: &NewtonSchulz, ws: &mut NsWorkspace<Faer<T>>) -> Result<()> {
    let m = ws.shape().min_side();
    newton_schulz_folded(cpu, config, ws, |p, a| {
        for p in p.as_mut_slice().chunks_exact_mut(m * m) {
            add_to_diagonal(p, m, a);
        }
        Ok(())
    })
}

/// `p += a I` for a square row-major `m x m` matrix.
fn add_to_diagonal<T: Real>(p: &mut [T], m: usize, a: T) {
    for i in 0..m {
        p[i * m + i] += a;
    }
}
