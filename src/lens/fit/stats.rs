//! The fit from float64 sufficient statistics ([`crate::data::stats::GramStats`], written by
//! `collect --stats-only` or summed by `merge`) instead of stored activations: the Gram blocks
//! are already summed, so only the per-source factorisation ([`super::solve::solve_block`], the
//! same as the fit from activations: equilibration, Cholesky, scikit-learn's cutoff, ridge) and
//! the float64 products `A = C P` ([`super::cpu::product`]) remain.
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
use crate::lens::fit::solve::{layer_outcome, solve_block};
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

    // The blocks to the host (float64): each source's diagonal block, and each pair's cross
    // block when the products run on the host (statistics on the CPU); on a GPU the cross
    // blocks stay there and only the inverses travel ([`products_on_device`]).
    let on_host = !device_products;
    // Only the copies run here, one after another; the conversions to faer matrices run with
    // the factorisations, in parallel (32 blocks of 4096^2 converted on one core took ~10 s).
    let mut sources = Vec::with_capacity(plan.sources.len());
    for (l, targets) in &plan.sources {
        let g = stats.block(*l, *l)?.expect("diagonal block");
        let mut cross = Vec::with_capacity(targets.len());
        for &t in targets {
            // C = X_t^T X_l [target coordinates, source coordinates].
            let c = match on_host {
                true => Some(block_mat(&stats.block(t, *l)?.expect("pair block"), d, centre(t, *l))),
                false => None,
            };
            cross.push((t, c));
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

    let mut layers = Vec::new();
    let mut warnings = Vec::new();
    let mut products = Vec::new();
    for (l, p, cross, (diag, warning)) in &solved {
        layers.push(diag.clone());
        warnings.extend(warning.clone());
        products.extend(cross.iter().map(|(t, c)| (*l, p, *t, c.as_ref())));
    }
    let mut maps: Vec<PairMap> = if on_host {
        // One parallel loop over every pair (each product is a sequential GEMM): with to-final
        // pairs every source has one target, and a loop per source ran the 32 products of an
        // 8B-shaped model one core at a time (the fit took 144 s on the H200 machine's 16 cores).
        products
            .into_par_iter()
            .map_init(
                || (Mat::<f64>::zeros(d, d), vec![0f64; d * d]),
                |scratch, (l, p, t, c)| -> Result<PairMap> {
                    let a = product(c.expect("host cross block").as_ref(), p.as_ref(), scratch);
                    pair_map(l, t, a, d, &means)
                },
            )
            .collect::<Result<_>>()?
    } else {
        products_on_device(stats, &products, &means)?
    };
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

/// One pair's product: (source l, the source's inverse P, target t, the host cross block C when
/// the products run on the host).
type Product<'a> = (usize, &'a Mat<f64>, usize, Option<&'a Mat<f64>>);

/// The maps `A = C P` with each pair's cross block `C = X_t^T X_l` (centred by `n m_t m_l^T`
/// with an intercept) where the statistics are, and the source's float64 inverse `P` brought
/// there: one float64 GEMM per pair on the device instead of 137 GFLOP on the host at d = 4096.
fn products_on_device(stats: &GramStats, products: &[Product<'_>], means: &[Option<Vec<f64>>]) -> Result<Vec<PairMap>> {
    let (d, n) = (stats.d, stats.n as f64);
    let dev = stats.gram.device();
    let mut maps = Vec::with_capacity(products.len());
    let mut uploaded: Option<(usize, Tensor)> = None;
    for &(l, p, t, _) in products {
        let p_dev = match &uploaded {
            Some((src, p_dev)) if *src == l => p_dev.clone(),
            _ => {
                let p_dev = crate::lens::fit::solve::mat_tensor(p, dev)?;
                uploaded = Some((l, p_dev.clone()));
                p_dev
            }
        };
        let mut c = stats.block_tensor(t, l)?.expect("pair block");
        if let (Some(mt), Some(ml)) = (&means[t], &means[l]) {
            let mt = Tensor::from_slice(mt, (d, 1), dev)?;
            let ml = Tensor::from_slice(ml, (1, d), dev)?;
            c = (c - (mt.matmul(&ml)? * n)?)?;
        }
        let a = c
            .contiguous()?
            .matmul(&p_dev)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        maps.push(pair_map(l, t, a, d, means)?);
    }
    Ok(maps)
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
