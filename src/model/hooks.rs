//! Named taps (TransformerLens names) and hooks that observe, patch or replace parts of a
//! forward pass.
//!
//! Every intermediate value a researcher may want is reported through [`Hooks::tap`] under its
//! TransformerLens name ([`Tap::name`]); returning `Some(value)` from `tap` replaces it downstream
//! (activation patching). Whole sub-modules ([`SubModule`]) can also be replaced by a function of
//! their input ([`Hooks::replace`], e.g. a fitted linear map) and observed with their input and
//! output ([`Hooks::sub_module`]).

use std::collections::{BTreeSet, HashMap};

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::layers;

/// Sub-modules of a block that a caller may observe or replace.
///
/// For pre-norm models a block is `x + attn(ln1(x))`, then `+ mlp(ln2(.))` (parallel blocks:
/// `x + attn(ln1(x)) + mlp(ln2(x))`). Gemma 3 adds a norm after each of attention and MLP
/// (`Ln1Post`, `Ln2Post`) before the residual add. BERT is post-norm: `ln1(x + attn(x))`, then
/// `ln2(h + mlp(h))`.
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

/// Named points inside block `l`, as TransformerLens names them (`blocks.{l}.<suffix>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockTap {
    /// `hook_resid_pre`: the block input h_l.
    ResidPre,
    /// `ln1.hook_in` (BERT): `resid_pre + attn_out`, the input of the post-attention LayerNorm.
    Ln1In,
    /// `ln1.hook_normalized`: output of the first norm.
    Ln1Normalized,
    /// `attn.hook_pattern`: attention probabilities [B, H, T, T] (query, key).
    AttnPattern,
    /// `ln1_post.hook_in` (Gemma 3): raw attention output, input of the post-attention norm.
    Ln1PostIn,
    /// `hook_attn_out`: what the attention sub-layer adds to the residual stream.
    AttnOut,
    /// `hook_resid_mid`: `resid_pre + attn_out` (sequential pre-norm blocks only).
    ResidMid,
    /// `ln2.hook_in` (BERT): `ln1.hook_normalized + mlp_out`, the input of the output LayerNorm.
    Ln2In,
    /// `ln2.hook_normalized`: output of the second norm.
    Ln2Normalized,
    /// `mlp.hook_post`: the activation inside the MLP, input of its down projection
    /// (`act(gate) * up` for gated MLPs).
    MlpPost,
    /// `ln2_post.hook_in` (Gemma 3): raw MLP output, input of the post-feed-forward norm.
    Ln2PostIn,
    /// `hook_mlp_out`: what the MLP sub-layer adds to the residual stream.
    MlpOut,
    /// `hook_resid_post`: the block output h_{l+1} (= `blocks.{l+1}.hook_resid_pre`).
    ResidPost,
}

impl BlockTap {
    pub const ALL: [BlockTap; 13] = [
        BlockTap::ResidPre,
        BlockTap::Ln1In,
        BlockTap::Ln1Normalized,
        BlockTap::AttnPattern,
        BlockTap::Ln1PostIn,
        BlockTap::AttnOut,
        BlockTap::ResidMid,
        BlockTap::Ln2In,
        BlockTap::Ln2Normalized,
        BlockTap::MlpPost,
        BlockTap::Ln2PostIn,
        BlockTap::MlpOut,
        BlockTap::ResidPost,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            BlockTap::ResidPre => "hook_resid_pre",
            BlockTap::Ln1In => "ln1.hook_in",
            BlockTap::Ln1Normalized => "ln1.hook_normalized",
            BlockTap::AttnPattern => "attn.hook_pattern",
            BlockTap::Ln1PostIn => "ln1_post.hook_in",
            BlockTap::AttnOut => "hook_attn_out",
            BlockTap::ResidMid => "hook_resid_mid",
            BlockTap::Ln2In => "ln2.hook_in",
            BlockTap::Ln2Normalized => "ln2.hook_normalized",
            BlockTap::MlpPost => "mlp.hook_post",
            BlockTap::Ln2PostIn => "ln2_post.hook_in",
            BlockTap::MlpOut => "hook_mlp_out",
            BlockTap::ResidPost => "hook_resid_post",
        }
    }
}

/// A named point in the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tap {
    /// `hook_embed`: the token embedding lookup (Gemma: already scaled by sqrt(d)). For Llama-like
    /// models it is h_0; GPT-2 and BERT add positions (and BERT segments and its LayerNorm) after.
    Embed,
    /// `hook_pos_embed` (GPT-2, BERT): learned position embeddings, broadcast to [B, T, d].
    PosEmbed,
    /// `hook_token_type_embed` (BERT): segment embeddings [B, T, d].
    TokenTypeEmbed,
    /// A tap inside block `l` (0-based).
    Block(usize, BlockTap),
    /// `ln_final.hook_normalized`: the final norm's output (not for BERT, which has none).
    LnFinal,
}

/// Name of the final norm's output tap.
pub const LN_FINAL_TAP: &str = "ln_final.hook_normalized";

impl Tap {
    /// The TransformerLens-style name of this tap.
    pub fn name(self) -> String {
        match self {
            Tap::Embed => "hook_embed".into(),
            Tap::PosEmbed => "hook_pos_embed".into(),
            Tap::TokenTypeEmbed => "hook_token_type_embed".into(),
            Tap::Block(l, t) => format!("blocks.{l}.{}", t.suffix()),
            Tap::LnFinal => LN_FINAL_TAP.into(),
        }
    }

    /// The tap a name denotes, if it is well formed (whether a model emits it is another matter).
    pub fn parse(name: &str) -> Option<Tap> {
        match name {
            "hook_embed" => return Some(Tap::Embed),
            "hook_pos_embed" => return Some(Tap::PosEmbed),
            "hook_token_type_embed" => return Some(Tap::TokenTypeEmbed),
            LN_FINAL_TAP => return Some(Tap::LnFinal),
            _ => {}
        }
        let (layer, suffix) = name.strip_prefix("blocks.")?.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        BlockTap::ALL
            .iter()
            .find(|t| t.suffix() == suffix)
            .map(|&t| Tap::Block(layer, t))
    }
}

/// Observes and alters a forward pass. Every method has a do-nothing default.
pub trait Hooks {
    /// Whether the hook looks at (or patches) `tap`. Only asked for taps that cost something to
    /// produce: a GPU forward skips materialising the attention probabilities
    /// (`attn.hook_pattern`) when no hook wants them and runs a fused attention kernel instead.
    fn observes(&self, _tap: Tap) -> bool {
        true
    }
    /// Called with the value of each named tap as it is computed. Return `Some(v)` (same shape)
    /// to replace the value from there on (activation patching); `None` keeps it.
    fn tap(&mut self, _tap: Tap, _value: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
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
impl Hooks for NoHooks {
    fn observes(&self, _tap: Tap) -> bool {
        false
    }
}

/// Reports `value` at `tap` and returns what flows on: the hook's patch, or the value itself.
pub(crate) fn emit(hooks: &mut dyn Hooks, tap: Tap, value: Tensor) -> Result<Tensor> {
    match hooks.tap(tap, &value)? {
        None => Ok(value),
        Some(patched) => {
            if patched.dims() != value.dims() {
                bail!(
                    "patch for {} has shape {:?}, expected {:?}",
                    tap.name(),
                    patched.dims(),
                    value.dims()
                );
            }
            // A patch (often f32) continues in the model's dtype.
            Ok(crate::model::layers::to_dtype(&patched, value.dtype())?)
        }
    }
}

/// Runs sub-module `sub`, or its replacement, and reports its input and output. The real
/// sub-module gets the hooks too, for the taps inside it.
pub(crate) fn run_sub(
    hooks: &mut dyn Hooks,
    layer: usize,
    sub: SubModule,
    input: &Tensor,
    real: impl FnOnce(&Tensor, &mut dyn Hooks) -> Result<Tensor>,
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
            // A replacement (e.g. an f32 linear map) continues in the model's dtype.
            crate::model::layers::to_dtype(&out, input.dtype())?
        }
        None => real(input, hooks)?,
    };
    hooks.sub_module(layer, sub, input, &output)?;
    Ok(output)
}

/// Records taps under their TransformerLens names: every tap, or only the chosen ones.
#[derive(Default)]
pub struct TapRecorder {
    pub values: HashMap<String, Tensor>,
    /// When set, only these names are kept (attention patterns of every block add up).
    pub only: Option<BTreeSet<String>>,
    /// Every tap name the forward pass emitted, kept or not.
    pub seen: BTreeSet<String>,
}

impl TapRecorder {
    /// A recorder that keeps only the taps named in `names`.
    pub fn only<S: AsRef<str>>(names: &[S]) -> Self {
        Self {
            only: Some(names.iter().map(|n| n.as_ref().to_string()).collect()),
            ..Self::default()
        }
    }
}

impl Hooks for TapRecorder {
    fn observes(&self, tap: Tap) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&tap.name()))
    }
    fn tap(&mut self, tap: Tap, value: &Tensor) -> Result<Option<Tensor>> {
        let name = tap.name();
        if self.only.as_ref().is_none_or(|o| o.contains(&name)) {
            self.values.insert(name.clone(), value.clone());
        }
        self.seen.insert(name);
        Ok(None)
    }
}

/// Activation patching: replaces the taps named in `values` by the given tensors.
#[derive(Default)]
pub struct TapPatch {
    pub values: HashMap<String, Tensor>,
    /// Names that were patched during the last forward pass.
    pub applied: BTreeSet<String>,
}

impl Hooks for TapPatch {
    fn observes(&self, tap: Tap) -> bool {
        self.values.contains_key(&tap.name())
    }
    fn tap(&mut self, tap: Tap, _value: &Tensor) -> Result<Option<Tensor>> {
        let name = tap.name();
        match self.values.get(&name) {
            Some(v) => {
                let v = v.clone();
                self.applied.insert(name);
                Ok(Some(v))
            }
            None => Ok(None),
        }
    }
}

/// Replaces chosen sub-modules by linear maps `y = A x` (A stored [out, in]), position-wise.
#[derive(Default)]
pub struct LinearReplacement {
    pub maps: HashMap<(usize, SubModule), Tensor>,
}

impl Hooks for LinearReplacement {
    fn observes(&self, _tap: Tap) -> bool {
        false
    }
    fn replace(&mut self, layer: usize, sub: SubModule, input: &Tensor) -> Result<Option<Tensor>> {
        match self.maps.get(&(layer, sub)) {
            Some(a) => Ok(Some(layers::Linear::new(a.clone(), None).forward(input)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_round_trip() {
        let mut all = vec![Tap::Embed, Tap::PosEmbed, Tap::TokenTypeEmbed, Tap::LnFinal];
        all.extend(BlockTap::ALL.iter().map(|&t| Tap::Block(3, t)));
        for t in all {
            assert_eq!(Tap::parse(&t.name()), Some(t), "{}", t.name());
        }
        assert_eq!(Tap::parse("blocks.x.hook_resid_pre"), None);
        assert_eq!(Tap::parse("blocks.0.hook_nothing"), None);
        assert_eq!(Tap::parse("hook_resid_pre"), None);
    }

    /// What a GPU forward may skip (the attention probabilities) follows what each hook says it
    /// observes: nothing, only its chosen taps, or the taps it patches.
    #[test]
    fn hooks_say_which_taps_they_observe() {
        let pattern = Tap::Block(2, BlockTap::AttnPattern);
        assert!(!NoHooks.observes(pattern));
        assert!(TapRecorder::default().observes(pattern));
        assert!(!TapRecorder::only(&["blocks.2.hook_resid_post"]).observes(pattern));
        assert!(TapRecorder::only(&["blocks.2.attn.hook_pattern"]).observes(pattern));
        let mut patch = TapPatch::default();
        assert!(!patch.observes(pattern));
        patch.values.insert(
            pattern.name(),
            Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
        assert!(patch.observes(pattern));
        assert!(!LinearReplacement::default().observes(pattern));
    }

    #[test]
    fn a_patch_of_the_wrong_shape_is_an_error() {
        let mut patch = TapPatch::default();
        patch.values.insert(
            "hook_embed".into(),
            Tensor::zeros((2, 3), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
        let value = Tensor::zeros((2, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let e = emit(&mut patch, Tap::Embed, value).unwrap_err().to_string();
        assert!(e.contains("hook_embed") && e.contains("[2, 4]"), "{e}");
    }
}
