//! Hugging Face model folders: `config.json`, safetensors weights (one file, an index of shards,
//! or every `*.safetensors`) and an optional `tokenizer.json`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::LoadedModel;
use crate::model::arch;
use crate::model::config::Config;
use crate::model::dtype::LoadOptions;
use crate::model::weights::Weights;

pub(super) fn load_folder(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let (device, dtype) = (&opts.device, opts.dtype);
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        bail!("{}: no config.json in the model folder", dir.display());
    }
    let cfg = Config::read(&config_path)?;
    let shards = safetensors_files(dir)?;
    let weights = if opts.split.len() > 1 {
        Weights::from_safetensors_split(&shards, &opts.split, dtype)?
    } else {
        Weights::from_safetensors(&shards, device, dtype)?
    };
    let model = arch::build(&cfg, &weights, device)?;
    let tokenizer = super::tokenizer_if_present(&dir.join("tokenizer.json"), model.info().vocab_size)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        path: dir.to_path_buf(),
        format: "safetensors".into(),
        storage: weights.storage.clone(),
    })
}

/// The shards named by model.safetensors.index.json, else model.safetensors, else every
/// *.safetensors in the folder.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .map_err(|e| anyhow!("{}: not valid JSON ({e})", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.exists()) {
            bail!(
                "{}: shard {} listed in the index is missing",
                index.display(),
                missing.display()
            );
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .safetensors weights in the model folder", dir.display());
    }
    Ok(files)
}
