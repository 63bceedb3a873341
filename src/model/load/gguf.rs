//! GGUF files: llama.cpp's metadata and tensor names translated into a Hugging Face config and
//! Hugging Face tensor names (dequantized to f32, llama.cpp's conversions undone), so the
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
use crate::model::weights::Weights;
use crate::tokenizer::Tokenizer;

pub(super) fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel> {
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
    let (tensors, storage) = gguf_tensors(&content, &mut file, &arch, &cfg, path, device)?;
    let weights = Weights::new(tensors, path.to_path_buf(), storage.clone());
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

fn meta_bool(content: &gguf_file::Content, key: &str) -> Option<bool> {
    match content.metadata.get(key)? {
        gguf_file::Value::Bool(b) => Some(*b),
        _ => None,
    }
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
        "max_position_embeddings": need("context_length")?,
        "vocab_size": vocab,
    });
    if arch == "gptneox" {
        cfg["layer_norm_eps"] = need("attention.layer_norm_epsilon")?;
    } else {
        cfg["rms_norm_eps"] = need("attention.layer_norm_rms_epsilon")?;
    }
    if let Some(hd) = opt("attention.key_length") {
        cfg["head_dim"] = hd;
    }
    let head_dim = match (
        cfg.get("head_dim").and_then(Value::as_f64),
        cfg["hidden_size"].as_f64(),
        cfg["num_attention_heads"].as_f64(),
    ) {
        (Some(hd), _, _) => hd,
        (None, Some(d), Some(h)) => (d / h).floor(),
        _ => bail!(
            "{}: GGUF metadata: embedding_length and attention.head_count must be numbers",
            path.display()
        ),
    };
    // llama.cpp stores the rotated dims; transformers a fraction of the head.
    let partial_rotary = opt("rope.dimension_count")
        .and_then(|v| v.as_f64())
        .map(|n| n / head_dim);
    match arch {
        "llama" => {
            cfg["model_type"] = json!("llama");
            cfg["rope_theta"] = opt("rope.freq_base").unwrap_or(json!(10000.0));
            // Mixtral is llama.cpp's "llama" with experts.
            if let Some(n) = opt("expert_count").filter(|n| n.as_u64().is_some_and(|n| n > 0)) {
                cfg["model_type"] = json!("mixtral");
                cfg["num_local_experts"] = n;
                cfg["num_experts_per_tok"] = need("expert_used_count")?;
            }
        }
        "qwen3" | "olmo2" => {
            cfg["model_type"] = json!(arch);
            cfg["rope_theta"] = opt("rope.freq_base").unwrap_or(json!(if arch == "qwen3" { 1_000_000.0 } else { 500_000.0 }));
        }
        "gemma2" => {
            cfg["model_type"] = json!("gemma2");
            cfg["rope_theta"] = opt("rope.freq_base").unwrap_or(json!(10000.0));
            cfg["sliding_window"] = opt("attention.sliding_window").unwrap_or(json!(4096));
            for (ours, theirs) in [
                ("attn_logit_softcapping", "attn_logit_softcapping"),
                ("final_logit_softcapping", "final_logit_softcapping"),
            ] {
                if let Some(v) = opt(theirs) {
                    cfg[ours] = v;
                }
            }
            // llama.cpp scales by head_dim^-1/2 (27B: (d / heads)^-1/2, not stored).
            cfg["query_pre_attn_scalar"] = json!(head_dim);
        }
        "phi3" => {
            cfg["model_type"] = json!("phi3");
            cfg["rope_theta"] = opt("rope.freq_base").unwrap_or(json!(10000.0));
            if let Some(f) = partial_rotary {
                cfg["partial_rotary_factor"] = json!(f);
            }
            if let Some(w) = opt("attention.sliding_window") {
                cfg["sliding_window"] = w;
            }
            if content.tensor_infos.contains_key("rope_factors_long.weight") {
                bail!(
                    "{}: GGUF phi3 with LongRoPE factors (rope_factors_long.weight) is not supported yet; use the Hugging Face folder",
                    path.display()
                );
            }
        }
        "gptneox" => {
            cfg["model_type"] = json!("gpt_neox");
            cfg["rotary_emb_base"] = opt("rope.freq_base").unwrap_or(json!(10000.0));
            cfg["rotary_pct"] = json!(partial_rotary.unwrap_or(1.0));
            cfg["use_parallel_residual"] = json!(meta_bool(content, "gptneox.use_parallel_residual").unwrap_or(true));
            cfg["tie_word_embeddings"] = json!(false);
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
            "{}: unsupported GGUF architecture '{other}' (supported: llama, gemma3, gemma2, qwen3, olmo2, phi3, gptneox)",
            path.display()
        ),
    }
    Ok(cfg)
}

/// Hugging Face name of a GGUF tensor, or None for tensors the runtime does not use. Stacked
/// expert tensors (`ffn_*_exps`) map to `...experts.{E}.w*.weight`, split per expert by
/// `gguf_tensors`.
fn hf_name(gguf: &str, arch: &str) -> Option<String> {
    if arch == "gptneox" {
        return neox_name(gguf);
    }
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
        ("ffn_gate_inp", _) => "block_sparse_moe.gate",
        ("ffn_gate_exps", _) => "block_sparse_moe.experts.{E}.w1",
        ("ffn_up_exps", _) => "block_sparse_moe.experts.{E}.w3",
        ("ffn_down_exps", _) => "block_sparse_moe.experts.{E}.w2",
        ("attn_qkv", "phi3") => "self_attn.qkv_proj",
        ("ffn_up", "phi3") => "mlp.gate_up_proj",
        ("ffn_norm", "gemma2") => "pre_feedforward_layernorm",
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

/// GPT-NeoX names: `gpt_neox.` prefix, LayerNorm biases, fused `attn_qkv`.
fn neox_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("gpt_neox.embed_in.weight"),
        "output_norm.weight" => Some("gpt_neox.final_layer_norm.weight"),
        "output_norm.bias" => Some("gpt_neox.final_layer_norm.bias"),
        "output.weight" => Some("embed_out.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_qkv" => "attention.query_key_value",
        "attn_output" => "attention.dense",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_up" => "mlp.dense_h_to_4h",
        "ffn_down" => "mlp.dense_4h_to_h",
        _ => return None,
    };
    Some(format!("gpt_neox.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp's converter reorders NeoX's fused rows [heads, 3, head_dim] to q | k | v; this
/// puts them back (weight [3d, d] or bias [3d]).
fn neox_qkv_from_gguf(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if n_heads == 0 || !rows.is_multiple_of(3 * n_heads) {
        bail!("a fused qkv of {rows} rows cannot be split into 3 x {n_heads} heads");
    }
    let mut shape = vec![3, n_heads, rows / (3 * n_heads)];
    shape.extend(&dims[1..]);
    Ok(t.reshape(shape)?.transpose(0, 1)?.contiguous()?.reshape(dims)?)
}

/// Reads, dequantizes and renames every tensor, undoing llama.cpp's conversions so the
/// architecture files see Hugging Face tensors.
fn gguf_tensors(
    content: &gguf_file::Content,
    file: &mut File,
    arch: &str,
    cfg: &Config,
    path: &Path,
    device: &Device,
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
        if arch == "gptneox" && hf.contains("query_key_value") {
            t = neox_qkv_from_gguf(&t, n_heads)?;
        }
        if hf.contains("{E}") {
            // Stacked experts [E, out, in]: one tensor per expert, as Mixtral checkpoints have.
            for e in 0..t.dim(0)? {
                tensors.insert(hf.replace("{E}", &e.to_string()), t.get(e)?);
            }
            continue;
        }
        if arch == "llama" && (hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight")) {
            let heads = if hf.ends_with("q_proj.weight") { n_heads } else { n_kv };
            t = unpermute_qk(&t, heads)?;
        }
        if (arch == "gemma3" || arch == "gemma2") && hf.contains("norm.weight") {
            // llama.cpp stores Gemma's norm multiplier 1 + w; the model file expects w.
            t = (t - 1.0)?;
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

    /// The llama.cpp names of each new architecture land on the names its family file loads.
    #[test]
    fn tensor_names_of_the_issue_14_architectures() {
        for (gguf, arch, hf) in [
            (
                "blk.3.attn_q_norm.weight",
                "qwen3",
                "model.layers.3.self_attn.q_norm.weight",
            ),
            (
                "blk.0.ffn_norm.weight",
                "qwen3",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                "blk.1.post_attention_norm.weight",
                "olmo2",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                "blk.1.post_ffw_norm.weight",
                "olmo2",
                "model.layers.1.post_feedforward_layernorm.weight",
            ),
            (
                "blk.1.attn_k_norm.weight",
                "olmo2",
                "model.layers.1.self_attn.k_norm.weight",
            ),
            (
                "blk.2.ffn_norm.weight",
                "gemma2",
                "model.layers.2.pre_feedforward_layernorm.weight",
            ),
            (
                "blk.2.post_ffw_norm.weight",
                "gemma2",
                "model.layers.2.post_feedforward_layernorm.weight",
            ),
            (
                "blk.0.attn_qkv.weight",
                "phi3",
                "model.layers.0.self_attn.qkv_proj.weight",
            ),
            ("blk.0.ffn_up.weight", "phi3", "model.layers.0.mlp.gate_up_proj.weight"),
            (
                "blk.0.ffn_gate_inp.weight",
                "llama",
                "model.layers.0.block_sparse_moe.gate.weight",
            ),
            (
                "blk.4.ffn_down_exps.weight",
                "llama",
                "model.layers.4.block_sparse_moe.experts.{E}.w2.weight",
            ),
            ("token_embd.weight", "gptneox", "gpt_neox.embed_in.weight"),
            ("output.weight", "gptneox", "embed_out.weight"),
            ("output_norm.bias", "gptneox", "gpt_neox.final_layer_norm.bias"),
            (
                "blk.5.attn_qkv.bias",
                "gptneox",
                "gpt_neox.layers.5.attention.query_key_value.bias",
            ),
            (
                "blk.5.ffn_norm.weight",
                "gptneox",
                "gpt_neox.layers.5.post_attention_layernorm.weight",
            ),
            (
                "blk.5.ffn_up.weight",
                "gptneox",
                "gpt_neox.layers.5.mlp.dense_h_to_4h.weight",
            ),
        ] {
            assert_eq!(hf_name(gguf, arch).as_deref(), Some(hf), "{arch} {gguf}");
        }
        assert_eq!(hf_name("rope_factors_long.weight", "phi3"), None);
    }

    /// q | k | v rows (llama.cpp) back to NeoX's per-head [heads, 3, head_dim], the inverse of
    /// the split the family file does.
    #[test]
    fn neox_qkv_round_trip() {
        // heads 2, head_dim 2: q = 0..4, k = 4..8, v = 8..12 in llama.cpp's order.
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap();
        let neox = neox_qkv_from_gguf(&t, 2).unwrap();
        assert_eq!(
            neox.to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0, 4.0, 5.0, 8.0, 9.0, 2.0, 3.0, 6.0, 7.0, 10.0, 11.0]
        );
        let [q, k, v] = crate::model::arch::gpt_neox::split_qkv(&neox, 2, 2).unwrap();
        assert_eq!(q.to_vec1::<f32>().unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(k.to_vec1::<f32>().unwrap(), vec![4.0, 5.0, 6.0, 7.0]);
        assert_eq!(v.to_vec1::<f32>().unwrap(), vec![8.0, 9.0, 10.0, 11.0]);
        assert!(neox_qkv_from_gguf(&t, 5).is_err());
    }

    /// Metadata of a Mixtral GGUF (llama with experts) and a GPT-NeoX one.
    #[test]
    fn configs_of_mixtral_and_gptneox() {
        let mut c = content(&[100, 8]);
        c.metadata.insert("llama.expert_count".into(), gguf_file::Value::U32(4));
        c.metadata
            .insert("llama.expert_used_count".into(), gguf_file::Value::U32(2));
        let cfg = gguf_config(&c, "llama", Path::new("m.gguf")).unwrap();
        assert_eq!(
            (cfg["model_type"].as_str(), cfg["num_local_experts"].as_u64()),
            (Some("mixtral"), Some(4))
        );
        assert_eq!(cfg["num_experts_per_tok"], 2);
        let mut n = content(&[100, 8]);
        n.metadata = n
            .metadata
            .into_iter()
            .filter(|(k, _)| !k.contains("rms"))
            .map(|(k, v)| (k.replace("llama.", "gptneox."), v))
            .collect();
        n.metadata.insert(
            "gptneox.attention.layer_norm_epsilon".into(),
            gguf_file::Value::F32(1e-5),
        );
        n.metadata
            .insert("gptneox.rope.dimension_count".into(), gguf_file::Value::U32(1));
        n.metadata
            .insert("gptneox.use_parallel_residual".into(), gguf_file::Value::Bool(false));
        let cfg = gguf_config(&n, "gptneox", Path::new("m.gguf")).unwrap();
        assert_eq!(cfg["model_type"], "gpt_neox");
        assert_eq!(cfg["rotary_pct"], 0.25); // 1 of 8 / 2 heads = 4 dims
        assert_eq!(cfg["use_parallel_residual"], false);
        let e = gguf_config(&n, "olmo2", Path::new("m.gguf")).unwrap_err().to_string();
        assert!(e.contains("olmo2.embedding_length"), "{e}");
    }

    #[test]
    fn unpermute_refuses_heads_that_do_not_divide_the_rows() {
        let w = Tensor::zeros((6, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(unpermute_qk(&w, 0).is_err());
        assert!(unpermute_qk(&w, 2).is_err());
        assert!(unpermute_qk(&w, 3).is_ok());
    }
}
