//! `jumplens merge OUT SHARD_RUN...`: the shards of one collection (`collect --shard I/N`) made
//! into one run folder that the later stages take as they take a single run. The shards must
//! belong together (the same model and corpus sha256, seed and collection options, the same
//! number of shards, each finished) and cover a contiguous range of shard indices once each;
//! the training statistics (`--stats-only`) are summed in shard order, stored activations and
//! the validation activations joined in shard order, which is the order of the single run.
//!
//! Merging merges works: `merge --partial` writes a run holding a range of shards, and a
//! later merge takes it like the shards it holds. Every check runs before anything is written.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;
use serde_json::Value;

use crate::data::run::{Manifest, RunDir, Shard};
use crate::data::stats::GramStats;

/// What `merge` wrote.
#[derive(Debug, Serialize)]
pub struct MergeSummary {
    /// Shard range of the output (`None`: every shard, a whole run).
    pub shard: Option<Shard>,
    pub inputs: usize,
    pub train_examples: usize,
    pub val_examples: usize,
    /// `statistics` or `activations`.
    pub train_form: &'static str,
    pub seconds: f64,
}

/// Options without the shard (what must agree between shards).
fn without_shard(options: &Value) -> Value {
    let mut v = options.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("shard");
    }
    v
}

/// One input: its folder, manifest and shard range, checked to be finished.
struct Input {
    run: RunDir,
    manifest: Manifest,
    shard: Shard,
}

fn read_input(path: &Path) -> Result<Input> {
    let run = RunDir::new(path);
    if !path.is_dir() {
        bail!("{}: no such run folder", path.display());
    }
    let manifest = run.read_manifest()?;
    let Some(shard) = manifest.shard() else {
        bail!(
            "{}: not a shard (collected without --shard); merge takes the runs of `collect --shard I/N`",
            path.display()
        );
    };
    let train = if manifest.stats_form().is_some() {
        run.train_stats()
    } else {
        run.activations("train")
    };
    let parts_left = std::fs::read_dir(run.parts_dir()).is_ok_and(|mut d| d.next().is_some());
    let finished = manifest.counts.contains_key("train")
        && manifest.counts.contains_key("val")
        && train.exists()
        && run.activations("val").exists()
        && !parts_left;
    if !finished {
        bail!(
            "{}: shard {}/{} is incomplete (its collect has not finished); run its collect command again",
            path.display(),
            shard.from,
            shard.count
        );
    }
    Ok(Input { run, manifest, shard })
}

/// Checks that `inputs` are shards of one collection covering a contiguous range once each;
/// returns them in shard order and the range.
fn check_inputs(mut inputs: Vec<Input>, partial: bool) -> Result<(Vec<Input>, Shard)> {
    let first = &inputs[0];
    let reference = Manifest {
        options: without_shard(&first.manifest.options),
        ..first.manifest.clone()
    };
    for x in &inputs[1..] {
        let what = crate::collect::collection_difference(
            &reference,
            &x.manifest.model,
            &x.manifest.corpus,
            &without_shard(&x.manifest.options),
        );
        if let Some(diff) = what {
            bail!(
                "{}: not a shard of the same collection as {}: {diff}",
                x.run.root.display(),
                first.run.root.display()
            );
        }
        if x.shard.count != first.shard.count {
            bail!(
                "{}: a shard of {} shards, but {} is one of {}",
                x.run.root.display(),
                x.shard.count,
                first.run.root.display(),
                first.shard.count
            );
        }
    }
    inputs.sort_by_key(|x| x.shard.from);
    let count = inputs[0].shard.count;
    let mut next = if partial { inputs[0].shard.from } else { 0 };
    for (i, x) in inputs.iter().enumerate() {
        if x.shard.from < next {
            let other = &inputs[i - 1];
            bail!(
                "shard {}/{count} is given twice ({} and {})",
                x.shard.from,
                other.run.root.display(),
                x.run.root.display()
            );
        }
        if x.shard.from > next {
            bail!(
                "shard {next}/{count} is missing (the inputs hold shards {}); pass every shard{}",
                ranges(&inputs),
                if partial {
                    ""
                } else {
                    ", or --partial to merge a contiguous part"
                }
            );
        }
        next = x.shard.to;
    }
    if !partial && next != count {
        bail!(
            "shard {next}/{count} is missing (the inputs hold shards {}); pass every shard, or --partial to merge \
             a contiguous part",
            ranges(&inputs)
        );
    }
    let range = Shard {
        count,
        from: inputs[0].shard.from,
        to: next,
    };
    Ok((inputs, range))
}

/// "0, 1..3" for the inputs' shard ranges.
fn ranges(inputs: &[Input]) -> String {
    inputs
        .iter()
        .map(|x| {
            if x.shard.to == x.shard.from + 1 {
                x.shard.from.to_string()
            } else {
                format!("{}..{}", x.shard.from, x.shard.to - 1)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The activations files of `split` of the inputs joined in order, as the tensors of one file.
fn join_activations(inputs: &[Input], split: &str) -> Result<(Vec<(String, Tensor)>, usize)> {
    let mut hidden = Vec::new();
    let (mut positions, mut tokens, mut offsets, mut article) = (Vec::new(), Vec::new(), vec![0i64], Vec::new());
    for x in inputs {
        // Checked like every stage checks them (shape against the manifest, finite values).
        x.run.read_split(&x.manifest, split)?;
        let path = x.run.activations(split);
        let t = crate::data::io::read_safetensors(&path)?;
        let get = |k: &str| {
            t.get(k)
                .cloned()
                .ok_or_else(|| anyhow!("{}: no tensor '{k}'", path.display()))
        };
        hidden.push(get("hidden_states")?);
        let base = tokens.len() as i64;
        positions.extend(get("positions")?.to_vec1::<i64>()?);
        tokens.extend(get("tokens")?.to_vec1::<i64>()?);
        offsets.extend(get("offsets")?.to_vec1::<i64>()?.into_iter().skip(1).map(|o| o + base));
        article.extend(get("article")?.to_vec1::<i64>()?);
    }
    let n = positions.len();
    let cpu = Device::Cpu;
    let n_tokens = tokens.len();
    Ok((
        vec![
            ("hidden_states".to_string(), Tensor::cat(&hidden, 1)?),
            ("positions".to_string(), Tensor::from_vec(positions, n, &cpu)?),
            ("tokens".to_string(), Tensor::from_vec(tokens, n_tokens, &cpu)?),
            ("offsets".to_string(), Tensor::from_vec(offsets, n + 1, &cpu)?),
            ("article".to_string(), Tensor::from_vec(article, n, &cpu)?),
        ],
        n,
    ))
}

/// The manifest's `counts.<split>` of the joined split: examples and sentences summed, wall
/// times summed, the requested count and skipped sentences as each shard records them.
fn joined_counts(inputs: &[Input], split: &str) -> Result<Value> {
    let mut out = inputs[0].manifest.counts[split].clone();
    let sum = |k: &str| -> f64 {
        inputs
            .iter()
            .filter_map(|x| x.manifest.counts[split].get(k).and_then(Value::as_f64))
            .sum()
    };
    let m = out
        .as_object_mut()
        .with_context(|| format!("counts.{split} is not an object"))?;
    m.insert("examples".into(), (sum("examples") as u64).into());
    m.insert("sentences".into(), (sum("sentences") as u64).into());
    m.insert("wall_s".into(), sum("wall_s").into());
    // The phase times (`phases_s`) summed over the shards, phase by phase.
    let mut phases = serde_json::Map::new();
    for x in inputs {
        if let Some(Value::Object(p)) = x.manifest.counts[split].get("phases_s") {
            for (k, v) in p {
                let e = phases.entry(k.clone()).or_insert_with(|| 0.0.into());
                *e = (e.as_f64().unwrap_or(0.0) + v.as_f64().unwrap_or(0.0)).into();
            }
        }
    }
    if !phases.is_empty() {
        m.insert("phases_s".into(), Value::Object(phases));
    }
    Ok(out)
}

/// Merges the shard runs `inputs` into the new run folder `out` (see the module docs).
pub fn merge(out: &Path, inputs: &[&Path], partial: bool) -> Result<MergeSummary> {
    let started = Instant::now();
    if inputs.is_empty() {
        bail!("merge: no shard runs given");
    }
    if out.exists() && std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{}: exists and is not empty; merge writes a new run folder",
            out.display()
        );
    }
    for p in inputs {
        if std::fs::canonicalize(p).ok() == std::fs::canonicalize(out).ok() && out.exists() {
            bail!("{}: is both an input and the output", out.display());
        }
    }
    let read: Vec<Input> = inputs.iter().map(|p| read_input(p)).collect::<Result<_>>()?;
    let (inputs, range) = check_inputs(read, partial)?;
    let form = inputs[0].manifest.stats_form();
    let first = &inputs[0].manifest;
    let meta = |split: &str| {
        HashMap::from([
            ("split".to_string(), split.to_string()),
            ("n_layers".to_string(), first.model.n_layers.to_string()),
            ("d_model".to_string(), first.model.d_model.to_string()),
            (
                "note".to_string(),
                "hidden_states[l] = h_l at positions[i] of example i; h_L is before the final norm".to_string(),
            ),
        ])
    };
    // Everything is read and joined before the first write.
    let (val, n_val) = join_activations(&inputs, "val")?;
    let (train_stats, train_acts) = match form {
        Some(_) => {
            let mut total: Option<GramStats> = None;
            for x in &inputs {
                let s = crate::pipeline::fit::read_train_stats(&x.run, &x.manifest)?;
                match &mut total {
                    None => total = Some(s),
                    Some(t) => t.add(&s)?,
                }
            }
            (total, None)
        }
        None => (None, Some(join_activations(&inputs, "train")?)),
    };
    let out_run = RunDir::new(out);
    let _lock = out_run.lock()?;
    let n_train = match (&train_stats, train_acts) {
        (Some(s), _) => {
            s.write(&out_run.train_stats())?;
            s.n as usize
        }
        (None, Some((tensors, n))) => {
            crate::data::io::write_safetensors(&out_run.activations("train"), &tensors, Some(meta("train")))?;
            n
        }
        (None, None) => unreachable!("one train form"),
    };
    crate::data::io::write_safetensors(&out_run.activations("val"), &val, Some(meta("val")))?;
    let mut options = without_shard(&first.options);
    if !range.is_whole() {
        options
            .as_object_mut()
            .expect("options are an object")
            .insert("shard".into(), serde_json::to_value(range)?);
    }
    let mut counts = std::collections::BTreeMap::new();
    for split in ["train", "val"] {
        counts.insert(split.to_string(), joined_counts(&inputs, split)?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut manifest = Manifest {
        options,
        counts,
        stages: Default::default(),
        ..first.clone()
    };
    manifest.set_stage(
        "merge",
        serde_json::json!({
            "inputs": inputs.iter().map(|x| x.run.root.display().to_string()).collect::<Vec<_>>(),
            "shards": range,
            "wall_s": seconds,
        }),
    );
    out_run.write_manifest(&manifest)?;
    Ok(MergeSummary {
        shard: (!range.is_whole()).then_some(range),
        inputs: inputs.len(),
        train_examples: n_train,
        val_examples: n_val,
        train_form: if form.is_some() { "statistics" } else { "activations" },
        seconds,
    })
}
