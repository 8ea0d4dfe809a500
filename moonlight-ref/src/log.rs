//! The run log: one JSON object per line for every step, every evaluation and the final
//! summary (`"kind": "step" | "eval" | "summary"`), and an SVG plot of the losses of runs.
//!
//! A line of the log, pretty-printed:
//! ```text
//! {"kind":"step","step":120,"loss":1.87,"lr":0.0029,"grad_norm":0.41,
//!  "update_rms_muon":0.2,"update_rms_adamw":0.31,"expert_load_max_over_mean":[1.4,1.3],
//!  "tokens_per_s":5200.0,"fwd_bwd_ms":48.1,"optimizer_ms":1.9}
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A training step.
    Step(StepRecord),
    /// An evaluation on the held-out split.
    Eval(EvalRecord),
    /// The end of a run.
    Summary(Summary),
}

/// What one training step measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step just taken, from 1.
    pub step: u64,
    /// Mean cross-entropy of the step's batch (nats per token).
    pub loss: f64,
    /// The learning rate the step used.
    pub lr: f64,
    /// Global L2 norm of the gradients.
    pub grad_norm: f64,
    /// Mean update RMS (before lr) over the parameters Muon steps; `None` when there are none.
    pub update_rms_muon: Option<f64>,
    /// Mean update RMS (before lr) over the parameters AdamW steps.
    pub update_rms_adamw: Option<f64>,
    /// The sequence-wise balance loss, summed over the MoE layers, when it is on (the `loss`
    /// above is the cross-entropy alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// Per MoE layer, the busiest expert's load over the mean load (1 = balanced).
    pub expert_load_max_over_mean: Vec<f64>,
    /// Tokens processed per second of this step.
    pub tokens_per_s: f64,
    /// Forward plus backward, milliseconds.
    pub fwd_bwd_ms: f64,
    /// The optimizer step (and router-bias update), milliseconds.
    pub optimizer_ms: f64,
}

/// One evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Steps taken when it ran.
    pub step: u64,
    /// Mean cross-entropy on the held-out batches.
    pub val_loss: f64,
}

/// The end of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// `muon` or `adamw`.
    pub optimizer: String,
    /// The preset name.
    pub preset: String,
    /// Steps taken in all (counting those before a resume).
    pub steps: u64,
    /// Mean training loss of the last (up to) 10 steps of this process.
    pub final_train_loss: f64,
    /// The last validation loss.
    pub final_val_loss: Option<f64>,
    /// Tokens per second over this process's steps.
    pub tokens_per_s: f64,
    /// Seconds in forward and backward.
    pub fwd_bwd_s: f64,
    /// Seconds in the optimizer step (and router-bias update).
    pub optimizer_s: f64,
    /// `optimizer_s / (fwd_bwd_s + optimizer_s)`.
    pub optimizer_share: f64,
    /// Wall-clock seconds of the run, evaluation and checkpoints included.
    pub wall_s: f64,
    /// Mean normalized SVD entropy of the trained hidden matrices, each expert counted on its
    /// own (the report finds it higher under Muon).
    #[serde(default)]
    pub svd_entropy_hidden: Option<f64>,
    /// The same for the MoE routers alone (the report: 0.905 Muon vs 0.775 AdamW).
    #[serde(default)]
    pub svd_entropy_router: Option<f64>,
    /// The memory the run was estimated to need before it started (an upper bound).
    #[serde(default)]
    pub memory_estimate_bytes: Option<u64>,
    /// The most resident memory the process used (Linux), for comparison.
    #[serde(default)]
    pub memory_peak_bytes: Option<u64>,
}

/// Appends records to a JSONL file, one whole line each: a line is written with one call and,
/// if that fails (a full disk), the file is cut back to where the line began, so the log never
/// holds half a line. Nothing is buffered: a crash loses nothing written.
pub struct RunLog {
    file: File,
    /// The file's length: where the next line begins.
    len: u64,
    /// The line being written, reused (a step allocates nothing here).
    line: Vec<u8>,
}

impl RunLog {
    /// Creates the log at `path`, replacing any file there.
    pub fn create(path: &Path) -> io::Result<RunLog> {
        Ok(RunLog {
            file: File::create(path)?,
            len: 0,
            line: Vec::with_capacity(512),
        })
    }

    /// Continues the log at `path` after step `step`: the records of later steps (written
    /// after the checkpoint a run resumes from) and a torn last line (a crash mid-write) are
    /// dropped first, so that the resumed run's steps appear once. The file is rewritten
    /// atomically; a missing log starts empty.
    pub fn resume(path: &Path, step: u64) -> io::Result<RunLog> {
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut kept = Vec::with_capacity(text.len());
        for (i, line) in text.split_inclusive(|&b| b == b'\n').enumerate() {
            if !line.ends_with(b"\n") {
                break; // the last line, torn by a crash mid-write
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let record: Record = serde_json::from_slice(line).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} line {} is not a log record: {e}", path.display(), i + 1),
                )
            })?;
            if record.step() <= step {
                kept.extend_from_slice(line);
            }
        }
        crate::files::write_atomic(path, &kept)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(RunLog {
            file,
            len: kept.len() as u64,
            line: Vec::with_capacity(512),
        })
    }

    /// Writes one record as a line.
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, record)?;
        self.line.push(b'\n');
        if let Err(e) = self.file.write_all(&self.line) {
            // Whatever part of the line reached the file goes again.
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += self.line.len() as u64;
        Ok(())
    }
}

impl Record {
    /// The step a record belongs to (a summary: the last step of its run).
    pub fn step(&self) -> u64 {
        match self {
            Record::Step(r) => r.step,
            Record::Eval(r) => r.step,
            Record::Summary(r) => r.steps,
        }
    }
}

/// Reads a JSONL log back; errors name the file and line. A last line without its newline
/// (a run writing right now, or a crash mid-write) is not a record yet and is skipped.
pub fn read_log(path: &Path) -> Result<Vec<Record>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read log {}: {e}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        if !line.ends_with(b"\n") {
            break; // the last line, not written whole yet
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record = serde_json::from_slice(line)
            .map_err(|e| format!("{} line {}: not a log record: {e}", path.display(), i + 1))?;
        records.push(record);
    }
    Ok(records)
}

/// One run's curves for [`plot_losses`].
pub struct Curves {
    /// Legend label.
    pub label: String,
    /// (step, training loss), smoothed by the caller if wanted.
    pub train: Vec<(f64, f64)>,
    /// (step, validation loss).
    pub val: Vec<(f64, f64)>,
}

impl Curves {
    /// The curves of a log: training loss as a running mean over `smooth` steps.
    pub fn from_records(label: String, records: &[Record], smooth: usize) -> Curves {
        let steps: Vec<(f64, f64)> = records
            .iter()
            .filter_map(|r| match r {
                Record::Step(s) => Some((s.step as f64, s.loss)),
                _ => None,
            })
            .collect();
        let smooth = smooth.max(1);
        let train = (0..steps.len())
            .map(|i| {
                let lo = (i + 1).saturating_sub(smooth);
                let window = &steps[lo..=i];
                let mean = window.iter().map(|p| p.1).sum::<f64>() / window.len() as f64;
                (steps[i].0, mean)
            })
            .collect();
        let val = records
            .iter()
            .filter_map(|r| match r {
                Record::Eval(e) => Some((e.step as f64, e.val_loss)),
                _ => None,
            })
            .collect();
        Curves { label, train, val }
    }
}

/// Draws the training (lines) and validation (lines with dots) losses of several runs into an
/// SVG file, written atomically.
pub fn plot_losses(runs: &[Curves], out: &Path) -> Result<(), String> {
    let mut svg = String::new();
    draw_losses(runs, &mut svg).map_err(|e| format!("cannot draw {}: {e}", out.display()))?;
    crate::files::write_atomic(out, svg.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", out.display()))
}

fn draw_losses(runs: &[Curves], svg: &mut String) -> Result<(), String> {
    use plotters::prelude::*;
    let points = || runs.iter().flat_map(|r| r.train.iter().chain(&r.val));
    let finite = |v: &f64| v.is_finite();
    let x_max = points().map(|p| p.0).filter(finite).fold(1.0, f64::max);
    let y_min = points().map(|p| p.1).filter(finite).fold(f64::INFINITY, f64::min);
    let y_max = points()
        .map(|p| p.1)
        .filter(finite)
        .fold(f64::NEG_INFINITY, f64::max);
    if !(y_min.is_finite() && y_max.is_finite()) {
        return Err("no finite losses to plot".into());
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let err = |e: &dyn std::fmt::Display| e.to_string();

    let root = SVGBackend::with_string(svg, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("moonlight-ref: loss", ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("cross-entropy (nats/token)")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, run) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(run.train.iter().copied(), color.stroke_width(1)))
            .map_err(|e| err(&e))?
            .label(format!("{} train", run.label))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        if !run.val.is_empty() {
            chart
                .draw_series(LineSeries::new(run.val.iter().copied(), color.stroke_width(3)))
                .map_err(|e| err(&e))?
                .label(format!("{} val", run.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(4)));
            chart
                .draw_series(run.val.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
