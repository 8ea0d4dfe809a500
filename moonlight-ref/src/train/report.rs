//! Everything a run tells the world: the progress bar and messages on stderr, the JSONL log,
//! the checkpoints in the output directory, and the summary. The training loop hands it the
//! figures of each step; it keeps no state the arithmetic depends on.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use muon_core::{HybridOptimizer, OptimizerKind};

use super::run_dir::RunDir;
use super::{mean, RunResult, TrainError, TrainOptions, CHECKPOINT_FILE, LOG_FILE};
use crate::checkpoint::{self, Checkpoint};
use crate::data::Dataset;
use crate::log::{EvalRecord, Record, RunLog, StepRecord, Summary};
use crate::memory::MemoryEstimate;
use crate::model::Model;
use crate::ops::ModelOps;

/// What the loop measured in one step.
pub(super) struct StepFigures {
    /// The step just taken, from 1.
    pub number: u64,
    /// Its cross-entropy.
    pub loss: f64,
    /// Its learning rate.
    pub lr: f64,
    /// The gradients' global norm.
    pub grad_norm: f64,
    /// Time in forward and backward.
    pub fwd_bwd: Duration,
    /// Time in the optimizer step and the router-bias update.
    pub optimizer: Duration,
}

/// The bar, the log, the checkpoints and the running totals of one run.
pub(super) struct Reporter {
    bar: ProgressBar,
    progress: bool,
    log: Option<RunLog>,
    checkpoint_path: Option<PathBuf>,
    /// Held for the whole run: its lock keeps other runs out of the directory.
    _run_dir: Option<RunDir>,
    /// The last checkpoint written (or resumed from) and its step: what a failed run keeps.
    last_checkpoint: Option<(PathBuf, u64)>,
    /// One step record, refilled every step: its vectors keep their capacity, so a step
    /// allocates nothing here.
    record: Record,
    update_rms: Vec<f64>,
    kinds: Vec<OptimizerKind>,
    first_step: u64,
    /// Running means for the bar, steadier than one step's figures.
    bar_loss: f64,
    bar_rate: f64,
    /// The bar's message is formatted (an allocation) at most 4 times a second.
    bar_shown: Instant,
    fwd_bwd_s: f64,
    optimizer_s: f64,
    losses: Vec<(u64, f64)>,
    val_losses: Vec<(u64, f64)>,
    wall: Instant,
    memory_estimate: u64,
}

impl Reporter {
    /// Opens the output directory and the log (continued on a resume), draws the bar at
    /// `start` and prints the run's header line.
    #[allow(clippy::too_many_arguments)]
    pub fn new<B: ModelOps<Elem = f32>>(
        opts: &TrainOptions,
        run_dir: Option<RunDir>,
        data: &Dataset,
        model: &Model<B>,
        optimizer: &HybridOptimizer<B>,
        start: u64,
        end: u64,
        memory: MemoryEstimate,
    ) -> Result<Reporter, TrainError> {
        let s = &opts.settings;
        let mut log = None;
        if let Some(dir) = &run_dir {
            let path = dir.path(LOG_FILE);
            let opened = if opts.resume.is_some() {
                RunLog::resume(&path, start)
            } else {
                RunLog::create(&path)
            };
            log =
                Some(opened.map_err(|e| TrainError::Io(format!("cannot open log {}: {e}", path.display())))?);
        }
        let bar = if opts.progress {
            let bar = ProgressBar::new(s.steps);
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
        // Room for the losses of a long run without reallocating; beyond a million steps the
        // lists grow by doubling (a handful of allocations in all).
        let steps = (end - start).min(1 << 20) as usize;
        let reporter = Reporter {
            bar,
            progress: opts.progress,
            log,
            checkpoint_path: run_dir.as_ref().map(|d| d.path(CHECKPOINT_FILE)),
            _run_dir: run_dir,
            last_checkpoint: opts.resume.as_ref().map(|p| (p.clone(), start)),
            record: Record::Step(StepRecord {
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
            }),
            update_rms: vec![0.0; optimizer.specs().len()],
            kinds: optimizer.specs().iter().map(|s| s.optimizer()).collect(),
            first_step: start + 1,
            bar_loss: 0.0,
            bar_rate: 0.0,
            bar_shown: Instant::now(),
            fwd_bwd_s: 0.0,
            optimizer_s: 0.0,
            losses: Vec::with_capacity(steps),
            val_losses: Vec::with_capacity(1 + steps / opts.eval_every.max(1) as usize),
            wall: Instant::now(),
            memory_estimate: memory.total(),
        };
        let counts = s.model.param_counts();
        reporter.say(format!(
            "moonlight-ref: {} ({} params, {} active) with {} on {} ({} train / {} val tokens), B={} T={}, {} steps{}; memory {}",
            s.preset,
            counts.total,
            counts.active,
            s.optimizer,
            data.name,
            data.train.len(),
            data.val.len(),
            s.batch,
            s.seq,
            s.steps,
            if start > 0 { format!(", resuming at step {start}") } else { String::new() },
            crate::memory::gib(memory.total()),
        ));
        Ok(reporter)
    }

    /// A line on stderr above the bar (when the run shows progress).
    pub fn say(&self, line: String) {
        if self.progress {
            // Best effort: a run whose terminal went away still finishes its files.
            self.bar.suspend(|| {
                let _ = writeln!(std::io::stderr(), "{line}");
            });
        }
    }

    /// The error for a non-finite `what` at step `number`: the bar stops, and the error names
    /// the last good checkpoint.
    pub fn non_finite(&self, number: u64, what: String) -> TrainError {
        self.bar.abandon();
        TrainError::NonFinite {
            step: number,
            what,
            last_checkpoint: self.last_checkpoint.clone(),
        }
    }

    /// The error of a run interrupted after step `number`, naming its checkpoint.
    pub fn interrupted(&self, number: u64) -> TrainError {
        self.bar.abandon();
        TrainError::Interrupted {
            step: number,
            checkpoint: self.checkpoint_path.clone(),
        }
    }

    /// An optimizer's refusal at step `number` as the run's error.
    pub fn refused(&self, number: u64, e: muon_core::Error) -> TrainError {
        match e {
            muon_core::Error::NonFiniteGradient { name, .. } => {
                self.non_finite(number, format!("the gradient of `{name}`"))
            }
            e => e.into(),
        }
    }

    /// Records a step: the log line, the bar, the totals.
    pub fn step<B: ModelOps<Elem = f32>>(
        &mut self,
        backend: &B,
        model: &Model<B>,
        optimizer: &mut HybridOptimizer<B>,
        f: StepFigures,
    ) -> Result<(), TrainError> {
        let (fwd_bwd, opt) = (f.fwd_bwd.as_secs_f64(), f.optimizer.as_secs_f64());
        self.fwd_bwd_s += fwd_bwd;
        self.optimizer_s += opt;
        self.losses.push((f.number, f.loss));
        optimizer.update_rms(backend, &mut self.update_rms)?;
        let (rms, kinds) = (&self.update_rms, &self.kinds);
        let group =
            |k: OptimizerKind| mean(rms.iter().zip(kinds).filter(|(_, &kk)| kk == k).map(|(r, _)| *r));
        let (b, t) = model.batch_seq();
        let tokens_per_s = (b * t) as f64 / (fwd_bwd + opt).max(1e-12);
        if let Record::Step(r) = &mut self.record {
            r.step = f.number;
            r.loss = f.loss;
            r.lr = f.lr;
            r.grad_norm = f.grad_norm;
            r.update_rms_muon = group(OptimizerKind::Muon);
            r.update_rms_adamw = group(OptimizerKind::AdamW);
            r.aux_loss = (model.config.aux_loss_alpha > 0.0).then(|| model.aux_loss());
            load_imbalance(model.expert_load(), &mut r.expert_load_max_over_mean);
            r.tokens_per_s = tokens_per_s;
            r.fwd_bwd_ms = fwd_bwd * 1e3;
            r.optimizer_ms = opt * 1e3;
        }
        write(&mut self.log, &self.record)?;
        let smooth = |old: f64, new: f64| {
            if f.number == self.first_step {
                new
            } else {
                0.9 * old + 0.1 * new
            }
        };
        (self.bar_loss, self.bar_rate) = (smooth(self.bar_loss, f.loss), smooth(self.bar_rate, tokens_per_s));
        if self.progress {
            self.bar.set_position(f.number);
            if f.number == self.first_step || self.bar_shown.elapsed().as_secs_f64() >= 0.25 {
                self.bar
                    .set_message(format!("loss {:.3} | {:.0} tok/s", self.bar_loss, self.bar_rate));
                self.bar_shown = Instant::now();
            }
        }
        Ok(())
    }

    /// Records an evaluation after step `number`.
    pub fn eval(&mut self, number: u64, train_loss: f64, val_loss: f64) -> Result<(), TrainError> {
        self.val_losses.push((number, val_loss));
        write(
            &mut self.log,
            &Record::Eval(EvalRecord {
                step: number,
                val_loss,
            }),
        )?;
        self.say(format!(
            "step {number}: train loss {train_loss:.4}, val loss {val_loss:.4}"
        ));
        Ok(())
    }

    /// Whether the run writes checkpoints at all (it has an output directory).
    pub fn saves_checkpoints(&self) -> bool {
        self.checkpoint_path.is_some()
    }

    /// Writes `ckpt`, taken after step `number`, over the run's checkpoint (atomically).
    pub fn checkpoint(&mut self, number: u64, ckpt: &Checkpoint) -> Result<(), TrainError> {
        if let Some(path) = &self.checkpoint_path {
            checkpoint::save(path, ckpt)?;
            self.last_checkpoint = Some((path.clone(), number));
        }
        Ok(())
    }

    /// Ends the run: clears the bar, writes the summary line, returns the result.
    /// `steps` is the last step taken; the SVD entropies are the trained matrices'.
    pub fn finish(
        mut self,
        opts: &TrainOptions,
        steps: u64,
        svd_entropy: (Option<f64>, Option<f64>),
    ) -> Result<RunResult, TrainError> {
        self.bar.finish_and_clear();
        let s = &opts.settings;
        let tail = &self.losses[self.losses.len().saturating_sub(10)..];
        let busy = (self.fwd_bwd_s + self.optimizer_s).max(1e-12);
        let summary = Summary {
            optimizer: s.optimizer.to_string(),
            preset: s.preset.clone(),
            steps,
            final_train_loss: mean(tail.iter().map(|p| p.1)).unwrap_or(f64::NAN),
            final_val_loss: self.val_losses.last().map(|p| p.1),
            tokens_per_s: self.losses.len() as f64 * (s.batch * s.seq) as f64 / busy,
            fwd_bwd_s: self.fwd_bwd_s,
            optimizer_s: self.optimizer_s,
            optimizer_share: self.optimizer_s / busy,
            wall_s: self.wall.elapsed().as_secs_f64(),
            svd_entropy_hidden: svd_entropy.0,
            svd_entropy_router: svd_entropy.1,
            memory_estimate_bytes: Some(self.memory_estimate),
            memory_peak_bytes: crate::memory::peak_resident(),
        };
        write(&mut self.log, &Record::Summary(summary.clone()))?;
        Ok(RunResult {
            summary,
            losses: self.losses,
            val_losses: self.val_losses,
        })
    }
}

/// Appends `record` to the log, if the run has one.
fn write(log: &mut Option<RunLog>, record: &Record) -> Result<(), TrainError> {
    match log {
        Some(log) => log
            .write(record)
            .map_err(|e| TrainError::Io(format!("cannot write the log: {e}"))),
        None => Ok(()),
    }
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
