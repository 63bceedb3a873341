//! OLMo 2 as a [`DecoderSpec`]: no pre-norms; RMSNorms on the attention and MLP outputs before
//! each residual add, and RMSNorms on q and k over the whole projection (all heads) before RoPE.
//!
//! h += N_attn_post(W_o attn(rope(N_q(W_q h)), rope(N_k(W_k h)), W_v h));
//! h += N_mlp_post(W_down(silu(W_gate h) * W_up h)); logits = W_U N_f(h_L).
//! With no pre-norms, `ln1.hook_normalized` / `ln2.hook_normalized` report the raw sub-layer
//! inputs and the sub-modules are attn, ln1_post, mlp, ln2_post.

use anyhow::Result;
use candle_core::Device;

use super::decoder::{Decoder, DecoderSpec, QkNorm};
use crate::model::config::Config;
use crate::model::weights::Weights;
use crate::model::Transformer;

/// The decoder an OLMo 2 config describes (its fields are the Llama ones).
pub fn spec(cfg: &Config) -> Result<DecoderSpec> {
    let mut s = super::llama::spec(cfg)?;
    s.arch = "olmo2".into();
    s.pre_norms = false;
    s.post_norms = true;
    s.qk_norm = QkNorm::Whole;
    s.sliding_window = None;
    Ok(s)
}

/// Loads an OLMo 2 checkpoint.
pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    Ok(Box::new(Decoder::load(&spec(cfg)?, w, device)?))
}
