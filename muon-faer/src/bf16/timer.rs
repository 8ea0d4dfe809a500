//! Where a workload's bf16 products spend their time (feature `product-timer`): per product
//! shape and operand layout, the calls, the thread time and the part of it spent packing each
//! operand. Off until [`start_product_timer`]; while on, every product takes a lock to record
//! itself, so time nothing else with it on. Without the feature the driver's clock is a
//! no-op that compiles away.

#[cfg(feature = "product-timer")]
mod on {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, PoisonError};
    use std::time::{Duration, Instant};

    /// The bf16 products of one shape and layout since [`start_product_timer`].
    #[derive(Clone, Debug, PartialEq)]
    pub struct ProductTiming {
        /// Rows of C.
        pub m: usize,
        /// Columns of C.
        pub n: usize,
        /// The inner dimension.
        pub k: usize,
        /// Whether A is stored with `k` along its rows (else down its columns).
        pub a_k_rows: bool,
        /// Whether B, as `op(B)^T` (`n x k`), is stored with `k` along its rows.
        pub b_k_rows: bool,
        /// Whether some work was skipped ([`Structure`](crate::Structure), or a symmetric
        /// product's upper triangle): then [`flops`](Self::flops) counts more than ran.
        pub skipped: bool,
        /// Products of this kind.
        pub calls: u64,
        /// Their time, summed over the threads that ran them.
        pub total: Duration,
        /// The part of it spent packing A.
        pub pack_a: Duration,
        /// The part of it spent packing B.
        pub pack_b: Duration,
    }

    impl ProductTiming {
        /// Nominal flops of all its calls (`2 m n k` each).
        pub fn flops(&self) -> f64 {
            2.0 * (self.m * self.n * self.k) as f64 * self.calls as f64
        }
    }

    static ON: AtomicBool = AtomicBool::new(false);
    static TIMINGS: Mutex<Vec<ProductTiming>> = Mutex::new(Vec::new());

    /// Clears what was recorded and starts recording every bf16 product.
    pub fn start_product_timer() {
        TIMINGS.lock().unwrap_or_else(PoisonError::into_inner).clear();
        ON.store(true, Ordering::SeqCst);
    }

    /// Stops recording; returns what was recorded, the most time first.
    pub fn stop_product_timer() -> Vec<ProductTiming> {
        ON.store(false, Ordering::SeqCst);
        let mut all = std::mem::take(&mut *TIMINGS.lock().unwrap_or_else(PoisonError::into_inner));
        all.sort_by_key(|t| std::cmp::Reverse(t.total));
        all
    }

    /// One product's clock: its start and its packing times so far.
    pub(crate) struct Clock(Option<(Instant, Duration, Duration)>);

    impl Clock {
        #[inline(always)]
        pub(crate) fn start() -> Clock {
            Clock(
                ON.load(Ordering::Relaxed)
                    .then(|| (Instant::now(), Duration::ZERO, Duration::ZERO)),
            )
        }

        /// Runs `pack`, counted as packing A (`a`) or B.
        #[inline(always)]
        pub(crate) fn pack<R>(&mut self, a: bool, pack: impl FnOnce() -> R) -> R {
            let Some((_, pack_a, pack_b)) = &mut self.0 else {
                return pack();
            };
            let t = Instant::now();
            let r = pack();
            *(if a { pack_a } else { pack_b }) += t.elapsed();
            r
        }

        /// Records the product (`a`, `b`: whether each is stored with `k` along its rows).
        pub(crate) fn stop(self, (m, n, k): (usize, usize, usize), a: bool, b: bool, skipped: bool) {
            let Some((t0, pack_a, pack_b)) = self.0 else {
                return;
            };
            let total = t0.elapsed();
            let mut all = TIMINGS.lock().unwrap_or_else(PoisonError::into_inner);
            let key = |t: &ProductTiming| (t.m, t.n, t.k, t.a_k_rows, t.b_k_rows, t.skipped);
            let want = (m, n, k, a, b, skipped);
            match all.iter_mut().find(|t| key(t) == want) {
                Some(t) => {
                    t.calls += 1;
                    t.total += total;
                    t.pack_a += pack_a;
                    t.pack_b += pack_b;
                }
                None => all.push(ProductTiming {
                    m,
                    n,
                    k,
                    a_k_rows: a,
                    b_k_rows: b,
                    skipped,
                    calls: 1,
                    total,
                    pack_a,
                    pack_b,
                }),
            }
        }
    }
}

#[cfg(feature = "product-timer")]
pub(crate) use on::Clock;
#[cfg(feature = "product-timer")]
pub use on::{start_product_timer, stop_product_timer, ProductTiming};

/// The driver's clock without the feature: nothing.
#[cfg(not(feature = "product-timer"))]
pub(crate) struct Clock;

#[cfg(not(feature = "product-timer"))]
impl Clock {
    #[inline(always)]
    pub(crate) fn start() -> Clock {
        Clock
    }

    #[inline(always)]
    pub(crate) fn pack<R>(&mut self, _a: bool, pack: impl FnOnce() -> R) -> R {
        pack()
    }

    #[inline(always)]
    pub(crate) fn stop(self, _mnk: (usize, usize, usize), _a: bool, _b: bool, _skipped: bool) {}
}
