//! BERT: `BertForMaskedLM` (with the MLM head) and plain `BertModel` (representations only).
//!
//! h_0 = LN_emb(W_word[ids] + W_pos[pos] + W_type[types]); each block is post-norm:
//! m = LN_1(h + W_O attn(h)), h' = LN_2(m + W_out gelu(W_in m)). Attention is bidirectional over
//! the sentence's real tokens. The MLM head reads a state s as
//! logits = W_word LN_t(gelu(W_t s)) + b, with W_word tied to the input embedding.
//!
//! Tap names for this post-norm order (they say what the values are, and keep
//! `blocks.{l}.hook_resid_post == blocks.{l+1}.hook_resid_pre` as for every architecture):
//! - `hook_embed`, `hook_pos_embed`, `hook_token_type_embed`: the three embeddings BEFORE their
//!   sum and the embedding LayerNorm (TransformerLens's `embed.hook_*`); h_0 = LN_emb(sum) is
//!   `blocks.0.hook_resid_pre`.
//! - `hook_resid_pre` = h; `attn.hook_pattern`; `hook_attn_out` = W_O attn(h) (before add & norm);
//!   `ln1.hook_in` = h + attn_out; `ln1.hook_normalized` = m (the stream between the sub-layers);
//!   `mlp.hook_post` = gelu(W_in m); `hook_mlp_out` = W_out gelu(W_in m); `ln2.hook_in` =
//!   m + mlp_out; `ln2.hook_normalized` = `hook_resid_post` = h' (the block output).
//! - There is no `hook_resid_mid` (post-norm has no un-normalised mid-block stream) and no
//!   `ln_final.hook_normalized` (no final norm). TransformerLens's HookedEncoder calls the two
//!   pre-norm sums `hook_resid_mid` / `hook_resid_post` and the block output
//!   `hook_normalized_resid_post`; here they are `ln1.hook_in`, `ln2.hook_in`, `hook_resid_post`.

use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::model::block::{attend, plain_mlp};
use crate::model::config::Config;
use crate::model::hooks::{emit, run_sub, BlockTap};
use crate::model::layers::{self, Activation, LayerNorm, Linear};
use crate::model::weights::Weights;
use crate::model::{AttentionKind, Batch, BatchContext, Hooks, ModelInfo, SubModule, Tap, Transformer};

/// The fields of a BERT config.json that the model uses.
#[derive(Debug, Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_max_positions() -> usize {
    512
}
fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".into()
}
fn default_act() -> String {
    "gelu".into()
}

/// Loads a BertForMaskedLM or BertModel checkpoint.
pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    if w.placement().is_some() {
        anyhow::bail!(
            "{}: --device with several devices is not supported for BERT (use one device)",
            w.source().display()
        );
    }
    Ok(Box::new(Bert::load(cfg, w, device)?))
}

struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    ln2: LayerNorm,
}

impl Block {
    fn n_params(&self) -> usize {
        [&self.q, &self.k, &self.v, &self.o, &self.ff_in, &self.ff_out]
            .iter()
            .map(|l| l.n_params())
            .sum::<usize>()
            + self.ln1.n_params()
            + self.ln2.n_params()
    }
}

struct MlmHead {
    dense: Linear,
    ln: LayerNorm,
    decoder: Linear,
}

pub struct Bert {
    info: ModelInfo,
    device: Device,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    ln_emb: LayerNorm,
    blocks: Vec<Block>,
    head: Option<MlmHead>,
    head_dim: usize,
    act: Activation,
}

impl Bert {
    pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Self> {
        let c: BertConfig = cfg.typed()?;
        let (d, n_layers, n_heads, ff, vocab) = (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
            c.vocab_size,
        );
        let (n_pos, n_types, eps) = (c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps);
        cfg.positive("num_attention_heads", n_heads)?;
        if !d.is_multiple_of(n_heads) {
            bail!(
                "{}: field 'hidden_size' ({d}) must be a multiple of 'num_attention_heads' ({n_heads})",
                cfg.path.display()
            );
        }
        if c.position_embedding_type != "absolute" {
            bail!(
                "{}: only absolute position embeddings are supported",
                cfg.path.display()
            );
        }
        // BertForMaskedLM prefixes the encoder with "bert."; a saved BertModel does not.
        let p = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(
                w.get(&format!("{name}.weight"), &[out, inp])?,
                Some(w.get(&format!("{name}.bias"), &[out])?),
            ))
        };
        // Old checkpoints call LayerNorm parameters gamma/beta.
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: w.get_any(&[&format!("{name}.weight"), &format!("{name}.gamma")], &[d])?,
                bias: w.get_any(&[&format!("{name}.bias"), &format!("{name}.beta")], &[d])?,
                eps,
            })
        };
        let word = w.get(&format!("{p}embeddings.word_embeddings.weight"), &[vocab, d])?;
        // No capacity from the config's layer count: it is untrusted (a config with 2^60 layers
        // made this allocate 481 GB; found by tests/fuzz_readers.rs); a missing block's weights
        // end the load with an error instead.
        let mut blocks = Vec::new();
        for l in 0..n_layers {
            let b = format!("{p}encoder.layer.{l}");
            blocks.push(Block {
                q: linear(&format!("{b}.attention.self.query"), d, d)?,
                k: linear(&format!("{b}.attention.self.key"), d, d)?,
                v: linear(&format!("{b}.attention.self.value"), d, d)?,
                o: linear(&format!("{b}.attention.output.dense"), d, d)?,
                ln1: ln(&format!("{b}.attention.output.LayerNorm"))?,
                ff_in: linear(&format!("{b}.intermediate.dense"), ff, d)?,
                ff_out: linear(&format!("{b}.output.dense"), d, ff)?,
                ln2: ln(&format!("{b}.output.LayerNorm"))?,
            });
        }
        let head = if w.contains("cls.predictions.transform.dense.weight") {
            let decoder_w = match w.get_opt("cls.predictions.decoder.weight", &[vocab, d])? {
                Some(t) => t,
                None => word.clone(),
            };
            let decoder_b = w.get_any(&["cls.predictions.bias", "cls.predictions.decoder.bias"], &[vocab])?;
            Some(MlmHead {
                dense: linear("cls.predictions.transform.dense", d, d)?,
                ln: ln("cls.predictions.transform.LayerNorm")?,
                decoder: Linear::new(decoder_w, Some(decoder_b)),
            })
        } else {
            None
        };
        let info = ModelInfo {
            arch: "bert".into(),
            n_layers,
            d_model: d,
            n_heads,
            n_kv_heads: n_heads,
            vocab_size: vocab,
            attention: AttentionKind::Bidirectional,
            has_lm_head: head.is_some(),
            max_positions: n_pos,
            n_params: w.n_params(),
            block_params: blocks.iter().map(Block::n_params).sum(),
            dtype: crate::model::dtype::label(w.dtype()).into(),
        };
        Ok(Self {
            info,
            device: device.clone(),
            word,
            position: w.get(&format!("{p}embeddings.position_embeddings.weight"), &[n_pos, d])?,
            token_type: w.get(&format!("{p}embeddings.token_type_embeddings.weight"), &[n_types, d])?,
            ln_emb: ln(&format!("{p}embeddings.LayerNorm"))?,
            blocks,
            head,
            head_dim: d / n_heads,
            act: Activation::parse(&c.hidden_act)
                .map_err(|e| anyhow!("{}: field 'hidden_act': {e}", cfg.path.display()))?,
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
        let (h, hd) = (self.info.n_heads, self.head_dim);
        let q = layers::split_heads(&b.q.forward(x)?, h, hd)?;
        let k = layers::split_heads(&b.k.forward(x)?, h, hd)?;
        let v = layers::split_heads(&b.v.forward(x)?, h, hd)?;
        let out = attend(layer, &q, &k, &v, &ctx.bias, 1.0 / (hd as f64).sqrt(), None, hooks)?;
        Ok(b.o.forward(&out)?)
    }
}

impl Transformer for Bert {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn context(&self, batch: &Batch) -> Result<BatchContext> {
        if batch.seq_len() > self.info.max_positions {
            bail!(
                "sequence of {} tokens exceeds the context of {}",
                batch.seq_len(),
                self.info.max_positions
            );
        }
        let bias = batch.attention_mask(AttentionKind::Bidirectional, None, &self.device)?;
        Ok(BatchContext {
            seq_len: batch.seq_len(),
            bias,
            bias_local: None,
            token_type_ids: batch.token_type_ids.clone(),
            split_bias: Vec::new(),
        })
    }

    fn embed_with(&self, batch: &Batch, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let words = emit(hooks, Tap::Embed, layers::embedding(&self.word, &batch.input_ids)?)?;
        let pos = self
            .position
            .narrow(0, 0, ctx.seq_len)?
            .unsqueeze(0)?
            .broadcast_as(words.shape())?;
        let pos = emit(hooks, Tap::PosEmbed, pos)?;
        let types = match &ctx.token_type_ids {
            Some(t) => layers::embedding(&self.token_type, t)?,
            None => self
                .token_type
                .narrow(0, 0, 1)?
                .unsqueeze(0)?
                .broadcast_as(words.shape())?,
        };
        let types = emit(hooks, Tap::TokenTypeEmbed, types)?;
        let sum = ((words + pos)? + types)?;
        Ok(self.ln_emb.forward(&sum)?)
    }

    fn block(&self, layer: usize, h: &Tensor, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let b = &self.blocks[layer];
        let tap = |t: BlockTap| Tap::Block(layer, t);
        // States from outside (lens outputs, f32) enter in the compute dtype.
        let h = emit(hooks, tap(BlockTap::ResidPre), layers::to_dtype(h, self.word.dtype())?)?;
        let attn_out = run_sub(hooks, layer, SubModule::Attn, &h, |x, hooks| {
            self.attention(layer, b, x, ctx, hooks)
        })?;
        let attn_out = emit(hooks, tap(BlockTap::AttnOut), attn_out)?;
        let sum = emit(hooks, tap(BlockTap::Ln1In), (h + attn_out)?)?;
        let mid = run_sub(hooks, layer, SubModule::Ln1, &sum, |x, _| Ok(b.ln1.forward(x)?))?;
        let mid = emit(hooks, tap(BlockTap::Ln1Normalized), mid)?;
        let mlp_out = run_sub(hooks, layer, SubModule::Mlp, &mid, |x, hooks| {
            plain_mlp(layer, &b.ff_in, self.act, &b.ff_out, x, hooks)
        })?;
        let mlp_out = emit(hooks, tap(BlockTap::MlpOut), mlp_out)?;
        let sum = emit(hooks, tap(BlockTap::Ln2In), (mid + mlp_out)?)?;
        let out = run_sub(hooks, layer, SubModule::Ln2, &sum, |x, _| Ok(b.ln2.forward(x)?))?;
        let out = emit(hooks, tap(BlockTap::Ln2Normalized), out)?;
        emit(hooks, tap(BlockTap::ResidPost), out)
    }

    fn final_norm_with(&self, h: &Tensor, _hooks: &mut dyn Hooks) -> Result<Tensor> {
        Ok(h.clone())
    }

    fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        Ok(h.clone())
    }

    fn unembed(&self, h: &Tensor) -> Result<Tensor> {
        let head = self.head.as_ref().ok_or_else(|| {
            anyhow::anyhow!("this BERT checkpoint has no masked-LM head (a plain BertModel): it has no logits")
        })?;
        let t = self.act.forward(&head.dense.forward(h)?)?;
        // Logits leave the model in f32 (scored in f32 everywhere).
        Ok(layers::f32(head.decoder.forward(&head.ln.forward(&t)?)?)?)
    }

    fn sub_modules(&self) -> &'static [SubModule] {
        &[SubModule::Attn, SubModule::Ln1, SubModule::Mlp, SubModule::Ln2]
    }
}
