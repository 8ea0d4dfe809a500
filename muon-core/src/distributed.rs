//! Distributed Muon: the Moonlight report's ZeRO-1 scheme (docs/DESIGN.md §3).
//!
//! `world` data-parallel ranks each hold the whole model and compute whole gradients on their
//! own batch, but each keeps only a `1/world` shard of the optimizer state. For every
//! parameter, a step:
//!
//! 1. reduce-scatters the gradients: each rank gets the mean over ranks for its shard;
//! 2. updates the local shard of the state (Muon's momentum and `N_t`, AdamW's moments);
//! 3. Muon only: all-gathers the shards of `N_t` into the whole matrix (in f32, or rounded to
//!    bf16 with [`DistributedOptimizer::with_bf16_gather`]);
//! 4. Muon only: runs Newton-Schulz on the whole matrix, on every rank, or on one owner rank
//!    per matrix which then broadcasts the result
//!    ([`DistributedOptimizer::with_round_robin_newton_schulz`]);
//! 5. applies the local slice of the update to the local slice of the parameter;
//! 6. all-gathers the parameter.
//!
//! The result is a single-rank [`HybridOptimizer`](crate::HybridOptimizer) step on the mean
//! gradient, up to the rounding of the mean. Muon keeps one state buffer (the momentum) where
//! AdamW keeps two, so its state per rank is half of AdamW's; it communicates `N_t` on top of
//! AdamW's gradient and parameter traffic.
//!
//! A shard is a contiguous range of the flattened (row-major) stack, see [`shard_range`]. All
//! ranks hold shard buffers of the same length, [`shard_capacity`]: collectives like NCCL's
//! want equal counts, and the last ranks' buffers end in zeros.

use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use crate::hybrid::{check_state, check_step_inputs, find_or_push, update_rms};
use crate::{
    newton_schulz, Backend, Error, HybridConfig, NsWorkspace, OptimizerKind, OptimizerState, ParamSpec,
    ParamState, Real, Result, Shape, StepReport,
};

/// The length of every rank's shard buffer for a tensor of `len` elements: `ceil(len / world)`.
pub fn shard_capacity(len: usize, world: usize) -> usize {
    len.div_ceil(world.max(1))
}

/// The elements of a `len`-element tensor that rank `rank` of `world` owns: a contiguous
/// range of `shard_capacity(len, world)` elements, cut short (possibly to nothing) at the end.
pub fn shard_range(len: usize, world: usize, rank: usize) -> Range<usize> {
    let cap = shard_capacity(len, world);
    let start = (rank * cap).min(len);
    start..(start + cap).min(len)
}

/// The communication Distributed Muon needs among the ranks of a data-parallel group.
///
/// `full` tensors have the same shape on every rank; `shard` buffers are vectors of
/// [`shard_capacity`]`(full.len(), world)` elements, of which this rank's
/// [`shard_range`] fills the front and zeros the rest. Every rank must call the same
/// operations in the same order (they are collectives); work is ordered like the backend's.
pub trait Collective<B: Backend> {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// `shard = mean over ranks of full[shard_range(rank)]`.
    fn reduce_scatter_mean(&self, backend: &B, full: &B::Matrix, shard: &mut B::Matrix) -> Result<()>;

    /// `full[shard_range(r)] = shard of rank r`, for every rank `r`.
    fn all_gather(&self, backend: &B, shard: &B::Matrix, full: &mut B::Matrix) -> Result<()>;

    /// `shard = full[shard_range(rank)]`, on this rank alone (no communication).
    fn copy_shard(&self, backend: &B, full: &B::Matrix, shard: &mut B::Matrix) -> Result<()>;

    /// `full = root's full` on every rank: how the owner of a matrix hands out its
    /// Newton-Schulz result under [`DistributedOptimizer::with_round_robin_newton_schulz`].
    fn broadcast(&self, backend: &B, root: usize, full: &mut B::Matrix) -> Result<()>;

    /// [`all_gather`](Self::all_gather) that may round the values to bf16 on the way, halving
    /// f32's traffic: for Muon's `N_t`, which Newton-Schulz normalizes and tolerates (the
    /// report allows it, docs/DESIGN.md §3). The default gathers exactly, which is always allowed.
    fn all_gather_bf16(&self, backend: &B, shard: &B::Matrix, full: &mut B::Matrix) -> Result<()> {
        self.all_gather(backend, shard, full)
    }
}

/// `x` rounded to the nearest bf16 (8 significant bits, ties to even), as an `f32`: what a
/// bf16 wire format keeps. NaN stays NaN; values beyond bf16's range become infinite.
pub fn round_to_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// A parameter's shard of optimizer state, and the indices of the buffers it shares.
enum ShardSlot<B: Backend> {
    Muon {
        momentum: B::Matrix,
        workspace: usize,
        scratch: usize,
        /// Round robin only: who runs this matrix's Newton-Schulz, and where.
        round_robin: Option<RoundRobin<B>>,
    },
    AdamW {
        m: B::Matrix,
        v: B::Matrix,
        scratch: usize,
    },
}

/// A matrix whose Newton-Schulz runs on one rank and is broadcast.
struct RoundRobin<B: Backend> {
    owner: usize,
    /// `N_t`, then `O_t`: the whole matrix, held from the gather to the broadcast.
    result: B::Matrix,
}

/// Scratch for one shard length, shared by every parameter whose shards have that length.
struct ShardScratch<B: Backend> {
    /// `N_t`'s shard, then the update's (`O_t`'s, or AdamW's direction).
    update: B::Matrix,
    /// The parameter's slice while it is updated.
    param: B::Matrix,
}

/// Per-parameter norms: this rank's shard norms, every rank's, and their host copy.
struct RankSums<B: Backend> {
    local: B::Matrix,
    gathered: B::Matrix,
    host: Vec<B::Elem>,
}

impl<B: Backend> RankSums<B> {
    fn new(backend: &B, params: usize, world: usize) -> Result<Self> {
        Ok(RankSums {
            local: backend.zeros(Shape::vector(params))?,
            gathered: backend.zeros(Shape::vector(params * world))?,
            host: vec![B::Elem::ZERO; params * world],
        })
    }

    /// Gathers every rank's sums into the host copy.
    fn gather<C: Collective<B>>(&mut self, backend: &B, collective: &C) -> Result<()> {
        collective.all_gather(backend, &self.local, &mut self.gathered)?;
        backend.download(&self.gathered, &mut self.host)
    }

    /// Parameter `i`'s squared norm over ranks, from each rank's shard norm, summed in rank
    /// order so every rank gets the same bits.
    fn total_sq(&self, i: usize, params: usize) -> f64 {
        self.host
            .iter()
            .skip(i)
            .step_by(params)
            .map(|s| s.to_f64() * s.to_f64())
            .sum()
    }
}

/// [`HybridOptimizer`](crate::HybridOptimizer) over a data-parallel group: Muon for hidden
/// matrices, AdamW for the rest, with the state sharded across ranks (ZeRO-1).
///
/// Each rank builds one with the same parameter list and configuration and its own
/// [`Collective`], then calls [`step`](Self::step) with its parameters (the same on every
/// rank) and its own gradients. `step`, [`update_rms`](Self::update_rms),
/// [`export_state`](Self::export_state) and [`import_state`](Self::import_state) are
/// collectives: every rank calls them together. All buffers are allocated in `new`; a step
/// allocates nothing and reads one small vector back from the backend.
///
/// Checks of the arguments (counts, shapes, the learning rate) run before any communication,
/// so ranks given the same arguments fail together. A non-finite gradient on any rank makes
/// every rank refuse the step, with nothing changed.
///
/// # Example
///
/// A [`Collective`] for a group of one rank on host matrices (every shard is the whole
/// tensor), which is how an engine starts before it wires in its communication library;
/// muon-faer's `ThreadGroup` and muon-cuda's `NcclGroup` are real groups.
///
/// ```
/// use muon_core::{Collective, DistributedOptimizer, HostMatrix, HybridConfig, HybridOptimizer,
///                 ParamRole, ParamSpec, Portable, Result, Shape};
///
/// struct Alone;
/// impl Collective<Portable<f64>> for Alone {
///     fn rank(&self) -> usize { 0 }
///     fn world_size(&self) -> usize { 1 }
///     fn reduce_scatter_mean(&self, _: &Portable<f64>, full: &HostMatrix<f64>,
///                            shard: &mut HostMatrix<f64>) -> Result<()> {
///         shard.copy_from_host(full.as_slice())
///     }
///     fn all_gather(&self, _: &Portable<f64>, shard: &HostMatrix<f64>,
///                   full: &mut HostMatrix<f64>) -> Result<()> {
///         full.copy_from_host(shard.as_slice())
///     }
///     fn copy_shard(&self, _: &Portable<f64>, full: &HostMatrix<f64>,
///                   shard: &mut HostMatrix<f64>) -> Result<()> {
///         shard.copy_from_host(full.as_slice())
///     }
///     fn broadcast(&self, _: &Portable<f64>, _root: usize, _full: &mut HostMatrix<f64>) -> Result<()> {
///         Ok(())
///     }
/// }
///
/// # fn main() -> Result<()> {
/// let cpu = Portable::<f64>::new();
/// let specs = vec![ParamSpec::new("w", Shape::matrix(4, 6), ParamRole::Hidden),
///                  ParamSpec::new("gain", Shape::vector(6), ParamRole::Norm)];
/// let mut distributed = DistributedOptimizer::new(&cpu, Alone, specs.clone(), HybridConfig::default())?;
/// let mut single = HybridOptimizer::new(&cpu, specs.clone(), HybridConfig::default())?;
/// let grads: Vec<HostMatrix<f64>> = specs.iter().map(|s| {
///     HostMatrix::from_vec(s.shape, (0..s.shape.len()).map(|i| (i as f64).sin()).collect())
/// }).collect::<Result<_>>()?;
/// let mut a: Vec<_> = specs.iter().map(|s| HostMatrix::zeros(s.shape)).collect();
/// let mut b = a.clone();
/// distributed.step(&cpu, &mut a, &grads, 0.01)?;
/// single.step(&cpu, &mut b, &grads, 0.01)?;
/// assert_eq!(a, b); // one rank: the same step, to the bit
/// # Ok(())
/// # }
/// ```
pub struct DistributedOptimizer<B: Backend, C: Collective<B>> {
    collective: C,
    config: HybridConfig,
    specs: Vec<ParamSpec>,
    slots: Vec<ShardSlot<B>>,
    /// The mean gradient's shard, one per parameter: all are reduced before any state changes.
    grad_shards: Vec<B::Matrix>,
    workspaces: Vec<NsWorkspace<B>>,
    scratch: Vec<ShardScratch<B>>,
    step: u64,
    grad_norm: RankSums<B>,
    update_norm: RankSums<B>,
    /// Gather `N_t` with [`Collective::all_gather_bf16`].
    bf16_gather: bool,
}

impl<B: Backend, C: Collective<B>> DistributedOptimizer<B, C> {
    /// Validates the configuration, the parameter list and the group, and allocates this
    /// rank's state shards (zeros) and workspaces.
    pub fn new(backend: &B, collective: C, specs: Vec<ParamSpec>, config: HybridConfig) -> Result<Self> {
        config.muon.validate()?;
        config.adamw.validate()?;
        let world = collective.world_size();
        if world == 0 || collective.rank() >= world {
            return Err(Error::InvalidConfig(alloc::format!(
                "rank {} of a group of {world}",
                collective.rank()
            )));
        }
        if specs.is_empty() {
            return Err(Error::InvalidConfig("the parameter list is empty".into()));
        }
        let mut workspaces: Vec<NsWorkspace<B>> = Vec::new();
        let mut scratch: Vec<ShardScratch<B>> = Vec::new();
        let mut slots = Vec::with_capacity(specs.len());
        let mut grad_shards = Vec::with_capacity(specs.len());
        for spec in &specs {
            if spec.shape.is_empty() {
                return Err(Error::EmptyMatrix {
                    what: alloc::format!("parameter `{}` ({})", spec.name, spec.shape),
                });
            }
            let shard = Shape::vector(shard_capacity(spec.shape.len(), world));
            let scratch_index = find_or_push(
                &mut scratch,
                |s| B::shape(&s.update) == shard,
                || {
                    Ok(ShardScratch {
                        update: backend.zeros(shard)?,
                        param: backend.zeros(shard)?,
                    })
                },
            )?;
            grad_shards.push(backend.zeros(shard)?);
            slots.push(match spec.optimizer() {
                OptimizerKind::Muon => ShardSlot::Muon {
                    momentum: backend.zeros(shard)?,
                    workspace: find_or_push(
                        &mut workspaces,
                        |w| w.shape() == spec.shape,
                        || NsWorkspace::new(backend, spec.shape),
                    )?,
                    scratch: scratch_index,
                    round_robin: None,
                },
                OptimizerKind::AdamW => ShardSlot::AdamW {
                    m: backend.zeros(shard)?,
                    v: backend.zeros(shard)?,
                    scratch: scratch_index,
                },
            });
        }
        let n = specs.len();
        Ok(DistributedOptimizer {
            grad_norm: RankSums::new(backend, n, world)?,
            update_norm: RankSums::new(backend, n, world)?,
            collective,
            config,
            specs,
            slots,
            grad_shards,
            workspaces,
            scratch,
            step: 0,
            bf16_gather: false,
        })
    }

    /// Runs each matrix's Newton-Schulz on one rank, its owner, which broadcasts the result:
    /// each rank does about `1/world` of the Newton-Schulz work instead of all of it, the
    /// ranks at the same time, for one more tensor's traffic per Muon matrix and one more
    /// whole-matrix buffer per Muon parameter on every rank (to hold the results until they
    /// are broadcast). Owners are chosen greedily by flops (the largest matrix to the least
    /// loaded rank), the same on every rank. Off by default (every rank runs every
    /// Newton-Schulz); every rank must choose the same.
    pub fn with_round_robin_newton_schulz(mut self, backend: &B, on: bool) -> Result<Self> {
        let world = self.collective.world_size();
        let ns = &self.config.muon.newton_schulz;
        let mut muon: Vec<(usize, f64)> = (self.specs.iter().enumerate())
            .filter(|(_, s)| s.optimizer() == OptimizerKind::Muon)
            .map(|(i, s)| (i, ns.flops(s.shape)))
            .collect();
        // Largest first; ties by index, so every rank sorts the same way.
        muon.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut load = vec![0.0f64; world];
        for (i, flops) in muon {
            let ShardSlot::Muon { round_robin, .. } = &mut self.slots[i] else {
                continue;
            };
            *round_robin = None;
            if on {
                let owner = (0..world)
                    .min_by(|&a, &b| load[a].total_cmp(&load[b]))
                    .unwrap_or(0);
                load[owner] += flops;
                let result = backend.zeros(self.specs[i].shape)?;
                *round_robin = Some(RoundRobin { owner, result });
            }
        }
        Ok(self)
    }

    /// The share of all Muon matrices' Newton-Schulz flops this rank computes per step: 1
    /// when every rank runs every Newton-Schulz, about `1/world` with round-robin owners.
    pub fn newton_schulz_share(&self) -> f64 {
        let ns = &self.config.muon.newton_schulz;
        let (mut mine, mut all) = (0.0, 0.0);
        for (spec, slot) in self.specs.iter().zip(&self.slots) {
            if let ShardSlot::Muon { round_robin, .. } = slot {
                let flops = ns.flops(spec.shape);
                all += flops;
                if round_robin
                    .as_ref()
                    .is_none_or(|r| r.owner == self.collective.rank())
                {
                    mine += flops;
                }
            }
        }
        if all == 0.0 {
            0.0
        } else {
            mine / all
        }
    }

    /// Gathers Muon's `N_t` rounded to bf16 (when the collective supports it), as the report
    /// allows: a quarter less traffic per step than in f32, for Newton-Schulz inputs off by at
    /// most 2^-9 relative. Off by default. Every rank must choose the same.
    pub fn with_bf16_gather(mut self, on: bool) -> Self {
        self.bf16_gather = on;
        self
    }

    /// The parameters, in the order `step` expects them.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The configuration.
    pub fn config(&self) -> &HybridConfig {
        &self.config
    }

    /// This rank's communicator.
    pub fn collective(&self) -> &C {
        &self.collective
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Elements of optimizer state this rank holds (momenta, moments): about `1/world` of a
    /// single-rank optimizer's.
    pub fn state_len(&self) -> usize {
        self.slots
            .iter()
            .map(|slot| match slot {
                ShardSlot::Muon { momentum, .. } => B::shape(momentum).len(),
                ShardSlot::AdamW { m, v, .. } => B::shape(m).len() + B::shape(v).len(),
            })
            .sum()
    }

    /// One step of every parameter, from this rank's gradients, with learning rate `lr`; on
    /// return `params` hold the new values on every rank. A collective.
    ///
    /// The step uses the mean of the ranks' gradients: give each rank the gradient of its own
    /// batch's mean loss and the step equals a single-rank step on all the batches together.
    /// Errors, with nothing changed: a count or shape that does not match, a non-finite `lr`,
    /// or a mean gradient with NaN or Inf.
    pub fn step(
        &mut self,
        backend: &B,
        params: &mut [B::Matrix],
        grads: &[B::Matrix],
        lr: f64,
    ) -> Result<StepReport> {
        check_step_inputs::<B>(&self.specs, params, grads, lr)?;
        let c = &self.collective;
        // 1. The mean gradients' shards, and the one read to the host: their norms.
        for (i, (grad, shard)) in grads.iter().zip(&mut self.grad_shards).enumerate() {
            c.reduce_scatter_mean(backend, grad, shard)?;
            backend.frobenius_norm(shard, &mut self.grad_norm.local, i)?;
        }
        self.grad_norm.gather(backend, c)?;
        let n = self.specs.len();
        let mut total = 0.0;
        for i in 0..n {
            let sq = self.grad_norm.total_sq(i, n);
            if !sq.is_finite() {
                return Err(Error::NonFiniteGradient {
                    index: i,
                    name: self.specs[i].name.clone(),
                });
            }
            total += sq;
        }

        self.step += 1;
        let e = |v: f64| B::Elem::from_f64(v);
        let (muon, adamw) = (&self.config.muon, &self.config.adamw);
        let adamw_coefficients = adamw.coefficients(self.step);
        let rank = c.rank();
        // The update's shard lands in the parameter's scratch `update`; this applies it (steps
        // 5-6): update this rank's slice of the parameter, then share it.
        let update_norm = &mut self.update_norm.local;
        let mut apply = |s: &mut ShardScratch<B>, param: &mut B::Matrix, (step, decay): (f64, f64), i| {
            backend.frobenius_norm(&s.update, update_norm, i)?;
            c.copy_shard(backend, param, &mut s.param)?;
            backend.apply_update(&mut s.param, &s.update, e(step), e(decay))?;
            c.all_gather(backend, &s.param, param)
        };
        let gather = |shard: &B::Matrix, full: &mut B::Matrix| match self.bf16_gather {
            true => c.all_gather_bf16(backend, shard, full),
            false => c.all_gather(backend, shard, full),
        };
        // Steps 2-6 for AdamW and for matrices whose Newton-Schulz runs on every rank; for
        // round-robin matrices, steps 2-3 into their result buffer.
        for (i, (param, spec)) in params.iter_mut().zip(&self.specs).enumerate() {
            let grad = &self.grad_shards[i];
            match &mut self.slots[i] {
                ShardSlot::Muon {
                    momentum,
                    workspace,
                    scratch,
                    round_robin,
                } => {
                    let s = &mut self.scratch[*scratch];
                    let (mu, nesterov) = (e(muon.momentum), muon.nesterov);
                    backend.momentum_nesterov(momentum, grad, mu, nesterov, &mut s.update)?;
                    if let Some(r) = round_robin {
                        gather(&s.update, &mut r.result)?;
                        continue;
                    }
                    let ws = &mut self.workspaces[*workspace];
                    gather(&s.update, &mut ws.x)?;
                    newton_schulz(backend, &muon.newton_schulz, ws)?;
                    c.copy_shard(backend, &ws.x, &mut s.update)?;
                    apply(s, param, muon.rates(lr, spec.shape), i)?;
                }
                ShardSlot::AdamW { m, v, scratch } => {
                    let s = &mut self.scratch[*scratch];
                    backend.adamw_direction(&mut s.update, grad, m, v, &adamw_coefficients)?;
                    apply(s, param, (lr, lr * adamw.weight_decay), i)?;
                }
            }
        }
        // Round robin: every rank runs its own matrices' Newton-Schulz, all ranks at once (the
        // workspace's buffer is swapped with the result's, not copied) ...
        for slot in &mut self.slots {
            if let ShardSlot::Muon {
                workspace,
                round_robin: Some(r),
                ..
            } = slot
            {
                if r.owner == rank {
                    let ws = &mut self.workspaces[*workspace];
                    core::mem::swap(&mut ws.x, &mut r.result);
                    let run = newton_schulz(backend, &muon.newton_schulz, ws);
                    core::mem::swap(&mut ws.x, &mut r.result);
                    run?;
                }
            }
        }
        // ... then each owner broadcasts its results, and every rank applies its slices.
        for (i, (param, spec)) in params.iter_mut().zip(&self.specs).enumerate() {
            if let ShardSlot::Muon {
                scratch,
                round_robin: Some(r),
                ..
            } = &mut self.slots[i]
            {
                let s = &mut self.scratch[*scratch];
                c.broadcast(backend, r.owner, &mut r.result)?;
                c.copy_shard(backend, &r.result, &mut s.update)?;
                apply(s, param, muon.rates(lr, spec.shape), i)?;
            }
        }
        Ok(StepReport {
            step: self.step,
            grad_norm: libm::sqrt(total),
        })
    }

    /// The per-parameter L2 norms of the last step's mean gradients (host values).
    pub fn grad_norms(&self) -> impl Iterator<Item = f64> + '_ {
        let n = self.specs.len();
        (0..n).map(move |i| libm::sqrt(self.grad_norm.total_sq(i, n)))
    }

    /// The RMS of each parameter's last update before the learning rate, as
    /// [`HybridOptimizer::update_rms`](crate::HybridOptimizer::update_rms) gives it. A
    /// collective (it gathers every rank's shard sums).
    pub fn update_rms(&mut self, backend: &B, out: &mut [f64]) -> Result<()> {
        let n = self.specs.len();
        if out.len() != n {
            return Err(Error::CountMismatch {
                what: "update RMS outputs",
                expected: n,
                found: out.len(),
            });
        }
        self.update_norm.gather(backend, &self.collective)?;
        for (i, (o, spec)) in out.iter_mut().zip(&self.specs).enumerate() {
            *o = update_rms(&self.config, spec, libm::sqrt(self.update_norm.total_sq(i, n)));
        }
        Ok(())
    }

    /// The whole optimizer state, gathered from every rank: the same host copy a single-rank
    /// [`HybridOptimizer`](crate::HybridOptimizer) exports, so a run can resume on any number
    /// of ranks. A collective; allocates.
    pub fn export_state(&self, backend: &B) -> Result<OptimizerState<B::Elem>> {
        let mut params = Vec::with_capacity(self.specs.len());
        for (spec, slot) in self.specs.iter().zip(&self.slots) {
            let mut full = backend.zeros(spec.shape)?;
            let mut gather = |shard: &B::Matrix| -> Result<Vec<B::Elem>> {
                self.collective.all_gather(backend, shard, &mut full)?;
                let mut host = vec![B::Elem::ZERO; spec.shape.len()];
                backend.download(&full, &mut host)?;
                Ok(host)
            };
            let (kind, buffers) = match slot {
                ShardSlot::Muon { momentum, .. } => (OptimizerKind::Muon, vec![gather(momentum)?]),
                ShardSlot::AdamW { m, v, .. } => (OptimizerKind::AdamW, vec![gather(m)?, gather(v)?]),
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

    /// Restores whole state (from [`export_state`](Self::export_state) or a single-rank
    /// optimizer's) for the same parameter list; each rank keeps its shards. Checks
    /// everything before changing anything. A collective in name only: it communicates
    /// nothing, but every rank must load the same state.
    pub fn import_state(&mut self, backend: &B, state: &OptimizerState<B::Elem>) -> Result<()> {
        check_state(&self.specs, state)?;
        for ((spec, slot), saved) in self.specs.iter().zip(&mut self.slots).zip(&state.params) {
            let mut full = backend.zeros(spec.shape)?;
            let mut scatter = |host: &[B::Elem], shard: &mut B::Matrix| -> Result<()> {
                backend.upload(&mut full, host)?;
                self.collective.copy_shard(backend, &full, shard)
            };
            match slot {
                ShardSlot::Muon { momentum, .. } => scatter(&saved.buffers[0], momentum)?,
                ShardSlot::AdamW { m, v, .. } => {
                    scatter(&saved.buffers[0], m)?;
                    scatter(&saved.buffers[1], v)?;
                }
            }
        }
        self.step = state.step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_keeps_8_significant_bits_ties_to_even() {
        assert_eq!(round_to_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(round_to_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0 + 1e-6), 1.0 + 1.0 / 128.0);
        // Rounding is symmetric in the sign.
        assert_eq!(round_to_bf16(-1.0 - 3.0 / 256.0), -1.0 - 1.0 / 64.0);
        assert!(round_to_bf16(f32::NAN).is_nan());
        assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
        for i in 0..10_000 {
            let x = (i as f32 * 0.7311).sin() * 10f32.powi(i % 7 - 3);
            let r = round_to_bf16(x);
            assert_eq!(r.to_bits() & 0xffff, 0, "{x}: low bits left");
            // The two bf16 values around x (truncation, and one bf16 ulp away from zero): r
            // is the nearer one, in exact f64 distances.
            let below = f32::from_bits(x.to_bits() & 0xffff_0000);
            let above = f32::from_bits((x.to_bits() & 0xffff_0000) + 0x1_0000);
            let (d_below, d_above) = ((x as f64 - below as f64).abs(), (x as f64 - above as f64).abs());
            if d_below != d_above {
                let nearest = if d_below < d_above { below } else { above };
                assert_eq!(r, nearest, "{x}: rounded to {r}, nearest is {nearest}");
            }
        }
    }

    #[test]
    fn shards_tile_the_tensor_in_rank_order() {
        for len in 0..40 {
            for world in 1..7 {
                let cap = shard_capacity(len, world);
                let mut next = 0;
                for rank in 0..world {
                    let range = shard_range(len, world, rank);
                    assert_eq!(range.start, next, "len {len}, world {world}, rank {rank}");
                    assert!(range.len() <= cap);
                    next = range.end;
                }
                assert_eq!(
                    next, len,
                    "len {len}, world {world}: shards do not cover the tensor"
                );
                assert!(cap * world >= len && cap * world < len + world);
            }
        }
    }
}
