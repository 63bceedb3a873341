//! Reading the model's prediction out of intermediate layers (the paper's section 4): every
//! layer's state is cast to the last layer by a lens (`mat`: the fitted map A_{l->L}; `id`: the
//! state itself, i.e. the logit lens; `affine`: A h + b; `tuned`: a tuned lens's h + W_l h + b_l)
//! and read out through the model's own final norm and unembedding. The lens's top-1 token is
//! scored against the full model's output at the same position: Precision@k, surprisal,
//! KL(model || lens) and cross-entropy against the actual token.
//!
//! The model's own distribution is computed once per batch and shared by every lens and layer;
//! everything is tensor arithmetic on the model's device.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde::Serialize;

use crate::data::Activations;
use crate::lens::maps::Maps;
use crate::lens::tuned::TunedLens;
use crate::model::{AttentionKind, Transformer};

mod cpu_cast;

/// How a state of layer l is carried to the last layer.
#[derive(Debug, Clone)]
pub enum Lens<'a> {
    /// h unchanged (the logit lens).
    Identity,
    /// A_{l->L} h (+ b when the maps have intercepts).
    Maps(&'a Maps),
    /// h + W_l h + b_l (a tuned lens, tuned-lens's translators).
    Tuned(&'a TunedLens),
}

impl Lens<'_> {
    /// Casts states `h` [n, d] of layer `layer` to the last layer `last`.
    pub fn cast(&self, layer: usize, last: usize, h: &Tensor) -> Result<Tensor> {
        if layer == last {
            return Ok(h.clone());
        }
        match self {
            Lens::Identity => Ok(h.clone()),
            Lens::Maps(m) => m.require(layer, last)?.apply(h),
            Lens::Tuned(t) => t.cast(layer, h),
        }
    }
}

/// Per-layer metrics of one lens; index = source layer 0..=L.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LensMetrics {
    #[serde(rename = "p@1")]
    pub p_at_1: Vec<f64>,
    #[serde(rename = "p@5")]
    pub p_at_5: Vec<f64>,
    #[serde(rename = "p@10")]
    pub p_at_10: Vec<f64>,
    /// Mean of -ln p_model(lens top-1).
    pub surprisal: Vec<f64>,
    /// 95% confidence interval of the mean surprisal (normal approximation).
    pub surprisal_ci95: Vec<[f64; 2]>,
    /// Mean KL(model || lens) in nats.
    pub kl: Vec<f64>,
    /// Mean cross-entropy of the lens against the actual next token (causal) / the original
    /// masked token (masked LM), in nats.
    pub ce: Vec<f64>,
}

impl LensMetrics {
    /// The first metric that is NaN or infinite, as (metric, layer, value). serde writes such a
    /// number as `null`, so the runners refuse it instead of writing it.
    pub fn first_non_finite(&self) -> Option<(&'static str, usize, f64)> {
        let lo: Vec<f64> = self.surprisal_ci95.iter().map(|c| c[0]).collect();
        let hi: Vec<f64> = self.surprisal_ci95.iter().map(|c| c[1]).collect();
        let found = [
            ("p@1", &self.p_at_1),
            ("p@5", &self.p_at_5),
            ("p@10", &self.p_at_10),
            ("surprisal", &self.surprisal),
            ("surprisal_ci95", &lo),
            ("surprisal_ci95", &hi),
            ("kl", &self.kl),
            ("ce", &self.ce),
        ]
        .into_iter()
        .find_map(|(name, v)| v.iter().position(|x| !x.is_finite()).map(|l| (name, l, v[l])));
        found
    }
}

/// Per-example results the early-exit stage reuses, each [S, N].
pub struct ExampleTrace {
    /// The lens's top-1 token at every layer.
    pub top1: Vec<Vec<u32>>,
    /// p_top1 - p_top2 of the lens distribution.
    pub margin: Vec<Vec<f32>>,
    /// p_top1 of the lens distribution.
    pub max_prob: Vec<Vec<f32>>,
}

/// The result of evaluating several lenses on one validation set.
pub struct Evaluation {
    pub metrics: BTreeMap<String, LensMetrics>,
    pub traces: BTreeMap<String, ExampleTrace>,
    /// The full model's top-1 token per example.
    pub model_top1: Vec<u32>,
    pub n_val: usize,
}

/// Running sums of one (lens, layer) cell.
#[derive(Default, Clone)]
pub(crate) struct Acc {
    n: f64,
    p1: f64,
    p5: f64,
    p10: f64,
    surprisal: f64,
    surprisal_sq: f64,
    kl: f64,
    ce: f64,
    ce_n: f64,
}

/// The token each example's prediction is judged against for cross-entropy: the next token for
/// causal LMs (none at the sentence's end), the original token for masked LMs.
pub fn gold_tokens(val: &Activations, attention: AttentionKind) -> Vec<Option<u32>> {
    (0..val.len())
        .map(|i| {
            let s = val.sentence(i);
            let p = val.positions[i];
            match attention {
                AttentionKind::Causal => s.get(p + 1).copied(),
                AttentionKind::Bidirectional => s.get(p).copied(),
            }
        })
        .collect()
}

/// Evaluates `lenses` (name, lens) at every layer on the validation activations.
pub fn evaluate(
    model: &dyn Transformer,
    val: &Activations,
    lenses: &[(String, Lens)],
    batch: usize,
    progress: bool,
) -> Result<Evaluation> {
    // Casts and scores run where the head is (the last device of a split).
    let device = model.head_device().clone();
    let (s, n, _d) = val.hidden_states.dims3()?;
    let last = s - 1;
    if last != model.info().n_layers {
        bail!(
            "activations have {s} states but the model has {} layers",
            model.info().n_layers
        );
    }
    let gold = gold_tokens(val, model.info().attention);
    check_gold(val, &gold, model.info().vocab_size)?;
    let mut acc = vec![vec![Acc::default(); s]; lenses.len()];
    let mut traces: Vec<ExampleTrace> = lenses
        .iter()
        .map(|_| ExampleTrace {
            top1: vec![vec![0; n]; s],
            margin: vec![vec![0.0; n]; s],
            max_prob: vec![vec![0.0; n]; s],
        })
        .collect();
    let mut model_top1 = vec![0u32; n];
    let bar = crate::progress::bar((n * s * lenses.len()) as u64, "predict", progress);
    let batch = batch.max(1);
    for start in (0..n).step_by(batch) {
        crate::cancel::check()?;
        let rows = batch.min(n - start);
        // This batch's rows of state `layer` on the model's device.
        let states = |layer: usize| -> Result<Tensor> {
            crate::host::view_to_device(&val.hidden_states.get(layer)?.narrow(0, start, rows)?, &device)
        };
        let h_last = states(last)?;
        let reference = Reference::new(model, &h_last, &gold[start..start + rows])?;
        model_top1[start..start + rows].copy_from_slice(&reference.top1);
        for ((_, lens), (lens_acc, tr)) in lenses.iter().zip(acc.iter_mut().zip(traces.iter_mut())) {
            let cast = |layer: usize| -> Result<Tensor> { lens.cast(layer, last, &states(layer)?) };
            let cells = reference
                .score_layers(model, s, &cast)
                .map_err(|e| crate::device::explain_oom(e, &format!("casting {rows} examples"), "lower --batch"))?;
            for (layer, (cell_acc, cell)) in lens_acc.iter_mut().zip(cells).enumerate() {
                cell_acc.add(&cell, &gold[start..start + rows]);
                tr.top1[layer][start..start + rows].copy_from_slice(&cell.top1);
                tr.margin[layer][start..start + rows].copy_from_slice(&cell.margin);
                tr.max_prob[layer][start..start + rows].copy_from_slice(&cell.max_prob);
                bar.inc(rows as u64);
            }
        }
    }
    bar.finish_and_clear();
    let mut metrics = BTreeMap::new();
    let mut trace_map = BTreeMap::new();
    for ((name, _), (cells, trace)) in lenses.iter().zip(acc.into_iter().zip(traces)) {
        let mut m = LensMetrics::default();
        for a in cells {
            a.push_to(&mut m);
        }
        metrics.insert(name.clone(), m);
        trace_map.insert(name.clone(), trace);
    }
    Ok(Evaluation {
        metrics,
        traces: trace_map,
        model_top1,
        n_val: n,
    })
}

/// Refuses gold tokens the model's vocabulary cannot score (activations collected with another
/// tokenizer, or a damaged file): they would index past the logits.
pub(crate) fn check_gold(val: &Activations, gold: &[Option<u32>], vocab: usize) -> Result<()> {
    if let Some((i, g)) = gold
        .iter()
        .enumerate()
        .find_map(|(i, g)| g.filter(|&g| g as usize >= vocab).map(|g| (i, g)))
    {
        bail!(
            "{}: token id {g} of example {i} is outside the model's vocabulary ({vocab} tokens); \
             were these activations collected with another model?",
            val.path.display()
        );
    }
    Ok(())
}

impl Acc {
    pub(crate) fn add(&mut self, cell: &Cell, gold: &[Option<u32>]) {
        self.n += cell.rank.len() as f64;
        for (r, g) in gold.iter().enumerate().take(cell.rank.len()) {
            self.p1 += f64::from(cell.rank[r] < 1);
            self.p5 += f64::from(cell.rank[r] < 5);
            self.p10 += f64::from(cell.rank[r] < 10);
            let sp = cell.surprisal[r] as f64;
            self.surprisal += sp;
            self.surprisal_sq += sp * sp;
            self.kl += cell.kl[r] as f64;
            if g.is_some() {
                self.ce += cell.ce[r] as f64;
                self.ce_n += 1.0;
            }
        }
    }

    /// Appends this cell's means to `m` (one more layer).
    pub(crate) fn push_to(&self, m: &mut LensMetrics) {
        let mean = self.surprisal / self.n;
        let var = (self.surprisal_sq / self.n - mean * mean).max(0.0) * self.n / (self.n - 1.0).max(1.0);
        let half = 1.96 * (var / self.n).sqrt();
        m.p_at_1.push(self.p1 / self.n);
        m.p_at_5.push(self.p5 / self.n);
        m.p_at_10.push(self.p10 / self.n);
        m.surprisal.push(mean);
        m.surprisal_ci95.push([mean - half, mean + half]);
        m.kl.push(self.kl / self.n);
        m.ce.push(if self.ce_n > 0.0 { self.ce / self.ce_n } else { f64::NAN });
    }
}

/// The full model's distribution at a batch of examples, against which lenses are scored.
pub(crate) struct Reference {
    logits: Tensor,
    logp: Tensor,
    p: Tensor,
    gold: Tensor,
    gold_mask: Tensor,
    /// The model's top-1 token per row.
    pub top1: Vec<u32>,
    /// On the CPU the scores are computed in two fused passes per row instead of a dozen
    /// tensor ops over the vocabulary (see [`score_rows`]).
    cpu: Option<CpuReference>,
}

/// The model's distribution as plain rows, for the fused CPU scorer.
struct CpuReference {
    vocab: usize,
    logits: Vec<f32>,
    logp: Vec<f32>,
    p: Vec<f32>,
    /// sum_j p_j ln p_j per row.
    neg_entropy: Vec<f64>,
    gold: Vec<Option<u32>>,
}

impl CpuReference {
    /// From the model's logits [rows, V], their log-softmax and softmax, and the rows' gold tokens.
    fn new(logits: &Tensor, logp: &Tensor, p: &Tensor, gold: &[Option<u32>]) -> Result<Self> {
        let vocab = logits.dim(D::Minus1)?;
        let p_rows: Vec<f32> = p.flatten_all()?.to_vec1()?;
        let logp_rows: Vec<f32> = logp.flatten_all()?.to_vec1()?;
        let neg_entropy = p_rows
            .chunks(vocab)
            .zip(logp_rows.chunks(vocab))
            .map(|(p, lp)| {
                p.iter()
                    .zip(lp)
                    .map(|(&a, &b)| if a > 0.0 { a as f64 * b as f64 } else { 0.0 })
                    .sum()
            })
            .collect();
        Ok(Self {
            vocab,
            logits: logits.flatten_all()?.to_vec1()?,
            logp: logp_rows,
            p: p_rows,
            neg_entropy,
            gold: gold.to_vec(),
        })
    }
}

impl Reference {
    /// From final states h_L [rows, d] and the rows' gold tokens.
    pub(crate) fn new(model: &dyn Transformer, h_last: &Tensor, gold: &[Option<u32>]) -> Result<Self> {
        let logits = model.readout(h_last)?;
        // Where the logits are (the head's device of a split model).
        let device = &logits.device().clone();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let p = logp.exp()?;
        let top1 = logits.argmax_keepdim(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
        let rows = gold.len();
        let gold_ids: Vec<u32> = gold.iter().map(|g| g.unwrap_or(0)).collect();
        let mask: Vec<f32> = gold.iter().map(|g| f32::from(g.is_some() as u8)).collect();
        let cpu = match device.is_cpu() {
            true => Some(CpuReference::new(&logits, &logp, &p, gold)?),
            false => None,
        };
        Ok(Self {
            logits,
            logp,
            p,
            gold: Tensor::from_vec(gold_ids, (rows, 1), device)?,
            gold_mask: Tensor::from_vec(mask, rows, device)?,
            top1,
            cpu,
        })
    }

    /// Scores a lens's logits [rows, V] against the model.
    pub(crate) fn score(&self, logits: &Tensor) -> Result<Cell> {
        match &self.cpu {
            Some(c) => Ok(score_rows(&logits.flatten_all()?.to_vec1::<f32>()?, c)),
            None => score(logits, &self.logits, &self.logp, &self.p, &self.gold, &self.gold_mask),
        }
    }

    /// Scores a lens's casts of every layer 0..states (`cast(l)`: the states of layer l carried
    /// to the last layer, before the final norm) read out through the model; the last layer's
    /// casts are the model's own states, whose logits the reference holds. On the CPU with a plain
    /// f32 unembedding the logits are never formed: every layer's final-normed casts are
    /// multiplied by each vocabulary chunk of the unembedding while it is in cache and scored
    /// there ([`cpu_cast::score_casts`]); elsewhere one layer at a time is read out and scored.
    pub(crate) fn score_layers(
        &self,
        model: &dyn Transformer,
        states: usize,
        cast: &dyn Fn(usize) -> Result<Tensor>,
    ) -> Result<Vec<Cell>> {
        let last = states - 1;
        if let Some(c) = &self.cpu {
            let head = model.unembedding_matrix().filter(|w| {
                w.device().is_cpu() && w.dtype() == DType::F32 && w.dims2().is_ok_and(|(v, _)| v == c.vocab)
            });
            if let Some(w) = head {
                let d = w.dims2()?.1;
                let normed = (0..last)
                    .map(|l| Ok(model.final_norm(&cast(l)?)?.to_dtype(DType::F32)?.contiguous()?))
                    .collect::<Result<Vec<_>>>()?;
                if normed
                    .iter()
                    .all(|u| u.dims2().is_ok_and(|(rows, du)| rows == c.gold.len() && du == d))
                {
                    let mut cells = if normed.is_empty() {
                        Vec::new()
                    } else {
                        let u = Tensor::cat(&normed, 0)?;
                        crate::host::with_f32_slice(&u, |u| {
                            crate::host::with_f32_slice(w, |w| Ok(cpu_cast::score_casts(u, last, w, d, c)))
                        })?
                    };
                    cells.push(cpu_cast::score_logits(&c.logits, c));
                    return Ok(cells);
                }
            }
        }
        (0..states)
            .map(|l| match (&self.cpu, l == last) {
                (Some(c), true) => Ok(cpu_cast::score_logits(&c.logits, c)),
                _ => self.score(&model.readout(&cast(l)?)?),
            })
            .collect()
    }
}

/// The same scores as [`score`], by the CPU kernel's chunked reduction ([`cpu_cast`]).
fn score_rows(z: &[f32], r: &CpuReference) -> Cell {
    cpu_cast::score_logits(z, r)
}

/// Per-row scores of one lens at one layer.
pub(crate) struct Cell {
    /// Rank of the lens's top-1 token under the model (0 = the model's top-1).
    rank: Vec<u32>,
    surprisal: Vec<f32>,
    kl: Vec<f32>,
    ce: Vec<f32>,
    top1: Vec<u32>,
    margin: Vec<f32>,
    max_prob: Vec<f32>,
}

fn score(
    logits: &Tensor,
    model_logits: &Tensor,
    model_logp: &Tensor,
    model_p: &Tensor,
    gold: &Tensor,
    gold_mask: &Tensor,
) -> Result<Cell> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let top1 = logits.argmax_keepdim(D::Minus1)?;
    // Rank = how many tokens the model scores strictly higher than the lens's choice.
    let chosen = model_logits.gather(&top1, D::Minus1)?;
    let rank = model_logits
        .broadcast_gt(&chosen)?
        .to_dtype(DType::U32)?
        .sum(D::Minus1)?;
    let surprisal = model_logp.gather(&top1, D::Minus1)?.neg()?.squeeze(1)?;
    let kl = (model_p * (model_logp - &logp)?)?.sum(D::Minus1)?;
    let ce = (logp.gather(gold, D::Minus1)?.neg()?.squeeze(1)? * gold_mask)?;
    // Second-best probability: mask out the top-1 and take the max again.
    let p = logp.exp()?;
    let p1 = p.max_keepdim(D::Minus1)?;
    let vocab = logits.dim(D::Minus1)?;
    let ids = Tensor::arange(0u32, vocab as u32, logits.device())?.unsqueeze(0)?;
    let is_top = ids.broadcast_eq(&top1)?;
    let p2 = is_top
        .where_cond(&Tensor::zeros_like(&p)?, &p)?
        .max_keepdim(D::Minus1)?;
    let margin = (&p1 - p2)?.squeeze(1)?;
    Ok(Cell {
        rank: rank.to_vec1()?,
        surprisal: surprisal.to_vec1()?,
        kl: kl.to_vec1()?,
        ce: ce.to_vec1()?,
        top1: top1.squeeze(1)?.to_vec1()?,
        margin: margin.to_vec1()?,
        max_prob: p1.squeeze(1)?.to_vec1()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused CPU scorer agrees with the tensor-op scorer used on GPUs.
    #[test]
    fn fused_cpu_scores_equal_tensor_scores() {
        let dev = Device::Cpu;
        let (rows, v) = (6, 300);
        let model_logits = (Tensor::randn(0f32, 3.0, (rows, v), &dev).unwrap())
            .contiguous()
            .unwrap();
        let lens_logits = (Tensor::randn(0f32, 3.0, (rows, v), &dev).unwrap() + &model_logits).unwrap();
        let logp = candle_nn::ops::log_softmax(&model_logits, D::Minus1).unwrap();
        let p = logp.exp().unwrap();
        let gold: Vec<Option<u32>> = vec![Some(3), None, Some(299), Some(0), Some(17), None];
        let gold_ids: Vec<u32> = gold.iter().map(|g| g.unwrap_or(0)).collect();
        let mask: Vec<f32> = gold.iter().map(|g| f32::from(g.is_some() as u8)).collect();
        let gold_t = Tensor::from_vec(gold_ids, (rows, 1), &dev).unwrap();
        let mask_t = Tensor::from_vec(mask, rows, &dev).unwrap();
        let slow = score(&lens_logits, &model_logits, &logp, &p, &gold_t, &mask_t).unwrap();
        let r = CpuReference::new(&model_logits, &logp, &p, &gold).unwrap();
        let fast = score_rows(&lens_logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &r);
        assert_eq!(fast.rank, slow.rank);
        assert_eq!(fast.top1, slow.top1);
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what}: {x} vs {y}");
            }
        };
        close(&fast.surprisal, &slow.surprisal, "surprisal");
        close(&fast.kl, &slow.kl, "kl");
        close(&fast.ce, &slow.ce, "ce");
        close(&fast.margin, &slow.margin, "margin");
        close(&fast.max_prob, &slow.max_prob, "max_prob");
        assert!(
            fast.rank.iter().any(|&r| r > 0),
            "the test should include disagreements"
        );
    }
}
