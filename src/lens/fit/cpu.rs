//! The all-pairs fit on the CPU: the needed blocks of the Gram `Z^T Z` accumulated with one
//! single-threaded faer GEMM per block (spread over the threads with rayon), read in place from
//! the [S, N, d] input in the default path (float32, no intercept) or streamed through a chunk
//! buffer (centring, float64); then one factorisation per source layer ([`super::solve`]) and
//! one float64 product per pair. The module docs of [`crate::lens::fit`] say why.

use std::ops::Range;
use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::host::{with_states, Elem, States};
use crate::lens::fit::solve::{layer_outcome, solve_block, sym_f64};
use crate::lens::fit::{
    checked_inputs, model_flops, FitOptions, FitReport, FitStats, GramPrecision, LayerDiag, Plan, AUTO_F64_FLOPS,
};
use crate::lens::maps::{Maps, PairMap};

/// Target size of one chunk of rows (bytes) when `chunk_rows` is 0.
const CHUNK_BYTES: usize = 256 << 20;

/// Starts the next phase of a fit's progress bar: `len` steps labelled `what`.
fn restart(bar: &ProgressBar, len: usize, what: &'static str) {
    bar.set_length(len as u64);
    bar.set_position(0);
    bar.reset_eta();
    bar.set_message(what);
}

/// [`crate::lens::fit::fit_all_pairs`] for states on the CPU.
pub fn fit_all_pairs_on_cpu(train: &Tensor, pairs: &[(usize, usize)], opts: &FitOptions) -> Result<(Maps, FitReport)> {
    let t0 = Instant::now();
    let ((s, n, d), pairs) = checked_inputs(train, pairs, opts)?;
    let plan = Plan::new(s, &pairs);
    let mflops = model_flops(n, d, &pairs);
    let precision = match opts.precision {
        GramPrecision::Auto if mflops < AUTO_F64_FLOPS => GramPrecision::F64,
        GramPrecision::Auto => GramPrecision::F32,
        p => p,
    };
    with_states(train, |st| match precision {
        GramPrecision::F64 => fit_impl::<f64>(&st, &plan, opts, precision, mflops, t0),
        _ => fit_impl::<f32>(&st, &plan, opts, precision, mflops, t0),
    })
}

/// Column means (float64) of the states `states` (others: None).
fn column_means(st: &States<'_>, states: &[usize]) -> Result<Vec<Option<Vec<f64>>>> {
    let d = st.d;
    let per: Vec<(usize, Vec<f64>)> = states
        .par_iter()
        .map(|&s| {
            let mut sum = vec![0f64; d];
            for i in 0..st.n {
                for (a, &x) in sum.iter_mut().zip(st.row(s, i)) {
                    *a += x as f64;
                }
            }
            sum.iter_mut().for_each(|a| *a /= st.n as f64);
            (s, sum)
        })
        .collect();
    let mut means = vec![None; st.s];
    for (s, m) in per {
        ensure!(
            m.iter().all(|x| x.is_finite()),
            "fit: state {s} contains non-finite values"
        );
        means[s] = Some(m);
    }
    Ok(means)
}

/// Fills `buf` (column-major [K d, rows.len()], column = one example) with the (centred)
/// states `states` of the examples `rows`.
fn fill_chunk<T: Elem>(
    st: &States<'_>,
    means: &[Option<Vec<f64>>],
    states: &[usize],
    rows: Range<usize>,
    buf: &mut [T],
) {
    let d = st.d;
    let kd = states.len() * d;
    buf[..rows.len() * kd]
        .par_chunks_mut(kd)
        .enumerate()
        .for_each(|(j, col)| {
            let i = rows.start + j;
            for (k, &s) in states.iter().enumerate() {
                T::convert(st.row(s, i), means[s].as_deref(), &mut col[k * d..(k + 1) * d]);
            }
        });
}

/// The needed blocks of the Gram `Z^T Z`: the diagonal block `X_l^T X_l` of every source
/// (lower triangle) and `X_t^T X_l` of every pair. One GEMM per block, the blocks spread over
/// the threads: a single-threaded GEMM of 576 x 576 x N runs at ~95% of a core's peak with no
/// synchronisation, better than one parallel GEMM over the whole triangle, and it reads the
/// input in place (no copy of the states).
struct Gram<T> {
    /// Diagonal blocks by compact index (lower triangles), for sources.
    diag: Vec<Option<Mat<T>>>,
    /// Cross blocks [d (target coordinates), d (source coordinates)].
    cross: Vec<Mat<T>>,
    /// (compact source, compact target) of each cross block.
    cross_of: Vec<(usize, usize)>,
}

impl<T: Elem> Gram<T> {
    fn new(plan: &Plan, d: usize) -> Gram<T> {
        let k = plan.states.len();
        let mut gram = Gram {
            diag: (0..k).map(|_| None).collect(),
            cross: Vec::new(),
            cross_of: Vec::new(),
        };
        for (l, ts) in &plan.sources {
            let lc = plan.compact[*l];
            gram.diag[lc] = Some(Mat::zeros(d, d));
            for t in ts {
                let tc = plan.compact[*t];
                gram.cross.push(Mat::zeros(d, d));
                gram.cross_of.push((lc, tc));
            }
        }
        gram
    }

    /// Adds `X^T X` blocks of one set of rows; `view(c)` is `X_c^T` ([d, rows]) of compact
    /// state c. `diag`: the diagonal blocks; `cross(lc)`: the cross blocks of compact source lc.
    fn accumulate<'v>(
        &mut self,
        bar: &ProgressBar,
        view: impl Fn(usize) -> MatRef<'v, T> + Sync,
        diag: bool,
        cross: impl Fn(usize) -> bool,
    ) {
        enum Job<'a, T> {
            Diag(usize, &'a mut Mat<T>),
            Cross(usize, usize, &'a mut Mat<T>),
        }
        let mut jobs: Vec<Job<'_, T>> = Vec::new();
        for (lc, g) in self.diag.iter_mut().enumerate() {
            if let (true, Some(g)) = (diag, g) {
                jobs.push(Job::Diag(lc, g));
            }
        }
        for (g, &(lc, tc)) in self.cross.iter_mut().zip(&self.cross_of) {
            if cross(lc) {
                jobs.push(Job::Cross(lc, tc, g));
            }
        }
        let one = T::of(1.0);
        jobs.into_par_iter().for_each(|job| {
            match job {
                Job::Diag(lc, g) => {
                    let x = view(lc);
                    triangular::matmul(
                        g.as_mut(),
                        BlockStructure::TriangularLower,
                        Accum::Add,
                        x,
                        BlockStructure::Rectangular,
                        x.transpose(),
                        BlockStructure::Rectangular,
                        one,
                        Par::Seq,
                    );
                }
                Job::Cross(lc, tc, g) => {
                    matmul(g.as_mut(), Accum::Add, view(tc), view(lc).transpose(), one, Par::Seq);
                }
            }
            bar.inc(1);
        });
    }

    /// Lower triangle of the diagonal block of compact state `lc`.
    fn diag_block(&self, lc: usize) -> MatRef<'_, T> {
        self.diag[lc].as_ref().expect("diagonal block").as_ref()
    }

    /// Flops of one accumulation over `rows` rows.
    fn flops(&self, d: usize, rows: usize) -> f64 {
        let nd = self.diag.iter().filter(|g| g.is_some()).count() as f64;
        let blk = (d * d) as f64 * rows as f64;
        nd * (blk + (d * rows) as f64) + self.cross.len() as f64 * 2.0 * blk
    }
}

fn chunk_rows(opts: &FitOptions, n: usize, kd: usize, bytes: usize) -> usize {
    let b = if opts.chunk_rows > 0 {
        opts.chunk_rows
    } else {
        (CHUNK_BYTES / (kd * bytes).max(1)).max(64) / 64 * 64
    };
    b.clamp(1, n)
}

/// Recomputes, in float64 from the data, the (centred) blocks of source `l`:
/// (G_ll symmetric, cross blocks X_t^T X_l for `targets`).
fn recompute_f64(
    st: &States<'_>,
    means: &[Option<Vec<f64>>],
    l: usize,
    targets: &[usize],
    rows_per_chunk: usize,
) -> (Mat<f64>, Vec<Mat<f64>>) {
    let d = st.d;
    let m = targets.len();
    let mut states = vec![l];
    states.extend_from_slice(targets);
    let kd = states.len() * d;
    let b = rows_per_chunk.clamp(1, st.n);
    let mut buf = vec![0f64; kd * b];
    let mut g = Mat::<f64>::zeros(d, d);
    let mut c = Mat::<f64>::zeros(m * d, d);
    let par = Par::rayon(0);
    let mut start = 0;
    while start < st.n {
        let end = (start + b).min(st.n);
        fill_chunk::<f64>(st, means, &states, start..end, &mut buf);
        let zt = MatRef::from_column_major_slice(&buf[..kd * (end - start)], kd, end - start);
        let zl = zt.subrows(0, d);
        triangular::matmul(
            g.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            zl,
            BlockStructure::Rectangular,
            zl.transpose(),
            BlockStructure::Rectangular,
            1.0,
            par,
        );
        matmul(c.as_mut(), Accum::Add, zt.subrows(d, m * d), zl.transpose(), 1.0, par);
        start = end;
    }
    let g = sym_f64(g.as_ref());
    let cross = (0..m)
        .map(|j| c.as_ref().submatrix(j * d, 0, d, d).to_owned())
        .collect();
    (g, cross)
}

struct Factor {
    /// Source state.
    l: usize,
    targets: Vec<usize>,
    /// Unscaled (pseudo-)inverse of `X_l^T X_l`, float64.
    p: Mat<f64>,
    /// Cross blocks recomputed in float64 (after trouble with float32), by target.
    cross64: Option<Vec<Mat<f64>>>,
    diag: LayerDiag,
    warning: Option<String>,
}

#[allow(clippy::too_many_arguments)]
fn factor_source<T: Elem>(
    gram: &Gram<T>,
    plan: &Plan,
    st: &States<'_>,
    means: &[Option<Vec<f64>>],
    opts: &FitOptions,
    is_f32: bool,
    rows_f64: usize,
    l: usize,
    targets: &[usize],
) -> Result<Factor> {
    let d = st.d;
    let g = sym_f64(gram.diag_block(plan.compact[l]));
    ensure!(
        (0..d).all(|i| g[(i, i)].is_finite()),
        "fit: state {l} contains non-finite values"
    );
    let trust = is_f32.then_some(opts.f32_max_cond);
    let (solved, p, f64_cross, reason) = match solve_block(&g, st.n, opts.ridge, trust)? {
        Ok((s, p)) => (s, p, None, None),
        Err(why) => {
            let (g64, cross) = recompute_f64(st, means, l, targets, rows_f64);
            let (s, p) = solve_block(&g64, st.n, opts.ridge, None)?.expect("float64 analysis always solves");
            (s, p, Some(cross), Some(why))
        }
    };
    let (diag, warning) = layer_outcome(l, d, &solved, reason.as_deref());
    Ok(Factor {
        l,
        targets: targets.to_vec(),
        p,
        cross64: f64_cross,
        diag,
        warning,
    })
}

/// One factorisation per source layer (largest first for load balance), in source order.
#[allow(clippy::too_many_arguments)]
fn factor_all<T: Elem>(
    gram: &Gram<T>,
    plan: &Plan,
    st: &States<'_>,
    means: &[Option<Vec<f64>>],
    opts: &FitOptions,
    is_f32: bool,
    rows_f64: usize,
    bar: &ProgressBar,
) -> Result<Vec<Factor>> {
    let mut order: Vec<usize> = (0..plan.sources.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plan.sources[i].1.len()));
    restart(bar, plan.sources.len(), "fit: layers");
    let mut factors: Vec<Factor> = order
        .par_iter()
        .map(|&i| {
            let (l, ts) = &plan.sources[i];
            let f = factor_source(gram, plan, st, means, opts, is_f32, rows_f64, *l, ts);
            bar.inc(1);
            f
        })
        .collect::<Result<_>>()?;
    factors.sort_by_key(|f| f.l);
    Ok(factors)
}

/// `A = C P` in float64, returned as row-major f32 (C: [d, d] cross block `X_t^T X_l`, P: the
/// float64 inverse of `X_l^T X_l`). The product must be float64: `P` has entries of size
/// `1/lambda_min`, and rounding it (or the products) to float32 puts errors into the maps
/// that are not damped like those of the Gram (measured: ~100x larger prediction errors).
pub(crate) fn product<T: Elem>(c: MatRef<'_, T>, p: MatRef<'_, f64>, scratch: &mut (Mat<f64>, Vec<f64>)) -> Vec<f32> {
    let d = c.nrows();
    let (ct, buf) = scratch;
    // C^T in float64, column-major; then A^T = P C^T (P symmetric) into a column-major buffer,
    // which is A row-major (faer's GEMM is fastest with column-major operands and output).
    for j in 0..d {
        for (i, x) in c.col(j).iter().enumerate() {
            ct[(j, i)] = x.f64();
        }
    }
    matmul(
        MatMut::from_column_major_slice_mut(buf, d, d),
        Accum::Replace,
        p,
        ct.as_ref(),
        1.0,
        Par::Seq,
    );
    buf.iter().map(|&x| x as f32).collect()
}

/// The map l -> t from its float64 product `a` [d, d] (row-major), with the intercept
/// `mean_t - A mean_l` when `means` has both (centred fits); a non-finite map is an error. Shared
/// by the fit from stored states and the fit from streamed statistics.
pub(crate) fn pair_map(l: usize, t: usize, a: Vec<f32>, d: usize, means: &[Option<Vec<f64>>]) -> Result<PairMap> {
    ensure!(
        a.iter().all(|x| x.is_finite()),
        "fit: map ({l}, {t}) is not finite (non-finite values in state {t}?)"
    );
    let intercept = match (&means[l], &means[t]) {
        (Some(mx), Some(my)) => {
            let b: Vec<f32> = (0..d)
                .map(|i| {
                    let row = &a[i * d..(i + 1) * d];
                    let ax: f64 = row.iter().zip(mx).map(|(&w, &m)| w as f64 * m).sum();
                    (my[i] - ax) as f32
                })
                .collect();
            Some(Tensor::from_vec(b, d, &Device::Cpu)?)
        }
        _ => None,
    };
    Ok(PairMap {
        source: l,
        target: t,
        a: Tensor::from_vec(a, (d, d), &Device::Cpu)?,
        intercept,
    })
}

fn fit_impl<T: Elem>(
    st: &States<'_>,
    plan: &Plan,
    opts: &FitOptions,
    precision: GramPrecision,
    mflops: f64,
    t0: Instant,
) -> Result<(Maps, FitReport)> {
    let d = st.d;
    let n = st.n;
    let is_f32 = T::BYTES == 4;
    let means = if opts.intercept {
        column_means(st, &plan.states)?
    } else {
        vec![None; st.s]
    };
    let t_stats = t0.elapsed().as_secs_f64();

    // Gram: straight from the [S, N, d] data when no conversion is needed (float32, no
    // centring), else over chunks of rows copied (centred / converted) into a buffer.
    let kd = plan.states.len() * d;
    let direct = is_f32 && !opts.intercept;
    let b = if direct { n } else { chunk_rows(opts, n, kd, T::BYTES) };
    let mut gram = Gram::<T>::new(plan, d);
    // Progress in Gram blocks (the bulk of the time), then in source layers and in pairs.
    let passes = n.div_ceil(b);
    let n_blocks = gram.cross.len() + plan.sources.len();
    let bar = crate::progress::bar((n_blocks * passes) as u64, "fit: Gram blocks", opts.progress);
    let rows_f64 = chunk_rows(opts, n, 8 * d, 8).min(4096);
    let mut early_factors = None;
    let mut early_factor_s = 0.0;
    if direct {
        // The diagonal blocks first: whether a source's float32 Gram is trusted depends on its
        // diagonal block alone, and the cross blocks of a source recomputed in float64 would be
        // thrown away (on SmolLM2 180 of the 496 blocks: layers 12-26).
        let data = T::view_f32(st.data).expect("float32 Gram");
        let len = n * d;
        let view = |c: usize| {
            let s = plan.states[c];
            MatRef::from_column_major_slice(&data[s * len..(s + 1) * len], d, n)
        };
        gram.accumulate(&bar, view, true, |_| false);
        let started = Instant::now();
        let factors = factor_all(&gram, plan, st, &means, opts, is_f32, rows_f64, &bar)?;
        early_factor_s = started.elapsed().as_secs_f64();
        let recomputed: Vec<bool> = (0..plan.states.len())
            .map(|c| factors.iter().any(|f| plan.compact[f.l] == c && f.cross64.is_some()))
            .collect();
        restart(&bar, n_blocks, "fit: Gram blocks");
        gram.accumulate(&bar, view, false, |lc| !recomputed[lc]);
        early_factors = Some(factors);
    } else {
        let mut buf = vec![T::of(0.0); kd * b];
        let mut start = 0;
        while start < n {
            let end = (start + b).min(n);
            fill_chunk::<T>(st, &means, &plan.states, start..end, &mut buf);
            let zt = MatRef::from_column_major_slice(&buf[..kd * (end - start)], kd, end - start);
            gram.accumulate(&bar, |c| zt.subrows(c * d, d), true, |_| true);
            start = end;
        }
    }
    let gram_flops = gram.flops(d, n);
    let t_gram = t0.elapsed().as_secs_f64();

    let factors = match early_factors {
        Some(f) => f,
        None => factor_all(&gram, plan, st, &means, opts, is_f32, rows_f64, &bar)?,
    };
    let t_factor = t0.elapsed().as_secs_f64();

    // Products, one per pair; each cross block is freed as soon as its map is made, so the
    // Gram and the maps are never both whole in memory.
    let gram_blocks = gram.cross.len() + plan.sources.len();
    let factor_of: std::collections::HashMap<usize, usize> =
        factors.iter().enumerate().map(|(i, f)| (f.l, i)).collect();
    let Gram { diag, cross, cross_of } = gram;
    restart(&bar, cross.len(), "fit: maps");
    drop(diag);
    let mut results: Vec<PairMap> = cross
        .into_par_iter()
        .zip(cross_of.into_par_iter())
        .map_init(
            || (Mat::<f64>::zeros(d, d), vec![0f64; d * d]),
            |scratch, (block, (lc, tc))| -> Result<PairMap> {
                let (l, t) = (plan.states[lc], plan.states[tc]);
                let f = &factors[factor_of[&l]];
                let a = match &f.cross64 {
                    None => product(block.as_ref(), f.p.as_ref(), scratch),
                    Some(c64) => {
                        let j = f.targets.binary_search(&t).expect("target");
                        product(c64[j].as_ref(), f.p.as_ref(), scratch)
                    }
                };
                drop(block);
                bar.inc(1);
                pair_map(l, t, a, d, &means)
            },
        )
        .collect::<Result<_>>()?;
    results.sort_by_key(|p| (p.source, p.target));
    let maps_pairs = results;
    let t_end = t0.elapsed().as_secs_f64();
    let warnings = factors.iter().filter_map(|f| f.warning.clone()).collect();
    let layers = factors.into_iter().map(|f| f.diag).collect();
    bar.finish_and_clear();
    let report = FitReport {
        n_states: st.s,
        n,
        intercept: opts.intercept,
        ridge: opts.ridge,
        layers,
        warnings,
        stats: FitStats {
            precision,
            chunk_rows: b,
            gram_blocks,
            seconds_stats: t_stats,
            seconds_gram: t_gram - t_stats - early_factor_s,
            seconds_factor: t_factor - t_gram + early_factor_s,
            seconds_products: t_end - t_factor,
            seconds_total: t_end,
            model_flops: mflops,
            gram_flops,
        },
    };
    Ok((Maps::new(d, maps_pairs), report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_helpers() {
        assert_eq!(pairs_all(4).len(), 6);
        assert_eq!(pairs_to_final(4), vec![(0, 3), (1, 3), (2, 3)]);
        assert_eq!(pairs_to_final(1), vec![]);
    }

    use crate::lens::fit::{fit_all_pairs, pairs_all, pairs_to_final, synthetic_states};
    use candle_core::DType;

    fn max_rel_diff(a: &Maps, b: &Maps) -> f32 {
        let mut worst = 0f32;
        for p in &a.pairs {
            let x = p.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = b.get(p.source, p.target).unwrap();
            let y = q.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let m = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (u, v) in x.iter().zip(&y) {
                worst = worst.max((u - v).abs() / m);
            }
        }
        worst
    }

    /// Bound on the relative error of maps from a float32 Gram against float64 ones, for a
    /// (scaled, i.e. equilibrated) condition number `cond`. Each float32 Gram block carries a
    /// relative error `eps` of a few unit roundoffs `u = 2^-24`: one rounding of every entry
    /// plus the accumulation's, which faer's blocked GEMM keeps near `u` at these sizes; take
    /// `eps = 2u`. The diagonal block `G` and the cross block `C` both carry it, so the
    /// first-order perturbation bound of `A = C G^-1` is
    /// `|dA| / |A| <= cond (eps + eps) / (1 - cond eps)`.
    /// (Measured on these data: `w / (cond u)` between 0.14 and 0.55, under the bound's 4.)
    fn f32_gram_bound(cond: f64) -> f32 {
        let eps = 2.0 * f64::from(f32::EPSILON) / 2.0;
        assert!(cond * eps < 0.5, "cond {cond:.2e} too large for any float32 bound");
        (cond * 2.0 * eps / (1.0 - cond * eps)) as f32
    }

    #[test]
    fn float32_paths_agree_with_float64() {
        let h = synthetic_states(6, 400, 24, 5).unwrap();
        for pairs in [pairs_to_final(6), pairs_all(6)] {
            for intercept in [false, true] {
                let run = |precision| {
                    let opts = FitOptions {
                        intercept,
                        precision,
                        chunk_rows: 128,
                        ..FitOptions::default()
                    };
                    fit_all_pairs(&h, &pairs, &opts).unwrap()
                };
                let ((a, ra), (b, rb)) = (run(GramPrecision::F32), run(GramPrecision::F64));
                let w = max_rel_diff(&a, &b);
                let cond = rb.layers.iter().map(|l| l.cond).fold(0f64, f64::max);
                let tol = f32_gram_bound(cond);
                assert!(
                    w < tol,
                    "{} pairs, intercept {intercept}: {w} (cond {cond:.2e}, bound {tol:.2e})",
                    pairs.len()
                );
                // The bound says something: at most 1% (the old tolerance allowed 100% at
                // cond 1e6).
                assert!(tol < 1e-2, "bound {tol:.2e} at cond {cond:.2e}");
                assert!(ra.warnings.is_empty() && rb.warnings.is_empty());
            }
        }
    }

    #[test]
    fn ridge_solves_regularised_normal_equations() {
        // (X^T X + ridge I) A^T = X^T Y, checked in f64.
        let h = synthetic_states(2, 60, 10, 9).unwrap();
        let ridge = 5.0;
        let opts = FitOptions {
            ridge,
            ..FitOptions::default()
        };
        let (maps, _) = fit_all_pairs(&h, &[(0, 1)], &opts).unwrap();
        let a = maps.get(0, 1).unwrap().a.to_dtype(DType::F64).unwrap();
        let x = h.get(0).unwrap().to_dtype(DType::F64).unwrap();
        let y = h.get(1).unwrap().to_dtype(DType::F64).unwrap();
        let xtx = x.t().unwrap().matmul(&x).unwrap();
        let lhs = (xtx.matmul(&a.t().unwrap()).unwrap() + (a.t().unwrap() * ridge).unwrap()).unwrap();
        let rhs = x.t().unwrap().matmul(&y).unwrap();
        let err = (lhs - &rhs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let scale = rhs.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(err <= 1e-5 * scale, "{err} vs {scale}");
    }

    #[test]
    fn sparse_and_full_agree() {
        let h = synthetic_states(5, 300, 12, 3).unwrap();
        let pairs = pairs_to_final(5);
        let (sparse, _) = fit_all_pairs(&h, &pairs, &FitOptions::default()).unwrap();
        let (full, _) = fit_all_pairs(&h, &pairs_all(5), &FitOptions::default()).unwrap();
        for &(l, t) in &pairs {
            let a = sparse.get(l, t).unwrap().a.to_vec2::<f32>().unwrap();
            let b = full.get(l, t).unwrap().a.to_vec2::<f32>().unwrap();
            for (ra, rb) in a.iter().zip(&b) {
                for (x, y) in ra.iter().zip(rb) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }
}
