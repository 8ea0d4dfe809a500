//! The conformance suite: every `Backend` primitive, Newton-Schulz and a hybrid optimizer step
//! on a backend under test, against exact f64 references (`Portable<f64>`, nalgebra).
//!
//! `suite` is generic over the backend; it runs here on `Faer<f32>` and `Faer<f64>` at 1, 2
//! and 3 threads (3 threads on a 2-core machine still exercise the uneven splits).
//!
//! Tolerances. A GEMM of inner size `k` in precision `u` (unit roundoff) satisfies, elementwise,
//! `|fl(C) - C| <= gamma_k (|alpha| |A||B| + |beta| |C0|)` with `gamma_k ~ k u` (Higham, ch. 3);
//! alpha/beta scaling and the final add cost two more roundings. Each check computes that
//! bound from the data (`|A||B|` is itself a GEMM on absolute values) with `(k + 3) u`, doubled
//! to cover the reference's own f64 roundings when the backend is f64. Elementwise operations
//! must match `Portable` of the same element type exactly: they are the same formulas in the
//! same order, and Rust does not contract to FMA.

mod common;

use common::{host, max_abs_diff, unit_roundoff, upload, worst_excess, Rng};
use muon_core::nalgebra_backend::{polar_factor, Nalgebra};
use muon_core::{
    newton_schulz, newton_schulz_generic, AdamWCoefficients, Backend, HybridConfig, HybridOptimizer,
    NewtonSchulz, NsWorkspace, ParamRole, ParamSpec, Portable, Real, Shape, Transpose,
};
use muon_faer::Faer;
use nalgebra::DMatrix;

const F64: Portable<f64> = Portable::new();
const SIDES: [usize; 7] = [1, 15, 16, 17, 127, 128, 129];
const OPS: [(Transpose, Transpose); 4] = [
    (Transpose::No, Transpose::No),
    (Transpose::No, Transpose::Yes),
    (Transpose::Yes, Transpose::No),
    (Transpose::Yes, Transpose::Yes),
];

/// `data` rounded to the backend's element type, so the f64 reference sees the same inputs.
fn rounded<B: Backend>(data: &[f64]) -> Vec<f64> {
    data.iter().map(|&v| B::Elem::from_f64(v).to_f64()).collect()
}

/// Checks `dst = alpha op(a) op(b) + beta dst` on `backend` against the f64 reference.
#[allow(clippy::too_many_arguments)]
fn check_gemm<B: Backend>(
    backend: &B,
    rng: &mut Rng,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    ops: (Transpose, Transpose),
    beta: f64,
) {
    let (ta, tb) = ops;
    let shape_of = |r: usize, c: usize, t: Transpose| match t {
        Transpose::No => Shape::batched(batch, r, c),
        Transpose::Yes => Shape::batched(batch, c, r),
    };
    let (sa, sb, sc) = (
        shape_of(m, k, ta),
        shape_of(k, n, tb),
        Shape::batched(batch, m, n),
    );
    let (a, b, c) = (
        rounded::<B>(&rng.vec(sa.len())),
        rounded::<B>(&rng.vec(sb.len())),
        rounded::<B>(&rng.vec(sc.len())),
    );
    let alpha = 0.75;
    let e = |v: f64| B::Elem::from_f64(v);

    let mut dst = upload(backend, sc, &c);
    let (da, db) = (upload(backend, sa, &a), upload(backend, sb, &b));
    backend
        .gemm(&mut dst, e(alpha), &da, ta, &db, tb, e(beta))
        .unwrap();
    let got = host(backend, &dst);

    let exact = {
        let mut d = upload(&F64, sc, &c);
        F64.gemm(
            &mut d,
            alpha,
            &upload(&F64, sa, &a),
            ta,
            &upload(&F64, sb, &b),
            tb,
            beta,
        )
        .unwrap();
        host(&F64, &d)
    };
    let bound = gemm_bound::<B>(sa, &a, ta, sb, &b, tb, sc, &c, alpha, beta, k);
    let (excess, at) = worst_excess(&got, &exact, &bound);
    assert!(
        excess <= 0.0,
        "gemm {batch}x{m}x{n}x{k} {ta:?}/{tb:?} beta {beta}: element {at} off by {} (bound {})",
        (got[at] - exact[at]).abs(),
        bound[at]
    );
}

/// The elementwise rounding bound of a GEMM (see the module docs).
#[allow(clippy::too_many_arguments)]
fn gemm_bound<B: Backend>(
    sa: Shape,
    a: &[f64],
    ta: Transpose,
    sb: Shape,
    b: &[f64],
    tb: Transpose,
    sc: Shape,
    c: &[f64],
    alpha: f64,
    beta: f64,
    k: usize,
) -> Vec<f64> {
    let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
    let mut d = upload(&F64, sc, &abs(c));
    F64.gemm(
        &mut d,
        alpha.abs(),
        &upload(&F64, sa, &abs(a)),
        ta,
        &upload(&F64, sb, &abs(b)),
        tb,
        beta.abs(),
    )
    .unwrap();
    let factor = 2.0 * (k as f64 + 3.0) * unit_roundoff::<B::Elem>();
    host(&F64, &d)
        .iter()
        .map(|v| factor * v + f64::MIN_POSITIVE)
        .collect()
}

fn gemms<B: Backend>(backend: &B) {
    let mut rng = Rng::new(1);
    // Every side straddling the kernels' block widths, each combination once, cycling through
    // transposes and betas (0 overwrites, 1 accumulates, anything else scales first).
    let betas = [0.0, 1.0, -0.3];
    let mut case = 0;
    for &m in &SIDES {
        for &n in &SIDES {
            for &k in &[1, 16, 129] {
                check_gemm(backend, &mut rng, 1, m, n, k, OPS[case % 4], betas[case % 3]);
                case += 1;
            }
        }
    }
    for ops in OPS {
        for beta in betas {
            // Tall, wide, and large enough to be split across threads (one matrix, and stacks
            // that split over experts evenly, unevenly, and fewer than the threads).
            check_gemm(backend, &mut rng, 1, 300, 40, 17, ops, beta);
            check_gemm(backend, &mut rng, 1, 40, 300, 129, ops, beta);
            check_gemm(backend, &mut rng, 1, 160, 200, 130, ops, beta);
            check_gemm(backend, &mut rng, 3, 33, 130, 127, ops, beta);
            check_gemm(backend, &mut rng, 8, 64, 96, 80, ops, beta);
            check_gemm(backend, &mut rng, 2, 150, 140, 128, ops, beta);
        }
    }
    // Zero inner size: beta * dst.
    check_gemm(backend, &mut rng, 2, 5, 7, 0, OPS[0], -0.3);
}

/// Gram products both ways, against a GEMM with the same bound.
fn grams<B: Backend>(backend: &B) {
    let mut rng = Rng::new(2);
    let shapes = [
        (1, 1, 1),
        (1, 1, 40),
        (1, 40, 1),
        (1, 17, 129),
        (1, 129, 17),
        (1, 128, 128),
        (1, 127, 300),
        (3, 64, 100),
        (5, 16, 15),
        (1, 260, 190),
        // Gram side >= 768: a tall X^T X goes through a transposed copy.
        (1, 20, 768),
        (2, 9, 800),
    ];
    for (batch, r, c) in shapes {
        for op in [Transpose::No, Transpose::Yes] {
            let shape = Shape::batched(batch, r, c);
            let x = rounded::<B>(&rng.vec(shape.len()));
            let (m, k) = shape.op(op);
            let sg = Shape::batched(batch, m, m);
            let mut g = upload(backend, sg, &rng.vec(sg.len()));
            backend.gram(&mut g, &upload(backend, shape, &x), op).unwrap();
            let got = host(backend, &g);
            let exact = {
                let mut d = F64.zeros(sg).unwrap();
                let dx = upload(&F64, shape, &x);
                F64.gemm(&mut d, 1.0, &dx, op, &dx, op.flip(), 0.0).unwrap();
                host(&F64, &d)
            };
            let bound = gemm_bound::<B>(
                shape,
                &x,
                op,
                shape,
                &x,
                op.flip(),
                sg,
                &vec![0.0; sg.len()],
                1.0,
                0.0,
                k,
            );
            let (excess, at) = worst_excess(&got, &exact, &bound);
            assert!(
                excess <= 0.0,
                "gram {shape} {op:?}: element {at} off by {}",
                (got[at] - exact[at]).abs()
            );
            // Exactly symmetric: the upper triangle is a copy.
            for (e, item) in got.chunks(m * m).enumerate() {
                for i in 0..m {
                    for j in 0..i {
                        assert_eq!(
                            item[i * m + j],
                            item[j * m + i],
                            "gram {shape} {op:?} item {e} not symmetric"
                        );
                    }
                }
            }
        }
    }
}

/// `dst = alpha S S + beta dst` for symmetric `S` and `dst`.
fn symmetric_squares<B: Backend>(backend: &B) {
    let mut rng = Rng::new(3);
    for (batch, m) in [
        (1, 1),
        (1, 15),
        (2, 16),
        (1, 17),
        (1, 127),
        (1, 128),
        (3, 129),
        (1, 200),
        (6, 40),
    ] {
        for (alpha, beta) in [(1.0, 0.0), (2.0315, -4.775), (-0.5, 1.0)] {
            let shape = Shape::batched(batch, m, m);
            let symmetric = |rng: &mut Rng| {
                let v = rng.vec(shape.len());
                let mut s = vec![0.0; shape.len()];
                for e in 0..batch {
                    for i in 0..m {
                        for j in 0..m {
                            let (p, q) = if j > i { (j, i) } else { (i, j) };
                            s[e * m * m + i * m + j] = v[e * m * m + p * m + q];
                        }
                    }
                }
                rounded::<B>(&s)
            };
            let (s, c) = (symmetric(&mut rng), symmetric(&mut rng));
            let mut d = upload(backend, shape, &c);
            let e = |v: f64| B::Elem::from_f64(v);
            backend
                .symmetric_square(&mut d, e(alpha), &upload(backend, shape, &s), e(beta))
                .unwrap();
            let got = host(backend, &d);
            let exact = {
                let mut d = upload(&F64, shape, &c);
                let ds = upload(&F64, shape, &s);
                F64.gemm(&mut d, alpha, &ds, Transpose::No, &ds, Transpose::No, beta)
                    .unwrap();
                host(&F64, &d)
            };
            let bound = gemm_bound::<B>(
                shape,
                &s,
                Transpose::No,
                shape,
                &s,
                Transpose::No,
                shape,
                &c,
                alpha,
                beta,
                m,
            );
            let (excess, at) = worst_excess(&got, &exact, &bound);
            assert!(
                excess <= 0.0,
                "symmetric_square {shape} alpha {alpha} beta {beta}: element {at} off by {}",
                (got[at] - exact[at]).abs()
            );
        }
    }
}

/// Elementwise operations: bit-identical to `Portable` of the same element type, on sizes
/// below and above the parallel threshold (65,536 elements).
fn elementwise<B: Backend>(backend: &B) {
    let reference: Portable<B::Elem> = Portable::new();
    let mut rng = Rng::new(4);
    let e = |v: f64| B::Elem::from_f64(v);
    for shape in [
        Shape::vector(1),
        Shape::vector(17),
        Shape::matrix(129, 3),
        Shape::batched(3, 150, 170),
        Shape::matrix(301, 303),
    ] {
        let n = shape.len();
        let (g, m0, v0, p0) = (
            rng.vec(n),
            rng.vec(n),
            rng.vec(n).iter().map(|x| x * x).collect::<Vec<_>>(),
            rng.vec(n),
        );
        // axpby, with beta 0 (overwrite) and not.
        for beta in [0.0, 0.9] {
            let mut d = upload(backend, shape, &p0);
            backend
                .axpby(&mut d, e(-0.4), &upload(backend, shape, &g), e(beta))
                .unwrap();
            let mut r = upload(&reference, shape, &p0);
            reference
                .axpby(&mut r, e(-0.4), &upload(&reference, shape, &g), e(beta))
                .unwrap();
            assert_eq!(
                host(backend, &d),
                host(&reference, &r),
                "axpby {shape} beta {beta}"
            );
        }
        // copy.
        let mut d = backend.zeros(shape).unwrap();
        backend.copy(&mut d, &upload(backend, shape, &g)).unwrap();
        assert_eq!(host(backend, &d), rounded::<B>(&g), "copy {shape}");
        // Momentum with and without Nesterov, against the trait's default (two axpby).
        for nesterov in [true, false] {
            let (mut mom, mut out) = (upload(backend, shape, &m0), backend.zeros(shape).unwrap());
            backend
                .momentum_nesterov(&mut mom, &upload(backend, shape, &g), e(0.95), nesterov, &mut out)
                .unwrap();
            let (mut rm, mut ro) = (upload(&reference, shape, &m0), reference.zeros(shape).unwrap());
            reference
                .momentum_nesterov(
                    &mut rm,
                    &upload(&reference, shape, &g),
                    e(0.95),
                    nesterov,
                    &mut ro,
                )
                .unwrap();
            assert_eq!(host(backend, &mom), host(&reference, &rm), "momentum {shape}");
            assert_eq!(
                host(backend, &out),
                host(&reference, &ro),
                "nesterov={nesterov} {shape}"
            );
        }
        // Decoupled update.
        let mut p = upload(backend, shape, &p0);
        backend
            .apply_update(&mut p, &upload(backend, shape, &g), e(0.013), e(0.002))
            .unwrap();
        let mut rp = upload(&reference, shape, &p0);
        reference
            .apply_update(&mut rp, &upload(&reference, shape, &g), e(0.013), e(0.002))
            .unwrap();
        assert_eq!(host(backend, &p), host(&reference, &rp), "apply_update {shape}");
        // AdamW direction at step 3.
        let c = AdamWCoefficients {
            beta1: e(0.9),
            beta2: e(0.95),
            eps: e(1e-8),
            bias_correction1: e(1.0 - 0.9f64.powi(3)),
            bias_correction2: e(1.0 - 0.95f64.powi(3)),
        };
        let (mut dir, mut m, mut v) = (
            backend.zeros(shape).unwrap(),
            upload(backend, shape, &m0),
            upload(backend, shape, &v0),
        );
        backend
            .adamw_direction(&mut dir, &upload(backend, shape, &g), &mut m, &mut v, &c)
            .unwrap();
        let (mut rd, mut rm, mut rv) = (
            reference.zeros(shape).unwrap(),
            upload(&reference, shape, &m0),
            upload(&reference, shape, &v0),
        );
        reference
            .adamw_direction(&mut rd, &upload(&reference, shape, &g), &mut rm, &mut rv, &c)
            .unwrap();
        assert_eq!(
            host(backend, &dir),
            host(&reference, &rd),
            "adamw direction {shape}"
        );
        assert_eq!(host(backend, &m), host(&reference, &rm), "adamw m {shape}");
        assert_eq!(host(backend, &v), host(&reference, &rv), "adamw v {shape}");
    }
}

/// `frobenius_norm` (whole stack, f64 accumulation) and `normalize_frobenius` (per item).
fn reductions<B: Backend>(backend: &B) {
    let mut rng = Rng::new(5);
    let u = unit_roundoff::<B::Elem>();
    for shape in [
        Shape::vector(1),
        Shape::vector(13),
        Shape::batched(4, 33, 65),
        Shape::matrix(400, 300),
        Shape::batched(2, 1, 70_000),
    ] {
        let x = rounded::<B>(&rng.vec(shape.len()));
        let exact: f64 = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let mut out = backend.zeros(Shape::vector(3)).unwrap();
        backend
            .frobenius_norm(&upload(backend, shape, &x), &mut out, 2)
            .unwrap();
        let got = host(backend, &out);
        assert_eq!(&got[..2], &[0.0, 0.0], "frobenius_norm wrote outside its slot");
        // Squares accumulated in f64 (in another order than `exact`: error <= n * eps_f64
        // relative, halved by the square root), then rounded once to the element type.
        let bound = (2.0 * u + shape.len() as f64 * f64::EPSILON) * exact;
        assert!(
            (got[2] - exact).abs() <= bound,
            "frobenius_norm {shape}: {} vs {exact}",
            got[2]
        );

        let (scale, eps) = (1.02, 1e-6);
        let mut d = upload(backend, shape, &x);
        backend
            .normalize_frobenius(&mut d, B::Elem::from_f64(scale), B::Elem::from_f64(eps))
            .unwrap();
        let got = host(backend, &d);
        for (e, (item, out)) in x
            .chunks(shape.batch_stride())
            .zip(got.chunks(shape.batch_stride()))
            .enumerate()
        {
            let norm = item.iter().map(|v| v * v).sum::<f64>().sqrt();
            for (a, b) in item.iter().zip(out) {
                // Two roundings (the factor, then the product) plus the f64 norm's own
                // accumulation error (n * eps_f64 relative, which matters for f64 only).
                let want = a / (scale * norm + eps);
                let rel = 3.0 * u + item.len() as f64 * f64::EPSILON;
                assert!(
                    (b - want).abs() <= rel * want.abs() + f64::MIN_POSITIVE,
                    "normalize {shape} item {e}: {b} vs {want}"
                );
            }
        }
    }
}

fn ns_on<B: Backend>(backend: &B, config: &NewtonSchulz, shape: Shape, data: &[f64]) -> Vec<f64> {
    let mut ws = NsWorkspace::new(backend, shape).unwrap();
    ws.x = upload(backend, shape, data);
    newton_schulz(backend, config, &mut ws).unwrap();
    host(backend, &ws.x)
}

/// Newton-Schulz on the backend against the same iteration in f64.
///
/// Tolerance: the output entries are about `1/sqrt(max side)`; each of the five steps applies
/// a polynomial whose derivative on the singular values stays below ~3.5 (the quintic's `a`),
/// and the GEMM errors per step are `gamma_k` relative. With `k <= 400` in f32 that is
/// `~ 5 * 3.5 * 400 * 6e-8 = 4e-4` relative to the norm of the iterate in the worst case; the
/// random-sign errors are far smaller in practice. We allow `2e-3 / sqrt(max side)` absolute
/// per entry in f32 (5e-3 relative to a typical entry) and `1e-11` in f64.
fn newton_schulz_vs_f64<B: Backend>(backend: &B) {
    let mut rng = Rng::new(6);
    let tol = if B::Elem::NAME == "f32" { 2e-3 } else { 1e-11 };
    let shapes = [
        Shape::matrix(2, 2),
        Shape::matrix(16, 17),
        Shape::matrix(129, 64),
        Shape::matrix(64, 129),
        Shape::matrix(128, 128),
        Shape::batched(5, 40, 24),
        Shape::batched(3, 24, 40),
        Shape::matrix(100, 400),
    ];
    for config in [
        NewtonSchulz::quintic(),
        NewtonSchulz::polar_express(),
        NewtonSchulz::dion(),
    ] {
        for shape in shapes {
            let x = rounded::<B>(&rng.vec(shape.len()));
            let got = ns_on(backend, &config, shape, &x);
            let exact = ns_on(&F64, &config, shape, &x);
            let diff = max_abs_diff(&got, &exact);
            let allowed = tol / (shape.max_side() as f64).sqrt();
            assert!(
                diff <= allowed,
                "newton_schulz {shape} {:?}: max diff {diff} > {allowed}",
                config.coefficients[0]
            );
        }
    }
}

/// A few hybrid optimizer steps on a small model-shaped parameter set: backend vs `Portable`
/// in the same element type. Parameters differ only through Newton-Schulz's GEMM roundings
/// times `lr * scale` (Muon) and not at all for AdamW (elementwise, bit-identical).
fn hybrid_steps<B: Backend>(backend: &B) {
    let reference: Portable<B::Elem> = Portable::new();
    let specs = vec![
        ParamSpec::new("embed", Shape::matrix(64, 32), ParamRole::Embedding),
        ParamSpec::new("wq", Shape::matrix(32, 32), ParamRole::Hidden),
        ParamSpec::new("w_up", Shape::matrix(96, 32), ParamRole::Hidden),
        ParamSpec::new("experts", Shape::batched(4, 32, 48), ParamRole::Hidden),
        ParamSpec::new("norm", Shape::vector(32), ParamRole::Norm),
        ParamSpec::new("head", Shape::matrix(64, 32), ParamRole::LmHead),
    ];
    let mut rng = Rng::new(7);
    let init: Vec<Vec<f64>> = specs
        .iter()
        .map(|s| rounded::<B>(&rng.vec(s.shape.len())))
        .collect();
    let grads: Vec<Vec<Vec<f64>>> = (0..3)
        .map(|_| {
            specs
                .iter()
                .map(|s| rounded::<B>(&rng.vec(s.shape.len())))
                .collect()
        })
        .collect();

    fn run<C: Backend>(
        backend: &C,
        specs: &[ParamSpec],
        init: &[Vec<f64>],
        grads: &[Vec<Vec<f64>>],
    ) -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
        let mut opt = HybridOptimizer::new(backend, specs.to_vec(), HybridConfig::default()).unwrap();
        let mut params: Vec<C::Matrix> = specs
            .iter()
            .zip(init)
            .map(|(s, d)| upload(backend, s.shape, d))
            .collect();
        let mut norms = Vec::new();
        for step in grads {
            let g: Vec<C::Matrix> = specs
                .iter()
                .zip(step)
                .map(|(s, d)| upload(backend, s.shape, d))
                .collect();
            norms.push(opt.step(backend, &mut params, &g, 0.02).unwrap().grad_norm);
        }
        let mut rms = vec![0.0; specs.len()];
        opt.update_rms(backend, &mut rms).unwrap();
        (params.iter().map(|p| host(backend, p)).collect(), norms, rms)
    }
    let (got, got_norms, got_rms) = run(backend, &specs, &init, &grads);
    let (want, want_norms, want_rms) = run(&reference, &specs, &init, &grads);
    let u = unit_roundoff::<B::Elem>();
    for (a, b) in got_norms.iter().zip(&want_norms) {
        // Each parameter's norm is a square root of an f64 sum (summed in another order than
        // the reference), rounded to the element type, then squared and summed over the
        // parameters and rooted again: a few units of roundoff each way; 8u bounds it.
        assert!((a - b).abs() <= 8.0 * u * b, "grad norm {a} vs {b}");
    }
    for (i, spec) in specs.iter().enumerate() {
        let diff = max_abs_diff(&got[i], &want[i]);
        let muon = spec.role == ParamRole::Hidden;
        // Muon: 3 steps of lr 0.02 * scale (0.2 sqrt(96) < 2) times the NS tolerance above.
        let allowed = if muon {
            3.0 * 0.02 * 2.0 * 2e-3 * (u / 6e-8).min(1.0) + 4.0 * u
        } else {
            0.0
        };
        assert!(
            diff <= allowed,
            "param {} after 3 steps: max diff {diff} > {allowed}",
            spec.name
        );
        assert!(
            (got_rms[i] - want_rms[i]).abs() <= 1e-3 * want_rms[i] + 4.0 * u,
            "update rms of {}",
            spec.name
        );
    }
}

/// Shape errors come back as errors naming the operand, not panics (the `Backend` contract).
fn shape_errors<B: Backend>(backend: &B) {
    let a = backend.zeros(Shape::matrix(3, 4)).unwrap();
    let mut d = backend.zeros(Shape::matrix(3, 3)).unwrap();
    let one = B::Elem::ONE;
    let is_shape_error = |r: muon_core::Result<()>, operand: &str| match r {
        Err(muon_core::Error::ShapeMismatch { what, .. }) => {
            assert!(what.contains(operand), "{what} should name {operand}")
        }
        other => panic!("expected a shape error naming {operand}, got {other:?}"),
    };
    is_shape_error(
        backend.gemm(&mut d, one, &a, Transpose::No, &a, Transpose::No, one),
        "operand b",
    );
    let wrong_batch = backend.zeros(Shape::batched(2, 3, 4)).unwrap();
    is_shape_error(
        backend.gemm(&mut d, one, &wrong_batch, Transpose::No, &a, Transpose::Yes, one),
        "operand a",
    );
    is_shape_error(
        backend.gemm(&mut d, one, &a, Transpose::Yes, &a, Transpose::No, one),
        "destination",
    );
    is_shape_error(backend.gram(&mut d, &a, Transpose::Yes), "destination");
    is_shape_error(backend.axpby(&mut d, one, &a, one), "axpby");
    let (mut m, mut v) = (
        backend.zeros(Shape::matrix(3, 4)).unwrap(),
        backend.zeros(Shape::matrix(3, 4)).unwrap(),
    );
    let c = muon_core::AdamWCoefficients {
        beta1: one,
        beta2: one,
        eps: one,
        bias_correction1: one,
        bias_correction2: one,
    };
    is_shape_error(
        backend.adamw_direction(&mut d, &a, &mut m, &mut v, &c),
        "adamw direction",
    );
    let mut small = backend.zeros(Shape::vector(2)).unwrap();
    assert!(backend.frobenius_norm(&a, &mut small, 2).is_err());
    assert!(backend.upload(&mut d, &[one; 4]).is_err());
    let mut square = backend.zeros(Shape::matrix(3, 4)).unwrap();
    is_shape_error(backend.symmetric_square(&mut square, one, &a, one), "operand");

    // Newton-Schulz on a workspace whose public `x` was replaced by another shape: an error,
    // and `x` untouched, on every path of a backend's own routine (one small matrix, a stack
    // split over its matrices, one matrix split across threads).
    let cases = [
        (Shape::matrix(8, 12), Shape::matrix(16, 24)),
        (Shape::matrix(8, 12), Shape::matrix(12, 8)),
        (Shape::batched(8, 64, 128), Shape::batched(16, 64, 128)),
        (Shape::batched(16, 64, 128), Shape::batched(8, 64, 128)),
        (Shape::matrix(256, 512), Shape::matrix(512, 512)),
    ];
    for (made_for, replaced) in cases {
        let mut ws = NsWorkspace::new(backend, made_for).unwrap();
        let data = vec![one; replaced.len()];
        ws.x = backend.zeros(replaced).unwrap();
        backend.upload(&mut ws.x, &data).unwrap();
        is_shape_error(newton_schulz(backend, &NewtonSchulz::quintic(), &mut ws), "ws.x");
        assert_eq!(host(backend, &ws.x), vec![1.0; replaced.len()], "x changed");
    }
    // A schedule with no coefficients is a configuration error, not an out-of-bounds index.
    let mut ws = NsWorkspace::new(backend, Shape::batched(8, 64, 128)).unwrap();
    let empty = NewtonSchulz {
        coefficients: Vec::new(),
        ..NewtonSchulz::quintic()
    };
    match newton_schulz(backend, &empty, &mut ws) {
        Err(muon_core::Error::InvalidConfig(msg)) => assert!(msg.contains("coefficients"), "{msg}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

/// Everything above, on one backend.
fn suite<B: Backend>(backend: &B) {
    shape_errors(backend);
    elementwise(backend);
    reductions(backend);
    gemms(backend);
    grams(backend);
    symmetric_squares(backend);
    newton_schulz_vs_f64(backend);
    hybrid_steps(backend);
}

#[test]
fn every_host_backend_returns_shape_errors() {
    shape_errors(&muon_core::Portable::<f64>::new());
    shape_errors(&muon_core::Portable::<f32>::new());
    shape_errors(&Nalgebra::<f64>::new());
}

#[test]
fn faer_f32_one_thread() {
    suite(&Faer::<f32>::with_threads(1));
}

#[test]
fn faer_f32_two_threads() {
    suite(&Faer::<f32>::with_threads(2));
}

#[test]
fn faer_f32_three_threads() {
    suite(&Faer::<f32>::with_threads(3));
}

#[test]
fn faer_f64_two_threads() {
    suite(&Faer::<f64>::with_threads(2));
}

#[test]
fn the_suite_catches_a_wrong_backend() {
    // A backend that is off by one ulp-scale error in every GEMM must fail the GEMM check:
    // the suite is only as good as its ability to fail.
    struct Skewed(Faer<f32>);
    impl Backend for Skewed {
        type Elem = f32;
        type Matrix = muon_core::HostMatrix<f32>;
        fn shape(m: &Self::Matrix) -> Shape {
            m.shape()
        }
        fn zeros(&self, s: Shape) -> muon_core::Result<Self::Matrix> {
            self.0.zeros(s)
        }
        fn upload(&self, d: &mut Self::Matrix, s: &[f32]) -> muon_core::Result<()> {
            self.0.upload(d, s)
        }
        fn download(&self, s: &Self::Matrix, d: &mut [f32]) -> muon_core::Result<()> {
            self.0.download(s, d)
        }
        fn gemm(
            &self,
            d: &mut Self::Matrix,
            al: f32,
            a: &Self::Matrix,
            ta: Transpose,
            b: &Self::Matrix,
            tb: Transpose,
            be: f32,
        ) -> muon_core::Result<()> {
            // alpha off by 1e-4 relative: far above the rounding bound for small k.
            self.0.gemm(d, al * 1.0001, a, ta, b, tb, be)
        }
        fn axpby(&self, d: &mut Self::Matrix, al: f32, x: &Self::Matrix, be: f32) -> muon_core::Result<()> {
            self.0.axpby(d, al, x, be)
        }
        fn frobenius_norm(&self, x: &Self::Matrix, o: &mut Self::Matrix, i: usize) -> muon_core::Result<()> {
            self.0.frobenius_norm(x, o, i)
        }
        fn normalize_frobenius(&self, x: &mut Self::Matrix, s: f32, e: f32) -> muon_core::Result<()> {
            self.0.normalize_frobenius(x, s, e)
        }
        fn adamw_direction(
            &self,
            d: &mut Self::Matrix,
            g: &Self::Matrix,
            m: &mut Self::Matrix,
            v: &mut Self::Matrix,
            c: &AdamWCoefficients<f32>,
        ) -> muon_core::Result<()> {
            self.0.adamw_direction(d, g, m, v, c)
        }
    }
    let skewed = Skewed(Faer::with_threads(1));
    assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gemms(&skewed))).is_err());
}

/// The nalgebra backend (an independent implementation) runs the same Newton-Schulz in f64;
/// and Polar Express lands near the exact polar factor `U V^T` from an f64 SVD.
#[test]
fn newton_schulz_against_nalgebra_and_the_polar_factor() {
    let faer = Faer::<f64>::with_threads(2);
    let nalg: Nalgebra<f64> = Nalgebra::new();
    let mut rng = Rng::new(8);
    for (rows, cols) in [(64, 128), (128, 64), (96, 96), (17, 129)] {
        let shape = Shape::matrix(rows, cols);
        let x = rng.vec(shape.len());
        for config in [NewtonSchulz::quintic(), NewtonSchulz::polar_express()] {
            let got = ns_on(&faer, &config, shape, &x);
            let want = ns_on(&nalg, &config, shape, &x);
            assert!(
                max_abs_diff(&got, &want) < 1e-11,
                "{shape}: faer and nalgebra disagree"
            );
        }
        // dion's acceptance test: max |X X^T - I| < 0.15 after Polar Express (the small side's
        // Gram matrix); and the output's polar factor is the input's.
        let o = DMatrix::from_row_slice(
            rows,
            cols,
            &ns_on(&faer, &NewtonSchulz::polar_express(), shape, &x),
        );
        let gram = if rows <= cols {
            &o * o.transpose()
        } else {
            o.transpose() * &o
        };
        let off = (gram - DMatrix::identity(rows.min(cols), rows.min(cols)))
            .abs()
            .max();
        let square = rows == cols;
        // A square random matrix has singular values near 0 that 5 steps cannot lift: skip it.
        if !square {
            assert!(off < 0.15, "{shape}: max |X X^T - I| = {off}");
        }
        let q_in = polar_factor(&DMatrix::from_row_slice(rows, cols, &x));
        let q_out = polar_factor(&o);
        assert!(
            (q_in - q_out).abs().max() < 1e-8,
            "{shape}: NS changed the singular vectors"
        );
    }
}

/// The backend's own Newton-Schulz (`Backend::newton_schulz`: each matrix of a stack through
/// all steps in cache, `a X` folded into `(a I + P) X`) against muon-core's generic routine on
/// the same backend, over shapes and thread counts that reach each of its paths: per matrix on
/// the caller's thread, per matrix over the team, step by step with split products, and the
/// strided-tall fallback; with an odd and an even number of steps (the result's buffer).
///
/// Tolerance: the two differ only in rounding order (`a x + (P x)` vs `(a I + P) x`), one or
/// two roundings per entry per step, amplified by at most the quintic's slope (~3.5) over the
/// remaining steps: in f64 that is far below the suite's `1e-11 / sqrt(n)`; in f32 we allow
/// `2e-4 / sqrt(n)`, 10x under the suite's f32 bound against f64 (measured: 5e-7 on 3x24x40).
#[test]
fn own_newton_schulz_matches_the_generic_one() {
    fn compare<B: Backend>(cpu: &B, shape: Shape, steps: usize, tol: f64) {
        let x = rounded::<B>(&Rng::new(shape.len() as u64).vec(shape.len()));
        let config = NewtonSchulz {
            steps,
            ..NewtonSchulz::quintic()
        };
        let own = ns_on(cpu, &config, shape, &x);
        let mut ws = NsWorkspace::new(cpu, shape).unwrap();
        ws.x = upload(cpu, shape, &x);
        newton_schulz_generic(cpu, &config, &mut ws).unwrap();
        let generic = host(cpu, &ws.x);
        let diff = max_abs_diff(&own, &generic);
        let allowed = tol / (shape.max_side() as f64).sqrt();
        assert!(
            diff <= allowed,
            "{shape}, {steps} steps: max diff {diff} > {allowed}"
        );
    }
    let shapes = [
        Shape::batched(3, 24, 40),   // serial, per matrix
        Shape::batched(8, 96, 200),  // per matrix, over the team
        Shape::batched(8, 200, 96),  // the same, tall
        Shape::batched(5, 96, 200),  // uneven stack
        Shape::matrix(256, 512),     // one matrix, products split (2+ threads)
        Shape::matrix(512, 256),     // the same, tall
        Shape::batched(3, 256, 512), // a short stack of large matrices
    ];
    for threads in [1, 2, 3] {
        let (f32s, f64s) = (
            Faer::<f32>::with_threads(threads),
            Faer::<f64>::with_threads(threads),
        );
        for shape in shapes {
            for steps in [4, 5] {
                compare(&f32s, shape, steps, 2e-4);
                compare(&f64s, shape, steps, 1e-11);
            }
        }
    }
    // A stack of tall matrices whose Gram side is large goes step by step (transposed copy).
    compare(
        &Faer::<f32>::with_threads(1),
        Shape::batched(2, 800, 768),
        5,
        2e-4,
    );
}

#[test]
fn the_backend_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Faer<f32>>();
    let cpu = Faer::<f32>::with_threads(2);
    let shape = Shape::matrix(40, 70);
    std::thread::scope(|s| {
        for seed in 0..3 {
            let cpu = &cpu;
            s.spawn(move || {
                let x = Rng::new(seed).vec(shape.len());
                let got = ns_on(cpu, &NewtonSchulz::quintic(), shape, &x);
                let want = ns_on(&F64, &NewtonSchulz::quintic(), shape, &x);
                assert!(max_abs_diff(&got, &want) < 1e-3);
            });
        }
    });
}

#[test]
fn thread_count_settings() {
    let mut cpu = Faer::<f64>::with_threads(0);
    assert_eq!(cpu.threads(), 1, "0 threads clamps to 1");
    cpu.set_threads(3);
    assert_eq!(cpu.threads(), 3);
    cpu.set_threads(1000);
    assert_eq!(cpu.threads(), muon_faer::MAX_THREADS);
    assert!(Faer::<f32>::new().threads() >= 1);
}

/// Three hybrid steps on `cpu`; every figure they produce (gradient norms, update RMS,
/// parameters) as bits.
fn thread_count_probe<E: muon_faer::Elem>(cpu: &Faer<E>) -> Vec<u64> {
    let specs = vec![
        ParamSpec::new("wide", Shape::matrix(300, 700), ParamRole::Hidden),
        ParamSpec::new("tall", Shape::matrix(1024, 256), ParamRole::Hidden),
        ParamSpec::new("experts", Shape::batched(6, 128, 352), ParamRole::Hidden),
        ParamSpec::new("embed", Shape::matrix(400, 200), ParamRole::Embedding),
        ParamSpec::new("gain", Shape::vector(70_000), ParamRole::Norm),
    ];
    let mut opt = HybridOptimizer::new(cpu, specs.clone(), HybridConfig::default()).unwrap();
    let mut params: Vec<_> = specs
        .iter()
        .map(|s| upload(cpu, s.shape, &Rng::new(s.shape.len() as u64).vec(s.shape.len())))
        .collect();
    let mut out = Vec::new();
    for step in 0..3u64 {
        let grads: Vec<_> = specs
            .iter()
            .map(|s| {
                upload(
                    cpu,
                    s.shape,
                    &Rng::new(step * 7 + s.shape.rows as u64).vec(s.shape.len()),
                )
            })
            .collect();
        let report = opt.step(cpu, &mut params, &grads, 0.02).unwrap();
        out.push(report.grad_norm.to_bits());
        let mut rms = vec![0.0; specs.len()];
        opt.update_rms(cpu, &mut rms).unwrap();
        out.extend(rms.iter().map(|r| r.to_bits()));
    }
    for p in &params {
        out.extend(host(cpu, p).iter().map(|v| v.to_bits()));
    }
    out
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // Shapes whose products split inside a matrix and over a stack, whose reductions split
    // across threads (over 65,536 elements), plus a vector for AdamW: three hybrid steps on 1
    // to 4 threads must give the same bits, so a checkpoint resumes exactly on a machine with
    // another core count. f64 shows a changed summation order that f32's rounding often hides.
    use muon_faer::Precision;
    type Probe<'a> = &'a dyn Fn(usize) -> Vec<u64>;
    let runs: [(&str, Probe); 3] = [
        ("f32", &|t| thread_count_probe(&Faer::<f32>::with_threads(t))),
        ("bf16", &|t| {
            thread_count_probe(&Faer::<f32>::with_threads(t).with_precision(Precision::Bf16))
        }),
        ("f64", &|t| thread_count_probe(&Faer::<f64>::with_threads(t))),
    ];
    for (what, run) in runs {
        let one = run(1);
        for threads in [2, 3, 4] {
            let other = run(threads);
            let differing = one.iter().zip(&other).filter(|(a, b)| a != b).count();
            assert_eq!(
                differing, 0,
                "{what}: {differing} values differ at 1 and {threads} threads"
            );
        }
    }
}
