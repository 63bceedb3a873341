//! Hugging Face `config.json` files, read into each architecture's typed serde struct with
//! errors that name the file and the field.
//!
//! GGUF metadata is translated into the same JSON shape (see `load/gguf.rs`), so each
//! architecture has exactly one config struct and one constructor.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::layers::RopeScaling;

/// A parsed config.json, flattened: fields of a nested `text_config` (multimodal checkpoints)
/// are lifted to the top unless the top level sets them, and `null` fields count as absent, so
/// serde defaults apply to them.
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
        Ok(Self::from_value(value, path.to_path_buf()))
    }

    pub fn from_value(value: Value, path: PathBuf) -> Self {
        let value = match value {
            Value::Object(top) => {
                let mut flat = Map::new();
                if let Some(Value::Object(text)) = top.get("text_config") {
                    flat.extend(
                        text.iter()
                            .filter(|(_, v)| !v.is_null())
                            .map(|(k, v)| (k.clone(), v.clone())),
                    );
                }
                flat.extend(top.into_iter().filter(|(k, v)| !v.is_null() && k != "text_config"));
                Value::Object(flat)
            }
            other => other,
        };
        Self { value, path }
    }

    fn field(&self, key: &str) -> Option<&Value> {
        self.value.get(key)
    }

    pub fn has(&self, key: &str) -> bool {
        self.field(key).is_some()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.field(key)
    }

    /// `model_type`, when present.
    pub fn model_type(&self) -> Option<&str> {
        self.field("model_type").and_then(|v| v.as_str())
    }

    /// The Hugging Face class names in `architectures`.
    pub fn architectures(&self) -> Vec<&str> {
        match self.field("architectures") {
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        }
    }

    /// The config as the typed struct `T`; errors name the file and the offending field.
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T> {
        match serde_json::from_value::<T>(self.value.clone()) {
            Ok(t) => Ok(t),
            Err(e) => {
                let msg = e.to_string();
                if msg.starts_with("missing field") {
                    bail!("{}: {msg}", self.path.display());
                }
                // serde_json does not say which field had the wrong type: find the first field
                // whose removal changes the error.
                if let Value::Object(map) = &self.value {
                    for key in map.keys() {
                        let mut without = map.clone();
                        without.remove(key);
                        let other = serde_json::from_value::<T>(Value::Object(without))
                            .err()
                            .map(|e| e.to_string());
                        if other.as_deref() != Some(msg.as_str()) {
                            bail!("{}: field '{key}': {msg}", self.path.display());
                        }
                    }
                }
                bail!("{}: {msg}", self.path.display())
            }
        }
    }

    /// An error unless `value` (config field `field`) is at least 1.
    pub fn positive(&self, field: &str, value: usize) -> Result<()> {
        if value == 0 {
            bail!("{}: field '{field}' must be at least 1, found 0", self.path.display());
        }
        Ok(())
    }

    /// An error unless `n_heads` is a multiple of `n_kv_heads` (grouped-query attention).
    /// `num_key_value_heads` (one per attention head when absent), checked against
    /// `num_attention_heads` by [`Config::check_heads`].
    pub fn kv_heads(&self, n_heads: usize, n_kv: Option<usize>) -> Result<usize> {
        let n_kv = n_kv.unwrap_or(n_heads);
        self.check_heads("num_attention_heads", n_heads, "num_key_value_heads", n_kv)?;
        Ok(n_kv)
    }

    pub fn check_heads(&self, heads_field: &str, n_heads: usize, kv_field: &str, n_kv: usize) -> Result<()> {
        self.positive(heads_field, n_heads)?;
        self.positive(kv_field, n_kv)?;
        if !n_heads.is_multiple_of(n_kv) {
            bail!(
                "{}: field '{kv_field}' ({n_kv}) must divide '{heads_field}' ({n_heads})",
                self.path.display()
            );
        }
        Ok(())
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.field(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| anyhow!("{}: field '{key}' should be a number, found {v}", self.path.display())),
        }
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
