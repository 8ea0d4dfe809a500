//! [`ThreadGroup`]: the ranks of a data-parallel group as threads of one process, for
//! [`DistributedOptimizer`](muon_core::DistributedOptimizer) on host matrices.
//!
//! Each collective is two phases around a barrier: every rank posts its data into its own
//! slot, waits for the others, reads what it needs from every slot, and waits again so no slot
//! is overwritten while read. Sums run in rank order, so every rank computes the same bits.
//! Slots are `Vec`s that grow to the largest tensor once and are reused: after the first step
//! nothing allocates. A rank whose handle is dropped (its thread ended or panicked) makes the
//! others' collectives fail with [`Error::Collective`] instead of waiting forever.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use muon_core::{
    round_to_bf16, shard_capacity, shard_range, Backend, Collective, Error, HostMatrix, Real, Result,
};

/// One rank's handle on a group of threads; [`ThreadGroup::new`] makes one per rank.
///
/// It implements [`Collective`] for every backend on [`HostMatrix`] (this crate's
/// [`Faer`](crate::Faer), muon-core's `Portable`). Move each handle to its rank's thread.
///
/// ```
/// use muon_core::{DistributedOptimizer, HostMatrix, HybridConfig, ParamRole, ParamSpec, Shape};
/// use muon_faer::{Faer, ThreadGroup};
///
/// let specs = vec![ParamSpec::new("w", Shape::matrix(8, 12), ParamRole::Hidden)];
/// let ranks: Vec<_> = ThreadGroup::<f32>::new(2)
///     .into_iter()
///     .map(|group| {
///         let specs = specs.clone();
///         std::thread::spawn(move || -> muon_core::Result<Vec<f32>> {
///             let cpu = Faer::<f32>::with_threads(1);
///             let rank = group.rank() as f32;
///             let mut opt = DistributedOptimizer::new(&cpu, group, specs, HybridConfig::default())?;
///             let mut params = vec![HostMatrix::zeros(Shape::matrix(8, 12))];
///             // Each rank's own gradient; the step uses their mean.
///             let grad: Vec<f32> = (0..96).map(|i| (i % 7) as f32 - 3.0 + rank).collect();
///             let grads = vec![HostMatrix::from_vec(Shape::matrix(8, 12), grad)?];
///             opt.step(&cpu, &mut params, &grads, 0.01)?;
///             Ok(params[0].as_slice().to_vec())
///         })
///     })
///     .collect();
/// let results: Vec<Vec<f32>> = ranks.into_iter().map(|r| r.join().unwrap().unwrap()).collect();
/// // Every rank ends with the same parameters.
/// assert_eq!(results[0], results[1]);
/// ```
pub struct ThreadGroup<T> {
    shared: Arc<Shared<T>>,
    rank: usize,
}

struct Shared<T> {
    world: usize,
    barrier: Mutex<BarrierState>,
    arrived_all: Condvar,
    /// What each rank posted for the collective in progress.
    slots: Vec<RwLock<Vec<T>>>,
    /// Bytes each rank passed to the group, per kind of collective.
    traffic: [AtomicU64; 3],
}

/// Indices of `Shared::traffic`, one per kind of collective.
const REDUCE_SCATTER: usize = 0;
const ALL_GATHER: usize = 1;
const BROADCAST: usize = 2;

struct BarrierState {
    arrived: usize,
    generation: u64,
    /// Ranks whose handle is gone.
    departed: usize,
}

/// Bytes of full tensors that went through the group's collectives, per rank: what
/// [`ThreadGroup::traffic`] returns. In a ring, a rank sends `(world - 1) / world` of each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Reduce-scatters (the gradients).
    pub reduce_scatter: u64,
    /// All-gathers (Muon's `N_t`, 2 bytes an element in bf16; the parameters; the small
    /// vectors of norms).
    pub all_gather: u64,
    /// Broadcasts (round-robin Newton-Schulz results).
    pub broadcast: u64,
}

impl<T: Real> ThreadGroup<T> {
    /// A group of `world` ranks: one handle per rank, in rank order.
    ///
    /// # Panics
    /// When `world` is 0.
    pub fn new(world: usize) -> Vec<ThreadGroup<T>> {
        assert!(world > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            world,
            barrier: Mutex::new(BarrierState {
                arrived: 0,
                generation: 0,
                departed: 0,
            }),
            arrived_all: Condvar::new(),
            slots: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
            traffic: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
        });
        (0..world)
            .map(|rank| ThreadGroup {
                shared: Arc::clone(&shared),
                rank,
            })
            .collect()
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// What the whole group has moved so far, per rank (every rank passes the same).
    pub fn traffic(&self) -> Traffic {
        let world = self.shared.world as u64;
        let per_rank = |kind: usize| self.shared.traffic[kind].load(Ordering::Relaxed) / world;
        Traffic {
            reduce_scatter: per_rank(REDUCE_SCATTER),
            all_gather: per_rank(ALL_GATHER),
            broadcast: per_rank(BROADCAST),
        }
    }

    /// Waits until every rank has arrived; fails when a rank has left the group.
    fn barrier(&self) -> Result<()> {
        let left = || Error::Collective(format!("rank {}: another rank left the group", self.rank));
        let shared = &self.shared;
        let mut state = shared.barrier.lock().map_err(|_| left())?;
        if state.departed > 0 {
            return Err(left());
        }
        state.arrived += 1;
        if state.arrived == shared.world {
            state.arrived = 0;
            state.generation += 1;
            shared.arrived_all.notify_all();
            return Ok(());
        }
        let generation = state.generation;
        while state.generation == generation {
            if state.departed > 0 {
                return Err(left());
            }
            state = shared.arrived_all.wait(state).map_err(|_| left())?;
        }
        Ok(())
    }

    /// Fills this rank's slot with `fill` (reusing its memory), counts `bytes` of traffic of
    /// `kind`, then waits for every rank.
    fn post(&self, kind: usize, bytes: usize, fill: impl FnOnce(&mut Vec<T>)) -> Result<()> {
        {
            let mut slot = self.shared.slots[self.rank]
                .write()
                .map_err(|_| self.poisoned())?;
            slot.clear();
            fill(&mut slot);
        }
        self.shared.traffic[kind].fetch_add(bytes as u64, Ordering::Relaxed);
        self.barrier()
    }

    fn poisoned(&self) -> Error {
        Error::Collective(format!("rank {}: a rank panicked inside a collective", self.rank))
    }

    /// Calls `read(r, slot)` for every rank's slot in rank order, then waits for every rank.
    fn read_all(&self, mut read: impl FnMut(usize, &[T]) -> Result<()>) -> Result<()> {
        let mut result = Ok(());
        for (r, slot) in self.shared.slots.iter().enumerate() {
            let slot = slot.read().map_err(|_| self.poisoned())?;
            result = read(r, &slot);
            if result.is_err() {
                break;
            }
        }
        // Wait even after an error, so the other ranks are not left at the barrier.
        self.barrier().and(result)
    }

    /// All-gather, with the values rounded to bf16 on the wire when `bf16`.
    fn gather(&self, shard: &HostMatrix<T>, full: &mut HostMatrix<T>, bf16: bool) -> Result<()> {
        let (n, world) = (full.as_slice().len(), self.shared.world);
        self.check_shard("all-gather", n, shard.as_slice().len())?;
        let own = &shard.as_slice()[..shard_range(n, world, self.rank).len()];
        let bytes = n * if bf16 { 2 } else { size_of::<T>() };
        self.post(ALL_GATHER, bytes, |slot| {
            if bf16 {
                slot.extend(
                    own.iter()
                        .map(|v| T::from_f64(round_to_bf16(v.to_f64() as f32) as f64)),
                );
            } else {
                slot.extend_from_slice(own);
            }
        })?;
        let out = full.as_mut_slice();
        self.read_all(|r, theirs| {
            let range = shard_range(n, world, r);
            if theirs.len() != range.len() {
                return Err(disagree(self.rank, "all-gather", r, theirs.len(), range.len()));
            }
            out[range].copy_from_slice(theirs);
            Ok(())
        })
    }

    fn check_shard(&self, what: &str, full: usize, shard: usize) -> Result<()> {
        let expected = shard_capacity(full, self.shared.world);
        if shard == expected {
            return Ok(());
        }
        Err(Error::Collective(format!(
            "rank {}: {what}: a shard of {shard} elements for a tensor of {full} over {} ranks \
             (expected {expected})",
            self.rank, self.shared.world
        )))
    }
}

fn disagree(rank: usize, what: &str, other: usize, theirs: usize, ours: usize) -> Error {
    Error::Collective(format!(
        "rank {rank}: {what}: rank {other} passed {theirs} elements, this rank {ours}"
    ))
}

impl<T> Drop for ThreadGroup<T> {
    fn drop(&mut self) {
        // Poisoned or not, the count must go up so the others stop waiting.
        let mut state = match self.shared.barrier.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        state.departed += 1;
        self.shared.arrived_all.notify_all();
    }
}

impl<B> Collective<B> for ThreadGroup<B::Elem>
where
    B: Backend<Matrix = HostMatrix<<B as Backend>::Elem>>,
{
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn reduce_scatter_mean(
        &self,
        _: &B,
        full: &HostMatrix<B::Elem>,
        shard: &mut HostMatrix<B::Elem>,
    ) -> Result<()> {
        let (n, world) = (full.as_slice().len(), self.shared.world);
        self.check_shard("reduce-scatter", n, shard.as_slice().len())?;
        self.post(REDUCE_SCATTER, n * size_of::<B::Elem>(), |slot| {
            slot.extend_from_slice(full.as_slice())
        })?;
        let range = shard_range(n, world, self.rank);
        let out = shard.as_mut_slice();
        out.fill(B::Elem::ZERO);
        let own = &mut out[..range.len()];
        self.read_all(|r, theirs| {
            if theirs.len() != n {
                return Err(disagree(self.rank, "reduce-scatter", r, theirs.len(), n));
            }
            own.iter_mut()
                .zip(&theirs[range.clone()])
                .for_each(|(o, x)| *o += *x);
            Ok(())
        })?;
        let inverse = B::Elem::from_f64(1.0 / world as f64);
        own.iter_mut().for_each(|o| *o *= inverse);
        Ok(())
    }

    fn all_gather(&self, _: &B, shard: &HostMatrix<B::Elem>, full: &mut HostMatrix<B::Elem>) -> Result<()> {
        self.gather(shard, full, false)
    }

    /// The root posts its tensor (counted once per rank, as the other collectives are); the
    /// others copy it.
    fn broadcast(&self, _: &B, root: usize, full: &mut HostMatrix<B::Elem>) -> Result<()> {
        let (n, world) = (full.as_slice().len(), self.shared.world);
        if root >= world {
            return Err(Error::Collective(format!(
                "rank {}: broadcast from rank {root} in a group of {world}",
                self.rank
            )));
        }
        let is_root = self.rank == root;
        let bytes = if is_root {
            n * size_of::<B::Elem>() * world
        } else {
            0
        };
        self.post(BROADCAST, bytes, |slot| {
            if is_root {
                slot.extend_from_slice(full.as_slice())
            }
        })?;
        let out = full.as_mut_slice();
        self.read_all(|r, theirs| {
            if r != root || is_root {
                return Ok(());
            }
            if theirs.len() != n {
                return Err(disagree(self.rank, "broadcast", r, theirs.len(), n));
            }
            out.copy_from_slice(theirs);
            Ok(())
        })
    }

    /// Posts each value rounded to bf16, and counts 2 bytes per element.
    fn all_gather_bf16(
        &self,
        _: &B,
        shard: &HostMatrix<B::Elem>,
        full: &mut HostMatrix<B::Elem>,
    ) -> Result<()> {
        self.gather(shard, full, true)
    }

    fn copy_shard(&self, _: &B, full: &HostMatrix<B::Elem>, shard: &mut HostMatrix<B::Elem>) -> Result<()> {
        let n = full.as_slice().len();
        self.check_shard("copy of a shard", n, shard.as_slice().len())?;
        let range = shard_range(n, self.shared.world, self.rank);
        let out = shard.as_mut_slice();
        let len = range.len();
        out[..len].copy_from_slice(&full.as_slice()[range]);
        out[len..].fill(B::Elem::ZERO);
        Ok(())
    }
}
