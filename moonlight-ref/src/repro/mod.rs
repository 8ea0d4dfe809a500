//! `moonlight-ref repro`: the report's experiments, each one command.
//!
//! An experiment is a [`Plan`](experiments::Plan) of training runs ([`experiments`]), each
//! trained by [`crate::train::train`] in its own directory `DIR/runs/<name>`, resumably: a run
//! whose log holds a summary is done and skipped, one with a checkpoint continues from it, so a
//! long experiment can be stopped (Ctrl-C) and started again. Each finished run appends one
//! line to `DIR/runs.jsonl` ([`record`]); from those records an experiment writes its table,
//! plots and summary into `DIR/<experiment>/` ([`summary`], [`plots`], [`fit`] for the scaling
//! law), and `repro report` gathers the summaries into REPRODUCTION.md.
//!
//! The data is the corpus generator's text ([`crate::corpus`]), one file per experiment in
//! `DIR/data`, sized so that training sees each byte at most about once: its training part is
//! [`CORPUS_OVER_TOKENS`] times the longest run's tokens.

pub mod experiments;
pub mod fit;
pub mod plots;
pub mod record;
pub mod summary;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::data::{DataFormat, DataSource};
use crate::log::{read_log, Record};
use crate::train::{self, TrainError, TrainOptions, CHECKPOINT_FILE, LOG_FILE};
use experiments::{Experiment, Plan, RunSpec};
use record::RunRecord;

/// The corpus's training part is this many times the longest run's training tokens. The
/// sampler draws windows at random, so a token is drawn about `1 / CORPUS_OVER_TOKENS` = 0.1
/// times on average: about 5% of the tokens a run sees were seen before (a Poisson count).
pub const CORPUS_OVER_TOKENS: u64 = 10;

/// How `repro` runs.
#[derive(Clone, Debug)]
pub struct ReproOptions {
    /// Small versions of every run (seconds each), for CI: their figures mean nothing.
    pub quick: bool,
    /// The output directory.
    pub out: PathBuf,
    /// Seeds per configuration (the experiment's default when `None`).
    pub seeds: Option<usize>,
    /// Worker threads.
    pub threads: usize,
    /// Print a line per run on stderr.
    pub progress: bool,
    /// Set by a signal: the run in progress stops with a checkpoint, the experiment ends.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// Why `repro` stopped.
#[derive(Debug)]
pub enum ReproError {
    /// Interrupted by a signal; run the same command again to continue.
    Interrupted(String),
    /// Anything else, in words.
    Failed(String),
}

impl std::fmt::Display for ReproError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReproError::Interrupted(m) | ReproError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<String> for ReproError {
    fn from(m: String) -> Self {
        ReproError::Failed(m)
    }
}

/// Runs `experiment` (training what is not done yet) and writes its table, plots and summary.
/// Returns the files written.
pub fn run(experiment: Experiment, opts: &ReproOptions) -> Result<Vec<PathBuf>, ReproError> {
    let plan = experiments::plan(experiment, opts.quick, opts.seeds)?;
    std::fs::create_dir_all(opts.out.join("runs"))
        .map_err(|e| format!("cannot create {}: {e}", opts.out.join("runs").display()))?;
    // The runs and the corpus are large and regenerated; the records and summaries are small.
    let ignore = opts.out.join(".gitignore");
    if !ignore.exists() {
        crate::files::write_atomic(&ignore, b"runs/\ndata/\n")
            .map_err(|e| format!("cannot write {}: {e}", ignore.display()))?;
    }
    let data = corpus(&opts.out, &plan)?;
    let backend = muon_faer::Faer::<f32>::with_threads(opts.threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| format!("cannot start {} threads: {e}", opts.threads))?;
    let records_path = opts.out.join(record::RECORDS_FILE);
    let clock = Instant::now();
    for (i, spec) in plan.runs.iter().enumerate() {
        let done = pool.install(|| run_one(&backend, spec, &data, opts, &records_path, &plan))?;
        if opts.progress {
            eprintln!(
                "repro {experiment}: run {}/{} {} {} ({:.0} s so far)",
                i + 1,
                plan.runs.len(),
                spec.name,
                if done { "trained" } else { "already done" },
                clock.elapsed().as_secs_f64()
            );
        }
    }
    let records = record::read_records(&records_path)?;
    let wanted: Vec<RunRecord> = plan
        .runs
        .iter()
        .filter_map(|s| records.iter().find(|r| r.name == s.name).cloned())
        .collect();
    if wanted.len() != plan.runs.len() {
        return Err(ReproError::Failed(format!(
            "{} of the {} runs have no record in {}",
            plan.runs.len() - wanted.len(),
            plan.runs.len(),
            records_path.display()
        )));
    }
    Ok(summary::write(&plan, &wanted, &opts.out)?)
}

/// The experiment's corpus file, written once (atomically) if it is not there yet.
fn corpus(out: &Path, plan: &Plan) -> Result<DataSource, String> {
    // The validation tenth comes on top of the training part; and at least the embedded
    // corpus's size, so that short runs see the same variety of text.
    let train = (plan.max_tokens() * CORPUS_OVER_TOKENS) as usize;
    let bytes = (train + train / 9 + 1).max(crate::corpus::EMBEDDED_BYTES);
    let dir = out.join("data");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(format!("corpus-{bytes}.txt"));
    if !path.exists() {
        crate::files::write_atomic_with(&path, |file| {
            let mut w = std::io::BufWriter::new(file);
            crate::corpus::write_corpus(bytes, &mut w)?;
            std::io::Write::flush(&mut w)
        })
        .map_err(|e| format!("cannot write the corpus {}: {e}", path.display()))?;
    }
    Ok(DataSource::File {
        path,
        format: Some(DataFormat::Text),
    })
}

/// The corpus file's name, as records keep it.
fn data_name(data: &DataSource) -> String {
    match data {
        DataSource::File { path, .. } => path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        DataSource::Embedded => "embedded".into(),
    }
}

/// Whether a run's log ends in a summary: the run finished.
fn finished(log: &[Record]) -> bool {
    matches!(log.last(), Some(Record::Summary(_)))
}

/// Trains one run unless it is done, resuming from its checkpoint if it has one, and appends
/// its record (also for a run that finished but whose record was lost). Returns whether it
/// trained.
fn run_one<B: crate::ops::ModelOps<Elem = f32, Matrix = muon_core::HostMatrix<f32>>>(
    backend: &B,
    spec: &RunSpec,
    data: &DataSource,
    opts: &ReproOptions,
    records_path: &Path,
    plan: &Plan,
) -> Result<bool, ReproError> {
    let dir = opts.out.join("runs").join(&spec.name);
    let log_path = dir.join(LOG_FILE);
    let ckpt_path = dir.join(CHECKPOINT_FILE);
    let log = if log_path.exists() {
        read_log(&log_path)?
    } else {
        Vec::new()
    };
    let have = record::read_records(records_path)?;
    let data_name = data_name(data);
    if let Some(old) = have.iter().find(|r| r.name == spec.name) {
        // A finished run of other settings or data (the plan or the corpus size changed since)
        // must not be mixed into the analysis.
        if finished(&log) && (old.settings != spec.settings || old.data != data_name) {
            return Err(ReproError::Failed(format!(
                "run {} in {} was trained with other settings or data ({}) than this plan's ({}); remove that directory (and use a fresh --out for a clean record) to train it again",
                spec.name,
                dir.display(),
                old.data,
                data_name
            )));
        }
    }
    let mut trained = false;
    let mut wall_s = None;
    let mut resumed = false;
    if !finished(&log) {
        let mut o = TrainOptions::new(spec.settings.clone());
        o.data = data.clone();
        o.eval_every = spec.eval_every;
        o.eval_batches = spec.eval_batches;
        o.out = Some(dir.clone());
        o.checkpoint_every = (spec.settings.steps / 5).max(1);
        o.interrupt = opts.interrupt.clone();
        if ckpt_path.exists() {
            o.resume = Some(ckpt_path.clone());
            resumed = true;
        } else {
            // A log without a checkpoint: the run stopped before its first save. Start over.
            o.overwrite = true;
        }
        let result = train::train(backend, &o).map_err(|e| match e {
            e @ TrainError::Interrupted { .. } => ReproError::Interrupted(format!(
                "{}: {e}; run the same repro command again to continue",
                spec.name
            )),
            e => ReproError::Failed(format!("run {}: {e}", spec.name)),
        })?;
        wall_s = Some(result.summary.wall_s);
        trained = true;
    }
    if trained || !have.iter().any(|r| r.name == spec.name) {
        let log = read_log(&log_path)?;
        let mut rec = make_record(spec, plan, &log, &ckpt_path, opts.threads, wall_s, resumed)?;
        rec.data = data_name;
        record::append(records_path, &rec)?;
    }
    Ok(trained)
}

/// The record of a finished run from its log and final checkpoint.
fn make_record(
    spec: &RunSpec,
    plan: &Plan,
    log: &[Record],
    ckpt_path: &Path,
    threads: usize,
    wall_s: Option<f64>,
    resumed: bool,
) -> Result<RunRecord, String> {
    let Some(Record::Summary(summary)) = log.last() else {
        return Err(format!("run {}: its log has no summary", spec.name));
    };
    let (curve, val_curve, step_s) = record::curves(log);
    let s = &spec.settings;
    let ckpt = crate::checkpoint::load(ckpt_path).map_err(|e| format!("run {}: {e}", spec.name))?;
    let counts = s.model.param_counts();
    let final_val_loss = summary
        .final_val_loss
        .ok_or_else(|| format!("run {}: no validation loss", spec.name))?;
    Ok(RunRecord {
        name: spec.name.clone(),
        experiment: plan.experiment.name().into(),
        tags: spec.tags.clone(),
        settings: s.clone(),
        data: String::new(),
        seed: s.seed,
        commit: record::git_commit(),
        machine: record::machine(),
        threads,
        wall_s: wall_s.unwrap_or(summary.wall_s),
        step_s,
        resumed,
        tokens: s.steps * (s.batch * s.seq) as u64,
        params_active: counts.active,
        params_total: counts.total,
        flops: record::training_flops(&s.model, s.batch, s.seq, s.steps),
        final_train_loss: summary.final_train_loss,
        final_val_loss,
        svd_entropy: record::svd_entropy_by_kind(&ckpt),
        curve,
        val_curve,
    })
}

/// `moonlight-ref repro`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct ReproArgs {
    /// scaling, curves, rms-sweep, scale-methods, wd-overtrain, svd-entropy, all, or report
    /// (REPRODUCTION.md from what `--out` holds).
    pub experiment: String,
    /// Small versions of the runs (seconds each): a check of the pipeline whose figures mean
    /// nothing.
    #[arg(long)]
    pub quick: bool,
    /// Output directory: runs/, runs.jsonl, data/ and one folder per experiment.
    #[arg(long, default_value = "reproduction")]
    pub out: PathBuf,
    /// Seeds per configuration [default: 3; 2 for wd-overtrain; 1 for scaling].
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// For `report`: the file to write.
    #[arg(long, default_value = "REPRODUCTION.md")]
    pub to: PathBuf,
    /// For `report`: a markdown file whose text goes under the title (how the runs were made).
    #[arg(long)]
    pub notes: Option<PathBuf>,
    /// No line per run on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `moonlight-ref repro`; returns the lines to print (the files written).
pub fn main(args: &ReproArgs, interrupt: Option<Arc<AtomicBool>>) -> Result<Vec<String>, ReproError> {
    if args.experiment == "report" {
        let notes = match &args.notes {
            Some(p) => {
                std::fs::read_to_string(p).map_err(|e| format!("cannot read --notes {}: {e}", p.display()))?
            }
            None => String::new(),
        };
        let text = summary::report(&args.out, &args.to, notes.trim())?;
        crate::files::write_atomic(&args.to, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", args.to.display()))?;
        return Ok(vec![format!("wrote {}", args.to.display())]);
    }
    let experiments = if args.experiment == "all" {
        Experiment::ALL.to_vec()
    } else {
        vec![Experiment::parse(&args.experiment)?]
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match args.threads {
        Some(0) => return Err(ReproError::Failed("--threads must be at least 1".into())),
        Some(n) => n.min(cores),
        None => cores,
    };
    let opts = ReproOptions {
        quick: args.quick,
        out: args.out.clone(),
        seeds: args.seeds,
        threads,
        progress: !args.quiet,
        interrupt,
    };
    let mut lines = Vec::new();
    for e in experiments {
        for f in run(e, &opts)? {
            lines.push(format!("wrote {}", f.display()));
        }
    }
    Ok(lines)
}
