//! GPT-2: learned positions, pre-LayerNorm blocks, tied unembedding.
//!
//! h_0 = W_te[ids] + W_pe[pos]; each block: h += c_proj(attn(c_attn(LN_1(h)))), then
//! h += W_proj gelu(W_fc LN_2(h)); logits = W_te LN_f(h_L). The checkpoint's Conv1D weights are
//! stored [in, out]; they are transposed once at load into the usual [out, in].

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::model::block::PreNormBlock;
use crate::model::config::Config;
use crate::model::layers::{self, LayerNorm, Linear};
use crate::model::weights::Weights;
use crate::model::{AttentionKind, Batch, BatchContext, Hooks, ModelInfo, Transformer};

struct Block {
    ln1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    ln2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

pub struct Gpt2 {
    info: ModelInfo,
    device: Device,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Tensor,
    head_dim: usize,
    act: String,
}

impl Gpt2 {
    pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Self> {
        let d = cfg.usize("n_embd")?;
        let n_layers = cfg.usize("n_layer")?;
        let n_heads = cfg.usize("n_head")?;
        let n_pos = cfg.usize("n_positions")?;
        let vocab = cfg.usize("vocab_size")?;
        let inner = cfg.usize_or("n_inner", 4 * d)?;
        let eps = cfg.f64_or("layer_norm_epsilon", 1e-5)?;
        // transformers saves GPT2LMHeadModel with a "transformer." prefix, the original
        // checkpoints without one.
        let p = if w.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let conv1d = |name: &str, inp: usize, out: usize| -> Result<Linear> {
            let weight = w.get(&format!("{p}{name}.weight"), &[inp, out])?.t()?.contiguous()?;
            Ok(Linear::new(weight, Some(w.get(&format!("{p}{name}.bias"), &[out])?)))
        };
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: w.get(&format!("{p}{name}.weight"), &[d])?,
                bias: w.get(&format!("{p}{name}.bias"), &[d])?,
                eps,
            })
        };
        let wte = w.get(&format!("{p}wte.weight"), &[vocab, d])?;
        let mut blocks = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            blocks.push(Block {
                ln1: ln(&format!("h.{l}.ln_1"))?,
                c_attn: conv1d(&format!("h.{l}.attn.c_attn"), d, 3 * d)?,
                c_proj: conv1d(&format!("h.{l}.attn.c_proj"), d, d)?,
                ln2: ln(&format!("h.{l}.ln_2"))?,
                c_fc: conv1d(&format!("h.{l}.mlp.c_fc"), d, inner)?,
                mlp_proj: conv1d(&format!("h.{l}.mlp.c_proj"), inner, d)?,
            });
        }
        let lm_head = match w.get_opt("lm_head.weight", &[vocab, d])? {
            Some(t) => t,
            None => wte.clone(),
        };
        let info = ModelInfo {
            arch: "gpt2".into(),
            n_layers,
            d_model: d,
            n_heads,
            n_kv_heads: n_heads,
            vocab_size: vocab,
            attention: AttentionKind::Causal,
            has_lm_head: true,
            max_positions: n_pos,
            n_params: w.n_params(),
            block_params: w.block_params(),
        };
        Ok(Self {
            info,
            device: device.clone(),
            wte,
            wpe: w.get(&format!("{p}wpe.weight"), &[n_pos, d])?,
            blocks,
            ln_f: ln("ln_f")?,
            lm_head,
            head_dim: d / n_heads,
            act: cfg.str_or("activation_function", "gelu_new")?.to_string(),
        })
    }

    fn attention(&self, b: &Block, x: &Tensor, ctx: &BatchContext) -> candle_core::Result<Tensor> {
        let d = self.info.d_model;
        let qkv = b.c_attn.forward(x)?;
        let heads = |i: usize| layers::split_heads(&qkv.narrow(2, i * d, d)?, self.info.n_heads, self.head_dim);
        let out = layers::attention(
            &heads(0)?,
            &heads(1)?,
            &heads(2)?,
            &ctx.bias,
            1.0 / (self.head_dim as f64).sqrt(),
            None,
        )?;
        b.c_proj.forward(&out)
    }

    fn mlp(&self, b: &Block, x: &Tensor) -> candle_core::Result<Tensor> {
        b.mlp_proj.forward(&layers::activation(&self.act, &b.c_fc.forward(x)?)?)
    }
}

impl Transformer for Gpt2 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn context(&self, batch: &Batch) -> Result<BatchContext> {
        if batch.seq_len() > self.info.max_positions {
            anyhow::bail!(
                "sequence of {} tokens exceeds the context of {}",
                batch.seq_len(),
                self.info.max_positions
            );
        }
        let bias = batch.attention_bias(AttentionKind::Causal, None, &self.device)?;
        Ok(BatchContext {
            seq_len: batch.seq_len(),
            bias,
            bias_local: None,
            token_type_ids: None,
        })
    }

    fn embed(&self, batch: &Batch, ctx: &BatchContext) -> Result<Tensor> {
        let tok = layers::embedding(&self.wte, &batch.input_ids)?;
        let pos = self.wpe.narrow(0, 0, ctx.seq_len)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    fn block(&self, layer: usize, h: &Tensor, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let b = &self.blocks[layer];
        PreNormBlock {
            ln1: &|x| b.ln1.forward(x),
            attn: &|x| self.attention(b, x, ctx),
            ln1_post: None,
            ln2: &|x| b.ln2.forward(x),
            mlp: &|x| self.mlp(b, x),
            ln2_post: None,
        }
        .forward(layer, h, hooks)
    }

    fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.ln_f.forward(h)?)
    }

    fn unembed(&self, h: &Tensor) -> Result<Tensor> {
        Ok(Linear::new(self.lm_head.clone(), None).forward(h)?)
    }
}
