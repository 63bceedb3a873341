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
