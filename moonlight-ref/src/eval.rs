//! Using a trained checkpoint: loading it as a model, and measuring it on a token stream.
//!
//! [`evaluate_stream`] scores every token of a stream but the first exactly once: the stream
//! is cut into consecutive windows of `seq` inputs (window `w` reads tokens `w*seq ..
//! w*seq + seq` and predicts the next one at each), the last window holding whatever is left.
//! It runs the training forward ([`Model::forward`]) on batches of windows, so on the same
//! windows it gives the trainer's validation loss.

use std::path::Path;

use crate::checkpoint::{self, Checkpoint};
use crate::config::ModelConfig;
use crate::model::Model;
use crate::ops::ModelOps;

/// A checkpoint of `moonlight-ref train` (or `import`) and the model configuration it records.
pub struct Trained {
    /// The model's configuration (the checkpoint's `config` metadata).
    pub config: ModelConfig,
    /// The checkpoint.
    pub checkpoint: Checkpoint,
}

impl Trained {
    /// Loads and checks `path`: a moonlight-ref checkpoint whose tensors are its config's model.
    pub fn load(path: &Path) -> Result<Trained, String> {
        if !path.is_file() {
            return Err(format!("checkpoint {}: no such file", path.display()));
        }
        let checkpoint = checkpoint::load(path).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("format `pt`") {
                format!("{msg}: it is a transformers weights file; `moonlight-ref import` its directory into a checkpoint first")
            } else {
                msg
            }
        })?;
        let json = checkpoint.metadata.get("config").ok_or_else(|| {
            format!(
                "{}: no `config` metadata: not a checkpoint of `moonlight-ref train` or `import`",
                path.display()
            )
        })?;
        let config: ModelConfig = serde_json::from_str(json).map_err(|e| {
            format!(
                "{}: its `config` metadata is not a model configuration: {e}",
                path.display()
            )
        })?;
        config
            .validate()
            .map_err(|e| format!("{}: its model configuration is invalid: {e}", path.display()))?;
        let trained = Trained { config, checkpoint };
        // The tensors must be the configuration's model: build the smallest one and check.
        let b = muon_core::Portable::<f32>::new();
        let mut model = Model::new(&b, trained.config.clone(), 1, 1, 0).map_err(|e| e.to_string())?;
        trained.checkpoint.restore_model(&b, &mut model).map_err(|e| {
            format!(
                "{}: it does not hold the model its config describes: {e}",
                path.display()
            )
        })?;
        Ok(trained)
    }

    /// The batch and sequence length of the run that wrote it (its `run` metadata), if known.
    pub fn run_shape(&self) -> Option<(usize, usize)> {
        let run: serde_json::Value = serde_json::from_str(self.checkpoint.metadata.get("run")?).ok()?;
        Some((run["batch"].as_u64()? as usize, run["seq"].as_u64()? as usize))
    }

    /// A model of this checkpoint on `backend` for `batch x seq` windows.
    pub fn model<B: ModelOps<Elem = f32>>(
        &self,
        backend: &B,
        batch: usize,
        seq: usize,
    ) -> Result<Model<B>, String> {
        let mut model = Model::new(backend, self.config.clone(), batch, seq, 0).map_err(|e| e.to_string())?;
        self.checkpoint
            .restore_model(backend, &mut model)
            .map_err(|e| e.to_string())?;
        Ok(model)
    }
}

/// What [`evaluate_stream`] measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Tokens scored (all but the first).
    pub tokens: u64,
    /// Windows run.
    pub windows: u64,
    /// Inputs per window (the last may be shorter).
    pub seq: usize,
    /// Mean cross-entropy per scored token, in nats.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Bits per byte of text (the scored tokens' nats over ln 2 and the bytes they cover), when
    /// the bytes are known (text, bytes as tokens or through a tokenizer; not token shards).
    pub bits_per_byte: Option<f64>,
}

/// Scores `tokens` with the checkpoint in windows of `seq` inputs, `batch` windows per
/// forward; `progress(done, total)` after each forward (windows). `scored_bytes` is the number
/// of bytes of text the scored tokens (all but the first) cover, when known: then bits per byte
/// are reported.
pub fn evaluate_stream<B: ModelOps<Elem = f32>>(
    backend: &B,
    trained: &Trained,
    tokens: &[u16],
    batch: usize,
    seq: usize,
    scored_bytes: Option<u64>,
    mut progress: impl FnMut(u64, u64),
) -> Result<EvalReport, String> {
    if tokens.len() < 2 {
        return Err(format!(
            "{} tokens: evaluation needs at least 2 (a token and the one after it)",
            tokens.len()
        ));
    }
    if batch == 0 || seq == 0 {
        return Err(format!("batch {batch} and seq {seq} must be at least 1"));
    }
    let v = trained.config.vocab_size;
    if let Some((pos, &t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= v) {
        return Err(format!(
            "token {t} at position {pos} is outside the model's vocabulary of {v}"
        ));
    }
    let scored = tokens.len() - 1;
    let full = scored / seq; // windows of `seq` inputs
    let tail = scored % seq; // the inputs of a last, shorter window
    let total = (full + usize::from(tail > 0)) as u64;
    let mut done = 0u64;
    let mut nats = 0.0f64;
    let mut run = |model: &mut Model<B>, first: usize, count: usize, len: usize| -> Result<(), String> {
        let mut x = Vec::with_capacity(count * len);
        let mut y = Vec::with_capacity(count * len);
        for w in first..first + count {
            let start = w * seq;
            x.extend(tokens[start..start + len].iter().map(|&t| t as u32));
            y.extend(tokens[start + 1..start + len + 1].iter().map(|&t| t as u32));
        }
        let loss = model.forward(backend, &x, &y).map_err(|e| e.to_string())?;
        if !loss.is_finite() {
            return Err(format!(
                "the loss of windows {first}..{} is {loss}",
                first + count
            ));
        }
        nats += loss * (count * len) as f64;
        done += count as u64;
        progress(done, total);
        Ok(())
    };
    let batches = full / batch;
    if batches > 0 {
        let mut model = trained.model(backend, batch, seq)?;
        for i in 0..batches {
            run(&mut model, i * batch, batch, seq)?;
        }
    }
    let rest = full % batch;
    if rest > 0 {
        let mut model = trained.model(backend, rest, seq)?;
        run(&mut model, batches * batch, rest, seq)?;
    }
    if tail > 0 {
        let mut model = trained.model(backend, 1, tail)?;
        run(&mut model, full, 1, tail)?;
    }
    let loss = nats / scored as f64;
    Ok(EvalReport {
        tokens: scored as u64,
        windows: total,
        seq,
        loss,
        perplexity: loss.exp(),
        bits_per_byte: scored_bytes.map(|b| nats / std::f64::consts::LN_2 / b as f64),
    })
}
