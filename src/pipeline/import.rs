//! `jumplens import-maps DIR --run RUN`: the paper's published `i_j.pickle` matrices
//! ([`crate::lens::import`]) checked against the run's model and written as a maps file, which
//! `jumplens predict RUN --maps FILE` then scores as `mat`.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::data::run::RunDir;

/// Imports the matrices of `dir` for the run's model and writes them to `out` (default
/// `RUN/maps_imported.safetensors`); returns the file and the number of maps.
pub fn run_import_maps(run: &RunDir, dir: &Path, out: Option<&Path>) -> Result<(PathBuf, usize)> {
    let manifest = run.read_manifest()?;
    let maps = crate::lens::import::import_pickled_maps(dir, manifest.model.d_model, manifest.model.n_layers)?;
    let out = out.map_or_else(|| run.file("maps_imported.safetensors"), Path::to_path_buf);
    maps.write(&out)?;
    Ok((out, maps.len()))
}
