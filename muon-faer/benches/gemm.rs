//! GEMM throughput of the faer backend in bf16 (`Precision::Bf16`) and f32: square products
//! (the bf16 ones against torch's, `benches/gemm_torch.py`, run interleaved by
//! `benches/compare_bf16.sh`) and the narrow shapes a small model's layers run.
//!
//! ```text
//! cargo bench -p muon-faer --bench gemm -- [--threads 1,2] [--sizes 1024,2048,4096]
//!     [--shapes 4096x128x128,128x4096x512] [--trans nn,nt,tn]
//!     [--target-s 2] [--precisions bf16,f32] [--kernel auto|amx|avx512bf16]
//! ```
//! `--sizes n` runs `n x n x n`; `--shapes MxNxK` runs `C (M x N) = op(A) (M x K) op(B)
//! (K x N)` for each transpose pair of `--trans` (`n`: as stored, `t`: transposed; default
//! `nn`); given only `--shapes`, no square sizes run. One JSON line per case: `impl`
//! (`muon-faer`), `op` (`gemm`), `precision`, `kernel`, `m`, `n`, `k`, `trans`, `threads`,
//! `ms_median`, `ms_min`, `gflops` (`2 m n k` over the median), `gflops_peak` (over the
//! minimum), `reps`. Inputs are f32 (N(0,1)-like); the bf16 product rounds them itself, so
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

/// `MxNxK` as `(m, n, k)`.
fn shape(v: &str) -> (usize, usize, usize) {
    let dims: Vec<usize> = v
        .split('x')
        .map(|d| d.parse().unwrap_or_else(|_| panic!("bad shape {v}: want MxNxK")))
        .collect();
    match dims[..] {
        [m, n, k] if m > 0 && n > 0 && k > 0 => (m, n, k),
        _ => panic!("bad shape {v}: want MxNxK, each at least 1"),
    }
}

/// `nn`, `nt`, `tn` or `tt` as the transposes of A and B.
fn trans(v: &str) -> (Transpose, Transpose) {
    let t = |c| match c {
        'n' => Transpose::No,
        't' => Transpose::Yes,
        _ => panic!("bad transpose pair {v}: want nn, nt, tn or tt"),
    };
    let c: Vec<char> = v.chars().collect();
    match c[..] {
        [a, b] => (t(a), t(b)),
        _ => panic!("bad transpose pair {v}: want nn, nt, tn or tt"),
    }
}

fn main() {
    let (mut threads, mut sizes, mut target_s) = (vec![1, 2], None, 2.0);
    let (mut shapes, mut pairs) = (Vec::new(), vec![(Transpose::No, Transpose::No)]);
    let mut precisions = vec![Precision::Bf16, Precision::F32];
    let mut kernel = Bf16Kernel::Auto;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--threads" => threads = list(&value()),
            "--sizes" => sizes = Some(list(&value())),
            "--shapes" => shapes = value().split(',').map(shape).collect(),
            "--trans" => pairs = value().split(',').map(trans).collect(),
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
    let sizes = sizes.unwrap_or_else(|| {
        if shapes.is_empty() {
            vec![1024, 2048, 4096]
        } else {
            Vec::new()
        }
    });
    let mut cases: Vec<_> = sizes
        .iter()
        .map(|&n| (n, n, n, (Transpose::No, Transpose::No)))
        .collect();
    for &(m, n, k) in &shapes {
        cases.extend(pairs.iter().map(|&tt| (m, n, k, tt)));
    }
    for &t in &threads {
        for &(m, n, k, (ta, tb)) in &cases {
            // Stored shapes: A is m x k (k x m transposed), B is k x n (n x k transposed).
            let stored = |rows, cols, tr| match tr {
                Transpose::No => Shape::matrix(rows, cols),
                Transpose::Yes => Shape::matrix(cols, rows),
            };
            let a = HostMatrix::from_vec(stored(m, k, ta), data(m * k, 2)).expect("a");
            let b = HostMatrix::from_vec(stored(k, n, tb), data(k * n, 3)).expect("b");
            let mut c = HostMatrix::zeros(Shape::matrix(m, n));
            let name = |tr| if tr == Transpose::No { 'n' } else { 't' };
            let pair = format!("{}{}", name(ta), name(tb));
            for &precision in &precisions {
                let cpu = Faer::<f32>::with_threads(t)
                    .with_precision(precision)
                    .with_bf16_kernel(kernel)
                    .expect("kernel");
                let mut run = || {
                    let start = Instant::now();
                    cpu.gemm(&mut c, 1.0, &a, ta, &b, tb, 0.0).expect("gemm");
                    start.elapsed().as_secs_f64()
                };
                run();
                let estimate = run();
                let reps = (target_s / estimate).ceil().clamp(3.0, 100.0) as usize;
                let mut times: Vec<f64> = (0..reps).map(|_| run()).collect();
                times.sort_by(f64::total_cmp);
                let (median, min) = (times[reps / 2], times[0]);
                let flops = 2.0 * (m * n * k) as f64;
                let kernel = cpu.bf16_kernel().map_or("faer-f32", Bf16Kernel::name);
                println!(
                    "{{\"impl\": \"muon-faer\", \"op\": \"gemm\", \"precision\": \"{precision}\", \"kernel\": \"{kernel}\", \
                     \"m\": {m}, \"n\": {n}, \"k\": {k}, \"trans\": \"{pair}\", \"threads\": {t}, \"ms_median\": {:.3}, \
                     \"ms_min\": {:.3}, \"gflops\": {:.1}, \"gflops_peak\": {:.1}, \"reps\": {reps}}}",
                    median * 1e3,
                    min * 1e3,
                    flops / median / 1e9,
                    flops / min / 1e9
                );
            }
        }
    }
}
