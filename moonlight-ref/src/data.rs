//! Training data: where the tokens come from, the held-out split, and seeded batch sampling.
//!
//! Three sources, all ending as a flat token stream:
//! - the embedded corpus ([`crate::corpus`]): generated in code, deterministically, so the
//!   default run needs no download; bytes as tokens (vocab 256);
//! - any file as bytes (`--data FILE`, format `text`);
//! - llm.c / modded-nanogpt token shards (`.bin`, docs/DESIGN.md §6): a header of 256
//!   little-endian `i32` (magic 20240520, version 1, token count), then that many `u16`.
//!
//! The last tenth of the stream (at least one context) is held out for validation. Batches
//! are `B` random windows of `T + 1` tokens (B batch, T sequence length): tokens are the first
//! `T`, targets the last `T`. The sampler's whole state is one `u64`, which checkpoints save so
//! that a resumed run sees exactly the batches an uninterrupted one would.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::corpus::embedded_corpus;
use crate::rng::Rng;

/// What went wrong with the data; the message names the file and the problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataError(pub String);

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

fn fail<T>(msg: String) -> Result<T, DataError> {
    Err(DataError(msg))
}

// ---------------------------------------------------------------------------------------------
// Files

/// How to read a data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DataFormat {
    /// Any file, one token per byte (vocab 256).
    Text,
    /// An llm.c token shard.
    Bin,
}

impl DataFormat {
    /// `Bin` for a `.bin` file, `Text` otherwise.
    pub fn detect(path: &Path) -> DataFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("bin") => DataFormat::Bin,
            _ => DataFormat::Text,
        }
    }
}

/// Where the tokens come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// The embedded corpus.
    Embedded,
    /// A file; `format: None` detects it from the extension.
    File {
        /// The file.
        path: PathBuf,
        /// Its format, or `None` to detect.
        format: Option<DataFormat>,
    },
}

/// The header of an llm.c token shard: 256 little-endian `i32`.
pub const BIN_HEADER_INTS: usize = 256;
/// `header[0]` of an llm.c token shard.
pub const BIN_MAGIC: i32 = 20240520;
/// `header[1]`: the only version there is.
pub const BIN_VERSION: i32 = 1;

/// Parses an llm.c token shard; `path` only names the file in errors.
pub fn parse_bin(path: &Path, bytes: &[u8]) -> Result<Vec<u16>, DataError> {
    let name = path.display();
    let header_bytes = BIN_HEADER_INTS * 4;
    if bytes.len() < header_bytes {
        return fail(format!(
            "{name}: truncated .bin header: the file has {} bytes, an llm.c header alone needs {header_bytes}",
            bytes.len()
        ));
    }
    let header: Vec<i32> = little_endian(&bytes[..header_bytes]);
    let (magic, version, count) = (header[0], header[1], header[2]);
    if magic != BIN_MAGIC {
        return fail(format!(
            "{name}: bad magic number {magic} in the .bin header (expected {BIN_MAGIC}); not an llm.c token shard"
        ));
    }
    if version != BIN_VERSION {
        return fail(format!(
            "{name}: unsupported .bin version {version} (expected {BIN_VERSION})"
        ));
    }
    if count <= 0 {
        return fail(format!(
            "{name}: the .bin header declares {count} tokens; there must be at least one"
        ));
    }
    let body = &bytes[header_bytes..];
    let expected = count as usize * 2;
    if body.len() < expected {
        return fail(format!(
            "{name}: truncated .bin file: the header declares {count} tokens ({expected} bytes) but only {} bytes follow it",
            body.len()
        ));
    }
    if body.len() > expected {
        return fail(format!(
            "{name}: corrupt .bin file: {} bytes follow the {count} tokens its header declares",
            body.len() - expected
        ));
    }
    Ok(little_endian(body))
}

/// Numbers stored little-endian, read at any alignment (the copy aligns them; the crate is
/// little-endian only, see its docs).
fn little_endian<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    bytemuck::pod_collect_to_vec(bytes)
}

/// Writes `tokens` as an llm.c token shard (for tests and for converting text).
pub fn encode_bin(tokens: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(BIN_HEADER_INTS * 4 + tokens.len() * 2);
    let mut header = [0i32; BIN_HEADER_INTS];
    header[0] = BIN_MAGIC;
    header[1] = BIN_VERSION;
    header[2] = tokens.len() as i32;
    out.extend_from_slice(bytemuck::cast_slice(&header));
    out.extend_from_slice(bytemuck::cast_slice(tokens));
    out
}

/// Reads the tokens of a source (without the split; see [`Dataset::new`]).
pub fn load_tokens(source: &DataSource) -> Result<(String, Vec<u16>), DataError> {
    match source {
        DataSource::Embedded => {
            let tokens = embedded_corpus().into_iter().map(u16::from).collect();
            Ok(("embedded corpus".to_string(), tokens))
        }
        DataSource::File { path, format } => {
            let bytes = std::fs::read(path)
                .map_err(|e| DataError(format!("cannot read data file {}: {e}", path.display())))?;
            if bytes.is_empty() {
                return fail(format!("data file {} is empty", path.display()));
            }
            let tokens = match format.unwrap_or_else(|| DataFormat::detect(path)) {
                DataFormat::Text => bytes.into_iter().map(u16::from).collect(),
                DataFormat::Bin => parse_bin(path, &bytes)?,
            };
            Ok((path.display().to_string(), tokens))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The split and the sampler

/// A token stream split into training and validation parts.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Where it came from, for messages.
    pub name: String,
    /// The training tokens (the first nine tenths).
    pub train: Vec<u16>,
    /// The held-out tokens (the last tenth, at least one context).
    pub val: Vec<u16>,
    /// FNV-1a hash of all tokens: a resumed run checks it sees the same data.
    pub fingerprint: u64,
}

impl Dataset {
    /// Splits `tokens` for contexts of `seq` tokens: the last tenth, and at least `seq + 1`
    /// tokens, is held out. Errors when either part would be shorter than one context (`seq
    /// + 1` tokens: `seq` inputs and the target after the last one) or a token is not below
    /// `vocab`.
    pub fn new(name: String, tokens: Vec<u16>, seq: usize, vocab: usize) -> Result<Dataset, DataError> {
        if tokens.is_empty() {
            return fail(format!("data {name} holds no tokens"));
        }
        if let Some((pos, &tok)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return fail(format!(
                "{name}: token {tok} at position {pos} is not below the model's vocab size {vocab} (set --vocab)"
            ));
        }
        let context = seq + 1;
        let n_val = (tokens.len() / 10).max(context);
        if tokens.len() < n_val + context {
            return fail(format!(
                "{name} has {} tokens, too short: one context of --seq {seq} needs {context} tokens, for training and again for validation ({} in all)",
                tokens.len(),
                2 * context
            ));
        }
        let fingerprint = fnv1a(&tokens);
        let mut train = tokens;
        let val = train.split_off(train.len() - n_val);
        Ok(Dataset {
            name,
            train,
            val,
            fingerprint,
        })
    }

    /// Loads a source and splits it.
    pub fn load(source: &DataSource, seq: usize, vocab: usize) -> Result<Dataset, DataError> {
        let (name, tokens) = load_tokens(source)?;
        Dataset::new(name, tokens, seq, vocab)
    }
}

fn fnv1a(tokens: &[u16]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in tokens {
        for b in t.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Draws `batch` random windows of `seq + 1` tokens per call.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchSampler {
    rng: Rng,
    /// Windows per batch (B).
    pub batch: usize,
    /// Tokens per window, not counting the last target (T).
    pub seq: usize,
}

impl BatchSampler {
    /// A sampler whose sequence of batches is fixed by `seed`.
    pub fn new(seed: u64, batch: usize, seq: usize) -> Self {
        BatchSampler {
            rng: Rng::new(seed),
            batch,
            seq,
        }
    }

    /// The state to checkpoint: [`BatchSampler::new`] with it continues exactly here.
    pub fn state(&self) -> u64 {
        self.rng.state()
    }

    /// Fills the next batch. `data` must hold at least `seq + 1` tokens (a [`Dataset`]'s parts
    /// do); `tokens` and `targets` are `[B][T]` row-major, `B * T` each.
    pub fn next_batch(&mut self, data: &[u16], tokens: &mut [u32], targets: &mut [u32]) {
        let (b, t) = (self.batch, self.seq);
        assert!(data.len() > t, "data shorter than one context");
        assert!(
            tokens.len() == b * t && targets.len() == b * t,
            "batch buffers must be B*T"
        );
        let starts = data.len() - t; // windows [s, s + t] for s in 0..starts
        for row in 0..b {
            let s = self.rng.below(starts);
            let window = &data[s..s + t + 1];
            for (i, pair) in window.windows(2).enumerate() {
                tokens[row * t + i] = pair[0] as u32;
                targets[row * t + i] = pair[1] as u32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_windows_are_shifted_by_one_and_replayable() {
        let data: Vec<u16> = (0..100).collect();
        let mut s = BatchSampler::new(7, 3, 5);
        let (mut x, mut y) = (vec![0; 15], vec![0; 15]);
        s.next_batch(&data, &mut x, &mut y);
        for i in 0..15 {
            assert_eq!(y[i], x[i] + 1);
        }
        let state = s.state();
        let mut resumed = BatchSampler::new(state, 3, 5);
        let (mut x1, mut y1, mut x2, mut y2) = (vec![0; 15], vec![0; 15], vec![0; 15], vec![0; 15]);
        s.next_batch(&data, &mut x1, &mut y1);
        resumed.next_batch(&data, &mut x2, &mut y2);
        assert_eq!((x1, y1), (x2, y2));
    }
}
