//! The training loop: data, model, optimizer, schedule, evaluation, logging, checkpoints.
//!
//! One step, as llm.c writes it:
//! ```text
//! batch.next(sampler, train)                     B random windows of T+1 tokens; this rank's rows
//! loss = model.forward(tokens, targets)          mean cross-entropy
//! model.backward()                               grads = d loss / d params
//! share.step(loss, loads)                        global mean loss, summed expert loads; stop if not finite
//! optimizer.step(params, grads, lr(step))        Muon for hidden matrices, AdamW for the rest
//! model.update_router_bias()                     auxiliary-loss-free balancing
//! ```
//!
//! The loop runs on a data-parallel group of ranks ([`train_on`] over any muon-core
//! `Collective`; [`train`] is a group of one): the optimizer is a `DistributedOptimizer`,
//! which averages the ranks' gradients and shards its state, and [`parallel`] holds the rest
//! (each rank's rows, the per-step exchange, the conventions).
//!
//! Around it: [`settings`] (what a run is, and the defaults the CLI shares), `report` (the
//! bar, the log, the checkpoints and the summary) and `resume` (which run a checkpoint belongs
//! to). Everything that fixes the arithmetic of a run is a [`RunSettings`]; a checkpoint stores
//! it, with the parameters, the optimizer state, the router biases and the sampler's state, and
//! `--resume` refuses a checkpoint whose settings differ, so a resumed run takes, step for
//! step, the same losses as one that never stopped.

pub mod launch;
pub mod parallel;
mod report;
mod resume;
mod run_dir;
pub mod settings;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use muon_core::{Collective, DistributedOptimizer, HostMatrix, ParamRole};
use muon_faer::ThreadGroup;

use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::data::{BatchSampler, DataError, DataSource, Dataset};
use crate::log::Summary;
use crate::memory::{self, MemoryEstimate};
use crate::model::{Model, ModelError};
use crate::ops::ModelOps;
use parallel::{agree, RankBatch, StepShare};
use report::{Reporter, StepFigures};
use run_dir::RunDir;

pub use run_dir::LOCK_FILE;

pub use settings::{defaults, with_attention, OptimizerChoice, RunSettings, TrainOptions};

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
    /// The data-parallel group failed: another rank stopped, or a collective did.
    Group(String),
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
    /// [`TrainOptions::interrupt`] was set: the run stopped after `step`.
    Interrupted {
        /// The last step taken.
        step: u64,
        /// The checkpoint written there (none without an output directory).
        checkpoint: Option<PathBuf>,
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
            TrainError::Group(msg) => write!(f, "data-parallel group: {msg}"),
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
            TrainError::Interrupted { step, checkpoint } => {
                write!(f, "interrupted after step {step}")?;
                match checkpoint {
                    Some(path) => write!(f, "; continue with --resume {}", path.display()),
                    None => write!(f, "; nothing was saved (no output directory)"),
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

/// Trains a model as `opts` says, on `backend`, in this process alone (a group of one rank).
/// Returns the summary and the losses.
pub fn train<B>(backend: &B, opts: &TrainOptions) -> Result<RunResult, TrainError>
where
    B: ModelOps<Elem = f32, Matrix = HostMatrix<f32>>,
{
    let alone = ThreadGroup::<f32>::new(1)
        .pop()
        .expect("a group of one has one rank");
    train_on(backend, opts, alone)
}

/// Trains a model as `opts` says, on `backend`, as one rank of the data-parallel group
/// `group`: every rank calls it with the same options (see [`parallel`] for how the ranks
/// share the work). Every rank returns the same losses; rank 0 alone writes the output
/// directory.
pub fn train_on<B, C>(backend: &B, opts: &TrainOptions, group: C) -> Result<RunResult, TrainError>
where
    B: ModelOps<Elem = f32>,
    C: Collective<B>,
{
    let settings = &opts.settings;
    opts.validate()?;
    let (world, rank) = (group.world_size(), group.rank());
    // The settings fix the products' arithmetic, whatever the caller's backend was set to.
    let backend = &backend
        .in_precision(settings.precision)
        .map_err(ModelError::Backend)?;
    let (b, t) = (settings.batch, settings.seq);
    // Before anything large is allocated: a run larger than the machine is refused whole.
    let memory = check_memory(opts, parallel::rank_rows(b, world, rank)?.len(), world)?;
    let mut batch = RankBatch::new(b, t, world, rank)?;
    let mut model = Model::new(
        backend,
        settings.model.clone(),
        batch.local_batch(),
        t,
        settings.seed,
    )?;
    let specs = settings.optimizer_specs(model.param_specs());
    // Round-robin Newton-Schulz changes no bit (the owner's result is broadcast) and divides
    // its work among the ranks.
    let mut optimizer = DistributedOptimizer::new(backend, group, specs, settings.hybrid.clone())?
        .with_round_robin_newton_schulz(backend, world > 1)?;
    let mut sampler = BatchSampler::new(settings.seed, b, t);
    // Rank 0 writes the files and draws the progress; the others are quiet.
    let quiet;
    let local = if rank == 0 {
        opts
    } else {
        quiet = TrainOptions {
            out: None,
            progress: false,
            ..opts.clone()
        };
        &quiet
    };
    let setup = (|| {
        let run_dir = match &local.out {
            Some(dir) => Some(RunDir::claim(dir, opts.resume.is_some(), opts.overwrite)?),
            None => None,
        };
        let data = Dataset::load(&opts.data, t, settings.model.vocab_size)?;
        let start = match &opts.resume {
            Some(path) => resume(
                backend,
                path,
                settings,
                &data,
                &mut model,
                &mut optimizer,
                &mut sampler,
            )?,
            None => {
                if let Some(path) = &opts.init {
                    init_weights(backend, path, settings, &mut model)?;
                }
                0
            }
        };
        Ok((run_dir, data, start))
    })();
    let (run_dir, data, start) = agree(backend, optimizer.collective(), setup)?;
    let end = opts.stop_at.unwrap_or(settings.steps);
    if end <= start {
        return Err(TrainError::Config(format!(
            "--stop-at {end} is not past the checkpoint's step {start}"
        )));
    }
    let specs = optimizer.specs();
    let mut report = Reporter::new(local, run_dir, &data, &model, specs, start..end, memory)?;
    let mut share = StepShare::new(
        backend,
        world,
        model.expert_load().len(),
        settings.model.n_routed_experts,
    )?;
    let schedule = settings.schedule();
    // Thread-local kernel workspaces now, so that no training step allocates them.
    backend.warm_up().map_err(ModelError::Backend)?;

    for step in start..end {
        let number = step + 1; // the step being taken, from 1
        batch.next(&mut sampler, &data.train);
        let clock = Instant::now();
        let loss = model.forward(backend, &batch.tokens, &batch.targets)?;
        model.backward(backend)?;
        let fwd_bwd = clock.elapsed();
        let stop = opts.interrupted() && number < end;
        let totals = share.step(backend, optimizer.collective(), &mut model, loss, stop)?;
        if !totals.loss.is_finite() {
            return Err(report.non_finite(number, format!("the loss ({})", totals.loss)));
        }
        let lr = schedule.lr(settings.lr, step);
        let (params, grads) = model.params_and_grads();
        let update = optimizer
            .step(backend, params, grads, lr)
            .map_err(|e| report.refused(number, e))?;
        model.update_router_bias(backend)?;
        let figures = StepFigures {
            number,
            loss: totals.loss,
            aux_loss: totals.aux_loss,
            lr,
            grad_norm: update.grad_norm,
            fwd_bwd,
            optimizer: clock.elapsed() - fwd_bwd,
        };
        report.step(backend, &model, &mut optimizer, figures)?;

        let due = |every: u64| number == end || (every > 0 && number % every == 0);
        if due(opts.eval_every) {
            let val_loss = evaluate_ranks(backend, &mut model, &data.val, opts, &mut batch)?;
            let val_loss = share.mean(backend, optimizer.collective(), val_loss)?;
            if !val_loss.is_finite() {
                return Err(report.non_finite(number, format!("the validation loss ({val_loss})")));
            }
            report.eval(number, totals.loss, val_loss)?;
        }
        // Every rank takes part in gathering the state; rank 0 writes it.
        if opts.out.is_some() && (due(opts.checkpoint_every) || totals.stop) {
            let metadata = resume::run_metadata(settings, &data, number, &sampler);
            let ckpt = Checkpoint::from_model(backend, &model, optimizer.export_state(backend)?, metadata)?;
            // Only finite parameters and state are saved: the last checkpoint stays the last
            // good one. Every rank holds the same checkpoint, so every rank sees this.
            if let Some((name, at)) = ckpt.non_finite() {
                return Err(report.non_finite(number, format!("`{name}` after the update ({at})")));
            }
            report.checkpoint(number, &ckpt)?;
        }
        if totals.stop {
            return Err(report.interrupted(number));
        }
    }
    report.finish(opts, end, svd_entropies(backend, &model)?)
}

/// This rank's mean cross-entropy over its rows of `opts.eval_batches` fixed batches of the
/// held-out split (the global batches [`evaluate`] draws); the ranks' mean is the global one.
fn evaluate_ranks<B: ModelOps<Elem = f32>>(
    backend: &B,
    model: &mut Model<B>,
    val: &[u16],
    opts: &TrainOptions,
    batch: &mut RankBatch,
) -> Result<f64, TrainError> {
    let s = &opts.settings;
    let mut sampler = BatchSampler::new(s.seed ^ EVAL_SEED_SALT, s.batch, s.seq);
    let batches = opts.eval_batches.max(1);
    let mut sum = 0.0;
    for _ in 0..batches {
        batch.next(&mut sampler, val);
        sum += model.forward(backend, &batch.tokens, &batch.targets)?;
    }
    Ok(sum / batches as f64)
}

/// The run's memory estimate for one process, rank of `world`, training `local_batch` rows
/// of each batch, refused with its figures when the machine has less available.
fn check_memory(opts: &TrainOptions, local_batch: usize, world: usize) -> Result<MemoryEstimate, TrainError> {
    let s = &opts.settings;
    let data_bytes = match &opts.data {
        DataSource::Embedded => crate::corpus::EMBEDDED_BYTES as u64,
        DataSource::File { path, .. } => std::fs::metadata(path).map_or(0, |m| m.len()),
    };
    let specs = s.optimizer_specs(memory::param_specs(&s.model));
    let threads = rayon::current_num_threads();
    let estimate = memory::training(&s.model, &specs, local_batch, s.seq, data_bytes, threads, world);
    match memory::available() {
        Some(available) if estimate.total() > available => Err(TrainError::Config(format!(
            "the run needs an estimated {estimate}, but only {} are available: lower --batch or --seq, or pick a smaller --preset",
            memory::gib(available)
        ))),
        _ => Ok(estimate),
    }
}

/// Sets the model's weights (parameters and router biases) to those of the checkpoint at
/// `path`, after checking it holds the run's model configuration.
fn init_weights<B: ModelOps<Elem = f32>>(
    backend: &B,
    path: &Path,
    settings: &RunSettings,
    model: &mut Model<B>,
) -> Result<(), TrainError> {
    let trained = crate::eval::Trained::load(path).map_err(|e| TrainError::Config(format!("--init {e}")))?;
    // The balance loss's weight is a training setting (--aux-loss-alpha), not the model's.
    let mut config = trained.config;
    config.aux_loss_alpha = settings.model.aux_loss_alpha;
    if config != settings.model {
        return Err(TrainError::Config(format!(
            "--init {}: its model configuration is not the run's (train from it without --preset, --attention or --vocab)",
            path.display()
        )));
    }
    trained
        .checkpoint
        .restore_model(backend, model)
        .map_err(|e| TrainError::Config(format!("--init {}: {e}", path.display())))
}

/// Loads the checkpoint at `path` into the model, the optimizer and the sampler, after
/// checking it belongs to this run. Returns the step it was taken at.
fn resume<B: ModelOps<Elem = f32>, C: Collective<B>>(
    backend: &B,
    path: &Path,
    settings: &RunSettings,
    data: &Dataset,
    model: &mut Model<B>,
    optimizer: &mut DistributedOptimizer<B, C>,
    sampler: &mut BatchSampler,
) -> Result<u64, TrainError> {
    let ckpt = checkpoint::load(path)?;
    let at = resume::check_run(&ckpt, path, settings, data)?;
    if at.step >= settings.steps {
        return Err(TrainError::Config(format!(
            "checkpoint {} is at step {}, the run has {} steps: nothing left to train",
            path.display(),
            at.step,
            settings.steps
        )));
    }
    optimizer
        .import_state(backend, &ckpt.optimizer)
        .map_err(|e| resume::bad(path, e.to_string()))?;
    ckpt.restore_model(backend, model)
        .map_err(|e| resume::bad(path, e.to_string()))?;
    *sampler = BatchSampler::new(at.sampler_state, settings.batch, settings.seq);
    Ok(at.step)
}

pub(crate) fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Mean normalized SVD entropy (docs/DESIGN.md §5) of the trained hidden matrices, every matrix of
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
