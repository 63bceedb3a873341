//! Llama family: Llama (incl. SmolLM2 and Llama 3 RoPE scaling), Mistral (sliding window) and
//! Qwen2 (q/k/v biases, optional sliding window from `max_window_layers` on), as a
//! [`DecoderSpec`]: RMSNorm pre-norm blocks, gated SiLU MLP, grouped key/value heads.
//!
//! h_0 = E[ids]; h += W_o attn(rope(W_q n), rope(W_k n), W_v n) with n = RMSNorm_1(h);
//! h += W_down(silu(W_gate m) * W_up m) with m = RMSNorm_2(h); logits = W_U RMSNorm_f(h_L).

use anyhow::{anyhow, Result};
use candle_core::Device;
use serde::Deserialize;

use super::decoder::{Decoder, DecoderSpec, MlpKind, NormKind, QkNorm, RopeSpec, TensorNames};
use crate::model::config::Config;
use crate::model::layers::Activation;
use crate::model::weights::Weights;
use crate::model::Transformer;

/// The fields of a Llama / Mistral / Qwen2 config.json that the model uses, with the defaults
/// used when a field is absent.
#[derive(Debug, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (plain multi-head attention).
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Biases on q, k, v and o (Qwen2 always has q/k/v biases).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral: window of every layer (null = none); Qwen2: used when `use_sliding_window`.
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Qwen2: layers from this index on use the sliding window.
    #[serde(default)]
    pub max_window_layers: usize,
    /// transformers 5: "sliding_attention" / "full_attention" per layer (authoritative).
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

/// The decoder a Llama-family config describes.
pub fn spec(cfg: &Config) -> Result<DecoderSpec> {
    let c: LlamaConfig = cfg.typed()?;
    cfg.positive("hidden_size", c.hidden_size)?;
    let n_kv = cfg.kv_heads(c.num_attention_heads, c.num_key_value_heads)?;
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
    cfg.positive("head_dim", head_dim)?;
    let arch = c.model_type.clone();
    let sliding_window = match arch.as_str() {
        "mistral" => c.sliding_window,
        "qwen2" if c.use_sliding_window => c.sliding_window,
        _ => None,
    };
    if let Some(w) = sliding_window {
        cfg.positive("sliding_window", w)?;
    }
    let first_sliding = if arch == "qwen2" { c.max_window_layers } else { 0 };
    let sliding_layers = match &c.layer_types {
        Some(types) => super::sliding_from_layer_types(cfg, types, c.num_hidden_layers)?,
        None => (0..c.num_hidden_layers).map(|l| l >= first_sliding).collect(),
    };
    let (theta, scaling) = cfg.rope(None, 10000.0)?;
    Ok(DecoderSpec {
        arch: arch.clone(),
        d_model: c.hidden_size,
        n_layers: c.num_hidden_layers,
        n_heads: c.num_attention_heads,
        n_kv_heads: n_kv,
        head_dim,
        d_ff: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_positions: c.max_position_embeddings,
        rope_table_len: c.max_position_embeddings,
        norm: NormKind::Rms {
            eps: c.rms_norm_eps,
            plus_one: false,
        },
        pre_norms: true,
        qk_norm: QkNorm::None,
        post_norms: false,
        embed_scale: None,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        qkv_bias: arch == "qwen2" || c.attention_bias,
        o_bias: c.attention_bias,
        mlp_bias: c.mlp_bias,
        mlp: MlpKind::Gated,
        activation: Activation::parse(&c.hidden_act)
            .map_err(|e| anyhow!("{}: field 'hidden_act': {e}", cfg.path.display()))?,
        parallel_residual: false,
        sliding_window,
        sliding_layers,
        rope: RopeSpec { theta, scaling },
        rotary_dim: head_dim,
        rope_long: None,
        rope_local: None,
        names: TensorNames::default(),
    })
}

/// Loads a Llama, Mistral or Qwen2 checkpoint.
pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    Ok(Box::new(Decoder::load(&spec(cfg)?, w, device)?))
}
