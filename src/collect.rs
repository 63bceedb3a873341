//! Collecting hidden states at sampled token positions of real text (the paper's section 3 data).
//!
//! Causal LMs: the state at the sampled position is the one that predicts the next token; thanks
//! to causality, running the prefix up to that position gives exactly the states the paper gets
//! from the sentence cut after it, so only the prefix is run (and sentences of similar length are
//! batched together to avoid padding). Masked LMs: the sampled token is replaced by [MASK] and
//! the whole sentence is fed.
//!
//! Work is done in parts of a few hundred sentences; each finished part is written atomically
//! under `activations/parts/`, so an interrupted collection resumes where it stopped.
//!
//! Beyond one machine ([`StreamOptions`]): `--stats-only` sums the float64 statistics of the
//! fit ([`crate::data::stats`]) over the training examples instead of storing them (memory
//! independent of N; the validation split is still stored), and `--shard I/N` collects the
//! I-th of N contiguous slices of the parts of exactly the examples the unsharded run samples
//! (the same sentences, positions and batches), so that `jumplens merge` of the N shards is the
//! single run.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::corpus::{self, SampledSentence};
use crate::data::run::{CorpusRecord, Manifest, ModelRecord, RunDir, Shard};
use crate::data::stats::{GramStats, StatsPairs};
use crate::data::Activations;
use crate::model::{self, AttentionKind, Batch, LoadedModel};

/// Which token positions of a sentence become examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// `k` distinct uniformly random positions (the paper: k = 1).
    Random { k: usize },
    /// Every position.
    All,
}

/// Options of `jumplens collect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CollectOptions {
    pub n_train: usize,
    pub n_val: usize,
    pub seed: u64,
    pub positions: Positions,
    /// JSONL field holding the text.
    pub text_field: String,
    /// Padded tokens per forward batch (batch size x longest sequence); 0 = the device's
    /// default ([`default_batch_tokens`]).
    pub batch_tokens: usize,
}

/// Padded tokens per forward batch when none is given: 1,024 on the CPU (larger batches only
/// add padding there), 16,384 on a GPU, which needs wide batches to be busy.
pub fn default_batch_tokens(device: &Device) -> usize {
    if device.is_cpu() {
        1024
    } else {
        16384
    }
}

impl Default for CollectOptions {
    fn default() -> Self {
        Self {
            n_train: 9000,
            n_val: 3000,
            seed: 0,
            positions: Positions::Random { k: 1 },
            text_field: "text".into(),
            batch_tokens: 0,
        }
    }
}

/// One sentence to run and the positions to read from it.
#[derive(Debug, Clone)]
pub struct Job {
    /// The sentence's token ids (unmasked, untruncated).
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub article: usize,
}

/// Tokenized, position-sampled examples of one split.
pub fn make_jobs(
    lm: &LoadedModel,
    sentences: &[SampledSentence],
    tokens: &HashMap<String, Vec<u32>>,
    positions: Positions,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Job>> {
    let tok = lm.tokenizer()?;
    let causal = lm.model.info().attention == AttentionKind::Causal;
    let mut jobs = Vec::with_capacity(sentences.len());
    for s in sentences {
        let ids = tokens.get(&s.text).cloned().map_or_else(|| lm.encode(&s.text), Ok)?;
        // A causal model's BOS state is an attention sink, not a prediction from text: skip it.
        let first = usize::from(causal && tok.is_special(ids[0]) && ids.len() > 1);
        let candidates: Vec<usize> = (first..ids.len()).collect();
        let mut chosen = match positions {
            Positions::All => candidates,
            Positions::Random { k } => rand::seq::index::sample(rng, candidates.len(), k.min(candidates.len()))
                .into_iter()
                .map(|i| candidates[i])
                .collect(),
        };
        chosen.sort_unstable();
        jobs.push(Job {
            tokens: ids,
            positions: chosen,
            article: s.article,
        });
    }
    Ok(jobs)
}

/// One forward unit: the input fed to the model and the positions read from it.
#[derive(Debug, Clone)]
pub struct Unit {
    pub input: Vec<u32>,
    pub positions: Vec<usize>,
    /// Index of the first example this unit produces.
    pub first_example: usize,
}

/// The forward units of `jobs`: a causal sentence runs once, cut after its last read position;
/// a masked-LM sentence runs once per read position, with that token masked.
pub fn units(jobs: &[Job], causal: bool, mask_id: Option<u32>) -> Result<Vec<Unit>> {
    let mut out = Vec::new();
    let mut next = 0;
    for job in jobs {
        if causal {
            let Some(&last) = job.positions.last() else {
                bail!("a sentence with no position to read (positions per sentence must be at least 1)");
            };
            out.push(Unit {
                input: job.tokens[..=last].to_vec(),
                positions: job.positions.clone(),
                first_example: next,
            });
            next += job.positions.len();
        } else {
            let mask = mask_id.ok_or_else(|| anyhow::anyhow!("masked LM without a [MASK] token"))?;
            for &p in &job.positions {
                let mut input = job.tokens.clone();
                input[p] = mask;
                out.push(Unit {
                    input,
                    positions: vec![p],
                    first_example: next,
                });
                next += 1;
            }
        }
    }
    Ok(out)
}

/// One unit per example of collected activations (the first `limit` examples).
pub fn units_from_activations(
    act: &Activations,
    causal: bool,
    mask_id: Option<u32>,
    limit: usize,
) -> Result<Vec<Unit>> {
    let jobs: Vec<Job> = (0..act.len().min(limit))
        .map(|i| Job {
            tokens: act.sentence(i).to_vec(),
            positions: vec![act.positions[i]],
            article: 0,
        })
        .collect();
    units(&jobs, causal, mask_id)
}

/// A padded batch of units and where its read positions are.
pub struct UnitBatch {
    pub batch: Batch,
    /// Flat indices (row * T + position) of the read positions, [rows].
    pub gather: Tensor,
    /// The example each gathered row belongs to (relative to the first unit's first example).
    pub examples: Vec<usize>,
}

impl UnitBatch {
    /// The read positions' rows of a [B, T, d] tensor, as [rows, d], on the tensor's device
    /// (the row index is copied there when a split model left the tensor on another device).
    pub fn rows(&self, h: &Tensor) -> Result<Tensor> {
        let gather = crate::model::placement::move_to(&self.gather, h.device())?;
        self.rows_with(h, &gather)
    }

    /// [`UnitBatch::rows`] with the row index already on the tensor's device.
    fn rows_with(&self, h: &Tensor, gather: &Tensor) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        Ok(h.reshape((b * t, d))?.index_select(gather, 0)?)
    }
}

/// Groups units into batches of similar length (longest first), at most `batch_tokens` padded
/// tokens each (0 = [`default_batch_tokens`]).
pub fn unit_batches(units: &[Unit], batch_tokens: usize, pad: u32, device: &Device) -> Result<Vec<UnitBatch>> {
    let batch_tokens = if batch_tokens == 0 {
        default_batch_tokens(device)
    } else {
        batch_tokens
    };
    let max_rows = if device.is_cpu() { 256 } else { 2048 };
    let first = units.first().map_or(0, |u| u.first_example);
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(units[i].input.len()));
    let mut out = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let t = units[order[start]].input.len();
        let b = (batch_tokens / t.max(1)).clamp(1, max_rows);
        let group = &order[start..(start + b).min(order.len())];
        let seqs: Vec<Vec<u32>> = group.iter().map(|&i| units[i].input.clone()).collect();
        let batch = Batch::from_sequences(&seqs, pad, device)?;
        let t_max = batch.seq_len();
        let mut flat = Vec::new();
        let mut examples = Vec::new();
        for (row, &i) in group.iter().enumerate() {
            for (k, &p) in units[i].positions.iter().enumerate() {
                flat.push((row * t_max + p) as u32);
                examples.push(units[i].first_example + k - first);
            }
        }
        let gather = Tensor::from_vec(flat, examples.len(), device)?;
        out.push(UnitBatch {
            batch,
            gather,
            examples,
        });
        start += group.len();
    }
    Ok(out)
}

/// Runs the model over `units` (already one part) and returns states [S, n_examples, d] in
/// example order.
fn run_part(
    lm: &LoadedModel,
    units: &[Unit],
    batch_tokens: usize,
    n_examples: usize,
    on_batch: &mut dyn FnMut(usize),
    phases: &mut Phases,
) -> Result<Tensor> {
    let info = lm.model.info();
    let (s, d) = (info.n_layers + 1, info.d_model);
    let mut out = vec![0f32; s * n_examples * d];
    let t = Instant::now();
    let batches = unit_batches(units, batch_tokens, lm.tokenizer()?.pad_id, lm.model.device())?;
    add_phase(phases, "batches", t);
    for ub in batches {
        let states = batch_states(lm, &ub, phases)?;
        let t = Instant::now();
        // Only the sampled rows leave the device, all layers of a device in one copy (a split
        // model leaves each state on the device of the block that made it).
        let picked = sampled_rows(lm.model.as_ref(), &ub, &states)?;
        drop(states);
        add_phase(phases, "rows to host", t);
        let t = Instant::now();
        check_finite_rows(&picked, &ub.examples, d)?;
        let per_layer = ub.examples.len() * d;
        for (layer, rows) in picked.chunks(per_layer).enumerate() {
            for (r, &e) in ub.examples.iter().enumerate() {
                out[(layer * n_examples + e) * d..(layer * n_examples + e + 1) * d]
                    .copy_from_slice(&rows[r * d..(r + 1) * d]);
            }
        }
        add_phase(phases, "host copy", t);
        on_batch(ub.batch.batch_size());
    }
    Ok(Tensor::from_vec(out, (s, n_examples, d), &Device::Cpu)?)
}

/// The hidden states h_0..h_L of one batch (a cancelled run stops before it), waited for so
/// that the `model` phase holds the forward's own time, not the copies' after it.
fn batch_states(lm: &LoadedModel, ub: &UnitBatch, phases: &mut Phases) -> Result<Vec<Tensor>> {
    crate::cancel::check()?;
    let t = Instant::now();
    let states = model::hidden_states(lm.model.as_ref(), &ub.batch).map_err(|e| {
        let what = format!(
            "running a batch of {} x {} tokens",
            ub.batch.batch_size(),
            ub.batch.seq_len()
        );
        crate::device::explain_oom(e, &what, "lower --batch-tokens")
    })?;
    lm.model.device().synchronize()?;
    add_phase(phases, "model", t);
    Ok(states)
}

/// Refuses sampled rows with a NaN or infinity, naming the first: `rows` holds, layer after
/// layer, the rows of `examples` (width `d`).
fn check_finite_rows(rows: &[f32], examples: &[usize], d: usize) -> Result<()> {
    if let Some(i) = rows.iter().position(|x| !x.is_finite()) {
        let (layer, within) = (i / (examples.len() * d), i % (examples.len() * d));
        bail!(
            "non-finite hidden state (layer {layer}, example {} of this part, coordinate {})",
            examples[within / d],
            within % d
        );
    }
    Ok(())
}

/// Runs the model over `units` (one part) and adds the sampled rows of every state to `total`
/// batch by batch, on the model's GPU: the rows never travel to the host and back (for an
/// 8B-shaped model that round trip of 4.9 GB took 19 s of a 40 s training split). The CPU and
/// a model split across devices take the host path ([`run_part`]), one addition per part.
fn accumulate_part(
    lm: &LoadedModel,
    units: &[Unit],
    batch_tokens: usize,
    n_examples: usize,
    total: &mut GramStats,
    on_batch: &mut dyn FnMut(usize),
    phases: &mut Phases,
) -> Result<()> {
    let device = lm.model.device();
    // On the CPU the rows are on the host anyway, and one addition per part (not per batch of
    // ~34 sentences) keeps the passes over the sums few.
    if lm.model.placement().is_some() || device.is_cpu() {
        let states = run_part(lm, units, batch_tokens, n_examples, on_batch, phases)?;
        let t = Instant::now();
        total.accumulate(&states.to_device(device)?)?;
        device.synchronize()?;
        add_phase(phases, "statistics", t);
        return Ok(());
    }
    let t = Instant::now();
    let batches = unit_batches(units, batch_tokens, lm.tokenizer()?.pad_id, device)?;
    add_phase(phases, "batches", t);
    for ub in batches {
        let states = batch_states(lm, &ub, phases)?;
        let t = Instant::now();
        let picked = states
            .iter()
            .map(|h| ub.rows_with(h, &ub.gather))
            .collect::<Result<Vec<_>>>()?;
        drop(states);
        // Stored as f32 whatever the compute dtype, as the stored form is (the same rows).
        let rows = crate::model::layers::f32(Tensor::stack(&picked, 0)?)?;
        // One number to the host: a NaN or infinity anywhere makes the sum of magnitudes one.
        let magnitude = rows
            .abs()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        if !magnitude.is_finite() {
            check_finite_rows(&rows.flatten_all()?.to_vec1()?, &ub.examples, rows.dim(2)?)?;
            bail!("the hidden states' magnitudes sum to {magnitude} (overflow)");
        }
        add_phase(phases, "rows", t);
        let t = Instant::now();
        total.accumulate(&rows)?;
        device.synchronize()?;
        add_phase(phases, "statistics", t);
        on_batch(ub.batch.batch_size());
    }
    Ok(())
}

/// The sampled rows of every state h_0..h_L, as f32 on the host in layer order: each device's
/// states gathered there (its row index copied there once) and copied out in one piece.
fn sampled_rows(model: &dyn model::Transformer, ub: &UnitBatch, states: &[Tensor]) -> Result<Vec<f32>> {
    let device_of = |l: usize| match model.placement() {
        // h_0 is the embedding's (device 0), h_l the output of block l - 1.
        Some(p) if l > 0 => p.device_index(l - 1),
        _ => 0,
    };
    let mut out = Vec::new();
    let mut start = 0;
    while start < states.len() {
        let on = device_of(start);
        let end = (start..states.len())
            .find(|&l| device_of(l) != on)
            .unwrap_or(states.len());
        let gather = crate::model::placement::move_to(&ub.gather, states[start].device())?;
        let picked = states[start..end]
            .iter()
            .map(|h| ub.rows_with(h, &gather))
            .collect::<Result<Vec<_>>>()?;
        // Stored as f32 whatever the compute dtype (upcast on the device, before the copy).
        let rows: Vec<f32> = crate::model::layers::f32(Tensor::stack(&picked, 0)?)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        out.extend(rows);
        start = end;
    }
    Ok(out)
}

/// What `collect` did, for the manifest and the closing message.
#[derive(Debug, Clone, Serialize)]
pub struct SplitSummary {
    pub requested: usize,
    pub sentences: usize,
    pub examples: usize,
    pub skipped_too_long: usize,
    pub wall_s: f64,
    /// Wall seconds of the split's phases (see [`Phases`]); empty when it was already collected.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub phases_s: Phases,
}

/// Wall seconds per phase of a split's collection, summed over its parts, for the manifest
/// (`counts.<split>.phases_s`): `forward` (the model over the batches and the sampled rows to
/// the host), `statistics` (adding a part to the float64 sums, waited for), `checkpoints` /
/// `write_parts` (resumable files), `write` (the split's file).
pub type Phases = BTreeMap<String, f64>;

fn add_phase(phases: &mut Phases, name: &str, since: Instant) {
    *phases.entry(name.to_string()).or_default() += since.elapsed().as_secs_f64();
}

/// Sentences per resumable part (the default of [`StreamOptions::part_sentences`]).
pub const PART_SENTENCES: usize = 250;

/// Parts of a statistics split run through the model together on a GPU (see
/// `write_stats_split`).
const GPU_PARTS_AT_ONCE: usize = 4;

/// How a collection is split and what it keeps of the training split (the default: the whole
/// run, training activations stored). Kept apart from [`CollectOptions`] so that its callers
/// that build it field by field stay as they are; recorded in the manifest's options only when
/// not the default, so runs collected before these options existed still match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamOptions {
    /// Sum the fit's statistics for these pairs instead of storing the training activations.
    pub stats: Option<StatsPairs>,
    /// Collect only this shard.
    pub shard: Option<Shard>,
    /// Sentences per resumable part (0 = [`PART_SENTENCES`]); shards are whole parts, so a run
    /// has at most as many shards as parts in each split.
    pub part_sentences: usize,
}

impl StreamOptions {
    fn part_len(&self) -> usize {
        if self.part_sentences == 0 {
            PART_SENTENCES
        } else {
            self.part_sentences
        }
    }
}

/// The manifest's `options`: the collection options plus the non-default stream options
/// (`stats_only`, `shard`, `part_sentences`).
pub fn recorded_options(opts: &CollectOptions, stream: &StreamOptions) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(opts)?;
    let map = v.as_object_mut().expect("options are an object");
    if let Some(p) = stream.stats {
        map.insert("stats_only".into(), serde_json::to_value(p)?);
    }
    if let Some(sh) = stream.shard {
        map.insert("shard".into(), serde_json::to_value(sh)?);
    }
    if stream.part_sentences != 0 && stream.part_sentences != PART_SENTENCES {
        map.insert("part_sentences".into(), stream.part_sentences.into());
    }
    Ok(v)
}

/// Samples sentences from `corpus`, runs the model and writes `RUN/activations/{train,val}.safetensors`
/// and `RUN/manifest.json`. Resumes an interrupted collection with the same inputs and options.
pub fn collect(
    lm: &LoadedModel,
    corpus_path: &Path,
    run: &RunDir,
    opts: &CollectOptions,
    progress: bool,
) -> Result<Manifest> {
    collect_stream(lm, corpus_path, run, opts, &StreamOptions::default(), progress)
}

/// [`collect`] with the statistics-only and shard options: with `stream.stats` the training
/// split becomes `RUN/activations/train.stats.safetensors`, with `stream.shard` only that
/// shard's parts of each split are collected.
pub fn collect_stream(
    lm: &LoadedModel,
    corpus_path: &Path,
    run: &RunDir,
    opts: &CollectOptions,
    stream: &StreamOptions,
    progress: bool,
) -> Result<Manifest> {
    if let Some(sh) = stream.shard {
        sh.check()?;
    }
    if opts.positions == (Positions::Random { k: 0 }) {
        bail!("positions per sentence must be at least 1 (or all)");
    }
    if opts.n_train == 0 || opts.n_val == 0 {
        bail!(
            "collection needs at least one training and one validation sentence (asked for {} and {})",
            opts.n_train,
            opts.n_val
        );
    }
    let info = lm.model.info().clone();
    let (format, articles) = corpus::read_corpus(corpus_path, &opts.text_field)?;
    let mut model_record = ModelRecord {
        // Absolute, so that later stages run from another folder find the model.
        path: absolute(&lm.path),
        // Hashed once the run folder exists (below), into its sha256 cache.
        sha256: String::new(),
        arch: info.arch.clone(),
        n_layers: info.n_layers,
        d_model: info.d_model,
        vocab_size: info.vocab_size,
        attention: format!("{:?}", info.attention).to_lowercase(),
        block_params: info.block_params,
        dtype: info.dtype.clone(),
    };
    let corpus_record = CorpusRecord {
        path: absolute(corpus_path),
        sha256: crate::data::io::sha256_path(corpus_path)?,
        format: serde_json::to_value(format)?.as_str().unwrap_or_default().to_string(),
        articles: articles.len(),
    };
    let mut options = recorded_options(opts, stream)?;
    if let (Some(p), Some(o)) = (lm.model.placement(), options.as_object_mut()) {
        o.insert("placement".into(), p.describe().into());
    }
    crate::interrupt::set_message(Some(format!(
        "collect had finished no part yet; run the same command again to start it in {}",
        run.root.display()
    )));
    let Sampled {
        train,
        val,
        tokens,
        too_long,
    } = sample_splits(lm, &articles, opts, corpus_path)?;

    // A shard range the splits cannot hold is refused before anything is written.
    let part_len = stream.part_len();
    if let Some(sh) = stream.shard {
        for (split, n) in [("train", train.len()), ("val", val.len())] {
            sh.parts(n.div_ceil(part_len)).map_err(|e| {
                anyhow::anyhow!(
                    "--shard {}/{}: {e} ({split} has {n} sentences in parts of {part_len}; use fewer shards or a \
                     smaller --part-sentences)",
                    sh.from,
                    sh.count
                )
            })?;
        }
    }
    let _lock = run.lock()?;
    // Into the run's cache, which the later stages' model check reads: an 8B model's 16 GB are
    // hashed once per run instead of again by the first stage that checks it (~8 s each).
    let mut model_sha = ModelHash::start(&lm.path, run.sha256_cache());
    for dir in [run.root.clone(), run.root.join("activations"), run.parts_dir()] {
        crate::data::io::remove_stale_temps(&dir);
    }
    // A finished run's later stages stay recorded when the same collection is asked for again.
    // The manifest binds the data already there: a run with collected data and another model,
    // corpus or option is refused, naming what differs. A manifest without any data (a
    // collection that failed before its first part) binds nothing and is replaced.
    let mut previous_stages = Default::default();
    let old = run.read_manifest_if_any()?;
    if let Some(old) = old {
        if run.collected_data().is_some() {
            // Data already there is bound to its model: the hash is needed before anything.
            model_record.sha256 = model_sha.wait()?;
            if let Some(diff) = collection_difference(&old, &model_record, &corpus_record, &options) {
                bail!(
                    "{}: this run was collected with {diff}; use the same options or a new --out folder",
                    run.root.display()
                );
            }
            previous_stages = old.stages;
        }
    }
    let mut manifest = Manifest {
        tool: "jumplens".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        model: model_record,
        corpus: corpus_record,
        seed: opts.seed,
        options,
        counts: Default::default(),
        stages: previous_stages,
    };
    run.write_manifest(&manifest)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed.wrapping_add(1));
    let causal = info.attention == AttentionKind::Causal;
    let mut pending: Option<PendingWrite> = None;
    let splits = collect_splits(
        lm,
        run,
        opts,
        stream,
        progress,
        &train,
        &val,
        &tokens,
        too_long,
        causal,
        part_len,
        &mut rng,
        &mut Binding {
            hash: &mut model_sha,
            run,
            manifest: &mut manifest,
        },
        &mut pending,
    );
    // Even when the validation split failed, the training statistics are finished first.
    let written = finish_stats_write(pending, &mut manifest);
    splits?;
    written?;
    std::fs::remove_dir(run.parts_dir()).ok();
    run.write_manifest(&manifest)?;
    crate::interrupt::set_message(None);
    Ok(manifest)
}

/// Both splits of [`collect_stream`], the manifest written after each.
#[allow(clippy::too_many_arguments)]
fn collect_splits(
    lm: &LoadedModel,
    run: &RunDir,
    opts: &CollectOptions,
    stream: &StreamOptions,
    progress: bool,
    train: &[SampledSentence],
    val: &[SampledSentence],
    tokens: &HashMap<String, Vec<u32>>,
    too_long: usize,
    causal: bool,
    part_len: usize,
    rng: &mut ChaCha8Rng,
    bind: &mut Binding,
    pending: &mut Option<PendingWrite>,
) -> Result<()> {
    for (split, sentences) in [("train", train), ("val", val)] {
        let started = Instant::now();
        // Every job of the whole run is made (the random positions depend on the order), then
        // the shard keeps its parts.
        let all_jobs = make_jobs(lm, sentences, tokens, opts.positions, rng)?;
        let n_parts = all_jobs.len().div_ceil(part_len);
        let parts = match stream.shard {
            Some(sh) => sh.parts(n_parts)?,
            None => 0..n_parts,
        };
        let jobs = &all_jobs[(parts.start * part_len).min(all_jobs.len())..(parts.end * part_len).min(all_jobs.len())];
        let layout = SplitLayout {
            first_part: parts.start,
            part_len,
        };
        let (n_examples, resumed, phases_s) = match (split, stream.stats) {
            ("train", Some(kind)) => {
                let (n, resumed, phases, writer) =
                    write_stats_split(lm, jobs, causal, run, kind, &layout, opts, progress, bind)?;
                *pending = writer;
                (n, resumed, phases)
            }
            _ => write_split(lm, jobs, causal, run, split, &layout, opts, progress, bind)?,
        };
        // A split found complete (a resume) wrote nothing; its manifest entry binds it too.
        bind.bind()?;
        let summary = SplitSummary {
            requested: if split == "train" { opts.n_train } else { opts.n_val },
            sentences: jobs.len(),
            examples: n_examples,
            skipped_too_long: too_long,
            wall_s: started.elapsed().as_secs_f64(),
            phases_s,
        };
        if progress {
            eprintln!("{}", summary.line(split, resumed));
        }
        bind.manifest
            .counts
            .insert(split.into(), serde_json::to_value(&summary)?);
        run.write_manifest(bind.manifest)?;
    }
    Ok(())
}

/// The model's sha256, hashed by a thread while the collection runs (16 GB of an 8B model took
/// ~8 s before the first forward); [`ModelHash::wait`] joins it once, then returns the value.
struct ModelHash {
    thread: Option<std::thread::JoinHandle<Result<String>>>,
    value: Option<String>,
}

/// What a collection's first file waits for: the model's hash in the manifest. A file of
/// collected data (a part, a checkpoint, a split) binds the run to its model, and a rerun checks
/// the recorded hash before it resumes from such files, so none is written before the manifest
/// holds the hash.
struct Binding<'a> {
    hash: &'a mut ModelHash,
    run: &'a RunDir,
    manifest: &'a mut Manifest,
}

impl Binding<'_> {
    /// Waits for the hash and writes the manifest with it, once.
    fn bind(&mut self) -> Result<()> {
        if self.manifest.model.sha256.is_empty() {
            self.manifest.model.sha256 = self.hash.wait()?;
            self.run.write_manifest(self.manifest)?;
        }
        Ok(())
    }
}

impl ModelHash {
    fn start(model: &Path, cache: std::path::PathBuf) -> Self {
        let model = model.to_path_buf();
        Self {
            thread: Some(std::thread::spawn(move || {
                crate::data::io::sha256_path_cached(&model, &cache)
            })),
            value: None,
        }
    }

    fn wait(&mut self) -> Result<String> {
        if let Some(t) = self.thread.take() {
            let sha = t
                .join()
                .map_err(|_| anyhow::anyhow!("hashing the model failed (the thread panicked)"))??;
            self.value = Some(sha);
        }
        Ok(self.value.clone().unwrap_or_default())
    }
}

/// Both splits' sentences as `collect` samples them, and their token ids.
struct Sampled {
    train: Vec<SampledSentence>,
    val: Vec<SampledSentence>,
    tokens: HashMap<String, Vec<u32>>,
    /// Sentences skipped because they are longer than the model's context.
    too_long: usize,
}

/// Samples both splits (tokenized once; sentences too long for the context are skipped and
/// counted, sentences of fewer than two tokens skipped).
fn sample_splits(
    lm: &LoadedModel,
    articles: &[corpus::Article],
    opts: &CollectOptions,
    corpus_path: &Path,
) -> Result<Sampled> {
    let tok = lm.tokenizer()?;
    let mut tokens: HashMap<String, Vec<u32>> = HashMap::new();
    let mut too_long = 0usize;
    let max = lm.model.info().max_positions;
    let (train, val) =
        corpus::sample_sentences(articles, opts.n_train, opts.n_val, opts.seed, |s| match tok.encode(s) {
            Ok(ids) if ids.len() > max => {
                too_long += 1;
                false
            }
            Ok(ids) if ids.len() >= 2 => {
                tokens.insert(s.to_string(), ids);
                true
            }
            _ => false,
        })
        .map_err(|e| anyhow::anyhow!("{}: {e}", corpus_path.display()))?;
    Ok(Sampled {
        train,
        val,
        tokens,
        too_long,
    })
}

/// The first `limit` training examples of a collection made with `opts` from `corpus_path`,
/// replayed: the same sentences, positions and order as `collect` drew (the same sampler and
/// seed), with their states h_0..h_L computed again by `lm`. A statistics-only run (`collect
/// --stats-only`, or a merge of such shards) keeps neither training states nor their token
/// lists; the stages that need training examples (the sub-module maps) take them from here.
pub fn replay_train(
    lm: &LoadedModel,
    corpus_path: &Path,
    opts: &CollectOptions,
    limit: usize,
    batch_tokens: usize,
    progress: bool,
) -> Result<Activations> {
    let (_, articles) = corpus::read_corpus(corpus_path, &opts.text_field)?;
    let sampled = sample_splits(lm, &articles, opts, corpus_path)?;
    // The rng is drawn from in the same order as collect: the training split's jobs first.
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed.wrapping_add(1));
    let mut jobs = make_jobs(lm, &sampled.train, &sampled.tokens, opts.positions, &mut rng)?;
    let mut left = limit;
    jobs.retain_mut(|job| {
        job.positions.truncate(left);
        left -= job.positions.len();
        !job.positions.is_empty()
    });
    let n: usize = jobs.iter().map(|j| j.positions.len()).sum();
    if n == 0 {
        bail!("{}: no training example to replay", corpus_path.display());
    }
    let causal = lm.model.info().attention == AttentionKind::Causal;
    let us = units(&jobs, causal, lm.tokenizer()?.mask_id)?;
    let bar = crate::progress::bar(us.len() as u64, "replay train", progress);
    let hidden_states = run_part(
        lm,
        &us,
        batch_tokens,
        n,
        &mut |rows| bar.inc(rows as u64),
        &mut Phases::new(),
    )?;
    bar.finish_and_clear();
    let (mut positions, mut tokens, mut offsets) = (Vec::with_capacity(n), Vec::new(), vec![0]);
    for job in &jobs {
        for &p in &job.positions {
            positions.push(p);
            tokens.extend_from_slice(&job.tokens);
            offsets.push(tokens.len());
        }
    }
    Ok(Activations {
        hidden_states,
        positions,
        tokens,
        offsets,
        path: corpus_path.to_path_buf(),
    })
}

/// Collection options that do not change the collected states (only speed or memory): a
/// resume with other values is allowed.
/// A split across devices (`placement`, recorded only when split) computes the same states.
const RESULT_NEUTRAL_OPTIONS: &[&str] = &["batch_tokens", "placement"];

/// The first difference between a run's manifest and a new collection's inputs that changes the
/// data, as "another X (recorded A, now B)"; `None` when they match.
pub fn collection_difference(
    old: &Manifest,
    model: &ModelRecord,
    corpus: &CorpusRecord,
    options: &serde_json::Value,
) -> Option<String> {
    let differ = |what: &str, a: &dyn std::fmt::Display, b: &dyn std::fmt::Display| {
        Some(format!("another {what} (recorded {a}, now {b})"))
    };
    if old.model.sha256 != model.sha256 {
        return differ("model (sha256)", &old.model.path, &model.path);
    }
    if old.corpus.sha256 != corpus.sha256 {
        return differ("corpus (sha256)", &old.corpus.path, &corpus.path);
    }
    let empty = serde_json::Map::new();
    let (a, b) = (
        old.options.as_object().unwrap_or(&empty),
        options.as_object().unwrap_or(&empty),
    );
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        if RESULT_NEUTRAL_OPTIONS.contains(&k.as_str()) {
            continue;
        }
        let (x, y) = (a.get(k), b.get(k));
        if x != y {
            let show = |v: Option<&serde_json::Value>| v.map_or("none".to_string(), |v| v.to_string());
            let flag = match k.as_str() {
                "n_train" => "--train".to_string(),
                "n_val" => "--val".to_string(),
                other => format!("--{}", other.replace('_', "-")),
            };
            return differ(&format!("{k} ({flag})"), &show(x), &show(y));
        }
    }
    None
}

/// The canonical absolute form of `path` (as given when it cannot be resolved).
fn absolute(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

impl SplitSummary {
    /// One line for the terminal, e.g. `collect train: 9000 sentences -> 9000 examples in 512.3 s`.
    pub fn line(&self, split: &str, resumed: bool) -> String {
        let mut s = format!(
            "collect {split}: {} sentences -> {} examples",
            self.sentences, self.examples
        );
        if self.sentences < self.requested {
            s += &format!(" (asked for {})", self.requested);
        }
        if resumed {
            s += " (already collected)";
        } else {
            s += &format!(" in {:.1} s", self.wall_s);
        }
        if self.skipped_too_long > 0 {
            s += &format!("; {} sentences longer than the context skipped", self.skipped_too_long);
        }
        s
    }
}

/// Where a (shard's) split lies among the parts of the whole run's split.
struct SplitLayout {
    /// Index of the first part of these jobs in the whole split.
    first_part: usize,
    part_len: usize,
}

#[allow(clippy::too_many_arguments)]
fn write_split(
    lm: &LoadedModel,
    jobs: &[Job],
    causal: bool,
    run: &RunDir,
    split: &str,
    layout: &SplitLayout,
    opts: &CollectOptions,
    progress: bool,
    bind: &mut Binding,
) -> Result<(usize, bool, Phases)> {
    let info = lm.model.info();
    let out_path = run.activations(split);
    let n_examples: usize = jobs.iter().map(|j| j.positions.len()).sum();
    if out_path.exists() {
        return Ok((n_examples, true, Phases::new()));
    }
    let mut phases = Phases::new();
    let mask_id = lm.tokenizer()?.mask_id;
    let chunks: Vec<Vec<Unit>> = jobs
        .chunks(layout.part_len)
        .map(|c| units(c, causal, mask_id))
        .collect::<Result<_>>()?;
    let bar = crate::progress::bar(
        chunks.iter().map(|c| c.len() as u64).sum(),
        &format!("collect {split}"),
        progress,
    );
    let mut parts = Vec::new();
    let mut offset = 0;
    for (p, (chunk, units)) in jobs.chunks(layout.part_len).zip(&chunks).enumerate() {
        let n: usize = chunk.iter().map(|j| j.positions.len()).sum();
        let part_path = run
            .parts_dir()
            .join(format!("{split}.{:05}.safetensors", layout.first_part + p));
        if part_path.exists() {
            bar.inc(units.len() as u64);
        } else {
            let t = Instant::now();
            let states = run_part(
                lm,
                units,
                opts.batch_tokens,
                n,
                &mut |rows| bar.inc(rows as u64),
                &mut phases,
            )
            .map_err(|e| anyhow::anyhow!("{split}: {e} (examples from {offset})"))?;
            add_phase(&mut phases, "forward", t);
            bind.bind()?;
            let t = Instant::now();
            crate::data::io::write_safetensors(&part_path, &[("hidden_states".into(), states)], None)?;
            add_phase(&mut phases, "write_parts", t);
        }
        crate::interrupt::set_message(Some(format!(
            "collect {split}: {} of {} parts are kept in {}; run the same command again to resume from them",
            p + 1,
            chunks.len(),
            run.parts_dir().display()
        )));
        offset += n;
        parts.push(part_path);
    }
    bar.finish_and_clear();
    crate::interrupt::set_message(Some(format!(
        "collect {split}: every part is kept in {}; run the same command again to resume",
        run.parts_dir().display()
    )));
    // Merge the parts into one file [S, N, d] with the per-example metadata.
    let t_write = Instant::now();
    let mut states = Vec::with_capacity(parts.len());
    for p in &parts {
        let t = crate::data::io::read_safetensors(p)?;
        states.push(
            t.get("hidden_states")
                .cloned()
                .with_context(|| format!("{}: no hidden_states", p.display()))?,
        );
    }
    let hidden = Tensor::cat(&states, 1)?;
    let mut positions = Vec::with_capacity(n_examples);
    let mut tokens = Vec::new();
    let mut offsets = vec![0i64];
    let mut article = Vec::with_capacity(n_examples);
    for job in jobs {
        for &p in &job.positions {
            positions.push(p as i64);
            tokens.extend(job.tokens.iter().map(|&t| t as i64));
            offsets.push(tokens.len() as i64);
            article.push(job.article as i64);
        }
    }
    let cpu = Device::Cpu;
    let n_tokens = tokens.len();
    let tensors = vec![
        ("hidden_states".to_string(), hidden),
        ("positions".to_string(), Tensor::from_vec(positions, n_examples, &cpu)?),
        ("tokens".to_string(), Tensor::from_vec(tokens, n_tokens, &cpu)?),
        ("offsets".to_string(), Tensor::from_vec(offsets, n_examples + 1, &cpu)?),
        ("article".to_string(), Tensor::from_vec(article, n_examples, &cpu)?),
    ];
    let meta = HashMap::from([
        ("split".to_string(), split.to_string()),
        ("n_layers".to_string(), info.n_layers.to_string()),
        ("d_model".to_string(), info.d_model.to_string()),
        (
            "note".to_string(),
            "hidden_states[l] = h_l at positions[i] of example i; h_L is before the final norm".to_string(),
        ),
    ]);
    bind.bind()?;
    crate::data::io::write_safetensors(&out_path, &tensors, Some(meta))?;
    add_phase(&mut phases, "write", t_write);
    for p in &parts {
        std::fs::remove_file(p).ok();
    }
    std::fs::remove_dir(run.parts_dir()).ok();
    Ok((n_examples, false, phases))
}

/// The cumulative statistics file after part `p` of the training split.
fn stats_part_path(run: &RunDir, p: usize) -> std::path::PathBuf {
    run.parts_dir().join(format!("train.stats.{p:05}.safetensors"))
}

/// The training split as float64 statistics ([`GramStats`], on the model's device): each part
/// runs the model like [`write_split`], adds its states to the sums and is dropped. The running
/// sums are written atomically after a part (`parts/train.stats.PPPPP.safetensors`, replacing
/// the previous such file), so an interrupted collection resumes from the last one — after every
/// part while writing them is cheap, and at most every [`CHECKPOINT_COST`]-th of the elapsed work
/// once it is not: at d = 4096 the to-final sums are 8.6 GB, and writing them after each of the
/// 36 parts of 9,000 sentences took longer than the whole study. The sums do not depend on when
/// they were written, so neither do the results.
#[allow(clippy::too_many_arguments)]
fn write_stats_split(
    lm: &LoadedModel,
    jobs: &[Job],
    causal: bool,
    run: &RunDir,
    kind: StatsPairs,
    layout: &SplitLayout,
    opts: &CollectOptions,
    progress: bool,
    bind: &mut Binding,
) -> Result<(usize, bool, Phases, Option<PendingWrite>)> {
    let info = lm.model.info();
    let (s, d) = (info.n_layers + 1, info.d_model);
    let out_path = run.train_stats();
    let n_examples: usize = jobs.iter().map(|j| j.positions.len()).sum();
    if out_path.exists() {
        return Ok((n_examples, true, Phases::new(), None));
    }
    let mut phases = Phases::new();
    let device = lm.model.device();
    let mask_id = lm.tokenizer()?.mask_id;
    let chunks: Vec<&[Job]> = jobs.chunks(layout.part_len).collect();
    // Resume from the last cumulative file of this split's parts.
    let resume = (0..chunks.len())
        .rev()
        .find(|&p| stats_part_path(run, layout.first_part + p).exists());
    let (mut total, start) = match resume {
        Some(p) => (
            GramStats::read(&stats_part_path(run, layout.first_part + p), device)?,
            p + 1,
        ),
        None => (GramStats::zeros(kind, s, d, device)?, 0),
    };
    let n_units = |c: &[Job]| -> usize {
        if causal {
            c.len()
        } else {
            c.iter().map(|j| j.positions.len()).sum()
        }
    };
    let bar = crate::progress::bar(
        chunks.iter().map(|c| n_units(c) as u64).sum(),
        "collect train (statistics)",
        progress,
    );
    bar.inc(chunks[..start].iter().map(|c| n_units(c) as u64).sum());
    let mut offset: usize = chunks[..start]
        .iter()
        .flat_map(|c| c.iter())
        .map(|j| j.positions.len())
        .sum();
    let mut saved = start.checked_sub(1);
    let mut checkpoint = Checkpointing::new(kind.bytes(s, d));
    // On a GPU several parts run as one: a part's ~7,500 tokens fill at most two of its 16,384-token
    // batches, and the 8B shape's forward ran at half its `bench forward` rate over them. A
    // checkpoint still names the last part it covers, so resuming is as before.
    let parts_at_once = if device.is_cpu() { 1 } else { GPU_PARTS_AT_ONCE };
    let mut next = start;
    while next < chunks.len() {
        let end = (next + parts_at_once).min(chunks.len());
        let p = end - 1;
        let chunk = &jobs[next * layout.part_len..(end * layout.part_len).min(jobs.len())];
        next = end;
        let n: usize = chunk.iter().map(|j| j.positions.len()).sum();
        let us = units(chunk, causal, mask_id)?;
        let t = Instant::now();
        accumulate_part(
            lm,
            &us,
            opts.batch_tokens,
            n,
            &mut total,
            &mut |rows| bar.inc(rows as u64),
            &mut phases,
        )
        .map_err(|e| anyhow::anyhow!("train: {e} (examples from {offset})"))?;
        add_phase(&mut phases, "forward and statistics", t);
        offset += n;
        // The last part's sums go straight to the output below.
        if p + 1 == chunks.len() || !checkpoint.due() {
            continue;
        }
        let path = stats_part_path(run, layout.first_part + p);
        let t = Instant::now();
        bind.bind()?;
        checkpoint.write(|| total.write(&path))?;
        add_phase(&mut phases, "checkpoints", t);
        if let Some(old) = saved.replace(p) {
            std::fs::remove_file(stats_part_path(run, layout.first_part + old)).ok();
        }
        crate::interrupt::set_message(Some(format!(
            "collect train: the statistics of {} of {} parts are kept in {}; run the same command again to \
             resume from them",
            p + 1,
            chunks.len(),
            path.display()
        )));
    }
    bar.finish_and_clear();
    ensure_count(total.n, n_examples)?;
    let t = Instant::now();
    let host = total.to_host()?;
    drop(total);
    add_phase(&mut phases, "statistics to host", t);
    // The file is written by a thread while the validation split runs on the device (8.6 GB at
    // d = 4096 took 21 s, a fifth of the collection). The checkpoint it replaces is removed only
    // once the file is in place, so an interruption leaves one of the two.
    let checkpoint = saved.map(|old| stats_part_path(run, layout.first_part + old));
    bind.bind()?;
    let writer = std::thread::spawn(move || -> Result<f64> {
        let t = Instant::now();
        host.write(&out_path)?;
        if let Some(old) = checkpoint {
            std::fs::remove_file(old).ok();
        }
        Ok(t.elapsed().as_secs_f64())
    });
    Ok((n_examples, false, phases, Some(writer)))
}

/// The training statistics being written in the background: the thread's write seconds.
type PendingWrite = std::thread::JoinHandle<Result<f64>>;

/// Waits for the training statistics' background write and records its time in the manifest
/// (`counts.train.phases_s`: `write` in the background, `write waited` after the last split).
fn finish_stats_write(pending: Option<PendingWrite>, manifest: &mut Manifest) -> Result<()> {
    let Some(writer) = pending else { return Ok(()) };
    let t = Instant::now();
    let write_s = writer
        .join()
        .map_err(|_| anyhow::anyhow!("collect train: writing the statistics failed (the writer panicked)"))??;
    let phases = manifest
        .counts
        .get_mut("train")
        .and_then(|c| c.get_mut("phases_s"))
        .and_then(|p| p.as_object_mut());
    if let Some(p) = phases {
        p.insert("write".into(), write_s.into());
        p.insert("write waited".into(), t.elapsed().as_secs_f64().into());
    }
    Ok(())
}

/// The most a statistics checkpoint may cost, as a fraction of the work since the one before:
/// with 8.6 GB of sums (to-final at d = 4096) that is a checkpoint every ~2 minutes instead of
/// after every part; small sums (every test, every model up to d ~ 1,000) are still written after
/// each part.
const CHECKPOINT_COST: f64 = 0.1;

/// The write rate a first statistics checkpoint is expected to have (bytes per second), before
/// one was timed: 1 GB/s, a local SSD's order of magnitude.
const CHECKPOINT_EXPECTED_BYTES_PER_S: f64 = 1e9;

/// When to write the running statistics: a checkpoint is due once the work since the last one
/// is at least 1 / [`CHECKPOINT_COST`] times what the last write took. Before the first write
/// its cost is estimated from the size at [`CHECKPOINT_EXPECTED_BYTES_PER_S`]: small sums are
/// still written after the first part, while 8.6 GB (to-final at d = 4096) wait for ~86 s of
/// work instead of costing a write (and a GPU-to-host copy) right after the first part.
struct Checkpointing {
    since: Instant,
    last_write_s: f64,
}

impl Checkpointing {
    fn new(bytes: u64) -> Self {
        Self {
            since: Instant::now(),
            last_write_s: bytes as f64 / CHECKPOINT_EXPECTED_BYTES_PER_S,
        }
    }

    fn due(&self) -> bool {
        self.since.elapsed().as_secs_f64() * CHECKPOINT_COST >= self.last_write_s
    }

    fn write(&mut self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let t = Instant::now();
        f()?;
        self.last_write_s = t.elapsed().as_secs_f64();
        self.since = Instant::now();
        Ok(())
    }
}

/// The statistics count every example once.
fn ensure_count(summed: u64, expected: usize) -> Result<()> {
    if summed != expected as u64 {
        bail!("collect train: the statistics sum {summed} examples, expected {expected} (were the parts mixed?)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_finite_rows;

    /// The first NaN or infinity is named by layer, example (as numbered in the part) and
    /// coordinate, from rows laid out layer after layer.
    #[test]
    fn non_finite_rows_are_named() {
        let (examples, d) = ([7usize, 3], 4);
        let mut rows = vec![0f32; 3 * examples.len() * d];
        assert!(check_finite_rows(&rows, &examples, d).is_ok());
        // Layer 2, the second row (example 3), coordinate 1; a later one stays unnamed.
        rows[2 * examples.len() * d + d + 1] = f32::NAN;
        *rows.last_mut().unwrap() = f32::INFINITY;
        let err = check_finite_rows(&rows, &examples, d).unwrap_err().to_string();
        assert_eq!(
            err,
            "non-finite hidden state (layer 2, example 3 of this part, coordinate 1)"
        );
    }
}
