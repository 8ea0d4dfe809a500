//! # muon-core
//!
//! The Muon optimizer as the Moonlight report ("Muon is Scalable for LLM Training", 2025)
//! scales it up: momentum, Nesterov, Newton-Schulz orthogonalization with coefficient
//! schedules, update-scale rules and decoupled weight decay; AdamW for the parameters Muon is
//! not for; learning-rate schedules. Written once over a small [`Backend`] trait, `no_std`.
//!
//! - [`Backend`]: the matrix trait a backend implements (allocation, GEMM with transpose
//!   flags and alpha/beta, `axpby`, two device-side reductions, the AdamW elementwise update).
//!   Its matrices may live on a GPU: the generic code never touches an element, and a whole
//!   optimizer step reads one small vector back to the host.
//! - [`newton_schulz`], [`muon_step`], [`adamw_step`]: pure functions of the math.
//! - [`HybridOptimizer`]: routes each parameter by its [`ParamRole`] to Muon or AdamW and
//!   steps them all in one call, allocating nothing after construction.
//! - [`DistributedOptimizer`]: the same over a data-parallel group, with the state sharded
//!   across ranks (the report's ZeRO-1 Distributed Muon) through a small [`Collective`] trait.
//! - [`Portable`]: a plain-slice backend in this crate, correct but not fast. Fast backends:
//!   `muon-faer` (CPU) and `muon-cuda` (GPU).
//!
//! ## Crate features
//!
//! - `serde`: `Serialize`/`Deserialize` for configs, shapes and [`OptimizerState`] (no_std).
//! - `nalgebra`: the [`Backend`] trait on nalgebra matrices, and f64 SVD oracles
//!   ([`nalgebra_backend::polar_factor`]) that tests use.
//!
//! ## Embedding the core in an engine
//!
//! An engine implements [`Backend`] for its own matrix type, then hands its parameters and
//! gradients to a [`HybridOptimizer`]. Here an engine whose tensors are plain `Vec<f64>`
//! (one matrix each, no stacks) takes one Muon step:
//!
//! ```
//! use muon_core::{AdamWCoefficients, Backend, HybridConfig, HybridOptimizer, ParamRole,
//!                 ParamSpec, Result, Shape, Transpose};
//!
//! /// The engine's tensor: a row-major matrix.
//! struct Tensor { rows: usize, cols: usize, data: Vec<f64> }
//! /// The engine's compute handle.
//! struct Engine;
//!
//! impl Backend for Engine {
//!     type Elem = f64;
//!     type Matrix = Tensor;
//!     fn shape(m: &Tensor) -> Shape { Shape::matrix(m.rows, m.cols) }
//!     fn zeros(&self, s: Shape) -> Result<Tensor> {
//!         assert_eq!(s.batch, 1, "this engine has no stacked tensors");
//!         Ok(Tensor { rows: s.rows, cols: s.cols, data: vec![0.0; s.len()] })
//!     }
//!     fn upload(&self, dst: &mut Tensor, src: &[f64]) -> Result<()> {
//!         Ok(dst.data.copy_from_slice(src))
//!     }
//!     fn download(&self, src: &Tensor, dst: &mut [f64]) -> Result<()> {
//!         Ok(dst.copy_from_slice(&src.data))
//!     }
//!     fn gemm(&self, c: &mut Tensor, alpha: f64, a: &Tensor, ta: Transpose,
//!             b: &Tensor, tb: Transpose, beta: f64) -> Result<()> {
//!         let (m, n, k) = muon_core::gemm_dims(Self::shape(c), Self::shape(a), ta,
//!                                              Self::shape(b), tb)?;
//!         let at = |x: &Tensor, t, i, j| if t == Transpose::No { x.data[i * x.cols + j] }
//!                                        else { x.data[j * x.cols + i] };
//!         for i in 0..m {
//!             for j in 0..n {
//!                 let dot: f64 = (0..k).map(|p| at(a, ta, i, p) * at(b, tb, p, j)).sum();
//!                 let old = if beta == 0.0 { 0.0 } else { beta * c.data[i * n + j] };
//!                 c.data[i * n + j] = alpha * dot + old;
//!             }
//!         }
//!         Ok(())
//!     }
//!     fn axpby(&self, d: &mut Tensor, alpha: f64, x: &Tensor, beta: f64) -> Result<()> {
//!         for (d, x) in d.data.iter_mut().zip(&x.data) {
//!             *d = alpha * x + if beta == 0.0 { 0.0 } else { beta * *d };
//!         }
//!         Ok(())
//!     }
//!     fn frobenius_norm(&self, x: &Tensor, out: &mut Tensor, i: usize) -> Result<()> {
//!         out.data[i] = x.data.iter().map(|v| v * v).sum::<f64>().sqrt();
//!         Ok(())
//!     }
//!     fn normalize_frobenius(&self, x: &mut Tensor, scale: f64, eps: f64) -> Result<()> {
//!         let norm = x.data.iter().map(|v| v * v).sum::<f64>().sqrt();
//!         x.data.iter_mut().for_each(|v| *v /= scale * norm + eps);
//!         Ok(())
//!     }
//!     fn adamw_direction(&self, dir: &mut Tensor, g: &Tensor, m: &mut Tensor,
//!                        v: &mut Tensor, c: &AdamWCoefficients<f64>) -> Result<()> {
//!         for i in 0..g.data.len() {
//!             m.data[i] = c.beta1 * m.data[i] + (1.0 - c.beta1) * g.data[i];
//!             v.data[i] = c.beta2 * v.data[i] + (1.0 - c.beta2) * g.data[i] * g.data[i];
//!             dir.data[i] = (m.data[i] / c.bias_correction1)
//!                 / ((v.data[i] / c.bias_correction2).sqrt() + c.eps);
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> Result<()> {
//! let engine = Engine;
//! // A 4x8 hidden matrix (Muon) and a bias (AdamW).
//! let specs = vec![
//!     ParamSpec::new("w", Shape::matrix(4, 8), ParamRole::Hidden),
//!     ParamSpec::new("b", Shape::vector(8), ParamRole::Bias),
//! ];
//! let mut opt = HybridOptimizer::new(&engine, specs, HybridConfig::default())?;
//! let mut params = vec![
//!     Tensor { rows: 4, cols: 8, data: vec![0.0; 32] },
//!     Tensor { rows: 1, cols: 8, data: vec![0.0; 8] },
//! ];
//! let grads = vec![
//!     Tensor { rows: 4, cols: 8, data: (0..32).map(|i| ((i * 7 % 11) as f64 - 5.0) / 5.0).collect() },
//!     Tensor { rows: 1, cols: 8, data: vec![0.5; 8] },
//! ];
//! let report = opt.step(&engine, &mut params, &grads, 0.01)?;
//! assert_eq!(report.step, 1);
//!
//! // Moonlight's update scale makes Muon's update RMS about 0.2, like AdamW's.
//! let mut rms = [0.0; 2];
//! opt.update_rms(&engine, &mut rms)?;
//! assert!((rms[0] - 0.2).abs() < 0.05, "muon update rms {}", rms[0]);
//! // AdamW's first step moves every coordinate by lr * sign(g): RMS 1 before lr.
//! assert!((rms[1] - 1.0).abs() < 1e-6);
//! # Ok(())
//! # }
//! ```
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

mod adamw;
mod backend;
mod diagnostics;
mod distributed;
mod error;
mod hybrid;
mod muon;
mod newton_schulz;
mod portable;
mod precision;
mod scalar;
mod schedule;
mod shape;

#[cfg(feature = "nalgebra")]
pub mod nalgebra_backend;

pub use adamw::{adamw_step, AdamWConfig};
pub use backend::{AdamWCoefficients, Backend};
pub use diagnostics::svd_entropy;
pub use distributed::{round_to_bf16, shard_capacity, shard_range, Collective, DistributedOptimizer};
pub use error::{Error, Result};
pub use hybrid::{
    HybridConfig, HybridOptimizer, OptimizerKind, OptimizerState, ParamRole, ParamSpec, ParamState,
    StepReport,
};
pub use muon::{muon_step, MuonConfig, UpdateScale};
pub use newton_schulz::{
    newton_schulz, newton_schulz_folded, newton_schulz_generic, NewtonSchulz, NsBuffers, NsWorkspace, DION,
    POLAR_EXPRESS, QUINTIC,
};
pub use portable::{HostMatrix, Portable};
pub use precision::Precision;
pub use scalar::Real;
pub use schedule::LrSchedule;
pub use shape::{check_shape, check_slot, gemm_dims, Shape, Transpose};
