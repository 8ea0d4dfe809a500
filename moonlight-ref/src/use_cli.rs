//! The subcommands that use a trained checkpoint: `sample`, `eval`, `export`, `import`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moonlight_ref::checkpoint;
use moonlight_ref::data::{load_tokens, DataFormat, DataSource};
use moonlight_ref::eval::{evaluate_stream, Trained};
use moonlight_ref::hf;
use moonlight_ref::infer::{Decoder, Sampler, SamplingOptions};

use crate::{warn, write_stdout, Exit, FormatArg};

#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// The checkpoint (of `train` or `import`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The text to continue (bytes as tokens); printed, then the continuation.
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Softmax temperature; 0 takes the most likely token each time.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Draw only from the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Draw only from the most likely tokens whose probability sums to P (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Fixes the draws: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// The checkpoint (of `train` or `import`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The file to score, all of it (bytes as tokens, or a .bin shard).
    #[arg(long)]
    data: PathBuf,
    /// How to read --data [default: bin for *.bin, else text].
    #[arg(long, value_enum)]
    data_format: Option<FormatArg>,
    /// Inputs per window [default: the training run's --seq, else the model's max_seq_len].
    #[arg(long)]
    seq: Option<usize>,
    /// Windows per forward [default: the training run's --batch, else 8].
    #[arg(long)]
    batch: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Raw bytes on standard output, flushed: a closed pipe ends the program quietly.
fn write_raw(bytes: &[u8]) -> Result<(), Exit> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Exit::ClosedPipe),
        Err(e) => Err(Exit::Error(format!("cannot write to standard output: {e}"))),
    }
}

/// Byte-level text needs a vocabulary of exactly the 256 bytes.
fn check_byte_level(trained: &Trained, path: &Path) -> Result<(), Exit> {
    let v = trained.config.vocab_size;
    if v != 256 {
        return Err(Exit::Error(format!(
            "{}: the model's vocabulary is {v} tokens, not the 256 bytes; sample reads and writes text as bytes, so it needs a byte-level model",
            path.display()
        )));
    }
    Ok(())
}

pub fn run_sample(a: &SampleArgs) -> Result<(), Exit> {
    let opts = SamplingOptions {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    opts.validate()?;
    if a.prompt.is_empty() {
        return Err(Exit::Error(
            "--prompt is empty: the model needs at least one token to continue (leave --prompt out to start from a newline)".into(),
        ));
    }
    let trained = Trained::load(&a.checkpoint)?;
    check_byte_level(&trained, &a.checkpoint)?;
    let context = trained.config.max_seq_len;
    let mut decoder = Decoder::new(
        &trained.config,
        &trained.checkpoint.params,
        &trained.checkpoint.buffers,
        context,
    )
    .map_err(|e| format!("{}: {e}", a.checkpoint.display()))?;
    let mut sampler = Sampler::new(opts, a.seed, trained.config.vocab_size);
    let mut history: Vec<u32> = a.prompt.bytes().map(u32::from).collect();
    // A prompt longer than the context: its last half-context is what the model sees.
    let keep = |h: &[u32]| h.len().saturating_sub((context / 2).max(1));
    let start = if history.len() > context {
        keep(&history)
    } else {
        0
    };
    write_raw(a.prompt.as_bytes())?;
    let mut logits = decoder
        .logits(&history[start..], true)
        .map_err(|e| e.to_string())?;
    for _ in 0..a.tokens {
        let next = sampler.sample(&logits);
        write_raw(&[next as u8])?;
        history.push(next);
        if decoder.position() == context {
            // The cache is full: continue from the last half-context (recomputed).
            let from = keep(&history);
            logits = decoder
                .logits(&history[from..], true)
                .map_err(|e| e.to_string())?;
        } else {
            logits = decoder.step(next).map_err(|e| e.to_string())?.to_vec();
        }
    }
    write_raw(b"\n")
}

pub fn run_eval(a: &EvalArgs) -> Result<(), Exit> {
    let trained = Trained::load(&a.checkpoint)?;
    let format = a.data_format.map(|f| match f {
        FormatArg::Text => DataFormat::Text,
        FormatArg::Bin => DataFormat::Bin,
    });
    let resolved = format.unwrap_or_else(|| DataFormat::detect(&a.data));
    let (name, tokens) = load_tokens(&DataSource::File {
        path: a.data.clone(),
        format: Some(resolved),
    })
    .map_err(|e| e.to_string())?;
    let (run_batch, run_seq) = trained.run_shape().unwrap_or((8, trained.config.max_seq_len));
    let seq = a.seq.unwrap_or(run_seq);
    let batch = a.batch.unwrap_or(run_batch);
    if seq == 0 || seq > trained.config.max_seq_len {
        return Err(Exit::Error(format!(
            "--seq {seq} must be between 1 and the model's max_seq_len {}",
            trained.config.max_seq_len
        )));
    }
    if batch == 0 {
        return Err(Exit::Error("--batch must be at least 1".into()));
    }
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("eval {bar:30} {pos}/{len} windows {elapsed_precise} eta {eta}")
                .expect("a valid template"),
        );
        bar
    };
    let backend = muon_faer::Faer::<f32>::new();
    let byte_level = resolved == DataFormat::Text;
    let report = rayon::scope(|_| {
        evaluate_stream(
            &backend,
            &trained,
            &tokens,
            batch,
            seq,
            byte_level,
            |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            },
        )
    })
    .map_err(|e| format!("{name}: {e}"))?;
    bar.finish_and_clear();
    let line = serde_json::json!({
        "checkpoint": a.checkpoint.display().to_string(),
        "data": name,
        "tokens": report.tokens,
        "windows": report.windows,
        "seq": report.seq,
        "loss": report.loss,
        "perplexity": report.perplexity,
        "bits_per_byte": report.bits_per_byte,
    });
    write_stdout(format_args!("{line}"))
}

pub fn run_export(checkpoint_path: &Path, out: &Path) -> Result<(), Exit> {
    let trained = Trained::load(checkpoint_path)?;
    hf::check_exportable(&trained.config).map_err(|e| format!("{}: {e}", checkpoint_path.display()))?;
    for w in hf::export(&trained.config, &trained.checkpoint, out)? {
        warn(&w);
    }
    write_stdout(format_args!(
        "wrote {} ({} and {}, transformers DeepseekV3, rope_interleave false)",
        out.display(),
        hf::CONFIG_FILE,
        hf::WEIGHTS_FILE
    ))
}

pub fn run_import(dir: &Path, out: &Path) -> Result<(), Exit> {
    let ckpt = hf::import(dir)?;
    checkpoint::save(out, &ckpt).map_err(|e| e.to_string())?;
    write_stdout(format_args!("wrote {}", out.display()))
}
