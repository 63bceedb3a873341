//! What the integration tests share: the real-model assets and outside tools they need.
//!
//! An asset is looked up where `jumplens` itself looks ([`jumplens::data::assets::search_dirs`]:
//! `$JUMPLENS_ASSETS`, else `assets/`, the repository's `assets/`, the user cache). When something
//! is missing the test is skipped with a message saying so, unless `JUMPLENS_REQUIRE_ASSETS=1`
//! (set by `scripts/test.sh` and CI), which makes it a failure: a full run skips nothing.
//!
//! Also the tiny model folders and word corpora the CLI tests collect from.

// Each test binary that includes this module uses only some of it.
#![allow(dead_code)]

use std::path::PathBuf;

/// Whether missing assets fail the tests (`JUMPLENS_REQUIRE_ASSETS=1`).
pub fn required() -> bool {
    std::env::var("JUMPLENS_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

/// Skips (returns None, with a visible message) or, when [`required`], fails, saying what is
/// missing.
pub fn missing<T>(what: &str) -> Option<T> {
    if required() {
        panic!("{what} (JUMPLENS_REQUIRE_ASSETS=1 makes this a failure)");
    }
    eprintln!("SKIPPED: {what}; `bash scripts/test.sh` fetches everything and skips nothing");
    None
}

/// The asset `rel` (e.g. `smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, `bert_mlm`), or a skip.
pub fn asset(rel: &str) -> Option<PathBuf> {
    if let Some(p) = jumplens::data::assets::find(rel) {
        return Some(p);
    }
    let looked: Vec<String> = jumplens::data::assets::search_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    let name = rel.split('/').next().unwrap_or(rel);
    missing(&format!(
        "asset {rel} is missing (looked in {}); run `bash scripts/fetch_assets.sh {name}`",
        looked.join(", ")
    ))
}

/// A word-level tokenizer as `dir/tokenizer.json`: words `w0`..`w{words-1}` with ids
/// 0..words-1 (unknown words are `w0`), then `[MASK]` = `words` when `mask` (masked LMs);
/// whitespace pre-tokenizer, no special tokens added.
pub fn write_word_tokenizer(dir: &std::path::Path, words: usize, mask: bool) {
    let mut vocab: Vec<String> = (0..words).map(|i| format!("\"w{i}\": {i}")).collect();
    if mask {
        vocab.push(format!("\"[MASK]\": {words}"));
    }
    std::fs::write(
        dir.join("tokenizer.json"),
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
            "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
            vocab.join(",")
        ),
    )
    .unwrap();
}

/// The tiny fixture `tests/fixtures/tiny/{name}` (`files`, or every file when empty) copied to
/// `to`, with [`write_word_tokenizer`]'s tokenizer: a model folder the CLI can collect from.
pub fn tiny_model_with_words(name: &str, files: &[&str], to: &std::path::Path, words: usize, mask: bool) {
    std::fs::create_dir_all(to).unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name);
    if files.is_empty() {
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    } else {
        for f in files {
            std::fs::copy(src.join(f), to.join(f)).unwrap();
        }
    }
    write_word_tokenizer(to, words, mask);
}

/// 200 distinct 7-word sentences over `w1`..`w99`, one a line, written to `path` (the tiny
/// runs of tests/shards.rs and tests/report_streamed.rs).
pub fn write_word_corpus(path: &std::path::Path) {
    let lines: Vec<String> = (0..200)
        .map(|i| {
            (0..6)
                .map(|j| format!("w{}", 1 + (7 * i + 3 * j + i * j) % 99))
                .collect::<Vec<_>>()
                .join(" ")
                + &format!(" w{}", 1 + i % 97)
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// A JSON file, parsed (a failure names the file).
pub fn read_json(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every number of two JSON values within `rel` (relative, floor 1), in the same structure; keys
/// for which `skip` holds are left out (timings, paths); other leaves must be equal when
/// `leaves_equal`, else they are not compared. `at` names the place in failure messages.
pub fn json_agree(
    a: &serde_json::Value,
    b: &serde_json::Value,
    rel: f64,
    at: &str,
    skip: &dyn Fn(&str) -> bool,
    leaves_equal: bool,
) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                if skip(k) {
                    continue;
                }
                let w = y.get(k).unwrap_or_else(|| panic!("{at}.{k} missing"));
                json_agree(v, w, rel, &format!("{at}.{k}"), skip, leaves_equal);
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: lengths");
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                json_agree(v, w, rel, &format!("{at}[{i}]"), skip, leaves_equal);
            }
        }
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= rel * x.abs().max(y.abs()).max(1.0), "{at}: {x} vs {y}");
        }
        (x, y) if leaves_equal => assert_eq!(x, y, "{at}"),
        _ => {}
    }
}
