//! The host ops' own checks: the subnormal guard of the softmaxes, `exp_f32` against the exact
//! exponential, and bad operands coming back as errors that name them (the values of every op
//! are checked against finite differences and direct evaluations in `model/tests.rs`).

use muon_core::{Error, HostMatrix, Portable, Shape, Transpose};

use super::exp_f32;
use crate::ops::{AttentionOps, BaseOps, FfnOps, TokenOps};

fn mat(rows: usize, cols: usize, fill: f32) -> HostMatrix<f32> {
    HostMatrix::from_vec(Shape::matrix(rows, cols), vec![fill; rows * cols]).unwrap()
}

#[test]
fn softmaxes_store_no_subnormal_probabilities() {
    let b = Portable::<f32>::new();
    // Logits 100 apart: e^-100 ~ 4e-44 is subnormal in f32 (and exp_f32 floors it at
    // ~1e-38); it must come out as 0, the other probabilities as usual.
    let logits =
        HostMatrix::from_vec(Shape::matrix(2, 3), vec![0.0f32, -100.0, -1.0, 5.0, 5.0, -95.0]).unwrap();
    let mut probs = HostMatrix::zeros(Shape::matrix(2, 3));
    let mut loss = HostMatrix::zeros(Shape::matrix(1, 1));
    b.cross_entropy_forward(&mut probs, &mut loss, &logits, &vec![1, 0])
        .unwrap();
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
    let mut scores = HostMatrix::from_vec(Shape::batched(1, 2, 2), vec![0.0f32, 7.0, 0.0, -100.0]).unwrap();
    b.causal_softmax_forward(&mut scores).unwrap();
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
    // Its range reduction is `floor(x log2 e + 1/2)` computed with float adds and bit moves:
    // the same bits as with `floor` itself, on every 97th f32 of [-90, 90] and on the values
    // where `x log2 e + 1/2` is an integer or half way between two.
    let reference = |x: f32| {
        let x = x.clamp(-87.3, 88.0);
        let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        (p * r * r + r + 1.0) * f32::from_bits(((n as i32 + 127) as u32) << 23)
    };
    let negative = (-0.0f32).to_bits()..=(-90.0f32).to_bits();
    let steps = negative
        .chain(0..=90.0f32.to_bits())
        .step_by(97)
        .map(f32::from_bits);
    let edges = (-260..=260).map(|h| (h as f32 * 0.5 - 0.5) / std::f32::consts::LOG2_E);
    let mut checked = 0;
    for x in steps.chain(edges) {
        assert_eq!(exp_f32(x).to_bits(), reference(x).to_bits(), "exp_f32({x:e})");
        checked += 1;
    }
    assert!(checked > 20_000_000, "{checked}");
}

/// The operand an error names: a shape mismatch's or empty matrix's `what`, a count
/// mismatch's list, or the message of an index out of range.
fn named(e: Error) -> String {
    match e {
        Error::ShapeMismatch { what, .. } | Error::EmptyMatrix { what } => what,
        Error::CountMismatch { what, .. } => what.into(),
        Error::Backend(msg) => msg,
        other => panic!("unexpected error kind: {other:?}"),
    }
}

#[test]
fn wrong_shapes_and_lengths_are_errors_naming_the_operand() {
    let b = Portable::<f32>::new();
    let (x, gain) = (mat(4, 8, 1.0), mat(1, 8, 1.0));
    let (mut out, mut rstd) = (mat(4, 8, 0.0), mat(1, 4, 0.0));
    let err = b.rmsnorm_forward(&mut out, &mut rstd, &x, &mat(1, 7, 1.0), 1e-5);
    assert!(matches!(&err, Err(Error::ShapeMismatch { what, .. }) if what == "rmsnorm_forward gain"));
    let err = b.rmsnorm_forward(&mut mat(4, 9, 0.0), &mut rstd, &x, &gain, 1e-5);
    assert_eq!(named(err.unwrap_err()), "rmsnorm_forward out");
    // A stack where a plain matrix is needed.
    let stack = HostMatrix::zeros(Shape::batched(2, 4, 8));
    let err = b.rmsnorm_forward(&mut out, &mut rstd, &stack, &gain, 1e-5);
    assert_eq!(named(err.unwrap_err()), "rmsnorm_forward out");
    // No columns: the row loops would have nothing to cut rows by.
    let (mut e0, e1) = (mat(4, 0, 0.0), mat(4, 0, 0.0));
    let err = b.rmsnorm_forward(&mut e0, &mut rstd, &e1, &mat(1, 0, 0.0), 1e-5);
    assert!(matches!(err, Err(Error::EmptyMatrix { .. })), "{err:?}");
    // Index buffers of the wrong length.
    let mut table_out = mat(3, 8, 0.0);
    let err = b.embedding_forward(&mut table_out, &x, &vec![0, 1]);
    assert!(matches!(
        err,
        Err(Error::CountMismatch {
            what: "embedding_forward tokens",
            expected: 3,
            found: 2
        })
    ));
    let err = b.indices_upload(&mut vec![0; 3], &[1, 2]);
    assert!(matches!(
        err,
        Err(Error::CountMismatch {
            expected: 3,
            found: 2,
            ..
        })
    ));
    // Scores must be square; heads must tile the token rows.
    let err = b.causal_softmax_forward(&mut HostMatrix::zeros(Shape::batched(2, 3, 4)));
    assert_eq!(named(err.unwrap_err()), "causal_softmax_forward scores");
    let err = b.split_heads(&mut HostMatrix::zeros(Shape::batched(2, 3, 2)), 0, &x, 0, 2, 2);
    assert!(named(err.unwrap_err()).contains("do not tile 4 token rows"));
    // A column block past the end.
    let err = b.copy_columns(&mut mat(4, 4, 0.0), 2, &x, 0, 3, false);
    assert!(named(err.unwrap_err()).starts_with("copy_columns dst"));
    let err = b.copy_columns(&mut mat(4, 4, 0.0), 0, &x, usize::MAX, 2, false);
    assert!(named(err.unwrap_err()).starts_with("copy_columns src"));
    // The grouped products: weights of the wrong width, expert ranges that run backwards.
    let (a, w) = (mat(5, 8, 1.0), HostMatrix::zeros(Shape::batched(2, 3, 8)));
    let mut dst = mat(5, 3, 0.0);
    let err = b.grouped_gemm(&mut dst, 1.0, &a, &w, Transpose::No, &vec![0, 2, 5], 0.0);
    assert_eq!(named(err.unwrap_err()), "grouped_gemm w (after transpose)");
    let err = b.grouped_gemm(&mut dst, 1.0, &a, &w, Transpose::Yes, &vec![0, 4, 3], 0.0);
    assert!(named(err.unwrap_err()).contains("run backwards"));
    let err = b.grouped_gemm(&mut dst, 1.0, &a, &w, Transpose::Yes, &vec![0, 2, 4], 0.0);
    assert!(named(err.unwrap_err()).contains("cover 4 of 5 rows"));
    let mut dw = HostMatrix::zeros(Shape::batched(2, 8, 3));
    let err = b.grouped_gemm_weight_grad(&mut dw, 1.0, &a, &dst, &vec![0, 6, 6], 0.0);
    assert!(named(err.unwrap_err()).contains("cover 6 of 5 rows"));
    b.grouped_gemm(&mut dst, 1.0, &a, &w, Transpose::Yes, &vec![0, 2, 5], 0.0)
        .unwrap();
}

#[test]
fn indices_out_of_range_are_errors_and_nothing_is_written() {
    let b = Portable::<f32>::new();
    let table = mat(5, 4, 1.0);
    // A token outside the vocabulary of 5: the error names the buffer and the position.
    let mut out = mat(3, 4, 7.0);
    let err = b.embedding_forward(&mut out, &table, &vec![0, 4, 5]).unwrap_err();
    assert_eq!(
        named(err),
        "embedding_forward tokens[2] = 5 is out of range: it must be below 5"
    );
    assert!(
        out.as_slice().iter().all(|&v| v == 7.0),
        "written before the check"
    );
    let mut dtable = mat(5, 4, 0.0);
    let err = b
        .embedding_backward(&mut dtable, &out, &vec![9, 0, 0])
        .unwrap_err();
    assert!(named(err).starts_with("embedding_backward tokens[0] = 9"));
    assert!(dtable.as_slice().iter().all(|&v| v == 0.0));
    // A target outside the vocabulary, forward and backward.
    let (logits, mut probs, mut loss) = (mat(2, 5, 0.0), mat(2, 5, 3.0), mat(1, 1, 3.0));
    let err = b.cross_entropy_forward(&mut probs, &mut loss, &logits, &vec![1, 5]);
    assert!(named(err.unwrap_err()).starts_with("cross_entropy_forward targets[1] = 5"));
    assert!(probs.as_slice().iter().chain(loss.as_slice()).all(|&v| v == 3.0));
    let err = b.cross_entropy_backward(&mut mat(2, 5, 0.0), &probs, &vec![7, 0], 0.5);
    assert!(named(err.unwrap_err()).starts_with("cross_entropy_backward targets[0] = 7"));
    // An expert outside the layer's 3, a row outside the grouped rows.
    let (mut counts, mut offsets) = (vec![0; 3], vec![0; 4]);
    let (mut slot_row, mut row_token) = (vec![0; 4], vec![0; 4]);
    let err = b.moe_dispatch(
        &mut counts,
        &mut offsets,
        &mut slot_row,
        &mut row_token,
        &vec![0, 1, 2, 3],
        2,
    );
    assert!(named(err.unwrap_err()).starts_with("moe_dispatch experts[3] = 3"));
    assert_eq!((counts, offsets), (vec![0; 3], vec![0; 4]));
    let err = b.gather_rows(&mut mat(2, 4, 0.0), &table, &vec![1, 6]);
    assert!(named(err.unwrap_err()).starts_with("gather_rows rows[1] = 6"));
    let (grouped, gates) = (mat(4, 4, 1.0), mat(2, 2, 0.5));
    let err = b.moe_combine(&mut mat(2, 4, 0.0), &grouped, &gates, &vec![0, 1, 2, 4]);
    assert!(named(err.unwrap_err()).starts_with("moe_combine slot_row[3] = 4"));
    let err = b.scatter_add_slots(&mut mat(2, 4, 0.0), &grouped, &vec![0, 8, 2, 3]);
    assert!(named(err.unwrap_err()).starts_with("scatter_add_slots slot_row[1] = 8"));
    let (scores, dgates) = (mat(2, 3, 0.5), mat(2, 2, 1.0));
    let err = b.router_backward(&mut mat(2, 3, 0.0), &dgates, &scores, &vec![0, 1, 2, 3], 1.0);
    assert!(named(err.unwrap_err()).starts_with("router_backward experts[3] = 3"));
}

/// A stack of `heads` matrices `rows x cols` of reproducible values in [-2, 2).
fn stack(heads: usize, rows: usize, cols: usize, seed: u64) -> HostMatrix<f32> {
    let mut rng = crate::rng::Rng::new(seed);
    let data = (0..heads * rows * cols)
        .map(|_| (4.0 * rng.uniform() - 2.0) as f32)
        .collect();
    HostMatrix::from_vec(Shape::batched(heads, rows, cols), data).unwrap()
}

/// The fused attention core gives the bits of the op sequence it replaces (the stack's
/// products, then the softmax, then the products), forward and backward, on faer in f32 at 1
/// and 2 threads and in bf16 (the AVX512-BF16 path's scalar model, which every machine runs):
/// per head the same products in the same precision and the same row passes, only in another
/// order over the heads. The portable backend's stacked `gemm` is its own loop while its
/// per-thread products are faer's, so there the two agree to f32 rounding: sums of at most 20
/// terms in another order differ by under `40 u` (u = 2^-24) of the terms' magnitudes, and
/// 1e-5 of each tensor's largest value leaves room for that through two products.
#[test]
fn fused_attention_core_equals_the_op_sequence() {
    use muon_core::Precision;
    use muon_faer::{Bf16Kernel, Faer};
    fn check<B: AttentionOps + BaseOps<Elem = f32, Matrix = HostMatrix<f32>>>(
        b: &B,
        what: &str,
        exact: bool,
    ) {
        // 12 heads of 20 positions: queries and keys of 7 columns, values of 5.
        let (m, seq, qk, dv) = (12, 20, 7, 5);
        let (q, k, v, d_out) = (
            stack(m, seq, qk, 1),
            stack(m, seq, qk, 2),
            stack(m, seq, dv, 3),
            stack(m, seq, dv, 4),
        );
        let scale = 0.37f32;
        let zeros = |cols| HostMatrix::<f32>::zeros(Shape::batched(m, seq, cols));
        // The sequence.
        let (mut probs, mut out) = (zeros(seq), zeros(dv));
        b.gemm(&mut probs, scale, &q, Transpose::No, &k, Transpose::Yes, 0.0)
            .unwrap();
        b.causal_softmax_forward(&mut probs).unwrap();
        b.gemm(&mut out, 1.0, &probs, Transpose::No, &v, Transpose::No, 0.0)
            .unwrap();
        let (mut ds, mut dq, mut dk, mut dvv) = (zeros(seq), zeros(qk), zeros(qk), zeros(dv));
        b.gemm(&mut ds, 1.0, &d_out, Transpose::No, &v, Transpose::Yes, 0.0)
            .unwrap();
        b.gemm(&mut dvv, 1.0, &probs, Transpose::Yes, &d_out, Transpose::No, 0.0)
            .unwrap();
        b.causal_softmax_backward(&mut ds, &probs).unwrap();
        b.gemm(&mut dq, scale, &ds, Transpose::No, &k, Transpose::No, 0.0)
            .unwrap();
        b.gemm(&mut dk, scale, &ds, Transpose::Yes, &q, Transpose::No, 0.0)
            .unwrap();
        // Fused, into buffers holding other values (every output is overwritten).
        let (mut fprobs, mut fout) = (stack(m, seq, seq, 5), stack(m, seq, dv, 6));
        b.attention_core_forward(&mut fprobs, &mut fout, &q, &k, &v, scale)
            .unwrap();
        let (mut fds, mut fdq, mut fdk, mut fdv) = (
            stack(m, seq, seq, 7),
            stack(m, seq, qk, 8),
            stack(m, seq, qk, 9),
            stack(m, seq, dv, 10),
        );
        b.attention_core_backward(
            &mut fdq, &mut fdk, &mut fdv, &mut fds, &d_out, &fprobs, &q, &k, &v, scale,
        )
        .unwrap();
        let pairs = [
            ("probs", &probs, &fprobs),
            ("out", &out, &fout),
            ("dS", &ds, &fds),
            ("dq", &dq, &fdq),
            ("dk", &dk, &fdk),
            ("dv", &dvv, &fdv),
        ];
        for (name, want, got) in pairs {
            let (want, got) = (want.as_slice(), got.as_slice());
            let largest = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let close = |a: f32, b: f32| {
                if exact {
                    a.to_bits() == b.to_bits()
                } else {
                    (a - b).abs() <= 1e-5 * largest
                }
            };
            let worst = want.iter().zip(got).find(|&(&a, &b)| !close(a, b));
            assert!(
                worst.is_none(),
                "{what}: fused {name} differs from the op sequence: {worst:?}"
            );
        }
        // Causal: nothing above the diagonal, and each row a distribution.
        assert!(fprobs.as_slice().chunks(seq).enumerate().all(|(r, row)| {
            let i = r % seq;
            row[i + 1..].iter().all(|&p| p == 0.0) && (row.iter().sum::<f32>() - 1.0).abs() < 1e-5
        }));
    }
    check(&Portable::<f32>::new(), "portable", false);
    for threads in [1, 2] {
        check(
            &Faer::<f32>::with_threads(threads),
            &format!("faer f32, {threads} threads"),
            true,
        );
        let bf16 = Faer::<f32>::with_threads(threads)
            .with_precision(Precision::Bf16)
            .with_bf16_kernel(Bf16Kernel::Avx512Bf16Model)
            .unwrap();
        check(&bf16, &format!("faer bf16 (model), {threads} threads"), true);
    }
    // Operands of the wrong shape are errors naming them.
    let b = Portable::<f32>::new();
    let (q, k) = (stack(4, 6, 3, 1), stack(4, 6, 3, 2));
    let (mut probs, mut out) = (stack(4, 6, 6, 3), stack(4, 6, 2, 4));
    let err = b.attention_core_forward(&mut probs, &mut out, &q, &k, &stack(4, 5, 2, 5), 1.0);
    assert_eq!(named(err.unwrap_err()), "attention_core_forward v");
    let err = b.attention_core_forward(
        &mut probs,
        &mut out,
        &q,
        &stack(3, 6, 3, 5),
        &stack(4, 6, 2, 5),
        1.0,
    );
    assert_eq!(named(err.unwrap_err()), "attention_core_forward k");
    let err = b.attention_core_forward(&mut stack(4, 6, 5, 3), &mut out, &q, &k, &stack(4, 6, 2, 5), 1.0);
    assert_eq!(named(err.unwrap_err()), "attention_core_forward scores");
    let v = stack(4, 6, 2, 5);
    let err = b.attention_core_backward(
        &mut stack(4, 6, 3, 0),
        &mut stack(4, 6, 3, 0),
        &mut stack(4, 6, 2, 0),
        &mut stack(4, 6, 6, 0),
        &stack(4, 6, 3, 0),
        &probs,
        &q,
        &k,
        &v,
        1.0,
    );
    assert_eq!(named(err.unwrap_err()), "attention_core_backward d_out");
}
