//! Phi-3 as a [`DecoderSpec`]: the Llama decoder with fused `qkv_proj` (rows q | k | v) and
//! `gate_up_proj` (rows gate | up), split at load; optional partial rotary
//! (`partial_rotary_factor`); optional sliding window; and LongRoPE (`rope_type` "longrope" or
//! the older "su"): frequency i is divided by `short_factor[i]`, or by `long_factor[i]` when the
//! padded batch is longer than `original_max_position_embeddings` (transformers chooses by the
//! largest position id, so the choice is per batch), and cos / sin are multiplied by
//! `attention_factor` (default sqrt(1 + ln(s) / ln(original)) with
//! s = max_position_embeddings / original_max_position_embeddings, 1 when s <= 1).

use anyhow::{anyhow, bail, Result};
use candle_core::Device;
use serde_json::Value;

use super::decoder::{Decoder, DecoderSpec, RopeLong};
use crate::model::config::Config;
use crate::model::layers::RopeScaling;
use crate::model::weights::Weights;
use crate::model::Transformer;

/// Where the parts cut from the fused tensors are stored.
const Q: &str = "self_attn.q_proj";
const K: &str = "self_attn.k_proj";
const V: &str = "self_attn.v_proj";
const GATE: &str = "mlp.gate_proj";
const UP: &str = "mlp.up_proj";

/// The LongRoPE parameters of a config (`rope_parameters`, or the older `rope_scaling`).
struct LongRope {
    short: Vec<f64>,
    long: Vec<f64>,
    original_max: usize,
    attention_factor: f64,
}

fn longrope(cfg: &Config) -> Result<Option<LongRope>> {
    let key = if cfg.has("rope_parameters") {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let Some(p) = cfg.get(key) else { return Ok(None) };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str);
    if !matches!(kind, Some("longrope" | "su")) {
        return Ok(None);
    }
    let path = cfg.path.display();
    let factors = |k: &str| -> Result<Vec<f64>> {
        p.get(k)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| anyhow!("{path}: field '{key}.{k}' should be a list of numbers"))
    };
    let num = |v: Option<&Value>| v.and_then(Value::as_f64);
    let original = num(p.get("original_max_position_embeddings"))
        .or_else(|| num(cfg.get("original_max_position_embeddings")))
        .ok_or_else(|| anyhow!("{path}: longrope needs 'original_max_position_embeddings'"))?;
    if original < 1.0 {
        bail!("{path}: field 'original_max_position_embeddings' must be at least 1");
    }
    let max = num(cfg.get("max_position_embeddings")).unwrap_or(original);
    let factor = num(p.get("factor")).unwrap_or(max / original);
    let attention_factor = match num(p.get("attention_factor")) {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / original.ln()).sqrt(),
    };
    Ok(Some(LongRope {
        short: factors("short_factor")?,
        long: factors("long_factor")?,
        original_max: original as usize,
        attention_factor,
    }))
}

/// The decoder a Phi-3 config describes.
pub fn spec(cfg: &Config) -> Result<DecoderSpec> {
    let long = longrope(cfg)?;
    // The Llama reader does not know longrope: hand it the config without the scaling.
    let mut plain = cfg.value.clone();
    if long.is_some() {
        if let Some(Value::Object(p)) = plain.get_mut("rope_parameters") {
            p.retain(|k, _| k == "rope_theta");
        }
        if let Value::Object(m) = &mut plain {
            m.remove("rope_scaling");
        }
    }
    let mut s = super::llama::spec(&Config::from_value(plain, cfg.path.clone()))?;
    s.arch = "phi3".into();
    let factor = super::partial_rotary_factor(cfg, 1.0)?;
    s.rotary_dim = super::rotary_dim(cfg, s.head_dim, factor)?;
    s.sliding_window = match cfg.get("sliding_window") {
        Some(v) => {
            let w = v
                .as_u64()
                .ok_or_else(|| anyhow!("{}: field 'sliding_window' should be an integer", cfg.path.display()))?;
            cfg.positive("sliding_window", w as usize)?;
            Some(w as usize)
        }
        None => None,
    };
    if let Some(l) = long {
        let n = s.rotary_dim / 2;
        for (name, f) in [("short_factor", &l.short), ("long_factor", &l.long)] {
            if f.len() != n {
                bail!(
                    "{}: field '{name}' has {} entries for {n} rotary frequencies",
                    cfg.path.display(),
                    f.len()
                );
            }
        }
        s.rope.scaling = RopeScaling::LongRope {
            factors: l.short,
            attention_factor: l.attention_factor,
        };
        s.rope_long = Some(RopeLong {
            scaling: RopeScaling::LongRope {
                factors: l.long,
                attention_factor: l.attention_factor,
            },
            original_max_positions: l.original_max,
        });
    }
    Ok(s)
}

/// Loads a Phi-3 checkpoint.
pub fn load(cfg: &Config, w: &Weights, device: &Device) -> Result<Box<dyn Transformer>> {
    let s = spec(cfg)?;
    let (d, hd, ff) = (s.d_model, s.head_dim, s.d_ff);
    let (q_rows, kv_rows) = (s.n_heads * hd, s.n_kv_heads * hd);
    let mut split = Vec::new();
    for l in 0..s.n_layers {
        let p = format!("{}.{l}", s.names.layer_prefix);
        let qkv_name = format!("{p}.self_attn.qkv_proj.weight");
        let qkv = w.get(&qkv_name, &[q_rows + 2 * kv_rows, d])?;
        split.push((
            qkv_name,
            vec![
                (format!("{p}.{Q}.weight"), qkv.narrow(0, 0, q_rows)?),
                (format!("{p}.{K}.weight"), qkv.narrow(0, q_rows, kv_rows)?),
                (format!("{p}.{V}.weight"), qkv.narrow(0, q_rows + kv_rows, kv_rows)?),
            ],
        ));
        let gu_name = format!("{p}.mlp.gate_up_proj.weight");
        let gu = w.get(&gu_name, &[2 * ff, d])?;
        split.push((
            gu_name,
            vec![
                (format!("{p}.{GATE}.weight"), gu.narrow(0, 0, ff)?),
                (format!("{p}.{UP}.weight"), gu.narrow(0, ff, ff)?),
            ],
        ));
    }
    Ok(Box::new(Decoder::load(&s, &w.with_split(split), device)?))
}
