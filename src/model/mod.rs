//! The hooked transformer runtime: one trait, [`Transformer`], that every experiment drives.
//!
//! A model is split into the pieces the paper reasons about: the embedding (h_0), the blocks
//! (h_l = block_{l-1}(h_{l-1}), 0-based block index as in TransformerLens), the final norm and the
//! unembedding. Blocks expose their sub-modules through [`Hooks`]: every tap is reported by its
//! TransformerLens name, and any sub-module can be replaced by a caller-supplied function (for
//! instance a fitted linear map).
//!
//! Padding is always on the right, so position ids are `0..T` for every row; attention masks keep
//! padded keys out of every real token's attention.

pub mod bert;
pub mod config;
pub mod gemma3;
pub mod gguf_tokenizer;
pub mod gpt2;
pub mod llama;
pub mod load;
pub mod ops;
pub mod tokenizer;
pub mod weights;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

pub use load::{load_model, LoadedModel};
pub use tokenizer::Tokenizer;

/// How tokens may attend to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// Each token sees itself and the tokens before it (GPT-2, Llama, Gemma).
    Causal,
    /// Each token sees the whole sentence (BERT).
    Bidirectional,
}

/// What a loaded model is, as far as the experiments care.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// Architecture family: "llama", "qwen2", "mistral", "gemma3", "gpt2", "bert".
    pub arch: String,
    /// Number of blocks L; there are L + 1 hidden states h_0..h_L.
    pub n_layers: usize,
    /// Width d of the residual stream.
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    pub attention: AttentionKind,
    /// Whether [`Transformer::unembed`] is available (false for a bare `BertModel`).
    pub has_lm_head: bool,
    /// Longest sequence the position scheme supports.
    pub max_positions: usize,
    pub n_params: usize,
    /// Parameters of all blocks together (for FLOP estimates).
    pub block_params: usize,
}

/// Sub-modules of a block that a caller may observe or replace.
///
/// For pre-norm models a block is `x + attn(ln1(x))`, then `+ mlp(ln2(.))`. Gemma 3 adds a norm
/// after each of attention and MLP (`Ln1Post`, `Ln2Post`) before the residual add. BERT is
/// post-norm: `ln1(x + attn(x))`, then `ln2(h + mlp(h))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubModule {
    Ln1,
    Attn,
    Ln1Post,
    Ln2,
    Mlp,
    Ln2Post,
}

impl SubModule {
    pub fn name(self) -> &'static str {
        match self {
            SubModule::Ln1 => "ln1",
            SubModule::Attn => "attn",
            SubModule::Ln1Post => "ln1_post",
            SubModule::Ln2 => "ln2",
            SubModule::Mlp => "mlp",
            SubModule::Ln2Post => "ln2_post",
        }
    }
}

/// Named points in the forward pass, as TransformerLens names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tap {
    ResidPre,
    Ln1Normalized,
    AttnOut,
    ResidMid,
    Ln2Normalized,
    MlpOut,
    ResidPost,
    /// Gemma 3: raw attention output, input of the post-attention norm.
    Ln1PostIn,
    /// Gemma 3: raw MLP output, input of the post-feed-forward norm.
    Ln2PostIn,
}

impl Tap {
    pub const ALL: [Tap; 9] = [
        Tap::ResidPre,
        Tap::Ln1Normalized,
        Tap::AttnOut,
        Tap::ResidMid,
        Tap::Ln2Normalized,
        Tap::MlpOut,
        Tap::ResidPost,
        Tap::Ln1PostIn,
        Tap::Ln2PostIn,
    ];

    /// The TransformerLens-style name of this tap in block `layer`.
    pub fn name(self, layer: usize) -> String {
        let suffix = match self {
            Tap::ResidPre => "hook_resid_pre",
            Tap::Ln1Normalized => "ln1.hook_normalized",
            Tap::AttnOut => "hook_attn_out",
            Tap::ResidMid => "hook_resid_mid",
            Tap::Ln2Normalized => "ln2.hook_normalized",
            Tap::MlpOut => "hook_mlp_out",
            Tap::ResidPost => "hook_resid_post",
            Tap::Ln1PostIn => "ln1_post.hook_in",
            Tap::Ln2PostIn => "ln2_post.hook_in",
        };
        format!("blocks.{layer}.{suffix}")
    }
}

/// Name of the final norm's output tap.
pub const LN_FINAL_TAP: &str = "ln_final.hook_normalized";

/// Observes and alters a forward pass. Every method has a do-nothing default.
pub trait Hooks {
    /// Called with the value of each named tap of block `layer` as it is computed.
    fn tap(&mut self, _layer: usize, _tap: Tap, _value: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Return `Some(output)` to replace sub-module `sub` of block `layer` (given its input).
    fn replace(&mut self, _layer: usize, _sub: SubModule, _input: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Called with every sub-module's input and (possibly replaced) output.
    fn sub_module(&mut self, _layer: usize, _sub: SubModule, _input: &Tensor, _output: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Hooks that observe nothing and replace nothing.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// Runs sub-module `sub`, or its replacement, and reports its input and output.
pub(crate) fn run_sub(
    hooks: &mut dyn Hooks,
    layer: usize,
    sub: SubModule,
    input: &Tensor,
    real: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let output = match hooks.replace(layer, sub, input)? {
        Some(out) => {
            if out.dims() != input.dims() {
                bail!(
                    "replacement for {} of block {layer} has shape {:?}, expected {:?}",
                    sub.name(),
                    out.dims(),
                    input.dims()
                );
            }
            out
        }
        None => real(input)?,
    };
    hooks.sub_module(layer, sub, input, &output)?;
    Ok(output)
}

/// A batch of right-padded token sequences.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids [B, T] (u32), padded with the tokenizer's pad id.
    pub input_ids: Tensor,
    /// Real length of each row.
    pub lengths: Vec<usize>,
    /// BERT segment ids [B, T]; zeros when absent.
    pub token_type_ids: Option<Tensor>,
}

impl Batch {
    /// Right-pads `sequences` with `pad_id` into one batch on `device`.
    pub fn from_sequences(sequences: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        if sequences.is_empty() {
            bail!("empty batch");
        }
        if let Some(i) = sequences.iter().position(|s| s.is_empty()) {
            bail!("sequence {i} of the batch has no tokens");
        }
        let t = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * t);
        for s in sequences {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad_id, t - s.len()));
        }
        let input_ids = Tensor::from_vec(ids, (sequences.len(), t), device)?;
        Ok(Self {
            input_ids,
            lengths: sequences.iter().map(|s| s.len()).collect(),
            token_type_ids: None,
        })
    }

    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.dims()[1]
    }

    /// Additive attention bias [B, 1, T, T]: 0 where query i may attend key j, -inf elsewhere.
    /// `window` limits causal attention to the last `window` keys (sliding-window layers).
    pub fn attention_bias(&self, kind: AttentionKind, window: Option<usize>, device: &Device) -> Result<Tensor> {
        let (b, t) = (self.batch_size(), self.seq_len());
        let mut bias = vec![0f32; b * t * t];
        for (row, &len) in self.lengths.iter().enumerate() {
            for i in 0..t {
                for j in 0..t {
                    let mut allowed = j < len;
                    if kind == AttentionKind::Causal {
                        allowed &= j <= i;
                        if let Some(w) = window {
                            allowed &= i - j < w || j > i;
                        }
                    }
                    if !allowed {
                        bias[(row * t + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
            if kind == AttentionKind::Causal {
                // Padded query rows past the sentence must still see one key, or softmax gives
                // NaN; they are never read, so let them see key 0.
                for i in len..t {
                    bias[(row * t + i) * t] = 0.0;
                }
            }
        }
        Ok(Tensor::from_vec(bias, (b, 1, t, t), device)?)
    }
}

/// Per-batch state a model precomputes once (attention masks) and reuses in every block.
pub struct BatchContext {
    pub seq_len: usize,
    /// Bias for full (global) attention layers.
    pub bias: Tensor,
    /// Bias for sliding-window layers, when the model has any.
    pub bias_local: Option<Tensor>,
    pub token_type_ids: Option<Tensor>,
}

/// One transformer, split at the points the paper's linear shortcuts connect.
pub trait Transformer: Send + Sync {
    fn info(&self) -> &ModelInfo;
    fn device(&self) -> &Device;

    /// Masks and other per-batch state, computed once per batch.
    fn context(&self, batch: &Batch) -> Result<BatchContext>;

    /// h_0 [B, T, d]: the embedding output (GPT-2: wte + wpe; Gemma: scaled; BERT: after its
    /// embedding LayerNorm).
    fn embed(&self, batch: &Batch, ctx: &BatchContext) -> Result<Tensor>;

    /// Runs block `layer` (0-based) on `h` [B, T, d] and returns its output h_{layer+1}.
    fn block(&self, layer: usize, h: &Tensor, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor>;

    /// The final norm applied before the unembedding (identity for BERT, whose blocks end in a
    /// norm already).
    fn final_norm(&self, h: &Tensor) -> Result<Tensor>;

    /// Logits from a final-normed state: the LM head, or BERT's MLM head.
    fn unembed(&self, h: &Tensor) -> Result<Tensor>;

    /// Logits read out of a residual-stream state: `unembed(final_norm(h))`.
    fn readout(&self, h: &Tensor) -> Result<Tensor> {
        self.unembed(&self.final_norm(h)?)
    }

    /// Sub-modules of one block, in execution order.
    fn sub_modules(&self) -> &'static [SubModule] {
        &[SubModule::Ln1, SubModule::Attn, SubModule::Ln2, SubModule::Mlp]
    }
}

/// All hidden states h_0..h_L of a batch, each [B, T, d] (h_L before the final norm).
pub fn hidden_states(model: &dyn Transformer, batch: &Batch) -> Result<Vec<Tensor>> {
    hidden_states_with(model, batch, &mut NoHooks)
}

/// Like [`hidden_states`], with hooks observing or replacing sub-modules in every block.
pub fn hidden_states_with(model: &dyn Transformer, batch: &Batch, hooks: &mut dyn Hooks) -> Result<Vec<Tensor>> {
    let ctx = model.context(batch)?;
    let mut states = Vec::with_capacity(model.info().n_layers + 1);
    let mut h = model.embed(batch, &ctx)?;
    states.push(h.clone());
    for layer in 0..model.info().n_layers {
        h = model.block(layer, &h, &ctx, hooks)?;
        states.push(h.clone());
    }
    Ok(states)
}

/// Runs blocks `from..to` (0-based block indices) on `h`, returning the final state.
pub fn run_blocks(
    model: &dyn Transformer,
    h: &Tensor,
    ctx: &BatchContext,
    from: usize,
    to: usize,
    hooks: &mut dyn Hooks,
) -> Result<Tensor> {
    let mut h = h.clone();
    for layer in from..to {
        h = model.block(layer, &h, ctx, hooks)?;
    }
    Ok(h)
}

/// Makes sure a tensor is f32, the dtype all computation here uses.
pub(crate) fn f32(t: Tensor) -> candle_core::Result<Tensor> {
    if t.dtype() == DType::F32 {
        Ok(t)
    } else {
        t.to_dtype(DType::F32)
    }
}

type Part<'a> = &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>;

/// The sub-modules of one pre-norm block; `ln*_post` are Gemma's extra norms.
pub(crate) struct PreNormBlock<'a> {
    pub ln1: Part<'a>,
    pub attn: Part<'a>,
    pub ln1_post: Option<Part<'a>>,
    pub ln2: Part<'a>,
    pub mlp: Part<'a>,
    pub ln2_post: Option<Part<'a>>,
}

impl PreNormBlock<'_> {
    /// `mid = x + [ln1_post](attn(ln1(x)))`, `out = mid + [ln2_post](mlp(ln2(mid)))`, with every
    /// tap reported and every sub-module replaceable.
    pub fn forward(&self, layer: usize, x: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        hooks.tap(layer, Tap::ResidPre, x)?;
        let normed = run_sub(hooks, layer, SubModule::Ln1, x, self.ln1)?;
        hooks.tap(layer, Tap::Ln1Normalized, &normed)?;
        let mut attn_out = run_sub(hooks, layer, SubModule::Attn, &normed, self.attn)?;
        if let Some(post) = self.ln1_post {
            hooks.tap(layer, Tap::Ln1PostIn, &attn_out)?;
            attn_out = run_sub(hooks, layer, SubModule::Ln1Post, &attn_out, post)?;
        }
        hooks.tap(layer, Tap::AttnOut, &attn_out)?;
        let mid = (x + attn_out)?;
        hooks.tap(layer, Tap::ResidMid, &mid)?;
        let normed = run_sub(hooks, layer, SubModule::Ln2, &mid, self.ln2)?;
        hooks.tap(layer, Tap::Ln2Normalized, &normed)?;
        let mut mlp_out = run_sub(hooks, layer, SubModule::Mlp, &normed, self.mlp)?;
        if let Some(post) = self.ln2_post {
            hooks.tap(layer, Tap::Ln2PostIn, &mlp_out)?;
            mlp_out = run_sub(hooks, layer, SubModule::Ln2Post, &mlp_out, post)?;
        }
        hooks.tap(layer, Tap::MlpOut, &mlp_out)?;
        let out = (mid + mlp_out)?;
        hooks.tap(layer, Tap::ResidPost, &out)?;
        Ok(out)
    }
}

/// Records every tap of a forward pass under its TransformerLens name.
#[derive(Default)]
pub struct TapRecorder {
    pub values: std::collections::HashMap<String, Tensor>,
}

impl Hooks for TapRecorder {
    fn tap(&mut self, layer: usize, tap: Tap, value: &Tensor) -> Result<()> {
        self.values.insert(tap.name(layer), value.clone());
        Ok(())
    }
}

/// Replaces chosen sub-modules by linear maps `y = A x` (A stored [out, in]), position-wise.
#[derive(Default)]
pub struct LinearReplacement {
    pub maps: std::collections::HashMap<(usize, SubModule), Tensor>,
}

impl Hooks for LinearReplacement {
    fn replace(&mut self, layer: usize, sub: SubModule, input: &Tensor) -> Result<Option<Tensor>> {
        match self.maps.get(&(layer, sub)) {
            Some(a) => Ok(Some(ops::Linear::new(a.clone(), None).forward(input)?)),
            None => Ok(None),
        }
    }
}
