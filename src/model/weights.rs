//! Named weight tensors read from safetensors or GGUF in the compute dtype, with errors that
//! name the file.
//!
//! Safetensors shards are memory-mapped and each tensor is copied once, already on its device,
//! then converted to the compute dtype; the mapped pages of a copied tensor are released at once
//! (`MADV_DONTNEED`), so loading a bf16 checkpoint in bf16 holds one copy of it, never an f32 one.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::dtype::{label, DtypeChoice, Stored};
use crate::error::one_line;

/// All tensors of a checkpoint, in the compute dtype, under their Hugging Face names.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Tensors stored in a dtype that is not floating point (kept out; an error if asked for).
    unconvertible: HashMap<String, String>,
    /// Where the tensors came from, for error messages.
    source: PathBuf,
    /// How the stored tensors were encoded (e.g. "F32", "BF16", "Q4_1 x 120, F32 x 61").
    pub storage: String,
    /// The compute dtype every tensor was converted to.
    dtype: DType,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, source: PathBuf, storage: String, dtype: DType) -> Self {
        Self {
            tensors,
            unconvertible: HashMap::new(),
            source,
            storage,
            dtype,
        }
    }

    /// Reads one or more safetensors shards (later shards win on duplicate names) in the dtype
    /// `choice` resolves to for the checkpoint's stored dtype on `device`.
    pub fn from_safetensors(paths: &[PathBuf], device: &Device, choice: DtypeChoice) -> Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        for path in paths {
            let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
            // SAFETY: the file is only read; a concurrent writer would be a user error.
            let mmap = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| anyhow!("{}: cannot map ({})", path.display(), one_line(&e)))?;
            safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| anyhow!("{}: not a valid safetensors file ({})", path.display(), one_line(&e)))?;
            maps.push(mmap);
        }
        // The stored dtypes first: `auto` follows the float dtype holding most elements.
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut float_elems: HashMap<DType, usize> = HashMap::new();
        for mmap in &maps {
            let st = safetensors::SafeTensors::deserialize(mmap).expect("checked above");
            for (_, view) in st.tensors() {
                *counts.entry(format!("{:?}", view.dtype())).or_default() += 1;
                if let Some(dt) = float_dtype(view.dtype()) {
                    *float_elems.entry(dt).or_default() += view.shape().iter().product::<usize>();
                }
            }
        }
        let major = float_elems
            .iter()
            .max_by_key(|(dt, n)| (**n, label(**dt)))
            .map_or(DType::F32, |(dt, _)| *dt);
        let dtype = choice.resolve(device, Stored::Float(major))?;
        let mut tensors = HashMap::new();
        let mut unconvertible = HashMap::new();
        for (path, mmap) in paths.iter().zip(&maps) {
            let st = safetensors::SafeTensors::deserialize(mmap).expect("checked above");
            for (name, view) in st.tensors() {
                let Some(stored) = float_dtype(view.dtype()) else {
                    unconvertible.insert(name, format!("{:?}", view.dtype()));
                    continue;
                };
                let t = Tensor::from_raw_buffer(view.data(), stored, view.shape(), &Device::Cpu)
                    .and_then(|t| t.to_device(device))
                    .and_then(|t| if t.dtype() == dtype { Ok(t) } else { t.to_dtype(dtype) })
                    .map_err(|e| anyhow!("{}: tensor {name}: {}", path.display(), one_line(&e)))?;
                release_pages(mmap, view.data());
                tensors.insert(name, t);
            }
        }
        let source = if paths.len() == 1 {
            paths[0].clone()
        } else {
            paths[0].parent().unwrap_or(Path::new(".")).to_path_buf()
        };
        let mut storage: Vec<String> = counts.into_iter().map(|(k, v)| format!("{k} x {v}")).collect();
        storage.sort();
        let mut w = Self::new(tensors, source, storage.join(", "), dtype);
        w.unconvertible = unconvertible;
        Ok(w)
    }

    /// The compute dtype of the tensors.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.unconvertible.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn n_params(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }

    /// The tensor `name`, which must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(stored) = self.unconvertible.get(name) {
            bail!(
                "{}: tensor '{name}' is stored as {stored}, not floating point: it cannot be converted to \
                 the compute dtype (--dtype {})",
                self.source.display(),
                label(self.dtype)
            );
        }
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
        Weights::new(tensors, self.source.clone(), self.storage.clone(), self.dtype)
    }
}

/// The candle dtype of a floating-point safetensors dtype (None for integers, booleans, ...).
fn float_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Drops the mapped pages of a tensor already copied out of `mmap`, so they stop counting
/// toward the resident set (the page cache keeps them while memory allows).
fn release_pages(mmap: &memmap2::Mmap, data: &[u8]) {
    #[cfg(unix)]
    {
        let offset = data.as_ptr() as usize - mmap.as_ptr() as usize;
        // SAFETY: the mapping is read-only and private; its pages are re-read from the file if
        // touched again, and no reference into them outlives this call's caller's copy.
        let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len()) };
    }
    #[cfg(not(unix))]
    let _ = (mmap, data);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bf16 file loads in bf16 (auto on the CPU = f32), and an integer tensor asked for as a
    /// weight is an error naming the file, the tensor and --dtype.
    #[test]
    fn stored_dtypes_convert_and_integers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let w = Tensor::new(&[1.5f32, -2.25, 3.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let ids = Tensor::new(&[0i64, 1, 2], &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), w), ("ids".to_string(), ids)]), &path)
            .unwrap();
        let bf = Weights::from_safetensors(std::slice::from_ref(&path), &Device::Cpu, DtypeChoice::Bf16).unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
        assert_eq!(bf.get("w", &[3]).unwrap().dtype(), DType::BF16);
        let auto = Weights::from_safetensors(std::slice::from_ref(&path), &Device::Cpu, DtypeChoice::Auto).unwrap();
        let v: Vec<f32> = auto.get("w", &[3]).unwrap().to_vec1().unwrap();
        assert_eq!(v, [1.5, -2.25, 3.0]);
        assert!(auto.contains("ids"));
        let e = auto.get("ids", &[3]).unwrap_err().to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("'ids'") && e.contains("I64") && e.contains("--dtype f32"),
            "{e}"
        );
    }
}
