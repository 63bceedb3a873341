//! Validation r^2 of every fitted shortcut (`mat`) and of the identity (`id`), as in the paper's
//! heatmaps: scikit-learn `r2_score(y, y_hat)` with `multioutput='uniform_average'`.
//!
//! # Why it is built this way
//!
//! For each pair the score needs the predictions `A h_l` of every validation example. Computing
//! them pair by pair is ~0.9 TFLOP for 465 pairs of SmolLM2 size (3,000 x 576); the same flops
//! could be spent on validation sufficient statistics (the whole validation Gram plus
//! `A G A^T` per pair), but that costs *more* flops for all pairs and loses accuracy when r^2 is
//! close to 1 (the residual is a difference of large numbers). So the predictions are computed
//! directly, with GEMMs batched over up to 8 targets of one source layer, in chunks of
//! validation rows, and the squared residuals are summed in float64. Large problems use a
//! float32 GEMM (its rounding is far below the float32 storage of the maps), small ones float64.
//!
//! Per coordinate `c`: `r2_c = 1 - SSE_c / SST_c` with `SST_c` around the validation mean; as
//! scikit-learn (`force_finite=True`): `r2_c = 1` when `SSE_c == 0`, `0` when only `SST_c == 0`.
//! A column whose validation values are all equal has `SST_c = 0` exactly. The score is the
//! mean over coordinates (can be negative).

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use serde::Serialize;

use crate::host::{with_f32_slice, with_states, Elem, States};
use crate::lens::fit::GramPrecision;
use crate::lens::maps::Maps;

/// Below this many prediction flops, [`GramPrecision::Auto`] uses float64.
const AUTO_F64_FLOPS: f64 = 2e10;

/// Targets batched into one GEMM.
const TARGETS_PER_TASK: usize = 8;

/// Options of [`r2_all_pairs_with`].
#[derive(Clone, Debug, Default)]
pub struct R2Options {
    /// Precision of the prediction GEMMs (`Auto`: float64 for small problems).
    pub precision: GramPrecision,
    /// Validation rows per GEMM; 0 = 512.
    pub chunk_rows: usize,
}

/// r^2 of every fitted pair, `[S][S]` (row = source l, column = target l'), `None` where
/// l >= l' or the pair was not fitted.
#[derive(Clone, Debug, Serialize)]
pub struct R2Table {
    /// Number of states S.
    pub n_states: usize,
    /// r^2 of the fitted maps.
    pub mat: Vec<Vec<Option<f64>>>,
    /// r^2 of the identity (h_l used as h_l').
    pub id: Vec<Vec<Option<f64>>>,
    /// Wall-clock seconds of the call.
    pub seconds: f64,
    /// Flops of the prediction GEMMs.
    pub flops: f64,
}

/// Checks validation states [S, N, d] against the maps; returns (S, N, d).
fn checked_inputs(val: &Tensor, maps: &Maps) -> Result<(usize, usize, usize)> {
    let (s, nv, d) = val.dims3().context("r2: expected validation states [S, N, d]")?;
    ensure!(d == maps.d, "r2: validation width {d} != maps width {}", maps.d);
    ensure!(nv >= 2, "r2: needs at least 2 validation examples");
    for p in &maps.pairs {
        ensure!(
            p.target < s,
            "r2: pair ({}, {}) outside {s} validation states",
            p.source,
            p.target
        );
    }
    Ok((s, nv, d))
}

/// scikit-learn's per-coordinate rule (`force_finite=True`), averaged uniformly.
fn score(sse: &[f64], sst: &[f64]) -> f64 {
    let sum: f64 = sse
        .iter()
        .zip(sst)
        .map(|(&e, &t)| {
            if e == 0.0 {
                1.0
            } else if t == 0.0 {
                0.0
            } else {
                1.0 - e / t
            }
        })
        .sum();
    sum / sse.len() as f64
}

/// `r2_score(y, y_hat)` of scikit-learn (uniform average over columns) for two [n, d] tensors.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let y = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 7.0]], &Device::Cpu)?;
/// let r2 = jumplens::lens::r2::r2_score(&y, &y)?;
/// assert_eq!(r2, 1.0);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn r2_score(y: &Tensor, y_hat: &Tensor) -> Result<f64> {
    let (n, d) = y.dims2().context("r2_score: y must be [n, d]")?;
    ensure!(
        y_hat.dims2()? == (n, d),
        "r2_score: shapes differ: {:?} vs {:?}",
        y.dims(),
        y_hat.dims()
    );
    ensure!(n >= 2, "r2_score: needs at least 2 samples");
    let y = y.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
    let p = y_hat.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
    let mut sse = vec![0f64; d];
    let mut mean = vec![0f64; d];
    for (yr, pr) in y.iter().zip(&p) {
        for c in 0..d {
            sse[c] += (yr[c] - pr[c]).powi(2);
            mean[c] += yr[c];
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut sst = vec![0f64; d];
    for yr in &y {
        for c in 0..d {
            sst[c] += (yr[c] - mean[c]).powi(2);
        }
    }
    for (c, t) in sst.iter_mut().enumerate() {
        if y.iter().all(|r| r[c] == y[0][c]) {
            *t = 0.0;
        }
    }
    Ok(score(&sse, &sst))
}

/// r^2 on `val` [S, N, d] of every pair in `maps` and of the identity, with default options.
///
/// ```
/// use jumplens::lens::fit::{fit_all_pairs, pairs_all, synthetic_states, FitOptions};
/// let h = synthetic_states(3, 200, 8, 0)?;
/// let (train, val) = (h.narrow(1, 0, 150)?, h.narrow(1, 150, 50)?);
/// let (maps, _) = fit_all_pairs(&train, &pairs_all(3), &FitOptions::default())?;
/// let r2 = jumplens::lens::r2::r2_all_pairs(&val, &maps)?;
/// assert!(r2.mat[0][1].unwrap() > r2.id[0][1].unwrap());
/// assert!(r2.mat[1][0].is_none());
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn r2_all_pairs(val: &Tensor, maps: &Maps) -> Result<R2Table> {
    r2_all_pairs_with(val, maps, &R2Options::default())
}

/// [`r2_all_pairs`] with explicit options.
///
/// ```
/// use jumplens::lens::fit::{fit_all_pairs, synthetic_states, FitOptions, GramPrecision};
/// use jumplens::lens::r2::{r2_all_pairs_with, R2Options};
/// let h = synthetic_states(2, 300, 8, 2)?;
/// let (maps, _) = fit_all_pairs(&h, &[(0, 1)], &FitOptions::default())?;
/// let opts = R2Options { precision: GramPrecision::F32, ..R2Options::default() };
/// let r2 = r2_all_pairs_with(&h, &maps, &opts)?; // training-set r^2 here
/// assert!(r2.mat[0][1].unwrap() > r2.id[0][1].unwrap());
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn r2_all_pairs_with(val: &Tensor, maps: &Maps, opts: &R2Options) -> Result<R2Table> {
    if !val.device().is_cpu() {
        return r2_all_pairs_on_device(val, maps);
    }
    let t0 = Instant::now();
    let (s, nv, d) = checked_inputs(val, maps)?;
    let flops = 2.0 * (nv * d * d) as f64 * maps.pairs.len() as f64;
    let precision = match opts.precision {
        GramPrecision::Auto if flops < AUTO_F64_FLOPS => GramPrecision::F64,
        GramPrecision::Auto => GramPrecision::F32,
        p => p,
    };
    let rows = if opts.chunk_rows == 0 { 512 } else { opts.chunk_rows };
    let (sse_mat, sse_id, sst) = with_states(val, |st| {
        let (sse_mat, sse_id) = match precision {
            GramPrecision::F64 => sse_maps::<f64>(&st, maps, rows)?,
            _ => sse_maps::<f32>(&st, maps, rows)?,
        };
        let mut targets: Vec<usize> = maps.pairs.iter().map(|p| p.target).collect();
        targets.sort_unstable();
        targets.dedup();
        let mut sst: Vec<Vec<f64>> = vec![Vec::new(); s];
        let per: Vec<(usize, Vec<f64>)> = targets.par_iter().map(|&t| (t, sst_of(&st, t))).collect();
        for (t, v) in per {
            sst[t] = v;
        }
        Ok((sse_mat, sse_id, sst))
    })?;
    let mut mat = vec![vec![None; s]; s];
    let mut id = vec![vec![None; s]; s];
    for (k, p) in maps.pairs.iter().enumerate() {
        mat[p.source][p.target] = Some(score(&sse_mat[k], &sst[p.target]));
        id[p.source][p.target] = Some(score(&sse_id[k], &sst[p.target]));
    }
    Ok(R2Table {
        n_states: s,
        mat,
        id,
        seconds: t0.elapsed().as_secs_f64(),
        flops,
    })
}

/// Sum of squares around the mean, per coordinate (0 for constant columns).
fn sst_of(st: &States<'_>, t: usize) -> Vec<f64> {
    let (n, d) = (st.n, st.d);
    let mut mean = vec![0f64; d];
    for i in 0..n {
        for (m, &y) in mean.iter_mut().zip(st.row(t, i)) {
            *m += y as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut sst = vec![0f64; d];
    let mut constant = vec![true; d];
    let first = st.row(t, 0);
    for i in 0..n {
        let row = st.row(t, i);
        for c in 0..d {
            let v = row[c] as f64 - mean[c];
            sst[c] += v * v;
            constant[c] &= row[c] == first[c];
        }
    }
    for (v, &k) in sst.iter_mut().zip(&constant) {
        if k {
            *v = 0.0;
        }
    }
    sst
}

/// Per-coordinate sums of squared errors.
type Sse = Vec<Vec<f64>>;

/// Per pair of `maps` (same order), the per-coordinate SSE of `A x + b` and of `x` (identity).
fn sse_maps<T: Elem>(st: &States<'_>, maps: &Maps, rows: usize) -> Result<(Sse, Sse)> {
    let d = st.d;
    // Tasks: up to TARGETS_PER_TASK consecutive pairs of one source.
    let mut tasks: Vec<Vec<usize>> = Vec::new();
    for (k, p) in maps.pairs.iter().enumerate() {
        match tasks.last_mut() {
            Some(t) if maps.pairs[t[0]].source == p.source && t.len() < TARGETS_PER_TASK => t.push(k),
            _ => tasks.push(vec![k]),
        }
    }
    let out: Vec<(Sse, Sse)> = tasks
        .par_iter()
        .map(|task| -> Result<(Sse, Sse)> {
            let g = task.len();
            let l = maps.pairs[task[0]].source;
            let mut a = vec![T::of(0.0); g * d * d];
            let mut bias = vec![0f64; g * d];
            for (j, &k) in task.iter().enumerate() {
                let p = &maps.pairs[k];
                ensure!(
                    p.a.dims2()? == (d, d),
                    "r2: map ({}, {}) is not [{d}, {d}]",
                    p.source,
                    p.target
                );
                with_f32_slice(&p.a, |s| {
                    for (o, &x) in a[j * d * d..(j + 1) * d * d].iter_mut().zip(s) {
                        *o = T::of(x as f64);
                    }
                    Ok(())
                })?;
                if let Some(b) = &p.intercept {
                    with_f32_slice(b, |s| {
                        for (o, &x) in bias[j * d..(j + 1) * d].iter_mut().zip(s) {
                            *o = x as f64;
                        }
                        Ok(())
                    })?;
                }
            }
            let a_ref = MatRef::from_row_major_slice(&a, g * d, d);
            let mut sse = vec![vec![0f64; d]; g];
            let mut sse_id = vec![vec![0f64; d]; g];
            let b = rows.clamp(1, st.n);
            let mut xbuf = vec![T::of(0.0); d * b];
            let mut pt = vec![T::of(0.0); g * d * b];
            let mut start = 0;
            while start < st.n {
                let end = (start + b).min(st.n);
                let r = end - start;
                for (i, col) in xbuf.chunks_mut(d).take(r).enumerate() {
                    for (o, &x) in col.iter_mut().zip(st.row(l, start + i)) {
                        *o = T::of(x as f64);
                    }
                }
                // PT [g d, r] = A_stack [g d, d] x X^T [d, r] (column i = example i).
                matmul(
                    MatMut::from_column_major_slice_mut(&mut pt[..g * d * r], g * d, r),
                    Accum::Replace,
                    a_ref,
                    MatRef::from_column_major_slice(&xbuf[..d * r], d, r),
                    T::of(1.0),
                    Par::Seq,
                );
                for i in 0..r {
                    let col = &pt[i * g * d..(i + 1) * g * d];
                    let x = st.row(l, start + i);
                    for (j, &k) in task.iter().enumerate() {
                        let y = st.row(maps.pairs[k].target, start + i);
                        let pred = &col[j * d..(j + 1) * d];
                        let bj = &bias[j * d..(j + 1) * d];
                        for (((e, &yv), &pv), &bv) in sse[j].iter_mut().zip(y).zip(pred).zip(bj) {
                            let v = yv as f64 - pv.f64() - bv;
                            *e += v * v;
                        }
                        for ((e, &yv), &xv) in sse_id[j].iter_mut().zip(y).zip(x) {
                            let v = yv as f64 - xv as f64;
                            *e += v * v;
                        }
                    }
                }
                start = end;
            }
            Ok((sse, sse_id))
        })
        .collect::<Result<_>>()?;
    let (mut mat, mut id) = (Vec::new(), Vec::new());
    for (m, i) in out {
        mat.extend(m);
        id.extend(i);
    }
    Ok((mat, id))
}

/// [`r2_all_pairs`] on the validation states' own device (a GPU): predictions, residuals and
/// their column sums in float64 there; only the per-coordinate sums come to the host. Runs on
/// any candle device (the tests compare it with the CPU path on the CPU device).
pub fn r2_all_pairs_on_device(val: &Tensor, maps: &Maps) -> Result<R2Table> {
    let t0 = Instant::now();
    let dev = val.device().clone();
    let (s, nv, d) = checked_inputs(val, maps)?;
    let to_host = |t: Tensor| -> Result<Vec<f64>> { Ok(t.to_device(&candle_core::Device::Cpu)?.to_vec1::<f64>()?) };
    let state = |i: usize| -> Result<Tensor> { Ok(val.get(i)?.to_dtype(candle_core::DType::F64)?) };
    let mut sst: Vec<Option<Vec<f64>>> = vec![None; s];
    let mut mat = vec![vec![None; s]; s];
    let mut id = vec![vec![None; s]; s];
    let mut cached: Option<(usize, Tensor)> = None;
    for p in &maps.pairs {
        let x = match &cached {
            Some((l, x)) if *l == p.source => x.clone(),
            _ => {
                let x = state(p.source)?;
                cached = Some((p.source, x.clone()));
                x
            }
        };
        let y = state(p.target)?;
        if sst[p.target].is_none() {
            let mean = y.mean_keepdim(0)?;
            let mut v = to_host(y.broadcast_sub(&mean)?.sqr()?.sum(0)?)?;
            // A column whose values are all equal has SST = 0 exactly (scikit-learn's rule).
            let spread = to_host((y.max(0)? - y.min(0)?)?)?;
            for (t, sp) in v.iter_mut().zip(spread) {
                if sp == 0.0 {
                    *t = 0.0;
                }
            }
            sst[p.target] = Some(v);
        }
        let a = p.a.to_device(&dev)?.to_dtype(candle_core::DType::F64)?;
        let mut pred = x.matmul(&a.t()?)?;
        if let Some(b) = &p.intercept {
            pred = pred.broadcast_add(&b.to_device(&dev)?.to_dtype(candle_core::DType::F64)?)?;
        }
        let sse_mat = to_host((&y - pred)?.sqr()?.sum(0)?)?;
        let sse_id = to_host((&y - &x)?.sqr()?.sum(0)?)?;
        let sst_t = sst[p.target].as_ref().expect("sst");
        mat[p.source][p.target] = Some(score(&sse_mat, sst_t));
        id[p.source][p.target] = Some(score(&sse_id, sst_t));
    }
    Ok(R2Table {
        n_states: s,
        mat,
        id,
        seconds: t0.elapsed().as_secs_f64(),
        flops: 2.0 * (nv * d * d) as f64 * maps.pairs.len() as f64,
    })
}
