//! The all-pairs fit of [`crate::lens::fit`] with the sufficient statistics accumulated on the
//! device that holds the hidden states (a GPU): what crosses to the host is each source block's
//! diagonal and a few scalars of its factorisation, never the states or the blocks.
//!
//! # Why it is built this way
//!
//! On the CPU the Gram blocks are float32 GEMMs with a float64 recomputation of troubled layers
//! ([`crate::lens::fit`]). On a GPU float64 GEMM runs at the rate of float32 (an H200 measured 54.5
//! TFLOP/s float64 against 39.9 float32 for a 100k x 1600 Gram), so everything is float64 and
//! no layer is recomputed. Per chunk of examples the needed states are laid out as
//! `Z^T` [K d, rows] (one row per coordinate), so any run of consecutive states is a
//! contiguous band of rows. One pass over the examples accumulates, per chunk, every source's
//! diagonal block `X_l^T X_l` and its cross blocks `X_t^T X_l` (one GEMM per source and run of
//! consecutive targets; converting the chunk to float64 is memory-bound device work, small beside
//! the GEMMs). Then each diagonal block is solved where it is
//! ([`super::solve::solve_block_tensor`]: the host path's column equilibration, condition
//! estimates, scikit-learn's minimum-norm cutoff and ridge, with cuSOLVER's Cholesky inverse and
//! eigendecomposition on a GPU). (Earlier the diagonal blocks were a first pass of their own, so
//! that the host could factorise them during a second; with the solve on the device that bought
//! nothing and cost a second conversion of every chunk.)
//!
//! Each source's float64 inverse `P`, already on the device, then gives one GEMM `A = C P` over
//! all its targets. The maps stay on the device as float32 (views of one buffer per source
//! layer). The chunks are as large as the free device memory allows, up to 16 GiB: the GEMMs'
//! rate grew with their inner dimension (see [`CHUNK_BYTES_MAX`]).
//!
//! The same code runs on any candle device; the tests run it on the CPU against
//! [`crate::lens::fit::fit_all_pairs`].
//!
//! Every device operation works on one state `[N, d]` (or less) at a time: candle's CUDA
//! kernels compute strided offsets in 32 bits, which a view across all states of a large
//! problem overflows (seen: garbage maps for 49 x 100,000 x 1,600 states).

use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

use crate::lens::fit::device_linalg::{gram_add, mirror_upper};
use crate::lens::fit::solve::solve_source_tensor;
use crate::lens::fit::{checked_inputs, model_flops, FitOptions, FitReport, FitStats, GramPrecision, LayerDiag, Plan};
use crate::lens::maps::{Maps, PairMap};

/// Bytes of one float64 chunk `Z^T` [K d, rows] (the rows per chunk follow from it) where the
/// device's free memory is not known.
const CHUNK_BYTES: usize = 4 << 30;

/// The largest chunk taken when the free memory allows it: on the H200 the GPT-2-XL-shaped
/// Gram (49 x 1600, N = 100,000) ran at 33 TFLOP/s with 4 GiB chunks and 46 TFLOP/s with
/// 25,000-row (15.7 GB) ones (`scripts/device_bench.sh fit`, FIT_CHUNKS).
const CHUNK_BYTES_MAX: usize = 16 << 30;

/// Bytes for one chunk on `device`: what is free after the accumulators (`acc_bytes`) and the
/// largest GEMM result (`tmp_bytes`), over 2.5 (a chunk's per-state parts and their
/// concatenation are alive together, plus slack), at most [`CHUNK_BYTES_MAX`].
fn chunk_bytes(device: &Device, acc_bytes: usize, tmp_bytes: usize) -> usize {
    match crate::device::free_memory(device) {
        Some(free) => (free.saturating_sub(acc_bytes + tmp_bytes) * 2 / 5).clamp(1 << 28, CHUNK_BYTES_MAX),
        None => CHUNK_BYTES,
    }
}

/// Waits for the device's queued work, so that wall-clock timings mean something.
fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}

/// Maximal runs of consecutive compact indices, as (first, length).
fn runs(idx: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &i in idx {
        match out.last_mut() {
            Some((a, len)) if *a + *len == i => *len += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// One source layer's solve: the unscaled (pseudo-)inverse of `X_l^T X_l`, its diagnostics
/// and warning.
type Solution = (Tensor, LayerDiag, Option<String>);

/// One source layer's accumulated Gram blocks: `X_c^T X_l` for the compact states `c` of each
/// run, stacked [run_len d, d], float64 on the device.
struct BlockRow {
    source: usize,
    /// (first compact state, length, accumulator).
    runs: Vec<(usize, usize, Tensor)>,
}

/// Fits every pair of `pairs` on `train` [S, N, d] (float32) on the tensor's own device. Same
/// model and options as [`crate::lens::fit::fit_all_pairs`] (which calls this for non-CPU tensors);
/// the maps are returned on that device.
pub fn fit_all_pairs_on_device(
    train: &Tensor,
    pairs: &[(usize, usize)],
    opts: &FitOptions,
) -> Result<(Maps, FitReport)> {
    let t0 = Instant::now();
    let device = train.device().clone();
    let ((s, n, d), pairs) = checked_inputs(train, pairs, opts)?;
    let plan = Plan::new(s, &pairs);
    let k = plan.states.len();
    let kd = k * d;
    let rows = if opts.chunk_rows > 0 {
        opts.chunk_rows
    } else {
        // The accumulators of both passes: every source's diagonal block, every pair's block.
        let acc = (plan.sources.len() + pairs.len()) * d * d * 8;
        let widest = plan.sources.iter().map(|(_, ts)| ts.len()).max().unwrap_or(1);
        // A multiple of 64 rows: the chunk's row count is the leading dimension of every GEMM
        // operand, and cuBLAS's fast float64 kernels need it aligned (the GPT-2-XL-shaped Gram ran
        // at 37.5 TFLOP/s with 27,391-row chunks, 46.4 with 25,000).
        (chunk_bytes(&device, acc, widest * d * d * 8) / (kd * 8) / 64 * 64).max(64)
    }
    .clamp(1, n);
    // `Z^T` of examples start..start+len, centred by `means` ([K d, 1] float64) if given.
    // Built state by state: candle's CUDA kernels index strided tensors with 32-bit offsets, so
    // no strided view may span the whole [S, N, d] input (7.8e9 values for GPT-2-XL at N=1e5).
    let chunk = |start: usize, len: usize, means: Option<&Tensor>| -> Result<Tensor> {
        let parts = plan
            .states
            .iter()
            .map(|&st| train.get(st)?.narrow(0, start, len)?.t()?.to_dtype(DType::F64))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let zt = Tensor::cat(&parts, 0)?;
        debug_assert_eq!(zt.dims(), &[kd, len]);
        Ok(match means {
            Some(m) => zt.broadcast_sub(m)?,
            None => zt,
        })
    };

    // Column means (float64) for an intercept: scikit-learn centres before solving.
    let means = if opts.intercept {
        let mut sum = Tensor::zeros((kd, 1), DType::F64, &device)?;
        for start in (0..n).step_by(rows) {
            let len = rows.min(n - start);
            sum = (sum + chunk(start, len, None)?.sum_keepdim(1)?)?;
        }
        Some((sum / n as f64)?)
    } else {
        None
    };
    sync(&device)?;
    let t_stats = t0.elapsed().as_secs_f64();

    // One pass over the examples: per chunk, every source's diagonal block `X_l^T X_l` and its
    // cross blocks `X_t^T X_l`, one GEMM per source and run of consecutive targets (each chunk
    // is converted to float64 once).
    let sources = &plan.sources;
    let mut gram_flops = 0f64;
    let diag_acc: Vec<Tensor> = sources
        .iter()
        .map(|_| Tensor::zeros((d, d), DType::F64, &device))
        .collect::<candle_core::Result<_>>()?;
    let block_rows: Vec<BlockRow> = sources
        .iter()
        .map(|(l, ts)| {
            let idx: Vec<usize> = ts.iter().map(|t| plan.compact[*t]).collect();
            let runs = runs(&idx)
                .into_iter()
                .map(|(a, len)| Ok((a, len, Tensor::zeros((len * d, d), DType::F64, &device)?)))
                .collect::<Result<Vec<_>>>()?;
            Ok(BlockRow { source: *l, runs })
        })
        .collect::<Result<_>>()?;
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let zt = chunk(start, len, means.as_ref())?;
        for (br, acc) in block_rows.iter().zip(&diag_acc) {
            // In place: the diagonal block's upper triangle (syrk on a GPU), then the source's
            // cross blocks with each run of consecutive targets (one GEMM per run).
            let x_row = plan.compact[br.source] * d;
            gram_add(acc, &zt, x_row, x_row, d)?;
            gram_flops += (d * d * len) as f64;
            for (a, rl, acc) in &br.runs {
                gram_add(acc, &zt, *a * d, x_row, d)?;
                gram_flops += 2.0 * (*rl * d * d * len) as f64;
            }
        }
    }
    sync(&device)?;
    let t_gram = t0.elapsed().as_secs_f64();

    // Each diagonal block is solved where it is ([`solve_block_tensor`]: the host path's
    // equilibration, condition estimates, scikit-learn's minimum-norm cutoff and ridge, with
    // cuSOLVER's factorisations on a GPU). Factorising on the host and bringing each inverse
    // back took 8.7 + ~10 s of the 8B shape's 34 s to-final fit.
    let mut solved: Vec<Solution> = Vec::with_capacity(sources.len());
    for (acc, (l, _)) in diag_acc.iter().zip(sources) {
        let l = *l;
        let g = mirror_upper(acc)?;
        solved.push(solve_source_tensor(l, &g, n, opts.ridge, || {
            format!("fit: state {l} contains non-finite values")
        })?);
    }
    drop(diag_acc);
    sync(&device)?;
    let t_factor = t0.elapsed().as_secs_f64();
    let seconds_factor = t_factor - t_gram;

    // A = C P for all targets of a source in one GEMM; maps as float32 views.
    let mut maps_pairs = Vec::with_capacity(pairs.len());
    let mut layers = Vec::with_capacity(solved.len());
    let mut warnings = Vec::new();
    for (br, (p, diag, warning)) in block_rows.into_iter().zip(solved) {
        let l = br.source;
        let lc = plan.compact[l];
        let mu_l = means.as_ref().map(|m| m.narrow(0, lc * d, d)).transpose()?;
        for (a0, m, c) in br.runs {
            let a64 = c.matmul(&p)?; // [m d, d] = stacked A_t (out x in)
            drop(c);
            let worst = a64.abs()?.max_keepdim(0)?.max_keepdim(1)?.to_device(&Device::Cpu)?;
            let worst = worst.flatten_all()?.to_vec1::<f64>()?[0];
            let first_t = plan.states[a0];
            ensure!(
                worst.is_finite(),
                "fit: maps from state {l} are not finite (non-finite values in states {first_t}..?)"
            );
            let biases = match (&means, &mu_l) {
                (Some(mu), Some(mu_l)) => {
                    let mu_t = mu.narrow(0, a0 * d, m * d)?;
                    Some((mu_t - a64.matmul(mu_l)?)?.to_dtype(DType::F32)?.flatten_all()?)
                }
                _ => None,
            };
            let a32 = a64.to_dtype(DType::F32)?;
            for j in 0..m {
                maps_pairs.push(PairMap {
                    source: l,
                    target: plan.states[a0 + j],
                    a: a32.narrow(0, j * d, d)?,
                    intercept: biases.as_ref().map(|b| b.narrow(0, j * d, d)).transpose()?,
                });
            }
        }
        layers.push(diag);
        warnings.extend(warning);
    }
    maps_pairs.sort_by_key(|p| (p.source, p.target));
    sync(&device)?;
    let t_end = t0.elapsed().as_secs_f64();
    let report = FitReport {
        n_states: s,
        n,
        intercept: opts.intercept,
        ridge: opts.ridge,
        layers,
        warnings,
        stats: FitStats {
            precision: GramPrecision::F64,
            chunk_rows: rows,
            gram_blocks: pairs.len() + plan.sources.len(),
            seconds_stats: t_stats,
            seconds_gram: t_gram - t_stats,
            seconds_factor,
            seconds_products: t_end - t_factor,
            seconds_total: t_end,
            model_flops: model_flops(n, d, &pairs),
            gram_flops,
        },
    };
    Ok((Maps::new(d, maps_pairs), report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lens::fit::{fit_all_pairs, pairs_all, pairs_to_final, synthetic_states};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        (diff / norm).sqrt()
    }

    /// The device algorithm (run here on the CPU device) gives the CPU path's maps.
    #[test]
    fn device_path_matches_cpu_fit() {
        let h = synthetic_states(6, 900, 24, 3).unwrap();
        for (pairs, intercept, ridge) in [
            (pairs_all(6), false, 0.0),
            (pairs_to_final(6), false, 0.0),
            (vec![(0, 2), (0, 3), (0, 5), (2, 4)], true, 0.0),
            (pairs_all(6), false, 1e-2),
        ] {
            let opts = FitOptions {
                intercept,
                ridge,
                precision: GramPrecision::F64,
                // Several chunks of examples, the last one short.
                chunk_rows: 250,
                ..FitOptions::default()
            };
            let (cpu, cpu_report) = fit_all_pairs(&h, &pairs, &opts).unwrap();
            let (dev, dev_report) = fit_all_pairs_on_device(&h, &pairs, &opts).unwrap();
            assert_eq!(cpu.pairs.len(), dev.pairs.len());
            for (c, g) in cpu.pairs.iter().zip(&dev.pairs) {
                assert_eq!((c.source, c.target), (g.source, g.target));
                let e = max_rel(&g.a, &c.a);
                assert!(e < 1e-5, "pair ({}, {}): {e}", c.source, c.target);
                match (&c.intercept, &g.intercept) {
                    (Some(bc), Some(bg)) => assert!(max_rel(bg, bc) < 1e-4),
                    (None, None) => {}
                    _ => panic!("intercepts differ in presence"),
                }
            }
            assert_eq!(cpu_report.layers.len(), dev_report.layers.len());
            for (c, g) in cpu_report.layers.iter().zip(&dev_report.layers) {
                assert_eq!((c.layer, c.rank), (g.layer, g.rank));
            }
        }
    }

    /// Rank-deficient data: the minimum-norm answer and the warning, as on the CPU path.
    #[test]
    fn device_path_handles_collinear_columns() {
        let h = synthetic_states(3, 400, 8, 5).unwrap();
        let h0 = h.get(0).unwrap();
        // Column 7 of state 0 duplicates column 0.
        let dup = Tensor::cat(&[h0.narrow(1, 0, 7).unwrap(), h0.narrow(1, 0, 1).unwrap()], 1).unwrap();
        let h = Tensor::stack(&[dup, h.get(1).unwrap(), h.get(2).unwrap()], 0).unwrap();
        let opts = FitOptions::default();
        let (cpu, _) = fit_all_pairs(&h, &pairs_all(3), &opts).unwrap();
        let (dev, dev_report) = fit_all_pairs_on_device(&h, &pairs_all(3), &opts).unwrap();
        assert_eq!(dev_report.layers[0].rank, 7);
        assert!(dev_report
            .warnings
            .iter()
            .any(|w| w.starts_with("layer 0") && w.contains("singular")));
        for (c, g) in cpu.pairs.iter().zip(&dev.pairs) {
            assert!(max_rel(&g.a, &c.a) < 1e-4);
        }
    }

    #[test]
    fn device_path_refuses_nan() {
        let h = synthetic_states(3, 100, 4, 1).unwrap();
        let bad = (h.get(1).unwrap() * f64::NAN).unwrap();
        let h = Tensor::stack(&[h.get(0).unwrap(), bad, h.get(2).unwrap()], 0).unwrap();
        let err = fit_all_pairs_on_device(&h, &pairs_all(3), &FitOptions::default()).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }

    /// r^2 computed on the device path equals the CPU path's (both float64 at this size).
    #[test]
    fn device_r2_matches_cpu_r2() {
        let h = synthetic_states(5, 700, 16, 9).unwrap();
        let (train, val) = (h.narrow(1, 0, 500).unwrap(), h.narrow(1, 500, 200).unwrap());
        // A constant column in the validation targets exercises scikit-learn's SST = 0 rule.
        let v4 = val.get(4).unwrap();
        let v4 = Tensor::cat(
            &[
                v4.narrow(1, 0, 15).unwrap(),
                Tensor::ones((200, 1), DType::F32, &Device::Cpu).unwrap(),
            ],
            1,
        )
        .unwrap();
        let parts: Vec<Tensor> = (0..4).map(|i| val.get(i).unwrap()).chain([v4]).collect();
        let val = Tensor::stack(&parts, 0).unwrap();
        for intercept in [false, true] {
            let opts = FitOptions {
                intercept,
                ..FitOptions::default()
            };
            let (maps, _) = fit_all_pairs(&train, &pairs_all(5), &opts).unwrap();
            let cpu = crate::lens::r2::r2_all_pairs(&val, &maps).unwrap();
            let dev = crate::lens::r2::r2_all_pairs_on_device(&val, &maps).unwrap();
            for l in 0..5 {
                for t in 0..5 {
                    match (cpu.mat[l][t], dev.mat[l][t], cpu.id[l][t], dev.id[l][t]) {
                        (Some(a), Some(b), Some(c), Some(e)) => {
                            assert!(
                                (a - b).abs() < 1e-9 && (c - e).abs() < 1e-9,
                                "({l}, {t}): {a} {b} {c} {e}"
                            )
                        }
                        (None, None, None, None) => {}
                        other => panic!("({l}, {t}): {other:?}"),
                    }
                }
            }
        }
    }

    /// The GPU benchmark's synthetic recipe at a size the CPU handles (slow: run by hand with
    /// `--ignored`): the device algorithm and the CPU's float32 path agree on every layer's
    /// rank and on the training r^2 of the jumps to the last state, which must be a good fit.
    #[test]
    #[ignore]
    fn benchmark_recipe_fits() {
        let h = crate::lens::fit::synthetic::synthetic_states_on(&Device::Cpu, 13, 20000, 400, 0).unwrap();
        let pairs = pairs_all(13);
        let opts = FitOptions::default();
        let (cpu, cpu_report) = fit_all_pairs(&h, &pairs, &opts).unwrap();
        let (dev, dev_report) = fit_all_pairs_on_device(
            &h,
            &pairs,
            &FitOptions {
                chunk_rows: 3000,
                ..opts
            },
        )
        .unwrap();
        for (c, g) in cpu_report.layers.iter().zip(&dev_report.layers) {
            assert_eq!((c.layer, c.rank), (g.layer, g.rank), "{c:?} vs {g:?}");
        }
        let sub = h.narrow(1, 0, 4096).unwrap();
        let r_cpu = crate::lens::r2::r2_all_pairs(&sub, &cpu).unwrap();
        let r_dev = crate::lens::r2::r2_all_pairs(&sub, &dev).unwrap();
        for l in 0..12 {
            let (c, g) = (r_cpu.mat[l][12].unwrap(), r_dev.mat[l][12].unwrap());
            assert!((c - g).abs() < 1e-4, "layer {l}: cpu {c} dev {g}");
            assert!(
                g > r_dev.id[l][12].unwrap(),
                "layer {l}: the map must beat the identity"
            );
        }
    }
}
