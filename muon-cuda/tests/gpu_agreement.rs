//! The CUDA backend against the portable reference (`muon_core::Portable<f32>`) on the same
//! inputs: every primitive, single and batched Newton-Schulz, and full `HybridOptimizer`
//! steps, in every GEMM precision.
//!
//! Without a CUDA GPU and driver each test prints "skipped: no CUDA GPU/driver" and returns.
//!
//! Tolerances are relative Frobenius errors `||gpu - cpu||_F / ||cpu||_F`, per precision. The
//! Newton-Schulz ones were calibrated on the CPU by running the same iteration with every
//! GEMM input rounded to the precision's significand (24, 11 and 8 bits; bf16 by rounding to
//! nearest even, as this crate's cast kernel does; TF32 both rounded and truncated, since
//! tensor cores fed f32 data may simply drop the low mantissa bits) and comparing with an f64
//! run, on the test's shapes and both schedules:
//!
//! | GEMM inputs | worst error seen vs f64 | tolerance here |
//! | --- | --- | --- |
//! | f32  | 5.0e-6 (256x512, Polar Express)                       | 2e-5   |
//! | tf32 | 4.7e-3 rounded, 6.7e-3 truncated (17x33, Polar Express) | 1.5e-2 |
//! | bf16 | 3.9e-2 (17x33, Polar Express)                         | 8e-2   |
//!
//! The CPU reference is within 5e-6 of f64, so the GPU's difference from it is its own error;
//! the tolerances leave a margin of 2x or more over the worst case seen, and
//! `suite_self_check.rs` runs this whole suite on such an emulated backend on every machine.
//! Elementwise kernels and reductions do the portable backend's arithmetic up to the
//! contraction of `a*b + c` into one rounding (fma) and the order of a `double` sum: a few
//! f32 ulps, so 1e-6.
#![cfg(feature = "cuda")]

mod common;

use std::io::Write;

use muon_cuda::{CudaBackend, Precision};

/// The GPU backend, or `None` after printing why the test skips.
fn gpu(test: &str) -> Option<CudaBackend> {
    if !muon_cuda::is_available() {
        // Written to the stderr handle, not with eprintln!, which libtest captures and hides
        // for passing tests: the skip must show in the test output.
        let _ = writeln!(std::io::stderr(), "{test}: skipped: no CUDA GPU/driver");
        return None;
    }
    // A GPU is there: failing to open it is a failure, not a reason to skip.
    let backend = CudaBackend::new(0)
        .unwrap_or_else(|e| panic!("{test}: a CUDA GPU is present but the backend failed: {e}"));
    eprintln!("{test}: on {}", backend.device_name());
    Some(backend)
}

#[test]
fn gemm_matches_portable_for_shapes_transposes_and_stacks() {
    if let Some(mut gpu) = gpu("gemm_matches_portable_for_shapes_transposes_and_stacks") {
        common::gemm_matches_portable_for_shapes_transposes_and_stacks(&mut gpu);
    }
}

#[test]
fn gram_and_symmetric_square_match_portable() {
    if let Some(mut gpu) = gpu("gram_and_symmetric_square_match_portable") {
        common::gram_and_symmetric_square_match_portable(&mut gpu);
    }
}

#[test]
fn elementwise_kernels_match_portable() {
    if let Some(gpu) = gpu("elementwise_kernels_match_portable") {
        common::elementwise_kernels_match_portable(&gpu);
    }
}

#[test]
fn reductions_match_portable_and_write_only_their_slot() {
    if let Some(gpu) = gpu("reductions_match_portable_and_write_only_their_slot") {
        common::reductions_match_portable_and_write_only_their_slot(&gpu);
    }
}

#[test]
fn newton_schulz_matches_portable_single_and_batched() {
    if let Some(mut gpu) = gpu("newton_schulz_matches_portable_single_and_batched") {
        common::newton_schulz_matches_portable_single_and_batched(&mut gpu);
    }
}

#[test]
fn hybrid_optimizer_steps_match_portable() {
    if let Some(mut gpu) = gpu("hybrid_optimizer_steps_match_portable") {
        common::hybrid_optimizer_steps_match_portable(&mut gpu);
    }
}

#[test]
fn a_non_finite_gradient_is_refused_on_the_gpu() {
    if let Some(gpu) = gpu("a_non_finite_gradient_is_refused_on_the_gpu") {
        common::a_non_finite_gradient_is_refused_on_the_gpu(&gpu);
    }
}

#[test]
fn transfers_check_lengths() {
    if let Some(gpu) = gpu("transfers_check_lengths") {
        common::transfers_check_lengths(&gpu);
    }
}

#[test]
fn an_optimizer_step_after_warm_up_allocates_no_scratch() {
    let Some(mut gpu) = gpu("an_optimizer_step_after_warm_up_allocates_no_scratch") else {
        return;
    };
    use muon_core::{HybridConfig, HybridOptimizer};
    for precision in Precision::ALL {
        gpu.set_precision(precision);
        let specs = common::optimizer_specs();
        let mut opt = HybridOptimizer::new(&gpu, specs.clone(), HybridConfig::default()).unwrap();
        let mut params: Vec<_> = specs
            .iter()
            .map(|s| common::to_gpu(&gpu, &common::host(s.shape, 1)))
            .collect();
        let grads: Vec<_> = specs
            .iter()
            .map(|s| common::to_gpu(&gpu, &common::host(s.shape, 2)))
            .collect();
        opt.step(&gpu, &mut params, &grads, 0.02).unwrap();
        let warm = gpu.scratch_bytes();
        for _ in 0..3 {
            opt.step(&gpu, &mut params, &grads, 0.02).unwrap();
        }
        assert_eq!(
            gpu.scratch_bytes(),
            warm,
            "{precision}: scratch grew after the warm-up step"
        );
    }
}
