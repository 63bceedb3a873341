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
