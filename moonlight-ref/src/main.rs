//! `moonlight-ref`: pretrain a small Moonlight-style MoE language model with Muon or AdamW.
//!
//! ```text
//! moonlight-ref [train] [--preset tiny] [--optimizer muon|adamw] [--steps N] ...
//! moonlight-ref params --preset moonlight-16b-a3b
//! moonlight-ref plot runs/tiny-muon/log.jsonl runs/tiny-adamw/log.jsonl --out loss.svg
//! moonlight-ref sample --checkpoint runs/tiny-muon/checkpoint.safetensors --prompt "The "
//! moonlight-ref eval --checkpoint runs/tiny-muon/checkpoint.safetensors --data text.txt
//! moonlight-ref export --checkpoint runs/tiny-muon/checkpoint.safetensors --out hf/tiny
//! moonlight-ref import hf/tiny --out tiny.safetensors
//! moonlight-ref repro scaling --out reproduction      (the report's experiments; `report`)
//! ```
//! Errors go to stderr with a non-zero exit status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use moonlight_ref::config::ModelConfig;
use moonlight_ref::data::{DataFormat, DataSource};
use moonlight_ref::eval::Trained;
use moonlight_ref::log::{plot_losses, read_log, Curves};
use moonlight_ref::train::{self, defaults, OptimizerChoice, RunSettings, TrainOptions};
use muon_core::{MuonConfig, NewtonSchulz, UpdateScale};

#[derive(Parser, Debug)]
#[command(
    name = "moonlight-ref",
    version,
    about = "Pretrain a small Moonlight-style MoE language model on the CPU with Muon or AdamW",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `train`'s options, when no subcommand is given.
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (the default).
    Train(Box<TrainArgs>),
    /// Print a preset's total and active parameter counts.
    Params {
        /// tiny, small or moonlight-16b-a3b.
        #[arg(long, default_value = "tiny")]
        preset: String,
    },
    /// Write N bytes of the embedded corpus's generator to a file (for --data): the embedded
    /// corpus continued with fresh text, for runs that must not repeat their data.
    Corpus {
        /// How many bytes (at least two contexts of the default --seq: 130).
        #[arg(long)]
        bytes: usize,
        /// The file to write.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Generate text from a checkpoint, streamed to standard output.
    Sample(use_cli::SampleArgs),
    /// Mean loss and bits per byte of a checkpoint over a whole file (one JSON line).
    Eval(use_cli::EvalArgs),
    /// Write a checkpoint as an HF transformers DeepseekV3 model directory.
    Export {
        /// The checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The directory to write config.json and model.safetensors into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train a byte-level BPE tokenizer (tokenizer.json) on a text file.
    Tokenizer {
        /// The UTF-8 text file to learn merges from.
        #[arg(long)]
        data: PathBuf,
        /// Vocabulary size (at least the 256 byte symbols).
        #[arg(long)]
        vocab: usize,
        /// The tokenizer.json to write.
        #[arg(long, short, default_value = "tokenizer.json")]
        out: PathBuf,
    },
    /// Read an HF transformers DeepseekV3 model directory into a checkpoint.
    Import {
        /// The directory (config.json and model.safetensors).
        dir: PathBuf,
        /// The checkpoint to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Plot the losses of one or more runs' log.jsonl into an SVG file.
    Plot {
        /// Logs to compare (each labelled by its directory name).
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// The SVG file to write.
        #[arg(long, short, default_value = "loss.svg")]
        out: PathBuf,
        /// Running mean of the training loss over this many steps.
        #[arg(long, default_value_t = 20)]
        smooth: usize,
    },
    /// Run one of the report's experiments (or `all`), resumably, and write its table, plots
    /// and summary; `repro report` writes REPRODUCTION.md from them.
    Repro(moonlight_ref::repro::ReproArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OptimizerArg {
    Muon,
    Adamw,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PrecisionArg {
    /// f32 products.
    F32,
    /// bf16 inputs, f32 accumulation (AMX or AVX512-BF16; f32 on a CPU with neither).
    Bf16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum NsSchedule {
    /// Keller Jordan's fixed quintic (Moonlight).
    Quintic,
    /// Polar Express (Amsel et al. 2025), per-step coefficients.
    PolarExpress,
    /// microsoft/dion's per-step coefficients.
    Dion,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AttentionArg {
    Mha,
    Mla,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum FormatArg {
    Text,
    Bin,
}

#[derive(Args, Debug, Clone)]
struct TrainArgs {
    /// Model size: tiny, small or moonlight-16b-a3b [default: tiny].
    #[arg(long, conflicts_with = "init")]
    preset: Option<String>,
    /// muon: Muon for hidden matrices, AdamW for the rest; adamw: AdamW for everything.
    #[arg(long, value_enum, default_value = "muon")]
    optimizer: OptimizerArg,
    /// Training steps.
    #[arg(long, default_value_t = defaults::STEPS)]
    steps: u64,
    /// Sequences per batch (B).
    #[arg(long, default_value_t = defaults::BATCH)]
    batch: usize,
    /// Tokens per sequence (T).
    #[arg(long, default_value_t = defaults::SEQ)]
    seq: usize,
    /// Peak learning rate, the same for Muon and AdamW.
    #[arg(long, default_value_t = defaults::LR)]
    lr: f64,
    /// Decoupled weight decay (both optimizers).
    #[arg(long, default_value_t = MuonConfig::default().weight_decay)]
    wd: f64,
    /// Linear warm-up steps, then cosine decay to 0.1x at the last step.
    #[arg(long, default_value_t = defaults::WARMUP)]
    warmup: u64,
    /// Muon's update scale: match-adamw[=RMS] (Moonlight, RMS 0.2), aspect-ratio, unit,
    /// custom=F.
    #[arg(long, default_value = "match-adamw", value_parser = parse_update_scale)]
    update_scale: UpdateScale,
    /// Plain momentum instead of Nesterov.
    #[arg(long)]
    no_nesterov: bool,
    /// Muon's momentum coefficient.
    #[arg(long, default_value_t = MuonConfig::default().momentum)]
    momentum: f64,
    /// Newton-Schulz iterations.
    #[arg(long, default_value_t = MuonConfig::default().newton_schulz.steps)]
    ns_steps: usize,
    /// Newton-Schulz coefficient schedule.
    #[arg(long, value_enum, default_value = "quintic")]
    ns_schedule: NsSchedule,
    /// The matrix products' arithmetic (forward, backward, Newton-Schulz); weights,
    /// gradients, norms, softmax, the loss and optimizer state stay f32.
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
    /// Attention type (default: the preset's).
    #[arg(long, value_enum)]
    attention: Option<AttentionArg>,
    /// Weight of DeepSeek-V3's sequence-wise balance loss (default: the preset's: 0 for tiny
    /// and small, 0.001 for moonlight-16b-a3b).
    #[arg(long)]
    aux_loss_alpha: Option<f64>,
    /// Vocabulary size (default: the preset's; raise it for .bin shards of a larger tokenizer).
    #[arg(long)]
    vocab: Option<usize>,
    /// Fixes the initialization and the data order.
    #[arg(long, default_value_t = defaults::SEED)]
    seed: u64,
    /// Evaluate on the held-out split every N steps (0: only at the end).
    #[arg(long, default_value_t = defaults::EVAL_EVERY)]
    eval_every: u64,
    /// Batches per evaluation.
    #[arg(long, default_value_t = defaults::EVAL_BATCHES)]
    eval_batches: usize,
    /// Output directory for log.jsonl and checkpoint.safetensors [default: runs/PRESET-OPTIMIZER].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from a checkpoint (pass the options of the run that wrote it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start from this checkpoint's weights (of `train` or `import`) instead of a random
    /// initialization, with a fresh optimizer at step 0; the model is the checkpoint's.
    #[arg(long, conflicts_with_all = ["attention", "vocab"])]
    init: Option<PathBuf>,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = defaults::CHECKPOINT_EVERY)]
    checkpoint_every: u64,
    /// Stop after this step with a checkpoint, as if interrupted (--resume continues; the
    /// schedule still runs to --steps).
    #[arg(long)]
    stop_at: Option<u64>,
    /// Start over in an --out that holds a run, replacing its checkpoint and log.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Under `mpirun` (the `mpi` feature): how long a rank waits in one collective for the
    /// others before it ends the job, in seconds (a rank that died or hangs) [default: 300].
    #[arg(long, value_parser = parse_seconds)]
    collective_timeout: Option<std::time::Duration>,
    /// Train on this file instead of the embedded corpus (bytes as tokens, or a .bin shard).
    #[arg(long)]
    data: Option<PathBuf>,
    /// How to read --data [default: bin for *.bin, else text].
    #[arg(long, value_enum)]
    data_format: Option<FormatArg>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Encode the text --data with this HF tokenizer.json (into OUT/tokens.bin); the vocabulary
    /// becomes the tokenizer's unless --vocab is given.
    #[arg(long, conflicts_with = "data_format")]
    tokenizer: Option<PathBuf>,
}

fn parse_update_scale(s: &str) -> Result<UpdateScale, String> {
    let number = |v: &str| -> Result<f64, String> {
        match v.parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => Ok(f),
            _ => Err(format!("`{v}` is not a number > 0")),
        }
    };
    match s.split_once('=') {
        None if s == "match-adamw" => Ok(UpdateScale::MatchAdamW { rms: 0.2 }),
        None if s == "aspect-ratio" => Ok(UpdateScale::AspectRatio),
        None if s == "unit" => Ok(UpdateScale::Unit),
        Some(("match-adamw", v)) => Ok(UpdateScale::MatchAdamW { rms: number(v)? }),
        Some(("custom", v)) => Ok(UpdateScale::Custom(number(v)?)),
        _ => Err("expected match-adamw[=RMS], aspect-ratio, unit or custom=F".into()),
    }
}

impl TrainArgs {
    fn options(&self) -> Result<TrainOptions, String> {
        // A run from --init trains the checkpoint's model; its name in the log is `init`.
        let (preset, mut model) = match &self.init {
            Some(path) => (
                "init",
                Trained::load(path).map_err(|e| format!("--init {e}"))?.config,
            ),
            None => {
                let preset = self.preset.as_deref().unwrap_or("tiny");
                (preset, ModelConfig::preset(preset)?)
            }
        };
        if let Some(kind) = self.attention {
            model = train::with_attention(model, matches!(kind, AttentionArg::Mla));
        }
        if let Some(v) = self.vocab {
            model.vocab_size = v;
        }
        if let Some(alpha) = self.aux_loss_alpha {
            model.aux_loss_alpha = alpha;
        }
        let optimizer = match self.optimizer {
            OptimizerArg::Muon => OptimizerChoice::Muon,
            OptimizerArg::Adamw => OptimizerChoice::AdamW,
        };
        let mut settings = RunSettings::new(preset, model, optimizer);
        settings.steps = self.steps;
        settings.batch = self.batch;
        settings.seq = self.seq;
        settings.lr = self.lr;
        settings.seed = self.seed;
        settings.warmup = self.warmup;
        settings.precision = match self.precision {
            PrecisionArg::F32 => muon_core::Precision::F32,
            PrecisionArg::Bf16 => muon_core::Precision::Bf16,
        };
        let muon = &mut settings.hybrid.muon;
        muon.weight_decay = self.wd;
        muon.momentum = self.momentum;
        muon.nesterov = !self.no_nesterov;
        muon.update_scale = self.update_scale;
        muon.newton_schulz = match self.ns_schedule {
            NsSchedule::Quintic => NewtonSchulz::quintic(),
            NsSchedule::PolarExpress => NewtonSchulz::polar_express(),
            NsSchedule::Dion => NewtonSchulz::dion(),
        };
        muon.newton_schulz.steps = self.ns_steps;
        settings.hybrid.adamw.weight_decay = self.wd;

        let data = match &self.data {
            None => DataSource::Embedded,
            Some(path) => DataSource::File {
                path: path.clone(),
                format: self.data_format.map(|f| match f {
                    FormatArg::Text => DataFormat::Text,
                    FormatArg::Bin => DataFormat::Bin,
                }),
            },
        };
        let out = self
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("runs/{preset}-{optimizer}")));
        Ok(TrainOptions {
            settings,
            data,
            eval_every: self.eval_every,
            eval_batches: self.eval_batches,
            out: Some(out),
            resume: self.resume.clone(),
            init: self.init.clone(),
            checkpoint_every: self.checkpoint_every,
            stop_at: self.stop_at,
            progress: !self.quiet,
            overwrite: self.overwrite,
            interrupt: None,
        })
    }
}

/// Why the program ends early.
pub(crate) enum Exit {
    /// An error, printed as `error: ...` (exit status 1).
    Error(String),
    /// A run stopped by a signal after saving what it had (exit status 130, as a shell
    /// reports a Ctrl-C).
    Interrupted(String),
    /// Standard output is a closed pipe (`... | head -1`): the program ends quietly, as Unix
    /// tools do (exit status 0).
    ClosedPipe,
}

impl From<String> for Exit {
    fn from(msg: String) -> Self {
        Exit::Error(msg)
    }
}

/// Prints a line on standard output. A closed pipe ends the program quietly; any other failure
/// (`> /dev/full`) is an error that says so.
macro_rules! out {
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))
    };
}

pub(crate) fn write_stdout(line: std::fmt::Arguments) -> Result<(), Exit> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Exit::ClosedPipe),
        Err(e) => Err(Exit::Error(format!("cannot write to standard output: {e}"))),
    }
}

mod use_cli;

/// A warning on standard error, best effort (a terminal that went away does not stop a run).
pub(crate) fn warn(msg: &str) {
    let _ = writeln!(std::io::stderr(), "warning: {msg}");
}

/// What signals do to a training run: SIGINT and SIGTERM stop it after the step in progress,
/// with a checkpoint (a second one ends it at once); SIGHUP, a terminal that went away, is
/// ignored, so the run finishes its files.
fn stop_on_signals() -> Result<Arc<AtomicBool>, String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    let err = |e: std::io::Error| format!("cannot install the signal handlers: {e}");
    for signal in [SIGINT, SIGTERM] {
        // The shutdown first: it fires on the second signal, once the flag is armed.
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop)).map_err(err)?;
        signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(err)?;
    }
    signal_hook::flag::register(SIGHUP, Arc::new(AtomicBool::new(false))).map_err(err)?;
    Ok(stop)
}

fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!("`{s}` is not a number of seconds above 0")),
    }
}

fn run_train(args: &TrainArgs) -> Result<(), Exit> {
    let mut opts = args.options()?;
    if let (Some(tok), Some(out)) = (&args.tokenizer, opts.out.clone()) {
        use_cli::tokenize_for_training(tok, args.data.as_deref(), &out, args.vocab.is_some(), &mut opts)?;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match args.threads {
        Some(0) => return Err(Exit::Error("--threads must be at least 1".into())),
        Some(n) if n > cores => {
            warn(&format!(
                "--threads {n} is more than the {cores} cores here; using {cores} (more threads than cores only wait on each other)"
            ));
            cores
        }
        Some(n) => n,
        None => cores,
    };
    if opts.settings.precision == muon_core::Precision::Bf16 && muon_faer::Bf16Kernel::detect().is_none() {
        warn("--precision bf16: this CPU has neither AMX nor AVX512-BF16, so the products run in f32 (the run records bf16, and resumes as one)");
    }
    opts.interrupt = Some(stop_on_signals()?);
    // The model's own CPU ops run on rayon, the optimizer's on muon-faer's team. The loop runs
    // inside the rayon pool: its thread is one of the `threads` workers (no extra thread
    // waiting on the others), and each parallel op starts from a worker.
    let backend = muon_faer::Faer::<f32>::with_threads(threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| format!("cannot start {threads} threads: {e}"))?;
    // Alone, or one rank of an MPI job (the `mpi` feature under `mpirun`); rank 0 reports.
    let (result, reports) = pool
        .install(|| train::launch::train_process(&backend, &opts, args.collective_timeout))
        .map_err(|e| match e {
            e @ train::TrainError::Interrupted { .. } => Exit::Interrupted(e.to_string()),
            e => Exit::Error(e.to_string()),
        })?;
    if !reports {
        return Ok(());
    }
    let s = &result.summary;
    let out = opts
        .out
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    out!(
        "{} {} steps: train loss {:.4}, val loss {}, {:.0} tokens/s, optimizer {:.1}% of step time ({:.1} s fwd+bwd, {:.1} s optimizer), SVD entropy {} hidden / {} router, {:.0} s; log {out}/{}",
        s.optimizer,
        s.steps,
        s.final_train_loss,
        s.final_val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        s.tokens_per_s,
        100.0 * s.optimizer_share,
        s.fwd_bwd_s,
        s.optimizer_s,
        s.svd_entropy_hidden.map_or("-".into(), |v| format!("{v:.3}")),
        s.svd_entropy_router.map_or("-".into(), |v| format!("{v:.3}")),
        s.wall_s,
        train::LOG_FILE,
    )
}

fn run_repro(args: &moonlight_ref::repro::ReproArgs) -> Result<(), Exit> {
    use moonlight_ref::repro::ReproError;
    let lines = moonlight_ref::repro::main(args, Some(stop_on_signals()?)).map_err(|e| match e {
        ReproError::Interrupted(m) => Exit::Interrupted(m),
        ReproError::Failed(m) => Exit::Error(m),
    })?;
    for line in lines {
        out!("{line}")?;
    }
    Ok(())
}

fn run_params(preset: &str) -> Result<(), Exit> {
    let config = ModelConfig::preset(preset)?;
    config.validate()?;
    let c = config.param_counts();
    let human = |n: u64| {
        if n >= 1_000_000_000 {
            format!("{:.2}B", n as f64 / 1e9)
        } else if n >= 1_000_000 {
            format!("{:.2}M", n as f64 / 1e6)
        } else {
            format!("{:.1}K", n as f64 / 1e3)
        }
    };
    let without = c.active - c.embedding_and_head;
    out!("preset {preset}")?;
    out!("total parameters   {:>16} ({})", c.total, human(c.total))?;
    out!("active per token   {:>16} ({})", c.active, human(c.active))?;
    out!("  without emb+head {:>16} ({})", without, human(without))?;
    out!(
        "embedding + head   {:>16} ({})",
        c.embedding_and_head,
        human(c.embedding_and_head)
    )?;
    out!("attention          {:>16} ({})", c.attention, human(c.attention))?;
    out!("dense FFN          {:>16} ({})", c.dense_ffn, human(c.dense_ffn))?;
    out!("MoE                {:>16} ({})", c.moe, human(c.moe))
}

/// Whether two paths name the same file (both existing), or the same path.
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn run_plot(logs: &[PathBuf], out: &Path, smooth: usize) -> Result<(), Exit> {
    if let Some(log) = logs.iter().find(|log| same_file(log, out)) {
        return Err(Exit::Error(format!(
            "--out {} is one of the logs to plot ({}): choose another file for the SVG",
            out.display(),
            log.display()
        )));
    }
    let mut runs = Vec::new();
    for path in logs {
        let records = read_log(path)?;
        let label = path.parent().and_then(|p| p.file_name()).map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        runs.push(Curves::from_records(label, &records, smooth));
    }
    plot_losses(&runs, out)?;
    out!("wrote {}", out.display())
}

/// The fewest bytes `corpus` writes: two contexts of the default `--seq`, the least a run
/// needs (one window to train on, one held out).
const CORPUS_MIN_BYTES: usize = 2 * (defaults::SEQ + 1);

fn run_corpus(bytes: usize, out: &Path) -> Result<(), Exit> {
    if bytes < CORPUS_MIN_BYTES {
        return Err(Exit::Error(format!(
            "--bytes {bytes} is too few: a run needs at least {CORPUS_MIN_BYTES} (two contexts of --seq {})",
            defaults::SEQ
        )));
    }
    // Streamed into the file: any size needs a few KiB of memory, and a full disk or a Ctrl-C
    // is an error that leaves no partial file.
    let stop = stop_on_signals()?;
    let written = moonlight_ref::files::write_atomic_with(out, |file| {
        let mut file = std::io::BufWriter::new(StopOnSignal {
            inner: file,
            stop: &stop,
        });
        moonlight_ref::corpus::write_corpus(bytes, &mut file)?;
        file.flush()
    });
    match written {
        Ok(()) => out!("wrote {} ({bytes} bytes)", out.display()),
        Err(e) if e.get_ref().is_some_and(|inner| inner.is::<Stopped>()) => Err(Exit::Interrupted(format!(
            "interrupted; {} was not written",
            out.display()
        ))),
        Err(e) => Err(Exit::Error(format!("cannot write {}: {e}", out.display()))),
    }
}

/// The error a [`StopOnSignal`] writer fails with. (Not `ErrorKind::Interrupted`: `write_all`
/// retries that one.)
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by a signal")
    }
}

impl std::error::Error for Stopped {}

/// A writer that fails with [`Stopped`] once `stop` is set (by a signal).
struct StopOnSignal<'a, W> {
    inner: W,
    stop: &'a AtomicBool,
}

impl<W: Write> Write for StopOnSignal<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::other(Stopped));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        None => run_train(&cli.train),
        Some(Command::Train(args)) => run_train(args),
        Some(Command::Params { preset }) => run_params(preset),
        Some(Command::Plot { logs, out, smooth }) => run_plot(logs, out, *smooth),
        Some(Command::Corpus { bytes, out }) => run_corpus(*bytes, out),
        Some(Command::Sample(args)) => use_cli::run_sample(args),
        Some(Command::Eval(args)) => use_cli::run_eval(args),
        Some(Command::Export { checkpoint, out }) => use_cli::run_export(checkpoint, out),
        Some(Command::Import { dir, out }) => use_cli::run_import(dir, out),
        Some(Command::Tokenizer { data, vocab, out }) => use_cli::run_tokenizer(data, *vocab, out),
        Some(Command::Repro(args)) => run_repro(args),
    };
    match result {
        Ok(()) | Err(Exit::ClosedPipe) => ExitCode::SUCCESS,
        Err(Exit::Error(msg)) => {
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            ExitCode::FAILURE
        }
        Err(Exit::Interrupted(msg)) => {
            let _ = writeln!(std::io::stderr(), "{msg}");
            ExitCode::from(130)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_scale_forms() {
        assert_eq!(
            parse_update_scale("match-adamw"),
            Ok(UpdateScale::MatchAdamW { rms: 0.2 })
        );
        assert_eq!(
            parse_update_scale("match-adamw=0.4"),
            Ok(UpdateScale::MatchAdamW { rms: 0.4 })
        );
        assert_eq!(parse_update_scale("aspect-ratio"), Ok(UpdateScale::AspectRatio));
        assert_eq!(parse_update_scale("unit"), Ok(UpdateScale::Unit));
        assert_eq!(parse_update_scale("custom=1.5"), Ok(UpdateScale::Custom(1.5)));
        for bad in ["custom=-1", "match-adamw=nan", "custom", "sideways", "unit=2"] {
            assert!(parse_update_scale(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_map_to_settings() {
        let cli = Cli::try_parse_from([
            "moonlight-ref",
            "--optimizer",
            "adamw",
            "--steps",
            "40",
            "--warmup",
            "4",
            "--lr",
            "0.02",
            "--wd",
            "0.05",
            "--no-nesterov",
            "--momentum",
            "0.9",
            "--ns-steps",
            "3",
            "--ns-schedule",
            "polar-express",
            "--attention",
            "mha",
            "--vocab",
            "300",
            "--aux-loss-alpha",
            "0.01",
            "--data",
            "x.bin",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        let o = cli.train.options().unwrap();
        let s = &o.settings;
        assert_eq!(s.optimizer, OptimizerChoice::AdamW);
        assert_eq!((s.steps, s.lr), (40, 0.02));
        assert_eq!(s.schedule(), muon_core::LrSchedule::moonlight(4, 40));
        assert_eq!(
            (s.hybrid.muon.weight_decay, s.hybrid.adamw.weight_decay),
            (0.05, 0.05)
        );
        assert!(!s.hybrid.muon.nesterov);
        assert_eq!(s.hybrid.muon.momentum, 0.9);
        assert_eq!(s.hybrid.muon.newton_schulz.steps, 3);
        assert_eq!(
            s.hybrid.muon.newton_schulz.coefficients,
            NewtonSchulz::polar_express().coefficients
        );
        assert_eq!(s.model.attention, moonlight_ref::config::Attention::Mha);
        assert_eq!(s.model.vocab_size, 300);
        assert_eq!(s.model.aux_loss_alpha, 0.01);
        assert_eq!(o.out, Some(PathBuf::from("runs/tiny-adamw")));
        assert_eq!(
            o.data,
            DataSource::File {
                path: "x.bin".into(),
                format: None
            }
        );
    }
}
