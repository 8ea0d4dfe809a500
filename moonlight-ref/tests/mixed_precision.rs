//! Mixed precision (`--precision bf16`): products on bf16 inputs with f32 accumulation,
//! everything else f32. Checked three ways:
//!
//! 1. **The grouped expert GEMMs against an exact reference.** bf16 x bf16 is exact in f32
//!    (8 + 8 significant bits < 24), so the only error left is the f32 sum of `K` exact
//!    products: at most `gamma_K = K u32 / (1 - K u32)` (`u32 = 2^-24`) times `sum |a||b|`
//!    (Higham, Thm 3.1), plus one rounding for the `alpha`/accumulate merge. The reference
//!    rounds the inputs to bf16 (nearest even, written here independently of muon-faer) and
//!    sums in f64. A product left in f32 misses it by ~2^-9 of `sum |a||b|`, 10^4 times the
//!    bound.
//! 2. **The whole model's forward and backward against the f64 model** (same parameters).
//!    Each product's inputs are rounded to bf16, a relative error of at most `u = 2^-8`
//!    each (about `u / sqrt(3)` RMS, uniform in the last place), so each product's output
//!    carries about `sqrt(2/3) u` = 3.2e-3 relative RMS error (the f32 sums add ~1e-7). The
//!    errors of the products along the network are independent and add in quadrature: the
//!    `micro` and `tiny` passes chain about D = 30 products from the embedding to the weight
//!    gradients (forward and backward), so a gradient tensor's relative error (Frobenius) is
//!    about `sqrt(D) * 3.2e-3` = 0.018, and the residual stream and the norms only damp it.
//!    The bound is 0.05 (2.8x that estimate) for the gradients and 2^-8 of the loss itself
//!    (a mean over tokens, whose errors average out). Measured: 6.9e-3 (micro) and 1.1e-2
//!    (tiny) for the gradients, 5e-6 relative for the loss. And bf16 must really run: where the
//!    machine has a bf16 unit the gradients must differ from the f64 ones by far more than
//!    f32's do (f32: ~1e-6).
//! 3. **Training reaches the f32 run's validation loss** at equal steps over several seeds,
//!    on `micro` and `tiny` everywhere and on `small` where a bf16 unit runs it (see the
//!    test's comment for the tolerance).

use moonlight_ref::config::ModelConfig;
use moonlight_ref::model::Model;
use moonlight_ref::ops::{FfnOps, ModelOps};
use moonlight_ref::train::{self, OptimizerChoice, RunSettings, TrainOptions};
use muon_core::{Backend, HostMatrix, Portable, Real, Shape, Transpose};
use muon_faer::{Bf16Kernel, Faer, Precision};
use muon_test_support::skip;

/// `x` rounded to bf16, nearest even (finite `x`), as an f32.
fn bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    f32::from_bits(rounded & 0xffff_0000)
}

/// Deterministic values in (-1, 1) with a spread of magnitudes.
fn values(n: usize, salt: u64) -> Vec<f32> {
    let mut s = salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// The bf16 backends this machine runs: the detected unit (if any) and the scalar model of
/// the AVX512-BF16 path (any CPU), so the test checks the routing everywhere.
fn bf16_backends() -> Vec<(String, Faer<f32>)> {
    let mut out = Vec::new();
    let base = Faer::<f32>::with_threads(2).with_precision(Precision::Bf16);
    match Bf16Kernel::detect() {
        Some(k) => out.push((k.name().to_string(), base.clone())),
        None => eprintln!("no AMX or AVX512-BF16 here: only the scalar model is checked"),
    }
    let model = base.with_bf16_kernel(Bf16Kernel::Avx512Bf16Model).unwrap();
    out.push(("avx512bf16-model".into(), model));
    out
}

#[test]
fn grouped_expert_gemms_round_their_inputs_to_bf16_and_sum_in_f32() {
    // 3 experts, rows 0..70 | 70..70 (empty) | 70..150: blocks of 64 and a ragged tail.
    let (experts, rows, k, n) = (3, 150, 40, 24);
    let offsets = vec![0u32, 70, 70, 150];
    let a = values(rows * k, 1);
    let w = values(experts * k * n, 2);
    let dst0 = values(rows * n, 3);
    let u32_ = 2f64.powi(-24);
    for (name, b) in bf16_backends() {
        for (tw, beta) in [(Transpose::No, 0.0f32), (Transpose::Yes, 1.0)] {
            let a_m = HostMatrix::from_vec(Shape::matrix(rows, k), a.clone()).unwrap();
            let w_shape = match tw {
                Transpose::No => Shape::batched(experts, k, n),
                Transpose::Yes => Shape::batched(experts, n, k),
            };
            let w_m = HostMatrix::from_vec(w_shape, w.clone()).unwrap();
            let mut d = HostMatrix::from_vec(Shape::matrix(rows, n), dst0.clone()).unwrap();
            let idx = offsets.clone();
            b.grouped_gemm(&mut d, 0.5, &a_m, &w_m, tw, &idx, beta).unwrap();
            let mut worst = 0f64;
            for e in 0..experts {
                for r in offsets[e] as usize..offsets[e + 1] as usize {
                    for j in 0..n {
                        let (mut exact, mut abs) = (0f64, 0f64);
                        for p in 0..k {
                            let wv = match tw {
                                Transpose::No => w[e * k * n + p * n + j],
                                Transpose::Yes => w[e * k * n + j * k + p],
                            };
                            let t = bf16(a[r * k + p]) as f64 * bf16(wv) as f64;
                            exact += t;
                            abs += t.abs();
                        }
                        let want = 0.5 * exact + beta as f64 * dst0[r * n + j] as f64;
                        let bound = (k as f64 + 2.0) * u32_ * (0.5 * abs + dst0[r * n + j].abs() as f64);
                        let got = d.as_slice()[r * n + j] as f64;
                        assert!(
                            (got - want).abs() <= bound,
                            "{name} {tw:?}: row {r} col {j}: {got} vs {want} (bound {bound:e})"
                        );
                        worst = worst.max((got - want).abs() / bound);
                    }
                }
            }
            eprintln!("{name} grouped_gemm {tw:?}: worst error {worst:.3} of the bound");
        }
        // The weight gradient: dw_e = alpha x_e^T y_e over each expert's rows.
        let (p, q) = (k, n);
        let x = HostMatrix::from_vec(Shape::matrix(rows, p), a.clone()).unwrap();
        let y = HostMatrix::from_vec(Shape::matrix(rows, q), dst0.clone()).unwrap();
        let mut dw = HostMatrix::from_vec(Shape::batched(experts, p, q), w.clone()).unwrap();
        b.grouped_gemm_weight_grad(&mut dw, 1.0, &x, &y, &offsets, 0.0)
            .unwrap();
        for e in 0..experts {
            for i in 0..p {
                for j in 0..q {
                    let (mut exact, mut abs) = (0f64, 0f64);
                    for r in offsets[e] as usize..offsets[e + 1] as usize {
                        let t = bf16(a[r * p + i]) as f64 * bf16(dst0[r * q + j]) as f64;
                        exact += t;
                        abs += t.abs();
                    }
                    let kk = (offsets[e + 1] - offsets[e]) as f64;
                    let bound = (kk + 2.0) * u32_ * abs;
                    let got = dw.as_slice()[e * p * q + i * q + j] as f64;
                    assert!(
                        (got - exact).abs() <= bound,
                        "{name} weight grad: expert {e} ({i}, {j}): {got} vs {exact} (bound {bound:e})"
                    );
                }
            }
        }
    }
}

/// Loss and gradients (as f64) of one forward and backward of `cfg` on `b`, with the
/// parameters `params` (f32 values) loaded.
fn pass<B: ModelOps<Matrix = HostMatrix<<B as Backend>::Elem>>>(
    b: &B,
    cfg: &ModelConfig,
    params: &[Vec<f32>],
    (batch, seq): (usize, usize),
) -> (f64, Vec<Vec<f64>>, Vec<Vec<u32>>) {
    let mut model = Model::new(b, cfg.clone(), batch, seq, 7).unwrap();
    for (m, p) in model.params_mut().iter_mut().zip(params) {
        let data: Vec<B::Elem> = p.iter().map(|&v| <B::Elem as Real>::from_f64(v as f64)).collect();
        b.upload(m, &data).unwrap();
    }
    let n = batch * seq;
    let v = cfg.vocab_size;
    let tokens: Vec<u32> = (0..n).map(|i| ((i * 31 + 5) % v) as u32).collect();
    let targets: Vec<u32> = (0..n).map(|i| ((i * 17 + 3) % v) as u32).collect();
    let loss = model.forward(b, &tokens, &targets).unwrap();
    model.backward(b).unwrap();
    let grads = model
        .grads()
        .iter()
        .map(|g| g.as_slice().iter().map(|x| x.to_f64()).collect())
        .collect();
    (loss, grads, model.expert_load().to_vec())
}

/// The largest relative (Frobenius) error of a gradient tensor.
fn worst_grad_error(got: &[Vec<f64>], want: &[Vec<f64>]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let diff: f64 = g.iter().zip(w).map(|(a, b)| (a - b) * (a - b)).sum();
            let norm: f64 = w.iter().map(|b| b * b).sum();
            (diff / norm.max(1e-300)).sqrt()
        })
        .fold(0.0, f64::max)
}

#[test]
fn a_bf16_forward_and_backward_stays_within_the_bound_of_the_f64_model() {
    for (label, cfg, shape) in [
        ("micro", ModelConfig::micro(), (2, 16)),
        ("tiny", ModelConfig::tiny(), (2, 24)),
    ] {
        let f32b = Faer::<f32>::with_threads(2);
        let params: Vec<Vec<f32>> = Model::new(&f32b, cfg.clone(), shape.0, shape.1, 7)
            .unwrap()
            .params()
            .iter()
            .map(|m| m.as_slice().to_vec())
            .collect();
        let (l64, g64, load64) = pass(&Portable::<f64>::new(), &cfg, &params, shape);
        let (l32, g32, _) = pass(&f32b, &cfg, &params, shape);
        let f32_err = worst_grad_error(&g32, &g64);
        for (name, b) in bf16_backends() {
            let (l16, g16, load16) = pass(&b, &cfg, &params, shape);
            let err = worst_grad_error(&g16, &g64);
            eprintln!(
                "{label} {name}: loss {l16} vs f64 {l64} (f32 {l32}); worst gradient error bf16 {err:.2e}, f32 {f32_err:.2e}"
            );
            // A token whose top-k choice flips under rounding moves the gradients by O(1): the
            // bound assumes the same routing, which these inputs keep.
            assert_eq!(load16, load64, "{label} {name}: the routing changed under bf16");
            assert!(
                (l16 - l64).abs() <= l64.abs() * 2f64.powi(-8),
                "{label} {name}: loss {l16} vs {l64}"
            );
            assert!(
                err <= 0.05,
                "{label} {name}: a gradient is off by {err:.3e} relative"
            );
            assert!(
                err > 20.0 * f32_err,
                "{label} {name}: bf16 error {err:.2e} is f32's ({f32_err:.2e}): the products did not run in bf16"
            );
        }
    }
}

/// A short run's final validation loss, its products on `cpu`.
fn val_loss(
    cpu: &Faer<f32>,
    cfg: &ModelConfig,
    precision: Precision,
    seed: u64,
    steps: u64,
    shape: (usize, usize),
) -> f64 {
    let mut settings = RunSettings::new("mixed", cfg.clone(), OptimizerChoice::Muon);
    settings.steps = steps;
    settings.warmup = 3;
    (settings.batch, settings.seq) = shape;
    settings.seed = seed;
    settings.precision = precision;
    let mut opts = TrainOptions::new(settings);
    opts.eval_every = 0;
    opts.eval_batches = 4;
    let run = train::train(cpu, &opts).unwrap();
    run.summary.final_val_loss.unwrap()
}

#[test]
fn bf16_training_reaches_the_f32_validation_loss() {
    // Where the CPU has no bf16 unit, `--precision bf16` would train in f32 and prove
    // nothing: the run takes the AVX512-BF16 path's scalar model instead, whose bits the
    // hardware reproduces exactly (muon-faer's tests), so the same bf16 run is trained on
    // every machine.
    let unit = Bf16Kernel::detect();
    let cpu = match unit {
        Some(k) => {
            eprintln!("bf16 on this CPU's {k} unit");
            Faer::<f32>::with_threads(2)
        }
        None => {
            eprintln!("no AMX or AVX512-BF16 here: bf16 runs on the scalar model of AVX512-BF16");
            Faer::<f32>::with_threads(2)
                .with_bf16_kernel(Bf16Kernel::Avx512Bf16Model)
                .unwrap()
        }
    };
    // Tolerance. The per-step noise bf16 adds to the gradients (~1-2% relative, the test
    // above) is far below the minibatch noise of 4 x 16 tokens (tens of percent), so bf16
    // should cost nothing measurable at these lengths: the mean difference over the seeds is
    // held to 0.03 nats (under a third of the seed-to-seed spread of the final validation
    // loss: 2.56-2.67 on micro, 2.53-2.63 on tiny, 2.52-2.61 on small) and each seed to 0.1.
    // Measured: the differences are 0.0001-0.003 nats on micro and tiny, and -0.009 to
    // +0.018 on small (mean +0.002), whose loss still falls fast after 20 steps, so that a
    // small change to one step shows more. A broken bf16 path (a product not accumulated in
    // f32, a wrong rounding, a lost operand) moves it by much more or makes it NaN.
    // `small` too where a unit runs it: its optimizer orthogonalizes 26 GFLOP of expert
    // matrices a step, which the scalar model would take minutes over.
    let mut runs = vec![
        ("micro", ModelConfig::micro(), 40, (4, 16), &[1u64, 2, 3, 4][..]),
        ("tiny", ModelConfig::tiny(), 20, (4, 32), &[1, 2][..]),
    ];
    match unit {
        Some(_) => runs.push(("small", ModelConfig::small(), 20, (4, 32), &[1, 2, 3][..])),
        None => skip("small: no AMX or AVX512-BF16 unit to train it in bf16 (the scalar model is too slow)"),
    }
    for (label, cfg, steps, shape, seeds) in runs {
        let mut diffs = Vec::new();
        for &seed in seeds {
            let f = val_loss(&cpu, &cfg, Precision::F32, seed, steps, shape);
            let h = val_loss(&cpu, &cfg, Precision::Bf16, seed, steps, shape);
            eprintln!(
                "{label} seed {seed}: val loss f32 {f:.4}, bf16 {h:.4}, diff {:+.4}",
                h - f
            );
            assert!((h - f).abs() < 0.1, "{label} seed {seed}: bf16 {h} vs f32 {f}");
            diffs.push(h - f);
        }
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        assert!(
            mean.abs() < 0.03,
            "{label}: bf16 - f32 val loss {mean:+.4} on average"
        );
    }
}
