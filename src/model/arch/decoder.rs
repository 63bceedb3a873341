//! The one Llama-like decoder: every causal RoPE model (Llama, Mistral, Qwen2, Gemma 3, and the
//! GPT-NeoX family through `parallel_residual`) is this struct, configured by a [`DecoderSpec`]
//! that its family file builds from a typed config.
//!
//! h_0 = s E[ids] (s = `embed_scale`, 1 when absent); each block (sequential):
//!   n = N_1(h);  a = W_o attn(rope(N_q W_q n), rope(N_k W_k n), W_v n);  h += [N_attn_post](a)
//!   m = N_2(h);  f = W_down(act(W_gate m) * W_up m);                     h += [N_mlp_post](f)
//! or (parallel, GPT-NeoX): h += attn(N_1(h)) + mlp(N_2(h)), both read the block input.
//! logits = cap(W_U N_f(h_L)). attn = softmax(cap(q k^T * scale) + mask) v with grouped key/value
//! heads; sliding-window layers see only the last `sliding_window` keys and may use their own
//! RoPE base. `cap` is the optional `tanh(x / c) * c` soft-cap.
//!
//! Tensors are loaded under the names in [`TensorNames`] (the Hugging Face Llama names unless a
//! family overrides them), so `load` mirrors the checkpoint.
//!
//! Split across devices ([`Placement`], from the weights): each block's tensors live on its
//! device, the embedding on the first and the final norm and head on the last; a block moves an
//! incoming state onto its device (once per boundary), and the RoPE tables and the batch's masks
//! exist once per device.

use std::cell::RefCell;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::model::batch::AttentionMask;
use crate::model::block::{attend, fused_attention_mask, gated_mlp, plain_mlp, Part, PreNormBlock};
use crate::model::fused;
use crate::model::hooks::{emit, Tap};
use crate::model::layers::{self, Activation, LayerNorm, Linear, Norm, RmsNorm, Rope, RopeScaling};
use crate::model::placement::{self, Placement};
use crate::model::weights::Weights;
use crate::model::{AttentionKind, Batch, BatchContext, Hooks, ModelInfo, SubModule, Transformer};

/// Which norm the blocks use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// RMSNorm; `plus_one`: the checkpoint stores w and the scale is `1 + w` (Gemma).
    Rms { eps: f64, plus_one: bool },
    /// LayerNorm with weight and bias (GPT-NeoX).
    Layer { eps: f64 },
}

/// Norms on queries and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One norm over `head_dim`, shared by all heads, before RoPE (Gemma 3, Qwen3).
    PerHead,
    /// One norm over the whole projection (all heads at once), before RoPE (OLMo 2).
    Whole,
}

/// The MLP's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// `down(act(gate x) * up x)` (Llama, Gemma).
    Gated,
    /// `down(act(up x))` (GPT-NeoX).
    Plain,
    /// Sparse mixture of gated experts (Mixtral): a router picks `top_k` of `n_experts` per token
    /// and weights their outputs by the softmax over the picked router logits.
    Moe { n_experts: usize, top_k: usize },
}

/// RoPE base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Phi-3's LongRoPE: a second table used when the (padded) batch is longer than
/// `original_max_positions`, as transformers picks it from the largest position id.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeLong {
    pub scaling: RopeScaling,
    pub original_max_positions: usize,
}

/// Checkpoint tensor names: `{layer}` in a block name is `layer_prefix` with the block index.
#[derive(Debug, Clone)]
pub struct TensorNames {
    pub embed: String,
    pub layer_prefix: String,
    pub ln1: String,
    pub q: String,
    pub k: String,
    pub v: String,
    pub o: String,
    pub q_norm: String,
    pub k_norm: String,
    pub post_attn_norm: String,
    pub ln2: String,
    /// MoE: the router (`{expert}` names below use `experts` with the expert index).
    pub router: String,
    pub experts: String,
    pub gate: String,
    pub up: String,
    pub down: String,
    pub post_mlp_norm: String,
    pub final_norm: String,
    pub lm_head: String,
}

impl Default for TensorNames {
    /// The Hugging Face Llama names.
    fn default() -> Self {
        let s = |x: &str| x.to_string();
        Self {
            embed: s("model.embed_tokens"),
            layer_prefix: s("model.layers"),
            ln1: s("input_layernorm"),
            q: s("self_attn.q_proj"),
            k: s("self_attn.k_proj"),
            v: s("self_attn.v_proj"),
            o: s("self_attn.o_proj"),
            q_norm: s("self_attn.q_norm"),
            k_norm: s("self_attn.k_norm"),
            post_attn_norm: s("post_attention_layernorm"),
            ln2: s("post_attention_layernorm"),
            router: s("block_sparse_moe.gate"),
            experts: s("block_sparse_moe.experts"),
            gate: s("mlp.gate_proj"),
            up: s("mlp.up_proj"),
            down: s("mlp.down_proj"),
            post_mlp_norm: s("post_feedforward_layernorm"),
            final_norm: s("model.norm"),
            lm_head: s("lm_head"),
        }
    }
}

/// Everything that distinguishes one Llama-like decoder from another.
#[derive(Debug, Clone)]
pub struct DecoderSpec {
    /// Architecture family reported in [`ModelInfo::arch`].
    pub arch: String,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    /// Longest sequence the model supports (`max_position_embeddings`).
    pub max_positions: usize,
    /// Rows of the RoPE tables built (<= max_positions; longer inputs are refused).
    pub rope_table_len: usize,
    pub norm: NormKind,
    /// Norms before attention and MLP (false: OLMo 2, whose only block norms are post-norms).
    pub pre_norms: bool,
    pub qk_norm: QkNorm,
    /// Gemma's norms on the attention and MLP outputs before the residual add.
    pub post_norms: bool,
    /// h_0 = embed_scale * E[ids] (Gemma: sqrt(d) rounded to f32).
    pub embed_scale: Option<f64>,
    /// Multiplier of q k^T (1/sqrt(head_dim), or Gemma's query_pre_attn_scalar^-1/2).
    pub attn_scale: f64,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub mlp: MlpKind,
    pub activation: Activation,
    /// Both sub-layers read the block input (GPT-NeoX `use_parallel_residual`).
    pub parallel_residual: bool,
    /// Window of the sliding-window layers.
    pub sliding_window: Option<usize>,
    /// Per layer: does it use the sliding window? (len = n_layers)
    pub sliding_layers: Vec<bool>,
    pub rope: RopeSpec,
    /// Leading dims of each head that RoPE rotates (`partial_rotary_factor * head_dim`; the rest
    /// pass through). Equal to `head_dim` for full rotary.
    pub rotary_dim: usize,
    /// Phi-3 LongRoPE's long-context table.
    pub rope_long: Option<RopeLong>,
    /// RoPE of the sliding-window layers when it differs (Gemma 3's local base).
    pub rope_local: Option<RopeSpec>,
    pub names: TensorNames,
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    sliding: bool,
}

struct Mlp {
    /// None for a plain (ungated) MLP.
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn n_params(&self) -> usize {
        self.gate.as_ref().map_or(0, |g| g.n_params()) + self.up.n_params() + self.down.n_params()
    }
}

/// The MLP sub-layer: one dense MLP, or a router and its experts.
enum FeedForward {
    Dense(Mlp),
    Moe {
        router: Linear,
        experts: Vec<Mlp>,
        top_k: usize,
    },
}

struct Block {
    ln1: Option<Norm>,
    attn: Attention,
    post_attn_norm: Option<Norm>,
    ln2: Option<Norm>,
    mlp: FeedForward,
    post_mlp_norm: Option<Norm>,
}

impl Block {
    /// Parameters of this block as loaded (for FLOP estimates).
    fn n_params(&self) -> usize {
        let a = &self.attn;
        let opt_norm = |n: &Option<Norm>| n.as_ref().map_or(0, |n| n.n_params());
        opt_norm(&self.ln1)
            + a.q.n_params()
            + a.k.n_params()
            + a.v.n_params()
            + a.o.n_params()
            + opt_norm(&a.q_norm)
            + opt_norm(&a.k_norm)
            + opt_norm(&self.post_attn_norm)
            + opt_norm(&self.ln2)
            + match &self.mlp {
                FeedForward::Dense(m) => m.n_params(),
                FeedForward::Moe { router, experts, .. } => {
                    router.n_params() + experts.iter().map(Mlp::n_params).sum::<usize>()
                }
            }
            + opt_norm(&self.post_mlp_norm)
    }
}

/// The RoPE tables of one device.
struct RopeTables {
    rope: Rope,
    rope_local: Option<Rope>,
    /// LongRoPE's long table and the length above which it is used.
    rope_long: Option<(Rope, usize)>,
}

pub struct Decoder {
    info: ModelInfo,
    device: Device,
    embed_tokens: Tensor,
    embed_scale: Option<f64>,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    /// The RoPE tables, one set per device of the placement (one set when unsplit).
    ropes: Vec<RopeTables>,
    placement: Option<Placement>,
    head_dim: usize,
    rotary_dim: usize,
    attn_scale: f64,
    attn_softcap: Option<f64>,
    final_softcap: Option<f64>,
    sliding_window: Option<usize>,
    activation: Activation,
    parallel_residual: bool,
    qk_norm: QkNorm,
    sub_modules: &'static [SubModule],
}

impl Decoder {
    /// Builds the decoder `spec` describes from the checkpoint's tensors.
    pub fn load(spec: &DecoderSpec, w: &Weights, device: &Device) -> Result<Self> {
        let s = spec;
        let (d, hd) = (s.d_model, s.head_dim);
        if s.sliding_layers.len() != s.n_layers {
            bail!(
                "{}: {} layer types for {} layers",
                w.source().display(),
                s.sliding_layers.len(),
                s.n_layers
            );
        }
        let placement = w.placement().cloned();
        // Where the tensors being read go: the block's device while its block is built, the last
        // device for the final norm and the head (the loader already put them there by name;
        // this makes it hold whatever a checkpoint calls its tensors).
        let target = RefCell::new(device.clone());
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = w.get(name, shape)?;
            Ok(placement::move_to(&t, &target.borrow())?)
        };
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = get(&format!("{name}.weight"), &[out, inp])?;
            let bias = if bias {
                Some(get(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Linear::new(weight, bias))
        };
        let norm = |name: &str, dim: usize| -> Result<Norm> {
            Ok(match s.norm {
                NormKind::Rms { eps, plus_one } => {
                    let weight = get(&format!("{name}.weight"), &[dim])?;
                    // Gemma stores w and multiplies by (1 + w) in f32; fold the 1 in once here.
                    let scale = if plus_one {
                        (layers::f32(weight)? + 1.0)?
                    } else {
                        weight
                    };
                    Norm::Rms(RmsNorm {
                        scale,
                        eps,
                        dtype: w.dtype(),
                    })
                }
                NormKind::Layer { eps } => Norm::Layer(LayerNorm {
                    weight: get(&format!("{name}.weight"), &[dim])?,
                    bias: get(&format!("{name}.bias"), &[dim])?,
                    eps,
                }),
            })
        };
        let n = &s.names;
        let embed_tokens = w.get(&format!("{}.weight", n.embed), &[s.vocab_size, d])?;
        // No capacity from the config's layer count: it is untrusted (a config with 2^60 layers
        // made this allocate 481 GB; found by tests/fuzz_readers.rs); a missing block's weights
        // end the load with an error instead.
        let mut blocks = Vec::new();
        if let Some(pl) = &placement {
            if pl.ranges.last().map(|r| r.1) != Some(s.n_layers) {
                bail!(
                    "{}: the checkpoint's tensors name {} blocks but the config has {}",
                    w.source().display(),
                    pl.ranges.last().map_or(0, |r| r.1),
                    s.n_layers
                );
            }
        }
        for (l, &sliding) in s.sliding_layers.iter().enumerate() {
            if let Some(pl) = &placement {
                *target.borrow_mut() = pl.block_device(l).clone();
            }
            let p = format!("{}.{l}", n.layer_prefix);
            let qk_norm = |name: &str, heads: usize| -> Result<Option<Norm>> {
                match s.qk_norm {
                    QkNorm::None => Ok(None),
                    QkNorm::PerHead => Ok(Some(norm(&format!("{p}.{name}"), hd)?)),
                    QkNorm::Whole => Ok(Some(norm(&format!("{p}.{name}"), heads * hd)?)),
                }
            };
            let pre_norm = |name: &str| -> Result<Option<Norm>> {
                if s.pre_norms {
                    Ok(Some(norm(&format!("{p}.{name}"), d)?))
                } else {
                    Ok(None)
                }
            };
            let gated = |gate: &str, up: &str, down: &str| -> Result<Mlp> {
                Ok(Mlp {
                    gate: Some(linear(gate, s.d_ff, d, s.mlp_bias)?),
                    up: linear(up, s.d_ff, d, s.mlp_bias)?,
                    down: linear(down, d, s.d_ff, s.mlp_bias)?,
                })
            };
            let mlp = match s.mlp {
                MlpKind::Gated => FeedForward::Dense(gated(
                    &format!("{p}.{}", n.gate),
                    &format!("{p}.{}", n.up),
                    &format!("{p}.{}", n.down),
                )?),
                MlpKind::Plain => FeedForward::Dense(Mlp {
                    gate: None,
                    up: linear(&format!("{p}.{}", n.up), s.d_ff, d, s.mlp_bias)?,
                    down: linear(&format!("{p}.{}", n.down), d, s.d_ff, s.mlp_bias)?,
                }),
                MlpKind::Moe { n_experts, top_k } => {
                    if top_k == 0 || top_k > n_experts {
                        bail!("{}: {top_k} experts per token of {n_experts}", w.source().display());
                    }
                    // Mixtral's names: w1 = gate, w3 = up, w2 = down.
                    let experts = (0..n_experts)
                        .map(|e| {
                            let x = format!("{p}.{}.{e}", n.experts);
                            gated(&format!("{x}.w1"), &format!("{x}.w3"), &format!("{x}.w2"))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    FeedForward::Moe {
                        router: linear(&format!("{p}.{}", n.router), n_experts, d, false)?,
                        experts,
                        top_k,
                    }
                }
            };
            let post_norm = |name: &str| -> Result<Option<Norm>> {
                if s.post_norms {
                    Ok(Some(norm(&format!("{p}.{name}"), d)?))
                } else {
                    Ok(None)
                }
            };
            blocks.push(Block {
                ln1: pre_norm(&n.ln1)?,
                attn: Attention {
                    q: linear(&format!("{p}.{}", n.q), s.n_heads * hd, d, s.qkv_bias)?,
                    k: linear(&format!("{p}.{}", n.k), s.n_kv_heads * hd, d, s.qkv_bias)?,
                    v: linear(&format!("{p}.{}", n.v), s.n_kv_heads * hd, d, s.qkv_bias)?,
                    o: linear(&format!("{p}.{}", n.o), d, s.n_heads * hd, s.o_bias)?,
                    q_norm: qk_norm(&n.q_norm, s.n_heads)?,
                    k_norm: qk_norm(&n.k_norm, s.n_kv_heads)?,
                    sliding: sliding && s.sliding_window.is_some(),
                },
                post_attn_norm: post_norm(&n.post_attn_norm)?,
                ln2: pre_norm(&n.ln2)?,
                mlp,
                post_mlp_norm: post_norm(&n.post_mlp_norm)?,
            });
        }
        let head_device = placement.as_ref().map_or(device, |p| p.last()).clone();
        *target.borrow_mut() = head_device.clone();
        // Untied checkpoints store the head; tied ones reuse the input embedding (a copy of it on
        // the last device when split).
        let lm_head = match w.get_opt(&format!("{}.weight", n.lm_head), &[s.vocab_size, d])? {
            Some(t) => placement::move_to(&t, &head_device)?,
            None => placement::move_to(&embed_tokens, &head_device)?,
        };
        let final_norm = norm(&n.final_norm, d)?;
        let rd = s.rotary_dim;
        if rd == 0 || rd > hd || !rd.is_multiple_of(2) {
            bail!("{}: rotary dimension {rd} for heads of {hd}", w.source().display());
        }
        let tables = |device: &Device| -> Result<RopeTables> {
            Ok(RopeTables {
                rope: Rope::new(rd, s.rope.theta, &s.rope.scaling, s.rope_table_len, device)?,
                rope_local: match &s.rope_local {
                    Some(r) => Some(Rope::new(rd, r.theta, &r.scaling, s.rope_table_len, device)?),
                    None => None,
                },
                rope_long: match &s.rope_long {
                    Some(r) => Some((
                        Rope::new(rd, s.rope.theta, &r.scaling, s.rope_table_len, device)?,
                        r.original_max_positions,
                    )),
                    None => None,
                },
            })
        };
        let ropes = match &placement {
            Some(p) => p.devices.iter().map(tables).collect::<Result<Vec<_>>>()?,
            None => vec![tables(device)?],
        };
        let info = ModelInfo {
            arch: s.arch.clone(),
            n_layers: s.n_layers,
            d_model: d,
            n_heads: s.n_heads,
            n_kv_heads: s.n_kv_heads,
            vocab_size: s.vocab_size,
            attention: AttentionKind::Causal,
            has_lm_head: true,
            max_positions: s.max_positions,
            n_params: w.n_params(),
            block_params: blocks.iter().map(Block::n_params).sum(),
            dtype: crate::model::dtype::label(w.dtype()).into(),
        };
        Ok(Self {
            info,
            device: device.clone(),
            embed_tokens,
            embed_scale: s.embed_scale,
            blocks,
            norm: final_norm,
            lm_head: Linear::new(lm_head, None),
            ropes,
            placement,
            head_dim: hd,
            rotary_dim: rd,
            attn_scale: s.attn_scale,
            attn_softcap: s.attn_softcap,
            final_softcap: s.final_softcap,
            sliding_window: s.sliding_window,
            activation: s.activation,
            parallel_residual: s.parallel_residual,
            qk_norm: s.qk_norm,
            sub_modules: if !s.pre_norms {
                &[SubModule::Attn, SubModule::Ln1Post, SubModule::Mlp, SubModule::Ln2Post]
            } else if s.post_norms {
                &[
                    SubModule::Ln1,
                    SubModule::Attn,
                    SubModule::Ln1Post,
                    SubModule::Ln2,
                    SubModule::Mlp,
                    SubModule::Ln2Post,
                ]
            } else {
                &[SubModule::Ln1, SubModule::Attn, SubModule::Ln2, SubModule::Mlp]
            },
        })
    }

    fn attention(
        &self,
        layer: usize,
        a: &Attention,
        x: &Tensor,
        ctx: &BatchContext,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let (h, h_kv, hd) = (self.info.n_heads, self.info.n_kv_heads, self.head_dim);
        let on = self.placement.as_ref().map_or(0, |p| p.device_index(layer));
        let tables = &self.ropes[on];
        let rope = match (&tables.rope_local, a.sliding, &tables.rope_long) {
            (Some(local), true, _) => local,
            (_, _, Some((long, original))) if ctx.seq_len > *original => long,
            _ => &tables.rope,
        };
        let whole = matches!(self.qk_norm, QkNorm::Whole);
        let (b, t, _) = x.dims3()?;
        // Projection, q/k norm (over the whole projection or per head) and heads [B, T, n, hd].
        let heads = |proj: &Linear, n: usize, norm: &Option<Norm>| -> candle_core::Result<Tensor> {
            let mut y = proj.forward(x)?;
            if let (true, Some(norm)) = (whole, norm) {
                y = norm.forward(&y)?;
            }
            let y = y.reshape((b, t, n, hd))?;
            match (whole, norm) {
                (false, Some(norm)) => norm.forward(&y),
                _ => Ok(y),
            }
        };
        // RoPE on [B, T, n, hd] (`thd`) or [B, n, T, hd]; partial rotary turns only the leading
        // `rotary_dim` dims of each head.
        let rotate = |y: &Tensor, thd: bool| -> candle_core::Result<Tensor> {
            let turn = |z: &Tensor| if thd { rope.apply_thd(z) } else { rope.apply(z) };
            if self.rotary_dim == hd {
                return turn(y);
            }
            let turned = turn(&y.narrow(3, 0, self.rotary_dim)?)?;
            Tensor::cat(&[&turned, &y.narrow(3, self.rotary_dim, hd - self.rotary_dim)?], 3)
        };
        let bias = ctx.bias_on(on, a.sliding);
        // On a GPU, unless a hook wants the probabilities: the fused kernel on the projections'
        // own [B, T, heads, hd] layout (no head transposes, no [B, H, T, T] scores in memory).
        if let Some(spec) = fused_attention_mask(layer, x, hd, bias, hooks) {
            let q = rotate(&heads(&a.q, h, &a.q_norm)?, true)?;
            let k = rotate(&heads(&a.k, h_kv, &a.k_norm)?, true)?;
            let v = a.v.forward(x)?.reshape((b, t, h_kv, hd))?;
            if let Some(out) = fused::flash_attention(&q, &k, &v, spec, self.attn_scale, self.attn_softcap)? {
                return Ok(a.o.forward(&out.reshape((b, t, h * hd))?)?);
            }
        }
        let to_bhtd = |y: Tensor| y.transpose(1, 2)?.contiguous();
        let q = rotate(&to_bhtd(heads(&a.q, h, &a.q_norm)?)?, false)?;
        let k = rotate(&to_bhtd(heads(&a.k, h_kv, &a.k_norm)?)?, false)?;
        let v = layers::split_heads(&a.v.forward(x)?, h_kv, hd)?;
        let out = attend(layer, &q, &k, &v, bias, self.attn_scale, self.attn_softcap, hooks)?;
        Ok(a.o.forward(&out)?)
    }

    fn mlp(&self, layer: usize, f: &FeedForward, x: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        match f {
            FeedForward::Dense(m) => match &m.gate {
                Some(gate) => gated_mlp(layer, gate, &m.up, self.activation, &m.down, x, hooks),
                None => plain_mlp(layer, &m.up, self.activation, &m.down, x, hooks),
            },
            FeedForward::Moe { router, experts, top_k } => self.moe(router, experts, *top_k, x),
        }
    }

    /// Sparse MoE as transformers' Mixtral computes it: per token, softmax over the router logits,
    /// keep the `top_k` largest, renormalise them (= softmax over the kept logits), and sum the
    /// kept experts' gated-MLP outputs with those weights. Every expert runs on every token and
    /// unpicked ones get weight 0 (simple and exact; costs n_experts / top_k times the MLP FLOPs).
    /// No `mlp.hook_post`: there is no single MLP activation.
    fn moe(&self, router: &Linear, experts: &[Mlp], top_k: usize, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let n = experts.len();
        let logits = router.forward(x)?.reshape((b * t, n))?.to_vec2::<f32>()?;
        let mut weights = vec![0f32; b * t * n];
        for (row, token) in logits.iter().enumerate() {
            let mut order: Vec<usize> = (0..n).collect();
            // Largest first; ties to the lower index, as torch.topk on CPU.
            order.sort_by(|&i, &j| token[j].total_cmp(&token[i]).then(i.cmp(&j)));
            let kept = &order[..top_k];
            let max = token[kept[0]];
            let sum: f32 = kept.iter().map(|&e| (token[e] - max).exp()).sum();
            for &e in kept {
                weights[row * n + e] = (token[e] - max).exp() / sum;
            }
        }
        let weights = Tensor::from_vec(weights, (b, t, n), x.device())?;
        let mut out = Tensor::zeros((b, t, d), x.dtype(), x.device())?;
        for (e, m) in experts.iter().enumerate() {
            let gate = m.gate.as_ref().expect("experts are gated");
            let y = m
                .down
                .forward(&(self.activation.forward(&gate.forward(x)?)? * m.up.forward(x)?)?)?;
            out = (out + y.broadcast_mul(&weights.narrow(2, e, 1)?)?)?;
        }
        Ok(out)
    }
}

impl Transformer for Decoder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn block_device(&self, layer: usize) -> &Device {
        self.placement.as_ref().map_or(&self.device, |p| p.block_device(layer))
    }

    fn head_device(&self) -> &Device {
        self.placement.as_ref().map_or(&self.device, |p| p.last())
    }

    fn placement(&self) -> Option<&Placement> {
        self.placement.as_ref()
    }

    fn context(&self, batch: &Batch) -> Result<BatchContext> {
        let supported = self.ropes[0].rope.cos.dim(0)?;
        if batch.seq_len() > supported {
            bail!(
                "sequence of {} tokens exceeds the supported context of {supported}",
                batch.seq_len()
            );
        }
        let masks = |device: &Device| -> Result<(AttentionMask, Option<AttentionMask>)> {
            let bias = batch.attention_mask(AttentionKind::Causal, None, device)?;
            let bias_local = match self.sliding_window {
                Some(w) if w < batch.seq_len() => Some(batch.attention_mask(AttentionKind::Causal, Some(w), device)?),
                _ => None,
            };
            Ok((bias, bias_local))
        };
        let (bias, bias_local) = masks(&self.device)?;
        let split_bias = match &self.placement {
            Some(p) => p.devices[1..].iter().map(masks).collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        Ok(BatchContext {
            seq_len: batch.seq_len(),
            bias,
            bias_local,
            token_type_ids: None,
            split_bias,
        })
    }

    fn embed_with(&self, batch: &Batch, _ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let e = layers::embedding(&self.embed_tokens, &batch.input_ids)?;
        let e = match self.embed_scale {
            Some(s) => (e * s)?,
            None => e,
        };
        emit(hooks, Tap::Embed, e)
    }

    fn block(&self, layer: usize, h: &Tensor, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor> {
        // States from outside (lens outputs, f32) enter in the compute dtype, and states from
        // another device (the previous block's, at a boundary of a split) move onto this one.
        let h = &placement::move_to(h, self.block_device(layer))?;
        let h = &layers::to_dtype(h, self.embed_tokens.dtype())?;
        let b = &self.blocks[layer];
        let post_attn = |x: &Tensor| match &b.post_attn_norm {
            Some(n) => n.forward(x),
            None => Ok(x.clone()),
        };
        let post_mlp = |x: &Tensor| match &b.post_mlp_norm {
            Some(n) => n.forward(x),
            None => Ok(x.clone()),
        };
        PreNormBlock {
            ln1: &|x| match &b.ln1 {
                Some(n) => n.forward(x),
                None => Ok(x.clone()),
            },
            attn: &|x, hooks| self.attention(layer, &b.attn, x, ctx, hooks),
            ln1_post: b.post_attn_norm.as_ref().map(|_| &post_attn as Part),
            ln2: &|x| match &b.ln2 {
                Some(n) => n.forward(x),
                None => Ok(x.clone()),
            },
            mlp: &|x, hooks| self.mlp(layer, &b.mlp, x, hooks),
            ln2_post: b.post_mlp_norm.as_ref().map(|_| &post_mlp as Part),
            parallel: self.parallel_residual,
        }
        .forward(layer, h, hooks)
    }

    fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(&placement::move_to(h, self.head_device())?)?)
    }

    fn unembed(&self, h: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(&placement::move_to(h, self.head_device())?)?;
        // Logits leave the model in f32 (scored in f32 everywhere).
        Ok(layers::f32(layers::softcap(&logits, self.final_softcap)?)?)
    }

    fn unembed_native(&self, h: &Tensor) -> Result<Tensor> {
        // With a soft-cap the gradient takes the cap's derivative in f32: that path keeps f32 logits.
        match self.final_softcap {
            Some(_) => self.unembed(h),
            None => Ok(self.lm_head.forward(&placement::move_to(h, self.head_device())?)?),
        }
    }

    fn unembed_vjp(&self, u: &Tensor, g: &Tensor) -> Result<Tensor> {
        // logits = cap(u W^T): d u = (g * cap'(u W^T)) W, with cap(x) = c tanh(x / c). Without a
        // cap, g goes to W's dtype directly (one rounding, none if it is already there).
        let w = &self.lm_head.weight;
        let g = match self.final_softcap {
            Some(c) => {
                let g = layers::f32(g.clone())?;
                let raw = layers::f32(self.lm_head.forward(&u.detach())?)?;
                let t = (raw / c)?.tanh()?;
                (g * t.sqr()?.affine(-1.0, 1.0)?)?
            }
            None => g.clone(),
        };
        let g = layers::to_dtype(&g, w.dtype())?;
        Ok(layers::f32(g.matmul(w)?)?)
    }

    fn sub_modules(&self) -> &'static [SubModule] {
        self.sub_modules
    }

    fn unembedding_matrix(&self) -> Option<&Tensor> {
        (self.final_softcap.is_none() && self.lm_head.bias.is_none()).then_some(&self.lm_head.weight)
    }
}
