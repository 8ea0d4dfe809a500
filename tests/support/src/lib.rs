//! A counting global allocator, shared by muon-rs's allocation tests.
//!
//! A test binary installs [`CountingAllocator`] as its global allocator, checks that it counts
//! with [`assert_counting`], and measures a step with [`allocations`] (or two readings of
//! [`allocation_count`] around work that spans threads):
//!
//! ```
//! use muon_test_support::{allocations, assert_counting, CountingAllocator};
//!
//! #[global_allocator]
//! static ALLOCATOR: CountingAllocator = CountingAllocator;
//!
//! fn main() {
//!     assert_counting();
//!     let mut buffer: Vec<u8> = Vec::with_capacity(16);
//!     // Within its capacity a vector does not allocate; past it, it reallocates once.
//!     assert_eq!(allocations(|| buffer.extend_from_slice(&[1; 16])), 0);
//!     assert_eq!(allocations(|| buffer.push(2)), 1);
//! }
//! ```
//!
//! The count is process-wide: it sees every thread, a backend's workers included. Such tests
//! run without libtest (`harness = false`), whose own threads may allocate while a count is
//! taken.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Allocations and reallocations since the process started.
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// Bytes allocated and not yet freed, and the most there were since the last
/// [`reset_peak_bytes`].
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrink(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

/// The system allocator, counting every allocation and reallocation (frees are not counted:
/// a step that frees must have allocated first).
pub struct CountingAllocator;

// SAFETY: every call is forwarded unchanged to the system allocator; the only additions are
// atomic counters, which neither allocate nor touch the memory handed out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grow(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grow(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrink(layout.size());
        // SAFETY: `ptr` came from `System` through this allocator, with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract on `new_size`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            grow(new_size);
            shrink(layout.size());
        }
        new
    }
}

/// Bytes allocated and not freed yet (heap only: not stacks, not the binary).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::SeqCst)
}

/// The most bytes live at once since the last [`reset_peak_bytes`] (or the start).
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::SeqCst)
}

/// Starts a new peak from the bytes live now.
pub fn reset_peak_bytes() {
    PEAK.store(LIVE.load(Ordering::SeqCst), Ordering::SeqCst);
}

/// Allocations (and reallocations) so far, on every thread. Work on other threads is counted
/// once the reading thread has synchronized with them (a join, a barrier).
pub fn allocation_count() -> usize {
    ALLOCATIONS.load(Ordering::SeqCst)
}

/// The allocations made while `f` runs (on any thread).
pub fn allocations(f: impl FnOnce()) -> usize {
    let before = allocation_count();
    f();
    allocation_count() - before
}

/// Panics unless [`CountingAllocator`] is the global allocator and counts: a test whose count
/// cannot move would pass whatever the code under test does.
pub fn assert_counting() {
    let n = allocations(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(64))));
    assert!(
        n >= 1,
        "no allocation counted: install muon_test_support::CountingAllocator with #[global_allocator]"
    );
}

/// Says that the running test skips (a case or all of it) and why, as `<test>: skipped: <why>`
/// on standard error written directly: libtest captures `println!` and `eprintln!` and drops
/// what a passing test printed, so a skip said that way would not show in CI's output. The
/// test's name is its thread's, as libtest names it; a test that skips for the same reason in
/// a loop says it once.
pub fn skip(why: impl std::fmt::Display) {
    use std::io::Write;
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let thread = std::thread::current();
    let line = format!("{}: skipped: {why}", thread.name().unwrap_or("test"));
    let mut said = SAID.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !said.contains(&line) {
        let _ = writeln!(std::io::stderr(), "{line}");
        said.push(line);
    }
}
