//! GPT-2: learned positions, pre-LayerNorm blocks, tied unembedding.
//!
//! h_0 = W_te[ids] + W_pe[pos] (taps `hook_embed` and `hook_pos_embed`, as TransformerLens);
//! each block: h += c_proj(attn(c_attn(LN_1(h)))), then h += W_proj gelu(W_fc LN_2(h));
//! logits = W_te LN_f(h_L). The checkpoint's Conv1D weights are stored [in, out]; they are
//! transposed once at load into the usual [out, in].

use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::model::block::{attend, fused_attention_mask, plain_mlp, PreNormBlock};
use crate::model::config::Config;
use crate::model::fused;
use crate::model::hooks::{emit, Tap};
use crate::model::layers::{self, Activation, LayerNorm, Linear};
use crate::model::weights::Weights;
use crate::model::{AttentionKind, Batch, BatchContext, Hooks, ModelInfo, Transformer};

/// The fields of a GPT-2 config.json that the model uses.
#[derive(Debug, Deserialize)]
pub struct Gpt2Config {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    /// MLP width; defaults to 4 * n_embd.
    pub n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    pub activation_function: String,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}

struct Block {
    ln1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    ln2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

impl Block {
    fn n_params(&self) -> usize {
        self.ln1.n_params()
            + self.c_attn.n_params()
            + self.c_proj.n_params()
            + self.ln2.n_params()
            + self.c_fc.n_params()
            + self.mlp_proj.n_params()
    }
}

pub struct Gpt2 {
    info: ModelInfo,
    device: Device,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    head_dim: usize,
    act: Activation,
}

/// Loads a GPT-2 checkpoint.
pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    if w.placement().is_some() {
        anyhow::bail!(
            "{}: --device with several devices is not supported for GPT-2 (use one device)",
            w.source().display()
        );
    }
    Ok(Box::new(Gpt2::load(cfg, w, device)?))
}

impl Gpt2 {
    pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Self> {
        let c: Gpt2Config = cfg.typed()?;
        let (d, n_heads) = (c.n_embd, c.n_head);
        cfg.positive("n_head", n_heads)?;
        if !d.is_multiple_of(n_heads) {
            anyhow::bail!(
                "{}: field 'n_embd' ({d}) must be a multiple of 'n_head' ({n_heads})",
                cfg.path.display()
            );
        }
        let inner = c.n_inner.unwrap_or(4 * d);
        let eps = c.layer_norm_epsilon;
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
        let wte = w.get(&format!("{p}wte.weight"), &[c.vocab_size, d])?;
        // No capacity from the config's layer count: it is untrusted (a config with 2^60 layers
        // made this allocate 481 GB; found by tests/fuzz_readers.rs); a missing block's weights
        // end the load with an error instead.
        let mut blocks = Vec::new();
        for l in 0..c.n_layer {
            blocks.push(Block {
                ln1: ln(&format!("h.{l}.ln_1"))?,
                c_attn: conv1d(&format!("h.{l}.attn.c_attn"), d, 3 * d)?,
                c_proj: conv1d(&format!("h.{l}.attn.c_proj"), d, d)?,
                ln2: ln(&format!("h.{l}.ln_2"))?,
                c_fc: conv1d(&format!("h.{l}.mlp.c_fc"), d, inner)?,
                mlp_proj: conv1d(&format!("h.{l}.mlp.c_proj"), inner, d)?,
            });
        }
        let lm_head = match w.get_opt("lm_head.weight", &[c.vocab_size, d])? {
            Some(t) => t,
            None => wte.clone(),
        };
        let info = ModelInfo {
            arch: "gpt2".into(),
            n_layers: c.n_layer,
            d_model: d,
            n_heads,
            n_kv_heads: n_heads,
            vocab_size: c.vocab_size,
            attention: AttentionKind::Causal,
            has_lm_head: true,
            max_positions: c.n_positions,
            n_params: w.n_params(),
            block_params: blocks.iter().map(Block::n_params).sum(),
            dtype: crate::model::dtype::label(w.dtype()).into(),
        };
        Ok(Self {
            info,
            device: device.clone(),
            wte,
            wpe: w.get(&format!("{p}wpe.weight"), &[c.n_positions, d])?,
            blocks,
            ln_f: ln("ln_f")?,
            lm_head: Linear::new(lm_head, None),
            head_dim: d / n_heads,
            act: Activation::parse(&c.activation_function)
                .map_err(|e| anyhow!("{}: field 'activation_function': {e}", cfg.path.display()))?,
        })
    }

    fn attention(
        &self,
        layer: usize,
        b: &Block,
        x: &Tensor,
        ctx: &BatchContext,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let d = self.info.d_model;
        let qkv = b.c_attn.forward(x)?;
        let (h, hd) = (self.info.n_heads, self.head_dim);
        if let Some(spec) = fused_attention_mask(layer, x, hd, &ctx.bias, hooks) {
            // [B, T, d] slices of the fused projection, read in place by the kernel's layout.
            let (bsz, t, _) = x.dims3()?;
            let part = |i: usize| qkv.narrow(2, i * d, d)?.contiguous()?.reshape((bsz, t, h, hd));
            let scale = 1.0 / (hd as f64).sqrt();
            if let Some(out) = fused::flash_attention(&part(0)?, &part(1)?, &part(2)?, spec, scale, None)? {
                return Ok(b.c_proj.forward(&out.reshape((bsz, t, d))?)?);
            }
        }
        let heads = |i: usize| layers::split_heads(&qkv.narrow(2, i * d, d)?, self.info.n_heads, self.head_dim);
        let out = attend(
            layer,
            &heads(0)?,
            &heads(1)?,
            &heads(2)?,
            &ctx.bias,
            1.0 / (self.head_dim as f64).sqrt(),
            None,
            hooks,
        )?;
        Ok(b.c_proj.forward(&out)?)
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
        let bias = batch.attention_mask(AttentionKind::Causal, None, &self.device)?;
        Ok(BatchContext {
            seq_len: batch.seq_len(),
            bias,
            bias_local: None,
            token_type_ids: None,
            split_bias: Vec::new(),
        })
    }

    fn embed_with(&self, batch: &Batch, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let tok = emit(hooks, Tap::Embed, layers::embedding(&self.wte, &batch.input_ids)?)?;
        let pos = self
            .wpe
            .narrow(0, 0, ctx.seq_len)?
            .unsqueeze(0)?
            .broadcast_as(tok.shape())?;
        let pos = emit(hooks, Tap::PosEmbed, pos)?;
        Ok((tok + pos)?)
    }

    fn block(&self, layer: usize, h: &Tensor, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor> {
        // States from outside (lens outputs, f32) enter in the compute dtype.
        let h = &layers::to_dtype(h, self.wte.dtype())?;
        let b = &self.blocks[layer];
        PreNormBlock {
            ln1: &|x| b.ln1.forward(x),
            attn: &|x, hooks| self.attention(layer, b, x, ctx, hooks),
            ln1_post: None,
            ln2: &|x| b.ln2.forward(x),
            mlp: &|x, hooks| plain_mlp(layer, &b.c_fc, self.act, &b.mlp_proj, x, hooks),
            ln2_post: None,
            parallel: false,
        }
        .forward(layer, h, hooks)
    }

    fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.ln_f.forward(h)?)
    }

    fn unembed(&self, h: &Tensor) -> Result<Tensor> {
        // Logits leave the model in f32 (scored in f32 everywhere).
        Ok(layers::f32(self.lm_head.forward(h)?)?)
    }
}
