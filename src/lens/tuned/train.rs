//! Training a tuned lens with tuned-lens 0.2.0's recipe (its `train_loop.py` and
//! `ingredients.py`): the loss of one batch is, summed over the translators l = 0..L-1, the mean
//! over positions of KL(p || q_l), p the model's own final distribution and q_l the readout of
//! `lens_l(h_l)` (tuned-lens calls `backward` once per translator, so the gradients add up over
//! layers); gradients clipped to norm 1.0 over all parameters; SGD with Nesterov momentum 0.9,
//! dampening 0, coupled weight decay 1e-3 (`g += wd * p`) and `lr = lr_scale * (1 - 0.9)`,
//! decayed linearly to 0 over the schedule's horizon (no warmup).
//!
//! Autograd is candle's (`Var`, `backward`); the readout of a tracked state takes the
//! differentiable paths of `crate::model::layers`. Each (layer, chunk of positions) is its own
//! backward pass with the gradients summed, as tuned-lens does, so only one layer's logits are
//! alive at a time.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var, D};

use super::TunedLens;
use crate::model::transformer::Transformer;

/// tuned-lens's optimiser defaults (`ingredients.Optimizer`).
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The schedule's horizon N: `lr = lr_scale * (1 - momentum) * (N - step) / N`.
    pub horizon: usize,
    pub lr_scale: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Gradient-norm clip over all parameters together.
    pub max_grad_norm: f64,
    /// Positions per backward pass (bounds memory: one chunk's logits [chunk, V] at a time; 128
    /// keeps a SmolLM2 chunk's [128, 49152] f32 buffers under glibc's 32 MB mmap threshold, so
    /// they are reused rather than mapped and faulted in anew for every layer).
    pub chunk: usize,
    /// Rows per readout GEMM: the chunk's positions of several layers are stacked into one
    /// [layers x positions, d] x [d, V] product (and one gradient product back), so that a small
    /// step does not read the whole unembedding twice per layer. At 32 positions per step one
    /// layer's [32, 576] x [576, 49152] product is bound by reading (and packing) the 113 MB
    /// matrix; 30 layers stacked into 960 rows are bound by arithmetic.
    pub rows_per_pass: usize,
}

/// Positions per backward pass on `device`: [`Recipe::new`]'s 128 on the CPU; 4096 on a GPU,
/// where a [128, d] x [d, V] GEMM is too small to keep the device busy (a step of 32768 tokens
/// would be 256 x L launches of each kernel), while a 4096-row chunk's f32 [4096, V] buffers stay
/// at 0.8 GB each for a 49k vocabulary.
pub fn default_chunk(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        128
    } else {
        4096
    }
}

/// Stacked rows per readout GEMM on `device` ([`Recipe::rows_per_pass`]): 1024 on the CPU (a
/// default 32-token step of a 30-layer model is one pass; the two [1024, V] f32 buffers of a 49k
/// vocabulary are 0.2 GB each); on a GPU the chunk's 4096, so a full chunk is one layer per pass
/// as before and only small steps stack layers.
pub fn default_rows_per_pass(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        1024
    } else {
        4096
    }
}

impl Recipe {
    pub fn new(horizon: usize, lr_scale: f64) -> Self {
        Self {
            horizon,
            lr_scale,
            momentum: 0.9,
            weight_decay: 1e-3,
            max_grad_norm: 1.0,
            chunk: 128,
            rows_per_pass: 1024,
        }
    }

    /// The learning rate of optimiser step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        let n = self.horizon.max(1) as f64;
        self.lr_scale * (1.0 - self.momentum) * ((n - step as f64) / n).max(0.0)
    }
}

/// The lens being trained: its parameters as Vars and the optimiser's momentum buffers.
pub struct Trainer {
    pub recipe: Recipe,
    template: TunedLens,
    weights: Vec<Var>,
    biases: Option<Vec<Var>>,
    /// Momentum buffers in `params()` order (None before the first step, as torch's SGD).
    momentum: Option<Vec<Tensor>>,
    /// Optimiser steps taken.
    pub step: usize,
}

impl Trainer {
    pub fn new(lens: &TunedLens, recipe: Recipe) -> Result<Self> {
        let weights = lens
            .weights
            .iter()
            .map(|w| Var::from_tensor(&w.to_dtype(DType::F32)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let biases = match &lens.biases {
            Some(b) => Some(
                b.iter()
                    .map(|t| Var::from_tensor(&t.to_dtype(DType::F32)?))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            ),
            None => None,
        };
        Ok(Self {
            recipe,
            template: lens.clone(),
            weights,
            biases,
            momentum: None,
            step: 0,
        })
    }

    /// Resumes from a checkpoint: the parameters in `lens`, the momentum buffers (in
    /// [`Trainer::params`] order) and the steps taken.
    pub fn resume(lens: &TunedLens, recipe: Recipe, momentum: Option<Vec<Tensor>>, step: usize) -> Result<Self> {
        let mut t = Self::new(lens, recipe)?;
        if let Some(m) = &momentum {
            if m.len() != t.params().len() {
                bail!(
                    "checkpoint: {} momentum buffers for {} parameters",
                    m.len(),
                    t.params().len()
                );
            }
        }
        t.momentum = momentum;
        t.step = step;
        Ok(t)
    }

    /// All parameters, in tuned-lens's order (`{i}.weight`, `{i}.bias`, ...).
    fn params(&self) -> Vec<&Var> {
        let mut out = Vec::new();
        for (i, w) in self.weights.iter().enumerate() {
            out.push(w);
            if let Some(b) = &self.biases {
                out.push(&b[i]);
            }
        }
        out
    }

    /// The momentum buffers (for a checkpoint), in `{i}.weight`, `{i}.bias` order.
    pub fn momentum(&self) -> Option<&[Tensor]> {
        self.momentum.as_deref()
    }

    /// The lens with the current parameters (copies, untracked).
    pub fn lens(&self) -> Result<TunedLens> {
        let mut lens = self.template.clone();
        // Copies: a Var's storage is updated in place by later steps.
        lens.weights = self
            .weights
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        lens.biases = match &self.biases {
            Some(b) => Some(
                b.iter()
                    .map(|v| v.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?,
            ),
            None => None,
        };
        Ok(lens)
    }

    /// The lens whose tensors are the Vars themselves (so its outputs are tracked).
    fn tracked_lens(&self) -> TunedLens {
        let mut lens = self.template.clone();
        lens.weights = self.weights.iter().map(|v| v.as_tensor().clone()).collect();
        lens.biases = self
            .biases
            .as_ref()
            .map(|b| b.iter().map(|v| v.as_tensor().clone()).collect());
        lens
    }

    /// One optimiser step on a batch: `states` are h_0..h_L, each [n, d] (all positions of the
    /// batch, flattened); the target is the model's own distribution at h_L. Returns the loss
    /// (summed over layers, as tuned-lens logs it) before the step; a non-finite loss is an
    /// error and leaves the parameters unchanged.
    pub fn step(&mut self, model: &dyn Transformer, states: &[Tensor]) -> Result<f64> {
        let (total, grads) = self.loss_and_grads(model, states)?;
        self.apply(&grads)?;
        Ok(total)
    }

    /// The loss of a batch (as [`Trainer::step`]) and its gradient with respect to every
    /// parameter, in `{i}.weight`, `{i}.bias` order, before clipping and weight decay; the
    /// parameters are not changed. A non-finite loss is an error.
    pub fn loss_and_grads(&self, model: &dyn Transformer, states: &[Tensor]) -> Result<(f64, Vec<Tensor>)> {
        let n_layers = self.weights.len();
        if states.len() != n_layers + 1 {
            bail!(
                "{} hidden states for a lens of {n_layers} layers (expected L + 1)",
                states.len()
            );
        }
        let n = states[0].dim(0)?;
        if n == 0 {
            bail!("an empty batch");
        }
        let params = self.params();
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let lens = self.tracked_lens();
        let chunk = self.recipe.chunk.max(1);
        let mut total = 0f64;
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let last = states[n_layers].detach().narrow(0, start, len)?;
            // The model's own final distribution: once per chunk, no graph.
            let target = Target::new(&model.readout(&last)?.to_dtype(DType::F32)?)?;
            let per_pass = (self.recipe.rows_per_pass / len).clamp(1, n_layers);
            let layers: Vec<usize> = (0..n_layers).collect();
            for group in layers.chunks(per_pass) {
                // Tracked: the lens and the final norm, each layer's rows stacked. The unembedding
                // runs untracked (its fast path) and its gradient comes from `unembed_vjp`:
                // d KL / d logits = (q - p) / n. Each layer's translator reaches only its own rows,
                // so its gradient is the one a pass of that layer alone gives.
                let u = group
                    .iter()
                    .map(|&l| model.final_norm(&lens.cast(l, &states[l].detach().narrow(0, start, len)?)?))
                    .collect::<Result<Vec<_>>>()?;
                let u = Tensor::cat(&u, 0)?;
                // In the unembedding's dtype: the fused loss reads it as it is and hands the
                // gradient back in it for `unembed_vjp`'s GEMM (elsewhere the loss casts to f32).
                let logits = model.unembed_native(&u.detach())?;
                // sum_pos KL / n: this chunk's share of the mean over all n positions, per layer.
                let (kl, g_logits) = target.kl_and_grad(&logits, n)?;
                total += kl;
                let g_u = model.unembed_vjp(&u.detach(), &g_logits)?;
                let surrogate = (&u * layers_to(&g_u, u.dtype())?)?.sum_all()?;
                let g = surrogate.backward()?;
                for (slot, v) in grads.iter_mut().zip(&params) {
                    if let Some(gv) = g.get(v.as_tensor()) {
                        *slot = Some(match slot.take() {
                            Some(acc) => (acc + gv)?,
                            None => gv.clone(),
                        });
                    }
                }
            }
        }
        if !total.is_finite() {
            bail!(
                "the loss is {total} at step {} (diverged); nothing written",
                self.step + 1
            );
        }
        let grads = grads
            .into_iter()
            .zip(&params)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((total, grads))
    }

    /// Clip, weight decay, Nesterov momentum and the parameter update (torch's `SGD.step`
    /// after `clip_grad_norm_`, then the schedule's step).
    fn apply(&mut self, grads: &[Tensor]) -> Result<()> {
        let r = self.recipe.clone();
        let mut sq = 0f64;
        for g in grads {
            sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            bail!(
                "the gradient norm is {norm} at step {} (diverged); nothing written",
                self.step + 1
            );
        }
        // torch: clip_coef = max_norm / (norm + 1e-6), clamped to 1.
        let coef = (r.max_grad_norm / (norm + 1e-6)).min(1.0);
        let lr = r.lr(self.step);
        let params: Vec<Var> = self.params().into_iter().cloned().collect();
        let mut new_bufs = Vec::with_capacity(params.len());
        for (i, (v, g)) in params.iter().zip(grads).enumerate() {
            // Detached: ops on a Var are recorded, and a momentum buffer built from the tracked
            // parameter would chain every step's graph (and its tensors) to the next: memory
            // grew by the lens's size per step (24 GB at step ~200 of SmolLM2).
            let p = v.as_tensor().detach();
            let g = (g.affine(coef, 0.0)? + p.affine(r.weight_decay, 0.0)?)?;
            let buf = match &self.momentum {
                Some(m) => (m[i].affine(r.momentum, 0.0)? + &g)?,
                None => g.clone(),
            };
            let update = (&g + buf.affine(r.momentum, 0.0)?)?;
            v.set(&(p - update.affine(lr, 0.0)?)?)?;
            new_bufs.push(buf);
        }
        self.momentum = Some(new_bufs);
        self.step += 1;
        Ok(())
    }
}

/// The target distribution p of one chunk of positions, [rows, V], and what the loss needs of it.
enum Target {
    /// On the CPU: p as host rows, with each row's sum of p and of p log p (f64), for the fused
    /// pass of [`Target::kl_and_grad`].
    Host {
        p: Vec<f32>,
        sum_p: Vec<f64>,
        sum_p_log_p: Vec<f64>,
        vocab: usize,
    },
    /// Elsewhere: log p as a device tensor (p = exp(log p) is formed where it is needed: inside
    /// the fused kernels on CUDA, by candle's ops on other devices).
    Device { log_p: Tensor },
}

impl Target {
    fn new(logits: &Tensor) -> Result<Self> {
        Self::build(logits, logits.device().is_cpu())
    }

    /// `host`: the fused CPU form (else candle's ops, on any device).
    fn build(logits: &Tensor, host: bool) -> Result<Self> {
        if !host {
            let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
            return Ok(Target::Device { log_p });
        }
        use rayon::prelude::*;
        let (rows, vocab) = logits.dims2()?;
        let mut p = vec![0f32; rows * vocab];
        let mut sum_p = vec![0f64; rows];
        let mut sum_p_log_p = vec![0f64; rows];
        crate::host::with_f32_slice(logits, |z| {
            p.par_chunks_mut(vocab)
                .zip(z.par_chunks(vocab))
                .zip(sum_p.par_iter_mut().zip(sum_p_log_p.par_iter_mut()))
                .for_each(|((p, z), (sp, splp))| {
                    let lse = log_sum_exp(z);
                    let (mut a, mut b) = (0f64, 0f64);
                    for (p, &z) in p.iter_mut().zip(z) {
                        // log p in f32, as candle's log_softmax gives it.
                        let lp = z - lse;
                        *p = lp.exp();
                        a += *p as f64;
                        b += *p as f64 * lp as f64;
                    }
                    *sp = a;
                    *splp = b;
                });
            Ok(())
        })?;
        Ok(Target::Host {
            p,
            sum_p,
            sum_p_log_p,
            vocab,
        })
    }

    /// For the lens's `logits` [k * rows, V] of the same positions (k layers stacked, each the
    /// target's rows in order): `sum_rows KL(p || q) / n` and its gradient with respect to the
    /// logits, `(q - p) / n` [k * rows, V] f32, q = softmax(logits).
    /// On the CPU one fused pass per row (one exp per element, no [rows, V] temporaries besides
    /// the gradient): KL = sum p log p - sum p z + lse(z) sum p; on CUDA the same in two kernels
    /// (`crate::model::fused::kl_and_grad`; with candle's ops a 32,768-token step of the SmolLM2
    /// shape took 10.7 s on the H200 against the tuned-lens package's 4.0 s).
    fn kl_and_grad(&self, logits: &Tensor, n: usize) -> Result<(f64, Tensor)> {
        let inv_n = 1.0 / n as f64;
        if let Target::Device { log_p } = self {
            stacked(logits.dims2()?.0, log_p.dims2()?.0)?;
            if let Some((kl, g)) = crate::model::fused::kl_and_grad(logits, log_p, inv_n)? {
                return Ok((kl.to_scalar::<f64>()? * inv_n, g));
            }
        }
        // Without the fused kernels half-precision logits are scored in f32 (wider ones as
        // they are: the f64 reference of the tests).
        let logits = &match logits.dtype() {
            DType::BF16 | DType::F16 => logits.to_dtype(DType::F32)?,
            _ => logits.clone(),
        };
        match self {
            Target::Device { log_p } => {
                let k = stacked(logits.dims2()?.0, log_p.dims2()?.0)?;
                let log_p = &log_p.repeat((k, 1))?;
                let p = &log_p.exp()?;
                let logq = candle_nn::ops::log_softmax(logits, D::Minus1)?;
                let kl = (p * (log_p - &logq)?)?.sum_all()?.affine(inv_n, 0.0)?;
                let g = ((logq.exp()? - p)? * inv_n)?;
                Ok((kl.to_dtype(DType::F64)?.to_scalar::<f64>()?, g))
            }
            Target::Host {
                p,
                sum_p,
                sum_p_log_p,
                vocab,
            } => {
                use rayon::prelude::*;
                let vocab = *vocab;
                let (rows, width) = logits.dims2()?;
                if width != vocab {
                    bail!("lens logits [{rows}, {width}] for a target of vocabulary {vocab}");
                }
                let k = stacked(rows, sum_p.len())?;
                let mut g = vec![0f32; rows * vocab];
                let mut kl_rows = vec![0f64; rows];
                // Row r of the stack is target row r mod the target's rows.
                let targets = || (0..k).flat_map(|_| p.chunks(vocab).zip(sum_p.iter().zip(sum_p_log_p.iter())));
                let targets: Vec<_> = targets().collect();
                crate::host::with_f32_slice(logits, |z| {
                    g.par_chunks_mut(vocab)
                        .zip(z.par_chunks(vocab))
                        .zip(kl_rows.par_iter_mut())
                        .zip(targets.par_iter())
                        .map(|(((g, z), kl), &(p, (sp, splp)))| (((g, z), p), (kl, (sp, splp))))
                        .for_each(|(((g, z), p), (kl, (&sp, &splp)))| {
                            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                            let (mut s, mut pz) = (0f64, 0f64);
                            for ((g, &z), &p) in g.iter_mut().zip(z).zip(p) {
                                let e = (z - max).exp();
                                *g = e;
                                s += e as f64;
                                pz += p as f64 * z as f64;
                            }
                            let lse = max as f64 + s.ln();
                            *kl = splp - pz + lse * sp;
                            let inv_s = (1.0 / s) as f32;
                            let inv_n = inv_n as f32;
                            for (g, &p) in g.iter_mut().zip(p) {
                                *g = (*g * inv_s - p) * inv_n;
                            }
                        });
                    Ok(())
                })?;
                let kl: f64 = kl_rows.iter().sum::<f64>() * inv_n;
                Ok((kl, Tensor::from_vec(g, (rows, vocab), logits.device())?))
            }
        }
    }
}

/// How many copies of a target of `target_rows` rows a stack of `rows` lens rows holds.
fn stacked(rows: usize, target_rows: usize) -> Result<usize> {
    if target_rows == 0 || !rows.is_multiple_of(target_rows) || rows == 0 {
        bail!("lens logits of {rows} rows for a target of {target_rows} rows");
    }
    Ok(rows / target_rows)
}

/// log sum exp of a row (f32, shifted by its maximum).
fn log_sum_exp(z: &[f32]) -> f32 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = z.iter().map(|&z| (z - max).exp() as f64).sum();
    max + s.ln() as f32
}

/// `t` in `dtype`, detached (the surrogate's constant factor).
fn layers_to(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    crate::model::layers::to_dtype(&t.detach(), dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused CPU pass and candle's ops (in f64, the reference) give the same KL and gradient.
    #[test]
    fn fused_kl_and_gradient_match_candle_ops_in_f64() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let (rows, vocab, n) = (5, 300, 7);
        let zp = (Tensor::randn(0f32, 3.0, (rows, vocab), &dev)? + 2.0)?;
        let zq = Tensor::randn(0f32, 4.0, (rows, vocab), &dev)?;
        let (kl, g) = Target::build(&zp, true)?.kl_and_grad(&zq, n)?;
        let reference = Target::build(&zp.to_dtype(DType::F64)?, false)?;
        let (kl_ref, g_ref) = reference.kl_and_grad(&zq.to_dtype(DType::F64)?, n)?;
        assert!(kl_ref > 0.1, "a KL far from zero ({kl_ref})");
        assert!((kl - kl_ref).abs() <= 1e-6 * kl_ref, "KL {kl} vs {kl_ref}");
        let g = g.to_dtype(DType::F64)?;
        let err = (g - &g_ref)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let scale = g_ref.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err <= 1e-6 * scale, "gradient error {err} (scale {scale})");
        Ok(())
    }
}
