//! The buffers MPI reads and writes, and the non-blocking collectives on them, each waited for
//! with a deadline. The module's one `unsafe` block abandons a request at its deadline.
//!
//! MPI only ever sees these buffers, never a caller's matrix. A collective abandoned at its
//! deadline is still in MPI's hands, which may read or write its buffers at any later time, so
//! they are leaked (never freed, never reused) right there: a leak of at most the largest
//! tensor's size, once, on a path that ends the job.

use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::request::{Request, Scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use muon_core::Real;

/// A collective that did not complete within its deadline, after waiting this long.
#[derive(Debug)]
pub(super) struct TimedOut(pub Duration);

/// Send and receive buffers, grown to the largest tensor once and then reused.
pub(super) struct Staging<T> {
    send: Vec<T>,
    recv: Vec<T>,
    send_bf16: Vec<u16>,
    recv_bf16: Vec<u16>,
}

impl<T> Default for Staging<T> {
    fn default() -> Self {
        Staging {
            send: Vec::new(),
            recv: Vec::new(),
            send_bf16: Vec::new(),
            recv_bf16: Vec::new(),
        }
    }
}

impl<T> Staging<T> {
    /// `MPI_Ibarrier`.
    pub fn barrier(&mut self, comm: &SimpleCommunicator, timeout: Duration) -> Result<(), TimedOut> {
        complete(comm.immediate_barrier(), timeout)
    }
}

impl<T: Real + Equivalence> Staging<T> {
    /// `MPI_Ialltoall` of `data` padded with zeros to `cap * world` elements: returns the
    /// `cap * world` elements received, rank `r`'s piece at `r * cap`.
    pub fn all_to_all(
        &mut self,
        comm: &SimpleCommunicator,
        data: &[T],
        cap: usize,
        timeout: Duration,
    ) -> Result<&[T], TimedOut> {
        let len = cap * comm.size() as usize;
        fill(&mut self.send, data, len);
        grow(&mut self.recv, len, T::ZERO);
        let (send, recv) = (&self.send[..len], &mut self.recv[..len]);
        let outcome =
            mpi::request::scope(|scope| complete(comm.immediate_all_to_all_into(scope, send, recv), timeout));
        self.leak_on_timeout(outcome)?;
        Ok(&self.recv[..len])
    }

    /// `MPI_Iallgather` of the `cap`-element `shard`: returns the `cap * world` elements.
    pub fn all_gather(
        &mut self,
        comm: &SimpleCommunicator,
        shard: &[T],
        timeout: Duration,
    ) -> Result<&[T], TimedOut> {
        let len = shard.len() * comm.size() as usize;
        fill(&mut self.send, shard, shard.len());
        grow(&mut self.recv, len, T::ZERO);
        let (send, recv) = (&self.send[..shard.len()], &mut self.recv[..len]);
        let outcome =
            mpi::request::scope(|scope| complete(comm.immediate_all_gather_into(scope, send, recv), timeout));
        self.leak_on_timeout(outcome)?;
        Ok(&self.recv[..len])
    }

    /// [`all_gather`](Self::all_gather) of 16-bit words (`encode` of each element of `shard`).
    pub fn all_gather_u16(
        &mut self,
        comm: &SimpleCommunicator,
        shard: &[T],
        encode: impl Fn(T) -> u16,
        timeout: Duration,
    ) -> Result<&[u16], TimedOut> {
        let len = shard.len() * comm.size() as usize;
        self.send_bf16.clear();
        self.send_bf16.extend(shard.iter().map(|&v| encode(v)));
        grow(&mut self.recv_bf16, len, 0);
        let (send, recv) = (&self.send_bf16[..], &mut self.recv_bf16[..len]);
        let outcome =
            mpi::request::scope(|scope| complete(comm.immediate_all_gather_into(scope, send, recv), timeout));
        self.leak_on_timeout(outcome)?;
        Ok(&self.recv_bf16[..len])
    }

    /// `MPI_Ibcast` of `data` from `root` (whose `data` is read; every other rank's written).
    pub fn broadcast(
        &mut self,
        comm: &SimpleCommunicator,
        root: usize,
        data: &mut [T],
        timeout: Duration,
    ) -> Result<(), TimedOut> {
        let is_root = comm.rank() as usize == root;
        let n = data.len();
        if is_root {
            fill(&mut self.send, data, n);
        } else {
            grow(&mut self.send, n, T::ZERO);
        }
        let buffer = &mut self.send[..n];
        let outcome = mpi::request::scope(|scope| {
            let root = comm.process_at_rank(root as i32);
            complete(root.immediate_broadcast_into(scope, buffer), timeout)
        });
        self.leak_on_timeout(outcome)?;
        if !is_root {
            data.copy_from_slice(&self.send[..n]);
        }
        Ok(())
    }

    /// After a request abandoned at its deadline, which may still use every buffer: leaks
    /// them all and starts over with empty ones (the group refuses further collectives anyway).
    fn leak_on_timeout(&mut self, outcome: Result<(), TimedOut>) -> Result<(), TimedOut> {
        if outcome.is_err() {
            std::mem::forget(std::mem::take(self));
        }
        outcome
    }
}

/// `buffer = data` followed by zeros, `len` elements in all, reusing its memory.
fn fill<T: Real>(buffer: &mut Vec<T>, data: &[T], len: usize) {
    buffer.clear();
    buffer.extend_from_slice(data);
    buffer.resize(len, T::ZERO);
}

/// Grows `buffer` to at least `len` elements; what it holds is about to be overwritten.
fn grow<T: Copy>(buffer: &mut Vec<T>, len: usize, zero: T) {
    if buffer.len() < len {
        buffer.resize(len, zero);
    }
}

/// Polls `request` until it completes, or until `timeout` has passed: then abandons it.
/// Between polls the thread yields, so that ranks sharing a core (an oversubscribed job) let
/// each other progress.
fn complete<'a, D: ?Sized, S: Scope<'a>>(
    mut request: Request<'a, D, S>,
    timeout: Duration,
) -> Result<(), TimedOut> {
    let start = Instant::now();
    loop {
        request = match request.test() {
            Ok(_) => return Ok(()),
            Err(pending) => pending,
        };
        let waited = start.elapsed();
        if waited >= timeout {
            // SAFETY: `into_raw` hands back a request that must complete before its buffers
            // are freed. It never will: every caller in this module passes only `Staging`'s
            // buffers (or none: a barrier) and, on `TimedOut`, leaks them before returning
            // (`leak_on_timeout`), so they are never freed or reused while MPI may hold them.
            let _abandoned = unsafe { request.into_raw() };
            return Err(TimedOut(waited));
        }
        std::thread::yield_now();
    }
}
