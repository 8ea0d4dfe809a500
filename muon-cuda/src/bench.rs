//! Benchmark support for `benches/ns_gpu.rs`, which needs what the backend keeps to itself:
//! not part of the backend's API (hidden from the docs, free to change).

use std::time::Instant;

use cudarc::driver::CudaSlice;
use muon_core::{Backend, Error, Result, Shape, Transpose};

use crate::layout::row_major_gemm;
use crate::raw::GemmInput;
use crate::{CudaBackend, Precision};

/// Seconds per `n x n x n` cuBLAS GEMM in `gpu`'s precision, averaged over `iterations` after
/// two warm-up runs, on operands already in the precision's input type (no cast timed): the
/// GEMM peak the benchmark compares Newton-Schulz against.
pub fn gemm_seconds(gpu: &CudaBackend, n: usize, iterations: usize) -> Result<f64> {
    let shape = Shape::matrix(n, n);
    let host: Vec<f32> = (0..shape.len())
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut a = gpu.zeros(shape)?;
    gpu.upload(&mut a, &host)?;
    let mut c = gpu.zeros(shape)?;
    let g = row_major_gemm(shape, shape, Transpose::No, shape, Transpose::No)?;
    let bf16 = if gpu.precision() == Precision::Bf16 {
        let mut y: CudaSlice<u16> = gpu
            .stream()
            .alloc_zeros(shape.len())
            .map_err(|e| Error::Backend(format!("CUDA: allocating bf16 operands failed: {e}")))?;
        gpu.cast_to_bf16(a.as_cuda_slice(), &mut y)?;
        Some(y)
    } else {
        None
    };
    let input = match &bf16 {
        Some(y) => GemmInput::Bf16(y),
        None => GemmInput::F32(a.as_cuda_slice()),
    };
    let mut run = || gpu.cublas_gemm(&g, 1.0, (input, input), 0.0, c.as_cuda_slice_mut());
    for _ in 0..2 {
        run()?;
    }
    gpu.synchronize()?;
    let start = Instant::now();
    for _ in 0..iterations.max(1) {
        run()?;
    }
    gpu.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / iterations.max(1) as f64)
}
