//! Real checkpoints against PyTorch `transformers` (tests/fixtures/real, made by
//! scripts/export_real_reference.py with transformers' own GGUF loader, which dequantizes to
//! f32 as jumplens does): token ids identical, top-1 next token identical at every position,
//! top-5 logits and hidden-state rows within the tolerances below.
//!
//! The assets come from `scripts/fetch_assets.sh`; without them these tests are skipped with a
//! message, unless JUMPLENS_REQUIRE_ASSETS=1 (`scripts/test.sh`, CI), which makes a missing
//! asset a failure (see tests/common).

use candle_core::{DType, Device, IndexOp, Tensor, D};
use jumplens::model::{self, Batch, LoadedModel};

mod common;
#[path = "common/real.rs"]
mod real;
use common::asset;
use real::{reference, sentences};

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Worst normwise error max|ours - ref| / max|ref| of the hidden rows over all sentences.
struct Worst {
    hidden: f32,
    logits: f32,
}

fn check(name: &str, lm: &LoadedModel, masked: bool, hidden_tol: f32, logit_tol: f32) -> Worst {
    let r = reference(name);
    let tok = lm.tokenizer().unwrap();
    let texts = sentences();
    let mut inputs = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let ours = tok.encode(text).unwrap();
        assert_eq!(
            ours,
            ids(&r[&format!("ids.{i}")]),
            "{name}: token ids of sentence {i} ({text:?})"
        );
        inputs.push(if masked {
            ids(&r[&format!("masked_ids.{i}")])
        } else {
            ours
        });
    }
    let batch = Batch::from_sequences(&inputs, tok.pad_id, &Device::Cpu).unwrap();
    let states = model::hidden_states(lm.model.as_ref(), &batch).unwrap();
    let layers = ids(&r["hidden_layers"]);
    let logits = if lm.model.info().has_lm_head {
        Some(lm.model.readout(states.last().unwrap()).unwrap())
    } else {
        None
    };
    let mut worst = Worst {
        hidden: 0.0,
        logits: 0.0,
    };
    for (i, input) in inputs.iter().enumerate() {
        let last = input.len() - 1;
        let reference_rows = &r[&format!("hidden.{i}")];
        for (k, &l) in layers.iter().enumerate() {
            let ours = states[l as usize].i((i, last)).unwrap();
            let refr = reference_rows.i(k).unwrap();
            let e = max_abs(&(ours - &refr).unwrap()) / max_abs(&refr);
            assert!(
                e <= hidden_tol,
                "{name}: sentence {i} layer {l}: hidden error {e:e} > {hidden_tol:e}"
            );
            worst.hidden = worst.hidden.max(e);
        }
        let Some(logits) = &logits else { continue };
        let top5 = &r[&format!("top5.{i}")];
        let top5_logits = &r[&format!("top5_logits.{i}")];
        let positions: Vec<usize> = if masked {
            vec![r[&format!("mask_pos.{i}")].to_vec1::<i64>().unwrap()[0] as usize]
        } else {
            (0..input.len()).collect()
        };
        for (row, &p) in positions.iter().enumerate() {
            let ours = logits.i((i, p)).unwrap();
            let best = ours.argmax_keepdim(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
            let want: Vec<u32> = ids(&top5.i(row).unwrap());
            assert_eq!(
                best, want[0],
                "{name}: sentence {i} position {p}: top-1 {best} vs reference {}",
                want[0]
            );
            let idx = Tensor::from_vec(want.clone(), 5, &Device::Cpu).unwrap();
            let ours5 = ours.index_select(&idx, 0).unwrap();
            let ref5 = top5_logits.i(row).unwrap().to_dtype(DType::F32).unwrap();
            let e = max_abs(&(ours5 - &ref5).unwrap()) / max_abs(&ref5).max(1.0);
            assert!(
                e <= logit_tol,
                "{name}: sentence {i} position {p}: top-5 logit error {e:e} > {logit_tol:e}"
            );
            worst.logits = worst.logits.max(e);
        }
    }
    eprintln!(
        "{name}: worst hidden error {:e}, worst top-5 logit error {:e}",
        worst.hidden, worst.logits
    );
    worst
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(p) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let lm = model::load_model(p.to_str().unwrap(), &Device::Cpu).unwrap();
    check("smollm2", &lm, false, 1e-4, 1e-4);
}

#[test]
fn gemma3_gguf_matches_transformers() {
    let Some(p) = asset("gemma3/gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let lm = model::load_model(p.to_str().unwrap(), &Device::Cpu).unwrap();
    check("gemma3", &lm, false, 1e-4, 1e-4);
}

#[test]
fn bert_mlm_matches_transformers() {
    let Some(p) = asset("bert_mlm") else { return };
    let lm = model::load_model(p.to_str().unwrap(), &Device::Cpu).unwrap();
    check("bert_mlm", &lm, true, 1e-4, 1e-4);
}

#[test]
fn minilm_matches_transformers() {
    let Some(p) = asset("minilm") else { return };
    let lm = model::load_model(p.to_str().unwrap(), &Device::Cpu).unwrap();
    check("minilm", &lm, false, 1e-4, 1e-4);
}

/// ModelInfo.block_params (the early-exit FLOP figures) is counted from the loaded blocks and
/// equals what the name-substring guess gave before the model refactor.
#[test]
fn block_params_are_unchanged() {
    for (rel, expected) in [
        ("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 106_202_880),
        ("gemma3/gemma-3-270m-q4_k_m.gguf", 100_325_376),
        ("bert_mlm", 396_544),
        ("minilm", 10_646_784),
    ] {
        let Some(p) = asset(rel) else { continue };
        let lm = model::load_model(p.to_str().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(lm.model.info().block_params, expected, "{rel}");
    }
}

/// `LoadedModel::text_taps` (behind `hidden-states --tap`): the taps of one text, without the
/// batch dimension, consistent with `text_states`.
#[test]
fn text_taps_of_one_text() {
    let Some(p) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let lm = model::load_model(p.to_str().unwrap(), &Device::Cpu).unwrap();
    let text = "The cat sat on the mat.";
    let names = [
        "hook_embed",
        "blocks.3.hook_resid_post",
        "blocks.3.attn.hook_pattern",
        "blocks.3.mlp.hook_post",
        "ln_final.hook_normalized",
    ];
    let (ids, taps) = lm.text_taps(text, &names, None).unwrap();
    let st = lm.text_states(text, None).unwrap();
    assert_eq!(ids, st.input_ids);
    let t = ids.len();
    let info = lm.model.info();
    assert_eq!(taps.len(), names.len());
    assert_eq!(taps["hook_embed"].dims(), &[t, info.d_model]);
    assert_eq!(taps["blocks.3.attn.hook_pattern"].dims(), &[info.n_heads, t, t]);
    assert_eq!(taps["blocks.3.mlp.hook_post"].dims()[0], t);
    assert_eq!(
        max_abs(&(&taps["hook_embed"] - st.hidden_states.i(0).unwrap()).unwrap()),
        0.0
    );
    assert_eq!(
        max_abs(&(&taps["blocks.3.hook_resid_post"] - st.hidden_states.i(4).unwrap()).unwrap()),
        0.0
    );
    // Causal attention rows sum to one and put nothing on later keys.
    let pattern = &taps["blocks.3.attn.hook_pattern"];
    let sums = pattern.sum(D::Minus1).unwrap();
    assert!(max_abs(&(sums - 1.0).unwrap()) < 1e-5);
    assert_eq!(
        pattern
            .i((.., 0, 1..))
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let e = lm
        .text_taps(text, &["blocks.99.hook_resid_pre"], None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no tap 'blocks.99.hook_resid_pre'") && !e.contains('\n'),
        "{e}"
    );
}
