//! The real GGUF checkpoints in bf16 (`--dtype bf16`: dequantized, rounded once to bf16) against
//! PyTorch in bf16 on the same weights: transformers' GGUF loader dequantizes to f32, the model is
//! cast with `model.to(torch.bfloat16)` and run with eager attention, one sentence at a time, on
//! the 20 reference sentences of tests/real_models.rs (tests/fixtures/real/<asset>_bf16.safetensors,
//! `export_real_reference.py --bf16`).
//!
//! Hidden states: the fixture keeps only a sketch of every state row (K = 4 Gaussian directions,
//! `sketch` [K, d]; E||S x||^2 = ||x||^2), so the normwise error of layer l over all positions of
//! all sentences, ||ours - torch|| / ||torch||, is estimated as ||S(ours - torch)|| / ||S torch||
//! (4 x 272 / 4 x 282 projections per layer; meta.json "bf16" records how close the estimate
//! comes to the exact figure for PyTorch's own bf16-vs-f32 distance: within 0.70x..1.44x). Top-1:
//! see [`check`] (99% of all positions is out of reach of any two bf16 runs; 99% of the decided
//! ones holds). Skipped without the assets unless JUMPLENS_REQUIRE_ASSETS=1 (as real_models.rs).

use candle_core::{DType, Device, IndexOp, D};
use jumplens::model::{self, Batch, DtypeChoice, LoadOptions};

mod common;
#[path = "common/real.rs"]
mod real;
use common::asset;
use real::{reference, sentences};

/// What one model's comparison measured.
struct Outcome {
    /// Estimated normwise error per layer h_0..h_L.
    per_layer: Vec<f64>,
    top1_same: usize,
    positions: usize,
    /// Positions whose reference top-2 margin exceeds two bf16 units in the last place of
    /// the top logit, and how many of them have the same top-1.
    n_decided: usize,
    same_decided: usize,
    /// Positions whose top-1 equals the f32 reference's (tests/real_models.rs's fixture).
    top1_f32: usize,
    /// Worst |ours - torch| / max(1, |torch|) over the reference top-5 logits of every position.
    logits: f64,
}

/// The spacing of bf16 numbers at |x| (8 significant bits).
fn bf16_ulp(x: f64) -> f64 {
    2f64.powi(x.abs().max(f64::MIN_POSITIVE).log2().floor() as i32 - 7)
}

fn compare(name: &str, gguf: &str) -> Option<Outcome> {
    let p = asset(gguf)?;
    let opts = LoadOptions {
        dtype: DtypeChoice::Bf16,
        ..LoadOptions::new(&Device::Cpu)
    };
    let lm = model::load_model_with(p.to_str().unwrap(), &opts).unwrap();
    assert_eq!(lm.model.info().dtype, "bf16", "{name}: ModelInfo.dtype");
    let r = reference(&format!("{name}_bf16"));
    let tok = lm.tokenizer().unwrap();
    let inputs: Vec<Vec<u32>> = sentences().iter().map(|s| tok.encode(s).unwrap()).collect();
    let batch = Batch::from_sequences(&inputs, tok.pad_id, &Device::Cpu).unwrap();
    let states = model::hidden_states(lm.model.as_ref(), &batch).unwrap();
    let logits = lm.model.readout(states.last().unwrap()).unwrap();
    assert_eq!(logits.dtype(), DType::F32, "{name}: logits leave the model in f32");
    let sketch_t = r["sketch"].t().unwrap().contiguous().unwrap();
    let n_states = states.len();
    let (mut num, mut den) = (vec![0f64; n_states], vec![0f64; n_states]);
    let (mut top1_same, mut positions, mut worst_logit) = (0usize, 0usize, 0f64);
    let (mut top1_f32, mut n_decided, mut same_decided, mut flip_margin) = (0usize, 0usize, 0usize, 0f64);
    let f32_ref = reference(name);
    for (i, input) in inputs.iter().enumerate() {
        let t = input.len();
        let theirs = &r[&format!("states.{i}")];
        assert_eq!(
            theirs.dims(),
            &[n_states, t, sketch_t.dim(1).unwrap()],
            "{name}: sentence {i}"
        );
        for (l, h) in states.iter().enumerate() {
            let rows = h.i((i, 0..t)).unwrap().to_dtype(DType::F32).unwrap();
            let ours: Vec<f32> = rows
                .matmul(&sketch_t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = theirs.i(l).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            num[l] += ours
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum::<f64>();
            den[l] += want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
        }
        let top5: Vec<Vec<i64>> = r[&format!("top5.{i}")].to_vec2().unwrap();
        let top5_logits: Vec<Vec<f32>> = r[&format!("top5_logits.{i}")].to_vec2().unwrap();
        let ours = logits.i(i).unwrap();
        let best: Vec<u32> = ours.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        let rows: Vec<Vec<f32>> = ours.to_vec2().unwrap();
        let f32_top5: Vec<Vec<i64>> = f32_ref[&format!("top5.{i}")].to_vec2().unwrap();
        for p in 0..t {
            positions += 1;
            let ours_top = best[p] as i64;
            top1_same += usize::from(ours_top == top5[p][0]);
            top1_f32 += usize::from(ours_top == f32_top5[p][0]);
            let margin = (top5_logits[p][0] - top5_logits[p][1]) as f64;
            // The reference logits are bf16 (PyTorch's lm_head output): a margin of one or two
            // units in the last place is a tie decided by rounding, in either run.
            let decided = margin > 2.0 * bf16_ulp(top5_logits[p][0] as f64);
            n_decided += usize::from(decided);
            same_decided += usize::from(decided && ours_top == top5[p][0]);
            if ours_top != top5[p][0] {
                let rank = top5[p].iter().position(|&x| x == ours_top);
                assert!(
                    rank.is_some_and(|r| r <= 2),
                    "{name}: sentence {i} position {p}: our top-1 {ours_top} is not in the reference's top 3 {:?}",
                    top5[p]
                );
                flip_margin = flip_margin.max(margin);
            }
            for (k, &id) in top5[p].iter().enumerate() {
                let want = top5_logits[p][k] as f64;
                let e = (rows[p][id as usize] as f64 - want).abs() / want.abs().max(1.0);
                worst_logit = worst_logit.max(e);
            }
        }
    }
    let per_layer: Vec<f64> = num.iter().zip(&den).map(|(n, d)| (n / d).sqrt()).collect();
    let fmt: Vec<String> = per_layer.iter().map(|e| format!("{e:.1e}")).collect();
    eprintln!(
        "{name} bf16 vs PyTorch bf16: normwise per layer [{}], top-1 {top1_same}/{positions} (on the {n_decided} decided: {same_decided}; \
         largest reference margin of a flip {flip_margin:.3}; vs the f32 reference {top1_f32}), top-5 logits {worst_logit:.2e}",
        fmt.join(", ")
    );
    Some(Outcome {
        per_layer,
        top1_same,
        positions,
        n_decided,
        same_decided,
        top1_f32,
        logits: worst_logit,
    })
}

/// Bounds. Hidden states: PyTorch's own bf16 run is up to 3.6e-2 (SmolLM2) / 9.3e-3 (Gemma 3)
/// normwise from its f32 run on these sentences (meta.json "bf16"); ours is measured at 2.0e-2 /
/// 1.3e-2 from PyTorch's bf16 run (the two round in different places: GEMM blocking, one
/// padded batch vs one sentence at a time), bound 3e-2. Top-1: PyTorch's bf16 run keeps the f32
/// run's top-1 on only 263/272 (SmolLM2) and 279/282 (Gemma 3) positions, so 99% of all
/// positions cannot hold between two bf16 runs: every position we differ on is a near-tie in
/// PyTorch's bf16 logits (margin <= 0.19, often exactly 0: bf16 logits of 16..32 are 0.125
/// apart). Asserted: >= 99% identical on the decided positions (margin > 2 bf16 units in the
/// last place of the top logit; measured 217/218 and 227/227), which are >= 75% of all (218/272,
/// 227/282); every other top-1 in the reference's top 3; >= 95% identical on all positions
/// (262/272, 274/282); and >= 95% identical to the f32 reference's top-1
/// (tests/fixtures/real/<asset>.safetensors: 267/272, 276/282, where PyTorch's bf16 run has
/// 263/272, 279/282). Logits: relative to max(1, |logit|), measured 6.4e-2 / 3.1e-2.
fn check(o: &Outcome, name: &str, hidden_tol: f64, logit_tol: f64) {
    for (l, e) in o.per_layer.iter().enumerate() {
        assert!(
            *e <= hidden_tol,
            "{name}: h_{l} normwise error {e:.2e} > {hidden_tol:.0e}"
        );
    }
    assert!(o.positions >= 250, "{name}: only {} positions", o.positions);
    assert!(
        o.n_decided * 4 >= o.positions * 3,
        "{name}: only {} of {} positions are decided",
        o.n_decided,
        o.positions
    );
    assert!(
        o.same_decided * 100 >= o.n_decided * 99,
        "{name}: top-1 identical on {} of {} decided positions (< 99%)",
        o.same_decided,
        o.n_decided
    );
    assert!(
        o.top1_same * 100 >= o.positions * 95,
        "{name}: top-1 identical on {} of {} positions (< 95%)",
        o.top1_same,
        o.positions
    );
    assert!(
        o.top1_f32 * 100 >= o.positions * 95,
        "{name}: top-1 equal to the f32 reference's on {} of {} positions (< 95%)",
        o.top1_f32,
        o.positions
    );
    assert!(
        o.logits <= logit_tol,
        "{name}: top-5 logit error {:.2e} > {logit_tol:.0e}",
        o.logits
    );
}

#[test]
fn smollm2_bf16_matches_transformers_bf16() {
    if let Some(o) = compare("smollm2", "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") {
        check(&o, "smollm2", 3e-2, 0.1);
    }
}

#[test]
fn gemma3_bf16_matches_transformers_bf16() {
    if let Some(o) = compare("gemma3", "gemma3/gemma-3-270m-q4_k_m.gguf") {
        check(&o, "gemma3", 3e-2, 0.1);
    }
}
