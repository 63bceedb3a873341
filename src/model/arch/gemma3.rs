//! Gemma 3 (text): Llama-like, with four RMSNorms per block, q/k norms, a sqrt(d)-scaled
//! embedding, GELU-tanh gated MLP and interleaved sliding-window / global attention.
//!
//! h_0 = sqrt(d) E[ids]; each block: h += N_attn_post(W_o attn(rope(N_q W_q n), rope(N_k W_k n),
//! W_v n)) with n = N_1(h); h += N_mlp_post(W_down(gelu(W_gate m) * W_up m)) with m = N_2(h);
//! logits = E N_f(h_L). Every Gemma RMSNorm scales by (1 + w). Sliding layers see only the last
//! `sliding_window` keys and use their own RoPE base.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::model::block::PreNormBlock;
use crate::model::config::Config;
use crate::model::layers::{self, Linear, RmsNorm, Rope, RopeScaling};
use crate::model::weights::Weights;
use crate::model::{AttentionKind, Batch, BatchContext, Hooks, ModelInfo, SubModule, Transformer};

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    sliding: bool,
}

struct Block {
    ln1: RmsNorm,
    attn: Attention,
    ln1_post: RmsNorm,
    ln2: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    ln2_post: RmsNorm,
}

pub struct Gemma3 {
    info: ModelInfo,
    device: Device,
    embed_tokens: Tensor,
    embed_scale: f64,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope_global: Rope,
    rope_local: Rope,
    head_dim: usize,
    attn_scale: f64,
    sliding_window: usize,
    attn_softcap: Option<f64>,
    final_softcap: Option<f64>,
    act: String,
}

impl Gemma3 {
    pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Self> {
        let d = cfg.usize("hidden_size")?;
        let n_layers = cfg.usize("num_hidden_layers")?;
        let n_heads = cfg.usize("num_attention_heads")?;
        let n_kv = cfg.usize_or("num_key_value_heads", n_heads)?;
        let head_dim = cfg.usize_or("head_dim", 256)?;
        let ff = cfg.usize("intermediate_size")?;
        let vocab = cfg.usize("vocab_size")?;
        let eps = cfg.f64_or("rms_norm_eps", 1e-6)?;
        let max_pos = cfg.usize_or("max_position_embeddings", 32768)?;
        let sliding_window = cfg.usize_or("sliding_window", 512)?;
        let layer_types: Vec<bool> = match cfg.get("layer_types").and_then(|v| v.as_array()) {
            Some(types) => {
                if types.len() != n_layers {
                    bail!(
                        "{}: layer_types has {} entries for {n_layers} layers",
                        cfg.path.display(),
                        types.len()
                    );
                }
                types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect()
            }
            None => {
                let pattern = cfg.usize_or("sliding_window_pattern", 6)?;
                (0..n_layers).map(|l| (l + 1) % pattern != 0).collect()
            }
        };
        let (theta, scaling) = cfg.rope(Some("full_attention"), 1_000_000.0)?;
        let (local_theta, local_scaling) = if cfg.has("rope_parameters") {
            cfg.rope(Some("sliding_attention"), 10_000.0)?
        } else {
            (cfg.f64_or("rope_local_base_freq", 10_000.0)?, RopeScaling::None)
        };
        // The context we build tables for: long enough for any sentence, without allocating
        // Gemma's full 32k x 128 table twice when it is not needed.
        let table_len = max_pos.min(8192);

        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(w.get(&format!("{name}.weight"), &[out, inp])?, None))
        };
        // Gemma stores w and multiplies by (1 + w); fold the 1 in once here.
        let norm = |name: &str, dim: usize| -> Result<RmsNorm> {
            Ok(RmsNorm {
                scale: (w.get(&format!("{name}.weight"), &[dim])? + 1.0)?,
                eps,
            })
        };
        let embed_tokens = w.get("model.embed_tokens.weight", &[vocab, d])?;
        let mut blocks = Vec::with_capacity(n_layers);
        for (l, &sliding) in layer_types.iter().enumerate() {
            let p = format!("model.layers.{l}");
            blocks.push(Block {
                ln1: norm(&format!("{p}.input_layernorm"), d)?,
                attn: Attention {
                    q: linear(&format!("{p}.self_attn.q_proj"), n_heads * head_dim, d)?,
                    k: linear(&format!("{p}.self_attn.k_proj"), n_kv * head_dim, d)?,
                    v: linear(&format!("{p}.self_attn.v_proj"), n_kv * head_dim, d)?,
                    o: linear(&format!("{p}.self_attn.o_proj"), d, n_heads * head_dim)?,
                    q_norm: norm(&format!("{p}.self_attn.q_norm"), head_dim)?,
                    k_norm: norm(&format!("{p}.self_attn.k_norm"), head_dim)?,
                    sliding,
                },
                ln1_post: norm(&format!("{p}.post_attention_layernorm"), d)?,
                ln2: norm(&format!("{p}.pre_feedforward_layernorm"), d)?,
                gate: linear(&format!("{p}.mlp.gate_proj"), ff, d)?,
                up: linear(&format!("{p}.mlp.up_proj"), ff, d)?,
                down: linear(&format!("{p}.mlp.down_proj"), d, ff)?,
                ln2_post: norm(&format!("{p}.post_feedforward_layernorm"), d)?,
            });
        }
        let lm_head = match w.get_opt("lm_head.weight", &[vocab, d])? {
            Some(t) => t,
            None => embed_tokens.clone(),
        };
        let info = ModelInfo {
            arch: "gemma3".into(),
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
            // transformers keeps the scale as a tensor in the model dtype: round it to f32 too.
            embed_scale: (d as f64).sqrt() as f32 as f64,
            blocks,
            norm: norm("model.norm", d)?,
            lm_head,
            rope_global: Rope::new(head_dim, theta, &scaling, table_len, device)?,
            rope_local: Rope::new(head_dim, local_theta, &local_scaling, table_len, device)?,
            head_dim,
            attn_scale: cfg.f64_or("query_pre_attn_scalar", head_dim as f64)?.powf(-0.5),
            sliding_window,
            attn_softcap: cfg.opt_f64("attn_logit_softcapping")?,
            final_softcap: cfg.opt_f64("final_logit_softcapping")?,
            act: cfg.str_or("hidden_activation", "gelu_pytorch_tanh")?.to_string(),
        })
    }

    fn attention(&self, a: &Attention, x: &Tensor, ctx: &BatchContext) -> candle_core::Result<Tensor> {
        let (h, h_kv, hd) = (self.info.n_heads, self.info.n_kv_heads, self.head_dim);
        let rope = if a.sliding { &self.rope_local } else { &self.rope_global };
        let q = rope.apply(&a.q_norm.forward(&layers::split_heads(&a.q.forward(x)?, h, hd)?)?)?;
        let k = rope.apply(&a.k_norm.forward(&layers::split_heads(&a.k.forward(x)?, h_kv, hd)?)?)?;
        let v = layers::split_heads(&a.v.forward(x)?, h_kv, hd)?;
        let bias = match (&ctx.bias_local, a.sliding) {
            (Some(local), true) => local,
            _ => &ctx.bias,
        };
        let out = layers::attention(&q, &k, &v, bias, self.attn_scale, self.attn_softcap)?;
        a.o.forward(&out)
    }

    fn mlp(&self, b: &Block, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = layers::activation(&self.act, &b.gate.forward(x)?)?;
        b.down.forward(&(gate * b.up.forward(x)?)?)
    }
}

impl Transformer for Gemma3 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn context(&self, batch: &Batch) -> Result<BatchContext> {
        if batch.seq_len() > self.rope_global.cos.dim(0)? {
            bail!(
                "sequence of {} tokens exceeds the supported context of {}",
                batch.seq_len(),
                self.rope_global.cos.dim(0)?
            );
        }
        let bias = batch.attention_bias(AttentionKind::Causal, None, &self.device)?;
        let bias_local = if self.sliding_window < batch.seq_len() {
            Some(batch.attention_bias(AttentionKind::Causal, Some(self.sliding_window), &self.device)?)
        } else {
            None
        };
        Ok(BatchContext {
            seq_len: batch.seq_len(),
            bias,
            bias_local,
            token_type_ids: None,
        })
    }

    fn embed(&self, batch: &Batch, _ctx: &BatchContext) -> Result<Tensor> {
        Ok((layers::embedding(&self.embed_tokens, &batch.input_ids)? * self.embed_scale)?)
    }

    fn block(&self, layer: usize, h: &Tensor, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let b = &self.blocks[layer];
        PreNormBlock {
            ln1: &|x| b.ln1.forward(x),
            attn: &|x| self.attention(&b.attn, x, ctx),
            ln1_post: Some(&|x| b.ln1_post.forward(x)),
            ln2: &|x| b.ln2.forward(x),
            mlp: &|x| self.mlp(b, x),
            ln2_post: Some(&|x| b.ln2_post.forward(x)),
        }
        .forward(layer, h, hooks)
    }

    fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(h)?)
    }

    fn unembed(&self, h: &Tensor) -> Result<Tensor> {
        let logits = Linear::new(self.lm_head.clone(), None).forward(h)?;
        Ok(layers::softcap(&logits, self.final_softcap)?)
    }

    fn sub_modules(&self) -> &'static [SubModule] {
        &[
            SubModule::Ln1,
            SubModule::Attn,
            SubModule::Ln1Post,
            SubModule::Ln2,
            SubModule::Mlp,
            SubModule::Ln2Post,
        ]
    }
}
