//! The tuned lens against the `tuned-lens` package itself (tests/fixtures/tuned, made by
//! scripts/export_tuned_fixtures.py with tuned-lens 0.2.0, torch 2.15, transformers 5.24 on the
//! tiny random Llama of tests/fixtures/tiny/llama):
//!
//! - forward: a random-parameter lens saved by `TunedLens.save` (`llama_peer/params.pt`), read by
//!   jumplens's safe reader, gives `TunedLens.forward`'s logits within 1e-5 (float32 both sides);
//! - round trip: the lens jumplens writes (`llama_jumplens/`, byte-identical to what the writer
//!   produces now) loads in `TunedLens.from_model_and_pretrained` (and `torch.load(...,
//!   weights_only=True)`), and the logits tuned-lens computed with it equal jumplens's within 1e-5;
//! - bad input: unknown opcodes or classes, wrong shapes / layer counts, another width: one-line
//!   errors.
//!
//! Regenerate `llama_jumplens/params.pt` + `config.json` with
//! `JUMPLENS_WRITE_TUNED_FIXTURE=1 cargo test --release --test tuned`, then rerun the script.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use jumplens::lens::tuned::TunedLens;

mod common;

const LOGIT_TOL: f32 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(p: &str) -> PathBuf {
    root().join("tests/fixtures/tuned").join(p)
}

fn model() -> jumplens::model::LoadedModel {
    let dir = root().join("tests/fixtures/tiny/llama");
    jumplens::model::load_model(dir.to_str().unwrap(), &Device::Cpu).unwrap()
}

/// jumplens's lens logits [L, n, V] at the fixture's states.
fn lens_logits(lm: &jumplens::model::LoadedModel, lens: &TunedLens, hs: &Tensor) -> Vec<Vec<Vec<f32>>> {
    (0..lens.n_layers())
        .map(|l| {
            let h = hs.get(l).unwrap();
            lm.model
                .readout(&lens.cast(l, &h).unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<Vec<f32>>], b: &Tensor) -> f32 {
    let b = b.to_vec3::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.len(), y.len());
        for (r, s) in x.iter().zip(y) {
            assert_eq!(r.len(), s.len());
            for (u, v) in r.iter().zip(s) {
                worst = worst.max((u - v).abs());
            }
        }
    }
    worst
}

#[test]
fn forward_equals_tuned_lens_package() {
    let lm = model();
    let t = jumplens::data::io::read_safetensors(&fixture("forward.safetensors")).unwrap();
    let lens = TunedLens::read_dir(&fixture("llama_peer")).unwrap();
    lens.check_model(lm.model.info().n_layers, lm.model.info().d_model)
        .unwrap();
    let ours = lens_logits(&lm, &lens, &t["hidden_states"]);
    let worst = max_abs_diff(&ours, &t["logits"]);
    println!("forward: max |logit difference| {worst:.2e}");
    assert!(worst <= LOGIT_TOL, "max |logit difference| {worst}");
    // The lens is not the logit lens (the test would pass trivially otherwise).
    let id: Vec<Vec<Vec<f32>>> = (0..lens.n_layers())
        .map(|l| {
            lm.model
                .readout(&t["hidden_states"].get(l).unwrap())
                .unwrap()
                .to_vec2()
                .unwrap()
        })
        .collect();
    assert!(max_abs_diff(&id, &t["logits"]) > 0.1);
}

/// A lens with deterministic non-trivial parameters, written by jumplens.
fn jumplens_lens() -> TunedLens {
    let (d, n) = (64, 2);
    let mut lens = TunedLens::zeros("tests/fixtures/tiny/llama", d, n, &Device::Cpu).unwrap();
    for l in 0..n {
        let w: Vec<f32> = (0..d * d).map(|i| 0.1 * ((i as f32) * 0.37 + l as f32).sin()).collect();
        lens.weights[l] = Tensor::from_vec(w, (d, d), &Device::Cpu).unwrap();
        let b: Vec<f32> = (0..d).map(|i| 0.2 * ((i as f32) * 1.3 - l as f32).cos()).collect();
        lens.biases.as_mut().unwrap()[l] = Tensor::from_vec(b, d, &Device::Cpu).unwrap();
    }
    lens
}

#[test]
fn written_lens_loads_in_tuned_lens_with_the_same_logits() {
    let lens = jumplens_lens();
    let committed = fixture("llama_jumplens");
    if std::env::var_os("JUMPLENS_WRITE_TUNED_FIXTURE").is_some() {
        lens.write_dir(&committed).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    lens.write_dir(dir.path()).unwrap();
    for f in ["params.pt", "config.json"] {
        assert_eq!(
            std::fs::read(dir.path().join(f)).unwrap(),
            std::fs::read(committed.join(f)).unwrap(),
            "{f} differs from the committed fixture tuned-lens read"
        );
    }
    // The safetensors copy holds the same tensors.
    let st = jumplens::data::io::read_safetensors(&dir.path().join("lens.safetensors")).unwrap();
    for (k, t) in lens.state_dict() {
        assert_eq!(
            st[&k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    let back = TunedLens::read_dir(dir.path()).unwrap();
    assert_eq!(back.config, lens.config);
    let lm = model();
    let t = jumplens::data::io::read_safetensors(&fixture("forward.safetensors")).unwrap();
    let peer = jumplens::data::io::read_safetensors(&committed.join("peer_logits.safetensors")).unwrap();
    let worst = max_abs_diff(&lens_logits(&lm, &back, &t["hidden_states"]), &peer["logits"]);
    println!("round trip: max |logit difference| {worst:.2e}");
    assert!(worst <= LOGIT_TOL, "max |logit difference| {worst}");
}

fn copy_peer(to: &Path) {
    for f in ["params.pt", "config.json"] {
        std::fs::copy(fixture("llama_peer").join(f), to.join(f)).unwrap();
    }
}

fn one_line_err(r: anyhow::Result<TunedLens>) -> String {
    let e = format!("{:#}", r.expect_err("should fail"));
    assert!(!e.contains('\n'), "not one line: {e}");
    e
}

/// Rewrites the archive's data.pkl with `edit` applied (entries stored, like torch's).
fn with_pickle(dir: &Path, edit: impl Fn(Vec<u8>) -> Vec<u8>) {
    use std::io::{Read, Write};
    let src = fixture("llama_peer/params.pt");
    let mut zin = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
    let out = std::fs::File::create(dir.join("params.pt")).unwrap();
    let mut zout = zip::ZipWriter::new(out);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zin.len() {
        let mut e = zin.by_index(i).unwrap();
        let name = e.name().unwrap().into_owned();
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes).unwrap();
        if name.ends_with("data.pkl") {
            bytes = edit(bytes);
        }
        zout.start_file(name, opts).unwrap();
        zout.write_all(&bytes).unwrap();
    }
    zout.finish().unwrap();
}

#[test]
fn refuses_unknown_opcodes_and_classes() {
    let dir = tempfile::tempdir().unwrap();
    copy_peer(dir.path());
    // A class outside the whitelist (same length, so the pickle stays well-formed).
    with_pickle(dir.path(), |p| {
        let needle = b"torch._utils\n_rebuild_tensor_v2\n";
        let pos = p.windows(needle.len()).position(|w| w == needle).unwrap();
        let mut p = p;
        p[pos..pos + needle.len()].copy_from_slice(b"posix\nsystem_______________xxxx\n");
        p
    });
    let e = one_line_err(TunedLens::read_dir(dir.path()));
    assert!(
        e.contains("posix.system_______________xxxx") && e.contains("not allowed"),
        "{e}"
    );
    // STACK_GLOBAL (protocol 4 pickles call arbitrary callables through it).
    with_pickle(dir.path(), |mut p| {
        p[2] = 0x93;
        p
    });
    let e = one_line_err(TunedLens::read_dir(dir.path()));
    assert!(e.contains("STACK_GLOBAL") && e.contains("params.pt"), "{e}");
    // Not a zip at all.
    std::fs::write(dir.path().join("params.pt"), b"\x80\x02cos\nsystem\n.").unwrap();
    let e = one_line_err(TunedLens::read_dir(dir.path()));
    assert!(e.contains("not a torch.save zip"), "{e}");
}

#[test]
fn refuses_wrong_shapes_layers_and_width() {
    let dir = tempfile::tempdir().unwrap();
    copy_peer(dir.path());
    let cfg_path = dir.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    // config says 3 layers, params hold 2.
    std::fs::write(
        &cfg_path,
        cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    let e = one_line_err(TunedLens::read_dir(dir.path()));
    assert!(e.contains("'2.weight' missing"), "{e}");
    // config says 1 layer: translator 1 has no place.
    std::fs::write(
        &cfg_path,
        cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1"),
    )
    .unwrap();
    let e = one_line_err(TunedLens::read_dir(dir.path()));
    assert!(e.contains("translator 1"), "{e}");
    // another width: the shapes no longer match the config.
    std::fs::write(&cfg_path, cfg.replace("\"d_model\": 64", "\"d_model\": 32")).unwrap();
    let e = one_line_err(TunedLens::read_dir(dir.path()));
    assert!(
        e.contains("has shape [64") && e.contains("expected [32") && e.contains("d_model 32"),
        "{e}"
    );
    // a consistent lens for another model.
    let small = TunedLens::zeros("other", 32, 2, &Device::Cpu).unwrap();
    let e = format!("{:#}", small.check_model(2, 64).unwrap_err());
    assert!(e.contains("width 32") && e.contains("64"), "{e}");
    let e = format!("{:#}", jumplens_lens().check_model(3, 64).unwrap_err());
    assert!(e.contains("2 layers") && e.contains("has 3"), "{e}");
}

/// Training: the fixture's 4 steps of tuned-lens's own recipe (its KL loss summed over
/// translators, clip 1.0, SGD Nesterov 0.9 with lr 1.0 * (1 - 0.9), weight decay 1e-3, linear
/// decay over a horizon of 10; float32, no autocast), replayed from the same initial parameters
/// on the same token ids, give the same losses and parameters.
#[test]
fn training_steps_equal_tuned_lens_package() {
    use jumplens::lens::tuned::train::{Recipe, Trainer};
    use jumplens::lens::tuned::TunedLensConfig;
    // f32 on both sides; the differences are summation order through 4 steps (measured:
    // losses 2e-7 relative, parameters 2e-7 of their largest magnitude).
    const REL_TOL: f32 = 1e-5;
    let lm = model();
    let t = jumplens::data::io::read_safetensors(&fixture("train.safetensors")).unwrap();
    let n_layers = lm.model.info().n_layers;
    let d = lm.model.info().d_model;
    let state = |prefix: &str| -> Vec<(String, Tensor)> {
        (0..n_layers)
            .flat_map(|i| ["weight", "bias"].map(|k| format!("{i}.{k}")))
            .map(|k| (k.clone(), t[&format!("{prefix}.{k}")].clone()))
            .collect()
    };
    let config = TunedLensConfig {
        base_model_name_or_path: "tests/fixtures/tiny/llama".into(),
        d_model: d,
        num_hidden_layers: n_layers,
        bias: true,
        base_model_revision: None,
        unembed_hash: None,
        lens_type: "linear_tuned_lens".into(),
    };
    let init = TunedLens::from_state_dict(config.clone(), state("init"), "init").unwrap();
    let want = TunedLens::from_state_dict(config, state("final"), "final").unwrap();
    let horizon = t["num_steps"].to_vec1::<i64>().unwrap()[0] as usize;
    for rows_per_pass in [1, 1024] {
        println!("rows per pass {rows_per_pass}");
        let mut recipe = Recipe::new(horizon, 1.0);
        recipe.chunk = 5; // several chunks per batch: the gradient sums must not depend on it
                          // One layer per readout GEMM, and every layer's rows stacked into one: the same steps.
        recipe.rows_per_pass = rows_per_pass;
        let mut trainer = Trainer::new(&init, recipe).unwrap();
        let ids = t["input_ids"].to_vec3::<i64>().unwrap();
        let want_losses = t["losses"].to_vec1::<f64>().unwrap();
        for (step, batch) in ids.iter().enumerate() {
            let seqs: Vec<Vec<u32>> = batch.iter().map(|r| r.iter().map(|&x| x as u32).collect()).collect();
            let b = jumplens::model::batch::Batch::from_sequences(&seqs, 0, &Device::Cpu).unwrap();
            let states: Vec<Tensor> = jumplens::model::transformer::hidden_states(lm.model.as_ref(), &b)
                .unwrap()
                .into_iter()
                .map(|h| h.flatten_to(1).unwrap())
                .collect();
            let loss = trainer.step(lm.model.as_ref(), &states).unwrap();
            let rel = ((loss - want_losses[step]) / want_losses[step]).abs();
            println!(
                "step {step}: loss {loss:.6} (tuned-lens {:.6}), rel {rel:.1e}",
                want_losses[step]
            );
            assert!(
                rel < REL_TOL as f64,
                "step {step}: loss {loss} vs {}",
                want_losses[step]
            );
        }
        // The momentum buffers are plain tensors: a recorded graph there would chain every
        // step's tensors to the next (memory grew by the lens's size per step).
        let momentum = trainer.momentum().expect("momentum after the steps");
        assert!(
            momentum.iter().all(|m| !m.track_op()),
            "a momentum buffer records its graph"
        );
        let got = trainer.lens().unwrap();
        let mut worst = 0f32;
        let mut moved = 0f32;
        for ((k, g), ((_, w), (_, i))) in got
            .state_dict()
            .iter()
            .zip(want.state_dict().iter().zip(init.state_dict().iter()))
        {
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let i = i.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let scale = w.iter().map(|x| x.abs()).fold(0f32, f32::max);
            let diff = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            moved = moved.max(w.iter().zip(&i).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max));
            println!("{k}: max |diff| {diff:.2e} (max |param| {scale:.3})");
            worst = worst.max(diff / scale);
        }
        println!("parameters: worst max|diff| / max|param| {worst:.2e}; moved by up to {moved:.3e}");
        assert!(worst < REL_TOL, "parameters differ by {worst} (relative)");
        // The steps moved the parameters far more than the tolerance (else the test proves nothing).
        assert!(moved > 1e-2, "moved only {moved}");
    }
}

/// The paper's published-matrix form (tests/fixtures/paper_maps, made by
/// scripts/export_paper_maps_fixture.py with torch.save): every i_j.pickle read into maps with
/// the values torch reads back (exactly: the same float32 bytes), and each bad folder refused
/// with one line naming the file.
#[test]
fn paper_pickled_matrices_import_as_maps() {
    let dir = root().join("tests/fixtures/paper_maps");
    let maps = jumplens::lens::import::import_pickled_maps(&dir.join("good"), 4, 2).unwrap();
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(maps.len(), 3);
    for (name, want) in &expected {
        let (i, j) = name.split_once('_').unwrap();
        let got = maps.require(i.parse().unwrap(), j.parse().unwrap()).unwrap();
        let diff = (&got.a - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "map {name}");
        assert!(want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.1);
    }
    assert_eq!(maps.metadata.get("n_layers").map(String::as_str), Some("2"));
    // Another width or fewer layers than the files name.
    let e = format!(
        "{:#}",
        jumplens::lens::import::import_pickled_maps(&dir.join("good"), 8, 2).unwrap_err()
    );
    assert!(e.contains("0_1.pickle") && e.contains("[8, 8]"), "{e}");
    let e = format!(
        "{:#}",
        jumplens::lens::import::import_pickled_maps(&dir.join("good"), 4, 1).unwrap_err()
    );
    assert!(e.contains("0_2.pickle") && e.contains("0 <= i < j <= 1"), "{e}");
    for (case, want) in [
        ("shape", "[4, 3]"),
        ("layer", "1 -> 3"),
        ("plain", "plain pickle.dump"),
        ("dict", "not a single tensor"),
        ("nan", "NaN"),
    ] {
        let e = jumplens::lens::import::import_pickled_maps(&dir.join(format!("bad_{case}")), 4, 2).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains(want) && e.contains(".pickle"), "{case}: {e}");
        assert!(!e.contains('\n'), "{case}: one line: {e}");
    }
}

/// Runs the CLI in `dir`; returns (exit ok, stdout, stderr).
fn cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jumplens"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run jumplens");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tuned lenses everywhere a lens appears, on the tiny Llama: `report --tuned-lens` trains
/// RUN/tuned after fit and predict scores it; early exit reports tuned and mat+kl (trained by
/// `tuned-lens --init mat`) beside mat and id; peek --tuned-lens reads through it; the page
/// shows its training cost.
#[test]
fn tuned_lenses_in_report_early_exit_and_peek() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model_with_words("llama", &[], &dir.path().join("m"), 128, false);
    write_corpus(&dir.path().join("c.txt"), 120);
    let (ok, _, err) = cli(
        dir.path(),
        &[
            "report",
            "m",
            "--corpus",
            "c.txt",
            "--out",
            "run",
            "--train",
            "150",
            "--val",
            "50",
            "--tuned-lens",
            "-q",
        ],
    );
    assert!(ok, "report --tuned-lens: {err}");
    let run = dir.path().join("run");
    assert!(run.join("tuned/params.pt").exists());
    let predict: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("predict.json")).unwrap()).unwrap();
    assert!(predict["lenses"]["tuned"]["p@1"].is_array(), "predict scores tuned");
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(
        html.contains("<b>tuned</b>: trained 250 steps of 32 tokens"),
        "training cost on the page"
    );
    assert!(html.contains("<th>P@1 tuned</th>"));
    // mat+kl, then predict and early exit again.
    for args in [
        &[
            "tuned-lens",
            "run",
            "--init",
            "mat",
            "--steps",
            "3",
            "--tokens-per-step",
            "16",
            "--seq-len",
            "8",
            "--ids-out",
            "ids.safetensors",
            "-q",
        ][..],
        &["predict", "run", "-q"],
        &["early-exit", "run"],
    ] {
        let (ok, _, err) = cli(dir.path(), args);
        assert!(ok, "{args:?}: {err}");
    }
    // The ids of the 3 steps of 2 sequences of 8 tokens, and one wall time per step.
    let ids = &jumplens::data::io::read_safetensors(&dir.path().join("ids.safetensors")).unwrap()["ids"];
    assert_eq!(ids.dims(), &[6, 8]);
    assert!(
        ids.to_vec2::<i64>()
            .unwrap()
            .iter()
            .flatten()
            .all(|&t| (3..123).contains(&t)),
        "corpus words"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["stages"]["tuned-lens.tuned-mat"]["step_s"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    let ee: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("early_exit.json")).unwrap()).unwrap();
    for lens in ["mat", "id", "tuned", "mat+kl"] {
        assert!(
            ee["curves"][lens].is_array(),
            "early exit has no {lens} curve: {}",
            ee["curves"]
        );
        assert!(ee["fixed"][lens].is_array(), "early exit has no fixed {lens}");
    }
    let (ok, out, err) = cli(
        dir.path(),
        &[
            "peek",
            "m",
            "--maps",
            "run/maps.safetensors",
            "--tuned-lens",
            "run/tuned",
            "--text",
            "w5 w9 w11",
        ],
    );
    assert!(ok, "peek: {err}");
    assert!(out.contains("tuned") && out.contains("mat"), "{out}");
    // The paper's matrices for a 4-wide model against this run's: one line naming the file.
    let good = root().join("tests/fixtures/paper_maps/good");
    let (ok, _, err) = cli(dir.path(), &["import-maps", good.to_str().unwrap(), "--run", "run"]);
    assert!(!ok && err.trim().lines().count() == 1, "{err}");
    assert!(err.contains("0_1.pickle") && err.contains("[4, 4]"), "{err}");
    assert!(!run.join("maps_imported.safetensors").exists(), "nothing written");
    // A lens for another width is one line, no panic.
    let (ok, _, err) = cli(dir.path(), &["peek", "m", "--tuned-lens", "run", "--text", "w5"]);
    assert!(!ok && err.trim().lines().count() == 1, "{err}");
}

/// 300 six-word lines over w3..w{span+2}, one a line, at `path`.
fn write_corpus(path: &Path, span: usize) {
    let lines: Vec<String> = (0..300)
        .map(|i| {
            (0..6)
                .map(|k| format!("w{}", 3 + (i * 7 + k * 13 + i * k) % span))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// The masked-LM loss (sum over translators of the mean KL of the MLM head's distribution at
/// h_L to the lens's) and its gradient, against PyTorch autograd on transformers'
/// BertForMaskedLM in float64 (scripts/export_tuned_mlm_fixture.py): same states, same random
/// lens. Tolerances: the loss within 1e-5 relative, every gradient within 1e-5 of its largest
/// entry (jumplens runs in float32; measured: ~4e-7).
#[test]
fn masked_lm_loss_and_gradient_equal_pytorch_autograd() {
    use jumplens::lens::tuned::train::{Recipe, Trainer};
    let lm = jumplens::model::load_model(
        root().join("tests/fixtures/tiny/bert_mlm").to_str().unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let t = jumplens::data::io::read_safetensors(&fixture("bert_mlm_grad.safetensors")).unwrap();
    let hs = &t["hidden_states"];
    let (s, _, d) = hs.dims3().unwrap();
    let n_layers = s - 1;
    let f32 = |x: Tensor| x.to_dtype(candle_core::DType::F32).unwrap();
    let mut lens = TunedLens::zeros("bert_mlm", d, n_layers, &Device::Cpu).unwrap();
    lens.weights = (0..n_layers).map(|l| f32(t["weights"].get(l).unwrap())).collect();
    lens.biases = Some((0..n_layers).map(|l| f32(t["biases"].get(l).unwrap())).collect());
    let trainer = Trainer::new(&lens, Recipe::new(1, 1.0)).unwrap();
    let states: Vec<Tensor> = (0..s).map(|l| hs.get(l).unwrap()).collect();
    let (loss, grads) = trainer.loss_and_grads(lm.model.as_ref(), &states).unwrap();
    let loss_ref = t["loss"].to_vec1::<f64>().unwrap()[0];
    println!("masked-LM loss {loss:.8} vs PyTorch {loss_ref:.8}");
    assert!(loss_ref > 0.1, "a loss far from zero");
    assert!((loss - loss_ref).abs() <= 1e-5 * loss_ref, "loss {loss} vs {loss_ref}");
    assert_eq!(grads.len(), 2 * n_layers);
    for l in 0..n_layers {
        for (k, (ours, theirs)) in [
            (&grads[2 * l], t["grad_weights"].get(l).unwrap()),
            (&grads[2 * l + 1], t["grad_biases"].get(l).unwrap()),
        ]
        .into_iter()
        .enumerate()
        {
            let theirs = f32(theirs);
            let scale = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let err = (ours - &theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            println!("layer {l} {}: max |error| {err:.2e} of {scale:.2e}", ["W", "b"][k]);
            assert!(scale > 1e-4, "a gradient far from zero");
            assert!(
                err <= 1e-5 * scale,
                "layer {l} {}: error {err} of {scale}",
                ["W", "b"][k]
            );
        }
    }
}

/// BERT MLM trains at the positions collect read it at (the sampled token masked): with a step
/// of every training example, step 0's loss is the logit lens's summed mean KL at the stored
/// training states (computed here with candle's ops in float64); the loss falls, and predict's
/// KL of the trained lens is below the logit lens's at every layer. --ids-out is refused.
#[test]
fn masked_lm_trains_at_the_collected_mask_positions() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    common::tiny_model_with_words("bert_mlm", &[], &m, 100, true);
    write_corpus(&dir.path().join("c.txt"), 97);
    let (ok, _, err) = cli(
        dir.path(),
        &[
            "collect", "m", "--corpus", "c.txt", "--out", "run", "--train", "150", "--val", "50", "-q",
        ],
    );
    assert!(ok, "collect: {err}");
    let run = jumplens::data::run::RunDir::new(dir.path().join("run"));
    let lm = jumplens::model::load_model(m.to_str().unwrap(), &Device::Cpu).unwrap();
    let opts = jumplens::pipeline::tuned::TunedOptions {
        steps: 30,
        tokens_per_step: 150,
        progress: false,
        ..Default::default()
    };
    let report = jumplens::pipeline::tuned::run_tuned(&lm, &run, &opts).unwrap();
    assert_eq!(report.sequences, 150, "one example per training sentence");
    assert_eq!(report.step_s.len(), 30);
    let train = jumplens::data::Activations::read(&run.activations("train")).unwrap();
    let f64 = candle_core::DType::F64;
    let log_softmax =
        |h: &Tensor| candle_nn::ops::log_softmax(&lm.model.readout(h).unwrap().to_dtype(f64).unwrap(), 1).unwrap();
    let n_layers = lm.model.info().n_layers;
    let log_p = log_softmax(&train.hidden_states.get(n_layers).unwrap());
    let mut expected = 0f64;
    for l in 0..n_layers {
        let log_q = log_softmax(&train.hidden_states.get(l).unwrap());
        let kl = (log_p.exp().unwrap() * (&log_p - log_q).unwrap()).unwrap();
        expected += kl.sum_all().unwrap().to_scalar::<f64>().unwrap() / 150.0;
    }
    let (first, last) = (report.losses[0], *report.losses.last().unwrap());
    println!("masked-LM losses {first:.6} (logit lens {expected:.6}) -> {last:.6}");
    assert!((first - expected).abs() <= 1e-5 * expected, "{first} vs {expected}");
    assert!(last < 0.5 * first, "the loss falls: {first} -> {last}");
    for args in [&["fit", "run", "-q"][..], &["predict", "run", "-q"]] {
        let (ok, _, err) = cli(dir.path(), args);
        assert!(ok, "{args:?}: {err}");
    }
    let p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("run/predict.json")).unwrap()).unwrap();
    for l in 0..n_layers {
        let (tuned, id) = (
            p["lenses"]["tuned"]["kl"][l].as_f64().unwrap(),
            p["lenses"]["id"]["kl"][l].as_f64().unwrap(),
        );
        assert!(tuned < id, "layer {l}: tuned KL {tuned} vs id {id}");
    }
    let (ok, _, err) = cli(
        dir.path(),
        &[
            "tuned-lens",
            "run",
            "--steps",
            "2",
            "--ids-out",
            "ids.safetensors",
            "-q",
        ],
    );
    assert!(
        !ok && err.trim().lines().count() == 1 && err.contains("--ids-out"),
        "{err}"
    );
    assert!(!dir.path().join("ids.safetensors").exists());
}
