//! An optimizer step allocates nothing: all state and workspaces are made in `new`.
//! A counting global allocator watches a hybrid step on the portable backend. This file runs
//! without libtest (`harness = false`): the harness's own threads may allocate while the count
//! is taken, which would make the test flaky.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use muon_core::{
    HostMatrix, HybridConfig, HybridOptimizer, NewtonSchulz, ParamRole, ParamSpec, Portable, Shape,
};

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only counts allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was returned by `System.alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..3 {
        opt.step(&backend, &mut params, &grads, 0.01).unwrap();
        opt.update_rms(&backend, &mut rms).unwrap();
    }
    let during = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(during, 0, "optimizer steps allocated {during} times");
    assert!(rms.iter().all(|r| r.is_finite() && *r > 0.0));
}

fn main() {
    a_hybrid_step_allocates_nothing();
    println!("no_alloc: 1 passed, 0 failed");
}
