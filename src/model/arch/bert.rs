//! BERT: `BertForMaskedLM` (with the MLM head) and plain `BertModel` (representations only).
//!
//! h_0 = LN_emb(W_word[ids] + W_pos[pos] + W_type[types]); each block is post-norm:
//! m = LN_1(h + W_O attn(h)), h' = LN_2(m + W_out gelu(W_in m)). Attention is bidirectional over
//! the sentence's real tokens. The MLM head reads a state s as
//! logits = W_word LN_t(gelu(W_t s)) + b, with W_word tied to the input embedding.
//!
//! TransformerLens naming for this post-norm order: `hook_resid_mid` is the sum before LN_1,
//! `ln1.hook_normalized` its normalised value, `hook_resid_post` the sum before LN_2, and the
//! block output h_{l+1} is `ln2.hook_normalized`.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::model::config::Config;
use crate::model::hooks::run_sub;
use crate::model::layers::{self, LayerNorm, Linear};
use crate::model::weights::Weights;
use crate::model::{AttentionKind, Batch, BatchContext, Hooks, ModelInfo, SubModule, Tap, Transformer};

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
    act: String,
}

impl Bert {
    pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Self> {
        let d = cfg.usize("hidden_size")?;
        let n_layers = cfg.usize("num_hidden_layers")?;
        let n_heads = cfg.usize("num_attention_heads")?;
        let ff = cfg.usize("intermediate_size")?;
        let vocab = cfg.usize("vocab_size")?;
        let n_pos = cfg.usize_or("max_position_embeddings", 512)?;
        let n_types = cfg.usize_or("type_vocab_size", 2)?;
        let eps = cfg.f64_or("layer_norm_eps", 1e-12)?;
        if cfg.str_or("position_embedding_type", "absolute")? != "absolute" {
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
        let mut blocks = Vec::with_capacity(n_layers);
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
            block_params: w.block_params(),
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
            act: cfg.str_or("hidden_act", "gelu")?.to_string(),
        })
    }

    fn attention(&self, b: &Block, x: &Tensor, ctx: &BatchContext) -> candle_core::Result<Tensor> {
        let (h, hd) = (self.info.n_heads, self.head_dim);
        let q = layers::split_heads(&b.q.forward(x)?, h, hd)?;
        let k = layers::split_heads(&b.k.forward(x)?, h, hd)?;
        let v = layers::split_heads(&b.v.forward(x)?, h, hd)?;
        b.o.forward(&layers::attention(
            &q,
            &k,
            &v,
            &ctx.bias,
            1.0 / (hd as f64).sqrt(),
            None,
        )?)
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
        let bias = batch.attention_bias(AttentionKind::Bidirectional, None, &self.device)?;
        Ok(BatchContext {
            seq_len: batch.seq_len(),
            bias,
            bias_local: None,
            token_type_ids: batch.token_type_ids.clone(),
        })
    }

    fn embed(&self, batch: &Batch, ctx: &BatchContext) -> Result<Tensor> {
        let words = layers::embedding(&self.word, &batch.input_ids)?;
        let pos = self.position.narrow(0, 0, ctx.seq_len)?;
        let types = match &ctx.token_type_ids {
            Some(t) => layers::embedding(&self.token_type, t)?,
            None => self
                .token_type
                .narrow(0, 0, 1)?
                .unsqueeze(0)?
                .broadcast_as(words.shape())?,
        };
        let sum = (words.broadcast_add(&pos)? + types)?;
        Ok(self.ln_emb.forward(&sum)?)
    }

    fn block(&self, layer: usize, h: &Tensor, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let b = &self.blocks[layer];
        hooks.tap(layer, Tap::ResidPre, h)?;
        let attn_out = run_sub(hooks, layer, SubModule::Attn, h, |x| self.attention(b, x, ctx))?;
        hooks.tap(layer, Tap::AttnOut, &attn_out)?;
        let mid = (h + attn_out)?;
        hooks.tap(layer, Tap::ResidMid, &mid)?;
        let normed = run_sub(hooks, layer, SubModule::Ln1, &mid, |x| b.ln1.forward(x))?;
        hooks.tap(layer, Tap::Ln1Normalized, &normed)?;
        let mlp_out = run_sub(hooks, layer, SubModule::Mlp, &normed, |x| {
            b.ff_out.forward(&layers::activation(&self.act, &b.ff_in.forward(x)?)?)
        })?;
        hooks.tap(layer, Tap::MlpOut, &mlp_out)?;
        let post = (normed + mlp_out)?;
        hooks.tap(layer, Tap::ResidPost, &post)?;
        let out = run_sub(hooks, layer, SubModule::Ln2, &post, |x| b.ln2.forward(x))?;
        hooks.tap(layer, Tap::Ln2Normalized, &out)?;
        Ok(out)
    }

    fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        Ok(h.clone())
    }

    fn unembed(&self, h: &Tensor) -> Result<Tensor> {
        let head = self.head.as_ref().ok_or_else(|| {
            anyhow::anyhow!("this BERT checkpoint has no masked-LM head (a plain BertModel): it has no logits")
        })?;
        let t = layers::activation(&self.act, &head.dense.forward(h)?)?;
        Ok(head.decoder.forward(&head.ln.forward(&t)?)?)
    }

    fn sub_modules(&self) -> &'static [SubModule] {
        &[SubModule::Attn, SubModule::Ln1, SubModule::Mlp, SubModule::Ln2]
    }
}
