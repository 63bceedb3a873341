//! Gemma 2 as a [`DecoderSpec`]: four RMSNorms per block scaling by (1 + w), a sqrt(d)-scaled
//! embedding, GELU-tanh gated MLP, attention scale `query_pre_attn_scalar^-1/2`, attention and
//! final logit soft-capping (`tanh(x / c) * c`), and alternating sliding-window / global layers
//! (layer 0 sliding) with one RoPE base. Unlike Gemma 3 there are no q/k norms.
//!
//! h_0 = sqrt(d) E[ids]; h += N_attn_post(W_o attn(..)(N_1(h))); h += N_mlp_post(mlp(N_2(h)));
//! logits = cap(E N_f(h_L)).

use anyhow::{anyhow, Result};
use candle_core::Device;
use serde::Deserialize;

use super::decoder::{Decoder, DecoderSpec, MlpKind, NormKind, QkNorm, RopeSpec, TensorNames};
use crate::model::config::Config;
use crate::model::layers::Activation;
use crate::model::weights::Weights;
use crate::model::Transformer;

/// The fields of a Gemma 2 config.json that the model uses, with transformers' defaults.
#[derive(Debug, Deserialize)]
pub struct Gemma2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_window")]
    pub sliding_window: usize,
    /// "sliding_attention" / "full_attention" per layer; absent: even layers slide.
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_scalar")]
    pub query_pre_attn_scalar: f64,
    /// Absent or null: no cap. (transformers' class defaults are 50 and 30, but config.json
    /// nulls are read as absent here, and released Gemma 2 configs state both caps.)
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    #[serde(default = "default_act")]
    pub hidden_activation: String,
}

fn default_head_dim() -> usize {
    256
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    8192
}
fn default_window() -> usize {
    4096
}
fn default_scalar() -> f64 {
    256.0
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}

/// The decoder a Gemma 2 config describes.
pub fn spec(cfg: &Config) -> Result<DecoderSpec> {
    let c: Gemma2Config = cfg.typed()?;
    cfg.positive("hidden_size", c.hidden_size)?;
    let n_kv = cfg.kv_heads(c.num_attention_heads, c.num_key_value_heads)?;
    cfg.positive("head_dim", c.head_dim)?;
    cfg.positive("sliding_window", c.sliding_window)?;
    let sliding_layers = match &c.layer_types {
        Some(types) => super::sliding_from_layer_types(cfg, types, c.num_hidden_layers)?,
        None => (0..c.num_hidden_layers).map(|l| l % 2 == 0).collect(),
    };
    let (theta, scaling) = cfg.rope(None, 10_000.0)?;
    Ok(DecoderSpec {
        arch: "gemma2".into(),
        d_model: c.hidden_size,
        n_layers: c.num_hidden_layers,
        n_heads: c.num_attention_heads,
        n_kv_heads: n_kv,
        head_dim: c.head_dim,
        d_ff: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_positions: c.max_position_embeddings,
        rope_table_len: c.max_position_embeddings.min(8192),
        norm: NormKind::Rms {
            eps: c.rms_norm_eps,
            plus_one: true,
        },
        pre_norms: true,
        qk_norm: QkNorm::None,
        post_norms: true,
        // transformers keeps the scale as a tensor in the model dtype: round it to f32 too.
        embed_scale: Some((c.hidden_size as f64).sqrt() as f32 as f64),
        attn_scale: c.query_pre_attn_scalar.powf(-0.5),
        attn_softcap: c.attn_logit_softcapping,
        final_softcap: c.final_logit_softcapping,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        mlp: MlpKind::Gated,
        activation: Activation::parse(&c.hidden_activation)
            .map_err(|e| anyhow!("{}: field 'hidden_activation': {e}", cfg.path.display()))?,
        parallel_residual: false,
        sliding_window: Some(c.sliding_window),
        sliding_layers,
        rope: RopeSpec { theta, scaling },
        rotary_dim: c.head_dim,
        rope_long: None,
        rope_local: None,
        names: TensorNames {
            ln2: "pre_feedforward_layernorm".into(),
            ..TensorNames::default()
        },
    })
}

/// Loads a Gemma 2 checkpoint.
pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    Ok(Box::new(Decoder::load(&spec(cfg)?, w, device)?))
}
