//! The sub-modules stage on a run folder: read both splits, the maps and `r2.json`, run the
//! sub-module replacement and alternation experiments on the model
//! ([`crate::eval::submodules::experiments`]) and write `submodules.json`, `alternation.json`
//! and their figures.

use anyhow::{bail, Result};

use crate::data::run::{require, RunDir};
pub use crate::eval::submodules::SubmoduleOptions;
use crate::eval::submodules::{check_r2_shape, experiments, AlternationReport, SubmoduleReport};
use crate::lens::maps::Maps;
use crate::model::LoadedModel;

/// Runs the sub-module and alternation experiments and writes their JSON and plots.
pub fn run_submodules(
    lm: &LoadedModel,
    run: &RunDir,
    opts: &SubmoduleOptions,
) -> Result<(SubmoduleReport, AlternationReport)> {
    let started = std::time::Instant::now();
    if opts.n_eval == 0 || opts.n_train == 0 {
        bail!(
            "submodules needs at least one evaluation (--val) and one training (--train) example (asked for {} and {})",
            opts.n_eval,
            opts.n_train
        );
    }
    let _lock = run.lock()?;
    let mut manifest = run.read_manifest()?;
    crate::pipeline::integrity::check_run_model(run, &manifest, lm)?;
    let info = lm.model.info().clone();
    let train = run.read_split(&manifest, "train")?;
    let val = run.read_split(&manifest, "val")?;
    let maps = Maps::read(&require(&run.maps(), "fit")?)?;
    maps.check_model(&manifest.model)?;
    let maps = maps.to_device(lm.model.head_device())?;
    let r2 = read_r2(run, info.n_layers)?;
    let (sub_report, alt) = experiments(lm, &train, &val, &maps, &r2, opts)?;
    check_finite(&sub_report, &alt)?;
    crate::data::io::write_json(&run.file("submodules.json"), &sub_report)?;
    crate::render::figures::plot_submodules(&run.file("submodules"), &manifest.model.arch, &sub_report)?;
    crate::data::io::write_json(&run.file("alternation.json"), &alt)?;
    crate::render::figures::plot_alternation(&run.file("alternation"), &manifest.model.arch, &alt)?;
    manifest.set_stage(
        "submodules",
        serde_json::json!({"wall_s": started.elapsed().as_secs_f64(), "n_eval": sub_report.n_eval,
            "n_train": opts.n_train.min(train.len())}),
    );
    run.write_manifest(&manifest)?;
    Ok((sub_report, alt))
}

/// The mat r^2 table from `r2.json`, [L + 1][L + 1].
pub fn read_r2(run: &RunDir, n_layers: usize) -> Result<Vec<Vec<Option<f64>>>> {
    let p = require(&run.file("r2.json"), "r2")?;
    let text = std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: cannot read ({e})", p.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not valid JSON ({e})", p.display()))?;
    let mat = v
        .get("mat")
        .ok_or_else(|| anyhow::anyhow!("{}: no 'mat' table", p.display()))?;
    let mat: Vec<Vec<Option<f64>>> = serde_json::from_value(mat.clone())
        .map_err(|e| anyhow::anyhow!("{}: 'mat' is not a table of numbers ({e})", p.display()))?;
    check_r2_shape(&mat, n_layers).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    Ok(mat)
}

/// Refuses results with a NaN or infinite number (serde would write it as `null`).
fn check_finite(sub: &SubmoduleReport, alt: &AlternationReport) -> Result<()> {
    crate::pipeline::integrity::check_finite_metrics("submodules", "submodules.json", &sub.variants)?;
    let schedules = [
        ("periodic", &alt.periodic),
        ("r2_informed", &alt.r2_informed),
        ("single_jump", &alt.single_jump),
    ];
    crate::pipeline::integrity::check_finite_values(
        "submodules",
        "alternation.json",
        schedules.iter().flat_map(|(kind, list)| {
            list.iter().flat_map(move |s| {
                [
                    ("r2_product", &s.r2_product),
                    ("p@1", &s.p_at_1),
                    ("surprisal", &s.surprisal),
                ]
                .map(|(field, v)| (format!("{kind} schedule {}: {field}", s.name), v))
            })
        }),
    )
}
