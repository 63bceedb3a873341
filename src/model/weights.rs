//! Named weight tensors read from safetensors or GGUF in the compute dtype, with errors that
//! name the file.
//!
//! Safetensors shards are memory-mapped and each tensor is copied once, already on its device,
//! then converted to the compute dtype; the mapped pages of a copied tensor are released at once
//! (`MADV_DONTNEED`), so loading a bf16 checkpoint in bf16 holds one copy of it, never an f32 one.
//! On one CUDA device the copy goes through pinned staging buffers ([`super::pinned_upload`]).
//! A model split across devices is placed before anything is copied (from the shapes in the
//! headers), and each tensor goes straight to the device of its block.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::dtype::{label, DtypeChoice, Stored};
use super::placement::{self, Placement};
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
    /// When the model is split across devices: which blocks each device runs (every tensor
    /// was loaded onto the device of its block).
    placement: Option<Placement>,
    /// Weights made on demand instead of read (`bench forward --random-config`).
    random: Option<Random>,
}

/// Tensors made when asked for: every name exists, with the shape the architecture asks.
struct Random {
    /// Where tensors go when unsplit.
    device: Device,
    /// Shapes only (zero-memory broadcast views on the CPU), recording what was asked: the
    /// placement is balanced from this record before any real tensor is made.
    shapes_only: bool,
    seed: u64,
    /// (name, elements) of every tensor made, in order.
    made: std::sync::Mutex<Vec<(String, usize)>>,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, source: PathBuf, storage: String, dtype: DType) -> Self {
        Self {
            tensors,
            unconvertible: HashMap::new(),
            source,
            storage,
            dtype,
            placement: None,
            random: None,
        }
    }

    /// Random weights in `dtype` for whatever tensors the architecture asks for, deterministic
    /// per tensor name and `seed` (1-D weights, the norms, are ones; biases zeros; matrices
    /// uniform in ±1/sqrt(fan-in)); each tensor is made directly on its device (`placement`, else
    /// `device`). `source` names the config in messages. With `shapes_only` nothing is allocated:
    /// the tensors are broadcast views, for [`Weights::made`] to cost a placement.
    pub fn random(
        source: PathBuf,
        device: &Device,
        dtype: DType,
        seed: u64,
        placement: Option<Placement>,
        shapes_only: bool,
    ) -> Self {
        let mut w = Self::new(HashMap::new(), source, format!("random (seed {seed})"), dtype);
        w.placement = placement;
        w.random = Some(Random {
            device: device.clone(),
            shapes_only,
            seed,
            made: std::sync::Mutex::new(Vec::new()),
        });
        w
    }

    /// The (name, elements) of every random tensor made so far.
    pub fn made(&self) -> Vec<(String, usize)> {
        self.random
            .as_ref()
            .map(|r| r.made.lock().expect("not poisoned").clone())
            .unwrap_or_default()
    }

    /// A random tensor `name` of `shape` (see [`Weights::random`]).
    fn make_random(&self, r: &Random, name: &str, shape: &[usize]) -> Result<Tensor> {
        let elems: usize = shape.iter().product();
        r.made.lock().expect("not poisoned").push((name.to_string(), elems));
        let fail = |e: candle_core::Error| anyhow!("{}: random tensor {name}: {}", self.source.display(), one_line(&e));
        if r.shapes_only {
            return Tensor::zeros((), self.dtype, &Device::Cpu)
                .and_then(|t| t.broadcast_as(shape))
                .map_err(fail);
        }
        let device = match &self.placement {
            None => &r.device,
            Some(p) => match placement::tensor_block(name) {
                Some(l) => p.block_device(l),
                None if placement::is_input_embedding(name) => p.first(),
                None => p.last(),
            },
        };
        if shape.len() == 1 {
            let fill = if name.ends_with(".bias") { 0.0 } else { 1.0 };
            return Tensor::full(fill, shape, device)
                .and_then(|t| t.to_dtype(self.dtype))
                .map_err(fail);
        }
        let bound = 1.0 / (*shape.last().unwrap_or(&1) as f64).sqrt();
        // One seed per tensor (its name hashed with the run's seed): the same tensor whatever
        // the device or the order of the loads.
        let tensor_seed = name.bytes().fold(r.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let t = if device.is_cpu() {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(tensor_seed);
            let v: Vec<f32> = (0..elems).map(|_| rng.random_range(-bound..bound) as f32).collect();
            Tensor::from_vec(v, shape, device)
        } else {
            device
                .set_seed(tensor_seed)
                .and_then(|_| Tensor::rand(-bound as f32, bound as f32, shape, device))
        };
        t.and_then(|t| t.to_dtype(self.dtype)).map_err(fail)
    }

    /// Reads one or more safetensors shards (later shards win on duplicate names) in the dtype
    /// `choice` resolves to for the checkpoint's stored dtype on `device`.
    pub fn from_safetensors(paths: &[PathBuf], device: &Device, choice: DtypeChoice) -> Result<Self> {
        Self::read_safetensors(paths, std::slice::from_ref(device), choice)
    }

    /// [`Weights::from_safetensors`] split across `devices` (at least two): the
    /// blocks are balanced over them by memory ([`Placement::balance`]) and each tensor is copied
    /// straight onto the device of its block (the embedding onto the first, the final norm and the
    /// head onto the last), never through one device first.
    pub fn from_safetensors_split(paths: &[PathBuf], devices: &[Device], choice: DtypeChoice) -> Result<Self> {
        Self::read_safetensors(paths, devices, choice)
    }

    fn read_safetensors(paths: &[PathBuf], devices: &[Device], choice: DtypeChoice) -> Result<Self> {
        let device = &devices[0];
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
        let placement = if devices.len() > 1 {
            let mut sizes = Vec::new();
            for mmap in &maps {
                let st = safetensors::SafeTensors::deserialize(mmap).expect("checked above");
                for (name, view) in st.tensors() {
                    sizes.push((name, view.shape().iter().product::<usize>()));
                }
            }
            let costs = placement::costs_from_tensors(sizes.iter().map(|(n, e)| (n.as_str(), *e)), dtype);
            Some(Placement::balance(devices.to_vec(), &costs)?)
        } else {
            None
        };
        let device_of = |name: &str| -> &Device {
            match &placement {
                None => device,
                Some(p) => match placement::tensor_block(name) {
                    Some(l) => p.block_device(l),
                    None if placement::is_input_embedding(name) => p.first(),
                    None => p.last(),
                },
            }
        };
        let mut tensors = HashMap::new();
        let mut unconvertible = HashMap::new();
        // One CUDA device: through pinned staging buffers filled by every core (see
        // `pinned_upload`); elsewhere candle's copy.
        #[cfg(feature = "cuda")]
        let mut pinned = match (&placement, device) {
            (None, Device::Cuda(d)) => Some(super::pinned_upload::PinnedUploader::new(d)?),
            _ => None,
        };
        for (path, mmap) in paths.iter().zip(&maps) {
            let st = safetensors::SafeTensors::deserialize(mmap).expect("checked above");
            for (name, view) in st.tensors() {
                let Some(stored) = float_dtype(view.dtype()) else {
                    unconvertible.insert(name, format!("{:?}", view.dtype()));
                    continue;
                };
                let on_device = || -> Result<Tensor> {
                    Ok(
                        Tensor::from_raw_buffer(view.data(), stored, view.shape(), &Device::Cpu)?
                            .to_device(device_of(&name))?,
                    )
                };
                #[cfg(feature = "cuda")]
                let t = match pinned.as_mut() {
                    Some(up) => up.upload(view.data(), stored, view.shape()),
                    None => on_device(),
                };
                #[cfg(not(feature = "cuda"))]
                let t = on_device();
                let t = t
                    .and_then(|t| Ok(if t.dtype() == dtype { t } else { t.to_dtype(dtype)? }))
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
        w.placement = placement;
        Ok(w)
    }

    /// The split across devices the tensors were loaded with (None: one device).
    pub fn placement(&self) -> Option<&Placement> {
        self.placement.as_ref()
    }

    /// The compute dtype of the tensors.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.unconvertible.contains_key(name) || self.random.is_some()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn n_params(&self) -> usize {
        let made: usize = self.made().iter().map(|(_, n)| n).sum();
        self.tensors.values().map(|t| t.elem_count()).sum::<usize>() + made
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
        let t = match (self.tensors.get(name), &self.random) {
            (Some(t), _) => t,
            (None, Some(r)) => return self.make_random(r, name, shape),
            (None, None) => bail!("{}: missing tensor '{name}'", self.source.display()),
        };
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
        let fused_names: Vec<String> = split.iter().map(|(f, _)| f.clone()).collect();
        for (fused, parts) in split {
            tensors.remove(&fused);
            tensors.extend(parts);
        }
        let mut w = Weights::new(tensors, self.source.clone(), self.storage.clone(), self.dtype);
        w.placement = self.placement.clone();
        w.random = self.random.as_ref().map(|r| Random {
            device: r.device.clone(),
            shapes_only: r.shapes_only,
            seed: r.seed,
            // A fused random tensor counts through its parts only.
            made: std::sync::Mutex::new(
                r.made
                    .lock()
                    .expect("not poisoned")
                    .iter()
                    .filter(|(n, _)| !fused_names.contains(n))
                    .cloned()
                    .collect(),
            ),
        });
        w
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
