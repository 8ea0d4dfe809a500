//! Elementwise updates and reductions, split into contiguous chunks across the team when the
//! buffers are large. Reductions accumulate in `f64`, in a fixed order (per run, then the runs
//! in order, the runs cut by the length alone), so results do not depend on scheduling or on
//! the thread count.

use muon_core::{AdamWCoefficients, Real};

use crate::matmul::part_range;
use crate::team::{Team, MAX_PARTS};

/// Below this many elements an elementwise pass runs on the caller's thread: waking a worker
/// costs about as much as streaming this much memory.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// Chunks for a pass over `len` elements: two per thread (so a thread slowed down by a
/// shared core takes fewer), none smaller than half the threshold.
fn parts_for(team: &Team, len: usize) -> usize {
    if len < PARALLEL_MIN_ELEMS || team.threads() == 1 {
        1
    } else {
        (2 * team.threads())
            .min(len / (PARALLEL_MIN_ELEMS / 2))
            .clamp(1, MAX_PARTS)
    }
}

/// Splits a mutable or shared slice at `mid` (the same call for both kinds).
trait Split: Sized + Default {
    fn split_at_len(self, mid: usize) -> (Self, Self);
}
impl<T> Split for &mut [T] {
    fn split_at_len(self, mid: usize) -> (Self, Self) {
        self.split_at_mut(mid)
    }
}
impl<T> Split for &[T] {
    fn split_at_len(self, mid: usize) -> (Self, Self) {
        self.split_at(mid)
    }
}

/// Cuts `s` (of `len` elements) into `parts` contiguous chunks; the rest of the array is empty.
fn cut<S: Split>(mut s: S, len: usize, parts: usize) -> [S; MAX_PARTS] {
    let mut out: [S; MAX_PARTS] = std::array::from_fn(|_| S::default());
    for (p, slot) in out.iter_mut().enumerate().take(parts) {
        let (start, end) = part_range(len, parts, p);
        let (head, tail) = std::mem::take(&mut s).split_at_len(end - start);
        *slot = head;
        s = tail;
    }
    out
}

/// Runs `body` on matching contiguous chunks of equally long buffers, one chunk per thread
/// (one chunk in all when the buffers are small).
macro_rules! chunked {
    ($team:expr, $len:expr, ($($name:ident = $buf:expr),+) $body:block) => {{
        let len = $len;
        let parts = parts_for($team, len);
        $(let mut $name = cut($buf, len, parts);)+
        let mut chunks = [const { None }; MAX_PARTS];
        for (p, slot) in chunks.iter_mut().enumerate().take(parts) {
            *slot = Some(($(std::mem::take(&mut $name[p]),)+));
        }
        $team.for_each_part(&mut chunks[..parts], &|chunk| {
            if let Some(($($name,)+)) = chunk.take() $body
        });
    }};
}

/// `dst = alpha x + beta dst` (`beta == 0`: overwrite without reading).
pub(crate) fn axpby<T: Real>(team: &Team, dst: &mut [T], alpha: T, x: &[T], beta: T) {
    chunked!(team, dst.len(), (d = dst, s = x) {
        if beta == T::ZERO {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d = alpha * s);
        } else {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d = alpha * s + beta * *d);
        }
    });
}

/// `dst *= factor`.
pub(crate) fn scale<T: Real>(team: &Team, dst: &mut [T], factor: T) {
    chunked!(team, dst.len(), (d = dst) {
        d.iter_mut().for_each(|d| *d *= factor);
    });
}

/// `dst = x`.
pub(crate) fn copy<T: Real>(team: &Team, dst: &mut [T], x: &[T]) {
    chunked!(team, dst.len(), (d = dst, s = x) {
        d.copy_from_slice(s);
    });
}

/// Muon's momentum and Nesterov look-ahead, fused; the same roundings as the two `axpby`
/// calls the trait's default makes (`1 * g` is exact).
pub(crate) fn momentum_nesterov<T: Real>(
    team: &Team,
    momentum: &mut [T],
    grad: &[T],
    mu: T,
    nesterov: bool,
    out: &mut [T],
) {
    chunked!(team, grad.len(), (m = momentum, g = grad, o = out) {
        for ((m, &g), o) in m.iter_mut().zip(g).zip(o.iter_mut()) {
            *m = g + mu * *m;
            *o = if nesterov { mu * *m + g } else { *m };
        }
    });
}

/// AdamW's moments and direction, elementwise, as `Backend::adamw_direction` defines them.
pub(crate) fn adamw_direction<T: Real>(
    team: &Team,
    dir: &mut [T],
    grad: &[T],
    m: &mut [T],
    v: &mut [T],
    c: &AdamWCoefficients<T>,
) {
    let one = T::ONE;
    chunked!(team, grad.len(), (d = dir, g = grad, m = m, v = v) {
        for (((d, &g), m), v) in d.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = c.beta1 * *m + (one - c.beta1) * g;
            *v = c.beta2 * *v + (one - c.beta2) * g * g;
            let m_hat = *m / c.bias_correction1;
            let v_hat = *v / c.bias_correction2;
            *d = m_hat / (v_hat.sqrt() + c.eps);
        }
    });
}

/// Sum of squares of one run of elements in `f64`, with 8 independent accumulators so the
/// loop vectorizes; the order is fixed.
fn sum_squares_run<T: Real>(x: &[T]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let v = v.to_f64();
            *a += v * v;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| v.to_f64() * v.to_f64()).sum();
    let pairs = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + tail
}

/// The runs a sum of squares over `len` elements is cut into: a function of the length alone,
/// never of the thread count, so the order of the additions, and the bits of the sum, are the
/// same on one thread or many (threads only decide who sums which run).
fn reduction_parts(len: usize) -> usize {
    (len / (PARALLEL_MIN_ELEMS / 2)).clamp(1, MAX_PARTS)
}

/// The sum of the squares of `x` on the calling thread, in the same runs as [`sum_squares`].
fn sum_squares_serial<T: Real>(x: &[T]) -> f64 {
    let parts = reduction_parts(x.len());
    (0..parts)
        .map(|p| {
            let (start, end) = part_range(x.len(), parts, p);
            sum_squares_run(&x[start..end])
        })
        .sum()
}

/// The sum of the squares of all elements, in `f64`: the same bits whatever the thread count.
pub(crate) fn sum_squares<T: Real>(team: &Team, x: &[T]) -> f64 {
    if x.len() < PARALLEL_MIN_ELEMS || team.threads() == 1 {
        return sum_squares_serial(x);
    }
    let mut partial = [0.0f64; MAX_PARTS];
    let parts = reduction_parts(x.len());
    {
        let mut slots = [const { None }; MAX_PARTS];
        let (mut rest, mut out) = (x, &mut partial[..]);
        for (p, slot) in slots.iter_mut().enumerate().take(parts) {
            let (start, end) = part_range(x.len(), parts, p);
            let (chunk, tail) = rest.split_at(end - start);
            let (o, o_tail) = std::mem::take(&mut out).split_at_mut(1);
            *slot = Some((chunk, o));
            (rest, out) = (tail, o_tail);
        }
        team.for_each_part(&mut slots[..parts], &|s| {
            if let Some((chunk, o)) = s.take() {
                o[0] = sum_squares_run(chunk);
            }
        });
    }
    partial[..parts].iter().sum()
}

/// `x_e /= norm_scale ||x_e||_F + eps` for every item of a stack (`stride` elements each):
/// over the stack when it has several items, over each item's elements otherwise.
pub(crate) fn normalize_frobenius<T: Real>(team: &Team, x: &mut [T], stride: usize, norm_scale: T, eps: T) {
    let factor = |sum: f64| normalizing_factor(sum, norm_scale, eps);
    let items = x.len() / stride.max(1);
    if items >= team.threads() && x.len() >= PARALLEL_MIN_ELEMS && team.threads() > 1 {
        let parts = items.min(MAX_PARTS);
        let mut runs = crate::matmul::split_items(x, stride, items, parts);
        team.for_each_part(&mut runs[..parts], &|run| {
            if let Some((_, data)) = run.take() {
                data.chunks_exact_mut(stride)
                    .for_each(|item| normalize_item(item, norm_scale, eps));
            }
        });
    } else {
        for item in x.chunks_exact_mut(stride.max(1)) {
            let f = factor(sum_squares(team, item));
            scale(team, item, f);
        }
    }
}

/// `1 / (norm_scale sqrt(sum) + eps)`, in `f64`.
fn normalizing_factor<T: Real>(sum: f64, norm_scale: T, eps: T) -> T {
    T::from_f64(1.0 / (norm_scale.to_f64() * sum.sqrt() + eps.to_f64()))
}

/// `x /= norm_scale ||x||_F + eps` for one matrix, on the calling thread.
pub(crate) fn normalize_item<T: Real>(x: &mut [T], norm_scale: T, eps: T) {
    let f = normalizing_factor(sum_squares_serial(x), norm_scale, eps);
    x.iter_mut().for_each(|v| *v *= f);
}
