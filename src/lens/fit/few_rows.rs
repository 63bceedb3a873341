//! The least-norm least-squares map from fewer examples than input coordinates (`n < d`), through
//! the examples' Gram `K = X X^T` ([n, n]) instead of the coordinates' `X^T X` ([d, d]).
//!
//! With `n < d` the coordinates' Gram is singular, so the fit from activations
//! ([`super::fit_all_pairs`]) always ends in its minimum-norm fallback: an eigendecomposition of
//! a `d x d` matrix on the host. The sub-module maps of an 8B-shaped model (128 maps of
//! d = 4096 from the 3,000 training examples) spent minutes there. The same solution is
//! `A = Y^T K^+ X`: with `X = U S V^T`, `K^+ = U S^-2 U^T` over the kept singular values, and
//! `X^T K^+ = V S^-1 U^T = X^+`, with scikit-learn's cutoff on the same eigenvalues (`K` and
//! `X^T X` share their non-zero ones). `K` and the products are float64 GEMMs on the inputs'
//! device. On the CPU the `n x n` factorisations ([`super::solve::solve_block`]: equilibration,
//! Cholesky, the cutoff) run several at once. On a CUDA device the host factorisations were the
//! sub-module stage's bottleneck (142 s of 224 s for the 8B shape's 128 maps, most of it the
//! eigendecompositions scikit-learn's cutoff needs), so there `K`'s spectrum comes from cuSOLVER
//! ([`super::device_linalg`]) and the map is `A = (Y^T W)(W^T X)` with `W = U_k L_k^-1/2` over the
//! eigenvalues above the cutoff: the same least-norm solution, with nothing but `n` eigenvalues
//! crossing to the host.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use faer::Mat;
use rayon::prelude::*;

use crate::lens::fit::solve::solve_block;

/// For each `(X [n, d_in], Y [n, d_out])` (any float dtype, on one device each), the map
/// `A` [d_out, d_in] (f32, on that device) of least norm minimising `||X A^T - Y||`, the
/// solution `LinearRegression(fit_intercept=False)` gives. Meant for `n < d_in`; valid for any n.
pub fn min_norm_maps(pairs: &[(Tensor, Tensor)]) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if pairs.iter().all(|(x, _)| x.device().is_cuda()) {
        return pairs.iter().map(|(x, y)| min_norm_map_cuda(x, y)).collect();
    }
    let mut out = Vec::with_capacity(pairs.len());
    // The host holds one n x n Gram and its inverse per map of a group: a group per thread.
    let group = rayon::current_num_threads().max(1);
    for chunk in pairs.chunks(group) {
        let grams = chunk
            .iter()
            .map(|(x, y)| -> Result<(Tensor, Tensor, Mat<f64>)> {
                let (n, _) = x.dims2()?;
                ensure!(
                    y.dims2()?.0 == n,
                    "fit: {n} input rows but {} output rows",
                    y.dims2()?.0
                );
                let x = x.to_dtype(DType::F64)?;
                let y = y.to_dtype(DType::F64)?;
                let k: Vec<f64> = x.matmul(&x.t()?)?.flatten_all()?.to_vec1()?;
                let k = Mat::from_fn(n, n, |i, j| k[i * n + j]);
                Ok((x, y, k))
            })
            .collect::<Result<Vec<_>>>()?;
        let inverses: Vec<Mat<f64>> = grams
            .par_iter()
            .map(|(x, _, k)| -> Result<Mat<f64>> {
                ensure!(
                    (0..k.nrows()).all(|i| k[(i, i)].is_finite()),
                    "fit: the inputs contain non-finite values"
                );
                // `n` in `solve_block` only sets the equilibration's scale (powers of two).
                let d = x.dims2()?.1;
                let (_, p) = solve_block(k, d, 0.0, None)?.map_err(|e| anyhow::anyhow!("fit: {e}"))?;
                Ok(p)
            })
            .collect::<Result<_>>()?;
        for ((x, y, _), p) in grams.iter().zip(inverses) {
            let p = crate::lens::fit::solve::mat_tensor(&p, x.device())?;
            // A = Y^T (K^+ X): [d_out, n] x [n, d_in].
            let a = y.t()?.matmul(&p.matmul(x)?)?.to_dtype(DType::F32)?;
            out.push(a);
        }
    }
    Ok(out)
}

/// One map on a CUDA device: `K = X X^T` and its eigendecomposition on the GPU, the cutoff on
/// the host (on `n` eigenvalues), the products on the GPU.
#[cfg(feature = "cuda")]
fn min_norm_map_cuda(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (n, d_in) = x.dims2()?;
    let (ny, d_out) = y.dims2()?;
    ensure!(ny == n, "fit: {n} input rows but {ny} output rows");
    let x = x.to_dtype(DType::F64)?;
    let y = y.to_dtype(DType::F64)?;
    ensure!(
        x.sqr()?.sum_all()?.to_scalar::<f64>()?.is_finite(),
        "fit: the inputs contain non-finite values"
    );
    let k = x.matmul(&x.t()?)?;
    let (lam, u) = crate::lens::fit::device_linalg::sym_eigen(&k).map_err(|e| anyhow::anyhow!("fit: {e}"))?;
    let lam: Vec<f64> = lam.to_vec1()?;
    // scikit-learn keeps singular values above rcond * the largest: eigenvalues of K above
    // rcond^2 * the largest (the cutoff of the host's pseudo-inverse).
    let (keep, _) = crate::lens::fit::solve::sklearn_kept(&lam);
    let r = keep.len();
    if r == 0 {
        return Ok(Tensor::zeros((d_out, d_in), DType::F32, x.device())?);
    }
    let inv_sqrt: Vec<f64> = keep.iter().map(|&i| 1.0 / lam[i].sqrt()).collect();
    let inv_sqrt = Tensor::from_vec(inv_sqrt, (r, 1), x.device())?;
    let ids: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
    // W^T [r, n]: the kept eigenvectors, each over the square root of its eigenvalue.
    let wt = u
        .index_select(&Tensor::from_vec(ids, r, x.device())?, 0)?
        .broadcast_mul(&inv_sqrt)?;
    let b = wt.matmul(&x)?; // [r, d_in]
    let c = y.t()?.matmul(&wt.t()?)?; // [d_out, r]
    Ok(c.matmul(&b)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lens::fit::{fit_all_pairs, FitOptions};
    use candle_core::Device;

    /// Through the examples' Gram, the map equals the fit from activations (its minimum-norm
    /// fallback on the singular d x d Gram) for fewer examples than coordinates, with repeated
    /// examples (a singular n x n Gram, the cutoff's path) and without, and for more examples.
    #[test]
    fn equals_the_fit_of_the_states() {
        let dev = Device::Cpu;
        for (n, d, repeats) in [(20, 32, false), (24, 32, true), (50, 12, false)] {
            let mut x: Vec<f32> = (0..n * d)
                .map(|i| ((((i as u64) * 2654435761 + 11) % 2003) as f32) / 1001.0 - 1.0)
                .collect();
            if repeats {
                // Rows 0..4 again as rows 4..8: K has rank n - 4.
                let (a, b) = x.split_at_mut(4 * d);
                b[..4 * d].copy_from_slice(a);
            }
            let a_true: Vec<f32> = (0..d * d).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
            let xt = Tensor::from_vec(x, (n, d), &dev).unwrap();
            let at = Tensor::from_vec(a_true, (d, d), &dev).unwrap();
            let noise = Tensor::randn(0f32, 0.01, (n, d), &dev).unwrap();
            let y = (xt.matmul(&at.t().unwrap()).unwrap() + noise).unwrap();
            let got = &min_norm_maps(&[(xt.clone(), y.clone())]).unwrap()[0];
            let states = Tensor::stack(&[&xt, &y], 0).unwrap();
            let (want, _) = fit_all_pairs(&states, &[(0, 1)], &FitOptions::default()).unwrap();
            let want = want.require(0, 1).unwrap().a.clone();
            let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(
                worst <= 1e-4 * scale,
                "n {n} d {d} repeats {repeats}: max difference {worst} (largest entry {scale})"
            );
        }
    }
}
