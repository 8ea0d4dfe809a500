//! Learning-rate schedules: pure functions of the step.

use crate::{Error, Result};

/// The learning rate as a function of the step (counting from 0), as a multiple of the base
/// rate. Moonlight: 2,000 warm-up steps, then cosine decay to 0.1x.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum LrSchedule {
    /// The base rate at every step.
    Constant,
    /// Linear warm-up from 0 over `warmup` steps, then cosine decay from 1 to `floor` at
    /// step `total`, and `floor` after.
    WarmupCosine {
        /// Warm-up steps.
        warmup: u64,
        /// Step at which the decay reaches `floor`.
        total: u64,
        /// Final multiple of the base rate (Moonlight: 0.1).
        floor: f64,
    },
    /// Warm-up, stable, decay: linear warm-up over `warmup` steps, the base rate until
    /// `total - decay`, then linear decay to `floor` at `total`.
    WarmupStableDecay {
        /// Warm-up steps.
        warmup: u64,
        /// Total steps.
        total: u64,
        /// Length of the final decay.
        decay: u64,
        /// Final multiple of the base rate.
        floor: f64,
    },
}

impl LrSchedule {
    /// Moonlight's schedule scaled to a run of `total` steps with `warmup` warm-up steps.
    pub fn moonlight(warmup: u64, total: u64) -> Self {
        LrSchedule::WarmupCosine {
            warmup,
            total,
            floor: 0.1,
        }
    }

    /// Checks that the schedule can work.
    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            LrSchedule::Constant => true,
            LrSchedule::WarmupCosine { warmup, total, floor } => {
                warmup <= total && (0.0..=1.0).contains(&floor)
            }
            LrSchedule::WarmupStableDecay {
                warmup,
                total,
                decay,
                floor,
            } => warmup.saturating_add(decay) <= total && (0.0..=1.0).contains(&floor),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig(alloc::format!(
                "lr schedule {self:?}: warm-up (plus decay) must fit in the total and the floor must be in [0, 1]"
            )))
        }
    }

    /// The multiple of the base rate at `step` (from 0). Warm-up reaches 1 at step `warmup`.
    pub fn factor(&self, step: u64) -> f64 {
        let warm = |warmup: u64| (step as f64 + 1.0) / (warmup as f64 + 1.0);
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::WarmupCosine { warmup, total, floor } => {
                if step < warmup {
                    warm(warmup)
                } else if step >= total {
                    floor
                } else {
                    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
                    floor + (1.0 - floor) * 0.5 * (1.0 + libm::cos(core::f64::consts::PI * progress))
                }
            }
            LrSchedule::WarmupStableDecay {
                warmup,
                total,
                decay,
                floor,
            } => {
                let decay_start = total.saturating_sub(decay);
                if step < warmup {
                    warm(warmup)
                } else if step < decay_start {
                    1.0
                } else if step >= total {
                    floor
                } else {
                    let progress = (step - decay_start) as f64 / decay.max(1) as f64;
                    1.0 - (1.0 - floor) * progress
                }
            }
        }
    }

    /// `base * factor(step)`.
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        base * self.factor(step)
    }
}
