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
    /// Positions per backward pass (bounds memory: one chunk's logits [chunk, V] at a time).
    pub chunk: usize,
}

impl Recipe {
    pub fn new(horizon: usize, lr_scale: f64) -> Self {
        Self {
            horizon,
            lr_scale,
            momentum: 0.9,
            weight_decay: 1e-3,
            max_grad_norm: 1.0,
            chunk: 256,
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
            let target = candle_nn::ops::log_softmax(&model.readout(&last)?.to_dtype(DType::F32)?, D::Minus1)?;
            let p = target.exp()?;
            for (l, h) in states[..n_layers].iter().enumerate() {
                let h = h.detach().narrow(0, start, len)?;
                // Tracked: the lens and the final norm. The unembedding runs untracked (its fast
                // path) and its gradient comes from `unembed_vjp`: d KL / d logits = (q - p) / n.
                let u = model.final_norm(&lens.cast(l, &h)?)?;
                let logits = model.unembed(&u.detach())?.to_dtype(DType::F32)?;
                let logq = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                // sum_pos KL / n: this chunk's share of the mean over all n positions.
                let kl = (&p * (&target - &logq)?)?.sum_all()?.affine(1.0 / n as f64, 0.0)?;
                total += kl.to_scalar::<f32>()? as f64;
                let g_logits = ((logq.exp()? - &p)? / n as f64)?;
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
        self.apply(&grads)?;
        Ok(total)
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
            let p = v.as_tensor();
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

/// `t` in `dtype`, detached (the surrogate's constant factor).
fn layers_to(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    crate::model::layers::to_dtype(&t.detach(), dtype)
}
