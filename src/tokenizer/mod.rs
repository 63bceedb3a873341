//! Text to token ids, with the tokenizer's own special-token defaults (as transformers).

pub mod gguf;

use std::path::Path;

use anyhow::{anyhow, bail, Result};

/// A tokenizer plus the special ids the experiments need.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Id used to right-pad batches (never attended to).
    pub pad_id: u32,
    /// `[MASK]` for masked LMs.
    pub mask_id: Option<u32>,
    /// "tokenizer.json" or "gguf:<model>".
    pub kind: String,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: cannot read ({e})", path.display()))?;
        // tokenizers 0.23 panics ("Helper") on a decoder that is not valid JSON instead of
        // returning its error (found by tests/fuzz_readers.rs): check the JSON first.
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| anyhow!("{}: not valid JSON ({e})", path.display()))?;
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| anyhow!("{}: not a valid tokenizer.json ({e})", path.display()))?;
        Ok(Self::wrap(inner, "tokenizer.json".into()))
    }

    pub fn wrap(mut inner: tokenizers::Tokenizer, kind: String) -> Self {
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| find(&["[PAD]", "<pad>", "<|endoftext|>", "</s>"]))
            .unwrap_or(0);
        let mask_id = find(&["[MASK]", "<mask>"]);
        // Like transformers, ignore padding/truncation presets saved in tokenizer.json: batches
        // are padded here, and a too-long text is an error rather than silently cut.
        inner.with_padding(None);
        let _ = inner.with_truncation(None);
        Self {
            inner,
            pad_id,
            mask_id,
            kind,
        }
    }

    /// Token ids of `text`, with the special tokens the tokenizer adds by default.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("cannot tokenize text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The full encoding (ids, character offsets, word ids) for word-level addressing.
    pub fn encoding(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.inner
            .encode(text, true)
            .map_err(|e| anyhow!("cannot tokenize text: {e}"))
    }

    /// Ids that the tokenizer adds itself (BOS, [CLS], [SEP]).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_vocabulary().is_special_token(&self.token(id))
    }

    /// The vocabulary string of one id.
    pub fn token(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_else(|| format!("<{id}>"))
    }

    /// One token id decoded as text (what a reader would see).
    pub fn decode_one(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_else(|_| self.token(id))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Checks every id the tokenizer can produce exists in a model of `vocab` rows.
    pub fn check_fits(&self, vocab: usize, source: &Path) -> Result<()> {
        let max_id = self.inner.get_vocab(true).values().copied().max().unwrap_or(0) as usize;
        if max_id >= vocab {
            bail!(
                "{}: the tokenizer has ids up to {max_id}, but the model's vocabulary has {vocab} rows",
                source.display()
            );
        }
        Ok(())
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
