//! `early_exit::sweep` (fed from `predict::evaluate`'s traces) against a literal early-exit run
//! on the tiny llama of tests/fixtures/lens (scripts/export_lens_fixture.py).
//!
//! The literal run, for every lambda and example: embed the example's prefix (its sentence cut
//! after the read position), run the blocks one at a time, and after block l (l = 1..L-1) cast
//! the state at the read position with the lens (mat: the fixture's A_{l->L} applied here by a
//! plain matmul; id: the state itself), read it out, softmax in f64, confidence = p_top1 -
//! p_top2; exit (no further blocks run) as soon as confidence > 0.9 lambda + 0.1 exp(-4 t / N)
//! (t = position, N = mean(position + 1)), predicting the cast top-1. An example that never
//! exits runs all L blocks and predicts the model's own top-1. Scored: mean blocks run and
//! Precision@1 against the model's top-1.
//!
//! The two must agree exactly (same exit decision for every example). The test checks that no
//! confidence lies within 1e-5 of a threshold, where float32 noise (~1e-7) could flip one.
//! The tiny model has L = 2 blocks, so an example exits after block 1 or runs both.

use std::path::PathBuf;

use candle_core::{Device, IndexOp, Tensor};
use jumplens::data::Activations;
use jumplens::eval::early_exit::{simulate_one, sweep, ExitInputs, Rule};
use jumplens::eval::predict::{evaluate, Lens};
use jumplens::lens::maps::Maps;
use jumplens::model::{Batch, NoHooks, Transformer};

/// The paper's points, plus small lambdas where some but not all examples exit.
const LAMBDAS: [f64; 10] = [-1.112, 0.0, 0.05, 0.1, 0.15, 0.3, 0.6, 0.9, 1.0, 1.112];
/// No confidence may lie this close to a threshold (the decision would be float noise).
const CLEARANCE: f64 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn threshold(lambda: f64, t: f64, mean_len: f64) -> f64 {
    0.9 * lambda + 0.1 * (-4.0 * t / mean_len).exp()
}

/// (top-1, p_top1 - p_top2) of softmax(logits), in f64.
fn top1_margin(logits: &[f32]) -> (u32, f64) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let p = |j: usize| (logits[j] as f64 - max).exp() / z;
    (idx[0] as u32, p(idx[0]) - p(idx[1]))
}

/// The state at position `pos` of a one-row batch's [1, T, d], as [1, d].
fn state_at(h: &Tensor, pos: usize) -> Tensor {
    h.i((0, pos)).unwrap().unsqueeze(0).unwrap()
}

fn readout(model: &dyn Transformer, row: &Tensor) -> Vec<f32> {
    model
        .readout(row)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

struct Literal {
    mean_layers: f64,
    p_at_1: f64,
    /// Smallest |confidence - threshold| seen.
    clearance: f64,
}

/// The literal early-exit run of one lens (`map[l]` = A_{l->L}, or None for the identity).
fn run_literal(
    model: &dyn Transformer,
    val: &Activations,
    maps: Option<&[Tensor]>,
    lambda: f64,
    mean_len: f64,
    model_top1: &[u32],
) -> Literal {
    let last = model.info().n_layers;
    let n = val.len();
    let (mut layers, mut hits, mut clearance) = (0usize, 0usize, f64::INFINITY);
    for (i, &own_top1) in model_top1.iter().enumerate() {
        let pos = val.positions[i];
        let prefix = val.sentence(i)[..=pos].to_vec();
        let batch = Batch::from_sequences(&[prefix], 0, &Device::Cpu).unwrap();
        let ctx = model.context(&batch).unwrap();
        let thr = threshold(lambda, pos as f64, mean_len);
        let mut h = model.embed(&batch, &ctx).unwrap();
        let mut decision = None;
        for l in 1..=last {
            h = model.block(l - 1, &h, &ctx, &mut NoHooks).unwrap();
            if l == last {
                break;
            }
            let row = state_at(&h, pos);
            let cast = match maps {
                // mapped = A @ h (A stored out x in).
                Some(a) => row.matmul(&a[l].t().unwrap()).unwrap(),
                None => row,
            };
            let (top1, conf) = top1_margin(&readout(model, &cast));
            clearance = clearance.min((conf - thr).abs());
            if conf > thr {
                decision = Some((l, top1));
                break;
            }
        }
        let (exit, pred) = decision.unwrap_or((last, own_top1));
        layers += exit;
        hits += usize::from(pred == own_top1);
    }
    Literal {
        mean_layers: layers as f64 / n as f64,
        p_at_1: hits as f64 / n as f64,
        clearance,
    }
}

#[test]
fn sweep_equals_literal_early_exit_on_tiny_llama() {
    let t = jumplens::data::io::read_safetensors(&root().join("tests/fixtures/lens/llama.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let act_path = dir.path().join("val.safetensors");
    let act: Vec<(String, Tensor)> = ["hidden_states", "positions", "tokens", "offsets", "article"]
        .iter()
        .map(|n| (n.to_string(), t[*n].clone()))
        .collect();
    jumplens::data::io::write_safetensors(&act_path, &act, None).unwrap();
    let val = Activations::read(&act_path).unwrap();
    let lm =
        jumplens::model::load_model(root().join("tests/fixtures/tiny/llama").to_str().unwrap(), &Device::Cpu).unwrap();
    let model = lm.model.as_ref();
    let last = model.info().n_layers;
    let a: Vec<Tensor> = (0..last).map(|l| t[&format!("mat.{l}.{last}")].clone()).collect();
    let maps_path = dir.path().join("maps.safetensors");
    let named: Vec<(String, Tensor)> = a
        .iter()
        .enumerate()
        .map(|(l, m)| (format!("mat.{l}.{last}"), m.clone()))
        .collect();
    jumplens::data::io::write_safetensors(&maps_path, &named, None).unwrap();
    let maps = Maps::read(&maps_path).unwrap();

    let n = val.len();
    let t_pos: Vec<f64> = val.positions.iter().map(|&p| p as f64).collect();
    let mean_len = val.positions.iter().map(|&p| p as f64 + 1.0).sum::<f64>() / n as f64;

    // The model's own top-1, from a full literal run of each prefix.
    let own_top1: Vec<u32> = (0..n)
        .map(|i| {
            let pos = val.positions[i];
            let batch = Batch::from_sequences(&[val.sentence(i)[..=pos].to_vec()], 0, &Device::Cpu).unwrap();
            let states = jumplens::model::hidden_states(model, &batch).unwrap();
            top1_margin(&readout(model, &state_at(&states[last], pos))).0
        })
        .collect();

    let lenses = vec![
        ("mat".to_string(), Lens::Maps(&maps)),
        ("id".to_string(), Lens::Identity),
    ];
    let ev = evaluate(model, &val, &lenses, 16, false).unwrap();
    assert_eq!(ev.model_top1, own_top1, "model top-1: evaluate vs literal run");

    let mut partial = 0;
    for (name, lens_maps) in [("mat", Some(a.as_slice())), ("id", None)] {
        let tr = &ev.traces[name];
        let x = ExitInputs {
            confidence: &tr.margin,
            top1: &tr.top1,
            model_top1: &ev.model_top1,
            t: &t_pos,
            mean_len,
        };
        let curve = sweep(&x, Rule::Paper, &LAMBDAS);
        for (point, &lambda) in curve.iter().zip(&LAMBDAS) {
            let lit = run_literal(model, &val, lens_maps, lambda, mean_len, &own_top1);
            // The trace-based per-example rule too.
            let (mut layers, mut hits) = (0, 0);
            for i in 0..n {
                let (exit, pred) = simulate_one(&x, Rule::Paper, lambda, i);
                layers += exit;
                hits += usize::from(pred == ev.model_top1[i]);
            }
            // The traces' confidences must be as far from the threshold as the literal ones.
            let trace_clearance = (1..last)
                .flat_map(|l| (0..n).map(move |i| (l, i)))
                .map(|(l, i)| (tr.margin[l][i] as f64 - threshold(lambda, t_pos[i], mean_len)).abs())
                .fold(f64::INFINITY, f64::min);
            println!(
                "{name} lambda {lambda:>6}: literal mean layers {:.3} p@1 {:.3} | sweep {:.3} {:.3} | \
                 closest confidence to threshold {:.1e}",
                lit.mean_layers,
                lit.p_at_1,
                point.mean_layers,
                point.p_at_1,
                lit.clearance.min(trace_clearance)
            );
            assert!(
                lit.clearance > CLEARANCE && trace_clearance > CLEARANCE,
                "{name} lambda {lambda}: a confidence lies within {CLEARANCE} of the threshold; pick another lambda"
            );
            assert_eq!(point.lambda, lambda);
            assert_eq!(
                (point.mean_layers, point.p_at_1),
                (lit.mean_layers, lit.p_at_1),
                "{name} lambda {lambda}: sweep vs literal run"
            );
            assert_eq!(
                (layers as f64 / n as f64, hits as f64 / n as f64),
                (lit.mean_layers, lit.p_at_1),
                "{name} lambda {lambda}: simulate_one vs literal run"
            );
            if lit.mean_layers > 1.0 && lit.mean_layers < last as f64 {
                partial += 1;
            }
        }
        // lambda = -1.112: every example exits at layer 1; lambda >= 1: none does (margins < 1).
        assert_eq!(curve[0].mean_layers, 1.0);
        assert_eq!(curve[LAMBDAS.len() - 1].mean_layers, last as f64);
        assert_eq!(curve[LAMBDAS.len() - 1].p_at_1, 1.0);
    }
    assert!(
        partial >= 2,
        "some lambdas should split the examples between exiting and not"
    );
}
