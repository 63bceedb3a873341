//! The tuned-lens stage on a run folder (`jumplens tuned-lens RUN`): trains a tuned lens for the
//! run's model on the run's training articles with tuned-lens's recipe
//! ([`crate::lens::tuned::train`]) and writes `RUN/tuned/` (or `RUN/tuned-mat/` for `mat+kl`,
//! started from the least-squares maps: `W_l = A_{l->L} - I`, `b_l` = the intercept when the
//! maps have one) in tuned-lens's own format.
//!
//! Text: the articles that gave the run's training sentences (the same seeded draw as
//! `collect`, so never a validation article), each tokenized whole, concatenated and cut into
//! sequences of `seq_len` tokens; step s takes `tokens_per_step / seq_len` sequences from a
//! seeded shuffle (a new one each pass), a function of s alone, so a resumed run sees the same
//! batches. Targets are the model's own final distribution at every position.
//!
//! Masked LMs (BERT): the targets are the model's masked-LM distribution at the positions
//! `collect` reads a masked LM at (each training sentence with its sampled token replaced by
//! [MASK], the states at that position: the examples `predict` scores on the validation side),
//! taken from the run's stored training states (or replayed from the corpus for a
//! `--stats-only` run, [`crate::collect::replay_train`]); a step takes `tokens_per_step` of these
//! examples from the same seeded shuffles, and the loss is the same sum over translators of the
//! mean KL.
//!
//! A checkpoint (`RUN/tuned.checkpoint.safetensors`: parameters, momentum, step, losses,
//! options) is written atomically every `checkpoint_every` steps and picked up by a rerun with
//! the same options; the lens folder is written into a temporary folder and renamed into place.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::run::RunDir;
use crate::lens::tuned::train::{Recipe, Trainer};
use crate::lens::tuned::TunedLens;

/// Where training starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TunedInit {
    /// W = 0, b = 0 (tuned-lens's own start: the logit lens); writes `RUN/tuned/`.
    Identity,
    /// W = A_{l->L} - I, b = intercept, from `RUN/maps.safetensors` (`mat+kl`); writes
    /// `RUN/tuned-mat/`.
    Mat,
}

impl TunedInit {
    /// The folder name in the run.
    pub fn dir_name(self) -> &'static str {
        match self {
            TunedInit::Identity => "tuned",
            TunedInit::Mat => "tuned-mat",
        }
    }
}

/// Tokens per step when none is given: 32 on the CPU, 32768 (tuned-lens's 2^18 / 8) on a GPU.
/// A step costs two [tokens, d] x [d, V] GEMMs per layer (the readout and its gradient), ~3.4
/// GFLOP per token on SmolLM2-135M, which no other part of the step comes near; 250 steps of 32
/// tokens (8000 tokens) are what 2 cores finish in about ten minutes (README, "Tuned lens").
pub fn default_tokens_per_step(device: &Device) -> usize {
    if device.is_cpu() {
        32
    } else {
        32768
    }
}

/// Options of `jumplens tuned-lens`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TunedOptions {
    /// Optimiser steps (also the linear schedule's horizon).
    pub steps: usize,
    /// Tokens per step; 0 = [`default_tokens_per_step`].
    pub tokens_per_step: usize,
    /// tuned-lens's `lr_scale` (the SGD learning rate is `lr * (1 - 0.9)`).
    pub lr: f64,
    pub init: TunedInit,
    pub seed: u64,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Steps between checkpoints.
    #[serde(skip)]
    pub checkpoint_every: usize,
    /// Where to write the token ids of every step before training (safetensors `ids`
    /// [steps x sequences per step, seq_len] int64, step by step), so a reference
    /// (scripts/bench_tuned_torch.py --ids) trains on the same batches.
    #[serde(skip)]
    pub ids_out: Option<PathBuf>,
    #[serde(skip)]
    pub progress: bool,
}

impl Default for TunedOptions {
    fn default() -> Self {
        Self {
            steps: 250,
            tokens_per_step: 0,
            lr: 1.0,
            init: TunedInit::Identity,
            seed: 0,
            seq_len: 128,
            checkpoint_every: 25,
            ids_out: None,
            progress: true,
        }
    }
}

/// What the stage returns (and records in the manifest).
#[derive(Debug, Clone, Serialize)]
pub struct TunedReport {
    pub out: PathBuf,
    pub steps: usize,
    pub tokens_per_step: usize,
    /// Sequences of training text drawn from (causal LMs), or masked training examples
    /// (masked LMs, `masked`).
    pub sequences: usize,
    pub masked: bool,
    /// Loss per step (summed over layers, as tuned-lens logs it), resumed steps included.
    pub losses: Vec<f64>,
    /// Steps taken from a checkpoint (0 when trained from the start).
    pub resumed_from: usize,
    /// Wall seconds of each step this process took (batch, forward and optimiser step), for
    /// speed comparisons that leave out the first steps' warm-up.
    pub step_s: Vec<f64>,
    pub wall_s: f64,
}

/// The run's training text as fixed-length token sequences.
fn training_sequences(lm: &crate::model::LoadedModel, run: &RunDir, seq_len: usize) -> Result<Vec<Vec<u32>>> {
    let manifest = run.read_manifest()?;
    let copts: crate::collect::CollectOptions = serde_json::from_value(manifest.options.clone())
        .map_err(|e| anyhow!("{}: options: {e}", run.manifest().display()))?;
    let corpus_path = PathBuf::from(&manifest.corpus.path);
    let (_, articles) = crate::data::corpus::read_corpus(&corpus_path, &copts.text_field)?;
    let tok = lm.tokenizer()?;
    let max = lm.model.info().max_positions;
    // The same draw as collect (same filter), for the training side's articles.
    let (train, _) = crate::data::corpus::sample_sentences(
        &articles,
        copts.n_train,
        copts.n_val,
        copts.seed,
        |s| matches!(tok.encode(s), Ok(ids) if ids.len() >= 2 && ids.len() <= max),
    )
    .map_err(|e| anyhow!("{}: {e}", corpus_path.display()))?;
    let chosen: BTreeSet<usize> = train.iter().map(|s| s.article).collect();
    let mut stream = Vec::new();
    for &a in &chosen {
        stream.extend(tok.encode(&articles[a].sentences.join(" "))?);
    }
    let seq_len = seq_len.min(max);
    let seqs: Vec<Vec<u32>> = stream.chunks_exact(seq_len).map(|c| c.to_vec()).collect();
    if seqs.is_empty() {
        bail!(
            "{}: the {} training articles give {} tokens, fewer than one sequence of {seq_len}",
            corpus_path.display(),
            chosen.len(),
            stream.len()
        );
    }
    Ok(seqs)
}

/// What the steps train on.
enum TrainingData {
    /// Causal LMs: fixed-length token sequences of the training articles, every position a
    /// target; `per_step` sequences a step.
    Text { seqs: Vec<Vec<u32>>, per_step: usize },
    /// Masked LMs: the run's training examples as `collect` made them (each sampled token
    /// replaced by [MASK] in its sentence, the states read at that position: the positions
    /// `predict` scores), h_0..h_L [S, n, d] f32 on the training device; `tokens_per_step`
    /// examples a step.
    Masked { states: Tensor, n: usize },
}

impl TrainingData {
    /// Sequences (causal) or examples (masked) to draw from.
    fn len(&self) -> usize {
        match self {
            TrainingData::Text { seqs, .. } => seqs.len(),
            TrainingData::Masked { n, .. } => *n,
        }
    }

    /// h_0..h_L of step `step`'s batch, each [positions, d].
    fn step_states(
        &self,
        lm: &crate::model::LoadedModel,
        step: usize,
        tokens_per_step: usize,
        seed: u64,
    ) -> Result<Vec<Tensor>> {
        match self {
            TrainingData::Text { seqs, per_step } => {
                let rows: Vec<Vec<u32>> = batch_indices(seqs.len(), *per_step, step, seed)
                    .into_iter()
                    .map(|i| seqs[i].clone())
                    .collect();
                let batch = crate::model::Batch::from_sequences(&rows, 0, lm.model.device())?;
                Ok(crate::model::transformer::hidden_states(lm.model.as_ref(), &batch)?
                    .into_iter()
                    .map(|h| h.flatten_to(1))
                    .collect::<candle_core::Result<Vec<_>>>()?)
            }
            TrainingData::Masked { states, n } => {
                let idx: Vec<u32> = batch_indices(*n, tokens_per_step, step, seed)
                    .into_iter()
                    .map(|i| i as u32)
                    .collect();
                let idx = Tensor::from_vec(idx, tokens_per_step, states.device())?;
                Ok((0..states.dim(0)?)
                    .map(|l| states.get(l)?.index_select(&idx, 0))
                    .collect::<candle_core::Result<Vec<_>>>()?)
            }
        }
    }
}

/// A masked LM's training examples, h_0..h_L [S, n, d]: the run's stored training states, or
/// for a statistics-only run the same examples replayed from its corpus
/// ([`crate::collect::replay_train`]).
fn masked_examples(lm: &crate::model::LoadedModel, run: &RunDir, progress: bool) -> Result<Tensor> {
    let manifest = run.read_manifest()?;
    let act = match manifest.stats_form() {
        None => run.read_split(&manifest, "train")?,
        Some(_) => {
            let copts: crate::collect::CollectOptions = serde_json::from_value(manifest.options.clone())
                .map_err(|e| anyhow!("{}: options: {e}", run.manifest().display()))?;
            let corpus = PathBuf::from(&manifest.corpus.path);
            crate::collect::replay_train(lm, &corpus, &copts, copts.n_train, 0, progress)?
        }
    };
    let s = act.hidden_states.dim(0)?;
    if s != lm.model.info().n_layers + 1 {
        bail!(
            "{}: training states have {s} layers of states, the model {} layers",
            run.root.display(),
            lm.model.info().n_layers
        );
    }
    Ok(act.hidden_states)
}

/// The sequences of step `step`: positions `step * per_step ..` of an endless stream of seeded
/// shuffles of `0..n` (pass p shuffled with seed + p).
fn batch_indices(n: usize, per_step: usize, step: usize, seed: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(per_step);
    let mut cached: Option<(usize, Vec<usize>)> = None;
    for g in step * per_step..(step + 1) * per_step {
        let pass = g / n;
        if cached.as_ref().is_none_or(|(p, _)| *p != pass) {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed.wrapping_add(pass as u64)));
            cached = Some((pass, order));
        }
        out.push(cached.as_ref().expect("just set").1[g % n]);
    }
    out
}

/// Writes the ids of steps 0..steps (each step's sequences in order) as safetensors `ids`
/// [steps * per_step, seq_len] int64.
fn write_step_ids(path: &std::path::Path, seqs: &[Vec<u32>], per_step: usize, steps: usize, seed: u64) -> Result<()> {
    let seq_len = seqs[0].len();
    let mut ids = Vec::with_capacity(steps * per_step * seq_len);
    for step in 0..steps {
        for i in batch_indices(seqs.len(), per_step, step, seed) {
            ids.extend(seqs[i].iter().map(|&t| t as i64));
        }
    }
    let t = Tensor::from_vec(ids, (steps * per_step, seq_len), &Device::Cpu)?;
    crate::data::io::write_safetensors(path, &[("ids".to_string(), t)], None)
}

/// The starting lens: zeros, or `A_{l->L} - I` (+ intercept) from the run's maps.
fn initial_lens(lm: &crate::model::LoadedModel, run: &RunDir, init: TunedInit) -> Result<TunedLens> {
    let info = lm.model.info();
    let (n, d) = (info.n_layers, info.d_model);
    let mut lens = TunedLens::zeros(&lm.path.display().to_string(), d, n, &Device::Cpu)?;
    if init == TunedInit::Mat {
        let path = crate::data::run::require(&run.maps(), "jumplens fit")?;
        let maps = crate::lens::maps::Maps::read(&path)?;
        maps.check_model_info(info)?;
        let eye = Tensor::eye(d, DType::F32, &Device::Cpu)?;
        for l in 0..n {
            let m = maps
                .require(l, n)
                .with_context(|| format!("{}: --init mat needs the map {l} -> {n}", path.display()))?;
            lens.weights[l] = (m.a.to_device(&Device::Cpu)?.to_dtype(DType::F32)? - &eye)?;
            if let (Some(b), Some(bs)) = (&m.intercept, lens.biases.as_mut()) {
                bs[l] = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            }
        }
    }
    Ok(lens)
}

/// A checkpoint: parameters, momentum buffers, step, losses and the options that made it.
fn write_checkpoint(path: &std::path::Path, trainer: &Trainer, losses: &[f64], options: &str) -> Result<()> {
    let lens = trainer.lens()?;
    let sd = lens.state_dict();
    let mut tensors: Vec<(String, Tensor)> = sd.iter().map(|(k, t)| (format!("param.{k}"), t.clone())).collect();
    if let Some(m) = trainer.momentum() {
        for ((k, _), b) in sd.iter().zip(m) {
            tensors.push((format!("momentum.{k}"), b.copy()?));
        }
    }
    let cpu = Device::Cpu;
    tensors.push(("step".into(), Tensor::new(&[trainer.step as i64], &cpu)?));
    tensors.push(("losses".into(), Tensor::from_vec(losses.to_vec(), losses.len(), &cpu)?));
    tensors.push((
        "options".into(),
        Tensor::from_vec(options.as_bytes().to_vec(), options.len(), &cpu)?,
    ));
    crate::data::io::write_safetensors(path, &tensors, None)
}

/// Reads a checkpoint made with the same options, else None.
fn read_checkpoint(
    path: &std::path::Path,
    template: &TunedLens,
    recipe: &Recipe,
    options: &str,
) -> Result<Option<(Trainer, Vec<f64>)>> {
    if !path.exists() {
        return Ok(None);
    }
    let t = crate::data::io::read_safetensors(path)?;
    let get = |k: &str| t.get(k).ok_or_else(|| anyhow!("{}: no tensor '{k}'", path.display()));
    let saved = String::from_utf8(get("options")?.to_vec1::<u8>()?).unwrap_or_default();
    if saved != options {
        return Ok(None);
    }
    let sd: Vec<(String, Tensor)> = template
        .state_dict()
        .into_iter()
        .map(|(k, _)| Ok((k.clone(), get(&format!("param.{k}"))?.clone())))
        .collect::<Result<_>>()?;
    let lens = TunedLens::from_state_dict(template.config.clone(), sd, &path.display().to_string())?;
    let step = get("step")?.to_vec1::<i64>()?[0] as usize;
    let momentum = if step > 0 {
        Some(
            template
                .state_dict()
                .into_iter()
                .map(|(k, _)| Ok(get(&format!("momentum.{k}"))?.clone()))
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    let losses = get("losses")?.to_vec1::<f64>()?;
    Ok(Some((Trainer::resume(&lens, recipe.clone(), momentum, step)?, losses)))
}

/// Removes `RUN/.{name}.tmp-PID` folders of processes no longer alive (a kill while writing).
fn remove_stale_lens_dirs(run: &RunDir, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(&run.root) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = file_name.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) {
            if !crate::data::io::process_alive(pid) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Trains the lens and writes `RUN/tuned/` (or `RUN/tuned-mat/`).
pub fn run_tuned(lm: &crate::model::LoadedModel, run: &RunDir, opts: &TunedOptions) -> Result<TunedReport> {
    let started = Instant::now();
    if opts.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if opts.seq_len < 2 {
        bail!("--seq-len must be at least 2 (got {})", opts.seq_len);
    }
    if !opts.lr.is_finite() || opts.lr <= 0.0 {
        bail!("--lr must be a positive number (got {})", opts.lr);
    }
    let device = lm.model.device().clone();
    let tokens_per_step = match opts.tokens_per_step {
        0 => default_tokens_per_step(&device),
        n => n,
    };
    let info = lm.model.info().clone();
    let masked = info.attention == crate::model::AttentionKind::Bidirectional;
    if masked && opts.ids_out.is_some() {
        bail!("--ids-out: a masked LM trains on the collected [MASK] positions, not on token sequences");
    }
    let _lock = run.lock()?;
    let data = if masked {
        let states = masked_examples(lm, run, opts.progress)?;
        let n = states.dim(1)?;
        TrainingData::Masked {
            states: states.to_device(&device)?,
            n,
        }
    } else {
        // A step of fewer tokens than --seq-len is one sequence of that many tokens.
        let seqs = training_sequences(lm, run, opts.seq_len.min(tokens_per_step).max(2))?;
        let per_step = tokens_per_step.div_ceil(seqs[0].len()).max(1);
        TrainingData::Text { seqs, per_step }
    };
    let mut recorded = opts.clone();
    recorded.tokens_per_step = tokens_per_step;
    let options_json = serde_json::to_string(&recorded)?;
    let out_dir = run.file(opts.init.dir_name());
    let ckpt = run.file(&format!("{}.checkpoint.safetensors", opts.init.dir_name()));
    crate::data::io::remove_stale_temps(&run.root);
    remove_stale_lens_dirs(run, opts.init.dir_name());

    let mut recipe = Recipe::new(opts.steps, opts.lr);
    recipe.chunk = crate::lens::tuned::train::default_chunk(&device);
    recipe.rows_per_pass = crate::lens::tuned::train::default_rows_per_pass(&device);
    let start_lens = initial_lens(lm, run, opts.init)?.to_device(&device)?;
    let (mut trainer, mut losses) = match read_checkpoint(&ckpt, &start_lens, &recipe, &options_json)? {
        Some((t, l)) => (t, l),
        None => (Trainer::new(&start_lens, recipe)?, Vec::new()),
    };
    let resumed_from = trainer.step;
    if let (Some(path), TrainingData::Text { seqs, per_step }) = (&opts.ids_out, &data) {
        write_step_ids(path, seqs, *per_step, opts.steps, opts.seed)?;
    }
    let mut step_s = Vec::with_capacity(opts.steps - resumed_from);
    let bar = crate::progress::bar(opts.steps as u64, "tuned-lens", opts.progress);
    bar.set_position(trainer.step as u64);
    while trainer.step < opts.steps {
        crate::cancel::check()?;
        let step_started = Instant::now();
        let step = trainer.step;
        let states = data.step_states(lm, step, tokens_per_step, opts.seed)?;
        let loss = trainer.step(lm.model.as_ref(), &states)?;
        // The loss's read-back has waited for the device: the step is done.
        step_s.push(step_started.elapsed().as_secs_f64());
        losses.push(loss);
        bar.set_message(format!("loss {:.3}", loss / info.n_layers as f64));
        bar.inc(1);
        if trainer.step % opts.checkpoint_every.max(1) == 0 && trainer.step < opts.steps {
            write_checkpoint(&ckpt, &trainer, &losses, &options_json)?;
        }
    }
    bar.finish_and_clear();
    let lens = trainer.lens()?.to_device(&Device::Cpu)?;
    // Into a temporary folder, then renamed into place: never a half-written lens folder.
    let tmp = run.file(&format!(".{}.tmp-{}", opts.init.dir_name(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    lens.write_dir(&tmp)?;
    if out_dir.exists() {
        std::fs::remove_dir_all(&out_dir).with_context(|| format!("{}: cannot replace", out_dir.display()))?;
    }
    std::fs::rename(&tmp, &out_dir).with_context(|| format!("{}: cannot write", out_dir.display()))?;
    if ckpt.exists() {
        std::fs::remove_file(&ckpt).with_context(|| format!("{}: cannot remove", ckpt.display()))?;
    }
    let report = TunedReport {
        out: out_dir,
        steps: opts.steps,
        tokens_per_step,
        sequences: data.len(),
        masked,
        losses,
        resumed_from,
        step_s,
        wall_s: started.elapsed().as_secs_f64(),
    };
    let mut manifest = run.read_manifest()?;
    manifest.set_stage(
        &format!("tuned-lens.{}", opts.init.dir_name()),
        serde_json::json!({
            "wall_s": report.wall_s,
            "options": recorded,
            "final_loss": report.losses.last(),
            "resumed_from": resumed_from,
            "step_s": report.step_s,
        }),
    );
    run.write_manifest(&manifest)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each step's batch is a function of the step alone; a pass covers every sequence once.
    #[test]
    fn batches_are_deterministic_and_cover_each_pass() {
        let a: Vec<usize> = (0..5).flat_map(|s| batch_indices(7, 3, s, 1)).collect();
        let b: Vec<usize> = (0..5).flat_map(|s| batch_indices(7, 3, s, 1)).collect();
        assert_eq!(a, b);
        let mut first: Vec<usize> = a[..7].to_vec();
        first.sort();
        assert_eq!(first, (0..7).collect::<Vec<_>>());
        assert_ne!(a[..7], a[7..14], "each pass is shuffled anew");
        assert_ne!(batch_indices(7, 3, 0, 1), batch_indices(7, 3, 0, 2));
    }
}
