//! GGUF files: llama.cpp's metadata and tensor names translated into a Hugging Face config and
//! Hugging Face tensor names (dequantized to f32, llama.cpp's conversions undone, then in the
//! compute dtype), so the
//! architecture files see one format. The per-architecture tables live here.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::Device;
use candle_core::Tensor;
use serde_json::{json, Value};

use super::LoadedModel;
use crate::model::arch;
use crate::model::config::Config;
use crate::model::dtype::{DtypeChoice, Stored};
use crate::model::weights::Weights;
use crate::tokenizer::Tokenizer;

pub(super) fn load_gguf(path: &Path, device: &Device, choice: DtypeChoice) -> Result<LoadedModel> {
    let mut file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let content =
        gguf_file::Content::read(&mut file).map_err(|e| anyhow!("{}: not a valid GGUF file ({e})", path.display()))?;
    let arch = meta_str(&content, "general.architecture")
        .ok_or_else(|| anyhow!("{}: no general.architecture", path.display()))?;
    if !arch::REGISTRY.iter().any(|a| a.gguf.contains(&arch.as_str())) {
        bail!(
            "{}: unsupported GGUF architecture '{arch}' (supported: {})",
            path.display(),
            arch::REGISTRY
                .iter()
                .flat_map(|a| a.gguf.iter().copied())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let cfg = Config::from_value(gguf_config(&content, &arch, path)?, path.to_path_buf());
    let dtype = choice.resolve(device, Stored::Gguf)?;
    let (tensors, storage) = gguf_tensors(&content, &mut file, &arch, &cfg, path, device, dtype)?;
    let weights = Weights::new(tensors, path.to_path_buf(), storage.clone(), dtype);
    let model = arch::build(&cfg, &weights, device)?;
    let inner =
        crate::tokenizer::gguf::tokenizer_from_gguf(&content).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let model_kind = meta_str(&content, "tokenizer.ggml.model").unwrap_or_default();
    let tokenizer = Tokenizer::wrap(inner, format!("gguf:{model_kind}"));
    tokenizer.check_fits(model.info().vocab_size, path)?;
    Ok(LoadedModel {
        model,
        tokenizer: Some(tokenizer),
        path: path.to_path_buf(),
        format: "gguf".into(),
        storage,
    })
}

fn meta_str(content: &gguf_file::Content, key: &str) -> Option<String> {
    content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned()
}

fn meta_num(content: &gguf_file::Content, key: &str) -> Option<Value> {
    use gguf_file::Value as G;
    Some(match content.metadata.get(key)? {
        G::U8(x) => json!(x),
        G::I8(x) => json!(x),
        G::U16(x) => json!(x),
        G::I16(x) => json!(x),
        G::U32(x) => json!(x),
        G::I32(x) => json!(x),
        G::U64(x) => json!(x),
        G::I64(x) => json!(x),
        G::F32(x) => json!(x),
        G::F64(x) => json!(x),
        _ => return None,
    })
}

/// GGUF metadata in the shape of a Hugging Face config.json.
fn gguf_config(content: &gguf_file::Content, arch: &str, path: &Path) -> Result<Value> {
    let need = |key: &str| -> Result<Value> {
        meta_num(content, &format!("{arch}.{key}"))
            .ok_or_else(|| anyhow!("{}: GGUF metadata lacks '{arch}.{key}'", path.display()))
    };
    let opt = |key: &str| meta_num(content, &format!("{arch}.{key}"));
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| anyhow!("{}: GGUF has no token_embd.weight", path.display()))?;
    let vocab = match embd.shape.dims() {
        [vocab, _] => *vocab,
        dims => bail!(
            "{}: GGUF tensor token_embd.weight has shape {dims:?}, expected [vocabulary, width]",
            path.display()
        ),
    };
    for key in ["attention.head_count", "attention.head_count_kv"] {
        if opt(key).is_some_and(|v| v.as_u64() == Some(0)) {
            bail!(
                "{}: GGUF metadata '{arch}.{key}' is 0; it must be at least 1",
                path.display()
            );
        }
    }
    let mut cfg = json!({
        "hidden_size": need("embedding_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": need("attention.head_count")?,
        "num_key_value_heads": opt("attention.head_count_kv").unwrap_or(need("attention.head_count")?),
        "intermediate_size": need("feed_forward_length")?,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon")?,
        "max_position_embeddings": need("context_length")?,
        "vocab_size": vocab,
    });
    if let Some(hd) = opt("attention.key_length") {
        cfg["head_dim"] = hd;
    }
    match arch {
        "llama" => {
            cfg["model_type"] = json!("llama");
            cfg["rope_theta"] = opt("rope.freq_base").unwrap_or(json!(10000.0));
        }
        "gemma3" => {
            cfg["model_type"] = json!("gemma3_text");
            cfg["rope_theta"] = opt("rope.freq_base").unwrap_or(json!(1_000_000.0));
            // llama.cpp fixes these for Gemma 3 rather than storing them.
            cfg["rope_local_base_freq"] = json!(10000.0);
            cfg["sliding_window_pattern"] = json!(6);
            cfg["sliding_window"] = opt("attention.sliding_window").unwrap_or(json!(512));
            if let Some(hd) = cfg.get("head_dim").cloned() {
                cfg["query_pre_attn_scalar"] = hd;
            }
            if let Some(scale) = opt("rope.scaling.factor") {
                cfg["rope_scaling"] = json!({"rope_type": "linear", "factor": scale});
            }
        }
        other => bail!(
            "{}: unsupported GGUF architecture '{other}' (supported: llama, gemma3)",
            path.display()
        ),
    }
    Ok(cfg)
}

/// Hugging Face name of a GGUF tensor, or None for tensors the runtime does not use.
fn hf_name(gguf: &str, arch: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match (part, arch) {
        ("attn_norm", _) => "input_layernorm",
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("attn_q_norm", _) => "self_attn.q_norm",
        ("attn_k_norm", _) => "self_attn.k_norm",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        ("ffn_norm", "gemma3") => "pre_feedforward_layernorm",
        ("ffn_norm", _) => "post_attention_layernorm",
        ("post_attention_norm", _) => "post_attention_layernorm",
        ("post_ffw_norm", _) => "post_feedforward_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Reads, dequantizes and renames every tensor, undoing llama.cpp's conversions so the
/// architecture files see Hugging Face tensors.
#[allow(clippy::too_many_arguments)]
fn gguf_tensors(
    content: &gguf_file::Content,
    file: &mut File,
    arch: &str,
    cfg: &Config,
    path: &Path,
    device: &Device,
    dtype: candle_core::DType,
) -> Result<(HashMap<String, Tensor>, String)> {
    let count = |key: &str| -> Result<usize> {
        match cfg.get(key).and_then(|v| v.as_u64()) {
            Some(n) if n > 0 => Ok(n as usize),
            _ => bail!("{}: GGUF metadata: {key} must be a positive integer", path.display()),
        }
    };
    let n_heads = count("num_attention_heads")?;
    let n_kv = count("num_key_value_heads")?;
    let mut tensors = HashMap::new();
    let mut types: HashMap<String, usize> = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name, arch) else {
            continue;
        };
        let info = &content.tensor_infos[name];
        *types.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
        let q = content
            .tensor(file, name, device)
            .map_err(|e| anyhow!("{}: tensor {name}: {e}", path.display()))?;
        let mut t = q
            .dequantize(device)
            .map_err(|e| anyhow!("{}: tensor {name}: {e}", path.display()))?;
        if arch == "llama" && (hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight")) {
            let heads = if hf.ends_with("q_proj.weight") { n_heads } else { n_kv };
            t = unpermute_qk(&t, heads)?;
        }
        if arch == "gemma3" && hf.contains("norm.weight") {
            // llama.cpp stores Gemma's norm multiplier 1 + w; the model file expects w.
            t = (t - 1.0)?;
        }
        // Dequantized (and un-permuted) in f32, then rounded once to the compute dtype.
        if t.dtype() != dtype {
            t = t.to_dtype(dtype)?;
        }
        tensors.insert(hf, t);
    }
    let mut storage: Vec<String> = types.into_iter().map(|(k, v)| format!("{k} x {v}")).collect();
    storage.sort();
    Ok((tensors, storage.join(", ")))
}

/// Inverse of llama.cpp's `permute`, which interleaves the two halves of every head's rows so
/// that GGML's interleaved RoPE matches the half-split RoPE of the original.
fn unpermute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if n_heads == 0 || !out.is_multiple_of(2 * n_heads) {
        bail!("a q/k projection of {out} rows cannot be split into {n_heads} rotary heads");
    }
    let hd = out / n_heads;
    Ok(w.reshape((n_heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    fn content(embd_shape: &[usize]) -> gguf_file::Content {
        let mut tensor_infos = HashMap::new();
        tensor_infos.insert(
            "token_embd.weight".to_string(),
            gguf_file::TensorInfo {
                ggml_dtype: GgmlDType::F32,
                shape: candle_core::Shape::from_dims(embd_shape),
                offset: 0,
            },
        );
        let mut metadata = HashMap::new();
        for (k, v) in [
            ("llama.embedding_length", 8u32),
            ("llama.block_count", 1),
            ("llama.attention.head_count", 2),
            ("llama.feed_forward_length", 16),
            ("llama.context_length", 32),
        ] {
            metadata.insert(k.to_string(), gguf_file::Value::U32(v));
        }
        metadata.insert(
            "llama.attention.layer_norm_rms_epsilon".to_string(),
            gguf_file::Value::F32(1e-5),
        );
        gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos,
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn a_zero_dimensional_token_embedding_is_an_error() {
        let e = gguf_config(&content(&[]), "llama", Path::new("m.gguf"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.gguf") && e.contains("token_embd.weight") && e.contains("[]"),
            "{e}"
        );
        let cfg = gguf_config(&content(&[100, 8]), "llama", Path::new("m.gguf")).unwrap();
        assert_eq!(cfg["vocab_size"], 100);
    }

    #[test]
    fn zero_attention_heads_are_an_error() {
        for key in ["llama.attention.head_count", "llama.attention.head_count_kv"] {
            let mut c = content(&[100, 8]);
            c.metadata.insert(key.to_string(), gguf_file::Value::U32(0));
            let e = gguf_config(&c, "llama", Path::new("m.gguf")).unwrap_err().to_string();
            assert!(e.contains("m.gguf") && e.contains(key), "{e}");
        }
    }

    #[test]
    fn unpermute_refuses_heads_that_do_not_divide_the_rows() {
        let w = Tensor::zeros((6, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(unpermute_qk(&w, 0).is_err());
        assert!(unpermute_qk(&w, 2).is_err());
        assert!(unpermute_qk(&w, 3).is_ok());
    }
}
