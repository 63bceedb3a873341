//! The collected activations of one split (`RUN/activations/{train,val}.safetensors`): the one
//! reader every later stage uses, for the whole file ([`Activations::read`]) or only its token
//! lists ([`Activations::read_tokens`], without loading the hidden states).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;

/// Collected activations of one split, as read back by the later stages.
pub struct Activations {
    /// [S, N, d] f32.
    pub hidden_states: Tensor,
    pub positions: Vec<usize>,
    pub tokens: Vec<u32>,
    pub offsets: Vec<usize>,
    /// The file they were read from (for error messages).
    pub path: PathBuf,
}

/// The token lists of a split without its hidden states.
pub struct ActivationTokens {
    pub positions: Vec<usize>,
    pub tokens: Vec<u32>,
    pub offsets: Vec<usize>,
}

impl ActivationTokens {
    /// Token ids of example i's sentence.
    pub fn sentence(&self, i: usize) -> &[u32] {
        &self.tokens[self.offsets[i]..self.offsets[i + 1]]
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// Checks that `offsets` partition `tokens` into one sentence per example and that each
/// position lies inside its sentence; converts the stored int64 lists.
fn checked_tokens(path: &Path, positions: Vec<i64>, tokens: Vec<i64>, offsets: Vec<i64>) -> Result<ActivationTokens> {
    let non_negative = |v: &[i64], what: &str| -> Result<()> {
        if let Some(x) = v.iter().find(|&&x| x < 0) {
            bail!("{}: '{what}' holds a negative value ({x})", path.display());
        }
        Ok(())
    };
    non_negative(&positions, "positions")?;
    non_negative(&offsets, "offsets")?;
    if let Some(t) = tokens.iter().find(|&&t| t < 0 || t > i64::from(u32::MAX)) {
        bail!("{}: 'tokens' holds an id outside 0..2^32 ({t})", path.display());
    }
    let positions: Vec<usize> = positions.into_iter().map(|v| v as usize).collect();
    let offsets: Vec<usize> = offsets.into_iter().map(|v| v as usize).collect();
    let tokens: Vec<u32> = tokens.into_iter().map(|v| v as u32).collect();
    if offsets.len() != positions.len() + 1 {
        bail!(
            "{}: inconsistent example counts ({} positions, {} offsets)",
            path.display(),
            positions.len(),
            offsets.len()
        );
    }
    let ordered = offsets.first() == Some(&0)
        && offsets.windows(2).all(|w| w[0] <= w[1])
        && offsets.last().is_some_and(|&o| o == tokens.len());
    let inside = ordered && (0..positions.len()).all(|i| positions[i] < offsets[i + 1] - offsets[i]);
    if !ordered || !inside {
        bail!("{}: offsets or positions do not fit the token list", path.display());
    }
    Ok(ActivationTokens {
        positions,
        tokens,
        offsets,
    })
}

/// Refuses hidden states holding NaN or infinity, naming the first one's layer and example:
/// every stage reading a split (fit on train; r2, predict, early exit on val) would otherwise
/// turn it into NaN scores silently.
fn check_finite(path: &Path, hidden_states: &Tensor) -> Result<()> {
    use rayon::prelude::*;
    let (_, n, d) = hidden_states.dims3()?;
    let states = hidden_states.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let (storage, layout) = states.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("{}: hidden states not in host memory", path.display())
    };
    let values = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + states.elem_count()];
    // Scanned in parallel without a copy: 1.6 GB for the 8B shape's 3,000 validation examples.
    const CHUNK: usize = 1 << 16;
    let bad = values
        .par_chunks(CHUNK)
        .position_first(|c| c.iter().any(|x| !x.is_finite()));
    if let Some(c) = bad {
        let i = c * CHUNK + values[c * CHUNK..].iter().position(|x| !x.is_finite()).unwrap_or(0);
        let (layer, example, coordinate) = (i / (n * d), (i / d) % n, i % d);
        bail!(
            "{}: non-finite hidden state {} (layer {layer}, example {example}, coordinate {coordinate})",
            path.display(),
            values[i]
        );
    }
    Ok(())
}

impl Activations {
    /// Reads and checks a split: token lists consistent, states [S, N, d] and finite.
    pub fn read(path: &Path) -> Result<Self> {
        let t = crate::data::io::read_safetensors(path)?;
        let get = |n: &str| {
            t.get(n)
                .cloned()
                .with_context(|| format!("{}: no tensor '{n}'", path.display()))
        };
        let ints = |n: &str| -> Result<Vec<i64>> {
            get(n)?
                .to_vec1::<i64>()
                .map_err(|e| anyhow!("{}: '{n}' is not a list of int64 ({e})", path.display()))
        };
        let hidden_states = get("hidden_states")?;
        let tok = checked_tokens(path, ints("positions")?, ints("tokens")?, ints("offsets")?)?;
        let n = hidden_states
            .dims3()
            .map_err(|_| anyhow!("{}: 'hidden_states' is not [S, N, d]", path.display()))?
            .1;
        if n != tok.positions.len() {
            bail!(
                "{}: inconsistent example counts ({n} states, {} positions)",
                path.display(),
                tok.positions.len()
            );
        }
        check_finite(path, &hidden_states)?;
        Ok(Self {
            hidden_states,
            positions: tok.positions,
            tokens: tok.tokens,
            offsets: tok.offsets,
            path: path.to_path_buf(),
        })
    }

    /// Only the token lists (`positions`, `tokens`, `offsets`), checked as [`Activations::read`]
    /// checks them, without reading the hidden states.
    pub fn read_tokens(path: &Path) -> Result<ActivationTokens> {
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the file is only read; stages write it atomically (rename), never in place.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
        let ints = |name: &str| -> Result<Vec<i64>> {
            let t = st
                .tensor(name)
                .map_err(|_| anyhow!("{}: no tensor '{name}'", path.display()))?;
            if t.dtype() != safetensors::Dtype::I64 || t.shape().len() != 1 {
                bail!("{}: '{name}' is not a list of int64", path.display());
            }
            Ok(t.data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect())
        };
        checked_tokens(path, ints("positions")?, ints("tokens")?, ints("offsets")?)
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
