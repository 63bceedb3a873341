//! Qwen3 as a [`DecoderSpec`]: the Llama decoder with per-head RMSNorms on q and k before RoPE,
//! no q/k/v biases (unless `attention_bias`), `head_dim` independent of d / heads, tied or
//! untied unembedding, and Qwen2's optional sliding window (`use_sliding_window`, from
//! `max_window_layers` on, or per `layer_types`).

use anyhow::Result;
use candle_core::Device;
use serde::Deserialize;

use super::decoder::{Decoder, DecoderSpec, QkNorm};
use crate::model::config::Config;
use crate::model::weights::Weights;
use crate::model::Transformer;

/// The Qwen3 fields that differ from the Llama ones read by `llama::spec`.
#[derive(Debug, Deserialize)]
pub struct Qwen3Extra {
    /// transformers' Qwen3Config default.
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    #[serde(default)]
    pub attention_bias: bool,
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Layers from this index on use the sliding window (when there is no `layer_types`).
    #[serde(default)]
    pub max_window_layers: usize,
    pub layer_types: Option<Vec<String>>,
}

fn default_head_dim() -> usize {
    128
}

/// The decoder a Qwen3 config describes.
pub fn spec(cfg: &Config) -> Result<DecoderSpec> {
    let mut s = super::llama::spec(cfg)?;
    let c: Qwen3Extra = cfg.typed()?;
    cfg.positive("head_dim", c.head_dim)?;
    s.arch = "qwen3".into();
    s.head_dim = c.head_dim;
    s.rotary_dim = c.head_dim;
    s.attn_scale = 1.0 / (c.head_dim as f64).sqrt();
    s.qk_norm = QkNorm::PerHead;
    s.qkv_bias = c.attention_bias;
    s.sliding_window = if c.use_sliding_window { c.sliding_window } else { None };
    if let Some(w) = s.sliding_window {
        cfg.positive("sliding_window", w)?;
    }
    if c.layer_types.is_none() {
        s.sliding_layers = (0..s.n_layers).map(|l| l >= c.max_window_layers).collect();
    }
    Ok(s)
}

/// Loads a Qwen3 checkpoint.
pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    Ok(Box::new(Decoder::load(&spec(cfg)?, w, device)?))
}
