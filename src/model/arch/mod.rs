//! One file per architecture family, and the registry that maps checkpoint metadata to them.
//!
//! The Llama-like decoders (Llama, Mistral, Qwen2, Gemma 3) share [`decoder::Decoder`]; their
//! files only turn a typed config into a [`decoder::DecoderSpec`]. GPT-2 and BERT keep their own
//! structs and reuse the block pieces in `model::block`. Adding an architecture is one file, one
//! line in [`REGISTRY`] and one fixture (docs/adding-an-architecture.md).

pub mod bert;
pub mod decoder;
pub mod gemma3;
pub mod gpt2;
pub mod llama;

use anyhow::{bail, Result};
use candle_core::Device;

use crate::model::config::Config;
use crate::model::weights::Weights;
use crate::model::Transformer;

/// Builds a model from its config and weights.
pub type Loader = fn(&Config, &Weights, &Device) -> Result<Box<dyn Transformer>>;

/// One architecture family and the names checkpoints use for it.
pub struct Architecture {
    /// config.json `model_type` values.
    pub model_types: &'static [&'static str],
    /// config.json `architectures` class names (used when `model_type` is absent).
    pub hf_classes: &'static [&'static str],
    /// GGUF `general.architecture` values (translated by `load::gguf`).
    pub gguf: &'static [&'static str],
    pub load: Loader,
}

/// Every supported architecture, one line each.
#[rustfmt::skip]
pub static REGISTRY: &[Architecture] = &[
    Architecture { model_types: &["llama", "mistral", "qwen2"], hf_classes: &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"], gguf: &["llama"], load: llama::load },
    Architecture { model_types: &["gemma3", "gemma3_text"], hf_classes: &["Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"], gguf: &["gemma3"], load: gemma3::load },
    Architecture { model_types: &["gpt2"], hf_classes: &["GPT2LMHeadModel", "GPT2Model"], gguf: &[], load: gpt2::load },
    Architecture { model_types: &["bert"], hf_classes: &["BertForMaskedLM", "BertModel"], gguf: &[], load: bert::load },
];

/// Every supported `model_type`, for error messages.
pub fn supported() -> String {
    REGISTRY
        .iter()
        .flat_map(|a| a.model_types.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The architecture of a config: by `model_type`, else by its `architectures` class names.
pub fn find(cfg: &Config) -> Result<&'static Architecture> {
    if let Some(mt) = cfg.model_type() {
        return match REGISTRY.iter().find(|a| a.model_types.contains(&mt)) {
            Some(a) => Ok(a),
            None => bail!(
                "{}: unknown architecture '{mt}' (supported: {})",
                cfg.path.display(),
                supported()
            ),
        };
    }
    let classes = cfg.architectures();
    if let Some(a) = REGISTRY
        .iter()
        .find(|a| classes.iter().any(|c| a.hf_classes.contains(c)))
    {
        return Ok(a);
    }
    match classes.first() {
        Some(c) => bail!(
            "{}: no model_type field, and unknown architecture '{c}' (supported: {})",
            cfg.path.display(),
            supported()
        ),
        None => bail!("{}: no model_type field", cfg.path.display()),
    }
}

/// Builds the architecture the config names.
pub fn build(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    (find(cfg)?.load)(cfg, w, device)
}

/// Per-layer sliding flags from transformers 5's `layer_types` list.
pub(crate) fn sliding_from_layer_types(cfg: &Config, types: &[String], n_layers: usize) -> Result<Vec<bool>> {
    if types.len() != n_layers {
        bail!(
            "{}: layer_types has {} entries for {n_layers} layers",
            cfg.path.display(),
            types.len()
        );
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "sliding_attention" => Ok(true),
            "full_attention" => Ok(false),
            other => bail!(
                "{}: field 'layer_types': unsupported layer type '{other}'",
                cfg.path.display()
            ),
        })
        .collect()
}
