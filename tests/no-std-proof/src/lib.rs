//! The no_std proof. This crate is `#![no_std]` and defines its own `#[panic_handler]`: if
//! anything in muon-core's dependency graph links `std`, std's panic handler is a second
//! definition of the `panic_impl` lang item and the build fails with E0152. It is its own
//! workspace root, so that no other crate's features are unified into muon-core; CI builds it
//! with `cargo build --manifest-path tests/no-std-proof/Cargo.toml`.
#![no_std]

extern crate alloc;

use core::panic::PanicInfo;

use muon_core::{HybridConfig, HybridOptimizer, ParamRole, ParamSpec, Portable, Shape};

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    loop {}
}

/// Uses the core for real so that its code is compiled into this crate's graph: builds an
/// optimizer on the portable backend and takes one step on a zero gradient.
pub fn one_step() -> bool {
    let backend = Portable::<f32>::new();
    let specs = alloc::vec![ParamSpec::new("w", Shape::matrix(2, 3), ParamRole::Hidden)];
    let Ok(mut opt) = HybridOptimizer::new(&backend, specs, HybridConfig::default()) else {
        return false;
    };
    let mut params = alloc::vec![muon_core::HostMatrix::zeros(Shape::matrix(2, 3))];
    let grads = alloc::vec![muon_core::HostMatrix::zeros(Shape::matrix(2, 3))];
    opt.step(&backend, &mut params, &grads, 0.01).is_ok()
}
