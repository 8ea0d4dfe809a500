//! The bf16 products (`Precision::Bf16`): every kernel this machine runs, forced in turn
//! (AMX, AVX512-BF16, and both paths' drivers on scalar models of their instructions, which
//! run anywhere), against independent references; Newton-Schulz in bf16 against its derived
//! singular-value band; a hybrid optimizer step in bf16 against f32; the triangular products
//! (`Structure`) against the full ones.
//!
//! A kernel the CPU lacks is skipped, saying so (and why: the CPU feature, or the OS's
//! permission).
//!
//! ## The GEMM error bound
//!
//! The inputs are rounded to bf16: `â = a (1 + d)`, `|d| <= u_b = 2^-8` (8 significand bits,
//! round to nearest), so `|â b̂ - a b| <= (2 u_b + u_b^2) |a| |b|`. A bf16 product is exact in
//! f32 (8 x 8 significand bits); the sums are f32 fused multiply-adds, one rounding each, `k`
//! of them per element, plus one per block of `k` the driver merges (256 or 512 `k` a block)
//! and the alpha/beta merge: with `r = k + ceil(k / 256) + 2` roundings, Higham's bound gives
//! `gamma_r = r u / (1 - r u)`, `u = 2^-24`, times `sum |â| |b̂| <= (1 + u_b)^2 sum |a| |b|`.
//! So, per element, against the exact product of the f32 inputs:
//!
//! ```text
//! |C - C_exact| <= |alpha| (2 u_b + u_b^2 + (1 + u_b)^2 gamma_r) sum|a||b| + gamma_2 |beta| |c|
//! ```
//!
//! Against the scalar reference (round the inputs with `muon_core::round_to_bf16`, multiply
//! and accumulate in f32 in `k` order), both sides carry the f32 accumulation error alone, so
//! the two differ by at most `2 gamma_r (|alpha| sum|â||b̂| + |beta| |c|)`: 2^-8 relative
//! smaller than the first bound, so a path that skipped the rounding to bf16 (or rounded
//! differently) fails it at these sizes (`r u <= 7e-5 < u_b / 50`).

mod common;

use common::{host, Rng};
use muon_core::nalgebra_backend::{polar_factor, singular_values};
use muon_core::{
    newton_schulz, round_to_bf16, Backend, HostMatrix, HybridConfig, HybridOptimizer, NewtonSchulz,
    NsWorkspace, ParamRole, ParamSpec, Shape, Transpose,
};
use muon_faer::{Bf16Kernel, Faer, Precision, Stored, StoredMut, Structure};
use nalgebra::DMatrix;

const U: f64 = 1.0 / (1u64 << 24) as f64;
const U_B: f64 = 1.0 / 256.0;
const SIDES: [usize; 10] = [1, 15, 16, 17, 31, 32, 33, 127, 128, 129];
/// Every kernel a test forces in turn: the two units and both scalar models.
const FORCED: [Bf16Kernel; 4] = [
    Bf16Kernel::Amx,
    Bf16Kernel::Avx512Bf16,
    Bf16Kernel::AmxModel,
    Bf16Kernel::Avx512Bf16Model,
];
const OPS: [(Transpose, Transpose); 4] = [
    (Transpose::No, Transpose::No),
    (Transpose::No, Transpose::Yes),
    (Transpose::Yes, Transpose::No),
    (Transpose::Yes, Transpose::Yes),
];

/// `kernel` forced, as a bf16 backend on `threads` threads; `None` where this machine does
/// not run it, saying why (the CPU feature or the OS permission it lacks).
fn backend(kernel: Bf16Kernel, threads: usize) -> Option<Faer<f32>> {
    match Faer::<f32>::with_threads(threads)
        .with_precision(Precision::Bf16)
        .with_bf16_kernel(kernel)
    {
        Ok(cpu) => {
            assert_eq!(cpu.bf16_kernel(), Some(kernel), "a forced kernel runs as itself");
            Some(cpu)
        }
        Err(muon_core::Error::Backend(reason)) => {
            muon_test_support::skip(reason);
            None
        }
        Err(e) => panic!("{kernel}: unexpected error {e}"),
    }
}

fn gamma(r: usize) -> f64 {
    r as f64 * U / (1.0 - r as f64 * U)
}

/// Element `(i, j)` of `op(x)` for a row-major item of `rows x cols` stored.
fn at(x: &[f32], cols: usize, t: Transpose, i: usize, j: usize) -> f32 {
    match t {
        Transpose::No => x[i * cols + j],
        Transpose::Yes => x[j * cols + i],
    }
}

struct Gemm {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    ops: (Transpose, Transpose),
    alpha: f32,
    beta: f32,
}

/// Runs one GEMM on `cpu` and (if `check`) checks it against both references; returns the
/// result.
fn check_gemm(cpu: &Faer<f32>, rng: &mut Rng, g: &Gemm, check: bool) -> Vec<f32> {
    let Gemm {
        batch,
        m,
        n,
        k,
        ops: (ta, tb),
        alpha,
        beta,
    } = *g;
    let stored = |r: usize, c: usize, t: Transpose| match t {
        Transpose::No => Shape::batched(batch, r, c),
        Transpose::Yes => Shape::batched(batch, c, r),
    };
    let (sa, sb, sc) = (stored(m, k, ta), stored(k, n, tb), Shape::batched(batch, m, n));
    let data = |rng: &mut Rng, s: Shape| -> Vec<f32> { rng.vec(s.len()).iter().map(|&v| v as f32).collect() };
    let (a, b, c) = (data(rng, sa), data(rng, sb), data(rng, sc));
    let mut dst = HostMatrix::from_vec(sc, c.clone()).unwrap();
    let (da, db) = (
        HostMatrix::from_vec(sa, a.clone()).unwrap(),
        HostMatrix::from_vec(sb, b.clone()).unwrap(),
    );
    cpu.gemm(&mut dst, alpha, &da, ta, &db, tb, beta).unwrap();
    let got = host(cpu, &dst);
    if !check {
        return got.iter().map(|&v| v as f32).collect();
    }

    let r = k + k.div_ceil(256) + 2;
    let (al, be) = (alpha as f64, beta as f64);
    for e in 0..batch {
        let (ai, bi) = (
            &a[e * sa.batch_stride()..][..sa.batch_stride()],
            &b[e * sb.batch_stride()..][..sb.batch_stride()],
        );
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut abs, mut abs_b) = (0.0f64, 0.0f64, 0.0f64);
                let mut scalar = 0.0f32;
                for kk in 0..k {
                    let (x, y) = (at(ai, sa.cols, ta, i, kk), at(bi, sb.cols, tb, kk, j));
                    exact += x as f64 * y as f64;
                    abs += (x as f64 * y as f64).abs();
                    let (xb, yb) = (round_to_bf16(x), round_to_bf16(y));
                    scalar += xb * yb;
                    abs_b += (xb as f64 * yb as f64).abs();
                }
                let c0 = c[(e * m + i) * n + j];
                let out = got[(e * m + i) * n + j];
                let exact = al * exact + be * c0 as f64;
                let scalar = if beta == 0.0 {
                    alpha * scalar
                } else {
                    alpha * scalar + beta * c0
                } as f64;
                let bound = al.abs() * (2.0 * U_B + U_B * U_B + (1.0 + U_B).powi(2) * gamma(r)) * abs
                    + gamma(2) * (be * c0 as f64).abs()
                    + 1e-35;
                let at = format!(
                    "{} gemm {batch}x{m}x{n}x{k} {ta:?}/{tb:?} beta {beta}, element ({e}, {i}, {j})",
                    cpu.bf16_kernel().map_or("f32", Bf16Kernel::name)
                );
                assert!(
                    (out - exact).abs() <= bound,
                    "{at}: {out} vs exact {exact}, bound {bound}"
                );
                let bound = 2.0 * gamma(r) * (al.abs() * abs_b + (be * c0 as f64).abs()) + 1e-35;
                assert!(
                    (out - scalar).abs() <= bound,
                    "{at}: {out} vs scalar bf16 reference {scalar}, bound {bound}"
                );
            }
        }
    }
    got.iter().map(|&v| v as f32).collect()
}

/// Every side against every other (cycling transposes, alphas and betas), then shapes that
/// cross the drivers' blocks (rows past 168 and 128, columns past 1024 and 512, `k` past 512
/// and 1024), stacks split over the team, and `k = 0`. Returns all results, in order.
fn gemm_suite(cpu: &Faer<f32>, check: bool) -> Vec<f32> {
    let mut rng = Rng::new(11);
    let mut out = Vec::new();
    let (alphas, betas) = ([1.0, 0.75, -2.0], [0.0, 1.0, -0.3]);
    let mut case = 0;
    for &m in &SIDES {
        for &n in &SIDES {
            for &k in &SIDES {
                let g = Gemm {
                    batch: 1,
                    m,
                    n,
                    k,
                    ops: OPS[case % 4],
                    alpha: alphas[case % 3],
                    beta: betas[case / 4 % 3],
                };
                out.extend(check_gemm(cpu, &mut rng, &g, check));
                case += 1;
            }
        }
    }
    for ops in OPS {
        for (batch, m, n, k, beta) in [
            (1, 300, 40, 17, 0.0),
            (1, 40, 300, 129, 1.0),
            (1, 200, 1100, 33, -0.3),
            (1, 90, 70, 1100, 0.0),
            (1, 180, 96, 600, 1.0),
            (3, 33, 130, 127, 0.0),
            (8, 64, 96, 80, -0.3),
            (2, 150, 140, 128, 1.0),
            (2, 5, 7, 0, -0.3),
        ] {
            out.extend(check_gemm(
                cpu,
                &mut rng,
                &Gemm {
                    batch,
                    m,
                    n,
                    k,
                    ops,
                    alpha: 0.75,
                    beta,
                },
                check,
            ));
        }
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Each kernel passes the suite at 1 thread; at 2 and 3 threads (2 for the slow models) its
/// results have the same bits as there (the splits do not change any element's arithmetic).
fn gemms_on(kernel: Bf16Kernel) -> Option<Vec<f32>> {
    let one = gemm_suite(&backend(kernel, 1)?, true);
    let model = matches!(kernel, Bf16Kernel::AmxModel | Bf16Kernel::Avx512Bf16Model);
    for &threads in if model { &[2][..] } else { &[2, 3][..] } {
        let more = gemm_suite(&backend(kernel, threads)?, false);
        assert!(
            bits(&one) == bits(&more),
            "{kernel} at {threads} threads: other bits than at 1"
        );
    }
    Some(one)
}

#[test]
fn avx512bf16_gemm_matches_the_references_and_its_model_bit_for_bit() {
    let Some(real) = gemms_on(Bf16Kernel::Avx512Bf16) else {
        return;
    };
    // The model runs the same driver with VDPBF16PS's documented per-lane arithmetic.
    let model = gemm_suite(&backend(Bf16Kernel::Avx512Bf16Model, 1).unwrap(), false);
    assert!(
        bits(&real) == bits(&model),
        "VDPBF16PS differs from its documented semantics"
    );
}

#[test]
fn avx512bf16_model_gemm_matches_the_references() {
    gemms_on(Bf16Kernel::Avx512Bf16Model).expect("the model runs anywhere");
}

#[test]
fn amx_model_gemm_matches_the_references() {
    gemms_on(Bf16Kernel::AmxModel).expect("the model runs anywhere");
}

#[test]
fn amx_gemm_matches_the_references() {
    let Some(real) = gemms_on(Bf16Kernel::Amx) else {
        return;
    };
    let model = gemm_suite(&backend(Bf16Kernel::AmxModel, 1).unwrap(), false);
    // Both pass the bounds; the order of TDPBF16PS's additions inside the unit is the
    // hardware's, so equal bits are reported, not required.
    let same = bits(&real) == bits(&model);
    println!(
        "AMX and its model: {}",
        if same {
            "the same bits"
        } else {
            "within the bound, other bits"
        }
    );
}

/// Small integers: every product and partial sum is exact in f32, so any path must give the
/// exact result whatever its order of additions; a wrong tile layout cannot hide in rounding.
#[test]
fn every_kernel_is_exact_on_small_integers() {
    for kernel in FORCED {
        let Some(cpu) = backend(kernel, 2) else { continue };
        for (m, n, k) in [(16, 16, 32), (32, 32, 64), (33, 47, 65), (130, 70, 520)] {
            for (ta, tb) in OPS {
                let int = |i: usize, salt: usize| ((i * 7 + salt * 13) % 9) as f32 - 4.0;
                let sa = if ta == Transpose::No {
                    Shape::matrix(m, k)
                } else {
                    Shape::matrix(k, m)
                };
                let sb = if tb == Transpose::No {
                    Shape::matrix(k, n)
                } else {
                    Shape::matrix(n, k)
                };
                let a: Vec<f32> = (0..sa.len()).map(|i| int(i, 1)).collect();
                let b: Vec<f32> = (0..sb.len()).map(|i| int(i, 2)).collect();
                let mut dst = HostMatrix::zeros(Shape::matrix(m, n));
                cpu.gemm(
                    &mut dst,
                    1.0,
                    &HostMatrix::from_vec(sa, a.clone()).unwrap(),
                    ta,
                    &HostMatrix::from_vec(sb, b.clone()).unwrap(),
                    tb,
                    0.0,
                )
                .unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k)
                            .map(|kk| at(&a, sa.cols, ta, i, kk) * at(&b, sb.cols, tb, kk, j))
                            .sum();
                        assert_eq!(
                            dst.as_slice()[i * n + j],
                            want,
                            "{kernel} {m}x{n}x{k} {ta:?}/{tb:?} at ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
}

/// The band the singular values of Newton-Schulz's output lie in, from the input's `[lo, hi]`
/// (singular values over the Frobenius norm): each step maps an interval through its
/// polynomial `p(s) = a s + b s^3 + c s^5` (its extremes at the ends and at the critical points
/// inside) and widens it by `delta`, the most the step's rounding moves any singular value
/// (Weyl: by at most the spectral norm of the step's error).
fn band(config: &NewtonSchulz, mut lo: f64, mut hi: f64, delta: f64) -> (f64, f64) {
    for k in 0..config.steps {
        let [a, b, c] = config.coefficients_at(k);
        let p = |s: f64| a * s + b * s.powi(3) + c * s.powi(5);
        // p'(s) = a + 3 b s^2 + 5 c s^4 = 0.
        let disc = (9.0 * b * b - 20.0 * a * c).max(0.0).sqrt();
        let mut points = vec![lo, hi];
        for s2 in [(-3.0 * b - disc) / (10.0 * c), (-3.0 * b + disc) / (10.0 * c)] {
            if s2 > 0.0 && (lo..=hi).contains(&s2.sqrt()) {
                points.push(s2.sqrt());
            }
        }
        let values: Vec<f64> = points.iter().map(|&s| p(s)).collect();
        let (min, max) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(min > 0.0, "the band assumes p stays positive on it");
        (lo, hi) = ((min - delta).max(0.0), max + delta);
    }
    (lo, hi)
}

/// What one bf16 step's rounding does to the singular values, at most (to first order).
///
/// A step computes `X' = M X` with `M = a I + b S + c S^2`, `S = X X^T`, from operands
/// rounded to bf16: `X` (in `S` and in `M X`), `S` (in `S^2`) and `M`. A rounding changes each
/// element by a relative `<= u_b`, with signs that do not line up, and the spectral norm of
/// such an error matrix is about `u_b` times the matrix's own (its entries are `u_b`-small and
/// uncorrelated; the elementwise worst case, `u_b || |X| ||`, is not what happens). So the two
/// factors of `M X` each contribute `u_b ||M|| ||X|| <= u_b max p(s) <= 1.2 u_b` on the band,
/// and the errors `S` carries into `M` (`|b + 2 c s^2| <= 2.9` times `||dS|| <= 2 u_b ||S||`,
/// hence through `X` once more) about as much again: `delta ~ 4 u_b` per step. The f32 products
/// make the same errors `2^16` times smaller, plus the accumulation's `gamma_k`.
const DELTA_BF16: f64 = 4.0 * U_B;

/// Every kernel this machine runs, on 1 and 2 threads: the output's singular values (f64 SVD)
/// lie in the band derived from the input's, with `DELTA_BF16` per step; the f32 backend's in
/// the band for f32 roundings (`delta = 64 n u`, far narrower: the bf16 band is wider by
/// about `4 DELTA_BF16` on each side). And the output is within the band's reach of the
/// input's polar factor `Q = U V^T`: `||O - Q||_2 <= max(1 - lo, hi - 1)`, exactly so for an
/// output with `Q`'s singular vectors and singular values in `[lo, hi]`.
#[test]
fn bf16_newton_schulz_stays_in_its_band() {
    let config = NewtonSchulz::quintic();
    let mut rng = Rng::new(12);
    let shapes = [
        Shape::matrix(64, 200),
        Shape::matrix(200, 64),
        Shape::batched(3, 96, 160),
        Shape::matrix(256, 512),
        Shape::matrix(512, 128),
    ];
    for shape in shapes {
        let x: Vec<f32> = rng.vec(shape.len()).iter().map(|&v| v as f32).collect();
        let run = |cpu: &Faer<f32>| {
            let mut ws = NsWorkspace::new(cpu, shape).unwrap();
            cpu.upload(&mut ws.x, &x).unwrap();
            newton_schulz(cpu, &config, &mut ws).unwrap();
            host(cpu, &ws.x)
        };
        let item = |v: &[f64], e: usize| {
            let s = shape.batch_stride();
            DMatrix::from_row_slice(shape.rows, shape.cols, &v[e * s..(e + 1) * s])
        };
        let input: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let check = |what: &str, out: &[f64], delta: f64| {
            for e in 0..shape.batch {
                let n = item(&input, e);
                let sv = singular_values(&n);
                let norm = sv.iter().map(|s| s * s).sum::<f64>().sqrt();
                let (lo0, hi0) = sv.iter().fold((f64::MAX, 0.0f64), |(l, h), &s| {
                    (l.min(s / norm), h.max(s / norm))
                });
                let (lo, hi) = band(&config, lo0, hi0, delta);
                let o = item(out, e);
                let got = singular_values(&o);
                let (min, max) = got
                    .iter()
                    .fold((f64::MAX, 0.0f64), |(l, h), &s| (l.min(s), h.max(s)));
                assert!(
                    lo <= min && max <= hi,
                    "{what} {shape} item {e}: singular values [{min}, {max}] outside [{lo}, {hi}]"
                );
                let reach = (1.0 - lo).max(hi - 1.0);
                let dist = singular_values(&(o - polar_factor(&n)))[0];
                assert!(
                    dist <= reach,
                    "{what} {shape} item {e}: ||O - Q|| = {dist} > {reach}"
                );
            }
        };
        check(
            "f32",
            &run(&Faer::<f32>::with_threads(2)),
            64.0 * shape.max_side() as f64 * U,
        );
        let models_too = shape.len() <= 40_000;
        for kernel in FORCED {
            if !models_too && matches!(kernel, Bf16Kernel::AmxModel | Bf16Kernel::Avx512Bf16Model) {
                continue;
            }
            for threads in [1, 2] {
                let Some(cpu) = backend(kernel, threads) else {
                    continue;
                };
                check(kernel.name(), &run(&cpu), DELTA_BF16);
            }
        }
    }
}

/// Three hybrid optimizer steps in bf16 against the same in f32, from the same parameters and
/// gradients. Momentum and AdamW are elementwise and run in f32 either way: the AdamW
/// parameters, and every step's gradient norm, have the same bits. A Muon parameter moves by
/// `lr scale O` per step (after the same decay), and each `O` is within `w = max(1 - lo, hi - 1)`
/// of the same polar factor (the band's consequence above; `w <= 0.35` for the quintic's bf16
/// band): the two runs' parameters differ by at most `steps lr scale 2 w` in spectral norm.
#[test]
fn a_hybrid_step_in_bf16_tracks_f32() {
    let specs = vec![
        ParamSpec::new("embed", Shape::matrix(64, 32), ParamRole::Embedding),
        ParamSpec::new("wq", Shape::matrix(64, 64), ParamRole::Hidden),
        ParamSpec::new("w_up", Shape::matrix(192, 64), ParamRole::Hidden),
        ParamSpec::new("experts", Shape::batched(4, 64, 96), ParamRole::Hidden),
        ParamSpec::new("big", Shape::matrix(256, 384), ParamRole::Hidden),
        ParamSpec::new("norm", Shape::vector(64), ParamRole::Norm),
        ParamSpec::new("head", Shape::matrix(64, 64), ParamRole::LmHead),
    ];
    let mut rng = Rng::new(13);
    let data = |rng: &mut Rng, s: Shape| -> Vec<f32> { rng.vec(s.len()).iter().map(|&v| v as f32).collect() };
    let init: Vec<Vec<f32>> = specs.iter().map(|s| data(&mut rng, s.shape)).collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..3)
        .map(|_| specs.iter().map(|s| data(&mut rng, s.shape)).collect())
        .collect();
    let (lr, steps) = (0.02, grads.len());
    let run = |cpu: &Faer<f32>| {
        let config = HybridConfig::default();
        let mut opt = HybridOptimizer::new(cpu, specs.clone(), config).unwrap();
        let mut params: Vec<HostMatrix<f32>> = specs
            .iter()
            .zip(&init)
            .map(|(s, d)| HostMatrix::from_vec(s.shape, d.clone()).unwrap())
            .collect();
        let mut norms = Vec::new();
        for step in &grads {
            let g: Vec<HostMatrix<f32>> = specs
                .iter()
                .zip(step)
                .map(|(s, d)| HostMatrix::from_vec(s.shape, d.clone()).unwrap())
                .collect();
            norms.push(opt.step(cpu, &mut params, &g, lr).unwrap().grad_norm);
        }
        (params.iter().map(|p| host(cpu, p)).collect::<Vec<_>>(), norms)
    };
    let (want, want_norms) = run(&Faer::<f32>::with_threads(2));
    let (lo, hi) = (0.68 - 5.0 * DELTA_BF16, 1.21 + 5.0 * DELTA_BF16);
    let w = (1.0 - lo).max(hi - 1.0);
    for kernel in [Bf16Kernel::Amx, Bf16Kernel::Avx512Bf16, Bf16Kernel::AmxModel] {
        let Some(cpu) = backend(kernel, 2) else { continue };
        let (got, norms) = run(&cpu);
        assert_eq!(norms, want_norms, "{kernel}: gradient norms");
        let mut moved = false;
        for (i, spec) in specs.iter().enumerate() {
            if spec.role != ParamRole::Hidden {
                assert!(
                    got[i] == want[i],
                    "{kernel}: AdamW parameter {} changed",
                    spec.name
                );
                continue;
            }
            let scale = 0.2 * (spec.shape.max_side() as f64).sqrt();
            let allowed = steps as f64 * lr * scale * 2.0 * w;
            let s = spec.shape.batch_stride();
            for e in 0..spec.shape.batch {
                let d: Vec<f64> = (e * s..(e + 1) * s).map(|j| got[i][j] - want[i][j]).collect();
                let diff = singular_values(&DMatrix::from_row_slice(spec.shape.rows, spec.shape.cols, &d))[0];
                assert!(
                    diff <= allowed,
                    "{kernel}: {} item {e} differs by {diff} > {allowed}",
                    spec.name
                );
                moved |= diff > 0.0;
            }
        }
        assert!(
            moved,
            "{kernel}: the bf16 products changed nothing (are they running?)"
        );
    }
}

/// The symmetric products in bf16 on every kernel: `gram` both ways and `symmetric_square`,
/// against the exact product with the GEMM bound above, and exactly symmetric (one triangle,
/// mirrored). The shapes reach the team's row bands (2 threads) and stacks.
#[test]
fn bf16_symmetric_products_match_the_exact_ones() {
    for kernel in FORCED {
        let Some(cpu) = backend(kernel, 2) else { continue };
        let mut rng = Rng::new(14);
        let data = |rng: &mut Rng, n: usize| -> Vec<f32> { rng.vec(n).iter().map(|&v| v as f32).collect() };
        // (batch, rows, cols) of X for the Gram products; S is m x m from the same list.
        for (batch, r, c) in [
            (1, 1, 40),
            (1, 17, 129),
            (1, 129, 17),
            (3, 64, 100),
            (1, 260, 190),
            (1, 300, 520),
        ] {
            for op in [Transpose::No, Transpose::Yes] {
                let shape = Shape::batched(batch, r, c);
                let x = data(&mut rng, shape.len());
                let (m, k) = shape.op(op);
                let mut g = HostMatrix::zeros(Shape::batched(batch, m, m));
                cpu.gram(&mut g, &HostMatrix::from_vec(shape, x.clone()).unwrap(), op)
                    .unwrap();
                let (alpha, beta) = (1.0, 0.0);
                let exact = |e: usize, i: usize, j: usize| {
                    let xe = &x[e * shape.batch_stride()..];
                    (0..k).fold((0.0, 0.0), |(s, a), kk| {
                        let (u, v) = (at(xe, c, op, i, kk) as f64, at(xe, c, op, j, kk) as f64);
                        (s + u * v, a + (u * v).abs())
                    })
                };
                let g = g.as_slice();
                for e in 0..batch {
                    for i in 0..m {
                        for j in 0..m {
                            let got = g[(e * m + i) * m + j];
                            assert_eq!(
                                got,
                                g[(e * m + j) * m + i],
                                "{kernel} gram {shape} {op:?}: not symmetric"
                            );
                            let (want, abs) = exact(e, i, j);
                            let r = k + k.div_ceil(256) + 2;
                            let bound =
                                (2.0 * U_B + U_B * U_B + (1.0 + U_B).powi(2) * gamma(r)) * abs + 1e-35;
                            assert!(
                                (got as f64 * alpha + beta - want).abs() <= bound,
                                "{kernel} gram {shape} {op:?} ({e}, {i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
        for (batch, m) in [(1, 15), (2, 33), (1, 129), (1, 300)] {
            let shape = Shape::batched(batch, m, m);
            let symmetric = |rng: &mut Rng| {
                let v = data(rng, shape.len());
                let mut s = v.clone();
                for e in 0..batch {
                    for i in 0..m {
                        for j in 0..i {
                            s[(e * m + j) * m + i] = v[(e * m + i) * m + j];
                        }
                    }
                }
                s
            };
            let (s, c0) = (symmetric(&mut rng), symmetric(&mut rng));
            let (alpha, beta) = (2.0315f32, -4.775f32);
            let mut d = HostMatrix::from_vec(shape, c0.clone()).unwrap();
            cpu.symmetric_square(
                &mut d,
                alpha,
                &HostMatrix::from_vec(shape, s.clone()).unwrap(),
                beta,
            )
            .unwrap();
            let d = d.as_slice();
            for e in 0..batch {
                for i in 0..m {
                    for j in 0..m {
                        let idx = (e * m + i) * m + j;
                        assert_eq!(
                            d[idx],
                            d[(e * m + j) * m + i],
                            "{kernel} symmetric_square: not symmetric"
                        );
                        let (mut want, mut abs) = (0.0f64, 0.0f64);
                        for kk in 0..m {
                            let p = s[(e * m + i) * m + kk] as f64 * s[(e * m + kk) * m + j] as f64;
                            want += p;
                            abs += p.abs();
                        }
                        let want = alpha as f64 * want + beta as f64 * c0[idx] as f64;
                        let r = m + m.div_ceil(256) + 2;
                        let bound = (alpha as f64).abs()
                            * (2.0 * U_B + U_B * U_B + (1.0 + U_B).powi(2) * gamma(r))
                            * abs
                            + gamma(2) * (beta as f64 * c0[idx] as f64).abs()
                            + 1e-35;
                        assert!(
                            (d[idx] as f64 - want).abs() <= bound,
                            "{kernel} symmetric_square {shape} ({e}, {i}, {j}): {} vs {want}",
                            d[idx]
                        );
                    }
                }
            }
        }
    }
}

/// `product_on_thread` with a [`Structure`] gives the bits of the full product where it
/// promises to: a triangular `op(A)` (its zeros skipped per row panel, in whole pairs of `k`;
/// `k` up to 530 crosses the drivers' 512-long blocks, where a row panel's first or last
/// blocks are wholly zero) and the lower triangle of C. Every kernel, both stored layouts of
/// each operand, with and without accumulation into C.
#[test]
fn structured_products_skip_only_zeros_and_unread_elements() {
    for kernel in FORCED {
        let Some(cpu) = backend(kernel, 1) else { continue };
        let mut rng = Rng::new(15);
        let mut data = |n: usize| -> Vec<f32> { rng.vec(n).iter().map(|&v| v as f32 - 0.5).collect() };
        // (m, n, k): square triangles (attention's P V, P^T dO, dS K, dS^T Q) and a wide one.
        for (m, n, k) in [
            (1, 3, 1),
            (17, 5, 17),
            (128, 32, 128),
            (40, 19, 70),
            (530, 20, 530),
        ] {
            for (ta, tb) in OPS {
                for (structure, zero) in [
                    (Structure::LowerA, (|i, p| p > i) as fn(usize, usize) -> bool),
                    (Structure::UpperA, |i, p| p < i),
                ] {
                    // op(A) is m x k; stored k x m when transposed.
                    let mut a = data(m * k);
                    for i in 0..m {
                        for p in (0..k).filter(|&p| zero(i, p)) {
                            let at = if ta == Transpose::No { i * k + p } else { p * m + i };
                            a[at] = 0.0;
                        }
                    }
                    let b = data(k * n);
                    let (a_rc, b_rc) = (stored(m, k, ta), stored(k, n, tb));
                    let c0 = data(m * n);
                    for accumulate in [false, true] {
                        let run = |structure| {
                            let mut c = c0.clone();
                            let (a, b) = (
                                Stored::new(&a, a_rc.0, a_rc.1, ta),
                                Stored::new(&b, b_rc.0, b_rc.1, tb),
                            );
                            let cm = StoredMut::new(&mut c, m, n);
                            cpu.product_on_thread(cm, a, b, 1.7, accumulate, structure);
                            c
                        };
                        assert!(
                            bits(&run(structure)) == bits(&run(Structure::Full)),
                            "{kernel} {structure:?} {m}x{n}x{k} {ta:?}/{tb:?} accumulate {accumulate}: \
                             other bits than the full product"
                        );
                    }
                }
            }
        }
        // The scores' shape: C = Q K^T, m x m from k columns; only j <= i is compared.
        for (m, k) in [(1, 4), (33, 48), (128, 48), (530, 20)] {
            let (q, kk) = (data(m * k), data(m * k));
            let run = |structure| {
                let mut c = vec![f32::NAN; m * m];
                let (a, b) = (
                    Stored::new(&q, m, k, Transpose::No),
                    Stored::new(&kk, m, k, Transpose::Yes),
                );
                cpu.product_on_thread(StoredMut::new(&mut c, m, m), a, b, 0.125, false, structure);
                c
            };
            let (lower, full) = (run(Structure::LowerC), run(Structure::Full));
            for i in 0..m {
                assert!(
                    bits(&lower[i * m..=i * m + i]) == bits(&full[i * m..=i * m + i]),
                    "{kernel} LowerC {m}x{m}x{k}: row {i} differs from the full product"
                );
            }
        }
    }
}

/// `(rows, cols)` of an operand stored for `op` that is `rows x cols` after it.
/// Operands stored as blocks of columns of wider matrices (rows `ld` apart, as attention
/// reads one head's columns of a token-rows matrix) give the bits of the same product on
/// dense copies on every bf16 kernel (the packs read the same values, whatever the stride),
/// and the product writes only its block of C: every other element of the wide C keeps its
/// value. faer's f32 kernels choose their code path by the operands' strides (a 1 x 1 x 1
/// product already rounds once or twice), so there the two agree to rounding: each is within
/// `gamma_(k+2) = (k+2) u` (u = 2^-24) of the exact value relative to
/// `|alpha| sum |a| |b| (+ |c|)`, so within twice that of each other.
#[test]
fn strided_operands_give_the_dense_products_values() {
    let f32_backend = Some(Faer::<f32>::with_threads(1));
    let backends = FORCED.map(|kernel| (format!("{kernel}"), backend(kernel, 1)));
    let backends = backends.into_iter().chain([("f32".to_string(), f32_backend)]);
    for (name, cpu) in backends {
        let Some(cpu) = cpu else { continue };
        let mut rng = Rng::new(16);
        let mut data = |n: usize| -> Vec<f32> { rng.vec(n).iter().map(|&v| v as f32 - 0.5).collect() };
        for (m, n, k) in [(1, 1, 1), (20, 7, 33), (128, 48, 128), (70, 32, 19)] {
            for (ta, tb) in OPS {
                let (a_rc, b_rc) = (stored(m, k, ta), stored(k, n, tb));
                // Each operand is columns `off..off + cols` of a matrix `ld` wide.
                let wide = |rows: usize, cols: usize, off: usize, ld: usize, src: &[f32]| {
                    let mut w = vec![f32::NAN; rows * ld];
                    for r in 0..rows {
                        w[r * ld + off..][..cols].copy_from_slice(&src[r * cols..][..cols]);
                    }
                    w
                };
                let (a, b, c0) = (data(m * k), data(k * n), data(m * n));
                let (lda, ldb, ldc) = (a_rc.1 + 5, b_rc.1 + 3, n + 9);
                let (wa, wb) = (wide(a_rc.0, a_rc.1, 2, lda, &a), wide(b_rc.0, b_rc.1, 1, ldb, &b));
                let wc0 = wide(m, n, 4, ldc, &c0);
                for accumulate in [false, true] {
                    let mut dense = c0.clone();
                    let (da, db) = (
                        Stored::new(&a, a_rc.0, a_rc.1, ta),
                        Stored::new(&b, b_rc.0, b_rc.1, tb),
                    );
                    cpu.product_on_thread(
                        StoredMut::new(&mut dense, m, n),
                        da,
                        db,
                        0.3,
                        accumulate,
                        Structure::Full,
                    );
                    let mut wc = wc0.clone();
                    let sa = Stored::new(&wa[2..], a_rc.0, a_rc.1, ta).with_ld(lda);
                    let sb = Stored::new(&wb[1..], b_rc.0, b_rc.1, tb).with_ld(ldb);
                    let sc = StoredMut::new(&mut wc[4..], m, n).with_ld(ldc);
                    cpu.product_on_thread(sc, sa, sb, 0.3, accumulate, Structure::Full);
                    let case = format!("{name} {m}x{n}x{k} {ta:?}/{tb:?} accumulate {accumulate}");
                    let want = wide(m, n, 4, ldc, &dense);
                    let exact = name != "f32";
                    let bound = |i: usize, j: usize| {
                        let op_a = |p: usize| {
                            if ta == Transpose::No {
                                a[i * k + p]
                            } else {
                                a[p * m + i]
                            }
                        };
                        let op_b = |p: usize| {
                            if tb == Transpose::No {
                                b[p * n + j]
                            } else {
                                b[j * k + p]
                            }
                        };
                        let terms: f64 = (0..k).map(|p| (0.3 * op_a(p) * op_b(p)).abs() as f64).sum();
                        let c = if accumulate {
                            c0[i * n + j].abs() as f64
                        } else {
                            0.0
                        };
                        2.0 * (k + 2) as f64 * 2f64.powi(-24) * (terms + c)
                    };
                    let close = |e: usize, w: f32, g: f32| {
                        let (row, col) = (e / ldc, e % ldc);
                        w.to_bits() == g.to_bits()
                            || (!exact
                                && (4..4 + n).contains(&col)
                                && ((w - g).abs() as f64) <= bound(row, col - 4))
                    };
                    let differ = (want.iter().zip(&wc).enumerate()).position(|(e, (&w, &g))| !close(e, w, g));
                    assert!(
                        differ.is_none(),
                        "{case}: element {differ:?} (rows {ldc} wide, the block from column 4) \
                         differs from the dense product's: {:?}",
                        differ.map(|i| (want[i], wc[i]))
                    );
                }
            }
        }
    }
}

fn stored(rows: usize, cols: usize, op: Transpose) -> (usize, usize) {
    if op == Transpose::No {
        (rows, cols)
    } else {
        (cols, rows)
    }
}

/// What each precision runs as. `Tf32` as `F32` and `Bf16` on `Faer<f64>` as f64, bit for bit
/// (no bf16 kernel reported); `Bf16` on `Faer<f32>` on the kernel `Auto` detects (or f32 where
/// there is none). Forcing a kernel the machine lacks is an error naming what is missing.
#[test]
fn what_each_precision_runs_as() {
    let mut rng = Rng::new(15);
    let shape = Shape::matrix(70, 90);
    let (a, b) = (rng.vec(shape.len()), rng.vec(shape.len()));
    fn product<T: muon_faer::Elem>(cpu: &Faer<T>, a: &[f64], b: &[f64], shape: Shape) -> Vec<f64> {
        let m = |d: &[f64]| HostMatrix::from_vec(shape, d.iter().map(|&v| T::from_f64(v)).collect()).unwrap();
        let mut c = HostMatrix::zeros(Shape::matrix(shape.rows, shape.rows));
        cpu.gemm(
            &mut c,
            T::ONE,
            &m(a),
            Transpose::No,
            &m(b),
            Transpose::Yes,
            T::ZERO,
        )
        .unwrap();
        host(cpu, &c)
    }
    let f32s = Faer::<f32>::with_threads(2);
    assert_eq!(f32s.precision(), Precision::F32, "the default");
    let tf32 = f32s.clone().with_precision(Precision::Tf32);
    assert_eq!((tf32.precision(), tf32.bf16_kernel()), (Precision::Tf32, None));
    assert_eq!(
        product(&tf32, &a, &b, shape),
        product(&f32s, &a, &b, shape),
        "TF32 runs as F32"
    );
    let f64s = Faer::<f64>::with_threads(2);
    let mut f64_bf16 = f64s.clone();
    f64_bf16.set_precision(Precision::Bf16);
    assert_eq!(
        (f64_bf16.precision(), f64_bf16.bf16_kernel()),
        (Precision::Bf16, None)
    );
    assert_eq!(
        product(&f64_bf16, &a, &b, shape),
        product(&f64s, &a, &b, shape),
        "bf16 on f64 runs as f64"
    );
    let auto = f32s.clone().with_precision(Precision::Bf16);
    assert_eq!(auto.bf16_kernel(), Bf16Kernel::detect());
    if auto.bf16_kernel().is_some() {
        assert_ne!(
            product(&auto, &a, &b, shape),
            product(&f32s, &a, &b, shape),
            "bf16 rounds its inputs"
        );
    }
    for (kernel, needs) in [(Bf16Kernel::Amx, "AMX"), (Bf16Kernel::Avx512Bf16, "AVX512-BF16")] {
        match (kernel.check(), f32s.clone().with_bf16_kernel(kernel)) {
            (Ok(()), Ok(cpu)) => assert_eq!(cpu.with_precision(Precision::Bf16).bf16_kernel(), Some(kernel)),
            (Err(e), Err(_)) => assert!(e.to_string().contains(needs), "{e} should name {needs}"),
            _ => panic!("{kernel}: check and with_bf16_kernel disagree"),
        }
    }
}
