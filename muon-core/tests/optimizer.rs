//! Muon, AdamW and the hybrid optimizer against hand-computed steps, plus errors, state
//! round trips and schedules.

mod common;

use muon_core::LrSchedule;

#[test]
fn warmup_cosine_hits_its_landmarks() {
    let s = LrSchedule::moonlight(10, 110);
    assert!((s.factor(0) - 1.0 / 11.0).abs() < 1e-15);
    assert_eq!(s.factor(10), 1.0);
    // Half-way through the decay the cosine is at the mean of 1 and the floor.
    assert!((s.factor(60) - 0.55).abs() < 1e-12);
    assert!((s.factor(110) - 0.1).abs() < 1e-15);
    assert!((s.factor(10_000) - 0.1).abs() < 1e-15);
    assert!((s.lr(4.2e-4, 110) - 4.2e-5).abs() < 1e-18);
}

use common::{from_row_major, max_abs_diff, row_major, Rng};
use muon_core::{
    adamw_step, muon_step, AdamWConfig, Backend, Error, HostMatrix, HybridConfig, HybridOptimizer,
    MuonConfig, NewtonSchulz, NsWorkspace, OptimizerKind, OptimizerState, ParamRole, ParamSpec, Portable,
    Shape, UpdateScale,
};
use nalgebra::DMatrix;

type P64 = Portable<f64>;

fn host(shape: Shape, data: Vec<f64>) -> HostMatrix<f64> {
    HostMatrix::from_vec(shape, data).unwrap()
}

/// Newton-Schulz written independently, straight from docs/DESIGN.md §2, with an explicit
/// transpose for tall matrices.
fn ns_reference(n: &DMatrix<f64>, config: &NewtonSchulz) -> DMatrix<f64> {
    let tall = n.nrows() > n.ncols();
    let mut x = if tall { n.transpose() } else { n.clone() };
    x /= config.norm_scale * x.norm() + config.eps;
    for k in 0..config.steps {
        let [a, b, c] = config.coefficients_at(k);
        let s = &x * x.transpose();
        let p = &s * b + &s * &s * c;
        x = &x * a + p * &x;
    }
    if tall {
        x.transpose()
    } else {
        x
    }
}

#[test]
fn one_muon_step_matches_the_formulas_by_hand() {
    let backend = P64::new();
    let mut rng = Rng::new(10);
    for (rows, cols) in [(5, 3), (3, 5)] {
        for nesterov in [true, false] {
            for wd in [0.0, 0.1] {
                let shape = Shape::matrix(rows, cols);
                let (w0, g, m0) = (
                    rng.gaussian(rows, cols),
                    rng.gaussian(rows, cols),
                    rng.gaussian(rows, cols),
                );
                let config = MuonConfig {
                    nesterov,
                    weight_decay: wd,
                    ..MuonConfig::default()
                };
                let (lr, mu) = (0.02, 0.95);

                let mut param = host(shape, row_major(&w0));
                let mut momentum = host(shape, row_major(&m0));
                let mut ws = NsWorkspace::new(&backend, shape).unwrap();
                muon_step(
                    &backend,
                    &mut param,
                    &host(shape, row_major(&g)),
                    &mut momentum,
                    &mut ws,
                    &config,
                    lr,
                )
                .unwrap();

                // docs/DESIGN.md §1, by hand.
                let m1 = &m0 * mu + &g;
                let n = if nesterov { &m1 * mu + &g } else { m1.clone() };
                let o = ns_reference(&n, &config.newton_schulz);
                let scale = 0.2 * (rows.max(cols) as f64).sqrt();
                let w1 = &w0 * (1.0 - lr * wd) - o * (lr * scale);

                let what = format!("{rows}x{cols} nesterov={nesterov} wd={wd}");
                assert!(
                    max_abs_diff(momentum.as_slice(), &row_major(&m1)) < 1e-14,
                    "momentum {what}"
                );
                assert!(
                    max_abs_diff(param.as_slice(), &row_major(&w1)) < 1e-12,
                    "param {what}"
                );
            }
        }
    }
}

#[test]
fn update_scale_rules_follow_their_formulas() {
    assert!((UpdateScale::MatchAdamW { rms: 0.2 }.factor(2048, 1408) - 0.2 * 2048f64.sqrt()).abs() < 1e-12);
    assert!((UpdateScale::AspectRatio.factor(400, 100) - 2.0).abs() < 1e-15);
    assert_eq!(UpdateScale::AspectRatio.factor(100, 400), 1.0);
    assert_eq!(UpdateScale::Unit.factor(7, 9), 1.0);
    assert_eq!(UpdateScale::Custom(0.3).factor(7, 9), 0.3);
}

#[test]
fn match_adamw_makes_the_update_rms_about_0_2() {
    // RMS(scale * O) = 0.2 * sqrt(sum p(x_i)^2 / min(A,B)), with p the 5-step scalar map of
    // the normalized singular values x_i (see tests/newton_schulz.rs). So the update RMS is
    // 0.2 times the RMS of O's singular values: predicted here from an f64 SVD of the gradient
    // and asserted to 1e-4 (f32 rounding of O's entries, ~1e-6, is far below that), and in
    // 0.2 * [0.68, 1.14], the quintic's band. Measured: 0.164-0.174, i.e. the quintic leaves
    // singular values near 0.85 on average for Gaussian gradients, not exactly 1.
    let backend = Portable::<f32>::new();
    let ns = NewtonSchulz::quintic();
    let mut rng = Rng::new(11);
    for shape in [
        Shape::matrix(64, 64),
        Shape::matrix(32, 128),
        Shape::matrix(128, 32),
        Shape::batched(4, 48, 96),
    ] {
        let specs = vec![ParamSpec::new("w", shape, ParamRole::Hidden)];
        let mut opt = HybridOptimizer::new(&backend, specs, HybridConfig::default()).unwrap();
        let grad = rng.normals(shape.len());
        let grad32: Vec<f32> = grad.iter().map(|&v| v as f32).collect();
        let mut params = vec![HostMatrix::zeros(shape)];
        opt.step(
            &backend,
            &mut params,
            &[HostMatrix::from_vec(shape, grad32).unwrap()],
            0.01,
        )
        .unwrap();
        let mut rms = [0.0];
        opt.update_rms(&backend, &mut rms).unwrap();

        let mut sum_sq = 0.0;
        for item in grad.chunks(shape.rows * shape.cols) {
            let g = from_row_major(shape.rows, shape.cols, item);
            let s: Vec<f64> = g.singular_values().iter().copied().collect();
            let norm = s.iter().map(|v| v * v).sum::<f64>().sqrt();
            sum_sq += s
                .iter()
                .map(|v| scalar_map(&ns, v / (norm + ns.eps)).powi(2))
                .sum::<f64>();
        }
        let predicted = 0.2 * (sum_sq / (shape.batch * shape.min_side()) as f64).sqrt();
        assert!(
            (rms[0] - predicted).abs() < 1e-4,
            "{shape}: update rms {} vs predicted {predicted}",
            rms[0]
        );
        assert!(
            (0.2 * 0.68..0.2 * 1.14).contains(&rms[0]),
            "{shape}: update rms {}",
            rms[0]
        );
        // And the parameter moved by exactly lr times that RMS (it started at zero).
        let moved = params[0]
            .as_slice()
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            / shape.len() as f64;
        assert!((moved.sqrt() - 0.01 * rms[0]).abs() < 1e-6);
    }
}

fn scalar_map(config: &NewtonSchulz, mut x: f64) -> f64 {
    for k in 0..config.steps {
        let [a, b, c] = config.coefficients_at(k);
        x = a * x + b * x.powi(3) + c * x.powi(5);
    }
    x
}

#[test]
fn adamw_matches_two_steps_by_hand() {
    let backend = P64::new();
    let config = AdamWConfig::default();
    let (lr, shape) = (0.1, Shape::vector(4));
    let w0 = [0.5, -1.0, 2.0, 0.0];
    let grads = [[0.1, -0.2, 3.0, 0.0], [-0.3, 0.1, 2.0, 1e-3]];
    let mut param = host(shape, w0.to_vec());
    let (mut m, mut v, mut dir) = (
        host(shape, vec![0.0; 4]),
        host(shape, vec![0.0; 4]),
        host(shape, vec![0.0; 4]),
    );
    for (t, g) in grads.iter().enumerate() {
        let g = host(shape, g.to_vec());
        adamw_step(
            &backend,
            &mut param,
            &g,
            &mut m,
            &mut v,
            &mut dir,
            &config,
            t as u64 + 1,
            lr,
        )
        .unwrap();
    }
    for i in 0..4 {
        let (b1, b2, eps, wd) = (0.9f64, 0.95f64, 1e-8, 0.1);
        let (mut w, mut mi, mut vi) = (w0[i], 0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            mi = b1 * mi + (1.0 - b1) * g[i];
            vi = b2 * vi + (1.0 - b2) * g[i] * g[i];
            let update = (mi / (1.0 - b1.powi(t))) / ((vi / (1.0 - b2.powi(t))).sqrt() + eps);
            w = w * (1.0 - lr * wd) - lr * update;
        }
        assert!(
            (param.as_slice()[i] - w).abs() < 1e-14,
            "element {i}: {} vs {w}",
            param.as_slice()[i]
        );
        assert!((m.as_slice()[i] - mi).abs() < 1e-15 && (v.as_slice()[i] - vi).abs() < 1e-15);
    }
}

/// A model-like parameter list: hidden matrices, an expert stack, an embedding, a norm gain.
fn specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("embed", Shape::matrix(16, 8), ParamRole::Embedding),
        ParamSpec::new("wq", Shape::matrix(8, 8), ParamRole::Hidden),
        ParamSpec::new("experts.w_up", Shape::batched(3, 12, 8), ParamRole::Hidden),
        ParamSpec::new("norm", Shape::vector(8), ParamRole::Norm),
        ParamSpec::new("wo", Shape::matrix(8, 8), ParamRole::Hidden),
    ]
}

fn random_tensors(rng: &mut Rng, specs: &[ParamSpec], scale: f64) -> Vec<HostMatrix<f64>> {
    specs
        .iter()
        .map(|s| {
            host(
                s.shape,
                rng.normals(s.shape.len()).iter().map(|v| v * scale).collect(),
            )
        })
        .collect()
}

#[test]
fn roles_route_to_the_right_optimizer() {
    let kinds: Vec<OptimizerKind> = specs().iter().map(|s| s.optimizer()).collect();
    use OptimizerKind::*;
    assert_eq!(kinds, [AdamW, Muon, Muon, AdamW, Muon]);
    assert_eq!(
        ParamSpec::new("b", Shape::vector(8), ParamRole::Hidden).optimizer(),
        AdamW
    );
    assert_eq!(
        ParamSpec::new("head", Shape::matrix(8, 8), ParamRole::LmHead).optimizer(),
        AdamW
    );
    let forced = ParamSpec::new("wq", Shape::matrix(8, 8), ParamRole::Hidden).with_optimizer(AdamW);
    assert_eq!(forced.optimizer(), AdamW);
}

#[test]
fn the_hybrid_step_equals_its_parts() {
    // Two hybrid steps equal muon_step / adamw_step applied to each parameter by hand.
    let backend = P64::new();
    let mut rng = Rng::new(12);
    let specs = specs();
    let config = HybridConfig::default();
    let mut opt = HybridOptimizer::new(&backend, specs.clone(), config.clone()).unwrap();
    let mut params = random_tensors(&mut rng, &specs, 1.0);
    let mut expected = params.clone();
    let mut states: Vec<Vec<HostMatrix<f64>>> = specs
        .iter()
        .map(|s| vec![HostMatrix::zeros(s.shape), HostMatrix::zeros(s.shape)])
        .collect();
    for t in 1..=2u64 {
        let grads = random_tensors(&mut rng, &specs, 1.0);
        let report = opt.step(&backend, &mut params, &grads, 0.05).unwrap();
        assert_eq!(report.step, t);
        let norm: f64 = grads
            .iter()
            .flat_map(|g| g.as_slice())
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt();
        assert!((report.grad_norm - norm).abs() < 1e-12 * norm);
        for (i, spec) in specs.iter().enumerate() {
            let [a, b] = &mut states[i][..] else {
                unreachable!()
            };
            if spec.optimizer() == OptimizerKind::Muon {
                let mut ws = NsWorkspace::new(&backend, spec.shape).unwrap();
                muon_step(
                    &backend,
                    &mut expected[i],
                    &grads[i],
                    a,
                    &mut ws,
                    &config.muon,
                    0.05,
                )
                .unwrap();
            } else {
                let mut dir = HostMatrix::zeros(spec.shape);
                adamw_step(
                    &backend,
                    &mut expected[i],
                    &grads[i],
                    a,
                    b,
                    &mut dir,
                    &config.adamw,
                    t,
                    0.05,
                )
                .unwrap();
            }
        }
    }
    for (i, (p, e)) in params.iter().zip(&expected).enumerate() {
        assert_eq!(p.as_slice(), e.as_slice(), "parameter {i}");
    }
}

#[test]
fn the_state_round_trips_through_serde_exactly() {
    let backend = Portable::<f32>::new();
    let mut rng = Rng::new(13);
    let specs = specs();
    let to32 = |v: Vec<HostMatrix<f64>>| -> Vec<HostMatrix<f32>> {
        v.iter()
            .map(|m| {
                HostMatrix::from_vec(m.shape(), m.as_slice().iter().map(|&x| x as f32).collect()).unwrap()
            })
            .collect()
    };
    let mut opt = HybridOptimizer::new(&backend, specs.clone(), HybridConfig::default()).unwrap();
    let mut params = to32(random_tensors(&mut rng, &specs, 1.0));
    for _ in 0..3 {
        let grads = to32(random_tensors(&mut rng, &specs, 1.0));
        opt.step(&backend, &mut params, &grads, 0.01).unwrap();
    }
    let state = opt.export_state(&backend).unwrap();
    let json = serde_json::to_string(&state).unwrap();
    let back: OptimizerState<f32> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let mut restored = HybridOptimizer::new(&backend, specs.clone(), HybridConfig::default()).unwrap();
    restored.import_state(&backend, &back).unwrap();
    assert_eq!(restored.steps_taken(), 3);
    let grads = to32(random_tensors(&mut rng, &specs, 1.0));
    let mut params2 = params.clone();
    opt.step(&backend, &mut params, &grads, 0.01).unwrap();
    restored.step(&backend, &mut params2, &grads, 0.01).unwrap();
    assert_eq!(params, params2, "a restored optimizer must continue bit for bit");

    // State for another parameter list is refused with a message naming the parameter.
    let mut other = specs.clone();
    other[1].shape = Shape::matrix(8, 4);
    let mut wrong = HybridOptimizer::new(&backend, other, HybridConfig::default()).unwrap();
    let err = wrong.import_state(&backend, &back).unwrap_err();
    assert!(
        matches!(err, Error::InvalidState(ref m) if m.contains("wq")),
        "{err}"
    );
}

#[test]
fn a_non_finite_gradient_is_refused_and_nothing_changes() {
    let backend = P64::new();
    let mut rng = Rng::new(14);
    let specs = specs();
    let mut opt = HybridOptimizer::new(&backend, specs.clone(), HybridConfig::default()).unwrap();
    let mut params = random_tensors(&mut rng, &specs, 1.0);
    opt.step(
        &backend,
        &mut params,
        &random_tensors(&mut rng, &specs, 1.0),
        0.01,
    )
    .unwrap();
    for bad in [f64::NAN, f64::INFINITY, 1e200] {
        let (params_before, state_before) = (params.clone(), opt.export_state(&backend).unwrap());
        let mut grads = random_tensors(&mut rng, &specs, 1.0);
        grads[2].as_mut_slice()[7] = bad;
        let err = opt.step(&backend, &mut params, &grads, 0.01).unwrap_err();
        assert_eq!(
            err,
            Error::NonFiniteGradient {
                index: 2,
                name: "experts.w_up".into()
            },
            "{bad}"
        );
        assert!(err.to_string().contains("experts.w_up"));
        assert_eq!(params, params_before);
        assert_eq!(opt.export_state(&backend).unwrap(), state_before);
    }
}

#[test]
fn an_f32_gradient_whose_squared_norm_overflows_f32_is_stepped() {
    // One entry of 1e20: its square (1e40) is past f32::MAX (3.4e38), its norm is not. The
    // norm is computed in f64 and stored as a norm, so the step is taken; Muon normalizes the
    // momentum and AdamW divides by sqrt(v), so the parameters stay finite.
    let backend = muon_core::Portable::<f32>::new();
    let specs = vec![
        ParamSpec::new("w", Shape::matrix(8, 6), ParamRole::Hidden),
        ParamSpec::new("norm", Shape::vector(6), ParamRole::Norm),
    ];
    let mut opt = HybridOptimizer::new(&backend, specs.clone(), HybridConfig::default()).unwrap();
    let mut params: Vec<HostMatrix<f32>> = specs.iter().map(|s| HostMatrix::zeros(s.shape)).collect();
    let mut grads: Vec<HostMatrix<f32>> = specs
        .iter()
        .map(|s| HostMatrix::from_vec(s.shape, vec![0.5; s.shape.len()]).unwrap())
        .collect();
    grads[0].as_mut_slice()[3] = 1e20;
    grads[1].as_mut_slice()[0] = -1e20;
    let report = opt.step(&backend, &mut params, &grads, 0.01).unwrap();
    let want = (2.0f64 * 1e40).sqrt();
    assert!(
        (report.grad_norm - want).abs() < 1e-6 * want,
        "grad norm {}",
        report.grad_norm
    );
    assert!(params.iter().all(|p| p.as_slice().iter().all(|v| v.is_finite())));
    // A norm past f32's range is still refused, with the parameter named.
    grads[0].as_mut_slice().fill(3e38);
    let err = opt.step(&backend, &mut params, &grads, 0.01).unwrap_err();
    assert_eq!(
        err,
        Error::NonFiniteGradient {
            index: 0,
            name: "w".into()
        }
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let backend = P64::new();
    let mut rng = Rng::new(15);
    let specs = specs();
    let mut opt = HybridOptimizer::new(&backend, specs.clone(), HybridConfig::default()).unwrap();
    let mut params = random_tensors(&mut rng, &specs, 1.0);
    let grads = random_tensors(&mut rng, &specs, 1.0);

    let err = opt.step(&backend, &mut params[..4], &grads, 0.01).unwrap_err();
    assert_eq!(
        err,
        Error::CountMismatch {
            what: "parameters",
            expected: 5,
            found: 4
        }
    );
    let mut short = grads.clone();
    short.pop();
    assert!(matches!(
        opt.step(&backend, &mut params, &short, 0.01),
        Err(Error::CountMismatch {
            what: "gradients",
            ..
        })
    ));

    let mut wrong = grads.clone();
    wrong[4] = HostMatrix::zeros(Shape::matrix(4, 8));
    let err = opt.step(&backend, &mut params, &wrong, 0.01).unwrap_err();
    assert_eq!(
        err.to_string(),
        "shape mismatch for gradient of `wo`: expected 8x8, found 4x8"
    );
    assert!(opt.step(&backend, &mut params, &grads, f64::NAN).is_err());
    assert_eq!(opt.steps_taken(), 0, "refused steps do not count");

    let empty = vec![ParamSpec::new("w", Shape::matrix(0, 4), ParamRole::Hidden)];
    assert!(matches!(
        HybridOptimizer::new(&backend, empty, HybridConfig::default()),
        Err(Error::EmptyMatrix { .. })
    ));
    let mut config = HybridConfig::default();
    config.muon.momentum = 1.0;
    assert!(HybridOptimizer::new(&backend, specs.clone(), config).is_err());
    let mut config = HybridConfig::default();
    config.adamw.beta2 = -0.1;
    assert!(HybridOptimizer::new(&backend, specs.clone(), config).is_err());
    let mut config = HybridConfig::default();
    config.muon.update_scale = UpdateScale::MatchAdamW { rms: 0.0 };
    assert!(HybridOptimizer::new(&backend, specs, config).is_err());
}

/// 0.5 * mean squared residual of W X - Y, and its gradient (W X - Y) X^T / n.
fn least_squares(w: &DMatrix<f64>, x: &DMatrix<f64>, y: &DMatrix<f64>) -> (f64, DMatrix<f64>) {
    let n = x.ncols() as f64;
    let r = w * x - y;
    (0.5 * r.norm_squared() / n, r * x.transpose() / n)
}

#[test]
fn muon_and_adamw_both_solve_a_least_squares_problem() {
    // Recover W* (8x16) from 64 noiseless samples: minimum loss 0. Both optimizers must cut the
    // loss by 1000x in 300 steps of warm-up + cosine decay (wd 0 so the optimum stays W*).
    let mut rng = Rng::new(16);
    let (x, w_star) = (rng.gaussian(16, 64), rng.gaussian(8, 16));
    let y = &w_star * &x;
    let shape = Shape::matrix(8, 16);
    let schedule = LrSchedule::WarmupCosine {
        warmup: 10,
        total: 300,
        floor: 0.01,
    };
    for kind in [OptimizerKind::Muon, OptimizerKind::AdamW] {
        let backend = P64::new();
        let spec = ParamSpec::new("w", shape, ParamRole::Hidden).with_optimizer(kind);
        let mut config = HybridConfig::default();
        config.muon.weight_decay = 0.0;
        config.adamw.weight_decay = 0.0;
        let mut opt = HybridOptimizer::new(&backend, vec![spec], config).unwrap();
        let mut params = vec![host(shape, vec![0.0; shape.len()])];
        let initial = least_squares(&DMatrix::zeros(8, 16), &x, &y).0;
        let mut loss = initial;
        for step in 0..300 {
            let w = from_row_major(8, 16, params[0].as_slice());
            let (l, grad) = least_squares(&w, &x, &y);
            loss = l;
            opt.step(
                &backend,
                &mut params,
                &[host(shape, row_major(&grad))],
                schedule.lr(0.1, step),
            )
            .unwrap();
        }
        assert!(loss < initial * 1e-3, "{kind:?}: loss {initial} -> {loss}");
    }
}

#[test]
fn warmup_stable_decay_is_flat_then_linear() {
    let s = LrSchedule::WarmupStableDecay {
        warmup: 4,
        total: 100,
        decay: 20,
        floor: 0.0,
    };
    assert_eq!(s.factor(3), 0.8);
    assert_eq!(s.factor(50), 1.0);
    assert_eq!(s.factor(79), 1.0);
    assert!((s.factor(90) - 0.5).abs() < 1e-15);
    assert_eq!(s.factor(100), 0.0);
    assert!(LrSchedule::WarmupStableDecay {
        warmup: 90,
        total: 100,
        decay: 20,
        floor: 0.0
    }
    .validate()
    .is_err());
    assert!(LrSchedule::WarmupCosine {
        warmup: 1,
        total: 10,
        floor: 2.0
    }
    .validate()
    .is_err());
    assert!(LrSchedule::Constant.validate().is_ok());
}

#[test]
fn portable_and_nalgebra_backends_agree_on_every_primitive() {
    use muon_core::nalgebra_backend::Nalgebra;
    use muon_core::{AdamWCoefficients, Transpose};
    let (p, n) = (P64::new(), Nalgebra::<f64>::new());
    let mut rng = Rng::new(17);
    let mut both = |shape: Shape| {
        let data = rng.normals(shape.len());
        let mut a = p.zeros(shape).unwrap();
        let mut b = n.zeros(shape).unwrap();
        p.upload(&mut a, &data).unwrap();
        n.upload(&mut b, &data).unwrap();
        (a, b)
    };
    let check = |a: &HostMatrix<f64>, b: &<Nalgebra<f64> as Backend>::Matrix, what: &str| {
        let mut host_b = vec![0.0; a.as_slice().len()];
        n.download(b, &mut host_b).unwrap();
        assert!(max_abs_diff(a.as_slice(), &host_b) < 1e-12, "{what}");
    };
    for (ta, tb) in [
        (Transpose::No, Transpose::No),
        (Transpose::Yes, Transpose::No),
        (Transpose::No, Transpose::Yes),
        (Transpose::Yes, Transpose::Yes),
    ] {
        let (m, k, nn) = (5, 7, 3);
        let sa = match ta {
            Transpose::No => Shape::batched(2, m, k),
            Transpose::Yes => Shape::batched(2, k, m),
        };
        let sb = match tb {
            Transpose::No => Shape::batched(2, k, nn),
            Transpose::Yes => Shape::batched(2, nn, k),
        };
        let (a1, a2) = both(sa);
        let (b1, b2) = both(sb);
        let (mut c1, mut c2) = both(Shape::batched(2, m, nn));
        p.gemm(&mut c1, 0.7, &a1, ta, &b1, tb, -1.5).unwrap();
        n.gemm(&mut c2, 0.7, &a2, ta, &b2, tb, -1.5).unwrap();
        check(&c1, &c2, &format!("gemm {ta:?} {tb:?}"));
    }
    let shape = Shape::batched(3, 4, 6);
    let (x1, x2) = both(shape);
    let (mut y1, mut y2) = both(shape);
    p.axpby(&mut y1, 2.0, &x1, -0.5).unwrap();
    n.axpby(&mut y2, 2.0, &x2, -0.5).unwrap();
    check(&y1, &y2, "axpby");
    p.normalize_frobenius(&mut y1, 1.02, 1e-6).unwrap();
    n.normalize_frobenius(&mut y2, 1.02, 1e-6).unwrap();
    check(&y1, &y2, "normalize_frobenius");
    let (mut s1, mut s2) = (
        HostMatrix::zeros(Shape::vector(3)),
        n.zeros(Shape::vector(3)).unwrap(),
    );
    p.frobenius_norm(&x1, &mut s1, 2).unwrap();
    n.frobenius_norm(&x2, &mut s2, 2).unwrap();
    check(&s1, &s2, "frobenius_norm");
    let (mut m1, mut m2) = both(shape);
    let (mut v1, mut v2) = both(shape);
    // The second moment is non-negative: use x^2.
    let squares: Vec<f64> = x1.as_slice().iter().map(|v| v * v).collect();
    p.upload(&mut v1, &squares).unwrap();
    n.upload(&mut v2, v1.as_slice()).unwrap();
    let c = AdamWCoefficients {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        bias_correction1: 0.19,
        bias_correction2: 0.0975,
    };
    let (mut d1, mut d2) = both(shape);
    p.adamw_direction(&mut d1, &x1, &mut m1, &mut v1, &c).unwrap();
    n.adamw_direction(&mut d2, &x2, &mut m2, &mut v2, &c).unwrap();
    check(&d1, &d2, "adamw direction");
    check(&m1, &m2, "adamw m");
    check(&v1, &v2, "adamw v");
}

#[test]
fn an_allocation_too_large_is_an_error_not_an_abort() {
    let huge = Shape::batched(1 << 20, 1 << 20, 1 << 20);
    let err = Portable::<f32>::new().zeros(huge).unwrap_err();
    assert!(err.to_string().contains("out of memory"), "{err}");
    let specs = vec![ParamSpec::new(
        "w",
        Shape::matrix(1 << 30, 1 << 30),
        ParamRole::Hidden,
    )];
    assert!(HybridOptimizer::new(&Portable::<f32>::new(), specs, HybridConfig::default()).is_err());
}
