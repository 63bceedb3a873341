//! The command line as a user meets it: help that lists values, defaults and examples, the
//! sub-commands in pipeline order, the same flag names everywhere, and the fixes for what new
//! users tripped over (peek --mask WORD, hidden-states --tap, collect's closing summary, model
//! paths recorded absolute).

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

/// Runs jumplens in `dir` (the current folder when None); returns (exit ok, stdout, stderr).
fn run_in(dir: Option<&Path>, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(bin());
    c.args(args);
    if let Some(d) = dir {
        c.current_dir(d);
    }
    let out = c.output().expect("run jumplens");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn help(args: &[&str]) -> String {
    let mut a = args.to_vec();
    a.push("--help");
    let (ok, out, err) = run_in(None, &a);
    assert!(ok, "{a:?} failed: {err}");
    out
}

/// A copy of a tiny fixture with a word-level tokenizer (w0..w{n-1}, plus [MASK] when `mask`).
fn model_with_tokenizer(fixture: &str, n: usize, mask: bool, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(tiny(fixture)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
    let mut vocab: Vec<String> = (0..n).map(|i| format!("\"w{i}\": {i}")).collect();
    if mask {
        vocab.push(format!("\"[MASK]\": {n}"));
    }
    let tok = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
        "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
        vocab.join(",")
    );
    std::fs::write(to.join("tokenizer.json"), tok).unwrap();
}

#[test]
fn subcommands_are_listed_in_pipeline_order() {
    let out = help(&[]);
    let order = [
        "inspect",
        "hidden-states",
        "collect",
        "fit",
        "r2",
        "predict",
        "early-exit",
        "submodules",
        "peek",
        "report",
        "bench",
    ];
    let at: Vec<usize> = order
        .iter()
        .map(|c| {
            out.find(&format!("\n  {c} "))
                .unwrap_or_else(|| panic!("{c} not listed:\n{out}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "not in pipeline order:\n{out}");
    assert!(out.contains("cpu|cuda[:N]"), "--device values not shown:\n{out}");
}

#[test]
fn every_command_has_examples_and_help_on_every_argument() {
    for cmd in [
        "inspect",
        "hidden-states",
        "collect",
        "fit",
        "r2",
        "predict",
        "early-exit",
        "submodules",
        "peek",
        "report",
        "bench",
    ] {
        let out = help(&[cmd]);
        assert!(out.contains("Example"), "{cmd} --help has no examples:\n{out}");
        // In the short help an argument without help text is its name alone on the line.
        let (ok, short, err) = run_in(None, &[cmd, "-h"]);
        assert!(ok, "{cmd} -h: {err}");
        let options = short.split("\nExample").next().unwrap();
        for line in options.lines() {
            let t = line.trim();
            let is_arg = (t.starts_with('-') || t.starts_with('<') || t.starts_with('['))
                && !t.starts_with("[default")
                && !t.starts_with("[possible")
                && !t.starts_with("[aliases");
            let parts = t.split("  ").filter(|p| !p.trim().is_empty()).count();
            assert!(
                !is_arg || parts >= 2,
                "{cmd}: an argument without help: {line:?}\n{short}"
            );
        }
    }
}

#[test]
fn choices_and_defaults_are_visible() {
    let fit = help(&["fit"]);
    for s in ["all", "to-final", "auto", "f32", "f64", "[default: auto]"] {
        assert!(fit.contains(s), "fit --help lacks {s:?}:\n{fit}");
    }
    let ee = help(&["early-exit"]);
    for s in [
        "paper",
        "calm",
        "top1-top2",
        "max-prob",
        "cosine",
        "[default: top1-top2]",
    ] {
        assert!(ee.contains(s), "early-exit --help lacks {s:?}:\n{ee}");
    }
    let bench = help(&["bench"]);
    for s in ["forward", "collect", "fit", "[default: 5]"] {
        assert!(bench.contains(s), "bench --help lacks {s:?}:\n{bench}");
    }
    let collect = help(&["collect"]);
    for s in [
        "--train",
        "--val",
        "[default: 9000]",
        "[default: 3000]",
        "--quiet",
        "K|all",
    ] {
        assert!(collect.contains(s), "collect --help lacks {s:?}:\n{collect}");
    }
    let sub = help(&["submodules"]);
    for s in ["--train", "--val", "n-train", "n-eval", "[default: 300]", "--quiet"] {
        assert!(sub.contains(s), "submodules --help lacks {s:?}:\n{sub}");
    }
}

#[test]
fn old_flag_names_still_work() {
    // submodules' --n-eval / --n-train are aliases of --val / --train: parsing gets as far as
    // the (missing) run folder.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("norun");
    let (ok, _, err) = run_in(
        None,
        &["submodules", run.to_str().unwrap(), "--n-eval", "10", "--n-train", "20"],
    );
    assert!(!ok);
    assert!(err.contains("not a jumplens run"), "{err}");
}

#[test]
fn collect_prints_a_summary_and_records_the_absolute_model_path() {
    let dir = tempfile::tempdir().unwrap();
    model_with_tokenizer("gpt2", 100, false, &dir.path().join("m"));
    let lines: Vec<String> = (0..60)
        .map(|i| format!("w{} w{} w{} w{}", i % 97, (i * 7) % 97, (i * 13) % 97, (i * 3 + 1) % 97))
        .collect();
    std::fs::write(dir.path().join("c.txt"), lines.join("\n") + "\n").unwrap();
    // Relative paths, run from the temporary folder.
    let (ok, _, err) = run_in(
        Some(dir.path()),
        &[
            "collect", "m", "--corpus", "c.txt", "--out", "run", "--train", "20", "--val", "10",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("collect train: 20 sentences -> 20 examples"),
        "no train summary: {err}"
    );
    assert!(
        err.contains("collect val: 10 sentences -> 10 examples"),
        "no val summary: {err}"
    );
    assert!(!err.contains('{'), "raw JSON on stderr: {err}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/manifest.json")).unwrap()).unwrap();
    let path = m["model"]["path"].as_str().unwrap();
    assert!(Path::new(path).is_absolute(), "model path not absolute: {path}");
    assert_eq!(
        Path::new(path),
        dir.path().join("m").canonicalize().unwrap(),
        "model path"
    );
    // Collecting again finds both splits done.
    let (ok, _, err) = run_in(
        Some(dir.path()),
        &[
            "collect", "m", "--corpus", "c.txt", "--out", "run", "--train", "20", "--val", "10",
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("(already collected)"), "{err}");
}

#[test]
fn peek_masks_a_word_given_as_a_word_or_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    model_with_tokenizer("bert_mlm", 100, true, &m);
    let text = "w5 w6 w7 w8";
    let peek = |mask: &str| {
        let (ok, out, err) = run_in(None, &["peek", m.to_str().unwrap(), "--text", text, "--mask", mask]);
        assert!(ok, "--mask {mask}: {err}");
        out
    };
    let by_word = peek("w7");
    assert!(by_word.contains("masked position"), "{by_word}");
    assert_eq!(by_word, peek("2"), "--mask w7 and --mask 2 differ");
    assert_ne!(by_word, peek("1"), "--mask 1 masks the same word as --mask w7");
    let (ok, _, err) = run_in(None, &["peek", m.to_str().unwrap(), "--text", text, "--mask", "w9"]);
    assert!(!ok);
    assert!(err.contains("--mask 'w9'") && err.contains("w5 w6 w7 w8"), "{err}");
}

#[test]
fn hidden_states_writes_the_requested_taps() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    model_with_tokenizer("llama", 100, false, &m);
    let out = dir.path().join("h.safetensors");
    let (ok, _, err) = run_in(
        None,
        &[
            "hidden-states",
            m.to_str().unwrap(),
            "--text",
            "w1 w2 w3",
            "--out",
            out.to_str().unwrap(),
            "--tap",
            "blocks.1.hook_resid_mid",
            "--tap",
            "blocks.0.hook_resid_post",
        ],
    );
    assert!(ok, "{err}");
    let t = jumplens::data::io::read_safetensors(&out).unwrap();
    let h = &t["hidden_states"];
    let (_, n_tokens, d) = h.dims3().unwrap();
    assert_eq!(t["blocks.1.hook_resid_mid"].dims(), &[n_tokens, d]);
    // blocks.0.hook_resid_post is h_1.
    let post = t["blocks.0.hook_resid_post"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let h1 = h.get(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let worst = post.iter().zip(&h1).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-6, "blocks.0.hook_resid_post differs from h_1 by {worst}");
    let (ok, _, err) = run_in(
        None,
        &[
            "hidden-states",
            m.to_str().unwrap(),
            "--text",
            "w1 w2",
            "--out",
            out.to_str().unwrap(),
            "--tap",
            "blocks.0.hook_nothing",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("--tap blocks.0.hook_nothing") && err.contains("blocks.0.hook_resid_pre"),
        "{err}"
    );
}
