//! Gemma 3 (text) as a [`DecoderSpec`]: four RMSNorms per block scaling by (1 + w), per-head
//! q/k norms before RoPE, a sqrt(d)-scaled embedding, GELU-tanh gated MLP, attention scale
//! `query_pre_attn_scalar^-1/2`, optional soft-caps, and interleaved sliding-window / global
//! layers with their own RoPE bases.
//!
//! h_0 = sqrt(d) E[ids]; h += N_attn_post(W_o attn(rope(N_q W_q n), rope(N_k W_k n), W_v n))
//! with n = N_1(h); h += N_mlp_post(W_down(gelu(W_gate m) * W_up m)) with m = N_2(h);
//! logits = E N_f(h_L).

use anyhow::{anyhow, Result};
use candle_core::Device;
use serde::Deserialize;

use super::decoder::{Decoder, DecoderSpec, MlpKind, NormKind, QkNorm, RopeSpec, TensorNames};
use crate::model::config::Config;
use crate::model::layers::{Activation, RopeScaling};
use crate::model::weights::Weights;
use crate::model::Transformer;

/// The fields of a Gemma 3 (text) config.json that the model uses, with the defaults used when
/// a field is absent.
#[derive(Debug, Deserialize)]
pub struct Gemma3Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads`.
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
    /// "sliding_attention" / "full_attention" per layer (authoritative when present).
    pub layer_types: Option<Vec<String>>,
    /// Older configs: every `sliding_window_pattern`-th layer is global.
    #[serde(default = "default_pattern")]
    pub sliding_window_pattern: usize,
    /// Attention scale is `query_pre_attn_scalar^-1/2`; defaults to `head_dim`.
    pub query_pre_attn_scalar: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Older configs' local RoPE base (newer ones use `rope_parameters.sliding_attention`).
    #[serde(default = "default_local_base")]
    pub rope_local_base_freq: f64,
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
    32768
}
fn default_window() -> usize {
    512
}
fn default_pattern() -> usize {
    6
}
fn default_local_base() -> f64 {
    10_000.0
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}

/// The decoder a Gemma 3 config describes.
pub fn spec(cfg: &Config) -> Result<DecoderSpec> {
    let c: Gemma3Config = cfg.typed()?;
    cfg.positive("hidden_size", c.hidden_size)?;
    let n_kv = cfg.kv_heads(c.num_attention_heads, c.num_key_value_heads)?;
    cfg.positive("head_dim", c.head_dim)?;
    cfg.positive("sliding_window", c.sliding_window)?;
    let sliding_layers = match &c.layer_types {
        Some(types) => super::sliding_from_layer_types(cfg, types, c.num_hidden_layers)?,
        None => {
            cfg.positive("sliding_window_pattern", c.sliding_window_pattern)?;
            (0..c.num_hidden_layers)
                .map(|l| (l + 1) % c.sliding_window_pattern != 0)
                .collect()
        }
    };
    let (theta, scaling) = cfg.rope(Some("full_attention"), 1_000_000.0)?;
    let (local_theta, local_scaling) = if cfg.has("rope_parameters") {
        cfg.rope(Some("sliding_attention"), 10_000.0)?
    } else {
        (c.rope_local_base_freq, RopeScaling::None)
    };
    Ok(DecoderSpec {
        arch: "gemma3".into(),
        d_model: c.hidden_size,
        n_layers: c.num_hidden_layers,
        n_heads: c.num_attention_heads,
        n_kv_heads: n_kv,
        head_dim: c.head_dim,
        d_ff: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_positions: c.max_position_embeddings,
        // Long enough for any sentence, without allocating Gemma's full 32k x 128 table twice.
        rope_table_len: c.max_position_embeddings.min(8192),
        norm: NormKind::Rms {
            eps: c.rms_norm_eps,
            plus_one: true,
        },
        pre_norms: true,
        qk_norm: QkNorm::PerHead,
        post_norms: true,
        // transformers keeps the scale as a tensor in the model dtype: round it to f32 too.
        embed_scale: Some((c.hidden_size as f64).sqrt() as f32 as f64),
        attn_scale: c.query_pre_attn_scalar.unwrap_or(c.head_dim as f64).powf(-0.5),
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
        rope_local: Some(RopeSpec {
            theta: local_theta,
            scaling: local_scaling,
        }),
        names: TensorNames {
            ln2: "pre_feedforward_layernorm".into(),
            ..TensorNames::default()
        },
    })
}

/// Loads a Gemma 3 text checkpoint.
pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    Ok(Box::new(Decoder::load(&spec(cfg)?, w, device)?))
}
