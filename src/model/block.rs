//! Block pieces shared by the architectures: the pre-norm residual block (sequential or
//! parallel), scaled dot-product attention that reports its pattern, and the MLPs that report
//! their inner activation. Every tap is reported and every sub-module replaceable.

use anyhow::Result;
use candle_core::Tensor;

use super::batch::AttentionMask;
use super::hooks::{emit, run_sub, BlockTap, Hooks, SubModule, Tap};
use super::layers::{self, Activation, Linear};

/// A norm (or any plain position-wise function) inside a block.
pub(crate) type Part<'a> = &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>;
/// A sub-layer with taps of its own (attention, MLP).
pub(crate) type HookedPart<'a> = &'a dyn Fn(&Tensor, &mut dyn Hooks) -> Result<Tensor>;

/// The sub-modules of one pre-norm block; `ln*_post` are Gemma's extra norms.
pub(crate) struct PreNormBlock<'a> {
    pub ln1: Part<'a>,
    pub attn: HookedPart<'a>,
    pub ln1_post: Option<Part<'a>>,
    pub ln2: Part<'a>,
    pub mlp: HookedPart<'a>,
    pub ln2_post: Option<Part<'a>>,
    /// GPT-NeoX style: both sub-layers read the block input, `out = x + attn + mlp`.
    pub parallel: bool,
}

impl PreNormBlock<'_> {
    /// Sequential: `mid = x + [ln1_post](attn(ln1(x)))`, `out = mid + [ln2_post](mlp(ln2(mid)))`.
    /// Parallel: `out = x + [ln1_post](attn(ln1(x))) + [ln2_post](mlp(ln2(x)))` (no resid_mid).
    pub fn forward(&self, layer: usize, x: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let tap = |t: BlockTap| Tap::Block(layer, t);
        let x = emit(hooks, tap(BlockTap::ResidPre), x.clone())?;
        let normed = run_sub(hooks, layer, SubModule::Ln1, &x, |v, _| Ok((self.ln1)(v)?))?;
        let normed = emit(hooks, tap(BlockTap::Ln1Normalized), normed)?;
        let mut attn_out = run_sub(hooks, layer, SubModule::Attn, &normed, self.attn)?;
        if let Some(post) = self.ln1_post {
            attn_out = emit(hooks, tap(BlockTap::Ln1PostIn), attn_out)?;
            attn_out = run_sub(hooks, layer, SubModule::Ln1Post, &attn_out, |v, _| Ok(post(v)?))?;
        }
        let attn_out = emit(hooks, tap(BlockTap::AttnOut), attn_out)?;
        let (mlp_in, mid) = if self.parallel {
            (x.clone(), None)
        } else {
            let mid = emit(hooks, tap(BlockTap::ResidMid), (&x + &attn_out)?)?;
            (mid.clone(), Some(mid))
        };
        let normed = run_sub(hooks, layer, SubModule::Ln2, &mlp_in, |v, _| Ok((self.ln2)(v)?))?;
        let normed = emit(hooks, tap(BlockTap::Ln2Normalized), normed)?;
        let mut mlp_out = run_sub(hooks, layer, SubModule::Mlp, &normed, self.mlp)?;
        if let Some(post) = self.ln2_post {
            mlp_out = emit(hooks, tap(BlockTap::Ln2PostIn), mlp_out)?;
            mlp_out = run_sub(hooks, layer, SubModule::Ln2Post, &mlp_out, |v, _| Ok(post(v)?))?;
        }
        let mlp_out = emit(hooks, tap(BlockTap::MlpOut), mlp_out)?;
        let out = match mid {
            Some(mid) => (mid + mlp_out)?,
            None => ((x + attn_out)? + mlp_out)?,
        };
        emit(hooks, tap(BlockTap::ResidPost), out)
    }
}

/// Scaled dot-product attention of block `layer` with grouped key/value heads, reporting the
/// probabilities as `attn.hook_pattern` (a patched pattern is what mixes the values).
///
/// q [B, H, T, hd], k and v [B, Hkv, T, hd], the batch's mask. Returns [B, T, H * hd].
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &AttentionMask,
    scale: f64,
    softcap: Option<f64>,
    hooks: &mut dyn Hooks,
) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let probs = layers::attention_probs(q, k, bias, scale, softcap)?;
    let probs = emit(hooks, Tap::Block(layer, BlockTap::AttnPattern), probs)?;
    let out = layers::attention_mix(&probs, v)?;
    Ok(out.transpose(1, 2)?.reshape((b, t, h * hd))?)
}

/// The mask to run the fused attention kernel with ([`crate::model::fused::flash_attention`]), or
/// `None` when block `layer` must materialise the probabilities: off the GPU, in f32, for head
/// sizes without a kernel, or when a hook observes or patches `attn.hook_pattern`.
pub(crate) fn fused_attention_mask<'m>(
    layer: usize,
    x: &Tensor,
    head_dim: usize,
    mask: &'m AttentionMask,
    hooks: &dyn Hooks,
) -> Option<&'m crate::model::fused::MaskSpec> {
    match mask {
        AttentionMask::Fused(spec)
            if crate::model::fused::flash_supported(x, head_dim)
                && !hooks.observes(Tap::Block(layer, BlockTap::AttnPattern)) =>
        {
            Some(spec)
        }
        _ => None,
    }
}

/// `down(act(up x))`, reporting the activation as `mlp.hook_post` (GPT-2, BERT, GPT-NeoX).
pub(crate) fn plain_mlp(
    layer: usize,
    up: &Linear,
    act: Activation,
    down: &Linear,
    x: &Tensor,
    hooks: &mut dyn Hooks,
) -> Result<Tensor> {
    let post = up.forward_act(x, Some(act))?;
    let post = emit(hooks, Tap::Block(layer, BlockTap::MlpPost), post)?;
    Ok(down.forward(&post)?)
}

/// `down(act(gate x) * up x)`, reporting the product as `mlp.hook_post` (Llama, Gemma).
pub(crate) fn gated_mlp(
    layer: usize,
    gate: &Linear,
    up: &Linear,
    act: Activation,
    down: &Linear,
    x: &Tensor,
    hooks: &mut dyn Hooks,
) -> Result<Tensor> {
    let (gate, up) = (gate.forward(x)?, up.forward(x)?);
    let post = match act {
        Activation::Silu => layers::silu_mul(&gate, &up)?,
        _ => (act.forward(&gate)? * up)?,
    };
    let post = emit(hooks, Tap::Block(layer, BlockTap::MlpPost), post)?;
    Ok(down.forward(&post)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::hooks::TapRecorder;
    use candle_core::{Device, Tensor};

    /// With ln = identity, attn = 2x and mlp = 3x: sequential gives mid = 3x, out = 3x + 9x;
    /// parallel gives out = x + 2x + 3x and reports no resid_mid.
    #[test]
    fn sequential_and_parallel_residuals() {
        let x = Tensor::new(&[[[1f32, -2.0]]], &Device::Cpu).unwrap();
        let ln = |v: &Tensor| Ok(v.clone());
        let attn = |v: &Tensor, _: &mut dyn Hooks| Ok((v * 2.0)?);
        let mlp = |v: &Tensor, _: &mut dyn Hooks| Ok((v * 3.0)?);
        for (parallel, factor) in [(false, 12f32), (true, 6.0)] {
            let block = PreNormBlock {
                ln1: &ln,
                attn: &attn,
                ln1_post: None,
                ln2: &ln,
                mlp: &mlp,
                ln2_post: None,
                parallel,
            };
            let mut rec = TapRecorder::default();
            let out = block.forward(0, &x, &mut rec).unwrap();
            assert_eq!(
                out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                vec![factor, -2.0 * factor]
            );
            assert_eq!(rec.values.contains_key("blocks.0.hook_resid_mid"), !parallel);
            let post = rec.values["blocks.0.hook_resid_post"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(post, vec![factor, -2.0 * factor]);
        }
    }
}
