//! The factorisation of one source layer, shared by the CPU and device paths: column
//! equilibration by powers of two, Cholesky and explicit inverse in float64, condition
//! estimates, scikit-learn's minimum-norm cutoff ([`SKLEARN_RCOND`]) via the eigendecomposition,
//! the ridge penalty, and the per-layer outcome (diagnostics and warning). See the numerics
//! section of [`crate::lens::fit`] for why.
//!
//! [`solve_block_tensor`] is the same decision made where the block lives (a GPU: the fit from
//! statistics), with the factorisations as tensor operations (cuSOLVER's, [`super::device_linalg`]).

use anyhow::Result;
use candle_core::{DType, Tensor};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par, Side};

use crate::host::Elem;
use crate::lens::fit::{LayerDiag, SKLEARN_RCOND};

/// Estimated condition number of the unscaled Gram above which the exact spectrum is computed
/// to apply scikit-learn's cutoff (`SKLEARN_RCOND^2 = 1e-12` on the Gram's eigenvalues; the
/// estimate is a lower bound, hence the margin of 10).
const NEAR_CUTOFF_COND: f64 = 1e11;

pub(crate) enum Method {
    Cholesky,
    PseudoInverse,
}

pub(crate) struct Solved<P = Mat<f64>> {
    /// Inverse (or pseudo-inverse) of the *scaled* Gram block, symmetric [d, d] (`()` where
    /// [`solve_block_tensor`] returns the unscaled one apart).
    p: P,
    rank: usize,
    cond: f64,
    cond_unscaled: f64,
    method: Method,
    note: Option<String>,
}

enum Analysis {
    Solved(Solved),
    NeedF64(String),
}

/// Symmetric f64 copy of a lower-triangular block.
pub(crate) fn sym_f64<T: Elem>(lower: MatRef<'_, T>) -> Mat<f64> {
    let d = lower.nrows();
    let mut g = Mat::<f64>::zeros(d, d);
    for j in 0..d {
        for i in j..d {
            let v = lower[(i, j)].f64();
            g[(i, j)] = v;
            g[(j, i)] = v;
        }
    }
    g
}

/// Largest eigenvalue of a symmetric PSD matrix by power iteration: a lower bound, within a
/// few percent after the (at most 20) iterations for the condition estimates it serves, whose
/// thresholds have margins of 10 and more.
fn lambda_max(m: MatRef<'_, f64>) -> f64 {
    let d = m.nrows();
    let mut v = Mat::<f64>::from_fn(d, 1, |i, _| power_start(i));
    let nv = v.norm_l2();
    v.col_mut(0).iter_mut().for_each(|x| *x /= nv);
    let mut w = Mat::<f64>::zeros(d, 1);
    let mut lam = 0f64;
    for it in 0..20 {
        matmul(w.as_mut(), Accum::Replace, m, v.as_ref(), 1.0, Par::Seq);
        let rq: f64 = (0..d).map(|i| w[(i, 0)] * v[(i, 0)]).sum();
        let nw = w.norm_l2();
        if nw == 0.0 || !nw.is_finite() {
            return if nw.is_finite() { 0.0 } else { f64::INFINITY };
        }
        let done = it >= 3 && (rq - lam).abs() <= 1e-3 * rq.abs();
        lam = rq;
        if done {
            break;
        }
        for i in 0..d {
            v[(i, 0)] = w[(i, 0)] / nw;
        }
    }
    let maxdiag = (0..d).map(|i| m[(i, i)]).fold(0f64, f64::max);
    lam.max(maxdiag)
}

/// Entry `i` of the power iterations' start vector (before normalisation): deterministic, and
/// with no zero component.
fn power_start(i: usize) -> f64 {
    1.0 + 0.5 * ((i as f64) * 0.618_033_988_7).fract()
}

/// The bound `kappa(S G S) <= kappa(G) (max s / min s)^2` on the unscaled condition from the
/// scaled one, `cond`, and the column scales.
fn unscaled_cond_bound(cond: f64, scale: &[f64]) -> f64 {
    let smax = scale.iter().fold(0f64, |a, &b| a.max(b));
    let smin = scale.iter().fold(f64::INFINITY, |a, &b| a.min(b));
    cond * (smax / smin).powi(2)
}

/// scikit-learn's cutoff on a Gram's eigenvalues `lam` (any order): the indices of those kept
/// (above `SKLEARN_RCOND^2` times the largest) and the exact condition number (infinite when
/// any is dropped).
pub(crate) fn sklearn_kept(lam: &[f64]) -> (Vec<usize>, f64) {
    let lmax = lam.iter().fold(0f64, |a, &b| a.max(b));
    let cut = SKLEARN_RCOND * SKLEARN_RCOND * lmax;
    let keep: Vec<usize> = (0..lam.len()).filter(|&i| lam[i] > cut).collect();
    let lmin = keep.iter().map(|&i| lam[i]).fold(f64::INFINITY, f64::min);
    let cond = if keep.len() == lam.len() {
        lmax / lmin
    } else {
        f64::INFINITY
    };
    (keep, cond)
}

/// Inverse of a symmetric positive definite matrix via Cholesky (None if not PD).
pub(crate) fn chol_inverse(g: MatRef<'_, f64>) -> Option<Mat<f64>> {
    use faer::linalg::cholesky::llt;
    let d = g.nrows();
    let mut l = g.to_owned();
    let par = Par::Seq;
    let mut mem = MemBuffer::new(
        llt::factor::cholesky_in_place_scratch::<f64>(d, par, Default::default())
            .or(llt::inverse::inverse_scratch::<f64>(d, par)),
    );
    let stack = MemStack::new(&mut mem);
    llt::factor::cholesky_in_place(l.as_mut(), Default::default(), par, stack, Default::default()).ok()?;
    if (0..d).any(|i| l[(i, i)].is_nan() || l[(i, i)] <= 0.0 || !l[(i, i)].is_finite()) {
        return None;
    }
    let mut p = Mat::<f64>::zeros(d, d);
    llt::inverse::inverse(p.as_mut(), l.as_ref(), par, stack);
    // `inverse` fills the lower triangle; mirror it.
    for j in 0..d {
        for i in j + 1..d {
            p[(j, i)] = p[(i, j)];
        }
    }
    if (0..d).any(|i| !p[(i, i)].is_finite()) {
        return None;
    }
    Some(p)
}

/// S g S for a diagonal S.
fn scale_sym(g: MatRef<'_, f64>, s: &[f64]) -> Mat<f64> {
    Mat::from_fn(g.nrows(), g.ncols(), |i, j| g[(i, j)] * s[i] * s[j])
}

/// Eigendecomposition-based pseudo-inverse of the unscaled Gram `gu` with scikit-learn's
/// cutoff; returns (P in scaled coordinates, rank, exact condition of gu).
fn pinv_scaled(gu: MatRef<'_, f64>, scale: &[f64]) -> Result<(Mat<f64>, usize, f64)> {
    let d = gu.nrows();
    let evd = gu
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| anyhow::anyhow!("eigendecomposition failed: {e:?}"))?;
    let lam: Vec<f64> = evd.S().column_vector().iter().copied().collect();
    let u = evd.U();
    let (keep, cond) = sklearn_kept(&lam);
    let r = keep.len();
    // W = S U_k diag(1/sqrt(lambda)): P_scaled = S U_k L^-1 U_k^T S = W W^T.
    let mut w = Mat::<f64>::zeros(d, r);
    for (c, &i) in keep.iter().enumerate() {
        let f = 1.0 / lam[i].sqrt();
        for row in 0..d {
            w[(row, c)] = u[(row, i)] * f * scale[row];
        }
    }
    let mut p = Mat::<f64>::zeros(d, d);
    matmul(
        p.as_mut(),
        Accum::Replace,
        w.as_ref(),
        w.as_ref().transpose(),
        1.0,
        Par::Seq,
    );
    Ok((p, r, cond))
}

/// Decides how to solve one source layer from its scaled Gram block `gs` (symmetric, f64).
/// `trust` is the largest scaled condition accepted (Some for a float32 Gram).
fn analyse(gs: &Mat<f64>, scale: &[f64], inv: &[f64], ridge: f64, trust: Option<f64>) -> Result<Analysis> {
    let d = gs.nrows();
    let mut g = gs.clone();
    if ridge > 0.0 {
        for i in 0..d {
            g[(i, i)] += ridge * inv[i] * inv[i];
        }
    }
    let lam_g = lambda_max(g.as_ref());
    let unscaled = || scale_sym(g.as_ref(), scale);
    match chol_inverse(g.as_ref()) {
        Some(p) => {
            let cond = lam_g * lambda_max(p.as_ref());
            if let Some(lim) = trust {
                if cond.is_nan() || cond > lim {
                    return Ok(Analysis::NeedF64(format!(
                        "condition number {cond:.1e} too large for a float32 Gram"
                    )));
                }
            }
            // Skip the estimate of the unscaled condition when its bound is small.
            let bound = unscaled_cond_bound(cond, scale);
            let cond_u = if ridge > 0.0 || bound <= NEAR_CUTOFF_COND {
                bound
            } else {
                let gu = unscaled();
                let pu = scale_sym(p.as_ref(), inv);
                lambda_max(gu.as_ref()) * lambda_max(pu.as_ref())
            };
            if ridge > 0.0 || cond_u <= NEAR_CUTOFF_COND {
                return Ok(Analysis::Solved(Solved {
                    p,
                    rank: d,
                    cond,
                    cond_unscaled: cond_u,
                    method: Method::Cholesky,
                    note: None,
                }));
            }
            let (pp, r, cond_exact) = pinv_scaled(unscaled().as_ref(), scale)?;
            if r == d {
                Ok(Analysis::Solved(Solved {
                    p,
                    rank: d,
                    cond,
                    cond_unscaled: cond_exact,
                    method: Method::Cholesky,
                    note: None,
                }))
            } else {
                Ok(Analysis::Solved(Solved {
                    p: pp,
                    rank: r,
                    cond,
                    cond_unscaled: cond_exact,
                    method: Method::PseudoInverse,
                    note: None,
                }))
            }
        }
        None => {
            if trust.is_some() {
                return Ok(Analysis::NeedF64("Cholesky of the float32 Gram failed".to_string()));
            }
            let gu = unscaled();
            let (pp, r, cond_exact) = pinv_scaled(gu.as_ref(), scale)?;
            let note = (r == d)
                .then(|| "Cholesky failed on a numerically full-rank Gram; using the eigendecomposition".to_string());
            Ok(Analysis::Solved(Solved {
                p: pp,
                rank: r,
                cond: f64::INFINITY,
                cond_unscaled: cond_exact,
                method: Method::PseudoInverse,
                note,
            }))
        }
    }
}

/// Power-of-two column scales from the diagonal of an (uncentred or centred) Gram block: the
/// column equilibration. Scaling by powers of two commutes exactly with floating-point
/// rounding, so applying it to the finished Gram equals scaling the data before the GEMM.
fn scales_from_diag(g: &Mat<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    scales_from_diagonal(&(0..g.nrows()).map(|i| g[(i, i)]).collect::<Vec<_>>(), n)
}

/// [`scales_from_diag`] from the diagonal's values.
fn scales_from_diagonal(diag: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let scale: Vec<f64> = diag
        .iter()
        .map(|&x| pow2_near((x.max(0.0) / n as f64).sqrt()))
        .collect();
    let inv = scale.iter().map(|s| 1.0 / s).collect();
    (scale, inv)
}

pub(crate) fn pow2_near(rms: f64) -> f64 {
    if rms > 0.0 && rms.is_finite() {
        let e = rms.log2().round().clamp(-60.0, 60.0);
        2f64.powi(e as i32)
    } else {
        1.0
    }
}

/// A faer matrix as a row-major float64 tensor on `device`: how a solved (pseudo-)inverse
/// reaches the device its products run on.
pub(crate) fn mat_tensor(m: &Mat<f64>, device: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
    let (r, c) = (m.nrows(), m.ncols());
    // faer stores columns; the rows of `m` are the columns of its transpose, which faer copies
    // in cache-sized blocks (an element-by-element gather along rows took ~0.3 s per 4096^2
    // inverse, 12 s of an 8B-shaped fit's 32).
    let t = m.transpose().to_owned();
    let mut data = Vec::with_capacity(r * c);
    for i in 0..r {
        data.extend_from_slice(t.col_as_slice(i));
    }
    candle_core::Tensor::from_vec(data, (r, c), device)
}

/// Scaled copy of a symmetric block, solved; returns the unscaled (pseudo-)inverse.
pub(crate) fn solve_block(
    g: &Mat<f64>,
    n: usize,
    ridge: f64,
    trust: Option<f64>,
) -> Result<Result<(Solved, Mat<f64>), String>> {
    let (scale, inv) = scales_from_diag(g, n);
    let gs = scale_sym(g.as_ref(), &inv);
    Ok(match analyse(&gs, &scale, &inv, ridge, trust)? {
        Analysis::Solved(s) => {
            let p = scale_sym(s.p.as_ref(), &inv);
            Ok((s, p))
        }
        Analysis::NeedF64(why) => Err(why),
    })
}

/// The diagonal of a square matrix tensor, on the host.
fn diagonal(m: &Tensor) -> Result<Vec<f64>> {
    let d = m.dim(0)?;
    let at = Tensor::arange_step(0u32, (d * d) as u32, (d + 1) as u32, m.device())?;
    Ok(m.flatten_all()?
        .index_select(&at, 0)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?)
}

/// [`lambda_max`] of a tensor where it lives: the same start vector, iterations and stopping
/// rule; `diag` is the matrix's diagonal.
fn lambda_max_tensor(m: &Tensor, diag: &[f64]) -> Result<f64> {
    let d = m.dim(0)?;
    let v: Vec<f64> = (0..d).map(power_start).collect();
    let nv = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut v = Tensor::from_vec(v.iter().map(|x| x / nv).collect::<Vec<_>>(), (d, 1), m.device())?;
    let mut lam = 0f64;
    for it in 0..20 {
        let w = m.matmul(&v)?;
        // One copy to the host per iteration: the Rayleigh quotient and |w|^2 together.
        let both = Tensor::stack(&[(&w * &v)?.sum_all()?, w.sqr()?.sum_all()?], 0)?.to_vec1::<f64>()?;
        let (rq, nw) = (both[0], both[1].sqrt());
        if nw == 0.0 || !nw.is_finite() {
            return Ok(if nw.is_finite() { 0.0 } else { f64::INFINITY });
        }
        let done = it >= 3 && (rq - lam).abs() <= 1e-3 * rq.abs();
        lam = rq;
        if done {
            break;
        }
        v = (w / nw)?;
    }
    Ok(lam.max(diag.iter().fold(0f64, |a, &b| a.max(b))))
}

/// [`chol_inverse`] of a tensor where it lives: cuSOLVER on a GPU, faer on the CPU (where the
/// tests run this path).
fn chol_inverse_tensor(m: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if m.device().is_cuda() {
        return super::device_linalg::sym_inverse_cholesky(m);
    }
    let d = m.dim(0)?;
    let v = m.flatten_all()?.to_vec1::<f64>()?;
    let g = MatRef::from_row_major_slice(&v, d, d).to_owned();
    Ok(chol_inverse(g.as_ref())
        .map(|p| mat_tensor(&p, m.device()))
        .transpose()?)
}

/// [`pinv_scaled`] of a tensor where it lives: the eigendecomposition by cuSOLVER on a GPU, by
/// faer on the CPU; returns (P in scaled coordinates, rank, exact condition of `gu`).
fn pinv_scaled_tensor(gu: &Tensor, scale: &[f64]) -> Result<(Tensor, usize, f64)> {
    let d = scale.len();
    let dev = gu.device();
    // Eigenvalues [d] and eigenvectors as rows [d, d], in any order.
    let (lam, u) = sym_eigen_tensor(gu)?;
    let lam = lam.to_vec1::<f64>()?;
    let (keep, cond) = sklearn_kept(&lam);
    let r = keep.len();
    if r == 0 {
        return Ok((Tensor::zeros((d, d), DType::F64, dev)?, 0, cond));
    }
    // W^T = diag(1/sqrt(lambda_k)) U_k^T S: P_scaled = W W^T, as on the host.
    let f: Vec<f64> = keep.iter().map(|&i| 1.0 / lam[i].sqrt()).collect();
    let ids: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
    let wt = u
        .index_select(&Tensor::from_vec(ids, r, dev)?, 0)?
        .broadcast_mul(&Tensor::from_vec(f, (r, 1), dev)?)?
        .broadcast_mul(&Tensor::from_slice(scale, (1, d), dev)?)?;
    Ok((wt.t()?.matmul(&wt)?, r, cond))
}

/// Eigenvalues and eigenvectors (as rows) of a symmetric f64 tensor where it lives.
fn sym_eigen_tensor(m: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if m.device().is_cuda() {
        return super::device_linalg::sym_eigen(m);
    }
    let d = m.dim(0)?;
    let v = m.flatten_all()?.to_vec1::<f64>()?;
    let evd = MatRef::from_row_major_slice(&v, d, d)
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| anyhow::anyhow!("eigendecomposition failed: {e:?}"))?;
    let lam = evd.S().column_vector();
    let lam = Tensor::from_vec((0..d).map(|i| lam[i]).collect::<Vec<_>>(), d, m.device())?;
    Ok((lam, mat_tensor(&evd.U().transpose().to_owned(), m.device())?))
}

/// [`solve_block`] of a float64 Gram (no float32 trust limit) where the symmetric block `g`
/// [d, d] lives, with `diag` its diagonal: the same equilibration, ridge, power iterations,
/// thresholds and minimum-norm cutoff, with the Cholesky inverse and the eigendecomposition on
/// the block's device (cuSOLVER on a GPU). Returns the layer's outcome and its unscaled
/// (pseudo-)inverse there.
fn solve_block_tensor(g: &Tensor, diag: &[f64], n: usize, ridge: f64) -> Result<(Solved<()>, Tensor)> {
    let d = diag.len();
    let dev = g.device();
    let (scale, inv) = scales_from_diagonal(diag, n);
    let col = |v: &[f64]| Tensor::from_slice(v, (d, 1), dev);
    let row = |v: &[f64]| Tensor::from_slice(v, (1, d), dev);
    let sym_scaled = |m: &Tensor, by: &[f64]| -> Result<Tensor> {
        // Powers of two: exact, as [`scale_sym`].
        Ok(m.broadcast_mul(&col(by)?)?.broadcast_mul(&row(by)?)?)
    };
    let mut gs = sym_scaled(g, &inv)?;
    let mut gs_diag: Vec<f64> = diag.iter().zip(&inv).map(|(x, i)| x * i * i).collect();
    if ridge > 0.0 {
        let add: Vec<f64> = inv.iter().map(|i| ridge * i * i).collect();
        gs = (gs + Tensor::eye(d, DType::F64, dev)?.broadcast_mul(&row(&add)?)?)?;
        gs_diag.iter_mut().zip(&add).for_each(|(x, a)| *x += a);
    }
    let gu_diag: Vec<f64> = gs_diag.iter().zip(&scale).map(|(x, s)| x * s * s).collect();
    let unscaled = || sym_scaled(&gs, &scale);
    let mut trace = SolveTrace::new(dev);
    trace.mark("scale")?;
    let lam_g = lambda_max_tensor(&gs, &gs_diag)?;
    trace.mark("lambda_max(G)")?;
    let solved = |p, rank, cond, cond_unscaled, method, note| Solved {
        p,
        rank,
        cond,
        cond_unscaled,
        method,
        note,
    };
    let chol = match chol_inverse_tensor(&gs)? {
        Some(p) => {
            trace.mark("cholesky op")?;
            let p_diag = diagonal(&p)?;
            p_diag.iter().all(|x| x.is_finite()).then_some((p, p_diag))
        }
        None => None,
    };
    trace.mark("cholesky inverse")?;
    let (outcome, p_scaled) = match chol {
        Some((p, p_diag)) => {
            let cond = lam_g * lambda_max_tensor(&p, &p_diag)?;
            trace.mark("lambda_max(P)")?;
            // Skip the estimate of the unscaled condition when its bound is small.
            let bound = unscaled_cond_bound(cond, &scale);
            let cond_u = if ridge > 0.0 || bound <= NEAR_CUTOFF_COND {
                bound
            } else {
                let pu_diag: Vec<f64> = p_diag.iter().zip(&inv).map(|(x, i)| x * i * i).collect();
                lambda_max_tensor(&unscaled()?, &gu_diag)? * lambda_max_tensor(&sym_scaled(&p, &inv)?, &pu_diag)?
            };
            if ridge > 0.0 || cond_u <= NEAR_CUTOFF_COND {
                (solved((), d, cond, cond_u, Method::Cholesky, None), p)
            } else {
                let (pp, r, cond_exact) = pinv_scaled_tensor(&unscaled()?, &scale)?;
                if r == d {
                    (solved((), d, cond, cond_exact, Method::Cholesky, None), p)
                } else {
                    (solved((), r, cond, cond_exact, Method::PseudoInverse, None), pp)
                }
            }
        }
        None => {
            let (pp, r, cond_exact) = pinv_scaled_tensor(&unscaled()?, &scale)?;
            let note = (r == d)
                .then(|| "Cholesky failed on a numerically full-rank Gram; using the eigendecomposition".to_string());
            (
                solved((), r, f64::INFINITY, cond_exact, Method::PseudoInverse, note),
                pp,
            )
        }
    };
    let p = sym_scaled(&p_scaled, &inv)?;
    trace.mark("rest")?;
    trace.finish(d);
    Ok((outcome, p))
}

/// Wall time of each step of [`solve_block_tensor`] (the device synchronised at each mark),
/// printed to stderr when `JUMPLENS_SOLVE_TRACE` is set: where a GPU fit's factor phase goes.
struct SolveTrace<'a> {
    dev: Option<&'a candle_core::Device>,
    last: std::time::Instant,
    steps: Vec<(&'static str, f64)>,
}

impl<'a> SolveTrace<'a> {
    fn new(dev: &'a candle_core::Device) -> Self {
        let on = std::env::var_os("JUMPLENS_SOLVE_TRACE").is_some();
        SolveTrace {
            dev: on.then_some(dev),
            last: std::time::Instant::now(),
            steps: Vec::new(),
        }
    }
    fn mark(&mut self, step: &'static str) -> Result<()> {
        if let Some(dev) = self.dev {
            dev.synchronize()?;
            self.steps.push((step, self.last.elapsed().as_secs_f64() * 1e3));
            self.last = std::time::Instant::now();
        }
        Ok(())
    }
    fn finish(&self, d: usize) {
        if self.dev.is_some() {
            let steps: Vec<String> = self.steps.iter().map(|(s, ms)| format!("{s} {ms:.1} ms")).collect();
            eprintln!("solve d={d}: {}", steps.join(", "));
        }
    }
}

/// Source layer `l`'s float64 Gram block `g` solved where it is ([`solve_block_tensor`]), with
/// its diagnostics and warning; `non_finite` is the error when its diagonal is not finite.
pub(crate) fn solve_source_tensor(
    l: usize,
    g: &Tensor,
    n: usize,
    ridge: f64,
    non_finite: impl FnOnce() -> String,
) -> Result<(Tensor, LayerDiag, Option<String>)> {
    let diag = diagonal(g)?;
    anyhow::ensure!(diag.iter().all(|x| x.is_finite()), non_finite());
    let (solved, p) = solve_block_tensor(g, &diag, n, ridge)?;
    let (layer, warning) = layer_outcome(l, diag.len(), &solved, None);
    Ok((p, layer, warning))
}

/// Diagnostics and warning of one solved source layer (`reason`: why float32 was not trusted).
pub(crate) fn layer_outcome<P>(
    l: usize,
    d: usize,
    solved: &Solved<P>,
    reason: Option<&str>,
) -> (LayerDiag, Option<String>) {
    let mut msgs = Vec::new();
    if let Some(why) = reason {
        msgs.push(format!("{why}; recomputed this layer in float64"));
    }
    if solved.rank < d {
        msgs.push(format!(
            "Gram matrix is singular (rank {} of {d}); using the minimum-norm solution",
            solved.rank
        ));
    }
    if let Some(n) = &solved.note {
        msgs.push(n.clone());
    }
    let warning = (!msgs.is_empty()).then(|| format!("layer {l}: {}", msgs.join("; ")));
    let diag = LayerDiag {
        layer: l,
        rank: solved.rank,
        cond: solved.cond,
        cond_unscaled: solved.cond_unscaled,
        pseudo_inverse: matches!(solved.method, Method::PseudoInverse),
        recomputed_f64: reason.is_some(),
    };
    (diag, warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mat_tensor_is_row_major() {
        let m = Mat::from_fn(3, 5, |i, j| (10 * i + j) as f64);
        let t = mat_tensor(&m, &candle_core::Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 5]);
        let v: Vec<Vec<f64>> = t.to_vec2().unwrap();
        for (i, row) in v.iter().enumerate() {
            for (j, &x) in row.iter().enumerate() {
                assert_eq!(x, (10 * i + j) as f64);
            }
        }
    }

    #[test]
    fn pow2() {
        assert_eq!(pow2_near(1000.0), 1024.0);
        assert_eq!(pow2_near(0.0), 1.0);
        assert_eq!(pow2_near(f64::NAN), 1.0);
    }
}
