//! AdamW for the parameters Muon is not for: embeddings, the LM head, norm gains, biases.
//!
//! ```text
//! m = beta1 m + (1 - beta1) g          v = beta2 v + (1 - beta2) g^2
//! W = (1 - lr wd) W - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
//! ```

use crate::{AdamWCoefficients, Backend, Error, Real, Result};

/// AdamW's hyperparameters (the learning rate comes per step from a schedule).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AdamWConfig {
    /// First-moment decay (Moonlight: 0.9).
    pub beta1: f64,
    /// Second-moment decay (Moonlight: 0.95).
    pub beta2: f64,
    /// Denominator guard (1e-8).
    pub eps: f64,
    /// Decoupled weight decay, multiplied by lr (Moonlight: 0.1, the same as Muon's).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

impl AdamWConfig {
    /// Checks that the configuration can work.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: &str| Err(Error::InvalidConfig(msg.into()));
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("adamw.beta1 and adamw.beta2 must be in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("adamw.eps must be finite and > 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("adamw.weight_decay must be finite and >= 0");
        }
        Ok(())
    }

    /// The elementwise constants of step `t` (counting from 1).
    pub fn coefficients<T: Real>(&self, t: u64) -> AdamWCoefficients<T> {
        AdamWCoefficients {
            beta1: T::from_f64(self.beta1),
            beta2: T::from_f64(self.beta2),
            eps: T::from_f64(self.eps),
            bias_correction1: T::from_f64(1.0 - libm::pow(self.beta1, t as f64)),
            bias_correction2: T::from_f64(1.0 - libm::pow(self.beta2, t as f64)),
        }
    }
}

/// One AdamW step (number `t`, from 1) on one parameter. `dir` is scratch of the parameter's
/// shape; on return it holds the update direction before `lr`. Allocates nothing.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step<B: Backend>(
    backend: &B,
    param: &mut B::Matrix,
    grad: &B::Matrix,
    m: &mut B::Matrix,
    v: &mut B::Matrix,
    dir: &mut B::Matrix,
    config: &AdamWConfig,
    t: u64,
    lr: f64,
) -> Result<()> {
    backend.adamw_direction(dir, grad, m, v, &config.coefficients(t))?;
    let e = |x: f64| B::Elem::from_f64(x);
    backend.apply_update(param, dir, e(lr), e(lr * config.weight_decay))
}
