//! Blocks split across devices (`--device cpu,cpu`, issue 20), on the CPU: two or three device
//! handles, each block on its own, with masks and RoPE tables per device. A split run must give
//! bit-identical hidden states and logits to the unsplit run, and a collect / fit / predict run
//! folder with the same bytes; bad device lists are one-line errors.
//!
//! On the CPU two handles share memory, so the state moves between them are free; the same code
//! copies between GPUs (`scripts/device_bench.sh split` runs it with both halves on one GPU).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use jumplens::model::{self, Batch, LoadOptions};

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
}

fn load(name: &str, devices: usize) -> model::LoadedModel {
    let opts = LoadOptions::on(&vec![Device::Cpu; devices]);
    model::load_model_with(tiny(name).to_str().unwrap(), &opts).unwrap()
}

/// The fixture's padded batch (ids and lengths from its attention mask).
fn fixture_batch(name: &str) -> Batch {
    let inputs = jumplens::data::io::read_safetensors(&tiny(name).join("expected.safetensors")).unwrap();
    let lengths: Vec<usize> = inputs["attention_mask"]
        .sum(1)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let ids: Vec<Vec<u32>> = inputs["input_ids"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .zip(&lengths)
        .map(|(row, &n)| row[..n].iter().map(|&x| x as u32).collect())
        .collect();
    Batch::from_sequences(&ids, 0, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every Llama-like family split in two (and three where there are three blocks): the same
/// states h_0..h_L and logits, bit for bit, and the blocks placed as the balance says.
#[test]
fn split_forward_is_bit_identical_to_the_unsplit_one() {
    let cases = [
        ("llama", 2),
        ("llama_tied", 2),
        ("mistral_sliding", 2),
        ("qwen3", 2),
        ("qwen3_tied", 2),
        ("gemma3", 2),
        ("gemma2", 2),
        ("gemma2", 3),
        ("neox_parallel", 2),
        ("neox_sequential", 2),
        ("olmo2", 2),
        ("phi3_longrope", 2),
        ("mixtral", 2),
    ];
    for (name, n) in cases {
        let whole = load(name, 1);
        let split = load(name, n);
        assert!(whole.model.placement().is_none(), "{name}");
        let p = split.model.placement().expect("a placement");
        let n_layers = split.model.info().n_layers;
        assert_eq!(p.ranges.len(), n, "{name}");
        assert_eq!((p.ranges[0].0, p.ranges[n - 1].1), (0, n_layers), "{name}");
        assert!(p.ranges.iter().all(|&(a, b)| a < b), "{name}: {p:?}");
        assert!(
            p.describe().starts_with("cpu embedding + block"),
            "{name}: {}",
            p.describe()
        );
        assert!(p.describe().contains("+ head"), "{name}: {}", p.describe());
        let batch = fixture_batch(name);
        let a = model::hidden_states(whole.model.as_ref(), &batch).unwrap();
        let b = model::hidden_states(split.model.as_ref(), &batch).unwrap();
        assert_eq!(a.len(), b.len());
        for (l, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(values(x), values(y), "{name} x{n}: state {l}");
        }
        let la = whole.model.readout(a.last().unwrap()).unwrap();
        let lb = split.model.readout(b.last().unwrap()).unwrap();
        assert_eq!(values(&la), values(&lb), "{name} x{n}: logits");
        // Sanity: the split model computes the reference, not just the same as itself.
        let expected = jumplens::data::io::read_safetensors(&tiny(name).join("expected.safetensors")).unwrap();
        let want = expected["hidden_states"].get(n_layers).unwrap();
        let got = b.last().unwrap();
        let (w, g) = (values(&want), values(got));
        let lengths = &batch.lengths;
        let (t, d) = (batch.seq_len(), split.model.info().d_model);
        // Normwise over the real (unpadded) positions, as the fixture tests measure.
        let (mut err, mut norm) = (0f64, 0f64);
        for (row, &len) in lengths.iter().enumerate() {
            for i in 0..len * d {
                let k = row * t * d + i;
                err += f64::from(w[k] - g[k]).powi(2);
                norm += f64::from(w[k]).powi(2);
            }
        }
        let worst = (err / norm).sqrt();
        assert!(worst < 1e-5, "{name} x{n}: h_L off the reference by {worst} (normwise)");
    }
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jumplens"))
}

/// Runs jumplens; returns (exit ok, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run jumplens");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A copy of a tiny fixture with a word-level tokenizer w0..w{n-1}.
fn model_with_tokenizer(fixture: &str, n: usize, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(tiny(fixture)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
    let vocab: Vec<String> = (0..n).map(|i| format!("\"w{i}\": {i}")).collect();
    let tok = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
        "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
        vocab.join(",")
    );
    std::fs::write(to.join("tokenizer.json"), tok).unwrap();
}

/// Every file of a run folder (relative path -> bytes): JSON with the folder's own path as RUN,
/// the manifest without its times and rates and the placement record (only a split run has one).
fn folder(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                // Times and rates (wall_s, fit_s, gflops) and the placement record.
                m.retain(|k, _| !(k.ends_with("_s") || k == "gflops" || k == "placement"));
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let mut bytes = std::fs::read(&p).unwrap();
            if rel.ends_with(".json") {
                // Reports name their run folder, which differs between the runs compared.
                let text = String::from_utf8(bytes).unwrap();
                bytes = text.replace(&root.display().to_string(), "RUN").into_bytes();
            }
            if rel == "manifest.json" {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                strip(&mut v);
                bytes = serde_json::to_vec_pretty(&v).unwrap();
            }
            out.insert(rel, bytes);
        }
    }
    out
}

/// collect, fit and predict with `--device cpu,cpu` write the same files as with `--device cpu`
/// (JSON and safetensors byte for byte; the manifest up to wall times), and the split is printed
/// at the start and recorded; resuming with another placement is allowed.
#[test]
fn split_run_folder_matches_the_unsplit_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    model_with_tokenizer("gemma2", 100, &m);
    let lines: Vec<String> = (0..60)
        .map(|i| {
            format!(
                "w{} w{} w{} w{} w{}",
                i % 97,
                (i * 7) % 97,
                (i * 13) % 97,
                (i * 3 + 1) % 97,
                i % 11
            )
        })
        .collect();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, lines.join("\n") + "\n").unwrap();
    let (m, corpus) = (m.to_str().unwrap(), corpus.to_str().unwrap());
    let mut folders = Vec::new();
    for (devices, out) in [("cpu", "whole"), ("cpu,cpu", "two"), ("cpu,cpu,cpu", "three")] {
        // The same folder name (reports record it) under different parents.
        let out = dir.path().join(out).join("run");
        let o = out.to_str().unwrap();
        let (ok, _, err) = run(&[
            "--device", devices, "collect", m, "--corpus", corpus, "--out", o, "--train", "24", "--val", "12",
        ]);
        assert!(ok, "{devices} collect: {err}");
        assert_eq!(
            err.contains("placement: cpu embedding"),
            devices != "cpu",
            "{devices}: {err}"
        );
        for args in [vec!["fit", o], vec!["predict", o]] {
            let mut a = vec!["--device", devices];
            a.extend(args.iter().copied());
            let (ok, _, err) = run(&a);
            assert!(ok, "{devices} {}: {err}", args[0]);
        }
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        let placement = manifest["options"]["placement"].as_str();
        assert_eq!(placement.is_some(), devices != "cpu", "{devices}: {manifest}");
        folders.push(folder(&out));
    }
    assert!(
        folders[0].keys().any(|k| k.ends_with(".safetensors")),
        "{:?}",
        folders[0].keys()
    );
    assert!(folders[0].contains_key("predict.json"), "{:?}", folders[0].keys());
    for f in &folders[1..] {
        assert_eq!(f.keys().collect::<Vec<_>>(), folders[0].keys().collect::<Vec<_>>());
        for (k, v) in f {
            let (a, b) = (String::from_utf8_lossy(v), String::from_utf8_lossy(&folders[0][k]));
            let first = a.lines().zip(b.lines()).find(|(x, y)| x != y);
            assert!(
                v == &folders[0][k],
                "{k} differs between the split and the unsplit run: {first:?}"
            );
        }
    }
    // The same collection on one device resumes the split run's folder (placement does not bind).
    let two = dir.path().join("two/run");
    let (ok, _, err) = run(&[
        "collect",
        m,
        "--corpus",
        corpus,
        "--out",
        two.to_str().unwrap(),
        "--train",
        "24",
        "--val",
        "12",
    ]);
    assert!(ok && err.contains("(already collected)"), "{err}");
}

/// `inspect` prints the placement; bad lists and unsupported splits are one-line errors.
#[test]
fn device_lists_are_checked_and_printed() {
    let llama = tiny("llama");
    let llama = llama.to_str().unwrap();
    let (ok, out, err) = run(&["--device", "cpu,cpu", "inspect", llama]);
    assert!(ok, "{err}");
    assert!(
        out.contains("placement     cpu embedding + block 0 (") && out.contains("cpu block 1 + head ("),
        "{out}"
    );
    let (ok, out, _) = run(&["--device", "cpu,cpu", "inspect", llama, "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["placement"].as_str().unwrap().contains("block 1 + head"), "{v}");
    let gpt2 = tiny("gpt2");
    for (args, says) in [
        (
            vec!["--device", "cpu,", "inspect", llama],
            "item 2 of the list is empty",
        ),
        (
            vec!["--device", "cpu,gpu", "inspect", llama],
            "cpu or cuda[:N], not 'gpu'",
        ),
        (
            vec!["--device", "cpu,cpu,cpu", "inspect", llama],
            "--device lists 3 devices but the model has only 2 blocks",
        ),
        (
            vec!["--device", "cpu,cpu", "inspect", gpt2.to_str().unwrap()],
            "--device with several devices is not supported for GPT-2",
        ),
    ] {
        let (ok, _, err) = run(&args);
        assert!(!ok, "{args:?} succeeded");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(says),
            "{args:?}: {err}"
        );
    }
}

/// `bench --random-config`: random weights of the shapes a config describes, made on their
/// devices: the same parameter count as the real checkpoint of that config, the same values
/// whatever the split (per-tensor seeds), so split and unsplit forwards agree bit for bit.
#[test]
fn random_weights_from_a_config_split_like_stored_ones() {
    let config = tiny("llama").join("config.json");
    let stored = load("llama", 1);
    let random = |n: usize| model::load::random_model(&config, &LoadOptions::on(&vec![Device::Cpu; n]), 0).unwrap();
    let (one, two) = (random(1), random(2));
    assert_eq!(one.model.info().n_params, stored.model.info().n_params);
    assert_eq!(one.model.info().block_params, stored.model.info().block_params);
    assert!(one.model.placement().is_none() && two.model.placement().is_some());
    let batch = fixture_batch("llama");
    let a = model::hidden_states(one.model.as_ref(), &batch).unwrap();
    let b = model::hidden_states(two.model.as_ref(), &batch).unwrap();
    for (l, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(values(x), values(y), "random llama: state {l}");
    }
    // Random, not the stored weights, and another seed gives other values.
    let s = model::hidden_states(stored.model.as_ref(), &batch).unwrap();
    assert_ne!(values(&a[2]), values(&s[2]));
    let other = model::load::random_model(&config, &LoadOptions::on(&[Device::Cpu]), 1).unwrap();
    let c = model::hidden_states(other.model.as_ref(), &batch).unwrap();
    assert_ne!(values(&a[2]), values(&c[2]));
    assert!(values(&a[2]).iter().all(|x| x.is_finite()));
}
