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
//! let maps = fit_all_pairs(&h, &pairs_to_final(5), &FitOptions::default())?;
//! assert_eq!(maps.pairs.len(), 4);
//! let a = &maps.get(2, 4).unwrap().a; // [16, 16], h_4 ≈ a @ h_2
//! assert_eq!(a.dims(), &[16, 16]);
//! assert!(maps.warnings.is_empty());
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::ops::Range;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

pub(crate) use crate::host::with_f32_slice;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use rayon::prelude::*;
use serde::Serialize;

/// scikit-learn's default `LinearRegression(tol=1e-6)`, passed to `scipy.linalg.lstsq` as
/// `cond`: singular values of `X` below `SKLEARN_RCOND * s_max` count as zero.
pub const SKLEARN_RCOND: f64 = 1e-6;

/// Largest condition number (2-norm estimate, after column equilibration) of a source layer's
/// float32 Gram block that is trusted; above it the layer is recomputed in float64.
pub const F32_GRAM_MAX_COND: f64 = 1e6;

/// Estimated condition number of the unscaled Gram above which the exact spectrum is computed
/// to apply scikit-learn's cutoff (`SKLEARN_RCOND^2 = 1e-12` on the Gram's eigenvalues; the
/// estimate is a lower bound, hence the margin of 10).
const NEAR_CUTOFF_COND: f64 = 1e11;

/// Below this many Gram flops, [`GramPrecision::Auto`] uses float64 throughout.
const AUTO_F64_FLOPS: f64 = 2e10;

/// Target size of one chunk of rows (bytes) when `chunk_rows` is 0.
const CHUNK_BYTES: usize = 256 << 20;

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
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            intercept: false,
            ridge: 0.0,
            precision: GramPrecision::Auto,
            chunk_rows: 0,
            f32_max_cond: F32_GRAM_MAX_COND,
        }
    }
}

/// One fitted shortcut `h_target ≈ a @ h_source (+ intercept)`.
#[derive(Clone, Debug)]
pub struct PairMap {
    /// Source state l.
    pub source: usize,
    /// Target state l' (> l).
    pub target: usize,
    /// `[d, d]` f32, out x in (scikit-learn's `coef_`).
    pub a: Tensor,
    /// `[d]` f32 when fitted with an intercept.
    pub intercept: Option<Tensor>,
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

/// All fitted maps of one call, sorted by (source, target).
///
/// ```
/// use jumplens::lens::fit::{fit_all_pairs, synthetic_states, FitOptions};
/// let h = synthetic_states(3, 200, 8, 1)?;
/// let maps = fit_all_pairs(&h, &[(0, 2), (1, 2)], &FitOptions::default())?;
/// let pred = maps.predict(1, 2, &h.get(1)?)?; // [200, 8], approximates h_2
/// assert_eq!(pred.dims(), &[200, 8]);
/// assert!(maps.get(0, 1).is_none());
/// assert_eq!(maps.named_tensors()[0].0, "a.0.2");
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Maps {
    /// Number of states S of the input.
    pub n_states: usize,
    /// Width d.
    pub d: usize,
    /// Whether intercepts were fitted.
    pub intercept: bool,
    /// Ridge penalty used.
    pub ridge: f64,
    /// One entry per pair, sorted by (source, target).
    pub pairs: Vec<PairMap>,
    /// One entry per source layer, sorted.
    pub layers: Vec<LayerDiag>,
    /// Human-readable warnings (singular layers, float64 recomputations).
    pub warnings: Vec<String>,
    /// Timings.
    pub stats: FitStats,
}

impl Maps {
    /// The map for (source, target), if fitted.
    pub fn get(&self, source: usize, target: usize) -> Option<&PairMap> {
        self.pairs
            .binary_search_by(|p| (p.source, p.target).cmp(&(source, target)))
            .ok()
            .map(|i| &self.pairs[i])
    }

    /// Applies the map (source, target) to `x` [n, d]: `x @ A^T (+ b)`, [n, d].
    pub fn predict(&self, source: usize, target: usize, x: &Tensor) -> Result<Tensor> {
        let p = self
            .get(source, target)
            .with_context(|| format!("no map fitted for ({source}, {target})"))?;
        let a = p.a.to_device(x.device())?.to_dtype(x.dtype())?;
        let y = x.matmul(&a.t()?)?;
        Ok(match &p.intercept {
            Some(b) => y.broadcast_add(&b.to_device(x.device())?.to_dtype(x.dtype())?)?,
            None => y,
        })
    }

    /// Named tensors `a.{l}.{l'}` (and `b.{l}.{l'}`) for writing, e.g., a safetensors file.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.pairs.len());
        for p in &self.pairs {
            out.push((format!("a.{}.{}", p.source, p.target), p.a.clone()));
            if let Some(b) = &p.intercept {
                out.push((format!("b.{}.{}", p.source, p.target), b.clone()));
            }
        }
        out
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
/// let maps = fit_all_pairs(&h, &pairs_all(3), &FitOptions::default())?;
/// let a = maps.get(1, 2).unwrap().a.to_vec2::<f32>()?;
/// assert!((a[0][0] - 2.0).abs() < 1e-4 && a[0][1].abs() < 1e-4);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn fit_all_pairs(train: &Tensor, pairs: &[(usize, usize)], opts: &FitOptions) -> Result<Maps> {
    if !train.device().is_cpu() {
        return crate::lens::fit::device::fit_all_pairs_on_device(train, pairs, opts);
    }
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

// ---------------------------------------------------------------------------------------------
// Element types

/// f32 or f64 for the Gram.
pub(crate) trait Elem: faer::traits::RealField + Copy + Send + Sync + std::fmt::Debug + 'static {
    const BYTES: usize;
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    /// dst = src - mean (mean: None = 0).
    fn convert(src: &[f32], mean: Option<&[f64]>, dst: &mut [Self]);
    /// The f32 data as `Self` when that needs no conversion.
    fn view_f32(data: &[f32]) -> Option<&[Self]>;
}

impl Elem for f32 {
    const BYTES: usize = 4;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
    fn view_f32(data: &[f32]) -> Option<&[f32]> {
        Some(data)
    }
    fn convert(src: &[f32], mean: Option<&[f64]>, dst: &mut [f32]) {
        match mean {
            None => dst.copy_from_slice(src),
            Some(mu) => {
                for ((o, &x), &m) in dst.iter_mut().zip(src).zip(mu) {
                    *o = (x as f64 - m) as f32;
                }
            }
        }
    }
}

impl Elem for f64 {
    const BYTES: usize = 8;
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
    fn view_f32(_data: &[f32]) -> Option<&[f64]> {
        None
    }
    fn convert(src: &[f32], mean: Option<&[f64]>, dst: &mut [f64]) {
        match mean {
            None => {
                for (o, &x) in dst.iter_mut().zip(src) {
                    *o = x as f64;
                }
            }
            Some(mu) => {
                for ((o, &x), &m) in dst.iter_mut().zip(src).zip(mu) {
                    *o = x as f64 - m;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Access to the hidden states

/// A borrowed, contiguous [S, N, d] f32 array.
pub(crate) struct States<'a> {
    pub data: &'a [f32],
    pub s: usize,
    pub n: usize,
    pub d: usize,
}

impl States<'_> {
    #[inline]
    pub fn row(&self, state: usize, i: usize) -> &[f32] {
        let o = (state * self.n + i) * self.d;
        &self.data[o..o + self.d]
    }
}

/// Calls `f` with the f32 data of a [S, N, d] tensor (converted to f32 / CPU / contiguous only
/// when needed; otherwise no copy).
pub(crate) fn with_states<R>(h: &Tensor, f: impl FnOnce(States<'_>) -> Result<R>) -> Result<R> {
    let (s, n, d) = h.dims3().context("expected hidden states [S, N, d]")?;
    let h = h.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    with_f32_slice(&h, |data| f(States { data, s, n, d }))
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

// ---------------------------------------------------------------------------------------------
// Which blocks are needed

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

// ---------------------------------------------------------------------------------------------
// Gram accumulation

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
    /// state c.
    fn accumulate<'v>(&mut self, view: impl Fn(usize) -> MatRef<'v, T> + Sync) {
        enum Job<'a, T> {
            Diag(usize, &'a mut Mat<T>),
            Cross(usize, usize, &'a mut Mat<T>),
        }
        let mut jobs: Vec<Job<'_, T>> = Vec::new();
        for (lc, g) in self.diag.iter_mut().enumerate() {
            if let Some(g) = g {
                jobs.push(Job::Diag(lc, g));
            }
        }
        for (g, &(lc, tc)) in self.cross.iter_mut().zip(&self.cross_of) {
            jobs.push(Job::Cross(lc, tc, g));
        }
        let one = T::of(1.0);
        jobs.into_par_iter().for_each(|job| match job {
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

// ---------------------------------------------------------------------------------------------
// Factorisation of one source layer

pub(crate) enum Method {
    Cholesky,
    PseudoInverse,
}

pub(crate) struct Solved {
    /// Inverse (or pseudo-inverse) of the *scaled* Gram block, symmetric [d, d].
    p: Mat<f64>,
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
fn sym_f64<T: Elem>(lower: MatRef<'_, T>) -> Mat<f64> {
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
    let mut v = Mat::<f64>::from_fn(d, 1, |i, _| 1.0 + 0.5 * ((i as f64) * 0.618_033_988_7).fract());
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

/// Inverse of a symmetric positive definite matrix via Cholesky (None if not PD).
fn chol_inverse(g: MatRef<'_, f64>) -> Option<Mat<f64>> {
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
    let lam = evd.S().column_vector();
    let u = evd.U();
    let lmax = (0..d).map(|i| lam[i]).fold(0f64, f64::max);
    let cut = SKLEARN_RCOND * SKLEARN_RCOND * lmax;
    let keep: Vec<usize> = (0..d).filter(|&i| lam[i] > cut).collect();
    let r = keep.len();
    let lmin = keep.iter().map(|&i| lam[i]).fold(f64::INFINITY, f64::min);
    let cond = if r == d { lmax / lmin } else { f64::INFINITY };
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
            // kappa(S G S) <= kappa(G) (max s / min s)^2: skip the estimate when that is small.
            let smax = scale.iter().fold(0f64, |a, &b| a.max(b));
            let smin = scale.iter().fold(f64::INFINITY, |a, &b| a.min(b));
            let bound = cond * (smax / smin).powi(2);
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
    let scale: Vec<f64> = (0..g.nrows())
        .map(|i| pow2_near((g[(i, i)].max(0.0) / n as f64).sqrt()))
        .collect();
    let inv = scale.iter().map(|s| 1.0 / s).collect();
    (scale, inv)
}

fn pow2_near(rms: f64) -> f64 {
    if rms > 0.0 && rms.is_finite() {
        let e = rms.log2().round().clamp(-60.0, 60.0);
        2f64.powi(e as i32)
    } else {
        1.0
    }
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

/// Diagnostics and warning of one solved source layer (`reason`: why float32 was not trusted).
pub(crate) fn layer_outcome(l: usize, d: usize, solved: &Solved, reason: Option<&str>) -> (LayerDiag, Option<String>) {
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

/// `A = C P` in float64, returned as row-major f32 (C: [d, d] cross block `X_t^T X_l`, P: the
/// float64 inverse of `X_l^T X_l`). The product must be float64: `P` has entries of size
/// `1/lambda_min`, and rounding it (or the products) to float32 puts errors into the maps
/// that are not damped like those of the Gram (measured: ~100x larger prediction errors).
fn product<T: Elem>(c: MatRef<'_, T>, p: MatRef<'_, f64>, scratch: &mut (Mat<f64>, Vec<f64>)) -> Vec<f32> {
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

fn fit_impl<T: Elem>(
    st: &States<'_>,
    plan: &Plan,
    opts: &FitOptions,
    precision: GramPrecision,
    mflops: f64,
    t0: Instant,
) -> Result<Maps> {
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
    if direct {
        let data = T::view_f32(st.data).expect("float32 Gram");
        let len = n * d;
        gram.accumulate(|c| {
            let s = plan.states[c];
            MatRef::from_column_major_slice(&data[s * len..(s + 1) * len], d, n)
        });
    } else {
        let mut buf = vec![T::of(0.0); kd * b];
        let mut start = 0;
        while start < n {
            let end = (start + b).min(n);
            fill_chunk::<T>(st, &means, &plan.states, start..end, &mut buf);
            let zt = MatRef::from_column_major_slice(&buf[..kd * (end - start)], kd, end - start);
            gram.accumulate(|c| zt.subrows(c * d, d));
            start = end;
        }
    }
    let gram_flops = gram.flops(d, n);
    let t_gram = t0.elapsed().as_secs_f64();

    // One factorisation per source layer (largest first for load balance).
    let rows_f64 = chunk_rows(opts, n, 8 * d, 8).min(4096);
    let mut order: Vec<usize> = (0..plan.sources.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plan.sources[i].1.len()));
    let mut factors: Vec<Factor> = order
        .par_iter()
        .map(|&i| {
            let (l, ts) = &plan.sources[i];
            factor_source(&gram, plan, st, &means, opts, is_f32, rows_f64, *l, ts)
        })
        .collect::<Result<_>>()?;
    factors.sort_by_key(|f| f.l);
    let t_factor = t0.elapsed().as_secs_f64();

    // Products, one per pair; each cross block is freed as soon as its map is made, so the
    // Gram and the maps are never both whole in memory.
    let gram_blocks = gram.cross.len() + plan.sources.len();
    let factor_of: std::collections::HashMap<usize, usize> =
        factors.iter().enumerate().map(|(i, f)| (f.l, i)).collect();
    let Gram { diag, cross, cross_of } = gram;
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
                ensure!(
                    a.iter().all(|x| x.is_finite()),
                    "fit: map ({l}, {t}) is not finite (non-finite values in state {t}?)"
                );
                let b = match (&means[l], &means[t]) {
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
                    intercept: b,
                })
            },
        )
        .collect::<Result<_>>()?;
    results.sort_by_key(|p| (p.source, p.target));
    let maps_pairs = results;
    let t_end = t0.elapsed().as_secs_f64();
    let warnings = factors.iter().filter_map(|f| f.warning.clone()).collect();
    let layers = factors.into_iter().map(|f| f.diag).collect();
    Ok(Maps {
        n_states: st.s,
        d,
        intercept: opts.intercept,
        ridge: opts.ridge,
        pairs: maps_pairs,
        layers,
        warnings,
        stats: FitStats {
            precision,
            chunk_rows: b,
            gram_blocks,
            seconds_stats: t_stats,
            seconds_gram: t_gram - t_stats,
            seconds_factor: t_factor - t_gram,
            seconds_products: t_end - t_factor,
            seconds_total: t_end,
            model_flops: mflops,
            gram_flops,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Synthetic states for benchmarks and tests

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_helpers() {
        assert_eq!(pairs_all(4).len(), 6);
        assert_eq!(pairs_to_final(4), vec![(0, 3), (1, 3), (2, 3)]);
        assert_eq!(pairs_to_final(1), vec![]);
    }

    #[test]
    fn pow2() {
        assert_eq!(pow2_near(1000.0), 1024.0);
        assert_eq!(pow2_near(0.0), 1.0);
        assert_eq!(pow2_near(f64::NAN), 1.0);
    }

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
                let (a, b) = (run(GramPrecision::F32), run(GramPrecision::F64));
                let w = max_rel_diff(&a, &b);
                let cond = b.layers.iter().map(|l| l.cond).fold(0f64, f64::max);
                // Float32 Gram: coefficients accurate to ~cond * (a few ulps).
                let tol = (cond * 1e-6).max(1e-5) as f32;
                assert!(
                    w < tol,
                    "{} pairs, intercept {intercept}: {w} (cond {cond:.2e})",
                    pairs.len()
                );
                assert!(a.warnings.is_empty() && b.warnings.is_empty());
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
        let maps = fit_all_pairs(&h, &[(0, 1)], &opts).unwrap();
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
        let sparse = fit_all_pairs(&h, &pairs, &FitOptions::default()).unwrap();
        let full = fit_all_pairs(&h, &pairs_all(5), &FitOptions::default()).unwrap();
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
