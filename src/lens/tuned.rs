//! The tuned lens (Belrose et al. 2023, the `tuned-lens` package): one affine translator per
//! hidden state l = 0..L-1, `lens_l(h) = h + W_l h + b_l`, read out through the model's own final
//! norm and unembedding; the last state L is read out unchanged.
//!
//! On disk it is tuned-lens's own format, a folder with `config.json` (`TunedLensConfig`:
//! `d_model`, `num_hidden_layers`, `bias`, ...) and `params.pt` (the translators' state dict:
//! `{i}.weight` [d, d] out x in, `{i}.bias` [d]), read by [`crate::data::torch_pickle`] without
//! executing pickle code; jumplens writes the same tensors to `lens.safetensors` beside them.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub mod train;

/// tuned-lens's `TunedLensConfig` (unknown keys are ignored, as tuned-lens does).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TunedLensConfig {
    #[serde(default)]
    pub base_model_name_or_path: String,
    pub d_model: usize,
    pub num_hidden_layers: usize,
    #[serde(default = "default_true")]
    pub bias: bool,
    #[serde(default)]
    pub base_model_revision: Option<String>,
    #[serde(default)]
    pub unembed_hash: Option<String>,
    #[serde(default = "default_lens_type")]
    pub lens_type: String,
}

fn default_true() -> bool {
    true
}

fn default_lens_type() -> String {
    "linear_tuned_lens".to_string()
}

/// A tuned lens: translator l maps hidden state l (0..L-1).
#[derive(Debug, Clone)]
pub struct TunedLens {
    pub config: TunedLensConfig,
    /// `weights[l]` [d, d] f32, out x in (`th.nn.Linear.weight`).
    pub weights: Vec<Tensor>,
    /// `biases[l]` [d] f32 (absent when `config.bias` is false).
    pub biases: Option<Vec<Tensor>>,
    /// The folder it was read from, if any (for error messages).
    pub path: Option<PathBuf>,
}

impl TunedLens {
    /// The lens tuned-lens starts training from: every W and b zero (the logit lens).
    pub fn zeros(base_model: &str, d: usize, n_layers: usize, device: &Device) -> Result<Self> {
        let weights = (0..n_layers)
            .map(|_| Tensor::zeros((d, d), DType::F32, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let biases = (0..n_layers)
            .map(|_| Tensor::zeros(d, DType::F32, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config: TunedLensConfig {
                base_model_name_or_path: base_model.to_string(),
                d_model: d,
                num_hidden_layers: n_layers,
                bias: true,
                base_model_revision: None,
                unembed_hash: None,
                lens_type: default_lens_type(),
            },
            weights,
            biases: Some(biases),
            path: None,
        })
    }

    /// What to call this lens in a message.
    pub fn name(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "the tuned lens".to_string(), |p| p.display().to_string())
    }

    pub fn d(&self) -> usize {
        self.config.d_model
    }

    pub fn n_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    /// `h + h W_l^T + b_l` for states `h` [n, d] of hidden state `layer` (in f32); state L (and
    /// beyond) unchanged.
    pub fn cast(&self, layer: usize, h: &Tensor) -> Result<Tensor> {
        if layer >= self.weights.len() {
            return Ok(h.clone());
        }
        let h = crate::model::layers::to_dtype(h, DType::F32)?;
        let w = &self.weights[layer];
        let w = if w.device().same_device(h.device()) {
            w.clone()
        } else {
            w.to_device(h.device())?
        };
        let mut y = (&h + h.matmul(&w.t()?)?)?;
        if let Some(b) = &self.biases {
            y = y.broadcast_add(&b[layer].to_device(h.device())?)?;
        }
        Ok(y)
    }

    /// The lens on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            config: self.config.clone(),
            weights: self
                .weights
                .iter()
                .map(|w| w.to_device(device))
                .collect::<candle_core::Result<_>>()?,
            biases: match &self.biases {
                Some(b) => Some(
                    b.iter()
                        .map(|t| t.to_device(device))
                        .collect::<candle_core::Result<_>>()?,
                ),
                None => None,
            },
            path: self.path.clone(),
        })
    }

    /// Refuses a lens made for another model shape (one line naming the folder).
    pub fn check_model(&self, n_layers: usize, d_model: usize) -> Result<()> {
        if self.d() != d_model {
            bail!(
                "{}: a lens for width {} but the model's width is {d_model}",
                self.name(),
                self.d()
            );
        }
        if self.n_layers() != n_layers {
            bail!(
                "{}: a lens for {} layers but the model has {n_layers}",
                self.name(),
                self.n_layers()
            );
        }
        Ok(())
    }

    /// The state dict tuned-lens saves: `{i}.weight`, `{i}.bias` in its order.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, w) in self.weights.iter().enumerate() {
            out.push((format!("{i}.weight"), w.clone()));
            if let Some(b) = &self.biases {
                out.push((format!("{i}.bias"), b[i].clone()));
            }
        }
        out
    }

    /// Builds the lens from `config` and a state dict, checking keys and shapes.
    pub fn from_state_dict(config: TunedLensConfig, tensors: Vec<(String, Tensor)>, what: &str) -> Result<Self> {
        let (d, n) = (config.d_model, config.num_hidden_layers);
        if d == 0 || n == 0 {
            bail!("{what}: config.json has d_model {d}, num_hidden_layers {n}");
        }
        let mut weights: Vec<Option<Tensor>> = vec![None; n];
        let mut biases: Vec<Option<Tensor>> = vec![None; n];
        for (key, t) in tensors {
            let (idx, kind) = key
                .split_once('.')
                .and_then(|(i, k)| i.parse::<usize>().ok().map(|i| (i, k.to_string())))
                .ok_or_else(|| anyhow!("{what}: unexpected tensor '{key}' (expected {{i}}.weight / {{i}}.bias)"))?;
            if idx >= n {
                bail!(
                    "{what}: tensor '{key}' is for translator {idx} but config.json says {n} layers (translators 0..{})",
                    n - 1
                );
            }
            let (slot, shape): (&mut Option<Tensor>, Vec<usize>) = match kind.as_str() {
                "weight" => (&mut weights[idx], vec![d, d]),
                "bias" if config.bias => (&mut biases[idx], vec![d]),
                "bias" => bail!("{what}: tensor '{key}' present but config.json says bias: false"),
                _ => bail!("{what}: unexpected tensor '{key}' (expected {{i}}.weight / {{i}}.bias)"),
            };
            if t.dims() != shape.as_slice() {
                bail!(
                    "{what}: tensor '{key}' has shape {:?}, expected {shape:?} (d_model {d})",
                    t.dims()
                );
            }
            *slot = Some(t.to_dtype(DType::F32)?);
        }
        let weights = weights
            .into_iter()
            .enumerate()
            .map(|(i, w)| w.ok_or_else(|| anyhow!("{what}: tensor '{i}.weight' missing ({n} layers)")))
            .collect::<Result<Vec<_>>>()?;
        let biases = if config.bias {
            Some(
                biases
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| b.ok_or_else(|| anyhow!("{what}: tensor '{i}.bias' missing ({n} layers)")))
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        Ok(Self {
            config,
            weights,
            biases,
            path: None,
        })
    }

    /// Reads a lens folder in tuned-lens's format (`config.json` + `params.pt`).
    pub fn read_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&cfg_path).with_context(|| format!("{}: cannot read", cfg_path.display()))?;
        let config: TunedLensConfig = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not a tuned-lens config ({e})", cfg_path.display()))?;
        if config.lens_type != "linear_tuned_lens" {
            bail!(
                "{}: lens_type '{}' (only linear_tuned_lens is supported)",
                cfg_path.display(),
                config.lens_type
            );
        }
        let params = dir.join("params.pt");
        let tensors = crate::data::torch_pickle::read_state_dict(&params)?;
        let mut lens = Self::from_state_dict(config, tensors, &params.display().to_string())?;
        lens.path = Some(dir.to_path_buf());
        Ok(lens)
    }

    /// Writes `config.json`, `params.pt` (tuned-lens's format) and `lens.safetensors` (the same
    /// tensors) into `dir`, each atomically.
    pub fn write_dir(&self, dir: &Path) -> Result<()> {
        let sd = self.state_dict();
        for (k, t) in &sd {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            if v.iter().any(|x| !x.is_finite()) {
                bail!("{}: tensor '{k}' has non-finite values; nothing written", dir.display());
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
        crate::data::torch_pickle::write_state_dict(&dir.join("params.pt"), &sd)?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("d_model".to_string(), self.d().to_string());
        meta.insert("num_hidden_layers".to_string(), self.n_layers().to_string());
        crate::data::io::write_safetensors(&dir.join("lens.safetensors"), &sd, Some(meta))?;
        crate::data::io::write_json(&dir.join("config.json"), &self.config)
    }
}
