//! Early exit with linear shortcuts (the paper's section 6): at every layer l >= 1 the state is
//! cast to the last layer, and the example stops as soon as the cast prediction is confident.
//!
//! Confidences of every layer are computed once (by `predict`); every threshold of the sweep is
//! then derived from them without touching the model again. `simulate_one` is the literal
//! per-example rule, used by the tests to check the vectorised sweep.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use crate::data::run::ModelRecord;
use crate::data::Activations;
use crate::eval::predict::Lens;
use serde::{Deserialize, Serialize};

/// How confident a cast prediction is (CALM's measures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Measure {
    /// p_top1 - p_top2 of the cast distribution (the paper's "softmax response").
    Top1Top2,
    /// p_top1 of the cast distribution.
    MaxProb,
    /// Cosine similarity of the cast state with the previous layer's cast state.
    Cosine,
}

/// The threshold rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// The paper's code: 0.9 lambda + 0.1 exp(-4 t / N), not clipped.
    Paper,
    /// CALM: lambda (0.9 + 0.1 exp(-4 t / N)), clipped to [0, 1].
    Calm,
}

impl Rule {
    /// Threshold for an example at token position t (0-based), N = mean (position + 1).
    pub fn threshold(self, lambda: f64, t: f64, mean_len: f64) -> f64 {
        let decay = (-4.0 * t / mean_len).exp();
        match self {
            Rule::Paper => 0.9 * lambda + 0.1 * decay,
            Rule::Calm => (lambda * (0.9 + 0.1 * decay)).clamp(0.0, 1.0),
        }
    }
}

/// The paper's lambda grid (and, for `id`, its extra points just above 1).
pub fn paper_grid(for_id: bool) -> Vec<f64> {
    let mut g = vec![-1.112];
    g.extend((0..=10).map(|i| i as f64 / 10.0));
    if for_id {
        g.extend((1..=9).map(|i| 1.0 + 0.0112 * i as f64));
    }
    g.push(1.112);
    g
}

/// A finer grid: 0..1 in steps of 0.01, then 1..1.112 in steps of 0.004, plus -1.112.
pub fn fine_grid() -> Vec<f64> {
    let mut g = vec![-1.112];
    g.extend((0..=100).map(|i| i as f64 / 100.0));
    g.extend((1..=28).map(|i| 1.0 + 0.004 * i as f64));
    g
}

/// Per-example inputs of the sweep for one lens.
pub struct ExitInputs<'a> {
    /// Confidence [S][N] at every layer (row 0 is never used: no exit at layer 0).
    pub confidence: &'a [Vec<f32>],
    /// Cast top-1 [S][N].
    pub top1: &'a [Vec<u32>],
    /// Full model top-1 [N].
    pub model_top1: &'a [u32],
    /// Token position t used in the threshold [N] (masked LMs: 3 for every example).
    pub t: &'a [f64],
    /// N in the threshold: mean of (position + 1) over the evaluated examples.
    pub mean_len: f64,
}

/// One point of a sweep.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct CurvePoint {
    pub lambda: f64,
    pub mean_layers: f64,
    #[serde(rename = "p@1")]
    pub p_at_1: f64,
}

/// The layer (blocks run) at which example `i` exits, and its prediction, stepping through
/// layers one at a time exactly as the rule says.
pub fn simulate_one(x: &ExitInputs, rule: Rule, lambda: f64, i: usize) -> (usize, u32) {
    let last = x.confidence.len() - 1;
    let thr = rule.threshold(lambda, x.t[i], x.mean_len);
    for l in 1..last {
        if x.confidence[l][i] as f64 > thr {
            return (l, x.top1[l][i]);
        }
    }
    (last, x.model_top1[i])
}

/// Mean blocks run and Precision@1 for every lambda.
pub fn sweep(x: &ExitInputs, rule: Rule, lambdas: &[f64]) -> Vec<CurvePoint> {
    let n = x.model_top1.len();
    let last = x.confidence.len() - 1;
    // The exit layer only depends on the largest confidence seen so far, so the first layer
    // where the running maximum passes the threshold is the exit: precompute running maxima.
    let mut running = vec![vec![f32::NEG_INFINITY; n]; last + 1];
    for l in 1..last {
        let (done, rest) = running.split_at_mut(l);
        for ((r, &prev), &c) in rest[0].iter_mut().zip(&done[l - 1]).zip(&x.confidence[l]) {
            *r = prev.max(c);
        }
    }
    lambdas
        .iter()
        .map(|&lambda| {
            let (mut layers, mut hits) = (0usize, 0usize);
            for i in 0..n {
                let thr = rule.threshold(lambda, x.t[i], x.mean_len);
                // First l in 1..last with running max > thr (monotone: binary search).
                let exit = first_exceeding(&running, i, thr, last);
                let pred = if exit < last { x.top1[exit][i] } else { x.model_top1[i] };
                layers += exit;
                hits += usize::from(pred == x.model_top1[i]);
            }
            CurvePoint {
                lambda,
                mean_layers: layers as f64 / n as f64,
                p_at_1: hits as f64 / n as f64,
            }
        })
        .collect()
}

fn first_exceeding(running: &[Vec<f32>], i: usize, thr: f64, last: usize) -> usize {
    let (mut lo, mut hi) = (1, last);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if running[mid][i] as f64 > thr {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// Precision@1 when every example exits at the same layer l (l = 0..=L).
pub fn fixed_exit(top1: &[Vec<u32>], model_top1: &[u32]) -> Vec<f64> {
    top1.iter()
        .enumerate()
        .map(|(l, row)| {
            if l == top1.len() - 1 {
                return 1.0;
            }
            row.iter().zip(model_top1).filter(|(a, b)| a == b).count() as f64 / model_top1.len() as f64
        })
        .collect()
}

/// Fewest mean layers reaching Precision@1 `target`, interpolated linearly between sweep points
/// (sorted by mean layers); None when no point reaches it.
pub fn layers_at_precision(curve: &[CurvePoint], target: f64) -> Option<f64> {
    let mut pts: Vec<(f64, f64)> = curve.iter().map(|p| (p.mean_layers, p.p_at_1)).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    if pts.first().is_some_and(|p| p.1 >= target) {
        return Some(pts[0].0);
    }
    for w in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if y0 < target && y1 >= target {
            return Some(x0 + (target - y0) / (y1 - y0) * (x1 - x0));
        }
    }
    None
}

/// Cost model per token, in FLOPs (multiply-adds x 2).
#[derive(Debug, Clone, Serialize)]
pub struct Flops {
    /// One block (weights plus attention over the mean context).
    pub per_block: f64,
    /// One cast: d x d map (mat only) + final norm + full-vocabulary unembedding.
    pub per_cast: f64,
    /// The full model: L blocks.
    pub full_model: f64,
}

/// Mean FLOPs per example of an early-exit policy, counting every cast tried on the way.
pub fn policy_flops(f: &Flops, mean_layers: f64, mean_casts: f64) -> f64 {
    mean_layers * f.per_block + mean_casts * f.per_cast
}

/// Mean number of casts tried for a lambda: one per layer 1..=exit (none after the last layer).
pub fn mean_casts(x: &ExitInputs, rule: Rule, lambda: f64) -> f64 {
    let last = x.confidence.len() - 1;
    let n = x.model_top1.len();
    (0..n)
        .map(|i| {
            let (exit, _) = simulate_one(x, rule, lambda, i);
            exit.min(last - 1) as f64
        })
        .sum::<f64>()
        / n as f64
}

/// Everything `jumplens early-exit` writes.
#[derive(Debug, Serialize)]
pub struct EarlyExitReport {
    pub rule: Rule,
    pub measure: Measure,
    pub layers: usize,
    pub curves: BTreeMap<String, Vec<CurvePoint>>,
    pub fixed: BTreeMap<String, Vec<f64>>,
    pub saved_at: BTreeMap<String, BTreeMap<String, Option<f64>>>,
    pub flops: serde_json::Value,
}

/// Checks that the inputs have matching shapes.
pub fn check_inputs(x: &ExitInputs) -> Result<()> {
    let n = x.model_top1.len();
    if x.confidence.len() < 2 || x.confidence.len() != x.top1.len() {
        bail!("early exit needs at least two states per example");
    }
    if x.confidence.iter().any(|r| r.len() != n) || x.top1.iter().any(|r| r.len() != n) || x.t.len() != n {
        bail!("early-exit inputs have inconsistent example counts");
    }
    if n == 0 {
        bail!("no validation examples");
    }
    Ok(())
}

/// Options of `jumplens early-exit`.
#[derive(Debug, Clone)]
pub struct EarlyExitOptions {
    pub rule: Rule,
    pub measure: Measure,
    pub targets: Vec<f64>,
}

impl Default for EarlyExitOptions {
    fn default() -> Self {
        Self {
            rule: Rule::Paper,
            measure: Measure::Top1Top2,
            targets: vec![0.90, 0.95, 0.99],
        }
    }
}

/// Cosine similarity of consecutive cast states, [S][N] (row 0 = 0).
pub fn cosine_confidence(val: &Activations, lens: &Lens) -> Result<Vec<Vec<f32>>> {
    let (s, n, _) = val.hidden_states.dims3()?;
    let last = s - 1;
    let mut out = vec![vec![0f32; n]; s];
    let mut prev = lens.cast(0, last, &val.hidden_states.get(0)?)?;
    for (l, row) in out.iter_mut().enumerate().skip(1) {
        let cur = lens.cast(l, last, &val.hidden_states.get(l)?)?;
        let dot = (&cur * &prev)?.sum(1)?;
        let norms = (cur.sqr()?.sum(1)?.sqrt()? * prev.sqr()?.sum(1)?.sqrt()?)?;
        *row = (dot / norms)?.to_vec1()?;
        prev = cur;
    }
    Ok(out)
}

/// One lens's per-example traces, each [S][N]: its top-1 token and its confidence (the
/// measure the rule thresholds) at every layer.
pub struct LensTrace {
    pub top1: Vec<Vec<u32>>,
    pub confidence: Vec<Vec<f32>>,
}

/// The early-exit analysis of `lenses` (in order, e.g. `mat` then `id`) against the model's
/// own top-1 tokens: the lambda sweep, fixed exits, layers saved at the target precisions, and
/// the FLOPs of the lambda that reaches Precision@1 0.95. `positions` are the examples' token
/// positions (t of the paper's rule for causal LMs; BERT uses t = 3, `masked`).
pub fn analyse(
    lenses: &[(&str, LensTrace)],
    model_top1: &[u32],
    positions: &[usize],
    masked: bool,
    n_layers: usize,
    flops: &ModelFlops,
    opts: &EarlyExitOptions,
) -> Result<EarlyExitReport> {
    // The paper fixes t = 3 for BERT; for causal LMs t is the token's position.
    let t: Vec<f64> = positions.iter().map(|&p| if masked { 3.0 } else { p as f64 }).collect();
    let mean_len = positions.iter().map(|&p| p as f64 + 1.0).sum::<f64>() / positions.len().max(1) as f64;
    let mut report = EarlyExitReport {
        rule: opts.rule,
        measure: opts.measure,
        layers: n_layers,
        curves: BTreeMap::new(),
        fixed: BTreeMap::new(),
        saved_at: BTreeMap::new(),
        flops: serde_json::Value::Null,
    };
    let mut flops_rows = serde_json::Map::new();
    for (lens_name, trace) in lenses {
        let lens_name = *lens_name;
        let top1 = &trace.top1;
        let x = ExitInputs {
            confidence: &trace.confidence,
            top1,
            model_top1,
            t: &t,
            mean_len,
        };
        check_inputs(&x)?;
        let mut grid = paper_grid(lens_name == "id");
        grid.extend(fine_grid());
        grid.sort_by(f64::total_cmp);
        grid.dedup();
        let curve = sweep(&x, opts.rule, &grid);
        let mut saved = BTreeMap::new();
        for &target in &opts.targets {
            let layers = layers_at_precision(&curve, target);
            saved.insert(format!("{target:.2}"), layers.map(|m| 1.0 - m / n_layers as f64));
        }
        // Cost of the lambda that reaches 95% (or the nearest above it), casts included.
        let at95 = curve
            .iter()
            .filter(|p| p.p_at_1 >= 0.95)
            .min_by(|a, b| a.mean_layers.total_cmp(&b.mean_layers));
        if let Some(p) = at95 {
            let casts = mean_casts(&x, opts.rule, p.lambda);
            // Every lens but the identity applies one d x d map per cast (mat, affine, tuned, mat+kl).
            let per_cast = flops.per_cast + if lens_name == "id" { 0.0 } else { flops.per_map };
            let spent = p.mean_layers * flops.per_block + casts * per_cast;
            flops_rows.insert(
                lens_name.to_string(),
                serde_json::json!({
                    "lambda": p.lambda, "p@1": p.p_at_1, "mean_layers": p.mean_layers, "mean_casts": casts,
                    "flops_per_example": spent, "flops_full_model": flops.per_block * n_layers as f64,
                    "net_saving": 1.0 - spent / (flops.per_block * n_layers as f64),
                }),
            );
        }
        report.fixed.insert(lens_name.into(), fixed_exit(top1, model_top1));
        report.curves.insert(lens_name.into(), curve);
        for (target, v) in saved {
            report.saved_at.entry(target).or_default().insert(lens_name.into(), v);
        }
    }
    for row in report.saved_at.values_mut() {
        if let (Some(Some(m)), Some(Some(i))) = (row.get("mat").copied(), row.get("id").copied()) {
            row.insert("difference".into(), Some(m - i));
        }
    }
    report.flops = serde_json::json!({
        "per_block": flops.per_block, "per_cast_readout": flops.per_cast, "per_map": flops.per_map,
        "note": "per example; the cast at every layer tried is counted (map + final norm + unembedding)",
        "at_p@1_0.95": flops_rows,
    });
    Ok(report)
}

/// FLOP counts derived from the model's shape (per token, multiply-add = 2 FLOPs).
pub struct ModelFlops {
    pub per_block: f64,
    pub per_cast: f64,
    pub per_map: f64,
}

impl ModelFlops {
    /// From the run's model record.
    pub fn of(model: &ModelRecord) -> Self {
        let d = model.d_model as f64;
        let v = model.vocab_size as f64;
        // Weights (2 FLOPs per parameter) plus attention scores and mixing over a ~24-token context.
        let per_block = 2.0 * model.block_params as f64 / model.n_layers.max(1) as f64 + 4.0 * 24.0 * d;
        ModelFlops {
            per_block,
            per_cast: 2.0 * d * v + 5.0 * d,
            per_map: 2.0 * d * d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn sweep_equals_step_by_step_simulation() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (s, n) = (9, 400);
        let conf: Vec<Vec<f32>> = (0..s).map(|_| (0..n).map(|_| rng.random::<f32>()).collect()).collect();
        let top1: Vec<Vec<u32>> = (0..s)
            .map(|_| (0..n).map(|_| rng.random_range(0..4)).collect())
            .collect();
        let model: Vec<u32> = (0..n).map(|_| rng.random_range(0..4)).collect();
        let t: Vec<f64> = (0..n).map(|_| rng.random_range(0..20) as f64).collect();
        let mean_len = t.iter().map(|x| x + 1.0).sum::<f64>() / n as f64;
        let x = ExitInputs {
            confidence: &conf,
            top1: &top1,
            model_top1: &model,
            t: &t,
            mean_len,
        };
        for rule in [Rule::Paper, Rule::Calm] {
            let grid = fine_grid();
            let curve = sweep(&x, rule, &grid);
            for (p, &lambda) in curve.iter().zip(&grid) {
                let (mut layers, mut hits) = (0, 0);
                for (i, &m) in model.iter().enumerate() {
                    let (l, pred) = simulate_one(&x, rule, lambda, i);
                    layers += l;
                    hits += usize::from(pred == m);
                }
                assert_eq!(p.mean_layers, layers as f64 / n as f64);
                assert_eq!(p.p_at_1, hits as f64 / n as f64);
            }
            // The grid's ends: -1.112 exits everyone at layer 1, 1.112 nobody.
            assert_eq!(curve[0].mean_layers, 1.0);
            assert_eq!(curve.last().unwrap().mean_layers, (s - 1) as f64);
            assert_eq!(curve.last().unwrap().p_at_1, 1.0);
        }
    }

    #[test]
    fn interpolates_layers_at_target() {
        let c = [
            CurvePoint {
                lambda: 0.0,
                mean_layers: 2.0,
                p_at_1: 0.5,
            },
            CurvePoint {
                lambda: 0.5,
                mean_layers: 6.0,
                p_at_1: 0.9,
            },
            CurvePoint {
                lambda: 1.0,
                mean_layers: 10.0,
                p_at_1: 1.0,
            },
        ];
        assert!((layers_at_precision(&c, 0.95).unwrap() - 8.0).abs() < 1e-12);
        assert!((layers_at_precision(&c, 0.7).unwrap() - 4.0).abs() < 1e-12);
        assert_eq!(layers_at_precision(&c, 0.4), Some(2.0));
    }
}
