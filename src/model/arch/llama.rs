//! Llama family: Llama, SmolLM2, Mistral, Qwen2 (q/k/v bias).
//!
//! h_0 = E[ids]; each block: h += W_o attn(rope(W_q n), rope(W_k n), W_v n) with n = RMSNorm_1(h),
//! then h += W_down(silu(W_gate m) * W_up m) with m = RMSNorm_2(h); logits = W_U RMSNorm_f(h_L).
//! Attention is causal with grouped key/value heads.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::model::block::PreNormBlock;
use crate::model::config::Config;
use crate::model::layers::{self, Linear, RmsNorm, Rope};
use crate::model::weights::Weights;
use crate::model::{AttentionKind, Batch, BatchContext, Hooks, ModelInfo, Transformer};

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Sliding-window layers (Mistral, Qwen2 with `use_sliding_window`) use the local mask.
    sliding: bool,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Block {
    ln1: RmsNorm,
    attn: Attention,
    ln2: RmsNorm,
    mlp: Mlp,
}

pub struct Llama {
    info: ModelInfo,
    device: Device,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: Rope,
    head_dim: usize,
    sliding_window: Option<usize>,
    act: String,
}

impl Llama {
    /// Builds the model from a config (model_type llama, mistral or qwen2) and its weights.
    pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Self> {
        let arch = cfg.str_or("model_type", "llama")?.to_string();
        let d = cfg.usize("hidden_size")?;
        let n_layers = cfg.usize("num_hidden_layers")?;
        let n_heads = cfg.usize("num_attention_heads")?;
        let n_kv = cfg.usize_or("num_key_value_heads", n_heads)?;
        let head_dim = cfg.usize_or("head_dim", d / n_heads)?;
        let ff = cfg.usize("intermediate_size")?;
        let vocab = cfg.usize("vocab_size")?;
        let eps = cfg.f64_or("rms_norm_eps", 1e-6)?;
        let max_pos = cfg.usize_or("max_position_embeddings", 2048)?;
        let qkv_bias = arch == "qwen2" || cfg.bool_or("attention_bias", false)?;
        let o_bias = cfg.bool_or("attention_bias", false)?;
        let mlp_bias = cfg.bool_or("mlp_bias", false)?;
        let sliding_window = match arch.as_str() {
            "mistral" => cfg.opt_usize("sliding_window")?,
            "qwen2" if cfg.bool_or("use_sliding_window", false)? => cfg.opt_usize("sliding_window")?,
            _ => None,
        };
        let first_sliding = if arch == "qwen2" {
            cfg.usize_or("max_window_layers", 0)?
        } else {
            0
        };
        let (theta, scaling) = cfg.rope(None, 10000.0)?;

        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = w.get(&format!("{name}.weight"), &[out, inp])?;
            let bias = if bias {
                Some(w.get(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Linear::new(weight, bias))
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                scale: w.get(&format!("{name}.weight"), &[d])?,
                eps,
            })
        };

        let embed_tokens = w.get("model.embed_tokens.weight", &[vocab, d])?;
        let mut blocks = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let p = format!("model.layers.{l}");
            blocks.push(Block {
                ln1: norm(&format!("{p}.input_layernorm"))?,
                attn: Attention {
                    q: linear(&format!("{p}.self_attn.q_proj"), n_heads * head_dim, d, qkv_bias)?,
                    k: linear(&format!("{p}.self_attn.k_proj"), n_kv * head_dim, d, qkv_bias)?,
                    v: linear(&format!("{p}.self_attn.v_proj"), n_kv * head_dim, d, qkv_bias)?,
                    o: linear(&format!("{p}.self_attn.o_proj"), d, n_heads * head_dim, o_bias)?,
                    sliding: sliding_window.is_some() && l >= first_sliding,
                },
                ln2: norm(&format!("{p}.post_attention_layernorm"))?,
                mlp: Mlp {
                    gate: linear(&format!("{p}.mlp.gate_proj"), ff, d, mlp_bias)?,
                    up: linear(&format!("{p}.mlp.up_proj"), ff, d, mlp_bias)?,
                    down: linear(&format!("{p}.mlp.down_proj"), d, ff, mlp_bias)?,
                },
            });
        }
        let lm_head = match w.get_opt("lm_head.weight", &[vocab, d])? {
            Some(t) => t,
            None => embed_tokens.clone(),
        };
        let info = ModelInfo {
            arch,
            n_layers,
            d_model: d,
            n_heads,
            n_kv_heads: n_kv,
            vocab_size: vocab,
            attention: AttentionKind::Causal,
            has_lm_head: true,
            max_positions: max_pos,
            n_params: w.n_params(),
            block_params: w.block_params(),
        };
        Ok(Self {
            info,
            device: device.clone(),
            embed_tokens,
            blocks,
            norm: norm("model.norm")?,
            lm_head,
            rope: Rope::new(head_dim, theta, &scaling, max_pos, device)?,
            head_dim,
            sliding_window,
            act: cfg.str_or("hidden_act", "silu")?.to_string(),
        })
    }

    fn attention(&self, a: &Attention, x: &Tensor, ctx: &BatchContext) -> candle_core::Result<Tensor> {
        let q = self.rope.apply(&layers::split_heads(
            &a.q.forward(x)?,
            self.info.n_heads,
            self.head_dim,
        )?)?;
        let k = self.rope.apply(&layers::split_heads(
            &a.k.forward(x)?,
            self.info.n_kv_heads,
            self.head_dim,
        )?)?;
        let v = layers::split_heads(&a.v.forward(x)?, self.info.n_kv_heads, self.head_dim)?;
        let bias = match (&ctx.bias_local, a.sliding) {
            (Some(local), true) => local,
            _ => &ctx.bias,
        };
        let out = layers::attention(&q, &k, &v, bias, 1.0 / (self.head_dim as f64).sqrt(), None)?;
        a.o.forward(&out)
    }

    fn mlp(&self, m: &Mlp, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = layers::activation(&self.act, &m.gate.forward(x)?)?;
        m.down.forward(&(gate * m.up.forward(x)?)?)
    }
}

impl Transformer for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn context(&self, batch: &Batch) -> Result<BatchContext> {
        let bias = batch.attention_bias(AttentionKind::Causal, None, &self.device)?;
        let bias_local = match self.sliding_window {
            Some(w) if w < batch.seq_len() => {
                Some(batch.attention_bias(AttentionKind::Causal, Some(w), &self.device)?)
            }
            _ => None,
        };
        Ok(BatchContext {
            seq_len: batch.seq_len(),
            bias,
            bias_local,
            token_type_ids: None,
        })
    }

    fn embed(&self, batch: &Batch, _ctx: &BatchContext) -> Result<Tensor> {
        Ok(layers::embedding(&self.embed_tokens, &batch.input_ids)?)
    }

    fn block(&self, layer: usize, h: &Tensor, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let b = &self.blocks[layer];
        PreNormBlock {
            ln1: &|x| b.ln1.forward(x),
            attn: &|x| self.attention(&b.attn, x, ctx),
            ln1_post: None,
            ln2: &|x| b.ln2.forward(x),
            mlp: &|x| self.mlp(&b.mlp, x),
            ln2_post: None,
        }
        .forward(layer, h, hooks)
    }

    fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(h)?)
    }

    fn unembed(&self, h: &Tensor) -> Result<Tensor> {
        Ok(Linear::new(self.lm_head.clone(), None).forward(h)?)
    }
}
