//! Every `unsafe` block of the crate, each with a `// SAFETY:` comment: the library probes,
//! NVRTC's CUBIN output, kernel launches, raw cuBLAS calls and device byte views. (NCCL goes
//! through cudarc's safe API, in `nccl.rs`.)
//!
//! The contract is the same for every function here: a safe function checks what its
//! `unsafe` block relies on (buffer lengths, index ranges, integer ranges, which kernel it was
//! handed) and returns an [`Error`](muon_core::Error) naming what is wrong instead of
//! launching, so no input, however wrong, makes it panic or touch memory out of bounds. The
//! one `unsafe fn`, [`CudaKernel::launch`], is the launch of a kernel the crate cannot see
//! into: its caller vouches for the argument list, as its documentation spells out.
//!
//! All buffers passed here belong to the backend's single stream (the context's event tracking
//! is off, see [`disable_event_tracking`]), so work on them is ordered by the stream alone.
#![allow(unsafe_code)]

mod bytes;
mod cublas;
mod launch;
mod nvrtc;
pub(crate) mod ops;
mod probe;

pub(crate) use bytes::{bytes, bytes_mut};
pub(crate) use cublas::{gemm, GemmInput};
pub(crate) use launch::disable_event_tracking;
pub use launch::CudaKernel;
pub(crate) use nvrtc::cubin;
pub(crate) use probe::{
    cublas_library_present, driver_library_present, nccl_library_present, nvrtc_library_present,
};
