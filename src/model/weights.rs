//! Named f32 weight tensors read from safetensors or GGUF, with errors that name the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};

use crate::error::one_line;

/// All tensors of a checkpoint, converted to f32, under their Hugging Face names.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Where the tensors came from, for error messages.
    source: PathBuf,
    /// How the stored tensors were encoded (e.g. "F32", "BF16", "Q4_1 x 120, F32 x 61").
    pub storage: String,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, source: PathBuf, storage: String) -> Self {
        Self {
            tensors,
            source,
            storage,
        }
    }

    /// Reads one or more safetensors shards (later shards win on duplicate names).
    pub fn from_safetensors(paths: &[PathBuf], device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        let mut dtypes: HashMap<String, usize> = HashMap::new();
        for path in paths {
            // SAFETY: the file is only read; a concurrent writer would be a user error.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                .map_err(|e| anyhow!("{}: not a valid safetensors file ({})", path.display(), one_line(&e)))?;
            for (name, view) in st.tensors() {
                *dtypes.entry(format!("{:?}", view.dtype())).or_default() += 1;
                let t = st
                    .load(&name, device)
                    .and_then(super::layers::f32)
                    .map_err(|e| anyhow!("{}: tensor {name}: {}", path.display(), one_line(&e)))?;
                tensors.insert(name, t);
            }
        }
        let source = if paths.len() == 1 {
            paths[0].clone()
        } else {
            paths[0].parent().unwrap_or(Path::new(".")).to_path_buf()
        };
        let mut storage: Vec<String> = dtypes.into_iter().map(|(k, v)| format!("{k} x {v}")).collect();
        storage.sort();
        Ok(Self::new(tensors, source, storage.join(", ")))
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn n_params(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }

    /// The tensor `name`, which must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: missing tensor '{name}'", self.source.display()))?;
        if t.dims() != shape {
            bail!(
                "{}: tensor '{name}' has shape {:?} but the config implies {:?}",
                self.source.display(),
                t.dims(),
                shape
            );
        }
        Ok(t.clone())
    }

    /// The first of `names` that exists (for checkpoints that spell a tensor several ways).
    pub fn get_any(&self, names: &[&str], shape: &[usize]) -> Result<Tensor> {
        for n in names {
            if self.contains(n) {
                return self.get(n, shape);
            }
        }
        bail!("{}: missing tensor '{}'", self.source.display(), names.join("' or '"))
    }

    /// The tensor `name` if present (with shape check), else None.
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            Ok(Some(self.get(name, shape)?))
        } else {
            Ok(None)
        }
    }

    /// These weights with the tensors in `split` replaced by their parts (fused checkpoints:
    /// `query_key_value` -> q, k, v). Tensors are shared, so this copies nothing, and the
    /// parameter count is unchanged because each fused tensor is removed.
    pub fn with_split(&self, split: Vec<(String, Vec<(String, Tensor)>)>) -> Weights {
        let mut tensors = self.tensors.clone();
        for (fused, parts) in split {
            tensors.remove(&fused);
            tensors.extend(parts);
        }
        Weights::new(tensors, self.source.clone(), self.storage.clone())
    }
}
