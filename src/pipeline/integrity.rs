//! Checks the stage runners make before they use or write anything (issue 19): the loaded
//! model is the run's (its shape and its sha256 against `manifest.json`), and no metric that is
//! NaN or infinite reaches a JSON file, where serde would write it as `null`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};

use crate::data::run::{Manifest, RunDir};
use crate::eval::predict::LensMetrics;
use crate::lens::maps::Maps;
use crate::model::LoadedModel;

/// Refuses a model other than the one the run was collected with: the shape (n_layers,
/// d_model) first, then the sha256 of its file or folder (cached in the run folder by path,
/// size and mtime, so a big model is read once, not at every stage).
pub fn check_run_model(run: &RunDir, manifest: &Manifest, lm: &LoadedModel) -> Result<()> {
    let info = lm.model.info();
    let recorded = &manifest.model;
    for (field, want, got) in [
        ("n_layers", recorded.n_layers, info.n_layers),
        ("d_model", recorded.d_model, info.d_model),
    ] {
        if want != got {
            bail!(
                "{}: model.{field} is {want} but the loaded model {} has {got}; the run was \
                 collected with another model (pass the run's model with --model)",
                run.manifest().display(),
                lm.path.display()
            );
        }
    }
    let sha = crate::data::io::sha256_path_cached(&lm.path, &run.sha256_cache())?;
    if sha != recorded.sha256 {
        bail!(
            "{}: model.sha256 is {}… but the loaded model {} has {}…; the run was collected with \
             another model file (pass the run's model with --model)",
            run.manifest().display(),
            short(&recorded.sha256),
            lm.path.display(),
            short(&sha)
        );
    }
    Ok(())
}

/// Refuses maps fitted on another model file than `lm` (the maps' `model_sha256` header
/// field; maps without it pass). The hash is cached beside the maps (their run folder).
pub fn check_maps_model(maps: &Maps, lm: &LoadedModel) -> Result<()> {
    let (Some(recorded), Some(path)) = (maps.metadata.get("model_sha256"), &maps.path) else {
        return Ok(());
    };
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let sha = crate::data::io::sha256_path_cached(&lm.path, &RunDir::new(folder).sha256_cache())?;
    if &sha != recorded {
        bail!(
            "{}: model_sha256 is {}… but the loaded model {} has {}…; the maps were fitted on \
             another model file",
            path.display(),
            short(recorded),
            lm.path.display(),
            short(&sha)
        );
    }
    Ok(())
}

fn short(sha: &str) -> &str {
    &sha[..12.min(sha.len())]
}

/// Refuses metrics with a NaN or infinite value, naming the stage, the lens (or variant), the
/// layer and the metric; `file` is the JSON the stage would have written.
pub fn check_finite_metrics(stage: &str, file: &str, metrics: &BTreeMap<String, LensMetrics>) -> Result<()> {
    for (lens, m) in metrics {
        if let Some((metric, layer, value)) = m.first_non_finite() {
            let why = if metric == "ce" && value.is_nan() {
                " (no validation example has a token to score it against: collect more --val)"
            } else {
                ""
            };
            bail!(
                "{stage}: lens {lens}, layer {layer}: {metric} is {value}{why}; refusing to write \
                 it to {file} (where it would read as null)"
            );
        }
    }
    Ok(())
}

/// Refuses a NaN or infinite number among `values` (named), for results that are not
/// [`LensMetrics`] (early-exit curves, alternation schedules).
pub fn check_finite_values<'a>(
    stage: &str,
    file: &str,
    values: impl IntoIterator<Item = (String, &'a f64)>,
) -> Result<()> {
    for (name, v) in values {
        if !v.is_finite() {
            bail!("{stage}: {name} is {v}; refusing to write it to {file} (where it would read as null)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(layers: usize) -> LensMetrics {
        LensMetrics {
            p_at_1: vec![0.5; layers],
            p_at_5: vec![0.6; layers],
            p_at_10: vec![0.7; layers],
            surprisal: vec![1.0; layers],
            surprisal_ci95: vec![[0.9, 1.1]; layers],
            kl: vec![0.1; layers],
            ce: vec![2.0; layers],
        }
    }

    #[test]
    fn a_nan_metric_is_refused_naming_stage_lens_layer_and_metric() {
        let mut all = BTreeMap::from([("id".to_string(), metrics(3)), ("mat".to_string(), metrics(3))]);
        assert!(check_finite_metrics("predict", "predict.json", &all).is_ok());
        all.get_mut("mat").unwrap().kl[2] = f64::NAN;
        let e = check_finite_metrics("predict", "predict.json", &all)
            .unwrap_err()
            .to_string();
        for needle in ["predict:", "lens mat", "layer 2", "kl is NaN", "predict.json"] {
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
        let mut all = BTreeMap::from([("mat".to_string(), metrics(3))]);
        all.get_mut("mat").unwrap().ce[0] = f64::NAN;
        let e = check_finite_metrics("predict", "predict.json", &all)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 0: ce is NaN") && e.contains("--val"), "{e}");
        let mut all = BTreeMap::from([("mat".to_string(), metrics(2))]);
        all.get_mut("mat").unwrap().surprisal_ci95[1][1] = f64::INFINITY;
        let e = check_finite_metrics("submodules", "submodules.json", &all)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 1: surprisal_ci95 is inf"), "{e}");
    }

    #[test]
    fn a_nan_value_is_refused_by_name() {
        let v = [0.5, f64::NAN];
        let named = || {
            v.iter()
                .enumerate()
                .map(|(i, x)| (format!("curve mat, point {i}: p@1"), x))
        };
        let e = check_finite_values("early-exit", "early_exit.json", named())
            .unwrap_err()
            .to_string();
        assert!(e.contains("early-exit: curve mat, point 1: p@1 is NaN"), "{e}");
        assert!(check_finite_values("early-exit", "early_exit.json", named().take(1)).is_ok());
    }
}
