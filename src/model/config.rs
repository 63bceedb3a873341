//! Reading Hugging Face `config.json` fields with errors that name the file and the field.
//!
//! GGUF metadata is translated into the same JSON shape (see `load.rs`), so each architecture
//! has exactly one constructor.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::layers::RopeScaling;

/// A parsed config.json.
#[derive(Debug, Clone)]
pub struct Config {
    pub value: Value,
    pub path: PathBuf,
}

impl Config {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON ({e})", path.display()))?;
        if !value.is_object() {
            bail!("{}: expected a JSON object", path.display());
        }
        Ok(Self {
            value,
            path: path.to_path_buf(),
        })
    }

    pub fn from_value(value: Value, path: PathBuf) -> Self {
        Self { value, path }
    }

    /// A field of a nested config (transformers keeps some text configs under `text_config`).
    fn field(&self, key: &str) -> Option<&Value> {
        match self.value.get(key) {
            Some(Value::Null) | None => self
                .value
                .get("text_config")
                .and_then(|t| t.get(key))
                .filter(|v| !v.is_null()),
            Some(v) => Some(v),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.field(key).is_some()
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| anyhow!("{}: missing field '{key}'", self.path.display()))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.field(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                anyhow!(
                    "{}: field '{key}' should be a non-negative integer, found {v}",
                    self.path.display()
                )
            }),
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.field(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow!("{}: field '{key}' should be a number, found {v}", self.path.display())),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.field(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                anyhow!(
                    "{}: field '{key}' should be true or false, found {v}",
                    self.path.display()
                )
            }),
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.field(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| anyhow!("{}: field '{key}' should be a string, found {v}", self.path.display())),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.field(key)
    }

    /// RoPE base and scaling. Reads transformers 5's `rope_parameters` (optionally keyed by layer
    /// type, e.g. "sliding_attention") as well as the older `rope_theta` + `rope_scaling`.
    pub fn rope(&self, layer_type: Option<&str>, default_theta: f64) -> Result<(f64, RopeScaling)> {
        let params = self
            .field("rope_parameters")
            .map(|p| match layer_type.and_then(|lt| p.get(lt)) {
                Some(inner) => inner,
                None => p,
            });
        let theta = match params.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()) {
            Some(t) => t,
            None => self.f64_or("rope_theta", default_theta)?,
        };
        let scaling = match params
            .filter(|p| p.get("rope_type").is_some())
            .or_else(|| self.field("rope_scaling"))
        {
            None => RopeScaling::None,
            Some(s) => self.rope_scaling(s)?,
        };
        Ok((theta, scaling))
    }

    fn rope_scaling(&self, s: &Value) -> Result<RopeScaling> {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let num = |k: &str| -> Result<f64> {
            s.get(k)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| anyhow!("{}: rope scaling '{kind}' needs '{k}'", self.path.display()))
        };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_positions: num("original_max_position_embeddings")?,
            },
            other => bail!("{}: unsupported rope scaling '{other}'", self.path.display()),
        })
    }
}
