//! Every architecture against PyTorch `transformers` on tiny random-initialised models
//! (tests/fixtures/tiny, made by scripts/export_fixtures.py): hidden states, every sub-module
//! tap, logits, and runs with sub-modules replaced by linear maps.
//!
//! Tolerance: max |ours - reference| <= 1e-4 * max(1, max |reference|) per tensor, over real
//! (unpadded) tokens. The fixtures' own f32-vs-f64 error is <= 1.4e-6 (fixtures README).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use jumplens::model::{self, Batch, LinearReplacement, SubModule, TapRecorder, Transformer};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
}

struct Case {
    model: Box<dyn Transformer>,
    expected: HashMap<String, Tensor>,
    batch: Batch,
}

fn load(name: &str) -> Case {
    let dir = fixture(name);
    let lm = model::load_model(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let expected = jumplens::data::io::read_safetensors(&dir.join("expected.safetensors")).unwrap();
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let lengths: Vec<usize> = expected["attention_mask"]
        .sum(1)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let token_type_ids = expected.get("token_type_ids").map(|t| t.to_dtype(DType::U32).unwrap());
    let batch = Batch {
        input_ids: ids,
        lengths,
        token_type_ids,
    };
    Case {
        model: lm.model,
        expected,
        batch,
    }
}

/// Max normwise error over the real tokens of [.., B, T, X] tensors.
fn err(ours: &Tensor, reference: &Tensor, lengths: &[usize]) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shape");
    let rank = ours.rank();
    let (b_dim, t_dim) = (rank - 3, rank - 2);
    let mut worst = 0f32;
    let mut scale = 1f32;
    for (b, &len) in lengths.iter().enumerate() {
        let o = ours.narrow(b_dim, b, 1).unwrap().narrow(t_dim, 0, len).unwrap();
        let r = reference.narrow(b_dim, b, 1).unwrap().narrow(t_dim, 0, len).unwrap();
        let diff = (o - &r)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let mag = r
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(diff);
        scale = scale.max(mag);
    }
    worst / scale
}

fn check(name: &str, what: &str, ours: &Tensor, reference: &Tensor, lengths: &[usize]) -> f32 {
    let e = err(ours, reference, lengths);
    assert!(e <= TOL, "{name}: {what}: normwise error {e:e} > {TOL:e}");
    e
}

fn run_full(name: &str) {
    let c = load(name);
    let mut rec = TapRecorder::default();
    let states = model::hidden_states_with(c.model.as_ref(), &c.batch, &mut rec).unwrap();
    let hidden = Tensor::stack(&states, 0).unwrap();
    let mut worst = check(
        name,
        "hidden_states",
        &hidden,
        &c.expected["hidden_states"],
        &c.batch.lengths,
    );
    let mut n_taps = 0;
    for (key, reference) in &c.expected {
        if key.starts_with("blocks.") {
            let ours = rec
                .values
                .get(key)
                .unwrap_or_else(|| panic!("{name}: tap {key} was not reported"));
            worst = worst.max(check(name, key, ours, reference, &c.batch.lengths));
            n_taps += 1;
        }
    }
    assert!(
        n_taps >= 7 * c.model.info().n_layers,
        "{name}: only {n_taps} taps compared"
    );
    let last = states.last().unwrap();
    if let Some(reference) = c.expected.get("ln_final.hook_normalized") {
        worst = worst.max(check(
            name,
            "ln_final",
            &c.model.final_norm(last).unwrap(),
            reference,
            &c.batch.lengths,
        ));
    }
    match c.expected.get("logits") {
        Some(reference) => {
            worst = worst.max(check(
                name,
                "logits",
                &c.model.readout(last).unwrap(),
                reference,
                &c.batch.lengths,
            ));
        }
        None => assert!(
            c.model.readout(last).is_err(),
            "{name}: a headless model must refuse to unembed"
        ),
    }
    eprintln!("{name}: worst normwise error {worst:e}");
}

fn run_replaced(name: &str) {
    let c = load(name);
    for (which, sub) in [("attn", SubModule::Attn), ("mlp", SubModule::Mlp)] {
        let w = &c.expected[&format!("replace.{which}.weight")];
        let mut hooks = LinearReplacement::default();
        for layer in 1..c.model.info().n_layers {
            hooks.maps.insert((layer, sub), w.clone());
        }
        let states = model::hidden_states_with(c.model.as_ref(), &c.batch, &mut hooks).unwrap();
        let hidden = Tensor::stack(&states, 0).unwrap();
        check(
            name,
            &format!("replace.{which}.hidden_states"),
            &hidden,
            &c.expected[&format!("replace.{which}.hidden_states")],
            &c.batch.lengths,
        );
        let logits = c.model.readout(states.last().unwrap()).unwrap();
        check(
            name,
            &format!("replace.{which}.logits"),
            &logits,
            &c.expected[&format!("replace.{which}.logits")],
            &c.batch.lengths,
        );
        // The replacement must change something, or the test proves nothing.
        let plain = c.expected["hidden_states"].i(c.model.info().n_layers).unwrap();
        assert!(err(&hidden.i(c.model.info().n_layers).unwrap(), &plain, &c.batch.lengths) > 1e-3);
    }
}

macro_rules! arch_tests {
    ($($name:ident),*) => {
        mod full { $( #[test] fn $name() { super::run_full(stringify!($name)); } )* }
    };
}
arch_tests!(
    llama,
    llama_tied,
    qwen2,
    mistral,
    gemma3,
    gpt2,
    bert_mlm,
    bert_mlm_legacy,
    bert
);

macro_rules! replaced_tests {
    ($($name:ident),*) => {
        mod replaced { $( #[test] fn $name() { super::run_replaced(stringify!($name)); } )* }
    };
}
replaced_tests!(llama, qwen2, mistral, gemma3, gpt2, bert_mlm);

/// Padding must not leak into real tokens: one row alone equals the same row in the batch.
#[test]
fn padding_does_not_change_real_tokens() {
    let c = load("llama");
    let alone = Batch {
        input_ids: c
            .batch
            .input_ids
            .narrow(0, 1, 1)
            .unwrap()
            .narrow(1, 0, c.batch.lengths[1])
            .unwrap(),
        lengths: vec![c.batch.lengths[1]],
        token_type_ids: None,
    };
    let single = model::hidden_states(c.model.as_ref(), &alone).unwrap();
    let batched = model::hidden_states(c.model.as_ref(), &c.batch).unwrap();
    let l = c.model.info().n_layers;
    let a = single[l].i(0).unwrap();
    let b = batched[l].i(1).unwrap().narrow(0, 0, c.batch.lengths[1]).unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "padding changed a real token by {diff}");
}

/// Causality: the state at position p of the whole sentence equals the state at the end of the
/// sentence cut after p (the paper's input), so `collect` may run prefixes or whole sentences.
#[test]
fn whole_sentence_states_equal_truncated_prefix_states() {
    for name in ["llama", "gemma3", "gpt2"] {
        let c = load(name);
        let len = c.batch.lengths[0];
        let ids: Vec<u32> = c
            .batch
            .input_ids
            .i(0)
            .unwrap()
            .narrow(0, 0, len)
            .unwrap()
            .to_vec1()
            .unwrap();
        let whole = model::hidden_states(
            c.model.as_ref(),
            &Batch::from_sequences(std::slice::from_ref(&ids), 0, &Device::Cpu).unwrap(),
        )
        .unwrap();
        for p in 0..len {
            let prefix = Batch::from_sequences(&[ids[..=p].to_vec()], 0, &Device::Cpu).unwrap();
            let cut = model::hidden_states(c.model.as_ref(), &prefix).unwrap();
            for (l, (w, t)) in whole.iter().zip(&cut).enumerate() {
                let a = w.i((0, p)).unwrap();
                let b = t.i((0, p)).unwrap();
                let diff = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff < 1e-5,
                    "{name}: position {p}, layer {l}: prefix and whole sentence differ by {diff}"
                );
            }
        }
    }
}
