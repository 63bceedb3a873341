//! The whole study in one call, and its report: [`run_report`] runs every stage on a run folder
//! (collect -> fit -> r² -> predict -> early exit -> sub-modules, the [`Stage`]s of
//! [`Stage::REPORT`], and `tuned-lens` after fit when [`ReportOptions::tuned_lens`] asks), skipping the
//! stages that are already done, and [`write_report_html`]
//! turns the folder into one self-contained HTML page ([`crate::render::html`]).
//!
//! Why it is built this way:
//! - Each stage is the library function the CLI calls; this module only orders them, decides
//!   what is up to date, and records the wall time of every stage in `RUN/manifest.json`
//!   (`stages.<name>.wall_s`) where the stage function does not record it itself.
//! - A stage is skipped when its outputs exist and its manifest record matches the options
//!   asked for now; a stage that runs makes every stage that depends on it run again.
//! - A statistics-only run (`collect --stats-only`, or a complete merge of shards) with the
//!   same model, corpus and collection options counts as collected: it is not collected again;
//!   fit reads its statistics and sub-modules replay the training examples they need.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use candle_core::Device;
use serde_json::{json, Value};

use crate::collect::CollectOptions;
use crate::data::assets::{default_out, default_path};
use crate::data::run::{Manifest, RunDir};
use crate::model::LoadedModel;
use crate::pipeline::stage::{limit_value, Stage};
use crate::render::html::fmt_secs;

pub use crate::data::assets::{DEFAULT_CORPUS, DEFAULT_MODEL};

/// The stages [`run_report`] runs, in order, by their names in the manifest
/// ([`Stage::REPORT`]).
pub const STAGES: [&str; 6] = [
    Stage::REPORT[0].name(),
    Stage::REPORT[1].name(),
    Stage::REPORT[2].name(),
    Stage::REPORT[3].name(),
    Stage::REPORT[4].name(),
    Stage::REPORT[5].name(),
];

/// Options of [`run_report`] (`jumplens report`).
///
/// [`ReportOptions::new`] fills the sizes from a preset: the paper's (9000 training and 3000
/// validation sentences, sub-modules scored on 300 examples and fitted on every training
/// example) or `quick` (small enough to finish in a few minutes for SmolLM2-135M on two CPU
/// cores). Every size can be changed afterwards.
///
/// # Example
///
/// ```no_run
/// use jumplens::pipeline::report::{run_report, ReportOptions};
///
/// let mut opts = ReportOptions::new("assets/bert_mlm", "corpus.txt", "runs/bert-demo", true);
/// opts.n_train = 200;
/// opts.n_val = 80;
/// let html = run_report(&opts)?;
/// println!("{}", html.display());
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// A Hugging Face folder, a `.gguf` file, or a hub id in the local cache.
    pub model: String,
    /// The corpus file (any format `jumplens collect` reads).
    pub corpus: PathBuf,
    /// The run folder (created, or resumed).
    pub out: PathBuf,
    /// Whether the sizes came from the quick preset (recorded in the manifest and the page).
    pub quick: bool,
    pub seed: u64,
    /// Training sentences (one example each).
    pub n_train: usize,
    /// Validation sentences (one example each).
    pub n_val: usize,
    /// Validation examples the sub-module and alternation experiments are scored on.
    pub submodule_eval: usize,
    /// Training examples the sub-module maps are fitted on (`usize::MAX`: all).
    pub submodule_train: usize,
    /// Padded tokens per forward batch (collection and sub-modules).
    pub batch_tokens: usize,
    /// Stage lines and progress bars on stderr.
    pub progress: bool,
    /// Where the model runs (`Device::Cpu` unless set).
    pub device: Device,
    /// The devices the model's blocks are split across (empty: all on `device`).
    pub split: Vec<Device>,
    /// Compute dtype of the model (`auto` unless set).
    pub dtype: crate::model::DtypeChoice,
    /// Train a tuned lens (`jumplens tuned-lens` with its defaults, after fit) unless RUN/tuned/
    /// has one; predict, early exit and the page then show `tuned` beside `mat` and `id`.
    pub tuned_lens: bool,
}

impl ReportOptions {
    /// Options for `model` and `corpus` written to `out`, with the paper's sizes or, when
    /// `quick`, the quick preset's.
    pub fn new(model: impl Into<String>, corpus: impl Into<PathBuf>, out: impl Into<PathBuf>, quick: bool) -> Self {
        let (n_train, n_val, submodule_eval, submodule_train) = if quick {
            (1200, 300, 40, 200)
        } else {
            (9000, 3000, 300, 3000)
        };
        Self {
            model: model.into(),
            corpus: corpus.into(),
            out: out.into(),
            quick,
            seed: 0,
            n_train,
            n_val,
            submodule_eval,
            submodule_train,
            batch_tokens: CollectOptions::default().batch_tokens,
            progress: true,
            device: Device::Cpu,
            split: Vec::new(),
            dtype: crate::model::DtypeChoice::Auto,
            tuned_lens: false,
        }
    }

    /// The collection options these sizes mean.
    pub fn collect_options(&self) -> CollectOptions {
        CollectOptions {
            n_train: self.n_train,
            n_val: self.n_val,
            seed: self.seed,
            batch_tokens: self.batch_tokens,
            ..Default::default()
        }
    }
}

impl Default for ReportOptions {
    /// The default model and corpus (see [`crate::data::assets`]), the paper's sizes, and
    /// [`default_out`] as the run folder.
    fn default() -> Self {
        let model = default_path(DEFAULT_MODEL).display().to_string();
        let corpus = default_path(DEFAULT_CORPUS);
        let out = default_out(&model, &corpus, false);
        Self::new(model, corpus, out, false)
    }
}

/// Runs every stage that is not up to date on `opts.out`, records per-stage wall times in the
/// manifest, and writes `RUN/report.html`; returns its path.
///
/// A stage is up to date when its outputs exist and its manifest record matches these options
/// (collect: same model, corpus and collection options, both splits done); a stage that runs
/// makes the stages depending on it run again. An interrupted collection resumes; a run folder
/// collected with another model, corpus or options is refused.
///
/// # Example
///
/// ```no_run
/// use jumplens::pipeline::report::{run_report, ReportOptions};
///
/// let opts = ReportOptions::new(
///     "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
///     "assets/wiki/summaries_en-us.json",
///     "runs/smollm2-wiki-quick",
///     true,
/// );
/// let html = run_report(&opts)?;
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn run_report(opts: &ReportOptions) -> Result<PathBuf> {
    let run = RunDir::new(&opts.out);
    let say = |msg: &str| {
        if opts.progress {
            eprintln!("{msg}");
        }
    };
    say(&format!("loading {}", opts.model));
    let lm = crate::model::load_model_with(
        &opts.model,
        &crate::model::LoadOptions {
            device: opts.device.clone(),
            dtype: opts.dtype,
            split: opts.split.clone(),
        },
    )?;
    if let Some(p) = lm.model.placement() {
        say(&format!("placement: {}", p.describe()));
    }
    let collect_opts = collect_options_value(opts)?;
    // The tuned lens, when asked for, trains after fit (and before predict, which scores it).
    let mut stages = Stage::REPORT.to_vec();
    if opts.tuned_lens {
        stages.insert(2, Stage::TunedLens);
    }
    let total = stages.len() + 1;
    // Which stages ran in this call (their dependants must run again).
    let mut ran: HashSet<Stage> = HashSet::new();
    for (i, &stage) in stages.iter().enumerate() {
        let head = format!("[{}/{total}] {}", i + 1, stage.name().replace('_', "-"));
        let must_run = stage
            .inputs()
            .iter()
            .chain(stage.optional_inputs())
            .any(|d| ran.contains(d))
            || !up_to_date(&run, stage, opts, &lm, &collect_opts)?;
        if !must_run {
            say(&format!("{head}: up to date, skipped"));
            continue;
        }
        say(&format!("{head} ..."));
        let before = run
            .read_manifest()
            .ok()
            .and_then(|m| m.stages.get(stage.name()).cloned());
        let started = Instant::now();
        stage.run(&run, opts, &lm)?;
        let wall = started.elapsed().as_secs_f64();
        record_stage(&run, stage, opts, wall, before.as_ref())?;
        ran.insert(stage);
        say(&format!("{head} done in {}", fmt_secs(wall)));
    }
    say(&format!("[{total}/{total}] report.html ..."));
    let started = Instant::now();
    // The preset goes into the manifest first: the page shows it.
    let mut record = json!({
        "quick": opts.quick, "n_train": opts.n_train, "n_val": opts.n_val,
        "submodule_eval": opts.submodule_eval, "submodule_train": limit_value(opts.submodule_train),
    });
    let mut m = run.read_manifest()?;
    m.set_stage("report", record.clone());
    run.write_manifest(&m)?;
    Stage::Html.run(&run, opts, &lm)?;
    let path = run.file(Stage::Html.outputs()[0]);
    record["wall_s"] = json!(started.elapsed().as_secs_f64());
    let mut m = run.read_manifest()?;
    m.set_stage("report", record);
    run.write_manifest(&m)?;
    say(&format!("[{total}/{total}] report.html done: {}", path.display()));
    Ok(path)
}

fn collect_options_value(opts: &ReportOptions) -> Result<Value> {
    Ok(serde_json::to_value(opts.collect_options())?)
}

/// Whether every key of `want` has the same value in `have`.
fn record_matches(have: &Value, want: &Value) -> bool {
    let (Some(h), Some(w)) = (have.as_object(), want.as_object()) else {
        return false;
    };
    w.iter().all(|(k, v)| match (h.get(k), v) {
        (Some(Value::Number(a)), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Some(a), b) => a == b,
        (None, _) => false,
    })
}

fn up_to_date(
    run: &RunDir,
    stage: Stage,
    opts: &ReportOptions,
    lm: &LoadedModel,
    collect_opts: &Value,
) -> Result<bool> {
    if stage == Stage::Collect {
        return collect_up_to_date(run, opts, lm, collect_opts);
    }
    if stage.outputs().iter().any(|f| !run.file(f).exists()) {
        return Ok(false);
    }
    let Ok(m) = run.read_manifest() else {
        return Ok(false);
    };
    // r2 and predict record the validation count they saw (the collected one, which is the
    // requested one unless the corpus ran short); compare with what was collected.
    let mut want = stage.expected_record(opts);
    if matches!(stage, Stage::R2 | Stage::Predict) {
        if let Some(n) = m
            .counts
            .get("val")
            .and_then(|c| c.get("examples"))
            .and_then(Value::as_u64)
        {
            want = json!({"n_val": n});
        }
    }
    Ok(m.stages.get(stage.name()).is_some_and(|r| record_matches(r, &want)))
}

/// The collection options of a streamed run that do not change what the later stages compute
/// from it: a statistics-only run (`stats_only`, `part_sentences`; also a complete merge of
/// shards) is the report's collection in another form (fit reads the statistics, sub-modules
/// replay the training examples).
const STREAM_OPTIONS: &[&str] = &["stats_only", "part_sentences"];

/// Whether the collection is done with these inputs: both splits there (the training split as
/// stored states or as statistics) and recorded with the same model, corpus and options. A run
/// collected differently, or one shard of a sharded run, is refused.
fn collect_up_to_date(run: &RunDir, opts: &ReportOptions, lm: &LoadedModel, collect_opts: &Value) -> Result<bool> {
    let train_there = run.activations("train").exists() || run.train_stats().exists();
    if !train_there || !run.activations("val").exists() {
        return Ok(false);
    }
    let Ok(m) = run.read_manifest() else {
        return Ok(false);
    };
    if let Some(sh) = m.shard() {
        bail!(
            "{}: shards {}..{} of {} only; merge all shards (jumplens merge) and report on the merged run",
            run.root.display(),
            sh.from,
            sh.to,
            sh.count
        );
    }
    let mut options = m.options.clone();
    if let Some(o) = options.as_object_mut() {
        o.retain(|k, _| !STREAM_OPTIONS.contains(&k.as_str()));
    }
    let same_inputs = m.model.sha256 == crate::data::io::sha256_path_cached(&lm.path, &run.sha256_cache())?
        && m.corpus.sha256 == crate::data::io::sha256_path(&opts.corpus)?
        && &options == collect_opts;
    if !same_inputs {
        bail!(
            "{}: this run was collected with another model, corpus or options; use a new --out folder",
            run.root.display()
        );
    }
    Ok(m.counts.contains_key("train") && m.counts.contains_key("val"))
}

/// Adds this call's wall time and options to the stage's manifest record, keeping what the
/// stage function recorded itself (fit and r2 record their own `wall_s`). `before` is the
/// record as it was before the stage ran: when the stage left it unchanged, it is an older
/// run's and is replaced.
fn record_stage(run: &RunDir, stage: Stage, opts: &ReportOptions, wall: f64, before: Option<&Value>) -> Result<()> {
    let name = stage.name();
    let mut m = run.read_manifest()?;
    let mut record = match m.stages.get(name) {
        Some(r) if Some(r) != before => r.clone(),
        _ => json!({}),
    };
    let obj = record
        .as_object_mut()
        .ok_or_else(|| anyhow!("manifest: stages.{name} is not an object"))?;
    if let Value::Object(want) = stage.expected_record(opts) {
        for (k, v) in want {
            obj.entry(k).or_insert(v);
        }
    }
    if matches!(stage, Stage::R2 | Stage::Predict) {
        if let Some(n) = m.counts.get("val").and_then(|c| c.get("examples")) {
            obj.insert("n_val".into(), n.clone());
        }
    }
    obj.entry("wall_s").or_insert(json!(wall));
    m.set_stage(name, record);
    run.write_manifest(&m)
}

/// Wall time of every stage of [`STAGES`] as recorded in the manifest (`stages.<name>.wall_s`;
/// for collect, the sum of the splits' times when the stage itself was not recorded).
///
/// # Example
///
/// ```no_run
/// use jumplens::data::run::RunDir;
/// let m = RunDir::new("runs/demo").read_manifest()?;
/// for (stage, secs) in jumplens::pipeline::report::stage_wall_times(&m) {
///     println!("{stage}: {secs:?}");
/// }
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn stage_wall_times(m: &Manifest) -> Vec<(String, Option<f64>)> {
    m.wall_times(&STAGES)
}

/// Writes `RUN/report.html` ([`crate::render::html::write_report_html`] with the report's
/// stages) and returns its path; `lm` adds the peek grids.
///
/// ```no_run
/// use jumplens::data::run::RunDir;
/// // Regenerate the page of an existing run, without peek grids (no model loaded).
/// let page = jumplens::pipeline::report::write_report_html(&RunDir::new("runs/smollm2-wiki"), None)?;
/// println!("{}", page.display());
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn write_report_html(run: &RunDir, lm: Option<&LoadedModel>) -> Result<PathBuf> {
    crate::render::html::write_report_html(run, lm, &STAGES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_records_match_on_the_requested_keys() {
        let have = json!({"pairs": "all", "intercept": false, "ridge": 0, "wall_s": 3.0});
        assert!(record_matches(
            &have,
            &json!({"pairs": "all", "intercept": false, "ridge": 0.0})
        ));
        assert!(!record_matches(&have, &json!({"pairs": "to-final"})));
        assert!(!record_matches(&json!({}), &json!({"n_val": 3})));
    }
}
