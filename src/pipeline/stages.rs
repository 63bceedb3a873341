//! The fit and r^2 stages on a run folder: read the collected activations, call the numeric
//! modules ([`crate::lens::fit`], [`crate::lens::r2`]) and write `maps.safetensors`, `r2.json` and the
//! heatmaps. Each stage records its options and wall time in the manifest.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use serde::Serialize;

use crate::data::run::{require, RunDir};
use crate::data::Activations;
use crate::lens::fit::{self, FitOptions, Maps, PairMap};
use crate::lens::maps::MapSet;

/// Which layer pairs to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pairs {
    /// Every l < l' (the paper's heatmaps, alternation).
    All,
    /// Only l -> L (enough for predict and early exit).
    ToFinal,
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
/// The states go to `device` for the fit ([`crate::lens::fit::device`] on a GPU); the maps come back
/// to the host to be written.
pub fn run_fit(run: &RunDir, pairs: Pairs, opts: &FitOptions, device: &Device) -> Result<FitSummary> {
    let mut manifest = run.read_manifest()?;
    let started = Instant::now();
    let train = Activations::read(&require(&run.activations("train"), "collect")?)?;
    let s = train.hidden_states.dim(0)?;
    let pair_list = match pairs {
        Pairs::All => fit::pairs_all(s),
        Pairs::ToFinal => fit::pairs_to_final(s),
    };
    let maps = fit::fit_all_pairs(&train.hidden_states.to_device(device)?, &pair_list, opts).map_err(|e| {
        crate::device::explain_oom(
            e,
            "fitting all pairs (the states and the Gram blocks are kept there)",
            "fit with --pairs to-final, or on the CPU with --device cpu",
        )
    })?;
    for w in &maps.warnings {
        eprintln!("warning: {w}");
    }
    let mut set = MapSet {
        maps: BTreeMap::new(),
        biases: BTreeMap::new(),
        metadata: HashMap::from([
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
            ("n_train".to_string(), train.len().to_string()),
            ("corpus_sha256".to_string(), manifest.corpus.sha256.clone()),
            ("tool".to_string(), format!("jumplens {}", env!("CARGO_PKG_VERSION"))),
        ]),
        path: run.maps(),
    };
    for p in &maps.pairs {
        set.maps.insert((p.source, p.target), p.a.to_device(&Device::Cpu)?);
        if let Some(b) = &p.intercept {
            set.biases.insert((p.source, p.target), b.to_device(&Device::Cpu)?);
        }
    }
    let path = if opts.intercept {
        run.file("maps_affine.safetensors")
    } else {
        run.maps()
    };
    set.write(&path)?;
    let summary = FitSummary {
        pairs: maps.pairs.len(),
        path: path.display().to_string(),
        seconds: started.elapsed().as_secs_f64(),
        gflops: maps.stats.gflops(),
        warnings: maps.warnings.clone(),
    };
    let stage = if opts.intercept { "fit_affine" } else { "fit" };
    manifest.set_stage(
        stage,
        serde_json::json!({"pairs": pairs, "intercept": opts.intercept, "ridge": opts.ridge, "wall_s": summary.seconds,
            "fit_s": maps.stats.seconds_total, "gflops": summary.gflops, "warnings": summary.warnings,
            "gram_precision": maps.stats.precision, "f32_max_cond": opts.f32_max_cond,
            "recomputed_f64": maps.layers.iter().filter(|l| l.recomputed_f64).count(),
            "device": crate::device::name(device)}),
    );
    run.write_manifest(&manifest)?;
    Ok(summary)
}

/// `maps.safetensors` as the fit module's [`Maps`] (for r^2).
fn as_fit_maps(set: &MapSet, n_states: usize, d: usize) -> Maps {
    let pairs = set
        .maps
        .iter()
        .map(|(&(source, target), a)| PairMap {
            source,
            target,
            a: a.clone(),
            intercept: set.biases.get(&(source, target)).cloned(),
        })
        .collect();
    Maps {
        n_states,
        d,
        intercept: !set.biases.is_empty(),
        ridge: 0.0,
        pairs,
        layers: Vec::new(),
        warnings: Vec::new(),
        stats: fit::FitStats {
            precision: fit::GramPrecision::F64,
            chunk_rows: 0,
            gram_blocks: 0,
            seconds_stats: 0.0,
            seconds_gram: 0.0,
            seconds_factor: 0.0,
            seconds_products: 0.0,
            seconds_total: 0.0,
            model_flops: 0.0,
            gram_flops: 0.0,
        },
    }
}

/// What `r2.json` holds.
#[derive(Debug, Serialize)]
pub struct R2Report {
    pub layers: usize,
    pub n_val: usize,
    pub mat: Vec<Vec<Option<f64>>>,
    pub id: Vec<Vec<Option<f64>>>,
}

/// Computes r^2 of mat and id for every fitted pair on the validation activations; writes
/// `r2.json` and `r2.svg`/`.png`. The scores are computed on `device`.
pub fn run_r2(run: &RunDir, device: &Device) -> Result<R2Report> {
    let mut manifest = run.read_manifest()?;
    let started = Instant::now();
    let val = Activations::read(&require(&run.activations("val"), "collect")?)?;
    let set = MapSet::read(&require(&run.maps(), "fit")?)?;
    set.check_model(&manifest.model)?;
    let (s, n, d) = val.hidden_states.dims3()?;
    let table = crate::lens::r2::r2_all_pairs(&val.hidden_states.to_device(device)?, &as_fit_maps(&set, s, d))?;
    let report = R2Report {
        layers: s - 1,
        n_val: n,
        mat: table.mat,
        id: table.id,
    };
    crate::data::io::write_json(&run.file("r2.json"), &report)?;
    crate::render::plot::r2_heatmaps(
        &run.file("r2"),
        &format!(
            "{} — r² of predicting h_ℓ' from h_ℓ ({n} validation examples)",
            manifest.model.arch
        ),
        &report.mat,
        &report.id,
    )?;
    manifest.set_stage(
        "r2",
        serde_json::json!({"wall_s": started.elapsed().as_secs_f64(), "n_val": n}),
    );
    run.write_manifest(&manifest)?;
    Ok(report)
}
