//! `predict::evaluate` against an independent numpy reference (tests/fixtures/lens, made by
//! scripts/export_lens_fixture.py from the tiny llama and BERT-MLM fixtures): per lens (mat, id)
//! and source layer, Precision@1/5/10, mean surprisal, mean KL(model || lens), mean cross-entropy
//! against the gold token, the per-example lens top-1 and p_top1 - p_top2 margin, and the model's
//! own top-1.
//!
//! The reference is float64 from the stored float32 states and maps; jumplens runs in float32.
//! Tolerances: token choices (p@k, lens top-1, model top-1) exactly equal — the smallest logit gap
//! deciding any of them is 4.7e-4 (llama) / 2.8e-3 (BERT), printed by the script, against logit
//! errors of ~1e-6; surprisal / KL / CE means within 1e-5 * max(1, |ref|) (observed <= 7e-8);
//! margins within 1e-5 absolute (observed <= 2.5e-7). Observed errors are printed
//! (`cargo test --release --test predict_fixture -- --nocapture`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use jumplens::data::Activations;
use jumplens::eval::predict::{evaluate, Evaluation, Lens, LensMetrics};
use jumplens::lens::maps::Maps;

const REL_TOL: f64 = 1e-5;
const MARGIN_TOL: f64 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture's tensors, and its validation set / maps written back in jumplens's own file
/// formats (read with `Activations::read` / `Maps::read`).
struct Fixture {
    t: HashMap<String, Tensor>,
    val: Activations,
    maps: Maps,
    model: jumplens::model::LoadedModel,
    _dir: tempfile::TempDir,
}

fn load(name: &str) -> Fixture {
    let t =
        jumplens::data::io::read_safetensors(&root().join(format!("tests/fixtures/lens/{name}.safetensors"))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let act_path = dir.path().join("val.safetensors");
    let act: Vec<(String, Tensor)> = ["hidden_states", "positions", "tokens", "offsets", "article"]
        .iter()
        .map(|n| (n.to_string(), t[*n].clone()))
        .collect();
    jumplens::data::io::write_safetensors(&act_path, &act, None).unwrap();
    let val = Activations::read(&act_path).unwrap();
    let maps_path = dir.path().join("maps.safetensors");
    let maps: Vec<(String, Tensor)> = t
        .iter()
        // `mat.{l}.{L}`, not the `mat.p@1`-style expected values.
        .filter(|(k, _)| {
            let parts: Vec<&str> = k.split('.').collect();
            parts.len() == 3 && parts[0] == "mat" && parts[1..].iter().all(|p| p.parse::<usize>().is_ok())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    jumplens::data::io::write_safetensors(&maps_path, &maps, None).unwrap();
    let maps = Maps::read(&maps_path).unwrap();
    let model = jumplens::model::load_model(
        root().join("tests/fixtures/tiny").join(name).to_str().unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    Fixture {
        t,
        val,
        maps,
        model,
        _dir: dir,
    }
}

fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_vec1::<f64>().unwrap()
}

fn rows_i64(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

fn check(name: &str, expected_attention: jumplens::model::AttentionKind) {
    let f = load(name);
    let model = f.model.model.as_ref();
    let info = model.info();
    assert_eq!(info.attention, expected_attention);
    let s = info.n_layers + 1;
    assert_eq!(f.maps.len(), info.n_layers, "one map l -> L per l < L");
    let n = f.val.len();
    let lenses = vec![
        ("mat".to_string(), Lens::Maps(&f.maps)),
        ("id".to_string(), Lens::Identity),
    ];
    // Batches of 16: the last one is partial (40 examples).
    let ev: Evaluation = evaluate(model, &f.val, &lenses, 16, false).unwrap();
    assert_eq!(ev.n_val, n);

    let model_top1: Vec<u32> = f.t["model_top1"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    assert_eq!(ev.model_top1, model_top1, "{name}: model top-1");

    for lens in ["mat", "id"] {
        let m: &LensMetrics = &ev.metrics[lens];
        let tr = &ev.traces[lens];
        assert_eq!(
            tr.top1,
            rows_i64(&f.t[&format!("{lens}.top1")]),
            "{name}/{lens}: lens top-1"
        );
        for (what, ours) in [("p@1", &m.p_at_1), ("p@5", &m.p_at_5), ("p@10", &m.p_at_10)] {
            let reference = vec_f64(&f.t[&format!("{lens}.{what}")]);
            assert_eq!(ours.len(), s);
            // Both are counts / n: compare the counts.
            let count = |v: &[f64]| v.iter().map(|x| (x * n as f64).round() as usize).collect::<Vec<_>>();
            assert_eq!(count(ours), count(&reference), "{name}/{lens}: {what}");
        }
        let mut report = Vec::new();
        for (what, ours) in [("surprisal", &m.surprisal), ("kl", &m.kl), ("ce", &m.ce)] {
            let reference = vec_f64(&f.t[&format!("{lens}.{what}")]);
            assert_eq!(ours.len(), s);
            let mut worst = 0f64;
            for (l, (&o, &r)) in ours.iter().zip(&reference).enumerate() {
                let err = (o - r).abs() / r.abs().max(1.0);
                assert!(err <= REL_TOL, "{name}/{lens}: {what} at layer {l}: {o} vs {r}");
                worst = worst.max(err);
            }
            report.push(format!("{what} {worst:.1e}"));
        }
        let margin_ref = f.t[&format!("{lens}.margin")].to_vec2::<f32>().unwrap();
        let mut worst = 0f64;
        for (l, (ours, reference)) in tr.margin.iter().zip(&margin_ref).enumerate() {
            for (i, (&o, &r)) in ours.iter().zip(reference).enumerate() {
                let err = (o as f64 - r as f64).abs();
                assert!(
                    err <= MARGIN_TOL,
                    "{name}/{lens}: margin at layer {l}, example {i}: {o} vs {r}"
                );
                worst = worst.max(err);
            }
        }
        report.push(format!("margin {worst:.1e} (abs)"));
        // The KL of the last layer against itself is 0, and every lens is exact there.
        assert!(
            m.kl[s - 1].abs() < 1e-5,
            "{name}/{lens}: KL at the last layer {}",
            m.kl[s - 1]
        );
        println!(
            "{name}/{lens}: p@1/5/10 and top-1 equal; worst error: {}",
            report.join(", ")
        );
    }
}

#[test]
fn llama_predictions_match_numpy_reference() {
    check("llama", jumplens::model::AttentionKind::Causal);
}

#[test]
fn bert_mlm_predictions_match_numpy_reference() {
    check("bert_mlm", jumplens::model::AttentionKind::Bidirectional);
}

#[test]
fn fixture_gold_tokens_are_as_documented() {
    // Causal: the next token (none at the sentence's end); masked: the original token.
    let f = load("llama");
    let gold = jumplens::eval::predict::gold_tokens(&f.val, jumplens::model::AttentionKind::Causal);
    let with_gold = gold.iter().filter(|g| g.is_some()).count();
    assert!(
        with_gold > 0 && with_gold < f.val.len(),
        "some examples sit at the sentence's end"
    );
    for (i, g) in gold.iter().enumerate() {
        let s = f.val.sentence(i);
        assert_eq!(*g, s.get(f.val.positions[i] + 1).copied());
    }
    let f = load("bert_mlm");
    let gold = jumplens::eval::predict::gold_tokens(&f.val, jumplens::model::AttentionKind::Bidirectional);
    for (i, g) in gold.iter().enumerate() {
        assert_eq!(*g, Some(f.val.sentence(i)[f.val.positions[i]]));
        assert_ne!(*g, Some(3), "id 3 is the tiny BERT's [MASK] and never a real token");
    }
}
