//! Text as tokens of an HF `tokenizer.json` (the `tokenizers` crate), and training a
//! byte-level BPE tokenizer on a text file.
//!
//! Without a tokenizer, moonlight-ref reads text as bytes (vocabulary 256). With one, `train`
//! encodes its `--data` file into an llm.c token shard next to the run (the trainer reads those
//! already), `eval` encodes the file it scores, and `sample` encodes the prompt and decodes what
//! it draws. Token ids must fit the model's vocabulary, and the data path stores them as `u16`,
//! so a tokenizer of more than 65,536 tokens is refused.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::{TokenizerBuilder, TokenizerImpl};

use crate::data;
use crate::files;

/// The most tokens a vocabulary may have: token shards and datasets hold ids as `u16`.
pub const MAX_VOCAB: usize = 1 << 16;

/// A loaded `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    name: String,
}

impl Tokenizer {
    /// Loads `path`; the message names the file.
    pub fn load(path: &Path) -> Result<Tokenizer, String> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| format!("tokenizer {}: cannot load it: {e}", path.display()))?;
        let t = Tokenizer {
            inner,
            name: path.display().to_string(),
        };
        if t.vocab_size() > MAX_VOCAB {
            return Err(format!(
                "tokenizer {}: {} tokens, more than the {MAX_VOCAB} token ids moonlight-ref stores (u16)",
                t.name,
                t.vocab_size()
            ));
        }
        Ok(t)
    }

    /// Tokens in its vocabulary, added tokens included: ids are below this.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Refuses a tokenizer whose ids do not all fit a model's vocabulary.
    pub fn check_fits(&self, model_vocab: usize) -> Result<(), String> {
        if self.vocab_size() > model_vocab {
            return Err(format!(
                "tokenizer {} has {} tokens, but the model's vocabulary is {model_vocab}: its ids would fall outside the model",
                self.name,
                self.vocab_size()
            ));
        }
        Ok(())
    }

    /// The ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| format!("tokenizer {}: cannot encode: {e}", self.name))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| format!("tokenizer {}: cannot decode: {e}", self.name))
    }

    /// Encodes the UTF-8 text file `text` and writes it as an llm.c token shard at `bin`
    /// (atomically). Returns the token count.
    pub fn encode_file_to_bin(&self, text: &Path, bin: &Path) -> Result<usize, String> {
        let s = read_text(text)?;
        let ids = self.encode(&s)?;
        let tokens: Vec<u16> = ids
            .iter()
            .map(|&id| u16::try_from(id).map_err(|_| format!("token id {id} does not fit u16")))
            .collect::<Result<_, _>>()?;
        files::write_atomic(bin, &data::encode_bin(&tokens))
            .map_err(|e| format!("cannot write {}: {e}", bin.display()))?;
        Ok(tokens.len())
    }
}

/// A UTF-8 text file, not empty.
pub fn read_text(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "{} is not UTF-8 text (invalid byte at {}); a tokenizer reads text",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Trains a byte-level BPE tokenizer (GPT-2's scheme: the 256 byte symbols, then merges) of
/// `vocab` tokens on the text file `text` and writes its `tokenizer.json` to `out`. Returns
/// the vocabulary size reached (lower than asked when the text has too few distinct pairs).
pub fn train_bpe(text: &Path, vocab: usize, out: &Path) -> Result<usize, String> {
    let alphabet = ByteLevel::alphabet();
    if vocab < alphabet.len() || vocab > MAX_VOCAB {
        return Err(format!(
            "--vocab {vocab}: a byte-level BPE needs at least the {} byte symbols and at most {MAX_VOCAB} tokens",
            alphabet.len()
        ));
    }
    read_text(text)?; // a clear error for a missing, empty or non-UTF-8 file
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab)
        .min_frequency(0)
        .initial_alphabet(alphabet.into_iter().collect())
        .build();
    let mut tokenizer: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
        TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .map_err(|e| format!("cannot build the tokenizer: {e}"))?;
    let files = vec![text
        .to_str()
        .ok_or("the text file's path is not UTF-8")?
        .to_string()];
    tokenizer
        .train_from_files(&mut trainer, files)
        .map_err(|e| format!("training the tokenizer on {}: {e}", text.display()))?;
    let json = tokenizer
        .to_string(false)
        .map_err(|e| format!("cannot serialize the tokenizer: {e}"))?;
    files::write_atomic(out, json.as_bytes()).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    Ok(tokenizer.get_vocab_size(true))
}
