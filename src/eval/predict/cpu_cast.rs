//! The CPU scoring kernel of `predict`. A lens's logits are reduced in vocabulary chunks of
//! [`CHUNK`] entries, each chunk to a [`Partial`] per row (top-2, the chunk's log-sum-exp, the
//! sum of p_model_j z_j, the gold logit), and the chunks are merged in vocabulary order by the
//! online log-sum-exp rule. [`score_casts`] forms each [rows, CHUNK] block of logits with one
//! GEMM against the unembedding rows and reduces it while it is in cache, so no [rows, V] logits
//! matrix is written (on SmolLM2 that matrix was 25 MB per batch, written and read four
//! times); [`score_logits`] reduces logits already formed (the model's own, the layer-L cell).
//! Both run the same reduction, chunk boundaries are fixed and merging is sequential, so results
//! do not depend on the thread count.

use rayon::prelude::*;

use super::{Cell, CpuReference};

/// Vocabulary entries per block: a [128, 256] f32 block (the default CPU batch) is 128 KiB and
/// stays in a core's L2 while it is reduced.
const CHUNK: usize = 256;

/// One row's reduction over one vocabulary chunk (or, merged, over several).
#[derive(Clone, Copy, Debug)]
struct Partial {
    /// The largest logit and its vocabulary index (the first one on ties).
    best: f32,
    arg: u32,
    /// The largest logit at any other index.
    second: f32,
    /// sum_j exp(z_j - best).
    sum: f64,
    /// sum_j p_model_j z_j.
    pz: f64,
    /// The gold token's logit, once the chunk holding it was seen.
    gold: Option<f32>,
}

impl Partial {
    /// Merges `b`, a chunk later in the vocabulary, into `self`.
    fn merge(&mut self, b: &Partial) {
        if b.best > self.best {
            self.second = max(self.best, b.second);
            self.sum = self.sum * f64::from(self.best - b.best).exp() + b.sum;
            self.best = b.best;
            self.arg = b.arg;
        } else {
            self.second = max(self.second, b.best);
            if b.sum > 0.0 {
                self.sum += b.sum * f64::from(b.best - self.best).exp();
            }
        }
        self.pz += b.pz;
        self.gold = self.gold.or(b.gold);
    }
}

/// `a` unless `b` is larger (NaN never wins: the scalar scorer's comparison semantics).
#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

/// Lanes of the hand-unrolled reductions (one AVX2 register of f32; LLVM vectorizes the lanes).
const LANES: usize = 8;

/// The largest element of `z` (-inf when empty), lane-parallel.
#[inline(always)]
fn max_of(z: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = z.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in m.iter_mut().zip(c) {
            *m = max(*m, x);
        }
    }
    let mut best = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &x| max(a, x));
    for x in m {
        best = max(best, x);
    }
    best
}

/// exp(x) for x <= 88 (Cephes' expf: a degree-6 polynomial after reducing by ln 2; ~1 ulp),
/// flushing to ~1e-38 below -87; branch-free so that the loops around it vectorize.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 * 2^23 rounds to an integer n, whose bits then sit in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = max(x, -87.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    y * f32::from_bits((n_int.wrapping_add(127) << 23) as u32)
}

/// (sum_j exp(z_j - best), sum_j p_j z_j) of one row's chunk.
type Sums = fn(&[f32], &[f32], f32) -> (f64, f64);

/// [`Sums`] in portable code (lane arrays the compiler vectorizes as it can).
#[inline(always)]
fn sums_portable(z: &[f32], p: &[f32], best: f32) -> (f64, f64) {
    let mut sum = [0f32; LANES];
    let mut pz = [0f64; LANES];
    let mut zc = z.chunks_exact(LANES);
    let mut pc = p.chunks_exact(LANES);
    for (zc, pc) in (&mut zc).zip(&mut pc) {
        for l in 0..LANES {
            sum[l] += exp_f32(zc[l] - best);
            pz[l] += f64::from(pc[l]) * f64::from(zc[l]);
        }
    }
    let (mut s, mut q) = (0f64, 0f64);
    for (&zj, &pj) in zc.remainder().iter().zip(pc.remainder()) {
        s += f64::from(exp_f32(zj - best));
        q += f64::from(pj) * f64::from(zj);
    }
    s += sum.iter().map(|&x| f64::from(x)).sum::<f64>();
    q += pz.iter().sum::<f64>();
    (s, q)
}

/// [`Sums`] with AVX2 + FMA: eight exponentials per instruction sequence (the same Cephes
/// polynomial as [`exp_f32`], in fused multiply-adds), the products summed in float64.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sums_avx2(z: &[f32], p: &[f32], best: f32) -> (f64, f64) {
    use std::arch::x86_64::*;
    let n = z.len().min(p.len()) / LANES * LANES;
    let splat = |x: f32| _mm256_set1_ps(x);
    let round = 12_582_912.0f32;
    let (mut s, mut q0, mut q1) = (_mm256_setzero_ps(), _mm256_setzero_pd(), _mm256_setzero_pd());
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= both lengths.
        let (zv, pv) = unsafe { (_mm256_loadu_ps(z.as_ptr().add(i)), _mm256_loadu_ps(p.as_ptr().add(i))) };
        let x = _mm256_max_ps(_mm256_sub_ps(zv, splat(best)), splat(-87.0));
        let t = _mm256_fmadd_ps(x, splat(std::f32::consts::LOG2_E), splat(round));
        let k = _mm256_sub_ps(t, splat(round));
        let r = _mm256_fnmadd_ps(k, splat(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(k, splat(-2.121_944_4e-4), r);
        let mut c = splat(1.987_569_1e-4);
        for coef in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            c = _mm256_fmadd_ps(c, r, splat(coef));
        }
        let y = _mm256_fmadd_ps(_mm256_mul_ps(c, r), r, _mm256_add_ps(r, splat(1.0)));
        let e = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(round.to_bits() as i32));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
        s = _mm256_add_ps(s, _mm256_mul_ps(y, scale));
        let (plo, zlo) = (_mm256_castps256_ps128(pv), _mm256_castps256_ps128(zv));
        let (phi, zhi) = (_mm256_extractf128_ps(pv, 1), _mm256_extractf128_ps(zv, 1));
        q0 = _mm256_fmadd_pd(_mm256_cvtps_pd(plo), _mm256_cvtps_pd(zlo), q0);
        q1 = _mm256_fmadd_pd(_mm256_cvtps_pd(phi), _mm256_cvtps_pd(zhi), q1);
        i += LANES;
    }
    let (mut sa, mut qa) = ([0f32; LANES], [0f64; 4]);
    // SAFETY: the arrays hold 8 f32 and 4 f64.
    unsafe {
        _mm256_storeu_ps(sa.as_mut_ptr(), s);
        _mm256_storeu_pd(qa.as_mut_ptr(), _mm256_add_pd(q0, q1));
    }
    let (tail_s, tail_q) = sums_portable(&z[n..], &p[n..], best);
    (
        sa.iter().map(|&x| f64::from(x)).sum::<f64>() + tail_s,
        qa.iter().sum::<f64>() + tail_q,
    )
}

/// [`sums_avx2`] as a [`Sums`].
#[cfg(target_arch = "x86_64")]
fn sums_avx2_checked(z: &[f32], p: &[f32], best: f32) -> (f64, f64) {
    // SAFETY: only chosen by `sums_for_cpu` after detecting AVX2 and FMA.
    unsafe { sums_avx2(z, p, best) }
}

/// The fastest [`Sums`] this CPU runs.
fn sums_for_cpu() -> Sums {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return sums_avx2_checked;
        }
    }
    sums_portable
}

/// The reduction of one row's chunk `z` (vocabulary indices from `v0`), `p` the model's
/// probabilities at the same indices, `gold` the row's gold token.
#[inline(always)]
fn reduce(z: &[f32], p: &[f32], v0: usize, gold: Option<u32>, sums: Sums) -> Partial {
    let best = max_of(z);
    let arg = z.iter().position(|&x| x == best).unwrap_or(0);
    let second = max(max_of(&z[..arg]), max_of(z.get(arg + 1..).unwrap_or(&[])));
    let (s, q) = sums(z, p, best);
    let gold = gold
        .map(|g| g as usize)
        .filter(|&g| g >= v0 && g < v0 + z.len())
        .map(|g| z[g - v0]);
    Partial {
        best,
        arg: (v0 + arg) as u32,
        second,
        sum: if best > f32::NEG_INFINITY { s } else { 0.0 },
        pz: q,
        gold,
    }
}

/// [`reduce`] for every row of a [rows, width] block of logits whose rows sit `stride` apart,
/// appended to `out`.
fn reduce_block(block: &[f32], stride: usize, width: usize, v0: usize, r: &CpuReference, out: &mut Vec<Partial>) {
    let v = r.vocab;
    let sums = sums_for_cpu();
    for row in 0..r.gold.len() {
        let z = &block[row * stride..row * stride + width];
        let p = &r.p[row * v + v0..row * v + v0 + width];
        out.push(reduce(z, p, v0, r.gold[row], sums));
    }
}

/// Merges the chunks' partials of rows `first..first + rows` (in vocabulary order) and turns
/// each row into its scores.
fn finish(chunks: &[Vec<Partial>], first: usize, r: &CpuReference) -> Cell {
    let v = r.vocab;
    let rows = r.gold.len();
    let per_row: Vec<(u32, f32, f32, f32, u32, f32, f32)> = (0..rows)
        .into_par_iter()
        .map(|row| {
            let mut acc = chunks[0][first + row];
            for c in &chunks[1..] {
                acc.merge(&c[first + row]);
            }
            let (m, lp) = (&r.logits[row * v..(row + 1) * v], &r.logp[row * v..(row + 1) * v]);
            let arg = acc.arg as usize;
            let lse = acc.best as f64 + acc.sum.ln();
            let chosen = m[arg];
            let rank = m.iter().filter(|&&x| x > chosen).count() as u32;
            let kl = r.neg_entropy[row] - acc.pz + lse;
            let ce = acc.gold.map_or(0.0, |g| lse - g as f64);
            let p1 = (acc.best as f64 - lse).exp();
            let p2 = (acc.second as f64 - lse).exp();
            (
                rank,
                -lp[arg],
                kl as f32,
                ce as f32,
                acc.arg,
                (p1 - p2) as f32,
                p1 as f32,
            )
        })
        .collect();
    Cell {
        rank: per_row.iter().map(|x| x.0).collect(),
        surprisal: per_row.iter().map(|x| x.1).collect(),
        kl: per_row.iter().map(|x| x.2).collect(),
        ce: per_row.iter().map(|x| x.3).collect(),
        top1: per_row.iter().map(|x| x.4).collect(),
        margin: per_row.iter().map(|x| x.5).collect(),
        max_prob: per_row.iter().map(|x| x.6).collect(),
    }
}

/// Scores logits `z` [rows, V] (row-major) against the model.
pub(super) fn score_logits(z: &[f32], r: &CpuReference) -> Cell {
    let v = r.vocab;
    let chunks: Vec<Vec<Partial>> = (0..v.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let v0 = c * CHUNK;
            let mut out = Vec::with_capacity(r.gold.len());
            reduce_block(&z[v0..], v, CHUNK.min(v - v0), v0, r, &mut out);
            out
        })
        .collect();
    finish(&chunks, 0, r)
}

/// Scores `casts` sets of final-normed states, `u` [casts * rows, d] (each set the reference's
/// rows), read out through the unembedding `w` [V, d] (both row-major f32): the logits u W^T of
/// each set against the model, one cell per set. Each vocabulary chunk of `w` is multiplied with
/// every set while it is in cache (one [rows, CHUNK] GEMM block per set, reduced at once), so
/// the 110 MB unembedding of SmolLM2 is read from memory once per call, not once per set.
pub(super) fn score_casts(u: &[f32], casts: usize, w: &[f32], d: usize, r: &CpuReference) -> Vec<Cell> {
    use faer::{Accum, MatMut, MatRef, Par};
    let v = r.vocab;
    let rows = r.gold.len();
    assert_eq!(u.len(), casts * rows * d, "casts x rows x d states");
    assert_eq!(w.len(), v * d, "a [V, d] unembedding");
    // Several casts share one GEMM per vocabulary chunk ([sets rows, CHUNK] logits): the chunk
    // of the unembedding is packed once for all of them rather than once per cast, and the
    // GEMM's row blocks are large enough to run near the kernel's peak. Up to ~4 MiB of logits
    // per block (a core's L2 here).
    let sets_per_gemm = ((1usize << 20) / (rows * CHUNK).max(1)).clamp(1, casts.max(1));
    let chunks: Vec<Vec<Partial>> = (0..v.div_ceil(CHUNK))
        .into_par_iter()
        .map_init(
            || vec![0f32; sets_per_gemm * rows * CHUNK],
            |block, c| {
                let v0 = c * CHUNK;
                let width = CHUNK.min(v - v0);
                let rhs = MatRef::from_row_major_slice(&w[v0 * d..(v0 + width) * d], width, d).transpose();
                let mut out = Vec::with_capacity(casts * rows);
                for first in (0..casts).step_by(sets_per_gemm) {
                    let sets = sets_per_gemm.min(casts - first);
                    let block = &mut block[..sets * rows * width];
                    faer::linalg::matmul::matmul(
                        MatMut::from_row_major_slice_mut(block, sets * rows, width),
                        Accum::Replace,
                        MatRef::from_row_major_slice(&u[first * rows * d..(first + sets) * rows * d], sets * rows, d),
                        rhs,
                        1.0f32,
                        Par::Seq,
                    );
                    for set in 0..sets {
                        reduce_block(
                            &block[set * rows * width..(set + 1) * rows * width],
                            width,
                            width,
                            v0,
                            r,
                            &mut out,
                        );
                    }
                }
                out
            },
        )
        .collect();
    crate::model::layers::clear_upper_vector_state();
    (0..casts).map(|set| finish(&chunks, set * rows, r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let (a, b) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 4.0 * f32::EPSILON as f64, "worst relative error {worst}");
        assert!(exp_f32(-1e4) < 1e-37 && exp_f32(-1e4) >= 0.0);
    }

    /// The fused GEMM + reduction scores u W^T like the scorer of formed logits, on a vocabulary
    /// that is not a multiple of the chunk.
    #[test]
    fn fused_cast_equals_scoring_formed_logits() {
        use candle_core::{Device, Tensor, D};
        let dev = Device::Cpu;
        let (rows, d, v) = (7, 24, 3 * CHUNK + 57);
        let u = Tensor::randn(0f32, 1.0, (rows, d), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (v, d), &dev).unwrap();
        let model_logits =
            (u.matmul(&w.t().unwrap()).unwrap() + Tensor::randn(0f32, 2.0, (rows, v), &dev).unwrap()).unwrap();
        let logp = candle_nn::ops::log_softmax(&model_logits, D::Minus1).unwrap();
        let gold = [
            Some(0),
            None,
            Some((v - 1) as u32),
            Some(CHUNK as u32),
            Some(5),
            None,
            Some(300),
        ];
        let r = CpuReference::new(&model_logits, &logp, &logp.exp().unwrap(), &gold).unwrap();
        let us: Vec<f32> = u.flatten_all().unwrap().to_vec1().unwrap();
        let ws: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        // The logits in float64, rounded once: the reference the GEMM's rounding is judged by.
        let z: Vec<f32> = (0..rows * v)
            .map(|i| {
                let (row, j) = (i / v, i % v);
                (0..d)
                    .map(|k| us[row * d + k] as f64 * ws[j * d + k] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let formed = score_logits(&z, &r);
        // Two sets: the states and their negation (logits -z), each scored on its own.
        let mut both = us.clone();
        both.extend(us.iter().map(|x| -x));
        let cells = score_casts(&both, 2, &ws, d, &r);
        let negated = score_logits(&z.iter().map(|x| -x).collect::<Vec<_>>(), &r);
        let (fused, fused_neg) = (&cells[0], &cells[1]);
        assert_eq!(fused_neg.top1, negated.top1);
        for (x, y) in fused_neg.kl.iter().zip(&negated.kl) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "kl of the second set: {x} vs {y}"
            );
        }
        assert_eq!(fused.top1, formed.top1);
        assert_eq!(fused.rank, formed.rank);
        assert!(
            formed.rank.iter().any(|&x| x > 0),
            "the test should include disagreements"
        );
        for (name, a, b) in [
            ("surprisal", &fused.surprisal, &formed.surprisal),
            ("kl", &fused.kl, &formed.kl),
            ("ce", &fused.ce, &formed.ce),
            ("margin", &fused.margin, &formed.margin),
            ("max_prob", &fused.max_prob, &formed.max_prob),
        ] {
            for (x, y) in a.iter().zip(b.iter()) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{name}: {x} vs {y}");
            }
        }
        assert_eq!(formed.ce[1], 0.0);
        assert!(formed.ce[0] > 0.0);
    }

    /// The CPU's sums (AVX2 where present) agree with the portable ones, tails included.
    #[test]
    fn cpu_sums_equal_portable_sums() {
        let z: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 1000) as f32 * 0.03 - 20.0).collect();
        let p: Vec<f32> = (0..1003).map(|i| ((i * 104_729) % 997) as f32 / 5e5).collect();
        let best = max_of(&z);
        let (s0, q0) = sums_portable(&z, &p, best);
        let (s1, q1) = sums_for_cpu()(&z, &p, best);
        assert!((s0 - s1).abs() <= 1e-6 * s0, "{s0} vs {s1}");
        assert!((q0 - q1).abs() <= 1e-9 * (1.0 + q0.abs()), "{q0} vs {q1}");
        let direct: f64 = z.iter().map(|&x| ((x - best) as f64).exp()).sum();
        assert!((s1 - direct).abs() <= 1e-6 * direct, "{s1} vs {direct}");
    }

    #[test]
    fn merging_chunks_equals_one_pass() {
        // Ties across chunks: the first index wins, the second-best is the tied value.
        let z = [1.0f32, 7.0, 3.0, 7.0, -2.0, 5.0, 7.0, 0.5, 6.0];
        let p = [0.1f32; 9];
        let whole = reduce(&z, &p, 0, Some(8), sums_portable);
        let mut acc = reduce(&z[..2], &p[..2], 0, Some(8), sums_portable);
        for (v0, part) in [(2, &z[2..5]), (5, &z[5..])] {
            acc.merge(&reduce(part, &p[v0..v0 + part.len()], v0, Some(8), sums_portable));
        }
        assert_eq!((acc.arg, acc.best, acc.second), (1, 7.0, 7.0));
        assert_eq!((whole.arg, whole.best, whole.second), (1, 7.0, 7.0));
        assert_eq!(acc.gold, Some(6.0));
        let direct: f64 = z.iter().map(|&x| ((x - 7.0) as f64).exp()).sum();
        assert!((acc.sum - direct).abs() < 1e-6 && (whole.sum - direct).abs() < 1e-6);
        assert!((acc.pz - whole.pz).abs() < 1e-9);
    }
}
