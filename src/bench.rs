//! Benchmarks (not tests): timings of jumplens's hot paths on fixed inputs, for the benchmark
//! script that runs them side by side with the PyTorch / scikit-learn references
//! (`scripts/bench.sh`). Each returns plain numbers; the script prints the table.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::collect::{unit_batches, units_from_activations};
use crate::data::Activations;
use crate::model::{self, AttentionKind, Batch, LoadedModel};

/// Deterministic token ids [batch, seq] in the vocabulary's ordinary range (ids 100..vocab/2,
/// away from special tokens), written to `ids_out` so the reference runs the same inputs.
/// An error when that range is empty (a vocabulary of 200 or fewer) or there is nothing to make.
pub fn random_ids(vocab: usize, batch: usize, seq: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if vocab <= 200 {
        bail!("bench forward draws token ids from 100..vocabulary/2, which needs a vocabulary above 200 (this one has {vocab})");
    }
    if batch == 0 || seq == 0 {
        bail!("bench forward needs a batch and a sequence length of at least 1 (got {batch} x {seq})");
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Ok((0..batch)
        .map(|_| (0..seq).map(|_| rng.random_range(100..(vocab / 2) as u32)).collect())
        .collect())
}

/// One timing result.
#[derive(Debug, Serialize)]
pub struct Timing {
    pub what: String,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// `bench forward --profile`: where the time goes (see [`forward_profile`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<ProfilePart>>,
}

/// Forward throughput with all hidden states returned: median over `iters` runs after one
/// warm-up.
pub fn forward(lm: &LoadedModel, ids: &[Vec<u32>], iters: usize) -> Result<Timing> {
    if iters == 0 {
        bail!("bench forward needs --iters of at least 1");
    }
    let batch = Batch::from_sequences(ids, lm.tokenizer().map(|t| t.pad_id).unwrap_or(0), lm.model.device())?;
    let tokens: usize = ids.iter().map(|s| s.len()).sum();
    let mut times = Vec::new();
    for i in 0..=iters {
        let t0 = Instant::now();
        let states = model::hidden_states(lm.model.as_ref(), &batch)?;
        // Make sure the work is done (device backends are asynchronous). A synchronisation, not a
        // reduction: candle's sum over all elements of a bf16 state took 1.7 ms on the H200, 5% of
        // the forward it was meant to wait for.
        lm.model.device().synchronize()?;
        drop(states);
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
        profile: None,
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
        profile: None,
    };
    Ok((t, Tensor::stack(&rows, 0)?))
}

/// Writes the hidden states of one forward on `ids` as `hidden_states` [L + 1, B, T, d] (f32) for
/// comparing with a reference's states on the same ids.
pub fn write_states(lm: &LoadedModel, ids: &[Vec<u32>], path: &Path) -> Result<()> {
    let batch = Batch::from_sequences(ids, lm.tokenizer().map(|t| t.pad_id).unwrap_or(0), lm.model.device())?;
    let states = model::hidden_states(lm.model.as_ref(), &batch)?;
    let states: Vec<Tensor> = states
        .into_iter()
        .map(|h| {
            crate::model::layers::f32(h)?
                .to_device(&Device::Cpu)
                .map_err(Into::into)
        })
        .collect::<Result<_>>()?;
    crate::data::io::write_safetensors(path, &[("hidden_states".into(), Tensor::stack(&states, 0)?)], None)
}

/// Writes ids as a safetensors file `ids` [B, T] (i64) for the reference script.
pub fn write_ids(path: &Path, ids: &[Vec<u32>]) -> Result<()> {
    let (b, t) = (ids.len(), ids.first().map_or(0, Vec::len));
    let flat: Vec<i64> = ids.iter().flatten().map(|&x| x as i64).collect();
    crate::data::io::write_safetensors(
        path,
        &[("ids".into(), Tensor::from_vec(flat, (b, t), &Device::Cpu)?)],
        None,
    )
}

/// Timing of one all-pairs fit.
#[derive(Debug, Serialize)]
pub struct FitTiming {
    pub what: String,
    pub states: usize,
    pub n: usize,
    pub d: usize,
    pub pairs: usize,
    /// Wall time of the whole fit (maps left on the device).
    pub seconds: f64,
    pub seconds_gram: f64,
    pub seconds_factor: f64,
    pub seconds_products: f64,
    /// Examples per chunk of the Gram accumulation.
    pub chunk_rows: usize,
    /// Model flops (see [`crate::lens::fit::FitStats::model_flops`]) per second, in TFLOP/s.
    pub tflops: f64,
    /// Mean training r^2 of the jumps to the last state (a sanity check that the maps fit).
    pub train_r2_to_last: f64,
    /// Source layers solved by the minimum-norm (eigendecomposition) path.
    pub layers_pseudo_inverse: usize,
    /// Largest condition number of an unscaled Gram block (scikit-learn's cutoff is 1e12).
    pub max_cond_unscaled: f64,
}

/// All-pairs fit on synthetic states made on `device`, after a small warm-up fit (library
/// loading and kernel compilation stay out of the timing).
pub fn fit_synthetic(
    device: &Device,
    n_states: usize,
    n: usize,
    d: usize,
    pairs: &[(usize, usize)],
    chunk_rows: usize,
) -> Result<FitTiming> {
    let opts = crate::lens::fit::FitOptions {
        chunk_rows,
        ..Default::default()
    };
    let warm = crate::lens::fit::synthetic::synthetic_states_on(device, 3, 512, d.min(64), 1)?;
    crate::lens::fit::fit_all_pairs(&warm, &crate::lens::fit::pairs_all(3), &opts)?;
    let h = crate::lens::fit::synthetic::synthetic_states_on(device, n_states, n, d, 0)?;
    device.synchronize()?;
    let t0 = Instant::now();
    let (maps, report) = crate::lens::fit::fit_all_pairs(&h, pairs, &opts)?;
    device.synchronize()?;
    let seconds = t0.elapsed().as_secs_f64();
    // Training r^2 of l -> last on the first 4,096 examples.
    let sub = h.narrow(1, 0, n.min(4096))?;
    let last = crate::lens::fit::pairs_to_final(n_states);
    let few = crate::lens::maps::Maps {
        pairs: maps
            .pairs
            .iter()
            .filter(|p| last.contains(&(p.source, p.target)))
            .cloned()
            .collect(),
        ..maps.clone()
    };
    let r2 = crate::lens::r2::r2_all_pairs(&sub, &few)?;
    let vals: Vec<f64> = (0..n_states - 1).filter_map(|l| r2.mat[l][n_states - 1]).collect();
    Ok(FitTiming {
        what: format!(
            "{} fit on {}",
            if pairs.len() == n_states - 1 {
                "to-final"
            } else {
                "all-pairs"
            },
            if device.is_cpu() { "cpu" } else { "gpu" }
        ),
        states: n_states,
        n,
        d,
        pairs: pairs.len(),
        seconds,
        seconds_gram: report.stats.seconds_gram,
        seconds_factor: report.stats.seconds_factor,
        seconds_products: report.stats.seconds_products,
        chunk_rows: report.stats.chunk_rows,
        tflops: report.stats.model_flops / seconds / 1e12,
        train_r2_to_last: vals.iter().sum::<f64>() / vals.len() as f64,
        layers_pseudo_inverse: report.layers.iter().filter(|l| l.pseudo_inverse).count(),
        max_cond_unscaled: report.layers.iter().map(|l| l.cond_unscaled).fold(0.0, f64::max),
    })
}

/// Where the time of one forward pass goes: seconds from each tap to the next, summed over the
/// blocks under the tap's suffix (`ln1.hook_normalized` = the first norm, `attn.hook_pattern` =
/// q/k/v projections, RoPE and the softmax, `hook_attn_out` = probabilities x values and the
/// output projection, ...). The device is synchronised at every tap, so the parts add up to a
/// forward slower than the unprofiled one (no overlap of host and device work); the shares are
/// what to look at.
#[derive(Debug, Serialize)]
pub struct ProfilePart {
    pub tap: String,
    pub seconds: f64,
    pub share: f64,
}

struct TapTimer {
    device: Device,
    last: Instant,
    parts: Vec<(String, f64)>,
}

impl crate::model::Hooks for TapTimer {
    /// The profile times the forward as it runs unobserved (the fused attention on a GPU).
    fn observes(&self, tap: crate::model::Tap) -> bool {
        !matches!(tap, crate::model::Tap::Block(_, crate::model::BlockTap::AttnPattern))
    }
    fn tap(&mut self, tap: crate::model::Tap, _value: &Tensor) -> Result<Option<Tensor>> {
        self.device.synchronize()?;
        let now = Instant::now();
        let dt = (now - self.last).as_secs_f64();
        self.last = now;
        let name = tap.name();
        // blocks.{l}.suffix -> suffix: one entry per point of the block, summed over blocks.
        let key = match name.strip_prefix("blocks.").and_then(|r| r.split_once('.')) {
            Some((_, suffix)) => suffix.to_string(),
            None => name,
        };
        match self.parts.iter_mut().find(|(k, _)| *k == key) {
            Some((_, s)) => *s += dt,
            None => self.parts.push((key, dt)),
        }
        Ok(None)
    }
}

/// The median of `iters` profiled forwards (after one warm-up), per tap, in execution order.
pub fn forward_profile(lm: &LoadedModel, ids: &[Vec<u32>], iters: usize) -> Result<Vec<ProfilePart>> {
    let device = lm.model.device().clone();
    let batch = Batch::from_sequences(ids, lm.tokenizer().map(|t| t.pad_id).unwrap_or(0), &device)?;
    let mut runs: Vec<Vec<(String, f64)>> = Vec::new();
    for i in 0..=iters.max(1) {
        device.synchronize()?;
        let mut timer = TapTimer {
            device: device.clone(),
            last: Instant::now(),
            parts: Vec::new(),
        };
        let states = model::hidden_states_with(lm.model.as_ref(), &batch, &mut timer)?;
        drop(states);
        if i > 0 {
            runs.push(timer.parts);
        }
    }
    let first = &runs[0];
    let mut parts: Vec<ProfilePart> = first
        .iter()
        .enumerate()
        .map(|(j, (tap, _))| {
            let mut v: Vec<f64> = runs.iter().map(|r| r[j].1).collect();
            v.sort_by(f64::total_cmp);
            ProfilePart {
                tap: tap.clone(),
                seconds: v[v.len() / 2],
                share: 0.0,
            }
        })
        .collect();
    let total: f64 = parts.iter().map(|p| p.seconds).sum();
    for p in &mut parts {
        p.share = p.seconds / total;
    }
    Ok(parts)
}
