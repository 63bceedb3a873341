//! The reference set of the real-model tests (tests/real_models.rs in f32, tests/real_bf16.rs in
//! bf16): the 20 sentences and the PyTorch fixtures exported for them by
//! scripts/export_real_reference.py. A module of its own so that test binaries without real
//! models do not compile it.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;

fn real_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real")
}

/// The reference sentences (one per line, `\n` escaped).
pub fn sentences() -> Vec<String> {
    std::fs::read_to_string(real_dir().join("sentences.txt"))
        .unwrap()
        .lines()
        .map(|l| l.replace("\\n", "\n"))
        .collect()
}

/// The fixture `tests/fixtures/real/{stem}.safetensors`.
pub fn reference(stem: &str) -> HashMap<String, Tensor> {
    jumplens::data::io::read_safetensors(&real_dir().join(format!("{stem}.safetensors"))).unwrap()
}
