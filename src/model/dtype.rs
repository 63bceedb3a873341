//! The compute dtype (`--dtype auto|f32|bf16|f16`) and what `auto` resolves to.
//!
//! Weights are loaded in the compute dtype; GEMMs, embeddings, RoPE, activations and residual
//! adds run in it (as PyTorch does with `torch_dtype`). Norms and the attention softmax run in
//! f32 (upcast, compute, cast back) and logits leave the model as f32, so every consumer of the
//! model's output scores in f32. Hidden states leave `collect` as f32. Nothing changes dtype
//! silently: an explicit `--dtype` is what runs, and `auto` is stated in `ModelInfo::dtype`.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    /// f32 on the CPU (exact, today's behaviour); on a GPU the checkpoint's stored float dtype
    /// (bf16 / f16; f32 checkpoints stay f32), and bf16 for GGUF (dequantized).
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

/// How a checkpoint's weights are stored, as far as `auto` cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Safetensors whose float tensors are mostly (by element count) of this dtype.
    Float(DType),
    /// GGUF (quantized or not): dequantized to f32 first.
    Gguf,
}

impl DtypeChoice {
    /// The `--dtype` name.
    pub fn name(self) -> &'static str {
        match self {
            DtypeChoice::Auto => "auto",
            DtypeChoice::F32 => "f32",
            DtypeChoice::Bf16 => "bf16",
            DtypeChoice::F16 => "f16",
        }
    }

    /// Parses a `--dtype` name (also the label [`label`] writes into manifests).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "auto" => DtypeChoice::Auto,
            "f32" => DtypeChoice::F32,
            "bf16" => DtypeChoice::Bf16,
            "f16" => DtypeChoice::F16,
            other => bail!("--dtype takes auto, f32, bf16 or f16, not '{other}'"),
        })
    }

    /// The compute dtype for a checkpoint stored as `stored` on `device`.
    pub fn resolve(self, device: &Device, stored: Stored) -> Result<DType> {
        Ok(self.resolve_on(!device.is_cpu(), stored))
    }

    /// [`DtypeChoice::resolve`] on a GPU (`gpu`) or the CPU.
    pub fn resolve_on(self, gpu: bool, stored: Stored) -> DType {
        match self {
            DtypeChoice::F32 => DType::F32,
            DtypeChoice::Bf16 => DType::BF16,
            DtypeChoice::F16 => DType::F16,
            DtypeChoice::Auto if !gpu => DType::F32,
            DtypeChoice::Auto => match stored {
                Stored::Float(DType::BF16) => DType::BF16,
                Stored::Float(DType::F16) => DType::F16,
                Stored::Float(_) => DType::F32,
                // Dequantized GGUF weights are exact in f32; bf16 is what runs fast on a GPU
                // (its deviation from f32 is the bf16 rounding of the weights and activations).
                Stored::Gguf => DType::BF16,
            },
        }
    }
}

/// The manifest / `inspect` name of a compute dtype.
pub fn label(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// Whether a stored tensor dtype is floating point (convertible to a compute dtype).
pub fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

/// Where and in which dtype to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DtypeChoice,
    /// The devices the blocks are split across (`--device cuda:0,cuda:1`; two or more, the first
    /// equal to `device`); empty: the whole model on `device`.
    pub split: Vec<Device>,
}

impl LoadOptions {
    /// `auto` dtype on `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            dtype: DtypeChoice::Auto,
            split: Vec::new(),
        }
    }

    /// `auto` dtype on `devices`: one device, or the blocks split across several
    /// ([`crate::device::parse_list`]).
    pub fn on(devices: &[Device]) -> Self {
        Self {
            device: devices[0].clone(),
            dtype: DtypeChoice::Auto,
            split: if devices.len() > 1 {
                devices.to_vec()
            } else {
                Vec::new()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_f32_on_the_cpu_and_explicit_choices_win() {
        let cpu = Device::Cpu;
        for stored in [Stored::Float(DType::BF16), Stored::Float(DType::F16), Stored::Gguf] {
            assert_eq!(DtypeChoice::Auto.resolve(&cpu, stored).unwrap(), DType::F32);
            assert_eq!(DtypeChoice::Bf16.resolve(&cpu, stored).unwrap(), DType::BF16);
            assert_eq!(DtypeChoice::F16.resolve(&cpu, stored).unwrap(), DType::F16);
            assert_eq!(DtypeChoice::F32.resolve(&cpu, stored).unwrap(), DType::F32);
        }
        let on_gpu = |s| DtypeChoice::Auto.resolve_on(true, s);
        assert_eq!(on_gpu(Stored::Float(DType::BF16)), DType::BF16);
        assert_eq!(on_gpu(Stored::Float(DType::F16)), DType::F16);
        assert_eq!(on_gpu(Stored::Float(DType::F32)), DType::F32);
        assert_eq!(on_gpu(Stored::Float(DType::F64)), DType::F32);
        assert_eq!(on_gpu(Stored::Gguf), DType::BF16);
        for c in [DtypeChoice::Auto, DtypeChoice::F32, DtypeChoice::Bf16, DtypeChoice::F16] {
            assert_eq!(DtypeChoice::parse(c.name()).unwrap(), c);
        }
        let e = DtypeChoice::parse("int8").unwrap_err().to_string();
        assert!(e.contains("--dtype") && e.contains("int8"), "{e}");
    }
}
