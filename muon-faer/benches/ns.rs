//! Newton-Schulz, GEMM and hybrid-step throughput of the faer backend (f32).
//!
//! Prints one JSON line per case with the keys of `benches/ns_numpy.py`
//! (`impl`, `op`, `shape`, `threads`, `ms_median`, `ms_min`, `gflops`, `gflops_peak`, `reps`,
//! ...), so the two can be compared side by side. Flops are nominal (`NewtonSchulz::flops`),
//! even though the backend computes only one triangle of each symmetric product.
//!
//! ```text
//! cargo bench -p muon-faer --bench ns -- [--threads 1,2] [--shapes 128x128,64x128x352,...]
//!     [--target-s 2] [--no-ns] [--no-gemm] [--no-step] [--generic] [--precision f32|bf16]
//! ```
//! `--precision bf16` runs the backend's products in bf16 (`Precision::Bf16`, on AMX or
//! AVX512-BF16 where the CPU has them): impl `muon-faer-bf16`, and a `kernel` key.
//! `--generic` also times muon-core's `newton_schulz_generic` on the same backend (impl
//! `muon-faer-generic`), right after the backend's own Newton-Schulz: the baseline for what
//! the override (stacks in cache, `a X` folded into the product) gains.
//! Timing as in the numpy script: one warm-up, an estimate, then `target_s / estimate` runs
//! (5 to 200); the median and the minimum are reported.

use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use muon_core::{
    newton_schulz, newton_schulz_generic, Backend, HostMatrix, HybridConfig, HybridOptimizer, NewtonSchulz,
    NsWorkspace, ParamRole, ParamSpec, Shape, Transpose,
};
use muon_faer::{Bf16Kernel, Faer, Precision};

const DEFAULT_SHAPES: &str = "128x128,256x1024,512x512,1024x1024,1024x4096,2048x2048,64x128x352";

struct Args {
    threads: Vec<usize>,
    shapes: Vec<Shape>,
    target_s: f64,
    ns: bool,
    gemm: bool,
    step: bool,
    generic: bool,
    precision: Precision,
}

fn parse_shape(s: &str) -> Shape {
    let dims: Vec<usize> = s
        .split('x')
        .map(|d| d.parse().unwrap_or_else(|_| panic!("bad shape {s:?}")))
        .collect();
    match dims[..] {
        [m, n] => Shape::matrix(m, n),
        [b, m, n] => Shape::batched(b, m, n),
        _ => panic!("bad shape {s:?}"),
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        threads: vec![1, 2],
        shapes: DEFAULT_SHAPES.split(',').map(parse_shape).collect(),
        target_s: 2.0,
        ns: true,
        generic: false,
        gemm: true,
        step: true,
        precision: Precision::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--threads" => {
                let v = it.next().expect("--threads needs a value");
                args.threads = v
                    .split(',')
                    .map(|t| t.parse().expect("bad thread count"))
                    .collect();
            }
            "--shapes" => {
                let v = it.next().expect("--shapes needs a value");
                args.shapes = v.split(',').map(parse_shape).collect();
            }
            "--target-s" => args.target_s = it.next().and_then(|v| v.parse().ok()).expect("bad --target-s"),
            "--no-ns" => args.ns = false,
            "--generic" => args.generic = true,
            "--no-gemm" => args.gemm = false,
            "--no-step" => args.step = false,
            "--precision" => {
                args.precision = it
                    .next()
                    .and_then(|v| Precision::from_name(&v))
                    .expect("--precision f32|bf16")
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// Seconds per run of `run`, `prepare` untimed before each: warm-up, estimate, repeat.
fn time(target_s: f64, mut prepare: impl FnMut(), mut run: impl FnMut()) -> Vec<f64> {
    let mut once = || {
        prepare();
        let t = Instant::now();
        run();
        t.elapsed().as_secs_f64()
    };
    once();
    let estimate = once();
    let reps = (target_s / estimate.max(1e-6)).ceil().clamp(5.0, 200.0) as usize;
    (0..reps).map(|_| once()).collect()
}

fn median(times: &[f64]) -> f64 {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    let n = t.len();
    if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    }
}

fn report(
    implementation: &str,
    op: &str,
    shape: &str,
    threads: usize,
    flops: f64,
    times: &[f64],
    extra: &str,
) {
    let (med, min) = (median(times), times.iter().copied().fold(f64::MAX, f64::min));
    println!(
        "{{\"impl\": \"{implementation}\", \"op\": \"{op}\", \"shape\": \"{shape}\", \"threads\": {threads}, \
         \"ms_median\": {:.4}, \"ms_min\": {:.4}, \"gflops\": {:.2}, \"gflops_peak\": {:.2}, \"reps\": {}, \
         \"blas_kernel\": \"faer-0.24\"{extra}}}",
        med * 1e3,
        min * 1e3,
        flops / med / 1e9,
        flops / min / 1e9,
        times.len()
    );
}

/// Deterministic N(0,1)-like data (sum of uniforms), no RNG dependency needed.
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

/// A Newton-Schulz entry point: the backend's own or muon-core's generic one.
type NsFn = fn(&Faer<f32>, &NewtonSchulz, &mut NsWorkspace<Faer<f32>>) -> muon_core::Result<()>;

fn bench_ns(cpu: &Faer<f32>, threads: usize, shape: Shape, target_s: f64, generic: bool) {
    let config = NewtonSchulz::quintic();
    let mut ws = NsWorkspace::new(cpu, shape).expect("workspace");
    let input = data(shape.len(), 1);
    let label = if shape.batch == 1 {
        format!("{}x{}", shape.rows, shape.cols)
    } else {
        format!("{}x{}x{}", shape.batch, shape.rows, shape.cols)
    };
    let bf16 = cpu.precision() == Precision::Bf16;
    let runs: &[(&str, NsFn)] = match (generic, bf16) {
        (true, false) => &[
            ("muon-faer", newton_schulz),
            ("muon-faer-generic", newton_schulz_generic),
        ],
        (true, true) => &[
            ("muon-faer-bf16", newton_schulz),
            ("muon-faer-bf16-generic", newton_schulz_generic),
        ],
        (false, false) => &[("muon-faer", newton_schulz)],
        (false, true) => &[("muon-faer-bf16", newton_schulz)],
    };
    for &(implementation, run) in runs {
        let times = {
            let ws = std::cell::RefCell::new(&mut ws);
            time(
                target_s,
                || cpu.upload(&mut ws.borrow_mut().x, &input).expect("upload"),
                || run(cpu, &config, &mut ws.borrow_mut()).expect("newton_schulz"),
            )
        };
        let mut extra = format!(
            ", \"kernel\": \"{}\"",
            cpu.bf16_kernel().map_or("faer-f32", Bf16Kernel::name)
        );
        if shape.batch > 1 {
            extra += &format!(
                ", \"ms_median_per_matrix\": {:.4}",
                median(&times) * 1e3 / shape.batch as f64
            );
        }
        report(
            implementation,
            "ns5",
            &label,
            threads,
            config.flops(shape),
            &times,
            &extra,
        );
    }
}

fn bench_gemm(cpu: &Faer<f32>, threads: usize, n: usize, target_s: f64) {
    let shape = Shape::matrix(n, n);
    let a = HostMatrix::from_vec(shape, data(n * n, 2)).expect("a");
    let b = HostMatrix::from_vec(shape, data(n * n, 3)).expect("b");
    let mut c = HostMatrix::zeros(shape);
    let flops = 2.0 * (n as f64).powi(3);
    let label = format!("{n}x{n}x{n}");
    // Through the backend (its own split across threads, sequential faer kernels).
    let times = time(
        target_s,
        || {},
        || {
            cpu.gemm(&mut c, 1.0, &a, Transpose::No, &b, Transpose::No, 0.0)
                .expect("gemm")
        },
    );
    report("muon-faer", "sgemm", &label, threads, flops, &times, "");
    // faer's own parallel GEMM (rayon), the machine's reference peak.
    let par = if threads == 1 {
        Par::Seq
    } else {
        Par::rayon(threads)
    };
    let times = time(
        target_s,
        || {},
        || {
            matmul(
                MatMut::from_row_major_slice_mut(c.as_mut_slice(), n, n),
                Accum::Replace,
                MatRef::from_row_major_slice(a.as_slice(), n, n),
                MatRef::from_row_major_slice(b.as_slice(), n, n),
                1.0f32,
                par,
            )
        },
    );
    report("faer", "sgemm", &label, threads, flops, &times, "");
}

/// A small trainer preset: vocab 256 (bytes), dim 256, 4 layers, each with attention
/// (4 x 256x256), a router (8x256) and 8 SwiGLU experts (gate and up 8x512x256, down
/// 8x256x512), two norms; embedding and LM head 256x256, a final norm.
fn preset() -> Vec<ParamSpec> {
    let mut specs = vec![ParamSpec::new(
        "embed",
        Shape::matrix(256, 256),
        ParamRole::Embedding,
    )];
    for l in 0..4 {
        let p = |n: &str| format!("blocks.{l}.{n}");
        specs.push(ParamSpec::new(
            p("attn_norm"),
            Shape::vector(256),
            ParamRole::Norm,
        ));
        for w in ["wq", "wk", "wv", "wo"] {
            specs.push(ParamSpec::new(p(w), Shape::matrix(256, 256), ParamRole::Hidden));
        }
        specs.push(ParamSpec::new(p("ffn_norm"), Shape::vector(256), ParamRole::Norm));
        specs.push(ParamSpec::new(
            p("router"),
            Shape::matrix(8, 256),
            ParamRole::Hidden,
        ));
        specs.push(ParamSpec::new(
            p("w_gate"),
            Shape::batched(8, 512, 256),
            ParamRole::Hidden,
        ));
        specs.push(ParamSpec::new(
            p("w_up"),
            Shape::batched(8, 512, 256),
            ParamRole::Hidden,
        ));
        specs.push(ParamSpec::new(
            p("w_down"),
            Shape::batched(8, 256, 512),
            ParamRole::Hidden,
        ));
    }
    specs.push(ParamSpec::new("final_norm", Shape::vector(256), ParamRole::Norm));
    specs.push(ParamSpec::new(
        "lm_head",
        Shape::matrix(256, 256),
        ParamRole::LmHead,
    ));
    specs
}

fn bench_step(cpu: &Faer<f32>, threads: usize, target_s: f64) {
    let specs = preset();
    let config = HybridConfig::default();
    let flops: f64 = specs
        .iter()
        .filter(|s| s.optimizer() == muon_core::OptimizerKind::Muon)
        .map(|s| config.muon.newton_schulz.flops(s.shape))
        .sum();
    let params_count: usize = specs.iter().map(|s| s.shape.len()).sum();
    let mut opt = HybridOptimizer::new(cpu, specs.clone(), config).expect("optimizer");
    let mut params: Vec<HostMatrix<f32>> = specs.iter().map(|s| HostMatrix::zeros(s.shape)).collect();
    let grads: Vec<HostMatrix<f32>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| HostMatrix::from_vec(s.shape, data(s.shape.len(), 10 + i as u64)).expect("grad"))
        .collect();
    let times = time(
        target_s,
        || {},
        || {
            opt.step(cpu, &mut params, &grads, 1e-3).expect("step");
        },
    );
    let extra = format!(", \"params\": {params_count}");
    report(
        "muon-faer",
        "hybrid_step",
        "preset_d256_l4_e8",
        threads,
        flops,
        &times,
        &extra,
    );
}

fn main() {
    let args = parse_args();
    eprintln!(
        "{{\"meta\": true, \"impl\": \"muon-faer\", \"cores\": {}}}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for &threads in &args.threads {
        let cpu = Faer::<f32>::with_threads(threads).with_precision(args.precision);
        if args.gemm {
            bench_gemm(&cpu, threads, 2048, args.target_s);
        }
        if args.ns {
            for &shape in &args.shapes {
                bench_ns(&cpu, threads, shape, args.target_s, args.generic);
            }
        }
        if args.step {
            bench_step(&cpu, threads, args.target_s);
        }
    }
}
