//! After warm-up, Newton-Schulz and a whole hybrid optimizer step allocate nothing on the faer
//! backend, on every thread (the counter is global, so it sees the team's workers too).
//!
//! Warm-up allocates once per thread: faer's packing buffers are thread-local and created on a
//! thread's first product. The shapes cover every scheduling path: serial, split inside one
//! matrix, split over a stack of experts, tall and wide, tiny (faer's nano-gemm path). A
//! distributed step over a `ThreadGroup` of three ranks allocates nothing either. All of it in
//! f32 and in bf16 (`Precision::Bf16`: the packing buffers are allocated on the first bf16
//! product, then reused).

use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use muon_core::{
    newton_schulz, Backend, DistributedOptimizer, HostMatrix, HybridConfig, HybridOptimizer, NewtonSchulz,
    NsWorkspace, ParamRole, ParamSpec, Shape,
};
use muon_faer::{Faer, Precision, ThreadGroup};
use muon_test_support::{allocation_count, allocations, assert_counting, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const SHAPES: [Shape; 8] = [
    Shape::matrix(8, 12),
    Shape::matrix(128, 128),
    Shape::matrix(96, 300),
    Shape::matrix(300, 96),
    Shape::matrix(256, 512),
    Shape::batched(8, 64, 176),
    Shape::batched(3, 150, 100),
    // Tall with a wide Gram side: X^T X through the backend's transpose scratch.
    Shape::matrix(800, 768),
];

fn input(shape: Shape) -> Vec<f32> {
    (0..shape.len())
        .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 506.0)
        .collect()
}

// A plain `main` (`harness = false` in Cargo.toml): the counter is process-wide, and libtest's
// own threads allocate while a test runs (its main thread, waiting on a channel for results).
fn main() {
    // The counter works (a check that cannot fail proves nothing).
    assert_counting();
    for (threads, precision) in [1, 2, 3]
        .into_iter()
        .flat_map(|t| [(t, Precision::F32), (t, Precision::Bf16)])
    {
        let cpu = Faer::<f32>::with_threads(threads).with_precision(precision);
        let config = NewtonSchulz::quintic();
        for shape in SHAPES {
            let mut ws = NsWorkspace::new(&cpu, shape).unwrap();
            let data = input(shape);
            for _ in 0..2 {
                cpu.upload(&mut ws.x, &data).unwrap();
                newton_schulz(&cpu, &config, &mut ws).unwrap();
            }
            cpu.upload(&mut ws.x, &data).unwrap();
            let n = allocations(|| newton_schulz(&cpu, &config, &mut ws).unwrap());
            assert_eq!(
                n, 0,
                "newton_schulz on {shape} with {threads} threads in {precision} allocated {n} times"
            );
        }

        let specs = vec![
            ParamSpec::new("embed", Shape::matrix(256, 64), ParamRole::Embedding),
            ParamSpec::new("wq", Shape::matrix(64, 64), ParamRole::Hidden),
            ParamSpec::new("w_up", Shape::matrix(256, 64), ParamRole::Hidden),
            ParamSpec::new("experts", Shape::batched(4, 64, 128), ParamRole::Hidden),
            ParamSpec::new("norm", Shape::vector(64), ParamRole::Norm),
            ParamSpec::new("big", Shape::matrix(512, 384), ParamRole::Hidden),
        ];
        let mut opt = HybridOptimizer::new(&cpu, specs.clone(), HybridConfig::default()).unwrap();
        let mut params: Vec<HostMatrix<f32>> = specs.iter().map(|s| HostMatrix::zeros(s.shape)).collect();
        let grads: Vec<HostMatrix<f32>> = specs
            .iter()
            .map(|s| HostMatrix::from_vec(s.shape, input(s.shape)).unwrap())
            .collect();
        for _ in 0..2 {
            opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
        }
        let n = allocations(|| {
            opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
        });
        assert_eq!(
            n, 0,
            "a hybrid step with {threads} threads in {precision} allocated {n} times"
        );
    }
    distributed_steps_allocate_nothing();
    let bf16 = Faer::<f32>::with_threads(1)
        .with_precision(Precision::Bf16)
        .bf16_kernel();
    println!(
        "alloc: no allocation after warm-up (Newton-Schulz on {} shapes, hybrid steps; 1-3 threads; \
         f32 and bf16 on {}; distributed steps on 3 ranks)",
        SHAPES.len(),
        bf16.map_or("no bf16 unit: f32", |k| k.name())
    );
}

/// Three ranks (threads) step a `DistributedOptimizer` over a `ThreadGroup`; after a warm-up
/// step, the counter (process-wide) does not move while all three take two more steps.
fn distributed_steps_allocate_nothing() {
    let world = 3;
    let sync = Arc::new(Barrier::new(world));
    let counts = Arc::new(Mutex::new((0usize, 0usize)));
    let ranks: Vec<_> = ThreadGroup::<f32>::new(world)
        .into_iter()
        .map(|group| {
            let (sync, counts) = (Arc::clone(&sync), Arc::clone(&counts));
            thread::spawn(move || {
                let cpu = Faer::<f32>::with_threads(1);
                let specs = vec![
                    ParamSpec::new("embed", Shape::matrix(100, 30), ParamRole::Embedding),
                    ParamSpec::new("wq", Shape::matrix(30, 30), ParamRole::Hidden),
                    ParamSpec::new("experts", Shape::batched(4, 30, 50), ParamRole::Hidden),
                    ParamSpec::new("norm", Shape::vector(31), ParamRole::Norm),
                ];
                let rank = group.rank();
                // Round-robin Newton-Schulz: the broadcasts are checked too.
                let mut opt = DistributedOptimizer::new(&cpu, group, specs.clone(), HybridConfig::default())
                    .unwrap()
                    .with_round_robin_newton_schulz(&cpu, true)
                    .unwrap();
                let mut params: Vec<HostMatrix<f32>> =
                    specs.iter().map(|s| HostMatrix::zeros(s.shape)).collect();
                let grads: Vec<HostMatrix<f32>> = specs
                    .iter()
                    .map(|s| HostMatrix::from_vec(s.shape, input(s.shape)).unwrap())
                    .collect();
                let mut rms = vec![0.0; specs.len()];
                opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
                opt.update_rms(&cpu, &mut rms).unwrap();
                sync.wait();
                if rank == 0 {
                    counts.lock().unwrap().0 = allocation_count();
                }
                sync.wait();
                for _ in 0..2 {
                    opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
                    opt.update_rms(&cpu, &mut rms).unwrap();
                }
                sync.wait();
                if rank == 0 {
                    counts.lock().unwrap().1 = allocation_count();
                }
                sync.wait();
            })
        })
        .collect();
    for rank in ranks {
        rank.join().unwrap();
    }
    let (before, after) = *counts.lock().unwrap();
    assert_eq!(
        after - before,
        0,
        "two distributed steps on 3 ranks allocated {} times",
        after - before
    );
}
