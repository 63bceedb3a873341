//! The sub-modules stage on a run folder: read both splits, the maps and `r2.json`, run the
//! sub-module replacement and alternation experiments on the model
//! ([`crate::eval::submodules::experiments`]) and write `submodules.json`, `alternation.json`
//! and their figures.
//!
//! What the runner supplies when the run lacks it (the experiments themselves are unchanged):
//! - a statistics-only run (`collect --stats-only`, or merged shards) stores no training states:
//!   the training examples the sub-module maps are fitted on are replayed from the run's corpus
//!   and options ([`crate::collect::replay_train`]: the same first `--train` examples a stored
//!   run would give);
//! - to-final maps (`--pairs to-final`, the default above 4 GiB of maps) lack the short jumps
//!   l -> l+1, l -> l+2 of the periodic alternation schedules: those few maps are fitted here
//!   (OLS on the training states, as `fit`), scored on the validation states, and used only by
//!   this stage; the r²-informed schedules then choose among l -> L and these jumps. The
//!   manifest records how many were fitted (`stages.submodules.jump_maps_fitted`).

use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;

use crate::collect::CollectOptions;
use crate::data::run::{require, Manifest, RunDir};
use crate::data::Activations;
pub use crate::eval::submodules::SubmoduleOptions;
use crate::eval::submodules::{check_r2_shape, experiments, schedule_pairs, AlternationReport, SubmoduleReport};
use crate::lens::fit::few_rows::min_norm_maps;
use crate::lens::fit::{fit_all_pairs, FitOptions};
use crate::lens::maps::{Maps, PairMap};
use crate::lens::r2::r2_all_pairs;
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
    let (train, replayed) = match manifest.stats_form() {
        None => (run.read_split(&manifest, "train")?, false),
        Some(_) => (replay_training(lm, run, &manifest, opts)?, true),
    };
    let val = run.read_split(&manifest, "val")?;
    let maps = Maps::read(&require(&run.maps(), "fit")?)?;
    maps.check_model(&manifest.model)?;
    let mut r2 = read_r2(run, info.n_layers)?;
    let (maps, fitted_here) = with_schedule_maps(
        maps,
        &train,
        &val,
        &mut r2,
        info.n_layers,
        lm.model.device(),
        opts.progress,
    )?;
    let maps = maps.to_device(lm.model.head_device())?;
    let (mut sub_report, alt) = experiments(lm, &train, &val, &maps, &r2, opts)?;
    let diverged = sub_report.mark_diverged();
    if let Some(first) = diverged.first() {
        eprintln!(
            "submodules: {} replacement cell(s) diverged (logits overflow f32, so KL / cross-entropy are \
             not numbers), e.g. {first}; written as null and listed under \"diverged\" in submodules.json",
            diverged.len()
        );
    }
    check_finite(&sub_report, &alt)?;
    crate::data::io::write_json(&run.file("submodules.json"), &sub_report)?;
    crate::render::figures::plot_submodules(&run.file("submodules"), &manifest.model.arch, &sub_report)?;
    crate::data::io::write_json(&run.file("alternation.json"), &alt)?;
    crate::render::figures::plot_alternation(&run.file("alternation"), &manifest.model.arch, &alt)?;
    manifest.set_stage(
        "submodules",
        serde_json::json!({"wall_s": started.elapsed().as_secs_f64(), "n_eval": sub_report.n_eval,
            "n_train": opts.n_train.min(train.len()), "train_replayed": replayed,
            "jump_maps_fitted": fitted_here, "parts_s": &sub_report.parts_s}),
    );
    run.write_manifest(&manifest)?;
    Ok((sub_report, alt))
}

/// The training examples of a statistics-only run, replayed from the corpus and options its
/// manifest records (the first `opts.n_train`; the corpus must be the one collected from).
fn replay_training(
    lm: &LoadedModel,
    run: &RunDir,
    manifest: &Manifest,
    opts: &SubmoduleOptions,
) -> Result<Activations> {
    if let Some(sh) = manifest.shard() {
        bail!(
            "{}: shards {}..{} of {} only; merge all shards first (jumplens merge)",
            run.root.display(),
            sh.from,
            sh.to,
            sh.count
        );
    }
    let corpus = std::path::PathBuf::from(&manifest.corpus.path);
    if !corpus.exists() {
        bail!(
            "{}: the corpus {} is gone; sub-modules replay the training sentences of a --stats-only run from it",
            run.root.display(),
            corpus.display()
        );
    }
    if crate::data::io::sha256_path(&corpus)? != manifest.corpus.sha256 {
        bail!(
            "{}: the corpus {} changed since collection (sha256 differs); sub-modules cannot replay the \
             training sentences of this --stats-only run",
            run.root.display(),
            corpus.display()
        );
    }
    let copts: CollectOptions = serde_json::from_value(manifest.options.clone()).map_err(|e| {
        anyhow!(
            "{}: the manifest's collection options are unreadable ({e})",
            run.manifest().display()
        )
    })?;
    if opts.progress {
        eprintln!(
            "submodules: a --stats-only run keeps no training states; replaying the first {} training examples",
            opts.n_train.min(copts.n_train)
        );
    }
    crate::collect::replay_train(lm, &corpus, &copts, opts.n_train, opts.batch_tokens, opts.progress)
}

/// The run's maps plus the jumps the periodic schedules need that it lacks (to-final maps),
/// fitted on the training states and scored on the validation states on `device` (their mat r²
/// is filled into `r2`); returns the maps and how many were fitted here.
fn with_schedule_maps(
    maps: Maps,
    train: &Activations,
    val: &Activations,
    r2: &mut [Vec<Option<f64>>],
    n_layers: usize,
    device: &candle_core::Device,
    progress: bool,
) -> Result<(Maps, usize)> {
    let missing: Vec<(usize, usize)> = schedule_pairs(n_layers)
        .into_iter()
        .filter(|&(l, l2)| maps.get(l, l2).is_none())
        .collect();
    if missing.is_empty() {
        return Ok((maps, 0));
    }
    if progress {
        eprintln!(
            "submodules: {} has no maps for the alternation's short jumps (to-final); fitting those {} \
             (l -> l+1, l+2) on {} training examples for this stage",
            maps.name(),
            missing.len(),
            train.len()
        );
    }
    // On the model's device, as `fit` and `r2` run there (a GPU fits d = 4096 in seconds).
    let states = train.hidden_states.to_device(device)?;
    let (_, n, d) = states.dims3()?;
    let extra = if n < d {
        // Fewer examples than coordinates (3,000 at d = 4096): every d x d Gram is singular, and
        // `fit_all_pairs` would end each pair in a host eigendecomposition of it (the 22 jumps of
        // an 8B-shaped model took minutes); the examples' Gram gives the same least-norm maps.
        let inputs: Vec<(Tensor, Tensor)> = missing
            .iter()
            .map(|&(l, l2)| Ok((states.get(l)?, states.get(l2)?)))
            .collect::<Result<_>>()?;
        let pairs = missing
            .iter()
            .zip(min_norm_maps(&inputs)?)
            .map(|(&(source, target), a)| PairMap {
                source,
                target,
                a,
                intercept: None,
            })
            .collect();
        Maps::new(d, pairs)
    } else {
        let fit = FitOptions {
            progress,
            ..FitOptions::default()
        };
        fit_all_pairs(&states, &missing, &fit)?.0
    };
    let table = r2_all_pairs(&val.hidden_states.to_device(device)?, &extra)?;
    for &(l, l2) in &missing {
        r2[l][l2] = table.mat[l][l2];
    }
    let fitted = extra.len();
    let Maps {
        d,
        mut pairs,
        metadata,
        path,
    } = maps;
    pairs.extend(extra.pairs);
    Ok((
        Maps {
            metadata,
            path,
            ..Maps::new(d, pairs)
        },
        fitted,
    ))
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
    // KL / cross-entropy of diverged cells are named in `diverged`; everything else must be finite.
    let mut checked = sub.variants.clone();
    for m in checked.values_mut() {
        m.kl.iter_mut()
            .chain(m.ce.iter_mut())
            .filter(|v| !v.is_finite())
            .for_each(|v| *v = 0.0);
    }
    crate::pipeline::integrity::check_finite_metrics("submodules", "submodules.json", &checked)?;
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
