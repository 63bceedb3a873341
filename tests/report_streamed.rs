//! `report` on the runs a big model needs (issues 13 item 4, 17): a statistics-only run
//! (`collect --stats-only`, all pairs or to-final) and a run whose maps are to-final.
//!
//! On a 4-block tiny GPT-2 (the fixture's two blocks repeated; 5 states, so the alternation
//! schedules jump 1 -> 2, which to-final maps lack) with a word tokenizer:
//! - the training examples a statistics-only run replays (`collect::replay_train`) are the
//!   stored run's: same tokens, positions, order, and bitwise the same states;
//! - `report` on a stats-only run, and on two stats-only shards merged, does not collect again
//!   and gives the stored run's sub-module and alternation results (within 1e-6: its maps come
//!   from the statistics);
//! - with to-final maps (stats-only to-final, or a stored run fitted `--pairs to-final`) the
//!   sub-module stage fits the short jumps itself and the periodic schedules give the same
//!   results as with all-pair maps;
//! - one shard of a sharded run is refused with one line.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use serde_json::Value;

mod common;
use common::read_json;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jumplens"))
}

/// Runs jumplens; returns (ok, stderr).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .args(args)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("JOB_COMPLETION_INDEX")
        .output()
        .expect("run jumplens");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ok(args: &[&str]) -> String {
    let (good, err) = run(args);
    assert!(good, "{args:?} failed: {err}");
    err
}

/// The tiny GPT-2 grown to 4 blocks (blocks 2, 3 = copies of 0, 1), a 100-word tokenizer and a
/// corpus of 200 distinct 7-word sentences.
fn setup(dir: &Path) -> (String, String) {
    let m = dir.join("m");
    std::fs::create_dir_all(&m).unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/gpt2");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["n_layer"] = 4.into();
    std::fs::write(m.join("config.json"), config.to_string()).unwrap();
    let mut weights = jumplens::data::io::read_safetensors(&src.join("model.safetensors")).unwrap();
    let copies: Vec<(String, candle_core::Tensor)> = weights
        .iter()
        .filter_map(|(name, t)| {
            let renamed = name
                .replace("transformer.h.0.", "transformer.h.2.")
                .replace("transformer.h.1.", "transformer.h.3.");
            (renamed != *name).then(|| (renamed, t.clone()))
        })
        .collect();
    weights.extend(copies);
    candle_core::safetensors::save(&weights, m.join("model.safetensors")).unwrap();
    common::write_word_tokenizer(&m, 100, false);
    let corpus = dir.join("corpus.txt");
    common::write_word_corpus(&corpus);
    (m.display().to_string(), corpus.display().to_string())
}

const SIZES: [&str; 4] = ["--train", "60", "--val", "20"];

fn collect(model: &str, corpus: &str, out: &Path, extra: &[&str]) {
    let out = out.to_str().unwrap();
    let mut a = vec!["collect", "--quiet", model, "--corpus", corpus, "--out", out];
    a.extend_from_slice(&SIZES);
    a.extend_from_slice(extra);
    ok(&a);
}

fn report(model: &str, corpus: &str, out: &Path) -> String {
    let out = out.to_str().unwrap();
    let mut a = vec!["report", model, "--corpus", corpus, "--out", out];
    a.extend_from_slice(&SIZES);
    ok(&a)
}

/// Every number of two JSON values within `rel` (relative, floor 1), timings skipped, every
/// other leaf equal.
fn json_agree(a: &Value, b: &Value, rel: f64, at: &str) {
    common::json_agree(a, b, rel, at, &|k| k.contains("wall") || k.ends_with("_s"), true);
}

fn submodules_record(run: &Path) -> Value {
    read_json(&run.join("manifest.json"))["stages"]["submodules"].clone()
}

#[test]
fn replayed_training_examples_are_the_stored_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path());
    let stored = dir.path().join("stored");
    collect(&model, &corpus, &stored, &[]);
    let act = jumplens::data::Activations::read(&stored.join("activations/train.safetensors")).unwrap();
    let lm = jumplens::model::load_model(&model, &Device::Cpu).unwrap();
    let opts = jumplens::collect::CollectOptions {
        n_train: 60,
        n_val: 20,
        ..Default::default()
    };
    let all = jumplens::collect::replay_train(&lm, Path::new(&corpus), &opts, usize::MAX, 0, false).unwrap();
    assert_eq!(all.len(), act.len());
    assert_eq!(all.positions, act.positions);
    assert_eq!(all.tokens, act.tokens);
    assert_eq!(all.offsets, act.offsets);
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&all.hidden_states), flat(&act.hidden_states), "replayed states");
    // A prefix: the first 25 examples (batched differently: equal to float rounding).
    let some = jumplens::collect::replay_train(&lm, Path::new(&corpus), &opts, 25, 0, false).unwrap();
    assert_eq!(some.positions, act.positions[..25]);
    assert_eq!(some.offsets[..], act.offsets[..26]);
    let head = act.hidden_states.narrow(1, 0, 25).unwrap();
    let (x, y) = (flat(&some.hidden_states), flat(&head));
    let worst = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "prefix states differ by {worst}");
}

#[test]
fn report_runs_every_stage_on_stats_only_and_to_final_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path());
    let stored = dir.path().join("stored");
    let stats_all = dir.path().join("stats-all");
    let stats_final = dir.path().join("stats-final");
    collect(&model, &corpus, &stored, &[]);
    collect(&model, &corpus, &stats_all, &["--stats-only", "--pairs", "all"]);
    collect(&model, &corpus, &stats_final, &["--stats-only", "--pairs", "to-final"]);
    report(&model, &corpus, &stored);
    for run in [&stats_all, &stats_final] {
        let log = report(&model, &corpus, run);
        assert!(
            log.contains("collect: up to date, skipped"),
            "{}: collected again: {log}",
            run.display()
        );
        assert!(run.join("report.html").exists());
        assert!(!run.join("activations/train.safetensors").exists());
        let rec = submodules_record(run);
        assert_eq!(rec["train_replayed"], true, "{}", run.display());
        assert_eq!(rec["n_train"], 60);
    }
    assert_eq!(submodules_record(&stored)["train_replayed"], false);
    assert_eq!(submodules_record(&stored)["jump_maps_fitted"], 0);
    assert_eq!(submodules_record(&stats_all)["jump_maps_fitted"], 0);
    // L = 4: the schedules jump 1 -> 2, 2 -> 4, 3 -> 4; to-final maps lack only 1 -> 2.
    assert_eq!(submodules_record(&stats_final)["jump_maps_fitted"], 1);

    let sub = |run: &Path| read_json(&run.join("submodules.json"));
    let alt = |run: &Path| read_json(&run.join("alternation.json"));
    // Stats-only with all pairs is the stored run (maps from the float64 sums: 1e-6).
    json_agree(&sub(&stats_all), &sub(&stored), 1e-6, "submodules");
    json_agree(&alt(&stats_all), &alt(&stored), 1e-6, "alternation");
    // To-final: the same sub-module results and periodic schedules (the jump 1 -> 2 fitted by
    // the stage on the same 60 examples); the r²-informed schedules choose among fewer jumps.
    json_agree(&sub(&stats_final), &sub(&stored), 1e-6, "submodules");
    let (a, b) = (alt(&stats_final), alt(&stored));
    assert!(a["periodic"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["jumps"][0] == serde_json::json!([1, 2])));
    json_agree(&a["periodic"], &b["periodic"], 1e-6, "periodic");
    json_agree(&a["single_jump"], &b["single_jump"], 1e-6, "single_jump");
    for s in a["r2_informed"].as_array().unwrap() {
        for j in s["jumps"].as_array().unwrap() {
            let (l, l2) = (j[0].as_u64().unwrap(), j[1].as_u64().unwrap());
            assert!(l2 == 4 || l2 == l + 1, "r2-informed jump {l} -> {l2} without a map");
        }
    }

    // Two stats-only shards merged: a single run to report on, with the same results.
    let (s0, s1, merged) = (dir.path().join("s0"), dir.path().join("s1"), dir.path().join("merged"));
    for (i, shard) in [&s0, &s1].into_iter().enumerate() {
        let which = format!("{i}/2");
        collect(
            &model,
            &corpus,
            shard,
            &[
                "--stats-only",
                "--pairs",
                "all",
                "--part-sentences",
                "10",
                "--shard",
                &which,
            ],
        );
    }
    ok(&[
        "merge",
        merged.to_str().unwrap(),
        s0.to_str().unwrap(),
        s1.to_str().unwrap(),
    ]);
    let log = report(&model, &corpus, &merged);
    assert!(
        log.contains("collect: up to date, skipped"),
        "merged run collected again: {log}"
    );
    assert_eq!(submodules_record(&merged)["train_replayed"], true);
    json_agree(&sub(&merged), &sub(&stored), 1e-6, "submodules");
    json_agree(&alt(&merged), &alt(&stored), 1e-6, "alternation");

    // A stored run fitted to-final: `submodules` fits the jump from the stored states.
    let stored_final = dir.path().join("stored-final");
    std::fs::create_dir_all(stored_final.join("activations")).unwrap();
    for f in [
        "manifest.json",
        "activations/train.safetensors",
        "activations/val.safetensors",
    ] {
        std::fs::copy(stored.join(f), stored_final.join(f)).unwrap();
    }
    let sf = stored_final.to_str().unwrap();
    ok(&["fit", sf, "--pairs", "to-final", "--quiet"]);
    ok(&["r2", sf]);
    let log = ok(&["submodules", sf, "--val", "300", "--train", "3000"]);
    assert!(log.contains("fitting those 1"), "{log}");
    assert_eq!(submodules_record(&stored_final)["jump_maps_fitted"], 1);
    json_agree(&alt(&stored_final)["periodic"], &b["periodic"], 1e-6, "periodic");
}

#[test]
fn report_refuses_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path());
    let shard = dir.path().join("shard0");
    collect(
        &model,
        &corpus,
        &shard,
        &["--stats-only", "--shard", "0/2", "--part-sentences", "10"],
    );
    let out = shard.to_str().unwrap();
    let mut a = vec!["report", model.as_str(), "--corpus", corpus.as_str(), "--out", out];
    a.extend_from_slice(&SIZES);
    let (good, err) = run(&a);
    assert!(!good && !err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("merge all shards"), "{}", lines[0]);
}
