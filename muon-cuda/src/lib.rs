//! # muon-cuda
//!
//! The GPU backend of muon-rs: [`CudaBackend`] implements [`muon_core::Backend`] for `f32`
//! matrices in device memory, on [cudarc](https://docs.rs/cudarc) 0.19.
//!
//! - GEMMs go to cuBLAS (strided-batched for stacks of experts) in a chosen [`Precision`]:
//!   `F32`, `Tf32` (tensor cores, 10-bit mantissa inputs, f32 accumulation) or `Bf16`
//!   (operands cast to bf16 in preallocated scratch, `cublasGemmStridedBatchedEx` with
//!   `CUBLAS_COMPUTE_32F`). Momentum, weights and optimizer state always stay `f32`; only the
//!   Newton-Schulz products see the lower precision (SPEC section 2 allows it).
//! - Everything else is a fused kernel compiled once per process with NVRTC to a CUBIN for the
//!   device's architecture ([`kernels`]):
//!   momentum + Nesterov, scale + weight decay + update, `axpby`, the AdamW direction, a
//!   sum-of-squares reduction that writes a device slot, and the per-matrix Frobenius
//!   normalization (reduce, then scale, on the device).
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
//! ## Crate features
//!
//! - `cuda` (off by default): compile the backend. cudarc loads the CUDA libraries (driver,
//!   cuBLAS, NVRTC, NCCL) when the program runs, so the build needs neither a GPU nor a CUDA
//!   toolkit. Without the feature the same public types exist, [`is_available`] is `false` and
//!   [`CudaBackend::new`] returns an error saying that muon-cuda was built without the `cuda`
//!   feature, so code that names the backend compiles either way.
//!
//! ## Safety
//!
//! Every `unsafe` block (kernel launches and raw cuBLAS calls) lives in one private module,
//! each with a `// SAFETY:` comment; the rest of the crate is `#![deny(unsafe_code)]`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod kernels;
// Used by the `cuda` build; its unit tests run in every build.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod layout;

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod ffi;
#[cfg(feature = "cuda")]
mod nccl;

// The stand-in types of a build without `cuda`. Compiled, linted and unit-tested in every
// build, so CI (which builds with all features) still checks them.
#[cfg_attr(feature = "cuda", allow(dead_code))]
mod dummy;

#[cfg(feature = "cuda")]
pub use device::{is_available, CudaBackend, CudaMatrix};
#[cfg(not(feature = "cuda"))]
pub use dummy::{is_available, CudaBackend, CudaMatrix, NcclGroup, NcclId};
#[cfg(feature = "cuda")]
pub use nccl::{NcclGroup, NcclId};

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
