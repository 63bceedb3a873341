//! Finding and loading a model: a Hugging Face folder (`hf`), a model id in the local Hugging
//! Face cache, or a GGUF file (`gguf`, dequantized to f32 so it computes what the reference
//! computes; then converted to the compute dtype). The architecture comes from `model::arch::REGISTRY`.

mod gguf;
mod hf;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};

pub use crate::model::dtype::{DtypeChoice, LoadOptions};
use crate::model::hooks::{Tap, TapRecorder};
use crate::model::weights::Weights;
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;

pub use crate::model::arch::build;

/// A model ready to run, with its tokenizer and where it came from.
pub struct LoadedModel {
    pub model: Box<dyn Transformer>,
    pub tokenizer: Option<Tokenizer>,
    /// The file or folder the weights were read from.
    pub path: PathBuf,
    /// "safetensors" or "gguf".
    pub format: String,
    /// How the stored weights were encoded.
    pub storage: String,
}

impl LoadedModel {
    /// The tokenizer, or an error naming the model when it has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| anyhow!("{}: no tokenizer.json next to the model", self.path.display()))
    }
}

/// Loads MODEL: a folder, a `.gguf` file, or a hub id (`org/name`) found in the local cache,
/// in the `auto` compute dtype (f32 on the CPU).
pub fn load_model(spec: &str, device: &Device) -> Result<LoadedModel> {
    load_model_with(spec, &LoadOptions::new(device))
}

/// [`load_model`] with a chosen compute dtype (`ModelInfo::dtype` says what it resolved to).
pub fn load_model_with(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let path = resolve(spec)?;
    let (device, dtype) = (&opts.device, opts.dtype);
    if path.is_dir() {
        hf::load_folder(&path, opts)
    } else if is_gguf(&path)? {
        if !opts.split.is_empty() {
            bail!(
                "{}: --device with several devices needs a safetensors model (GGUF files load on one device)",
                path.display()
            );
        }
        gguf::load_gguf(&path, device, dtype)
    } else if path.extension().is_some_and(|e| e == "safetensors") {
        let dir = path.parent().unwrap_or(Path::new("."));
        hf::load_folder(dir, opts)
    } else {
        bail!(
            "{}: not a model folder, a .gguf file or a .safetensors file",
            path.display()
        )
    }
}

/// A model of the architecture and shapes `config` (a config.json) describes, with random
/// weights made directly on their devices ([`Weights::random`], deterministic per tensor name and
/// `seed`): benchmarks of shapes whose checkpoint would not fit the disk. `auto` resolves as for
/// a stored f32 checkpoint (ask for `--dtype bf16` to run in bf16). The tokenizer is a
/// `tokenizer.json` next to the config, if there is one.
pub fn random_model(config: &Path, opts: &LoadOptions, seed: u64) -> Result<LoadedModel> {
    let cfg = crate::model::config::Config::read(config)?;
    let dtype = opts.dtype.resolve(
        &opts.device,
        crate::model::dtype::Stored::Float(candle_core::DType::F32),
    )?;
    let placement = if opts.split.len() > 1 {
        // Shapes first (nothing allocated), to balance the blocks before any tensor is made.
        let shapes = Weights::random(config.to_path_buf(), &Device::Cpu, dtype, seed, None, true);
        drop(build(&cfg, &shapes, &Device::Cpu)?);
        let made = shapes.made();
        let costs = crate::model::placement::costs_from_tensors(made.iter().map(|(n, e)| (n.as_str(), *e)), dtype);
        Some(crate::model::Placement::balance(opts.split.clone(), &costs)?)
    } else {
        None
    };
    let weights = Weights::random(config.to_path_buf(), &opts.device, dtype, seed, placement, false);
    let model = build(&cfg, &weights, &opts.device)?;
    let tokenizer = tokenizer_if_present(&config.with_file_name("tokenizer.json"), model.info().vocab_size)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        path: config.to_path_buf(),
        format: "random".into(),
        storage: weights.storage.clone(),
    })
}

/// The `tokenizer.json` at `path` when there is one, checked against the model's vocabulary.
pub(crate) fn tokenizer_if_present(path: &Path, vocab_size: usize) -> Result<Option<Tokenizer>> {
    if !path.exists() {
        return Ok(None);
    }
    let t = Tokenizer::from_file(path)?;
    t.check_fits(vocab_size, path)?;
    Ok(Some(t))
}

/// Turns MODEL into a path: as given if it exists, else a snapshot in the HF cache.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    let roots = hf_cache_roots();
    if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/') {
        let folder = format!("models--{}", spec.replace('/', "--"));
        for root in &roots {
            let repo = root.join(&folder);
            if let Some(snap) = snapshot(&repo) {
                return Ok(snap);
            }
        }
    }
    let looked: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    bail!(
        "{spec}: no such file or folder, and no such model in the Hugging Face cache (looked in {})",
        looked.join(", ")
    )
}

fn hf_cache_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(c) = std::env::var("HF_HUB_CACHE") {
        roots.push(PathBuf::from(c));
    }
    if let Ok(h) = std::env::var("HF_HOME") {
        roots.push(PathBuf::from(h).join("hub"));
    }
    if let Ok(home) = std::env::var("HOME") {
        roots.push(PathBuf::from(home).join(".cache/huggingface/hub"));
    }
    roots
}

/// The snapshot `refs/main` points to, else the only (or newest) snapshot.
fn snapshot(repo: &Path) -> Option<PathBuf> {
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let s = repo.join("snapshots").join(rev.trim());
        if s.is_dir() {
            return Some(s);
        }
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(repo.join("snapshots"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    snaps.sort_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    snaps.pop()
}

fn is_gguf(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut magic = [0u8; 4];
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

/// What `jumplens inspect` prints about a model.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub path: String,
    pub format: String,
    #[serde(flatten)]
    pub info: super::ModelInfo,
    pub storage: String,
    pub tokenizer: String,
    /// Which device runs which blocks, when split across devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
}

impl LoadedModel {
    pub fn summary(&self) -> Summary {
        Summary {
            path: self.path.display().to_string(),
            format: self.format.clone(),
            info: self.model.info().clone(),
            storage: self.storage.clone(),
            tokenizer: self
                .tokenizer
                .as_ref()
                .map(|t| t.kind.clone())
                .unwrap_or_else(|| "none".into()),
            placement: self.model.placement().map(|p| p.describe()),
        }
    }

    /// Token ids of `text` (with the tokenizer's special tokens), checked against the context.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.tokenizer()?.encode(text)?;
        if ids.is_empty() {
            bail!("the text tokenizes to no tokens");
        }
        let max = self.model.info().max_positions;
        if ids.len() > max {
            bail!(
                "the text has {} tokens but {}'s context is {max}",
                ids.len(),
                self.path.display()
            );
        }
        Ok(ids)
    }

    /// Token ids of `text` in a batch of one; `mask_position` replaces that token by [MASK].
    fn text_batch(&self, text: &str, mask_position: Option<usize>) -> Result<(Vec<u32>, super::Batch)> {
        let mut ids = self.encode(text)?;
        if let Some(i) = mask_position {
            let tok = self.tokenizer()?;
            let mask = tok
                .mask_id
                .ok_or_else(|| anyhow!("{}: the tokenizer has no [MASK] token", self.path.display()))?;
            if i >= ids.len() {
                bail!("mask position {i} is outside the text's {} tokens", ids.len());
            }
            ids[i] = mask;
        }
        let batch = super::Batch::from_sequences(
            std::slice::from_ref(&ids),
            self.tokenizer()?.pad_id,
            self.model.device(),
        )?;
        Ok((ids, batch))
    }

    /// Runs one text and returns its token ids, h_0..h_L [L+1, T, d] and, when the model has a
    /// head, the logits [T, V]. `mask_position` replaces that token by [MASK] first.
    pub fn text_states(&self, text: &str, mask_position: Option<usize>) -> Result<TextStates> {
        let (ids, batch) = self.text_batch(text, mask_position)?;
        let states = super::hidden_states(self.model.as_ref(), &batch)?;
        let last = states.last().expect("at least h_0").clone();
        // A split model leaves each state on its block's device: stacked on the first.
        let states = states
            .iter()
            .map(|h| super::placement::move_to(h, self.model.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let hidden = Tensor::stack(&states, 0)?.squeeze(1)?;
        let logits = if self.model.info().has_lm_head {
            Some(self.model.readout(&last)?.squeeze(0)?)
        } else {
            None
        };
        Ok(TextStates {
            input_ids: ids,
            hidden_states: hidden,
            logits,
        })
    }

    /// Runs one text and returns the taps named in `names` (TransformerLens names, e.g.
    /// `blocks.3.attn.hook_pattern`, `ln_final.hook_normalized`) without the batch dimension:
    /// [T, d] for residual-stream taps, [H, T, T] for attention patterns, [T, d_ff] for
    /// `mlp.hook_post`. A name the model does not emit is an error listing what it does emit.
    pub fn text_taps<S: AsRef<str>>(
        &self,
        text: &str,
        names: &[S],
        mask_position: Option<usize>,
    ) -> Result<(Vec<u32>, HashMap<String, Tensor>)> {
        if names.is_empty() {
            bail!("no tap names given");
        }
        for n in names {
            if Tap::parse(n.as_ref()).is_none() {
                bail!(
                    "'{}' is not a tap name (examples: hook_embed, blocks.0.hook_resid_pre, \
                     blocks.0.attn.hook_pattern, blocks.0.mlp.hook_post, ln_final.hook_normalized)",
                    n.as_ref()
                );
            }
        }
        let (ids, batch) = self.text_batch(text, mask_position)?;
        let mut rec = TapRecorder::only(names);
        let states = super::hidden_states_with(self.model.as_ref(), &batch, &mut rec)?;
        let last = states.last().expect("at least h_0");
        self.model.final_norm_with(last, &mut rec)?;
        if let Some(missing) = names.iter().find(|n| !rec.seen.contains(n.as_ref())) {
            let in_block_0: Vec<&str> = rec
                .seen
                .iter()
                .filter(|s| !s.starts_with("blocks.") || s.starts_with("blocks.0."))
                .map(|s| s.as_str())
                .collect();
            bail!(
                "{}: the model has no tap '{}' (it has {} blocks and emits {} and the same in every block)",
                self.path.display(),
                missing.as_ref(),
                self.model.info().n_layers,
                in_block_0.join(", ")
            );
        }
        let mut out = HashMap::new();
        for (name, t) in rec.values {
            out.insert(name, t.squeeze(0)?.contiguous()?);
        }
        Ok((ids, out))
    }
}

/// One text's forward pass.
pub struct TextStates {
    pub input_ids: Vec<u32>,
    /// [L+1, T, d], h_L before the final norm.
    pub hidden_states: Tensor,
    /// [T, V] when the model has a head.
    pub logits: Option<Tensor>,
}
