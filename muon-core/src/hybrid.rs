//! The optimizer a trainer holds: Muon for hidden matrices, AdamW for everything else.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::{
    adamw_step, muon_step, AdamWConfig, Backend, Error, MuonConfig, NsWorkspace, Real, Result, Shape,
};

/// What a parameter is in the model; decides which optimizer steps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ParamRole {
    /// A weight matrix inside the network (attention, FFN, expert stack, router).
    Hidden,
    /// The token embedding table.
    Embedding,
    /// The output projection to the vocabulary.
    LmHead,
    /// A norm gain.
    Norm,
    /// A bias vector.
    Bias,
}

/// Which update rule steps a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum OptimizerKind {
    /// Muon (momentum + Newton-Schulz).
    Muon,
    /// AdamW.
    AdamW,
}

/// One parameter as the optimizer sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// A name for messages and saved state, e.g. `"blocks.1.moe.w_up"`.
    pub name: String,
    /// Its shape (`E x A x B` for a stack of experts).
    pub shape: Shape,
    /// What it is.
    pub role: ParamRole,
    /// Forces an optimizer regardless of the role.
    pub force: Option<OptimizerKind>,
}

impl ParamSpec {
    /// A parameter routed by its role.
    pub fn new(name: impl Into<String>, shape: Shape, role: ParamRole) -> Self {
        ParamSpec {
            name: name.into(),
            shape,
            role,
            force: None,
        }
    }

    /// The same parameter, always stepped by `kind`.
    pub fn with_optimizer(mut self, kind: OptimizerKind) -> Self {
        self.force = Some(kind);
        self
    }

    /// The routing rule (docs/DESIGN.md §1): hidden matrices go to Muon; embeddings, the LM
    /// head, norm gains, biases and any 1-D tensor go to AdamW; `force` overrides.
    pub fn optimizer(&self) -> OptimizerKind {
        match (self.force, self.role) {
            (Some(kind), _) => kind,
            (None, ParamRole::Hidden) if self.shape.is_matrix() => OptimizerKind::Muon,
            _ => OptimizerKind::AdamW,
        }
    }
}

/// The hybrid optimizer's configuration: Moonlight uses the same lr and weight decay for both.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct HybridConfig {
    /// For the matrices.
    pub muon: MuonConfig,
    /// For everything else.
    pub adamw: AdamWConfig,
}

/// A parameter's optimizer state: buffers on the backend.
enum Slot<B: Backend> {
    /// Momentum, and the index of the shared Newton-Schulz workspace for this shape.
    Muon { momentum: B::Matrix, workspace: usize },
    /// First and second moments, and the index of the shared direction scratch.
    AdamW {
        m: B::Matrix,
        v: B::Matrix,
        scratch: usize,
    },
}

/// What one [`HybridOptimizer::step`] measured, read in the step's one device-to-host copy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The step number just taken (from 1).
    pub step: u64,
    /// Global L2 norm of all gradients.
    pub grad_norm: f64,
}

/// Muon for hidden matrices and AdamW for the rest, stepping many parameters in one call.
///
/// All buffers (state, Newton-Schulz workspaces shared between same-shape parameters, the
/// small statistics vectors) are allocated in [`new`](Self::new); [`step`](Self::step)
/// allocates nothing and reads one small vector back from the backend.
pub struct HybridOptimizer<B: Backend> {
    config: HybridConfig,
    specs: Vec<ParamSpec>,
    slots: Vec<Slot<B>>,
    workspaces: Vec<NsWorkspace<B>>,
    scratch: Vec<B::Matrix>,
    step: u64,
    /// Per-parameter gradient norms (device) and their host copy.
    grad_norm: B::Matrix,
    grad_norm_host: Vec<B::Elem>,
    /// Per-parameter norms of the update direction (device), read on demand.
    update_norm: B::Matrix,
    update_norm_host: Vec<B::Elem>,
}

impl<B: Backend> HybridOptimizer<B> {
    /// Validates the configuration and the parameter list and allocates all state (zeros).
    pub fn new(backend: &B, specs: Vec<ParamSpec>, config: HybridConfig) -> Result<Self> {
        config.muon.validate()?;
        config.adamw.validate()?;
        if specs.is_empty() {
            return Err(Error::InvalidConfig("the parameter list is empty".into()));
        }
        let mut workspaces: Vec<NsWorkspace<B>> = Vec::new();
        let mut scratch: Vec<B::Matrix> = Vec::new();
        let mut slots = Vec::with_capacity(specs.len());
        for spec in &specs {
            if spec.shape.is_empty() {
                return Err(Error::EmptyMatrix {
                    what: alloc::format!("parameter `{}` ({})", spec.name, spec.shape),
                });
            }
            slots.push(match spec.optimizer() {
                OptimizerKind::Muon => {
                    let workspace = find_or_push(
                        &mut workspaces,
                        |w| w.shape() == spec.shape,
                        || NsWorkspace::new(backend, spec.shape),
                    )?;
                    Slot::Muon {
                        momentum: backend.zeros(spec.shape)?,
                        workspace,
                    }
                }
                OptimizerKind::AdamW => {
                    let index = find_or_push(
                        &mut scratch,
                        |s| B::shape(s) == spec.shape,
                        || backend.zeros(spec.shape),
                    )?;
                    Slot::AdamW {
                        m: backend.zeros(spec.shape)?,
                        v: backend.zeros(spec.shape)?,
                        scratch: index,
                    }
                }
            });
        }
        let n = specs.len();
        Ok(HybridOptimizer {
            config,
            slots,
            workspaces,
            scratch,
            step: 0,
            grad_norm: backend.zeros(Shape::vector(n))?,
            grad_norm_host: vec![B::Elem::ZERO; n],
            update_norm: backend.zeros(Shape::vector(n))?,
            update_norm_host: vec![B::Elem::ZERO; n],
            specs,
        })
    }

    /// The parameters, in the order `step` expects them.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The configuration.
    pub fn config(&self) -> &HybridConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Updates every parameter from its gradient with learning rate `lr`.
    ///
    /// `params[i]` and `grads[i]` belong to `specs()[i]`. Errors, with nothing changed: a
    /// count or shape that does not match, a non-finite `lr`, or a gradient with NaN or Inf.
    pub fn step(
        &mut self,
        backend: &B,
        params: &mut [B::Matrix],
        grads: &[B::Matrix],
        lr: f64,
    ) -> Result<StepReport> {
        check_step_inputs::<B>(&self.specs, params, grads, lr)?;
        // The step's one device-to-host read: every gradient's norm.
        for (i, grad) in grads.iter().enumerate() {
            backend.frobenius_norm(grad, &mut self.grad_norm, i)?;
        }
        backend.download(&self.grad_norm, &mut self.grad_norm_host)?;
        let mut total = 0.0;
        for (i, norm) in self.grad_norm_host.iter().enumerate() {
            if !norm.is_finite() {
                return Err(Error::NonFiniteGradient {
                    index: i,
                    name: self.specs[i].name.clone(),
                });
            }
            total += norm.to_f64() * norm.to_f64();
        }

        self.step += 1;
        for (i, (param, grad)) in params.iter_mut().zip(grads).enumerate() {
            match &mut self.slots[i] {
                Slot::Muon { momentum, workspace } => {
                    let ws = &mut self.workspaces[*workspace];
                    muon_step(backend, param, grad, momentum, ws, &self.config.muon, lr)?;
                    backend.frobenius_norm(&ws.x, &mut self.update_norm, i)?;
                }
                Slot::AdamW { m, v, scratch } => {
                    let dir = &mut self.scratch[*scratch];
                    adamw_step(backend, param, grad, m, v, dir, &self.config.adamw, self.step, lr)?;
                    backend.frobenius_norm(dir, &mut self.update_norm, i)?;
                }
            }
        }
        Ok(StepReport {
            step: self.step,
            grad_norm: libm::sqrt(total),
        })
    }

    /// The per-parameter gradient L2 norms of the last step (host values, no device work).
    pub fn grad_norms(&self) -> impl Iterator<Item = f64> + '_ {
        self.grad_norm_host.iter().map(|s| s.to_f64())
    }

    /// The RMS of each parameter's last update, before the learning rate: `scale * RMS(O)`
    /// for Muon (about `rms` under `MatchAdamW { rms }`), `RMS(m_hat / (sqrt(v_hat) + eps))`
    /// for AdamW. Reads one small vector from the backend; call it when logging.
    pub fn update_rms(&mut self, backend: &B, out: &mut [f64]) -> Result<()> {
        let n = self.specs.len();
        if out.len() != n {
            return Err(Error::CountMismatch {
                what: "update RMS outputs",
                expected: n,
                found: out.len(),
            });
        }
        backend.download(&self.update_norm, &mut self.update_norm_host)?;
        for ((o, norm), spec) in out.iter_mut().zip(&self.update_norm_host).zip(&self.specs) {
            *o = update_rms(&self.config, spec, norm.to_f64());
        }
        Ok(())
    }

    /// A host copy of the whole optimizer state (step count, momenta, moments).
    pub fn export_state(&self, backend: &B) -> Result<OptimizerState<B::Elem>> {
        let mut params = Vec::with_capacity(self.specs.len());
        for (spec, slot) in self.specs.iter().zip(&self.slots) {
            let download = |m: &B::Matrix| -> Result<Vec<B::Elem>> {
                let mut host = vec![B::Elem::ZERO; spec.shape.len()];
                backend.download(m, &mut host)?;
                Ok(host)
            };
            let (kind, buffers) = match slot {
                Slot::Muon { momentum, .. } => (OptimizerKind::Muon, vec![download(momentum)?]),
                Slot::AdamW { m, v, .. } => (OptimizerKind::AdamW, vec![download(m)?, download(v)?]),
            };
            params.push(ParamState {
                name: spec.name.clone(),
                shape: spec.shape,
                kind,
                buffers,
            });
        }
        Ok(OptimizerState {
            step: self.step,
            params,
        })
    }

    /// Restores state saved by [`export_state`](Self::export_state) for the same parameter
    /// list. Checks everything before changing anything.
    pub fn import_state(&mut self, backend: &B, state: &OptimizerState<B::Elem>) -> Result<()> {
        check_state(&self.specs, state)?;
        for (slot, saved) in self.slots.iter_mut().zip(&state.params) {
            match slot {
                Slot::Muon { momentum, .. } => backend.upload(momentum, &saved.buffers[0])?,
                Slot::AdamW { m, v, .. } => {
                    backend.upload(m, &saved.buffers[0])?;
                    backend.upload(v, &saved.buffers[1])?;
                }
            }
        }
        self.step = state.step;
        Ok(())
    }
}

/// The index of the first item of `items` that `fits`, pushing `make()` when none does: how
/// same-shape parameters come to share workspaces.
pub(crate) fn find_or_push<T>(
    items: &mut Vec<T>,
    fits: impl Fn(&T) -> bool,
    make: impl FnOnce() -> Result<T>,
) -> Result<usize> {
    if let Some(i) = items.iter().position(fits) {
        return Ok(i);
    }
    items.push(make()?);
    Ok(items.len() - 1)
}

/// Checks the arguments of a step (shared by the single-rank and distributed optimizers).
pub(crate) fn check_step_inputs<B: Backend>(
    specs: &[ParamSpec],
    params: &[B::Matrix],
    grads: &[B::Matrix],
    lr: f64,
) -> Result<()> {
    let n = specs.len();
    for (what, found) in [("parameters", params.len()), ("gradients", grads.len())] {
        if found != n {
            return Err(Error::CountMismatch {
                what,
                expected: n,
                found,
            });
        }
    }
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::InvalidConfig(alloc::format!(
            "learning rate {lr} must be finite and >= 0"
        )));
    }
    for (spec, (p, g)) in specs.iter().zip(params.iter().zip(grads)) {
        for (kind, shape) in [("parameter", B::shape(p)), ("gradient of", B::shape(g))] {
            if shape != spec.shape {
                return Err(Error::ShapeMismatch {
                    what: alloc::format!("{kind} `{}`", spec.name),
                    expected: spec.shape,
                    found: shape,
                });
            }
        }
    }
    Ok(())
}

/// The RMS of a parameter's update before the learning rate, from the norm of its direction
/// (`O` for Muon, AdamW's direction).
pub(crate) fn update_rms(config: &HybridConfig, spec: &ParamSpec, direction_norm: f64) -> f64 {
    let scale = match spec.optimizer() {
        OptimizerKind::Muon => config.muon.scale(spec.shape),
        OptimizerKind::AdamW => 1.0,
    };
    scale * direction_norm / libm::sqrt(spec.shape.len() as f64)
}

/// Checks that saved state fits `specs` (names, shapes, optimizer kinds, buffer lengths).
pub(crate) fn check_state<T>(specs: &[ParamSpec], state: &OptimizerState<T>) -> Result<()> {
    let n = specs.len();
    if state.params.len() != n {
        return Err(Error::InvalidState(alloc::format!(
            "it holds {} parameters, the optimizer has {n}",
            state.params.len()
        )));
    }
    for (spec, saved) in specs.iter().zip(&state.params) {
        let expected_buffers = match spec.optimizer() {
            OptimizerKind::Muon => 1,
            OptimizerKind::AdamW => 2,
        };
        let problem = if saved.name != spec.name {
            Some(alloc::format!(
                "found `{}` where `{}` belongs",
                saved.name,
                spec.name
            ))
        } else if saved.shape != spec.shape {
            Some(alloc::format!(
                "`{}` has shape {}, expected {}",
                spec.name,
                saved.shape,
                spec.shape
            ))
        } else if saved.kind != spec.optimizer() || saved.buffers.len() != expected_buffers {
            Some(alloc::format!(
                "`{}` was saved for {:?}, is stepped by {:?}",
                spec.name,
                saved.kind,
                spec.optimizer()
            ))
        } else if saved.buffers.iter().any(|b| b.len() != spec.shape.len()) {
            Some(alloc::format!("`{}` has a buffer of the wrong length", spec.name))
        } else {
            None
        };
        if let Some(msg) = problem {
            return Err(Error::InvalidState(msg));
        }
    }
    Ok(())
}

/// A host copy of a [`HybridOptimizer`]'s state; serializes with the `serde` feature.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct OptimizerState<T> {
    /// Steps taken.
    pub step: u64,
    /// One entry per parameter, in the optimizer's order.
    pub params: Vec<ParamState<T>>,
}

/// One parameter's saved state.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ParamState<T> {
    /// The parameter's name.
    pub name: String,
    /// Its shape.
    pub shape: Shape,
    /// Which optimizer the buffers belong to.
    pub kind: OptimizerKind,
    /// Muon: `[momentum]`; AdamW: `[m, v]`. Row-major, `shape.len()` each.
    pub buffers: Vec<Vec<T>>,
}
