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
