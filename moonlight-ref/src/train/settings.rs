//! What a run is: the settings that fix its arithmetic, the options around them, and the
//! defaults that the library and the command line share.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use muon_core::{HybridConfig, LrSchedule, OptimizerKind, ParamSpec, Precision};
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::config::{Attention, ModelConfig};
use crate::data::DataSource;

/// The defaults of a run, shared by [`RunSettings::new`], [`TrainOptions::new`] and the
/// command line. Muon's and AdamW's own defaults (momentum 0.95, weight decay 0.1, ...) are
/// muon-core's [`HybridConfig::default`], Moonlight's recipe.
pub mod defaults {
    /// Steps (about a minute for `tiny` on two cores).
    pub const STEPS: u64 = 500;
    /// The base learning rate, the same for both optimizers as in Moonlight: the best of
    /// AdamW's sweep on `tiny` (3e-3, 1e-2, 2e-2, 4e-2 at 300 steps; see the README).
    pub const LR: f64 = 1e-2;
    /// Linear warm-up steps before the cosine decay.
    pub const WARMUP: u64 = 30;
    /// Sequences per batch, B.
    pub const BATCH: usize = 16;
    /// Tokens per sequence, T.
    pub const SEQ: usize = 64;
    /// The seed of the initialization and the data order.
    pub const SEED: u64 = 1;
    /// Evaluate every this many steps.
    pub const EVAL_EVERY: u64 = 50;
    /// Batches per evaluation.
    pub const EVAL_BATCHES: usize = 8;
    /// Save a checkpoint every this many steps (when the run has an output directory).
    pub const CHECKPOINT_EVERY: u64 = 100;
    /// The products' arithmetic: f32 (the README's "bf16 products" section says why).
    pub const PRECISION: muon_core::Precision = muon_core::Precision::F32;
}

/// Which optimizer steps the hidden matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerChoice {
    /// muon-core's hybrid: Muon for hidden matrices (expert stacks as batches), AdamW for
    /// embeddings, the LM head and norm gains.
    Muon,
    /// AdamW for every parameter.
    AdamW,
}

impl fmt::Display for OptimizerChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerChoice::Muon => "muon",
            OptimizerChoice::AdamW => "adamw",
        })
    }
}

/// Everything that fixes the arithmetic of a run. Saved in every checkpoint; a resume must
/// match it exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// The preset the model came from, for logs.
    pub preset: String,
    /// The model.
    pub model: ModelConfig,
    /// Muon (hybrid) or AdamW everywhere.
    pub optimizer: OptimizerChoice,
    /// Muon's and AdamW's hyperparameters (momentum, Nesterov, weight decay, update scale,
    /// Newton-Schulz; betas, eps).
    pub hybrid: HybridConfig,
    /// Base learning rate (the same for Muon and AdamW, as Moonlight).
    pub lr: f64,
    /// Linear warm-up steps; then the lr decays by a cosine to 0.1x at the last step
    /// (Moonlight's schedule scaled to the run, see [`schedule`](Self::schedule)).
    pub warmup: u64,
    /// Steps in the run.
    pub steps: u64,
    /// Sequences per batch, B.
    pub batch: usize,
    /// Tokens per sequence, T.
    pub seq: usize,
    /// Fixes the initialization and the data order.
    pub seed: u64,
    /// The arithmetic of every matrix product of the forward and backward passes (dense
    /// layers, attention scores and values, the grouped expert GEMMs, the weight gradients)
    /// and of Newton-Schulz: `f32`, or `bf16` inputs with `f32` accumulation. Master weights,
    /// gradients, norms, softmax, the router, the loss and the optimizer state are `f32`
    /// either way. Runs saved before the setting existed were `f32`.
    #[serde(default)]
    pub precision: Precision,
}

impl RunSettings {
    /// The defaults of `moonlight-ref train` for a model: Moonlight's recipe (wd 0.1, update
    /// RMS matched to AdamW, warm-up then cosine to 0.1x) at a size that trains in minutes.
    pub fn new(preset: &str, model: ModelConfig, optimizer: OptimizerChoice) -> RunSettings {
        RunSettings {
            preset: preset.to_string(),
            model,
            optimizer,
            hybrid: HybridConfig::default(),
            lr: defaults::LR,
            warmup: defaults::WARMUP,
            steps: defaults::STEPS,
            batch: defaults::BATCH,
            seq: defaults::SEQ,
            seed: defaults::SEED,
            precision: defaults::PRECISION,
        }
    }

    /// The lr schedule, a multiple of [`lr`](Self::lr) per step: `warmup` linear steps, then
    /// cosine decay to 0.1x at `steps`.
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule::moonlight(self.warmup, self.steps)
    }

    /// Checks the settings before anything is allocated; the message names the option.
    pub fn validate(&self) -> Result<(), TrainError> {
        self.model.validate().map_err(TrainError::Config)?;
        if self.steps == 0 || self.batch == 0 || self.seq == 0 {
            return Err(TrainError::Config(
                "--steps, --batch and --seq must be at least 1".into(),
            ));
        }
        if self.batch.checked_mul(self.seq + 1).is_none() {
            return Err(TrainError::Config(format!(
                "--batch {} x --seq {} tokens per step overflows",
                self.batch, self.seq
            )));
        }
        if self.seq > self.model.max_seq_len {
            return Err(TrainError::Config(format!(
                "--seq {} is longer than the model's max_seq_len {}",
                self.seq, self.model.max_seq_len
            )));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainError::Config(format!(
                "--lr {} must be finite and > 0",
                self.lr
            )));
        }
        if self.warmup > self.steps {
            return Err(TrainError::Config(format!(
                "the warm-up (--warmup {}) must not exceed the run (--steps {})",
                self.warmup, self.steps
            )));
        }
        if self.precision == Precision::Tf32 {
            return Err(TrainError::Config(
                "--precision tf32 is a GPU format (a CPU has no TF32 units): use f32 or bf16".into(),
            ));
        }
        self.hybrid.muon.validate()?;
        self.hybrid.adamw.validate()?;
        Ok(())
    }

    /// The parameter list the optimizer gets: the model's, all forced to AdamW for `adamw`.
    pub fn optimizer_specs(&self, model_specs: Vec<ParamSpec>) -> Vec<ParamSpec> {
        match self.optimizer {
            OptimizerChoice::Muon => model_specs,
            OptimizerChoice::AdamW => model_specs
                .into_iter()
                .map(|s| s.with_optimizer(OptimizerKind::AdamW))
                .collect(),
        }
    }
}

/// `config` with its attention switched to `mha` or MLA (`mla = true`). MLA sizes not given
/// by the config follow Moonlight's proportions: latent `4 * head_dim` (512 = 4 * 128),
/// no-RoPE and value parts `head_dim`, RoPE part `head_dim / 2`.
pub fn with_attention(mut config: ModelConfig, mla: bool) -> ModelConfig {
    match (&config.attention, mla) {
        (Attention::Mha, true) => {
            let d = config.head_dim;
            config.attention = Attention::Mla {
                kv_lora_rank: 4 * d,
                qk_nope_head_dim: d,
                qk_rope_head_dim: (d / 2).max(2),
                v_head_dim: d,
            };
        }
        (Attention::Mla { .. }, false) => config.attention = Attention::Mha,
        _ => {}
    }
    config
}

/// A run: the settings plus where the data comes from and what to write.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The arithmetic of the run.
    pub settings: RunSettings,
    /// The tokens.
    pub data: DataSource,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Batches per evaluation.
    pub eval_batches: usize,
    /// Directory for `log.jsonl` and `checkpoint.safetensors`; `None` writes nothing.
    pub out: Option<PathBuf>,
    /// Checkpoint to continue from.
    pub resume: Option<PathBuf>,
    /// Checkpoint whose weights (parameters and router biases) a fresh run starts from instead
    /// of a random initialization: a `train` or `import` checkpoint of the same model
    /// configuration. The optimizer starts afresh at step 0. With `resume` as well, the resumed
    /// checkpoint's weights win (the run started from `init` and went on).
    pub init: Option<PathBuf>,
    /// Save a checkpoint every this many steps (0: only at the end), when `out` is set.
    pub checkpoint_every: u64,
    /// Stop after this step (saving a checkpoint there), as if interrupted; `--resume`
    /// continues. The schedule still runs to `settings.steps`.
    pub stop_at: Option<u64>,
    /// Draw a progress bar and evaluation lines on stderr.
    pub progress: bool,
    /// Start a fresh run in an `out` that holds one, removing its checkpoint and log.
    pub overwrite: bool,
    /// Set from outside (a signal handler) to stop the run after the step in progress, with a
    /// checkpoint there that `--resume` continues.
    pub interrupt: Option<Arc<AtomicBool>>,
}

impl TrainOptions {
    /// Options for `settings` on the embedded corpus with the default evaluations and
    /// checkpoint interval, writing nothing (`out` is `None`) and drawing no progress.
    pub fn new(settings: RunSettings) -> TrainOptions {
        TrainOptions {
            settings,
            data: DataSource::Embedded,
            eval_every: defaults::EVAL_EVERY,
            eval_batches: defaults::EVAL_BATCHES,
            out: None,
            resume: None,
            init: None,
            checkpoint_every: defaults::CHECKPOINT_EVERY,
            stop_at: None,
            progress: false,
            overwrite: false,
            interrupt: None,
        }
    }

    /// Whether [`interrupt`](Self::interrupt) was set.
    pub fn interrupted(&self) -> bool {
        self.interrupt
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }

    /// Checks the options and the settings before anything is allocated or written; the
    /// message names the option.
    pub fn validate(&self) -> Result<(), TrainError> {
        self.settings.validate()?;
        if self.eval_batches == 0 {
            return Err(TrainError::Config("--eval-batches must be at least 1".into()));
        }
        if let Some(stop) = self.stop_at {
            if stop == 0 || stop > self.settings.steps {
                return Err(TrainError::Config(format!(
                    "--stop-at {stop} must be between 1 and --steps {}",
                    self.settings.steps
                )));
            }
        }
        if self.resume.is_some() && self.overwrite {
            return Err(TrainError::Config(
                "--resume continues a run and --overwrite replaces one: pass one of them".into(),
            ));
        }
        Ok(())
    }
}
