//! Block skeletons shared by the architectures: the pre-norm residual block with every tap
//! reported and every sub-module replaceable.

use anyhow::Result;
use candle_core::Tensor;

use super::hooks::{run_sub, Hooks, SubModule, Tap};

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
