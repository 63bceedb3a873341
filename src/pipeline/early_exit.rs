//! The early-exit stage on a run folder: read the per-example traces `predict` wrote
//! (`predict_traces.safetensors`) and the validation positions, run the analysis
//! ([`crate::eval::early_exit::analyse`]) and write `early_exit.json` and the figure.

use anyhow::Result;
use candle_core::Tensor;

use crate::data::run::{require, RunDir};
use crate::eval::early_exit::{analyse, cosine_confidence, EarlyExitReport, LensTrace, ModelFlops};
pub use crate::eval::early_exit::{EarlyExitOptions, Measure, Rule};
use crate::eval::predict::Lens;
use crate::lens::maps::Maps;

/// Runs the early-exit stage from the run's `predict_traces.safetensors` (and activations).
pub fn run_early_exit(run: &RunDir, opts: &EarlyExitOptions) -> Result<EarlyExitReport> {
    let started = std::time::Instant::now();
    let _lock = run.lock()?;
    let mut manifest = run.read_manifest()?;
    let traces_path = require(&run.file("predict_traces.safetensors"), "predict")?;
    let traces = crate::data::io::read_safetensors(&traces_path)?;
    let get = |name: &str| -> Result<Tensor> {
        traces
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{}: no tensor '{name}'", traces_path.display()))
    };
    let ids = |t: Tensor| -> Result<Vec<Vec<u32>>> {
        Ok(t.to_vec2::<i64>()?
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect())
    };
    let model_top1: Vec<u32> = get("model_top1")?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let val = run.read_split(&manifest, "val")?;
    let masked = manifest.model.attention == "bidirectional";
    let maps = match opts.measure {
        Measure::Cosine => Some(Maps::read(&require(&run.maps(), "fit")?)?),
        _ => None,
    };
    let mut lenses = Vec::new();
    for lens_name in ["mat", "id"] {
        let top1 = ids(get(&format!("{lens_name}.top1"))?)?;
        let confidence = match (opts.measure, &maps) {
            (Measure::Top1Top2, _) => get(&format!("{lens_name}.margin"))?.to_vec2::<f32>()?,
            (Measure::MaxProb, _) => get(&format!("{lens_name}.max_prob"))?.to_vec2::<f32>()?,
            (Measure::Cosine, Some(maps)) if lens_name == "mat" => cosine_confidence(&val, &Lens::Maps(maps))?,
            (Measure::Cosine, _) => cosine_confidence(&val, &Lens::Identity)?,
        };
        lenses.push((lens_name, LensTrace { top1, confidence }));
    }
    let report = analyse(
        &lenses,
        &model_top1,
        &val.positions,
        masked,
        manifest.model.n_layers,
        &ModelFlops::of(&manifest.model),
        opts,
    )?;
    check_finite(&report)?;
    crate::data::io::write_json(&run.file("early_exit.json"), &report)?;
    manifest.set_stage(
        "early_exit",
        serde_json::json!({"wall_s": started.elapsed().as_secs_f64()}),
    );
    run.write_manifest(&manifest)?;
    crate::render::figures::plot_early_exit(
        &run.file("early_exit"),
        &format!("{} — early exit ({:?} rule)", manifest.model.arch, opts.rule),
        &report,
    )?;
    Ok(report)
}

/// Refuses a report with a NaN or infinite number (serde would write it as `null`, which in
/// `saved_at` means "target not reached").
fn check_finite(report: &EarlyExitReport) -> Result<()> {
    let curves = report.curves.iter().flat_map(|(lens, points)| {
        points.iter().enumerate().flat_map(move |(i, p)| {
            [
                ("lambda", &p.lambda),
                ("mean_layers", &p.mean_layers),
                ("p@1", &p.p_at_1),
            ]
            .map(|(field, v)| (format!("lens {lens}, curve point {i}: {field}"), v))
        })
    });
    let fixed = report.fixed.iter().flat_map(|(lens, v)| {
        v.iter()
            .enumerate()
            .map(move |(layer, x)| (format!("lens {lens}, layer {layer}: fixed-exit p@1"), x))
    });
    let saved = report.saved_at.iter().flat_map(|(target, row)| {
        row.iter()
            .filter_map(move |(lens, v)| v.as_ref().map(|x| (format!("lens {lens}, target {target}: saved"), x)))
    });
    crate::pipeline::integrity::check_finite_values("early-exit", "early_exit.json", curves.chain(fixed).chain(saved))
}
