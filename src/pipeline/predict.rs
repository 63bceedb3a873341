//! The predict stage on a run folder: read the validation activations and the maps, evaluate
//! the lenses on the model ([`crate::eval::predict::evaluate`]) and write `predict.json`,
//! `predict_traces.safetensors` (for early exit) and the figure.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::eval::predict::{evaluate, Evaluation, Lens, LensMetrics};
use crate::lens::maps::Maps;

/// Writes the per-example traces (for early exit) as safetensors: `{lens}.top1` [S, N] (i64),
/// `{lens}.margin` and `{lens}.max_prob` [S, N] (f32), `model_top1` [N].
pub fn write_traces(path: &std::path::Path, ev: &Evaluation) -> Result<()> {
    let cpu = Device::Cpu;
    let mut tensors = vec![(
        "model_top1".to_string(),
        Tensor::from_vec(
            ev.model_top1.iter().map(|&t| t as i64).collect::<Vec<_>>(),
            ev.n_val,
            &cpu,
        )?,
    )];
    for (name, tr) in &ev.traces {
        let s = tr.top1.len();
        let flat_i: Vec<i64> = tr.top1.iter().flatten().map(|&t| t as i64).collect();
        tensors.push((format!("{name}.top1"), Tensor::from_vec(flat_i, (s, ev.n_val), &cpu)?));
        let flat: Vec<f32> = tr.margin.iter().flatten().copied().collect();
        tensors.push((format!("{name}.margin"), Tensor::from_vec(flat, (s, ev.n_val), &cpu)?));
        let flat: Vec<f32> = tr.max_prob.iter().flatten().copied().collect();
        tensors.push((format!("{name}.max_prob"), Tensor::from_vec(flat, (s, ev.n_val), &cpu)?));
    }
    crate::data::io::write_safetensors(path, &tensors, None)
}

/// Options of `jumplens predict`.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// Maps to evaluate instead of the run's own (cross-corpus: another run's maps).
    pub maps: Option<std::path::PathBuf>,
    /// Examples per readout batch; 0 = 128 on the CPU, 1024 on a GPU (where small batches
    /// leave the device idle between launches).
    pub batch: usize,
    /// A tuned lens folder (tuned-lens's `config.json` + `params.pt`) evaluated as `tuned`;
    /// without it `RUN/tuned/` is used when present.
    pub tuned: Option<std::path::PathBuf>,
    pub progress: bool,
}

impl Default for PredictOptions {
    fn default() -> Self {
        Self {
            maps: None,
            batch: 0,
            tuned: None,
            progress: true,
        }
    }
}

/// What `predict.json` holds.
#[derive(Debug, Serialize)]
pub struct PredictReport {
    pub run: String,
    /// The maps file used for `mat`, and the run it came from (cross-corpus when it differs).
    pub maps: String,
    pub maps_run: String,
    pub layers: usize,
    pub n_val: usize,
    pub lenses: BTreeMap<String, LensMetrics>,
}

/// Runs the predict stage on a run folder: evaluates mat, id (and affine when
/// `maps_affine.safetensors` exists, tuned from `--tuned-lens` or `RUN/tuned/`, mat+kl from
/// `RUN/tuned-mat/`) and writes `predict.json`, `predict_traces.safetensors`
/// and the plots.
pub fn run_predict(
    lm: &crate::model::LoadedModel,
    run: &crate::data::run::RunDir,
    opts: &PredictOptions,
) -> Result<PredictReport> {
    let started = std::time::Instant::now();
    let _lock = run.lock()?;
    let mut manifest = run.read_manifest()?;
    crate::pipeline::integrity::check_run_model(run, &manifest, lm)?;
    crate::data::run::require(&run.activations("val"), "collect")?;
    let maps_path = match &opts.maps {
        Some(p) => p.clone(),
        None => crate::data::run::require(&run.maps(), "fit")?,
    };
    let device = lm.model.head_device().clone();
    let maps = Maps::read(&maps_path)?;
    maps.check_model(&manifest.model)?;
    let last = lm.model.info().n_layers;
    let maps = maps.into_target(last).to_device(&device)?;
    let affine_path = run.file("maps_affine.safetensors");
    let affine = if opts.maps.is_none() && affine_path.exists() {
        let a = Maps::read(&affine_path)?;
        a.check_model(&manifest.model)?;
        Some(a.into_target(last).to_device(&device)?)
    } else {
        None
    };
    let info = lm.model.info();
    let read_tuned = |dir: &std::path::Path| -> Result<crate::lens::tuned::TunedLens> {
        let t = crate::lens::tuned::TunedLens::read_dir(dir)?;
        t.check_model(info.n_layers, info.d_model)?;
        t.to_device(&device)
    };
    let own = |name: &str| Some(run.file(name)).filter(|p| opts.maps.is_none() && p.join("params.pt").exists());
    let tuned = match opts.tuned.clone().or_else(|| own("tuned")) {
        Some(dir) => Some(read_tuned(&dir)?),
        None => None,
    };
    let mat_kl = match own("tuned-mat") {
        Some(dir) => Some(read_tuned(&dir)?),
        None => None,
    };
    let val = run.read_split(&manifest, "val")?;
    let mut lenses = vec![
        ("mat".to_string(), Lens::Maps(&maps)),
        ("id".to_string(), Lens::Identity),
    ];
    if let Some(a) = &affine {
        lenses.push(("affine".to_string(), Lens::Maps(a)));
    }
    if let Some(t) = &tuned {
        lenses.push(("tuned".to_string(), Lens::Tuned(t)));
    }
    if let Some(t) = &mat_kl {
        lenses.push(("mat+kl".to_string(), Lens::Tuned(t)));
    }
    let batch = match opts.batch {
        0 if device.is_cpu() => 128,
        0 => 1024,
        b => b,
    };
    // Phase times for the manifest: reading and checking the inputs (the model's sha256
    // included), the evaluation, the outputs.
    let read_s = started.elapsed().as_secs_f64();
    let ev = evaluate(lm.model.as_ref(), &val, &lenses, batch, opts.progress)?;
    let evaluate_s = started.elapsed().as_secs_f64() - read_s;
    crate::pipeline::integrity::check_finite_metrics("predict", "predict.json", &ev.metrics)?;
    if opts.maps.is_none() {
        write_traces(&run.file("predict_traces.safetensors"), &ev)?;
    }
    let maps_run = maps_path
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let report = PredictReport {
        run: run
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        maps: maps_path.display().to_string(),
        maps_run,
        layers: lm.model.info().n_layers,
        n_val: ev.n_val,
        lenses: ev.metrics,
    };
    // Another run's maps (cross-corpus) never overwrite this run's own results.
    let out = match opts.maps {
        None => run.file("predict.json"),
        Some(_) => run.file(&format!("predict.maps-{}.json", report.maps_run)),
    };
    crate::data::io::write_json(&out, &report)?;
    if opts.maps.is_none() {
        let title = format!(
            "{} — lens predictions vs the full model ({} validation examples)",
            manifest.model.arch, report.n_val
        );
        crate::render::figures::plot_predict(&run.file("predict"), &title, &report.lenses)?;
        manifest.set_stage(
            "predict",
            serde_json::json!({"wall_s": started.elapsed().as_secs_f64(), "n_val": report.n_val,
                "phases_s": {"read": read_s, "evaluate": evaluate_s,
                    "write": started.elapsed().as_secs_f64() - read_s - evaluate_s}}),
        );
        run.write_manifest(&manifest)?;
    }
    Ok(report)
}
