//! A run folder: where every stage reads its inputs and writes its outputs, plus the manifest
//! that records what produced them (so stages can be skipped, resumed, or refused when the inputs
//! changed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Paths inside a run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn manifest(&self) -> PathBuf {
        self.root.join("manifest.json")
    }
    pub fn activations(&self, split: &str) -> PathBuf {
        self.root.join("activations").join(format!("{split}.safetensors"))
    }
    pub fn parts_dir(&self) -> PathBuf {
        self.root.join("activations").join("parts")
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps.safetensors")
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    /// The manifest, or an error saying the folder is not a run.
    pub fn read_manifest(&self) -> Result<Manifest> {
        let p = self.manifest();
        if !p.exists() {
            bail!(
                "{}: not a jumplens run (no manifest.json); run `jumplens collect` first",
                self.root.display()
            );
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid manifest ({e})", p.display()))
    }
    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        crate::data::io::write_json(&self.manifest(), m)
    }
}

/// Where a model came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelRecord {
    pub path: String,
    pub sha256: String,
    pub arch: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub vocab_size: usize,
    pub attention: String,
    /// Parameters of all blocks together (for FLOP estimates).
    #[serde(default)]
    pub block_params: usize,
    /// Compute dtype of the forward passes (`--dtype`); runs made before it was recorded are f32.
    #[serde(default = "f32_label")]
    pub dtype: String,
}

fn f32_label() -> String {
    "f32".into()
}

/// Where the text came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CorpusRecord {
    pub path: String,
    pub sha256: String,
    pub format: String,
    pub articles: usize,
}

/// The run's record of its inputs, options and finished stages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub tool: String,
    pub version: String,
    pub model: ModelRecord,
    pub corpus: CorpusRecord,
    pub seed: u64,
    /// Collection options (positions per sentence, text field, requested counts, ...).
    pub options: Value,
    /// Per split: requested and collected counts, skipped sentences.
    pub counts: BTreeMap<String, Value>,
    /// Per finished stage: its options, outputs and wall time.
    #[serde(default)]
    pub stages: BTreeMap<String, Value>,
}

impl Manifest {
    /// Records a finished stage.
    pub fn set_stage(&mut self, name: &str, record: Value) {
        self.stages.insert(name.to_string(), record);
    }

    /// Wall time of each of `stages` as recorded (`stages.<name>.wall_s`; for collect, the sum
    /// of the splits' times when the stage itself was not recorded).
    pub fn wall_times(&self, stages: &[&str]) -> Vec<(String, Option<f64>)> {
        stages
            .iter()
            .map(|&s| {
                let t = self.stages.get(s).and_then(|r| r.get("wall_s")).and_then(Value::as_f64);
                let t = t.or_else(|| {
                    (s == "collect" && !self.counts.is_empty()).then(|| {
                        self.counts
                            .values()
                            .filter_map(|c| c.get("wall_s").and_then(Value::as_f64))
                            .sum()
                    })
                });
                (s.to_string(), t)
            })
            .collect()
    }
}

/// Returns the path if it exists, else an error naming what is missing and which stage makes it.
pub fn require(path: &Path, made_by: &str) -> Result<PathBuf> {
    if !path.exists() {
        bail!("{}: missing; run `jumplens {made_by}` first", path.display());
    }
    Ok(path.to_path_buf())
}
