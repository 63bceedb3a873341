//! Right-padded batches of token ids and the per-batch state (attention masks) models reuse.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use super::transformer::AttentionKind;

/// A batch of right-padded token sequences.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids [B, T] (u32), padded with the tokenizer's pad id.
    pub input_ids: Tensor,
    /// Real length of each row.
    pub lengths: Vec<usize>,
    /// BERT segment ids [B, T]; zeros when absent.
    pub token_type_ids: Option<Tensor>,
}

impl Batch {
    /// Right-pads `sequences` with `pad_id` into one batch on `device`.
    pub fn from_sequences(sequences: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        if sequences.is_empty() {
            bail!("empty batch");
        }
        if let Some(i) = sequences.iter().position(|s| s.is_empty()) {
            bail!("sequence {i} of the batch has no tokens");
        }
        let t = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * t);
        for s in sequences {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad_id, t - s.len()));
        }
        let input_ids = Tensor::from_vec(ids, (sequences.len(), t), device)?;
        Ok(Self {
            input_ids,
            lengths: sequences.iter().map(|s| s.len()).collect(),
            token_type_ids: None,
        })
    }

    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.dims()[1]
    }

    /// Additive attention bias [B, 1, T, T]: 0 where query i may attend key j, -inf elsewhere.
    /// `window` limits causal attention to the last `window` keys (sliding-window layers).
    pub fn attention_bias(&self, kind: AttentionKind, window: Option<usize>, device: &Device) -> Result<Tensor> {
        let (b, t) = (self.batch_size(), self.seq_len());
        let mut bias = vec![0f32; b * t * t];
        for (row, &len) in self.lengths.iter().enumerate() {
            for i in 0..t {
                for j in 0..t {
                    let mut allowed = j < len;
                    if kind == AttentionKind::Causal {
                        allowed &= j <= i;
                        if let Some(w) = window {
                            // Key j is within the window of query i iff i - w < j; saturating so
                            // keys after the query (already excluded) cannot underflow.
                            allowed &= i.saturating_sub(j) < w;
                        }
                    }
                    if !allowed {
                        bias[(row * t + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
            if kind == AttentionKind::Causal {
                // Padded query rows past the sentence must still see one key, or softmax gives
                // NaN; they are never read, so let them see key 0.
                for i in len..t {
                    bias[(row * t + i) * t] = 0.0;
                }
            }
        }
        Ok(Tensor::from_vec(bias, (b, 1, t, t), device)?)
    }
}

/// How attention is masked for one batch: on the CPU the additive bias [B, 1, T, T] (candle's
/// softmax path); on a GPU only the row lengths, which the fused softmax
/// ([`crate::model::fused`]) turns into the same mask on the fly (the bias and its broadcast add
/// cost more than the rest of the softmax there).
#[derive(Debug, Clone)]
pub enum AttentionMask {
    Bias(Tensor),
    Fused(super::fused::MaskSpec),
}

impl Batch {
    /// The mask of `kind` (and `window`) for this batch on `device`, in the form the device's
    /// attention uses.
    pub fn attention_mask(&self, kind: AttentionKind, window: Option<usize>, device: &Device) -> Result<AttentionMask> {
        if device.is_cpu() {
            return Ok(AttentionMask::Bias(self.attention_bias(kind, window, device)?));
        }
        let lengths: Vec<u32> = self.lengths.iter().map(|&l| l as u32).collect();
        let n = lengths.len();
        Ok(AttentionMask::Fused(super::fused::MaskSpec {
            lengths: Tensor::from_vec(lengths, n, device)?,
            causal: kind == AttentionKind::Causal,
            window,
        }))
    }
}

/// Per-batch state a model precomputes once (attention masks) and reuses in every block.
pub struct BatchContext {
    pub seq_len: usize,
    /// Mask for full (global) attention layers.
    pub bias: AttentionMask,
    /// Mask for sliding-window layers, when the model has any.
    pub bias_local: Option<AttentionMask>,
    pub token_type_ids: Option<Tensor>,
    /// A model split across devices: `bias` and `bias_local` on each device after the first
    /// (index i - 1 for device i), built once per batch so no block copies a mask.
    pub split_bias: Vec<(AttentionMask, Option<AttentionMask>)>,
}

impl BatchContext {
    /// The full or sliding-window (`local`, when the batch has one) bias on device `index` of
    /// the model's placement (0 when unsplit).
    pub fn bias_on(&self, index: usize, local: bool) -> &AttentionMask {
        let (full, window) = match index {
            0 => (&self.bias, &self.bias_local),
            i => {
                let (f, w) = &self.split_bias[i - 1];
                (f, w)
            }
        };
        match (window, local) {
            (Some(w), true) => w,
            _ => full,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window keeps keys i - w < j <= i (and only real keys), also when the sentence is
    /// longer than the window (which used to underflow `i - j`).
    #[test]
    fn sliding_window_mask_on_inputs_longer_than_the_window() {
        let batch = Batch::from_sequences(&[vec![5; 7], vec![5; 4]], 0, &Device::Cpu).unwrap();
        let bias = batch
            .attention_bias(AttentionKind::Causal, Some(3), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (b, t) = (2, 7);
        assert_eq!(bias.len(), b * t * t);
        for (row, len) in [(0usize, 7usize), (1, 4)] {
            for i in 0..len {
                for j in 0..t {
                    let visible = bias[(row * t + i) * t + j] == 0.0;
                    let expected = j <= i && i < j + 3 && j < len;
                    assert_eq!(visible, expected, "row {row}, query {i}, key {j}");
                }
            }
        }
    }
}
