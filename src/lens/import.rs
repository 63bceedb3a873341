//! The paper's published matrices as a [`Maps`] file (`jumplens import-maps`): a folder of
//! `i_j.pickle` files, each one `torch.save`d tensor A [d, d] for the jump from hidden state i to
//! state j (states numbered as `hidden_states`: 0 = the embedding output, L = the last block's
//! output), applied as `A h` like the fitted maps. Each file is read with the safe reader
//! ([`crate::data::torch_pickle::read_tensor_file`]: nothing executed) and checked against the
//! model's width and layer count.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::lens::maps::{Maps, PairMap};

/// Reads every `i_j.pickle` of `dir` into maps for a model of width `d` with `n_layers` blocks
/// (other files are ignored). A file named `i_j.pickle` with i >= j, j > n_layers, a shape other
/// than [d, d], non-finite values, or no such file at all: a one-line error naming it.
pub fn import_pickled_maps(dir: &Path, d: usize, n_layers: usize) -> Result<Maps> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("{}: cannot read the folder", dir.display()))?;
    let mut pairs = Vec::new();
    let mut names: Vec<std::path::PathBuf> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("{}: cannot read the folder", dir.display()))?;
    names.sort();
    for path in names {
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pickle"))
        else {
            continue;
        };
        let what = path.display();
        let (i, j) = stem
            .split_once('_')
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .ok_or_else(|| anyhow!("{what}: expected a name i_j.pickle (source and target layer)"))?;
        if i >= j || j > n_layers {
            bail!("{what}: the jump {i} -> {j} is not one of 0 <= i < j <= {n_layers} (the model's layers)");
        }
        let a = crate::data::torch_pickle::read_tensor_file(&path)?;
        if a.dims() != [d, d] {
            bail!("{what}: the matrix is {:?}, the model needs [{d}, {d}]", a.dims());
        }
        let finite = crate::host::with_f32_slice(&a, |v| Ok(v.iter().all(|x| x.is_finite())))?;
        if !finite {
            bail!("{what}: the matrix has NaN or infinite entries");
        }
        pairs.push(PairMap {
            source: i,
            target: j,
            a,
            intercept: None,
        });
    }
    if pairs.is_empty() {
        bail!("{}: no i_j.pickle files", dir.display());
    }
    let mut maps = Maps::new(d, pairs);
    maps.metadata.insert("n_layers".into(), n_layers.to_string());
    maps.metadata
        .insert("source".into(), format!("imported from {}", dir.display()));
    Ok(maps)
}
