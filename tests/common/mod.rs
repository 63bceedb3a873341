//! What the integration tests share: the real-model assets and outside tools they need.
//!
//! An asset is looked up where `jumplens` itself looks ([`jumplens::data::assets::search_dirs`]:
//! `$JUMPLENS_ASSETS`, else `assets/`, the repository's `assets/`, the user cache). When something
//! is missing the test is skipped with a message saying so, unless `JUMPLENS_REQUIRE_ASSETS=1`
//! (set by `scripts/test.sh` and CI), which makes it a failure: a full run skips nothing.

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
