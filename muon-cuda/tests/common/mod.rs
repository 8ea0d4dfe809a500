//! The agreement suite, generic over the backend under test: run on the GPU by
//! `gpu_agreement.rs` and, as a check of the suite and its tolerances, on an emulated
//! reduced-precision CPU backend by `suite_self_check.rs`.
#![allow(dead_code)]

use muon_core::{
    newton_schulz, AdamWConfig, Backend, Error, HostMatrix, HybridConfig, HybridOptimizer, NewtonSchulz,
    NsWorkspace, ParamRole, ParamSpec, Portable, Shape, Transpose,
};
use muon_cuda::Precision;

/// A backend under test: f32 elements and a GEMM precision to set.
pub trait Device: Backend<Elem = f32> {
    /// Sets the precision of the GEMMs that follow.
    fn set_precision(&mut self, precision: Precision);
}

#[cfg(feature = "cuda")]
impl Device for muon_cuda::CudaBackend {
    fn set_precision(&mut self, precision: Precision) {
        muon_cuda::CudaBackend::set_precision(self, precision)
    }
}

pub const CPU: Portable<f32> = Portable::new();

/// Deterministic values in [-1, 1) (xorshift).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn host(shape: Shape, seed: u64) -> HostMatrix<f32> {
    HostMatrix::from_vec(shape, values(shape.len(), seed)).unwrap()
}

pub fn to_gpu<D: Device>(gpu: &D, m: &HostMatrix<f32>) -> D::Matrix {
    let mut d = gpu.zeros(m.shape()).unwrap();
    gpu.upload(&mut d, m.as_slice()).unwrap();
    d
}

pub fn to_host<D: Device>(gpu: &D, m: &D::Matrix) -> Vec<f32> {
    let mut h = vec![0.0; D::shape(m).len()];
    gpu.download(m, &mut h).unwrap();
    h
}

/// `||got - want||_F / ||want||_F` in f64 (absolute when `want` is zero).
pub fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite GPU output");
    let err = rel_error(got, want);
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.1e}");
}

/// Tolerance of one GEMM with inputs in [-1, 1] and inner dimension up to 129: rounding the
/// inputs costs about sqrt(2/3) u per product (u = 2^-24, 2^-11, 2^-8), averaging over the sum;
/// TF32 hardware may truncate instead of round, which also biases every product by about
/// 2^-10 (hence 4e-3, not 2e-3).
pub fn gemm_tol(p: Precision) -> f64 {
    match p {
        Precision::F32 => 1e-5,
        Precision::Tf32 => 4e-3,
        Precision::Bf16 => 1.6e-2,
    }
}

/// Newton-Schulz output tolerance: see the calibration table at the top of `gpu_agreement.rs`.
pub fn ns_tol(p: Precision) -> f64 {
    match p {
        Precision::F32 => 2e-5,
        Precision::Tf32 => 1.5e-2,
        Precision::Bf16 => 8e-2,
    }
}

/// Elementwise kernels and reductions: a few f32 ulps.
pub const ELEMENTWISE_TOL: f64 = 1e-6;

pub fn gemm_matches_portable_for_shapes_transposes_and_stacks<D: Device>(gpu: &mut D) {
    use Transpose::{No, Yes};
    let sizes = [
        (1, 1, 1),
        (15, 16, 17),
        (17, 15, 16),
        (127, 128, 129),
        (129, 33, 7),
        (8, 96, 40),
    ];
    for p in Precision::ALL {
        gpu.set_precision(p);
        for (seed, &(m, n, k)) in sizes.iter().enumerate() {
            for batch in [1, 3] {
                for (ta, tb) in [(No, No), (No, Yes), (Yes, No), (Yes, Yes)] {
                    for beta in [0.0f32, -1.25] {
                        let a_shape = match ta {
                            No => Shape::batched(batch, m, k),
                            Yes => Shape::batched(batch, k, m),
                        };
                        let b_shape = match tb {
                            No => Shape::batched(batch, k, n),
                            Yes => Shape::batched(batch, n, k),
                        };
                        let seed = seed as u64 * 10 + batch as u64;
                        let (a, b) = (host(a_shape, seed), host(b_shape, seed + 1));
                        let c_shape = Shape::batched(batch, m, n);
                        let mut want = host(c_shape, seed + 2);
                        let mut got = to_gpu(gpu, &want);
                        if beta == 0.0 {
                            // beta == 0 must overwrite: NaN in the destination must not leak.
                            let nan = vec![f32::NAN; c_shape.len()];
                            gpu.upload(&mut got, &nan).unwrap();
                        }
                        CPU.gemm(&mut want, 0.75, &a, ta, &b, tb, beta).unwrap();
                        gpu.gemm(&mut got, 0.75, &to_gpu(gpu, &a), ta, &to_gpu(gpu, &b), tb, beta)
                            .unwrap();
                        let what = format!("{p} gemm {c_shape} k={k} {ta:?}/{tb:?} beta={beta}");
                        assert_close(&what, &to_host(gpu, &got), want.as_slice(), gemm_tol(p));
                    }
                }
            }
        }
    }
}

pub fn gram_and_symmetric_square_match_portable<D: Device>(gpu: &mut D) {
    for p in Precision::ALL {
        gpu.set_precision(p);
        for shape in [Shape::matrix(33, 70), Shape::batched(4, 48, 20)] {
            let x = host(shape, 7);
            let xg = to_gpu(gpu, &x);
            for op in [Transpose::No, Transpose::Yes] {
                let side = shape.op(op).0;
                let gram_shape = Shape::batched(shape.batch, side, side);
                let mut want = HostMatrix::zeros(gram_shape);
                CPU.gram(&mut want, &x, op).unwrap();
                let mut got = gpu.zeros(gram_shape).unwrap();
                gpu.gram(&mut got, &xg, op).unwrap();
                assert_close(
                    &format!("{p} gram {shape} {op:?}"),
                    &to_host(gpu, &got),
                    want.as_slice(),
                    gemm_tol(p),
                );

                // dst = 0.5 s s - 2 dst, on the Gram matrix just formed.
                let mut want_sq = host(gram_shape, 9);
                let mut got_sq = to_gpu(gpu, &want_sq);
                CPU.symmetric_square(&mut want_sq, 0.5, &want, -2.0).unwrap();
                gpu.symmetric_square(&mut got_sq, 0.5, &got, -2.0).unwrap();
                let what = format!("{p} symmetric_square {gram_shape}");
                assert_close(&what, &to_host(gpu, &got_sq), want_sq.as_slice(), gemm_tol(p));
            }
        }
    }
}

pub fn elementwise_kernels_match_portable<D: Device>(gpu: &D) {
    // Lengths around the block width (256) and a stack.
    for shape in [
        Shape::matrix(1, 1),
        Shape::matrix(1, 255),
        Shape::matrix(17, 61),
        Shape::batched(3, 40, 50),
    ] {
        let x = host(shape, 1);
        let xg = to_gpu(gpu, &x);

        // axpby, accumulating and overwriting (NaN in dst must not leak with beta == 0).
        let mut want = host(shape, 2);
        let mut got = to_gpu(gpu, &want);
        CPU.axpby(&mut want, 1.5, &x, -0.25).unwrap();
        gpu.axpby(&mut got, 1.5, &xg, -0.25).unwrap();
        assert_close(
            &format!("axpby {shape}"),
            &to_host(gpu, &got),
            want.as_slice(),
            ELEMENTWISE_TOL,
        );
        gpu.upload(&mut got, &vec![f32::NAN; shape.len()]).unwrap();
        CPU.axpby(&mut want, -3.0, &x, 0.0).unwrap();
        gpu.axpby(&mut got, -3.0, &xg, 0.0).unwrap();
        assert_close(
            &format!("axpby beta=0 {shape}"),
            &to_host(gpu, &got),
            want.as_slice(),
            ELEMENTWISE_TOL,
        );

        // copy
        let mut got_copy = gpu.zeros(shape).unwrap();
        gpu.copy(&mut got_copy, &xg).unwrap();
        assert_eq!(to_host(gpu, &got_copy), x.as_slice(), "copy {shape}");

        // momentum + Nesterov, both ways, three steps.
        for nesterov in [true, false] {
            let (mut m_cpu, mut out_cpu) = (host(shape, 3), HostMatrix::zeros(shape));
            let (mut m_gpu, mut out_gpu) = (to_gpu(gpu, &m_cpu), gpu.zeros(shape).unwrap());
            for step in 0..3 {
                let g = host(shape, 10 + step);
                CPU.momentum_nesterov(&mut m_cpu, &g, 0.95, nesterov, &mut out_cpu)
                    .unwrap();
                gpu.momentum_nesterov(&mut m_gpu, &to_gpu(gpu, &g), 0.95, nesterov, &mut out_gpu)
                    .unwrap();
            }
            let what = format!("momentum_nesterov({nesterov}) {shape}");
            assert_close(&what, &to_host(gpu, &m_gpu), m_cpu.as_slice(), ELEMENTWISE_TOL);
            assert_close(
                &what,
                &to_host(gpu, &out_gpu),
                out_cpu.as_slice(),
                ELEMENTWISE_TOL,
            );
        }

        // apply_update
        let mut p_cpu = host(shape, 4);
        let mut p_gpu = to_gpu(gpu, &p_cpu);
        CPU.apply_update(&mut p_cpu, &x, 0.02, 4.2e-5).unwrap();
        gpu.apply_update(&mut p_gpu, &xg, 0.02, 4.2e-5).unwrap();
        assert_close(
            &format!("apply_update {shape}"),
            &to_host(gpu, &p_gpu),
            p_cpu.as_slice(),
            ELEMENTWISE_TOL,
        );

        // AdamW direction over three steps (bias corrections change per step).
        let config = AdamWConfig::default();
        let (mut m_cpu, mut v_cpu, mut d_cpu) = (
            HostMatrix::zeros(shape),
            HostMatrix::zeros(shape),
            HostMatrix::zeros(shape),
        );
        let (mut m_gpu, mut v_gpu, mut d_gpu) = (
            gpu.zeros(shape).unwrap(),
            gpu.zeros(shape).unwrap(),
            gpu.zeros(shape).unwrap(),
        );
        for t in 1..=3 {
            let g = host(shape, 20 + t);
            let c = config.coefficients::<f32>(t);
            CPU.adamw_direction(&mut d_cpu, &g, &mut m_cpu, &mut v_cpu, &c)
                .unwrap();
            gpu.adamw_direction(&mut d_gpu, &to_gpu(gpu, &g), &mut m_gpu, &mut v_gpu, &c)
                .unwrap();
        }
        let what = format!("adamw_direction {shape}");
        assert_close(&what, &to_host(gpu, &d_gpu), d_cpu.as_slice(), ELEMENTWISE_TOL);
        assert_close(&what, &to_host(gpu, &m_gpu), m_cpu.as_slice(), ELEMENTWISE_TOL);
        assert_close(&what, &to_host(gpu, &v_gpu), v_cpu.as_slice(), ELEMENTWISE_TOL);
    }
}

pub fn reductions_match_portable_and_write_only_their_slot<D: Device>(gpu: &D) {
    // Large enough for many partial blocks, and a stack for the per-item normalization.
    for shape in [
        Shape::matrix(3, 5),
        Shape::matrix(700, 1100),
        Shape::batched(5, 64, 300),
    ] {
        let x = host(shape, 5);
        let xg = to_gpu(gpu, &x);
        let slots = HostMatrix::from_vec(Shape::vector(4), vec![7.0; 4]).unwrap();
        let (mut want, mut got) = (slots.clone(), to_gpu(gpu, &slots));
        CPU.frobenius_norm(&x, &mut want, 2).unwrap();
        gpu.frobenius_norm(&xg, &mut got, 2).unwrap();
        let got = to_host(gpu, &got);
        assert_eq!(
            [got[0], got[1], got[3]],
            [7.0; 3],
            "frobenius_norm wrote outside slot 2"
        );
        assert_close(
            &format!("frobenius_norm {shape}"),
            &got,
            want.as_slice(),
            ELEMENTWISE_TOL,
        );

        for (scale, eps) in [(1.0, 1e-7), (1.02, 1e-6)] {
            let (mut want, mut got) = (x.clone(), to_gpu(gpu, &x));
            CPU.normalize_frobenius(&mut want, scale, eps).unwrap();
            gpu.normalize_frobenius(&mut got, scale, eps).unwrap();
            let what = format!("normalize_frobenius {shape}");
            assert_close(&what, &to_host(gpu, &got), want.as_slice(), ELEMENTWISE_TOL);
        }
    }

    // Squares past f32's range, of a norm within it, give the norm (accumulated in double);
    // a norm past f32's range becomes Inf; NaN propagates.
    let shape = Shape::matrix(4, 300);
    let mut out = gpu.zeros(Shape::vector(3)).unwrap();
    let mut data = vec![1e30f32; shape.len()];
    let mut m = gpu.zeros(shape).unwrap();
    gpu.upload(&mut m, &data).unwrap();
    gpu.frobenius_norm(&m, &mut out, 0).unwrap();
    data.fill(3e38);
    gpu.upload(&mut m, &data).unwrap();
    gpu.frobenius_norm(&m, &mut out, 1).unwrap();
    data[123] = f32::NAN;
    gpu.upload(&mut m, &data).unwrap();
    gpu.frobenius_norm(&m, &mut out, 2).unwrap();
    let out = to_host(gpu, &out);
    let want = 1e30 * (shape.len() as f64).sqrt();
    assert!(
        ((out[0] as f64 - want) / want).abs() < 1e-6 && out[1].is_infinite() && out[2].is_nan(),
        "frobenius_norm of huge/NaN input: {out:?}"
    );
}

pub fn newton_schulz_matches_portable_single_and_batched<D: Device>(gpu: &mut D) {
    let shapes = [
        Shape::matrix(64, 128),
        Shape::matrix(128, 64),
        Shape::matrix(128, 128),
        Shape::matrix(17, 33),
        Shape::batched(4, 32, 48),
        Shape::batched(3, 48, 32),
        Shape::matrix(256, 512),
    ];
    for p in Precision::ALL {
        gpu.set_precision(p);
        for (name, config) in [
            ("quintic", NewtonSchulz::quintic()),
            ("polar express", NewtonSchulz::polar_express()),
        ] {
            for (seed, &shape) in shapes.iter().enumerate() {
                let input = values(shape.len(), seed as u64 + 100);
                let mut ws_cpu = NsWorkspace::new(&CPU, shape).unwrap();
                CPU.upload(&mut ws_cpu.x, &input).unwrap();
                newton_schulz(&CPU, &config, &mut ws_cpu).unwrap();
                let mut ws_gpu = NsWorkspace::new(gpu, shape).unwrap();
                gpu.upload(&mut ws_gpu.x, &input).unwrap();
                newton_schulz(gpu, &config, &mut ws_gpu).unwrap();
                let what = format!("{p} newton-schulz ({name}) {shape}");
                assert_close(&what, &to_host(gpu, &ws_gpu.x), ws_cpu.x.as_slice(), ns_tol(p));
            }
        }
    }
}

pub fn optimizer_specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("attn.wq", Shape::matrix(64, 128), ParamRole::Hidden),
        ParamSpec::new("ffn.w_down", Shape::matrix(96, 32), ParamRole::Hidden),
        ParamSpec::new("moe.experts", Shape::batched(4, 32, 48), ParamRole::Hidden),
        ParamSpec::new("embed", Shape::matrix(50, 16), ParamRole::Embedding),
        ParamSpec::new("norm", Shape::vector(16), ParamRole::Norm),
    ]
}

pub fn hybrid_optimizer_steps_match_portable<D: Device>(gpu: &mut D) {
    let specs = optimizer_specs();
    for p in Precision::ALL {
        gpu.set_precision(p);
        let mut opt_cpu = HybridOptimizer::new(&CPU, specs.clone(), HybridConfig::default()).unwrap();
        let mut opt_gpu = HybridOptimizer::new(gpu, specs.clone(), HybridConfig::default()).unwrap();
        let initial: Vec<HostMatrix<f32>> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| host(s.shape, i as u64))
            .collect();
        let mut params_cpu = initial.clone();
        let mut params_gpu: Vec<D::Matrix> = initial.iter().map(|m| to_gpu(gpu, m)).collect();
        for step in 0..3u64 {
            let grads: Vec<HostMatrix<f32>> = specs
                .iter()
                .enumerate()
                .map(|(i, s)| host(s.shape, 1000 * (step + 1) + i as u64))
                .collect();
            let grads_gpu: Vec<D::Matrix> = grads.iter().map(|g| to_gpu(gpu, g)).collect();
            let lr = 0.02;
            let report_cpu = opt_cpu.step(&CPU, &mut params_cpu, &grads, lr).unwrap();
            let report_gpu = opt_gpu.step(gpu, &mut params_gpu, &grads_gpu, lr).unwrap();
            assert_eq!(report_gpu.step, report_cpu.step);
            let norm_err = (report_gpu.grad_norm - report_cpu.grad_norm).abs() / report_cpu.grad_norm;
            assert!(
                norm_err < 1e-6,
                "{p} grad norm {} vs {}",
                report_gpu.grad_norm,
                report_cpu.grad_norm
            );
        }
        // Compare what the optimizer did (param - initial): Muon's change carries the
        // Newton-Schulz error of the precision (twice its tolerance: three steps whose
        // momentum mixes them), AdamW's is pure elementwise f32.
        for (i, spec) in specs.iter().enumerate() {
            let delta = |now: &[f32]| -> Vec<f32> {
                now.iter()
                    .zip(initial[i].as_slice())
                    .map(|(a, b)| a - b)
                    .collect()
            };
            let (got, want) = (
                delta(&to_host(gpu, &params_gpu[i])),
                delta(params_cpu[i].as_slice()),
            );
            let tol = match spec.optimizer() {
                muon_core::OptimizerKind::Muon => 2.0 * ns_tol(p),
                muon_core::OptimizerKind::AdamW => 1e-5,
            };
            assert_close(
                &format!("{p} optimizer update of {}", spec.name),
                &got,
                &want,
                tol,
            );
        }
        let (mut rms_cpu, mut rms_gpu) = (vec![0.0; specs.len()], vec![0.0; specs.len()]);
        opt_cpu.update_rms(&CPU, &mut rms_cpu).unwrap();
        opt_gpu.update_rms(gpu, &mut rms_gpu).unwrap();
        for (g, c) in rms_gpu.iter().zip(&rms_cpu) {
            assert!(
                (g - c).abs() <= 2.0 * ns_tol(p) * c,
                "{p} update rms {rms_gpu:?} vs {rms_cpu:?}"
            );
        }
    }
}

pub fn a_non_finite_gradient_is_refused_on_the_gpu<D: Device>(gpu: &D) {
    let specs = optimizer_specs();
    let mut opt = HybridOptimizer::new(gpu, specs.clone(), HybridConfig::default()).unwrap();
    let mut params: Vec<D::Matrix> = specs.iter().map(|s| to_gpu(gpu, &host(s.shape, 1))).collect();
    let before: Vec<Vec<f32>> = params.iter().map(|p| to_host(gpu, p)).collect();
    let mut grads: Vec<D::Matrix> = specs.iter().map(|s| to_gpu(gpu, &host(s.shape, 2))).collect();
    let mut bad = values(specs[2].shape.len(), 3);
    bad[17] = f32::INFINITY;
    gpu.upload(&mut grads[2], &bad).unwrap();
    let err = opt.step(gpu, &mut params, &grads, 0.02).unwrap_err();
    assert!(matches!(err, Error::NonFiniteGradient { index: 2, .. }), "{err}");
    for (p, b) in params.iter().zip(&before) {
        assert_eq!(&to_host(gpu, p), b, "a refused step changed a parameter");
    }
}

pub fn transfers_check_lengths<D: Device>(gpu: &D) {
    let mut m = gpu.zeros(Shape::matrix(2, 3)).unwrap();
    assert!(gpu.upload(&mut m, &[1.0; 5]).is_err());
    assert!(gpu.download(&m, &mut [0.0; 7]).is_err());
    gpu.upload(&mut m, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    assert_eq!(to_host(gpu, &m), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let empty = gpu.zeros(Shape::matrix(0, 3)).unwrap();
    assert_eq!(to_host(gpu, &empty), Vec::<f32>::new());
}
