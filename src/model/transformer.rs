//! The one trait every experiment drives, and what a loaded model says about itself.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::batch::{Batch, BatchContext};
use super::hooks::{emit, Hooks, NoHooks, SubModule, Tap};
use super::placement::Placement;

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
    /// Parameters of all blocks together (for FLOP estimates), counted from the loaded blocks.
    pub block_params: usize,
    /// Compute dtype the weights were loaded in and the GEMMs run in ("f32", "bf16", "f16");
    /// norms and softmax run in f32, logits leave the model as f32.
    pub dtype: String,
}

/// One transformer, split at the points the paper's linear shortcuts connect.
pub trait Transformer: Send + Sync {
    fn info(&self) -> &ModelInfo;
    /// The device of the embedding, where batches' input ids go (the first of a split).
    fn device(&self) -> &Device;

    /// The device running block `layer`; a block moves a state from elsewhere onto it, so
    /// states h_{l+1} come back on the device of block l.
    fn block_device(&self, _layer: usize) -> &Device {
        self.device()
    }

    /// The device of the final norm and the unembedding: logits come back there, and a state
    /// read out from elsewhere is moved there first.
    fn head_device(&self) -> &Device {
        self.device()
    }

    /// The split across devices, when the model has one.
    fn placement(&self) -> Option<&Placement> {
        None
    }

    /// Masks and other per-batch state, computed once per batch.
    fn context(&self, batch: &Batch) -> Result<BatchContext>;

    /// h_0 [B, T, d]: the embedding output (GPT-2: wte + wpe; Gemma: scaled; BERT: after its
    /// embedding LayerNorm).
    fn embed(&self, batch: &Batch, ctx: &BatchContext) -> Result<Tensor> {
        self.embed_with(batch, ctx, &mut NoHooks)
    }

    /// [`Transformer::embed`], reporting `hook_embed` (and `hook_pos_embed`,
    /// `hook_token_type_embed` where the model has them) to `hooks`, which may patch them.
    fn embed_with(&self, batch: &Batch, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor>;

    /// Runs block `layer` (0-based) on `h` [B, T, d] and returns its output h_{layer+1}.
    fn block(&self, layer: usize, h: &Tensor, ctx: &BatchContext, hooks: &mut dyn Hooks) -> Result<Tensor>;

    /// The final norm applied before the unembedding (identity for BERT, whose blocks end in a
    /// norm already).
    fn final_norm(&self, h: &Tensor) -> Result<Tensor>;

    /// [`Transformer::final_norm`], reporting `ln_final.hook_normalized` (BERT, which has no
    /// final norm, reports nothing).
    fn final_norm_with(&self, h: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        emit(hooks, Tap::LnFinal, self.final_norm(h)?)
    }

    /// Logits from a final-normed state: the LM head, or BERT's MLM head.
    fn unembed(&self, h: &Tensor) -> Result<Tensor>;

    /// [`Transformer::unembed`] with the logits left in the unembedding's compute dtype where
    /// that is exactly what `unembed` then casts to f32 (lens training on a GPU reads bf16 logits
    /// in its fused loss kernel and hands back a gradient in the same dtype, which
    /// [`Transformer::unembed_vjp`] must then take without rounding it again). The default is
    /// `unembed` itself.
    fn unembed_native(&self, h: &Tensor) -> Result<Tensor> {
        self.unembed(h)
    }

    /// The vector-Jacobian product of [`Transformer::unembed`] at `u`: `g` [n, V] (a gradient
    /// with respect to the logits) carried back to u [n, d]. Lens training uses it so that the
    /// backward pass never forms the gradient of the (constant) unembedding matrix, which candle's
    /// matmul backward always computes: [V, d] per layer and chunk. The default differentiates
    /// `unembed` with candle's autograd; a model with its head at hand overrides it with one GEMM.
    fn unembed_vjp(&self, u: &Tensor, g: &Tensor) -> Result<Tensor> {
        let v = candle_core::Var::from_tensor(&u.detach())?;
        let logits = self.unembed(v.as_tensor())?;
        let s = (logits * g.detach())?.sum_all()?;
        let grads = s.backward()?;
        grads
            .get(v.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no gradient reached the unembedding's input"))
    }

    /// Logits read out of a residual-stream state: `unembed(final_norm(h))`.
    fn readout(&self, h: &Tensor) -> Result<Tensor> {
        self.unembed(&self.final_norm(h)?)
    }

    /// Sub-modules of one block, in execution order.
    fn sub_modules(&self) -> &'static [SubModule] {
        &[SubModule::Ln1, SubModule::Attn, SubModule::Ln2, SubModule::Mlp]
    }

    /// The unembedding as one plain matrix, when it is one: W [V, d] with `unembed(u) = u W^T`
    /// (no bias, no soft-cap, no head transform). The CPU predict kernel multiplies by W in
    /// vocabulary chunks and scores each chunk while it is in cache instead of forming the
    /// [n, V] logits; `None` (the default) keeps the generic [`Transformer::unembed`].
    fn unembedding_matrix(&self) -> Option<&Tensor> {
        None
    }
}

/// All hidden states h_0..h_L of a batch, each [B, T, d] (h_L before the final norm).
pub fn hidden_states(model: &dyn Transformer, batch: &Batch) -> Result<Vec<Tensor>> {
    hidden_states_with(model, batch, &mut NoHooks)
}

/// Like [`hidden_states`], with hooks observing, patching or replacing the embedding taps and
/// every block's taps and sub-modules (`ln_final.hook_normalized` comes from
/// [`Transformer::final_norm_with`]). A patched `blocks.{l}.hook_resid_pre` changes states
/// l+1.. (state l is the value before the patch).
pub fn hidden_states_with(model: &dyn Transformer, batch: &Batch, hooks: &mut dyn Hooks) -> Result<Vec<Tensor>> {
    let ctx = model.context(batch)?;
    let mut states = Vec::with_capacity(model.info().n_layers + 1);
    let mut h = model.embed_with(batch, &ctx, hooks)?;
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
