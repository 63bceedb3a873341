//! Every architecture against PyTorch `transformers` on tiny random-initialised models
//! (tests/fixtures/tiny, made by scripts/export_fixtures.py): hidden states, every tap
//! (embeddings, sub-modules, attention patterns, MLP activations, final norm), logits, runs with
//! sub-modules replaced by linear maps, activation patching, parameter counts and config errors.
//!
//! Tolerance: max |ours - reference| <= 1e-4 * max(1, max |reference|) per tensor, over real
//! (unpadded) tokens. The fixtures' own f32-vs-f64 error is <= 1.4e-6 (fixtures README).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use jumplens::model::{self, Batch, LinearReplacement, SubModule, TapPatch, TapRecorder, Transformer};

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
    // Attention patterns are [B, H, T(query), T(key)]: put the batch next to the query axis.
    // Padded keys carry probability 0 on both sides.
    let (ours, reference) = if what.ends_with("attn.hook_pattern") {
        (ours.transpose(0, 1).unwrap(), reference.transpose(0, 1).unwrap())
    } else {
        (ours.clone(), reference.clone())
    };
    let e = err(&ours, &reference, lengths);
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
    let last = states.last().unwrap();
    let normed = c.model.final_norm_with(last, &mut rec).unwrap();
    let mut n_taps = 0;
    for (key, reference) in &c.expected {
        if key.starts_with("blocks.") || key.starts_with("hook_") || key == model::LN_FINAL_TAP {
            let ours = rec
                .values
                .get(key)
                .unwrap_or_else(|| panic!("{name}: tap {key} was not reported"));
            worst = worst.max(check(name, key, ours, reference, &c.batch.lengths));
            n_taps += 1;
        }
    }
    let l = c.model.info().n_layers;
    // resid_pre, ln1, pattern, attn_out, mid (or ln1.hook_in), ln2, mlp_post, mlp_out, resid_post;
    // parallel blocks have no resid_mid, MoE blocks no mlp_post.
    assert!(n_taps > 8 * l, "{name}: only {n_taps} taps compared");
    for key in ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.0.mlp.hook_post"] {
        if key.ends_with("mlp.hook_post") && name == "mixtral" {
            assert!(!rec.values.contains_key(key), "{name}: an MoE block reported {key}");
            continue;
        }
        assert!(c.expected.contains_key(key), "{name}: the fixture lacks {key}");
    }
    if name == "neox_parallel" {
        assert!(
            !rec.values.contains_key("blocks.0.hook_resid_mid"),
            "{name}: a parallel block reported resid_mid"
        );
    }
    // The TransformerLens invariant, for every architecture: each block's resid_post is the
    // next block's resid_pre and the hidden state h_{l+1}.
    for layer in 0..l {
        let post = &rec.values[&format!("blocks.{layer}.hook_resid_post")];
        assert_eq!(
            err(post, &states[layer + 1], &c.batch.lengths),
            0.0,
            "{name}: resid_post {layer}"
        );
        if layer + 1 < l {
            let pre = &rec.values[&format!("blocks.{}.hook_resid_pre", layer + 1)];
            assert_eq!(err(post, pre, &c.batch.lengths), 0.0, "{name}: resid_pre {}", layer + 1);
        }
    }
    if let Some(reference) = c.expected.get(model::LN_FINAL_TAP) {
        worst = worst.max(check(name, "ln_final", &normed, reference, &c.batch.lengths));
    } else {
        assert!(
            !rec.values.contains_key(model::LN_FINAL_TAP),
            "{name}: a model without a final norm reported ln_final"
        );
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
    bert,
    mistral_sliding,
    qwen2_sliding,
    llama_rope_linear,
    llama_rope_llama3,
    neox_parallel,
    neox_sequential,
    qwen3,
    qwen3_tied,
    gemma2,
    olmo2,
    phi3_longrope,
    phi3_short,
    mixtral
);

macro_rules! replaced_tests {
    ($($name:ident),*) => {
        mod replaced { $( #[test] fn $name() { super::run_replaced(stringify!($name)); } )* }
    };
}
replaced_tests!(
    llama,
    qwen2,
    mistral,
    gemma3,
    gpt2,
    bert_mlm,
    mistral_sliding,
    qwen2_sliding,
    llama_rope_linear,
    llama_rope_llama3,
    neox_parallel,
    neox_sequential,
    qwen3,
    qwen3_tied,
    gemma2,
    olmo2,
    phi3_longrope,
    phi3_short,
    mixtral
);

/// Padding must not leak into real tokens: one row alone equals the same row in the batch.
#[test]
fn padding_does_not_change_real_tokens() {
    for name in [
        "llama",
        "mistral_sliding",
        "qwen2_sliding",
        "gemma3",
        "neox_parallel",
        "neox_sequential",
        "qwen3",
        "gemma2",
        "olmo2",
        "phi3_short",
        "mixtral",
    ] {
        padding_does_not_change_real_tokens_of(name);
    }
}

fn padding_does_not_change_real_tokens_of(name: &str) {
    let c = load(name);
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
    assert!(diff < 1e-5, "{name}: padding changed a real token by {diff}");
}

/// Causality: the state at position p of the whole sentence equals the state at the end of the
/// sentence cut after p (the paper's input), so `collect` may run prefixes or whole sentences.
/// Phi-3 LongRoPE is the exception transformers makes too: a batch longer than
/// `original_max_position_embeddings` (4 in `phi3_longrope`) uses the long RoPE factors, so only
/// prefixes longer than that agree with the whole sentence, and shorter ones must not.
#[test]
fn whole_sentence_states_equal_truncated_prefix_states() {
    for (name, agree_from) in [
        ("llama", 0),
        ("gemma3", 0),
        ("gpt2", 0),
        ("neox_parallel", 0),
        ("neox_sequential", 0),
        ("qwen3", 0),
        ("gemma2", 0),
        ("olmo2", 0),
        ("phi3_short", 0),
        ("phi3_longrope", 4),
        ("mixtral", 0),
    ] {
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
            if p < agree_from {
                // Short prefix, short factors: position 0 is never rotated, later ones differ.
                if p > 0 {
                    let a = whole.last().unwrap().i((0, p)).unwrap();
                    let b = cut.last().unwrap().i((0, p)).unwrap();
                    assert!(max_abs_diff(&a, &b) > 1e-4, "{name}: prefix {p} used the long factors");
                }
                continue;
            }
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

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The fixture batch with every real token id replaced (same lengths, so the same masks).
fn other_batch(c: &Case) -> Batch {
    let ids: Vec<Vec<u32>> = c
        .batch
        .input_ids
        .to_vec2::<u32>()
        .unwrap()
        .into_iter()
        .zip(&c.batch.lengths)
        .map(|(row, &len)| row[..len].iter().map(|&t| 3 + (t * 7 + 11) % 125).collect())
        .collect();
    let mut b = Batch::from_sequences(&ids, 0, &Device::Cpu).unwrap();
    b.token_type_ids = c.batch.token_type_ids.clone();
    b
}

/// Activation patching: putting input B's `blocks.{l}.hook_resid_pre` into input A's run gives
/// B's states from h_{l+1} on, for a decoder, Gemma (post-norms), GPT-2 and post-norm BERT.
#[test]
fn patching_resid_pre_transplants_the_other_inputs_states() {
    for name in ["llama", "gemma3", "gpt2", "bert_mlm", "qwen2_sliding"] {
        let c = load(name);
        let other = other_batch(&c);
        let l = c.model.info().n_layers;
        let mut rec = TapRecorder::default();
        let theirs = model::hidden_states_with(c.model.as_ref(), &other, &mut rec).unwrap();
        let ours = model::hidden_states(c.model.as_ref(), &c.batch).unwrap();
        let mut patch = TapPatch::default();
        let key = "blocks.1.hook_resid_pre".to_string();
        patch.values.insert(key.clone(), rec.values[&key].clone());
        let patched = model::hidden_states_with(c.model.as_ref(), &c.batch, &mut patch).unwrap();
        assert!(patch.applied.contains(&key), "{name}: the patch was not applied");
        // Before the patched block: our own states; from its output on: theirs.
        assert_eq!(err(&patched[1], &ours[1], &c.batch.lengths), 0.0, "{name}");
        for layer in 2..=l {
            let e = err(&patched[layer], &theirs[layer], &c.batch.lengths);
            assert!(
                e < 1e-6,
                "{name}: patched h_{layer} differs from the other input's by {e:e}"
            );
            assert!(
                err(&ours[layer], &theirs[layer], &c.batch.lengths) > 1e-2,
                "{name}: inputs too alike"
            );
        }
    }
}

/// Patching a value inside a block: zeroing block 1's `mlp.hook_post` (the input of the bias-free
/// down projection) makes its MLP add nothing, so h_2 equals that block's `hook_resid_mid`.
/// Zeroing an attention pattern makes the attention output o_proj(0) = 0 as well.
#[test]
fn patching_inside_a_block() {
    let c = load("llama");
    let mut rec = TapRecorder::default();
    let plain = model::hidden_states_with(c.model.as_ref(), &c.batch, &mut rec).unwrap();
    let post = &rec.values["blocks.1.mlp.hook_post"];
    let mut patch = TapPatch::default();
    patch
        .values
        .insert("blocks.1.mlp.hook_post".into(), post.zeros_like().unwrap());
    let mut both = (patch, TapRecorder::default());
    let states = model::hidden_states_with(c.model.as_ref(), &c.batch, &mut Chain(&mut both)).unwrap();
    let (_, after) = both;
    assert_eq!(
        max_abs_diff(
            &after.values["blocks.1.hook_mlp_out"],
            &post.zeros_like().unwrap().narrow(2, 0, 64).unwrap()
        ),
        0.0
    );
    assert_eq!(
        err(&states[2], &after.values["blocks.1.hook_resid_mid"], &c.batch.lengths),
        0.0
    );
    assert_eq!(err(&states[1], &plain[1], &c.batch.lengths), 0.0);
    assert!(err(&states[2], &plain[2], &c.batch.lengths) > 1e-2);

    let pattern = &rec.values["blocks.0.attn.hook_pattern"];
    let mut patch = TapPatch::default();
    patch
        .values
        .insert("blocks.0.attn.hook_pattern".into(), pattern.zeros_like().unwrap());
    let mut both = (patch, TapRecorder::default());
    model::hidden_states_with(c.model.as_ref(), &c.batch, &mut Chain(&mut both)).unwrap();
    let attn_out = &both.1.values["blocks.0.hook_attn_out"];
    assert_eq!(max_abs_diff(attn_out, &attn_out.zeros_like().unwrap()), 0.0);
    // A patch of the wrong shape is an error, not a panic.
    let mut bad = TapPatch::default();
    bad.values.insert(
        "hook_embed".into(),
        Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = model::hidden_states_with(c.model.as_ref(), &c.batch, &mut bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hook_embed") && e.contains("shape"), "{e}");
}

/// Runs a patch, then records what flows on.
struct Chain<'a>(&'a mut (TapPatch, TapRecorder));
impl model::Hooks for Chain<'_> {
    fn tap(&mut self, tap: model::Tap, value: &Tensor) -> anyhow::Result<Option<Tensor>> {
        let patched = self.0 .0.tap(tap, value)?;
        self.0 .1.tap(tap, patched.as_ref().unwrap_or(value))?;
        Ok(patched)
    }
}

/// ModelInfo.block_params (the early-exit FLOP figures) is counted from the loaded blocks and
/// equals what the name-substring guess gave before the refactor.
#[test]
fn block_params_are_unchanged() {
    for (name, expected) in [
        ("llama", 73984),
        ("llama_tied", 73984),
        ("qwen2", 74240),
        ("mistral", 73984),
        ("gemma3", 65184),
        ("gpt2", 25408),
        ("bert_mlm", 17088),
        ("bert_mlm_legacy", 17088),
        ("bert", 17088),
    ] {
        let lm = model::load_model(fixture(name).to_str().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(lm.model.info().block_params, expected, "{name}");
    }
}

/// `text_taps` (behind `hidden-states --tap`) refuses names the model does not emit.
#[test]
fn text_taps_names() {
    let lm = model::load_model(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap();
    // The fixture folder has no tokenizer: the error says so rather than panicking.
    let e = lm.text_taps("hello", &["hook_embed"], None).unwrap_err().to_string();
    assert!(e.contains("tokenizer"), "{e}");
    let e = lm
        .text_taps("hello", &["blocks.0.nonsense"], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a tap name"), "{e}");
}

/// A config field that would divide by zero or cannot be read is a one-line error naming
/// config.json and the field.
#[test]
fn bad_config_fields_are_errors() {
    for (name, from, to, field) in [
        (
            "llama",
            "\"num_attention_heads\": 4",
            "\"num_attention_heads\": 0",
            "num_attention_heads",
        ),
        (
            "llama",
            "\"num_key_value_heads\": 2",
            "\"num_key_value_heads\": 0",
            "num_key_value_heads",
        ),
        (
            "llama",
            "\"num_key_value_heads\": 2",
            "\"num_key_value_heads\": 3",
            "num_key_value_heads",
        ),
        (
            "llama",
            "\"hidden_size\": 64",
            "\"hidden_size\": \"wide\"",
            "hidden_size",
        ),
        (
            "gemma3",
            "\"num_attention_heads\": 4",
            "\"num_attention_heads\": 0",
            "num_attention_heads",
        ),
        (
            "gemma3",
            "\"num_key_value_heads\": 1",
            "\"num_key_value_heads\": 0",
            "num_key_value_heads",
        ),
        ("gpt2", "\"n_head\": 4", "\"n_head\": 0", "n_head"),
        (
            "bert",
            "\"num_attention_heads\": 4",
            "\"num_attention_heads\": 0",
            "num_attention_heads",
        ),
        (
            "mistral_sliding",
            "\"sliding_window\": 5",
            "\"sliding_window\": 0",
            "sliding_window",
        ),
        (
            "mixtral",
            "\"num_experts_per_tok\": 2",
            "\"num_experts_per_tok\": 5",
            "num_experts_per_tok",
        ),
        (
            "neox_parallel",
            "\"partial_rotary_factor\": 0.25",
            "\"partial_rotary_factor\": 0.05",
            "partial_rotary_factor",
        ),
        (
            "phi3_longrope",
            "\"partial_rotary_factor\": 0.5",
            "\"partial_rotary_factor\": 0.25",
            "short_factor",
        ),
        (
            "gemma2",
            "\"sliding_window\": 4",
            "\"sliding_window\": 0",
            "sliding_window",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture(name).join(f), dir.path().join(f)).unwrap();
        }
        let cfg = dir.path().join("config.json");
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.contains(from), "{name}: config.json has no {from}");
        std::fs::write(&cfg, text.replace(from, to)).unwrap();
        let e = match model::load_model(dir.path().to_str().unwrap(), &Device::Cpu) {
            Ok(_) => panic!("{name}: {to} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            e.contains("config.json") && e.contains(field) && !e.contains('\n'),
            "{name} with {to}: {e}"
        );
    }
}
