//! One file per architecture family, and the registry that maps checkpoint metadata to them.
//!
//! The Llama-like decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 2 and 3, GPT-NeoX,
//! OLMo 2, Phi-3, Mixtral) share [`decoder::Decoder`]; their
//! files only turn a typed config into a [`decoder::DecoderSpec`]. GPT-2 and BERT keep their own
//! structs and reuse the block pieces in `model::block`. Adding an architecture is one file, one
//! line in [`REGISTRY`] and one fixture (docs/adding-an-architecture.md).

pub mod bert;
pub mod decoder;
pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod gpt_neox;
pub mod llama;
pub mod mixtral;
pub mod olmo2;
pub mod phi3;
pub mod qwen3;

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
    Architecture { model_types: &["gpt_neox"], hf_classes: &["GPTNeoXForCausalLM"], gguf: &["gptneox"], load: gpt_neox::load },
    Architecture { model_types: &["qwen3"], hf_classes: &["Qwen3ForCausalLM"], gguf: &["qwen3"], load: qwen3::load },
    Architecture { model_types: &["gemma2"], hf_classes: &["Gemma2ForCausalLM"], gguf: &["gemma2"], load: gemma2::load },
    Architecture { model_types: &["olmo2"], hf_classes: &["Olmo2ForCausalLM"], gguf: &["olmo2"], load: olmo2::load },
    Architecture { model_types: &["phi3"], hf_classes: &["Phi3ForCausalLM"], gguf: &["phi3"], load: phi3::load },
    Architecture { model_types: &["mixtral"], hf_classes: &["MixtralForCausalLM"], gguf: &[], load: mixtral::load },
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

/// RoPE's `partial_rotary_factor` from `rope_parameters` (transformers 5), else the top-level
/// field, else `legacy` (GPT-NeoX's `rotary_pct`, read by the caller).
pub(crate) fn partial_rotary_factor(cfg: &Config, legacy: f64) -> Result<f64> {
    let from = |v: Option<&serde_json::Value>, key: &str| -> Result<Option<f64>> {
        match v.and_then(|p| p.get("partial_rotary_factor")) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow::anyhow!("{}: field '{key}' should be a number, found {x}", cfg.path.display())),
        }
    };
    let nested = from(cfg.get("rope_parameters"), "rope_parameters.partial_rotary_factor")?;
    let top = match cfg.get("partial_rotary_factor") {
        None | Some(serde_json::Value::Null) => None,
        Some(x) => Some(x.as_f64().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: field 'partial_rotary_factor' should be a number, found {x}",
                cfg.path.display()
            )
        })?),
    };
    Ok(nested.or(top).unwrap_or(legacy))
}

/// The rotated dims of a head, `int(head_dim * factor)` as transformers computes it; must be
/// even and at least 2.
pub(crate) fn rotary_dim(cfg: &Config, head_dim: usize, factor: f64) -> Result<usize> {
    let dim = (head_dim as f64 * factor) as usize;
    if dim < 2 || dim > head_dim || !dim.is_multiple_of(2) {
        bail!(
            "{}: field 'partial_rotary_factor' ({factor}) gives {dim} rotated dims of {head_dim} (need an even number >= 2)",
            cfg.path.display()
        );
    }
    Ok(dim)
}
