//! Muon, as the Moonlight report defines it (docs/DESIGN.md §1).
//!
//! ```text
//! M_t = mu * M_{t-1} + G_t                 momentum as a sum (not an EMA; the Frobenius
//! N_t = mu * M_t + G_t                     normalization removes the 1/(1-mu) difference)
//! O_t = NewtonSchulz(N_t)
//! W_t = (1 - lr * wd) * W_{t-1} - lr * scale(A, B) * O_t
//! ```
//!
//! Weight decay is decoupled and uses the base `lr`, not the scaled one (the report's fix 1);
//! `scale` is the update-scale rule (fix 2), see [`UpdateScale`].

use crate::{newton_schulz, Backend, Error, NewtonSchulz, NsWorkspace, Real, Result, Shape};

/// How Muon scales the orthogonalized update `O` of an `A x B` matrix. The RMS of `O` is about
/// `sqrt(1 / max(A, B))` (its singular values are near 1), so each rule fixes the update RMS.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum UpdateScale {
    /// Moonlight: `rms * sqrt(max(A, B))`, which makes the update RMS equal `rms` (0.2 is
    /// AdamW's typical update RMS, so AdamW's lr and weight decay carry over unchanged).
    MatchAdamW {
        /// The update RMS to match; Moonlight uses 0.2.
        rms: f64,
    },
    /// Keller Jordan's Muon: `sqrt(max(1, A / B))`.
    AspectRatio,
    /// No scaling: `1`.
    Unit,
    /// A fixed factor.
    Custom(f64),
}

impl Default for UpdateScale {
    fn default() -> Self {
        UpdateScale::MatchAdamW { rms: 0.2 }
    }
}

impl UpdateScale {
    /// The factor for one `rows x cols` matrix.
    pub fn factor(&self, rows: usize, cols: usize) -> f64 {
        let (a, b) = (rows as f64, cols as f64);
        match *self {
            UpdateScale::MatchAdamW { rms } => rms * libm::sqrt(a.max(b)),
            UpdateScale::AspectRatio => libm::sqrt((a / b).max(1.0)),
            UpdateScale::Unit => 1.0,
            UpdateScale::Custom(f) => f,
        }
    }
}

/// Muon's hyperparameters (all but the learning rate, which a schedule supplies per step).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MuonConfig {
    /// Momentum coefficient `mu` (Moonlight: 0.95).
    pub momentum: f64,
    /// Nesterov look-ahead (Moonlight: on).
    pub nesterov: bool,
    /// Decoupled weight decay, multiplied by the base lr (Moonlight: 0.1).
    pub weight_decay: f64,
    /// The update-scale rule (Moonlight: `MatchAdamW { rms: 0.2 }`).
    pub update_scale: UpdateScale,
    /// The orthogonalization (Moonlight: the fixed quintic, 5 steps).
    pub newton_schulz: NewtonSchulz,
}

impl Default for MuonConfig {
    fn default() -> Self {
        MuonConfig {
            momentum: 0.95,
            nesterov: true,
            weight_decay: 0.1,
            update_scale: UpdateScale::default(),
            newton_schulz: NewtonSchulz::default(),
        }
    }
}

impl MuonConfig {
    /// Checks that the configuration can work.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: &str| Err(Error::InvalidConfig(msg.into()));
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("muon.momentum must be in [0, 1)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("muon.weight_decay must be finite and >= 0");
        }
        let scale_ok = match self.update_scale {
            UpdateScale::MatchAdamW { rms } => rms.is_finite() && rms > 0.0,
            UpdateScale::Custom(f) => f.is_finite() && f > 0.0,
            UpdateScale::AspectRatio | UpdateScale::Unit => true,
        };
        if !scale_ok {
            return bad("muon.update_scale must have a finite factor > 0");
        }
        self.newton_schulz.validate()
    }

    /// The update-scale factor of a parameter of shape `shape` (each matrix of a stack is
    /// `shape.rows x shape.cols`).
    pub fn scale(&self, shape: Shape) -> f64 {
        self.update_scale.factor(shape.rows, shape.cols)
    }

    /// The rates one step applies to a parameter of shape `shape` with base learning rate
    /// `lr`: `(step, decay) = (lr * scale, lr * weight_decay)`, for
    /// `W = (1 - decay) W - step O`. The decay takes the base lr, not the scaled one (the
    /// report's fix 1). The single place these are computed, so every optimizer applies the
    /// same bits.
    ///
    /// ```
    /// use muon_core::{MuonConfig, Shape, UpdateScale};
    /// let config = MuonConfig { update_scale: UpdateScale::AspectRatio, ..MuonConfig::default() };
    /// // sqrt(400 / 100) = 2; weight decay 0.1.
    /// assert_eq!(config.rates(0.01, Shape::matrix(400, 100)), (0.02, 0.001));
    /// ```
    pub fn rates(&self, lr: f64, shape: Shape) -> (f64, f64) {
        (lr * self.scale(shape), lr * self.weight_decay)
    }
}

/// One Muon step on one parameter (or stack of expert matrices, each treated independently).
///
/// `ws` must have been made for the parameter's shape; on return `ws.x` holds `O_t`, the
/// orthogonalized update before scaling. Shapes are the caller's to check (the
/// [`HybridOptimizer`](crate::HybridOptimizer) does); allocates nothing.
pub fn muon_step<B: Backend>(
    backend: &B,
    param: &mut B::Matrix,
    grad: &B::Matrix,
    momentum: &mut B::Matrix,
    ws: &mut NsWorkspace<B>,
    config: &MuonConfig,
    lr: f64,
) -> Result<()> {
    let e = |v: f64| B::Elem::from_f64(v);
    backend.momentum_nesterov(momentum, grad, e(config.momentum), config.nesterov, &mut ws.x)?;
    newton_schulz(backend, &config.newton_schulz, ws)?;
    let (step, decay) = config.rates(lr, B::shape(param));
    backend.apply_update(param, &ws.x, e(step), e(decay))
}
