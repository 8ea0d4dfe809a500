//! The training loop: data, model, optimizer, schedule, evaluation, logging, checkpoints.
//!
//! One step, as llm.c writes it:
//! ```text
//! sampler.next_batch(train, tokens, targets)     B random windows of T+1 tokens
//! loss = model.forward(tokens, targets)          mean cross-entropy; stop if not finite
//! model.backward()                               grads = d loss / d params
//! optimizer.step(params, grads, lr(step))        Muon for hidden matrices, AdamW for the rest
//! model.update_router_bias()                     auxiliary-loss-free balancing
//! ```
//!
//! Everything that fixes the arithmetic of a run is a [`RunSettings`]; a checkpoint stores it,
//! with the parameters, the optimizer state, the router biases and the sampler's state, and
//! `--resume` refuses a checkpoint whose settings differ, so a resumed run takes, step for
//! step, the same losses as one that never stopped.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use muon_core::{
    HybridConfig, HybridOptimizer, LrSchedule, OptimizerKind, OptimizerState, ParamRole, ParamSpec, Shape,
};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoint, CheckpointError, Tensor};
use crate::config::{Attention, ModelConfig};
use crate::data::{BatchSampler, DataError, DataSource, Dataset};
use crate::log::{EvalRecord, Record, RunLog, StepRecord, Summary};
use crate::model::{Model, ModelError};
use crate::ops::ModelOps;

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
    /// The preset the model came from (or `custom`), for logs.
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
    /// The lr schedule, a multiple of `lr` per step.
    pub schedule: LrSchedule,
    /// Steps in the run.
    pub steps: u64,
    /// Sequences per batch, B.
    pub batch: usize,
    /// Tokens per sequence, T.
    pub seq: usize,
    /// Fixes the initialization and the data order.
    pub seed: u64,
}

impl RunSettings {
    /// The defaults of `moonlight-ref train` for a model: Moonlight's recipe (wd 0.1, update
    /// RMS matched to AdamW, warm-up then cosine to 0.1x) at a size that trains in minutes.
    pub fn new(preset: &str, model: ModelConfig, optimizer: OptimizerChoice) -> RunSettings {
        let steps = DEFAULT_STEPS;
        let mut hybrid = HybridConfig::default();
        hybrid.muon.weight_decay = 0.1;
        hybrid.adamw.weight_decay = 0.1;
        RunSettings {
            preset: preset.to_string(),
            model,
            optimizer,
            hybrid,
            lr: DEFAULT_LR,
            schedule: LrSchedule::moonlight(DEFAULT_WARMUP, steps),
            steps,
            batch: 16,
            seq: 64,
            seed: 1,
        }
    }
}

/// The default number of steps (about a minute for `tiny` on two cores).
pub const DEFAULT_STEPS: u64 = 500;
/// The default base learning rate, the same for both optimizers as in Moonlight: the best of
/// AdamW's sweep on `tiny` (3e-3, 1e-2, 2e-2, 4e-2 at 300 steps; see the README).
pub const DEFAULT_LR: f64 = 1e-2;
/// The default warm-up steps.
pub const DEFAULT_WARMUP: u64 = 30;

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
    /// Save a checkpoint every this many steps (0: only at the end); needs `out`.
    pub checkpoint_every: u64,
    /// Stop after this step (saving a checkpoint there), as if interrupted; `--resume`
    /// continues. The schedule still runs to `settings.steps`.
    pub stop_at: Option<u64>,
    /// Draw a progress bar and evaluation lines on stderr.
    pub progress: bool,
}

impl TrainOptions {
    /// Options for `settings` on the embedded corpus, evaluating every 50 steps, writing
    /// nothing.
    pub fn new(settings: RunSettings) -> TrainOptions {
        TrainOptions {
            settings,
            data: DataSource::Embedded,
            eval_every: 50,
            eval_batches: 8,
            out: None,
            resume: None,
            checkpoint_every: 0,
            stop_at: None,
            progress: false,
        }
    }
}

/// Why a run stopped early.
#[derive(Debug)]
pub enum TrainError {
    /// Options that cannot work.
    Config(String),
    /// The data.
    Data(DataError),
    /// A checkpoint that cannot be read or does not fit this run.
    Checkpoint(CheckpointError),
    /// The model refused its input or its backend failed.
    Model(ModelError),
    /// The optimizer refused its input.
    Optimizer(muon_core::Error),
    /// A file could not be written.
    Io(String),
    /// The loss or a gradient went NaN or infinite at `step`; the run stopped there, nothing
    /// was saved after the last good step.
    NonFinite {
        /// The step (from 1) whose loss or gradient was not finite.
        step: u64,
        /// What was not finite.
        what: String,
        /// The last checkpoint written, and its step, if any.
        last_checkpoint: Option<(PathBuf, u64)>,
    },
}

impl fmt::Display for TrainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainError::Config(msg) => write!(f, "invalid configuration: {msg}"),
            TrainError::Data(e) => write!(f, "data: {e}"),
            TrainError::Checkpoint(e) => write!(f, "checkpoint: {e}"),
            TrainError::Model(e) => write!(f, "model: {e}"),
            TrainError::Optimizer(e) => write!(f, "optimizer: {e}"),
            TrainError::Io(msg) => f.write_str(msg),
            TrainError::NonFinite {
                step,
                what,
                last_checkpoint,
            } => {
                write!(f, "{what} is not finite at step {step}; training stopped")?;
                match last_checkpoint {
                    Some((path, s)) => write!(
                        f,
                        "; the last good checkpoint is {} (step {s}), untouched",
                        path.display()
                    ),
                    None => write!(f, "; no checkpoint was written"),
                }
            }
        }
    }
}

impl std::error::Error for TrainError {}

impl From<DataError> for TrainError {
    fn from(e: DataError) -> Self {
        TrainError::Data(e)
    }
}
impl From<CheckpointError> for TrainError {
    fn from(e: CheckpointError) -> Self {
        TrainError::Checkpoint(e)
    }
}
impl From<ModelError> for TrainError {
    fn from(e: ModelError) -> Self {
        TrainError::Model(e)
    }
}
impl From<muon_core::Error> for TrainError {
    fn from(e: muon_core::Error) -> Self {
        TrainError::Optimizer(e)
    }
}

/// The file names inside `--out`.
pub const LOG_FILE: &str = "log.jsonl";
/// The checkpoint inside `--out`, overwritten atomically at each save.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// What a finished run returns: its summary and every step's loss (this process's steps).
#[derive(Clone, Debug)]
pub struct RunResult {
    /// The summary line of the log.
    pub summary: Summary,
    /// `(step, loss)` for each step this process took.
    pub losses: Vec<(u64, f64)>,
    /// `(step, val_loss)` for each evaluation.
    pub val_losses: Vec<(u64, f64)>,
}

/// Salt that separates the evaluation batches' seed from the training seed.
const EVAL_SEED_SALT: u64 = 0x5eed_0fe7_a100_0000;

/// The parameter list the optimizer gets: the model's, all forced to AdamW for `adamw`.
pub fn optimizer_specs(model_specs: Vec<ParamSpec>, choice: OptimizerChoice) -> Vec<ParamSpec> {
    match choice {
        OptimizerChoice::Muon => model_specs,
        OptimizerChoice::AdamW => model_specs
            .into_iter()
            .map(|s| s.with_optimizer(OptimizerKind::AdamW))
            .collect(),
    }
}

/// Checks the settings before anything is allocated.
pub fn validate(settings: &RunSettings) -> Result<(), TrainError> {
    let s = settings;
    s.model.validate().map_err(TrainError::Config)?;
    if s.steps == 0 || s.batch == 0 || s.seq == 0 {
        return Err(TrainError::Config(
            "--steps, --batch and --seq must be at least 1".into(),
        ));
    }
    if s.seq > s.model.max_seq_len {
        return Err(TrainError::Config(format!(
            "--seq {} is longer than the model's max_seq_len {}",
            s.seq, s.model.max_seq_len
        )));
    }
    if !(s.lr.is_finite() && s.lr > 0.0) {
        return Err(TrainError::Config(format!(
            "--lr {} must be finite and > 0",
            s.lr
        )));
    }
    if s.schedule.validate().is_err() {
        return Err(TrainError::Config(format!(
            "the lr schedule {:?} cannot work: the warm-up (--warmup) must not exceed the run (--steps)",
            s.schedule
        )));
    }
    s.hybrid.muon.validate()?;
    s.hybrid.adamw.validate()?;
    Ok(())
}

/// Mean cross-entropy over `batches` fixed batches of the held-out split.
pub fn evaluate<B: ModelOps<Elem = f32>>(
    backend: &B,
    model: &mut Model<B>,
    val: &[u16],
    settings: &RunSettings,
    batches: usize,
    tokens: &mut [u32],
    targets: &mut [u32],
) -> Result<f64, TrainError> {
    // A fresh sampler each time: every evaluation sees the same windows, and the training
    // sampler is not touched.
    let mut sampler = BatchSampler::new(settings.seed ^ EVAL_SEED_SALT, settings.batch, settings.seq);
    let mut sum = 0.0;
    for _ in 0..batches.max(1) {
        sampler.next_batch(val, tokens, targets);
        sum += model.forward(backend, tokens, targets)?;
    }
    Ok(sum / batches.max(1) as f64)
}

/// The model's and optimizer's state as a checkpoint.
fn snapshot<B: ModelOps<Elem = f32>>(
    backend: &B,
    model: &Model<B>,
    optimizer: &HybridOptimizer<B>,
    settings: &RunSettings,
    data: &Dataset,
    step: u64,
    sampler: &BatchSampler,
) -> Result<Checkpoint, TrainError> {
    let mut params = Vec::new();
    for (spec, p) in optimizer.specs().iter().zip(model.params()) {
        let mut data = vec![0.0f32; spec.shape.len()];
        backend.download(p, &mut data)?;
        params.push(Tensor {
            name: spec.name.clone(),
            shape: spec.shape,
            data,
        });
    }
    let buffers = model
        .buffers(backend)?
        .into_iter()
        .map(|(name, shape, data)| Tensor { name, shape, data })
        .collect();
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("run".into(), to_json(settings));
    metadata.insert("config".into(), to_json(&settings.model));
    metadata.insert("optimizer".into(), settings.optimizer.to_string());
    metadata.insert("step".into(), step.to_string());
    metadata.insert("seed".into(), settings.seed.to_string());
    metadata.insert("sampler_state".into(), sampler.state().to_string());
    metadata.insert("data".into(), data.name.clone());
    metadata.insert("data_fingerprint".into(), data.fingerprint.to_string());
    Ok(Checkpoint {
        metadata,
        params,
        buffers,
        optimizer: optimizer.export_state(backend)?,
    })
}

/// JSON of the settings types (plain structs with string keys: serializing cannot fail).
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("settings serialize to JSON")
}

/// `json` read as a `T` and written again, so fields it lacks get their serde defaults (the
/// text unchanged if it is not a `T`).
fn with_defaults<T: Serialize + serde::de::DeserializeOwned>(json: &str) -> String {
    serde_json::from_str::<T>(json).map_or_else(|_| json.to_string(), |v| to_json(&v))
}

/// The fields of two JSON objects that differ, as `name (checkpoint X, now Y)`.
fn json_differences(saved: &str, now: &str) -> Vec<String> {
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or(serde_json::Value::Null);
    match (parse(saved), parse(now)) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .map(|k| {
                    let show =
                        |v: Option<&serde_json::Value>| v.map_or("absent".to_string(), |v| v.to_string());
                    format!("{k} (checkpoint {}, now {})", show(a.get(k)), show(b.get(k)))
                })
                .collect()
        }
        _ => vec![format!("checkpoint {saved}, now {now}")],
    }
}

/// Loads a checkpoint into the model and optimizer after checking it belongs to this run.
/// Returns the step it was taken at and the sampler's state then.
fn restore<B: ModelOps<Elem = f32>>(
    backend: &B,
    path: &Path,
    model: &mut Model<B>,
    optimizer: &mut HybridOptimizer<B>,
    settings: &RunSettings,
    data: &Dataset,
) -> Result<(u64, u64), TrainError> {
    let ckpt = checkpoint::load(path)?;
    let file = path.display();
    let bad = |msg: String| TrainError::Checkpoint(CheckpointError(format!("{file}: {msg}")));
    let meta = |key: &str| {
        ckpt.metadata.get(key).ok_or_else(|| {
            bad(format!(
                "no `{key}` metadata: not written by `moonlight-ref train`"
            ))
        })
    };
    let number = |key: &str| -> Result<u64, TrainError> {
        meta(key)?
            .parse()
            .map_err(|_| bad(format!("`{key}` metadata is not a number")))
    };

    // The run must be the same run: model, optimizer, schedule, batch, seed.
    // Settings added since the checkpoint was written take their defaults (a round trip
    // through `RunSettings` fills them in), so older checkpoints of the same run still match.
    let now = to_json(settings);
    let saved = &with_defaults::<RunSettings>(meta("run")?);
    if *saved != now {
        let saved_model = with_defaults::<ModelConfig>(meta("config")?);
        let model_diff = json_differences(&saved_model, &to_json(&settings.model));
        let diff = if model_diff.is_empty() {
            json_differences(saved, &now)
        } else {
            model_diff.into_iter().map(|d| format!("model.{d}")).collect()
        };
        return Err(bad(format!(
            "it was written by a run with other settings: {}; resume with the options of that run",
            diff.join(", ")
        )));
    }
    if number("data_fingerprint")? != data.fingerprint {
        return Err(bad(format!(
            "it was trained on other data ({}), not {}",
            meta("data")?,
            data.name
        )));
    }
    let step = number("step")?;
    let sampler_state = number("sampler_state")?;
    if step != ckpt.optimizer.step {
        return Err(bad(format!(
            "its step {step} and its optimizer's step {} differ",
            ckpt.optimizer.step
        )));
    }

    // Parameters: same names, order and shapes as the model.
    let specs = optimizer.specs();
    if ckpt.params.len() != specs.len() {
        return Err(bad(format!(
            "it holds {} parameters, the model has {}",
            ckpt.params.len(),
            specs.len()
        )));
    }
    for (spec, t) in specs.iter().zip(&ckpt.params) {
        if t.name != spec.name {
            return Err(bad(format!(
                "found parameter `{}` where `{}` belongs",
                t.name, spec.name
            )));
        }
        if t.shape != spec.shape {
            return Err(bad(format!(
                "parameter `{}` has shape {}, the model expects {}",
                t.name, t.shape, spec.shape
            )));
        }
    }
    let expected_buffers = model.buffers(backend)?;
    if expected_buffers.len() != ckpt.buffers.len() {
        return Err(bad(format!(
            "it holds {} model buffers, the model has {}",
            ckpt.buffers.len(),
            expected_buffers.len()
        )));
    }
    for ((name, shape, _), t) in expected_buffers.iter().zip(&ckpt.buffers) {
        if *name != t.name || *shape != t.shape {
            return Err(bad(format!(
                "buffer `{}` {} where the model has `{name}` {shape}",
                t.name, t.shape
            )));
        }
    }
    let state: &OptimizerState<f32> = &ckpt.optimizer;
    optimizer
        .import_state(backend, state)
        .map_err(|e| bad(format!("{e}")))?;
    for (p, t) in model.params_mut().iter_mut().zip(&ckpt.params) {
        backend.upload(p, &t.data)?;
    }
    let buffers: Vec<(String, Shape, Vec<f32>)> = ckpt
        .buffers
        .iter()
        .map(|t| (t.name.clone(), t.shape, t.data.clone()))
        .collect();
    model.load_buffers(backend, &buffers)?;
    Ok((step, sampler_state))
}

/// Per MoE layer, the busiest expert's token count over the mean count, written into `out`
/// (cleared first; its capacity is reused, so a step allocates nothing here).
fn load_imbalance(loads: &[Vec<u32>], out: &mut Vec<f64>) {
    out.clear();
    out.extend(loads.iter().map(|layer| {
        let total: u64 = layer.iter().map(|&c| c as u64).sum();
        let max = layer.iter().copied().max().unwrap_or(0) as f64;
        if total == 0 {
            0.0
        } else {
            max / (total as f64 / layer.len() as f64)
        }
    }));
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Mean normalized SVD entropy (SPEC section 5) of the trained hidden matrices, every matrix of
/// an expert stack on its own, and of the routers alone. Runs once, after training.
fn svd_entropies<B: ModelOps<Elem = f32>>(
    backend: &B,
    model: &Model<B>,
) -> Result<(Option<f64>, Option<f64>), TrainError> {
    let (mut hidden, mut router) = (Vec::new(), Vec::new());
    for (spec, param) in model.param_specs().iter().zip(model.params()) {
        if spec.role != ParamRole::Hidden || !spec.shape.is_matrix() {
            continue;
        }
        let mut host = vec![0.0f32; spec.shape.len()];
        backend.download(param, &mut host)?;
        let (rows, cols) = (spec.shape.rows, spec.shape.cols);
        for item in host.chunks_exact(rows * cols) {
            let matrix = faer::Mat::<f64>::from_fn(rows, cols, |i, j| item[i * cols + j] as f64);
            // An SVD that does not converge only leaves this matrix out of a diagnostic.
            let Some(h) = matrix
                .singular_values()
                .ok()
                .and_then(|s| muon_core::svd_entropy(&s))
            else {
                continue;
            };
            if spec.name.ends_with(".router") {
                router.push(h);
            } else {
                hidden.push(h);
            }
        }
    }
    Ok((mean(hidden.into_iter()), mean(router.into_iter())))
}

/// Trains a model as `opts` says, on `backend`. Returns the summary and the losses.
pub fn train<B: ModelOps<Elem = f32>>(backend: &B, opts: &TrainOptions) -> Result<RunResult, TrainError> {
    let wall = Instant::now();
    let settings = &opts.settings;
    validate(settings)?;
    let (b, t) = (settings.batch, settings.seq);
    let data = Dataset::load(&opts.data, t, settings.model.vocab_size)?;

    let mut model = Model::new(backend, settings.model.clone(), b, t, settings.seed)?;
    // Thread-local kernel workspaces now, so that no training step allocates them.
    backend.warm_up().map_err(ModelError::Backend)?;
    let specs = optimizer_specs(model.param_specs(), settings.optimizer);
    let mut optimizer = HybridOptimizer::new(backend, specs, settings.hybrid.clone())?;
    let mut sampler = BatchSampler::new(settings.seed, b, t);
    let mut start = 0;
    if let Some(path) = &opts.resume {
        let (step, sampler_state) = restore(backend, path, &mut model, &mut optimizer, settings, &data)?;
        if step >= settings.steps {
            return Err(TrainError::Config(format!(
                "checkpoint {} is at step {step}, the run has {} steps: nothing left to train",
                path.display(),
                settings.steps
            )));
        }
        start = step;
        sampler = BatchSampler::new(sampler_state, b, t);
    }

    let end = opts.stop_at.map_or(settings.steps, |s| s.min(settings.steps));
    if end <= start {
        return Err(TrainError::Config(format!(
            "--stop-at {end} is not past the checkpoint's step {start}"
        )));
    }

    // Output files.
    let mut log = None;
    let mut checkpoint_path = None;
    if let Some(dir) = &opts.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| TrainError::Io(format!("cannot create output directory {}: {e}", dir.display())))?;
        let path = dir.join(LOG_FILE);
        log = Some(
            RunLog::open(&path, opts.resume.is_some())
                .map_err(|e| TrainError::Io(format!("cannot open log {}: {e}", path.display())))?,
        );
        checkpoint_path = Some(dir.join(CHECKPOINT_FILE));
    }
    let mut write_log = |record: &Record| -> Result<(), TrainError> {
        match &mut log {
            Some(l) => l
                .write(record)
                .map_err(|e| TrainError::Io(format!("cannot write the log: {e}"))),
            None => Ok(()),
        }
    };
    let mut last_checkpoint: Option<(PathBuf, u64)> = opts.resume.as_ref().map(|p| (p.clone(), start));

    let progress = if opts.progress {
        let bar = ProgressBar::new(settings.steps);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}, eta {eta}]",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_position(start);
        bar
    } else {
        ProgressBar::hidden()
    };
    let say = |line: String| {
        if opts.progress {
            progress.suspend(|| eprintln!("{line}"));
        }
    };
    say(format!(
        "moonlight-ref: {} ({} params, {} active) with {} on {} ({} train / {} val tokens), B={b} T={t}, {} steps{}",
        settings.preset,
        settings.model.param_counts().total,
        settings.model.param_counts().active,
        settings.optimizer,
        data.name,
        data.train.len(),
        data.val.len(),
        settings.steps,
        if start > 0 { format!(", resuming at step {start}") } else { String::new() },
    ));

    let mut tokens = vec![0u32; b * t];
    let mut targets = vec![0u32; b * t];
    let mut rms = vec![0.0f64; optimizer.specs().len()];
    let kinds: Vec<OptimizerKind> = optimizer.specs().iter().map(|s| s.optimizer()).collect();
    let mut losses = Vec::with_capacity((end - start) as usize);
    let mut val_losses = Vec::with_capacity(1 + (end - start) as usize / opts.eval_every.max(1) as usize);
    let (mut fwd_bwd_s, mut optimizer_s) = (0.0f64, 0.0f64);
    let (mut bar_loss, mut bar_rate) = (0.0f64, 0.0f64);
    // The progress message is formatted (an allocation) at most 4 times a second, not per step.
    let mut bar_shown = Instant::now();
    // One step record, refilled every step: its load vector keeps its capacity.
    let mut step_record = Record::Step(StepRecord {
        step: 0,
        loss: 0.0,
        lr: 0.0,
        grad_norm: 0.0,
        update_rms_muon: None,
        update_rms_adamw: None,
        aux_loss: None,
        expert_load_max_over_mean: Vec::with_capacity(model.expert_load().len()),
        tokens_per_s: 0.0,
        fwd_bwd_ms: 0.0,
        optimizer_ms: 0.0,
    });

    for step in start..end {
        let number = step + 1; // the step being taken, from 1
        sampler.next_batch(&data.train, &mut tokens, &mut targets);

        let t0 = Instant::now();
        let loss = model.forward(backend, &tokens, &targets)?;
        if !loss.is_finite() {
            progress.abandon();
            return Err(TrainError::NonFinite {
                step: number,
                what: format!("the loss ({loss})"),
                last_checkpoint,
            });
        }
        model.backward(backend)?;
        let t1 = Instant::now();
        let lr = settings.schedule.lr(settings.lr, step);
        let (params, grads) = model.params_and_grads();
        let report = match optimizer.step(backend, params, grads, lr) {
            Ok(report) => report,
            Err(muon_core::Error::NonFiniteGradient { name, .. }) => {
                progress.abandon();
                return Err(TrainError::NonFinite {
                    step: number,
                    what: format!("the gradient of `{name}`"),
                    last_checkpoint,
                });
            }
            Err(e) => return Err(e.into()),
        };
        model.update_router_bias(backend)?;
        let t2 = Instant::now();
        let (dt_fb, dt_opt) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        fwd_bwd_s += dt_fb;
        optimizer_s += dt_opt;
        losses.push((number, loss));

        optimizer.update_rms(backend, &mut rms)?;
        let group =
            |k: OptimizerKind| mean(rms.iter().zip(&kinds).filter(|(_, &kk)| kk == k).map(|(r, _)| *r));
        let tokens_per_s = (b * t) as f64 / (dt_fb + dt_opt).max(1e-12);
        if let Record::Step(r) = &mut step_record {
            r.step = number;
            r.loss = loss;
            r.lr = lr;
            r.grad_norm = report.grad_norm;
            r.update_rms_muon = group(OptimizerKind::Muon);
            r.update_rms_adamw = group(OptimizerKind::AdamW);
            r.aux_loss = (settings.model.aux_loss_alpha > 0.0).then(|| model.aux_loss());
            load_imbalance(model.expert_load(), &mut r.expert_load_max_over_mean);
            r.tokens_per_s = tokens_per_s;
            r.fwd_bwd_ms = dt_fb * 1e3;
            r.optimizer_ms = dt_opt * 1e3;
        }
        write_log(&step_record)?;
        // The bar shows running means, steadier than one step's figures.
        let smooth = |old: f64, new: f64| {
            if number == start + 1 {
                new
            } else {
                0.9 * old + 0.1 * new
            }
        };
        (bar_loss, bar_rate) = (smooth(bar_loss, loss), smooth(bar_rate, tokens_per_s));
        if opts.progress {
            progress.set_position(number);
            if number == start + 1 || bar_shown.elapsed().as_secs_f64() >= 0.25 {
                progress.set_message(format!("loss {bar_loss:.3} | {bar_rate:.0} tok/s"));
                bar_shown = Instant::now();
            }
        }

        let last = number == end;
        if (opts.eval_every > 0 && number % opts.eval_every == 0) || last {
            let val_loss = evaluate(
                backend,
                &mut model,
                &data.val,
                settings,
                opts.eval_batches,
                &mut tokens,
                &mut targets,
            )?;
            val_losses.push((number, val_loss));
            write_log(&Record::Eval(EvalRecord {
                step: number,
                val_loss,
            }))?;
            say(format!(
                "step {number}: train loss {loss:.4}, val loss {val_loss:.4}"
            ));
        }
        if let Some(path) = &checkpoint_path {
            if (opts.checkpoint_every > 0 && number % opts.checkpoint_every == 0) || last {
                let ckpt = snapshot(backend, &model, &optimizer, settings, &data, number, &sampler)?;
                checkpoint::save(path, &ckpt)?;
                last_checkpoint = Some((path.clone(), number));
            }
        }
    }
    progress.finish_and_clear();

    let (svd_entropy_hidden, svd_entropy_router) = svd_entropies(backend, &model)?;
    let tail = &losses[losses.len().saturating_sub(10)..];
    let steps_run = losses.len() as f64;
    let summary = Summary {
        optimizer: settings.optimizer.to_string(),
        preset: settings.preset.clone(),
        steps: end,
        final_train_loss: mean(tail.iter().map(|p| p.1)).unwrap_or(f64::NAN),
        final_val_loss: val_losses.last().map(|p| p.1),
        tokens_per_s: steps_run * (b * t) as f64 / (fwd_bwd_s + optimizer_s).max(1e-12),
        fwd_bwd_s,
        optimizer_s,
        optimizer_share: optimizer_s / (fwd_bwd_s + optimizer_s).max(1e-12),
        wall_s: wall.elapsed().as_secs_f64(),
        svd_entropy_hidden,
        svd_entropy_router,
    };
    write_log(&Record::Summary(summary.clone()))?;
    Ok(RunResult {
        summary,
        losses,
        val_losses,
    })
}
