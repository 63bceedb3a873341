//! The one maps type: fitted linear shortcuts `h_l' ≈ A h_l (+ b)` keyed by (source, target),
//! as the fit returns them ([`crate::lens::fit::fit_all_pairs`]) and as every later stage
//! (r^2, predict, early exit, sub-modules, peek) uses them.
//!
//! On disk (`maps.safetensors`) there is one tensor `mat.{l}.{l'}` [d, d] per fitted pair, laid
//! out so that `mapped = A @ h` (out x in, like scikit-learn's `coef_`), and for the intercept
//! variant a `bias.{l}.{l'}` [d] beside it. The header's metadata names the model (sha256,
//! layers, width) so maps are never applied to another model by mistake.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::data::run::ModelRecord;

/// One fitted shortcut `h_target ≈ a @ h_source (+ intercept)`.
#[derive(Clone, Debug)]
pub struct PairMap {
    /// Source state l.
    pub source: usize,
    /// Target state l' (> l).
    pub target: usize,
    /// `[d, d]` f32, out x in (scikit-learn's `coef_`).
    pub a: Tensor,
    /// `[d]` f32 when fitted with an intercept.
    pub intercept: Option<Tensor>,
}

impl PairMap {
    /// `x @ A^T (+ b)` for states `x` [n, d] already on the map's device (cast to the map's
    /// dtype: a bf16 model's states are mapped in f32).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x = crate::model::layers::to_dtype(x, self.a.dtype())?;
        let y = x.matmul(&self.a.t()?)?;
        Ok(match &self.intercept {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// A set of fitted maps, sorted by (source, target), with the metadata of the file they were
/// read from or will be written to.
///
/// ```
/// use jumplens::lens::fit::{fit_all_pairs, synthetic_states, FitOptions};
/// let h = synthetic_states(3, 200, 8, 1)?;
/// let (maps, _report) = fit_all_pairs(&h, &[(0, 2), (1, 2)], &FitOptions::default())?;
/// let pred = maps.predict(1, 2, &h.get(1)?)?; // [200, 8], approximates h_2
/// assert_eq!(pred.dims(), &[200, 8]);
/// assert!(maps.get(0, 1).is_none());
/// assert_eq!(maps.len(), 2);
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Maps {
    /// Width d (every map is [d, d]).
    pub d: usize,
    /// One entry per pair, sorted by (source, target).
    pub pairs: Vec<PairMap>,
    /// Header metadata (model sha256, n_layers, d_model, fit options, ...).
    pub metadata: HashMap<String, String>,
    /// The file the maps were read from, if any (for error messages).
    pub path: Option<PathBuf>,
}

impl Maps {
    /// Maps from fitted pairs (sorted here), without metadata.
    pub fn new(d: usize, mut pairs: Vec<PairMap>) -> Self {
        pairs.sort_by_key(|p| (p.source, p.target));
        Self {
            d,
            pairs,
            metadata: HashMap::new(),
            path: None,
        }
    }

    /// What to call these maps in a message: their file, or "the maps".
    pub fn name(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "the maps".to_string(), |p| p.display().to_string())
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The map for (source, target), if fitted.
    pub fn get(&self, source: usize, target: usize) -> Option<&PairMap> {
        self.pairs
            .binary_search_by(|p| (p.source, p.target).cmp(&(source, target)))
            .ok()
            .map(|i| &self.pairs[i])
    }

    /// The map for (source, target), or a one-line error naming the file.
    pub fn require(&self, source: usize, target: usize) -> Result<&PairMap> {
        self.get(source, target)
            .ok_or_else(|| anyhow!("{}: no map {source} -> {target}", self.name()))
    }

    pub fn has_intercept(&self) -> bool {
        self.pairs.iter().any(|p| p.intercept.is_some())
    }

    /// Applies the map (source, target) to `x` [n, d]: `x @ A^T (+ b)`, [n, d], converting the
    /// map to `x`'s device and dtype.
    pub fn predict(&self, source: usize, target: usize, x: &Tensor) -> Result<Tensor> {
        let p = self
            .get(source, target)
            .with_context(|| format!("no map fitted for ({source}, {target})"))?;
        let a = p.a.to_device(x.device())?.to_dtype(x.dtype())?;
        let y = x.matmul(&a.t()?)?;
        Ok(match &p.intercept {
            Some(b) => y.broadcast_add(&b.to_device(x.device())?.to_dtype(x.dtype())?)?,
            None => y,
        })
    }

    /// Writes the maps atomically (`mat.{l}.{l'}`, `bias.{l}.{l'}`) with `metadata` in the
    /// header.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(self.pairs.len() * 2);
        for p in &self.pairs {
            tensors.push((format!("mat.{}.{}", p.source, p.target), p.a.to_device(&Device::Cpu)?));
        }
        for p in &self.pairs {
            if let Some(b) = &p.intercept {
                tensors.push((format!("bias.{}.{}", p.source, p.target), b.to_device(&Device::Cpu)?));
            }
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
        let mut mats = std::collections::BTreeMap::new();
        let mut biases = std::collections::BTreeMap::new();
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
                "mat" => mats.insert(pair, t),
                "bias" => biases.insert(pair, t),
                _ => bail!("{}: unexpected tensor '{name}'", path.display()),
            };
        }
        let Some(first) = mats.values().next() else {
            bail!("{}: contains no maps", path.display());
        };
        let d = match first.dims() {
            [d, e] if d == e => *d,
            other => bail!("{}: maps are {other:?}, not square", path.display()),
        };
        let mut pairs = Vec::with_capacity(mats.len());
        for ((source, target), a) in mats {
            if a.dims() != [d, d] {
                bail!(
                    "{}: map {source} -> {target} is {:?}, the others [{d}, {d}]",
                    path.display(),
                    a.dims()
                );
            }
            let intercept = biases.remove(&(source, target));
            if let Some(b) = &intercept {
                if b.dims() != [d] {
                    bail!(
                        "{}: bias {source} -> {target} is {:?}, not [{d}]",
                        path.display(),
                        b.dims()
                    );
                }
            }
            pairs.push(PairMap {
                source,
                target,
                a,
                intercept,
            });
        }
        if let Some((l, l2)) = biases.keys().next() {
            bail!("{}: bias {l} -> {l2} has no map", path.display());
        }
        Ok(Self {
            d,
            pairs,
            metadata,
            path: Some(path.to_path_buf()),
        })
    }

    /// Refuses maps fitted on another model or with other dimensions.
    pub fn check_model(&self, model: &ModelRecord) -> Result<()> {
        if self.d != model.d_model {
            bail!(
                "{}: maps are [{}, {}] but the model's width is {}",
                self.name(),
                self.d,
                self.d,
                model.d_model
            );
        }
        if let Some(n) = self.metadata.get("n_layers") {
            if n != &model.n_layers.to_string() {
                bail!(
                    "{}: maps are for a {n}-layer model, the run's model has {}",
                    self.name(),
                    model.n_layers
                );
            }
        }
        if let Some(sha) = self.metadata.get("model_sha256") {
            if sha != &model.sha256 {
                bail!(
                    "{}: maps were fitted on another model (sha256 {}…, the run's is {}…)",
                    self.name(),
                    &sha[..12.min(sha.len())],
                    &model.sha256[..12.min(model.sha256.len())]
                );
            }
        }
        Ok(())
    }

    /// Refuses maps whose width or layer count differ from a loaded model's.
    pub fn check_model_info(&self, info: &crate::model::ModelInfo) -> Result<()> {
        if self.d != info.d_model {
            bail!(
                "{}: maps are [{}, {}] but the model's width is {}",
                self.name(),
                self.d,
                self.d,
                info.d_model
            );
        }
        if let Some(n) = self.metadata.get("n_layers") {
            if n != &info.n_layers.to_string() {
                bail!(
                    "{}: maps are for a {n}-layer model, this model has {}",
                    self.name(),
                    info.n_layers
                );
            }
        }
        Ok(())
    }

    /// Keeps only the maps into state `target`: the jumps to the last layer are all that
    /// predict and early exit use of an all-pairs fit.
    pub fn into_target(mut self, target: usize) -> Self {
        self.pairs.retain(|p| p.target == target);
        self
    }

    /// Copies every map to `device` (for applying them next to the model).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let pairs = self
            .pairs
            .iter()
            .map(|p| {
                Ok(PairMap {
                    source: p.source,
                    target: p.target,
                    a: p.a.to_device(device)?,
                    intercept: p.intercept.as_ref().map(|b| b.to_device(device)).transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            d: self.d,
            pairs,
            metadata: self.metadata.clone(),
            path: self.path.clone(),
        })
    }
}
