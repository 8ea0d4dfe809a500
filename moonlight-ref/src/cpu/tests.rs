//! The host ops' own checks: the subnormal guard of the softmaxes, `exp_f32` against the exact
//! exponential, and bad operands coming back as errors that name them (the values of every op
//! are checked against finite differences and direct evaluations in `model/tests.rs`).

use muon_core::{Error, HostMatrix, Portable, Shape, Transpose};

use super::exp_f32;
use crate::ops::{AttentionOps, BaseOps, FfnOps, HeadCols, HeadLayout, Qkv, QkvGrads, TokenOps};

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
    // Scores must be square; RoPE's heads must fit in the rows and the table.
    let err = b.causal_softmax_forward(&mut HostMatrix::zeros(Shape::batched(2, 3, 4)));
    assert_eq!(named(err.unwrap_err()), "causal_softmax_forward scores");
    let table = mat(4, 2, 1.0);
    let err = b.rope(&mut mat(4, 8, 0.0), 4, 3, HeadCols::new(0, 4, 2), &table, false);
    assert!(named(err.unwrap_err()).starts_with("rope x (last head)"));
    let err = b.rope(&mut mat(4, 8, 0.0), 3, 1, HeadCols::new(0, 0, 2), &table, false);
    assert!(named(err.unwrap_err()).contains("in sequences of 3"));
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

/// A random `[B*T, S]` token-rows matrix (values in [-2, 2)).
fn tokens(rows: usize, cols: usize, seed: u64) -> HostMatrix<f32> {
    stack(1, rows, cols, seed)
}

/// Head `h` of sequence `b` of a token-rows matrix as a dense `[T, width]` block.
fn head_of(m: &HostMatrix<f32>, seq: usize, b: usize, cols: HeadCols, h: usize) -> Vec<f32> {
    let ld = m.shape().cols;
    (0..seq)
        .flat_map(|t| m.as_slice()[(b * seq + t) * ld + cols.start(h)..][..cols.width].to_vec())
        .collect()
}

/// The core's operands in token rows, in one of the two layouts the model uses.
struct CoreCase {
    layout: HeadLayout,
    q: HeadMats,
}

/// q, k, the shared keys (MLA), v and dout, with the widths of their matrices.
struct HeadMats {
    q: HostMatrix<f32>,
    k: HostMatrix<f32>,
    k_shared: Option<HostMatrix<f32>>,
    v: Option<HostMatrix<f32>>,
    d_out: HostMatrix<f32>,
}

impl CoreCase {
    /// MLA's layout: q per head [nope 5 | rope 2]; kvb per head [k_nope 5 | v 5]; a shared
    /// rope key 2 wide at column 3 of a 6-wide kva; out 5 per head.
    fn mla(n: usize, heads: usize) -> Self {
        let layout = HeadLayout {
            heads,
            q: HeadCols::new(0, 7, 7),
            k: HeadCols::new(0, 10, 5),
            k_shared: Some(HeadCols::new(3, 0, 2)),
            v: HeadCols::new(5, 10, 5),
            out: HeadCols::new(0, 5, 5),
        };
        let q = HeadMats {
            q: tokens(n, heads * 7, 1),
            k: tokens(n, heads * 10, 2),
            k_shared: Some(tokens(n, 6, 3)),
            v: None,
            d_out: tokens(n, heads * 5, 4),
        };
        CoreCase { layout, q }
    }

    /// MHA's layout: q and k 7 per head, v and out 5 per head, each in its own matrix.
    fn mha(n: usize, heads: usize) -> Self {
        let layout = HeadLayout {
            heads,
            q: HeadCols::new(0, 7, 7),
            k: HeadCols::new(0, 7, 7),
            k_shared: None,
            v: HeadCols::new(0, 5, 5),
            out: HeadCols::new(0, 5, 5),
        };
        let q = HeadMats {
            q: tokens(n, heads * 7, 5),
            k: tokens(n, heads * 7, 6),
            k_shared: None,
            v: Some(tokens(n, heads * 5, 7)),
            d_out: tokens(n, heads * 5, 8),
        };
        CoreCase { layout, q }
    }

    fn qkv(&self) -> Qkv<'_, HostMatrix<f32>> {
        let m = &self.q;
        Qkv {
            q: &m.q,
            k: &m.k,
            k_shared: m.k_shared.as_ref(),
            v: m.v.as_ref().unwrap_or(&m.k),
        }
    }
}

/// The fused attention core, reading and writing heads in their token rows, gives the values
/// of the op sequence it replaces on head-major copies (each head's columns gathered into a
/// `[B*H, T, D]` stack, the stack's products, the softmax, the products, the gradients
/// scattered back and the shared keys' summed over the heads), forward and backward, in both
/// of the model's layouts, and leaves every other column of its outputs alone. On the bf16
/// kernels (the AVX512-BF16 path's scalar model, which every machine runs) the bits are the
/// same: per head the same products on the same values, the packs read the same numbers
/// whatever the stride, and the shared gradient is summed in the same order. faer's f32
/// kernels pick code paths by the operands' strides, and the portable backend's stacked
/// `gemm` is its own loop, so there the two agree to f32 rounding: sums of at most 20 terms
/// in another order differ by under `40 u` (u = 2^-24) of the terms' magnitudes, and 1e-5 of
/// each tensor's largest value leaves room for that through two products.
#[test]
fn fused_attention_core_equals_the_op_sequence() {
    use muon_core::Precision;
    use muon_faer::{Bf16Kernel, Faer};
    fn check<B: AttentionOps + BaseOps<Elem = f32, Matrix = HostMatrix<f32>>>(
        b: &B,
        what: &str,
        exact: bool,
        case: &CoreCase,
    ) {
        // 3 sequences of 20 positions, 4 heads: queries and keys 7 wide, values 5.
        let (batch, seq, qk, dv) = (3, 20, 7, 5);
        let l = &case.layout;
        let (heads, m) = (l.heads, 3 * l.heads);
        let x = case.qkv();
        let scale = 0.37f32;
        // Head-major copies.
        let gather = |mat: &HostMatrix<f32>, cols: HeadCols| {
            let data = (0..m)
                .flat_map(|bh| head_of(mat, seq, bh / heads, cols, bh % heads))
                .collect();
            HostMatrix::from_vec(Shape::batched(m, seq, cols.width), data).unwrap()
        };
        let (qh, vh, doh) = (gather(x.q, l.q), gather(x.v, l.v), gather(&case.q.d_out, l.out));
        let own = gather(x.k, l.k);
        let kh = match (x.k_shared, l.k_shared) {
            (Some(shared), Some(cols)) => {
                let sh = gather(shared, cols);
                let (o, sw) = (l.k.width, cols.width);
                let data = (0..m * seq)
                    .flat_map(|r| [&own.as_slice()[r * o..][..o], &sh.as_slice()[r * sw..][..sw]].concat())
                    .collect();
                HostMatrix::from_vec(Shape::batched(m, seq, qk), data).unwrap()
            }
            _ => own,
        };
        let zeros = |cols| HostMatrix::<f32>::zeros(Shape::batched(m, seq, cols));
        // The sequence.
        let (mut probs, mut out) = (zeros(seq), zeros(dv));
        b.gemm(&mut probs, scale, &qh, Transpose::No, &kh, Transpose::Yes, 0.0)
            .unwrap();
        b.causal_softmax_forward(&mut probs).unwrap();
        b.gemm(&mut out, 1.0, &probs, Transpose::No, &vh, Transpose::No, 0.0)
            .unwrap();
        let (mut ds, mut dq, mut dk, mut dvv) = (zeros(seq), zeros(qk), zeros(qk), zeros(dv));
        b.gemm(&mut ds, 1.0, &doh, Transpose::No, &vh, Transpose::Yes, 0.0)
            .unwrap();
        b.gemm(&mut dvv, 1.0, &probs, Transpose::Yes, &doh, Transpose::No, 0.0)
            .unwrap();
        b.causal_softmax_backward(&mut ds, &probs).unwrap();
        b.gemm(&mut dq, scale, &ds, Transpose::No, &kh, Transpose::No, 0.0)
            .unwrap();
        b.gemm(&mut dk, scale, &ds, Transpose::Yes, &qh, Transpose::No, 0.0)
            .unwrap();
        // Fused, into buffers holding other values (every block it writes is overwritten).
        let n = batch * seq;
        let (mut fprobs, mut keys) = (stack(m, seq, seq, 9), stack(batch, seq, 2 * qk, 10));
        let mut fout = tokens(n, case.q.d_out.shape().cols, 11);
        b.attention_core_forward(&mut fprobs, &mut keys, &mut fout, x, l, scale)
            .unwrap();
        let like = |mat: &HostMatrix<f32>, seed| tokens(n, mat.shape().cols, seed);
        let (mut fdq, mut fdk) = (like(x.q, 12), like(x.k, 13));
        let mut fdks = x.k_shared.map(|s| like(s, 14));
        let mut fdv = case.q.v.as_ref().map(|v| like(v, 15));
        let before = (fdk.clone(), fdks.clone());
        let mut fds = stack(m, seq, seq, 16);
        let grads = QkvGrads {
            dq: &mut fdq,
            dk: &mut fdk,
            dk_shared: fdks.as_mut(),
            dv: fdv.as_mut(),
        };
        b.attention_core_backward(grads, &mut fds, &mut keys, &case.q.d_out, &fprobs, x, l, scale)
            .unwrap();
        // Compare per head and block; the shared keys' gradient is the heads' sum in order.
        let close = |name: &str, want: &[f32], got: &[f32], largest: f32| {
            let ok = |a: f32, b: f32| {
                if exact {
                    a.to_bits() == b.to_bits()
                } else {
                    (a - b).abs() <= 1e-5 * largest
                }
            };
            let worst = want.iter().zip(got).find(|&(&a, &b)| !ok(a, b));
            assert!(
                worst.is_none(),
                "{what}: fused {name} differs from the op sequence: {worst:?}"
            );
        };
        let largest = |v: &HostMatrix<f32>| v.as_slice().iter().fold(0.0f32, |m, v| m.max(v.abs()));
        close("probs", probs.as_slice(), fprobs.as_slice(), largest(&probs));
        close("dS", ds.as_slice(), fds.as_slice(), largest(&ds));
        let heads_of = |stack: &HostMatrix<f32>, bh: usize, from: usize, width: usize| -> Vec<f32> {
            let c = stack.shape().cols;
            (0..seq)
                .flat_map(|t| stack.as_slice()[(bh * seq + t) * c + from..][..width].to_vec())
                .collect()
        };
        let fdv_mat = fdv.as_ref().unwrap_or(&fdk);
        for bh in 0..m {
            let (bb, h) = (bh / heads, bh % heads);
            let mut blocks = vec![
                (
                    "out",
                    heads_of(&out, bh, 0, dv),
                    head_of(&fout, seq, bb, l.out, h),
                    largest(&out),
                ),
                (
                    "dq",
                    heads_of(&dq, bh, 0, qk),
                    head_of(&fdq, seq, bb, l.q, h),
                    largest(&dq),
                ),
                (
                    "dk",
                    heads_of(&dk, bh, 0, l.k.width),
                    head_of(&fdk, seq, bb, l.k, h),
                    largest(&dk),
                ),
                (
                    "dv",
                    heads_of(&dvv, bh, 0, dv),
                    head_of(fdv_mat, seq, bb, l.v, h),
                    largest(&dvv),
                ),
            ];
            if let (Some(fdks), Some(cols), 0) = (&fdks, l.k_shared, h) {
                let mut sum = heads_of(&dk, bh, l.k.width, cols.width);
                for hh in 1..heads {
                    let more = heads_of(&dk, bh + hh, l.k.width, cols.width);
                    sum.iter_mut().zip(more).for_each(|(s, v)| *s += v);
                }
                blocks.push(("dk shared", sum, head_of(fdks, seq, bb, cols, 0), largest(&dk)));
            }
            for (name, want, got, big) in blocks {
                close(&format!("{name} (sequence {bb}, head {h})"), &want, &got, big);
            }
        }
        // The shared keys' matrix keeps its other columns.
        if let (Some(got), (_, Some(was)), Some(cols)) = (&fdks, &before, l.k_shared) {
            let w = got.shape().cols;
            for (r, (g, b)) in got.as_slice().chunks(w).zip(was.as_slice().chunks(w)).enumerate() {
                let outside = |row: &[f32]| [&row[..cols.col], &row[cols.col + cols.width..]].concat();
                assert_eq!(
                    outside(g),
                    outside(b),
                    "{what}: dk_shared row {r} outside its block"
                );
            }
        }
        // Causal: nothing above the diagonal, and each row a distribution.
        assert!(fprobs.as_slice().chunks(seq).enumerate().all(|(r, row)| {
            let i = r % seq;
            row[i + 1..].iter().all(|&p| p == 0.0) && (row.iter().sum::<f32>() - 1.0).abs() < 1e-5
        }));
    }
    for (name, case) in [("MLA", CoreCase::mla(60, 4)), ("MHA", CoreCase::mha(60, 4))] {
        check(&Portable::<f32>::new(), &format!("{name} portable"), false, &case);
        for threads in [1, 2] {
            let f32s = Faer::<f32>::with_threads(threads);
            check(
                &f32s,
                &format!("{name} faer f32, {threads} threads"),
                false,
                &case,
            );
            let bf16 = Faer::<f32>::with_threads(threads)
                .with_precision(Precision::Bf16)
                .with_bf16_kernel(Bf16Kernel::Avx512Bf16Model)
                .unwrap();
            check(
                &bf16,
                &format!("{name} faer bf16 (model), {threads} threads"),
                true,
                &case,
            );
        }
    }
    // Operands of the wrong shape are errors naming them.
    let b = Portable::<f32>::new();
    let case = CoreCase::mla(60, 4);
    let (l, x) = (case.layout, case.qkv());
    let (mut probs, mut keys, mut out) = (stack(12, 20, 20, 1), stack(3, 20, 14, 2), tokens(60, 20, 3));
    let mut run = |probs: &mut HostMatrix<f32>, keys: &mut HostMatrix<f32>, x, l: &HeadLayout| {
        named(
            b.attention_core_forward(probs, keys, &mut out, x, l, 1.0)
                .unwrap_err(),
        )
    };
    let short = tokens(59, 28, 4);
    assert_eq!(
        run(&mut probs, &mut keys, Qkv { q: &short, ..x }, &l),
        "attention_core_forward q"
    );
    assert_eq!(
        run(&mut stack(12, 20, 21, 5), &mut keys, x, &l),
        "attention_core_forward probs"
    );
    assert_eq!(
        run(&mut probs, &mut stack(3, 20, 13, 6), x, &l),
        "attention_core_forward keys"
    );
    let no_shared = Qkv { k_shared: None, ..x };
    assert!(run(&mut probs, &mut keys, no_shared, &l).contains("shared"));
    let wide = HeadLayout {
        v: HeadCols::new(6, 10, 5),
        ..l
    };
    assert!(run(&mut probs, &mut keys, x, &wide).contains("do not fit"));
    let mut dv_grads = (tokens(60, 28, 7), tokens(60, 40, 8), tokens(60, 6, 9));
    let grads = QkvGrads {
        dq: &mut dv_grads.0,
        dk: &mut dv_grads.1,
        dk_shared: Some(&mut dv_grads.2),
        dv: None,
    };
    let err = b.attention_core_backward(
        grads,
        &mut stack(12, 20, 20, 10),
        &mut keys,
        &tokens(59, 20, 11),
        &probs,
        x,
        &l,
        1.0,
    );
    assert_eq!(named(err.unwrap_err()), "attention_core_backward d_out");
    let mut g = (tokens(60, 28, 12), tokens(60, 40, 13));
    let grads = QkvGrads {
        dq: &mut g.0,
        dk: &mut g.1,
        dk_shared: None,
        dv: None,
    };
    let err = b.attention_core_backward(
        grads,
        &mut stack(12, 20, 20, 14),
        &mut keys,
        &case.q.d_out,
        &probs,
        x,
        &l,
        1.0,
    );
    assert!(named(err.unwrap_err()).contains("dk_shared is missing"));
}
