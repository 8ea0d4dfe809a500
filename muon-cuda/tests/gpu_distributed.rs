//! Distributed Muon on NCCL (`NcclGroup` under muon-core's `DistributedOptimizer`) against the
//! single-rank `HybridOptimizer`.
//!
//! - One GPU: a group of one rank on the GPU against the single-rank optimizer on the same GPU.
//!   Both run the same kernels and cuBLAS calls on the same inputs (NCCL's average over one
//!   rank is the identity), so they agree to a few f32 ulps: 1e-6 relative.
//! - Every GPU of the machine, when there are two or more: one thread per GPU, against the
//!   portable CPU optimizer fed the mean gradient, at the tolerances of `gpu_agreement.rs`
//!   (F32 GEMMs: Newton-Schulz to 2e-5, twice that over three steps; AdamW 1e-5). The shapes'
//!   lengths are not multiples of the rank count, so NCCL's padded path runs too, and each
//!   matrix's Newton-Schulz runs on one owner GPU and is broadcast.
//!
//! Each test prints why it skips: no CUDA GPU/driver, no NCCL library, or a single GPU.
#![cfg(feature = "cuda")]

mod common;

use std::io::Write;

use common::{assert_close, host, ns_tol, to_gpu, to_host, CPU};
use muon_core::{
    Backend, Collective, DistributedOptimizer, HostMatrix, HybridConfig, HybridOptimizer, OptimizerKind,
    ParamRole, ParamSpec, Shape,
};
use muon_cuda::{CudaBackend, NcclGroup, Precision};

/// Prints why a test skips, on the stderr handle (libtest hides `eprintln!` of passing tests).
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
}

/// GPU 0 and a fresh one-rank NCCL group on it, or `None` after printing why the test skips.
/// A GPU that is there but fails to open is a failure, not a reason to skip.
fn one_rank(test: &str) -> Option<(CudaBackend, NcclGroup)> {
    if !muon_cuda::is_available() {
        skip(test, "no CUDA GPU/driver");
        return None;
    }
    let gpu = CudaBackend::new(0).unwrap_or_else(|e| panic!("{test}: a GPU is present but: {e}"));
    let id = match NcclGroup::unique_id() {
        Ok(id) => id,
        Err(e) => {
            skip(test, &format!("{e}"));
            return None;
        }
    };
    let group = NcclGroup::new(&gpu, 0, 1, id).unwrap();
    eprintln!("{test}: on {}", gpu.device_name());
    Some((gpu, group))
}

/// Takes `STEPS` steps from the initial parameters with rank `rank`'s gradients; returns the
/// parameters on the host.
fn run_steps<C: Collective<CudaBackend>>(
    gpu: &CudaBackend,
    opt: &mut DistributedOptimizer<CudaBackend, C>,
    rank: usize,
) -> Vec<Vec<f32>> {
    let specs = specs();
    let mut params: Vec<_> = initial(&specs).iter().map(|m| to_gpu(gpu, m)).collect();
    for step in 0..STEPS {
        let grads: Vec<_> = specs
            .iter()
            .enumerate()
            .map(|(p, s)| to_gpu(gpu, &grad(s, p, step, rank)))
            .collect();
        opt.step(gpu, &mut params, &grads, LR).unwrap();
    }
    params.iter().map(|m| to_host(gpu, m)).collect()
}

fn specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("wq", Shape::matrix(64, 96), ParamRole::Hidden),
        ParamSpec::new("odd", Shape::matrix(37, 53), ParamRole::Hidden),
        ParamSpec::new("experts", Shape::batched(3, 32, 45), ParamRole::Hidden),
        ParamSpec::new("embed", Shape::matrix(51, 16), ParamRole::Embedding),
        ParamSpec::new("norm", Shape::vector(17), ParamRole::Norm),
    ]
}

/// Rank `rank`'s gradient of parameter `p` at `step`.
fn grad(spec: &ParamSpec, p: usize, step: usize, rank: usize) -> HostMatrix<f32> {
    host(spec.shape, (10_000 * (step + 1) + 100 * rank + p) as u64)
}

fn initial(specs: &[ParamSpec]) -> Vec<HostMatrix<f32>> {
    specs
        .iter()
        .enumerate()
        .map(|(p, s)| host(s.shape, 7 + p as u64))
        .collect()
}

const STEPS: usize = 3;
const LR: f64 = 0.02;

#[test]
fn one_rank_on_nccl_equals_the_single_rank_optimizer() {
    let Some((gpu, group)) = one_rank("one_rank_on_nccl_equals_the_single_rank_optimizer") else {
        return;
    };
    let specs = specs();
    let mut distributed =
        DistributedOptimizer::new(&gpu, group, specs.clone(), HybridConfig::default()).unwrap();
    let mut single = HybridOptimizer::new(&gpu, specs.clone(), HybridConfig::default()).unwrap();
    let mut params_d: Vec<_> = initial(&specs).iter().map(|m| to_gpu(&gpu, m)).collect();
    let mut params_s: Vec<_> = initial(&specs).iter().map(|m| to_gpu(&gpu, m)).collect();
    for step in 0..STEPS {
        let grads: Vec<_> = specs
            .iter()
            .enumerate()
            .map(|(p, s)| to_gpu(&gpu, &grad(s, p, step, 0)))
            .collect();
        let rd = distributed.step(&gpu, &mut params_d, &grads, LR).unwrap();
        let rs = single.step(&gpu, &mut params_s, &grads, LR).unwrap();
        assert!((rd.grad_norm - rs.grad_norm).abs() <= 1e-6 * rs.grad_norm);
    }
    for (i, spec) in specs.iter().enumerate() {
        let what = format!("parameter {} after {STEPS} steps", spec.name);
        assert_close(
            &what,
            &to_host(&gpu, &params_d[i]),
            &to_host(&gpu, &params_s[i]),
            1e-6,
        );
    }
    let (sd, ss) = (
        distributed.export_state(&gpu).unwrap(),
        single.export_state(&gpu).unwrap(),
    );
    for (d, s) in sd.params.iter().zip(&ss.params) {
        for (bd, bs) in d.buffers.iter().zip(&s.buffers) {
            assert_close(&format!("state of {}", d.name), bd, bs, 1e-6);
        }
    }
}

#[test]
fn every_gpu_as_a_rank_equals_the_cpu_optimizer_on_the_mean_gradient() {
    let test = "every_gpu_as_a_rank_equals_the_cpu_optimizer_on_the_mean_gradient";
    if !muon_cuda::is_available() {
        return skip(test, "no CUDA GPU/driver");
    }
    let world = cudarc::driver::CudaContext::device_count().unwrap() as usize;
    if world < 2 {
        return skip(test, &format!("{world} GPU here; the test needs two or more"));
    }
    let id = match NcclGroup::unique_id() {
        Ok(id) => id,
        Err(e) => return skip(test, &format!("{e}")),
    };
    let specs = specs();
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let specs = specs.clone();
            std::thread::spawn(move || {
                let mut gpu = CudaBackend::new(rank).unwrap();
                gpu.set_precision(Precision::F32);
                let group = NcclGroup::new(&gpu, rank, world, id).unwrap();
                // Round-robin Newton-Schulz, so NCCL's broadcast runs too.
                let mut opt = DistributedOptimizer::new(&gpu, group, specs.clone(), HybridConfig::default())
                    .unwrap()
                    .with_round_robin_newton_schulz(&gpu, true)
                    .unwrap();
                run_steps(&gpu, &mut opt, rank)
            })
        })
        .collect();
    let results: Vec<Vec<Vec<f32>>> = ranks.into_iter().map(|r| r.join().unwrap()).collect();

    let mut opt = HybridOptimizer::new(&CPU, specs.clone(), HybridConfig::default()).unwrap();
    let mut params = initial(&specs);
    for step in 0..STEPS {
        let grads: Vec<HostMatrix<f32>> = specs
            .iter()
            .enumerate()
            .map(|(p, s)| {
                let mut mean = vec![0.0f32; s.shape.len()];
                for rank in 0..world {
                    mean.iter_mut()
                        .zip(grad(s, p, step, rank).as_slice())
                        .for_each(|(m, g)| *m += g / world as f32);
                }
                HostMatrix::from_vec(s.shape, mean).unwrap()
            })
            .collect();
        opt.step(&CPU, &mut params, &grads, LR).unwrap();
    }
    let start = initial(&specs);
    for (rank, got) in results.iter().enumerate() {
        for (i, spec) in specs.iter().enumerate() {
            let delta = |now: &[f32]| -> Vec<f32> {
                now.iter().zip(start[i].as_slice()).map(|(a, b)| a - b).collect()
            };
            let tol = match spec.optimizer() {
                OptimizerKind::Muon => 2.0 * ns_tol(Precision::F32),
                OptimizerKind::AdamW => 1e-5,
            };
            let what = format!("rank {rank} of {world}: update of {}", spec.name);
            assert_close(&what, &delta(&got[i]), &delta(params[i].as_slice()), tol);
        }
    }
}

#[test]
fn a_bf16_all_gather_rounds_exactly_like_the_cpu_reference() {
    // Cast on the GPU, gathered as bytes by NCCL, widened back: each element must equal
    // muon-core's `round_to_bf16` of it, bit for bit (round to nearest even is exact
    // arithmetic on the bits). The lengths cover a full tensor and one that leaves padding.
    let Some((gpu, group)) = one_rank("a_bf16_all_gather_rounds_exactly_like_the_cpu_reference") else {
        return;
    };
    for shape in [Shape::matrix(33, 65), Shape::batched(2, 3, 5)] {
        let values: Vec<f32> = common::values(shape.len(), 5).iter().map(|v| v * 1e3).collect();
        let shard = to_gpu(
            &gpu,
            &HostMatrix::from_vec(Shape::vector(shape.len()), values.clone()).unwrap(),
        );
        let mut full = gpu.zeros(shape).unwrap();
        group.all_gather_bf16(&gpu, &shard, &mut full).unwrap();
        let want: Vec<f32> = values.iter().map(|&v| muon_core::round_to_bf16(v)).collect();
        let got = to_host(&gpu, &full);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{shape} element {i}: {} -> {g}, want {w}",
                values[i]
            );
        }
    }
}

#[test]
fn a_bf16_gather_of_n_t_moves_the_parameters_at_bf16_scale_only() {
    // As muon-faer's CPU test: the same one-rank run with N_t gathered in f32 and in bf16
    // differs (the rounding happened) but by less than 1e-3 after three steps (bf16's 2^-9
    // relative rounding of N_t, through Newton-Schulz, times the update's size ~0.03).
    let test = "a_bf16_gather_of_n_t_moves_the_parameters_at_bf16_scale_only";
    let mut runs = Vec::new();
    for bf16 in [false, true] {
        let Some((gpu, group)) = one_rank(test) else {
            return;
        };
        let mut opt = DistributedOptimizer::new(&gpu, group, specs(), HybridConfig::default())
            .unwrap()
            .with_bf16_gather(bf16);
        runs.push(run_steps(&gpu, &mut opt, 0));
    }
    let worst = runs[0]
        .iter()
        .flatten()
        .zip(runs[1].iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst > 0.0, "a bf16 gather changed nothing");
    assert!(worst < 1e-3, "a bf16 gather moved a parameter by {worst:e}");
}
