//! Newton-Schulz on the GPU: time per run and TFLOP/s (nominal `NewtonSchulz::flops`, 5
//! quintic steps) for the shapes of the Moonlight model and common square sizes, in f32, TF32
//! and bf16, against the cuBLAS GEMM peak measured in the same run (an 8192^3 GEMM in the same
//! precision). One JSON object per line, the keys `bench/ns_torch.py` prints too. Each shape
//! is timed twice: the backend's own Newton-Schulz (`impl: muon-cuda`, `X = (a I + P) X`) and
//! muon-core's `newton_schulz_generic` (`impl: muon-cuda-generic`, which copies `X` each step).
//!
//! ```text
//! cargo bench -p muon-cuda --features cuda --bench ns_gpu
//! ```
//!
//! Without a CUDA GPU and driver it says so and exits 0, having measured nothing.

use std::time::Instant;

use muon_core::{newton_schulz, newton_schulz_generic, Backend, NewtonSchulz, NsWorkspace, Result, Shape};
use muon_cuda::bench::gemm_seconds;
use muon_cuda::{CudaBackend, Precision};

/// `(batch, rows, cols)`: square sizes; rectangles up to 4096 x 11264 (the aspect of Moonlight's
/// dense FFN, 2048 x 11264, at twice the width); and MoE expert stacks: Moonlight's 64 experts
/// of 2048 x 1408 and a small 64 x 128 x 352 stack.
const SHAPES: [(usize, usize, usize); 10] = [
    (1, 128, 128),
    (1, 256, 1024),
    (1, 512, 512),
    (1, 1024, 1024),
    (1, 1024, 4096),
    (1, 2048, 2048),
    (64, 128, 352),
    (1, 4096, 4096),
    (1, 4096, 11264),
    (64, 2048, 1408),
];

/// Side of the square GEMM that measures the precision's cuBLAS peak.
const PEAK_N: usize = 8192;
/// Wall time to aim for per measurement.
const TARGET_SECONDS: f64 = 0.5;

fn shape_name(s: Shape) -> String {
    if s.batch == 1 {
        format!("{}x{}", s.rows, s.cols)
    } else {
        format!("{}x{}x{}", s.batch, s.rows, s.cols)
    }
}

/// A Newton-Schulz entry point: the backend's own or muon-core's generic one.
type NsFn = fn(&CudaBackend, &NewtonSchulz, &mut NsWorkspace<CudaBackend>) -> Result<()>;

/// Seconds per Newton-Schulz run on `shape`, after warm-up (which also grows the backend's
/// scratch, so the timed runs allocate nothing). Each run continues from the previous output,
/// which is as good an input as any: it is renormalized first.
fn time_ns(gpu: &CudaBackend, newton_schulz: NsFn, config: &NewtonSchulz, shape: Shape) -> Result<f64> {
    let mut ws = NsWorkspace::new(gpu, shape)?;
    let input: Vec<f32> = (0..shape.len())
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 9) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    gpu.upload(&mut ws.x, &input)?;
    for _ in 0..3 {
        newton_schulz(gpu, config, &mut ws)?;
    }
    gpu.synchronize()?;
    let start = Instant::now();
    newton_schulz(gpu, config, &mut ws)?;
    gpu.synchronize()?;
    let once = start.elapsed().as_secs_f64();
    let iterations = ((TARGET_SECONDS / once.max(1e-6)) as usize).clamp(3, 2000);
    let start = Instant::now();
    for _ in 0..iterations {
        newton_schulz(gpu, config, &mut ws)?;
    }
    gpu.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / iterations as f64)
}

fn run() -> Result<()> {
    let mut gpu = CudaBackend::new(0)?;
    let device = gpu.device_name();
    let config = NewtonSchulz::quintic();
    eprintln!("ns_gpu: {device}, quintic x{} steps", config.steps);
    for precision in Precision::ALL {
        gpu.set_precision(precision);
        let probe = gemm_seconds(&gpu, PEAK_N, 3)?;
        let iterations = ((TARGET_SECONDS / probe) as usize).clamp(5, 500);
        let peak_seconds = gemm_seconds(&gpu, PEAK_N, iterations)?;
        let peak_tflops = 2.0 * (PEAK_N as f64).powi(3) / peak_seconds / 1e12;
        for (batch, rows, cols) in SHAPES {
            let shape = Shape::batched(batch, rows, cols);
            for (implementation, entry) in [
                ("muon-cuda", newton_schulz as NsFn),
                ("muon-cuda-generic", newton_schulz_generic as NsFn),
            ] {
                let seconds = time_ns(&gpu, entry, &config, shape)?;
                let tflops = config.flops(shape) / seconds / 1e12;
                println!(
                "{{\"impl\": \"{implementation}\", \"device\": \"{device}\", \"precision\": \"{}\", \"shape\": \"{}\", \
                 \"batch\": {batch}, \"rows\": {rows}, \"cols\": {cols}, \"steps\": {}, \"ms\": {:.4}, \
                 \"tflops\": {tflops:.2}, \"gemm_peak_tflops\": {peak_tflops:.2}, \"fraction_of_peak\": {:.3}}}",
                precision.name(),
                shape_name(shape),
                config.steps,
                seconds * 1e3,
                tflops / peak_tflops,
            );
            }
        }
    }
    Ok(())
}

fn main() {
    if !muon_cuda::is_available() {
        println!("ns_gpu: cannot run: no CUDA GPU/driver on this machine; nothing was measured");
        return;
    }
    if let Err(e) = run() {
        eprintln!("ns_gpu: {e}");
        std::process::exit(1);
    }
}
