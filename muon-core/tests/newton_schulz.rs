//! Newton-Schulz against independent references: the exact polar factor `U V^T` from an f64
//! SVD (nalgebra), and the scalar map the iteration applies to each singular value.
//!
//! Why the scalar map is a reference: with `X = U diag(x) V^T`, every step gives
//! `a X + (b X X^T + c (X X^T)^2) X = U diag(a x + b x^3 + c x^5) V^T`, so NS keeps the singular
//! vectors and sends each normalized singular value `x_i = s_i / (||s|| + eps)` through the
//! per-step polynomials. So (1) the polar factor of the output equals that of the input, and
//! (2) the output's singular values equal the scalar iterates, both to f64 rounding.

mod common;

use common::{from_row_major, max_abs_diff, row_major, Rng};
use muon_core::nalgebra_backend::{polar_factor, singular_values, Nalgebra};
use muon_core::{
    newton_schulz, newton_schulz_folded, newton_schulz_generic, Backend, NewtonSchulz, NsWorkspace, Portable,
    Real, Shape,
};
use nalgebra::DMatrix;

/// Runs NS on `backend` for each matrix of `inputs` (same shape, stacked as one batch).
fn run_ns<B: Backend>(backend: &B, config: &NewtonSchulz, inputs: &[DMatrix<f64>]) -> Vec<DMatrix<f64>> {
    let (rows, cols) = inputs[0].shape();
    let shape = Shape::batched(inputs.len(), rows, cols);
    let mut ws = NsWorkspace::new(backend, shape).unwrap();
    let host: Vec<B::Elem> = inputs.iter().flat_map(row_major).map(B::Elem::from_f64).collect();
    backend.upload(&mut ws.x, &host).unwrap();
    newton_schulz(backend, config, &mut ws).unwrap();
    let mut out = vec![B::Elem::ZERO; shape.len()];
    backend.download(&ws.x, &mut out).unwrap();
    let out: Vec<f64> = out.iter().map(|v| v.to_f64()).collect();
    out.chunks(rows * cols)
        .map(|c| from_row_major(rows, cols, c))
        .collect()
}

/// Runs NS on one matrix.
fn ns_one<B: Backend>(backend: &B, config: &NewtonSchulz, input: &DMatrix<f64>) -> DMatrix<f64> {
    run_ns(backend, config, std::slice::from_ref(input)).remove(0)
}

/// The scalar iterate of one normalized singular value.
fn scalar_map(config: &NewtonSchulz, mut x: f64) -> f64 {
    for k in 0..config.steps {
        let [a, b, c] = config.coefficients_at(k);
        x = a * x + b * x.powi(3) + c * x.powi(5);
    }
    x
}

/// The range of the scalar map over normalized inputs in [lo, 1] (fine log grid).
fn band(config: &NewtonSchulz, lo: f64) -> (f64, f64) {
    let n = 20_000;
    (0..=n)
        .map(|i| {
            scalar_map(
                config,
                lo * (1.0 / lo).powf(i as f64 / n as f64) / config.norm_scale,
            )
        })
        .fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)))
}

/// Singular values after NS predicted by the scalar map, descending (the map is not
/// monotone, so the order can change).
fn predicted(config: &NewtonSchulz, input: &DMatrix<f64>) -> Vec<f64> {
    let s = singular_values(input);
    let norm = s.iter().map(|v| v * v).sum::<f64>().sqrt();
    let mut out: Vec<f64> = s
        .iter()
        .map(|v| scalar_map(config, v / (config.norm_scale * norm + config.eps)))
        .collect();
    out.sort_by(|a, b| b.total_cmp(a));
    out
}

/// A spectrum with condition number `cond`, log-spaced.
fn log_spectrum(k: usize, cond: f64) -> Vec<f64> {
    (0..k)
        .map(|i| cond.powf(-(i as f64) / (k.max(2) - 1) as f64))
        .collect()
}

const SHAPES: [(usize, usize); 7] = [
    (32, 32),
    (16, 48),
    (48, 16),
    (1, 40),
    (40, 1),
    (17, 129),
    (129, 17),
];

#[test]
fn quintic_keeps_the_polar_factor_and_follows_the_scalar_map() {
    let config = NewtonSchulz::quintic();
    let mut rng = Rng::new(1);
    for (rows, cols) in SHAPES {
        let k = rows.min(cols);
        let input = rng.with_spectrum(rows, cols, &log_spectrum(k, 10.0));
        for (name, out) in [
            ("portable", ns_one(&Portable::<f64>::new(), &config, &input)),
            ("nalgebra", ns_one(&Nalgebra::<f64>::new(), &config, &input)),
        ] {
            // f64: both sides are computed to ~1e-15 relative; 1e-10 leaves room for the SVD.
            let polar_err = max_abs_diff(&row_major(&polar_factor(&out)), &row_major(&polar_factor(&input)));
            assert!(
                polar_err < 1e-10,
                "{name} {rows}x{cols}: polar factor off by {polar_err}"
            );
            let sv_err = max_abs_diff(&singular_values(&out), &predicted(&config, &input));
            assert!(
                sv_err < 1e-10,
                "{name} {rows}x{cols}: singular values off by {sv_err}"
            );
        }
    }
}

#[test]
fn quintic_singular_values_land_in_the_documented_band() {
    // Over normalized inputs in [1e-2, 1] the 5-step quintic maps into [0.6818, 1.1344]
    // (computed here from the polynomial, not assumed); docs/DESIGN.md §2: "[0.682, 1.134]".
    let config = NewtonSchulz::quintic();
    let (lo, hi) = band(&config, 1e-2);
    assert!(lo > 0.68 && hi < 1.14, "quintic band [{lo}, {hi}]");
    let mut rng = Rng::new(2);
    for (rows, cols) in SHAPES {
        // Condition 10 keeps every normalized singular value above 1e-2 for k <= 129
        // (x_min = 1 / ||s|| >= 1 / sqrt(k) / ... >= 0.017 here).
        let input = rng.with_spectrum(rows, cols, &log_spectrum(rows.min(cols), 10.0));
        let out = ns_one(&Portable::<f64>::new(), &config, &input);
        for s in singular_values(&out) {
            assert!(
                (lo - 1e-9..=hi + 1e-9).contains(&s),
                "{rows}x{cols}: singular value {s} outside [{lo}, {hi}]"
            );
        }
    }
}

#[test]
fn ill_conditioned_input_follows_the_scalar_map() {
    // Singular values spanning 1e-6..1: the small ones cannot reach the band in 5 steps (each
    // step multiplies a tiny value by about a = 3.4445, so 5 steps by ~486). The iteration
    // must still be exactly the scalar map, and the well-scaled part must be in the band.
    let config = NewtonSchulz::quintic();
    let mut rng = Rng::new(3);
    let input = rng.with_spectrum(24, 40, &log_spectrum(24, 1e6));
    let out = ns_one(&Portable::<f64>::new(), &config, &input);
    let (got, want) = (singular_values(&out), predicted(&config, &input));
    assert!(max_abs_diff(&got, &want) < 1e-10, "got {got:?}\nwant {want:?}");
    let norm = singular_values(&input).iter().map(|v| v * v).sum::<f64>().sqrt();
    let (lo, hi) = band(&config, 1e-2);
    for s_in in singular_values(&input) {
        let s_out = scalar_map(&config, s_in / (norm + config.eps));
        if s_in / norm >= 1e-2 {
            assert!((lo - 1e-9..=hi + 1e-9).contains(&s_out));
        } else if s_in / norm < 1e-3 {
            // Below ~1.4e-3 the five steps' growth (~486x at most) cannot reach 0.68.
            assert!(
                s_out < lo,
                "an input of {} should not have converged",
                s_in / norm
            );
        }
    }
    let polar_err = max_abs_diff(&row_major(&polar_factor(&out)), &row_major(&polar_factor(&input)));
    assert!(polar_err < 1e-8, "polar factor off by {polar_err}");
}

#[test]
fn polar_express_lands_closer_to_one_than_the_quintic() {
    let quintic = NewtonSchulz::quintic();
    let polar = NewtonSchulz::polar_express();
    // Over the same input range, Polar Express's band is [0.8589, 1.1411]: a worst-case
    // distance to 1 of 0.141 against the quintic's 0.318.
    let (q_lo, q_hi) = band(&quintic, 1e-2);
    let (p_lo, p_hi) = band(&polar, 1e-2);
    let worst = |lo: f64, hi: f64| (1.0 - lo).max(hi - 1.0);
    assert!(worst(p_lo, p_hi) < 0.15 && worst(q_lo, q_hi) > 0.3);
    let mut rng = Rng::new(4);
    for (rows, cols) in SHAPES {
        let input = rng.with_spectrum(rows, cols, &log_spectrum(rows.min(cols), 10.0));
        let dist = |c: &NewtonSchulz| {
            let out = ns_one(&Portable::<f64>::new(), c, &input);
            let got = singular_values(&out);
            assert!(max_abs_diff(&got, &predicted(c, &input)) < 1e-10);
            got.iter().map(|s| (s - 1.0).abs()).fold(0.0, f64::max)
        };
        let (dq, dp) = (dist(&quintic), dist(&polar));
        assert!(dp <= 0.15, "{rows}x{cols}: polar express max |s-1| = {dp}");
        // A single singular value (1xN) is mapped to p(1) by both: compare only k > 1.
        if rows.min(cols) > 1 {
            assert!(
                dp < dq,
                "{rows}x{cols}: polar express {dp} not closer than quintic {dq}"
            );
        }
    }
}

#[test]
fn polar_express_meets_dions_acceptance_test_in_f32() {
    // microsoft/dion accepts max |X X^T - I| < 0.15 after Polar Express on Gaussian 64x128
    // and 128x128 inputs; here in f32 on the portable backend.
    let mut rng = Rng::new(5);
    for (rows, cols) in [(64, 128), (128, 128)] {
        let input = rng.gaussian(rows, cols);
        let out = ns_one(&Portable::<f32>::new(), &NewtonSchulz::polar_express(), &input);
        let gram = &out * out.transpose();
        let err = (gram - DMatrix::<f64>::identity(rows, rows)).abs().max();
        assert!(err < 0.15, "{rows}x{cols}: max |X X^T - I| = {err}");
    }
}

#[test]
fn f32_agrees_with_the_f64_iteration() {
    // f32 rounding (6e-8 relative) grows through 5 steps of 3 GEMMs with coefficients up to
    // ~5 and sums over k <= 129 terms: entries of O are ~1/sqrt(max side) and agree to 1e-4
    // absolute, a margin of ~10x over what we observe.
    let config = NewtonSchulz::quintic();
    let mut rng = Rng::new(6);
    for (rows, cols) in SHAPES {
        let input = rng.gaussian(rows, cols);
        let exact = ns_one(&Portable::<f64>::new(), &config, &input);
        let single = ns_one(&Portable::<f32>::new(), &config, &input);
        let err = max_abs_diff(&row_major(&exact), &row_major(&single));
        assert!(err < 1e-4, "{rows}x{cols}: f32 vs f64 {err}");
    }
}

#[test]
fn tall_input_is_the_transpose_of_the_wide_case() {
    let config = NewtonSchulz::polar_express();
    let mut rng = Rng::new(7);
    let wide = rng.gaussian(12, 30);
    let out_wide = ns_one(&Portable::<f64>::new(), &config, &wide);
    let out_tall = run_ns(&Portable::<f64>::new(), &config, &[wide.transpose()]).remove(0);
    assert!(max_abs_diff(&row_major(&out_wide.transpose()), &row_major(&out_tall)) < 1e-12);
}

#[test]
fn a_batch_equals_its_matrices_one_by_one() {
    // Each matrix of a stack has its own normalization: scaling one must not change another.
    let config = NewtonSchulz::quintic();
    let mut rng = Rng::new(8);
    let items: Vec<DMatrix<f64>> = (0..4).map(|i| rng.gaussian(9, 14) * (10f64).powi(i)).collect();
    for backend_name in ["portable", "nalgebra"] {
        let batched = match backend_name {
            "portable" => run_ns(&Portable::<f64>::new(), &config, &items),
            _ => run_ns(&Nalgebra::<f64>::new(), &config, &items),
        };
        for (item, out) in items.iter().zip(&batched) {
            let alone = run_ns(&Portable::<f64>::new(), &config, std::slice::from_ref(item)).remove(0);
            assert!(
                max_abs_diff(&row_major(out), &row_major(&alone)) < 1e-12,
                "{backend_name}"
            );
        }
    }
}

#[test]
fn per_step_schedules_reuse_their_last_entry() {
    let mut config = NewtonSchulz::dion();
    assert_eq!(config.coefficients_at(0), muon_core::DION[0]);
    assert_eq!(config.coefficients_at(9), muon_core::DION[4]);
    config.steps = 7;
    let mut rng = Rng::new(9);
    let input = rng.with_spectrum(10, 20, &log_spectrum(10, 10.0));
    let out = ns_one(&Portable::<f64>::new(), &config, &input);
    assert!(max_abs_diff(&singular_values(&out), &predicted(&config, &input)) < 1e-10);
}

#[test]
fn bad_configurations_are_refused() {
    let mut c = NewtonSchulz::quintic();
    c.steps = 0;
    assert!(c.validate().is_err());
    let mut c = NewtonSchulz::quintic();
    c.coefficients.clear();
    assert!(c.validate().is_err());
    let mut c = NewtonSchulz::quintic();
    c.eps = f64::NAN;
    assert!(c.validate().is_err());
    let mut c = NewtonSchulz::quintic();
    c.norm_scale = 0.5;
    assert!(c.validate().unwrap_err().to_string().contains("norm_scale"));
    assert!(NsWorkspace::new(&Portable::<f32>::new(), Shape::matrix(0, 3)).is_err());
}

#[test]
fn flop_count_matches_the_design_notes() {
    // docs/DESIGN.md §2: per step 2 m m n + 2 m m m + 2 m m n, m = min, n = max; batches multiply.
    let c = NewtonSchulz::quintic();
    assert_eq!(
        c.flops(Shape::matrix(1024, 4096)),
        5.0 * (4.0 * 1024f64.powi(2) * 4096.0 + 2.0 * 1024f64.powi(3))
    );
    assert_eq!(
        c.flops(Shape::batched(64, 352, 128)),
        64.0 * c.flops(Shape::matrix(128, 352))
    );
}

#[test]
fn the_folded_iteration_equals_the_generic_one() {
    // `(a I + P) X` and `a X + P X` are the same product up to rounding: in f64 the two
    // routines agree to ~1e-15 per entry after 5 steps (slopes of the quintic below 3.5).
    let cpu = Portable::<f64>::new();
    let mut rng = Rng::new(11);
    for (rows, cols, batch) in [(9, 14, 3), (14, 9, 2), (1, 40, 1), (40, 1, 1), (16, 16, 2)] {
        for config in [NewtonSchulz::quintic(), NewtonSchulz::polar_express()] {
            let shape = Shape::batched(batch, rows, cols);
            let input: Vec<f64> = (0..batch)
                .flat_map(|_| row_major(&rng.gaussian(rows, cols)))
                .collect();
            let run = |folded: bool| {
                let mut ws = NsWorkspace::new(&cpu, shape).unwrap();
                cpu.upload(&mut ws.x, &input).unwrap();
                if folded {
                    let m = rows.min(cols);
                    newton_schulz_folded(&cpu, &config, &mut ws, |p, a| {
                        for item in p.as_mut_slice().chunks_exact_mut(m * m) {
                            (0..m).for_each(|i| item[i * m + i] += a);
                        }
                        Ok(())
                    })
                    .unwrap();
                } else {
                    newton_schulz_generic(&cpu, &config, &mut ws).unwrap();
                }
                ws.x.as_slice().to_vec()
            };
            let (folded, generic) = (run(true), run(false));
            let diff = folded
                .iter()
                .zip(&generic)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-12, "{shape}: folded and generic differ by {diff}");
        }
    }
}
