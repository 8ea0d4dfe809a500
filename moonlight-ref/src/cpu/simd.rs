//! The widest vector instructions the CPU has, for the elementwise and row-wise loops.
//!
//! The crate is built for baseline x86-64 (SSE2), so a loop the compiler vectorizes runs four
//! `f32` lanes at a time even on a CPU with AVX-512's sixteen. [`vectorized`] runs a loop body
//! inside a function compiled for AVX-512 (or AVX2), chosen once at run time: the body is
//! inlined there and vectorized for those instructions. On a Zen 5, `small`'s bf16 forward +
//! backward at 32 x 128 tokens took 336-343 ms with the loops at the baseline, 312-319 with
//! AVX2 and 307-313 with AVX-512 (three alternated runs of `cargo bench -p moonlight-ref
//! --bench model -- --preset small --batch 32 --seq 128 --threads 1 --steps 4 --precision
//! bf16 --simd baseline|avx2|avx512`).
//!
//! The results are the same bits at every level: without fast-math flags the compiler may
//! only widen the vectors, never reorder a sum or fuse a multiply and an add, so every lane
//! computes what the scalar loop computes. (A test runs the model's forward and backward at
//! each level the CPU has and compares the bits.)

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction set [`vectorized`] compiles its loops for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    /// What the build targets (SSE2 on x86-64): the loops as compiled.
    Baseline,
    /// AVX2 and FMA (x86-64-v3: Intel Haswell, AMD Zen 1 and later).
    Avx2,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4: Intel Skylake-SP, AMD Zen 4 and later).
    Avx512,
}

impl SimdLevel {
    /// The widest level this CPU runs.
    pub fn detect() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") && has!("fma") {
                return SimdLevel::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Baseline
    }

    /// Whether this CPU runs this level.
    pub fn available(self) -> bool {
        self.rank() <= SimdLevel::detect().rank()
    }

    fn rank(self) -> u8 {
        match self {
            SimdLevel::Baseline => 1,
            SimdLevel::Avx2 => 2,
            SimdLevel::Avx512 => 3,
        }
    }

    fn from_rank(rank: u8) -> SimdLevel {
        match rank {
            3 => SimdLevel::Avx512,
            2 => SimdLevel::Avx2,
            _ => SimdLevel::Baseline,
        }
    }
}

/// The level in use: 0 until first asked (then the detected one), or the one set.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The level [`vectorized`] runs at: the widest the CPU has, unless [`set_simd_level`] chose
/// another.
pub fn simd_level() -> SimdLevel {
    match LEVEL.load(Ordering::Relaxed) {
        0 => {
            let level = SimdLevel::detect();
            LEVEL.store(level.rank(), Ordering::Relaxed);
            level
        }
        rank => SimdLevel::from_rank(rank),
    }
}

/// Runs [`vectorized`]'s loops at `level` from now on (the results do not change; only the
/// speed does). An error names a level this CPU lacks.
pub fn set_simd_level(level: SimdLevel) -> Result<(), String> {
    if !level.available() {
        return Err(format!(
            "this CPU lacks the {level:?} instructions (it has up to {:?})",
            SimdLevel::detect()
        ));
    }
    LEVEL.store(level.rank(), Ordering::Relaxed);
    Ok(())
}

/// Runs `body` compiled for the [`simd_level`] in use. Only code inlined into the wrapper is
/// compiled for the wider instructions, and the compiler will not inline a closure there on
/// its own (it called it, compiled for the baseline): mark the closure `#[inline(always)]`,
/// and put the loop itself in it: a function it calls runs compiled for the baseline unless
/// it is inlined too (the helpers these loops call are `#[inline(always)]` for that).
///
/// ```
/// use moonlight_ref::cpu::vectorized;
///
/// let (x, mut y) = (vec![1.0f32; 1000], vec![2.0f32; 1000]);
/// vectorized(#[inline(always)] || {
///     for (y, &x) in y.iter_mut().zip(&x) {
///         *y += 3.0 * x;
///     }
/// });
/// assert!(y.iter().all(|&v| v == 5.0));
/// ```
#[inline(always)]
pub fn vectorized<R>(body: impl FnOnce() -> R) -> R {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `simd_level` returns AVX-512 only where `detect` found every feature the
        // wrapper enables (or `set_simd_level` checked it the same way).
        SimdLevel::Avx512 => unsafe { avx512(body) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        SimdLevel::Avx2 => unsafe { avx2(body) },
        _ => body(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn avx512<R>(body: impl FnOnce() -> R) -> R {
    body()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(body: impl FnOnce() -> R) -> R {
    body()
}
