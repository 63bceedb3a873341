//! Small numeric building blocks shared by the architecture files.
//!
//! Dtypes (see `model::dtype`): Linear, embeddings, RoPE and activations run in the dtype of
//! their input / weights (the compute dtype); norms and the attention softmax upcast to f32,
//! compute, and cast back, as transformers does. On the CPU a Linear with 16-bit weights
//! converts the weight to f32 in row blocks and runs faer's f32 GEMM (f32 accumulation, one
//! rounding of the output), so a bf16 checkpoint is held once, in bf16.

use candle_core::{DType, Device, Result, Tensor};

/// A dense layer `y = x W^T + b` with W stored [out, in] (PyTorch `nn.Linear` layout).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Applies the layer to x [..., in]; x is first cast to the weight's dtype (states from
    /// outside the model, e.g. f32 lens outputs, enter a bf16 model in bf16).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None)
    }

    /// `act(x W^T + b)`: [`Linear::forward`] followed by the activation, which on a GPU runs
    /// with the bias add as one pass ([`crate::model::fused::bias_act`]).
    pub fn forward_act(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let then_act = |y: Tensor| match act {
            Some(a) => a.forward(&y),
            None => Ok(y),
        };
        let x = &to_dtype(x, self.weight.dtype())?;
        if x.track_op() {
            // A Var upstream (lens training): the fast paths below rebuild outputs without a graph.
            let y = x.broadcast_matmul(&self.weight.t()?)?;
            return then_act(match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        let dims = x.dims().to_vec();
        let inner = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dims()[0];
        let x2 = x.reshape((rows, inner))?;
        if let Some(y) = cpu_matmul_wt_half(&x2, &self.weight, self.bias.as_ref())? {
            return then_act(y.reshape(out_dims)?);
        }
        // One 2-D GEMM against the transposed (strided, not copied) weight is the fast path.
        let y = match cpu_matmul_wt(&x2, &self.weight)? {
            Some(y) => y,
            None => x2.matmul(&self.weight.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => match crate::model::fused::bias_act(&y, b, act)? {
                Some(y) => return y.reshape(out_dims),
                None => y.broadcast_add(b)?,
            },
            None => y,
        };
        then_act(y.reshape(out_dims)?)
    }

    /// Number of parameters (weight and bias).
    pub fn n_params(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }
}

/// `x @ w^T` for float32 CPU tensors x [m, k] and w [n, k], with faer's GEMM: on CPUs with
/// AVX-512 it runs about twice as fast as candle's CPU matmul (whose `gemm` kernels stop at AVX2
/// on a stable toolchain; measured: 75% of a SmolLM2 forward pass in its AVX2 microkernel).
/// `None` for other devices and dtypes.
fn cpu_matmul_wt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    use candle_core::DType;
    use faer::{Accum, MatMut, MatRef, Par};
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let (n, k_w) = w.dims2()?;
    if k != k_w {
        return Ok(None); // let candle report the shape mismatch
    }
    let mut out = vec![0f32; m * n];
    let msg = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
    crate::host::with_f32_slice(x, |xs| {
        crate::host::with_f32_slice(w, |ws| {
            faer::linalg::matmul::matmul(
                MatMut::from_row_major_slice_mut(&mut out, m, n),
                Accum::Replace,
                MatRef::from_row_major_slice(xs, m, k),
                MatRef::from_row_major_slice(ws, n, k).transpose(),
                1.0f32,
                Par::rayon(0),
            );
            Ok(())
        })
    })
    .map_err(msg)?;
    clear_upper_vector_state();
    Ok(Some(Tensor::from_vec(out, (m, n), &Device::Cpu)?))
}

/// Rows of a 16-bit weight converted to f32 at a time: 4 MiB of f32 at d = 1024, 16 MiB at
/// d = 4096, so the temporary stays small next to the weights.
const HALF_WEIGHT_BLOCK_ELEMS: usize = 1 << 22;

/// `x @ w^T (+ b)` for bf16 / f16 CPU tensors x [m, k] and w [n, k] (same dtype): x and row
/// blocks of w are converted to f32 and multiplied with faer (f32 accumulation), the bias is added
/// in f32, and the result is rounded once to the input dtype, as PyTorch's CPU bf16 `linear`.
/// `None` for other devices and dtypes.
fn cpu_matmul_wt_half(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    use faer::{Accum, MatMut, MatRef, Par};
    use rayon::prelude::*;
    let dtype = w.dtype();
    if !x.device().is_cpu() || !matches!(dtype, DType::BF16 | DType::F16) || x.dtype() != dtype {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let (n, k_w) = w.dims2()?;
    if k != k_w || k == 0 {
        return Ok(None); // let candle report the shape mismatch
    }
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let w = w.contiguous()?;
    let mut out = vec![0f32; m * n];
    let rows_per_block = (HALF_WEIGHT_BLOCK_ELEMS / k).clamp(1, n.max(1));
    let mut block = vec![0f32; rows_per_block * k];
    let msg = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
    let (storage, layout) = w.storage_and_layout();
    let (start, _) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("a contiguous weight".into()))?;
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    crate::host::with_f32_slice(&x32, |xs| {
        let xm = MatRef::from_row_major_slice(xs, m, k);
        let mut om = MatMut::from_row_major_slice_mut(&mut out, m, n);
        for r0 in (0..n).step_by(rows_per_block) {
            let rows = rows_per_block.min(n - r0);
            let dst = &mut block[..rows * k];
            let range = start + r0 * k..start + (r0 + rows) * k;
            // (The element types are `half`'s, reached through candle's storage.)
            match cpu {
                candle_core::CpuStorage::BF16(all) => {
                    dst.par_chunks_mut(k).zip(all[range].par_chunks(k)).for_each(|(d, s)| {
                        d.iter_mut().zip(s).for_each(|(d, s)| *d = s.to_f32());
                    });
                }
                candle_core::CpuStorage::F16(all) => {
                    dst.par_chunks_mut(k).zip(all[range].par_chunks(k)).for_each(|(d, s)| {
                        d.iter_mut().zip(s).for_each(|(d, s)| *d = s.to_f32());
                    });
                }
                _ => return Err(anyhow::anyhow!("a 16-bit weight")),
            }
            faer::linalg::matmul::matmul(
                faer::reborrow::ReborrowMut::rb_mut(&mut om).subcols_mut(r0, rows),
                Accum::Replace,
                xm,
                MatRef::from_row_major_slice(dst, rows, k).transpose(),
                1.0f32,
                Par::rayon(0),
            );
        }
        Ok(())
    })
    .map_err(msg)?;
    drop(storage);
    clear_upper_vector_state();
    let y = Tensor::from_vec(out, (m, n), &Device::Cpu)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    };
    Ok(Some(y.to_dtype(dtype)?))
}

/// Runs `vzeroupper` on every rayon thread and this one. faer's AVX-512 kernels leave the upper
/// halves of the vector registers dirty, and on Intel cores every later legacy-SSE instruction
/// then pays a transition penalty: glibc's `exp` in the predict scorer ran 5x slower after them.
pub(crate) fn clear_upper_vector_state() {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx") {
            let clear = || {
                // SAFETY: AVX is available (checked above); vzeroupper only zeroes the upper
                // halves of the vector registers, which hold no live values between calls.
                unsafe { zeroupper() }
            };
            rayon::broadcast(|_| clear());
            clear();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn zeroupper() {
    std::arch::x86_64::_mm256_zeroupper();
}

/// LayerNorm over the last dimension (biased variance, as PyTorch).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// In f32 (weight and bias upcast), output in the weight's dtype, as PyTorch's `layer_norm`
    /// on 16-bit inputs.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out_dtype = self.weight.dtype();
        if x.track_op() {
            // A Var upstream (lens training): candle's fused layer_norm has no backward.
            let (w, b) = (to_dtype(&self.weight, DType::F32)?, to_dtype(&self.bias, DType::F32)?);
            return candle_nn::ops::layer_norm_slow(&to_dtype(x, DType::F32)?, &w, &b, self.eps as f32)?
                .to_dtype(out_dtype);
        }
        // On a GPU one fused kernel (f32 arithmetic, one rounding) instead of casts around candle's.
        if !x.device().is_cpu() && x.dtype() == out_dtype {
            if let Some(y) = crate::model::fused::layer_norm(x, &self.weight, &self.bias, self.eps)? {
                return Ok(y);
            }
        }
        if x.dtype() == DType::F32 && out_dtype == DType::F32 {
            let x = x.contiguous()?;
            return candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32);
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let (w, b) = (self.weight.to_dtype(DType::F32)?, self.bias.to_dtype(DType::F32)?);
        candle_nn::ops::layer_norm(&x, &w, &b, self.eps as f32)?.to_dtype(out_dtype)
    }

    pub fn n_params(&self) -> usize {
        self.weight.elem_count() + self.bias.elem_count()
    }
}

/// RMSNorm `x / sqrt(mean(x^2) + eps) * scale`. `scale` is the effective multiplier: Gemma's
/// `1 + w` is folded in at load time.
///
/// Outside f32 the normalisation runs in f32 and the output is in `dtype` (the compute dtype).
/// Where the scale is applied follows transformers: a `scale` in the compute dtype multiplies
/// after the cast (LlamaRMSNorm: `w * normed.to(dtype)`); an f32 `scale` multiplies before it
/// (Gemma3RMSNorm: `(normed * (1 + w.float())).type_as(x)`).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub scale: Tensor,
    pub eps: f64,
    pub dtype: DType,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            // A Var upstream (lens training): candle's fused rms_norm has no backward.
            let scale = to_dtype(&self.scale, DType::F32)?;
            return candle_nn::ops::rms_norm_slow(&to_dtype(x, DType::F32)?, &scale, self.eps as f32)?
                .to_dtype(self.dtype);
        }
        // On a GPU one fused kernel with the same rounding (see crate::model::fused).
        if !x.device().is_cpu() && x.dtype() == self.dtype {
            let sd = self.scale.dtype();
            if sd == self.dtype || sd == DType::F32 {
                let round_first = sd != DType::F32;
                if let Some(y) = crate::model::fused::rms_norm(x, &self.scale, self.eps, round_first)? {
                    return Ok(y);
                }
            }
        }
        if x.dtype() == DType::F32 && self.dtype == DType::F32 {
            let x = x.contiguous()?;
            let scale = to_dtype(&self.scale, DType::F32)?;
            return candle_nn::ops::rms_norm(&x, &scale, self.eps as f32);
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        if self.scale.dtype() == DType::F32 {
            return candle_nn::ops::rms_norm(&x, &self.scale, self.eps as f32)?.to_dtype(self.dtype);
        }
        let ones = Tensor::ones(x.dim(candle_core::D::Minus1)?, DType::F32, x.device())?;
        let normed = candle_nn::ops::rms_norm(&x, &ones, self.eps as f32)?.to_dtype(self.dtype)?;
        normed.broadcast_mul(&to_dtype(&self.scale, self.dtype)?)
    }
}

/// GELU with the tanh approximation (GPT-2's `gelu_new`, Gemma's `gelu_pytorch_tanh`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// Exact GELU with erf (BERT's `gelu`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// The MLP activations Hugging Face configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluErf,
    GeluTanh,
    Relu,
}

impl Activation {
    /// Parses a config's `hidden_act` / `activation_function` value.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => return Err(format!("unsupported activation '{other}'")),
        })
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => candle_nn::ops::silu(x),
            Activation::GeluErf => gelu_erf(x),
            Activation::GeluTanh => gelu_tanh(x),
            Activation::Relu => x.relu(),
        }
    }
}

/// A block's norm: RMSNorm (Llama, Gemma) or LayerNorm (GPT-2, GPT-NeoX, BERT).
#[derive(Debug, Clone)]
pub enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::Layer(n) => n.forward(x),
        }
    }

    pub fn n_params(&self) -> usize {
        match self {
            Norm::Rms(n) => n.scale.elem_count(),
            Norm::Layer(n) => n.n_params(),
        }
    }
}

/// Rotary position tables: cos and sin [max_positions, head_dim / 2] for the half-split
/// ("NeoX", Hugging Face) layout.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// How RoPE frequencies are rescaled for long contexts (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
    /// Phi-3 LongRoPE / "su": frequency i divided by `factors[i]`, cos and sin multiplied by
    /// `attention_factor`.
    LongRope {
        factors: Vec<f64>,
        attention_factor: f64,
    },
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        // Frequencies in f32, as transformers computes them, so angles round the same way.
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= *factor as f32),
            RopeScaling::LongRope { factors, .. } => {
                if factors.len() != inv_freq.len() {
                    candle_core::bail!(
                        "longrope has {} factors for {} rotary frequencies",
                        factors.len(),
                        inv_freq.len()
                    );
                }
                inv_freq.iter_mut().zip(factors).for_each(|(f, e)| *f /= *e as f32)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let low_wavelen = original_max_positions / low_freq_factor;
                let high_wavelen = original_max_positions / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f as f64;
                    let v = *f as f64;
                    *f = if wavelen > low_wavelen {
                        (v / factor) as f32
                    } else if wavelen < high_wavelen {
                        v as f32
                    } else {
                        let smooth =
                            (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * v / factor + smooth * v) as f32
                    };
                }
            }
        }
        let amplitude = match scaling {
            RopeScaling::LongRope { attention_factor, .. } => *attention_factor as f32,
            _ => 1.0,
        };
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * amplitude);
                sin.push(angle.sin() * amplitude);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
        })
    }

    /// Rotates x [B, H, T, head_dim] by positions 0..T.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (cos, sin) = self.tables(x.dim(2)?, x.dtype())?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }

    /// Rotates x [B, T, H, head_dim] (the projections' own layout) by positions 0..T, with the
    /// same arithmetic as [`Rope::apply`].
    pub fn apply_thd(&self, x: &Tensor) -> Result<Tensor> {
        let (cos, sin) = self.tables(x.dim(1)?, x.dtype())?;
        candle_nn::rotary_emb::rope_thd(&x.contiguous()?, &cos, &sin)
    }

    /// The cos and sin rows of positions 0..t in `dtype`.
    fn tables(&self, t: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        if t > self.cos.dim(0)? {
            candle_core::bail!(
                "sequence of {t} tokens is longer than the rotary table ({})",
                self.cos.dim(0)?
            );
        }
        // The f32 tables are cast to the input's dtype, as transformers' rotary embedding does.
        let cos = to_dtype(&self.cos.narrow(0, 0, t)?, dtype)?;
        let sin = to_dtype(&self.sin.narrow(0, 0, t)?, dtype)?;
        Ok((cos, sin))
    }
}

/// Attention probabilities softmax(q k^T * scale [soft-capped] + bias) [B, H, T, T].
///
/// q [B, H, T, hd], k [B, Hkv, T, hd] with H a multiple of Hkv (grouped-query attention: query
/// heads g*j..g*(j+1) share key head j), the batch's mask (the additive bias [B, 1, T, T] on the
/// CPU; on a GPU the fused kernel of [`crate::model::fused`] does scale, cap, mask and softmax in
/// one pass with the same rounding). The query heads of a
/// group are folded into the row axis, so one GEMM per key head serves the whole group and k is
/// never copied H/Hkv times (on the GPU those copies and the g-times-smaller GEMMs cost more than
/// the products). The scores come out of the GEMM in q's dtype; soft-cap, mask and softmax run in
/// f32 and the probabilities are cast back to q's dtype (transformers' eager attention).
pub fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    mask: &crate::model::batch::AttentionMask,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (b, h, t, hd) = q.dims4()?;
    let (_, h_kv, s, _) = k.dims4()?;
    let g = group_size(h, h_kv)?;
    let q = q.contiguous()?.reshape((b, h_kv, g * t, hd))?;
    let scores = q.matmul(&k.contiguous()?.t()?)?.reshape((b, h, t, s))?;
    let bias = match mask {
        crate::model::batch::AttentionMask::Bias(bias) => bias,
        crate::model::batch::AttentionMask::Fused(spec) => {
            return crate::model::fused::masked_softmax(&scores, spec, scale, softcap)?
                .ok_or_else(|| candle_core::Error::Msg("the fused attention mask needs a CUDA device".into()));
        }
    };
    if softcap.is_none() {
        if let Some(probs) = cpu_scaled_masked_softmax(&scores, bias, scale)? {
            return Ok(probs);
        }
    }
    let mut scores = to_dtype(&(scores * scale)?, DType::F32)?;
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let scores = scores.broadcast_add(&to_dtype(bias, DType::F32)?)?;
    to_dtype(&candle_nn::ops::softmax_last_dim(&scores)?, dtype)
}

/// probs [B, H, T, S] x v [B, Hkv, S, hd] -> [B, H, T, hd], the query heads of a group sharing
/// their value head as in [`attention_probs`].
pub fn attention_mix(probs: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, t, s) = probs.dims4()?;
    let (_, h_kv, _, hd) = v.dims4()?;
    let g = group_size(h, h_kv)?;
    probs
        .contiguous()?
        .reshape((b, h_kv, g * t, s))?
        .matmul(&v.contiguous()?)?
        .reshape((b, h, t, hd))
}

/// Query heads per key/value head.
fn group_size(n_heads: usize, h_kv: usize) -> Result<usize> {
    if h_kv == 0 || !n_heads.is_multiple_of(h_kv) {
        candle_core::bail!("{n_heads} attention heads cannot share {h_kv} key/value heads");
    }
    Ok(n_heads / h_kv)
}

/// `softmax(scores * scale + bias)` over the last dimension for f32 CPU scores [B, H, T, S] and
/// an f32 bias [B, 1, T, S], in one pass per row: the same operations in the same order as
/// candle's `* scale`, `broadcast_add` and `softmax_last_dim` (max, `exp(x - max)`, sum, divide),
/// without their two intermediate tensors and thread-pool rounds. Hand-written because candle has
/// no fused masked softmax on the CPU (its CPU ops each allocate and run one parallel pass; on
/// SmolLM2 at 32 x 24 those per-op costs were a quarter of the forward profile). `None` for
/// other devices, dtypes or shapes (the caller runs candle's ops).
fn cpu_scaled_masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    if !scores.device().is_cpu() || scores.dtype() != DType::F32 || bias.dtype() != DType::F32 {
        return Ok(None);
    }
    let Ok((b, h, t, s)) = scores.dims4() else {
        return Ok(None);
    };
    if bias.dims() != [b, 1, t, s] || s == 0 {
        return Ok(None);
    }
    let scale = scale as f32;
    let mut out = vec![0f32; b * h * t * s];
    let msg = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
    crate::host::with_f32_slice(scores, |xs| {
        crate::host::with_f32_slice(bias, |bs| {
            // One task per (batch, head): its T rows share the batch's T x S bias block.
            out.par_chunks_mut(t * s)
                .zip(xs.par_chunks(t * s))
                .enumerate()
                .for_each(|(bh, (dst, src))| {
                    let bias = &bs[(bh / h) * t * s..(bh / h + 1) * t * s];
                    for ((dst, src), bias) in dst.chunks_mut(s).zip(src.chunks(s)).zip(bias.chunks(s)) {
                        let mut max = f32::NEG_INFINITY;
                        for ((d, x), m) in dst.iter_mut().zip(src).zip(bias) {
                            *d = x * scale + m;
                            max = max.max(*d);
                        }
                        let mut sum = 0f32;
                        for d in dst.iter_mut() {
                            *d = (*d - max).exp();
                            sum += *d;
                        }
                        dst.iter_mut().for_each(|d| *d /= sum);
                    }
                });
            Ok(())
        })
    })
    .map_err(msg)?;
    Ok(Some(Tensor::from_vec(out, (b, h, t, s), &Device::Cpu)?))
}

/// `silu(gate) * up` (the gated MLP's product, SiLU as candle's `x / (1 + exp(-x))`). On the
/// CPU in f32 one fused parallel pass instead of candle's two ops (each an allocation, a pass
/// over memory and a thread-pool round); on a GPU in bf16/f16 one kernel
/// ([`crate::model::fused::silu_mul`]); elsewhere candle's ops.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    if let Some(out) = crate::model::fused::silu_mul(gate, up)? {
        return Ok(out);
    }
    let fused = gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.dims() == up.dims()
        && gate.is_contiguous()
        && up.is_contiguous();
    if !fused {
        return candle_nn::ops::silu(gate)? * up;
    }
    let mut out = Vec::new();
    let msg = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
    crate::host::with_f32_slice(gate, |gs| {
        crate::host::with_f32_slice(up, |us| {
            gs.par_iter()
                .with_min_len(4096)
                .zip(us.par_iter())
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect_into_vec(&mut out);
            Ok(())
        })
    })
    .map_err(msg)?;
    Tensor::from_vec(out, gate.dims(), &Device::Cpu)
}

/// Splits x [B, T, H * hd] into heads [B, H, T, hd].
pub fn split_heads(x: &Tensor, n_heads: usize, head_dim: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    x.reshape((b, t, n_heads, head_dim))?.transpose(1, 2)?.contiguous()
}

/// Looks up rows of an embedding table for ids [B, T].
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let flat = ids.flatten_all()?;
    table.index_select(&flat, 0)?.reshape((b, t, table.dim(1)?))
}

/// Position ids 0..T as a u32 tensor.
pub fn positions(t: usize, device: &Device) -> Result<Tensor> {
    Tensor::arange(0u32, t as u32, device)
}

/// `tanh(x / cap) * cap` (Gemma's logit soft-capping).
pub fn softcap(x: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    match cap {
        Some(c) => (x / c)?.tanh()? * c,
        None => Ok(x.clone()),
    }
}

/// Makes sure a tensor is f32 (the dtype of logits and collected states).
pub fn f32(t: Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        Ok(t)
    } else {
        t.to_dtype(DType::F32)
    }
}

/// `t` in `dtype`: the same tensor (no copy) when it already is.
pub fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// The fused CPU masked softmax equals candle's `* scale`, `broadcast_add`, `softmax_last_dim`
    /// on the same scores, with a causal mask and a padded (fully masked) key column.
    #[test]
    fn fused_masked_softmax_matches_candle_ops() {
        let (b, h, t) = (2, 3, 5);
        let dev = Device::Cpu;
        let scores = Tensor::randn(0f32, 3.0, (b, h, t, t), &dev).unwrap();
        let mut bias = vec![0f32; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || (bi == 1 && j == t - 1) {
                        bias[(bi * t + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, t), &dev).unwrap();
        let scale = 0.125;
        let fused = cpu_scaled_masked_softmax(&scores, &bias, scale)
            .unwrap()
            .expect("CPU f32 path");
        let reference =
            candle_nn::ops::softmax_last_dim(&(&scores * scale).unwrap().broadcast_add(&bias).unwrap()).unwrap();
        let (f, r) = (values(&fused), values(&reference));
        assert!(max_abs_diff(&f, &r) <= 1e-6, "max diff {}", max_abs_diff(&f, &r));
        // Masked entries are exactly zero and every row sums to one.
        assert_eq!(f[1], 0.0);
        for row in f.chunks(t) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        // A bias that does not broadcast as [B, 1, T, S] is left to candle.
        let wrong = Tensor::zeros((1, 1, t, t), DType::F32, &dev).unwrap();
        assert!(cpu_scaled_masked_softmax(&scores, &wrong, scale).unwrap().is_none());
    }

    /// The fused SiLU product equals candle's `silu(gate) * up`, and non-f32 inputs take candle's
    /// ops with the same result.
    #[test]
    fn fused_silu_mul_matches_candle_ops() {
        let dev = Device::Cpu;
        let gate = Tensor::randn(0f32, 4.0, (3, 7, 10_000), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (3, 7, 10_000), &dev).unwrap();
        let fused = silu_mul(&gate, &up).unwrap();
        let reference = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        assert_eq!(fused.dims(), reference.dims());
        assert!(max_abs_diff(&values(&fused), &values(&reference)) <= 1e-6);
        let g64 = gate.to_dtype(DType::F64).unwrap();
        let u64 = up.to_dtype(DType::F64).unwrap();
        let other = silu_mul(&g64, &u64).unwrap().to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&values(&other), &values(&reference)) <= 1e-5);
    }
}
