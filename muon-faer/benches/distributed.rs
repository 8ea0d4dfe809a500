//! Distributed Muon on one machine: the optimizer step of a MoE-like model on `ThreadGroup`
//! ranks against the single-rank `HybridOptimizer` on as many threads, in the same run.
//!
//! ```text
//! cargo bench -p muon-faer --bench distributed -- [--ranks 2] [--steps 10] [--rounds 3]
//! ```
//! Cases, interleaved round by round (the machines here are shared and noisy): `single` (one
//! `HybridOptimizer` on a `ranks`-thread backend), `every-rank` (`ranks` ranks, one thread each,
//! every rank running every Newton-Schulz), `round-robin` (each matrix's Newton-Schulz on one
//! owner, then broadcast) and `round-robin-bf16` (and `N_t` gathered in bf16). One JSON line
//! per case and round: the median step time of rank 0 over `steps` steps after a warm-up step,
//! and its ratio to `single` in the same round.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use muon_core::{
    DistributedOptimizer, HostMatrix, HybridConfig, HybridOptimizer, ParamRole, ParamSpec, Shape,
};
use muon_faer::{Faer, ThreadGroup};

/// A model shaped like a small MoE transformer: attention and expert stacks (Muon), an
/// embedding and norm gains (AdamW).
fn specs() -> Vec<ParamSpec> {
    let (dim, experts, width) = (384, 16, 256);
    let mut specs = vec![ParamSpec::new(
        "embed",
        Shape::matrix(4096, dim),
        ParamRole::Embedding,
    )];
    for l in 0..4 {
        let p = |n: &str| format!("layers.{l}.{n}");
        specs.push(ParamSpec::new(
            p("wq"),
            Shape::matrix(dim, dim),
            ParamRole::Hidden,
        ));
        specs.push(ParamSpec::new(
            p("wkv"),
            Shape::matrix(2 * dim, dim),
            ParamRole::Hidden,
        ));
        specs.push(ParamSpec::new(
            p("wo"),
            Shape::matrix(dim, dim),
            ParamRole::Hidden,
        ));
        specs.push(ParamSpec::new(
            p("router"),
            Shape::matrix(experts, dim),
            ParamRole::Hidden,
        ));
        specs.push(ParamSpec::new(
            p("w_up"),
            Shape::batched(experts, width, dim),
            ParamRole::Hidden,
        ));
        specs.push(ParamSpec::new(
            p("w_down"),
            Shape::batched(experts, dim, width),
            ParamRole::Hidden,
        ));
        specs.push(ParamSpec::new(p("norm"), Shape::vector(dim), ParamRole::Norm));
    }
    specs
}

fn tensors(specs: &[ParamSpec], seed: usize) -> Vec<HostMatrix<f32>> {
    (specs.iter())
        .map(|s| {
            let data =
                (0..s.shape.len()).map(|i| (((i * 7919 + seed * 104_729) % 1013) as f32 - 506.0) / 506.0);
            HostMatrix::from_vec(s.shape, data.collect()).unwrap()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median step time (ms) of one `HybridOptimizer` on a `threads`-thread backend.
fn single(threads: usize, steps: usize) -> f64 {
    let cpu = Faer::<f32>::with_threads(threads);
    let specs = specs();
    let mut opt = HybridOptimizer::new(&cpu, specs.clone(), HybridConfig::default()).unwrap();
    let (mut params, grads) = (tensors(&specs, 0), tensors(&specs, 1));
    opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
    let times = (0..steps).map(|_| {
        let t = Instant::now();
        opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
        t.elapsed().as_secs_f64() * 1e3
    });
    median(times.collect())
}

/// Median step time (ms) of rank 0 of `ranks` one-thread ranks.
fn distributed(ranks: usize, steps: usize, round_robin: bool, bf16: bool) -> f64 {
    let barrier = Arc::new(Barrier::new(ranks));
    let handles: Vec<_> = ThreadGroup::<f32>::new(ranks)
        .into_iter()
        .map(|group| {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let cpu = Faer::<f32>::with_threads(1);
                let specs = specs();
                let rank = group.rank();
                let mut opt = DistributedOptimizer::new(&cpu, group, specs.clone(), HybridConfig::default())
                    .unwrap()
                    .with_round_robin_newton_schulz(&cpu, round_robin)
                    .unwrap()
                    .with_bf16_gather(bf16);
                let (mut params, grads) = (tensors(&specs, 0), tensors(&specs, 1 + rank));
                opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
                let mut times = Vec::with_capacity(steps);
                for _ in 0..steps {
                    barrier.wait();
                    let t = Instant::now();
                    opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                median(times)
            })
        })
        .collect();
    let times: Vec<f64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    times[0]
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let (mut ranks, mut steps, mut rounds) = (2, 10, 3);
    while let Some(flag) = args.next() {
        let value: usize = args
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--ranks" => ranks = value,
            "--steps" => steps = value,
            "--rounds" => rounds = value,
            other => panic!("unknown option {other}; see the file's header"),
        }
    }
    let params: usize = specs().iter().map(|s| s.shape.len()).sum();
    eprintln!("distributed: {params} parameters, {ranks} ranks vs one optimizer on {ranks} threads");
    for round in 0..rounds {
        let base = single(ranks, steps);
        println!(
            r#"{{"case":"single","round":{round},"ranks":1,"threads":{ranks},"ms_median":{base:.2},"vs_single":1.0}}"#
        );
        for (case, rr, bf16) in [
            ("every-rank", false, false),
            ("round-robin", true, false),
            ("round-robin-bf16", true, true),
        ] {
            let ms = distributed(ranks, steps, rr, bf16);
            println!(
                r#"{{"case":"{case}","round":{round},"ranks":{ranks},"threads":1,"ms_median":{ms:.2},"vs_single":{:.3}}}"#,
                ms / base
            );
        }
    }
}
