//! Gradient checks: every layer's backward, and the whole model's, against central finite
//! differences in f64 on `Portable<f64>`; determinism; bad input.
//!
//! Finite differences: the fourth-order central stencil
//! `(8 (L(x+h) - L(x-h)) - (L(x+2h) - L(x-2h))) / 12h` with `h = 1e-4`. Its truncation error
//! is `h^4/30 * L^(5)` ~ 3e-18 * L^(5), negligible even for the large higher derivatives
//! that three layers of random std-0.4 weights produce (with the second-order stencil at
//! h = 1e-5 the truncation error was the largest term: 3.3e-7 relative on a dense-FFN weight,
//! scaling as h^2). Its rounding error is about `eps * |L| / h` = 2.2e-16 * 10 / 1e-4 ~ 2e-11
//! absolute (|L| stays below ~10 here).
//!
//! Tolerance. The relative error `|analytic - fd| / max(|analytic|, |fd|, FLOOR)` with
//! `FLOOR = 1e-3` (a gradient much smaller than the floor is judged on its absolute error,
//! < 1e-10) must stay below `TOL = 1e-7`. Measured: 3e-11..7.5e-9 over every check, every
//! coordinate of the whole model included; a wrong backward (a missing term, a rotation in the
//! wrong direction) is off by O(1e-2..1) relative: dropping the inverse of the key rotation
//! fails four of these tests.
//!
//! Top-k routing is piecewise: a perturbation that changes some token's chosen experts makes
//! the loss jump. Every perturbed forward compares the routing with the unperturbed one; a
//! coordinate whose +-h perturbation changes it is skipped (and counted: the tests assert few
//! are). With h = 1e-4 and scores spread by random weights this has not happened.

use muon_core::{HostMatrix, Portable};

use super::*;
use crate::config::Attention as AttentionKind;
use crate::ops::{AttentionOps, BaseOps, FfnOps, HeadCols, TokenOps};

type B64 = Portable<f64>;

const H: f64 = 1e-4;
const FLOOR: f64 = 1e-3;
const TOL: f64 = 1e-7;

fn rel_err(a: f64, fd: f64) -> f64 {
    (a - fd).abs() / a.abs().max(fd.abs()).max(FLOOR)
}

fn random_matrix(shape: Shape, rng: &mut Rng, std: f64) -> HostMatrix<f64> {
    HostMatrix::from_vec(shape, (0..shape.len()).map(|_| std * rng.normal()).collect()).unwrap()
}

/// Parameters for a gradient check: larger than the training init so that every term of the
/// backward matters (with std 0.02 the attention would be nearly uniform and the MoE gates
/// nearly constant); norm gains near 1.
fn random_params(specs: &[ParamSpec], rng: &mut Rng) -> Vec<HostMatrix<f64>> {
    specs
        .iter()
        .map(|s| match s.role {
            ParamRole::Norm => {
                let data = (0..s.shape.len()).map(|_| 1.0 + 0.2 * rng.normal()).collect();
                HostMatrix::from_vec(s.shape, data).unwrap()
            }
            _ => random_matrix(s.shape, rng, 0.4),
        })
        .collect()
}

fn dot(a: &HostMatrix<f64>, b: &HostMatrix<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.as_slice().iter().zip(b.as_slice()).map(|(x, y)| x * y).sum()
}

/// Result of one gradient check.
#[derive(Debug, Default)]
struct Report {
    checked: usize,
    skipped: usize,
    max_rel: f64,
    worst: String,
}

impl Report {
    fn assert_ok(&self, name: &str) {
        eprintln!(
            "{name}: {} coordinates, max relative error {:.2e} ({}), {} skipped (routing changed)",
            self.checked, self.max_rel, self.worst, self.skipped
        );
        assert!(self.checked > 0, "{name}: nothing checked");
        assert!(
            self.max_rel < TOL,
            "{name}: max relative error {:.3e} at {}",
            self.max_rel,
            self.worst
        );
        assert!(
            self.skipped * 10 <= self.checked,
            "{name}: {} of {} coordinates changed the routing",
            self.skipped,
            self.checked
        );
    }
}

/// Checks `analytic[t]` against central differences of `loss` in every coordinate of
/// `tensors[t]` (or `samples` random ones when larger). `loss` returns the value and a routing
/// fingerprint that must not change under the perturbation.
/// A loss evaluation: the value and a routing fingerprint.
type LossFn<'a, S> = dyn FnMut(&mut S, &[HostMatrix<f64>]) -> (f64, Vec<u32>) + 'a;

fn grad_check<S>(
    state: &mut S,
    tensors: &mut [HostMatrix<f64>],
    names: &[String],
    analytic: &[HostMatrix<f64>],
    samples: usize,
    rng: &mut Rng,
    loss: &mut LossFn<'_, S>,
) -> Report {
    let (_, routing) = loss(state, tensors);
    let mut rep = Report::default();
    for ti in 0..tensors.len() {
        let len = tensors[ti].shape().len();
        let coords: Vec<usize> = if len <= samples {
            (0..len).collect()
        } else {
            (0..samples)
                .map(|_| (rng.next_u64() % len as u64) as usize)
                .collect()
        };
        for j in coords {
            let orig = tensors[ti].as_slice()[j];
            let mut at = |delta: f64| {
                tensors[ti].as_mut_slice()[j] = orig + delta;
                loss(state, tensors)
            };
            let ((l1p, r1p), (l1m, r1m)) = (at(H), at(-H));
            let ((l2p, r2p), (l2m, r2m)) = (at(2.0 * H), at(-2.0 * H));
            tensors[ti].as_mut_slice()[j] = orig;
            rep.checked += 1;
            if [r1p, r1m, r2p, r2m].iter().any(|r| *r != routing) {
                rep.skipped += 1;
                continue;
            }
            // The fourth-order central difference.
            let fd = (8.0 * (l1p - l1m) - (l2p - l2m)) / (12.0 * H);
            let a = analytic[ti].as_slice()[j];
            let e = rel_err(a, fd);
            if e > rep.max_rel {
                rep.max_rel = e;
                rep.worst = format!("{}[{j}]: analytic {a:.6e}, fd {fd:.6e}", names[ti]);
            }
        }
    }
    rep
}

fn zeros_like(ms: &[HostMatrix<f64>]) -> Vec<HostMatrix<f64>> {
    ms.iter().map(|m| HostMatrix::zeros(m.shape())).collect()
}

fn names(specs: &[ParamSpec], extra: &[&str]) -> Vec<String> {
    specs
        .iter()
        .map(|s| s.name.clone())
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
}

// ----- ops -----

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let b = B64::new();
    let mut rng = Rng::new(1);
    let (n, w) = (5, 7);
    let mut ts = vec![
        random_matrix(Shape::matrix(n, w), &mut rng, 1.0),
        random_matrix(Shape::vector(w), &mut rng, 1.0),
    ];
    let r = random_matrix(Shape::matrix(n, w), &mut rng, 1.0);
    let (mut out, mut rstd) = (
        HostMatrix::zeros(Shape::matrix(n, w)),
        HostMatrix::zeros(Shape::vector(n)),
    );
    b.rmsnorm_forward(&mut out, &mut rstd, &ts[0], &ts[1], 1e-5)
        .unwrap();
    let mut g = zeros_like(&ts);
    let (gx, gg) = g.split_at_mut(1);
    b.rmsnorm_backward(&mut gx[0], &mut gg[0], &r, &ts[0], &ts[1], &rstd)
        .unwrap();
    let mut loss = |_: &mut (), ts: &[HostMatrix<f64>]| {
        b.rmsnorm_forward(&mut out, &mut rstd, &ts[0], &ts[1], 1e-5)
            .unwrap();
        (dot(&out, &r), vec![])
    };
    let names = ["x".to_string(), "gain".to_string()];
    grad_check(&mut (), &mut ts, &names, &g, 1000, &mut rng, &mut loss).assert_ok("rmsnorm");
}

#[test]
fn rope_backward_matches_finite_differences_and_inverts() {
    let b = B64::new();
    let mut rng = Rng::new(2);
    // 3 sequences of 6 positions in token rows 16 wide: 2 heads, each rotating 6 columns from
    // column 1 + 8h.
    let (seqs, t, width, rd, heads) = (3, 6, 16, 6, 2);
    let cols = HeadCols::new(1, 8, rd);
    let mut table = HostMatrix::zeros(Shape::matrix(t, rd));
    b.rope_table(&mut table, 10_000.0).unwrap();
    let mut ts = vec![random_matrix(Shape::matrix(seqs * t, width), &mut rng, 1.0)];
    let r = random_matrix(Shape::matrix(seqs * t, width), &mut rng, 1.0);
    // L = <rope(x), r>: dL/dx = rope^{-1}(r).
    let mut g = vec![r.clone()];
    b.rope(&mut g[0], t, heads, cols, &table, true).unwrap();
    let mut loss = |_: &mut (), ts: &[HostMatrix<f64>]| {
        let mut y = ts[0].clone();
        b.rope(&mut y, t, heads, cols, &table, false).unwrap();
        (dot(&y, &r), vec![])
    };
    grad_check(
        &mut (),
        &mut ts,
        &["x".to_string()],
        &g,
        1000,
        &mut rng,
        &mut loss,
    )
    .assert_ok("rope");
    // Position 0 of every sequence is the identity, the columns outside the heads' rotary
    // blocks are untouched, a rotation keeps each pair's length, and the inverse undoes it.
    let mut y = ts[0].clone();
    b.rope(&mut y, t, heads, cols, &table, false).unwrap();
    let (x, ys) = (ts[0].as_slice(), y.as_slice());
    let rotated = |c: usize| (0..heads).any(|h| (cols.start(h)..cols.start(h) + rd).contains(&c));
    for row in 0..seqs * t {
        let (xr, yr) = (&x[row * width..][..width], &ys[row * width..][..width]);
        for c in 0..width {
            if row % t == 0 || !rotated(c) {
                assert_eq!(xr[c], yr[c], "row {row} column {c}");
            }
        }
        for h in 0..heads {
            for i in 0..rd / 2 {
                let (lo, hi) = (cols.start(h) + i, cols.start(h) + rd / 2 + i);
                let len = |v: &[f64]| v[lo].hypot(v[hi]);
                assert!((len(xr) - len(yr)).abs() < 1e-14, "row {row} head {h} pair {i}");
            }
        }
    }
    b.rope(&mut y, t, heads, cols, &table, true).unwrap();
    let err = y
        .as_slice()
        .iter()
        .zip(x)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-14, "rope inverse error {err}");
    // One block every head shares needs a single head; blocks past the row are errors.
    assert!(b
        .rope(&mut y, t, 2, HeadCols::new(1, 0, rd), &table, false)
        .is_err());
    assert!(b.rope(&mut y, t, 3, cols, &table, false).is_err());
    assert!(b.rope(&mut y, t + 1, heads, cols, &table, false).is_err());
}

#[test]
fn causal_softmax_and_swiglu_backward_match_finite_differences() {
    let b = B64::new();
    let mut rng = Rng::new(3);
    let (m, t) = (2, 5);
    let mut ts = vec![random_matrix(Shape::batched(m, t, t), &mut rng, 1.0)];
    let r = random_matrix(Shape::batched(m, t, t), &mut rng, 1.0);
    let mut p = ts[0].clone();
    b.causal_softmax_forward(&mut p).unwrap();
    for (i, row) in p.as_slice().chunks(t).enumerate() {
        let i = i % t;
        assert!(row[i + 1..].iter().all(|&v| v == 0.0), "causal mask");
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-14);
    }
    let mut g = vec![r.clone()];
    b.causal_softmax_backward(&mut g[0], &p).unwrap();
    let mut loss = |_: &mut (), ts: &[HostMatrix<f64>]| {
        let mut p = ts[0].clone();
        b.causal_softmax_forward(&mut p).unwrap();
        (dot(&p, &r), vec![])
    };
    // The masked scores (j > i) get zero gradient, which the differences confirm.
    grad_check(
        &mut (),
        &mut ts,
        &["scores".to_string()],
        &g,
        1000,
        &mut rng,
        &mut loss,
    )
    .assert_ok("softmax");

    let shape = Shape::matrix(4, 6);
    let mut ts = vec![
        random_matrix(shape, &mut rng, 2.0),
        random_matrix(shape, &mut rng, 1.0),
    ];
    let r = random_matrix(shape, &mut rng, 1.0);
    let mut g = zeros_like(&ts);
    let (g0, g1) = g.split_at_mut(1);
    b.swiglu_backward(&mut g0[0], &mut g1[0], &r, &ts[0], &ts[1])
        .unwrap();
    let mut out = HostMatrix::zeros(shape);
    let mut loss = |_: &mut (), ts: &[HostMatrix<f64>]| {
        b.swiglu_forward(&mut out, &ts[0], &ts[1]).unwrap();
        (dot(&out, &r), vec![])
    };
    let names = ["gate".to_string(), "up".to_string()];
    grad_check(&mut (), &mut ts, &names, &g, 1000, &mut rng, &mut loss).assert_ok("swiglu");
}

#[test]
fn embedding_and_cross_entropy_backward_match_finite_differences() {
    let b = B64::new();
    let mut rng = Rng::new(4);
    let (v, c) = (7, 3);
    let tokens: Vec<u32> = vec![1, 4, 1, 6, 0, 1]; // repeats: the backward must accumulate
    let n = tokens.len();
    let mut ts = vec![random_matrix(Shape::matrix(v, c), &mut rng, 1.0)];
    let r = random_matrix(Shape::matrix(n, c), &mut rng, 1.0);
    let mut g = zeros_like(&ts);
    b.embedding_backward(&mut g[0], &r, &tokens).unwrap();
    let mut out = HostMatrix::zeros(Shape::matrix(n, c));
    let mut loss = |_: &mut (), ts: &[HostMatrix<f64>]| {
        b.embedding_forward(&mut out, &ts[0], &tokens).unwrap();
        (dot(&out, &r), vec![])
    };
    grad_check(
        &mut (),
        &mut ts,
        &["table".to_string()],
        &g,
        1000,
        &mut rng,
        &mut loss,
    )
    .assert_ok("embedding");

    let targets: Vec<u32> = vec![2, 0, 6, 6, 3, 1];
    let mut ts = vec![random_matrix(Shape::matrix(n, v), &mut rng, 2.0)];
    let (mut probs, mut l) = (
        HostMatrix::zeros(Shape::matrix(n, v)),
        HostMatrix::zeros(Shape::matrix(1, 1)),
    );
    b.cross_entropy_forward(&mut probs, &mut l, &ts[0], &targets)
        .unwrap();
    // Against a direct evaluation of -mean log softmax.
    let direct: f64 = ts[0]
        .as_slice()
        .chunks(v)
        .zip(&targets)
        .map(|(row, &tg)| row.iter().map(|x| x.exp()).sum::<f64>().ln() - row[tg as usize])
        .sum::<f64>()
        / n as f64;
    assert!((l.as_slice()[0] - direct).abs() < 1e-12);
    let mut g = zeros_like(&ts);
    b.cross_entropy_backward(&mut g[0], &probs, &targets, 1.0 / n as f64)
        .unwrap();
    let mut loss = |_: &mut (), ts: &[HostMatrix<f64>]| {
        b.cross_entropy_forward(&mut probs, &mut l, &ts[0], &targets)
            .unwrap();
        (l.as_slice()[0], vec![])
    };
    grad_check(
        &mut (),
        &mut ts,
        &["logits".to_string()],
        &g,
        1000,
        &mut rng,
        &mut loss,
    )
    .assert_ok("cross-entropy");
}

#[test]
fn router_gates_backward_matches_finite_differences() {
    // L = <gates, r> as a function of the router logits, the selection held fixed.
    let b = B64::new();
    let mut rng = Rng::new(5);
    let (n, e, k, scaling) = (6, 5, 2, 2.446);
    let mut ts = vec![random_matrix(Shape::matrix(n, e), &mut rng, 1.5)];
    let bias = random_matrix(Shape::vector(e), &mut rng, 0.3);
    let r = random_matrix(Shape::matrix(n, k), &mut rng, 1.0);
    let mut scores = HostMatrix::zeros(Shape::matrix(n, e));
    let mut gates = HostMatrix::zeros(Shape::matrix(n, k));
    let mut experts = vec![0u32; n * k];
    b.router_forward(&mut scores, &mut gates, &mut experts, &ts[0], &bias, scaling)
        .unwrap();
    // Selection: the top-k of s + bias, in descending order; gates sum to the scaling.
    for i in 0..n {
        let s = &scores.as_slice()[i * e..(i + 1) * e];
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &c| {
            (s[c] + bias.as_slice()[c])
                .partial_cmp(&(s[a] + bias.as_slice()[a]))
                .unwrap()
        });
        let chosen: Vec<usize> = experts[i * k..(i + 1) * k].iter().map(|&x| x as usize).collect();
        assert_eq!(chosen, order[..k].to_vec());
        let sum: f64 = gates.as_slice()[i * k..(i + 1) * k].iter().sum();
        assert!((sum - scaling).abs() < 1e-12);
    }
    let mut g = zeros_like(&ts);
    b.router_backward(&mut g[0], &r, &scores, &experts, scaling)
        .unwrap();
    let mut loss = |_: &mut (), ts: &[HostMatrix<f64>]| {
        let mut ex = vec![0u32; n * k];
        b.router_forward(&mut scores, &mut gates, &mut ex, &ts[0], &bias, scaling)
            .unwrap();
        (dot(&gates, &r), ex)
    };
    grad_check(
        &mut (),
        &mut ts,
        &["logits".to_string()],
        &g,
        1000,
        &mut rng,
        &mut loss,
    )
    .assert_ok("router gates");
}

#[test]
fn sequence_balance_loss_matches_a_direct_evaluation_and_finite_differences() {
    // DeepSeek-V3's seq_aux loss as a function of the router logits, the selection held fixed:
    // its value against a direct evaluation of the formula, its gradient against central
    // differences.
    let b = B64::new();
    let mut rng = Rng::new(6);
    let (batch, seq, e, k, alpha) = (3, 4, 5, 2, 0.3);
    let n = batch * seq;
    let mut ts = vec![random_matrix(Shape::matrix(n, e), &mut rng, 1.5)];
    let experts: Vec<u32> = (0..n)
        .flat_map(|t| {
            let first = (rng.next_u64() % e as u64) as u32;
            [first, (first + 1 + (t as u32 % (e as u32 - 1))) % e as u32]
        })
        .collect();
    let sigmoid = |m: &HostMatrix<f64>| {
        let mut s = m.clone();
        s.as_mut_slice()
            .iter_mut()
            .for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()));
        s
    };
    let (mut loss, mut frac) = (
        HostMatrix::zeros(Shape::matrix(1, 1)),
        HostMatrix::zeros(Shape::matrix(batch, e)),
    );
    let mut dlogits = HostMatrix::zeros(Shape::matrix(n, e));
    b.router_seq_aux(
        &mut loss,
        &mut frac,
        &mut dlogits,
        &sigmoid(&ts[0]),
        &experts,
        seq,
        alpha,
    )
    .unwrap();
    // Direct: f[b,i] = E/(K T) count, P[b,i] = mean_t s[t,i] / sum_j s[t,j].
    let s = sigmoid(&ts[0]);
    let mut want = 0.0;
    for bi in 0..batch {
        for i in 0..e {
            let count = (bi * seq * k..(bi + 1) * seq * k)
                .filter(|&x| experts[x] as usize == i)
                .count();
            let f = e as f64 / (k * seq) as f64 * count as f64;
            assert!((frac.as_slice()[bi * e + i] - f).abs() < 1e-15);
            let p: f64 = (bi * seq..(bi + 1) * seq)
                .map(|t| {
                    let row = &s.as_slice()[t * e..(t + 1) * e];
                    row[i] / row.iter().sum::<f64>()
                })
                .sum::<f64>()
                / seq as f64;
            want += f * p;
        }
    }
    want *= alpha / batch as f64;
    assert!(
        (loss.as_slice()[0] - want).abs() < 1e-14,
        "{} vs {want}",
        loss.as_slice()[0]
    );
    let mut objective = |_: &mut (), ts: &[HostMatrix<f64>]| {
        let mut l = HostMatrix::zeros(Shape::matrix(1, 1));
        let mut d = HostMatrix::zeros(Shape::matrix(n, e));
        b.router_seq_aux(&mut l, &mut frac, &mut d, &sigmoid(&ts[0]), &experts, seq, alpha)
            .unwrap();
        (l.as_slice()[0], Vec::new())
    };
    grad_check(
        &mut (),
        &mut ts,
        &["logits".to_string()],
        &[dlogits],
        1000,
        &mut rng,
        &mut objective,
    )
    .assert_ok("sequence balance loss");
}

#[test]
fn grouped_gemm_matches_per_expert_dense_products() {
    let b = B64::new();
    let mut rng = Rng::new(6);
    // Expert 1 gets no rows.
    let offsets: Vec<u32> = vec![0, 3, 3, 7];
    let (r, kk, nn) = (7, 4, 5);
    let a = random_matrix(Shape::matrix(r, kk), &mut rng, 1.0);
    let w = random_matrix(Shape::batched(3, nn, kk), &mut rng, 1.0);
    let mut dst = random_matrix(Shape::matrix(r, nn), &mut rng, 1.0);
    let before = dst.clone();
    b.grouped_gemm(&mut dst, 2.0, &a, &w, Transpose::Yes, &offsets, 0.5)
        .unwrap();
    for e in 0..3 {
        for row in offsets[e] as usize..offsets[e + 1] as usize {
            for j in 0..nn {
                let dotp: f64 = (0..kk)
                    .map(|p| a.as_slice()[row * kk + p] * w.item(e)[j * kk + p])
                    .sum();
                let want = 2.0 * dotp + 0.5 * before.as_slice()[row * nn + j];
                assert!((dst.as_slice()[row * nn + j] - want).abs() < 1e-12);
            }
        }
    }
    // The weight gradient: dw_e = x_e^T y_e, zero for the empty expert.
    let y = random_matrix(Shape::matrix(r, nn), &mut rng, 1.0);
    let mut dw = random_matrix(Shape::batched(3, kk, nn), &mut rng, 1.0);
    b.grouped_gemm_weight_grad(&mut dw, 1.0, &a, &y, &offsets, 0.0)
        .unwrap();
    for e in 0..3 {
        for p in 0..kk {
            for q in 0..nn {
                let want: f64 = (offsets[e] as usize..offsets[e + 1] as usize)
                    .map(|row| a.as_slice()[row * kk + p] * y.as_slice()[row * nn + q])
                    .sum();
                assert!((dw.item(e)[p * nn + q] - want).abs() < 1e-12);
            }
        }
    }
}

// ----- layers -----

fn layer_config(attention: AttentionKind) -> ModelConfig {
    ModelConfig {
        vocab_size: 11,
        dim: 8,
        n_layers: 3,
        n_heads: 2,
        head_dim: 4,
        attention,
        dense_layers: 1,
        dense_ffn_width: 12,
        n_routed_experts: 4,
        n_shared_experts: 1,
        expert_width: 6,
        top_k: 2,
        routed_scaling: 2.446,
        bias_update_rate: 1e-3,
        aux_loss_alpha: 0.0,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        kv_norm_eps: 1e-5,
        max_seq_len: 16,
    }
}

fn mla() -> AttentionKind {
    AttentionKind::Mla {
        kv_lora_rank: 4,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 2,
        v_head_dim: 3,
    }
}

fn attention_case(kind: AttentionKind, label: &str) {
    let b = B64::new();
    let cfg = layer_config(kind);
    let (batch, seq) = (2, 5);
    let n = batch * seq;
    let mut specs = Vec::new();
    let mut attn = Attention::new(&b, &mut specs, "attn", &cfg, batch, seq).unwrap();
    let mut rng = Rng::new(7);
    let mut ts = random_params(&specs, &mut rng);
    ts.push(random_matrix(Shape::matrix(n, cfg.dim), &mut rng, 1.0));
    let r = random_matrix(Shape::matrix(n, cfg.dim), &mut rng, 1.0);
    let mut out = HostMatrix::zeros(Shape::matrix(n, cfg.dim));
    let np = specs.len();
    attention::attention_forward(&b, &ts[..np], &mut attn, &ts[np], &mut out).unwrap();
    let mut g = zeros_like(&ts);
    let (gp, gx) = g.split_at_mut(np);
    attention::attention_backward(&b, &ts[..np], gp, &mut attn, &ts[np], &r, &mut gx[0]).unwrap();
    let mut loss = |a: &mut Attention<B64>, ts: &[HostMatrix<f64>]| {
        attention::attention_forward(&b, &ts[..np], a, &ts[np], &mut out).unwrap();
        (dot(&out, &r), vec![])
    };
    let names = names(&specs, &["x"]);
    grad_check(&mut attn, &mut ts, &names, &g, 40, &mut rng, &mut loss).assert_ok(label);
}

#[test]
fn mha_backward_matches_finite_differences() {
    attention_case(AttentionKind::Mha, "attention (MHA)");
}

#[test]
fn mla_backward_matches_finite_differences() {
    attention_case(mla(), "attention (MLA)");
}

#[test]
fn mha_is_causal() {
    // Changing the last token of a sequence changes no earlier output.
    let b = B64::new();
    let cfg = layer_config(AttentionKind::Mha);
    let mut specs = Vec::new();
    let mut attn = Attention::new(&b, &mut specs, "attn", &cfg, 1, 4).unwrap();
    let mut rng = Rng::new(8);
    let p = random_params(&specs, &mut rng);
    let mut x = random_matrix(Shape::matrix(4, cfg.dim), &mut rng, 1.0);
    let mut out1 = HostMatrix::zeros(Shape::matrix(4, cfg.dim));
    let mut out2 = out1.clone();
    attention::attention_forward(&b, &p, &mut attn, &x, &mut out1).unwrap();
    x.as_mut_slice()[3 * cfg.dim] += 1.0;
    attention::attention_forward(&b, &p, &mut attn, &x, &mut out2).unwrap();
    let c = cfg.dim;
    assert_eq!(&out1.as_slice()[..3 * c], &out2.as_slice()[..3 * c]);
    assert_ne!(&out1.as_slice()[3 * c..], &out2.as_slice()[3 * c..]);
}

#[test]
fn swiglu_layer_backward_matches_finite_differences() {
    let b = B64::new();
    let (n, c, f) = (6, 5, 7);
    let mut specs = Vec::new();
    let mut layer = SwiGlu::new(&b, &mut specs, "ffn", c, f, n).unwrap();
    let mut rng = Rng::new(9);
    let mut ts = random_params(&specs, &mut rng);
    ts.push(random_matrix(Shape::matrix(n, c), &mut rng, 1.0));
    let r = random_matrix(Shape::matrix(n, c), &mut rng, 1.0);
    let mut out = HostMatrix::zeros(Shape::matrix(n, c));
    let np = specs.len();
    ffn::swiglu_forward(&b, &ts[..np], &mut layer, &ts[np], &mut out).unwrap();
    let mut g = zeros_like(&ts);
    let (gp, gx) = g.split_at_mut(np);
    ffn::swiglu_backward(&b, &ts[..np], gp, &mut layer, &ts[np], &r, &mut gx[0]).unwrap();
    let mut loss = |l: &mut SwiGlu<B64>, ts: &[HostMatrix<f64>]| {
        ffn::swiglu_forward(&b, &ts[..np], l, &ts[np], &mut out).unwrap();
        (dot(&out, &r), vec![])
    };
    let names = names(&specs, &["x"]);
    grad_check(&mut layer, &mut ts, &names, &g, 1000, &mut rng, &mut loss).assert_ok("swiglu layer");
}

fn moe_case(n_shared: usize, aux_loss_alpha: f64, label: &str) {
    let b = B64::new();
    let cfg = ModelConfig {
        n_shared_experts: n_shared,
        aux_loss_alpha,
        ..layer_config(mla())
    };
    let (batch, seq) = (3, 3);
    let n = batch * seq;
    let mut specs = Vec::new();
    let mut moe = Moe::new(&b, &mut specs, "moe", &cfg, batch, seq).unwrap();
    let mut rng = Rng::new(10);
    moe.bias = random_matrix(Shape::vector(cfg.n_routed_experts), &mut rng, 0.1);
    let mut ts = random_params(&specs, &mut rng);
    ts.push(random_matrix(Shape::matrix(n, cfg.dim), &mut rng, 1.0));
    let r = random_matrix(Shape::matrix(n, cfg.dim), &mut rng, 1.0);
    let mut out = HostMatrix::zeros(Shape::matrix(n, cfg.dim));
    let np = specs.len();
    ffn::moe_forward(&b, &ts[..np], &mut moe, &ts[np], &mut out).unwrap();
    let counts = moe.counts.clone();
    assert_eq!(counts.iter().sum::<u32>() as usize, n * cfg.top_k);
    let mut g = zeros_like(&ts);
    let (gp, gx) = g.split_at_mut(np);
    ffn::moe_backward(&b, &ts[..np], gp, &mut moe, &ts[np], &r, &mut gx[0]).unwrap();
    // The objective: <out, r> plus the balance loss (0 when it is off).
    let mut loss = |m: &mut Moe<B64>, ts: &[HostMatrix<f64>]| {
        ffn::moe_forward(&b, &ts[..np], m, &ts[np], &mut out).unwrap();
        let aux = if aux_loss_alpha > 0.0 {
            m.aux_loss.as_slice()[0]
        } else {
            0.0
        };
        (dot(&out, &r) + aux, m.experts.clone())
    };
    let names = names(&specs, &["x"]);
    grad_check(&mut moe, &mut ts, &names, &g, 60, &mut rng, &mut loss).assert_ok(label);
    // The router weight gets a gradient (through the gates), and so does every expert used.
    assert!(
        g[0].as_slice().iter().any(|&v| v != 0.0),
        "router gradient is zero"
    );
}

#[test]
fn moe_layer_backward_matches_finite_differences() {
    moe_case(1, 0.0, "MoE layer");
}

#[test]
fn moe_layer_with_the_balance_loss_backward_matches_finite_differences() {
    // alpha = 0.5, far above Moonlight's 0.001, so its gradient is not lost in the rest.
    moe_case(1, 0.5, "MoE layer with seq_aux");
}

#[test]
fn moe_layer_without_shared_experts_backward_matches_finite_differences() {
    moe_case(0, 0.0, "MoE layer, no shared expert");
}

#[test]
fn moe_forward_equals_a_direct_per_token_evaluation() {
    // out[n] = shared(x[n]) + sum_k gates[n,k] expert_{e_k}(x[n]), evaluated token by token.
    let b = B64::new();
    let cfg = layer_config(mla());
    let (n, c, f) = (5, cfg.dim, cfg.expert_width);
    let mut specs = Vec::new();
    let mut moe = Moe::new(&b, &mut specs, "moe", &cfg, 1, n).unwrap();
    let mut rng = Rng::new(11);
    let p = random_params(&specs, &mut rng);
    let x = random_matrix(Shape::matrix(n, c), &mut rng, 1.0);
    let mut out = HostMatrix::zeros(Shape::matrix(n, c));
    ffn::moe_forward(&b, &p, &mut moe, &x, &mut out).unwrap();
    let silu = |v: f64| v / (1.0 + (-v).exp());
    // y = W_down (silu(W_gate x) * W_up x) for one token, weights [F, C], [F, C], [C, F].
    let ffn1 = |wg: &[f64], wu: &[f64], wd: &[f64], width: usize, xr: &[f64]| -> Vec<f64> {
        let a: Vec<f64> = (0..width)
            .map(|i| {
                let g: f64 = (0..c).map(|j| wg[i * c + j] * xr[j]).sum();
                let u: f64 = (0..c).map(|j| wu[i * c + j] * xr[j]).sum();
                silu(g) * u
            })
            .collect();
        (0..c)
            .map(|o| (0..width).map(|i| wd[o * width + i] * a[i]).sum())
            .collect()
    };
    let sf = cfg.n_shared_experts * f;
    for t in 0..n {
        let xr = &x.as_slice()[t * c..(t + 1) * c];
        let s: Vec<f64> = (0..cfg.n_routed_experts)
            .map(|e| {
                let u: f64 = (0..c).map(|j| p[0].as_slice()[e * c + j] * xr[j]).sum();
                1.0 / (1.0 + (-u).exp())
            })
            .collect();
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&a, &bb| s[bb].partial_cmp(&s[a]).unwrap());
        let chosen = &order[..cfg.top_k];
        let sum: f64 = chosen.iter().map(|&e| s[e]).sum();
        let mut want = ffn1(p[4].as_slice(), p[5].as_slice(), p[6].as_slice(), sf, xr);
        for &e in chosen {
            let gate = cfg.routed_scaling * s[e] / sum;
            let y = ffn1(p[1].item(e), p[2].item(e), p[3].item(e), f, xr);
            want.iter_mut().zip(y).for_each(|(w, y)| *w += gate * y);
        }
        for (j, w) in want.iter().enumerate() {
            let got = out.as_slice()[t * c + j];
            assert!((got - w).abs() < 1e-12, "token {t} col {j}: {got} vs {w}");
        }
    }
}

// ----- the whole model -----

fn set_params(b: &B64, model: &mut Model<B64>, rng: &mut Rng) {
    let specs = model.param_specs();
    let values = random_params(&specs, rng);
    for (m, v) in model.params_mut().iter_mut().zip(values) {
        b.upload(m, v.as_slice()).unwrap();
    }
    let bufs: Vec<_> = model
        .buffers(b)
        .unwrap()
        .into_iter()
        .map(|t| Tensor {
            data: (0..t.shape.len()).map(|_| 0.05 * rng.normal()).collect(),
            ..t
        })
        .collect();
    model.load_buffers(b, &bufs).unwrap();
}

fn routing(model: &Model<B64>) -> Vec<u32> {
    let mut out = Vec::new();
    for blk in &model.blocks {
        if let Ffn::Moe(m) = &blk.ffn {
            out.extend_from_slice(&m.experts);
        }
    }
    out
}

fn model_case(kind: AttentionKind, aux_loss_alpha: f64, samples: usize, label: &str) {
    let b = B64::new();
    let cfg = ModelConfig {
        aux_loss_alpha,
        ..layer_config(kind)
    };
    let (batch, seq) = (2, 5);
    let mut model = Model::new(&b, cfg.clone(), batch, seq, 1).unwrap();
    let mut rng = Rng::new(12);
    set_params(&b, &mut model, &mut rng);
    let n = batch * seq;
    let tokens: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    let targets: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    model.forward(&b, &tokens, &targets).unwrap();
    model.backward(&b).unwrap();
    let analytic: Vec<HostMatrix<f64>> = model.grads().to_vec();
    let names: Vec<String> = model.param_specs().iter().map(|s| s.name.clone()).collect();
    let mut ts: Vec<HostMatrix<f64>> = model.params().to_vec();
    let mut loss = |m: &mut Model<B64>, ts: &[HostMatrix<f64>]| {
        for (p, t) in m.params_mut().iter_mut().zip(ts) {
            p.as_mut_slice().copy_from_slice(t.as_slice());
        }
        let l = m.forward(&b, &tokens, &targets).unwrap();
        (l + m.aux_loss(), routing(m))
    };
    let rep = grad_check(
        &mut model, &mut ts, &names, &analytic, samples, &mut rng, &mut loss,
    );
    assert!(names.len() * 3 <= rep.checked, "every tensor sampled");
    rep.assert_ok(label);
    assert!(
        analytic.iter().all(|g| g.as_slice().iter().any(|&v| v != 0.0)),
        "a zero gradient tensor"
    );
}

#[test]
fn model_gradient_matches_finite_differences_mla() {
    // Every coordinate of all 30 tensors (2,780; about a second).
    model_case(mla(), 0.0, usize::MAX, "model (MLA)");
}

#[test]
fn model_gradient_matches_finite_differences_mha() {
    model_case(AttentionKind::Mha, 0.0, usize::MAX, "model (MHA)");
}

#[test]
fn model_gradient_with_the_balance_loss_matches_finite_differences() {
    model_case(mla(), 0.3, usize::MAX, "model (MLA) with seq_aux");
}

// ----- API behaviour -----

#[test]
fn param_specs_match_param_counts_and_roles() {
    let b = Portable::<f32>::new();
    for kind in [mla(), AttentionKind::Mha] {
        let cfg = layer_config(kind);
        let model = Model::new(&b, cfg.clone(), 1, 4, 0).unwrap();
        let specs = model.param_specs();
        let total: usize = specs.iter().map(|s| s.shape.len()).sum();
        assert_eq!(total as u64, cfg.param_counts().total);
        assert_eq!(specs.len(), model.params().len());
        for (s, p) in specs.iter().zip(model.params()) {
            assert_eq!(s.shape, p.shape(), "{}", s.name);
        }
        let find = |name: &str| {
            specs
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("{name}"))
        };
        assert_eq!(find("embed").role, ParamRole::Embedding);
        assert_eq!(find("lm_head").role, ParamRole::LmHead);
        assert_eq!(find("final_norm").role, ParamRole::Norm);
        assert_eq!(find("layers.1.moe.router").role, ParamRole::Hidden);
        assert_eq!(find("layers.2.moe.experts.w_up").shape, Shape::batched(4, 6, 8));
        assert_eq!(find("layers.0.ffn.w_down").shape, Shape::matrix(8, 12));
    }
    let tiny = ModelConfig::tiny();
    let model = Model::new(&b, tiny.clone(), 1, 8, 0).unwrap();
    let total: usize = model.param_specs().iter().map(|s| s.shape.len()).sum();
    assert_eq!(total as u64, tiny.param_counts().total);
}

#[test]
fn initialization_is_deterministic_given_the_seed() {
    let b = Portable::<f32>::new();
    let cfg = ModelConfig::tiny();
    let m1 = Model::new(&b, cfg.clone(), 1, 8, 42).unwrap();
    let m2 = Model::new(&b, cfg.clone(), 1, 8, 42).unwrap();
    let m3 = Model::new(&b, cfg, 1, 8, 43).unwrap();
    assert!(m1.params() == m2.params());
    assert!(m1.params() != m3.params());
    // normal(0, 0.02) for matrices, ones for gains.
    let e = m1.params()[0].as_slice();
    let std = (e.iter().map(|v| (v * v) as f64).sum::<f64>() / e.len() as f64).sqrt();
    assert!((std - INIT_STD).abs() < 0.002, "embedding std {std}");
    assert!(m1.params()[1].as_slice().iter().all(|&v| v == 1.0));
}

#[test]
fn forward_backward_twice_gives_identical_results() {
    let b = Portable::<f32>::new();
    let cfg = ModelConfig::tiny();
    let (batch, seq) = (2, 32);
    let mut model = Model::new(&b, cfg, batch, seq, 5).unwrap();
    let tokens: Vec<u32> = (0..batch * seq).map(|i| ((i * 37 + 11) % 256) as u32).collect();
    let targets: Vec<u32> = (0..batch * seq).map(|i| ((i * 53 + 7) % 256) as u32).collect();
    let l1 = model.forward(&b, &tokens, &targets).unwrap();
    model.backward(&b).unwrap();
    let g1 = model.grads().to_vec();
    let load1 = model.expert_load().to_vec();
    let l2 = model.forward(&b, &tokens, &targets).unwrap();
    model.backward(&b).unwrap();
    assert_eq!(l1.to_bits(), l2.to_bits());
    assert!(g1 == model.grads(), "gradients differ between identical passes");
    assert_eq!(load1, model.expert_load());
    // Near ln(256) at initialization.
    assert!((l1 - 256f64.ln()).abs() < 0.1, "initial loss {l1}");
    for load in &load1 {
        assert_eq!(load.iter().sum::<u32>() as usize, batch * seq * 2);
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let b = Portable::<f32>::new();
    let cfg = ModelConfig::tiny();
    assert!(matches!(
        Model::new(&b, cfg.clone(), 1, cfg.max_seq_len + 1, 0),
        Err(ModelError::Config(_))
    ));
    assert!(matches!(
        Model::new(
            &b,
            ModelConfig {
                top_k: 9,
                ..cfg.clone()
            },
            1,
            8,
            0
        ),
        Err(ModelError::Config(_))
    ));
    let mut model = Model::new(&b, cfg, 2, 4, 0).unwrap();
    assert!(matches!(model.backward(&b), Err(ModelError::Input(_))));
    let ok = vec![1u32; 8];
    let err = model.forward(&b, &ok[..7], &ok).unwrap_err();
    assert!(err.to_string().contains("expected batch 2 x seq 4"), "{err}");
    let mut bad = ok.clone();
    bad[3] = 256;
    let err = model.forward(&b, &bad, &ok).unwrap_err();
    assert!(err.to_string().contains("tokens[3] = 256"), "{err}");
    assert!(model.forward(&b, &ok, &bad).is_err());
    model.forward(&b, &ok, &ok).unwrap();
    model.backward(&b).unwrap();
}

#[test]
fn router_bias_moves_toward_balance_and_round_trips() {
    let b = Portable::<f32>::new();
    let cfg = ModelConfig::tiny();
    let mut model = Model::new(&b, cfg.clone(), 2, 16, 3).unwrap();
    let tokens: Vec<u32> = (0..32).map(|i| (i * 7 % 256) as u32).collect();
    model.forward(&b, &tokens, &tokens).unwrap();
    let loads = model.expert_load().to_vec();
    assert_eq!(loads.len(), cfg.moe_layers());
    model.update_router_bias(&b).unwrap();
    let bufs = model.buffers(&b).unwrap();
    assert_eq!(bufs.len(), cfg.moe_layers());
    for (
        Tensor {
            name,
            shape,
            data: bias,
        },
        load,
    ) in bufs.iter().zip(&loads)
    {
        assert!(name.ends_with("moe.router_bias"), "{name}");
        assert_eq!(*shape, Shape::vector(cfg.n_routed_experts));
        let mean = load.iter().sum::<u32>() as f64 / load.len() as f64;
        for (&bv, &l) in bias.iter().zip(load) {
            let want =
                cfg.bias_update_rate * (mean - l as f64).signum() * ((mean - l as f64) != 0.0) as u8 as f64;
            assert!(
                (bv as f64 - want).abs() < 1e-9,
                "bias {bv} for load {l} (mean {mean})"
            );
        }
    }
    let mut other = Model::new(&b, cfg, 2, 16, 3).unwrap();
    other.load_buffers(&b, &bufs).unwrap();
    assert_eq!(other.buffers(&b).unwrap(), bufs);
    assert!(other.load_buffers(&b, &bufs[..1]).is_err());
}

// ----- backends agree -----

/// Runs forward + backward of `cfg` on backend `b` with fixed data; returns loss and grads.
fn pass_f32<B: ModelOps<Elem = f32, Matrix = HostMatrix<f32>>>(
    b: &B,
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
) -> (f64, Vec<HostMatrix<f32>>, Vec<Vec<u32>>) {
    let mut model = Model::new(b, cfg.clone(), batch, seq, 9).unwrap();
    let n = batch * seq;
    let v = cfg.vocab_size;
    let tokens: Vec<u32> = (0..n).map(|i| ((i * 31 + 5) % v) as u32).collect();
    let targets: Vec<u32> = (0..n).map(|i| ((i * 17 + 3) % v) as u32).collect();
    let loss = model.forward(b, &tokens, &targets).unwrap();
    model.backward(b).unwrap();
    (loss, model.grads().to_vec(), model.expert_load().to_vec())
}

#[test]
fn faer_and_portable_f32_agree() {
    // The two backends share the model ops (cpu/) and differ in their GEMMs (faer's blocked
    // kernels vs a naive loop), so results differ by f32 rounding of sums of ~C..4C terms:
    // relative ~1e-7..1e-6 per product. Measured: every gradient tensor within 8e-7 of its
    // largest element; the bound 1e-5 leaves a margin for other inputs, and a real
    // difference (a wrong transpose, a skipped beta) is O(1).
    for kind in [mla(), AttentionKind::Mha] {
        let cfg = ModelConfig {
            attention: kind,
            ..ModelConfig::tiny()
        };
        let (batch, seq) = (2, 24);
        let (l1, g1, load1) = pass_f32(&Portable::<f32>::new(), &cfg, batch, seq);
        let (l2, g2, load2) = pass_f32(&muon_faer::Faer::<f32>::with_threads(2), &cfg, batch, seq);
        assert!((l1 - l2).abs() < 1e-5 * l1.abs(), "loss {l1} vs {l2}");
        // Routing decisions could differ on an exact tie under different rounding; with these
        // inputs they do not, which the loads confirm.
        assert_eq!(load1, load2);
        for (i, (a, c)) in g1.iter().zip(&g2).enumerate() {
            let scale = a.as_slice().iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let diff = a
                .as_slice()
                .iter()
                .zip(c.as_slice())
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-5 * scale,
                "tensor {i}: max diff {diff:e}, max |grad| {scale:e}"
            );
        }
    }
}

// ----- an independent implementation -----

/// `tests/fixtures/model_reference.py` evaluates the same network in NumPy, token by token and
/// head by head (no heads stacks, grouped rows or dispatch), from its own random parameters;
/// this loads them by name and compares logits and loss. Both are f64 with differently
/// ordered sums over at most a few dozen terms per layer, so they agree to ~1e-14; 1e-10 leaves
/// room and still catches any semantic difference (a rotation convention, a gate
/// normalization, a missing norm), which moves the logits by O(0.01..1).
#[test]
fn forward_matches_the_numpy_reference() {
    let cases: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/fixtures/model_reference.json")).unwrap();
    let b = B64::new();
    for case in cases.as_array().unwrap() {
        let cfg: ModelConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let (batch, seq) = (
            case["batch"].as_u64().unwrap() as usize,
            case["seq"].as_u64().unwrap() as usize,
        );
        let mut model = Model::new(&b, cfg.clone(), batch, seq, 0).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let specs = model.param_specs();
        assert_eq!(specs.len(), case["params"].as_object().unwrap().len());
        for (spec, m) in specs.iter().zip(model.params_mut()) {
            let data = floats(&case["params"][&spec.name]);
            b.upload(m, &data)
                .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        }
        let bufs: Vec<Tensor<f64>> = model
            .buffers(&b)
            .unwrap()
            .into_iter()
            .map(|t| Tensor {
                data: floats(&case["buffers"][&t.name]),
                ..t
            })
            .collect();
        model.load_buffers(&b, &bufs).unwrap();
        let loss = model
            .forward(&b, &ids(&case["tokens"]), &ids(&case["targets"]))
            .unwrap();
        let want_loss = case["loss"].as_f64().unwrap();
        let want_logits = floats(&case["logits"]);
        let logits = model.logits.as_slice();
        assert_eq!(logits.len(), want_logits.len());
        let diff = logits
            .iter()
            .zip(&want_logits)
            .map(|(a, w)| (a - w).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{:?}: loss {loss} vs {want_loss}, max |logit diff| {diff:.2e}",
            cfg.attention
        );
        assert!(diff < 1e-10, "{:?}: logits differ by {diff:e}", cfg.attention);
        assert!((loss - want_loss).abs() < 1e-10, "loss {loss} vs {want_loss}");
    }
}

#[test]
fn a_model_too_big_for_memory_is_refused_with_an_error() {
    // Moonlight-16B needs ~128 GB for f32 parameters and gradients alone.
    let b = Portable::<f32>::new();
    let cfg = ModelConfig::moonlight_16b_a3b();
    let need = crate::memory::model_bytes(&cfg, 1, 16, 4);
    assert!(need > 2 * 4 * 15_900_000_000, "{need}");
    match b.available_memory() {
        Some(avail) if avail < need => {
            let err = Model::new(&b, cfg, 1, 16, 0).err().expect("refused");
            assert!(matches!(err, ModelError::Config(_)));
            assert!(err.to_string().contains("GiB"), "{err}");
        }
        other => muon_test_support::skip(format!("available memory {other:?} is not below {need} bytes")),
    }
}
