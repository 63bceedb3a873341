//! The early-exit stage on a run folder: read the per-example traces `predict` wrote
//! (`predict_traces.safetensors`) and the validation positions, run the analysis
//! ([`crate::eval::early_exit::analyse`]) and write `early_exit.json` and the figure. Every lens
//! predict traced is an exit criterion: `mat` and `id`, and `affine`, `tuned` and `mat+kl` when
//! predict scored them.

use anyhow::Result;
use candle_core::Tensor;

use crate::data::run::{require, RunDir};
use crate::eval::early_exit::{analyse, cosine_confidence, EarlyExitReport, LensTrace, ModelFlops};
pub use crate::eval::early_exit::{EarlyExitOptions, Measure, Rule};
use crate::eval::predict::Lens;
use crate::lens::maps::Maps;
use crate::lens::tuned::TunedLens;

/// The lenses `predict` traces, in the order early exit reports them.
const TRACED_LENSES: [&str; 5] = ["mat", "id", "affine", "tuned", "mat+kl"];

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
    let cosine = opts.measure == Measure::Cosine;
    let maps = if cosine {
        Some(Maps::read(&require(&run.maps(), "fit")?)?)
    } else {
        None
    };
    let read_maps = |path: std::path::PathBuf| -> Result<Option<Maps>> {
        Ok(if cosine && path.exists() {
            Some(Maps::read(&path)?)
        } else {
            None
        })
    };
    let affine = read_maps(run.file("maps_affine.safetensors"))?;
    let read_tuned = |name: &str| -> Result<Option<TunedLens>> {
        let dir = run.file(name);
        Ok(if cosine && dir.join("params.pt").exists() {
            Some(TunedLens::read_dir(&dir)?)
        } else {
            None
        })
    };
    let (tuned, mat_kl) = (read_tuned("tuned")?, read_tuned("tuned-mat")?);
    let mut lenses = Vec::new();
    // Every lens predict traced, in a fixed order: mat and id always, the others when present.
    for lens_name in TRACED_LENSES {
        if !traces.contains_key(&format!("{lens_name}.top1")) && !matches!(lens_name, "mat" | "id") {
            continue;
        }
        let top1 = ids(get(&format!("{lens_name}.top1"))?)?;
        let confidence = match opts.measure {
            Measure::Top1Top2 => get(&format!("{lens_name}.margin"))?.to_vec2::<f32>()?,
            Measure::MaxProb => get(&format!("{lens_name}.max_prob"))?.to_vec2::<f32>()?,
            Measure::Cosine => {
                let lens = match lens_name {
                    "mat" => maps.as_ref().map(Lens::Maps),
                    "affine" => affine.as_ref().map(Lens::Maps),
                    "tuned" => tuned.as_ref().map(Lens::Tuned),
                    "mat+kl" => mat_kl.as_ref().map(Lens::Tuned),
                    _ => Some(Lens::Identity),
                };
                // A lens predict read from elsewhere (`predict --tuned-lens DIR`) has no cast
                // here to take cosines of: it is left out of the cosine rule.
                let Some(lens) = lens else { continue };
                cosine_confidence(&val, &lens)?
            }
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
