//! Benchmarks (not tests): timings of jumplens's hot paths on fixed inputs, for the benchmark
//! script that runs them side by side with the PyTorch / scikit-learn references
//! (`scripts/bench.sh`). Each returns plain numbers; the script prints the table.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::collect::{unit_batches, units_from_activations, Activations};
use crate::model::{self, AttentionKind, Batch, LoadedModel};

/// Deterministic token ids [batch, seq] in the vocabulary's ordinary range (ids 100..vocab/2,
/// away from special tokens), written to `ids_out` so the reference runs the same inputs.
pub fn random_ids(vocab: usize, batch: usize, seq: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..batch)
        .map(|_| (0..seq).map(|_| rng.random_range(100..(vocab / 2) as u32)).collect())
        .collect()
}

/// One timing result.
#[derive(Debug, Serialize)]
pub struct Timing {
    pub what: String,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// Forward throughput with all hidden states returned: median over `iters` runs after one
/// warm-up.
pub fn forward(lm: &LoadedModel, ids: &[Vec<u32>], iters: usize) -> Result<Timing> {
    let batch = Batch::from_sequences(ids, lm.tokenizer().map(|t| t.pad_id).unwrap_or(0), lm.model.device())?;
    let tokens: usize = ids.iter().map(|s| s.len()).sum();
    let mut times = Vec::new();
    for i in 0..=iters {
        let t0 = Instant::now();
        let states = model::hidden_states(lm.model.as_ref(), &batch)?;
        // Make sure the work is done (device backends are asynchronous).
        states.last().expect("h_L").sum_all()?.to_scalar::<f32>()?;
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    Ok(Timing {
        what: "forward, all hidden states".into(),
        tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds,
    })
}

/// Collection of one split's states at the sampled positions (prefix-only, length-grouped
/// batches), timed end to end; returns the timing and the states for checking.
pub fn collect_split(lm: &LoadedModel, act: &Activations, batch_tokens: usize) -> Result<(Timing, Tensor)> {
    let info = lm.model.info();
    let causal = info.attention == AttentionKind::Causal;
    let tok = lm.tokenizer()?;
    let t0 = Instant::now();
    let units = units_from_activations(act, causal, tok.mask_id, usize::MAX)?;
    let tokens: usize = units.iter().map(|u| u.input.len()).sum();
    let mut rows = vec![Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?; act.len()];
    for ub in unit_batches(&units, batch_tokens, tok.pad_id, lm.model.device())? {
        let states = model::hidden_states(lm.model.as_ref(), &ub.batch)?;
        let last = ub.rows(states.last().expect("h_L"))?.to_device(&Device::Cpu)?;
        for (r, &e) in ub.examples.iter().enumerate() {
            rows[e] = last.get(r)?;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let t = Timing {
        what: "collect states at sampled positions".into(),
        tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds,
    };
    Ok((t, Tensor::stack(&rows, 0)?))
}

/// Writes ids as a safetensors file `ids` [B, T] (i64) for the reference script.
pub fn write_ids(path: &Path, ids: &[Vec<u32>]) -> Result<()> {
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<i64> = ids.iter().flatten().map(|&x| x as i64).collect();
    crate::io::write_safetensors(
        path,
        &[("ids".into(), Tensor::from_vec(flat, (b, t), &Device::Cpu)?)],
        None,
    )
}
