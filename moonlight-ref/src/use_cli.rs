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
use moonlight_ref::tokenizer::{self, read_text, Tokenizer};

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
    /// An HF tokenizer.json for the prompt and the output [default: bytes as tokens].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Positions the model sees before the window slides [default: the training run's --seq,
    /// else the model's max_seq_len].
    #[arg(long)]
    context: Option<usize>,
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
    /// An HF tokenizer.json to encode the (UTF-8 text) file with [default: bytes as tokens].
    #[arg(long, conflicts_with = "data_format")]
    tokenizer: Option<PathBuf>,
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

/// Where sampled tokens go: bytes as they are, or decoded by a tokenizer (the whole
/// continuation decoded each time and only its new, complete characters printed, so that
/// a character split over tokens comes out whole).
enum Output {
    Bytes,
    Text {
        tok: Box<Tokenizer>,
        ids: Vec<u32>,
        printed: usize,
    },
}

impl Output {
    fn push(&mut self, id: u32) -> Result<(), Exit> {
        match self {
            Output::Bytes => write_raw(&[id as u8]),
            Output::Text { tok, ids, printed } => {
                ids.push(id);
                let text = tok.decode(ids)?;
                // Hold back a trailing replacement character: the rest of its bytes may come.
                let ready = text.trim_end_matches('\u{fffd}');
                if ready.len() > *printed && ready.is_char_boundary(*printed) {
                    write_raw(&ready.as_bytes()[*printed..])?;
                    *printed = ready.len();
                }
                Ok(())
            }
        }
    }
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
    let (mut history, mut output): (Vec<u32>, Output) = match &a.tokenizer {
        None => {
            check_byte_level(&trained, &a.checkpoint)?;
            (a.prompt.bytes().map(u32::from).collect(), Output::Bytes)
        }
        Some(path) => {
            let tok = Tokenizer::load(path)?;
            tok.check_fits(trained.config.vocab_size)?;
            let ids = tok.encode(&a.prompt)?;
            if ids.is_empty() {
                return Err(Exit::Error(format!(
                    "--prompt encodes to no tokens with {}",
                    path.display()
                )));
            }
            (
                ids,
                Output::Text {
                    tok: Box::new(tok),
                    ids: Vec::new(),
                    printed: 0,
                },
            )
        }
    };
    // The positions the model was trained on: past them RoPE angles it never saw, and text
    // falls apart (a tiny model trained at --seq 64 degrades within a few tokens of 64).
    let max = trained.config.max_seq_len;
    let context = match a.context {
        Some(c) if c == 0 || c > max => {
            return Err(Exit::Error(format!(
                "--context {c} must be between 1 and the model's max_seq_len {max}"
            )))
        }
        Some(c) => c,
        None => trained.run_shape().map_or(max, |(_, seq)| seq.min(max)),
    };
    let mut decoder = Decoder::new(
        &trained.config,
        &trained.checkpoint.params,
        &trained.checkpoint.buffers,
        context,
    )
    .map_err(|e| format!("{}: {e}", a.checkpoint.display()))?;
    let mut sampler = Sampler::new(opts, a.seed, trained.config.vocab_size);
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
        output.push(next)?;
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
    let (name, tokens, scored_bytes) = match &a.tokenizer {
        None => {
            let (name, tokens) = load_tokens(&DataSource::File {
                path: a.data.clone(),
                format: Some(resolved),
            })
            .map_err(|e| e.to_string())?;
            let bytes = (resolved == DataFormat::Text).then(|| tokens.len() as u64 - 1);
            (name, tokens, bytes)
        }
        Some(path) => {
            let tok = Tokenizer::load(path)?;
            tok.check_fits(trained.config.vocab_size)?;
            let text = read_text(&a.data)?;
            let ids = tok.encode(&text)?;
            let first = match ids.first() {
                Some(&id) => tok.decode(&[id])?.len() as u64,
                None => 0,
            };
            let tokens: Vec<u16> = ids.iter().map(|&id| id as u16).collect(); // fits: check_fits
            (
                a.data.display().to_string(),
                tokens,
                Some((text.len() as u64).saturating_sub(first)),
            )
        }
    };
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
    let report = rayon::scope(|_| {
        evaluate_stream(
            &backend,
            &trained,
            &tokens,
            batch,
            seq,
            scored_bytes,
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

pub fn run_tokenizer(data: &Path, vocab: usize, out: &Path) -> Result<(), Exit> {
    let got = tokenizer::train_bpe(data, vocab, out)?;
    write_stdout(format_args!(
        "wrote {} (byte-level BPE, {got} tokens{})",
        out.display(),
        if got < vocab {
            ", fewer than asked: the text has no more pairs to merge"
        } else {
            ""
        }
    ))
}

/// `train --tokenizer`: encodes the text `--data` into `OUT/tokens.bin` (an llm.c shard the
/// trainer reads) and sizes the model's vocabulary to the tokenizer unless `--vocab` says.
pub fn tokenize_for_training(
    tok_path: &Path,
    data: Option<&Path>,
    out: &Path,
    vocab_given: bool,
    opts: &mut moonlight_ref::train::TrainOptions,
) -> Result<(), Exit> {
    let data = data.ok_or_else(|| Exit::Error("--tokenizer needs --data (a UTF-8 text file)".into()))?;
    let tok = Tokenizer::load(tok_path)?;
    let model = &mut opts.settings.model;
    if vocab_given {
        tok.check_fits(model.vocab_size)?;
    } else {
        model.vocab_size = tok.vocab_size();
    }
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let bin = out.join("tokens.bin");
    tok.encode_file_to_bin(data, &bin)?;
    opts.data = DataSource::File {
        path: bin,
        format: Some(DataFormat::Bin),
    };
    Ok(())
}
