//! Named taps (TransformerLens names) and hooks that observe or replace parts of a forward pass.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::layers;

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
            Some(a) => Ok(Some(layers::Linear::new(a.clone(), None).forward(input)?)),
            None => Ok(None),
        }
    }
}
