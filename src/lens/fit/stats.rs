//! The fit from float64 sufficient statistics ([`crate::data::stats::GramStats`], written by
//! `collect --stats-only` or summed by `merge`) instead of stored activations: the Gram blocks
//! are already summed, so only the per-source factorisation ([`super::solve::solve_block`], the
//! same as the fit from activations: equilibration, Cholesky, scikit-learn's cutoff, ridge) and
//! the float64 products `A = C P` ([`super::cpu::product`]) remain. Statistics on a GPU are
//! solved there ([`super::solve::solve_block_tensor`], the same decisions with cuSOLVER's
//! Cholesky inverse) and only the float32 maps come to the host.
//!
//! With an intercept the blocks are centred from the sums, `X^T X - n m m^T` (the fit from
//! activations centres the data first); in float64 that differs from centring first by about
//! `1e-16 |m|^2 / var` relative per entry, far below the fit's other errors for hidden states.

use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use faer::Mat;
use rayon::prelude::*;

use crate::data::stats::GramStats;
use crate::lens::fit::cpu::{pair_map, product};
use crate::lens::fit::solve::{layer_outcome, solve_block, solve_source_tensor};
use crate::lens::fit::{model_flops, FitOptions, FitReport, FitStats, GramPrecision, Plan};
use crate::lens::maps::{Maps, PairMap};

/// A `d x d` row-major block as a faer matrix, centred by `n mx my^T` when means are given.
fn block_mat(v: &[f64], d: usize, centre: Option<(&[f64], &[f64], f64)>) -> Mat<f64> {
    // Row-major input into a column-major matrix: a plain row-by-row loop writes with stride d.
    let mut m = faer::MatRef::from_row_major_slice(v, d, d).to_owned();
    if let Some((mi, mj, n)) = centre {
        for j in 0..d {
            for i in 0..d {
                m[(i, j)] -= n * mi[i] * mj[j];
            }
        }
    }
    m
}

/// [`crate::lens::fit::fit_all_pairs`] from statistics: the same maps as a float64 fit of the
/// activations the statistics were summed from, up to the reordering of float64 sums.
pub fn fit_from_stats(stats: &GramStats, pairs: &[(usize, usize)], opts: &FitOptions) -> Result<(Maps, FitReport)> {
    fit_from_stats_with(stats, pairs, opts, !stats.gram.device().is_cpu())
}

/// [`fit_from_stats`], the products on the statistics' device or on the host (the tests run
/// the device code on the CPU).
fn fit_from_stats_with(
    stats: &GramStats,
    pairs: &[(usize, usize)],
    opts: &FitOptions,
    device_products: bool,
) -> Result<(Maps, FitReport)> {
    let t0 = Instant::now();
    let (s, d) = (stats.n_states, stats.d);
    let n = stats.n as usize;
    ensure!(n >= 1, "fit: the statistics hold no examples");
    ensure!(opts.ridge >= 0.0 && opts.ridge.is_finite(), "fit: ridge must be >= 0");
    let mut pairs = pairs.to_vec();
    pairs.sort_unstable();
    pairs.dedup();
    ensure!(!pairs.is_empty(), "fit: no pairs given");
    for &(l, t) in &pairs {
        ensure!(
            stats.holds_pair(l, t),
            "fit: pair ({l}, {t}) is not in the statistics (collected for --pairs {} over {s} states)",
            stats.pairs.name()
        );
    }
    let plan = Plan::new(s, &pairs);
    let means: Vec<Option<Vec<f64>>> = (0..s)
        .map(|l| -> Result<Option<Vec<f64>>> {
            if !opts.intercept || plan.compact[l] == usize::MAX {
                return Ok(None);
            }
            let sums = stats.column_sums(l)?;
            Ok(Some(sums.iter().map(|x| x / n as f64).collect()))
        })
        .collect::<Result<_>>()?;
    let centre = |a: usize, b: usize| match (&means[a], &means[b]) {
        (Some(ma), Some(mb)) => Some((ma.as_slice(), mb.as_slice(), n as f64)),
        _ => None,
    };
    let t_stats = t0.elapsed().as_secs_f64();

    let (mut layers, mut warnings) = (Vec::new(), Vec::new());
    let (maps, t_gram, t_factor) = if device_products {
        // On a GPU everything stays there: each source's block is solved in place
        // ([`solve_block_tensor`]) and only the float32 maps travel. Copying the 32 blocks of
        // an 8B-shaped model to the host, factorising them there and bringing the inverses back
        // took 27 s of a 41 s fit; with the Cholesky on the GPU, the one singular layer's host
        // eigendecomposition still took 15 s.
        let t_gram = t0.elapsed().as_secs_f64();
        let mut inverses = Vec::with_capacity(plan.sources.len());
        for (l, _) in &plan.sources {
            let l = *l;
            let g = centred_block_tensor(stats, l, l, &means)?;
            let (p, layer, warning) = solve_source_tensor(l, &g, n, opts.ridge, || {
                format!("fit: the statistics of state {l} contain non-finite values")
            })?;
            layers.push(layer);
            warnings.extend(warning);
            inverses.push(p);
        }
        let t_factor = t0.elapsed().as_secs_f64();
        let mut maps = Vec::with_capacity(pairs.len());
        for ((l, targets), p) in plan.sources.iter().zip(&inverses) {
            for &t in targets {
                // A = C P, C = X_t^T X_l [target coordinates, source coordinates].
                let a = centred_block_tensor(stats, t, *l, &means)?
                    .matmul(p)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                maps.push(pair_map(*l, t, a, d, &means)?);
            }
        }
        (maps, t_gram, t_factor)
    } else {
        // The blocks to the host (float64). Only the copies run here, one after another; the
        // conversions to faer matrices run with the factorisations, in parallel (32 blocks of
        // 4096^2 converted on one core took ~10 s).
        let mut sources = Vec::with_capacity(plan.sources.len());
        for (l, targets) in &plan.sources {
            let g = stats.block(*l, *l)?.expect("diagonal block");
            let mut cross = Vec::with_capacity(targets.len());
            for &t in targets {
                // C = X_t^T X_l [target coordinates, source coordinates].
                cross.push((
                    t,
                    block_mat(&stats.block(t, *l)?.expect("pair block"), d, centre(t, *l)),
                ));
            }
            sources.push((*l, g, cross));
        }
        let t_gram = t0.elapsed().as_secs_f64();
        let solved: Vec<_> = sources
            .into_par_iter()
            .map(|(l, g, cross)| -> Result<_> {
                let g = block_mat(&g, d, centre(l, l));
                ensure!(
                    (0..d).all(|i| g[(i, i)].is_finite()),
                    "fit: the statistics of state {l} contain non-finite values"
                );
                let (solved, p) = solve_block(&g, n, opts.ridge, None)?.expect("float64 analysis always solves");
                let outcome = layer_outcome(l, d, &solved, None);
                Ok((l, p, cross, outcome))
            })
            .collect::<Result<_>>()?;
        let t_factor = t0.elapsed().as_secs_f64();
        let mut products = Vec::new();
        for (l, p, cross, (diag, warning)) in &solved {
            layers.push(diag.clone());
            warnings.extend(warning.clone());
            products.extend(cross.iter().map(|(t, c)| (*l, p, *t, c)));
        }
        // One parallel loop over every pair (each product is a sequential GEMM): with to-final
        // pairs every source has one target, and a loop per source ran the 32 products of an
        // 8B-shaped model one core at a time (the fit took 144 s on the H200 machine's 16 cores).
        let maps = products
            .into_par_iter()
            .map_init(
                || (Mat::<f64>::zeros(d, d), vec![0f64; d * d]),
                |scratch, (l, p, t, c)| -> Result<PairMap> {
                    let a = product(c.as_ref(), p.as_ref(), scratch);
                    pair_map(l, t, a, d, &means)
                },
            )
            .collect::<Result<Vec<_>>>()?;
        (maps, t_gram, t_factor)
    };
    let mut maps = maps;
    maps.sort_by_key(|p| (p.source, p.target));
    let t_end = t0.elapsed().as_secs_f64();
    let gram_blocks = plan.sources.len() + pairs.len();
    let report = FitReport {
        n_states: s,
        n,
        intercept: opts.intercept,
        ridge: opts.ridge,
        layers,
        warnings,
        stats: FitStats {
            precision: GramPrecision::F64,
            chunk_rows: n,
            gram_blocks,
            seconds_stats: t_stats,
            seconds_gram: t_gram - t_stats,
            seconds_factor: t_factor - t_gram,
            seconds_products: t_end - t_factor,
            seconds_total: t_end,
            // The Gram was summed during collection; what the maps stand for is reported.
            model_flops: model_flops(n, d, &pairs),
            gram_flops: 0.0,
        },
    };
    Ok((Maps::new(d, maps), report))
}

/// `X_l^T X_t` [d, d] on the statistics' device, contiguous, centred by `n m_l m_t^T` with an
/// intercept (float64, as [`block_mat`] on the host).
fn centred_block_tensor(stats: &GramStats, l: usize, t: usize, means: &[Option<Vec<f64>>]) -> Result<Tensor> {
    let (d, n) = (stats.d, stats.n as f64);
    let dev = stats.gram.device();
    let b = stats.block_tensor(l, t)?.expect("planned block").contiguous()?;
    Ok(match (&means[l], &means[t]) {
        (Some(ml), Some(mt)) => {
            let ml = Tensor::from_slice(ml, (d, 1), dev)?;
            let mt = Tensor::from_slice(mt, (1, d), dev)?;
            (b - (ml.matmul(&mt)? * n)?)?
        }
        _ => b,
    })
}

/// The largest diagonal entry of the Gram blocks of the sources of `pairs` (what
/// the fit stage's ridge bound compares with).
pub fn max_gram_diagonal(stats: &GramStats, pairs: &[(usize, usize)]) -> Result<f64> {
    let d = stats.d;
    let mut worst = 0f64;
    let mut sources: Vec<usize> = pairs.iter().map(|p| p.0).collect();
    sources.dedup();
    for l in sources {
        if let Some(g) = stats.block(l, l)? {
            worst = (0..d).map(|i| g[i * d + i]).fold(worst, f64::max);
        }
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::stats::StatsPairs;
    use crate::lens::fit::{fit_all_pairs, pairs_all, pairs_to_final, synthetic_states};
    use candle_core::{Device, Tensor};

    /// Whether every entry of `a`'s maps (and intercepts) is within `rel` of `b`'s largest
    /// entry plus one float32 rounding step of its own size: maps are stored in float32, so
    /// float64 results that differ by the reordering of sums (~1e-16 x cond) may round to
    /// neighbouring float32 values.
    pub(crate) fn maps_agree(a: &Maps, b: &Maps, rel: f64) -> Result<(), String> {
        let close = |x: &[f32], y: &[f32], what: &str| -> Result<(), String> {
            let m = y.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                let (u, v) = (*u as f64, *v as f64);
                let tol = rel * m + f64::from(f32::EPSILON) * u.abs().max(v.abs());
                if (u - v).abs() > tol {
                    return Err(format!("{what}[{i}]: {u} vs {v} (tolerance {tol:e})"));
                }
            }
            Ok(())
        };
        if a.pairs.len() != b.pairs.len() {
            return Err(format!("{} vs {} pairs", a.pairs.len(), b.pairs.len()));
        }
        for p in &a.pairs {
            let q = b.get(p.source, p.target).ok_or("missing pair")?;
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            close(&flat(&p.a), &flat(&q.a), &format!("A({}, {})", p.source, p.target))?;
            if let (Some(x), Some(y)) = (&p.intercept, &q.intercept) {
                close(&flat(x), &flat(y), &format!("b({}, {})", p.source, p.target))?;
            }
        }
        Ok(())
    }

    /// A rank-deficient source (two equal coordinates) gets the same minimum-norm solution from
    /// the host's solve and from the solve where the statistics are (the eigendecomposition as
    /// tensor operations): the same maps, ranks and warning.
    #[test]
    fn a_singular_source_gets_the_same_minimum_norm_maps_on_both_paths() {
        let (s, n, d) = (4, 300, 10);
        let mut v: Vec<Vec<Vec<f32>>> = synthetic_states(s, n, d, 3).unwrap().to_vec3().unwrap();
        for row in v[1].iter_mut() {
            row[0] = row[1];
        }
        let flat: Vec<f32> = v.into_iter().flatten().flatten().collect();
        let h = Tensor::from_vec(flat, (s, n, d), &Device::Cpu).unwrap();
        let mut stats = GramStats::zeros(StatsPairs::ToFinal, s, d, &Device::Cpu).unwrap();
        stats.accumulate(&h).unwrap();
        let opts = FitOptions {
            precision: GramPrecision::F64,
            ..FitOptions::default()
        };
        let pairs = pairs_to_final(s);
        let (host, host_report) = fit_from_stats_with(&stats, &pairs, &opts, false).unwrap();
        let (dev, dev_report) = fit_from_stats_with(&stats, &pairs, &opts, true).unwrap();
        maps_agree(&dev, &host, 1e-9).unwrap();
        for report in [&host_report, &dev_report] {
            let ranks: Vec<usize> = report.layers.iter().map(|l| l.rank).collect();
            assert_eq!(ranks, vec![d, d - 1, d], "{ranks:?}");
            assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
            assert!(report.warnings[0].starts_with("layer 1:"), "{:?}", report.warnings);
        }
        for (a, b) in host_report.layers.iter().zip(&dev_report.layers) {
            assert!((a.cond - b.cond).abs() <= 1e-6 * a.cond, "{} vs {}", a.cond, b.cond);
        }
    }

    /// Statistics streamed in batches give the maps of the float64 fit of the stored states:
    /// the float64 sums differ only in order (~1e-16 relative), so the maps agree to 1e-9 of
    /// their largest entry up to the final float32 rounding.
    #[test]
    fn statistics_fit_equals_the_fit_of_the_states() {
        let (s, n, d) = (5, 400, 12);
        let h = synthetic_states(s, n, d, 7).unwrap();
        for (kind, pairs) in [
            (StatsPairs::All, pairs_all(s)),
            (StatsPairs::ToFinal, pairs_to_final(s)),
        ] {
            let mut stats = GramStats::zeros(kind, s, d, &Device::Cpu).unwrap();
            for start in (0..n).step_by(64) {
                let len = 64.min(n - start);
                stats.accumulate(&h.narrow(1, start, len).unwrap()).unwrap();
            }
            for intercept in [false, true] {
                for ridge in [0.0, 3.0] {
                    let opts = FitOptions {
                        intercept,
                        ridge,
                        precision: GramPrecision::F64,
                        ..FitOptions::default()
                    };
                    let (want, _) = fit_all_pairs(&h, &pairs, &opts).unwrap();
                    // The products on the host and as device tensor ops (what a GPU runs).
                    for device_products in [false, true] {
                        let (got, report) = fit_from_stats_with(&stats, &pairs, &opts, device_products).unwrap();
                        assert_eq!(got.pairs.len(), pairs.len());
                        assert_eq!(report.n, n);
                        if let Err(e) = maps_agree(&got, &want, 1e-9) {
                            panic!(
                                "{kind:?} intercept {intercept} ridge {ridge} device products {device_products}: {e}"
                            );
                        }
                    }
                }
            }
        }
        // A pair the statistics do not hold is refused.
        let stats = GramStats::zeros(StatsPairs::ToFinal, s, d, &Device::Cpu).unwrap();
        let mut one = stats.clone();
        one.accumulate(&h).unwrap();
        let err = fit_from_stats(&one, &[(0, 1)], &FitOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("(0, 1)") && err.contains("to-final"), "{err}");
    }
}
