//! Square GEMM throughput of the faer backend in bf16 (`Precision::Bf16`) and f32: the bf16
//! products against torch's (`benches/gemm_torch.py`, run interleaved by `benches/compare_bf16.sh`).
//!
//! ```text
//! cargo bench -p muon-faer --bench gemm -- [--threads 1,2] [--sizes 1024,2048,4096]
//!     [--target-s 2] [--precisions bf16,f32] [--kernel auto|amx|avx512bf16]
//! ```
//! One JSON line per case: `impl` (`muon-faer`), `op` (`gemm`), `precision`, `kernel`, `n`,
//! `threads`, `ms_median`, `ms_min`, `gflops` (`2 n^3` over the median), `gflops_peak` (over
//! the minimum), `reps`. Inputs are f32 (N(0,1)-like); the bf16 product rounds them itself, so
//! its time includes the conversion, as torch's does when it is handed bf16 tensors it need
//! not convert (torch's timing excludes it: see the peer script).

use std::time::Instant;

use muon_core::{Backend, HostMatrix, Shape, Transpose};
use muon_faer::{Bf16Kernel, Faer, Precision};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| ((0..4).map(|_| uniform()).sum::<f64>() - 2.0) as f32 * 1.7)
        .collect()
}

fn list<T: std::str::FromStr>(v: &str) -> Vec<T> {
    v.split(',')
        .map(|x| x.parse().ok().expect("bad list element"))
        .collect()
}

fn main() {
    let (mut threads, mut sizes, mut target_s) = (vec![1, 2], vec![1024, 2048, 4096], 2.0);
    let mut precisions = vec![Precision::Bf16, Precision::F32];
    let mut kernel = Bf16Kernel::Auto;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--threads" => threads = list(&value()),
            "--sizes" => sizes = list(&value()),
            "--target-s" => target_s = value().parse().expect("bad --target-s"),
            "--precisions" => {
                precisions = value()
                    .split(',')
                    .map(|p| Precision::from_name(p).expect("bad precision"))
                    .collect()
            }
            "--kernel" => {
                let name = value();
                kernel = Bf16Kernel::ALL
                    .into_iter()
                    .find(|k| k.name() == name)
                    .expect("bad kernel")
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    for &t in &threads {
        for &n in &sizes {
            let shape = Shape::matrix(n, n);
            let a = HostMatrix::from_vec(shape, data(n * n, 2)).expect("a");
            let b = HostMatrix::from_vec(shape, data(n * n, 3)).expect("b");
            let mut c = HostMatrix::zeros(shape);
            for &precision in &precisions {
                let cpu = Faer::<f32>::with_threads(t)
                    .with_precision(precision)
                    .with_bf16_kernel(kernel)
                    .expect("kernel");
                let mut run = || {
                    let start = Instant::now();
                    cpu.gemm(&mut c, 1.0, &a, Transpose::No, &b, Transpose::No, 0.0)
                        .expect("gemm");
                    start.elapsed().as_secs_f64()
                };
                run();
                let estimate = run();
                let reps = (target_s / estimate).ceil().clamp(3.0, 100.0) as usize;
                let mut times: Vec<f64> = (0..reps).map(|_| run()).collect();
                times.sort_by(f64::total_cmp);
                let (median, min) = (times[reps / 2], times[0]);
                let flops = 2.0 * (n as f64).powi(3);
                let kernel = cpu.bf16_kernel().map_or("faer-f32", Bf16Kernel::name);
                println!(
                    "{{\"impl\": \"muon-faer\", \"op\": \"gemm\", \"precision\": \"{precision}\", \"kernel\": \"{kernel}\", \
                     \"n\": {n}, \"threads\": {t}, \"ms_median\": {:.3}, \"ms_min\": {:.3}, \"gflops\": {:.1}, \
                     \"gflops_peak\": {:.1}, \"reps\": {reps}}}",
                    median * 1e3,
                    min * 1e3,
                    flops / median / 1e9,
                    flops / min / 1e9
                );
            }
        }
    }
}
