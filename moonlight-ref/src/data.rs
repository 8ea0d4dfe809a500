//! Training data: where the tokens come from, the held-out split, and seeded batch sampling.
//!
//! Three sources, all ending as a flat token stream:
//! - the embedded corpus ([`embedded_corpus`]): generated in code, deterministically, so the
//!   default run needs no download; bytes as tokens (vocab 256);
//! - any file as bytes (`--data FILE`, format `text`);
//! - llm.c / modded-nanogpt token shards (`.bin`, SPEC section 6): a header of 256
//!   little-endian `i32` (magic 20240520, version 1, token count), then that many `u16`.
//!
//! The last tenth of the stream (at least one context) is held out for validation. Batches
//! are `B` random windows of `T + 1` tokens (B batch, T sequence length): tokens are the first
//! `T`, targets the last `T`. The sampler's whole state is one `u64`, which checkpoints save so
//! that a resumed run sees exactly the batches an uninterrupted one would.

use std::fmt;
use std::path::{Path, PathBuf};

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
// The random number generator

/// SplitMix64 (Steele, Lea, Flood 2014): a small, well-mixed generator whose whole state is one
/// `u64`, so saving and restoring it is exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// The state, to save.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by Lemire's multiply-shift (bias below 2^-32 for the
    /// sizes used here).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < p
    }

    /// A uniformly chosen element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// The embedded corpus

/// Size of the embedded corpus in bytes.
pub const EMBEDDED_BYTES: usize = 400_000;

/// The embedded corpus: about 400 KB of English-like text with structure a small model can
/// learn, generated from a fixed seed (the same bytes on every machine and every run).
///
/// It mixes four kinds of line:
/// - sentences from a small probabilistic grammar: noun phrases with optional adjectives,
///   transitive and intransitive verbs that agree in number with their subject (`the fox
///   sees`, `the foxes see`, irregular plurals like `mice`), prepositional phrases, adverbs,
///   and clauses joined by `and`, `but`, `because`, `when`, or reported (`Ada said that ...`);
/// - arithmetic facts: `17 + 25 = 42`, `31 - 9 = 22`, `7 * 8 = 56` (operands below 50, or 13
///   for products), so the digits after `=` are predictable from those before;
/// - a fixed table of 24 invented facts (`The capital of Vardia is Olmen.`) that recur, so
///   they can be memorized;
/// - counting runs (`count: 14 15 16 17 18`) and spelled-out numbers (`three plus four is
///   seven.`).
pub fn embedded_corpus() -> Vec<u8> {
    generated_corpus(EMBEDDED_BYTES)
}

/// `bytes` bytes of the embedded corpus's text: the same generator and seed, run for longer.
/// The embedded corpus is its first [`EMBEDDED_BYTES`]; a larger one continues it with fresh
/// sentences and arithmetic (the fact table repeats by design), for runs that must not see
/// the same text twice (`moonlight-ref corpus --bytes N`).
pub fn generated_corpus(bytes: usize) -> Vec<u8> {
    let mut rng = Rng::new(0x6d6f_6f6e_6c69_6768); // "moonligh"
    let mut out = String::with_capacity(bytes + 512);
    while out.len() < bytes {
        match rng.below(20) {
            0..=11 => grammar::paragraph(&mut rng, &mut out),
            12..=15 => grammar::arithmetic(&mut rng, &mut out),
            16..=17 => grammar::fact(&mut rng, &mut out),
            18 => grammar::counting(&mut rng, &mut out),
            _ => grammar::spelled_sum(&mut rng, &mut out),
        }
    }
    out.truncate(bytes);
    out.into_bytes()
}

mod grammar {
    //! The probabilistic grammar behind [`super::embedded_corpus`].

    use super::Rng;
    use std::fmt::Write;

    /// (singular, plural)
    const NOUNS: &[(&str, &str)] = &[
        ("cat", "cats"),
        ("dog", "dogs"),
        ("fox", "foxes"),
        ("bird", "birds"),
        ("child", "children"),
        ("mouse", "mice"),
        ("farmer", "farmers"),
        ("teacher", "teachers"),
        ("robot", "robots"),
        ("sailor", "sailors"),
        ("baker", "bakers"),
        ("horse", "horses"),
        ("wolf", "wolves"),
        ("student", "students"),
        ("king", "kings"),
        ("girl", "girls"),
        ("boy", "boys"),
        ("owl", "owls"),
    ];
    const THINGS: &[(&str, &str)] = &[
        ("ball", "balls"),
        ("book", "books"),
        ("box", "boxes"),
        ("apple", "apples"),
        ("stone", "stones"),
        ("letter", "letters"),
        ("lamp", "lamps"),
        ("key", "keys"),
        ("boat", "boats"),
        ("map", "maps"),
        ("cake", "cakes"),
        ("song", "songs"),
    ];
    const ADJECTIVES: &[&str] = &[
        "small", "big", "red", "green", "old", "young", "quiet", "happy", "clever", "tired", "bright",
        "dark", "brave", "lazy", "strange", "gentle",
    ];
    /// (third person singular present, plural present, past)
    const TRANSITIVE: &[(&str, &str, &str)] = &[
        ("sees", "see", "saw"),
        ("likes", "like", "liked"),
        ("finds", "find", "found"),
        ("carries", "carry", "carried"),
        ("watches", "watch", "watched"),
        ("follows", "follow", "followed"),
        ("builds", "build", "built"),
        ("wants", "want", "wanted"),
        ("holds", "hold", "held"),
        ("brings", "bring", "brought"),
    ];
    const INTRANSITIVE: &[(&str, &str, &str)] = &[
        ("sleeps", "sleep", "slept"),
        ("runs", "run", "ran"),
        ("sings", "sing", "sang"),
        ("waits", "wait", "waited"),
        ("laughs", "laugh", "laughed"),
        ("swims", "swim", "swam"),
        ("works", "work", "worked"),
    ];
    const PLACES: &[&str] = &[
        "in the garden",
        "near the river",
        "under the old bridge",
        "on the hill",
        "at the market",
        "in the forest",
        "by the sea",
        "behind the house",
        "inside the castle",
    ];
    const ADVERBS: &[&str] = &[
        "quietly",
        "slowly",
        "quickly",
        "every morning",
        "at night",
        "again",
        "today",
        "yesterday",
    ];
    const NAMES: &[&str] = &["Ada", "Ben", "Cleo", "Dmitri", "Ema", "Farid", "Grace", "Hugo"];
    const CONNECTIVES: &[&str] = &["and", "but", "because", "so", "while"];
    /// The invented facts: (country, capital, river).
    const COUNTRIES: &[(&str, &str, &str)] = &[
        ("Vardia", "Olmen", "Sask"),
        ("Quellon", "Brist", "Amar"),
        ("Tazir", "Kovo", "Lune"),
        ("Morrow", "Pexa", "Tilde"),
        ("Estany", "Ruun", "Valo"),
        ("Gorhal", "Yense", "Orrin"),
        ("Pirenth", "Caldo", "Memm"),
        ("Zubrica", "Hallow", "Sif"),
    ];
    const NUMBER_WORDS: &[&str] = &[
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
    ];

    /// A uniformly chosen word.
    fn word(rng: &mut Rng, words: &[&'static str]) -> &'static str {
        words[rng.below(words.len())]
    }

    /// A noun phrase; returns whether it is plural.
    fn noun_phrase(rng: &mut Rng, nouns: &[(&str, &str)], out: &mut String) -> bool {
        let plural = rng.chance(0.35);
        let (sing, plur) = *rng.pick(nouns);
        out.push_str(if plural {
            word(rng, &["the", "some", "two", "many"])
        } else {
            word(rng, &["the", "a", "one", "every"])
        });
        if rng.chance(0.5) {
            out.push(' ');
            out.push_str(word(rng, ADJECTIVES));
        }
        out.push(' ');
        out.push_str(if plural { plur } else { sing });
        plural
    }

    /// A clause: subject, verb agreeing with it, object or place, adverb.
    fn clause(rng: &mut Rng, past: bool, out: &mut String) {
        let plural = if rng.chance(0.15) {
            out.push_str(word(rng, NAMES));
            false
        } else {
            noun_phrase(rng, NOUNS, out)
        };
        out.push(' ');
        let verb_form = |v: &(&'static str, &'static str, &'static str)| match (past, plural) {
            (true, _) => v.2,
            (false, false) => v.0,
            (false, true) => v.1,
        };
        if rng.chance(0.6) {
            out.push_str(verb_form(rng.pick(TRANSITIVE)));
            out.push(' ');
            let objects = if rng.chance(0.7) { THINGS } else { NOUNS };
            noun_phrase(rng, objects, out);
        } else {
            out.push_str(verb_form(rng.pick(INTRANSITIVE)));
        }
        if rng.chance(0.4) {
            out.push(' ');
            out.push_str(word(rng, PLACES));
        }
        if rng.chance(0.25) {
            out.push(' ');
            out.push_str(word(rng, ADVERBS));
        }
    }

    fn sentence(rng: &mut Rng, out: &mut String) {
        let start = out.len();
        let past = rng.chance(0.4);
        match rng.below(6) {
            0 => {
                out.push_str(word(rng, NAMES));
                out.push_str(" said that ");
                clause(rng, past, out);
            }
            1 => {
                out.push_str("when ");
                clause(rng, past, out);
                out.push_str(", ");
                clause(rng, past, out);
            }
            2 | 3 => {
                clause(rng, past, out);
                out.push(' ');
                out.push_str(word(rng, CONNECTIVES));
                out.push(' ');
                clause(rng, past, out);
            }
            _ => clause(rng, past, out),
        }
        out.push('.');
        // Capitalize the first letter.
        let first = out[start..].chars().next().map(|c| c.to_ascii_uppercase());
        if let Some(c) = first {
            out.replace_range(start..start + 1, c.encode_utf8(&mut [0; 4]));
        }
    }

    /// Two to five sentences on one line.
    pub fn paragraph(rng: &mut Rng, out: &mut String) {
        let n = 2 + rng.below(4);
        for i in 0..n {
            if i > 0 {
                out.push(' ');
            }
            sentence(rng, out);
        }
        out.push('\n');
    }

    /// One arithmetic fact with a correct answer.
    pub fn arithmetic(rng: &mut Rng, out: &mut String) {
        let _ = match rng.below(3) {
            0 => {
                let (a, b) = (rng.below(50), rng.below(50));
                writeln!(out, "{a} + {b} = {}", a + b)
            }
            1 => {
                let (a, b) = (rng.below(50), rng.below(50));
                let (a, b) = (a.max(b), a.min(b));
                writeln!(out, "{a} - {b} = {}", a - b)
            }
            _ => {
                let (a, b) = (rng.below(13), rng.below(13));
                writeln!(out, "{a} * {b} = {}", a * b)
            }
        };
    }

    /// One fact from the fixed table.
    pub fn fact(rng: &mut Rng, out: &mut String) {
        let (country, capital, river) = *rng.pick(COUNTRIES);
        let _ = match rng.below(3) {
            0 => writeln!(out, "The capital of {country} is {capital}."),
            1 => writeln!(out, "The river {river} flows through {country}."),
            _ => writeln!(out, "{capital} is a city in {country}, on the river {river}."),
        };
    }

    /// A run of consecutive numbers.
    pub fn counting(rng: &mut Rng, out: &mut String) {
        let start = rng.below(90);
        let len = 4 + rng.below(6);
        out.push_str("count:");
        for n in start..start + len {
            let _ = write!(out, " {n}");
        }
        out.push('\n');
    }

    /// A small sum in words.
    pub fn spelled_sum(rng: &mut Rng, out: &mut String) {
        let a = rng.below(10);
        let b = rng.below(NUMBER_WORDS.len() - a);
        let _ = writeln!(
            out,
            "{} plus {} is {}.",
            NUMBER_WORDS[a],
            NUMBER_WORDS[b],
            NUMBER_WORDS[a + b]
        );
    }
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
    let header = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    let (magic, version, count) = (header(0), header(1), header(2));
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
    Ok(body
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect())
}

/// Writes `tokens` as an llm.c token shard (for tests and for converting text).
pub fn encode_bin(tokens: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(BIN_HEADER_INTS * 4 + tokens.len() * 2);
    let mut header = [0i32; BIN_HEADER_INTS];
    header[0] = BIN_MAGIC;
    header[1] = BIN_VERSION;
    header[2] = tokens.len() as i32;
    for h in header {
        out.extend_from_slice(&h.to_le_bytes());
    }
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
    fn embedded_corpus_is_deterministic_text() {
        let a = embedded_corpus();
        assert_eq!(a.len(), EMBEDDED_BYTES);
        assert_eq!(a, embedded_corpus());
        let text = std::str::from_utf8(&a).unwrap();
        assert!(text.contains(" = "));
        assert!(text.contains("The capital of "));
        assert!(text.lines().count() > 1000);
    }

    #[test]
    fn a_larger_generated_corpus_continues_the_embedded_one() {
        let big = generated_corpus(3 * EMBEDDED_BYTES);
        assert_eq!(big.len(), 3 * EMBEDDED_BYTES);
        assert_eq!(&big[..EMBEDDED_BYTES], &embedded_corpus()[..]);
        // Fresh text after the prefix: its sentences are not the prefix's over again.
        let (head, tail) = big.split_at(EMBEDDED_BYTES);
        assert!(std::str::from_utf8(tail).is_ok());
        assert_ne!(&tail[..EMBEDDED_BYTES], head);
    }

    #[test]
    fn arithmetic_lines_are_correct() {
        let corpus = String::from_utf8(embedded_corpus()).unwrap();
        let mut checked = 0;
        for line in corpus.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() == 5 && parts[3] == "=" {
                let (a, b, c): (i64, i64, i64) = (
                    parts[0].parse().unwrap(),
                    parts[2].parse().unwrap(),
                    parts[4].parse().unwrap(),
                );
                let expect = match parts[1] {
                    "+" => a + b,
                    "-" => a - b,
                    "*" => a * b,
                    op => panic!("operator {op}"),
                };
                assert_eq!(c, expect, "{line}");
                checked += 1;
            }
        }
        assert!(checked > 500, "{checked} arithmetic lines");
    }

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
