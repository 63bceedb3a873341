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
    /// The training split as float64 statistics (`collect --stats-only`, `merge`).
    pub fn train_stats(&self) -> PathBuf {
        self.root.join("activations").join("train.stats.safetensors")
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
    /// The cache of model sha256s by path, size and mtime (`data::io::sha256_path_cached`).
    pub fn sha256_cache(&self) -> PathBuf {
        self.root.join(".sha256-cache.json")
    }
    /// The manifest, or an error saying the folder is not a run.
    pub fn read_manifest(&self) -> Result<Manifest> {
        match self.read_manifest_if_any()? {
            Some(m) => Ok(m),
            None => bail!(
                "{}: not a jumplens run (no manifest.json); run `jumplens collect` first",
                self.root.display()
            ),
        }
    }

    /// The manifest, `None` when the folder has none and holds no outputs (a fresh run); a
    /// missing manifest beside outputs, or a corrupt one, is an error: the outputs' origin is
    /// then unknown and reusing them could mix runs.
    pub fn read_manifest_if_any(&self) -> Result<Option<Manifest>> {
        let p = self.manifest();
        if !p.exists() {
            if let Some(out) = self.existing_output() {
                bail!(
                    "{}: outputs without a manifest.json ({} exists); their origin is unknown: \
                     remove them or use a new --out folder",
                    self.root.display(),
                    out.display()
                );
            }
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        serde_json::from_str(&text).map(Some).map_err(|e| {
            anyhow!(
                "{}: invalid manifest ({e}); remove the folder or use a new --out folder",
                p.display()
            )
        })
    }

    /// The first collected data file in the run (activations or a finished part), if any.
    pub fn collected_data(&self) -> Option<PathBuf> {
        let first_part = std::fs::read_dir(self.parts_dir()).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        });
        ["train", "val"]
            .iter()
            .map(|s| self.activations(s))
            .chain([self.train_stats()])
            .find(|p| p.exists())
            .or(first_part)
    }

    /// The first output of any stage present in the run, if any.
    fn existing_output(&self) -> Option<PathBuf> {
        self.collected_data()
            .or_else(|| STAGE_OUTPUTS.iter().map(|f| self.file(f)).find(|p| p.exists()))
    }

    /// Takes the run's lock (`RUN/.lock`, holding the pid) for as long as the guard lives: a
    /// second process writing the same run is refused; a lock whose process is dead (killed)
    /// is taken over. Taking it again in the same process is allowed (the report runs the
    /// stages, which lock too).
    pub fn lock(&self) -> Result<RunLock> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("{}: cannot create folder", self.root.display()))?;
        let path = self.root.join(".lock");
        let me = std::process::id();
        for _ in 0..3 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write;
                    writeln!(f, "{me}").with_context(|| format!("{}: cannot write", path.display()))?;
                    crate::interrupt::register_lock(path.clone(), true);
                    return Ok(RunLock { path: Some(path) });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder: Option<u32> = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok());
                    match holder {
                        Some(pid) if pid == me => return Ok(RunLock { path: None }),
                        Some(pid) if crate::data::io::process_alive(pid) => bail!(
                            "{}: another jumplens process (pid {pid}) is writing this run; wait for it \
                             or use a new --out folder (remove {} if that process is not jumplens)",
                            self.root.display(),
                            path.display()
                        ),
                        // Dead holder, or a lock being written right now / unreadable: a
                        // dead one is removed and the lock taken again.
                        Some(_) => {
                            std::fs::remove_file(&path).ok();
                        }
                        None => std::thread::sleep(std::time::Duration::from_millis(50)),
                    }
                }
                Err(e) => bail!("{}: cannot create the lock ({e})", path.display()),
            }
        }
        bail!(
            "{}: cannot take the lock {} (remove it if no jumplens process is running)",
            self.root.display(),
            path.display()
        )
    }
    /// Reads `split`'s activations and checks them against `manifest` (see
    /// [`Manifest::check_activations`]).
    pub fn read_split(&self, manifest: &Manifest, split: &str) -> Result<crate::data::Activations> {
        let act = crate::data::Activations::read(&require(&self.activations(split), "collect")?)?;
        manifest.check_activations(split, &act)?;
        Ok(act)
    }

    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        crate::data::io::write_json(&self.manifest(), m)
    }
}

/// The files the stages after collect write (a test in `pipeline::stage` keeps this list equal
/// to theirs); their presence makes a folder a run.
pub const STAGE_OUTPUTS: &[&str] = &[
    "maps.safetensors",
    "maps_affine.safetensors",
    "r2.json",
    "r2.svg",
    "predict.json",
    "predict_traces.safetensors",
    "predict.svg",
    "early_exit.json",
    "early_exit.svg",
    "submodules.json",
    "submodules.svg",
    "alternation.json",
    "alternation.svg",
    "report.html",
];

/// The run's lock; removed when dropped (a killed process leaves it, and the next one takes it
/// over since its pid is dead).
#[derive(Debug)]
pub struct RunLock {
    /// `None` when this process already held the lock (the outer guard removes it).
    path: Option<PathBuf>,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            std::fs::remove_file(p).ok();
            crate::interrupt::register_lock(p.clone(), false);
        }
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
    /// The pairs the training statistics were collected for (`collect --stats-only`), `None`
    /// when the training activations are stored.
    pub fn stats_form(&self) -> Option<crate::data::stats::StatsPairs> {
        self.options
            .get("stats_only")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// The shard range this run holds (`None`: the whole run).
    pub fn shard(&self) -> Option<Shard> {
        self.options
            .get("shard")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// Records a finished stage.
    pub fn set_stage(&mut self, name: &str, record: Value) {
        self.stages.insert(name.to_string(), record);
    }

    /// Refuses activations of `split` that do not match this manifest (layers, width, example
    /// count), naming the field: a folder whose files were replaced or mixed.
    pub fn check_activations(&self, split: &str, act: &crate::data::Activations) -> Result<()> {
        let (s, n, d) = act.hidden_states.dims3()?;
        let recorded = self
            .counts
            .get(split)
            .and_then(|c| c.get("examples"))
            .and_then(Value::as_u64);
        let mismatch = |field: &str, manifest: String, file: usize| {
            anyhow!(
                "{}: {field} is {file} but manifest.json records {manifest}; the run folder was \
                 modified: collect again in a new --out folder",
                act.path.display()
            )
        };
        if s != self.model.n_layers + 1 {
            return Err(mismatch(
                "the number of states (n_layers + 1)",
                (self.model.n_layers + 1).to_string(),
                s,
            ));
        }
        if d != self.model.d_model {
            return Err(mismatch("the width (d_model)", self.model.d_model.to_string(), d));
        }
        match recorded {
            Some(r) if r as usize != n => Err(mismatch(
                &format!("the example count (counts.{split}.examples)"),
                r.to_string(),
                n,
            )),
            None => bail!(
                "{}: manifest.json records no finished {split} split (counts.{split}); run `jumplens collect` again",
                act.path.display()
            ),
            _ => Ok(()),
        }
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

/// A contiguous range of the N shards of a collection: one shard (`--shard I/N`: `from = I`,
/// `to = I + 1`) or several merged (`jumplens merge --partial`). Shard k of N collects the
/// parts `k P / N .. (k + 1) P / N` of each split's P parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub count: usize,
    pub from: usize,
    pub to: usize,
}

impl Shard {
    /// One shard, `index` of `count`.
    pub fn one(index: usize, count: usize) -> Shard {
        Shard {
            count,
            from: index,
            to: index + 1,
        }
    }

    /// `I/N` with 0 <= I < N.
    pub fn parse(s: &str) -> Result<Shard> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("--shard: expected I/N (e.g. 0/4), got '{s}'"))?;
        let num = |x: &str| -> Result<usize> {
            x.trim()
                .parse()
                .map_err(|_| anyhow!("--shard: '{x}' in '{s}' is not a number"))
        };
        let sh = Shard::one(num(i)?, num(n)?);
        sh.check()?;
        Ok(sh)
    }

    /// Refuses an empty or out-of-range shard.
    pub fn check(&self) -> Result<()> {
        if self.count == 0 {
            bail!("--shard {}/0: the number of shards must be at least 1", self.from);
        }
        if self.from >= self.to || self.to > self.count {
            bail!(
                "--shard {}/{}: the shard index must be below the number of shards (0..{})",
                self.from,
                self.count,
                self.count - 1
            );
        }
        Ok(())
    }

    /// The default shard from the environment: a Slurm job array (`SLURM_ARRAY_TASK_ID`,
    /// `SLURM_ARRAY_TASK_COUNT`, `SLURM_ARRAY_TASK_MIN`: index = ID - MIN) or a Kubernetes
    /// Indexed Job (`JOB_COMPLETION_INDEX`, with `count` from `--shard-count`). `None` when
    /// neither is set.
    pub fn from_env(env: impl Fn(&str) -> Option<String>, count: Option<usize>) -> Result<Option<Shard>> {
        let num = |k: &str| -> Result<Option<usize>> {
            env(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| anyhow!("environment variable {k}='{v}' is not a number"))
                })
                .transpose()
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let n = match (count, num("SLURM_ARRAY_TASK_COUNT")?) {
                (Some(n), _) | (None, Some(n)) => n,
                (None, None) => bail!(
                    "SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT; pass --shard-count or --shard I/N"
                ),
            };
            let index = id
                .checked_sub(min)
                .ok_or_else(|| anyhow!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"))?;
            let sh = Shard::one(index, n);
            sh.check()
                .map_err(|e| anyhow!("from SLURM_ARRAY_TASK_ID/COUNT/MIN: {e}"))?;
            return Ok(Some(sh));
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let Some(n) = count else {
                bail!("JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job): pass --shard-count N (the Job's completions)");
            };
            let sh = Shard::one(index, n);
            sh.check().map_err(|e| anyhow!("from JOB_COMPLETION_INDEX: {e}"))?;
            return Ok(Some(sh));
        }
        Ok(None)
    }

    /// The parts of a split of `n_parts` parts this shard range covers; an error when a shard
    /// would be empty (fewer parts than shards).
    pub fn parts(&self, n_parts: usize) -> Result<std::ops::Range<usize>> {
        if n_parts < self.count {
            bail!("{} shards but only {n_parts} parts", self.count);
        }
        Ok(self.from * n_parts / self.count..self.to * n_parts / self.count)
    }

    /// Whether this is every shard.
    pub fn is_whole(&self) -> bool {
        self.from == 0 && self.to == self.count
    }
}

/// Returns the path if it exists, else an error naming what is missing and which stage makes it.
pub fn require(path: &Path, made_by: &str) -> Result<PathBuf> {
    if !path.exists() {
        bail!("{}: missing; run `jumplens {made_by}` first", path.display());
    }
    Ok(path.to_path_buf())
}
