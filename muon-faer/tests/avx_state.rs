//! The backend leaves the AVX upper state clean after its products: faer's kernels leave it
//! dirty, which made every later legacy-SSE instruction on the thread (glibc's `expf`, for
//! one) ~30x slower. Measured as a ratio of times on the same thread, min of several runs; the
//! effect is far above any timing noise (we accept up to 8x).

use std::time::Instant;

use muon_core::{Backend, HostMatrix, Shape, Transpose};
use muon_faer::Faer;

/// Nanoseconds per `expf` call, the best of 5 runs.
fn exp_ns() -> f64 {
    let xs: Vec<f32> = (0..20_000).map(|i| i as f32 * 1e-4 - 1.0).collect();
    (0..5)
        .map(|_| {
            let t = Instant::now();
            let mut acc = 0.0f32;
            for &x in &xs {
                acc += std::hint::black_box(x).exp();
            }
            std::hint::black_box(acc);
            t.elapsed().as_secs_f64() * 1e9 / xs.len() as f64
        })
        .fold(f64::MAX, f64::min)
}

#[test]
fn libm_stays_fast_after_backend_products() {
    let before = exp_ns();
    let cpu = Faer::<f32>::with_threads(1);
    let shape = Shape::matrix(64, 64);
    let a = HostMatrix::from_vec(shape, vec![0.5f32; shape.len()]).unwrap();
    let mut c = HostMatrix::zeros(shape);
    cpu.gemm(&mut c, 1.0, &a, Transpose::No, &a, Transpose::Yes, 0.0)
        .unwrap();
    cpu.gram(&mut c, &a, Transpose::No).unwrap();
    let after = exp_ns();
    assert!(
        after < 8.0 * before,
        "expf: {before:.1} ns before, {after:.1} ns after a faer product"
    );
}
