//! Issue 14's "done when": every architecture family added there runs the whole command-line
//! chain (hidden-states, collect, fit, r2, predict, early-exit, submodules) on its tiny
//! random model (tests/fixtures/tiny, see ARCHS.md) with a word-level tokenizer and a tiny
//! corpus. Numerics are checked against transformers in tests/tiny_models.rs; this checks that
//! each stage accepts the architecture and writes its output.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One fixture per family (variants share the code paths exercised here).
const FIXTURES: &[&str] = &[
    "neox_parallel",
    "neox_sequential",
    "qwen3",
    "gemma2",
    "olmo2",
    "phi3_longrope",
    "mixtral",
];

fn run_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_jumplens"))
        .args(args)
        .output()
        .expect("run jumplens");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?} failed: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A copy of fixture `name` (config and weights) with a word-level tokenizer of 100 words.
fn model(name: &str, to: &Path) {
    let from = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name);
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let vocab: Vec<String> = (0..100).map(|i| format!("\"w{i}\": {i}")).collect();
    let tok = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
        "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
        vocab.join(",")
    );
    std::fs::write(to.join("tokenizer.json"), tok).unwrap();
}

#[test]
fn every_new_architecture_runs_the_whole_chain() {
    for name in FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m");
        model(name, &m);
        let m = m.to_str().unwrap();
        let corpus = dir.path().join("c.txt");
        let lines: Vec<String> = (0..30)
            .map(|i| {
                (0..6)
                    .map(|j| format!("w{}", 1 + (7 * i + 3 * j) % 99))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        std::fs::write(&corpus, lines.join("\n") + "\n").unwrap();
        let h = dir.path().join("h.safetensors");
        run_ok(&[
            "hidden-states",
            m,
            "--text",
            "w1 w2 w3 w4",
            "--out",
            h.to_str().unwrap(),
        ]);
        let states = jumplens::data::io::read_safetensors(&h).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(Path::new(m).join("config.json")).unwrap()).unwrap();
        let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
        let d = cfg["hidden_size"].as_u64().unwrap() as usize;
        assert_eq!(states["hidden_states"].dims(), &[layers + 1, 4, d], "{name}");

        let run = dir.path().join("run");
        let r = run.to_str().unwrap();
        run_ok(&[
            "collect",
            m,
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            r,
            "--train",
            "16",
            "--val",
            "6",
            "--quiet",
        ]);
        run_ok(&["fit", r, "--quiet"]);
        run_ok(&["r2", r]);
        run_ok(&["predict", r, "--quiet"]);
        run_ok(&["early-exit", r]);
        run_ok(&["submodules", r, "--val", "6", "--train", "16", "--quiet"]);
        for f in [
            "maps.safetensors",
            "r2.json",
            "predict.json",
            "early_exit.json",
            "submodules.json",
        ] {
            assert!(run.join(f).is_file(), "{name}: no {f}");
        }
        let sub: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("submodules.json")).unwrap()).unwrap();
        let text = sub.to_string();
        for variant in ["attn", "mlp"] {
            assert!(
                text.contains(&format!("\"{variant}\"")),
                "{name}: submodules.json lacks {variant}: {text:.300}"
            );
        }
    }
}
