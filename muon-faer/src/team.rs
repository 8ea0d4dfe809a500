//! A fixed team of worker threads that runs one job split in parts, allocating nothing per job.
//!
//! Why not rayon: a call into a rayon pool from outside it goes through the pool's injector
//! queue, which allocates a block every 63 jobs, and faer's own parallel GEMM allocates its job
//! tables on every call. The optimizer promises no allocation per step after warm-up, so the
//! backend cuts the work into parts itself (descriptors in fixed arrays on the stack) and hands
//! them to this team.
//!
//! The caller's thread and `threads - 1` workers claim the parts of a job from a shared
//! counter; a job is a borrowed closure, published under a mutex and waited for before
//! [`Team::for_each_part`] returns. Between jobs the workers spin briefly, then sleep. This module and `bf16::arch` (CPU detection and the bf16 kernels) hold the crate's
//! `unsafe` code; this one the team's and `vzeroupper` (see [`clear_avx_upper_state`]).

use std::any::Any;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most threads a backend runs.
pub const MAX_THREADS: usize = 64;

/// The most parts one job is cut into: part descriptors live in fixed arrays of this length
/// on the stack (no allocation per call).
pub(crate) const MAX_PARTS: usize = 256;

/// A job as the workers see it: a closure that claims parts until none are left.
#[derive(Clone, Copy)]
struct Job {
    /// Borrowed from [`Team::for_each_part`]'s stack frame, which outlives every use: that
    /// function waits until every worker reported the job done before it returns.
    run: *const (dyn Fn() + Sync + 'static),
}

// SAFETY: the closure behind `run` is `Sync`, so calling it from several threads through a
// shared pointer is allowed; the pointer itself is only dereferenced while the closure lives
// (see `Job::run`).
unsafe impl Send for Job {}

struct State {
    /// Incremented for every published job; a worker runs each epoch once.
    epoch: u64,
    job: Option<Job>,
    /// Workers that have not finished the current job.
    pending: usize,
    /// A panic payload from a worker's part, re-raised on the caller's thread.
    panic: Option<Box<dyn Any + Send>>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    start: Condvar,
    done: Condvar,
    /// Copies of `State::epoch` and `State::pending`, written under the lock, read without
    /// it while spinning. The state under the lock stays the truth: a spinner that sees a
    /// change still takes the lock before acting.
    epoch_hint: AtomicU64,
    pending_hint: AtomicUsize,
}

/// How long a thread spins on the hints before it sleeps on a condition variable. Newton-
/// Schulz issues its jobs back to back, microseconds apart; a worker that went to sleep
/// between them would have to be woken, which on a core shared with another (even niced)
/// process can take a scheduler tick.
const SPIN: Duration = Duration::from_micros(200);

/// Spins until `done()` or `SPIN` elapses; `true` when `done()` became true.
fn spin_until(done: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() > SPIN {
            return done();
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Parts run under catch_unwind, never while holding the lock, so poisoning cannot leave
    // the state half-written; recover rather than cascade.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `threads - 1` parked workers plus the calling thread.
pub(crate) struct Team {
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes jobs from different caller threads sharing one backend.
    dispatch: Mutex<()>,
}

impl Team {
    /// A team of `threads` (clamped to `1..=MAX_THREADS`). If the OS refuses to start a
    /// thread, the team runs with the ones it got (at least the caller's).
    pub(crate) fn new(threads: usize) -> Team {
        let wanted = threads.clamp(1, MAX_THREADS);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                epoch: 0,
                job: None,
                pending: 0,
                panic: None,
                shutdown: false,
            }),
            start: Condvar::new(),
            done: Condvar::new(),
            epoch_hint: AtomicU64::new(0),
            pending_hint: AtomicUsize::new(0),
        });
        let mut workers = Vec::with_capacity(wanted - 1);
        for index in 1..wanted {
            let shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("muon-faer-{index}"))
                .spawn(move || worker(&shared));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(_) => break,
            }
        }
        Team {
            threads: workers.len() + 1,
            shared,
            workers,
            dispatch: Mutex::new(()),
        }
    }

    /// Threads that run parts (the caller's included).
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(&mut part)` once for every element of `parts`, in parallel: the caller's
    /// thread and the workers claim parts in order from a shared counter, so a thread slowed
    /// down (by another process on its core) simply claims fewer. Returns when all are done;
    /// a panic in any part is re-raised here after every claimed part has finished.
    pub(crate) fn for_each_part<X: Send>(&self, parts: &mut [X], f: &(dyn Fn(&mut X) + Sync)) {
        let n = parts.len();
        if n <= 1 || self.workers.is_empty() {
            parts.iter_mut().for_each(f);
            return;
        }
        let base = PartsPtr {
            ptr: parts.as_mut_ptr(),
            _marker: PhantomData,
        };
        let next = AtomicUsize::new(0);
        let run = move || {
            let base = &base;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                // SAFETY: `i < n`, and the counter hands out each index once, so the `&mut`
                // made here are to distinct elements of `parts`, which `for_each_part`
                // borrows mutably for the whole job. `X: Send` makes handing them to other
                // threads sound.
                f(unsafe { &mut *base.ptr.add(i) });
            }
        };
        self.run_everywhere(&run);
    }

    /// Runs `run` once on every thread of the team (the caller's included) and returns when
    /// all are done, re-raising a panic from any of them.
    pub(crate) fn run_everywhere(&self, run: &(dyn Fn() + Sync)) {
        if self.workers.is_empty() {
            run();
            return;
        }
        let _serial = self.dispatch.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut state = lock(&self.shared.state);
            state.epoch += 1;
            state.pending = self.workers.len();
            self.shared.pending_hint.store(state.pending, Ordering::Release);
            self.shared.epoch_hint.store(state.epoch, Ordering::Release);
            // SAFETY: only the lifetime is erased. The closure outlives this call, and this
            // function does not return (nor unwind: the caller's share runs under
            // catch_unwind) before `pending` is back to 0, i.e. before every worker has
            // stopped using the pointer; the job is cleared before it returns.
            let erased: &'static (dyn Fn() + Sync) = unsafe { std::mem::transmute(run) };
            state.job = Some(Job { run: erased });
        }
        self.shared.start.notify_all();
        let mine = catch_unwind(AssertUnwindSafe(run));
        spin_until(|| self.shared.pending_hint.load(Ordering::Acquire) == 0);
        let theirs = {
            let mut state = lock(&self.shared.state);
            while state.pending > 0 {
                state = self
                    .shared
                    .done
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.job = None;
            state.panic.take()
        };
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if let Some(payload) = theirs {
            resume_unwind(payload);
        }
    }
}

/// The base of the parts array, shared by all parts of one job.
struct PartsPtr<'a, X> {
    ptr: *mut X,
    _marker: PhantomData<&'a mut [X]>,
}

// SAFETY: every part dereferences a different element (see `for_each_part`), and the elements
// are `Send`, so sharing the base pointer between threads is like splitting `&mut [X]`.
unsafe impl<X: Send> Sync for PartsPtr<'_, X> {}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        spin_until(|| shared.epoch_hint.load(Ordering::Acquire) != seen);
        let job = {
            let mut state = lock(&shared.state);
            while state.epoch == seen && !state.shutdown {
                state = shared.start.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            if state.shutdown {
                return;
            }
            seen = state.epoch;
            state.job
        };
        let mut outcome = Ok(());
        if let Some(job) = job {
            // SAFETY: the publisher keeps the closure alive until this worker has
            // decremented `pending` below, which happens after this call returns.
            let run = unsafe { &*job.run };
            outcome = catch_unwind(AssertUnwindSafe(run));
        }
        let mut state = lock(&shared.state);
        if let Err(payload) = outcome {
            state.panic.get_or_insert(payload);
        }
        state.pending -= 1;
        shared.pending_hint.store(state.pending, Ordering::Release);
        if state.pending == 0 {
            shared.done.notify_one();
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.start.notify_all();
        for handle in self.workers.drain(..) {
            // A worker never panics outside catch_unwind; nothing to report if it did.
            let _ = handle.join();
        }
    }
}

/// Marks the upper halves of the AVX registers clean (`vzeroupper`) on the calling thread.
///
/// faer's x86 GEMM kernels return with the upper halves dirty. Until they are cleared, every
/// legacy-SSE instruction on that thread pays a transition penalty: glibc's `expf` ran ~30x
/// slower (3.7 ns -> 116 ns per call on the development machine) after one faer product. The
/// backend calls this after each of its products; code that calls faer directly should too.
/// A no-op off x86-64 or without AVX.
pub fn clear_avx_upper_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: `vzeroupper` needs AVX, detected just above; it changes no architectural
        // state a compiled Rust function relies on across this call (the upper halves are
        // caller-saved and dead at a call boundary).
        unsafe { std::arch::x86_64::_mm256_zeroupper() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once() {
        let team = Team::new(3);
        let mut parts: Vec<usize> = vec![0; 40];
        for round in 1..50 {
            team.for_each_part(&mut parts, &|x| *x += round);
        }
        assert!(parts.iter().all(|&x| x == (1..50).sum::<usize>()));
    }

    #[test]
    fn run_everywhere_runs_on_every_thread() {
        let team = Team::new(3);
        let count = AtomicUsize::new(0);
        team.run_everywhere(&|| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), team.threads());
    }

    #[test]
    fn fewer_parts_than_threads() {
        let team = Team::new(4);
        let mut parts = [1, 2];
        team.for_each_part(&mut parts, &|x| *x *= 10);
        assert_eq!(parts, [10, 20]);
    }

    #[test]
    fn a_part_panic_reaches_the_caller_and_the_team_survives() {
        let team = Team::new(2);
        let mut parts = [0, 1, 2, 3];
        let result = catch_unwind(AssertUnwindSafe(|| {
            team.for_each_part(&mut parts, &|x| assert!(*x != 2, "part {x} fails"))
        }));
        assert!(result.is_err());
        team.for_each_part(&mut parts, &|x| *x += 1);
        assert_eq!(parts, [1, 2, 3, 4]);
    }
}
