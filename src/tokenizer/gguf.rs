//! Building a [`tokenizers::Tokenizer`] from the tokenizer that a GGUF file
//! describes in its metadata (llama.cpp's `tokenizer.ggml.*` keys).
//!
//! A GGUF carries no `tokenizer.json`: it stores the vocabulary, the merges
//! (or, for SentencePiece vocabularies, per-token scores), the token types and
//! the special token ids.  The generic fallbacks in `candle`/`tokenizers` get
//! SmolLM2 wrong (they add a prefix space, so `"Hello"` becomes 38699 instead
//! of 19556), so this module rebuilds the tokenizer the way transformers'
//! GGUF loader (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) does, and
//! is tested against its token ids:
//!
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE.  The pre-tokenizer is
//!   chosen by `tokenizer.ggml.pre` ("smollm": digits split one by one, then
//!   GPT-2's split; "gpt2"/"default": GPT-2's split; a few others); an
//!   unknown `pre` is an error rather than a silent guess.  For SmolLM2 this
//!   is the model's own tokenizer.json (and llama.cpp's "smollm"); it differs
//!   from transformers' GGUF loader, which ignores `pre`, only where a run of
//!   spaces meets a digit (`"the  50"`: "ĠĠ"+"5" here, "Ġ"+"Ġ"+"5" there).
//! * `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE with byte
//!   fallback (`<0xXX>` tokens).  Merges come from `tokenizer.ggml.merges`
//!   when present, else they are derived from the vocabulary like
//!   transformers' `generate_merges` (for Gemma files ordered by token id,
//!   otherwise by score).  Gemma has no dummy prefix: spaces become `▁`.
//!
//! Tokens typed CONTROL (3) become special added tokens and USER_DEFINED (4)
//! ones plain added tokens, so `<bos>`, `<|im_start|>` or `"\n\n"` are never
//! split.  `tokenizer.ggml.add_bos_token` / `add_eos_token` are honoured with
//! a `TemplateProcessing` post-processor (default: BOS for "llama", nothing
//! for "gpt2", as llama.cpp and transformers do).

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeBuilder, Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Builds the tokenizer embedded in a GGUF file's metadata.
pub fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer> {
    let meta = Meta(&content.metadata);
    let model = meta
        .string("tokenizer.ggml.model")?
        .ok_or_else(|| anyhow!("GGUF has no tokenizer.ggml.model"))?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| anyhow!("GGUF has no tokenizer.ggml.tokens"))?;
    if tokens.is_empty() {
        bail!("GGUF has an empty tokenizer.ggml.tokens");
    }
    let token_types = meta.ints("tokenizer.ggml.token_type")?;
    if let Some(tt) = &token_types {
        if tt.len() != tokens.len() {
            bail!(
                "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                tt.len(),
                tokens.len()
            );
        }
    }
    let architecture = meta.string("general.architecture")?.unwrap_or("");

    let (mut tokenizer, vocab_tokens) = match model {
        "gpt2" => byte_level_tokenizer(&meta, &tokens)?,
        "llama" => sentencepiece_tokenizer(&meta, &tokens, architecture)?,
        other => bail!("unsupported tokenizer.ggml.model '{other}' (supported: gpt2, llama)"),
    };

    add_special_tokens(
        &mut tokenizer,
        &meta,
        &tokens,
        token_types.as_deref(),
        &vocab_tokens,
        model == "gpt2",
    )?;
    set_post_processor(&mut tokenizer, &meta, &tokens, model == "llama")?;
    Ok(tokenizer)
}

// ------------------------------------------------------------ metadata ---

/// Typed, lenient access to the metadata map (integers may be stored with
/// any width/signedness, floats as f32 or f64).
struct Meta<'a>(&'a HashMap<String, Value>);

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key)
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => bail!("{key} is not a string ({:?})", v.value_type()),
        }
    }

    /// The array under `key`, each element converted by `convert` (None = wrong type, reported
    /// as "is not a {what}").
    fn array<T>(&self, key: &str, what: &str, convert: impl Fn(&'a Value) -> Option<T>) -> Result<Option<Vec<T>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(items) = v else {
            bail!("{key} is not an array ({:?})", v.value_type())
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| convert(v).ok_or_else(|| anyhow!("{key}[{i}] is not {what} ({:?})", v.value_type())))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        self.array(key, "a string", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.array(key, "an integer", as_int)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f64>>> {
        self.array(key, "a number", |v| match v {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            v => as_int(v).map(|x| x as f64),
        })
    }

    fn int(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => as_int(v)
                .map(Some)
                .ok_or_else(|| anyhow!("{key} is not an integer ({:?})", v.value_type())),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => match as_int(v) {
                Some(0) => Ok(Some(false)),
                Some(1) => Ok(Some(true)),
                _ => bail!("{key} is not a bool ({:?})", v.value_type()),
            },
        }
    }

    /// The token that a `tokenizer.ggml.*_token_id` key points at.
    fn special_token<'t>(&self, key: &str, tokens: &[&'t str]) -> Result<Option<(u32, &'t str)>> {
        let Some(id) = self.int(key)? else {
            return Ok(None);
        };
        let tok = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get(i))
            .ok_or_else(|| anyhow!("{key} = {id} is outside the vocabulary of {}", tokens.len()))?;
        Ok(Some((id as u32, *tok)))
    }
}

fn as_int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

// ---------------------------------------------------------- byte level ---

/// GPT-2's reversible byte -> printable char table (`bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid char")
        };
    }
    table
}

/// Regexes of the `tokenizer.ggml.pre` values that use a custom split,
/// as transformers' GGUF loader has them (`GGUF_PRE_TOKENIZER_SPLITS`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer for a byte-level vocabulary, by `tokenizer.ggml.pre`.
fn byte_level_pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    let gpt2 = || ByteLevel::new(false, true, true);
    let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| {
            anyhow!(
                "cannot compile the split regex for tokenizer.ggml.pre '{}': {e}",
                pre.unwrap_or("")
            )
        })?;
        Ok(PreSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    Ok(match pre {
        // GPT-2's own regex inside ByteLevel, no prefix space.
        None | Some("default") | Some("gpt2") | Some("gpt-2") => gpt2().into(),
        // SmolLM(2): every digit on its own, then the GPT-2 split (this is the
        // model's own tokenizer.json; llama.cpp's "smollm" does the same).
        Some("smollm") => PreSequence::new(vec![Digits::new(true).into(), gpt2().into()]).into(),
        Some("llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx") => split_then_bytes(LLAMA3_SPLIT)?,
        Some("qwen2" | "deepseek-r1-qwen") => split_then_bytes(QWEN2_SPLIT)?,
        Some(other) => {
            bail!("unsupported tokenizer.ggml.pre '{other}' for a gpt2 (byte-level BPE) vocabulary")
        }
    })
}

fn byte_level_tokenizer(meta: &Meta, tokens: &[&str]) -> Result<(Tokenizer, Vec<String>)> {
    let pre = meta.string("tokenizer.ggml.pre")?;
    let pre_tokenizer = byte_level_pre_tokenizer(pre)?;

    // Every token should already be spelled in the byte alphabet; one that is
    // not (a raw UTF-8 token) is respelled, as transformers does.
    let table = bytes_to_unicode();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.chars().all(|c| alphabet.contains(&c)) {
                t.to_string()
            } else {
                t.bytes().map(|b| table[b as usize]).collect()
            }
        })
        .collect();
    let vocab = vocab_of(&spelled);

    let merges = match meta.strings("tokenizer.ggml.merges")? {
        Some(m) => parse_merges(&m)?,
        None => {
            let scores = meta.floats("tokenizer.ggml.scores")?;
            let order = match scores {
                Some(s) => MergeOrder::Scores(check_len(s, tokens.len(), "tokenizer.ggml.scores")?),
                None => MergeOrder::TokenId,
            };
            generate_merges(&spelled, &vocab, order)
        }
    };

    let bpe = build_bpe(BPE::builder().vocab_and_merges(vocab, merges))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok((tokenizer, spelled))
}

// ------------------------------------------------------- sentencepiece ---

fn sentencepiece_tokenizer(meta: &Meta, tokens: &[&str], architecture: &str) -> Result<(Tokenizer, Vec<String>)> {
    let gemma = architecture.starts_with("gemma");

    // Gemma files store a token of two or more spaces as real spaces while its
    // text is looked up with spaces written as '▁'; respell those tokens so
    // they (and the merges built from them) can match.
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if gemma && t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.to_string()
            }
        })
        .collect();
    let vocab = vocab_of(&spelled);

    let merges = match meta.strings("tokenizer.ggml.merges")? {
        Some(m) => parse_merges(&m)?,
        None if gemma => {
            // Gemma's scores do not follow its merge order; the order of the
            // tokens in the file does (as in transformers' gemma_tokenizer).
            generate_merges(&spelled, &vocab, MergeOrder::Position)
        }
        None => {
            let scores = meta
                .floats("tokenizer.ggml.scores")?
                .ok_or_else(|| anyhow!("GGUF has neither tokenizer.ggml.merges nor tokenizer.ggml.scores"))?;
            let scores = check_len(scores, tokens.len(), "tokenizer.ggml.scores")?;
            generate_merges(&spelled, &vocab, MergeOrder::Scores(scores))
        }
    };

    let unk = match meta.special_token("tokenizer.ggml.unknown_token_id", tokens)? {
        Some((_, t)) => Some(t.to_string()),
        None => vocab.contains_key("<unk>").then(|| "<unk>".to_string()),
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = build_bpe(builder)?;
    let mut tokenizer = Tokenizer::new(bpe);

    let replace_space = Replace::new(" ", "\u{2581}").map_err(|e| anyhow!("{e}"))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ").map_err(|e| anyhow!("{e}"))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if gemma {
        // Gemma: no dummy prefix; a space is simply '▁' (transformers'
        // GemmaTokenizer).  add_space_prefix is false in Gemma files; should
        // one say true, prepend the '▁' as llama.cpp would.
        let normalizer: NormalizerWrapper = if meta.bool("tokenizer.ggml.add_space_prefix")? == Some(true) {
            tokenizers::normalizers::Sequence::new(vec![Prepend::new("\u{2581}".into()).into(), replace_space.into()])
                .into()
        } else {
            replace_space.into()
        };
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| anyhow!("{e}"))?;
        let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false).map_err(|e| anyhow!("{e}"))?;
        tokenizer.with_pre_tokenizer(Some(split));
    } else {
        // Llama-style SentencePiece (transformers' LlamaTokenizer): '▁' for
        // spaces and, unless the file says otherwise, a dummy prefix on the
        // first piece, which the decoder strips again.
        let add_prefix = meta.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
        let scheme = if add_prefix {
            PrependScheme::First
        } else {
            PrependScheme::Never
        };
        tokenizer.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', scheme, false)));
        if add_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok((tokenizer, spelled))
}

// --------------------------------------------------------------- merges ---

fn parse_merges(merges: &[&str]) -> Result<Merges> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("tokenizer.ggml.merges[{i}] = {m:?} is not 'left right'"))
        })
        .collect()
}

fn check_len<T>(v: Vec<T>, n: usize, key: &str) -> Result<Vec<T>> {
    if v.len() != n {
        bail!("{key} has {} entries but tokenizer.ggml.tokens has {n}", v.len());
    }
    Ok(v)
}

/// token -> id; a duplicated token keeps its last id (as a Python dict would).
fn vocab_of(tokens: &[String]) -> Vocab {
    tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
}

enum MergeOrder {
    /// Best first by the merged token's score (SentencePiece scores).
    Scores(Vec<f64>),
    /// By the merged token's position in the file, first first (Gemma).
    Position,
    /// By the merged token's id, lowest first (no scores at all).
    TokenId,
}

/// The merges a vocabulary implies, as transformers' `generate_merges` finds
/// them: every split of a token into two tokens of the vocabulary is a merge;
/// merges are ordered by the merged token (see [`MergeOrder`]), then by the
/// longer left part, then the longer right part; ties keep vocabulary order.
fn generate_merges(tokens: &[String], vocab: &Vocab, order: MergeOrder) -> Merges {
    // (primary key, -len(left), -len(right), sequence number, left, right)
    // sorted ascending reproduces Python's stable `sorted(..., reverse=...)`.
    struct Cand<'a> {
        key: f64,
        llen: usize,
        rlen: usize,
        seq: usize,
        left: &'a str,
        right: &'a str,
    }
    let mut cands: Vec<Cand> = Vec::new();
    // Iterate the distinct tokens in first-appearance order (Python dict
    // order); a duplicated token is keyed by its last entry's score/id.
    let mut seen: HashSet<&str> = HashSet::with_capacity(tokens.len());
    for tok in tokens.iter() {
        if !seen.insert(tok.as_str()) {
            continue;
        }
        let id = vocab[tok.as_str()] as usize;
        let key = match &order {
            MergeOrder::Scores(s) => -s[id],
            MergeOrder::Position => id as f64,
            MergeOrder::TokenId => id as f64,
        };
        let mut local: Vec<(u32, u32, &str, &str)> = Vec::new();
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((li, ri, l, r));
            }
        }
        local.sort_by_key(|&(li, ri, _, _)| (li, ri));
        for (_, _, l, r) in local {
            cands.push(Cand {
                key,
                llen: l.chars().count(),
                rlen: r.chars().count(),
                seq: cands.len(),
                left: l,
                right: r,
            });
        }
    }
    let longer_first = !matches!(order, MergeOrder::TokenId);
    cands.sort_by(|a, b| {
        a.key
            .total_cmp(&b.key)
            .then_with(|| {
                if longer_first {
                    b.llen.cmp(&a.llen).then(b.rlen.cmp(&a.rlen))
                } else {
                    a.llen.cmp(&b.llen).then(a.rlen.cmp(&b.rlen))
                }
            })
            .then(a.seq.cmp(&b.seq))
    });
    cands
        .into_iter()
        .map(|c| (c.left.to_string(), c.right.to_string()))
        .collect()
}

fn build_bpe(builder: BpeBuilder) -> Result<BPE> {
    builder.build().map_err(|e| anyhow!("cannot build the BPE model: {e}"))
}

// ------------------------------------------------- special tokens, post ---

fn add_special_tokens(
    tokenizer: &mut Tokenizer,
    meta: &Meta,
    tokens: &[&str],
    token_types: Option<&[i64]>,
    vocab_tokens: &[String],
    byte_level: bool,
) -> Result<()> {
    let alphabet: Option<HashSet<char>> = byte_level.then(|| bytes_to_unicode().into_iter().collect());
    let in_alphabet = |t: &str| alphabet.as_ref().is_none_or(|a| t.chars().all(|c| a.contains(&c)));

    // Tokens are added as the file spells them, and only when the model's
    // vocabulary has them (so none gets a new id past the vocabulary).
    let model_vocab: HashSet<&str> = vocab_tokens.iter().map(String::as_str).collect();
    let mut special: Vec<AddedToken> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    // The tokens that the file names (bos, eos, unk, pad) are special.
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
    ] {
        if let Some((_, t)) = meta.special_token(key, tokens)? {
            if model_vocab.contains(t) && seen.insert(t) {
                special.push(AddedToken::from(t, true).normalized(false));
            }
        }
    }
    let mut user: Vec<AddedToken> = Vec::new();
    if let Some(types) = token_types {
        for (&t, &ty) in tokens.iter().zip(types) {
            if !model_vocab.contains(t) {
                continue;
            }
            if ty == TOKEN_TYPE_CONTROL {
                // A control token spelled outside the byte alphabet in a
                // byte-level vocabulary is a llama.cpp mislabel: skip it.
                if in_alphabet(t) && seen.insert(t) {
                    special.push(AddedToken::from(t, true).normalized(false));
                }
            } else if ty == TOKEN_TYPE_USER_DEFINED {
                // A user-defined token (e.g. "\n\n", "<think>") is matched
                // whole, as llama.cpp does, but is not special.
                user.push(AddedToken::from(t, false).normalized(false));
            }
        }
    }
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| anyhow!("cannot add the special tokens: {e}"))?;
    tokenizer
        .add_tokens(user)
        .map_err(|e| anyhow!("cannot add the user-defined tokens: {e}"))?;
    Ok(())
}

fn set_post_processor(tokenizer: &mut Tokenizer, meta: &Meta, tokens: &[&str], sentencepiece: bool) -> Result<()> {
    let bos = meta.special_token("tokenizer.ggml.bos_token_id", tokens)?;
    let eos = meta.special_token("tokenizer.ggml.eos_token_id", tokens)?;
    // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(sentencepiece) && bos.is_some();
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false) && eos.is_some();

    // A template names its special tokens by a key; use the token itself
    // unless it would not parse inside a template.
    let key = |tok: &str, fallback: &str| -> String {
        if tok.is_empty() || tok.contains(':') || tok.contains(' ') || tok.starts_with('$') {
            fallback.to_string()
        } else {
            tok.to_string()
        }
    };
    let mut single = Vec::new();
    let mut pair_b = Vec::new();
    let mut specials = Vec::new();
    let bos_key = bos.map(|(id, t)| (key(t, "bos"), id, t));
    let eos_key = eos.map(|(id, t)| (key(t, "eos"), id, t));
    if let (true, Some((k, id, t))) = (add_bos, &bos_key) {
        single.push(format!("{k}:0"));
        pair_b.push(format!("{k}:1"));
        specials.push(SpecialToken::new(k.clone(), vec![*id], vec![t.to_string()]).map_err(|e| anyhow!("{e}"))?);
    }
    single.push("$A:0".to_string());
    pair_b.push("$B:1".to_string());
    if let (true, Some((k, id, t))) = (add_eos, &eos_key) {
        single.push(format!("{k}:0"));
        pair_b.push(format!("{k}:1"));
        let same_as_bos = add_bos && bos_key.as_ref().is_some_and(|(bk, _, _)| bk == k);
        if !same_as_bos {
            specials.push(SpecialToken::new(k.clone(), vec![*id], vec![t.to_string()]).map_err(|e| anyhow!("{e}"))?);
        }
    }
    let single = single.join(" ");
    let pair = format!("{single} {}", pair_b.join(" "));
    let template = TemplateProcessing::builder()
        .try_single(single.as_str())
        .map_err(|e| anyhow!("bad template '{single}': {e}"))?
        .try_pair(pair.as_str())
        .map_err(|e| anyhow!("bad template '{pair}': {e}"))?
        .special_tokens(specials)
        .build()
        .context("cannot build the post-processor")?;
    tokenizer.with_post_processor(Some(template));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;
    use std::path::{Path, PathBuf};

    fn content(entries: Vec<(&str, Value)>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn strs(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, true).unwrap().get_ids().to_vec()
    }

    fn err(c: &Content) -> String {
        tokenizer_from_gguf(c).expect_err("expected an error").to_string()
    }

    #[test]
    fn errors_are_one_line_and_name_the_key() {
        assert_eq!(err(&content(vec![])), "GGUF has no tokenizer.ggml.model");
        let c = content(vec![("tokenizer.ggml.model", Value::String("gpt2".into()))]);
        assert_eq!(err(&c), "GGUF has no tokenizer.ggml.tokens");
        let c = content(vec![
            ("tokenizer.ggml.model", Value::String("xyz".into())),
            ("tokenizer.ggml.tokens", strs(&["a"])),
        ]);
        assert_eq!(
            err(&c),
            "unsupported tokenizer.ggml.model 'xyz' (supported: gpt2, llama)"
        );
        let c = content(vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("mystery".into())),
            ("tokenizer.ggml.tokens", strs(&["a"])),
            ("tokenizer.ggml.merges", strs(&[])),
        ]);
        assert!(
            err(&c).starts_with("unsupported tokenizer.ggml.pre 'mystery'"),
            "{}",
            err(&c)
        );
        let c = content(vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&["a", "b"])),
            ("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1)])),
        ]);
        assert!(err(&c).contains("token_type has 1 entries"), "{}", err(&c));
        let c = content(vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strs(&["a", "b"])),
        ]);
        assert_eq!(
            err(&c),
            "GGUF has neither tokenizer.ggml.merges nor tokenizer.ggml.scores"
        );
        for e in [err(&content(vec![])), err(&c)] {
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn pre_tokenizer_regexes_compile() {
        for pre in [
            None,
            Some("gpt2"),
            Some("default"),
            Some("smollm"),
            Some("llama3"),
            Some("qwen2"),
        ] {
            byte_level_pre_tokenizer(pre).unwrap();
        }
    }

    /// A tiny byte-level vocabulary: no prefix space, digits split, control
    /// tokens kept whole, add_bos honoured.
    #[test]
    fn tiny_byte_level() {
        let tokens = [
            "<|endoftext|>",
            "<s>",
            "H",
            "e",
            "l",
            "o",
            "Ġ",
            "w",
            "1",
            "2",
            "He",
            "ll",
            "Hell",
            "Hello",
            "Ġw",
            "12",
        ];
        let mut types = vec![Value::I32(3), Value::I32(3)];
        types.extend(std::iter::repeat_n(Value::I32(1), tokens.len() - 2));
        let mut meta = vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            (
                "tokenizer.ggml.merges",
                strs(&["H e", "l l", "He ll", "Hell o", "Ġ w", "1 2"]),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ];
        let tok = tokenizer_from_gguf(&content(meta.clone())).unwrap();
        assert_eq!(ids(&tok, "Hello"), vec![13]);
        assert_eq!(ids(&tok, "Hello w"), vec![13, 14]);
        // "12" is in the vocabulary but digits are split one by one.
        assert_eq!(ids(&tok, "12"), vec![8, 9]);
        assert_eq!(ids(&tok, "He<|endoftext|>"), vec![10, 0]);
        assert_eq!(tok.decode(&[13, 14], false).unwrap(), "Hello w");
        meta.push(("tokenizer.ggml.add_bos_token", Value::Bool(true)));
        meta.push(("tokenizer.ggml.add_eos_token", Value::Bool(true)));
        let tok = tokenizer_from_gguf(&content(meta)).unwrap();
        assert_eq!(ids(&tok, "Hello"), vec![1, 13, 0]);
        assert_eq!(tok.encode(("He", "ll"), true).unwrap().get_ids(), &[1, 10, 0, 1, 11, 0]);
    }

    /// A tiny SentencePiece (Gemma-style) vocabulary without merges.
    #[test]
    fn tiny_sentencepiece_gemma() {
        let mut tokens: Vec<String> = [
            "<pad>", "<eos>", "<bos>", "<unk>", "▁", "h", "e", "l", "o", "he", "ll", "hell", "hello", "▁hello", "  ",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let first_byte = tokens.len();
        tokens.extend((0..=255u32).map(|b| format!("<0x{b:02X}>")));
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let types: Vec<Value> = (0..tokens.len())
            .map(|i| {
                Value::I32(if i < 4 {
                    3
                } else if i >= first_byte {
                    6
                } else {
                    1
                })
            })
            .collect();
        let meta = vec![
            ("general.architecture", Value::String("gemma3".into())),
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strs(&token_refs)),
            (
                "tokenizer.ggml.scores",
                Value::Array(vec![Value::F32(0.0); tokens.len()]),
            ),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.bos_token_id", Value::U32(2)),
            ("tokenizer.ggml.eos_token_id", Value::U32(1)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(3)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
        ];
        let tok = tokenizer_from_gguf(&content(meta)).unwrap();
        assert_eq!(ids(&tok, "hello"), vec![2, 12]);
        assert_eq!(ids(&tok, " hello"), vec![2, 13]);
        // "  " is stored with real spaces and respelled to "▁▁"; merges are
        // ranked by token id, so "▁" + "hello" (13) wins over "▁▁" (14).
        assert_eq!(ids(&tok, "  "), vec![2, 14]);
        assert_eq!(ids(&tok, "  hello"), vec![2, 4, 13]);
        // 'x' is not in the vocabulary: byte fallback.
        assert_eq!(ids(&tok, "x"), vec![2, (first_byte + 0x78) as u32]);
        assert_eq!(ids(&tok, "<bos>hello"), vec![2, 2, 12]);
        let enc = ids(&tok, " hello x");
        assert_eq!(tok.decode(&enc, true).unwrap(), " hello x");
    }

    #[test]
    fn generated_merges_follow_transformers_order() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let vocab = vocab_of(&tokens);
        let pairs = |m: Merges| m.into_iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>();
        // by position: "ab" < "bc" < "abc"; for "abc" the longer left part first.
        assert_eq!(
            pairs(generate_merges(&tokens, &vocab, MergeOrder::Position)),
            ["a b", "b c", "ab c", "a bc"]
        );
        // by score, best first.
        let scores = vec![0.0, 0.0, 0.0, -3.0, -1.0, -2.0];
        assert_eq!(
            pairs(generate_merges(&tokens, &vocab, MergeOrder::Scores(scores))),
            ["b c", "ab c", "a bc", "a b"]
        );
    }

    // ------------------------------------------- real GGUF files (assets) ---

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// The asset `rel` where `jumplens` looks for it (`crate::data::assets::find`); missing, a
    /// visible skip, or a failure under JUMPLENS_REQUIRE_ASSETS=1 (as tests/common does for
    /// the integration tests, which unit tests cannot use).
    fn asset(rel: &str) -> Option<PathBuf> {
        if let Some(p) = crate::data::assets::find(rel) {
            return Some(p);
        }
        let what = format!(
            "asset {rel} is missing; run `bash scripts/fetch_assets.sh {}`",
            rel.split('/').next().unwrap_or(rel)
        );
        if std::env::var("JUMPLENS_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
            panic!("{what} (JUMPLENS_REQUIRE_ASSETS=1 makes this a failure)");
        }
        eprintln!("SKIPPED: {what}; `bash scripts/test.sh` fetches everything and skips nothing");
        None
    }

    fn read_gguf(path: &Path) -> Content {
        let mut f = std::fs::File::open(path).unwrap();
        Content::read(&mut f).unwrap()
    }

    /// Compares with the ids (and decoded text) that transformers' GGUF
    /// loader gives: tests/fixtures/real/gguf_tokenizer_ids.json, written by
    /// scripts/export_tokenizer_reference.py.
    fn check_against_transformers(name: &str, tok: &Tokenizer) {
        let path = repo().join("tests/fixtures/real/gguf_tokenizer_ids.json");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let rows = json["models"][name].as_array().unwrap();
        assert!(rows.len() >= 20);
        let mut bad = Vec::new();
        for row in rows {
            let text = row["text"].as_str().unwrap();
            // Where transformers' GGUF loader departs from the model's own
            // tokenizer (SmolLM2's digit split), the fixture has both.
            let want = if row.get("ids_model_tokenizer").is_some() {
                &row["ids_model_tokenizer"]
            } else {
                &row["ids"]
            };
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = ids(tok, text);
            if got != want {
                bad.push(format!("{text:?}\n  transformers {want:?}\n  ours         {got:?}"));
                continue;
            }
            let decoded = tok.decode(&got, false).unwrap();
            if decoded != row["decoded"].as_str().unwrap() {
                bad.push(format!("{text:?}: decoded {decoded:?} vs {:?}", row["decoded"]));
            }
        }
        assert!(
            bad.is_empty(),
            "{name}: {} of {} differ:\n{}",
            bad.len(),
            rows.len(),
            bad.join("\n")
        );
    }

    #[test]
    fn smollm2_matches_transformers() {
        let Some(p) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
            return;
        };
        let tok = tokenizer_from_gguf(&read_gguf(&p)).unwrap();
        assert_eq!(ids(&tok, "Hello"), vec![19556]);
        assert_eq!(tok.get_vocab_size(true), 49152);
        check_against_transformers("smollm2", &tok);
    }

    #[test]
    fn gemma3_matches_transformers() {
        let Some(p) = asset("gemma3/gemma-3-270m-q4_k_m.gguf") else {
            return;
        };
        let content = read_gguf(&p);
        let t0 = std::time::Instant::now();
        let tok = tokenizer_from_gguf(&content).unwrap();
        eprintln!("gemma3 tokenizer built in {:?}", t0.elapsed());
        assert_eq!(ids(&tok, "Hello"), vec![2, 9259]);
        assert_eq!(tok.get_vocab_size(true), 262144);
        check_against_transformers("gemma3", &tok);
    }
}
