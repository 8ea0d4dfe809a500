//! An optimizer step allocates nothing: all state and workspaces are made in `new`.
//! muon-test-support's counting global allocator watches a hybrid step on the portable
//! backend. This file runs without libtest (`harness = false`): the harness's own threads may
//! allocate while the count is taken, which would make the test flaky.

use muon_core::{
    HostMatrix, HybridConfig, HybridOptimizer, NewtonSchulz, ParamRole, ParamSpec, Portable, Shape,
};
use muon_test_support::{allocations, assert_counting, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn a_hybrid_step_allocates_nothing() {
    let backend = Portable::<f32>::new();
    let specs = vec![
        ParamSpec::new("embed", Shape::matrix(32, 16), ParamRole::Embedding),
        ParamSpec::new("w", Shape::matrix(16, 24), ParamRole::Hidden),
        ParamSpec::new("tall", Shape::matrix(24, 16), ParamRole::Hidden),
        ParamSpec::new("experts", Shape::batched(4, 8, 16), ParamRole::Hidden),
        ParamSpec::new("norm", Shape::vector(16), ParamRole::Norm),
    ];
    let mut config = HybridConfig::default();
    config.muon.newton_schulz = NewtonSchulz::polar_express();
    let mut opt = HybridOptimizer::new(&backend, specs.clone(), config).unwrap();
    let mut params: Vec<HostMatrix<f32>> = specs.iter().map(|s| HostMatrix::zeros(s.shape)).collect();
    let grads: Vec<HostMatrix<f32>> = specs
        .iter()
        .map(|s| {
            let data = (0..s.shape.len())
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            HostMatrix::from_vec(s.shape, data).unwrap()
        })
        .collect();
    let mut rms = vec![0.0; specs.len()];
    opt.step(&backend, &mut params, &grads, 0.01).unwrap();

    let during = allocations(|| {
        for _ in 0..3 {
            opt.step(&backend, &mut params, &grads, 0.01).unwrap();
            opt.update_rms(&backend, &mut rms).unwrap();
        }
    });
    assert_eq!(during, 0, "optimizer steps allocated {during} times");
    assert!(rms.iter().all(|r| r.is_finite() && *r > 0.0));
}

fn main() {
    // The counter counts (a check that cannot fail proves nothing).
    assert_counting();
    a_hybrid_step_allocates_nothing();
    println!("no_alloc: 1 passed, 0 failed");
}
