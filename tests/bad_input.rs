//! Bad input gives a one-line error naming the file and the problem, a non-zero exit code and
//! no panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jumplens"))
}

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
}

/// Runs jumplens and returns (exit ok, stderr).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin()).args(args).output().expect("run jumplens");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Asserts a failure whose single error line contains every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let (ok, err) = run(args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "expected one error line for {args:?}, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "error for {args:?} lacks '{n}': {}", lines[0]);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// A word-level tokenizer.json with `n` words w0..w{n-1} (ids 0..n).
fn word_tokenizer(n: usize) -> String {
    let vocab: Vec<String> = (0..n).map(|i| format!("\"w{i}\": {i}")).collect();
    format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
        "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
        vocab.join(",")
    )
}

#[test]
fn missing_model() {
    fails_with(
        &["inspect", "/nonexistent/model"],
        &["/nonexistent/model", "no such file"],
    );
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("llama"), dir.path());
    let w = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &["inspect", dir.path().to_str().unwrap()],
        &["model.safetensors", "not a valid safetensors"],
    );
}

#[test]
fn corrupt_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.gguf");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    fails_with(&["inspect", p.to_str().unwrap()], &["broken.gguf", "GGUF"]);
}

#[test]
fn config_that_does_not_match_the_tensors() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("llama"), dir.path());
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).unwrap();
    fails_with(
        &["inspect", dir.path().to_str().unwrap()],
        &["model.safetensors", "gate_proj", "shape"],
    );
}

#[test]
fn unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("llama"), dir.path());
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"mamba\"");
    std::fs::write(&cfg, text).unwrap();
    fails_with(
        &["inspect", dir.path().to_str().unwrap()],
        &["config.json", "unknown architecture 'mamba'"],
    );
}

#[test]
fn tokenizer_that_does_not_fit_the_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("gpt2"), dir.path());
    std::fs::write(dir.path().join("tokenizer.json"), word_tokenizer(200)).unwrap();
    fails_with(
        &["inspect", dir.path().to_str().unwrap()],
        &["tokenizer.json", "199", "128"],
    );
}

#[test]
fn text_longer_than_the_context() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("gpt2"), dir.path());
    std::fs::write(dir.path().join("tokenizer.json"), word_tokenizer(100)).unwrap();
    let long: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let out = dir.path().join("h.safetensors");
    fails_with(
        &[
            "hidden-states",
            dir.path().to_str().unwrap(),
            "--text",
            &long.join(" "),
            "--out",
            out.to_str().unwrap(),
        ],
        &["40 tokens", "context is 32"],
    );
    // A text that fits works and writes the file.
    let (ok, err) = run(&[
        "hidden-states",
        dir.path().to_str().unwrap(),
        "--text",
        "w1 w2 w3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.exists());
}

#[test]
fn empty_corpus() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("gpt2"), &dir.path().join("m"));
    std::fs::write(dir.path().join("m/tokenizer.json"), word_tokenizer(100)).unwrap();
    let corpus = dir.path().join("empty.txt");
    std::fs::write(&corpus, "\n\n").unwrap();
    let m = dir.path().join("m");
    let out = dir.path().join("run");
    fails_with(
        &[
            "collect",
            m.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["empty.txt", "no text"],
    );
    std::fs::write(&corpus, "w1 w2 w3\nw4 w5 w6\n").unwrap();
    fails_with(
        &[
            "collect",
            m.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--train",
            "5",
            "--val",
            "1",
        ],
        &["empty.txt", "only 1 usable training sentences"],
    );
}

#[test]
fn unusable_device() {
    let model = tiny("llama");
    let m = model.to_str().unwrap();
    fails_with(
        &["--device", "gpu", "inspect", m],
        &["--device", "cpu or cuda[:N]", "'gpu'"],
    );
    if cfg!(feature = "cuda") {
        // A CUDA build on a machine without this GPU says so (never falls back to the CPU).
        fails_with(
            &["--device", "cuda:99", "inspect", m],
            &["--device cuda:99", "no usable GPU"],
        );
    } else {
        fails_with(
            &["--device", "cuda", "inspect", m],
            &["--device cuda", "without CUDA support"],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Damaged run folders: the later stages refuse them with one line, never a panic.

/// A run folder of the tiny GPT-2 (word tokenizer of 100 words) with 6 training and 3
/// validation sentences collected and all pairs fitted, made through the library; returns
/// (tempdir, run folder).
fn tiny_run() -> (tempfile::TempDir, PathBuf) {
    use jumplens::collect::{collect, CollectOptions};
    use jumplens::data::run::RunDir;
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    copy_dir(&tiny("gpt2"), &m);
    std::fs::write(m.join("tokenizer.json"), word_tokenizer(100)).unwrap();
    let corpus = dir.path().join("corpus.txt");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            (0..6)
                .map(|j| format!("w{}", 1 + (7 * i + 3 * j) % 99))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let lm = jumplens::model::load_model(m.to_str().unwrap(), &candle_core::Device::Cpu).unwrap();
    let run = dir.path().join("run");
    let opts = CollectOptions {
        n_train: 6,
        n_val: 3,
        ..CollectOptions::default()
    };
    collect(&lm, &corpus, &RunDir::new(&run), &opts, false).unwrap();
    jumplens::pipeline::run_fit(
        &RunDir::new(&run),
        jumplens::pipeline::Pairs::All,
        &jumplens::lens::fit::FitOptions::default(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    (dir, run)
}

/// Rewrites one int64 list of an activations file.
fn rewrite_ints(path: &Path, name: &str, edit: impl FnOnce(&mut Vec<i64>)) {
    let mut t = jumplens::data::io::read_safetensors(path).unwrap();
    let mut v = t[name].to_vec1::<i64>().unwrap();
    edit(&mut v);
    let n = v.len();
    t.insert(
        name.to_string(),
        candle_core::Tensor::from_vec(v, n, &candle_core::Device::Cpu).unwrap(),
    );
    let named: Vec<(String, candle_core::Tensor)> = t.into_iter().collect();
    jumplens::data::io::write_safetensors(path, &named, None).unwrap();
}

#[test]
fn predict_refuses_gold_ids_outside_the_vocabulary() {
    let (_dir, run) = tiny_run();
    let val = run.join("activations/val.safetensors");
    // Every token of the validation sentences becomes an id the model does not have.
    rewrite_ints(&val, "tokens", |v| v.iter_mut().for_each(|t| *t = 1_000_000));
    fails_with(
        &["predict", run.to_str().unwrap()],
        &["val.safetensors", "token id 1000000", "outside the model's vocabulary"],
    );
}

#[test]
fn submodules_refuse_an_r2_table_of_the_wrong_shape() {
    let (_dir, run) = tiny_run();
    let r2 = run.join("r2.json");
    std::fs::write(&r2, r#"{"layers": 2, "n_val": 3, "mat": [[null, 0.5]], "id": []}"#).unwrap();
    fails_with(
        &["submodules", run.to_str().unwrap()],
        &["r2.json", "1 x 2", "expected"],
    );
    std::fs::write(&r2, r#"{"mat": "no table"}"#).unwrap();
    fails_with(
        &["submodules", run.to_str().unwrap()],
        &["r2.json", "'mat' is not a table"],
    );
}

#[test]
fn damaged_offsets_are_refused_by_every_reader() {
    let (_dir, run) = tiny_run();
    let val = run.join("activations/val.safetensors");
    // Offsets past the end of the token list (the page's sentence sampler used to slice them
    // unchecked).
    rewrite_ints(&val, "offsets", |v| {
        let last = v.len() - 1;
        v[last] += 1000;
    });
    let err = jumplens::data::Activations::read_tokens(&val).err().expect("refused");
    assert!(err.to_string().contains("offsets or positions do not fit"), "{err}");
    fails_with(
        &["predict", run.to_str().unwrap()],
        &["val.safetensors", "offsets or positions do not fit"],
    );
    // The page still comes out, with the reason in place of the peek grids.
    let (ok, err) = run_args_html(&run);
    assert!(ok, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let page = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(
        page.contains("No peek grids") && page.contains("offsets or positions do not fit"),
        "the page must say why it has no peek grids"
    );
}

fn run_args_html(dir: &Path) -> (bool, String) {
    run(&["report", "--html-only", dir.to_str().unwrap()])
}

#[test]
fn fit_with_fewer_examples_than_the_width_warns_once() {
    let (_dir, run) = tiny_run();
    let out = Command::new(bin())
        .args(["fit", run.to_str().unwrap(), "--quiet"])
        .output()
        .expect("run jumplens");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning")).collect();
    assert_eq!(warnings.len(), 1, "one warning, not one per layer: {err}");
    assert!(
        warnings[0].contains("6 training examples") && warnings[0].contains("N < d"),
        "{err}"
    );
    // The per-layer details stay in the manifest.
    let m = jumplens::data::run::RunDir::new(&run).read_manifest().unwrap();
    let per_layer = m.stages["fit"]["warnings"].as_array().unwrap().len();
    assert!(per_layer >= 2, "per-layer warnings in the manifest: {per_layer}");
}

/// A tiny GPT-2 with a word-level tokenizer and a small corpus, for collect's option checks.
fn collect_setup(dir: &Path) -> (PathBuf, PathBuf) {
    let m = dir.join("m");
    copy_dir(&tiny("gpt2"), &m);
    std::fs::write(m.join("tokenizer.json"), word_tokenizer(100)).unwrap();
    let corpus = dir.join("c.txt");
    let lines: Vec<String> = (0..40)
        .map(|i| format!("w{} w{} w{}", i % 97, (i * 7) % 97, (i * 3 + 1) % 97))
        .collect();
    std::fs::write(&corpus, lines.join("\n") + "\n").unwrap();
    (m, corpus)
}

#[test]
fn collect_with_zero_positions() {
    let dir = tempfile::tempdir().unwrap();
    let (m, corpus) = collect_setup(dir.path());
    let out = dir.path().join("run");
    fails_with(
        &[
            "collect",
            m.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--positions",
            "0",
        ],
        &["--positions", "at least 1"],
    );
    fails_with(
        &[
            "collect",
            m.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--positions",
            "some",
        ],
        &["--positions", "'some'"],
    );
    assert!(!out.exists(), "a refused collection created its run folder");
}

#[test]
fn collect_with_no_sentences() {
    let dir = tempfile::tempdir().unwrap();
    let (m, corpus) = collect_setup(dir.path());
    let out = dir.path().join("run");
    for (flag, other) in [("--train", "--val"), ("--val", "--train")] {
        fails_with(
            &[
                "collect",
                m.to_str().unwrap(),
                "--corpus",
                corpus.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                flag,
                "0",
                other,
                "0",
            ],
            &["'0'", "--"],
        );
    }
    assert!(!out.exists(), "a refused collection created its run folder");
}

#[test]
fn bench_forward_on_a_small_vocabulary() {
    // The tiny models have 128 tokens; random inputs are drawn from ids 100..vocab/2.
    let m = tiny("llama");
    fails_with(
        &["bench", "forward", m.to_str().unwrap(), "--iters", "1"],
        &["vocabulary", "200", "128"],
    );
}

#[test]
fn bench_with_zero_iterations_or_sizes() {
    let m = tiny("llama");
    fails_with(
        &["bench", "forward", m.to_str().unwrap(), "--iters", "0"],
        &["--iters", "'0'"],
    );
    fails_with(
        &["bench", "forward", m.to_str().unwrap(), "--batch", "0"],
        &["--batch", "'0'"],
    );
    fails_with(&["bench", "fit", "--states", "1"], &["--states", "'1'"]);
    fails_with(&["bench", "forward"], &["bench forward needs a MODEL"]);
    fails_with(
        &["bench", "collect", m.to_str().unwrap()],
        &["bench collect needs --activations"],
    );
    fails_with(&["bench", "everything"], &["'everything'", "<WHAT>"]);
}

#[test]
fn out_of_range_options_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("norun");
    let r = run.to_str().unwrap();
    fails_with(&["fit", r, "--ridge=-1"], &["--ridge", "'-1'", ">= 0"]);
    fails_with(&["fit", r, "--pairs", "some"], &["--pairs", "'some'"]);
    fails_with(&["fit", r, "--precision", "f16"], &["--precision", "'f16'"]);
    fails_with(&["early-exit", r, "--rule", "fast"], &["--rule", "'fast'"]);
    fails_with(&["early-exit", r, "--measure", "entropy"], &["--measure", "'entropy'"]);
    fails_with(&["submodules", r, "--val", "0"], &["--val", "'0'"]);
    fails_with(&["submodules", r, "--n-train", "0"], &["--train", "'0'"]);
    fails_with(&["report", "--quick", "--train", "0"], &["--train", "'0'"]);
}

#[test]
fn peek_mask_word_not_in_the_text() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("bert_mlm"), dir.path());
    std::fs::write(dir.path().join("tokenizer.json"), word_tokenizer(100)).unwrap();
    fails_with(
        &[
            "peek",
            dir.path().to_str().unwrap(),
            "--text",
            "w1 w2 w3",
            "--mask",
            "w4",
        ],
        &["--mask 'w4'", "no such word", "w1 w2 w3"],
    );
}

#[test]
fn unknown_tap() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("llama"), dir.path());
    std::fs::write(dir.path().join("tokenizer.json"), word_tokenizer(100)).unwrap();
    let out = dir.path().join("h.safetensors");
    fails_with(
        &[
            "hidden-states",
            dir.path().to_str().unwrap(),
            "--text",
            "w1 w2",
            "--out",
            out.to_str().unwrap(),
            "--tap",
            "blocks.99.hook_resid_pre",
        ],
        &["--tap blocks.99.hook_resid_pre", "no such tap"],
    );
    assert!(!out.exists(), "written despite an unknown tap");
}

#[test]
fn report_html_only_on_a_folder_that_is_not_a_run() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(
        &["report", "--html-only", dir.path().to_str().unwrap()],
        &["not a jumplens run"],
    );
}

#[test]
fn unknown_dtype() {
    fails_with(
        &["--dtype", "int8", "inspect", tiny("llama").to_str().unwrap()],
        &["--dtype", "int8"],
    );
}

/// A weight stored as integers cannot be converted to the compute dtype: the error names the
/// file, the tensor, its stored dtype and --dtype.
#[test]
fn integer_weights_cannot_be_converted() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("llama"), dir.path());
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let w = tensors["model.norm.weight"].to_dtype(candle_core::DType::I64).unwrap();
    tensors.insert("model.norm.weight".into(), w);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    for dtype in ["f32", "bf16"] {
        fails_with(
            &["--dtype", dtype, "inspect", dir.path().to_str().unwrap()],
            &[
                "model.safetensors",
                "model.norm.weight",
                "I64",
                &format!("--dtype {dtype}"),
            ],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tuned lenses (issue 15): `predict --tuned-lens DIR`.

#[test]
fn predict_tuned_lens_for_another_model_is_refused_and_a_zero_lens_is_the_logit_lens() {
    use jumplens::lens::tuned::TunedLens;
    let (dir, run_dir) = tiny_run();
    let r = run_dir.to_str().unwrap();
    // The tiny Llama's lens (width 64) on the tiny GPT-2 run (width 32).
    let other = tiny("../tuned/llama_peer");
    fails_with(
        &["predict", r, "--quiet", "--tuned-lens", other.to_str().unwrap()],
        &["llama_peer", "width 64", "width is 32"],
    );
    assert!(
        !run_dir.join("predict.json").exists(),
        "nothing written on a refused lens"
    );
    // A zero lens (tuned-lens's starting point) reads out exactly like the logit lens.
    let zero = dir.path().join("zero-lens");
    TunedLens::zeros("gpt2", 32, 2, &candle_core::Device::Cpu)
        .unwrap()
        .write_dir(&zero)
        .unwrap();
    let (ok, err) = run(&["predict", r, "--quiet", "--tuned-lens", zero.to_str().unwrap()]);
    assert!(ok, "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("predict.json")).unwrap()).unwrap();
    let lenses = &report["lenses"];
    assert_eq!(lenses["tuned"]["p@1"], lenses["id"]["p@1"]);
    assert_eq!(lenses["tuned"]["kl"], lenses["id"]["kl"]);
    assert_eq!(lenses["tuned"]["p@1"].as_array().unwrap().len(), 3);
}
