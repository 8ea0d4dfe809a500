//! # muon-cuda
//!
//! The GPU backend of muon-rs: [`CudaBackend`] implements [`muon_core::Backend`] for `f32`
//! matrices in device memory, on [cudarc](https://docs.rs/cudarc) 0.19.
//!
//! - GEMMs go to cuBLAS (strided-batched for stacks of experts) in a chosen [`Precision`]:
//!   `F32`, `Tf32` (tensor cores, 10-bit mantissa inputs, f32 accumulation) or `Bf16`
//!   (operands cast to bf16 in preallocated scratch, `cublasGemmStridedBatchedEx` with
//!   `CUBLAS_COMPUTE_32F`). Momentum, weights and optimizer state always stay `f32`; only the
//!   Newton-Schulz products see the lower precision (docs/DESIGN.md §2 allows it).
//! - Everything else is a fused kernel ([`kernels`]), compiled with NVRTC to a CUBIN for the
//!   device's architecture (once per process) and loaded on first use: momentum + Nesterov,
//!   scale + weight decay + update, `axpby`, the AdamW direction, a sum-of-squares reduction
//!   that writes a device slot, and the per-matrix Frobenius normalization (reduce, then
//!   scale, on the device).
//! - An optimizer step makes no host round trip beyond the one small download the core asks
//!   for, and no device allocation after warm-up: reduction and bf16 scratch grow to the
//!   largest size seen and are then reused.
//!
//! ```no_run
//! use muon_core::{Backend, HybridConfig, HybridOptimizer, ParamRole, ParamSpec, Shape};
//! use muon_cuda::{CudaBackend, Precision};
//!
//! # fn main() -> muon_core::Result<()> {
//! let gpu = CudaBackend::new(0)?.with_precision(Precision::Bf16);
//! let shape = Shape::matrix(256, 1024);
//! let specs = vec![ParamSpec::new("w", shape, ParamRole::Hidden)];
//! let mut opt = HybridOptimizer::new(&gpu, specs, HybridConfig::default())?;
//! let mut params = vec![gpu.zeros(shape)?];
//! let mut grads = vec![gpu.zeros(shape)?];
//! gpu.upload(&mut grads[0], &vec![0.01; shape.len()])?;
//! opt.step(&gpu, &mut params, &grads, 4.2e-4)?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Several GPUs
//!
//! [`NcclGroup`] is muon-core's `Collective` on NCCL: each rank (a process or thread per GPU)
//! hands one to a `muon_core::DistributedOptimizer`, which shards the optimizer state across
//! the ranks (the report's ZeRO-1 Distributed Muon). NCCL is loaded when a group is made, so
//! single-GPU use needs no NCCL library.
//!
//! ```no_run
//! use muon_core::{DistributedOptimizer, HybridConfig, ParamRole, ParamSpec, Shape};
//! use muon_cuda::{CudaBackend, NcclGroup, NcclId};
//!
//! # fn main() -> muon_core::Result<()> {
//! # let (rank, world) = (0, 1);
//! # let id_from_rank_0 = NcclGroup::unique_id()?.as_bytes();
//! let gpu = CudaBackend::new(rank)?;
//! // Rank 0 made the id with `NcclGroup::unique_id()` and sent its bytes to every rank.
//! let group = NcclGroup::new(&gpu, rank, world, NcclId::from_bytes(id_from_rank_0))?;
//! let specs = vec![ParamSpec::new("w", Shape::matrix(1024, 4096), ParamRole::Hidden)];
//! let mut opt = DistributedOptimizer::new(&gpu, group, specs, HybridConfig::default())?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Your own kernels
//!
//! A second set of kernels (a model's forward and backward passes) runs on the backend
//! through the same path as the backend's own: [`CudaBackend::get_or_load_func`] compiles a
//! CUDA C source once per process and GPU architecture, loads it once per backend and hands
//! out its kernels by name; [`CudaKernel::launch`] queues one on the backend's stream, with
//! [`grid_stride`] as the usual grid. The launch is `unsafe`: the crate cannot check that the
//! argument list matches the kernel's signature, nor what the kernel touches.
//!
//! ```no_run
//! use muon_core::{Backend, Shape};
//! use muon_cuda::{grid_stride, CudaBackend, CudaMatrix};
//!
//! /// `y = x * sigmoid(x)`, elementwise.
//! const SILU: &str = r#"
//! extern "C" __global__ void silu(float* y, const float* x, long long n) {
//!     for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
//!          i += (long long)gridDim.x * blockDim.x) {
//!         y[i] = x[i] / (1.0f + expf(-x[i]));
//!     }
//! }
//! "#;
//!
//! fn silu(gpu: &CudaBackend, y: &mut CudaMatrix, x: &CudaMatrix) -> muon_core::Result<()> {
//!     muon_core::check_shape("silu output", x.shape(), y.shape())?;
//!     // Compiled on the first call, then a look-up by name.
//!     let kernel = gpu.get_or_load_func("my_model", SILU, "silu")?;
//!     let n = x.shape().len() as i64;
//!     // SAFETY: `silu(float* y, const float* x, long long n)` gets these three arguments in
//!     // order; `y` and `x` hold `n` floats each (checked above) and the kernel touches
//!     // indices below `n` only, one thread each; both matrices live on `gpu`'s stream.
//!     unsafe { kernel.launch(grid_stride(x.shape().len()), (y, x, &n)) }
//! }
//!
//! # fn main() -> muon_core::Result<()> {
//! let gpu = CudaBackend::new(0)?;
//! let x = gpu.zeros(Shape::matrix(64, 128))?;
//! let mut y = gpu.zeros(x.shape())?;
//! silu(&gpu, &mut y, &x)?;
//! # Ok(())
//! # }
//! ```
//!
//! [`nvrtc::compile_cubin`] compiles a source without a GPU, so a crate's CI can check that
//! its kernels compile. The code above compiles without the `cuda` feature too.
//!
//! ## Crate features
//!
//! - `cuda` (off by default): compile the backend. cudarc loads the CUDA libraries (driver,
//!   cuBLAS, NVRTC, NCCL) when the program runs, so the build needs neither a GPU nor a CUDA
//!   toolkit. Without the feature the same public items exist, [`is_available`] is `false` and
//!   [`CudaBackend::new`] returns an error saying that muon-cuda was built without the `cuda`
//!   feature, so code that names the backend, or launches its own kernels, compiles either
//!   way (only the items that hand out cudarc types need the feature).
//!
//! ## Safety
//!
//! Every `unsafe` block (library probes, NVRTC's CUBIN output, kernel launches, raw cuBLAS
//! calls, device byte views) lives in one private module, `raw`, each with a `// SAFETY:`
//! comment; the rest of the crate is `#![deny(unsafe_code)]`. The functions there check what
//! their `unsafe` blocks rely on and return an error, never panic, when a check fails; the one
//! public `unsafe fn` is [`CudaKernel::launch`], whose caller vouches for the kernel.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod kernels;
mod launch;
// Used by the `cuda` build; its unit tests run in every build.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod layout;

#[doc(hidden)]
#[cfg(feature = "cuda")]
pub mod bench;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod modules;
#[cfg(feature = "cuda")]
mod nccl;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
mod raw;

// The stand-in types of a build without `cuda`. Compiled, linted and unit-tested in every
// build, so CI (which builds with all features) still checks them.
#[cfg_attr(feature = "cuda", allow(dead_code))]
mod dummy;

/// cudarc, the version this crate is built on: for code that uses
/// [`CudaMatrix::as_cuda_slice`] or [`CudaKernel::function`] with cudarc directly.
#[cfg(feature = "cuda")]
pub use cudarc;
#[cfg(feature = "cuda")]
pub use device::{is_available, CudaBackend, CudaMatrix};
#[cfg(not(feature = "cuda"))]
pub use dummy::{is_available, nvrtc, CudaBackend, CudaKernel, CudaMatrix, NcclGroup, NcclId};
pub use launch::{
    grid_stride, KernelArg, KernelArgs, LaunchConfig, GRID_STRIDE_MAX_BLOCKS, GRID_STRIDE_THREADS,
};
#[cfg(feature = "cuda")]
pub use nccl::{NcclGroup, NcclId};
#[cfg(feature = "cuda")]
pub use raw::CudaKernel;

/// The error message of every constructor in a build without the `cuda` feature.
pub const NOT_COMPILED: &str = "muon-cuda was built without the `cuda` feature: rebuild with \
     `--features muon-cuda/cuda` (or `features = [\"cuda\"]` in Cargo.toml) to use the GPU backend";

/// The error message when the NVRTC library cannot be loaded.
pub const NO_NVRTC: &str = "the NVRTC library (libnvrtc.so.12) was not found on the dynamic \
     loader's path: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc-cu12` and add \
     its `nvidia/cuda_nvrtc/lib` directory to LD_LIBRARY_PATH (see muon-cuda's README)";

/// The error message when the NCCL library cannot be loaded (by [`NcclGroup`]).
pub const NO_NCCL: &str = "the NCCL library (libnccl.so) was not found on the dynamic loader's \
     path: `pip install nvidia-nccl-cu12`, link `libnccl.so` to the `libnccl.so.2` in its \
     `nvidia/nccl/lib` directory (cudarc looks for the unversioned name) and add that directory \
     to LD_LIBRARY_PATH, or install NCCL's development package";

/// The arithmetic of the GEMMs, muon-core's word shared by every backend. On this backend:
/// `F32` is `CUBLAS_COMPUTE_32F`; `Tf32` is `CUBLAS_COMPUTE_32F_FAST_TF32` (compute capability
/// 8.0 or newer); `Bf16` casts the operands on the device into preallocated scratch and runs
/// `cublasGemmStridedBatchedEx` on `CUDA_R_16BF` with `CUBLAS_COMPUTE_32F` (tensor-core speed
/// from compute capability 8.0).
pub use muon_core::Precision;
