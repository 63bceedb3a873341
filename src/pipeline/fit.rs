//! The fit stages (`fit`, and `fit_affine` with an intercept) on a run folder: read the training
//! activations, fit ([`crate::lens::fit`]) and write `maps.safetensors` (or
//! `maps_affine.safetensors`) with the model's identity in its header; the options, timings and
//! per-layer warnings go to the manifest.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use serde::Serialize;

use crate::data::run::RunDir;
use crate::data::stats::{GramStats, StatsPairs};
use crate::lens::fit::{self, FitOptions, FitReport};

/// Which layer pairs to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pairs {
    /// Every l < l' (the paper's heatmaps, alternation).
    All,
    /// Only l -> L (enough for predict and early exit).
    ToFinal,
    /// All, unless the all-pairs maps would exceed [`ALL_PAIRS_MAX_BYTES`]; then to-final.
    Auto,
}

/// Largest all-pairs map file `Pairs::Auto` fits (4 GiB: SmolLM2's 31 states x 576 are 0.6 GB;
/// a Llama-3-8B's 33 x 4096 are 35 GB).
pub const ALL_PAIRS_MAX_BYTES: u64 = 4 << 30;

impl Pairs {
    /// The pairs of `n_states` states (`Auto` as `All`: resolve it first).
    pub fn list(self, n_states: usize) -> Vec<(usize, usize)> {
        match self {
            Pairs::All | Pairs::Auto => fit::pairs_all(n_states),
            Pairs::ToFinal => fit::pairs_to_final(n_states),
        }
    }

    /// What `Auto` means for `n_states` states of width `d` (f32 maps of d x d per pair), and
    /// the line saying so when it is not `All`.
    pub fn resolve(self, n_states: usize, d: usize) -> (Pairs, Option<String>) {
        if self != Pairs::Auto {
            return (self, None);
        }
        let pairs = (n_states * n_states.saturating_sub(1) / 2) as u64;
        let bytes = pairs * (d as u64) * (d as u64) * 4;
        if bytes <= ALL_PAIRS_MAX_BYTES {
            (Pairs::All, None)
        } else {
            let note = format!(
                "fit: all-pairs maps would take {:.1} GB ({pairs} pairs of {d} x {d}) > {:.1} GB: fitting \
                 --pairs to-final (pass --pairs all to override)",
                bytes as f64 / 1e9,
                ALL_PAIRS_MAX_BYTES as f64 / 1e9
            );
            (Pairs::ToFinal, Some(note))
        }
    }
}

/// What the fit stage did.
#[derive(Debug, Serialize)]
pub struct FitSummary {
    pub pairs: usize,
    pub path: String,
    pub seconds: f64,
    pub gflops: f64,
    pub warnings: Vec<String>,
}

/// Fits the maps on the training activations and writes them (`maps.safetensors`, or
/// `maps_affine.safetensors` with an intercept).
/// The states go to `device` for the fit ([`crate::lens::fit::device`] on a GPU); the maps come
/// back to the host to be written.
pub fn run_fit(run: &RunDir, pairs: Pairs, opts: &FitOptions, device: &Device) -> Result<FitSummary> {
    let _lock = run.lock()?;
    let mut manifest = run.read_manifest()?;
    let started = Instant::now();
    // Wall seconds reading the training data (the fit's own phases are in its report).
    let read_s;
    let (mut maps, report, pairs, n, d) = match manifest.stats_form() {
        None => {
            let train = run.read_split(&manifest, "train")?;
            read_s = started.elapsed().as_secs_f64();
            let (s, n, d) = train.hidden_states.dims3()?;
            check_ridge(opts.ridge, &train.hidden_states)?;
            let (pairs, pair_list) = resolve_pairs(pairs, s, d, None)?;
            let (maps, report) = fit::fit_all_pairs(&train.hidden_states.to_device(device)?, &pair_list, opts)
                .map_err(|e| {
                    crate::device::explain_oom(
                        e,
                        "fitting all pairs (the states and the Gram blocks are kept there)",
                        "fit with --pairs to-final, or on the CPU with --device cpu",
                    )
                })?;
            (maps, report, pairs, n, d)
        }
        Some(kind) => {
            // The statistics go to the fit's device: the per-source factorisation runs on the
            // host (each diagonal block is brought there), the products A = C P where the
            // statistics are (on a GPU 32 float64 GEMMs of d = 4096 instead of 4.4 TFLOP on the
            // host's cores).
            let stats = read_train_stats_to(run, &manifest, device)?;
            read_s = started.elapsed().as_secs_f64();
            let (s, d) = (stats.n_states, stats.d);
            let (pairs, pair_list) = resolve_pairs(pairs, s, d, Some(kind))?;
            check_ridge_bound(opts.ridge, fit::stats::max_gram_diagonal(&stats, &pair_list)?)?;
            let (maps, report) = fit::stats::fit_from_stats(&stats, &pair_list, opts)?;
            (maps, report, pairs, stats.n as usize, d)
        }
    };
    print_warnings(&report, n, d);
    maps.metadata = HashMap::from([
        ("model_sha256".to_string(), manifest.model.sha256.clone()),
        ("model_path".to_string(), manifest.model.path.clone()),
        ("n_layers".to_string(), manifest.model.n_layers.to_string()),
        ("d_model".to_string(), manifest.model.d_model.to_string()),
        (
            "layout".to_string(),
            "mat.{l}.{l2} [d, d]: mapped = A @ h (out x in); bias.{l}.{l2} [d]".to_string(),
        ),
        ("intercept".to_string(), opts.intercept.to_string()),
        ("ridge".to_string(), opts.ridge.to_string()),
        ("n_train".to_string(), n.to_string()),
        ("corpus_sha256".to_string(), manifest.corpus.sha256.clone()),
        ("tool".to_string(), format!("jumplens {}", env!("CARGO_PKG_VERSION"))),
    ]);
    let path = if opts.intercept {
        run.file("maps_affine.safetensors")
    } else {
        run.maps()
    };
    let t_write = Instant::now();
    maps.write(&path)?;
    let write_s = t_write.elapsed().as_secs_f64();
    let summary = FitSummary {
        pairs: maps.len(),
        path: path.display().to_string(),
        seconds: started.elapsed().as_secs_f64(),
        gflops: report.stats.gflops(),
        warnings: report.warnings.clone(),
    };
    let stage = if opts.intercept { "fit_affine" } else { "fit" };
    manifest.set_stage(
        stage,
        serde_json::json!({"pairs": pairs, "intercept": opts.intercept, "ridge": opts.ridge, "wall_s": summary.seconds,
            "fit_s": report.stats.seconds_total, "gflops": summary.gflops, "warnings": summary.warnings,
            "gram_precision": report.stats.precision, "f32_max_cond": opts.f32_max_cond,
            "recomputed_f64": report.layers.iter().filter(|l| l.recomputed_f64).count(),
            "device": crate::device::name(device),
            "from": if manifest.stats_form().is_some() { "statistics" } else { "activations" },
            "phases_s": {"read": read_s, "stats": report.stats.seconds_stats, "gram": report.stats.seconds_gram,
                "factor": report.stats.seconds_factor, "products": report.stats.seconds_products,
                "write": write_s}}),
    );
    run.write_manifest(&manifest)?;
    Ok(summary)
}

/// The pairs to fit: `pairs` resolved for `s` states of width `d`. On a statistics run
/// (`stats`), `auto` is the pairs the statistics hold and a choice they do not hold is refused.
fn resolve_pairs(pairs: Pairs, s: usize, d: usize, stats: Option<StatsPairs>) -> Result<(Pairs, Vec<(usize, usize)>)> {
    if let (Pairs::All, Some(StatsPairs::ToFinal)) = (pairs, stats) {
        anyhow::bail!(
            "--pairs all: this run holds the statistics of the to-final pairs only (collected with \
             --stats-only --pairs to-final); fit --pairs to-final, or collect again with --pairs all"
        );
    }
    let (resolved, note) = resolved_pairs(pairs, s, d, stats);
    if let Some(note) = note {
        eprintln!("{note}");
    }
    Ok((resolved, resolved.list(s)))
}

/// `pairs` with Auto resolved: a statistics-only run's pair set, else the size rule of
/// [`Pairs::resolve`] (with its line when that is not all pairs).
fn resolved_pairs(pairs: Pairs, s: usize, d: usize, stats: Option<StatsPairs>) -> (Pairs, Option<String>) {
    match (pairs, stats) {
        (Pairs::Auto, Some(StatsPairs::All)) => (Pairs::All, None),
        (Pairs::Auto, Some(StatsPairs::ToFinal)) => (Pairs::ToFinal, None),
        (p, _) => p.resolve(s, d),
    }
}

/// What [`run_fit`] will fit on `run` for `pairs` (Auto resolved from the manifest's model
/// size and statistics form) and the training file it reads: the CLI's start line.
pub fn planned_pairs(run: &RunDir, pairs: Pairs) -> Result<(Pairs, std::path::PathBuf)> {
    let m = run.read_manifest()?;
    let stats = m.stats_form();
    let (resolved, _) = resolved_pairs(pairs, m.model.n_layers + 1, m.model.d_model, stats);
    let file = if stats.is_some() {
        run.train_stats()
    } else {
        run.activations("train")
    };
    Ok((resolved, file))
}

/// Reads the training statistics of a `--stats-only` run and checks them against the manifest
/// (states, width, example count).
pub fn read_train_stats(run: &RunDir, manifest: &crate::data::run::Manifest) -> Result<GramStats> {
    read_train_stats_to(run, manifest, &Device::Cpu)
}

/// [`read_train_stats`] onto `device`.
pub fn read_train_stats_to(run: &RunDir, manifest: &crate::data::run::Manifest, device: &Device) -> Result<GramStats> {
    let path = crate::data::run::require(&run.train_stats(), "collect")?;
    let stats = GramStats::read(&path, device)?;
    let recorded = manifest
        .counts
        .get("train")
        .and_then(|c| c.get("examples"))
        .and_then(serde_json::Value::as_u64);
    let mismatch = |what: &str, file: String, man: String| {
        anyhow::anyhow!(
            "{}: {what} is {file} but manifest.json records {man}; the run folder was modified: collect again \
             in a new --out folder",
            path.display()
        )
    };
    if stats.n_states != manifest.model.n_layers + 1 {
        return Err(mismatch(
            "the number of states",
            stats.n_states.to_string(),
            (manifest.model.n_layers + 1).to_string(),
        ));
    }
    if stats.d != manifest.model.d_model {
        return Err(mismatch(
            "the width",
            stats.d.to_string(),
            manifest.model.d_model.to_string(),
        ));
    }
    match recorded {
        Some(r) if r == stats.n => Ok(stats),
        Some(r) => Err(mismatch("the example count", stats.n.to_string(), r.to_string())),
        None => anyhow::bail!(
            "{}: manifest.json records no finished train split; run `jumplens collect` again",
            path.display()
        ),
    }
}

/// How far above the largest Gram diagonal entry a ridge may go: beyond it the penalty
/// dominates every normal equation and shrinks the maps by more than this factor (to zeros in
/// float32 for huge values such as 1e300), which no one asks for knowingly.
pub const MAX_RIDGE_OVER_GRAM: f64 = 1e6;

/// Refuses a ridge above [`MAX_RIDGE_OVER_GRAM`] x the largest entry of any layer's Gram
/// diagonal (sum over examples of a squared coordinate), naming the bound.
pub fn check_ridge(ridge: f64, states: &candle_core::Tensor) -> Result<()> {
    if ridge == 0.0 {
        return Ok(());
    }
    anyhow::ensure!(
        ridge.is_finite() && ridge > 0.0,
        "--ridge must be a finite number >= 0 (got {ridge})"
    );
    let diag = states
        .to_dtype(candle_core::DType::F64)?
        .sqr()?
        .sum(1)?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    check_ridge_bound(ridge, diag)
}

/// [`check_ridge`] given the largest Gram diagonal entry `diag`.
pub fn check_ridge_bound(ridge: f64, diag: f64) -> Result<()> {
    if ridge == 0.0 {
        return Ok(());
    }
    anyhow::ensure!(
        ridge.is_finite() && ridge > 0.0,
        "--ridge must be a finite number >= 0 (got {ridge})"
    );
    let bound = MAX_RIDGE_OVER_GRAM * diag;
    anyhow::ensure!(
        ridge <= bound,
        "--ridge {ridge:e} is above {MAX_RIDGE_OVER_GRAM:e} x the largest Gram diagonal entry ({diag:.3e}), \
         i.e. above {bound:.3e}: the maps would be shrunk to (nearly) zero; use a smaller ridge"
    );
    Ok(())
}

/// The fit's warnings on stderr. With fewer examples than the width every layer's Gram is
/// singular by construction: that is said once, and the per-layer lines stay in the manifest.
fn print_warnings(report: &FitReport, n: usize, d: usize) {
    if report.underdetermined(d) {
        eprintln!(
            "warning: {n} training examples for width {d} (N < d): every Gram block is singular, so every \
             layer gets scikit-learn's minimum-norm solution; per-layer details in manifest.json \
             (stages.fit.warnings)"
        );
        return;
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pairs_fall_back_to_to_final_above_the_size() {
        // SmolLM2: 31 states x 576 -> 0.62 GB of all-pairs maps: all.
        assert_eq!(Pairs::Auto.resolve(31, 576), (Pairs::All, None));
        // Llama-3-8B: 33 states x 4096 -> 35.4 GB: to-final, with a line saying why.
        let (p, note) = Pairs::Auto.resolve(33, 4096);
        assert_eq!(p, Pairs::ToFinal);
        let note = note.unwrap();
        assert!(note.contains("35.4 GB") && note.contains("--pairs all"), "{note}");
        // An explicit choice is kept.
        assert_eq!(Pairs::All.resolve(33, 4096), (Pairs::All, None));
        // One pair of 8192 x 8192 (256 MiB) is all pairs.
        let d = 1usize << 13; // 2 states: one pair of 8192^2 x 4 B = 256 MiB
        assert_eq!(Pairs::Auto.resolve(2, d).0, Pairs::All);
    }
}
