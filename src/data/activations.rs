//! The collected activations of one split (`RUN/activations/{train,val}.safetensors`): the one
//! reader every later stage uses.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

/// Collected activations of one split, as read back by the later stages.
pub struct Activations {
    /// [S, N, d] f32.
    pub hidden_states: Tensor,
    pub positions: Vec<usize>,
    pub tokens: Vec<u32>,
    pub offsets: Vec<usize>,
}

impl Activations {
    pub fn read(path: &Path) -> Result<Self> {
        let t = crate::data::io::read_safetensors(path)?;
        let get = |n: &str| {
            t.get(n)
                .cloned()
                .with_context(|| format!("{}: no tensor '{n}'", path.display()))
        };
        let as_usize =
            |x: Tensor| -> Result<Vec<usize>> { Ok(x.to_vec1::<i64>()?.into_iter().map(|v| v as usize).collect()) };
        let hidden_states = get("hidden_states")?;
        let positions = as_usize(get("positions")?)?;
        let tokens = get("tokens")?.to_vec1::<i64>()?.into_iter().map(|v| v as u32).collect();
        let offsets = as_usize(get("offsets")?)?;
        if hidden_states.dim(1)? != positions.len() || offsets.len() != positions.len() + 1 {
            bail!("{}: inconsistent example counts", path.display());
        }
        let tokens: Vec<u32> = tokens;
        let ordered = offsets.windows(2).all(|w| w[0] <= w[1]) && offsets.last().is_some_and(|&o| o == tokens.len());
        let inside = ordered && (0..positions.len()).all(|i| positions[i] < offsets[i + 1] - offsets[i]);
        if !ordered || !inside {
            bail!("{}: offsets or positions do not fit the token list", path.display());
        }
        Ok(Self {
            hidden_states,
            positions,
            tokens,
            offsets,
        })
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Token ids of example i's sentence.
    pub fn sentence(&self, i: usize) -> &[u32] {
        &self.tokens[self.offsets[i]..self.offsets[i + 1]]
    }
}
