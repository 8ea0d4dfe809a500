//! Kernels from outside the crate, through the public hook (`CudaBackend::get_or_load_func`)
//! and launch (`CudaKernel::launch`): they compute what they should, a module is loaded once
//! per backend under its name, and every way to get it wrong is an error that says what.
//!
//! Without a CUDA GPU and driver each test prints why it skips (the compile and cache part
//! runs without a GPU in the crate's `nvrtc` unit tests and `kernels_compile.rs`).
#![cfg(feature = "cuda")]

use std::io::Write;

use muon_core::{Backend, Shape};
use muon_cuda::{grid_stride, CudaBackend, LaunchConfig};

/// Two kernels in one module: `y = a x` and `y += x`, elementwise.
const SCALE_ADD: &str = r#"
extern "C" __global__ void test_scale(float* y, const float* x, float a, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = a * x[i];
    }
}
extern "C" __global__ void test_add(float* y, const float* x, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] += x[i];
    }
}
"#;

/// The GPU backend, or `None` after printing why the test skips.
fn gpu(test: &str) -> Option<CudaBackend> {
    if !muon_cuda::is_available() {
        // The stderr handle, not eprintln!, which libtest hides for passing tests.
        let _ = writeln!(std::io::stderr(), "{test}: skipped: no CUDA GPU/driver");
        return None;
    }
    let backend = CudaBackend::new(0)
        .unwrap_or_else(|e| panic!("{test}: a CUDA GPU is present but the backend failed: {e}"));
    Some(backend)
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 97) as f32 * 0.37 - 11.0).collect()
}

#[test]
fn own_kernels_compute_what_they_should() {
    let Some(gpu) = gpu("own_kernels_compute_what_they_should") else {
        return;
    };
    // Sizes around a block and past the grid's cap (8192 blocks of 256 threads), so the
    // grid-stride loop runs more than once per thread.
    for n in [1, 255, 257, 3 * 256 * 8192 + 5] {
        let shape = Shape::vector(n);
        let host = values(n);
        let mut x = gpu.zeros(shape).unwrap();
        gpu.upload(&mut x, &host).unwrap();
        let mut y = gpu.zeros(shape).unwrap();
        let scale = gpu
            .get_or_load_func("own_kernels_test", SCALE_ADD, "test_scale")
            .unwrap();
        let add = gpu
            .get_or_load_func("own_kernels_test", SCALE_ADD, "test_add")
            .unwrap();
        assert_eq!((scale.name(), scale.module()), ("test_scale", "own_kernels_test"));
        let (a, len) = (-2.5f32, n as i64);
        // SAFETY: `test_scale(float* y, const float* x, float a, long long n)` and
        // `test_add(float* y, const float* x, long long n)` get their arguments in order and
        // type; `x` and `y` hold `n` floats and the kernels touch indices below `n` only, one
        // thread each; both matrices are the backend's.
        unsafe {
            scale.launch(grid_stride(n), (&mut y, &x, &a, &len)).unwrap();
            add.launch(grid_stride(n), (&mut y, &x, &len)).unwrap();
        }
        let mut got = vec![0.0; n];
        gpu.download(&y, &mut got).unwrap();
        // One f32 multiply and one f32 add per element, the same operations in the same order
        // as on the host (no fused multiply-add: the product is stored before the add), so
        // the results are bit-identical.
        for (i, (&g, &v)) in got.iter().zip(&host).enumerate() {
            let want = a * v + v;
            assert_eq!(g.to_bits(), want.to_bits(), "n = {n}, element {i}: {g} vs {want}");
        }
    }
}

#[test]
fn a_module_name_is_bound_to_its_first_source() {
    let Some(gpu) = gpu("a_module_name_is_bound_to_its_first_source") else {
        return;
    };
    gpu.get_or_load_func("bound_test", SCALE_ADD, "test_scale")
        .unwrap();
    // The same text at another address is the same source.
    let copy: &'static str = String::from(SCALE_ADD).leak();
    gpu.get_or_load_func("bound_test", copy, "test_add").unwrap();
    let other: &'static str = "extern \"C\" __global__ void test_scale() {}";
    let err = gpu
        .get_or_load_func("bound_test", other, "test_scale")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`bound_test`") && err.contains("another source"),
        "{err}"
    );
    // The backend's own module name is taken.
    let err = gpu
        .get_or_load_func(muon_cuda::kernels::MODULE, SCALE_ADD, "test_scale")
        .unwrap_err()
        .to_string();
    assert!(err.contains("the backend's own"), "{err}");
}

#[test]
fn mistakes_are_errors_that_say_what() {
    let Some(gpu) = gpu("mistakes_are_errors_that_say_what") else {
        return;
    };
    let err = gpu
        .get_or_load_func("mistakes_test", SCALE_ADD, "no_such_kernel")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`mistakes_test`") && err.contains("`no_such_kernel`"),
        "{err}"
    );
    let broken: &'static str = "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }";
    let err = gpu
        .get_or_load_func("broken_test", broken, "k")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`broken_test`") && err.contains("undefined_name"),
        "{err}"
    );
    // A block the driver refuses (more than 1024 threads) is an error naming the kernel.
    let scale = gpu
        .get_or_load_func("mistakes_test", SCALE_ADD, "test_scale")
        .unwrap();
    let (mut y, x) = (
        gpu.zeros(Shape::vector(4)).unwrap(),
        gpu.zeros(Shape::vector(4)).unwrap(),
    );
    let (a, n) = (1.0f32, 4i64);
    let too_big = LaunchConfig {
        block_dim: (2048, 1, 1),
        ..grid_stride(4)
    };
    // SAFETY: the argument list matches `test_scale` and `x`, `y` hold `n` floats; the driver
    // refuses the block before anything runs.
    let err = unsafe { scale.launch(too_big, (&mut y, &x, &a, &n)) }
        .unwrap_err()
        .to_string();
    assert!(err.contains("`test_scale`"), "{err}");
    gpu.synchronize().unwrap();
}
