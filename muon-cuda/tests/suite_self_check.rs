//! Runs the GPU agreement suite (`common`) on the CPU, on a backend that emulates the GPU's
//! GEMM arithmetic: every GEMM input cut to the precision's significand (f32: 24 bits; bf16: 8,
//! rounded to nearest even as the crate's cast kernel does; TF32: 11, truncated, the worse of
//! what tensor cores fed f32 data may do), products summed in f64 and rounded to f32 once, as
//! tensor cores accumulate wider than they read. Everything else is the portable backend.
//!
//! This checks, on any machine, that the suite is sound and that its per-precision
//! tolerances hold for arithmetic of the kind the GPU does (a different summation order in
//! f32, rounded inputs in TF32 and bf16); on a GPU machine the same suite runs against
//! `CudaBackend` in `gpu_agreement.rs`.

mod common;

use common::Device;
use muon_core::{gemm_dims, AdamWCoefficients, Backend, HostMatrix, Portable, Result, Shape, Transpose};
use muon_cuda::Precision;

/// The portable backend with GPU-like GEMM rounding.
struct EmulatedGpu {
    precision: Precision,
}

const CPU: Portable<f32> = Portable::new();

/// Truncates `x` to `bits` significant bits, toward zero (NaN and Inf pass through).
fn truncate_significand(x: f32, bits: u32) -> f32 {
    if bits >= 24 || !x.is_finite() {
        return x;
    }
    let drop = 24 - bits;
    f32::from_bits(x.to_bits() >> drop << drop)
}

/// Rounds `x` to `bits` significant bits, to nearest even (NaN and Inf pass through).
fn round_significand(x: f32, bits: u32) -> f32 {
    if bits >= 24 || !x.is_finite() {
        return x;
    }
    let drop = 24 - bits;
    let u = x.to_bits();
    let lsb = (u >> drop) & 1;
    let rounded = u.wrapping_add((1 << (drop - 1)) - 1 + lsb) >> drop << drop;
    f32::from_bits(rounded)
}

impl Device for EmulatedGpu {
    fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }
}

impl Backend for EmulatedGpu {
    type Elem = f32;
    type Matrix = HostMatrix<f32>;

    fn shape(m: &HostMatrix<f32>) -> Shape {
        m.shape()
    }
    fn zeros(&self, shape: Shape) -> Result<HostMatrix<f32>> {
        CPU.zeros(shape)
    }
    fn upload(&self, dst: &mut HostMatrix<f32>, src: &[f32]) -> Result<()> {
        CPU.upload(dst, src)
    }
    fn download(&self, src: &HostMatrix<f32>, dst: &mut [f32]) -> Result<()> {
        CPU.download(src, dst)
    }

    fn gemm(
        &self,
        dst: &mut HostMatrix<f32>,
        alpha: f32,
        a: &HostMatrix<f32>,
        ta: Transpose,
        b: &HostMatrix<f32>,
        tb: Transpose,
        beta: f32,
    ) -> Result<()> {
        let (m, n, k) = gemm_dims(dst.shape(), a.shape(), ta, b.shape(), tb)?;
        let cut = |v: f32| match self.precision {
            Precision::F32 => v,
            Precision::Tf32 => truncate_significand(v, 11),
            Precision::Bf16 => round_significand(v, 8),
        };
        // op(a) as row-major m x k and op(b)^T as row-major n x k, rounded, per stack item: every
        // output element is then one contiguous dot product.
        let gather = |x: &HostMatrix<f32>, t: Transpose, rows: usize, inner: usize, want_t: bool| {
            let s = x.shape();
            let mut out = Vec::with_capacity(s.len());
            for e in 0..s.batch {
                let item = x.item(e);
                for i in 0..rows {
                    for p in 0..inner {
                        // Element (i, p) of op(x), or of op(x)^T when `want_t`.
                        let (r, c) = if want_t { (p, i) } else { (i, p) };
                        let v = match t {
                            Transpose::No => item[r * s.cols + c],
                            Transpose::Yes => item[c * s.cols + r],
                        };
                        out.push(cut(v) as f64);
                    }
                }
            }
            out
        };
        let x = gather(a, ta, m, k, false);
        let y = gather(b, tb, n, k, true);
        let sc = dst.shape();
        let out = dst.as_mut_slice();
        for e in 0..sc.batch {
            for i in 0..m {
                let row = &x[(e * m + i) * k..(e * m + i + 1) * k];
                for j in 0..n {
                    let col = &y[(e * n + j) * k..(e * n + j + 1) * k];
                    let dot: f64 = row.iter().zip(col).map(|(u, v)| u * v).sum();
                    let c = &mut out[e * sc.batch_stride() + i * n + j];
                    let old = if beta == 0.0 { 0.0 } else { beta as f64 * *c as f64 };
                    *c = (alpha as f64 * dot + old) as f32;
                }
            }
        }
        Ok(())
    }

    fn axpby(&self, dst: &mut HostMatrix<f32>, alpha: f32, x: &HostMatrix<f32>, beta: f32) -> Result<()> {
        CPU.axpby(dst, alpha, x, beta)
    }
    fn frobenius_norm(&self, x: &HostMatrix<f32>, out: &mut HostMatrix<f32>, index: usize) -> Result<()> {
        CPU.frobenius_norm(x, out, index)
    }
    fn normalize_frobenius(&self, x: &mut HostMatrix<f32>, norm_scale: f32, eps: f32) -> Result<()> {
        CPU.normalize_frobenius(x, norm_scale, eps)
    }
    fn adamw_direction(
        &self,
        dir: &mut HostMatrix<f32>,
        grad: &HostMatrix<f32>,
        m: &mut HostMatrix<f32>,
        v: &mut HostMatrix<f32>,
        c: &AdamWCoefficients<f32>,
    ) -> Result<()> {
        CPU.adamw_direction(dir, grad, m, v, c)
    }
}

fn emulated() -> EmulatedGpu {
    EmulatedGpu {
        precision: Precision::F32,
    }
}

#[test]
fn rounding_keeps_the_requested_significand() {
    assert_eq!(
        round_significand(1.0 + 2f32.powi(-9), 8),
        1.0,
        "ties round to even"
    );
    assert_eq!(
        round_significand(1.0 + 3.0 * 2f32.powi(-9), 8),
        1.0 + 2f32.powi(-7)
    );
    assert_eq!(round_significand(-1.5, 8), -1.5);
    assert_eq!(round_significand(0.1, 24), 0.1);
    assert!(round_significand(f32::NAN, 8).is_nan());
    let x = 1.0 + 2f32.powi(-11);
    assert_eq!(round_significand(x, 11), 1.0, "TF32 keeps 10 stored bits");
    assert_eq!(
        truncate_significand(1.0 + 2f32.powi(-10) * 1.99, 11),
        1.0 + 2f32.powi(-10)
    );
    assert_eq!(truncate_significand(-1.999, 8), -1.9921875);
}

#[test]
fn emulated_gemm_differs_from_portable_in_reduced_precision() {
    // Guards the self-check itself: if the emulation were exact, the suite below would prove
    // nothing about the tolerances.
    let shape = Shape::matrix(32, 32);
    let a = common::host(shape, 1);
    let mut want = HostMatrix::zeros(shape);
    CPU.gemm(&mut want, 1.0, &a, Transpose::No, &a, Transpose::Yes, 0.0)
        .unwrap();
    for (p, min_err) in [(Precision::Tf32, 1e-5), (Precision::Bf16, 1e-3)] {
        let mut gpu = emulated();
        gpu.set_precision(p);
        let mut got = HostMatrix::zeros(shape);
        gpu.gemm(&mut got, 1.0, &a, Transpose::No, &a, Transpose::Yes, 0.0)
            .unwrap();
        let err = common::rel_error(got.as_slice(), want.as_slice());
        assert!(
            err > min_err && err < common::gemm_tol(p),
            "{p}: emulation error {err:.2e}"
        );
    }
}

#[test]
fn suite_gemm() {
    common::gemm_matches_portable_for_shapes_transposes_and_stacks(&mut emulated());
}

#[test]
fn suite_gram_and_symmetric_square() {
    common::gram_and_symmetric_square_match_portable(&mut emulated());
}

#[test]
fn suite_elementwise() {
    common::elementwise_kernels_match_portable(&emulated());
}

#[test]
fn suite_reductions() {
    common::reductions_match_portable_and_write_only_their_slot(&emulated());
}

#[test]
fn suite_newton_schulz() {
    common::newton_schulz_matches_portable_single_and_batched(&mut emulated());
}

#[test]
fn suite_hybrid_optimizer() {
    common::hybrid_optimizer_steps_match_portable(&mut emulated());
}

#[test]
fn suite_non_finite_gradient() {
    common::a_non_finite_gradient_is_refused_on_the_gpu(&emulated());
}

#[test]
fn suite_transfers() {
    common::transfers_check_lengths(&emulated());
}
