//! Synthetic hidden states for the benchmarks and tests: realistic-looking, deterministic in
//! the seed, made without a model.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Fills `out` with N(0, 1) draws, in parallel; deterministic in (seed, tag).
    fn fill_normals(seed: u64, tag: u64, out: &mut [f32]) {
        out.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
            let mut r = SplitMix(seed ^ tag.wrapping_mul(0xA24B_AED4_963E_E407));
            r.0 = r.next() ^ (i as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25);
            r.normals(c);
        });
    }
    fn normals(&mut self, out: &mut [f32]) {
        for pair in out.chunks_mut(2) {
            let (u, v) = (self.uniform(), self.uniform());
            let r = (-2.0 * u.ln()).sqrt();
            let th = std::f64::consts::TAU * v;
            pair[0] = (r * th.cos()) as f32;
            if pair.len() > 1 {
                pair[1] = (r * th.sin()) as f32;
            }
        }
    }
}

/// Realistic-looking random hidden states [n_states, n, d] f32 for benchmarks: a low-rank-plus-
/// noise first state, each next state `h + 0.5 tanh(h W) + noise` (so consecutive states are
/// strongly correlated and the maps are good but not exact), and 4 outlier coordinates whose
/// values are around 1000 (like the massive activations of real models).
///
/// ```
/// let h = jumplens::lens::fit::synthetic_states(4, 100, 16, 0)?;
/// assert_eq!(h.dims(), &[4, 100, 16]);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn synthetic_states(n_states: usize, n: usize, d: usize, seed: u64) -> Result<Tensor> {
    ensure!(n_states >= 1 && n >= 1 && d >= 1, "synthetic_states: empty shape");
    let seed = seed ^ 0x6A09_E667_F3BC_C908;
    let factors = (d / 8).max(1);
    let mut z = vec![0f32; n * factors];
    SplitMix::fill_normals(seed, 1, &mut z);
    let mut bmat = vec![0f32; factors * d];
    SplitMix::fill_normals(seed, 2, &mut bmat);
    let f = (1.0 / (factors as f32).sqrt()) * 2.0;
    bmat.iter_mut().for_each(|x| *x *= f);
    let mut r = vec![0f32; n * d];
    SplitMix::fill_normals(seed, 3, &mut r);
    r.iter_mut().for_each(|x| *x *= 0.1);
    matmul(
        MatMut::from_row_major_slice_mut(&mut r, n, d),
        Accum::Add,
        MatRef::from_row_major_slice(&z, n, factors),
        MatRef::from_row_major_slice(&bmat, factors, d),
        1.0f32,
        Par::rayon(0),
    );
    let outliers: Vec<usize> = {
        let mut o: Vec<usize> = [7usize, 63, 300, 511].iter().map(|&k| k % d).collect();
        o.sort_unstable();
        o.dedup();
        o
    };
    let mut out = Vec::with_capacity(n_states * n * d);
    let mut w = vec![0f32; d * d];
    let mut t = vec![0f32; n * d];
    let mut noise = vec![0f32; n * d];
    for s in 0..n_states {
        if s > 0 {
            SplitMix::fill_normals(seed, 100 + 2 * s as u64, &mut w);
            let f = 1.5 / (d as f32).sqrt();
            w.iter_mut().for_each(|x| *x *= f);
            matmul(
                MatMut::from_row_major_slice_mut(&mut t, n, d),
                Accum::Replace,
                MatRef::from_row_major_slice(&r, n, d),
                MatRef::from_row_major_slice(&w, d, d),
                1.0f32,
                Par::rayon(0),
            );
            SplitMix::fill_normals(seed, 101 + 2 * s as u64, &mut noise);
            r.par_iter_mut()
                .zip(t.par_iter())
                .zip(noise.par_iter())
                .for_each(|((x, &y), &e)| *x += 0.5 * y.tanh() + 0.05 * e);
        }
        let start = out.len();
        out.extend_from_slice(&r);
        let h = &mut out[start..];
        for row in h.chunks_mut(d) {
            for &k in &outliers {
                row[k] = 1000.0 * (1.0 + 0.2 * row[k]);
            }
        }
    }
    Ok(Tensor::from_vec(out, (n_states, n, d), &Device::Cpu)?)
}

/// Synthetic hidden states [S, N, d] made on `device` (a GPU benchmark cannot carry real ones):
/// the recipe of [`synthetic_states`] (low-rank first state, each next state
/// `h + 0.5 tanh(h W) + noise`, 4 outlier coordinates around 1000) with the device's own
/// random numbers.
pub fn synthetic_states_on(device: &Device, n_states: usize, n: usize, d: usize, seed: u64) -> Result<Tensor> {
    // (The CPU backend cannot be seeded; the benchmark runs on GPUs.)
    if !device.is_cpu() {
        device.set_seed(seed)?;
    }
    let factors = (d / 8).max(1);
    let z = Tensor::randn(0f32, 1.0, (n, factors), device)?;
    let b = Tensor::randn(0f32, 2.0 / (factors as f32).sqrt(), (factors, d), device)?;
    let mut r = (z.matmul(&b)? + Tensor::randn(0f32, 0.1, (n, d), device)?)?;
    let mask: Vec<f32> = (0..d)
        .map(|c| f32::from([7usize, 63, 300, 511].iter().any(|&k| k % d == c) as u8))
        .collect();
    let mask = Tensor::from_vec(mask, (1, d), device)?;
    let mut out = Vec::with_capacity(n_states);
    for s in 0..n_states {
        if s > 0 {
            let w = Tensor::randn(0f32, 1.5 / (d as f32).sqrt(), (d, d), device)?;
            let noise = Tensor::randn(0f32, 0.05, (n, d), device)?;
            r = ((&r + (r.matmul(&w)?.tanh()? * 0.5)?)? + noise)?;
        }
        // Outlier columns: 1000 (1 + 0.2 h).
        let outl = ((&r * 199.0)? + 1000.0)?.broadcast_mul(&mask)?;
        out.push((&r + outl)?);
    }
    Ok(Tensor::stack(&out, 0)?)
}
