//! The r^2 stage on a run folder: score every fitted map and the identity on the validation
//! activations ([`crate::lens::r2`]) and write `r2.json` and the heatmaps.

use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use serde::Serialize;

use crate::data::run::{require, RunDir};
use crate::lens::maps::Maps;

/// What `r2.json` holds.
#[derive(Debug, Serialize)]
pub struct R2Report {
    pub layers: usize,
    pub n_val: usize,
    pub mat: Vec<Vec<Option<f64>>>,
    pub id: Vec<Vec<Option<f64>>>,
}

/// Refuses a score that is NaN or infinite: `r2.json` writes "not fitted" as null, and serde
/// would write NaN as null too, making a broken score look like a missing pair.
pub fn check_finite_table(name: &str, table: &[Vec<Option<f64>>]) -> Result<()> {
    for (l, row) in table.iter().enumerate() {
        for (l2, v) in row.iter().enumerate() {
            if let Some(x) = v.filter(|x| !x.is_finite()) {
                anyhow::bail!("{name} r^2 of {l} -> {l2} is {x} (non-finite scores are never written as null)");
            }
        }
    }
    Ok(())
}

/// Computes r^2 of mat and id for every fitted pair on the validation activations; writes
/// `r2.json` and `r2.svg`/`.png`. The scores are computed on `device`.
pub fn run_r2(run: &RunDir, device: &Device) -> Result<R2Report> {
    let _lock = run.lock()?;
    let mut manifest = run.read_manifest()?;
    let started = Instant::now();
    let val = run.read_split(&manifest, "val")?;
    let maps = Maps::read(&require(&run.maps(), "fit")?)?;
    maps.check_model(&manifest.model)?;
    let (s, n, _) = val.hidden_states.dims3()?;
    let table = crate::lens::r2::r2_all_pairs(&val.hidden_states.to_device(device)?, &maps)?;
    for (name, t) in [("mat", &table.mat), ("id", &table.id)] {
        check_finite_table(name, t).map_err(|e| anyhow::anyhow!("{}: r2: {e}", run.root.display()))?;
    }
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
