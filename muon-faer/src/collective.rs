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

use muon_core::{shard_capacity, shard_range, Backend, Collective, Error, HostMatrix, Real, Result};

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
    /// Elements each rank passed to the group, per kind of collective.
    traffic: [AtomicU64; 2],
}

struct BarrierState {
    arrived: usize,
    generation: u64,
    /// Ranks whose handle is gone.
    departed: usize,
}

/// Elements of full tensors that went through the group's collectives, per rank: what
/// [`ThreadGroup::traffic`] returns. In a ring, each costs `(world - 1) / world` of that in
/// elements sent per rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Reduce-scatters (the gradients).
    pub reduce_scatter: u64,
    /// All-gathers (Muon's `N_t`, the parameters, the small vectors of norms).
    pub all_gather: u64,
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
            traffic: [AtomicU64::new(0), AtomicU64::new(0)],
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
        let [rs, ag] = &self.shared.traffic;
        Traffic {
            reduce_scatter: rs.load(Ordering::Relaxed) / world,
            all_gather: ag.load(Ordering::Relaxed) / world,
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

    /// Posts `data` into this rank's slot (reusing its memory), then waits for every rank.
    /// `kind` and `full_len` count the traffic: which collective, and its full tensor's size.
    fn post(&self, data: &[T], kind: usize, full_len: usize) -> Result<()> {
        {
            let mut slot = self.shared.slots[self.rank]
                .write()
                .map_err(|_| self.poisoned())?;
            slot.clear();
            slot.extend_from_slice(data);
        }
        self.shared.traffic[kind].fetch_add(full_len as u64, Ordering::Relaxed);
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
        self.post(full.as_slice(), 0, n)?;
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
        let (n, world) = (full.as_slice().len(), self.shared.world);
        self.check_shard("all-gather", n, shard.as_slice().len())?;
        let own = shard_range(n, world, self.rank);
        self.post(&shard.as_slice()[..own.len()], 1, n)?;
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
