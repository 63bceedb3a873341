//! GPT-NeoX / Pythia as a [`DecoderSpec`]: LayerNorm (with bias) pre-norm blocks, parallel
//! (`use_parallel_residual`, the default) or sequential residual, partial rotary
//! (`rotary_pct` / `partial_rotary_factor` of each head), a plain GELU MLP with biases, and an
//! untied `embed_out` head.
//!
//! Parallel: h += W_o attn(rope(q), rope(k), v)(LN_1(h)) + W_down(gelu(W_up LN_2(h))), both read
//! the block input; sequential: the usual two residual adds. logits = W_out LN_f(h_L).
//!
//! Sub-modules of a parallel block: replacing attention (or the MLP) by a linear map replaces
//! that branch only; the other branch still reads the block input, and both are added to it.
//!
//! The checkpoint fuses q, k and v into `attention.query_key_value` with rows laid out
//! [heads, 3, head_dim]; [`split_qkv`] cuts it into per-projection tensors at load.

use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::decoder::{Decoder, DecoderSpec, MlpKind, NormKind, QkNorm, RopeSpec, TensorNames};
use crate::model::config::Config;
use crate::model::layers::Activation;
use crate::model::weights::Weights;
use crate::model::Transformer;

/// The fields of a GPT-NeoX config.json that the model uses, with transformers' defaults.
#[derive(Debug, Deserialize)]
pub struct GptNeoXConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_true")]
    pub use_parallel_residual: bool,
    /// Older configs; newer ones use `rope_parameters.partial_rotary_factor`.
    pub rotary_pct: Option<f64>,
    /// Older configs' RoPE base.
    pub rotary_emb_base: Option<f64>,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_max_positions() -> usize {
    2048
}
fn default_true() -> bool {
    true
}
fn default_act() -> String {
    "gelu".into()
}

/// Where the per-projection tensors cut from `query_key_value` are stored.
const Q: &str = "attention.q";
const K: &str = "attention.k";
const V: &str = "attention.v";

/// The decoder a GPT-NeoX config describes.
pub fn spec(cfg: &Config) -> Result<DecoderSpec> {
    let c: GptNeoXConfig = cfg.typed()?;
    cfg.positive("hidden_size", c.hidden_size)?;
    let h = c.num_attention_heads;
    cfg.check_heads("num_attention_heads", h, "num_attention_heads", h)?;
    let head_dim = c.hidden_size / h;
    cfg.positive("head_dim", head_dim)?;
    let pct = super::partial_rotary_factor(cfg, c.rotary_pct.unwrap_or(0.25))?;
    let rotary_dim = super::rotary_dim(cfg, head_dim, pct)?;
    let (theta, scaling) = cfg.rope(None, c.rotary_emb_base.unwrap_or(10000.0))?;
    Ok(DecoderSpec {
        arch: "gpt_neox".into(),
        d_model: c.hidden_size,
        n_layers: c.num_hidden_layers,
        n_heads: h,
        n_kv_heads: h,
        head_dim,
        d_ff: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_positions: c.max_position_embeddings,
        rope_table_len: c.max_position_embeddings,
        norm: NormKind::Layer { eps: c.layer_norm_eps },
        pre_norms: true,
        qk_norm: QkNorm::None,
        post_norms: false,
        embed_scale: None,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        mlp_bias: true,
        mlp: MlpKind::Plain,
        activation: Activation::parse(&c.hidden_act)
            .map_err(|e| anyhow!("{}: field 'hidden_act': {e}", cfg.path.display()))?,
        parallel_residual: c.use_parallel_residual,
        sliding_window: None,
        sliding_layers: vec![false; c.num_hidden_layers],
        rope: RopeSpec { theta, scaling },
        rotary_dim,
        rope_long: None,
        rope_local: None,
        names: TensorNames {
            embed: "gpt_neox.embed_in".into(),
            layer_prefix: "gpt_neox.layers".into(),
            ln1: "input_layernorm".into(),
            q: Q.into(),
            k: K.into(),
            v: V.into(),
            o: "attention.dense".into(),
            ln2: "post_attention_layernorm".into(),
            up: "mlp.dense_h_to_4h".into(),
            down: "mlp.dense_4h_to_h".into(),
            final_norm: "gpt_neox.final_layer_norm".into(),
            lm_head: "embed_out".into(),
            ..TensorNames::default()
        },
    })
}

/// q, k, v from a fused [heads * 3 * head_dim, ..] tensor whose rows are [heads, 3, head_dim]
/// (weight [3d, d] or bias [3d]).
pub fn split_qkv(fused: &Tensor, heads: usize, head_dim: usize) -> Result<[Tensor; 3]> {
    let rest: Vec<usize> = fused.dims()[1..].to_vec();
    let mut shape = vec![heads, 3, head_dim];
    shape.extend(&rest);
    let t = fused.reshape(shape)?;
    let part = |i: usize| -> Result<Tensor> {
        let mut out = vec![heads * head_dim];
        out.extend(&rest);
        Ok(t.narrow(1, i, 1)?.contiguous()?.reshape(out)?)
    };
    Ok([part(0)?, part(1)?, part(2)?])
}

/// Loads a GPT-NeoX / Pythia checkpoint.
pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    let s = spec(cfg)?;
    let d = s.d_model;
    let mut split = Vec::new();
    for l in 0..s.n_layers {
        let p = format!("{}.{l}", s.names.layer_prefix);
        for suffix in ["weight", "bias"] {
            let name = format!("{p}.attention.query_key_value.{suffix}");
            let shape: &[usize] = if suffix == "weight" { &[3 * d, d] } else { &[3 * d] };
            let fused = match w.get_opt(&name, shape)? {
                Some(t) => t,
                None if suffix == "bias" && !s.qkv_bias => continue,
                None => w.get(&name, shape)?,
            };
            let [q, k, v] = split_qkv(&fused, s.n_heads, s.head_dim)?;
            split.push((
                name,
                vec![
                    (format!("{p}.{Q}.{suffix}"), q),
                    (format!("{p}.{K}.{suffix}"), k),
                    (format!("{p}.{V}.{suffix}"), v),
                ],
            ));
        }
    }
    Ok(Box::new(Decoder::load(&s, &w.with_split(split), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows [head0: q q k k v v, head1: q q k k v v] (heads 2, head_dim 2) split into
    /// q = rows 0,1,6,7; k = 2,3,8,9; v = 4,5,10,11.
    #[test]
    fn split_qkv_follows_the_per_head_layout() {
        let fused = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap();
        let [q, k, v] = split_qkv(&fused, 2, 2).unwrap();
        assert_eq!(q.to_vec1::<f32>().unwrap(), vec![0.0, 1.0, 6.0, 7.0]);
        assert_eq!(k.to_vec1::<f32>().unwrap(), vec![2.0, 3.0, 8.0, 9.0]);
        assert_eq!(v.to_vec1::<f32>().unwrap(), vec![4.0, 5.0, 10.0, 11.0]);
        let w = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((12, 2))
            .unwrap();
        let [q, _, _] = split_qkv(&w, 2, 2).unwrap();
        assert_eq!(
            q.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.0], vec![2.0, 3.0], vec![12.0, 13.0], vec![14.0, 15.0]]
        );
    }
}
