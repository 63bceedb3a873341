//! Linear stand-ins for sub-modules (the paper's section 7) and alternation schedules (section
//! 4.3).
//!
//! Sub-module maps: for every block, a least-squares map from a sub-module's input to its output
//! at the training set's sampled positions (attention, MLP, each norm), fitted with the same
//! machinery as the layer-to-layer maps. Replacement from layer l on: blocks 0..l run exactly,
//! blocks l..L run with the chosen sub-modules replaced by their maps in every block, then the
//! final norm and unembedding; scored against the full model like the lenses. A linearised
//! attention acts on each position alone: no information moves between tokens.
//!
//! Alternation: run `a` blocks, jump `b` blocks with a fitted map applied to every position,
//! repeat; and the r^2-informed schedule that maximises the product of the jumps' r^2 for a
//! given number of executed blocks.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::collect::{unit_batches, units_from_activations, UnitBatch};
use crate::data::Activations;
use crate::eval::predict::{check_gold, gold_tokens, Acc, LensMetrics, Reference};
use crate::lens::fit::few_rows::min_norm_maps;
use crate::lens::fit::{fit_all_pairs, FitOptions};
use crate::lens::maps::Maps;
use crate::model::placement::move_to;
use crate::model::{self, AttentionKind, Hooks, LinearReplacement, LoadedModel, SubModule, Transformer};

/// Options of `jumplens submodules`.
#[derive(Debug, Clone)]
pub struct SubmoduleOptions {
    /// Training examples used to fit the sub-module maps.
    pub n_train: usize,
    /// Validation examples the replacements are scored on.
    pub n_eval: usize,
    pub batch_tokens: usize,
    pub progress: bool,
}

impl Default for SubmoduleOptions {
    fn default() -> Self {
        Self {
            n_train: 3000,
            n_eval: 300,
            batch_tokens: 0,
            progress: true,
        }
    }
}

/// (block, sub) -> (input rows, output rows), [rows, d] f32 per batch, where the block ran.
type SubRows = HashMap<(usize, SubModule), (Vec<Tensor>, Vec<Tensor>)>;

/// Records every sub-module's input and output at the read positions of a batch. The rows stay
/// on the device (on a GPU, 256 copies to the host per batch of an 8B-shaped model each waited
/// for the forward); they are joined once all batches ran.
struct SubRecorder<'a> {
    batch: &'a UnitBatch,
    /// Appended batch after batch.
    rows: &'a mut SubRows,
}

impl Hooks for SubRecorder<'_> {
    fn observes(&self, _tap: crate::model::Tap) -> bool {
        false
    }
    fn sub_module(&mut self, layer: usize, sub: SubModule, input: &Tensor, output: &Tensor) -> Result<()> {
        let entry = self.rows.entry((layer, sub)).or_default();
        entry.0.push(self.batch.rows(input)?.to_dtype(candle_core::DType::F32)?);
        entry
            .1
            .push(self.batch.rows(output)?.to_dtype(candle_core::DType::F32)?);
        Ok(())
    }
}

/// Wall seconds per part of the stage, summed over batches.
#[derive(Default)]
struct Parts(BTreeMap<String, f64>);

impl Parts {
    fn add(&mut self, part: &str, since: Instant) {
        *self.0.entry(part.to_string()).or_default() += since.elapsed().as_secs_f64();
    }
}

/// Fits a map from every sub-module's input to its output on the training examples.
pub fn fit_submodules(
    lm: &LoadedModel,
    train: &Activations,
    opts: &SubmoduleOptions,
) -> Result<BTreeMap<(usize, SubModule), Tensor>> {
    fit_submodules_timed(lm, train, opts, &mut Parts::default())
}

fn fit_submodules_timed(
    lm: &LoadedModel,
    train: &Activations,
    opts: &SubmoduleOptions,
    parts: &mut Parts,
) -> Result<BTreeMap<(usize, SubModule), Tensor>> {
    let started = Instant::now();
    let info = lm.model.info();
    let d = info.d_model;
    let causal = info.attention == AttentionKind::Causal;
    let tok = lm.tokenizer()?;
    let units = units_from_activations(train, causal, tok.mask_id, opts.n_train)?;
    let batches = unit_batches(&units, opts.batch_tokens, tok.pad_id, lm.model.device())?;
    let bar = crate::progress::bar(units.len() as u64, "sub-module I/O", opts.progress);
    let mut rows = SubRows::new();
    for ub in &batches {
        let mut rec = SubRecorder {
            batch: ub,
            rows: &mut rows,
        };
        model::hidden_states_with(lm.model.as_ref(), &ub.batch, &mut rec)?;
        bar.inc(ub.batch.batch_size() as u64);
    }
    bar.finish_and_clear();
    parts.add("fit: training forward with recording", started);
    let started = Instant::now();
    let mut maps = BTreeMap::new();
    let mut few = Vec::new();
    for ((layer, sub), (x, y)) in rows {
        let (x, y) = (Tensor::cat(&x, 0)?, Tensor::cat(&y, 0)?);
        let n = x.dim(0)?;
        if n < d {
            // Fewer examples than coordinates (3,000 at d = 4096): through the examples' Gram,
            // on the device (see `lens::fit::few_rows`).
            few.push(((layer, sub), (x, y)));
            continue;
        }
        // The fit machinery takes stacked states [2, N, d]: state 0 = input, 1 = output.
        let states = Tensor::stack(&[&x, &y], 0)?.to_device(&Device::Cpu)?;
        let (fitted, _) = fit_all_pairs(&states, &[(0, 1)], &FitOptions::default())?;
        let a = fitted.require(0, 1)?.a.clone();
        maps.insert((layer, sub), a.to_device(lm.model.block_device(layer))?);
    }
    let inputs: Vec<(Tensor, Tensor)> = few.iter().map(|(_, xy)| xy.clone()).collect();
    for ((key, _), a) in few.iter().zip(min_norm_maps(&inputs)?) {
        maps.insert(*key, move_to(&a, lm.model.block_device(key.0))?);
    }
    parts.add("fit: sub-module maps", started);
    Ok(maps)
}

/// Which sub-modules a variant replaces.
pub fn variant_subs(variant: &str, block_subs: &[SubModule]) -> Vec<SubModule> {
    match variant {
        "attn" => vec![SubModule::Attn],
        "mlp" => vec![SubModule::Mlp],
        // Every norm of the block: two for GPT-2/Llama/BERT, four for Gemma 3.
        "norms" => block_subs
            .iter()
            .copied()
            .filter(|s| !matches!(s, SubModule::Attn | SubModule::Mlp))
            .collect(),
        other => panic!("unknown variant {other}"),
    }
}

/// Per-variant metrics, index = l (blocks run exactly before replacement starts).
#[derive(Debug, Serialize)]
pub struct SubmoduleReport {
    pub layers: usize,
    pub n_eval: usize,
    pub note: String,
    pub variants: BTreeMap<String, LensMetrics>,
    /// Cells whose KL or cross-entropy is not a number because the replaced network's logits
    /// overflowed f32 (the replacement diverged): written as null in the JSON, named here.
    pub diverged: Vec<String>,
    /// Wall seconds of each part of [`experiments`] (not in the JSON; the runner records them in
    /// the manifest as `parts_s`).
    #[serde(skip)]
    pub parts_s: BTreeMap<String, f64>,
}

impl SubmoduleReport {
    /// Records the variants' non-finite KL / cross-entropy cells in `diverged` (a diverged
    /// replacement is a result, not an error) and returns them; other non-finite metrics stay for
    /// the caller's integrity check.
    pub fn mark_diverged(&mut self) -> &[String] {
        self.diverged.clear();
        for (name, m) in &self.variants {
            for layer in 0..m.kl.len().max(m.ce.len()) {
                let bad: Vec<&str> = [("kl", m.kl.get(layer)), ("ce", m.ce.get(layer))]
                    .into_iter()
                    .filter(|(_, v)| v.is_some_and(|v| !v.is_finite()))
                    .map(|(k, _)| k)
                    .collect();
                if !bad.is_empty() {
                    self.diverged.push(format!("{name} layer {layer}: {}", bad.join(", ")));
                }
            }
        }
        &self.diverged
    }
}

/// One alternation schedule's result.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleResult {
    pub name: String,
    pub executed_blocks: usize,
    /// Jumps (l, l') taken, in order.
    pub jumps: Vec<(usize, usize)>,
    /// Product of the jumps' r^2 (mat).
    pub r2_product: f64,
    #[serde(rename = "p@1")]
    pub p_at_1: f64,
    pub surprisal: f64,
}

/// What `alternation.json` holds.
#[derive(Debug, Serialize)]
pub struct AlternationReport {
    pub layers: usize,
    pub n_eval: usize,
    /// Run a blocks, jump b, repeated.
    pub periodic: Vec<ScheduleResult>,
    /// The best-r^2 schedule for each number of executed blocks.
    pub r2_informed: Vec<ScheduleResult>,
    /// One jump to the last layer after k executed blocks (`mat` at layer k), per k.
    pub single_jump: Vec<ScheduleResult>,
}

/// A schedule: a path 0 -> L of steps, each one block (l -> l+1, run) or a jump (l -> l').
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Run(usize),
    Jump(usize, usize),
}

fn executed(steps: &[Step]) -> usize {
    steps.iter().filter(|s| matches!(s, Step::Run(_))).count()
}

fn jumps(steps: &[Step]) -> Vec<(usize, usize)> {
    steps
        .iter()
        .filter_map(|s| if let Step::Jump(a, b) = s { Some((*a, *b)) } else { None })
        .collect()
}

/// Run `a` blocks, jump `b`, repeated until L (a + b divides L).
pub fn periodic_schedule(n_layers: usize, a: usize, b: usize) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut l = 0;
    while l < n_layers {
        for _ in 0..a {
            steps.push(Step::Run(l));
            l += 1;
        }
        steps.push(Step::Jump(l, l + b));
        l += b;
    }
    steps
}

/// The schedule with `k` executed blocks maximising the product of its jumps' r^2 (dynamic
/// programming over (layer, blocks executed so far)). `r2[l][l']` is the mat r^2.
pub fn r2_informed_schedule(r2: &[Vec<Option<f64>>], n_layers: usize, k: usize) -> Option<(Vec<Step>, f64)> {
    // best[l][j] = best product reaching state l with j executed blocks.
    let mut best = vec![vec![f64::NEG_INFINITY; k + 1]; n_layers + 1];
    let mut prev: Vec<Vec<Option<Step>>> = vec![vec![None; k + 1]; n_layers + 1];
    best[0][0] = 1.0;
    for l in 0..n_layers {
        for j in 0..=k {
            let here = best[l][j];
            if here == f64::NEG_INFINITY {
                continue;
            }
            if j < k && here > best[l + 1][j + 1] {
                best[l + 1][j + 1] = here;
                prev[l + 1][j + 1] = Some(Step::Run(l));
            }
            for l2 in l + 1..=n_layers {
                let Some(Some(r)) = r2.get(l).and_then(|row| row.get(l2)) else {
                    continue;
                };
                let v = here * r.max(0.0);
                if v > best[l2][j] {
                    best[l2][j] = v;
                    prev[l2][j] = Some(Step::Jump(l, l2));
                }
            }
        }
    }
    if best[n_layers][k] == f64::NEG_INFINITY {
        return None;
    }
    let mut steps = Vec::new();
    let (mut l, mut j) = (n_layers, k);
    while l > 0 {
        let step = prev[l][j].clone()?;
        match step {
            Step::Run(from) => {
                l = from;
                j -= 1;
            }
            Step::Jump(from, _) => l = from,
        }
        steps.push(step);
    }
    steps.reverse();
    Some((steps, best[n_layers][k]))
}

/// Applies a map to every position of a [B, T, d] state.
fn jump_all_positions(h: &Tensor, a: &Tensor) -> Result<Tensor> {
    Ok(crate::model::layers::Linear::new(a.clone(), None).forward(&move_to(h, a.device())?)?)
}

/// Evaluation batches of the validation examples, with their exact states and the reference.
struct EvalBatch {
    ub: UnitBatch,
    states: Vec<Tensor>,
    reference: Reference,
    gold: Vec<Option<u32>>,
}

fn eval_batches(lm: &LoadedModel, val: &Activations, n_eval: usize, batch_tokens: usize) -> Result<Vec<EvalBatch>> {
    let info = lm.model.info();
    let causal = info.attention == AttentionKind::Causal;
    let tok = lm.tokenizer()?;
    let units = units_from_activations(val, causal, tok.mask_id, n_eval)?;
    let gold_all = gold_tokens(val, info.attention);
    check_gold(val, &gold_all, info.vocab_size)?;
    let mut out = Vec::new();
    for ub in unit_batches(&units, batch_tokens, tok.pad_id, lm.model.device())? {
        let states = model::hidden_states(lm.model.as_ref(), &ub.batch)?;
        let h_last = ub.rows(states.last().expect("h_L"))?;
        let gold: Vec<Option<u32>> = ub.examples.iter().map(|&e| gold_all[e]).collect();
        let reference = Reference::new(lm.model.as_ref(), &h_last, &gold)?;
        out.push(EvalBatch {
            ub,
            states,
            reference,
            gold,
        });
    }
    Ok(out)
}

/// How many elements of a stacked state ([rows, d]) the variants' runs put into one block call
/// on the CPU: runs from several start layers share each block's GEMMs (more rows per weight
/// packing, fewer calls) up to this size. A GPU runs one start layer at a time (its batches are
/// already large, and its memory is what bounds them).
const STACK_ELEMENTS_CPU: usize = 1 << 22;

/// `batch` repeated `k` times along the batch dimension (the context of `k` stacked runs).
fn repeated_batch(batch: &model::Batch, k: usize) -> Result<model::Batch> {
    let ids = vec![&batch.input_ids; k];
    Ok(model::Batch {
        input_ids: Tensor::cat(&ids, 0)?,
        lengths: batch.lengths.repeat(k),
        token_type_ids: match &batch.token_type_ids {
            Some(t) => Some(Tensor::cat(&vec![t; k], 0)?),
            None => None,
        },
    })
}

/// The read rows [rows, d] after blocks l..L with `hooks`' replacements, for every start layer
/// l = 0..=L (index l; l = L is the exact h_L). Each run starts from the kept exact state h_l
/// (blocks 0..l are never re-run), and the runs of several start layers go through each block
/// together, stacked along the batch dimension (every run uses the same weights and maps in
/// block j >= l). `position_wise`: every attention is replaced, so only the read rows run, as
/// one-token sequences.
fn runs_from_every_layer(
    model: &dyn Transformer,
    ub: &UnitBatch,
    states: &[Tensor],
    hooks: &mut LinearReplacement,
    position_wise: bool,
) -> Result<Vec<Tensor>> {
    let n_layers = model.info().n_layers;
    let start = |l: usize| -> Result<Tensor> {
        Ok(if position_wise {
            ub.rows(&states[l])?.unsqueeze(1)?
        } else {
            states[l].clone()
        })
    };
    let per_call = if model.device().is_cpu() {
        (STACK_ELEMENTS_CPU / start(0)?.elem_count().max(1)).max(1)
    } else {
        1
    };
    let batch_rows = ub.batch.batch_size();
    let mut contexts: HashMap<usize, model::BatchContext> = HashMap::new();
    let mut out = vec![None; n_layers + 1];
    out[n_layers] = Some(ub.rows(&states[n_layers])?);
    for first in (0..n_layers).step_by(per_call) {
        let last = (first + per_call).min(n_layers);
        let mut stacked: Option<Tensor> = None;
        let mut members = 0;
        for layer in first..n_layers {
            if layer < last {
                let x = start(layer)?;
                stacked = Some(match stacked {
                    None => x,
                    Some(s) => Tensor::cat(&[&s, &move_to(&x, s.device())?], 0)?,
                });
                members += 1;
            }
            let h = stacked.take().expect("a run starts at `first`");
            // One context per stack height, built once (position-wise runs use the batch's own).
            let copies = if position_wise { 1 } else { members };
            let ctx = match contexts.entry(copies) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(if copies == 1 {
                    model.context(&ub.batch)?
                } else {
                    model.context(&repeated_batch(&ub.batch, copies)?)?
                }),
            };
            stacked = Some(model.block(layer, &h, ctx, hooks)?);
        }
        let h = stacked.expect("runs from `first`");
        let run_rows = if position_wise { ub.examples.len() } else { batch_rows };
        for (i, slot) in out[first..last].iter_mut().enumerate() {
            let part = h.narrow(0, i * run_rows, run_rows)?;
            *slot = Some(if position_wise {
                part.squeeze(1)?
            } else {
                ub.rows(&part)?
            });
        }
    }
    Ok(out.into_iter().map(|t| t.expect("every start layer ran")).collect())
}

/// The sub-module replacements and the alternation schedules, on the model: sub-module maps
/// fitted on `train`, scored on `val` against the full model; `maps` are the run's layer maps
/// (on the model's device) and `r2` their mat r^2 table ([L + 1][L + 1], from `r2.json`).
pub fn experiments(
    lm: &LoadedModel,
    train: &Activations,
    val: &Activations,
    maps: &Maps,
    r2: &[Vec<Option<f64>>],
    opts: &SubmoduleOptions,
) -> Result<(SubmoduleReport, AlternationReport)> {
    let n_layers = lm.model.info().n_layers;
    check_r2_shape(r2, n_layers)?;
    let mut parts = Parts::default();
    let sub_maps = fit_submodules_timed(lm, train, opts, &mut parts)?;
    let started = Instant::now();
    let batches = eval_batches(lm, val, opts.n_eval, opts.batch_tokens)?;
    let n_eval: usize = batches.iter().map(|b| b.gold.len()).sum();
    parts.add("eval: exact forward and reference", started);

    // Sub-module replacement from every l, for each variant; mat and id on the same examples.
    let block_subs = lm.model.sub_modules();
    let names = ["attn", "mlp", "norms"];
    let mut acc: BTreeMap<String, Vec<Acc>> = BTreeMap::new();
    for name in names.iter().chain(&["mat", "id"]) {
        acc.insert(name.to_string(), vec![Acc::default(); n_layers + 1]);
    }
    let bar = crate::progress::bar(
        (batches.len() * (n_layers + 1) * names.len()) as u64,
        "sub-modules",
        opts.progress,
    );
    for b in &batches {
        // Every variant's (and mat's, id's) read rows from each l, scored together afterwards:
        // on the CPU one pass over the unembedding scores all layers (`Reference::score_layers`).
        let mut outs: BTreeMap<&str, Vec<Tensor>> = BTreeMap::new();
        for name in names {
            let started = Instant::now();
            let mut hooks = LinearReplacement::default();
            for block in 0..n_layers {
                for sub in variant_subs(name, block_subs) {
                    if let Some(a) = sub_maps.get(&(block, sub)) {
                        hooks.maps.insert((block, sub), a.clone());
                    }
                }
            }
            // With every attention replaced by a map, nothing moves between positions: only the
            // read rows need to run (as sequences of one token). A run from l replaces blocks
            // l.. only, so this holds from l on when it holds for every block.
            let position_wise = (0..n_layers).all(|block| hooks.maps.contains_key(&(block, SubModule::Attn)));
            let rows = runs_from_every_layer(lm.model.as_ref(), &b.ub, &b.states, &mut hooks, position_wise)?;
            outs.insert(name, rows);
            bar.inc((n_layers + 1) as u64);
            parts.add(&format!("variant {name}: runs from every layer"), started);
        }
        let started = Instant::now();
        for l in 0..=n_layers {
            let rows = move_to(&b.ub.rows(&b.states[l])?, lm.model.head_device())?;
            let mat = if l == n_layers {
                rows.clone()
            } else {
                maps.require(l, n_layers)?.apply(&rows)?
            };
            outs.entry("mat").or_default().push(mat);
            outs.entry("id").or_default().push(rows);
        }
        parts.add("mat and id casts", started);
        let started = Instant::now();
        for (name, rows) in outs {
            let cells = b
                .reference
                .score_layers(lm.model.as_ref(), n_layers + 1, &|l| Ok(rows[l].clone()))?;
            for (cell_acc, cell) in acc.get_mut(name).expect("variant").iter_mut().zip(&cells) {
                cell_acc.add(cell, &b.gold);
            }
        }
        parts.add("scoring (5 lenses x every layer)", started);
    }
    bar.finish_and_clear();
    let mut variants = BTreeMap::new();
    for (name, cells) in acc {
        let mut m = LensMetrics::default();
        cells.iter().for_each(|a| a.push_to(&mut m));
        variants.insert(name, m);
    }

    // Alternation.
    let started = Instant::now();
    let schedules = periodic_schedules(n_layers);
    let mut r2_sched = Vec::new();
    let stride = n_layers.div_ceil(10).max(1);
    for k in (0..n_layers).step_by(stride) {
        if let Some((steps, _)) = r2_informed_schedule(r2, n_layers, k) {
            r2_sched.push((format!("r2-informed, {k} blocks"), steps));
        }
    }
    let all: Vec<&(String, Vec<Step>)> = schedules.iter().chain(&r2_sched).collect();
    let steps: Vec<&[Step]> = all.iter().map(|(_, s)| s.as_slice()).collect();
    let scored = eval_schedules(lm, &batches, maps, &steps)?;
    let result = |(name, steps): &(String, Vec<Step>), m: &LensMetrics| {
        let js = jumps(steps);
        let prod = js
            .iter()
            .map(|&(l, l2)| r2[l][l2].unwrap_or(f64::NAN).max(0.0))
            .product();
        ScheduleResult {
            name: name.clone(),
            executed_blocks: executed(steps),
            jumps: js,
            r2_product: prod,
            p_at_1: m.p_at_1[0],
            surprisal: m.surprisal[0],
        }
    };
    let mut results = all.iter().zip(&scored).map(|(s, m)| result(s, m));
    let periodic: Vec<ScheduleResult> = results.by_ref().take(schedules.len()).collect();
    let r2_informed: Vec<ScheduleResult> = results.collect();
    parts.add("alternation schedules", started);
    let sub_report = SubmoduleReport {
        layers: n_layers,
        n_eval,
        note: "index = l: blocks 0..l run exactly, blocks l..L with the variant's sub-modules replaced by \
               fitted linear maps. A linearised attention acts on each position alone: no information moves \
               between tokens."
            .into(),
        variants,
        diverged: Vec::new(),
        parts_s: parts.0,
    };
    let single_jump = (0..n_layers)
        .map(|k| {
            let mat = &sub_report.variants["mat"];
            ScheduleResult {
                name: format!("single jump after {k} blocks"),
                executed_blocks: k,
                jumps: vec![(k, n_layers)],
                r2_product: r2[k][n_layers].unwrap_or(f64::NAN),
                p_at_1: mat.p_at_1[k],
                surprisal: mat.surprisal[k],
            }
        })
        .collect();
    let alt = AlternationReport {
        layers: n_layers,
        n_eval,
        periodic,
        r2_informed,
        single_jump,
    };
    Ok((sub_report, alt))
}

/// Scores every schedule on the evaluation batches (one metrics row each, in `schedules`'
/// order).
fn eval_schedules(
    lm: &LoadedModel,
    batches: &[EvalBatch],
    maps: &Maps,
    schedules: &[&[Step]],
) -> Result<Vec<LensMetrics>> {
    let mut acc = vec![Acc::default(); schedules.len()];
    for b in batches {
        schedule_final_states(
            lm.model.as_ref(),
            &b.ub.batch,
            &b.states,
            maps,
            schedules,
            &mut |i, h| {
                let logits = lm.model.readout(&b.ub.rows(h)?)?;
                acc[i].add(&b.reference.score(&logits)?, &b.gold);
                Ok(())
            },
        )?;
    }
    Ok(acc
        .iter()
        .map(|a| {
            let mut m = LensMetrics::default();
            a.push_to(&mut m);
            m
        })
        .collect())
}

/// Runs every schedule on one batch whose exact states are `states` and calls `visit(i, h)`
/// with schedule i's final state (in sorted order of the schedules, each once). Schedules share
/// work: a leading run of exact blocks 0..a starts from the kept exact h_a, and each schedule
/// continues from the state after the steps it shares with the previous one in sorted order
/// (one path of states is kept).
fn schedule_final_states(
    model: &dyn Transformer,
    batch: &model::Batch,
    states: &[Tensor],
    maps: &Maps,
    schedules: &[&[Step]],
    visit: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<()> {
    let mut order: Vec<usize> = (0..schedules.len()).collect();
    order.sort_by(|&i, &j| schedules[i].cmp(schedules[j]));
    let ctx = model.context(batch)?;
    // path[k] = the state after the first k + 1 steps of the previous schedule.
    let mut path: Vec<Tensor> = Vec::new();
    let mut prev: &[Step] = &[];
    for &i in &order {
        let steps = schedules[i];
        let shared = steps.iter().zip(prev).take_while(|(a, b)| a == b).count();
        path.truncate(shared);
        // How many leading steps are exact blocks (Run(0), Run(1), ...).
        let exact = steps
            .iter()
            .enumerate()
            .take_while(|(k, s)| **s == Step::Run(*k))
            .count();
        for (k, s) in steps.iter().enumerate().skip(shared) {
            let h = if k < exact {
                states[k + 1].clone()
            } else {
                let h = path.last().unwrap_or(&states[0]);
                match s {
                    Step::Run(l) => model.block(*l, h, &ctx, &mut model::NoHooks)?,
                    Step::Jump(l, l2) => {
                        let m = maps.get(*l, *l2).ok_or_else(|| {
                            anyhow::anyhow!("{}: no map {l} -> {l2} (fit with --pairs all)", maps.name())
                        })?;
                        jump_all_positions(h, &m.a)?
                    }
                }
            };
            path.push(h);
        }
        visit(i, path.last().unwrap_or(&states[0]))?;
        prev = steps;
    }
    Ok(())
}

/// The periodic schedules the alternation experiment runs, named: every `a` with short jumps
/// (b = 1, 2; longer periodic jumps are dominated by the single jump) where a + b divides L.
pub fn periodic_schedules(n_layers: usize) -> Vec<(String, Vec<Step>)> {
    let mut schedules = Vec::new();
    for b in 1..=2 {
        for a in 1..n_layers {
            if n_layers.is_multiple_of(a + b) {
                schedules.push((format!("run {a}, jump {b}"), periodic_schedule(n_layers, a, b)));
            }
        }
    }
    schedules
}

/// The layer maps (l, l') the periodic schedules jump with, sorted: what [`experiments`] needs
/// besides the to-final maps (the r²-informed schedules use whatever pairs `r2` scores).
pub fn schedule_pairs(n_layers: usize) -> Vec<(usize, usize)> {
    let set: std::collections::BTreeSet<(usize, usize)> = periodic_schedules(n_layers)
        .iter()
        .flat_map(|(_, steps)| jumps(steps))
        .collect();
    set.into_iter().collect()
}

/// Refuses an r^2 table that is not [L + 1][L + 1] (the schedules index it by layer pairs).
pub fn check_r2_shape(r2: &[Vec<Option<f64>>], n_layers: usize) -> Result<()> {
    let n = n_layers + 1;
    if r2.len() != n || r2.iter().any(|row| row.len() != n) {
        bail!(
            "the r² table is {} x {}, expected {n} x {n} for a {n_layers}-layer model",
            r2.len(),
            r2.iter().map(Vec::len).max().unwrap_or(0)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A variant whose KL / cross-entropy overflowed is listed cell by cell; finite cells are not.
    #[test]
    fn diverged_cells_are_named() {
        let ok = crate::eval::predict::LensMetrics {
            kl: vec![0.5, 0.25],
            ce: vec![1.0, 2.0],
            ..Default::default()
        };
        let bad = crate::eval::predict::LensMetrics {
            kl: vec![f64::NAN, 0.5],
            ce: vec![f64::INFINITY, 1.0],
            ..Default::default()
        };
        let mut r = SubmoduleReport {
            layers: 2,
            n_eval: 1,
            note: String::new(),
            variants: [("attn".to_string(), ok), ("norms".to_string(), bad)]
                .into_iter()
                .collect(),
            diverged: Vec::new(),
            parts_s: BTreeMap::new(),
        };
        assert_eq!(r.mark_diverged(), ["norms layer 0: kl, ce"]);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["diverged"][0], "norms layer 0: kl, ce");
        assert!(json["variants"]["norms"]["kl"][0].is_null());
    }

    use super::*;

    fn tiny_llama() -> LoadedModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/llama");
        model::load_model(dir.to_str().unwrap(), &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// The shortcut of `experiments`: with every attention from l on replaced by a map, running
    /// only the read rows as one-token sequences gives the rows of the full run.
    #[test]
    fn replaced_attention_runs_position_wise() {
        let lm = tiny_llama();
        let (d, n_layers) = (lm.model.info().d_model, lm.model.info().n_layers);
        let batch = model::Batch::from_sequences(&[vec![5, 9, 2, 7], vec![3, 4]], 0, &Device::Cpu).unwrap();
        let ctx = lm.model.context(&batch).unwrap();
        let states = model::hidden_states(lm.model.as_ref(), &batch).unwrap();
        let l = 0;
        let mut hooks = LinearReplacement::default();
        for block in l..n_layers {
            let a = Tensor::randn(0f32, 0.2, (d, d), &Device::Cpu).unwrap();
            hooks.maps.insert((block, SubModule::Attn), a);
        }
        let full = model::run_blocks(lm.model.as_ref(), &states[l], &ctx, l, n_layers, &mut hooks).unwrap();
        // Read rows (0, 3) and (1, 1).
        let pick = |h: &Tensor| {
            let h = h.reshape(((), d)).unwrap();
            Tensor::cat(&[h.get(3).unwrap(), h.get(4 + 1).unwrap()], 0)
                .unwrap()
                .reshape((2, d))
                .unwrap()
        };
        let rows = pick(&states[l]).unsqueeze(1).unwrap();
        let short = model::run_blocks(lm.model.as_ref(), &rows, &ctx, l, n_layers, &mut hooks)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let diff = max_abs_diff(&pick(&full), &short);
        assert!(diff < 1e-5, "position-wise rows differ by {diff}");
        assert!(n_layers >= 2, "the test should run several replaced blocks");
    }

    /// Runs from every start layer, stacked along the batch dimension and started from the kept
    /// exact states, give the read rows of one `run_blocks` per start layer (the unshared way),
    /// for full sequences (norms replaced) and position-wise runs (attention replaced).
    #[test]
    fn stacked_runs_from_every_layer_match_one_run_per_layer() {
        let lm = tiny_llama();
        let model = lm.model.as_ref();
        let (d, n_layers) = (model.info().d_model, model.info().n_layers);
        let batch = model::Batch::from_sequences(&[vec![5, 9, 2, 7], vec![3, 4]], 0, &Device::Cpu).unwrap();
        // Read rows (0, 3) and (1, 1) of the [2, 4] batch.
        let ub = UnitBatch {
            batch: batch.clone(),
            gather: Tensor::new(&[3u32, 5], &Device::Cpu).unwrap(),
            examples: vec![0, 1],
        };
        let states = model::hidden_states(model, &batch).unwrap();
        let ctx = model.context(&batch).unwrap();
        for (subs, position_wise) in [
            (vec![SubModule::Ln1, SubModule::Ln2], false),
            (vec![SubModule::Attn], true),
        ] {
            let mut hooks = LinearReplacement::default();
            for block in 0..n_layers {
                for &sub in &subs {
                    let a = Tensor::randn(0f32, 0.2, (d, d), &Device::Cpu).unwrap();
                    hooks.maps.insert((block, sub), a);
                }
            }
            let stacked = runs_from_every_layer(model, &ub, &states, &mut hooks, position_wise).unwrap();
            assert_eq!(stacked.len(), n_layers + 1);
            for (l, rows) in stacked.iter().enumerate() {
                let one = model::run_blocks(model, &states[l], &ctx, l, n_layers, &mut hooks).unwrap();
                let diff = max_abs_diff(&ub.rows(&one).unwrap(), rows);
                assert!(diff < 1e-5, "{subs:?} from layer {l}: rows differ by {diff}");
            }
        }
    }

    /// The schedules' shared prefixes (exact leading blocks, steps shared with the previous
    /// schedule in sorted order) give each schedule the final state of running it from h_0.
    #[test]
    fn shared_schedule_prefixes_give_each_schedules_own_state() {
        let lm = tiny_llama();
        let model = lm.model.as_ref();
        let (d, n) = (model.info().d_model, model.info().n_layers);
        assert!(n >= 2, "the schedules need two blocks");
        let batch = model::Batch::from_sequences(&[vec![5, 9, 2, 7], vec![3, 4]], 0, &Device::Cpu).unwrap();
        let states = model::hidden_states(model, &batch).unwrap();
        let ctx = model.context(&batch).unwrap();
        let pairs: Vec<crate::lens::maps::PairMap> = [(0, 1), (1, 2), (0, 2), (1, n)]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|(l, l2)| crate::lens::maps::PairMap {
                source: l,
                target: l2,
                a: Tensor::randn(0f32, 0.2, (d, d), &Device::Cpu).unwrap(),
                intercept: None,
            })
            .collect();
        let maps = Maps::new(d, pairs);
        let mut schedules: Vec<Vec<Step>> = vec![
            vec![Step::Run(0), Step::Jump(1, n)],
            vec![Step::Jump(0, 1), Step::Jump(1, 2)],
            vec![Step::Jump(0, 2)],
            vec![Step::Jump(0, 1), Step::Jump(1, n)],
            vec![Step::Run(0), Step::Jump(1, 2)],
        ];
        for s in &mut schedules {
            let mut l = match s.last().unwrap() {
                Step::Run(l) => l + 1,
                Step::Jump(_, l2) => *l2,
            };
            while l < n {
                s.push(Step::Run(l));
                l += 1;
            }
        }
        let refs: Vec<&[Step]> = schedules.iter().map(Vec::as_slice).collect();
        let mut got: Vec<Option<Tensor>> = vec![None; schedules.len()];
        schedule_final_states(model, &batch, &states, &maps, &refs, &mut |i, h| {
            assert!(got[i].is_none(), "schedule {i} visited twice");
            got[i] = Some(h.clone());
            Ok(())
        })
        .unwrap();
        for (i, steps) in schedules.iter().enumerate() {
            let mut h = states[0].clone();
            for s in steps {
                h = match s {
                    Step::Run(l) => model.block(*l, &h, &ctx, &mut model::NoHooks).unwrap(),
                    Step::Jump(l, l2) => jump_all_positions(&h, &maps.get(*l, *l2).unwrap().a).unwrap(),
                };
            }
            let diff = max_abs_diff(got[i].as_ref().expect("visited"), &h);
            assert_eq!(diff, 0.0, "schedule {i} ({steps:?})");
        }
    }

    #[test]
    fn periodic_schedules_cover_all_layers() {
        let s = periodic_schedule(6, 2, 1);
        assert_eq!(
            s,
            vec![
                Step::Run(0),
                Step::Run(1),
                Step::Jump(2, 3),
                Step::Run(3),
                Step::Run(4),
                Step::Jump(5, 6)
            ]
        );
        assert_eq!(executed(&s), 4);
    }

    #[test]
    fn schedule_pairs_are_the_periodic_jumps() {
        // L = 6: b = 1 with a = 1, 2, 5 (a + 1 divides 6); b = 2 with a = 1, 4.
        // Jumps: run 1/jump 1: 1->2, 3->4, 5->6; run 2/jump 1: 2->3, 5->6; run 5/jump 1: 5->6;
        // run 1/jump 2: 1->3, 4->6; run 4/jump 2: 4->6.
        assert_eq!(periodic_schedules(6).len(), 5);
        assert_eq!(schedule_pairs(6), vec![(1, 2), (1, 3), (2, 3), (3, 4), (4, 6), (5, 6)]);
    }

    #[test]
    fn r2_informed_picks_the_best_product() {
        // 3 layers; jumps 0->3 poor, 1->3 good.
        let mut r2 = vec![vec![None; 4]; 4];
        r2[0][3] = Some(0.2);
        r2[1][3] = Some(0.9);
        r2[0][2] = Some(0.5);
        r2[2][3] = Some(0.95);
        r2[0][1] = Some(0.3);
        r2[1][2] = Some(0.96);
        let (steps, p) = r2_informed_schedule(&r2, 3, 1).unwrap();
        assert_eq!(executed(&steps), 1);
        // Options with one block: run 0 then 1->3 (0.9); 0->1 jump, run 1, 2->3 (0.3*0.95);
        // 0->2 jump, run 2 (0.5); run 0, 1->2, 2->3 (0.96*0.95 = 0.912).
        assert!((p - 0.912).abs() < 1e-12, "{p}");
        assert_eq!(steps, vec![Step::Run(0), Step::Jump(1, 2), Step::Jump(2, 3)]);
        assert_eq!(r2_informed_schedule(&r2, 3, 3).unwrap().1, 1.0);
    }
}
