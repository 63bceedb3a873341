//! Mixtral as a [`DecoderSpec`]: the Mistral decoder (sliding window when `sliding_window` is
//! set) whose MLP is a sparse mixture of `num_local_experts` gated SiLU experts, `num_experts_per_tok`
//! picked per token by a linear router (see `Decoder::moe`).
//!
//! The whole MoE block (router + experts) is the `mlp` sub-module: replacing the MLP by a linear
//! map replaces the block, and `hook_mlp_out` is its output. There is no `mlp.hook_post`.

use anyhow::Result;
use candle_core::Device;
use serde::Deserialize;

use super::decoder::{Decoder, DecoderSpec, MlpKind};
use crate::model::config::Config;
use crate::model::weights::Weights;
use crate::model::Transformer;

/// The Mixtral fields beyond the Llama ones.
#[derive(Debug, Deserialize)]
pub struct MixtralExtra {
    #[serde(default = "default_experts")]
    pub num_local_experts: usize,
    #[serde(default = "default_top_k")]
    pub num_experts_per_tok: usize,
    pub sliding_window: Option<usize>,
}

fn default_experts() -> usize {
    8
}
fn default_top_k() -> usize {
    2
}

/// The decoder a Mixtral config describes.
pub fn spec(cfg: &Config) -> Result<DecoderSpec> {
    let mut s = super::llama::spec(cfg)?;
    let c: MixtralExtra = cfg.typed()?;
    cfg.positive("num_local_experts", c.num_local_experts)?;
    cfg.positive("num_experts_per_tok", c.num_experts_per_tok)?;
    if c.num_experts_per_tok > c.num_local_experts {
        anyhow::bail!(
            "{}: field 'num_experts_per_tok' ({}) exceeds 'num_local_experts' ({})",
            cfg.path.display(),
            c.num_experts_per_tok,
            c.num_local_experts
        );
    }
    if let Some(w) = c.sliding_window {
        cfg.positive("sliding_window", w)?;
    }
    s.arch = "mixtral".into();
    s.sliding_window = c.sliding_window;
    s.mlp = MlpKind::Moe {
        n_experts: c.num_local_experts,
        top_k: c.num_experts_per_tok,
    };
    Ok(s)
}

/// Loads a Mixtral checkpoint (`block_sparse_moe.experts.{e}.w1/w2/w3`, as on the hub).
pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    Ok(Box::new(Decoder::load(&spec(cfg)?, w, device)?))
}
