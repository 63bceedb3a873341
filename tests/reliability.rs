//! Issue 19: nothing lost, nothing silently wrong. The run folder's manifest is its contract
//! (stages refuse data that contradicts it, naming the field), a lock keeps two writers apart,
//! bad numbers are refused, temporary files never stay, the same command writes the same bytes,
//! kill -9 at any moment resumes to the same bytes, and Ctrl-C says what was kept (exit 130).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jumplens"))
}

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
}

/// A tiny GPT-2 with a word-level tokenizer (w0..w99) and a corpus of `lines` sentences.
struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: String,
    corpus: String,
}

fn setup(lines: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let m = root.join("m");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(tiny("gpt2")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, m.join(p.file_name().unwrap())).unwrap();
    }
    let vocab: Vec<String> = (0..100).map(|i| format!("\"w{i}\": {i}")).collect();
    let tok = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
        "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
        vocab.join(",")
    );
    std::fs::write(m.join("tokenizer.json"), tok).unwrap();
    let text: String = (0..lines)
        .map(|i| {
            let words: Vec<String> = (0..4 + i % 5).map(|k| format!("w{}", (i * 7 + k * 3) % 100)).collect();
            words.join(" ") + "\n"
        })
        .collect();
    let corpus = root.join("corpus.txt");
    std::fs::write(&corpus, text).unwrap();
    Setup {
        model: m.display().to_string(),
        corpus: corpus.display().to_string(),
        root,
        _dir: dir,
    }
}

fn jumplens(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run jumplens")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) {
    let o = jumplens(args);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
}

/// Fails with one error line holding every needle, and no panic.
fn fails_with(args: &[&str], needles: &[&str]) {
    let o = jumplens(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure for {args:?}: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "expected one error line for {args:?}, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "error for {args:?} lacks '{n}': {}", lines[0]);
    }
}

impl Setup {
    fn collect_args<'a>(&'a self, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "collect",
            &self.model,
            "--corpus",
            &self.corpus,
            "--out",
            out,
            "--train",
            "40",
            "--val",
            "20",
            "--quiet",
        ];
        a.extend_from_slice(extra);
        a
    }
    fn out(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }
}

/// Every `.tmp` file under `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "tmp") {
                found.push(p);
            }
        }
    }
    found
}

/// Item 1: a missing or corrupt manifest beside collected data is an error, not a fresh start.
#[test]
fn manifest_missing_or_corrupt_beside_data_is_refused() {
    let s = setup(200);
    let out = s.out("run");
    ok(&s.collect_args(&out, &[]));
    let manifest = Path::new(&out).join("manifest.json");
    let good = std::fs::read(&manifest).unwrap();
    std::fs::remove_file(&manifest).unwrap();
    fails_with(
        &s.collect_args(&out, &[]),
        &["outputs without a manifest.json", "train.safetensors"],
    );
    fails_with(&["fit", &out, "--quiet"], &["manifest.json"]);
    std::fs::write(&manifest, &good[..good.len() / 2]).unwrap();
    fails_with(&s.collect_args(&out, &[]), &["manifest.json", "invalid manifest"]);
    // A folder holding only later outputs (no activations) counts too.
    let other = s.out("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(Path::new(&other).join("maps.safetensors"), b"x").unwrap();
    fails_with(
        &s.collect_args(&other, &[]),
        &["maps.safetensors", "without a manifest"],
    );
}

/// Items 1 and 2: the refusal names the option that differs; batch sizes never block a resume;
/// a manifest without data binds nothing (a retry after an early failure works).
#[test]
fn resume_refusal_names_the_option_and_ignores_batch_size() {
    let s = setup(200);
    let out = s.out("run");
    ok(&s.collect_args(&out, &[]));
    let mut other = s.collect_args(&out, &[]);
    other[7] = "41";
    fails_with(&other, &["n_train (--train)", "recorded 40, now 41", "new --out"]);
    fails_with(
        &s.collect_args(&out, &["--seed", "3"]),
        &["seed (--seed)", "recorded 0, now 3"],
    );
    ok(&s.collect_args(&out, &["--batch-tokens", "64"]));
    // Only the manifest left (as after a failure before the first part): any retry starts over.
    std::fs::remove_dir_all(Path::new(&out).join("activations")).unwrap();
    ok(&s.collect_args(&out, &["--seed", "3"]));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&out).join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["seed"], 3);
}

/// Item 1: data that contradicts the manifest (counts edited or files swapped) is refused by the
/// stage reading it, naming the field.
#[test]
fn stages_check_activations_against_the_manifest() {
    let s = setup(200);
    let out = s.out("run");
    ok(&s.collect_args(&out, &[]));
    let mpath = Path::new(&out).join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["counts"]["train"]["examples"] = serde_json::json!(39);
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    fails_with(
        &["fit", &out, "--quiet"],
        &["train.safetensors", "counts.train.examples", "39"],
    );
}

/// Item 1: a lock keeps a second writer out; a dead process's lock is taken over and released.
#[test]
fn run_lock_refuses_a_live_writer_and_takes_over_a_dead_one() {
    let s = setup(200);
    let out = s.out("run");
    std::fs::create_dir_all(&out).unwrap();
    let lock = Path::new(&out).join(".lock");
    let mut live = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(&lock, format!("{}\n", live.id())).unwrap();
    fails_with(
        &s.collect_args(&out, &[]),
        &["another jumplens process", &live.id().to_string()],
    );
    live.kill().ok();
    live.wait().ok();
    std::fs::write(&lock, "4999999\n").unwrap();
    ok(&s.collect_args(&out, &[]));
    assert!(!lock.exists(), "the lock stays after the run");
}

/// Item 3: NaN in the validation states is refused naming split, layer and example; a ridge
/// that would zero the maps is refused naming the bound.
#[test]
fn bad_numbers_are_refused() {
    let s = setup(200);
    let out = s.out("run");
    ok(&s.collect_args(&out, &[]));
    ok(&["fit", &out, "--quiet"]);
    ok(&["predict", &out, "--quiet"]);
    fails_with(
        &["fit", &out, "--quiet", "--ridge", "1e300"],
        &["--ridge", "largest Gram diagonal"],
    );
    let val = Path::new(&out).join("activations/val.safetensors");
    let mut t = jumplens::data::io::read_safetensors(&val).unwrap();
    let h = &t["hidden_states"];
    let (sl, n, d) = h.dims3().unwrap();
    let mut v: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
    v[(2 * n + 5) * d + 1] = f32::NAN;
    t.insert(
        "hidden_states".into(),
        candle_core::Tensor::from_vec(v, (sl, n, d), &candle_core::Device::Cpu).unwrap(),
    );
    let mut tensors: Vec<(String, candle_core::Tensor)> = t.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    jumplens::data::io::write_safetensors(&val, &tensors, None).unwrap();
    // Every stage that reads the validation states refuses them (they went through r2, predict
    // and early exit with exit 0 before).
    for stage in [&["r2", &out][..], &["predict", &out, "--quiet"], &["early-exit", &out]] {
        fails_with(stage, &["val.safetensors", "non-finite", "layer 2", "example 5"]);
    }
}

/// Later stages check the model's sha256 against the manifest, not only its shape: another
/// model file of the same shape is refused naming model.sha256, and so is the run's own model
/// changed in place after a stage cached its hash.
#[test]
fn later_stages_refuse_another_model_of_the_same_shape() {
    let s = setup(200);
    let out = s.out("run");
    ok(&s.collect_args(&out, &[]));
    ok(&["fit", &out, "--quiet"]);
    // The same model with one weight changed: same shapes, another sha256.
    let other = s.root.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for e in std::fs::read_dir(&s.model).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, other.join(p.file_name().unwrap())).unwrap();
    }
    let flip_a_weight = |dir: &Path| {
        let w = dir.join("model.safetensors");
        let mut bytes = std::fs::read(&w).unwrap();
        let n = bytes.len();
        bytes[n - 4] ^= 1; // the lowest mantissa bit of the last f32
        std::fs::write(&w, bytes).unwrap();
    };
    flip_a_weight(&other);
    let other = other.display().to_string();
    for stage in ["predict", "submodules"] {
        fails_with(
            &[stage, &out, "--model", &other, "--quiet"],
            &["manifest.json", "model.sha256", &other],
        );
    }
    let maps = Path::new(&out).join("maps.safetensors").display().to_string();
    fails_with(
        &["peek", &other, "--maps", &maps, "--text", "w1 w2 w3"],
        &["maps.safetensors", "model_sha256", &other],
    );
    ok(&["peek", &s.model, "--maps", &maps, "--text", "w1 w2 w3"]);
    // The run's own model passes (and its hash is cached in the run folder) ...
    ok(&["predict", &out, "--quiet"]);
    assert!(Path::new(&out).join(".sha256-cache.json").exists());
    // ... until it changes in place: the cache is keyed by size and mtime, so it is hashed again.
    flip_a_weight(Path::new(&s.model));
    fails_with(&["predict", &out, "--quiet"], &["model.sha256", &s.model]);
}

/// Item 3: a NaN score is an error, never a `null` beside the "not fitted" nulls.
#[test]
fn nan_scores_never_become_null() {
    let table = vec![vec![None, Some(0.5)], vec![None, Some(f64::NAN)]];
    let err = jumplens::pipeline::r2::check_finite_table("mat", &table)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 -> 1") && err.contains("NaN"), "{err}");
    assert!(jumplens::pipeline::r2::check_finite_table("mat", &table[..1]).is_ok());
}

/// Item 5: the same command writes byte-identical files (activations and maps).
#[test]
fn same_command_same_bytes() {
    let s = setup(200);
    let (a, b) = (s.out("a"), s.out("b"));
    for out in [&a, &b] {
        ok(&s.collect_args(out, &[]));
        ok(&["fit", out, "--quiet"]);
    }
    for f in [
        "activations/train.safetensors",
        "activations/val.safetensors",
        "maps.safetensors",
    ] {
        let x = std::fs::read(Path::new(&a).join(f)).unwrap();
        let y = std::fs::read(Path::new(&b).join(f)).unwrap();
        assert!(x == y, "{f} differs between two identical runs");
    }
}

/// The short fault injection (the script does more): kill -9 collect at a few moments, rerun,
/// and the result equals an uninterrupted run's bytes with no temporary file left.
#[test]
fn kill_nine_then_rerun_gives_the_same_bytes() {
    let s = setup(3000);
    let reference = s.out("ref");
    let args = |out: &str| -> Vec<String> {
        s.collect_args(out, &[])
            .iter()
            .map(|a| a.to_string())
            .map(|a| {
                if a == "40" {
                    "1000".into()
                } else if a == "20" {
                    "300".into()
                } else {
                    a
                }
            })
            .collect()
    };
    let started = std::time::Instant::now();
    let o = Command::new(bin()).args(args(&reference)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let full = started.elapsed();
    let out = s.out("killed");
    for k in 0..3u32 {
        let mut child = Command::new(bin()).args(args(&out)).spawn().unwrap();
        std::thread::sleep(full * (k + 1) / 5);
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
    }
    let o = Command::new(bin()).args(args(&out)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["activations/train.safetensors", "activations/val.safetensors"] {
        let x = std::fs::read(Path::new(&reference).join(f)).unwrap();
        let y = std::fs::read(Path::new(&out).join(f)).unwrap();
        assert!(x == y, "{f} differs after kills");
    }
    assert_eq!(temp_files(Path::new(&out)), Vec::<PathBuf>::new());
    assert!(!Path::new(&out).join(".lock").exists());
}

/// Item 6: Ctrl-C during collect prints one line saying what was kept and how to resume, and
/// exits with 130.
#[test]
fn ctrl_c_says_what_was_kept() {
    let s = setup(3000);
    let mut interrupted = 0;
    for (i, delay_ms) in [400u64, 200, 100, 50].into_iter().enumerate() {
        let out = s.out(&format!("run{i}"));
        let args: Vec<String> = s
            .collect_args(&out, &[])
            .iter()
            .map(|a| a.to_string())
            .map(|a| if a == "40" { "2000".into() } else { a })
            .collect();
        let child = Command::new(bin())
            .args(&args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        let o = child.wait_with_output().unwrap();
        if o.status.success() {
            continue; // finished before the signal
        }
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(130), "{err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("interrupted"))
            .unwrap_or_else(|| panic!("{err}"));
        assert!(line.contains("run the same command again"), "{line}");
        assert!(!Path::new(&out).join(".lock").exists(), "lock left after Ctrl-C");
        interrupted += 1;
        // And the rerun finishes.
        let o = Command::new(bin()).args(&args).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert!(interrupted > 0, "no run was interrupted");
}
