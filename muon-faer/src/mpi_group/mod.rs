//! [`MpiGroup`]: muon-core's [`Collective`] over MPI (the `mpi` feature), for Distributed Muon
//! across the processes of a CPU cluster, one rank per process.
//!
//! It lives in this crate, next to [`ThreadGroup`](crate::ThreadGroup), because both move
//! [`HostMatrix`] data in host memory: it serves every backend on host matrices (this crate's
//! [`Faer`](crate::Faer), muon-core's `Portable`), and it is tested bit for bit against
//! `ThreadGroup`. GPUs communicate through NCCL (muon-cuda's `NcclGroup`); muon-core stays
//! `no_std` and free of a C library.
//!
//! The results do not depend on the MPI library's reduction order: no collective here asks
//! MPI to add anything. A reduce-scatter is an all-to-all of the shards, after which each rank
//! sums the pieces it received in rank order and divides as `ThreadGroup` does, so every rank
//! and every rank count's `ThreadGroup` run get the same bits. Tensors whose length does not
//! divide by the rank count travel in padded staging buffers, like NCCL's.
//!
//! Every collective is non-blocking underneath and waited for with a deadline
//! ([`MpiGroup::with_timeout`]): a rank whose peers stopped calling collectives (one died
//! without the launcher noticing, or returned early) gets [`Error::Collective`] saying so
//! instead of waiting forever. MPI cannot finish a job with a collective outstanding, so such
//! a group is broken: its later collectives fail at once, and dropping it aborts the whole job
//! (`MPI_Abort`) after printing the error, which also stops the ranks that are stuck.

mod staging;

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;
use muon_core::{
    round_to_bf16, shard_capacity, shard_range, Backend, Collective, Error, HostMatrix, Real, Result,
};

use self::staging::{Staging, TimedOut};
use crate::collective::Traffic;

/// One rank of a data-parallel group of MPI processes: this process's handle, from
/// [`MpiGroup::init`] (run under `mpirun -np N`; a process started alone is a group of one).
///
/// Implements [`Collective`] for every backend on [`HostMatrix`]; hand it to a
/// `muon_core::DistributedOptimizer`. Calls from the thread that made it (MPI is initialized
/// as `MPI_THREAD_FUNNELED`: the backend's worker threads never call MPI). Staging buffers
/// grow to the largest tensor in the first step and are reused: later steps allocate nothing.
///
/// A rank that has to stop alone (an error only it sees) calls [`abort`](Self::abort), which
/// ends every rank at once; returning instead would leave the others waiting in their next
/// collective until its deadline.
///
/// ```no_run
/// use muon_core::{DistributedOptimizer, HybridConfig, ParamRole, ParamSpec, Shape};
/// use muon_faer::{Faer, MpiGroup};
///
/// # fn main() -> muon_core::Result<()> {
/// let group = MpiGroup::<f32>::init()?;
/// let is_root = group.rank() == 0; // only rank 0 writes files
/// let cpu = Faer::<f32>::new();
/// let specs = vec![ParamSpec::new("w", Shape::matrix(512, 512), ParamRole::Hidden)];
/// let mut opt = DistributedOptimizer::new(&cpu, group, specs, HybridConfig::default())?
///     .with_round_robin_newton_schulz(&cpu, true)?;
/// // opt.step(&cpu, &mut params, &grads, lr)?;  // each rank: its own batch's gradients
/// # let _ = (is_root, &mut opt);
/// # Ok(())
/// # }
/// ```
pub struct MpiGroup<T> {
    /// A duplicate of `MPI_COMM_WORLD`, so the group's traffic never meets the program's or
    /// another group's. Declared before `universe`: freed before MPI is finalized.
    comm: SimpleCommunicator,
    /// MPI itself, finalized when the last group is dropped.
    universe: Rc<Universe>,
    rank: usize,
    world: usize,
    timeout: Duration,
    staging: RefCell<Staging<T>>,
    traffic: Cell<Traffic>,
    /// The error of a collective that did not complete; MPI cannot go on after it.
    broken: RefCell<Option<String>>,
}

impl<T> fmt::Debug for MpiGroup<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiGroup")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<T> MpiGroup<T> {
    /// How long a collective waits for the other ranks by default: long enough for a rank
    /// that is busy elsewhere (rank 0 writing a checkpoint while the others enter the next
    /// step).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

    /// How long each collective waits for the other ranks before it fails (default
    /// [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT)). Every rank should choose the same.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// This rank, in `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks (processes).
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The bytes of full tensors this rank passed through each kind of collective so far,
    /// counted as [`ThreadGroup::traffic`](crate::ThreadGroup::traffic) counts them (a bf16
    /// gather: 2 bytes an element), so the two can be compared directly. What a rank sends on
    /// the wire is `(world - 1) / world` of the reduce-scatters' and all-gathers' bytes.
    pub fn traffic(&self) -> Traffic {
        self.traffic.get()
    }

    /// Waits until every rank has called `barrier` (within the group's deadline).
    pub fn barrier(&self) -> Result<()> {
        self.usable("barrier")?;
        let outcome = self.staging.borrow_mut().barrier(&self.comm, self.timeout);
        self.finish("barrier", outcome)
    }

    /// Prints `message` naming this rank and ends every process of the job (`MPI_Abort`,
    /// exit status 1): for a rank that has to stop on an error the others do not see.
    pub fn abort(&self, message: &str) -> ! {
        eprintln!(
            "MPI rank {} of {}: {message}; aborting the job",
            self.rank, self.world
        );
        self.comm.abort(1)
    }

    /// Fails when an earlier collective did not complete.
    fn usable(&self, what: &str) -> Result<()> {
        match &*self.broken.borrow() {
            None => Ok(()),
            Some(first) => Err(Error::Collective(format!(
                "rank {} of {}: {what}: the group is unusable after an earlier failure ({first})",
                self.rank, self.world
            ))),
        }
    }

    /// A collective's result; a deadline passed marks the group broken.
    fn finish<R>(&self, what: &str, outcome: std::result::Result<R, TimedOut>) -> Result<R> {
        outcome.map_err(|TimedOut(waited)| {
            let message = format!(
                "rank {} of {}: {what}: the other ranks did not join within {:.1} s (a rank \
                 died, hangs, or stopped calling collectives)",
                self.rank,
                self.world,
                waited.as_secs_f64()
            );
            *self.broken.borrow_mut() = Some(message.clone());
            Error::Collective(message)
        })
    }

    fn count(&self, kind: impl FnOnce(&mut Traffic) -> &mut u64, bytes: usize) {
        let mut traffic = self.traffic.get();
        *kind(&mut traffic) += bytes as u64;
        self.traffic.set(traffic);
    }
}

impl<T: Real + Equivalence> MpiGroup<T> {
    /// Initializes MPI and makes this process's rank of a group of every process in the job
    /// (`MPI_COMM_WORLD`). MPI is finalized when the last group is dropped. Errors when MPI
    /// was already initialized in this process: make further groups with
    /// [`another`](Self::another).
    pub fn init() -> Result<Self> {
        let Some((universe, _)) = mpi::initialize_with_threading(Threading::Funneled) else {
            return Err(Error::Collective(
                "MPI is already initialized in this process: make further groups with \
                 MpiGroup::another"
                    .into(),
            ));
        };
        Ok(Self::on(Rc::new(universe)))
    }

    /// Another group of the same processes, on a communicator of its own (for another element
    /// type, or another optimizer), with the default deadline. A collective: every rank calls
    /// it, in the same order.
    pub fn another<U: Real + Equivalence>(&self) -> MpiGroup<U> {
        MpiGroup::on(Rc::clone(&self.universe))
    }

    fn on(universe: Rc<Universe>) -> Self {
        let comm = universe.world().duplicate();
        let (rank, world) = (comm.rank() as usize, comm.size() as usize);
        MpiGroup {
            comm,
            universe,
            rank,
            world,
            timeout: Self::DEFAULT_TIMEOUT,
            staging: RefCell::new(Staging::default()),
            traffic: Cell::new(Traffic::default()),
            broken: RefCell::new(None),
        }
    }

    fn check_shard(&self, what: &str, full: usize, shard: usize) -> Result<usize> {
        self.usable(what)?;
        let expected = shard_capacity(full, self.world);
        if shard == expected {
            return Ok(expected);
        }
        Err(Error::Collective(format!(
            "rank {}: {what}: a shard of {shard} elements for a tensor of {full} over {} ranks \
             (expected {expected})",
            self.rank, self.world
        )))
    }
}

/// `x` rounded to bf16 (as muon-core's [`round_to_bf16`]), as the top 16 bits of its f32. A
/// NaN stays a NaN (cutting its bits could leave an infinity).
fn bf16_bits(x: f32) -> u16 {
    if x.is_nan() {
        return ((x.to_bits() >> 16) as u16) | 0x7fc0;
    }
    (round_to_bf16(x).to_bits() >> 16) as u16
}

impl<T> Drop for MpiGroup<T> {
    fn drop(&mut self) {
        if let Some(first) = self.broken.get_mut().take() {
            eprintln!("{first}; aborting the job (MPI cannot finish with a collective outstanding)");
            self.comm.abort(1);
        }
        // Then the communicator is freed and MPI finalized (field order).
    }
}

impl<B> Collective<B> for MpiGroup<B::Elem>
where
    B: Backend<Matrix = HostMatrix<<B as Backend>::Elem>>,
    B::Elem: Equivalence,
{
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// An all-to-all of the (padded) shards; each rank then sums the `world` pieces of its own
    /// shard in rank order and multiplies by `1 / world`, exactly as `ThreadGroup` does.
    fn reduce_scatter_mean(
        &self,
        _: &B,
        full: &HostMatrix<B::Elem>,
        shard: &mut HostMatrix<B::Elem>,
    ) -> Result<()> {
        let (full, world) = (full.as_slice(), self.world);
        let n = full.len();
        let cap = self.check_shard("reduce-scatter", n, shard.as_slice().len())?;
        let mut staging = self.staging.borrow_mut();
        let outcome = staging.all_to_all(&self.comm, full, cap, self.timeout);
        let pieces = self.finish("reduce-scatter", outcome)?;
        let own_len = shard_range(n, world, self.rank).len();
        let out = shard.as_mut_slice();
        out.fill(B::Elem::ZERO);
        let own = &mut out[..own_len];
        for piece in pieces.chunks_exact(cap) {
            own.iter_mut().zip(piece).for_each(|(o, x)| *o += *x);
        }
        let inverse = B::Elem::from_f64(1.0 / world as f64);
        own.iter_mut().for_each(|o| *o *= inverse);
        self.count(|t| &mut t.reduce_scatter, size_of_val(full));
        Ok(())
    }

    /// Gathers the padded shards; the first `full.len()` elements are the tensor (rank `r`'s
    /// range starts at `r * cap`, and only the end is padding).
    fn all_gather(&self, _: &B, shard: &HostMatrix<B::Elem>, full: &mut HostMatrix<B::Elem>) -> Result<()> {
        let full = full.as_mut_slice();
        let n = full.len();
        self.check_shard("all-gather", n, shard.as_slice().len())?;
        let mut staging = self.staging.borrow_mut();
        let outcome = staging.all_gather(&self.comm, shard.as_slice(), self.timeout);
        let gathered = self.finish("all-gather", outcome)?;
        full.copy_from_slice(&gathered[..n]);
        self.count(|t| &mut t.all_gather, size_of_val(full));
        Ok(())
    }

    /// Rounds each value to bf16 and gathers the 16-bit words: half the bytes of
    /// `all_gather`, the same values as `ThreadGroup`'s bf16 gather.
    fn all_gather_bf16(
        &self,
        _: &B,
        shard: &HostMatrix<B::Elem>,
        full: &mut HostMatrix<B::Elem>,
    ) -> Result<()> {
        let full = full.as_mut_slice();
        let n = full.len();
        self.check_shard("bf16 all-gather", n, shard.as_slice().len())?;
        let encode = |v: B::Elem| bf16_bits(v.to_f64() as f32);
        let mut staging = self.staging.borrow_mut();
        let outcome = staging.all_gather_u16(&self.comm, shard.as_slice(), encode, self.timeout);
        let gathered = self.finish("bf16 all-gather", outcome)?;
        for (out, &bits) in full.iter_mut().zip(gathered) {
            *out = B::Elem::from_f64(f32::from_bits(u32::from(bits) << 16) as f64);
        }
        self.count(|t| &mut t.all_gather, n * 2);
        Ok(())
    }

    fn copy_shard(&self, _: &B, full: &HostMatrix<B::Elem>, shard: &mut HostMatrix<B::Elem>) -> Result<()> {
        let n = full.as_slice().len();
        self.check_shard("copy of a shard", n, shard.as_slice().len())?;
        let range = shard_range(n, self.world, self.rank);
        let out = shard.as_mut_slice();
        let len = range.len();
        out[..len].copy_from_slice(&full.as_slice()[range]);
        out[len..].fill(B::Elem::ZERO);
        Ok(())
    }

    fn broadcast(&self, _: &B, root: usize, full: &mut HostMatrix<B::Elem>) -> Result<()> {
        self.usable("broadcast")?;
        if root >= self.world {
            return Err(Error::Collective(format!(
                "rank {}: broadcast from rank {root} in a group of {}",
                self.rank, self.world
            )));
        }
        let full = full.as_mut_slice();
        let outcome = (self.staging.borrow_mut()).broadcast(&self.comm, root, full, self.timeout);
        self.finish("broadcast", outcome)?;
        self.count(|t| &mut t.broadcast, size_of_val(full));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_bits_are_the_rounded_values_top_half() {
        for i in 0..10_000 {
            let x = (i as f32 * 0.7311).sin() * 10f32.powi(i % 9 - 4);
            let widened = f32::from_bits(u32::from(bf16_bits(x)) << 16);
            assert_eq!(widened.to_bits(), round_to_bf16(x).to_bits(), "{x}");
        }
        for x in [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -f32::MAX] {
            let widened = f32::from_bits(u32::from(bf16_bits(x)) << 16);
            assert_eq!(widened.to_bits(), round_to_bf16(x).to_bits(), "{x}");
        }
        // A NaN whose payload sits in the low bits only stays a NaN.
        let nan = f32::from_bits(0x7f80_0001);
        assert!(nan.is_nan());
        assert!(f32::from_bits(u32::from(bf16_bits(nan)) << 16).is_nan());
        assert!(f32::from_bits(u32::from(bf16_bits(-nan)) << 16).is_nan());
    }
}
