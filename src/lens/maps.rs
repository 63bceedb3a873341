//! Fitted linear maps on disk: `maps.safetensors` holds one tensor `mat.{l}.{l'}` [d, d] per
//! fitted pair, laid out so that `mapped = A @ h` (out x in, like scikit-learn's `coef_`), and
//! for the intercept variant a `bias.{l}.{l'}` [d] beside it. The header's metadata names the
//! model (sha256, layers, width) so maps are never applied to another model by mistake.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::data::run::ModelRecord;

/// A set of fitted maps keyed by (source, target) state index.
#[derive(Debug, Clone)]
pub struct MapSet {
    pub maps: BTreeMap<(usize, usize), Tensor>,
    pub biases: BTreeMap<(usize, usize), Tensor>,
    /// Header metadata (model sha256, n_layers, d_model, fit options, ...).
    pub metadata: HashMap<String, String>,
    pub path: PathBuf,
}

impl MapSet {
    /// The map for (l, l'), with its bias when the maps have intercepts.
    pub fn get(&self, l: usize, l2: usize) -> Option<(&Tensor, Option<&Tensor>)> {
        self.maps.get(&(l, l2)).map(|a| (a, self.biases.get(&(l, l2))))
    }

    pub fn has_intercept(&self) -> bool {
        !self.biases.is_empty()
    }

    /// Writes the maps atomically with `metadata` in the header.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(self.maps.len() * 2);
        for ((l, l2), a) in &self.maps {
            tensors.push((format!("mat.{l}.{l2}"), a.clone()));
        }
        for ((l, l2), b) in &self.biases {
            tensors.push((format!("bias.{l}.{l2}"), b.clone()));
        }
        crate::data::io::write_safetensors(path, &tensors, Some(self.metadata.clone()))
    }

    /// Reads a maps file.
    pub fn read(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("{}: no such maps file (run `jumplens fit` first)", path.display());
        }
        // Only the header is needed here; the tensors are read once, below.
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: read-only map of a file this process does not modify while it is mapped.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors = crate::data::io::read_safetensors(path)?;
        let mut maps = BTreeMap::new();
        let mut biases = BTreeMap::new();
        for (name, t) in tensors {
            let mut parts = name.split('.');
            let kind = parts.next().unwrap_or("");
            let pair = (|| -> Option<(usize, usize)> {
                let l = parts.next()?.parse().ok()?;
                let l2 = parts.next()?.parse().ok()?;
                Some((l, l2))
            })()
            .ok_or_else(|| anyhow!("{}: unexpected tensor '{name}'", path.display()))?;
            match kind {
                "mat" => maps.insert(pair, t),
                "bias" => biases.insert(pair, t),
                _ => bail!("{}: unexpected tensor '{name}'", path.display()),
            };
        }
        if maps.is_empty() {
            bail!("{}: contains no maps", path.display());
        }
        Ok(Self {
            maps,
            biases,
            metadata,
            path: path.to_path_buf(),
        })
    }

    /// Refuses maps fitted on another model or with other dimensions.
    pub fn check_model(&self, model: &ModelRecord) -> Result<()> {
        let d = self.maps.values().next().map(|a| a.dims().to_vec()).unwrap_or_default();
        if d != [model.d_model, model.d_model] {
            bail!(
                "{}: maps are {:?} but the model's width is {}",
                self.path.display(),
                d,
                model.d_model
            );
        }
        if let Some(n) = self.metadata.get("n_layers") {
            if n != &model.n_layers.to_string() {
                bail!(
                    "{}: maps are for a {n}-layer model, the run's model has {}",
                    self.path.display(),
                    model.n_layers
                );
            }
        }
        if let Some(sha) = self.metadata.get("model_sha256") {
            if sha != &model.sha256 {
                bail!(
                    "{}: maps were fitted on another model (sha256 {}…, the run's is {}…)",
                    self.path.display(),
                    &sha[..12.min(sha.len())],
                    &model.sha256[..12.min(model.sha256.len())]
                );
            }
        }
        Ok(())
    }

    /// Refuses maps whose width or layer count differ from a loaded model's.
    pub fn check_model_info(&self, info: &crate::model::ModelInfo) -> Result<()> {
        let d = self.maps.values().next().map(|a| a.dims().to_vec()).unwrap_or_default();
        if d != [info.d_model, info.d_model] {
            bail!(
                "{}: maps are {:?} but the model's width is {}",
                self.path.display(),
                d,
                info.d_model
            );
        }
        if let Some(n) = self.metadata.get("n_layers") {
            if n != &info.n_layers.to_string() {
                bail!(
                    "{}: maps are for a {n}-layer model, this model has {}",
                    self.path.display(),
                    info.n_layers
                );
            }
        }
        Ok(())
    }

    /// Keeps only the maps (and biases) into state `target`: the jumps to the last layer are
    /// all that predict and early exit use of an all-pairs fit.
    pub fn into_target(mut self, target: usize) -> Self {
        self.maps.retain(|k, _| k.1 == target);
        self.biases.retain(|k, _| k.1 == target);
        self
    }

    /// Copies every map to `device` (for applying them next to the model).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let mv = |m: &BTreeMap<(usize, usize), Tensor>| -> Result<BTreeMap<(usize, usize), Tensor>> {
            m.iter().map(|(k, t)| Ok((*k, t.to_device(device)?))).collect()
        };
        Ok(Self {
            maps: mv(&self.maps)?,
            biases: mv(&self.biases)?,
            metadata: self.metadata.clone(),
            path: self.path.clone(),
        })
    }
}
