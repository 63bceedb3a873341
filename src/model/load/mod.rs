//! Finding and loading a model: a Hugging Face folder, a model id in the local Hugging Face
//! cache, or a GGUF file (dequantized to f32 so it computes what the reference computes).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::model::arch::{bert::Bert, gemma3::Gemma3, gpt2::Gpt2, llama::Llama};
use crate::model::config::Config;
use crate::model::weights::Weights;
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;

/// A model ready to run, with its tokenizer and where it came from.
pub struct LoadedModel {
    pub model: Box<dyn Transformer>,
    pub tokenizer: Option<Tokenizer>,
    /// The file or folder the weights were read from.
    pub path: PathBuf,
    /// "safetensors" or "gguf".
    pub format: String,
    /// How the stored weights were encoded.
    pub storage: String,
}

impl LoadedModel {
    /// The tokenizer, or an error naming the model when it has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| anyhow!("{}: no tokenizer.json next to the model", self.path.display()))
    }
}

/// Loads MODEL: a folder, a `.gguf` file, or a hub id (`org/name`) found in the local cache.
pub fn load_model(spec: &str, device: &Device) -> Result<LoadedModel> {
    let path = resolve(spec)?;
    if path.is_dir() {
        load_folder(&path, device)
    } else if is_gguf(&path)? {
        load_gguf(&path, device)
    } else if path.extension().is_some_and(|e| e == "safetensors") {
        let dir = path.parent().unwrap_or(Path::new("."));
        load_folder(dir, device)
    } else {
        bail!(
            "{}: not a model folder, a .gguf file or a .safetensors file",
            path.display()
        )
    }
}

/// Turns MODEL into a path: as given if it exists, else a snapshot in the HF cache.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    let roots = hf_cache_roots();
    if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/') {
        let folder = format!("models--{}", spec.replace('/', "--"));
        for root in &roots {
            let repo = root.join(&folder);
            if let Some(snap) = snapshot(&repo) {
                return Ok(snap);
            }
        }
    }
    let looked: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    bail!(
        "{spec}: no such file or folder, and no such model in the Hugging Face cache (looked in {})",
        looked.join(", ")
    )
}

fn hf_cache_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(c) = std::env::var("HF_HUB_CACHE") {
        roots.push(PathBuf::from(c));
    }
    if let Ok(h) = std::env::var("HF_HOME") {
        roots.push(PathBuf::from(h).join("hub"));
    }
    if let Ok(home) = std::env::var("HOME") {
        roots.push(PathBuf::from(home).join(".cache/huggingface/hub"));
    }
    roots
}

/// The snapshot `refs/main` points to, else the only (or newest) snapshot.
fn snapshot(repo: &Path) -> Option<PathBuf> {
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let s = repo.join("snapshots").join(rev.trim());
        if s.is_dir() {
            return Some(s);
        }
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(repo.join("snapshots"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    snaps.sort_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    snaps.pop()
}

fn is_gguf(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut magic = [0u8; 4];
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

/// Builds the architecture named by the config's `model_type`.
pub fn build(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    let model_type = cfg.str_or("model_type", "")?;
    Ok(match model_type {
        "llama" | "mistral" | "qwen2" => Box::new(Llama::load(cfg, w, device)?),
        "gemma3" | "gemma3_text" => Box::new(Gemma3::load(cfg, w, device)?),
        "gpt2" => Box::new(Gpt2::load(cfg, w, device)?),
        "bert" => Box::new(Bert::load(cfg, w, device)?),
        "" => bail!("{}: no model_type field", cfg.path.display()),
        other => bail!(
            "{}: unknown architecture '{other}' (supported: llama, mistral, qwen2, gemma3, gpt2, bert)",
            cfg.path.display()
        ),
    })
}

fn load_folder(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        bail!("{}: no config.json in the model folder", dir.display());
    }
    let cfg = Config::read(&config_path)?;
    let shards = safetensors_files(dir)?;
    let weights = Weights::from_safetensors(&shards, device)?;
    let model = build(&cfg, &weights, device)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        let t = Tokenizer::from_file(&tok_path)?;
        t.check_fits(model.info().vocab_size, &tok_path)?;
        Some(t)
    } else {
        None
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        path: dir.to_path_buf(),
        format: "safetensors".into(),
        storage: weights.storage.clone(),
    })
}

/// The shards named by model.safetensors.index.json, else model.safetensors, else every
/// *.safetensors in the folder.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .map_err(|e| anyhow!("{}: not valid JSON ({e})", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.exists()) {
            bail!(
                "{}: shard {} listed in the index is missing",
                index.display(),
                missing.display()
            );
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .safetensors weights in the model folder", dir.display());
    }
    Ok(files)
}

fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel> {
    let mut file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let content =
        gguf_file::Content::read(&mut file).map_err(|e| anyhow!("{}: not a valid GGUF file ({e})", path.display()))?;
    let arch = meta_str(&content, "general.architecture")
        .ok_or_else(|| anyhow!("{}: no general.architecture", path.display()))?;
    let cfg = Config::from_value(gguf_config(&content, &arch, path)?, path.to_path_buf());
    let (tensors, storage) = gguf_tensors(&content, &mut file, &arch, &cfg, path, device)?;
    let weights = Weights::new(tensors, path.to_path_buf(), storage.clone());
    let model = build(&cfg, &weights, device)?;
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
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| anyhow!("{}: GGUF has no token_embd.weight", path.display()))?;
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
fn gguf_tensors(
    content: &gguf_file::Content,
    file: &mut File,
    arch: &str,
    cfg: &Config,
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, String)> {
    let n_heads = cfg.usize("num_attention_heads")?;
    let n_kv = cfg.usize("num_key_value_heads")?;
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
    let hd = out / n_heads;
    Ok(w.reshape((n_heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// What `jumplens inspect` prints about a model.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub path: String,
    pub format: String,
    #[serde(flatten)]
    pub info: super::ModelInfo,
    pub storage: String,
    pub tokenizer: String,
}

impl LoadedModel {
    pub fn summary(&self) -> Summary {
        Summary {
            path: self.path.display().to_string(),
            format: self.format.clone(),
            info: self.model.info().clone(),
            storage: self.storage.clone(),
            tokenizer: self
                .tokenizer
                .as_ref()
                .map(|t| t.kind.clone())
                .unwrap_or_else(|| "none".into()),
        }
    }

    /// Token ids of `text` (with the tokenizer's special tokens), checked against the context.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.tokenizer()?.encode(text)?;
        if ids.is_empty() {
            bail!("the text tokenizes to no tokens");
        }
        let max = self.model.info().max_positions;
        if ids.len() > max {
            bail!(
                "the text has {} tokens but {}'s context is {max}",
                ids.len(),
                self.path.display()
            );
        }
        Ok(ids)
    }

    /// Runs one text and returns its token ids, h_0..h_L [L+1, T, d] and, when the model has a
    /// head, the logits [T, V]. `mask_position` replaces that token by [MASK] first.
    pub fn text_states(&self, text: &str, mask_position: Option<usize>) -> Result<TextStates> {
        let mut ids = self.encode(text)?;
        if let Some(i) = mask_position {
            let tok = self.tokenizer()?;
            let mask = tok
                .mask_id
                .ok_or_else(|| anyhow!("{}: the tokenizer has no [MASK] token", self.path.display()))?;
            if i >= ids.len() {
                bail!("mask position {i} is outside the text's {} tokens", ids.len());
            }
            ids[i] = mask;
        }
        let batch = super::Batch::from_sequences(
            std::slice::from_ref(&ids),
            self.tokenizer()?.pad_id,
            self.model.device(),
        )?;
        let states = super::hidden_states(self.model.as_ref(), &batch)?;
        let last = states.last().expect("at least h_0").clone();
        let hidden = Tensor::stack(&states, 0)?.squeeze(1)?;
        let logits = if self.model.info().has_lm_head {
            Some(self.model.readout(&last)?.squeeze(0)?)
        } else {
            None
        };
        Ok(TextStates {
            input_ids: ids,
            hidden_states: hidden,
            logits,
        })
    }
}

/// One text's forward pass.
pub struct TextStates {
    pub input_ids: Vec<u32>,
    /// [L+1, T, d], h_L before the final norm.
    pub hidden_states: Tensor,
    /// [T, V] when the model has a head.
    pub logits: Option<Tensor>,
}
