//! The paper's linear shortcuts: for every pair of hidden states (l, l'), the least-squares map
//! `A` with `h_l' ≈ A h_l` (scikit-learn `LinearRegression(fit_intercept=False)`).
//!
//! # Why it is built this way
//!
//! Fitting the 465 pairs of a 30-layer model one regression at a time (what the paper's code
//! does) repeats the same work 30 times over: every regression from layer `l` needs
//! `X_l^T X_l`, and every pair needs one block `X_l'^T X_l`. These are the blocks of the Gram
//! matrix `Z^T Z` of all states side by side (`Z = [X_0 | ... | X_{S-1}]`, [N, S d]), so the
//! sufficient statistics of *all* pairs cost the lower triangle of that Gram: `(S d)^2 N`
//! flops (2.9 TFLOP for SmolLM2 size), a GEMM workload that runs near the machine's peak.
//! After it, each source layer needs one `d x d` factorisation and each pair one `d x d`
//! product (6% more flops, in float64).
//!
//! Only the needed blocks are formed: for all pairs that is the whole lower triangle, for the
//! jumps to the last state ([`pairs_to_final`]) only the sources' diagonal blocks and one block
//! per pair (`S d^2 N/2 + S d^2 N` multiply-adds). Each block is one single-threaded GEMM
//! (576 x 576 x N runs at ~95% of a core's peak with no synchronisation) and the blocks are
//! spread over the threads with rayon; one parallel GEMM over the whole triangle measured
//! slower. In the default path (float32, no intercept) the blocks are read straight from the
//! [S, N, d] input: no copy of the states and no buffer besides the blocks themselves (0.66 GB
//! for all pairs of SmolLM2). Paths that must transform the data (centring for an intercept,
//! float64) stream it through a buffer of about 256 MiB, chunk by chunk of rows.
//!
//! # Where the parts live
//!
//! This file holds the options, the pairs, the report types and the dispatch; [`solve`] the
//! per-layer factorisation shared by both paths (equilibration, Cholesky / inverse, condition
//! estimates, scikit-learn's cutoff, ridge); [`cpu`] the Gram accumulation on the CPU;
//! [`device`] the GPU path; [`synthetic`] the synthetic states of the benchmarks and tests;
//! [`few_rows`] single maps from fewer examples than coordinates (through the examples' Gram).
//!
//! # Numerics
//!
//! * Column equilibration: every source layer's Gram block is scaled by `S^-1 G S^-1`, with `S`
//!   the power of two nearest each column's RMS (after centring, with an intercept), before it
//!   is factorised, and the solution is unscaled. Because the scales are powers of two,
//!   scaling commutes exactly with floating-point rounding: scaling the finished Gram gives
//!   the bits that scaling the data before the GEMM would give, so it is done after (no extra
//!   pass over the data). Hidden states have outlier coordinates in the thousands; what limits
//!   a float32 Gram is the condition number of the *scaled* block.
//! * The big path accumulates the Gram in float32 (twice as fast as float64); everything after
//!   it is float64: Cholesky, explicit inverse `P = (X_l^T X_l)^-1`, condition estimates,
//!   eigendecomposition, and the products `A = C P` (C = `X_l'^T X_l`). The products must be
//!   float64: rounding `P` (entries ~`1/lambda_min`) or the product to float32 put errors
//!   into the maps that are not damped like those of the Gram — measured on the benchmark
//!   data, ~100x larger prediction errors. With a float32 Gram and float64 solve the maps'
//!   training-set predictions match an exact (float64 QR) least-squares solution to ~2e-5
//!   relative, and their validation r^2 match a float64-Gram fit to ~6e-7.
//! * Trouble is detected per source layer: a failed Cholesky, or a scaled condition number
//!   above [`F32_GRAM_MAX_COND`], makes that layer's blocks be recomputed in float64 from the
//!   data (only that layer; it costs about one float64 pass over its targets).
//! * scikit-learn's `lstsq` drops singular values of `X` below `1e-6` times the largest
//!   ([`SKLEARN_RCOND`]), i.e. Gram eigenvalues below `1e-12` of the largest. When the
//!   unscaled Gram's condition number may exceed that, its float64 eigendecomposition decides
//!   the rank, and a rank-deficient layer gets the minimum-norm (pseudo-inverse) solution with
//!   the same cutoff, and a warning naming the layer.
//! * With an intercept, the columns are centred (float64 means) while they are copied into the
//!   Gram's chunks, as scikit-learn centres before `lstsq`; `b = mean(y) - A mean(x)`.
//! * Small problems (the unit-test fixtures) use float64 throughout ([`GramPrecision::Auto`]).
//!
//! # Example
//!
//! ```
//! use jumplens::lens::fit::{fit_all_pairs, pairs_to_final, synthetic_states, FitOptions};
//! let h = synthetic_states(5, 300, 16, 0)?; // [S = 5, N = 300, d = 16]
//! let (maps, report) = fit_all_pairs(&h, &pairs_to_final(5), &FitOptions::default())?;
//! assert_eq!(maps.pairs.len(), 4);
//! let a = &maps.get(2, 4).unwrap().a; // [16, 16], h_4 ≈ a @ h_2
//! assert_eq!(a.dims(), &[16, 16]);
//! assert!(report.warnings.is_empty());
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod cpu;
pub mod device;
pub mod device_linalg;
pub mod few_rows;
pub mod solve;
pub mod stats;
pub mod synthetic;

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;
use serde::Serialize;

use crate::lens::maps::Maps;
pub use synthetic::synthetic_states;

/// scikit-learn's default `LinearRegression(tol=1e-6)`, passed to `scipy.linalg.lstsq` as
/// `cond`: singular values of `X` below `SKLEARN_RCOND * s_max` count as zero.
pub const SKLEARN_RCOND: f64 = 1e-6;

/// Largest condition number (2-norm estimate, after column equilibration) of a source layer's
/// float32 Gram block that is trusted; above it the layer is recomputed in float64.
pub const F32_GRAM_MAX_COND: f64 = 1e6;

/// Below this many Gram flops, [`GramPrecision::Auto`] uses float64 throughout.
pub(crate) const AUTO_F64_FLOPS: f64 = 2e10;

/// Precision of the Gram accumulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
pub enum GramPrecision {
    /// float64 for small problems (below ~2e10 flops), float32 otherwise.
    #[default]
    Auto,
    /// float32 Gram, float64 factorisation and products, float64 recomputation of troubled
    /// layers.
    F32,
    /// float64 throughout.
    F64,
}

/// Options of [`fit_all_pairs`].
///
/// ```
/// use jumplens::lens::fit::FitOptions;
/// // The paper's OLS is the default; an intercept and a ridge penalty are opt-in.
/// let opts = FitOptions { intercept: true, ridge: 1e-3, ..FitOptions::default() };
/// assert!(opts.intercept && FitOptions::default().ridge == 0.0);
/// ```
#[derive(Clone, Debug)]
pub struct FitOptions {
    /// Fit an intercept (scikit-learn `fit_intercept=True`: centre x and y, solve, then
    /// `b = mean(y) - A mean(x)`). The paper uses `false`.
    pub intercept: bool,
    /// Ridge penalty added to the diagonal of the (centred, unscaled) Gram `X^T X`, i.e.
    /// minimise `||Y - X B||^2 + ridge ||B||^2` (scikit-learn `Ridge(alpha=ridge)`). 0 = OLS.
    pub ridge: f64,
    /// Precision of the Gram accumulation.
    pub precision: GramPrecision,
    /// Rows per chunk when the data must be copied (intercept or float64); 0 = about 256 MiB
    /// of chunk buffer. The default path reads the input in place and ignores it. On a GPU
    /// ([`crate::lens::fit::device`]): examples per chunk, 0 = about 4 GiB of float64.
    pub chunk_rows: usize,
    /// Largest scaled condition number of a float32 Gram block that is trusted; above it the
    /// layer is recomputed in float64 ([`F32_GRAM_MAX_COND`] by default; infinity never
    /// recomputes).
    pub f32_max_cond: f64,
    /// Draw a progress bar (rate, ETA) over the Gram blocks and factorisations on stderr.
    pub progress: bool,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            intercept: false,
            ridge: 0.0,
            precision: GramPrecision::Auto,
            chunk_rows: 0,
            f32_max_cond: F32_GRAM_MAX_COND,
            progress: false,
        }
    }
}

/// Diagnostics of one source layer's factorisation.
#[derive(Clone, Debug, Serialize)]
pub struct LayerDiag {
    /// Source state.
    pub layer: usize,
    /// Rank used (d unless the pseudo-inverse dropped directions).
    pub rank: usize,
    /// 2-norm condition estimate of the column-equilibrated Gram block (plus ridge).
    pub cond: f64,
    /// Condition of the unscaled Gram block (what scikit-learn's cutoff sees): exact (from the
    /// eigenvalues) when the spectrum was computed, `inf` when singular; otherwise the cheap
    /// over-estimate `cond * (max scale / min scale)^2`, or, when that exceeds 1e11, a
    /// power-iteration estimate.
    pub cond_unscaled: f64,
    /// Whether the minimum-norm (eigendecomposition) solution was used instead of Cholesky.
    pub pseudo_inverse: bool,
    /// Whether this layer's blocks were recomputed in float64 after trouble with float32.
    pub recomputed_f64: bool,
}

/// Timings and flop counts of a fit.
#[derive(Clone, Debug, Serialize)]
pub struct FitStats {
    /// Precision the Gram was accumulated in (never `Auto`).
    pub precision: GramPrecision,
    /// Rows per chunk (N when the input was read in place).
    pub chunk_rows: usize,
    /// Number of d x d Gram blocks formed (diagonal blocks of the sources + one per pair).
    pub gram_blocks: usize,
    /// Column means (with an intercept only).
    pub seconds_stats: f64,
    /// Gram accumulation (including chunk copies).
    pub seconds_gram: f64,
    /// Factorisations (and float64 recomputations, if any).
    pub seconds_factor: f64,
    /// Products `A = C P`, intercepts and output tensors.
    pub seconds_products: f64,
    /// Whole call.
    pub seconds_total: f64,
    /// Flops the needed Gram blocks require (a multiply-add = 2): `d^2 N` per diagonal block
    /// (symmetric), `2 d^2 N` per off-diagonal block; all pairs: `(S^2 - 1) d^2 N`, the
    /// `(S d)^2 N` of the whole triangle less the last state's unused diagonal block.
    pub model_flops: f64,
    /// Flops the Gram GEMMs performed (`model_flops` plus the diagonals of the symmetric
    /// blocks).
    pub gram_flops: f64,
}

impl FitStats {
    /// `model_flops / seconds_total`, in GFLOP/s.
    pub fn gflops(&self) -> f64 {
        self.model_flops / self.seconds_total / 1e9
    }
}

/// What a fit reports besides its maps: per-layer diagnostics, warnings and timings.
#[derive(Clone, Debug, Serialize)]
pub struct FitReport {
    /// Number of states S of the input.
    pub n_states: usize,
    /// Number of examples N.
    pub n: usize,
    /// Whether intercepts were fitted.
    pub intercept: bool,
    /// Ridge penalty used.
    pub ridge: f64,
    /// One entry per source layer, sorted.
    pub layers: Vec<LayerDiag>,
    /// Human-readable warnings, one per troubled source layer (singular layers, float64
    /// recomputations).
    pub warnings: Vec<String>,
    /// Timings.
    pub stats: FitStats,
}

impl FitReport {
    /// Whether there are fewer examples than the width: then every Gram block is singular and
    /// every layer gets the minimum-norm solution.
    pub fn underdetermined(&self, d: usize) -> bool {
        self.n < d
    }
}

/// Every pair (l, l') with l < l' < n_states, sorted.
///
/// ```
/// assert_eq!(jumplens::lens::fit::pairs_all(3), vec![(0, 1), (0, 2), (1, 2)]);
/// ```
pub fn pairs_all(n_states: usize) -> Vec<(usize, usize)> {
    (0..n_states)
        .flat_map(|l| (l + 1..n_states).map(move |t| (l, t)))
        .collect()
}

/// The jumps to the last state: (l, n_states - 1) for l < n_states - 1.
///
/// ```
/// assert_eq!(jumplens::lens::fit::pairs_to_final(3), vec![(0, 2), (1, 2)]);
/// ```
pub fn pairs_to_final(n_states: usize) -> Vec<(usize, usize)> {
    let last = n_states.saturating_sub(1);
    (0..last).map(|l| (l, last)).collect()
}

/// Flops of the Gram blocks `pairs` need, as counted in [`FitStats::model_flops`].
///
/// ```
/// use jumplens::lens::fit::{model_flops, pairs_all};
/// // All pairs of 31 states of width 576 over 9,000 examples: 30 diagonal blocks and 465
/// // off-diagonal ones, (S^2 - 1) d^2 N, i.e. (S d)^2 N less the unused last diagonal block.
/// let f = model_flops(9000, 576, &pairs_all(31));
/// assert_eq!(f, (31.0 * 31.0 - 1.0) * 576.0 * 576.0 * 9000.0);
/// ```
pub fn model_flops(n: usize, d: usize, pairs: &[(usize, usize)]) -> f64 {
    let mut sources: Vec<usize> = pairs.iter().map(|p| p.0).collect();
    sources.sort_unstable();
    sources.dedup();
    let mut p = pairs.to_vec();
    p.sort_unstable();
    p.dedup();
    let blk = (d * d) as f64 * n as f64;
    sources.len() as f64 * blk + p.len() as f64 * 2.0 * blk
}

/// Fits `h_l' ≈ A h_l` by least squares for every pair of `pairs` on `train` [S, N, d]
/// (f32; other dtypes are converted). States on a GPU are fitted there
/// ([`crate::lens::fit::device`]), with the maps left on it.
///
/// With the default options this is scikit-learn's `LinearRegression(fit_intercept=False)`,
/// including its minimum-norm answer on rank-deficient data (see the module docs).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use jumplens::lens::fit::{fit_all_pairs, pairs_all, FitOptions};
/// // 3 states of 50 examples, d = 4; h_2 = 2 h_1 exactly.
/// let h0 = Tensor::randn(0f32, 1.0, (50, 4), &Device::Cpu)?;
/// let h1 = Tensor::randn(0f32, 1.0, (50, 4), &Device::Cpu)?;
/// let h = Tensor::stack(&[h0, h1.clone(), (h1 * 2.0)?], 0)?;
/// let (maps, _report) = fit_all_pairs(&h, &pairs_all(3), &FitOptions::default())?;
/// let a = maps.get(1, 2).unwrap().a.to_vec2::<f32>()?;
/// assert!((a[0][0] - 2.0).abs() < 1e-4 && a[0][1].abs() < 1e-4);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn fit_all_pairs(train: &Tensor, pairs: &[(usize, usize)], opts: &FitOptions) -> Result<(Maps, FitReport)> {
    if train.device().is_cpu() {
        cpu::fit_all_pairs_on_cpu(train, pairs, opts)
    } else {
        device::fit_all_pairs_on_device(train, pairs, opts)
    }
}

/// `(S, N, d)` of a fit's input and its pairs, sorted and deduplicated.
pub(crate) type CheckedInputs = ((usize, usize, usize), Vec<(usize, usize)>);

/// Checks the input of a fit (shape, ridge, pairs); shared by the CPU and device paths.
pub(crate) fn checked_inputs(train: &Tensor, pairs: &[(usize, usize)], opts: &FitOptions) -> Result<CheckedInputs> {
    let (s, n, d) = train.dims3().context("fit: expected hidden states [S, N, d]")?;
    ensure!(n >= 1 && d >= 1, "fit: empty input [{s}, {n}, {d}]");
    ensure!(opts.ridge >= 0.0 && opts.ridge.is_finite(), "fit: ridge must be >= 0");
    let mut pairs = pairs.to_vec();
    pairs.sort_unstable();
    pairs.dedup();
    ensure!(!pairs.is_empty(), "fit: no pairs given");
    for &(l, t) in &pairs {
        ensure!(
            l < t && t < s,
            "fit: pair ({l}, {t}) invalid for {s} states (need l < l' < S)"
        );
    }
    Ok(((s, n, d), pairs))
}

pub(crate) struct Plan {
    /// Compact index -> state (sorted).
    pub(crate) states: Vec<usize>,
    /// State -> compact index (usize::MAX if absent).
    pub(crate) compact: Vec<usize>,
    /// Source states (sorted) with their targets (sorted).
    pub(crate) sources: Vec<(usize, Vec<usize>)>,
}

impl Plan {
    pub(crate) fn new(s: usize, pairs: &[(usize, usize)]) -> Plan {
        let mut states: Vec<usize> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
        states.sort_unstable();
        states.dedup();
        let mut compact = vec![usize::MAX; s];
        for (i, &x) in states.iter().enumerate() {
            compact[x] = i;
        }
        let mut sources: Vec<(usize, Vec<usize>)> = Vec::new();
        for &(l, t) in pairs {
            match sources.last_mut() {
                Some((sl, ts)) if *sl == l => ts.push(t),
                _ => sources.push((l, vec![t])),
            }
        }
        Plan {
            states,
            compact,
            sources,
        }
    }
}
